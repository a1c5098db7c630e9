"""2D answers written into a segment the Segment Editor way, against the real server.

The liver's middle ROI slice was encoded by the liver run, so each `msa_2d` request here only runs
the decoder. Segments are set up with slicer.util and read back with slicer.util, not with the
extension's own code.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer

from MSAExtensionLib import EditorLogicTarget, make_editor_logic, volume_array
from slicer_helpers import activate, case_prompts, segment_array, set_segment


@pytest.fixture
def editing(liver_run):
    """A new segmentation on the liver run's DICOM volume: liver (pre-filled), other, region."""
    activate(liver_run.mrml)
    volume = liver_run.volume
    segmentation, (liver, other, region) = liver_run.mrml.add_segmentation(volume, ["liver", "other", "region"],
                                                                           name="editing")
    yield liver_run, volume, segmentation, liver, other, region
    liver_run.mrml.scene.RemoveNode(segmentation)


def _editor(scene, segmentation, volume, segment_id):
    logic = make_editor_logic(scene, segmentation, volume)
    return logic, EditorLogicTarget(logic, segment_id)


def test_2d_answer_touches_its_slice_only_and_no_other_segment(editing, liver_case):
    run, volume, segmentation, liver, other, _ = editing
    shape = volume_array(volume).shape
    k = liver_case.point_ijk[2]
    before = np.zeros(shape, dtype=bool)
    before[k - 3:k + 4, 100:180, 300:380] = True  # an earlier (wrong) liver on 7 slices, this one too
    set_segment(segmentation, liver, volume, before)
    spleen_like = np.zeros(shape, dtype=bool)
    spleen_like[k - 2:k + 3, 200:260, 20:80] = True  # another structure, on this slice and its neighbours
    set_segment(segmentation, other, volume, spleen_like)

    logic, target = _editor(run.mrml.scene, segmentation, volume, liver)
    result, report = run.segmenter.segment(target, volume, case_prompts(liver_case), dimension=2)

    assert result.params["encoder_passes"] == 0, result.params  # slice k came from the server's cache
    answer = result.mask.astype(bool)
    assert answer[k].sum() > 5000 and not np.delete(answer, k, axis=0).any(), "msa_2d answered off its slice"
    after = segment_array(segmentation, liver, volume)
    np.testing.assert_array_equal(np.delete(after, k, axis=0), np.delete(before, k, axis=0))
    np.testing.assert_array_equal(after[k], answer[k])
    np.testing.assert_array_equal(segment_array(segmentation, other, volume), spleen_like)
    assert report.changed_slices == [k]
    # One undo step restores the segment as it was.
    logic.Undo()
    np.testing.assert_array_equal(segment_array(segmentation, liver, volume), before)


def test_editable_area_inside_another_segment_is_respected(editing, liver_case):
    run, volume, segmentation, liver, _, region = editing
    shape = volume_array(volume).shape
    k = liver_case.point_ijk[2]
    area = np.zeros(shape, dtype=bool)
    i = liver_case.point_ijk[0]
    area[:, :, : i + 20] = True  # the left part of the image (in I) only, the clicked voxel inside
    set_segment(segmentation, region, volume, area)

    logic, target = _editor(run.mrml.scene, segmentation, volume, liver)
    editor = logic.GetSegmentEditorNode()
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(region)
    editor.SetOverwriteMode(editor.OverwriteNone)  # overlap allowed: the region segment stays whole
    result, report = run.segmenter.segment(target, volume, case_prompts(liver_case), dimension=2)

    answer = result.mask.astype(bool)
    assert (answer[k] & ~area[k]).sum() > 500, "the answer should reach outside the editable area"
    after = segment_array(segmentation, liver, volume)
    expected = np.zeros(shape, dtype=bool)
    expected[k] = answer[k] & area[k]
    np.testing.assert_array_equal(after, expected)
    np.testing.assert_array_equal(segment_array(segmentation, region, volume), area)

    # Overwrite on: the masking segment loses exactly the voxels the liver took.
    logic.Undo()
    editor.SetOverwriteMode(editor.OverwriteAllSegments)
    run.segmenter.segment(target, volume, case_prompts(liver_case), dimension=2)
    np.testing.assert_array_equal(segment_array(segmentation, liver, volume), expected)
    np.testing.assert_array_equal(segment_array(segmentation, region, volume), area & ~expected)


def test_editable_intensity_range_is_respected(editing, liver_case):
    run, volume, segmentation, liver, _, _ = editing
    k = liver_case.point_ijk[2]
    logic, target = _editor(run.mrml.scene, segmentation, volume, liver)
    editor = logic.GetSegmentEditorNode()
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(90.0, 400.0)  # HU: cuts through the liver's own values
    result, _ = run.segmenter.segment(target, volume, case_prompts(liver_case), dimension=2)

    voxels = volume_array(volume)
    inside = (voxels >= 90) & (voxels <= 400)
    answer = result.mask.astype(bool)
    assert (answer[k] & ~inside[k]).sum() > 500 and (answer[k] & inside[k]).sum() > 500, "the range must cut"
    after = segment_array(segmentation, liver, volume)
    expected = np.zeros_like(after)
    expected[k] = answer[k] & inside[k]
    np.testing.assert_array_equal(after, expected)
