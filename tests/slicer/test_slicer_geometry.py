"""World RAS -> IJK without a server: parent transforms on the volume and on the markups, LPS
volumes, rotated and clipped ROIs, and what a 2D request keeps. Positions are computed here from
the matrices the test sets, never with the extension's own conversion."""

from __future__ import annotations

import numpy as np
import pytest
import vtk

from MSAExtensionLib import (MSAClient, MSAClientError, Prompts, ServerImages, control_points_world, info_outdated,
                             make_request, point_ijk, roi_corners_world, roi_ijk, target_name)
from MSAExtensionLib.geometry import to_vtk
from MSAExtensionLib.prompts import (MOVING_INDEX_ATTRIBUTE, add_point, edited_slice, prompt_nodes, prompts_from_nodes,
                                     set_box)
from slicer_helpers import rotation

SHAPE_KJI = (12, 60, 80)
# LPS storage seen in RAS, anisotropic, tilted: I right-to-left, J anterior-to-posterior.
IJK_TO_RAS = rotation("z", 12) @ np.array([[-0.7, 0, 0, 60.0], [0, -0.7, 0, 40.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])


@pytest.fixture
def volume(mrml):
    node = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "synthetic")
    image = vtk.vtkImageData()
    k, j, i = SHAPE_KJI
    image.SetDimensions(i, j, k)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().Fill(0)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(to_vtk(IJK_TO_RAS))
    return node


def world(ijk, transform=np.eye(4)) -> list[float]:
    return list((transform @ IJK_TO_RAS @ np.array([*ijk, 1.0]))[:3])


def test_point_under_markups_parent_transform(mrml, volume):
    pose = rotation("x", 30) @ rotation("y", -20)
    pose[:3, 3] = [15.0, -8.0, 30.0]
    parent = mrml.add_transform(pose)
    target = world([33, 17, 5])
    node = mrml.add_points("p", [target], parent=parent)
    position = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, position)  # the node's own coordinates: not the world
    assert np.linalg.norm(np.subtract(position, target)) > 10
    (world_position,) = control_points_world(node)
    np.testing.assert_allclose(world_position, target, atol=1e-6)
    assert point_ijk(volume, world_position) == [33, 17, 5]


def test_volume_parent_transform_is_inverted(mrml, volume):
    pose = rotation("z", 40)
    pose[:3, 3] = [-25.0, 12.0, 7.0]
    volume.SetAndObserveTransformNodeID(mrml.add_transform(pose).GetID())
    assert point_ijk(volume, world([70, 3, 11], pose)) == [70, 3, 11]
    # Ignoring the volume's transform would give another voxel (or none) for the same world point.
    try:
        ignored = point_ijk(volume, world([70, 3, 11]))
    except MSAClientError:
        ignored = None
    assert ignored != [70, 3, 11]
    volume.SetAndObserveTransformNodeID(None)
    assert point_ijk(volume, world([70, 3, 11])) == [70, 3, 11]


def test_rounding_is_to_the_nearest_voxel_centre(volume):
    assert point_ijk(volume, world([10.49, 20.51, 3.4])) == [10, 21, 3]
    with pytest.raises(MSAClientError, match="outside the volume"):
        point_ijk(volume, world([-0.6, 5, 5]))
    assert point_ijk(volume, world([-0.4, 5, 5])) == [0, 5, 5]


def test_roi_rotated_with_the_volume_maps_corner_by_corner(mrml, volume):
    """A box aligned with the (tilted, LPS) volume axes: exactly its voxel box, sorted per axis."""
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    lo, hi = np.array([10, 5, 2]), np.array([40, 35, 8])
    center = world((lo + hi) / 2)
    axes = IJK_TO_RAS[:3, :3] / np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)
    size = (hi - lo) * np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)
    set_box(roi, center, axes, tuple(size))
    assert roi_ijk(volume, roi) == [10, 40, 5, 35, 2, 8]


def test_roi_aligned_with_ras_on_a_tilted_lps_volume_is_sorted_per_axis(mrml, volume):
    """Corners come out in every order (I and J run against R and A): each axis sorted, inner voxels."""
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*world([30, 30, 6]))
    roi.SetSize(20.0, 14.0, 9.0)
    corners = roi_corners_world(roi)
    ijk = (np.linalg.inv(IJK_TO_RAS) @ np.c_[corners, np.ones(8)].T).T[:, :3]
    assert ijk[0, 0] > ijk[-1, 0], "the first corner should have the larger I here"
    lo, hi = np.ceil(ijk.min(axis=0) - 1e-4).astype(int), np.floor(ijk.max(axis=0) + 1e-4).astype(int)
    assert roi_ijk(volume, roi) == [lo[0], hi[0], lo[1], hi[1], lo[2], hi[2]]


def test_roi_under_a_parent_transform_and_clipped_to_the_volume(mrml, volume):
    pose = rotation("y", 15)
    pose[:3, 3] = [5.0, 5.0, -12.0]
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetAndObserveTransformNodeID(mrml.add_transform(pose).GetID())
    lo, hi = np.array([-20, 50, 9]), np.array([30, 90, 20])  # sticks out of the volume on 3 sides
    axes = IJK_TO_RAS[:3, :3] / np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)
    set_box(roi, world((lo + hi) / 2), axes, tuple((hi - lo) * np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)))
    assert roi_ijk(volume, roi) == [0, 30, 50, 59, 9, 11]
    set_box(roi, world([500, 500, 500]), axes, (5.0, 5.0, 5.0))
    with pytest.raises(MSAClientError, match="does not overlap the volume"):
        roi_ijk(volume, roi)


def test_2d_request_keeps_the_prompts_of_its_slice(mrml, volume):
    segmentation, (segment,) = mrml.add_segmentation(volume, ["s"])
    nodes = prompt_nodes(segmentation, segment)
    assert prompt_nodes(segmentation, segment).positive is nodes.positive  # found again, not duplicated
    for ijk in ([20, 20, 4], [25, 22, 4], [30, 30, 7]):
        nodes.positive.AddControlPointWorld(vtk.vtkVector3d(*world(ijk)))
    nodes.negative.AddControlPointWorld(vtk.vtkVector3d(*world([10, 10, 7])))
    axes = IJK_TO_RAS[:3, :3] / np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)
    set_box(nodes.box, world([30, 30, 5.5]), axes, tuple(np.array([40, 40, 4]) * np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)))
    images = ServerImages(MSAClient("http://127.0.0.1:9"))  # preparing a request sends nothing
    prompts = prompts_from_nodes(nodes)

    three_d = make_request(images, volume, prompts, dimension=3)
    assert three_d.model == "msa" and three_d.covered_k is None
    assert three_d.params["foreground"] == [[20, 20, 4], [25, 22, 4], [30, 30, 7]]
    assert three_d.params["background"] == [[10, 10, 7]] and three_d.params["roi"] == [10, 50, 10, 50, 4, 7]

    two_d = make_request(images, volume, prompts, dimension=2, slice_k=7)
    assert two_d.model == "msa_2d" and two_d.covered_k == [7] and two_d.params["slice"] == 7
    assert two_d.params["foreground"] == [[30, 30, 7]] and two_d.params["background"] == [[10, 10, 7]]
    assert two_d.params["roi"] == [10, 50, 10, 50, 7, 7]
    default = make_request(images, volume, prompts, dimension=2)  # the first positive point's slice
    assert default.params["slice"] == 4 and default.params["foreground"] == [[20, 20, 4], [25, 22, 4]]
    with pytest.raises(MSAClientError, match="no positive point or box on slice 11"):
        make_request(images, volume, prompts, dimension=2, slice_k=11)
    with pytest.raises(MSAClientError, match="place a positive point"):
        make_request(images, volume, Prompts(negative=[world([1, 1, 1])]), dimension=3)


def test_a_stored_prompt_outside_the_volume_is_left_out_and_blocks_nothing(mrml, volume):
    """A point dragged off the volume (or stored before the click check) must not fail every later
    request of the segment: it is left out and named; only prompts that all miss are refused."""
    images = ServerImages(MSAClient("http://127.0.0.1:9"))  # preparing a request sends nothing
    inside, outside = world([20, 20, 4]), world([-40, 20, 4])
    prompts = Prompts(positive=[outside, inside], negative=[world([30, 30, 4]), world([30, 300, 4])])
    three_d = make_request(images, volume, prompts, dimension=3)
    assert three_d.params["foreground"] == [[20, 20, 4]] and three_d.params["background"] == [[30, 30, 4]]
    assert three_d.ignored == ["1 positive point outside the volume", "1 negative point outside the volume"]
    two_d = make_request(images, volume, prompts, dimension=2)  # the first positive point INSIDE names the slice
    assert two_d.params["slice"] == 4 and two_d.params["foreground"] == [[20, 20, 4]]

    # A box that misses the volume is left out too when a point remains.
    corners = np.array([world([x, y, z]) for x in (500, 510) for y in (500, 510) for z in (1, 2)])
    boxed = make_request(images, volume, Prompts(positive=[inside], roi_corners=corners), dimension=3)
    assert "roi" not in boxed.params and boxed.ignored == ["the box (it misses the volume)"]

    # Nothing inside at all: refused, saying which point lies outside.
    with pytest.raises(MSAClientError, match="lies outside the volume 'synthetic'; place a point or a box inside"):
        make_request(images, volume, Prompts(positive=[outside]), dimension=3)
    with pytest.raises(MSAClientError, match="does not overlap the volume"):
        make_request(images, volume, Prompts(roi_corners=corners), dimension=2)


def test_a_click_outside_the_volume_adds_no_point(mrml, volume):
    segmentation, (segment,) = mrml.add_segmentation(volume, ["s"])
    nodes = prompt_nodes(segmentation, segment)
    with pytest.raises(MSAClientError, match="lies outside the volume"):
        add_point(nodes, volume, world([-40, 20, 4]), positive=True)
    assert nodes.positive.GetNumberOfControlPoints() == 0
    assert add_point(nodes, volume, world([20, 21, 4]), positive=False) == [20, 21, 4]
    assert nodes.negative.GetNumberOfControlPoints() == 1 and nodes.positive.GetNumberOfControlPoints() == 0


def test_an_edit_names_the_slice_of_the_moved_point_or_of_the_box(mrml, volume):
    """2D requests after a drag answer the slice of the point that moved (call data, or the index
    Slicer's markups widget keeps in the node during a drag), or the box's own slice."""
    segmentation, (segment,) = mrml.add_segmentation(volume, ["s"])
    nodes = prompt_nodes(segmentation, segment)
    for ijk in ([20, 20, 2], [25, 22, 5], [30, 30, 9]):
        nodes.positive.AddControlPointWorld(vtk.vtkVector3d(*world(ijk)))
    assert edited_slice(volume, nodes.positive, 0) == 2  # call data: the first point, not the last
    assert edited_slice(volume, nodes.positive, 1) == 5
    nodes.positive.SetAttribute(MOVING_INDEX_ATTRIBUTE, "0")  # what Slicer sets while point 0 is dragged
    assert edited_slice(volume, nodes.positive) == 2
    assert edited_slice(volume, nodes.positive, 2) == 9  # call data wins
    nodes.positive.SetAttribute(MOVING_INDEX_ATTRIBUTE, "")
    assert edited_slice(volume, nodes.positive) is None  # unknown: the request picks its default
    assert edited_slice(volume, nodes.positive, 7) is None  # no such point

    axes = IJK_TO_RAS[:3, :3] / np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)
    spacing = np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)
    set_box(nodes.box, world([40, 40, 7]), axes, tuple(np.array([20, 20, 1]) * spacing))  # one slice thick
    assert edited_slice(volume, nodes.box) == 7
    set_box(nodes.box, world([40, 40, 6.5]), axes, tuple(np.array([20, 20, 4]) * spacing))  # slices 5..8
    assert edited_slice(volume, nodes.box) == 6


def test_a_segment_named_as_a_target_sends_its_name(mrml, volume):
    """The segment's name goes with the prompts as `text` only when the server lists it among its adapters'
    target names (spelled as the server spells them), so a segment "Left Hippocampus" asks for that."""
    info = {"msa": {"targets": ["brain", "left_hippocampus", "liver"]}}
    assert target_name("Left Hippocampus", info) == "Left Hippocampus"
    assert target_name("Liver", info) == "Liver"
    assert target_name("Segment_1", info) is None and target_name("liver", {"msa": {}}) is None
    assert target_name("liver", None) is None  # no /info/ yet: unnamed prompts
    images = ServerImages(MSAClient("http://127.0.0.1:9"))  # preparing a request sends nothing
    prompts = Prompts(positive=[world([20, 20, 4])])
    assert make_request(images, volume, prompts, text="Liver").params["text"] == "Liver"
    assert "text" not in make_request(images, volume, prompts).params
    # Training published other adapters (their names may differ): /info/ must be read again.
    info["msa"]["adapters_sha256"] = "a" * 64
    assert not info_outdated(info, {"adapters_sha256": "a" * 64}) and info_outdated(info, {"adapters_sha256": "b" * 64})
    assert not info_outdated(None, {"adapters_sha256": "b" * 64})  # nothing read yet: nothing to forget
