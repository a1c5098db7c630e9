"""MSAExtensionLib checks that need no server: run by ctest in Slicer's Python, and by the
repository's pytest (tests/slicer) with slicer-core.

- NRRD bytes round trip (voxels and IJK->RAS);
- world RAS under a parent transform -> IJK of an LPS-stored volume, ROI corners sorted;
- a 2D result written through vtkSlicerSegmentEditorLogic touches its slice only.
"""

import os
import sys
import unittest

import numpy as np
import vtk

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import slicer  # noqa: E402

from MSAExtensionLib import (EditorLogicTarget, MSAClientError, make_editor_logic, nrrd, point_ijk,  # noqa: E402
                             roi_ijk, write_mask)
from MSAExtensionLib.geometry import ijk_to_ras, to_vtk  # noqa: E402
from MSAExtensionLib.writer import image_array  # noqa: E402

# An LPS-stored CT as Slicer shows it: I runs right-to-left, J anterior-to-posterior.
IJK_TO_RAS = np.array([[-0.8, 0, 0, 100.0], [0, -0.8, 0, 80.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
SHAPE_KJI = (6, 40, 50)


def _converter_rules():
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rules = factory.GetConverterRules() if hasattr(factory, "GetConverterRules") else None
    if not rules:  # Slicer registers them at start-up; bare slicer-core does not
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _volume(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "lps")
    image = vtk.vtkImageData()
    k, j, i = SHAPE_KJI
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image_array(image)[:] = np.arange(i * j * k, dtype=np.int16).reshape(SHAPE_KJI) % 1000
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(to_vtk(IJK_TO_RAS))
    return node


class MSAExtensionLibTest(unittest.TestCase):
    def setUp(self):
        _converter_rules()
        self.scene = slicer.vtkMRMLScene()

    def test_nrrd_round_trip(self):
        volume = _volume(self.scene)
        array = image_array(volume.GetImageData())
        back, matrix = nrrd.read(nrrd.write(array, ijk_to_ras(volume)))
        np.testing.assert_array_equal(back, array)
        np.testing.assert_allclose(matrix, IJK_TO_RAS, atol=1e-9)

    def test_world_point_through_parent_transform(self):
        volume = _volume(self.scene)
        ijk = np.array([7, 31, 4, 1.0])
        world = IJK_TO_RAS @ ijk
        pose = np.eye(4)
        pose[:3, 3] = [5.0, -7.0, 11.0]  # the markups' parent: a translation
        parent = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        parent.SetMatrixTransformToParent(to_vtk(pose))
        points = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        points.SetAndObserveTransformNodeID(parent.GetID())
        points.AddControlPointWorld(vtk.vtkVector3d(*world[:3]))
        position = [0.0, 0.0, 0.0]
        points.GetNthControlPointPositionWorld(0, position)
        self.assertEqual(point_ijk(volume, position), [7, 31, 4])
        with self.assertRaises(MSAClientError):
            point_ijk(volume, (IJK_TO_RAS @ np.array([-3, 0, 0, 1.0]))[:3])

    def test_roi_corners_sorted(self):
        volume = _volume(self.scene)
        low, high = IJK_TO_RAS @ np.array([5, 6, 1, 1.0]), IJK_TO_RAS @ np.array([20, 30, 3, 1.0])
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetCenter(*((low + high) / 2)[:3])
        roi.SetSize(*np.abs(high - low)[:3])
        self.assertEqual(roi_ijk(volume, roi), [5, 20, 6, 30, 1, 3])

    def test_2d_result_writes_its_slice_only(self):
        if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
            self.skipTest("vtkSlicerSegmentEditorLogic needs Slicer 5.10 or later")
        volume = _volume(self.scene)
        segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segment = segmentation.GetSegmentation().AddEmptySegment("s", "s")
        target = EditorLogicTarget(make_editor_logic(self.scene, segmentation, volume), segment)
        first = np.zeros(SHAPE_KJI, dtype=np.uint8)
        first[1:5, 10:20, 10:20] = 1
        write_mask(target, volume, first)
        second = np.zeros(SHAPE_KJI, dtype=np.uint8)
        second[2, 25:35, 25:35] = 1  # a 2D answer on slice 2: elsewhere it says nothing
        report = write_mask(target, volume, second, covered_k=[2])
        self.assertEqual(report.changed_slices, [2])
        expected = first.copy()
        expected[2] = second[2]
        modifier = target.modifier_labelmap()
        current = target.selected_segment_labelmap()
        self.assertEqual(tuple(modifier.GetExtent()), tuple(current.GetExtent()))
        np.testing.assert_array_equal(image_array(current) > 0, expected > 0)


if __name__ == "__main__":
    unittest.main()
