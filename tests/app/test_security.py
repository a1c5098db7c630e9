"""The server as a hostile or careless client meets it (issue 11): plain HTTP against a real
`monailabel start_server`, one request per row of the issue's table.

Every refused request must answer a 4xx with a one-line message, change no byte of the studies
folder (sha256 of every file), create nothing outside it (the server's tmp dir, its TMPDIR
included), and leave /info/ answering. The refused infer requests all name a fresh image with a
prompt that would otherwise be valid; the last test shows the encoder never saw that image.

The studies folder also holds `linked.nii.gz`, a symlink to a CT outside it, placed before the
server starts (the way an operator might link data in): names must resolve inside the folder.
"""

from __future__ import annotations

import gzip
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from app_helpers import (
    FRESH_ID,
    MAIN_ID,
    Server,
    Study,
    files_under,
    sha256_tree,
    start_server,
    stop_server,
)

LINKED_ID = "linked"
LOGS = ("app.log", "server.out", "logging.json")  # written by every request: not evidence of an escape
TORCH_CACHE = "torchinductor_"  # torch's own cache folder, created by imports, shared by design


@pytest.fixture(scope="module")
def server(study: Study, tmp_path_factory: pytest.TempPathFactory):
    """This module's server: its studies folder holds a symlink to a file outside it; its TMPDIR is
    a folder of its own, so a temp file left behind shows."""
    tmp = tmp_path_factory.mktemp("server")
    studies, outside, temp = tmp / "studies", tmp / "outside", tmp / "TMP"
    for folder in (studies, outside, temp):
        folder.mkdir()
    shutil.copy(study.image, outside / "secret.nii.gz")
    (studies / f"{LINKED_ID}.nii.gz").symlink_to(outside / "secret.nii.gz")
    running = start_server(tmp, studies, tmp / "model", env={"TMPDIR": str(temp)})
    yield running
    stop_server(running)


@dataclass
class Context:
    server: Server
    study: Study

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def ctx(server: Server, study: Study) -> Context:
    """The main image with its final spleen label, and a fresh image nobody has encoded."""
    for image_id, path in ((MAIN_ID, study.image), (FRESH_ID, study.fresh)):
        answer = put_image(Context(server, study), image_id, path.read_bytes())
        assert answer.status_code == 200 and answer.json() == {"image": image_id}, answer.text[:300]
    answer = put_label(Context(server, study), MAIN_ID, "final", study.spleen.read_bytes())
    assert answer.status_code == 200, answer.text[:300]
    return Context(server, study)


# -- requests -------------------------------------------------------------------------------------------

def put_image(c: Context, image_id: str | None, content: bytes, filename: str = "x.nii.gz",
              headers: dict | None = None) -> requests.Response:
    query = {"image": image_id} if image_id is not None else {}
    return requests.put(f"{c.url}/datastore/image", params=query, files={"file": (filename, content)},
                        data={"params": "{}"}, headers=headers, timeout=120)


def put_label(c: Context, image_id: str, tag: str, content: bytes, filename: str = "x.nii.gz") -> requests.Response:
    return requests.put(f"{c.url}/datastore/label", params={"image": image_id, "tag": tag},
                        files={"label": (filename, content)}, data={"params": "{}"}, timeout=120)


def infer(c: Context, model: str, image: str, params: dict | str, **query) -> requests.Response:
    text = params if isinstance(params, str) else json.dumps(params)
    return requests.post(f"{c.url}/infer/{model}", params={"image": image, **query}, data={"params": text},
                         timeout=300)


def fresh_roi(c: Context, **extra) -> dict:
    """A prompt that WOULD segment the fresh image: on an unhardened server, it encodes 4 slices."""
    return {"roi": c.study.fresh_roi, "label": "spleen", **extra}


def truncated(path: Path, keep: int) -> bytes:
    data = path.read_bytes()
    assert len(data) > keep
    return data[:keep]


def expect_refused(c: Context, status: int, send) -> requests.Response:
    """`send()` is answered `status` with a message, and changes nothing anywhere."""
    studies_before = sha256_tree(c.server.studies)
    around_before = files_under(c.server.tmp, skip=("studies", *LOGS))
    answer = send()
    assert answer.status_code == status, f"expected {status}, got {answer.status_code}: {answer.text[:400]}"
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
    detail = answer.json().get("detail")
    assert isinstance(detail, str) and len(detail) > 10, answer.text[:400]
    assert "Traceback" not in answer.text and "\n" not in detail, detail
    assert sha256_tree(c.server.studies) == studies_before, "the studies folder changed"
    created = files_under(c.server.tmp, skip=("studies", *LOGS)) - around_before
    assert not {p for p in created if TORCH_CACHE not in p}, f"files appeared outside the studies folder: {created}"
    assert c.server.info()["name"] == "MSA"
    return answer


# -- the table of issue 11, row by row ------------------------------------------------------------------

def _big_int_point(c: Context) -> str:
    _, j, k = c.study.interior
    return f'{{"foreground": [[{"9" * 400}, {j}, {k}]]}}'


ROWS = {  # name: (expected status, request)
    # ids and tags are names, never paths
    "upload image id ../escape_img": (422, lambda c: put_image(c, "../escape_img", c.study.fresh.read_bytes())),
    "download image id ../escape_img": (422, lambda c: requests.get(
        f"{c.url}/datastore/image", params={"image": "../escape_img"}, timeout=30)),
    "label tag ../../escape_tag": (422, lambda c: put_label(c, MAIN_ID, "../../escape_tag",
                                                            c.study.spleen.read_bytes())),
    "infer save_label with tag ../../escape_infer": (422, lambda c: infer(
        c, "msa", FRESH_ID, fresh_roi(c, save_label=True, label_tag="../../escape_infer"))),
    # infer takes datastore ids only
    "infer image= a readable CT outside the studies folder": (422, lambda c: infer(
        c, "msa", str(c.server.tmp / "outside" / "secret.nii.gz"), fresh_roi(c))),
    "infer image= the datastore file's own path": (422, lambda c: infer(
        c, "msa", str(c.server.studies / f"{FRESH_ID}.nii.gz"), fresh_roi(c))),
    "infer with image inside params": (422, lambda c: infer(
        c, "msa", FRESH_ID, fresh_roi(c, image=str(c.server.tmp / "outside" / "secret.nii.gz")))),
    # uploads are decoded in full before they are stored
    "truncated gzip NIfTI image (first 20 kB)": (415, lambda c: put_image(
        c, "truncated", truncated(c.study.image, 20_000))),
    "truncated gzip NIfTI label": (415, lambda c: put_label(
        c, MAIN_ID, "final", truncated(c.study.spleen, len(c.study.spleen.read_bytes()) // 2))),
    "gzip NIfTI whose stream ends early (CRC cut off)": (415, lambda c: put_image(
        c, "cut_trailer", c.study.fresh.read_bytes()[:-4])),
    "NRRD whose header names a server file": (415, lambda c: put_image(
        c, "datafile", b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 1\nencoding: raw\n"
                       b"data file: /etc/hostname\n\n", filename="x.nrrd")),
    # params that gave 500s (8 cases)
    "roi of strings": (422, lambda c: infer(c, "msa", FRESH_ID, {"roi": ["a", "b", "c", "d", "e", "f"]})),
    "roi null": (422, lambda c: infer(c, "msa", FRESH_ID, {"roi": None, "foreground": [[5, 5, 1]]})),
    "roi with a null": (422, lambda c: infer(c, "msa", FRESH_ID, {"roi": c.study.fresh_roi[:5] + [None]})),
    "point with a 400-digit integer": (422, lambda c: infer(c, "msa", FRESH_ID, _big_int_point(c))),
    "params not JSON": (422, lambda c: infer(c, "msa", FRESH_ID, "{'roi': [1, 2")),
    "params a JSON list": (422, lambda c: infer(c, "msa", FRESH_ID, "[1, 2, 3]")),
    "msa_2d slice null": (422, lambda c: infer(c, "msa_2d", FRESH_ID, fresh_roi(c, slice=None))),
    "msa_2d slice 'abc'": (422, lambda c: infer(c, "msa_2d", FRESH_ID, fresh_roi(c, slice="abc"))),
    # checked before the work, not after 40 s of it
    "result_extension /../../evil.nii.gz": (422, lambda c: infer(
        c, "msa", FRESH_ID, fresh_roi(c, result_extension="/../../evil.nii.gz"))),
    "result_extension .txt": (422, lambda c: infer(c, "msa", FRESH_ID, fresh_roi(c, result_extension=".txt"))),
    # MONAI Label's own routes
    "infer with empty image=": (422, lambda c: infer(c, "msa", "", fresh_roi(c))),
    "delete image id nosuch": (404, lambda c: requests.delete(f"{c.url}/datastore/image", params={"id": "nosuch"},
                                                              timeout=30)),
    "upload image id sub/dir": (422, lambda c: put_image(c, "sub/dir", c.study.fresh.read_bytes())),
    "PUT /model/msa with garbage": (405, lambda c: requests.put(
        f"{c.url}/model/msa", files={"file": ("x.pt", b"\x00garbage" * 100)}, timeout=30)),
    # training params checked up front
    "train steps 'abc'": (422, lambda c: requests.post(f"{c.url}/train/msa", json={"steps": "abc"}, timeout=30)),
    "train steps -3": (422, lambda c: requests.post(f"{c.url}/train/msa", json={"steps": -3}, timeout=30)),
    # sessions: the app does not use them, so they are refused (nothing stored in a cache folder)
    "session upload": (404, lambda c: requests.put(f"{c.url}/session/", files={"files": ("a.bin", b"x" * 4096)},
                                                   timeout=30)),
    # a name that resolves outside the studies folder (symlink)
    "download a symlinked image": (403, lambda c: requests.get(
        f"{c.url}/datastore/image", params={"image": LINKED_ID}, timeout=30)),
    "infer on a symlinked image": (403, lambda c: infer(c, "msa", LINKED_ID, fresh_roi(c))),
    "delete a symlinked image": (403, lambda c: requests.delete(
        f"{c.url}/datastore/image", params={"id": LINKED_ID}, timeout=30)),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_refused_with_a_4xx_and_nothing_changes(row: str, ctx: Context):
    status, send = ROWS[row]
    answer = expect_refused(ctx, status, lambda: send(ctx))
    if row.startswith("train"):
        assert "steps" in answer.json()["detail"], answer.text


def test_server_paths_get_one_answer_whether_or_not_the_file_exists(ctx: Context):
    """/etc/passwd was 422 and a missing path 404: an oracle for which files exist on the server."""
    answers = [expect_refused(ctx, 422, lambda p=path: infer(ctx, "msa", p, fresh_roi(ctx)))
               for path in ("/etc/passwd", "/nonexistent/x.nii.gz")]
    details = [a.json()["detail"].replace("/etc/passwd", "P").replace("/nonexistent/x.nii.gz", "P") for a in answers]
    assert details[0] == details[1], details


def test_refused_training_left_no_task_and_no_record(ctx: Context):
    """The refused runs were never submitted: no train task, /info/ shows no run."""
    assert requests.get(f"{ctx.url}/train/", timeout=30).status_code == 404  # "no train tasks found"
    assert ctx.server.info()["train_stats"]["msa"] == {}


def test_the_symlink_target_is_intact(ctx: Context):
    target = ctx.server.tmp / "outside" / "secret.nii.gz"
    assert target.is_file() and target.read_bytes() == ctx.study.image.read_bytes()


def test_foreign_browser_origins_get_no_cors_allowance(ctx: Context):
    """By default no origin is allowed: a page elsewhere can neither read nor write."""
    for origin in ("http://evil.example", "http://localhost:3000", "null"):
        answer = expect_refused(ctx, 403, lambda o=origin: requests.get(f"{ctx.url}/info/", headers={"Origin": o},
                                                                          timeout=30))
        assert not [h for h in answer.headers if h.lower().startswith("access-control-")], answer.headers
        preflight = expect_refused(ctx, 403, lambda o=origin: requests.options(
            f"{ctx.url}/datastore/image", headers={"Origin": o, "Access-Control-Request-Method": "PUT"}, timeout=30))
        assert not [h for h in preflight.headers if h.lower().startswith("access-control-")], preflight.headers
    # The write itself is refused, not only the reading of its answer (a form POST needs no preflight).
    expect_refused(ctx, 403, lambda: put_image(ctx, "from_a_page", ctx.study.fresh.read_bytes(),
                                               headers={"Origin": "http://evil.example"}))
    expect_refused(ctx, 403, lambda: requests.get(f"{ctx.url}/info/", headers={"Sec-Fetch-Site": "cross-site"},
                                                  timeout=30))
    # DNS rebinding: a page whose own name now points here sends its name as Host.
    expect_refused(ctx, 400, lambda: requests.get(f"{ctx.url}/info/", headers={"Host": "evil.example"}, timeout=30))


def test_other_machines_are_refused_by_default(ctx: Context):
    """Only this machine may call unless the operator names networks (MONAI Label listens on 0.0.0.0
    by default). Another machine is simulated the way a reverse proxy on this machine reports one:
    uvicorn takes the client address from X-Forwarded-For when the peer is 127.0.0.1."""
    answer = expect_refused(ctx, 403, lambda: requests.get(
        f"{ctx.url}/info/", headers={"X-Forwarded-For": "192.168.1.20"}, timeout=30))
    assert "allowed_clients" in answer.json()["detail"], answer.text
    expect_refused(ctx, 403, lambda: put_image(ctx, "from_the_lan", ctx.study.fresh.read_bytes(),
                                               headers={"X-Forwarded-For": "192.168.1.20"}))


def test_refused_infers_encoded_nothing(ctx: Context):
    """Every refused infer above named the fresh image with a prompt that would have worked: the
    first real request on it still encodes every slice of the ROI (nothing ran before)."""
    started = time.monotonic()
    answer = infer(ctx, "msa", FRESH_ID, fresh_roi(ctx), output="json")
    assert answer.status_code == 200, answer.text[:400]
    k0, k1 = ctx.study.fresh_roi[4:6]
    assert answer.json()["encoder_passes"] == k1 - k0 + 1, (answer.json(), time.monotonic() - started)
    assert _result_folder_goes(ctx), files_under(ctx.server.tmp / "TMP")


def _result_folder_goes(ctx: Context, timeout: float = 10) -> bool:
    """The answer's folder is removed by a background task just after the answer is sent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in files_under(ctx.server.tmp / "TMP") if "msa-result-" in p]:
            return True
        time.sleep(0.2)
    return False


def test_error_messages_do_not_leak_server_paths(ctx: Context):
    answer = expect_refused(ctx, 415, lambda: put_image(ctx, "gz", gzip.compress(b"not a nifti" * 100)))
    assert str(ctx.server.studies) not in answer.text and "/tmp" not in answer.text, answer.text


# -- an image replaced under its id keeps its labels in line --------------------------------------------

def test_an_image_on_another_grid_does_not_replace_one_with_labels(ctx: Context):
    """The main image has a final label on its 122 x 101 x 8 grid: an upload of the 4-slice CT
    under its id would leave that label on no image's grid. Refused; nothing changes."""
    answer = expect_refused(ctx, 422, lambda: put_image(ctx, MAIN_ID, ctx.study.fresh.read_bytes()))
    assert "final" in answer.json()["detail"] and "grid" in answer.json()["detail"], answer.text
    label = requests.get(f"{ctx.url}/datastore/label", params={"label": MAIN_ID, "tag": "final"}, timeout=60)
    assert label.status_code == 200 and label.content == ctx.study.spleen.read_bytes()


def test_an_image_on_the_same_grid_replaces_the_old_one_and_keeps_its_labels(ctx: Context, tmp_path: Path):
    """Same id, same grid (here the same CT as a NIfTI without compression): the image is replaced,
    the final label stays, on disk and in the datastore's record (it used to vanish from the record
    while its file stayed, to come back at the next start)."""
    import SimpleITK as sitk

    uncompressed = tmp_path / "same_grid.nii"
    sitk.WriteImage(sitk.ReadImage(str(ctx.study.image)), str(uncompressed), useCompression=False)
    answer = put_image(ctx, MAIN_ID, uncompressed.read_bytes(), filename="x.nii")
    assert answer.status_code == 200, answer.text[:300]
    assert (ctx.server.studies / f"{MAIN_ID}.nii").is_file() and not (ctx.server.studies / f"{MAIN_ID}.nii.gz").exists()
    label = requests.get(f"{ctx.url}/datastore/label", params={"label": MAIN_ID, "tag": "final"}, timeout=60)
    assert label.status_code == 200 and label.content == ctx.study.spleen.read_bytes(), label.text[:300]
    record = json.loads((ctx.server.studies / "datastore_v2.json").read_text())["objects"][MAIN_ID]
    assert record["image"]["ext"] == ".nii" and "final" in record["labels"], record
    listed = requests.get(f"{ctx.url}/datastore/", params={"output": "all"}, timeout=60).json()
    assert "final" in listed["objects"][MAIN_ID]["labels"], listed["objects"][MAIN_ID]
