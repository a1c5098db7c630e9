"""Sessions kept between infer requests (lib/sessions.py): a request that adds clicks to the previous
one's applies only the new ones, and answers exactly what a fresh msa.session.Session fed the same
prompts in the same order answers.

The references run in this process on the model the server builds (the app's own ModelProvider, the
shipped adapters), one torch thread like the server, and see the same sequence of encoder calls:
the first request of the module (an ROI over all 8 slices) encodes every slice in both processes the
same way, so every later mask is compared bit for bit.
"""

from __future__ import annotations

import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from scipy import ndimage

from app_helpers import APP_DIR, Server, Study, status_of

Point = list[int]


# -- the reference: the server's model, in this process ----------------------------------------------

@pytest.fixture(scope="module")
def app_lib():
    sys.path.insert(0, str(APP_DIR))
    try:
        import lib.infers
        import lib.models
        import lib.params
        import lib.sessions

        yield lib
    finally:
        sys.path.remove(str(APP_DIR))


@dataclass
class Local:
    provider: object  # lib.models.ModelProvider
    engine: object  # msa.engine.Engine
    volume: object  # msa.io.Volume of the crop

    def session(self, fg: list[Point] = (), bg: list[Point] = (), roi: list[int] | None = None,
                propagate: bool = True):
        """A fresh Session fed roi, then foreground, then background (the server's order for a new one)."""
        from msa.session import Session

        session = Session(self.engine, self.volume)
        if roi is not None:
            session.add_roi(roi, propagate=propagate)
        for p in fg:
            session.add_point(p, positive=True, propagate=propagate)
        for p in bg:
            session.add_point(p, positive=False, propagate=propagate)
        return session


@pytest.fixture(scope="module")
def local(app_lib, study: Study, tmp_path_factory: pytest.TempPathFactory):
    import torch

    from msa.io import load_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server (OMP_NUM_THREADS=1): the same float sums, bit for bit
    provider = app_lib.models.ModelProvider({}, tmp_path_factory.mktemp("local-model"))
    yield Local(provider, provider.engine(), load_image(str(study.image)))
    torch.set_num_threads(threads)


def kji(ijk_mask: np.ndarray) -> np.ndarray:
    return ijk_mask.transpose(2, 1, 0)


def interior(mask: np.ndarray) -> tuple[int, int]:
    """(i, j) of the interior-most pixel of a (J, I) mask."""
    distance = ndimage.distance_transform_edt(mask)
    j, i = np.unravel_index(int(np.argmax(distance)), mask.shape)
    return int(i), int(j)


@dataclass(frozen=True)
class Clicks:
    fg1: Point  # the spleen's interior-most voxel
    fg2: Point  # the interior-most spleen voxel of a slice far from fg1's
    bg1: Point  # inside what the session answers after fg1, fg2 but outside the spleen: a real correction


@pytest.fixture(scope="module")
def clicks(local: Local, study: Study, warm) -> Clicks:
    fg1 = list(study.interior)
    k2 = 0 if fg1[2] >= 4 else 7
    fg2 = [*interior(study.spleen_kji[k2]), k2]
    wrong = local.session([fg1, fg2]).mask(1) & ~study.spleen_kji
    if wrong.any():
        k3 = int(np.argmax(wrong.sum(axis=(1, 2))))
        bg1 = [*interior(wrong[k3]), k3]
    else:  # nothing to correct: a voxel just outside the spleen on fg1's slice
        ring = ndimage.binary_dilation(study.spleen_kji[fg1[2]], iterations=2) & ~study.spleen_kji[fg1[2]]
        j, i = np.argwhere(ring)[0]
        bg1 = [int(i), int(j), fg1[2]]
    return Clicks(fg1, fg2, bg1)


# -- the server ------------------------------------------------------------------------------------

def client_named(server: Server, tmp_path_factory: pytest.TempPathFactory, client_id: str | None) -> MONAILabelClient:
    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")), client_id=client_id)


@pytest.fixture(scope="module")
def clients(server: Server, tmp_path_factory: pytest.TempPathFactory):
    """client id -> a real MONAILabelClient sending it (None: MONAI Label's default, no id)."""
    made: dict = {}

    def get(client_id: str | None) -> MONAILabelClient:
        if client_id not in made:
            made[client_id] = client_named(server, tmp_path_factory, client_id)
        return made[client_id]

    return get


@pytest.fixture(scope="module")
def warm(clients, main_image: str, study: Study, local: Local) -> None:
    """The module's first request, an ROI over the crop's 8 slices, and its local twin: both processes
    encode every slice with the same batches here, so every later comparison is exact."""
    assert study.roi[4:] == [0, 7], study.roi
    path, params = clients("warmup").infer("msa", main_image, {"roi": study.roi, "label": "spleen"})
    assert params["session"] == "new" and params["encoder_passes"] == 8, params
    assert np.array_equal(kji(read(path)), local.session(roi=study.roi).mask(1))


def read(path) -> np.ndarray:
    """A label file as an (i, j, k) array, nibabel's order."""
    return np.asarray(nib.load(str(path)).dataobj)


def infer(client: MONAILabelClient, image: str, fg: list[Point], bg: list[Point] = (), label: str = "spleen",
          model: str = "msa", **more) -> tuple[np.ndarray, dict]:
    """One request -> (the answer as a (k, j, i) bool mask, its params)."""
    path, params = client.infer(model, image, {"foreground": list(fg), "background": list(bg), "label": label, **more})
    mask = kji(read(path)).astype(bool)
    Path(path).unlink()
    return mask, params


def test_added_clicks_extend_the_session_and_answer_what_a_fresh_session_does(clients, main_image, clicks, local):
    client, c = clients("extend"), clicks
    reference = local.session([c.fg1])  # fed the first request's prompts, then the added ones
    mask, out = infer(client, main_image, [c.fg1])
    assert out["session"] == "new" and np.array_equal(mask, reference.mask(1)), out
    assert out["decoded_slices"] == reference.decoded, out

    steps = [([c.fg1, c.fg2], [], lambda: reference.add_point(c.fg2, positive=True)),
             ([c.fg1, c.fg2], [c.bg1], lambda: reference.add_point(c.bg1, positive=False))]
    for fg, bg, add in steps:
        before = reference.decoded
        add()
        mask, out = infer(client, main_image, fg, bg)
        assert out["session"] == "extended", out
        assert np.array_equal(mask, reference.mask(1)), f"{fg} {bg}: not the fresh session's answer"
        assert out["decoded_slices"] == reference.decoded - before, out
        assert out["encoder_passes"] == 0, out

    # The last request cost less decoder work than replaying its prompts, which re-walks the volume.
    replay = local.session([c.fg1, c.fg2], [c.bg1])
    assert out["decoded_slices"] < replay.decoded, (out, replay.decoded)
    assert replay.decoded >= 8 + 1, replay.decoded  # the first click alone walks all 8 slices

    # The same clicks again: the stored answer, no decoder work.
    mask, out = infer(client, main_image, [c.fg1, c.fg2], [c.bg1])
    assert out["session"] == "same" and out["decoded_slices"] == 0, out
    assert np.array_equal(mask, reference.mask(1))


def test_clicks_that_do_not_extend_start_a_new_session(clients, main_image, clicks, local, study):
    client, c = clients("restart"), clicks
    moved = [c.fg1[0] + 1, c.fg1[1], c.fg1[2]]
    requests = [
        ({"fg": [c.fg1, c.fg2], "bg": [c.bg1]}, "new"),
        ({"fg": [c.fg1], "bg": [c.bg1]}, "new"),  # a foreground click removed
        ({"fg": [moved], "bg": [c.bg1]}, "new"),  # a click changed
        ({"fg": [moved], "bg": [c.bg1], "roi": study.roi}, "new"),  # an roi added
        ({"fg": [moved, c.fg2], "bg": [c.bg1], "roi": study.roi}, "extended"),
        ({"fg": [moved, c.fg2], "bg": [], "roi": study.roi}, "new"),  # a background click removed
    ]
    for prompts, expected in requests:
        roi = prompts.get("roi")
        mask, out = infer(client, main_image, prompts["fg"], prompts["bg"], **({"roi": roi} if roi else {}))
        assert out["session"] == expected, (prompts, out)
        if expected == "new":
            replay = local.session(prompts["fg"], prompts["bg"], roi=roi)
            assert np.array_equal(mask, replay.mask(1)), f"{prompts}: not a fresh replay's answer"
            assert out["decoded_slices"] == replay.decoded, (prompts, out, replay.decoded)


def test_clients_and_labels_do_not_share_sessions(clients, main_image, clicks, local):
    c = clicks
    twice = local.session([c.fg1, c.fg2])  # what a new session answers to both clicks
    _, out = infer(clients("alice"), main_image, [c.fg1])
    assert out["session"] == "new", out
    for client_id, label in [("bob", "spleen"), (None, "spleen"), ("alice", "liver")]:
        mask, out = infer(clients(client_id), main_image, [c.fg1, c.fg2], label=label)
        assert out["session"] == "new", (client_id, label, out)
        assert np.array_equal(mask, twice.mask(1)), (client_id, label)
    # ... and none of them replaced alice's spleen session.
    _, out = infer(clients("alice"), main_image, [c.fg1, c.fg2])
    assert out["session"] == "extended", out


def test_a_refused_request_leaves_the_session_intact(clients, main_image, clicks, local, study):
    client, c = clients("carol"), clicks
    _, out = infer(client, main_image, [c.fg1])
    assert out["session"] == "new", out
    outside = [study.spleen_kji.shape[2] + 5, c.fg1[1], c.fg1[2]]  # i past the image's last column
    for fg, label in [([c.fg1, outside], "spleen"), ([c.fg1, c.fg2], "no_such_label")]:
        with pytest.raises(MONAILabelClientException) as refused:
            infer(client, main_image, fg, label=label)
        assert 400 <= (status_of(refused.value) or 0) < 500, refused.value
    mask, out = infer(client, main_image, [c.fg1, c.fg2])
    assert out["session"] == "extended", out
    assert np.array_equal(mask, local.session([c.fg1, c.fg2]).mask(1))


def test_msa_2d_clicks_extend_the_slice_session(clients, main_image, clicks, local, study):
    client, c = clients("slices"), clicks
    k = c.fg1[2]
    inner = ndimage.binary_erosion(study.spleen_kji[k], iterations=2)
    second = next([int(i), int(j), k] for j, i in np.argwhere(inner) if [i, j] != c.fg1[:2])  # same slice
    reference = local.session([c.fg1], propagate=False)
    mask, out = infer(client, main_image, [c.fg1], model="msa_2d")
    assert out["session"] == "new" and np.array_equal(mask, reference.mask(1)), out
    reference.add_point(second, positive=True, propagate=False)
    mask, out = infer(client, main_image, [c.fg1, second], model="msa_2d")
    assert out["session"] == "extended" and out["decoded_slices"] == 1, out
    assert np.array_equal(mask, reference.mask(1))


# -- in this process: the store itself, and requests that fail half-way or overlap ------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_store_is_a_bounded_lru_with_an_idle_timeout(app_lib):
    sessions = app_lib.sessions
    clock = Clock()
    store = sessions.SessionStore(size=2, idle_s=10, clock=clock)
    model = ("encoder", "sha")

    def key(name: str, model=model):
        return sessions.SessionKey(name, ("image", "ct"), "spleen", None, 3, None, model)

    def stored(name: str):
        return sessions.Stored(session=name, roi=None, foreground=[], background=[])

    for name in "abc":
        store.put(key(name), stored(name))
    assert store.take(key("a")) is None, "the least recently used one stays beyond the bound"
    assert store.take(key("b")).session == "b"
    assert store.take(key("b")) is None, "taken out while a request works on it"
    store.put(key("b"), stored("b"))
    clock.now = 9
    store.put(key("d"), stored("d"))
    clock.now = 11  # b has been idle for 11 s, d for 2 s
    assert store.take(key("b")) is None
    assert store.take(key("d")).session == "d"
    store.put(key("d"), stored("d"))
    assert store.take(key("e", model=("encoder", "other adapters"))) is None
    assert len(store) == 0, "sessions of a model no longer served are dropped"


@pytest.fixture
def task(app_lib, local: Local, study: Study, warm):
    """An msa infer task in this process, on the reference engine (its embeddings are cached)."""
    infer_task = app_lib.infers.MSAInfer(local.provider, ["spleen"], 3, app_lib.infers.VolumeCache())

    def call(fg: list[Point], bg: list[Point] = ()) -> tuple[np.ndarray, dict]:
        params = app_lib.params.InferParams.parse({"foreground": list(fg), "background": list(bg), "label": "spleen"})
        path, out = infer_task({"image": str(study.image), "params": params})
        mask = kji(read(path)).astype(bool)
        shutil.rmtree(Path(path).parent)
        return mask, out

    return call


def test_a_request_that_fails_half_way_leaves_no_session(task, local, clicks, monkeypatch):
    c = clicks
    assert task([c.fg1])[1]["session"] == "new"
    predict, calls = local.engine.predict, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # after the new click's own slice, while it re-propagates
            raise RuntimeError("decoder failure")
        return predict(*args, **kwargs)

    monkeypatch.setattr(local.engine, "predict", failing)
    with pytest.raises(RuntimeError):
        task([c.fg1, c.fg2])
    monkeypatch.setattr(local.engine, "predict", predict)
    mask, out = task([c.fg1, c.fg2])
    assert out["session"] == "new", out  # the half-updated session was not reused
    assert np.array_equal(mask, local.session([c.fg1, c.fg2]).mask(1))


def test_overlapping_requests_never_share_a_session(task, local, clicks, monkeypatch):
    """While a request works on the stored session, another for the same key gets a session of its own."""
    c = clicks
    assert task([c.fg1])[1]["session"] == "new"
    predict = local.engine.predict
    inside, release = threading.Event(), threading.Event()
    first = threading.current_thread()

    def blocking(*args, **kwargs):
        if threading.current_thread() is not first:
            inside.set()
            assert release.wait(120), "never released"
        return predict(*args, **kwargs)

    monkeypatch.setattr(local.engine, "predict", blocking)
    answers: dict = {}
    worker = threading.Thread(target=lambda: answers.update(slow=task([c.fg1, c.fg2])))
    worker.start()
    try:
        assert inside.wait(120), "the first request never reached the decoder"
        mask, out = task([c.fg1, c.fg2])  # meanwhile: the stored session is out, in the other request's hands
        assert out["session"] == "new", out
    finally:
        release.set()
        worker.join(120)
    assert answers["slow"][1]["session"] == "extended", answers["slow"][1]
    expected = local.session([c.fg1, c.fg2]).mask(1)
    assert np.array_equal(mask, expected) and np.array_equal(answers["slow"][0], expected)
