"""Requests off the GUI thread, newest first.

One worker thread runs one request at a time. A request submitted while another waits REPLACES
the waiting one (a newer click supersedes an older pending one); a request that finishes after a
newer one was submitted is stale: its outcome is dropped, so an old mask never overwrites the
answer to the user's latest click. The GUI thread calls `poll()` (from a QTimer) and applies the
outcome there: MRML is only touched on the GUI thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Outcome:
    ticket: int
    result: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    context: Any = None  # what the submitter needs to apply the result (segment, mode, ...)


class LatestRequestWorker:
    """Runs `fn(*args)` jobs on a daemon thread; only the newest job's outcome is delivered."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: tuple[int, Callable, tuple, Any] | None = None
        self._latest = 0  # ticket of the newest submitted job
        self._outcome: Outcome | None = None
        self.running: int | None = None  # ticket of the job being run
        self.executed: list[int] = []  # tickets run so far (for the status line and tests)
        self.dropped: list[int] = []  # tickets superseded before or after running
        self._thread = threading.Thread(target=self._loop, name="MSA requests", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args, context: Any = None) -> int:
        with self._cond:
            self._latest += 1
            if self._pending is not None:
                self.dropped.append(self._pending[0])
            self._pending = (self._latest, fn, args, context)
            self._cond.notify_all()
            return self._latest

    @property
    def busy(self) -> bool:
        with self._cond:
            return self.running is not None or self._pending is not None

    def poll(self) -> Outcome | None:
        """The newest finished outcome, once; None when there is nothing new."""
        with self._cond:
            outcome, self._outcome = self._outcome, None
            return outcome

    def idle(self, timeout: float = 600.0) -> bool:
        """Blocks until nothing is pending or running; the outcome stays for poll(). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.running is not None or self._pending is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def wait(self, timeout: float = 600.0) -> Outcome | None:
        """Blocks until nothing is pending or running, then polls (scripts and tests)."""
        self.idle(timeout)
        return self.poll()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None:
                    self._cond.wait()
                ticket, fn, args, context = self._pending
                self._pending = None
                self.running = ticket
            started = time.perf_counter()
            outcome = Outcome(ticket, context=context)
            try:
                outcome.result = fn(*args)
            except BaseException as exc:  # delivered to the GUI thread, which shows it
                outcome.error = exc
            outcome.seconds = time.perf_counter() - started
            with self._cond:
                self.executed.append(ticket)
                self.running = None
                if ticket == self._latest:
                    self._outcome = outcome
                else:
                    self.dropped.append(ticket)
                self._cond.notify_all()
