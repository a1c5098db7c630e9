"""Everything the MSA Slicer extension does that needs no Qt: the HTTP client, world RAS -> IJK
geometry, upload-once of volumes, writing results through the Segment Editor's editing path,
requests on a worker thread. Imports with `slicer-core` alone (real MRML nodes, no GUI), so the
tests drive it headless; the module (MSAExtension.py) and the effect only add widgets and events.
"""

from .client import DEFAULT_URL, InferAnswer, MSAClient
from .errors import ImageLost, MSAClientError
from .geometry import box_ijk, control_points_world, point_ijk, roi_corners_world, roi_ijk, world_to_ijk
from .images import ServerImages, content_hash, fetch_sample, mark_server_image, volume_array
from .labels import label_map, prepare_label, segment_on_volume_grid, send_label, submit_label
from .segmenter import (InferRequest, InferResult, Prompts, Segmenter, apply_result, make_request, run_request,
                        info_outdated, target_name)
from .prompts import (PromptNodes, add_point, edited_slice, moved_point_index, prompt_nodes, prompts_from_nodes,
                      reset_prompts, set_box)
from .status import SHORTCUTS, connection_summary, shortcuts_html, train_progress
from .worker import LatestRequestWorker, Outcome
from .writer import EditorLogicTarget, EditorTarget, WriteReport, make_editor_logic, write_mask

__all__ = [
    "DEFAULT_URL", "EditorLogicTarget", "EditorTarget", "ImageLost", "InferAnswer", "InferRequest",
    "InferResult", "LatestRequestWorker", "MSAClient", "MSAClientError", "Outcome", "PromptNodes", "Prompts",
    "SHORTCUTS", "Segmenter", "ServerImages", "WriteReport", "add_point", "apply_result", "box_ijk",
    "connection_summary", "content_hash", "control_points_world", "edited_slice", "fetch_sample", "info_outdated",
    "label_map", "make_editor_logic", "make_request", "mark_server_image", "moved_point_index", "point_ijk",
    "prepare_label", "prompt_nodes", "prompts_from_nodes", "reset_prompts", "roi_corners_world", "roi_ijk",
    "run_request", "segment_on_volume_grid", "send_label", "set_box", "shortcuts_html", "submit_label",
    "target_name", "train_progress", "volume_array", "world_to_ijk", "write_mask",
]
