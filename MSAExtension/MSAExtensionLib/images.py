"""Images on the server: each volume is uploaded once, named by a hash of its content.

The image id is `slicer-<sha256 of voxels + voxel type + grid + IJK->RAS>[:24]`, so a second click,
a reloaded scene or another Slicer session on the same data finds the image on the server (HEAD
/datastore/image) instead of uploading it again. An image that came FROM the server ("Next sample")
carries its server id in node attributes and is not uploaded while the server has it.

The ids this client has seen on the server are remembered (no look-up per click), and that memory
is checked whenever the server answers 404: a server restarted with another studies folder at the
same URL, or an image deleted, costs one upload, not a dead end (`ServerImages.call`).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
from vtk.util import numpy_support

from . import nrrd
from .client import MSAClient
from .errors import ImageLost, MSAClientError
from .geometry import ijk_to_ras

ID_ATTRIBUTE = "MSA.ServerImageID"  # set on volumes loaded from the server
HASH_ATTRIBUTE = "MSA.ServerImageHash"  # their content hash when loaded: edited voxels upload anew
T = TypeVar("T")


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
        self._lost: set[str] = set()  # ids the server was found to lack (404 + HEAD): upload without asking again
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
            lost = prepared.image_id in self._lost and prepared.array is not None
        if lost or not self.client.image_exists(prepared.image_id):
            self._upload(prepared)
        with self._lock:
            self._known.add(prepared.image_id)
            self._lost.discard(prepared.image_id)
        return prepared.image_id

    def _upload(self, prepared: PreparedImage) -> None:
        if prepared.array is None:  # prepared while the id was known: the voxels were not copied
            with self._lock:
                self._known.discard(prepared.image_id)
                self._lost.add(prepared.image_id)
            raise ImageLost(f"the server no longer has image {prepared.image_id!r} (restarted with another "
                            "studies folder, or the image was deleted); it is uploaded again", 404)
        content = nrrd.write(prepared.array, prepared.matrix)
        self.client.upload_image(prepared.image_id, f"{prepared.image_id}.nrrd", content)

    def call(self, prepared: PreparedImage, fn: Callable[[str], T]) -> T:
        """On any thread: fn(image id) with the image on the server (uploaded first if needed).

        This object's memory of uploaded ids can be out of date: the server may have been restarted
        with another studies folder at the same URL, or the image deleted. When fn fails with a 404
        and a look-up (HEAD) confirms the image is gone, the id is forgotten, the image uploaded
        again and fn called once more; if the voxels were not copied (the id was known when the
        request was prepared), ImageLost is raised instead: prepare again (on the GUI thread) and
        resend. Any other error, or a 404 for something else (an unknown model), goes up unchanged.
        """
        image_id = self.ensure(prepared)
        try:
            return fn(image_id)
        except MSAClientError as exc:
            if exc.status != 404 or self.client.image_exists(image_id):
                raise
        self.forget(image_id)
        self._upload(prepared)
        with self._lock:
            self._known.add(image_id)
            self._lost.discard(image_id)
        return fn(image_id)

    def image_id(self, volume_node) -> str:
        """prepare + ensure in one call (GUI-less use and tests)."""
        return self.ensure(self.prepare(volume_node))

    def forget(self, image_id: str | None = None) -> None:
        """Forget that the server has `image_id` (all ids when None): the next request looks again
        (HEAD) and uploads what is missing. After a 404 for the image, or a new "Test connection"."""
        with self._lock:
            if image_id is None:
                self._known.clear()
                self._lost.clear()
            else:
                self._known.discard(image_id)


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
