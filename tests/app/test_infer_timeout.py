"""An inference that runs past MONAI_LABEL_INFER_TIMEOUT, against a real server.

MONAI Label runs infer tasks on a thread pool when MONAI_LABEL_INFER_CONCURRENCY >= 0 and waits
MONAI_LABEL_INFER_TIMEOUT seconds for each. The wait's TimeoutError used to become a bare 500. Now:
503 with one line; the inference, which cannot be stopped, finishes on its own and its result is
discarded (no label saved, nothing left in the temp folder). A timeout of 0 makes every wait time
out, whatever the machine's speed.
"""

from __future__ import annotations

import json
import time

import pytest
import requests
from app_helpers import MAIN_ID, Server, Study, files_under, sha256_tree, start_isolated_server, stop_server

DISCARDED = "discarded the result of an inference that finished after its request timed out"
LATE_TIMEOUT = 600.0  # for the inference that goes on after the 503 (a CPU shared with other work)


@pytest.fixture(scope="module")
def server(study: Study, tmp_path_factory: pytest.TempPathFactory):
    running = start_isolated_server(tmp_path_factory.mktemp("server"), env={
        "MONAI_LABEL_INFER_CONCURRENCY": "1", "MONAI_LABEL_INFER_TIMEOUT": "0"})
    answer = requests.put(f"{running.url}/datastore/image", params={"image": MAIN_ID}, timeout=120,
                          files={"file": ("x.nii.gz", study.image.read_bytes())})
    assert answer.status_code == 200, answer.text[:300]
    yield running
    stop_server(running)


def test_an_inference_past_the_timeout_is_answered_503_and_its_late_result_discarded(server: Server, study: Study):
    before = sha256_tree(server.studies)
    params = {"foreground": [study.interior], "save_label": True, "label_tag": "late"}
    answer = requests.post(f"{server.url}/infer/msa_2d", params={"image": MAIN_ID},
                           data={"params": json.dumps(params)}, timeout=120)
    assert answer.status_code == 503, f"{answer.status_code} {answer.text[:400]}\n{server.log_tail(30)}"
    detail = answer.json()["detail"]
    assert "MONAI_LABEL_INFER_TIMEOUT" in detail and "\n" not in detail and "Traceback" not in answer.text, detail
    assert server.info()["name"] == "MSA"

    deadline = time.monotonic() + LATE_TIMEOUT  # the inference goes on; wait for it to end
    while DISCARDED not in server.output.read_text(errors="replace"):
        assert server.alive() and time.monotonic() < deadline, server.log_tail(30)
        time.sleep(0.5)
    left = [p for p in files_under(server.tmp / "TMP") if "msa-result-" in p]
    assert not left, f"the late result was left in the temp folder: {left}"
    assert sha256_tree(server.studies) == before, "the late result changed the datastore (save_label)"
