"""Images and labels on the server: one upload per image (a second click, a reloaded scene and a
second Slicer session find it there), labels submitted on the image's grid, samples fetched from
the server never uploaded back. Evidence is taken on the server side too: its log of uploads and
the stored file."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import SimpleITK as sitk
import vtk

from MSAExtensionLib import (MSAClient, Prompts, Segmenter, fetch_sample, label_map, mark_server_image,
                             submit_label, volume_array)
from MSAExtensionLib.geometry import ijk_to_ras, to_vtk
from slicer_helpers import activate, new_mrml, segment_array


def _uploads(server, image_id: str) -> int:
    """How many times the server logged storing an upload of `image_id` (lib/datastore.py logs each)."""
    return server.log_tail(100000).count(f"stored image {image_id!r}")


def _puts(client: MSAClient) -> list:
    return [r for r in client.log if r.method == "PUT" and r.path == "/datastore/image"]


def _stored(server, image_id: str):
    files = sorted(server.studies.glob(f"{image_id}.*"))
    assert len(files) == 1, files
    return files[0]


def test_a_second_request_does_not_upload_again(liver_run, liver_case, server):
    activate(liver_run.mrml)
    client = liver_run.segmenter.client
    image_id = liver_run.result.image_id
    assert image_id.startswith("slicer-") and len(_puts(client)) >= 1
    puts, requests = len(_puts(client)), len(client.log)
    stored = _stored(server, image_id).stat()

    request = liver_run.segmenter.request(liver_run.volume, Prompts(positive=[liver_case.point_world]), dimension=2)
    assert request.image.array is None  # known on the server: not even copied
    result = liver_run.segmenter.run(request)
    assert result.image_id == image_id
    assert len(_puts(client)) == puts
    assert [r.method for r in client.log[requests:]] == ["POST"]  # no HEAD either: remembered
    assert _stored(server, image_id).stat().st_mtime_ns == stored.st_mtime_ns


def test_uploaded_image_is_the_series_where_it_lies(liver_run, server, dicom_dir):
    """The server stores the volume as stored in Slicer: the DICOM's voxels, grid and LPS geometry."""
    stored = sitk.ReadImage(str(_stored(server, liver_run.result.image_id)))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    series = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(series))
    np.testing.assert_allclose(stored.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(stored.GetSpacing(), series.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(stored.GetDirection(), series.GetDirection(), atol=1e-6)


def test_reloaded_scene_and_second_session_find_the_image_on_the_server(liver_run, liver_case, dicom_dir, server):
    image_id = liver_run.result.image_id
    assert _uploads(server, image_id) == 1
    stored = _stored(server, image_id).stat().st_mtime_ns

    mrml = new_mrml()  # the scene reloaded, by another Slicer session with its own client
    volume = mrml.load_dicom(dicom_dir)
    segmenter = Segmenter(MSAClient(server.url))
    result = segmenter.run(segmenter.request(volume, Prompts(positive=[liver_case.point_world]), dimension=2))
    assert result.image_id == image_id
    assert [(r.method, r.path, r.status) for r in segmenter.client.log] == [
        ("HEAD", "/datastore/image", 200), ("POST", "/infer/msa_2d", 200)]
    assert _uploads(server, image_id) == 1
    assert _stored(server, image_id).stat().st_mtime_ns == stored


def test_submit_label_puts_the_segments_on_the_image_grid(liver_run, server):
    activate(liver_run.mrml)
    answer = submit_label(liver_run.segmenter.client, liver_run.segmenter.images, liver_run.volume,
                          liver_run.segmentation)
    image_id = liver_run.result.image_id
    assert answer["image"] == image_id
    label_file = sorted((server.studies / "labels" / "final").glob(f"{image_id}.*"))
    assert len(label_file) == 1, list((server.studies / "labels" / "final").iterdir())
    saved = sitk.ReadImage(str(label_file[0]))
    image = sitk.ReadImage(str(_stored(server, image_id)))
    assert saved.GetSize() == image.GetSize()
    np.testing.assert_allclose(saved.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(saved.GetDirection(), image.GetDirection(), atol=1e-6)
    values = sitk.GetArrayFromImage(saved)
    segment = segment_array(liver_run.segmentation, liver_run.segment_id, liver_run.volume)
    np.testing.assert_array_equal(values > 0, segment)
    np.testing.assert_array_equal(values, label_map(liver_run.segmentation, liver_run.volume))
    # The server's datastore now counts it as labelled.
    with urllib.request.urlopen(f"{server.url}/datastore/?output=all", timeout=30) as response:
        objects = json.loads(response.read())["objects"]
    assert "final" in objects[image_id]["labels"], objects[image_id]


def test_next_sample_is_loaded_from_the_server_and_never_uploaded_back(liver_run, server, tmp_path):
    # An unlabelled image on the server: 3 slices of the series, uploaded by another client.
    source = new_mrml()
    crop = source.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "crop")
    image = vtk.vtkImageData()
    image.SetDimensions(512, 512, 3)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    crop.SetAndObserveImageData(image)
    volume_array(crop)[:] = volume_array(liver_run.volume)[:3]
    crop.SetIJKToRASMatrix(to_vtk(ijk_to_ras(liver_run.volume)))
    uploader = Segmenter(MSAClient(server.url))
    uploaded = uploader.images.image_id(crop)
    assert len(_puts(uploader.client)) == 1 and _uploads(server, uploaded) == 1

    client = MSAClient(server.url)
    sample = fetch_sample(client, "first", str(tmp_path))
    assert sample is not None, "the datastore has unlabelled images (the crop at least)"
    image_id, path = sample

    mrml = new_mrml()
    volume = mrml.load_volume(path, image_id)
    mark_server_image(volume, image_id)
    segmenter = Segmenter(client)
    prepared = segmenter.images.prepare(volume)
    assert prepared.image_id == image_id
    assert segmenter.images.ensure(prepared) == image_id
    assert not _puts(client)
    # What Slicer loaded is the server's image voxel for voxel (so IJK agree).
    stored = sitk.GetArrayFromImage(sitk.ReadImage(str(_stored(server, image_id))))
    np.testing.assert_array_equal(volume_array(volume), stored)
    # Edited voxels are another image: uploaded under their own content id.
    volume_array(volume)[0, 0, 0] += 1
    volume.GetImageData().Modified()
    assert segmenter.images.prepare(volume).image_id.startswith("slicer-")
