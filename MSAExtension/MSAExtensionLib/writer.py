"""Writing a server result into the selected segment the way a Segment Editor effect does.

The result is a (K, J, I) mask on the VOLUME's voxel grid. It is resampled (nearest neighbour,
through the volume's and the segmentation's parent transforms) onto the segmentation's modifier
labelmap geometry, compared with the segment, and only the difference is written, through
`modifySelectedSegmentByLabelmap` semantics:

- voxels to add go in with mode Add, voxels to clear with mode Remove, each limited to the extent
  of the changed slices: unchanged slices are never written, other segments are only touched where
  the overwrite setting says so (never outside the added voxels), and Segment Editor masking
  (editable area, editable intensity range) applies to both;
- one `saveStateForUndo` before the first write: every update is one undo step (none if nothing
  changed);
- `covered_k` limits the result's authority: a 2D result covers one slice of the volume and
  leaves every other slice of the segment as it was.

The editor behind it is a small protocol (`EditorTarget`): `EditorLogicTarget` drives Slicer's
vtkSlicerSegmentEditorLogic (headless, the module's logic, tests); the effect adapts its
`scriptedEffect` to the same protocol, so both take the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import vtk
from vtk.util import numpy_support

from .geometry import ijk_to_ras, to_vtk, transform_between


class EditorTarget(Protocol):
    """What the writer needs from a Segment Editor (an effect, or the logic behind one)."""

    segmentation_node: object

    def modifier_labelmap(self):
        """An EMPTY vtkOrientedImageData on the default modifier geometry (the editor's reference)."""

    def selected_segment_labelmap(self):
        """The selected segment as a 0/1 vtkOrientedImageData on the modifier geometry."""

    def save_state_for_undo(self) -> None: ...

    def modify(self, labelmap, mode: str, extent: list[int]) -> None:
        """modifySelectedSegmentByLabelmap(labelmap, Add | Remove, extent), masking applied."""


@dataclass
class WriteReport:
    changed_slices: list[int] = field(default_factory=list)  # k of the modifier grid written
    added: int = 0  # voxels
    removed: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def image_array(image) -> np.ndarray:
    """A vtkOrientedImageData's scalars as a (K, J, I) view over its extent."""
    e = image.GetExtent()
    shape = (e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    if min(shape) <= 0 or image.GetPointData().GetScalars() is None:
        return np.zeros((0, 0, 0), dtype=np.uint8)
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(shape)


def oriented_image(array: np.ndarray, ijk_to_parent: np.ndarray, start: tuple[int, int, int] = (0, 0, 0)):
    """(K, J, I) uint8 array + IJK -> parent-space matrix -> vtkOrientedImageData (a copy).

    start: the (i, j, k) index of array[0, 0, 0] (an image extent need not start at 0)."""
    import slicer

    image = slicer.vtkOrientedImageData()
    k, j, i = array.shape
    a, b, c = start
    image.SetExtent(a, a + i - 1, b, b + j - 1, c, c + k - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image_array(image)[:] = array
    image.SetImageToWorldMatrix(to_vtk(ijk_to_parent))
    return image


def _on_reference(image, reference, transform) -> np.ndarray:
    """`image` resampled (nearest) into `reference`'s geometry and extent -> (K, J, I) uint8 copy."""
    import slicer

    out = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        image, reference, out, False, False, transform, 0)
    values = image_array(out)
    if values.shape != image_array(reference).shape or tuple(out.GetExtent()) != tuple(reference.GetExtent()):
        # Resampling may crop to the overlap: place it into the reference's extent.
        full = np.zeros(image_array(reference).shape, dtype=np.uint8)
        re, oe = reference.GetExtent(), out.GetExtent()
        lo = [max(re[2 * a], oe[2 * a]) for a in range(3)]
        hi = [min(re[2 * a + 1], oe[2 * a + 1]) for a in range(3)]
        if all(lo[a] <= hi[a] for a in range(3)):
            src = tuple(slice(lo[a] - oe[2 * a], hi[a] - oe[2 * a] + 1) for a in (2, 1, 0))
            dst = tuple(slice(lo[a] - re[2 * a], hi[a] - re[2 * a] + 1) for a in (2, 1, 0))
            full[dst] = values[src]
        return full
    return values.astype(np.uint8, copy=True)


def mask_on_modifier_grid(volume_node, mask: np.ndarray, reference, segmentation_node) -> np.ndarray:
    """A (K, J, I) mask on the volume's grid -> 0/1 array on `reference`'s (the modifier's) grid."""
    image = oriented_image((mask > 0).astype(np.uint8), ijk_to_ras(volume_node))
    transform = transform_between(volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode())
    return _on_reference(image, reference, transform)


def write_mask(target: EditorTarget, volume_node, mask: np.ndarray, covered_k: list[int] | None = None) -> WriteReport:
    """Writes `mask` ((K, J, I) on the volume's grid) into the target's selected segment.

    covered_k: the volume slices the result speaks for (None: the whole volume). Returns what changed.
    """
    volume_shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    if mask.shape != volume_shape:
        raise ValueError(f"mask {mask.shape} does not match the volume's (K, J, I) {volume_shape}")
    coverage = np.zeros(volume_shape, dtype=np.uint8)
    if covered_k is None:
        coverage[:] = 1
    else:
        coverage[[k for k in covered_k if 0 <= k < volume_shape[0]]] = 1

    reference = target.modifier_labelmap()
    segmentation_node = target.segmentation_node
    new = mask_on_modifier_grid(volume_node, mask, reference, segmentation_node).astype(bool)
    covered = mask_on_modifier_grid(volume_node, coverage, reference, segmentation_node).astype(bool)
    old_image = target.selected_segment_labelmap()
    old = image_array(old_image) > 0 if old_image is not None else np.zeros(new.shape, dtype=bool)
    if old.shape != new.shape:  # an empty segment may come back without voxels
        old = np.zeros(new.shape, dtype=bool) if old.size == 0 else _on_reference(old_image, reference, None) > 0

    add = new & covered & ~old
    remove = old & covered & ~new
    changed = np.nonzero((add | remove).any(axis=(1, 2)))[0]
    report = WriteReport([int(k) + reference.GetExtent()[4] for k in changed], int(add.sum()), int(remove.sum()))
    if not report.changed:
        return report

    # The extent of the changed voxels, in the modifier's IJK: nothing outside it is written.
    e0 = reference.GetExtent()
    ks, js, is_ = np.nonzero(add | remove)
    extent = [int(is_.min()) + e0[0], int(is_.max()) + e0[0], int(js.min()) + e0[2], int(js.max()) + e0[2],
              int(ks.min()) + e0[4], int(ks.max()) + e0[4]]
    target.save_state_for_undo()
    for mode, voxels in (("remove", remove), ("add", add)):
        if voxels.any():
            modifier = target.modifier_labelmap()
            image_array(modifier)[:] = voxels
            modifier.Modified()
            target.modify(modifier, mode, extent)
    return report


class EditorLogicTarget:
    """EditorTarget over Slicer's vtkSlicerSegmentEditorLogic (Slicer >= 5.10, and slicer-core).

    The same C++ code that qSlicerSegmentEditorAbstractEffect::modifySelectedSegmentByLabelmap
    calls: masking, intensity range, overwrite mode and the undo history all come from it.
    """

    def __init__(self, editor_logic, segment_id: str | None = None) -> None:
        self.logic = editor_logic
        if segment_id is not None:
            editor_logic.SetCurrentSegmentID(segment_id)

    @property
    def segmentation_node(self):
        return self.logic.GetSegmentationNode()

    @property
    def segment_id(self) -> str:
        return self.logic.GetCurrentSegmentID()

    def modifier_labelmap(self):
        if not self.logic.ResetModifierLabelmapToDefault():
            from .errors import MSAClientError

            raise MSAClientError("the segmentation has no geometry yet: select a source volume in the Segment Editor")
        return self.logic.GetModifierLabelmap()

    def selected_segment_labelmap(self):
        if not self.logic.UpdateSelectedSegmentLabelmap():
            return None
        return self.logic.GetSelectedSegmentLabelmap()

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def modify(self, labelmap, mode: str, extent: list[int]) -> None:
        modes = {"add": self.logic.ModificationModeAdd, "remove": self.logic.ModificationModeRemove}
        self.logic.ModifySegmentByLabelmap(self.segmentation_node, self.segment_id, labelmap, modes[mode],
                                           extent, True, False)


def make_editor_logic(scene, segmentation_node, source_volume_node, editor_node=None):
    """A vtkSlicerSegmentEditorLogic on `scene` editing `segmentation_node` over `source_volume_node`.

    editor_node: the vtkMRMLSegmentEditorNode holding masking / overwrite settings (a new one if None).
    """
    import slicer

    if editor_node is None:
        editor_node = slicer.vtkMRMLSegmentEditorNode()
        scene.AddNode(editor_node)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    logic.SetSourceVolumeNode(source_volume_node)
    return logic
