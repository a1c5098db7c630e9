"""Interactive sessions kept between infer requests, so a correction click costs only what it changes.

Clients (MONAI Label's Slicer plugin, MSAExtension) send the FULL list of clicks on every request. A
request whose roi is the stored one and whose foreground / background lists start with the stored
lists extends that session: only the new points are applied (msa.session.Session.add_point
re-propagates only while masks change). Anything else starts a new session from all the prompts.

Who a session belongs to: MONAI Label 0.8.5's infer endpoint knows no client (its `session_id` is an
upload session, refused by this app, and without auth every caller is the same user "admin"), so the
client is the `client_id` the client puts into the params: MONAILabelClient sends its constructor's
client_id (None unless set), the Slicer plugin its "Client/User-ID" setting (default "user-xyz").
Requests without one share DEFAULT_CLIENT.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from msa.session import Session

DEFAULT_CLIENT = "default"

Point = list[float]


@dataclass(frozen=True)
class SessionKey:
    client: str
    image: tuple[str, str]  # Volume.key (content hash) and modality: what the embeddings depend on
    label: str | None
    text: str | None  # the target prompt: another name is another session
    dimension: int
    slice: int | None  # msa_2d: the slice segmented; None in 3D
    model: tuple[str, str | None]  # encoder_key() and the adapter file's sha256: a new engine is not a new model


@dataclass
class Stored:
    """A session and the prompts it has applied, as the request parsed them."""

    session: Session
    roi: list[float] | None
    foreground: list[Point]
    background: list[Point]
    used: float = 0.0  # the store's clock when it was put back

    def new_points(self, roi: list[float] | None, foreground: list[Point],
                   background: list[Point]) -> tuple[list[Point], list[Point]] | None:
        """The points a request adds to this session, or None when it does not extend it."""
        n_fg, n_bg = len(self.foreground), len(self.background)
        if roi != self.roi or foreground[:n_fg] != self.foreground or background[:n_bg] != self.background:
            return None
        return foreground[n_fg:], background[n_bg:]


class SessionStore:
    """At most `size` sessions, least recently used dropped first; one idle longer than `idle_s`
    seconds is dropped on the next request.

    A request takes its session out (`take`) and puts it back (`put`) only once it has succeeded:
    two requests never work on one session, and a request that failed half-way leaves nothing
    behind (the next one starts over).
    """

    def __init__(self, size: int = 16, idle_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.idle_s = idle_s
        self.clock = clock
        self._items: OrderedDict[SessionKey, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def take(self, key: SessionKey) -> Stored | None:
        with self._lock:
            self._drop_stale(key.model)
            return self._items.pop(key, None)

    def put(self, key: SessionKey, stored: Stored) -> None:
        with self._lock:
            stored.used = self.clock()
            self._items.pop(key, None)  # a concurrent request's session for the same key: the later one wins
            self._items[key] = stored
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def _drop_stale(self, model: tuple[str, str | None]) -> None:
        """Idle sessions, and those of a model no longer served: nothing can extend them, and they
        keep their image and that model's engine in memory."""
        now = self.clock()
        for key in [k for k, s in self._items.items() if now - s.used > self.idle_s or k.model != model]:
            del self._items[key]
