"""Fuzzing the real server (issue 11): Hypothesis builds requests for /infer, /datastore and /train
(params: points, ROIs, labels, slice, extensions, nesting, wrong types, huge and non-finite numbers;
ids and tags: traversal, separators, unicode, empty, very long; uploads: truncated, garbage, a
NRRD that names a server file) and sends them to one `monailabel start_server`.

Every answer must be below 500; every refused one (4xx) must leave the studies folder byte for byte
as it was. Valid requests are allowed to succeed (a 2x2-slice image keeps real inference cheap).
At the end nothing may lie outside the studies folder, nor in the server's temp folder.
Bounded by Hypothesis's settings alone: MAX_EXAMPLES requests, no deadline, derandomized (the same
requests every run), no example database. Its duration is reported, never asserted.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from app_helpers import Server, files_under, sha256_tree, start_isolated_server, stop_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_EXAMPLES = 300  # the bound on the run: requests, not seconds (no wall-clock limits on a shared machine)
TINY = "tiny"  # a 40 x 40 x 2 CT crop: the one image the fuzzed requests may really segment
LOGS = ("app.log", "server.out", "logging.json")
TORCH_CACHE = "torchinductor_"


@dataclass
class Payloads:
    files: dict[str, bytes]
    stats: Counter = field(default_factory=Counter)  # answers by status
    routes: Counter = field(default_factory=Counter)  # requests by first path segment
    started: float = 0.0


@pytest.fixture(scope="module")
def payloads(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Payloads:
    import SimpleITK as sitk

    out = tmp_path_factory.mktemp("fuzz-files")
    ct = sitk.ReadImage(str(data_dir / "ct_abdomen.nii.gz"))[40:80, 30:70, 11:13]
    label = sitk.Cast(ct > 0, sitk.sitkUInt8)
    nan = sitk.Cast(ct, sitk.sitkFloat32)
    nan[3, 3, 1] = float("nan")

    def written(image, name: str) -> bytes:
        sitk.WriteImage(image, str(out / name), useCompression=name.endswith((".gz", ".nrrd")))
        return (out / name).read_bytes()

    tiny = written(ct, "tiny.nii.gz")
    files = {
        "tiny image": tiny,
        "tiny image as nrrd": written(ct, "tiny.nrrd"),
        "label on the tiny grid": written(label, "label.nii.gz"),
        "label on another grid": written(sitk.Cast(sitk.ReadImage(str(data_dir / "ct_abdomen_labels.nii.gz")),
                                                   sitk.sitkUInt8)[:20, :20, :2], "other.nii.gz"),
        "image with a NaN": written(nan, "nan.nii.gz"),
        "2D image": written(ct[:, :, 0], "flat.nii.gz"),
        "truncated gzip": tiny[: len(tiny) // 2],
        "gzip without its trailer": tiny[:-4],
        "gzip of text": gzip.compress(b"not an image\n" * 50),
        "random bytes": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "text": b"hello\n" * 40,
        "empty": b"",
        "nrrd naming a server file": b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 1\nencoding: raw\n"
                                     b"data file: /etc/hostname\n\n",
        "nrrd gzip bomb header": b"NRRD0004\ntype: double\ndimension: 3\nsizes: 100000 100000 100000\n"
                                 b"encoding: gzip\n\n" + gzip.compress(b"\0" * 1000),
    }
    return Payloads(files)


@pytest.fixture(scope="module")
def server(payloads: Payloads, tmp_path_factory: pytest.TempPathFactory):
    running = start_isolated_server(tmp_path_factory.mktemp("server"))
    answer = requests.put(f"{running.url}/datastore/image", params={"image": TINY}, timeout=60,
                          files={"file": ("tiny.nii.gz", payloads.files["tiny image"])})
    assert answer.status_code == 200, answer.text[:300]
    yield running
    stop_server(running)


# -- what the requests are made of ------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)  # anything UTF-8 can carry
IDS = st.one_of(
    st.sampled_from([TINY, "nosuch", "", ".", "..", "../x", "../../escape", "/etc/passwd", "a/b", "a\\b", "./tiny",
                     "~root", "%2e%2e%2fx", "x" * 300, "tiny\x00", " tiny", "tiny/", "ünïcode", "名前", "a:b",
                     "-x", ".hidden", "x.nii.gz", "labels", "datastore_v2.json", "final/../x"]),
    TEXT,
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
)
TAGS = IDS.filter(lambda tag: tag != "final")  # final labels would let a fuzzed train request really train
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT,
                    st.sampled_from([10**400, -(10**400), 2**63, 1e308, -0.0]))
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(TEXT, kids, max_size=4),
                    max_leaves=12)
def _often(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """`common` three times in four (Hypothesis favours small integers: the rare branch is the
    largest), so that requests get past the first checks and reach the deep ones."""
    return st.integers(0, 3).flatmap(lambda n: rare if n == 3 else common)


NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
COORD = st.one_of(st.integers(-3, 45), st.floats(-3, 45), JSON)
POINT = st.one_of(st.lists(COORD, min_size=3, max_size=3), st.lists(COORD, max_size=5), JSON)
VOXEL = st.tuples(st.integers(0, 41), st.integers(0, 41), st.integers(0, 2)).map(list)  # tiny: 40 x 40 x 2
GOOD_INFER = st.fixed_dictionaries({
    "foreground": _often(st.lists(VOXEL, min_size=1, max_size=3), st.lists(POINT, max_size=3) | JSON),
}, optional={
    "background": _often(st.lists(VOXEL, max_size=2), st.lists(POINT, max_size=2) | JSON),
    "roi": _often(st.lists(st.integers(0, 39), min_size=6, max_size=6), st.lists(COORD, max_size=8) | JSON),
    "label": _often(st.sampled_from(["spleen", "liver"]), st.sampled_from(["not_an_organ", ""]) | JSON),
    "slice": _often(st.integers(0, 1), st.integers(-2, 4) | JSON),
    "result_extension": _often(st.sampled_from([".nii.gz", ".nii", ".nrrd"]),
                               st.sampled_from([".txt", "/../../evil.nii.gz", ""]) | JSON),
    "save_label": _often(st.just(False), st.booleans() | JSON),
    "label_tag": _often(st.just("original"), TAGS),
})
INFER_PARAMS = _often(GOOD_INFER, st.tuples(GOOD_INFER, st.sampled_from(["image", "model", "timeout", "session"]),
                                            IDS | JSON).map(lambda t: {**t[0], t[1]: t[2]}))
TRAIN_PARAMS = st.fixed_dictionaries({}, optional={
    key: st.one_of(st.integers(-5, 10**6), st.floats(), TEXT, JSON)
    for key in ("steps", "batch_size", "lr", "seed", "eval_every", "device", "model")})


def _body(params: st.SearchStrategy) -> st.SearchStrategy[str]:
    junk = st.one_of(JSON.map(json.dumps), TEXT, st.sampled_from(["[" * 5000, "9" * 5000, '{"roi": NaN}', "{,}", ""]))
    return _often(params.map(json.dumps), junk)


def _query(required: dict, optional: dict) -> st.SearchStrategy[dict]:
    """The route's own parameters (required ones usually present), now and then an unknown one."""
    present = st.fixed_dictionaries({k: _often(v, st.none()) for k, v in required.items()}, optional=optional)
    extra = _often(st.just({}), st.fixed_dictionaries({"bogus": TEXT}))
    return st.tuples(present, extra).map(lambda both: {k: v for k, v in {**both[0], **both[1]}.items()
                                                       if v is not None})


@st.composite
def requests_(draw) -> dict:
    kind = draw(st.sampled_from(["infer", "infer", "infer", "upload image", "upload label", "datastore read",
                                 "datastore delete", "info update", "train"]))
    if kind == "infer":
        model = draw(_often(st.sampled_from(["msa", "msa_2d"]), IDS))
        query = draw(_query({"image": _often(st.just(TINY), IDS)},
                            {"output": st.sampled_from(["json", "image", "all", "dicom_seg", "bogus"]),
                             "session_id": TEXT}))
        return {"method": "POST", "path": f"/infer/{model}", "params": query,
                "data": {"params": draw(_body(INFER_PARAMS))}}
    if kind in ("upload image", "upload label"):
        content = draw(st.sampled_from(PAYLOAD_NAMES))
        natural = ".nrrd" if "nrrd" in content else ".nii.gz"
        filename = draw(_often(st.just("x" + natural), st.sampled_from(
            ["x.nii.gz", "x.nii", "x.nrrd", "x.txt", "../../x.nii.gz", "", "名.nii.gz", "x.NII.GZ"])))
        if kind == "upload image":
            path = draw(st.sampled_from(["/datastore/image", "/datastore/"]))
            query = draw(_query({"image": _often(NAMES.filter(lambda i: i != TINY), IDS.filter(lambda i: i != TINY))}, {}))
            fields = _often(st.just("file"), st.sampled_from(["files", "label"]))
        else:
            path = "/datastore/label"
            query = draw(_query({"image": _often(st.just(TINY), IDS)}, {"tag": _often(NAMES, TAGS).filter(lambda t: t != "final")}))
            fields = _often(st.just("label"), st.sampled_from(["file", "labels"]))
        return {"method": "PUT", "path": path, "params": query, "files": {draw(fields): (filename, content)},
                "data": {"params": draw(_body(st.dictionaries(TEXT, JSON, max_size=3)))}}
    if kind == "datastore read":
        method = draw(st.sampled_from(["GET", "GET", "HEAD"]))
        path, required = draw(st.sampled_from([
            ("/datastore/image", {"image": IDS}), ("/datastore/label", {"label": IDS, "tag": TAGS}),
            ("/datastore/image/info", {"image": IDS}), ("/datastore/label/info", {"label": IDS, "tag": TAGS}),
            ("/datastore/", {"output": TEXT}), ("/datastore/dataset", {"limit_cases": TEXT}),
            ("/datastore/image", {"image": IDS, "check_sum": TEXT})]))
        return {"method": method, "path": path, "params": draw(_query(required, {}))}
    if kind == "datastore delete":
        path, required = draw(st.sampled_from([
            ("/datastore/image", {"id": IDS.filter(lambda i: i != TINY)}),
            ("/datastore/", {"id": IDS.filter(lambda i: i != TINY)}),
            ("/datastore/label", {"id": IDS, "tag": TAGS})]))
        return {"method": "DELETE", "path": path, "params": draw(_query(required, {}))}
    if kind == "info update":
        path, required = draw(st.sampled_from([("/datastore/image/info", {"image": _often(st.just(TINY), IDS)}),
                                               ("/datastore/label/info", {"label": IDS, "tag": TAGS})]))
        return {"method": "PUT", "path": path, "params": draw(_query(required, {})),
                "data": {"info": draw(_body(st.dictionaries(TEXT, JSON, max_size=3)))}}
    model = draw(_often(st.just("msa"), IDS))
    query = draw(_query({}, {"run_sync": st.sampled_from(["true", "false", "maybe"]), "enqueue": TEXT}))
    return {"method": "POST", "path": f"/train/{model}", "params": query, "body": draw(_body(TRAIN_PARAMS)).encode(),
            "headers": {"Content-Type": "application/json"}}


PAYLOAD_NAMES = ("tiny image", "tiny image as nrrd", "label on the tiny grid", "label on another grid",
                 "image with a NaN", "2D image", "truncated gzip", "gzip without its trailer", "gzip of text",
                 "random bytes", "text", "empty", "nrrd naming a server file", "nrrd gzip bomb header")


def send(server: Server, session: requests.Session, payloads: Payloads, request: dict) -> requests.Response:
    files = None
    if "files" in request:
        files = {field_: (name, payloads.files[content]) for field_, (name, content) in request["files"].items()}
    return session.request(request["method"], server.url + request["path"], params=request.get("params"),
                           data=request.get("body", request.get("data")), files=files,
                           headers=request.get("headers"), timeout=300)


@pytest.fixture(scope="module")
def session(server: Server):
    with requests.Session() as s:
        yield s


def test_fuzzed_requests_never_fail_the_server_nor_change_the_datastore_when_refused(
        server: Server, session: requests.Session, payloads: Payloads, record_property):
    around = files_under(server.tmp, skip=("studies", "TMP", *LOGS))
    payloads.started = time.monotonic()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(request=requests_())
    def one(request: dict) -> None:
        before = sha256_tree(server.studies)
        answer = send(server, session, payloads, request)
        payloads.stats[answer.status_code] += 1
        payloads.routes["/" + request["path"].split("/")[1]] += 1
        shown = {k: (v if len(str(v)) < 300 else str(v)[:300] + "...") for k, v in request.items()}
        assert answer.status_code < 500, f"{answer.status_code} for {shown}: {answer.text[:300]}"
        if answer.status_code >= 400:
            assert sha256_tree(server.studies) == before, f"refused ({answer.status_code}) but changed: {shown}"
            if request["method"] != "HEAD":
                detail = answer.json().get("detail")
                assert detail and "Traceback" not in answer.text, answer.text[:300]

    one()
    seconds = time.monotonic() - payloads.started
    total = sum(payloads.stats.values())
    record_property("fuzz_requests", total)
    record_property("fuzz_seconds", round(seconds, 1))
    print(f"\nfuzzing: {total} requests in {seconds:.1f} s; by status {dict(sorted(payloads.stats.items()))}; "
          f"by route {dict(payloads.routes)}")
    assert server.alive() and server.info()["name"] == "MSA"
    assert total >= MAX_EXAMPLES // 2, payloads.stats
    created = files_under(server.tmp, skip=("studies", "TMP", *LOGS)) - around
    assert not created, f"files appeared outside the studies folder: {sorted(created)[:20]}"
    deadline = time.monotonic() + 10  # answers' result folders go in a task after each answer
    while (left := [p for p in files_under(server.tmp / "TMP") if TORCH_CACHE not in p]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"left in the server's temp folder: {left[:20]}"
