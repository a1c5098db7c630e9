"""Writing masks into segments through the Segment Editor logic, without a server: only changed
voxels and slices are written, overlaps elsewhere survive, overwrite rules apply, one undo step per
update (none when nothing changes), and a segmentation under its own transform gets the mask in
the right place. Segments are set up and read with slicer.util, not with the extension."""

from __future__ import annotations

import numpy as np
import pytest
import vtk

from MSAExtensionLib import EditorLogicTarget, make_editor_logic, write_mask
from MSAExtensionLib.geometry import to_vtk
from slicer_helpers import segment_array, set_segment

SHAPE_KJI = (10, 48, 64)
IJK_TO_RAS = np.array([[-1.0, 0, 0, 30.0], [0, -1.0, 0, 20.0], [0, 0, 2.0, -5.0], [0, 0, 0, 1]])


class RecordingTarget(EditorLogicTarget):
    """The real editor logic target, recording what is asked of it."""

    def __init__(self, logic, segment_id):
        super().__init__(logic, segment_id)
        self.calls = []

    def save_state_for_undo(self):
        self.calls.append(("undo-state",))
        super().save_state_for_undo()

    def modify(self, labelmap, mode, extent):
        self.calls.append((mode, list(extent)))
        super().modify(labelmap, mode, extent)


@pytest.fixture
def scene(mrml):
    volume = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    image = vtk.vtkImageData()
    k, j, i = SHAPE_KJI
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().Fill(0)
    volume.SetAndObserveImageData(image)
    volume.SetIJKToRASMatrix(to_vtk(IJK_TO_RAS))
    segmentation, (a, b) = mrml.add_segmentation(volume, ["a", "b"])
    logic = make_editor_logic(mrml.scene, segmentation, volume)
    return mrml, volume, segmentation, a, b, logic


def box(k0, k1, j0, j1, i0, i1) -> np.ndarray:
    m = np.zeros(SHAPE_KJI, dtype=bool)
    m[k0:k1, j0:j1, i0:i1] = True
    return m


def test_only_changed_voxels_are_written_and_old_overlaps_survive(scene):
    mrml, volume, segmentation, a, b, logic = scene
    first = box(2, 8, 10, 30, 10, 40)
    set_segment(segmentation, a, volume, first)
    other = box(1, 9, 20, 40, 30, 60)  # overlaps `a` on every slice of it: allowed earlier by the user
    set_segment(segmentation, b, volume, other)
    assert (segment_array(segmentation, a, volume) & segment_array(segmentation, b, volume)).any()

    target = RecordingTarget(logic, a)
    new = first.copy()
    new[5, 10:30, 10:20] = False  # an answer that differs on slice 5 only, away from `b`
    report = write_mask(target, volume, new.astype(np.uint8))
    assert report.changed_slices == [5] and report.removed == 200 and report.added == 0
    # The write was limited to the changed voxels' extent: slice 5, i 10..19, j 10..29.
    assert target.calls == [("undo-state",), ("remove", [10, 19, 10, 29, 5, 5])]
    np.testing.assert_array_equal(segment_array(segmentation, a, volume), new)
    np.testing.assert_array_equal(segment_array(segmentation, b, volume), other)  # overlaps kept


def test_overwrite_none_keeps_other_segments_and_overwrite_all_cuts_only_added_voxels(scene):
    mrml, volume, segmentation, a, b, logic = scene
    other = box(0, 10, 0, 48, 32, 64)
    set_segment(segmentation, b, volume, other)
    answer = box(3, 6, 10, 30, 20, 50)  # reaches into `b` on slices 3..5
    editor = logic.GetSegmentEditorNode()

    editor.SetOverwriteMode(editor.OverwriteNone)
    write_mask(EditorLogicTarget(logic, a), volume, answer.astype(np.uint8))
    np.testing.assert_array_equal(segment_array(segmentation, a, volume), answer)
    np.testing.assert_array_equal(segment_array(segmentation, b, volume), other)

    logic.Undo()
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    write_mask(EditorLogicTarget(logic, a), volume, answer.astype(np.uint8))
    np.testing.assert_array_equal(segment_array(segmentation, a, volume), answer)
    np.testing.assert_array_equal(segment_array(segmentation, b, volume), other & ~answer)


def test_one_undo_step_per_update_and_none_without_change(scene):
    mrml, volume, segmentation, a, b, logic = scene
    target = RecordingTarget(logic, a)
    first, second = box(2, 5, 5, 15, 5, 15), box(4, 7, 10, 20, 10, 20)
    write_mask(target, volume, first.astype(np.uint8))
    report = write_mask(target, volume, second.astype(np.uint8))  # adds and removes: still one step
    assert [c[0] for c in target.calls] == ["undo-state", "add", "undo-state", "remove", "add"]
    assert report.changed_slices == [2, 3, 4, 5, 6]
    unchanged = write_mask(target, volume, second.astype(np.uint8))
    assert not unchanged.changed and len(target.calls) == 5  # no empty undo step
    logic.Undo()
    np.testing.assert_array_equal(segment_array(segmentation, a, volume), first)
    logic.Undo()
    assert not segment_array(segmentation, a, volume).any()


def test_segmentation_under_its_own_transform_gets_the_mask_in_place(scene):
    mrml, volume, segmentation, a, b, logic = scene
    shift = np.eye(4)
    shift[:3, 3] = [-4.0, 3.0, 6.0]  # whole voxels: segmentation i = volume i - 4, j + 3, k - 3
    segmentation.SetAndObserveTransformNodeID(mrml.add_transform(shift).GetID())
    answer = box(3, 6, 10, 20, 10, 30)
    write_mask(EditorLogicTarget(logic, a), volume, answer.astype(np.uint8))
    # Read in the volume's frame (slicer.util follows both transforms): the mask sits where it was sent.
    np.testing.assert_array_equal(segment_array(segmentation, a, volume), answer)
    # In the segmentation's own grid (the volume's grid before its transform) it is shifted.
    own = np.zeros_like(answer)
    own[0:3, 13:23, 6:26] = True
    internal = segment_array_internal(segmentation, a)
    np.testing.assert_array_equal(internal, own)


def segment_array_internal(segmentation, segment_id) -> np.ndarray:
    """The segment on the segmentation's reference grid, without any parent transform."""
    import slicer

    image = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation, segment_id, image, False)
    e = image.GetExtent()
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    out = np.zeros(SHAPE_KJI, dtype=bool)
    label = segmentation.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    out[e[4]:e[5] + 1, e[2]:e[3] + 1, e[0]:e[1] + 1] = values == label
    return out
