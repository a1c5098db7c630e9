"""The MSA MONAI Label app served for real: `monailabel start_server` in a subprocess, driven with
MONAI Label's own client (and plain HTTP where the client has no call for it).

One server for the module (see conftest.py). The tests run in file order and share its state:
the main image is encoded by the first request, then served from the embedding cache; it gets its
final label before training; the bad-input tests run while nothing else touches the studies
folder. Every test that needs state asks for it through a fixture, so each also runs alone.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

from app_helpers import COPY_ID, DRAFT, PUBLISHED, SPLEEN, read_json, snapshot, status_of, wait_for_scores

TRAIN_TIMEOUT = 300.0


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_mask(path: Path) -> np.ndarray:
    """A label file as an (i, j, k) array, nibabel's order (the voxel indices the prompts use)."""
    return np.asarray(nib.load(str(path)).dataobj)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def shipped_adapters() -> Path:
    from msa.modeling.build import default_adapters

    return Path(default_adapters("lite_medsam", False))


def training_processes(server) -> list[psutil.Process]:
    """Live (not zombie) training subprocesses of the server."""
    found = []
    for p in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "monailabel.interfaces.utils.app" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def train_task_done(client: MONAILabelClient, server, timeout: float = TRAIN_TIMEOUT) -> dict:
    """Polls GET /train/ until the latest task leaves SUBMITTED / RUNNING; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.train_status()
        if task.get("status") not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(1)
    raise AssertionError(f"training still runs after {timeout} s: {client.train_status()}\n{server.log_tail()}")


# -- 1. what the app serves ---------------------------------------------------------------------

def test_info_lists_infer_train_and_strategies(server, client):
    info = client.info()
    models = info["models"]
    assert models["msa"]["type"] == "deepgrow" and models["msa"]["dimension"] == 3, models["msa"]
    assert models["msa_2d"]["type"] == "deepgrow" and models["msa_2d"]["dimension"] == 2, models["msa_2d"]
    for name in ("msa", "msa_2d"):
        assert "spleen" in models[name]["labels"], models[name]["labels"]
    assert "msa" in info["trainers"], info["trainers"]
    assert {"random", "first", "uncertainty"} <= set(info["strategies"]), info["strategies"]
    assert "msa_confidence" in info["scoring"], info["scoring"]
    assert "spleen" in info["labels"]


# -- 2, 3. 3D inference, then the embedding cache -----------------------------------------------

def test_roi_segments_the_spleen_on_the_image_grid(first_result, study):
    path, params = first_result
    result, image = nib.load(str(path)), nib.load(str(study.image))
    assert result.shape == image.shape == (122, 101, 8)
    np.testing.assert_allclose(result.affine, image.affine, atol=1e-4)
    mask = np.asarray(result.dataobj)
    assert set(np.unique(mask).tolist()) <= {0, 1}, np.unique(mask)
    reference = read_mask(study.spleen)
    score = dice(mask, reference)
    assert score >= 0.85, f"Dice {score:.3f} with the spleen ROI {study.roi}"
    assert params["encoder_passes"] == 8, params  # the first request encodes every slice of the ROI
    assert params["label_names"] == {"spleen": 1}, params
    assert params["backbone"] == "lite_medsam", params
    assert params["slices"] == int(mask.any(axis=(0, 1)).sum()), params
    assert params["adapters_sha256"] == sha256(shipped_adapters()), params  # nothing trained yet
    assert params["latency_ms"] > 0, params


def test_second_request_is_served_from_the_embedding_cache(client, first_result, main_image, study):
    path, params = client.infer("msa", main_image, {"foreground": [study.interior], "label": "spleen"})
    assert params["encoder_passes"] == 0, params
    mask = read_mask(Path(path))
    i, j, k = study.interior
    assert mask.any() and mask[i, j, k] == 1, f"{mask.sum()} voxels; the clicked voxel {study.interior} unset"


def test_infer_output_query_parameter(server, first_result, main_image, study):
    """MONAI Label's ?output= (json / image / all) works on the re-registered route; a bad value is a 422."""
    url = f"{server.url}/infer/msa"
    form = {"params": json.dumps({"foreground": [study.interior], "label": "spleen"})}
    answer = requests.post(url, params={"image": main_image, "output": "json"}, data=form, timeout=300)
    assert answer.status_code == 200, answer.text[:400]
    assert answer.json()["label_names"] == {"spleen": 1}
    answer = requests.post(url, params={"image": main_image, "output": "image"}, data=form, timeout=300)
    assert answer.status_code == 200 and answer.content[:2] == b"\x1f\x8b", answer.text[:400]  # .nii.gz
    answer = requests.post(url, params={"image": main_image, "output": "bogus"}, data=form, timeout=60)
    assert answer.status_code == 422, answer.text[:400]
    assert server.alive() and server.info()


# -- 4, 5. the server while it infers -----------------------------------------------------------

@pytest.fixture
def long_image(server, client, data_dir: Path, tmp_path: Path):
    """The CT's last 11 slices (19..29, the spleen on each), as an image nobody has encoded, and the spleen's
    ROI on it: a request long enough (11 encoder passes) on any machine to ask something while it runs.
    Deleted afterwards: the next-sample tests count the unlabeled images."""
    import SimpleITK as sitk

    path = tmp_path / "long.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "ct_abdomen.nii.gz"))[:, :, 19:30], str(path))
    spleen = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "ct_abdomen_labels.nii.gz")))[19:30] == SPLEEN
    assert spleen.any(axis=(1, 2)).all()
    k, j, i = np.nonzero(spleen)
    assert client.upload_image(str(path), image_id="ct_long")["image"] == "ct_long"
    yield "ct_long", [int(i.min()), int(i.max()), int(j.min()), int(j.max()), 0, 10]
    assert requests.delete(f"{server.url}/datastore/image", params={"id": "ct_long"}, timeout=30).status_code == 200


def test_info_answers_while_an_inference_runs(server, client, long_image):
    outcome: dict = {}
    image_id, roi = long_image

    def infer() -> None:
        try:
            outcome["params"] = client.infer("msa", image_id, {"roi": roi, "label": "spleen"})[1]
        except Exception as exc:  # reported by the main thread
            outcome["error"] = exc
        outcome["end"] = time.monotonic()

    thread = threading.Thread(target=infer)
    started = time.monotonic()
    thread.start()
    time.sleep(1.0)  # the request is in: it encodes 11 new slices (about 0.4 s each in OpenVINO here, 2 s in PyTorch)
    asked = time.monotonic()
    info = requests.get(f"{server.url}/info/", timeout=120)
    answered = time.monotonic()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the inference did not finish within 300 s"
    assert "error" not in outcome, outcome.get("error")
    assert info.status_code == 200
    assert outcome["params"]["encoder_passes"] == 11, outcome["params"]  # it really encoded: a long request
    assert answered - asked < 5.0, f"/info/ took {answered - asked:.1f} s during an inference"
    assert answered < outcome["end"] - 1.0, (
        f"/info/ answered {answered - started:.1f} s after the infer started, the infer ended at "
        f"{outcome['end'] - started:.1f} s: /info/ waited for the inference")


def test_concurrent_identical_requests_agree(server, client, first_result, main_image, study, tmp_path):
    params = {"foreground": [study.interior], "roi": study.roi, "label": "spleen"}
    reference_path, _ = client.infer("msa", main_image, dict(params))
    reference = read_mask(Path(reference_path))

    def one(n: int):
        (tmp_path / f"client{n}").mkdir()
        own = MONAILabelClient(server.url, tmpdir=str(tmp_path / f"client{n}"))
        path, out = own.infer("msa", main_image, dict(params))
        return read_mask(Path(path)), out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8)))
    assert reference.any()
    for n, (mask, out) in enumerate(results):
        assert out["encoder_passes"] == 0, out
        np.testing.assert_array_equal(mask, reference, err_msg=f"concurrent request {n} differs")
    assert server.info()  # still serving


# -- 6. one slice ------------------------------------------------------------------------------

def test_msa_2d_segments_only_the_clicked_slice(client, first_result, main_image, study):
    i, j, k = study.interior
    path, params = client.infer("msa_2d", main_image, {"foreground": [study.interior], "label": "spleen"})
    mask = read_mask(Path(path))
    assert mask.shape == (122, 101, 8)
    assert mask[:, :, k].any() and mask[i, j, k] == 1, "nothing on the clicked slice"
    others = [kk for kk in range(mask.shape[2]) if kk != k and mask[:, :, kk].any()]
    assert not others, f"msa_2d wrote voxels on slices {others} besides {k}"
    assert params["slices"] == 1, params
    # An explicit `slice` wins over the first click's k: only the click on that slice counts.
    other = k - 1 if k > 0 else k + 1
    path, _ = client.infer("msa_2d", main_image, {"foreground": [study.interior, [i, j, other]], "slice": other})
    mask = read_mask(Path(path))
    assert [kk for kk in range(mask.shape[2]) if mask[:, :, kk].any()] == [other]


def test_a_click_that_names_the_spleen(server, client, first_result, main_image, study):
    """`text` names the structure (a target prompt of the shipped adapters, listed by /info/): the named click
    is a session of its own (a plain click's session is not reused) and gives more of the spleen on that slice
    than the plain click (measured: Dice 0.842 named, 0.723 plain)."""
    assert "spleen" in client.info()["msa"]["targets"]
    k = study.interior[2]
    reference = read_mask(study.spleen)[:, :, k]
    plain_path, _ = client.infer("msa_2d", main_image, {"foreground": [study.interior], "label": "spleen"})
    path, params = client.infer("msa_2d", main_image, {"foreground": [study.interior], "label": "spleen",
                                                       "text": "Spleen"})
    assert params["session"] == "new" and params["encoder_passes"] == 0, params
    named, plain = read_mask(Path(path))[:, :, k], read_mask(Path(plain_path))[:, :, k]
    scores = dice(named, reference), dice(plain, reference)
    assert scores[0] >= 0.8 and scores[0] >= scores[1] + 0.05, scores


# -- 7. labels and active learning ------------------------------------------------------------

def test_saved_label_and_next_sample_strategies(server, client, labeled, fresh_image, study):
    datastore = client.datastore()
    assert "final" in datastore["objects"][labeled]["labels"], datastore["objects"][labeled]
    saved = server.studies / "labels" / "final" / f"{labeled}.nii.gz"
    np.testing.assert_array_equal(read_mask(saved), read_mask(study.spleen))
    # A second unlabeled image: same content as the main one (cached embeddings, cheap to score).
    assert client.upload_image(str(study.image), image_id=COPY_ID)["image"] == COPY_ID
    unlabeled = {fresh_image, COPY_ID}

    first = client.next_sample("first", {})
    assert first.get("id") == sorted(unlabeled)[0], first
    # Once: MONAI Label's Random weighs images by the seconds since it last served them, and
    # answers 500 when every unlabeled image was served within the current second.
    picked = client.next_sample("random", {})
    assert picked.get("id") in unlabeled, picked

    # uncertainty never scores inside the request: the first answer is random while the scoring
    # thread scores the unlabeled images; once they carry the served adapters' scores, it ranks them.
    picked = client.next_sample("uncertainty", {})
    assert picked.get("id") in unlabeled, picked
    assert picked.get("selection", "").startswith("random"), picked
    found = wait_for_scores(server, sorted(unlabeled), server.info()["msa"]["adapters_sha256"])
    scores = {image_id: score["confidence"] for image_id, score in found.items()}
    assert all(0.0 <= score <= 1.0 + 1e-6 for score in scores.values()), found
    picked = client.next_sample("uncertainty", {})
    assert picked["id"] == min(scores, key=scores.get), (picked, scores)
    assert "msa_confidence" not in client.datastore()["objects"][labeled]["image"]["info"]  # labeled: not scored


# -- 9. user mistakes: 4xx, the server keeps serving, nothing written ---------------------------

def _infer(prompt):
    return lambda c, image, s: c.infer("msa", image, prompt)


BAD_INPUTS = {  # name: (call(client, image id, study), expected status)
    "point outside the image": (_infer({"foreground": [[500, 500, 3]], "label": "spleen"}), 422),
    "roi of 5 numbers": (_infer({"roi": [10, 33, 22, 56, 0], "label": "spleen"}), 422),
    "unknown label": (_infer({"foreground": [[20, 40, 4]], "label": "not_an_organ"}), 422),
    "unknown target name": (_infer({"foreground": [[20, 40, 4]], "text": "not_an_organ"}), 422),
    "unknown model": (lambda c, image, s: c.infer("no_such_model", image, {"foreground": [[20, 40, 4]]}), 404),
    "unknown image id": (lambda c, image, s: c.infer("msa", "no_such_image", {"foreground": [[20, 40, 4]]}), 404),
    "text file uploaded as x.nii.gz": (lambda c, image, s: c.upload_image(str(s.text), image_id="x"), 415),
    "label of the wrong size": (lambda c, image, s: c.save_label(image, str(s.wrong_size)), 422),
    "label of garbage bytes": (lambda c, image, s: c.save_label(image, str(s.garbage)), 415),
    "label for an unknown image": (lambda c, image, s: c.save_label("no_such_image", str(s.spleen)), 404),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_and_changes_nothing(case, server, client, main_image, study):
    server.wait_until_idle()
    call, expected = BAD_INPUTS[case]
    before = snapshot(server.studies)
    with pytest.raises(MONAILabelClientException) as raised:
        call(client, main_image, study)
    assert status_of(raised.value) == expected, f"{case}: {raised.value.msg[:400]}"
    assert server.alive() and server.info()
    after = snapshot(server.studies)
    assert sorted(after) == sorted(before), f"{case}: files {sorted(set(after) ^ set(before))}"
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"{case} changed {changed}"


# -- 8. training --------------------------------------------------------------------------------

def test_training_publishes_adapters_that_inference_picks_up(server, client, labeled, main_image, study):
    server.wait_until_idle()
    published, stats_file = server.model_dir / PUBLISHED, server.model_dir / "train_stats.json"
    prompt = {"foreground": [study.interior], "label": "spleen"}
    before = client.infer("msa", main_image, prompt)[1]["adapters_sha256"]

    response = requests.post(f"{server.url}/train/msa", params={"run_sync": "true"},
                             json={"steps": 4, "batch_size": 2, "eval_every": 2}, timeout=TRAIN_TIMEOUT)
    assert response.status_code == 200, f"{response.status_code} {response.text[:400]}\n{server.log_tail()}"
    assert published.is_file(), sorted(p.name for p in server.model_dir.iterdir())
    assert not (server.model_dir / DRAFT).exists()
    assert not (server.model_dir / "msa_adapters.pt").exists()  # the name before files were keyed by backbone
    stats = read_json(stats_file)
    assert stats.get("status") == "DONE" and stats.get("step") == 4, stats
    assert client.info()["train_stats"]["msa"]["status"] == "DONE"
    trained = sha256(published)

    path, params = client.infer("msa", main_image, prompt)
    assert params["adapters_sha256"] == trained != before, (params, trained, before)
    assert read_mask(Path(path)).any()
    assert params["encoder_passes"] == 0, params  # decoder-side adapters: the cached embeddings still apply

    # The same in the background: a subprocess, polled through GET /train/.
    task = client.train_start("msa", {"steps": 4, "batch_size": 2, "eval_every": 2})
    assert task.get("status") in ("SUBMITTED", "RUNNING"), task
    task = train_task_done(client, server)
    assert task["status"] == "DONE", f"{task}\n{server.log_tail()}"
    stats2 = read_json(stats_file)
    assert stats2.get("status") == "DONE" and stats2["start_ts"] > stats["start_ts"], (stats, stats2)
    retrained = sha256(published)
    assert retrained != trained, "the background run did not publish new adapters"
    assert client.info()["train_stats"]["msa"]["start_ts"] == stats2["start_ts"]
    assert client.infer("msa", main_image, prompt)[1]["adapters_sha256"] == retrained


# -- 10. a training run killed midway --------------------------------------------------------------

def test_killed_training_leaves_the_published_adapters_intact(server, client, labeled, main_image, study):
    server.wait_until_idle()
    published, draft = server.model_dir / PUBLISHED, server.model_dir / DRAFT
    stats_file = server.model_dir / "train_stats.json"
    before = published.read_bytes() if published.is_file() else None
    old_stats = read_json(stats_file)

    task = client.train_start("msa", {"steps": 500, "batch_size": 2, "eval_every": 1})
    assert task.get("status") in ("SUBMITTED", "RUNNING"), task
    deadline = time.monotonic() + TRAIN_TIMEOUT
    while True:  # midway: this run reports progress (eval_every 1: its first draft is written by then)
        stats = read_json(stats_file)
        if (stats.get("status") == "RUNNING" and stats.get("start_ts") != old_stats.get("start_ts")
                and stats.get("step", 0) >= 1):
            break
        task = client.train_status()
        assert task.get("status") in ("SUBMITTED", "RUNNING"), f"{task}\n{server.log_tail()}"
        assert time.monotonic() < deadline, f"no draft / RUNNING stats after {TRAIN_TIMEOUT} s: {stats}"
        time.sleep(0.5)
    assert 1 <= stats["step"] < 500, stats
    assert draft.is_file(), "no draft adapters after the first evaluation"  # what a kill must not publish

    stopped = client.train_stop()
    assert stopped and stopped.get("status") == "STOPPED", stopped
    server.wait_until_idle(timeout=60)
    assert not training_processes(server), "training processes left after the stop"
    time.sleep(2)  # nothing may publish after the kill either
    assert client.train_status()["status"] == "STOPPED"
    # /info/ must not report the killed run as still running (its stats file stopped at RUNNING)
    assert client.info()["train_stats"]["msa"]["status"] == "STOPPED", client.info()["train_stats"]
    if before is None:
        assert not published.exists(), "a killed run published adapters"
    else:
        assert published.read_bytes() == before, "a killed run changed the published adapters"
    expected = hashlib.sha256(before).hexdigest() if before is not None else sha256(shipped_adapters())
    path, params = client.infer("msa", main_image, {"foreground": [study.interior], "label": "spleen"})
    assert params["adapters_sha256"] == expected, params
    assert read_mask(Path(path)).any()
