"""The extension on the DICOM series against a real MSA server: geometry end to end.

One point in the liver and an ROI around the whole liver (its full slice range: all 20 slices of the
series), placed in WORLD coordinates as markups; the extension
converts them to voxel indices, uploads the volume, asks `msa`, and writes the answer into a
segment through the Segment Editor's logic. The segment must equal, voxel for voxel, what
msa.Session computes in this process for the same voxel indices, and match TotalSegmentator's
liver over the whole volume (compared in world coordinates: the label file is stored RAS, the
DICOM LPS).
The same again with an oblique volume and markups under a rotating + translating parent transform.
"""

from __future__ import annotations

import numpy as np
import vtk

from MSAExtensionLib import control_points_world, roi_corners_world
from MSAExtensionLib.geometry import ijk_to_ras, to_vtk
from slicer_helpers import DICOM_LABELS, LIVER, dice, new_mrml, place_case, rotation, run_case, segment_array

MIN_LIVER_DICE = 0.9


def test_dicom_volume_is_on_itk_grid(liver_run, dicom_dir):
    """Slicer's DICOM reader keeps ITK's voxel order (the server reads the upload with ITK)."""
    import SimpleITK as sitk

    from MSAExtensionLib import volume_array

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    image = reader.Execute()
    np.testing.assert_array_equal(volume_array(liver_run.volume), sitk.GetArrayFromImage(image))
    # LPS on disk: Slicer's IJK->RAS flips I and J against RAS.
    matrix = ijk_to_ras(liver_run.volume)
    assert matrix[0, 0] < 0 and matrix[1, 1] < 0 and matrix[2, 2] > 0, matrix


def test_world_prompts_become_the_voxel_indices(liver_run, liver_case):
    # The ROI is around the liver: its whole slice range (the liver lies on all 20 slices).
    slices = np.nonzero(liver_case.reference_kji.any(axis=(1, 2)))[0]
    assert liver_case.roi_ijk[4:] == [int(slices.min()), int(slices.max())] == [0, 19], liver_case.roi_ijk
    params = liver_run.request.params
    assert params["foreground"] == [liver_case.point_ijk], params
    assert params["background"] == []
    assert params["roi"] == liver_case.roi_ijk, params  # corners mapped one by one, then sorted
    assert liver_run.request.model == "msa" and liver_run.request.covered_k is None


def test_segment_equals_msa_session_voxel_for_voxel(liver_run, liver_case):
    segment = segment_array(liver_run.segmentation, liver_run.segment_id, liver_run.volume)
    expected = liver_case.session_kji.astype(bool)
    assert expected.sum() > 10000, expected.sum()
    mismatch = int((segment != expected).sum())
    assert mismatch == 0, f"{mismatch} voxels differ from msa.Session ({segment.sum()} vs {expected.sum()})"
    assert liver_run.report.added == int(expected.sum()) and liver_run.report.removed == 0
    assert liver_run.result.params["encoder_passes"] == 20, liver_run.result.params  # the ROI's slices, once


def test_liver_dice_in_world_coordinates(liver_run, liver_case, data_dir):
    """Dice against TotalSegmentator's liver over the WHOLE volume (every slice, nothing cropped)."""
    segment = segment_array(liver_run.segmentation, liver_run.segment_id, liver_run.volume)
    reference = liver_case.reference_kji
    assert segment.shape == reference.shape == (20, 512, 512)
    score = dice(segment, reference)
    print(f"liver Dice over the whole volume: {score:.4f}")
    assert score >= MIN_LIVER_DICE, f"liver Dice {score:.3f} < {MIN_LIVER_DICE}"
    # Matching by raw array index instead of world coordinates would be far off: the label file's J
    # axis runs against the DICOM's.
    import SimpleITK as sitk

    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / DICOM_LABELS))) == LIVER
    raw_score = dice(segment, raw)
    assert raw_score < 0.75, f"raw-index Dice {raw_score:.3f}: the reference's axes should disagree"


def test_oblique_volume_and_transformed_markups_give_the_same_mask(liver_run, liver_case):
    """Same voxels, an oblique IJK->RAS, markups under a rotation + translation: the same mask."""
    mrml = new_mrml()
    oblique = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "oblique")
    image = vtk.vtkImageData()
    image.DeepCopy(liver_run.volume.GetImageData())
    oblique.SetAndObserveImageData(image)
    tilt = rotation("x", 20) @ rotation("z", -35)
    tilt[:3, 3] = [40.0, -25.0, 60.0]
    oblique.SetIJKToRASMatrix(to_vtk(tilt @ ijk_to_ras(liver_run.volume)))

    # The case's world positions, carried along with the volume: world' = tilt @ world.
    pose = rotation("y", 25) @ rotation("z", 10)
    pose[:3, 3] = [12.0, -30.0, 25.0]
    parent = mrml.add_transform(pose, "markups pose")
    segmentation, liver, nodes = place_case(mrml, oblique, liver_case, parent=parent, carry=tilt)
    # The markups' own coordinates differ from world: the parent transform must be applied.
    local = [0.0, 0.0, 0.0]
    nodes.positive.GetNthControlPointPosition(0, local)
    world = control_points_world(nodes.positive)[0]
    assert np.linalg.norm(np.subtract(local, world)) > 20, (local, world)

    run = run_case(mrml, oblique, segmentation, liver, nodes, liver_run.segmenter)
    assert run.request.params["foreground"] == [liver_case.point_ijk], run.request.params
    assert run.request.params["roi"] == liver_case.roi_ijk, run.request.params
    assert run.result.image_id != liver_run.result.image_id  # another grid: another image on the server
    assert run.result.params["encoder_passes"] == 0, run.result.params  # same voxels: cached embeddings
    segment = segment_array(segmentation, liver, oblique)
    np.testing.assert_array_equal(segment, liver_case.session_kji.astype(bool))
    # And the box really is oblique in world coordinates.
    corners = roi_corners_world(nodes.box)
    assert len({round(c, 3) for c in corners[:, 2]}) > 2, corners
