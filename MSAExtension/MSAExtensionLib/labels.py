"""Segments -> a label map on the volume's voxel grid, for "Submit label" (the datastore's final label)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk

from . import nrrd
from .client import MSAClient
from .errors import ImageLost
from .geometry import ijk_to_ras, to_numpy, transform_between
from .images import PreparedImage, ServerImages
from .writer import _on_reference, image_array, oriented_image


def segment_on_volume_grid(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """One segment resampled (nearest, through both nodes' parent transforms) onto the volume's
    voxel grid -> (K, J, I) bool."""
    import slicer

    i, j, k = volume_node.GetImageData().GetDimensions()
    reference = oriented_image(np.zeros((k, j, i), dtype=np.uint8), ijk_to_ras(volume_node))
    segment = slicer.vtkOrientedImageData()
    # applyParentTransform False: the image stays in the segmentation's own coordinates; the
    # transform to the volume's coordinates is applied by the resampling (non-linear ones too).
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, segment, False)
    values = image_array(segment)
    if values.size == 0:
        return np.zeros((k, j, i), dtype=bool)
    # Segments share labelmap layers: the layer holds other segments' values too.
    label_value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    matrix = vtk.vtkMatrix4x4()
    segment.GetImageToWorldMatrix(matrix)
    e = segment.GetExtent()
    binary = oriented_image((values == label_value).astype(np.uint8), to_numpy(matrix), (e[0], e[2], e[4]))
    transform = transform_between(segmentation_node.GetParentTransformNode(), volume_node.GetParentTransformNode())
    return _on_reference(binary, reference, transform) > 0


def label_map(segmentation_node, volume_node, segment_ids: list[str] | None = None) -> np.ndarray:
    """Segments (all, in the segmentation's order, by default) -> (K, J, I) label map: the n-th
    segment gets value n (1-based); where segments overlap, the later one wins."""
    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        segment_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    i, j, k = volume_node.GetImageData().GetDimensions()
    labels = np.zeros((k, j, i), dtype=np.uint8 if len(segment_ids) < 256 else np.uint16)
    for value, segment_id in enumerate(segment_ids, start=1):
        labels[segment_on_volume_grid(segmentation_node, segment_id, volume_node)] = value
    return labels


@dataclass
class PreparedLabel:
    """A label map ready to send (taken on the GUI thread, sent from any thread)."""

    image: PreparedImage
    filename: str
    content: bytes  # NRRD on the volume's grid


def prepare_label(images: ServerImages, volume_node, segmentation_node,
                  segment_ids: list[str] | None = None) -> PreparedLabel:
    image = images.prepare(volume_node)
    content = nrrd.write(label_map(segmentation_node, volume_node, segment_ids), ijk_to_ras(volume_node))
    return PreparedLabel(image, f"{image.image_id}_label.nrrd", content)


def send_label(client: MSAClient, images: ServerImages, label: PreparedLabel, tag: str = "final") -> dict:
    """Uploads the image if the server lacks it, then PUTs the label as the image's `tag` label.

    ImageLost: the server lost the image and `label` carries no voxels to upload again; prepare the
    label again (prepare_label copies them now) and send it."""
    return images.call(label.image, lambda image_id: client.save_label(image_id, label.filename, label.content, tag))


def submit_label(client: MSAClient, images: ServerImages, volume_node, segmentation_node,
                 segment_ids: list[str] | None = None, tag: str = "final") -> dict:
    """The segments as the image's final label on the server (synchronous; a server that lost the
    image gets it uploaded again, once)."""
    try:
        return send_label(client, images, prepare_label(images, volume_node, segmentation_node, segment_ids), tag)
    except ImageLost:
        return send_label(client, images, prepare_label(images, volume_node, segmentation_node, segment_ids), tag)
