"""Infer tasks `msa` (3D, slice-coherent) and `msa_2d` (one slice): requests in, label file out."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import OrderedDict

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from msa.errors import ImageError, PromptError
from msa.io import Volume, load_image, save_labels
from msa.session import Session

from .models import ModelProvider


def _points(request: dict, key: str) -> list[list[float]]:
    points = request.get(key) or []
    if not isinstance(points, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 3 and all(isinstance(v, (int, float)) for v in p)
            for p in points):
        raise PromptError(f"'{key}' must be a list of [i, j, k] voxel indices, got {str(points)[:80]}")
    return [list(map(float, p)) for p in points]


class VolumeCache:
    """The last few images read, by path + mtime + size: a click must not re-read a DICOM series."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Volume] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, path: str) -> Volume:
        try:
            stat = os.stat(path)
        except OSError:
            raise ImageError(f"image not found: {path}") from None
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        volume = load_image(path)
        with self._lock:
            self._items[key] = volume
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return volume


class MSAInfer(InferTask):
    """Clicks (`foreground` / `background`: [[i, j, k], ...]) and/or an `roi` ([i0, i1, j0, j1, k0, k1])
    on the image's voxel grid -> a binary label file on the same grid.

    dimension 3: the mask is propagated through the volume (slice-coherent);
    dimension 2: only slice `slice` (default: the slice of the first click) is segmented.
    """

    def __init__(self, provider: ModelProvider, labels: list[str], dimension: int, volumes: VolumeCache,
                 result_dir: str) -> None:
        kind = "3D, slice-coherent propagation" if dimension == 3 else "2D, one slice"
        super().__init__(type=InferType.DEEPGROW, labels=labels, dimension=dimension,
                         description=f"MSA (Medical SAM Adapter): clicks and ROI boxes, {kind}",
                         config={"result_extension": ".nii.gz"})
        self.provider = provider
        self.volumes = volumes
        self.result_dir = result_dir

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict) -> tuple[str, dict]:
        started = time.perf_counter()
        foreground, background = _points(request, "foreground"), _points(request, "background")
        roi = request.get("roi") or None
        if roi is not None and (not isinstance(roi, list) or len(roi) != 6):
            raise PromptError(f"'roi' must be [i0, i1, j0, j1, k0, k1], got {str(roi)[:80]}")
        if not foreground and roi is None:
            raise PromptError("give at least one foreground point or an roi")
        label = request.get("label")
        if label is not None and self.labels and label not in self.labels:
            raise PromptError(f"unknown label {label!r}; this model lists {', '.join(self.labels)}")

        engine = self.provider.engine()
        volume = self.volumes.load(request["image"])
        encoded_before = engine.encoded_slices
        session = Session(engine, volume)
        propagate = self.dimension == 3
        if self.dimension == 2:
            k = int(request.get("slice", foreground[0][2] if foreground else roi[4]))
            foreground = [p for p in foreground if int(p[2]) == k]
            background = [p for p in background if int(p[2]) == k]
            roi = roi[:4] + [k, k] if roi is not None else None
            if not foreground and roi is None:
                raise PromptError(f"no foreground point on slice {k}")
        if roi is not None:
            session.add_roi(roi, propagate=propagate)
        for point in foreground:
            session.add_point(point, positive=True, propagate=propagate)
        for point in background:
            session.add_point(point, positive=False, propagate=propagate)

        mask = session.mask(1).astype(np.uint8)
        extension = request.get("result_extension", ".nii.gz")
        # Our own folder: MONAI Label deletes the file after sending it, and a client on the same
        # machine saving into the system temp folder under the same name would lose its copy.
        fd, path = tempfile.mkstemp(suffix=extension, dir=self.result_dir)
        os.close(fd)
        save_labels(mask, volume, path)
        meta = engine.model.adapters_meta or {}
        return path, {
            "label_names": {label or "foreground": 1},
            "encoder_passes": engine.encoded_slices - encoded_before,  # 0: every slice came from the cache
            "slices": int(mask.any(axis=(1, 2)).sum()),
            "backbone": engine.model.config.backbone,
            "adapters_sha256": meta.get("sha256"),
            "latency_ms": round(1000 * (time.perf_counter() - started), 1),
        }
