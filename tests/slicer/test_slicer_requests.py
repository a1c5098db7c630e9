"""Requests off the GUI thread (a newer click supersedes a pending one, a stale answer is dropped),
and what the panel shows: the server's models, backbone and adapters; training progress."""

from __future__ import annotations

import hashlib
import threading
import time

from MSAExtensionLib import LatestRequestWorker, MSAClient, Prompts, connection_summary, run_request, train_progress
from slicer_helpers import case_prompts


def test_newer_click_supersedes_pending_and_stale_answers_are_dropped(liver_run, liver_case):
    segmenter = liver_run.segmenter
    volume = liver_run.volume
    started, release = threading.Event(), threading.Event()
    released = []

    def first_request(request):
        started.set()
        released.append(release.wait(300))  # held until the GUI thread below has polled and clicked again
        return run_request(segmenter.client, segmenter.images, request)

    worker = LatestRequestWorker()
    three_d = segmenter.request(volume, case_prompts(liver_case), dimension=3)
    two_d = segmenter.request(volume, case_prompts(liver_case), dimension=2)
    first = worker.submit(first_request, three_d, context="first")
    assert started.wait(60)
    # While the worker is held inside the first request, the GUI thread is free: polling returns
    # at once with nothing (it never waits for the worker), and newer clicks are taken.
    assert worker.poll() is None
    assert worker.busy and worker.running == first
    second = worker.submit(run_request, segmenter.client, segmenter.images, two_d, context="second")
    third = worker.submit(run_request, segmenter.client, segmenter.images, two_d, context="third")
    assert worker.running == first  # the first one had started: it completes, but nobody gets it
    assert worker.poll() is None
    release.set()
    outcome = worker.wait(300)

    assert released == [True], "the worker was let go by the test, after the poll returned"
    assert outcome is not None and outcome.ticket == third and outcome.context == "third"
    assert outcome.error is None and outcome.result.mask[liver_case.point_ijk[2]].any()
    assert worker.executed == [first, third]  # the second never ran
    assert sorted(worker.dropped) == [first, second]
    assert worker.poll() is None  # delivered once


def test_worker_runs_newest_only_without_a_server():
    gates = {"a": threading.Event(), "c": threading.Event()}
    ran = []

    def job(name):
        ran.append(name)
        if name in gates:
            assert gates[name].wait(10)
        return name

    worker = LatestRequestWorker()
    first = worker.submit(job, "a")
    while worker.running != first:
        time.sleep(0.001)
    second = worker.submit(job, "b")
    last = worker.submit(job, "c")
    gates["a"].set()  # the overtaken job ends while the newest one runs
    while worker.running != last:
        time.sleep(0.001)
    assert worker.poll() is None, "a stale answer must never reach the GUI thread"
    gates["c"].set()
    outcome = worker.wait(10)
    assert ran == ["a", "c"] and outcome.ticket == last and outcome.result == "c"
    assert sorted(worker.dropped) == [first, second] and worker.poll() is None


def test_errors_reach_the_gui_thread_as_outcomes(liver_run, liver_case):
    segmenter = liver_run.segmenter
    request = segmenter.request(liver_run.volume, Prompts(positive=[liver_case.point_world]), dimension=2)
    request.model = "msa_nope"
    worker = LatestRequestWorker()
    worker.submit(run_request, segmenter.client, segmenter.images, request)
    outcome = worker.wait(60)
    assert outcome.result is None and "unknown model" in str(outcome.error)


def test_connection_shows_models_backbone_and_adapters(server):
    from msa.checkpoint import read_adapter_metadata
    from msa.modeling.build import default_adapters

    client = MSAClient(server.url)
    info = client.info()
    summary = connection_summary(info, client.msa_models(info))
    shipped = default_adapters("lite_medsam", False)
    sha = hashlib.sha256(open(shipped, "rb").read()).hexdigest()
    assert info["msa"] == {"backbone": "lite_medsam", "three_d": False, "adapters": shipped.name,
                           "adapters_sha256": sha, "targets": read_adapter_metadata(shipped).get("targets", [])}, info["msa"]
    assert summary.startswith("Connected: models msa (3D), msa_2d (2D); backbone lite_medsam; ")
    assert f"adapters {shipped.name} (sha256 {sha[:12]})" in summary
    assert "strategies random, first, uncertainty" in summary


def test_train_progress_reads_the_train_tasks_stats():
    assert train_progress({}) == (0, "not trained yet")
    running = {"status": "RUNNING", "step": 25, "total_steps": 100, "images": 1, "dice_click1": 0.8123,
               "dice_box": 0.9}
    assert train_progress(running) == (25, "RUNNING, step 25/100, 1-click Dice 0.812, box Dice 0.900")
    done = {"status": "DONE", "step": 100, "total_steps": 100, "best": {"step": 75, "dice_click1": 0.85, "dice_box": 0.91}}
    assert train_progress(done) == (100, "DONE, step 100/100, best 1-click Dice 0.850, box Dice 0.910")
    failed = {"status": "FAILED", "error": "no final labels in the datastore yet"}
    assert train_progress(failed) == (0, "FAILED, no final labels in the datastore yet")


def test_a_second_click_extends_this_slicers_session_and_not_another_slicers(liver_run, liver_case):
    """The extension names itself to the server (client_id), so the server's interactive session of
    this Slicer answers a click added to the same prompts by applying only that click ("extended", no
    encoder work); another Slicer sending the same prompts gets a session of its own ("new")."""
    import dataclasses

    from MSAExtensionLib import Segmenter

    segmenter, volume = liver_run.segmenter, liver_run.volume
    prompts = case_prompts(liver_case)
    first = run_request(segmenter.client, segmenter.images, segmenter.request(volume, prompts, dimension=3))
    # A negative click in a corner of the ROI, on the clicked slice: added to the same prompts.
    corner = list(liver_case.roi_world_min[:2]) + [liver_case.point_world[2]]
    more = dataclasses.replace(prompts, negative=[corner])
    second = run_request(segmenter.client, segmenter.images, segmenter.request(volume, more, dimension=3))
    assert second.params["session"] == "extended", second.params
    assert second.params["encoder_passes"] == 0
    assert first.params["session"] in ("new", "extended", "same")

    other = Segmenter(MSAClient(segmenter.client.url))
    assert other.client.client_id != segmenter.client.client_id
    answer = run_request(other.client, other.images, other.request(volume, prompts, dimension=3))
    assert answer.params["session"] == "new", answer.params
