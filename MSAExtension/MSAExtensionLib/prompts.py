"""The user's prompts live in markups nodes, one set per segment, so they show in the views, can be
dragged, are saved with the scene, and every change can re-run the request.

Per (segmentation node, segment): a fiducial list of positive points, one of negative points, and
one ROI box (a markups ROI: a 3D box, or a box one slice thick drawn with shift+drag). They are
found again by node attributes, so a reloaded scene keeps its prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MSAClientError
from .geometry import box_ijk, control_points_world, point_ijk, roi_corners_world

SEGMENTATION_ATTRIBUTE = "MSA.Segmentation"
SEGMENT_ATTRIBUTE = "MSA.Segment"
ROLE_ATTRIBUTE = "MSA.Role"
ROLES = {"positive": "vtkMRMLMarkupsFiducialNode", "negative": "vtkMRMLMarkupsFiducialNode",
         "box": "vtkMRMLMarkupsROINode"}
COLORS = {"positive": (0.2, 0.9, 0.2), "negative": (0.95, 0.2, 0.2), "box": (1.0, 0.85, 0.1)}


@dataclass
class PromptNodes:
    positive: object
    negative: object
    box: object

    def nodes(self) -> list:
        return [self.positive, self.negative, self.box]


def _find(scene, segmentation_node, segment_id: str, role: str):
    nodes = scene.GetNodesByClass(ROLES[role])
    try:
        for n in range(nodes.GetNumberOfItems()):
            node = nodes.GetItemAsObject(n)
            if (node.GetAttribute(SEGMENTATION_ATTRIBUTE) == segmentation_node.GetID()
                    and node.GetAttribute(SEGMENT_ATTRIBUTE) == segment_id
                    and node.GetAttribute(ROLE_ATTRIBUTE) == role):
                return node
    finally:
        nodes.UnRegister(None)
    return None


def prompt_nodes(segmentation_node, segment_id: str, create: bool = True) -> PromptNodes | None:
    """The markups nodes holding a segment's prompts (created empty when missing and `create`)."""
    scene = segmentation_node.GetScene()
    found = {role: _find(scene, segmentation_node, segment_id, role) for role in ROLES}
    if any(node is None for node in found.values()):
        if not create:
            return None
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        name = segment.GetName() if segment else segment_id
        for role, node in found.items():
            if node is not None:
                continue
            node = scene.AddNewNodeByClass(ROLES[role], f"MSA {name} {role}")
            for key, value in ((SEGMENTATION_ATTRIBUTE, segmentation_node.GetID()), (SEGMENT_ATTRIBUTE, segment_id),
                               (ROLE_ATTRIBUTE, role)):
                node.SetAttribute(key, value)
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            if display is not None:
                display.SetSelectedColor(*COLORS[role])
                display.SetColor(*COLORS[role])
                if role != "box":
                    display.SetPointLabelsVisibility(False)
            if role == "box":
                node.SetDisplayVisibility(False)  # shown once a box is placed
            found[role] = node
    return PromptNodes(found["positive"], found["negative"], found["box"])


def has_box(box_node) -> bool:
    """An ROI node holds a box once it has a position and a non-zero size."""
    if box_node is None or box_node.GetNumberOfControlPoints() == 0:
        return False
    size = box_node.GetSize()
    return max(size) > 0.0


def prompts_from_nodes(nodes: PromptNodes):
    """PromptNodes -> Prompts in world RAS (parent transforms applied)."""
    from .segmenter import Prompts

    corners = roi_corners_world(nodes.box) if has_box(nodes.box) else None
    return Prompts(control_points_world(nodes.positive), control_points_world(nodes.negative), corners)


def add_point(nodes: PromptNodes, volume_node, point_world, positive: bool = True) -> list[int]:
    """Adds a positive or negative point at `point_world` (world RAS) if it lies inside the volume;
    returns its [i, j, k]. A point outside the volume is refused (MSAClientError) and NOT added: a
    stored point outside would be sent with every later request of the segment."""
    if volume_node is None:
        raise MSAClientError("select a source volume first")
    ijk = point_ijk(volume_node, point_world)
    node = nodes.positive if positive else nodes.negative
    node.AddControlPointWorld(*[float(v) for v in point_world])
    return ijk


MOVING_INDEX_ATTRIBUTE = "Markups.MovingMarkupIndex"  # set by Slicer's markups widget during a drag


def moved_point_index(markups_node, call_data=None) -> int | None:
    """The control point a markups interaction event is about, or None when unknown.

    Slicer documents the call data of the Point* events as the point's index (int*); its markups
    widget ends a drag with PointEndInteractionEvent WITHOUT call data (Slicer 5.x), but keeps the
    dragged point's index in the node's "Markups.MovingMarkupIndex" attribute until after that
    event. The call data wins when there is one."""
    for value in (call_data, markups_node.GetAttribute(MOVING_INDEX_ATTRIBUTE)):
        try:
            index = int(value)
        except (TypeError, ValueError):
            continue
        if 0 <= index < markups_node.GetNumberOfControlPoints():
            return index
    return None


def edited_slice(volume_node, markups_node, call_data=None) -> int | None:
    """The volume slice (k) a 2D request should answer after `markups_node` was edited:
    - the box (a markups ROI): its own slice (the middle one when it spans several);
    - a point list: the slice of the point that moved (see moved_point_index).
    None when that is unknown or lies outside the volume (the request then picks its default)."""
    if volume_node is None or markups_node is None:
        return None
    try:
        if markups_node.IsA("vtkMRMLMarkupsROINode"):
            if not has_box(markups_node):
                return None
            roi = box_ijk(volume_node, roi_corners_world(markups_node))
            return (roi[4] + roi[5]) // 2
        index = moved_point_index(markups_node, call_data)
        if index is None:
            return None
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, position)
        return point_ijk(volume_node, position)[2]
    except MSAClientError:
        return None


def set_box(box_node, center_world, axes_world: np.ndarray, size: tuple[float, float, float]) -> None:
    """Places the ROI box: centre and axes (3x3, columns) in WORLD RAS, edge lengths in mm.

    The box node may sit under a parent transform: the pose is expressed in its own coordinates.
    """
    from .geometry import to_vtk, transform_between

    to_local = transform_between(None, box_node.GetParentTransformNode())
    center = np.array(to_local.TransformPoint(*center_world))
    axes = []
    for axis in np.asarray(axes_world, dtype=float).T:  # transform the axis directions at the centre
        tip = np.array(to_local.TransformPoint(*(np.asarray(center_world) + axis)))
        direction = tip - center
        axes.append(direction / np.linalg.norm(direction))
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(axes).T
    matrix[:3, 3] = center
    box_node.SetAndObserveObjectToNodeMatrix(to_vtk(matrix))
    box_node.SetSize(*[float(s) for s in size])
    box_node.SetDisplayVisibility(True)


RESETTING_ATTRIBUTE = "MSA.Resetting"


def resetting(nodes: PromptNodes) -> bool:
    """True while reset_prompts runs: observers must not send the half-removed prompts."""
    return nodes.positive.GetAttribute(RESETTING_ATTRIBUTE) == "1"


def reset_prompts(nodes: PromptNodes) -> None:
    """Removes every point and the box (the segment itself is kept)."""
    nodes.positive.SetAttribute(RESETTING_ATTRIBUTE, "1")
    try:
        nodes.positive.RemoveAllControlPoints()
        nodes.negative.RemoveAllControlPoints()
        nodes.box.RemoveAllControlPoints()
        nodes.box.SetDisplayVisibility(False)
    finally:
        nodes.positive.RemoveAttribute(RESETTING_ATTRIBUTE)
