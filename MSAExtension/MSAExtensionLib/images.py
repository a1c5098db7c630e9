"""Images on the server: each volume is uploaded once, named by a hash of its content.

The image id is `slicer-<sha256 of voxels + voxel type + grid + IJK->RAS>[:24]`, so a second click,
a reloaded scene or another Slicer session on the same data finds the image on the server (HEAD
/datastore/image) instead of uploading it again. An image that came FROM the server ("Next sample")
carries its server id in node attributes and is never uploaded.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np
from vtk.util import numpy_support

from . import nrrd
from .client import MSAClient
from .errors import MSAClientError
from .geometry import ijk_to_ras

ID_ATTRIBUTE = "MSA.ServerImageID"  # set on volumes loaded from the server
HASH_ATTRIBUTE = "MSA.ServerImageHash"  # their content hash when loaded: edited voxels upload anew


def volume_array(volume_node) -> np.ndarray:
    """The volume's voxels as a (K, J, I) numpy VIEW of its vtkImageData (no copy)."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None or image.GetPointData().GetScalars() is None:
        name = volume_node.GetName() if volume_node is not None else "none"
        raise MSAClientError(f"the volume '{name}' has no voxels")
    if image.GetNumberOfScalarComponents() != 1:
        raise MSAClientError(f"the volume '{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
                             "components per voxel; MSA segments scalar volumes")
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)


def content_hash(array: np.ndarray, matrix: np.ndarray) -> str:
    """sha256 over the voxel type, the grid, the IJK->RAS matrix (rounded to 1e-6) and the voxels."""
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}|{array.shape}|{np.round(matrix, 6).tolist()}|".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


@dataclass
class PreparedImage:
    """What a worker thread needs to make sure the server has a volume (taken on the GUI thread)."""

    image_id: str
    digest: str
    name: str
    array: np.ndarray | None  # a copy of the voxels, None when the server is known to have them
    matrix: np.ndarray


class ServerImages:
    """Image ids on one server; uploads only what the server does not have yet. Thread-safe."""

    def __init__(self, client: MSAClient) -> None:
        self.client = client
        self._known: set[str] = set()  # ids this object has seen on the server
        self._hashes: dict[tuple, str] = {}  # (node id, image MTime, node MTime) -> digest
        self._lock = threading.Lock()

    def digest(self, volume_node) -> str:
        """The content hash, recomputed only when the node or its voxels changed."""
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(), volume_node.GetMTime())
        with self._lock:
            if key in self._hashes:
                return self._hashes[key]
        value = content_hash(volume_array(volume_node), ijk_to_ras(volume_node))
        with self._lock:
            self._hashes[key] = value
        return value

    def prepare(self, volume_node) -> PreparedImage:
        """On the GUI thread: the id the volume has (or will have) on the server, and its voxels if needed."""
        digest = self.digest(volume_node)
        server_id = volume_node.GetAttribute(ID_ATTRIBUTE)
        if server_id and volume_node.GetAttribute(HASH_ATTRIBUTE) == digest:
            image_id = server_id
        else:
            image_id = f"slicer-{digest[:24]}"
        with self._lock:
            known = image_id in self._known
        array = None if known else volume_array(volume_node).copy()
        return PreparedImage(image_id, digest, volume_node.GetName(), array, ijk_to_ras(volume_node))

    def ensure(self, prepared: PreparedImage) -> str:
        """On any thread: uploads the image unless the server has it; returns its id."""
        with self._lock:
            if prepared.image_id in self._known:
                return prepared.image_id
        if not self.client.image_exists(prepared.image_id):
            if prepared.array is None:  # the server lost it (datastore cleared) since we looked
                raise MSAClientError(f"the server no longer has image {prepared.image_id!r}; click again to upload it")
            content = nrrd.write(prepared.array, prepared.matrix)
            self.client.upload_image(prepared.image_id, f"{prepared.image_id}.nrrd", content)
        with self._lock:
            self._known.add(prepared.image_id)
        return prepared.image_id

    def image_id(self, volume_node) -> str:
        """prepare + ensure in one call (GUI-less use and tests)."""
        return self.ensure(self.prepare(volume_node))

    def forget(self) -> None:
        """After the server changed (another URL, a restart with a new studies folder)."""
        with self._lock:
            self._known.clear()


def mark_server_image(volume_node, image_id: str) -> None:
    """Record that this volume IS the server's image `image_id` (loaded from it): never upload it."""
    volume_node.SetAttribute(ID_ATTRIBUTE, image_id)
    volume_node.SetAttribute(HASH_ATTRIBUTE, content_hash(volume_array(volume_node), ijk_to_ras(volume_node)))


def fetch_sample(client: MSAClient, strategy: str, folder: str) -> tuple[str, str] | None:
    """Asks the server for its next image to label and downloads it into `folder`.

    Returns (image id, file path), or None when the strategy has nothing left to offer. The caller
    loads the file and calls `mark_server_image` so that the volume is never uploaded back.
    """
    import os

    sample = client.next_sample(strategy)
    image_id = sample.get("id") if isinstance(sample, dict) else None
    if not image_id:
        return None
    name, content = client.download_image(image_id)
    name = os.path.basename(name) or f"{image_id}.nii.gz"  # never a path from the server
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(content)
    return image_id, path
