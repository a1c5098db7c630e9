"""The Segment Editor effect "MSA" and the module panel, driven the way Slicer drives them: clicks
through processInteractionEvents, drags through the markups nodes' own events, the panel's model
choice through its combo box. The GUI pieces are small fakes (effect_harness); the MRML nodes, the
editing (vtkSlicerSegmentEditorLogic), the request worker and the MSA server are real.

All requests here are 2D (msa_2d) on the DICOM volume of the liver run, whose slices the server
has encoded already: each costs the decoder only.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import vtk

import slicer
from effect_harness import (FakeInteractor, FakeSliceView, new_effect, new_logic, new_panel, record_requests,
                            settle)
from MSAExtensionLib import point_ijk, prompt_nodes, set_box
from MSAExtensionLib.geometry import ijk_to_ras
from MSAExtensionLib.prompts import MOVING_INDEX_ATTRIBUTE
from slicer_helpers import activate, segment_array

PRESS, KEY = vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.KeyPressEvent
END_DRAG = slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent



@pytest.fixture
def desk(gui_modules, liver_run, server):
    """The liver run's DICOM volume, a new segmentation with one segment, a fresh shared logic on
    the test server, the effect active on that segment, and the panel."""
    mrml = activate(liver_run.mrml)
    volume = liver_run.volume
    segmentation, (segment,) = mrml.add_segmentation(volume, ["organ"], name="effect")
    logic = new_logic(gui_modules.module, server.url)
    submitted = record_requests(logic)
    effect = new_effect(gui_modules.effect_module, mrml.scene, segmentation, volume, segment)
    panel = new_panel(gui_modules.module, logic)
    yield types.SimpleNamespace(mrml=mrml, scene=mrml.scene, volume=volume, segmentation=segmentation,
                                segment=segment, logic=logic, submitted=submitted, effect=effect, panel=panel)
    effect.cleanup()
    nodes = prompt_nodes(segmentation, segment, create=False)
    for node in nodes.nodes() if nodes is not None else []:
        mrml.scene.RemoveNode(node)
    mrml.scene.RemoveNode(segmentation)


def world_of(volume, ijk) -> list[float]:
    """World RAS of a voxel centre (the DICOM volume has no parent transform)."""
    return list((ijk_to_ras(volume) @ np.array([*ijk, 1.0]))[:3])


def click(desk, view, ras, **keys):
    handled = desk.effect.processInteractionEvents(FakeInteractor(view.xy(ras), **keys), PRESS, view)
    assert handled, "the effect should take a left click in a slice view"


def changed_slices(desk) -> list[int]:
    voxels = segment_array(desk.segmentation, desk.segment, desk.volume)
    return [int(k) for k in np.nonzero(voxels.any(axis=(1, 2)))[0]]


def test_a_click_outside_the_volume_is_refused_and_later_clicks_work(desk, liver_case):
    desk.logic.dimension = 2
    k = liver_case.point_ijk[2]
    view = FakeSliceView(desk.scene, liver_case.point_world)
    click(desk, view, np.add(liver_case.point_world, [400.0, 0.0, 0.0]))  # 40 cm to the side: off the volume
    nodes = prompt_nodes(desk.segmentation, desk.segment, create=False)
    assert nodes.positive.GetNumberOfControlPoints() == 0, "a point outside the volume was stored"
    assert "lies outside the volume" in desk.effect.statusLabel.text, desk.effect.statusLabel.text
    assert "no point added" in desk.effect.statusLabel.text and desk.submitted == []

    click(desk, view, liver_case.point_world)
    settle(desk.effect)
    assert nodes.positive.GetNumberOfControlPoints() == 1
    (pending,) = desk.submitted
    stored = [0.0, 0.0, 0.0]
    nodes.positive.GetNthControlPointPositionWorld(0, stored)
    assert pending.request.model == "msa_2d" and pending.request.params["slice"] == k
    assert pending.request.params["foreground"] == [point_ijk(desk.volume, stored)] and not pending.request.ignored
    assert desk.effect.statusLabel.text.startswith("msa_2d: "), desk.effect.statusLabel.text
    assert changed_slices(desk) == [k]


def test_the_panels_model_choice_is_the_effects_mode(desk, liver_case):
    combo = desk.panel.ui.modelComboBox
    assert desk.logic.dimension == 3 and combo.itemData(combo.currentIndex) == "msa"
    assert desk.effect.dimension() == 3 and desk.effect.mode3dButton.checked

    combo.currentIndex = combo.findData("msa_2d")  # the user picks msa_2d in the panel
    assert desk.logic.dimension == 2 and desk.effect.dimension() == 2
    assert desk.effect.mode2dButton.checked and not desk.effect.mode3dButton.checked
    view = FakeSliceView(desk.scene, liver_case.point_world)
    click(desk, view, liver_case.point_world)
    settle(desk.effect)
    (pending,) = desk.submitted
    k = liver_case.point_ijk[2]
    assert pending.request.model == "msa_2d" and pending.request.covered_k == [k]
    assert changed_slices(desk) == [k]

    # The effect's T key switches the one mode back: the panel and the effect's buttons follow.
    assert desk.effect.processInteractionEvents(FakeInteractor(key="t"), KEY, view)
    assert desk.logic.dimension == 3 and combo.itemData(combo.currentIndex) == "msa"
    assert desk.effect.mode3dButton.checked and not desk.effect.mode2dButton.checked
    # The effect's own buttons set it too.
    desk.effect.mode2dButton.checked, desk.effect.mode3dButton.checked = True, False
    desk.effect.updateMRMLFromGUI()
    assert desk.logic.dimension == 2 and combo.itemData(combo.currentIndex) == "msa_2d"
    # A server without the 2D model (Test connection lists msa only): the mode follows.
    desk.panel.setModels(["msa"])
    assert desk.logic.dimension == 3 and desk.effect.mode3dButton.checked
    assert "Dimension" not in desk.effect.scriptedEffect.parameters  # no second copy of the mode


def test_a_drag_in_2d_answers_the_moved_points_slice_and_a_box_edit_its_own(desk, liver_case):
    desk.logic.dimension = 2
    i, j, k = liver_case.point_ijk
    below = world_of(desk.volume, [i, j, k + 3])
    click(desk, FakeSliceView(desk.scene, liver_case.point_world), liver_case.point_world)
    settle(desk.effect)
    click(desk, FakeSliceView(desk.scene, below), below)  # the LAST point: on slice k + 3
    settle(desk.effect)
    assert [p.request.params["slice"] for p in desk.submitted] == [k, k + 3]
    nodes = prompt_nodes(desk.segmentation, desk.segment, create=False)

    # Drag the FIRST point 4 voxels along I, in its slice; Slicer's markups widget ends the drag
    # with PointEndInteractionEvent and no call data, the index in the node's attribute.
    moved = world_of(desk.volume, [i + 4, j, k])
    nodes.positive.SetAttribute(MOVING_INDEX_ATTRIBUTE, "0")
    nodes.positive.SetNthControlPointPositionWorld(0, *moved)
    nodes.positive.InvokeCustomModifiedEvent(END_DRAG)
    nodes.positive.SetAttribute(MOVING_INDEX_ATTRIBUTE, "")
    settle(desk.effect)
    request = desk.submitted[-1].request
    assert request.params["slice"] == k and request.params["foreground"] == [[i + 4, j, k]], request.params
    # The same with the index as call data (as Slicer documents the Point* events).
    nodes.positive.InvokeEvent(END_DRAG, 0)
    settle(desk.effect)
    assert desk.submitted[-1].request.params["slice"] == k
    assert changed_slices(desk) == [k, k + 3]

    # A box one slice thick on slice k - 2, where no point lies: its edit answers slice k - 2, box kept.
    box_k = k - 2
    i0, i1, j0, j1 = liver_case.roi_ijk[:4]
    matrix = ijk_to_ras(desk.volume)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    center = world_of(desk.volume, [(i0 + i1) / 2, (j0 + j1) / 2, box_k])
    set_box(nodes.box, center, matrix / spacing, tuple(np.array([i1 - i0, j1 - j0, 1]) * spacing))
    nodes.box.InvokeCustomModifiedEvent(END_DRAG)
    settle(desk.effect)
    request = desk.submitted[-1].request
    assert request.params["slice"] == box_k and request.params["roi"] == [i0, i1, j0, j1, box_k, box_k], request.params
    assert request.params["foreground"] == []
    assert changed_slices(desk) == [box_k, k, k + 3]

    # Deleting the first point: the request is about ITS slice (k), where no positive point is left.
    count = len(desk.submitted)
    nodes.positive.RemoveNthControlPoint(0)
    settle(desk.effect)
    assert len(desk.submitted) == count, "nothing to send for slice k"
    assert f"no positive point or box on slice {k}" in desk.effect.statusLabel.text, desk.effect.statusLabel.text
