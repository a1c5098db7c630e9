"""A server started the way an operator opens it up (issue 11), from start-up to SIGTERM:

- `--conf cors_origins http://localhost:3000`: that origin, and only it, may call from a browser,
  without credentials; `--conf allowed_clients 192.168.1.0/24`: that network, and only it, besides
  this machine;
- MONAI Label's start-up scoring switched on, with an unlabeled image in the studies folder: it
  runs inside the server (no second process loading a second model) and its scores stay in
  datastore_v2.json after later writes;
- SIGTERM: the server ends cleanly and leaves nothing in its temp folder.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import requests
from app_helpers import (
    MAIN_ID,
    Server,
    Study,
    files_under,
    read_json,
    start_isolated_server,
    stop_server,
)

ALLOWED = "http://localhost:3000"
LAN = "192.168.1.0/24"
SCORING_TIMEOUT = 240.0
TORCH_CACHE = "torchinductor_"


@pytest.fixture(scope="module")
def server(study: Study, tmp_path_factory: pytest.TempPathFactory):
    running = start_isolated_server(  # the image is unlabeled: start-up scoring scores it
        tmp_path_factory.mktemp("server"), conf={"cors_origins": ALLOWED, "allowed_clients": LAN},
        env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}, studies_files={f"{MAIN_ID}.nii.gz": study.image})
    yield running
    stop_server(running)


def cors_headers(answer: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in answer.headers.items() if k.lower().startswith("access-control-")}


def test_the_named_origin_and_only_it_is_allowed(server: Server):
    preflight = requests.options(f"{server.url}/datastore/label", timeout=30, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "PUT", "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 200, preflight.text[:300]
    headers = cors_headers(preflight)
    assert headers.get("access-control-allow-origin") == ALLOWED, headers
    assert "PUT" in headers.get("access-control-allow-methods", ""), headers
    assert "access-control-allow-credentials" not in headers, headers

    answer = requests.get(f"{server.url}/info/", headers={"Origin": ALLOWED}, timeout=30)
    assert answer.status_code == 200 and cors_headers(answer).get("access-control-allow-origin") == ALLOWED
    assert "access-control-allow-credentials" not in cors_headers(answer)
    # A refusal reaches the allowed page with its reason (readable cross-origin).
    refused = requests.get(f"{server.url}/datastore/image", params={"image": "../x"}, headers={"Origin": ALLOWED},
                           timeout=30)
    assert refused.status_code == 422 and cors_headers(refused).get("access-control-allow-origin") == ALLOWED

    for origin in ("http://evil.example", "http://localhost:3001", "https://localhost:3000", "null"):
        for answer in (requests.get(f"{server.url}/info/", headers={"Origin": origin}, timeout=30),
                       requests.options(f"{server.url}/datastore/label", timeout=30, headers={
                           "Origin": origin, "Access-Control-Request-Method": "PUT"})):
            assert answer.status_code == 403, (origin, answer.status_code, answer.text[:200])
            assert not cors_headers(answer), (origin, answer.headers)


def test_the_named_network_and_only_it_is_served(server: Server):
    """uvicorn reports a reverse proxy's client (X-Forwarded-For from 127.0.0.1) as the client."""
    def status(address: str) -> int:
        return requests.get(f"{server.url}/info/", headers={"X-Forwarded-For": address}, timeout=30).status_code

    assert [status(a) for a in ("192.168.1.20", "192.168.1.254")] == [200, 200]
    assert [status(a) for a in ("192.168.2.20", "10.0.0.8", "not-an-address")] == [403, 403, 403]


def _scoring_processes(server: Server) -> list[str]:
    found = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "monailabel.interfaces.utils.app" in command:
            found.append(command[:200])
    return found


def test_startup_scoring_runs_in_the_server_and_its_scores_stay(server: Server, study: Study):
    deadline = time.monotonic() + SCORING_TIMEOUT
    info, subprocesses = {}, []
    while time.monotonic() < deadline:
        subprocesses += _scoring_processes(server)
        info = requests.get(f"{server.url}/datastore/image/info", params={"image": MAIN_ID}, timeout=30).json()
        if "msa_confidence" in info:
            break
        time.sleep(0.5)
    assert "msa_confidence" in info, f"no score after {SCORING_TIMEOUT} s: {info}\n{server.log_tail()}"
    assert not subprocesses, f"scoring ran in a subprocess (a second model): {subprocesses}"
    loads = [line for line in server.output.read_text(errors="replace").splitlines() if "MSA: loading" in line]
    assert len(loads) == 1, loads  # one model in the server, shared by scoring and inference
    task = requests.get(f"{server.url}/scoring/", timeout=30).json()
    assert task["status"] == "DONE", task

    on_disk = read_json(server.studies / "datastore_v2.json")
    assert on_disk["objects"][MAIN_ID]["image"]["info"]["msa_confidence"] == info["msa_confidence"]
    # Later writes of the server's datastore keep it (they used to write a copy without it).
    answer = requests.put(f"{server.url}/datastore/label", params={"image": MAIN_ID, "tag": "final"},
                          files={"label": ("x.nii.gz", study.spleen.read_bytes())}, timeout=120)
    assert answer.status_code == 200, answer.text[:300]
    on_disk = read_json(server.studies / "datastore_v2.json")
    assert on_disk["objects"][MAIN_ID]["image"]["info"]["msa_confidence"] == info["msa_confidence"]
    assert "final" in on_disk["objects"][MAIN_ID]["labels"]


def test_sigterm_leaves_no_temp_files(server: Server, study: Study):
    temp = server.tmp / "TMP"
    # Leave traces if the server would: an answer sent from a result file, a refused upload.
    answer = requests.post(f"{server.url}/infer/msa_2d", params={"image": MAIN_ID},
                           data={"params": f'{{"foreground": [{study.interior}]}}'}, timeout=300)
    assert answer.status_code == 200, answer.text[:300]
    refused = requests.put(f"{server.url}/datastore/image", params={"image": "cut"}, timeout=60,
                           files={"file": ("x.nii.gz", study.image.read_bytes()[:20_000])})
    assert refused.status_code == 415, refused.text[:300]

    os.killpg(server.process.pid, signal.SIGTERM)
    server.process.wait(timeout=60)
    assert "Application shutdown complete" in server.log_tail(40), server.log_tail(40)
    left = sorted(p for p in files_under(temp) if TORCH_CACHE not in p)
    assert not left, f"left in the server's temp folder after SIGTERM: {left}"
    staging = [p.name for p in server.studies.iterdir() if p.name.startswith((".msa-upload-", ".datastore_v2.json."))]
    assert not staging, staging
    assert not (server.tmp / "sessions").exists(), "a session folder was created"
