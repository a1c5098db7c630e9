"""Failures a user meets: server down, wrong URL, not an MSA server, unknown model (404), a prompt
the server refuses (422). Each is one MSAClientError with a sentence a user can act on, and the
segment keeps every voxel it had."""

from __future__ import annotations

import copy
import http.server
import threading

import numpy as np
import pytest

from MSAExtensionLib import (EditorLogicTarget, MSAClient, MSAClientError, Prompts, Segmenter, make_editor_logic,
                             volume_array)
from app_helpers import free_port
from slicer_helpers import activate, segment_array, set_segment


@pytest.fixture
def filled(liver_run):
    """A segment with content, on the liver run's volume, and its editing target."""
    activate(liver_run.mrml)
    volume = liver_run.volume
    segmentation, (segment,) = liver_run.mrml.add_segmentation(volume, ["kept"], name="errors")
    before = np.zeros(volume_array(volume).shape, dtype=bool)
    before[5:12, 200:300, 150:260] = True
    set_segment(segmentation, segment, volume, before)
    target = EditorLogicTarget(make_editor_logic(liver_run.mrml.scene, segmentation, volume), segment)
    yield liver_run, volume, segmentation, segment, target, before
    liver_run.mrml.scene.RemoveNode(segmentation)


def _unchanged(segmentation, segment, volume, before):
    np.testing.assert_array_equal(segment_array(segmentation, segment, volume), before)


def test_server_down(filled, liver_case):
    run, volume, segmentation, segment, target, before = filled
    segmenter = Segmenter(MSAClient(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(MSAClientError) as error:
        segmenter.segment(target, volume, Prompts(positive=[liver_case.point_world]))
    message = str(error.value)
    assert "no MSA server answers" in message and "make demo" in message, message
    assert error.value.status is None
    _unchanged(segmentation, segment, volume, before)


def test_wrong_url_and_a_server_that_is_not_monai_label(tmp_path):
    with pytest.raises(MSAClientError, match="is not a server URL"):
        MSAClient("127.0.0.1:8000")  # no scheme
    # A real web server that is not MONAI Label (a plain file server).
    (tmp_path / "index.html").write_text("<html>hello</html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(MSAClientError, match="not a MONAI Label server") as error:
            MSAClient(f"http://127.0.0.1:{httpd.server_address[1]}").info()
        assert error.value.status == 404
    finally:
        httpd.shutdown()


def test_server_without_msa_model(server):
    client = MSAClient(server.url)
    info = client.info()
    assert client.msa_models(info) == ["msa", "msa_2d"]
    other = copy.deepcopy(info)
    other["models"] = {"deepedit": info["models"]["msa"]}  # what a non-MSA MONAI Label app lists
    with pytest.raises(MSAClientError, match="has no MSA model") as error:
        client.msa_models(other)
    assert "deepedit" in str(error.value)


def test_unknown_model_is_a_404_with_the_servers_message(filled, liver_case):
    run, volume, segmentation, segment, target, before = filled
    with pytest.raises(MSAClientError) as error:
        run.segmenter.segment(target, volume, Prompts(positive=[liver_case.point_world]), model="msa_nope")
    assert error.value.status == 404
    message = str(error.value)
    assert "unknown model 'msa_nope'" in message and "msa, msa_2d" in message and "(HTTP 404)" in message, message
    _unchanged(segmentation, segment, volume, before)


def test_prompt_the_server_refuses_is_a_422(filled, liver_case):
    run, volume, segmentation, segment, target, before = filled
    request = run.segmenter.request(volume, Prompts(positive=[liver_case.point_world]))
    request.params["foreground"] = [[700, 10, 3]]  # outside the 512 x 512 grid: as a stale prompt would be
    with pytest.raises(MSAClientError) as error:
        run.segmenter.run(request)
    assert error.value.status == 422
    message = str(error.value)
    assert message.startswith("the MSA server refused the msa request:") and "(HTTP 422)" in message, message
    assert "\n" not in message and "Traceback" not in message
    _unchanged(segmentation, segment, volume, before)


def test_point_outside_the_volume_is_refused_before_any_request(filled):
    run, volume, segmentation, segment, target, before = filled
    client = MSAClient(run.segmenter.client.url)
    segmenter = Segmenter(client)
    with pytest.raises(MSAClientError, match="lies outside the volume"):
        segmenter.segment(target, volume, Prompts(positive=[[5000.0, 0.0, 0.0]]))
    with pytest.raises(MSAClientError, match="place a positive point"):
        segmenter.segment(target, volume, Prompts(negative=[[0.0, 0.0, 0.0]]))
    assert client.log == []  # nothing was sent
    _unchanged(segmentation, segment, volume, before)
