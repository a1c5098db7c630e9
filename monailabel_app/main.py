"""MONAI Label app serving MSA (Medical SAM Adapter): interactive 3D/2D segmentation from clicks
and ROI boxes, and active-learning retraining of the adapters.

    monailabel start_server --app monailabel_app --studies STUDIES [--conf KEY VALUE ...]

--conf backbone     lite_medsam (default, bundled weights) | vit_b | vit_l | vit_h
--conf checkpoint   backbone weights file (required for SAM backbones; never downloaded)
--conf adapters     adapter file (default: the adapters shipped with msa for the backbone)
--conf three_d      true | false (default false): encode slabs of slices with the depth branch
--conf device       cpu | cuda | cuda:N (default cpu)
--conf cache_mb     embedding cache size (default 2048)
--conf labels       comma-separated structure names the infer tasks list
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First

from lib.activelearning import ConfidenceScoring, LeastConfident, RandomUnlabeled
from lib.datastore import CheckedDatastore
from lib.infers import MSAInfer, VolumeCache
from lib.models import ModelProvider
from lib.server import move_inference_off_event_loop
from lib.trainers import MSATrain
from msa.errors import MSAError


DEFAULT_LABELS = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
                  "aorta", "inferior_vena_cava")


@functools.lru_cache(maxsize=8)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    """sha256 of a file, computed once per (path, mtime, size): /info/ is asked on every infer."""
    stat = os.stat(path)
    return _sha256(str(path), stat.st_mtime_ns, stat.st_size)


class MSAApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        # MONAI Label's background tasks read os.environ["PYTHONPATH"] and die silently without it.
        os.environ.setdefault("PYTHONPATH", "")
        try:
            self.provider = ModelProvider(conf, Path(conf.get("model_dir", Path(app_dir) / "model")))
        except MSAError as exc:
            # One line and exit code 2: raising would be caught by uvicorn's start-up hook and
            # reported as a long traceback ending in "Application startup failed".
            print(f"MSA app cannot start: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
        self.volumes = VolumeCache()
        self.result_dir = tempfile.mkdtemp(prefix="msa-results-")  # label files on their way to clients
        atexit.register(shutil.rmtree, self.result_dir, ignore_errors=True)
        self.confidence = ConfidenceScoring(self.provider, self.volumes)  # the uncertainty strategy uses it too
        self.structure_labels = [s.strip() for s in conf.get("labels", ",".join(DEFAULT_LABELS)).split(",") if s.strip()]
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="MSA",
                         description="Medical SAM Adapter: interactive segmentation with clicks and ROI boxes",
                         version="0.1.0", labels=self.structure_labels)

    def init_datastore(self):
        return CheckedDatastore(self.studies, auto_reload=False)

    def init_infers(self):
        return {
            "msa": MSAInfer(self.provider, self.structure_labels, 3, self.volumes, self.result_dir),
            "msa_2d": MSAInfer(self.provider, self.structure_labels, 2, self.volumes, self.result_dir),
        }

    def init_trainers(self):
        return {"msa": MSATrain(self.provider)}

    def init_scoring_methods(self):
        return {"msa_confidence": self.confidence}

    def init_strategies(self):
        return {"random": RandomUnlabeled(), "first": First(), "uncertainty": LeastConfident(self.confidence)}

    def on_init_complete(self) -> None:
        super().on_init_complete()
        move_inference_off_event_loop()

    def info(self) -> dict:
        """MONAI Label's /info/, plus `msa`: which backbone and adapters answer (the Slicer
        extension's "Test connection" shows them before any image is sent)."""
        meta = super().info()
        adapters = self.provider.adapters_path()
        meta["msa"] = {"backbone": self.provider.backbone, "three_d": self.provider.three_d,
                       "adapters": adapters.name if adapters else None,
                       "adapters_sha256": _file_sha256(adapters) if adapters else None}
        return meta

    def infer(self, request: dict, datastore=None) -> dict:
        """MONAI Label's infer, with user mistakes answered as 4xx instead of 500."""
        if request.get("model") not in self._infers:
            raise HTTPException(status_code=404, detail=f"unknown model {request.get('model')!r}; "
                                                        f"this app serves {', '.join(self._infers)}")
        image = request.get("image")
        if isinstance(image, str) and not os.path.exists(image) and not self.datastore().get_image_uri(image):
            raise HTTPException(status_code=404, detail=f"no image {image!r} in the datastore")
        try:
            return super().infer(request, datastore)
        except MSAError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None

    def train(self, request: dict) -> dict:
        try:
            return super().train(request)
        except MSAError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
