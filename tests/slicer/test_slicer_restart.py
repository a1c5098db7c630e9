"""The client's memory of uploaded images goes out of date when the server loses them: a server
restarted at the SAME URL with an empty studies folder, or an image deleted through the server's
API. Then the next request gets a 404 for the image; the client must check (HEAD), upload the
image again once and answer, for inference and for "Submit label", in scripts and in the effect.

Real servers on 127.0.0.1 (their own, not the folder's shared one: this file restarts them), a
3-slice volume, 2D requests (one slice encoded per server).
"""

from __future__ import annotations

import types
import urllib.request

import numpy as np
import pytest
import vtk

import app_helpers
from app_helpers import start_server, stop_server
from effect_harness import FakeInteractor, FakeSliceView, new_effect, new_logic, record_requests, settle
from MSAExtensionLib import (EditorLogicTarget, MSAClient, MSAClientError, Prompts, Segmenter, make_editor_logic,
                             submit_label, volume_array)
from MSAExtensionLib.geometry import ijk_to_ras, to_vtk
from slicer_helpers import DICOM_LABELS, LIVER, activate, new_mrml, segment_array

CROP = 3  # slices around the liver's interior-most voxel


@pytest.fixture(scope="module")
def case(dicom_dir, data_dir):
    """A 3-slice crop of the DICOM series (its own image on the servers) and a point in its liver."""
    from scipy import ndimage

    from msa.io import load_image, resample_labels_to

    liver = resample_labels_to(data_dir / DICOM_LABELS, load_image(dicom_dir)) == LIVER
    k = liver.shape[0] // 2
    depth = ndimage.distance_transform_edt(liver[k])
    j, i = np.unravel_index(int(np.argmax(depth)), depth.shape)

    mrml = new_mrml()
    series = mrml.load_dicom(dicom_dir)
    volume = mrml.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "crop")
    image = vtk.vtkImageData()
    image.SetDimensions(512, 512, CROP)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    volume.SetAndObserveImageData(image)
    volume_array(volume)[:] = volume_array(series)[k - 1:k + 2]
    shift = np.eye(4)
    shift[2, 3] = k - 1  # crop slice 0 is the series' slice k - 1: same world positions
    volume.SetIJKToRASMatrix(to_vtk(ijk_to_ras(series) @ shift))
    mrml.scene.RemoveNode(series)
    point = list((ijk_to_ras(volume) @ np.array([i, j, 1, 1.0]))[:3])
    return types.SimpleNamespace(mrml=mrml, volume=volume, point_world=point, point_ijk=[int(i), int(j), 1])


class Servers:
    """Servers started one after another at ONE port (one URL), each with its own studies folder."""

    def __init__(self, tmp):
        self.tmp, self.port, self.count, self.current = tmp, app_helpers.free_port(), 0, None

    def start(self):
        """Stops the running one, starts a new one with an EMPTY studies folder at the same URL."""
        if self.current is not None:
            stop_server(self.current)
        self.count += 1
        folder = self.tmp / f"server{self.count}"
        studies = folder / "studies"
        studies.mkdir(parents=True)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(app_helpers, "free_port", lambda: self.port)
            self.current = start_server(folder, studies, folder / "model")
        return self.current


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    servers = Servers(tmp_path_factory.mktemp("restarts"))
    servers.start()
    yield servers
    if servers.current is not None:
        stop_server(servers.current)


def calls(client, since: int) -> list[tuple]:
    return [(r.method, r.path, r.status) for r in client.log[since:]]


def delete_image(server, image_id: str) -> None:
    """DELETE /datastore/?id=: the server's own API for removing an image."""
    request = urllib.request.Request(f"{server.url}/datastore/?id={image_id}", method="DELETE")
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.status == 200


def test_a_restart_with_an_empty_studies_folder_at_the_same_url_costs_one_upload(servers, case):
    activate(case.mrml)
    first = servers.current
    segmentation = case.mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "restart")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(case.volume)
    segment = segmentation.GetSegmentation().AddEmptySegment("liver", "liver")
    target = EditorLogicTarget(make_editor_logic(case.mrml.scene, segmentation, case.volume), segment)
    prompts = Prompts(positive=[case.point_world])
    segmenter = Segmenter(MSAClient(first.url))
    result, _ = segmenter.segment(target, case.volume, prompts, dimension=2)
    image_id = result.image_id
    assert calls(segmenter.client, 0) == [("HEAD", "/datastore/image", 404), ("PUT", "/datastore/image", 200),
                                          ("POST", "/infer/msa_2d", 200)]

    second = servers.start()  # same URL, empty studies folder: the image is gone
    assert second.url == first.url and not list(second.studies.glob(f"{image_id}.*"))
    since = len(segmenter.client.log)
    result, report = segmenter.segment(target, case.volume, prompts, dimension=2)
    assert calls(segmenter.client, since) == [
        ("POST", "/infer/msa_2d", 404),  # remembered as uploaded: asked for at once
        ("HEAD", "/datastore/image", 404),  # the 404 is about the image: it is gone
        ("PUT", "/datastore/image", 200),  # uploaded again, once
        ("POST", "/infer/msa_2d", 200)]
    assert result.image_id == image_id and len(list(second.studies.glob(f"{image_id}.*"))) == 1
    assert result.mask[1].any() and segment_array(segmentation, segment, case.volume)[1].any()

    # The image deleted through the server's API, then "Submit label": uploaded again, label saved.
    delete_image(second, image_id)
    since = len(segmenter.client.log)
    answer = submit_label(segmenter.client, segmenter.images, case.volume, segmentation)
    assert answer["image"] == image_id
    assert calls(segmenter.client, since) == [
        ("PUT", "/datastore/label", 404), ("HEAD", "/datastore/image", 404),
        ("PUT", "/datastore/image", 200), ("PUT", "/datastore/label", 200)]
    assert len(list((second.studies / "labels" / "final").glob(f"{image_id}.*"))) == 1

    # A 404 about something else (an unknown model) is not taken for a lost image: no upload.
    since = len(segmenter.client.log)
    with pytest.raises(MSAClientError, match="unknown model"):
        segmenter.segment(target, case.volume, prompts, dimension=2, model="msa_nope")
    assert calls(segmenter.client, since) == [("POST", "/infer/msa_nope", 404), ("HEAD", "/datastore/image", 200)]
    case.mrml.scene.RemoveNode(segmentation)



def test_the_effect_uploads_again_when_the_server_lost_the_image(servers, case, gui_modules):
    mrml = activate(case.mrml)
    server = servers.current
    segmentation, (segment,) = mrml.add_segmentation(case.volume, ["liver"], name="effect restart")
    logic = new_logic(gui_modules.module, server.url)
    submitted = record_requests(logic)
    effect = new_effect(gui_modules.effect_module, mrml.scene, segmentation, case.volume, segment)
    logic.dimension = 2
    view = FakeSliceView(mrml.scene, case.point_world)
    press = vtk.vtkCommand.LeftButtonPressEvent
    assert effect.processInteractionEvents(FakeInteractor(view.xy(case.point_world)), press, view)
    settle(effect)
    assert len(submitted) == 1 and effect.statusLabel.text.startswith("msa_2d: "), effect.statusLabel.text
    image_id = submitted[0].request.image.image_id

    delete_image(server, image_id)  # the server loses it while Slicer keeps working
    client = logic.segmenter.client
    since = len(client.log)
    assert effect.processInteractionEvents(FakeInteractor(view.xy(case.point_world)), press, view)
    settle(effect)
    # The first try found the image gone (ImageLost: its voxels were not copied); the effect sent the
    # request again, prepared anew with the voxels, and the worker uploaded them.
    assert [p.retried for p in submitted[1:]] == [False, True]
    assert submitted[1].request.image.array is None and submitted[2].request.image.array is not None
    assert calls(client, since) == [("POST", "/infer/msa_2d", 404), ("HEAD", "/datastore/image", 404),
                                    ("PUT", "/datastore/image", 200), ("POST", "/infer/msa_2d", 200)]
    assert effect.statusLabel.text.startswith("msa_2d: "), effect.statusLabel.text
    assert len(list(server.studies.glob(f"{image_id}.*"))) == 1
    effect.cleanup()
    mrml.scene.RemoveNode(segmentation)
