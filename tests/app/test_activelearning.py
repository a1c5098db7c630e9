"""Active learning by the model's confidence (issue 14 item 5): scores keyed by the adapters that
made them, computed on the scoring thread (never inside the next-sample request), probed where the
model itself is confident.

The server starts with two unlabeled images: the crop, holding a score left by other adapters
(very low confidence: ranked, it would always win), and the fresh slices, holding none. MONAI
Label's automatic scoring is off (app_helpers.server_env): scoring runs only when `uncertainty`
asks for it.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from app_helpers import APP_DIR, FRESH_ID, MAIN_ID, Server, Study, start_isolated_server, stop_server, wait_for_scores

STALE = {"confidence": 0.001, "entropy": 0.69, "model": "0" * 64}  # a score by adapters no longer served
AIR = -500.0  # HU: below is air (or lung)


# -- the probe, in this process: the server's model on one slice of the sample CT -------------------

@pytest.fixture(scope="module")
def activelearning():
    sys.path.insert(0, str(APP_DIR))
    try:
        import lib.activelearning

        yield lib.activelearning
    finally:
        sys.path.remove(str(APP_DIR))


def test_the_probe_clicks_inside_the_body_where_the_model_is_confident(activelearning):
    """A wide field of view with the patient off-centre (one slice of the sample CT, air added on the
    right): the old probe's click, the slice's centre, is air; every candidate and the chosen click
    are in the body, and the model is more confident there than at the centre."""
    import SimpleITK as sitk

    import msa
    from msa.data import sample_ct
    from msa.engine import Engine
    from msa.io import Volume, load_image
    from msa.modeling.build import default_adapters
    from msa.transforms import PRESETS

    model = msa.build_model("lite_medsam")
    msa.load_adapters(model, default_adapters("lite_medsam", False))  # what the server serves
    engine = Engine(model)
    ct = load_image(str(sample_ct()[0]))
    voxels = np.pad(ct.voxels[15:16], ((0, 0), (0, 0), (0, 140)), constant_values=-1000.0)
    volume = Volume(voxels, sitk.GetImageFromArray(voxels), "ct")
    hu = voxels[0]
    rows, cols = hu.shape
    assert hu[rows // 2, cols // 2] < AIR  # where the old probe clicked

    window = PRESETS["ct"].window(voxels)
    candidates = activelearning.candidate_clicks(activelearning.body_mask(hu, window))
    assert 1 < len(candidates) <= 9, candidates
    assert all(hu[j, i] > AIR for i, j in candidates), [(i, j, hu[j, i]) for i, j in candidates]

    probe = activelearning.probe_slice(engine, volume, 0, window)
    i, j, k = probe["click"]
    assert k == 0 and (i, j) in candidates and hu[j, i] > AIR, (probe, hu[j, i])
    _, centre_iou = engine.predict(volume, 0, points=[(cols // 2, rows // 2, 1)])
    assert probe["iou"] > centre_iou, (probe, centre_iou)
    assert 0.0 <= probe["entropy"] <= np.log(2), probe


# -- the server ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(study: Study, tmp_path_factory: pytest.TempPathFactory):
    running = start_isolated_server(
        tmp_path_factory.mktemp("server"),
        studies_files={f"{MAIN_ID}.nii.gz": study.image, f"{FRESH_ID}.nii.gz": study.fresh},
        image_info={MAIN_ID: {"msa_confidence": STALE}})
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def served_sha(server: Server) -> str:
    sha = server.info()["msa"]["adapters_sha256"]
    assert sha and sha != STALE["model"], sha
    return sha


@pytest.fixture(scope="module")
def first_answer(client) -> dict:
    """The module's first `uncertainty` request: no image has a score by the served adapters."""
    return client.next_sample("uncertainty", {})


@pytest.fixture(scope="module")
def scores(server: Server, first_answer: dict, served_sha: str) -> dict[str, dict]:
    """Every unlabeled image's score, once the scoring thread the first request started is done."""
    return wait_for_scores(server, [MAIN_ID, FRESH_ID], served_sha)


def test_uncertainty_answers_at_once_while_scores_are_computed(server: Server, first_answer: dict):
    assert first_answer.get("id") in (MAIN_ID, FRESH_ID), first_answer
    assert first_answer.get("selection") == "random: confidence scores are being computed", first_answer
    assert "no current confidence scores yet" in server.output.read_text(errors="replace")


def test_a_score_by_other_adapters_is_recomputed_not_ranked(server: Server, first_answer: dict,
                                                            scores: dict[str, dict], served_sha: str):
    # Ranked, the stale score (0.001) would have been picked as the least confident, without "random".
    assert first_answer.get("selection", "").startswith("random"), first_answer
    rescored = scores[MAIN_ID]
    assert rescored["model"] == served_sha and rescored["confidence"] != STALE["confidence"], rescored
    for image_id, score in scores.items():
        assert 0.0 <= score["confidence"] <= 1.0 + 1e-6 and score["entropy"] >= 0.0, (image_id, score)
        assert len(score["clicks"]) == 3, score  # the probe slices (3 of the crop's 8, of the fresh 4)


def test_uncertainty_picks_the_least_confident_once_scored(client, scores: dict[str, dict]):
    answer = client.next_sample("uncertainty", {})
    least = min(scores, key=lambda image_id: scores[image_id]["confidence"])
    assert answer.get("id") == least, (answer, scores)
    assert answer.get("selection", "").startswith("least confident of 2 scored images"), answer
    assert answer["msa_confidence"] == scores[least], answer  # the answer carries the image's info
