"""Prompt markups per segment: found again by attribute (a reloaded scene keeps them), one set per
segment, and "Reset clicks" tells observers it is running so no half-removed prompts are sent."""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from MSAExtensionLib import prompt_nodes, prompts_from_nodes, reset_prompts, set_box
from MSAExtensionLib.prompts import resetting


def test_prompt_nodes_are_per_segment_and_survive_a_scene_round_trip(mrml, tmp_path):
    volume = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    segmentation, (a, b) = mrml.add_segmentation(volume, ["a", "b"])
    nodes_a = prompt_nodes(segmentation, a)
    nodes_b = prompt_nodes(segmentation, b)
    assert prompt_nodes(segmentation, a).positive is nodes_a.positive
    assert nodes_a.positive is not nodes_b.positive
    assert prompt_nodes(segmentation, "nope", create=False) is None
    nodes_a.positive.AddControlPointWorld(vtk.vtkVector3d(1, 2, 3))
    nodes_a.negative.AddControlPointWorld(vtk.vtkVector3d(4, 5, 6))
    set_box(nodes_a.box, [0, 0, 0], np.eye(3), (10.0, 20.0, 30.0))

    prompts = prompts_from_nodes(nodes_a)
    assert prompts.positive == [[1.0, 2.0, 3.0]] and prompts.negative == [[4.0, 5.0, 6.0]]
    np.testing.assert_allclose(prompts.roi_corners.min(axis=0), [-5, -10, -15])
    assert prompts_from_nodes(nodes_b).empty()

    # Saved and loaded as MRML (the scene file): the attributes find the same nodes again.
    path = str(tmp_path / "scene.mrml")
    mrml.scene.SetURL(path)
    assert mrml.scene.Commit(path)
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(path)
    assert loaded.Connect()
    found = prompt_nodes(loaded.GetNodeByID(segmentation.GetID()), a, create=False)
    assert found is not None
    assert [n.GetID() for n in found.nodes()] == [n.GetID() for n in nodes_a.nodes()]


def test_reset_removes_everything_and_flags_itself_to_observers(mrml):
    volume = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    segmentation, (a,) = mrml.add_segmentation(volume, ["a"])
    nodes = prompt_nodes(segmentation, a)
    for p in ([1, 1, 1], [2, 2, 2]):
        nodes.positive.AddControlPointWorld(vtk.vtkVector3d(*p))
    nodes.negative.AddControlPointWorld(vtk.vtkVector3d(3, 3, 3))
    set_box(nodes.box, [0, 0, 0], np.eye(3), (1.0, 1.0, 1.0))
    seen = []
    for node in nodes.nodes():
        node.AddObserver(slicer.vtkMRMLMarkupsNode.PointRemovedEvent, lambda caller, event: seen.append(resetting(nodes)))
    reset_prompts(nodes)
    assert seen and all(seen), seen  # every removal event saw the flag
    assert not resetting(nodes)
    assert prompts_from_nodes(nodes).empty() and not nodes.box.GetDisplayVisibility()
