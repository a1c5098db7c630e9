"""Infer tasks `msa` (3D, slice-coherent) and `msa_2d` (one slice): requests in, label file out."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from msa.errors import ImageError
from msa.io import Volume, load_image, save_labels
from msa.modeling.targets import canonical_name
from msa.session import Session

from .models import ModelProvider
from .params import InferParams
from .sessions import DEFAULT_CLIENT, SessionKey, SessionStore, Stored

RESULT_PREFIX = "msa-result-"  # one folder per answer, removed once it is sent (lib/routes.py)


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

    Sessions are kept between requests (lib/sessions.py): a request that adds clicks to the previous
    one's applies only the new ones. msa_2d goes through the same store, keyed by its slice.
    """

    def __init__(self, provider: ModelProvider, labels: list[str], dimension: int, volumes: VolumeCache,
                 sessions: SessionStore | None = None) -> None:
        kind = "3D, slice-coherent propagation" if dimension == 3 else "2D, one slice"
        super().__init__(type=InferType.DEEPGROW, labels=labels, dimension=dimension,
                         description=f"MSA (Medical SAM Adapter): clicks and ROI boxes, {kind}",
                         config={"result_extension": ".nii.gz"})
        self.provider = provider
        self.volumes = volumes
        self.sessions = sessions if sessions is not None else SessionStore()

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict) -> tuple[str, dict]:
        """`request`: `image` (a path inside the studies folder) and `params`, the InferParams the app
        parsed (main.MSAApp.infer_checked); a request of raw values instead is parsed here."""
        started = time.perf_counter()
        params = request.get("params")
        if not isinstance(params, InferParams):
            params = InferParams.parse({k: v for k, v in request.items() if k not in ("image", "description", "model")})
        volume = self.volumes.load(request["image"])
        # Every prompt against the image before the encoder runs: a bad one costs no encoding.
        k = params.check_against(volume.shape_ijk, self.dimension, self.labels)
        foreground, background = params.foreground, params.background
        roi = list(params.roi) or None
        engine = self.provider.engine()
        if params.text is not None:
            engine.model.target_row(params.text)  # a name the adapters did not learn: 4xx, before any encoding
        if self.dimension == 2:
            foreground = [p for p in foreground if int(p[2]) == k]
            background = [p for p in background if int(p[2]) == k]
            roi = roi[:4] + [k, k] if roi is not None else None  # the ROI's box, on slice k
        model = (engine.model.encoder_key(), (engine.model.adapters_meta or {}).get("sha256"))
        key = SessionKey(params.client_id or DEFAULT_CLIENT, (volume.key, volume.modality), params.label,
                         canonical_name(params.text) if params.text else None, self.dimension, k, model)
        stored = self.sessions.take(key)  # out of the store while this request works on it
        added = stored.new_points(roi, foreground, background) if stored is not None else None
        if added is None:  # a new session: every prompt, roi first, then foreground, then background
            session, state, added = Session(engine, volume), "new", (foreground, background)
        else:
            session = stored.session
            session.engine = engine  # the provider's current engine: the same model, and it counts encodings
            state = "extended" if added[0] or added[1] else "same"
        decoded_before = session.decoded
        propagate = self.dimension == 3
        with engine.count_encodings() as encoded:  # this request's own (others run on the same engine)
            if state == "new":
                session.set_target(params.text)
            if state == "new" and roi is not None:
                session.add_roi(roi, propagate=propagate)
            for point in added[0]:
                session.add_point(point, positive=True, propagate=propagate)
            for point in added[1]:
                session.add_point(point, positive=False, propagate=propagate)
            mask = session.mask(1).astype(np.uint8)
        # A folder of its own per answer: MONAI Label deletes the file once sent, and a client on the
        # same machine saving its copy into the system temp folder under the same name would lose it.
        folder = tempfile.mkdtemp(prefix=RESULT_PREFIX)
        fd, path = tempfile.mkstemp(suffix=params.result_extension, dir=folder)
        os.close(fd)
        try:
            save_labels(mask, volume, path)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        # Back only after success: an exception above drops the session, half-updated or not.
        self.sessions.put(key, Stored(session, roi, foreground, background))
        label = params.label
        meta = engine.model.adapters_meta or {}
        return path, {
            "label_names": {label or "foreground": 1},
            "encoder_passes": encoded.slices,  # 0: every slice came from the cache
            "session": state,  # "new" (every prompt applied), "extended" (only the new points), "same"
            "decoded_slices": session.decoded - decoded_before,  # decoder work of this request
            "slices": int(mask.any(axis=(1, 2)).sum()),
            "backbone": engine.model.config.backbone,
            "adapters_sha256": meta.get("sha256"),
            "latency_ms": round(1000 * (time.perf_counter() - started), 1),
        }
