"""Scoring inside the server process, on a worker thread.

MONAI Label runs scoring (at start-up, after training, after a next-sample request) in a
subprocess that builds the whole app again: a second copy of the model, loaded for ~90 s on a CPU,
and a second copy of datastore_v2.json, whose writes the server's own copy later overwrote (the
scores vanished). Here it runs on the server's own engine and embedding cache and writes through
the server's datastore (one lock), so nothing is loaded twice and nothing is lost.

Runs are recorded in MONAI Label's task list, so GET /scoring/ reports them as it reports its own.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from monailabel.utils.async_tasks import utils as async_tasks

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


class ScoringRunner:
    """One scoring run at a time; a request while one waits joins it instead of queueing another."""

    def __init__(self, score: Callable[[dict], dict]) -> None:
        self.score = score  # the app's scoring(request): runs one method
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="MSA-SCORING")
        self._lock = threading.Lock()
        self._waiting: dict | None = None

    def submit(self, methods: list[str]) -> dict:
        with self._lock:
            if self._waiting is not None:
                return self._waiting
            task = {"id": str(uuid.uuid4()), "status": "SUBMITTED", "request": {"methods": methods},
                    "start_ts": _now(), "in_process": True}
            async_tasks.background_tasks.setdefault("scoring", []).append(task)
            self._waiting = task
        self._executor.submit(self._run, task, methods)
        return task

    def _run(self, task: dict, methods: list[str]) -> None:
        with self._lock:
            self._waiting = None
        task["status"] = "RUNNING"
        try:
            task["result"] = {method: self.score({"method": method}) for method in methods}
            task["status"] = "DONE"
        except Exception as error:  # reported in the task, and once in the log
            logger.error(f"scoring {methods} failed: {error}", exc_info=error)
            task["status"], task["error"] = "ERROR", str(error)
        task["end_ts"] = _now()
