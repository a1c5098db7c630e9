"""World RAS of markups -> IJK of the volume as stored: every coordinate conversion in one place.

The chain (what peers get wrong): a control point's WORLD position (its markups node's parent
transforms applied) -> the volume's own RAS (the volume's parent transform inverted) -> IJK of the
volume's voxel array (GetRASToIJKMatrix), rounded to the nearest voxel centre. The volume is
uploaded as stored, so these IJK are the server's voxel indices [i, j, k] (ITK's index order: i is
the fastest axis; the numpy array of the volume is (K, J, I)).

An ROI's corners are mapped one by one (an ROI rotated against the volume's axes, or an LPS volume
whose I axis points right-to-left, gives corners in any order), then sorted per axis into
[i0, i1, j0, j1, k0, k1]: the voxels whose centres lie inside the box, clipped to the volume.
"""

from __future__ import annotations

import itertools

import numpy as np
import vtk

from .errors import MSAClientError

EPS = 1e-4  # in voxels: a corner that lies on a voxel centre counts as inside despite rounding


def to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def to_vtk(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r][c]))
    return out


def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's IJK -> its own RAS (parent transforms NOT applied), 4x4."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return to_numpy(matrix)


def dimensions(volume_node) -> tuple[int, int, int]:
    """(I, J, K) voxel counts."""
    return tuple(volume_node.GetImageData().GetDimensions())


def transform_between(source_node, target_node) -> vtk.vtkGeneralTransform:
    """The transform taking coordinates of `source_node` to those of `target_node` (None: world)."""
    import slicer

    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source_node, target_node, transform)
    return transform


def world_to_ijk(volume_node, points_world) -> np.ndarray:
    """(N, 3) world RAS -> (N, 3) continuous IJK of the volume (voxel centres at integers)."""
    to_volume = transform_between(None, volume_node.GetParentTransformNode())
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    ras_to_ijk = to_numpy(ras_to_ijk)
    out = []
    for point in np.asarray(points_world, dtype=float).reshape(-1, 3):
        local = to_volume.TransformPoint(*point)  # handles non-linear parent transforms too
        out.append((ras_to_ijk @ np.array([*local, 1.0]))[:3])
    return np.array(out).reshape(-1, 3)


def ijk_to_world(volume_node, points_ijk) -> np.ndarray:
    """(N, 3) IJK -> (N, 3) world RAS (the inverse of world_to_ijk, before rounding)."""
    to_world = transform_between(volume_node.GetParentTransformNode(), None)
    matrix = ijk_to_ras(volume_node)
    out = []
    for point in np.asarray(points_ijk, dtype=float).reshape(-1, 3):
        out.append(to_world.TransformPoint(*(matrix @ np.array([*point, 1.0]))[:3]))
    return np.array(out).reshape(-1, 3)


def _describe(point_world) -> str:
    return "R {:.1f}, A {:.1f}, S {:.1f}".format(*point_world)


def point_ijk(volume_node, point_world) -> list[int]:
    """One world RAS point -> [i, j, k] of the nearest voxel; MSAClientError when outside the volume."""
    ijk = np.floor(world_to_ijk(volume_node, [point_world])[0] + 0.5).astype(int)
    if np.any(ijk < 0) or np.any(ijk >= np.array(dimensions(volume_node))):
        raise MSAClientError(f"the point at {_describe(point_world)} lies outside the volume "
                             f"'{volume_node.GetName()}'")
    return [int(v) for v in ijk]


def box_ijk(volume_node, corners_world) -> list[int]:
    """A box given by its corners in world RAS (any order, any rotation) -> [i0, i1, j0, j1, k0, k1].

    Voxels whose centres lie inside the corners' IJK bounding box, clipped to the volume. A box that
    misses the volume is an MSAClientError.
    """
    ijk = world_to_ijk(volume_node, corners_world)
    low = np.ceil(ijk.min(axis=0) - EPS).astype(int)
    high = np.floor(ijk.max(axis=0) + EPS).astype(int)
    size = np.array(dimensions(volume_node))
    low, high = np.maximum(low, 0), np.minimum(high, size - 1)
    if np.any(low > high):
        raise MSAClientError(f"the ROI does not overlap the volume '{volume_node.GetName()}'")
    return [int(low[0]), int(high[0]), int(low[1]), int(high[1]), int(low[2]), int(high[2])]


def roi_corners_world(roi_node) -> np.ndarray:
    """The 8 corners of a markups ROI box in world RAS (its orientation and parent transforms applied)."""
    bounds = [0.0] * 6
    roi_node.GetObjectBounds(bounds)  # in the ROI's own (object) frame
    object_to_node = to_numpy(roi_node.GetObjectToNodeMatrix())
    corners = []
    for x, y, z in itertools.product(bounds[0:2], bounds[2:4], bounds[4:6]):
        local = (object_to_node @ np.array([x, y, z, 1.0]))[:3]
        world = [0.0, 0.0, 0.0]
        roi_node.TransformPointToWorld(local, world)
        corners.append(world)
    return np.array(corners)


def roi_ijk(volume_node, roi_node) -> list[int]:
    return box_ijk(volume_node, roi_corners_world(roi_node))


def control_points_world(markups_node) -> list[list[float]]:
    """Placed control points of a markups node, in world RAS (parent transforms applied)."""
    if markups_node is None:
        return []
    points = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != markups_node.PositionDefined:
            continue  # a point being placed has no position yet
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, position)
        points.append(position)
    return points
