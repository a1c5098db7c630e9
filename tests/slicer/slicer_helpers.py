"""A headless Slicer for the extension's tests: a real MRML scene from `slicer-core`, the module
logics a GUI-less Slicer lacks, and small builders (DICOM volume, segmentation, editor, markups).

Stand-ins (as DESIGN.md asks): `slicer.mrmlScene` and `slicer.modules.{volumes,segmentations}.logic()`
exist only inside the Slicer application; slicer.util's array helpers call them, so every new scene
installs itself there. The segmentation converter rules are registered once, before any segment.
"""

from __future__ import annotations

import glob
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import slicer
import vtk
from MSAExtensionLib import EditorLogicTarget, Segmenter, apply_result, make_editor_logic
from MSAExtensionLib.prompts import prompt_nodes, prompts_from_nodes, set_box

DICOM = "ct_abdomen_dicom"
DICOM_LABELS = "ct_abdomen_dicom_labels.nii.gz"
LIVER = 5
ROI_MARGIN = 5  # voxels around the liver's in-plane extent (the ROI spans the liver's slices: all 20)

_RULES_REGISTERED = False


def register_converter_rules() -> None:
    """The application registers these at start-up; without them segments have no labelmap <-> surface."""
    global _RULES_REGISTERED
    if _RULES_REGISTERED:
        return
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule(),
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule()):
        factory.RegisterConverterRule(rule)
    _RULES_REGISTERED = True


@dataclass
class Mrml:
    scene: object
    volumes: object  # vtkSlicerVolumesLogic
    segmentations: object  # vtkSlicerSegmentationsModuleLogic
    application: object
    colors: object  # held here: the application logic does not keep its module logics alive

    def load_volume(self, path: str | Path, name: str, files: list[str] | None = None, label: bool = False):
        """A file, or a DICOM series given as its file list, read by Slicer's own volume reader."""
        names = vtk.vtkStringArray()
        for f in files or []:
            names.InsertNextValue(f)
        node = self.volumes.AddArchetypeVolume(str(path), name, 1 if label else 0, names)
        assert node is not None, f"Slicer could not read {path}"
        return node

    def load_dicom(self, folder: str | Path, name: str = "ct"):
        files = sorted(glob.glob(str(Path(folder) / "*")))
        return self.load_volume(files[0], name, files)

    def add_segmentation(self, volume, names: list[str], name: str = "segmentation"):
        """A segmentation whose reference geometry is `volume`, with empty segments; -> (node, ids)."""
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        ids = [node.GetSegmentation().AddEmptySegment(n, n) for n in names]
        return node, ids

    def add_points(self, name: str, points_world: list, parent=None):
        """A fiducial list under `parent` with points at these WORLD positions."""
        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        if parent is not None:
            node.SetAndObserveTransformNodeID(parent.GetID())
        for p in points_world:
            node.AddControlPointWorld(vtk.vtkVector3d(*p))
        return node

    def add_transform(self, matrix: np.ndarray, name: str = "transform"):
        node = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        m = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                m.SetElement(r, c, float(matrix[r][c]))
        node.SetMatrixTransformToParent(m)
        return node


_BY_SCENE: dict[int, Mrml] = {}  # id(scene) -> its Mrml, to re-install its stand-ins


def activate(mrml: Mrml) -> Mrml:
    """Makes `mrml` the scene slicer.util's helpers use (slicer.mrmlScene, slicer.modules.*)."""
    slicer.mrmlScene = mrml.scene
    slicer.modules = types.SimpleNamespace(
        volumes=types.SimpleNamespace(logic=lambda: mrml.volumes),
        segmentations=types.SimpleNamespace(logic=lambda: mrml.segmentations))
    return mrml


def new_mrml() -> Mrml:
    """A fresh scene with the Volumes, Colors and Segmentations logics, installed as slicer.mrmlScene."""
    register_converter_rules()
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("Colors", slicer.vtkSlicerColorLogic), ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("Volumes", slicer.vtkSlicerVolumesLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name] = logic
    mrml = Mrml(scene, logics["Volumes"], logics["Segmentations"], app, logics["Colors"])
    _BY_SCENE[id(scene)] = mrml
    return activate(mrml)


def segment_array(segmentation_node, segment_id: str, volume) -> np.ndarray:
    """The segment on the volume's grid as (K, J, I) bool, read with slicer.util (not the extension)."""
    activate(_BY_SCENE[id(segmentation_node.GetScene())])
    return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume).astype(bool)


def set_segment(segmentation_node, segment_id: str, volume, mask: np.ndarray) -> None:
    """Writes a (K, J, I) mask into a segment with slicer.util (test set-up, not the extension)."""
    activate(_BY_SCENE[id(segmentation_node.GetScene())])
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation_node, segment_id, volume)


def rotation(axis: str, degrees: float) -> np.ndarray:
    """4x4 rotation about x, y or z."""
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    r = {"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    m = np.eye(4)
    m[:3, :3] = r
    return m


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


@dataclass
class Run:
    """One request made the way the effect makes it, and what came of it."""

    mrml: Mrml
    volume: object
    segmentation: object
    segment_id: str
    segmenter: Segmenter
    request: object
    result: object
    report: object
    nodes: object


def case_prompts(case) -> "Prompts":
    """The case's point and ROI box as Prompts (world RAS). A 2D request keeps the box's cross-section
    on its slice: box + click is what the model answers reliably whatever adapters are served."""
    from MSAExtensionLib import Prompts

    lo, hi = case.roi_world_min, case.roi_world_max
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return Prompts(positive=[list(case.point_world)], roi_corners=corners)


def place_case(mrml: Mrml, volume, case, parent=None, carry: np.ndarray = np.eye(4)):
    """A segmentation with segment 'liver' and its prompt markups for `case`: the positive point and
    the ROI box, under `parent`, at the case's world positions moved by `carry` (4x4)."""
    segmentation, (liver,) = mrml.add_segmentation(volume, ["liver"])
    nodes = prompt_nodes(segmentation, liver)
    for node in nodes.nodes():
        if parent is not None:
            node.SetAndObserveTransformNodeID(parent.GetID())
    world_point = (carry @ np.array([*case.point_world, 1.0]))[:3]
    nodes.positive.AddControlPointWorld(vtk.vtkVector3d(*world_point))
    center = (case.roi_world_min + case.roi_world_max) / 2
    size = case.roi_world_max - case.roi_world_min
    set_box(nodes.box, (carry @ np.array([*center, 1.0]))[:3], carry[:3, :3], tuple(size))
    return segmentation, liver, nodes


def run_case(mrml, volume, segmentation, segment_id, nodes, segmenter) -> Run:
    target = EditorLogicTarget(make_editor_logic(mrml.scene, segmentation, volume), segment_id)
    prompts = prompts_from_nodes(nodes)
    request = segmenter.request(volume, prompts, dimension=3)
    result = segmenter.run(request)
    report = apply_result(target, volume, request, result)
    return Run(mrml, volume, segmentation, segment_id, segmenter, request, result, report, nodes)
