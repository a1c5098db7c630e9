"""Fixtures for the MONAI Label app tests: a real `monailabel start_server` on a cropped study.

The server runs as a user would start it (the venv's `monailabel` launcher, 127.0.0.1, a free
port) with everything it writes kept out of the repository: the studies folder, the model_dir
(--conf model_dir), the log file (--log_config) and the session folder all live in a tmp dir.
The data is the real CT of tests/conftest.py's `data_dir`, cropped to 8 axial slices (11..18) so
the real LiteMedSAM encoder (seconds per slice on a CPU) stays affordable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app_helpers import CROP, FRESH, FRESH_ID, MAIN_ID, SPLEEN, Server, Study, start_server, stop_server


@pytest.fixture(scope="session")
def study(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Study:
    import SimpleITK as sitk
    from scipy import ndimage

    out = tmp_path_factory.mktemp("study-files")
    ct = sitk.ReadImage(str(data_dir / "ct_abdomen.nii.gz"))
    labels = sitk.ReadImage(str(data_dir / "ct_abdomen_labels.nii.gz"))
    crop, crop_labels = ct[:, :, CROP[0]:CROP[1]], labels[:, :, CROP[0]:CROP[1]]
    spleen = sitk.Cast(crop_labels == SPLEEN, sitk.sitkUInt8)
    paths = {name: out / f"{name}.nii.gz" for name in ("crop", "crop_labels", "spleen", "fresh", "wrong_size")}
    sitk.WriteImage(crop, str(paths["crop"]))
    sitk.WriteImage(crop_labels, str(paths["crop_labels"]))
    sitk.WriteImage(spleen, str(paths["spleen"]))
    sitk.WriteImage(ct[:, :, FRESH[0]:FRESH[1]], str(paths["fresh"]))
    sitk.WriteImage(sitk.Cast(labels == SPLEEN, sitk.sitkUInt8), str(paths["wrong_size"]))

    mask = sitk.GetArrayFromImage(spleen).astype(bool)  # (k, j, i)
    assert mask.shape == (8, 101, 122) and mask.any(axis=(1, 2)).all()
    k, j, i = np.nonzero(mask)
    roi = [int(i.min()), int(i.max()), int(j.min()), int(j.max()), int(k.min()), int(k.max())]
    distance = ndimage.distance_transform_edt(mask)
    kk, jj, ii = np.unravel_index(int(np.argmax(distance)), mask.shape)

    fresh_mask = sitk.GetArrayFromImage(labels[:, :, FRESH[0]:FRESH[1]]) == SPLEEN
    fk, fj, fi = np.nonzero(fresh_mask)
    fresh_roi = [int(fi.min()), int(fi.max()), int(fj.min()), int(fj.max()), 0, FRESH[1] - FRESH[0] - 1]

    garbage = out / "garbage.nii.gz"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    text_dir = out / "text"
    text_dir.mkdir()
    text = text_dir / "x.nii.gz"
    text.write_text("this is not an image\n" * 20)
    return Study(paths["crop"], paths["crop_labels"], paths["spleen"], mask, roi, [int(ii), int(jj), int(kk)],
                 paths["fresh"], fresh_roi, paths["wrong_size"], garbage, text)


@pytest.fixture(scope="module")
def server(study: Study, tmp_path_factory: pytest.TempPathFactory):
    """One server for a test module; its studies folder starts empty, its model_dir in tmp."""
    tmp = tmp_path_factory.mktemp("server")
    studies, model_dir = tmp / "studies", tmp / "model"
    studies.mkdir()
    running = start_server(tmp, studies, model_dir)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def client(server: Server, tmp_path_factory: pytest.TempPathFactory):
    """The real MONAI Label client, saving results into a folder of its own."""
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("client")))




# -- state on the module's server, built once and shared by the tests that need it -------------


@pytest.fixture(scope="module")
def main_image(client, study: Study) -> str:
    """The cropped CT, uploaded through the client."""
    assert client.upload_image(str(study.image), image_id=MAIN_ID)["image"] == MAIN_ID
    return MAIN_ID


@pytest.fixture(scope="module")
def fresh_image(client, study: Study) -> str:
    """4 other CT slices: content nobody has encoded (the embedding cache keys on content)."""
    assert client.upload_image(str(study.fresh), image_id=FRESH_ID)["image"] == FRESH_ID
    return FRESH_ID


@pytest.fixture(scope="module")
def first_result(client, main_image: str, study: Study):
    """The first request on the main image: `msa` with the spleen ROI -> (result file, params)."""
    path, params = client.infer("msa", main_image, {"roi": study.roi, "label": "spleen"})
    assert path is not None and Path(path).is_file(), f"no result file; params {params}"
    return Path(path), params


@pytest.fixture(scope="module")
def labeled(client, main_image: str, study: Study) -> str:
    """The main image with its final label: the crop's reference spleen mask."""
    response = client.save_label(main_image, str(study.spleen))
    assert response.get("image") == main_image, response
    return main_image


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the server shows the server's last log lines."""
    outcome = yield
    report = outcome.get_result()
    server = item.funcargs.get("server") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(server, Server):
        report.sections.append(("server log (last lines)", server.log_tail(80)))
