"""Prompts in world RAS -> an MSA request in voxel indices -> a mask written into a segment.

Three steps, so that the effect can run the middle one on a worker thread:
1. `make_request` (GUI thread): markups positions -> IJK of the volume, model choice, the volume's
   server id (its voxels copied if they still need uploading);
2. `run_request` (any thread): upload if needed, POST /infer, read the label file, check its grid;
3. `apply_result` (GUI thread): write the mask through the editor (undo, masking, only changes).
`Segmenter.segment` chains them for scripts and tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from . import nrrd
from .client import MSAClient
from .errors import ImageLost, MSAClientError
from .geometry import box_ijk, ijk_to_ras, point_ijk
from .images import PreparedImage, ServerImages
from .writer import EditorTarget, WriteReport, write_mask

MODELS = {3: "msa", 2: "msa_2d"}


@dataclass
class Prompts:
    """The user's prompts in WORLD RAS (markups parent transforms already applied)."""

    positive: list = field(default_factory=list)  # [[r, a, s], ...]
    negative: list = field(default_factory=list)
    roi_corners: np.ndarray | None = None  # (8, 3) corners of a box (3D ROI, or a 2D box one slice thick)

    def empty(self) -> bool:
        return not self.positive and self.roi_corners is None


@dataclass
class InferRequest:
    model: str
    params: dict  # foreground / background [[i, j, k]], roi [i0, i1, j0, j1, k0, k1], slice
    covered_k: list[int] | None  # the slices the answer speaks for (2D: one), None: all
    image: PreparedImage
    shape_kji: tuple[int, int, int]
    ignored: list[str] = field(default_factory=list)  # prompts left out: "1 positive point outside the volume"


@dataclass
class InferResult:
    mask: np.ndarray  # (K, J, I) uint8 on the volume's grid
    params: dict  # the server's answer params (encoder_passes, latency_ms, backbone, ...)
    seconds: float  # client round trip of the infer request
    image_id: str

    def status(self) -> str:
        """One line for the status bar: slices, server latency, round trip, encoder work."""
        server_ms = self.params.get("latency_ms")
        passes = self.params.get("encoder_passes")
        parts = [f"{int(self.params.get('slices', int(self.mask.any(axis=(1, 2)).sum())))} slices"]
        if server_ms is not None:
            parts.append(f"server {server_ms / 1000:.2f} s")
        parts.append(f"round trip {self.seconds:.2f} s")
        if passes:
            parts.append(f"{passes} slices encoded")
        return ", ".join(parts)


def _inside(volume_node, points) -> tuple[list[list[int]], list[MSAClientError]]:
    """World points -> IJK of those inside the volume, and the errors of those outside."""
    inside, outside = [], []
    for point in points:
        try:
            inside.append(point_ijk(volume_node, point))
        except MSAClientError as exc:
            outside.append(exc)
    return inside, outside


def target_name(segment_name: str, info: dict | None) -> str | None:
    """The segment's name when the server's adapters learnt it as a target prompt (GET /info/: msa.targets),
    else None. A segment named "liver" then asks for the whole liver, not only the part around the click."""
    targets = set(((info or {}).get("msa") or {}).get("targets") or ())
    spelled = re.sub(r"[^a-z0-9]+", "_", segment_name.lower()).strip("_")  # as the server spells names
    return segment_name if spelled in targets else None


def info_outdated(info: dict | None, answer_params: dict) -> bool:
    """Whether an answer came from other adapters than GET /info/ described (training published new ones):
    their target names may differ, so /info/ must be read again before the next request names a segment."""
    served = ((info or {}).get("msa") or {}).get("adapters_sha256")
    return info is not None and answer_params.get("adapters_sha256") != served


def make_request(images: ServerImages, volume_node, prompts: Prompts, dimension: int = 3,
                 slice_k: int | None = None, model: str | None = None, text: str | None = None) -> InferRequest:
    """World prompts -> a request on the volume's voxel grid (GUI thread: reads MRML nodes).

    dimension 3: `msa`, the mask propagates through the volume and replaces the segment there;
    dimension 2: `msa_2d` on slice `slice_k` (default: the first positive point's slice, else the
    box's middle slice); only prompts on that slice are sent, only that slice is written.
    model: another infer model of the server than the dimension's default (msa / msa_2d).
    text: the structure's name as a target prompt (target_name), or None.

    A stored prompt outside the volume (a point dragged off it, one from another volume) is left
    out and named in `request.ignored`, so it cannot block every later request; only when no
    positive point and no box lies inside the volume is the request refused.
    """
    if volume_node is None:
        raise MSAClientError("select a source volume first")
    if prompts.empty():
        raise MSAClientError("place a positive point (left click) or a box first")
    foreground, outside_positive = _inside(volume_node, prompts.positive)
    background, outside_negative = _inside(volume_node, prompts.negative)
    roi, box_error = None, None
    if prompts.roi_corners is not None:
        try:
            roi = box_ijk(volume_node, prompts.roi_corners)
        except MSAClientError as exc:
            box_error = exc
    if not foreground and roi is None:
        first = (outside_positive or [box_error])[0]
        raise MSAClientError(f"{first}; place a point or a box inside it")
    ignored = [f"{len(errors)} {kind} point{'s' if len(errors) > 1 else ''} outside the volume"
               for kind, errors in (("positive", outside_positive), ("negative", outside_negative)) if errors]
    if box_error is not None:
        ignored.append("the box (it misses the volume)")
    i, j, k = volume_node.GetImageData().GetDimensions()
    params: dict = {"result_extension": ".nrrd"}
    covered = None
    if dimension == 2:
        if slice_k is None:
            slice_k = foreground[0][2] if foreground else (roi[4] + roi[5]) // 2
        if not 0 <= slice_k < k:
            raise MSAClientError(f"slice {slice_k} is outside the volume (0..{k - 1})")
        foreground = [p for p in foreground if p[2] == slice_k]
        background = [p for p in background if p[2] == slice_k]
        roi = roi[:4] + [slice_k, slice_k] if roi is not None and roi[4] <= slice_k <= roi[5] else None
        if not foreground and roi is None:
            raise MSAClientError(f"no positive point or box on slice {slice_k}: click inside the structure there")
        params["slice"] = slice_k
        covered = [slice_k]
    elif dimension != 3:
        raise ValueError(f"dimension must be 2 or 3, got {dimension}")
    params["foreground"] = foreground
    params["background"] = background
    if roi is not None:
        params["roi"] = roi
    if text is not None:
        params["text"] = text
    return InferRequest(model or MODELS[dimension], params, covered, images.prepare(volume_node), (k, j, i), ignored)


def run_request(client: MSAClient, images: ServerImages, request: InferRequest) -> InferResult:
    """Upload if needed, infer, read the answer (any thread; touches no MRML node).

    ImageLost: the server lost the image and this request carries no voxels to upload again;
    make the request again (make_request copies them now) and run it."""
    image_id = request.image.image_id
    answer = images.call(request.image, lambda image_id: client.infer(request.model, image_id, request.params))
    try:
        mask, matrix = nrrd.read(answer.label)
    except ValueError as exc:
        raise MSAClientError(f"the {request.model} answer is not a label file this client can read ({exc}); "
                             f"is the server an MSA server of this version?") from None
    if mask.shape != request.shape_kji:
        raise MSAClientError(f"the {request.model} answer has {mask.shape[::-1]} voxels, the uploaded volume "
                             f"{request.shape_kji[::-1]}; nothing was written")
    if not np.allclose(matrix, request.image.matrix, atol=1e-3):
        raise MSAClientError(f"the {request.model} answer lies elsewhere in space than the uploaded volume "
                             f"(its IJK->RAS differs); nothing was written")
    return InferResult((mask > 0).astype(np.uint8), answer.params, answer.seconds, image_id)


def apply_result(target: EditorTarget, volume_node, request: InferRequest, result: InferResult) -> WriteReport:
    """Writes the answer into the target's selected segment (GUI thread)."""
    return write_mask(target, volume_node, result.mask, request.covered_k)


class Segmenter:
    """A client, the images it uploaded, and the three steps in one call."""

    def __init__(self, client: MSAClient) -> None:
        self.client = client
        self.images = ServerImages(client)

    def request(self, volume_node, prompts: Prompts, dimension: int = 3, slice_k: int | None = None,
                model: str | None = None, text: str | None = None) -> InferRequest:
        return make_request(self.images, volume_node, prompts, dimension, slice_k, model, text)

    def run(self, request: InferRequest) -> InferResult:
        return run_request(self.client, self.images, request)

    def segment(self, target: EditorTarget, volume_node, prompts: Prompts, dimension: int = 3,
                slice_k: int | None = None, model: str | None = None,
                text: str | None = None) -> tuple[InferResult, WriteReport]:
        """Synchronous: prompts -> server -> segment. Raises MSAClientError with the segment unchanged.

        A server that lost the image (ImageLost) gets it uploaded again, once."""
        request = self.request(volume_node, prompts, dimension, slice_k, model, text)
        try:
            result = self.run(request)
        except ImageLost:
            request = self.request(volume_node, prompts, dimension, slice_k, model, text)  # voxels copied now
            result = self.run(request)
        return result, apply_result(target, volume_node, request, result)
