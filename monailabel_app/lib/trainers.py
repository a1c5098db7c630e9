"""Train task `msa`: fine-tunes the adapters on the datastore's final labels (msa.trainers)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import psutil
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from msa import build_model
from msa.data import Case, Source
from msa.engine import Engine
from msa.errors import MSAError
from msa.trainers import TrainConfig, selection_score, train

from .models import ModelProvider
from .params import TrainParams

logger = logging.getLogger(__name__)


def _process_alive(pid: int, created: float) -> bool:
    """Whether process `pid` still runs and is the one created at `created` (pids get reused)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and abs(process.create_time() - created) < 1
    except psutil.Error:
        return False


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(tmp, path)


class MSATrain(TrainTask):
    """Continues from the adapters in service; the result replaces them only when training ends.

    Training writes its best adapters to a draft, model_dir/msa_adapters_<backbone>_<2d|3d>.training.pt;
    at the end that file is renamed onto the published model_dir/msa_adapters_<backbone>_<2d|3d>.pt
    (one atomic rename), which the infer task notices on its next request. A run killed midway never
    touches the published file.
    """

    def __init__(self, provider: ModelProvider) -> None:
        super().__init__("MSA adapter fine-tuning with simulated clicks and boxes on the final labels")
        self.provider = provider
        self.stats_path = provider.model_dir / "train_stats.json"

    def config(self) -> dict:
        return TrainParams().model_dump()  # the defaults /info/ lists; the same model checks requests

    def stats(self) -> dict:
        """The last run's record; a RUNNING run whose process is gone (stopped, killed) reads STOPPED."""
        if not self.stats_path.is_file():
            return {}
        stats = json.loads(self.stats_path.read_text())
        if stats.get("status") == "RUNNING" and not _process_alive(stats.get("pid", -1), stats.get("pid_created", 0)):
            stats["status"] = "STOPPED"
        return stats

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        """One run; whatever ends it early (bad params, no labels, a crash while training or while
        publishing) is recorded as FAILED with its error, so /info/ never shows the previous run
        or a STOPPED run in its place."""
        started = time.time()
        me = psutil.Process()
        run = {"start_ts": started, "pid": me.pid, "pid_created": me.create_time()}
        try:
            return self._run(request, datastore, run)
        except BaseException as error:
            message = " ".join(str(error).split()) or type(error).__name__
            try:
                self.stats_path.parent.mkdir(parents=True, exist_ok=True)
                _write_json(self.stats_path, {"status": "FAILED", "error": message, **run})
            except OSError as cannot:  # the run's own error is the one to report
                logger.error(f"cannot record the failed run in {self.stats_path}: {cannot}")
            raise

    def _run(self, request: dict, datastore: Datastore, run: dict) -> dict:
        config = TrainConfig(**TrainParams.from_request(request).model_dump())  # MSAError before any work
        cases = [Case(Path(d["image"]), Path(d["label"])) for d in datastore.datalist()]
        if not cases:
            raise MSAError("no final labels in the datastore yet: save a label, then train")
        run["images"] = len(cases)
        model_dir = self.provider.model_dir
        model_dir.mkdir(parents=True, exist_ok=True)
        draft = self.provider.draft
        for leftover in (draft, draft.with_name(draft.name + ".state")):
            leftover.unlink(missing_ok=True)  # a killed run's draft: start clean

        model, _ = self.provider.build()  # the adapters in service (a published file that does not fit is not)
        # Boxes keep the backbone's answer; its depth branch is zero, so the teacher is the 2D backbone.
        teacher = build_model(self.provider.backbone, checkpoint=self.provider.checkpoint, device=self.provider.device)
        started = run["start_ts"]

        def progress(step: int, steps: int, record: dict) -> None:
            _write_json(self.stats_path, {"status": "RUNNING", "step": step, "total_steps": steps, **run, **record})

        progress(0, config.steps, {})
        result = train(Engine(model), [Source("datastore", cases)], draft, config, resume=False,
                       on_progress=progress, teacher=teacher)
        os.replace(draft, self.provider.published)  # publish: one atomic rename
        draft.with_name(draft.name + ".state").unlink(missing_ok=True)
        best = max(result["history"], key=selection_score)
        stats = {"status": "DONE", "step": result["steps"], "total_steps": config.steps, "images": len(cases),
                 "start_ts": started, "total_time": round(time.time() - started, 1), "best": best,
                 "published": str(self.provider.published)}
        _write_json(self.stats_path, stats)
        logger.info(f"MSA training done: {stats}")
        return stats
