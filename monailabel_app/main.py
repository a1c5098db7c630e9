"""MONAI Label app serving MSA (Medical SAM Adapter): interactive 3D/2D segmentation from clicks
and ROI boxes, and active-learning retraining of the adapters.

    monailabel start_server --app monailabel_app --studies STUDIES [--conf KEY VALUE ...]

--conf backbone     lite_medsam (default, bundled weights) | vit_b | vit_l | vit_h
--conf checkpoint   backbone weights file (required for SAM backbones; never downloaded)
--conf adapters     adapter file (default: the adapters shipped with msa for the backbone)
--conf three_d      true | false (default false): encode slabs of slices with the depth branch
--conf device       cpu | cuda | cuda:N (default cpu)
--conf cache_mb     embedding cache size (default 2048)
--conf runtime      auto (default: openvino on a CPU, torch on CUDA) | openvino | torch
--conf precision    fp32 (default, exact) | bf16 (openvino, where the CPU has bfloat16)
--conf export_dir   OpenVINO exports (default: $MSA_EXPORT_DIR, else MODEL_DIR/openvino)
--conf labels       comma-separated structure names the infer tasks list
--conf cors_origins browser origins allowed to call the server (default: none; see lib/policy.py)
--conf allowed_hosts  host names besides IP addresses, localhost and this machine's name
--conf allowed_clients  other machines' addresses / networks allowed to call (default: this machine only)
--conf max_upload_mb / max_image_mb   upload limits (default 1024 / 2048)
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import Future, wait
from pathlib import Path

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.tasks.activelearning.first import First
from monailabel.utils.others.generic import remove_file

from lib.activelearning import ConfidenceScoring, LeastConfident, RandomUnlabeled
from lib.datastore import CheckedDatastore
from lib.errors import NotFound, Unavailable
from lib.infers import RESULT_PREFIX, MSAInfer, VolumeCache
from lib.models import ModelProvider
from lib.names import check_name
from lib.params import InferParams
from lib.policy import Policy
from lib.routes import install
from lib.scoring import ScoringRunner
from lib.trainers import MSATrain
from msa.errors import MSAError


logger = logging.getLogger(__name__)
DEFAULT_LABELS = ("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
                  "aorta", "inferior_vena_cava")


def _cannot_start(error: Exception) -> None:
    """One line and exit code 2: raising would be caught by uvicorn's start-up hook and reported as
    a long traceback ending in "Application startup failed"."""
    print(f"MSA app cannot start: {error}", file=sys.stderr, flush=True)
    os._exit(2)


def _discard_late_result(future: Future) -> None:
    """The result of an inference whose request timed out (answered 503): nobody will fetch it."""
    if future.cancelled() or future.exception() is not None:
        return
    result_file = future.result()[0]
    folder = Path(result_file).parent
    remove_file(str(folder) if folder.name.startswith(RESULT_PREFIX) else result_file)
    logger.info("MSA: discarded the result of an inference that finished after its request timed out")


class MSAApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict) -> None:
        # MONAI Label's background tasks read os.environ["PYTHONPATH"] and die silently without it.
        os.environ.setdefault("PYTHONPATH", "")
        try:
            self.provider = ModelProvider(conf, Path(conf.get("model_dir", Path(app_dir) / "model")))
            self.policy = Policy.from_conf(conf, studies, settings.MONAI_LABEL_CORS_ORIGINS)
        except MSAError as exc:
            _cannot_start(exc)
        self.volumes = VolumeCache()
        self.confidence = ConfidenceScoring(self.provider, self.volumes)
        self.scoring_runner = ScoringRunner(self.scoring)
        self.structure_labels = [s.strip() for s in conf.get("labels", ",".join(DEFAULT_LABELS)).split(",") if s.strip()]
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="MSA",
                         description="Medical SAM Adapter: interactive segmentation with clicks and ROI boxes",
                         version="0.1.0", labels=self.structure_labels)

    def init_datastore(self):
        return CheckedDatastore(self.studies, self.policy.max_image_bytes, auto_reload=False,
                                extensions=("*.nii.gz", "*.nii", "*.nrrd"))

    def init_infers(self):
        return {
            "msa": MSAInfer(self.provider, self.structure_labels, 3, self.volumes),
            "msa_2d": MSAInfer(self.provider, self.structure_labels, 2, self.volumes),
        }

    def init_trainers(self):
        return {"msa": MSATrain(self.provider)}

    def init_scoring_methods(self):
        return {"msa_confidence": self.confidence}

    def init_strategies(self):
        # uncertainty ranks the stored scores and hands missing or stale ones to the scoring thread.
        uncertainty = LeastConfident(self.provider, lambda: self.scoring_runner.submit(["msa_confidence"]))
        return {"random": RandomUnlabeled(), "first": First(), "uncertainty": uncertainty}

    def _load_sessions(self, load: bool = False):
        # Sessions store uploads outside the datastore, unchecked and unbounded; infer takes datastore
        # ids only, so the app has no use for them: no session folder, and the routes are refused.
        return None

    def on_init_complete(self) -> None:
        # Only the server builds the model now (a training subprocess builds this app too, and its own
        # model): an adapters or checkpoint file that does not fit stops the server here, not at the
        # first request. A published file that does not fit is set aside with a warning (lib/models.py).
        try:
            self.provider.engine()
        except MSAError as exc:
            _cannot_start(exc)
        # Only the server cleans up after a killed predecessor: a training subprocess must not delete
        # the upload the server is checking right now.
        self._datastore.remove_leftovers()
        # Subprocesses (training) reach the server on this port, not MONAI Label's default 8000.
        os.environ["MONAI_LABEL_SERVER_PORT"] = str(settings.MONAI_LABEL_SERVER_PORT)
        install(self.policy)
        super().on_init_complete()  # starts the scoring of unlabeled images (in-process, see async_scoring)

    def async_scoring(self, method, params=None):
        """In the server: scoring on a thread of this process, on this process's model and datastore
        (MONAI Label's subprocess loaded the model again and its datastore writes were lost). In a
        training subprocess: MONAI Label asks the server over HTTP, which lands here."""
        if not self._server_mode:
            return super().async_scoring(method, params)
        methods = [method] if method else list(self._scoring_methods)
        return self.scoring_runner.submit(methods) if methods else {}

    def info(self) -> dict:
        """MONAI Label's /info/, plus `msa`: which backbone and adapters answer (the Slicer
        extension's "Test connection" shows them before any image is sent)."""
        meta = super().info()
        adapters, sha256 = self.provider.served()  # as loaded: no file is read here (the event loop runs this)
        meta["msa"] = {"backbone": self.provider.backbone, "three_d": self.provider.three_d,
                       "adapters": adapters.name if adapters else None, "adapters_sha256": sha256,
                       "targets": self.provider.targets()}  # names an infer request may send as `text`
        return meta

    def _infer_task(self, model: object) -> MSAInfer:
        task = self._infers.get(model) if isinstance(model, str) else None
        if task is None:
            raise NotFound(f"unknown model {str(model)[:60]!r}; this app serves {', '.join(self._infers)}")
        return task

    def infer(self, request: dict, datastore=None) -> dict:
        """MONAI Label's infer (a request dict of raw values): the model, then the params, checked."""
        request = dict(request)
        model, image_id = request.pop("model", None), request.pop("image", None)
        self._infer_task(model)
        return self.infer_checked(model, image_id, InferParams.parse(request), datastore)

    def infer_checked(self, model: str, image_id: object, params: InferParams, datastore=None) -> dict:
        """Infer for datastore ids only: `image` is an id (never a server path; MONAI Label's own
        infer treats any existing path as the image), `params` were parsed before the image is
        looked up (and are handed to the task as they are), and the label is stored only under a
        tag that is a name."""
        task = self._infer_task(model)
        image_id = check_name(image_id, "image")
        datastore = datastore or self.datastore()
        uri = datastore.get_image_uri(image_id)
        if not uri:
            raise NotFound(f"no image {image_id!r} in the datastore")
        task_request = {"image": uri, "params": params, "description": task.description}
        if self._infers_threadpool:
            future = self._infers_threadpool.submit(task, task_request)
            timeout = settings.MONAI_LABEL_INFER_TIMEOUT
            if not wait([future], timeout).done:
                if not future.cancel():  # it runs already: its result goes when it ends
                    future.add_done_callback(_discard_late_result)
                raise Unavailable(f"inference did not finish within {timeout} s (MONAI_LABEL_INFER_TIMEOUT): "
                                  f"the server is busy; try again later")
            result_file, result_json = future.result()
        else:
            result_file, result_json = task(task_request)
        label_id, tag = result_file, DefaultLabelTag.ORIGINAL.value
        if params.save_label:
            try:
                label_id = datastore.save_label(image_id, result_file, params.label_tag,
                                                {"model": model, "params": result_json})
            except BaseException:
                folder = Path(result_file).parent
                remove_file(str(folder) if folder.name.startswith(RESULT_PREFIX) else result_file)
                raise
            tag = params.label_tag
        return {"label": label_id, "tag": tag, "file": result_file, "params": result_json}
