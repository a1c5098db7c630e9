"""Fixtures for the Slicer extension tests: headless MRML (slicer-core), the DICOM series as a
volume node, and ONE real MSA server (`monailabel start_server` on 127.0.0.1, everything in tmp)
shared by the whole folder, started with tests/app's helpers.

Encoding is what costs (seconds per slice on a CPU): the liver case prompts an ROI around the whole
liver, which lies on all 20 slices of the series, so the server encodes 20 slices once and the
in-process reference (msa.Session) 20 more; every other request on that volume in this folder
reuses those embeddings (the server caches them by content).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _import_slicer_core() -> None:
    """slicer-core's `slicer` package adds every `slicer/` folder on sys.path to its own path and
    imports what it finds there: this very folder, once pytest has put tests/ on sys.path. Import it
    once with those entries hidden (its path is fixed at import)."""
    hidden = [p for p in sys.path if (Path(p or ".") / "slicer").resolve() == HERE]
    for p in hidden:
        sys.path.remove(p)
    try:
        import slicer  # noqa: F401
    finally:
        sys.path[:0] = hidden


_import_slicer_core()
for folder in (REPO / "MSAExtension", REPO / "tests" / "app", HERE):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from app_helpers import Server, start_server, stop_server  # noqa: E402
from MSAExtensionLib import MSAClient, Segmenter  # noqa: E402
from slicer_helpers import (DICOM, DICOM_LABELS, LIVER, ROI_MARGIN, Mrml, Run, new_mrml, place_case,  # noqa: E402
                            run_case)


@pytest.fixture(scope="session")
def dicom_dir(data_dir: Path) -> Path:
    folder = data_dir / DICOM
    if not folder.is_dir() or not (data_dir / DICOM_LABELS).is_file():
        pytest.fail(f"no {DICOM}/ or {DICOM_LABELS} in {data_dir}")
    return folder


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """One real MSA server for the folder; its studies folder starts empty."""
    tmp = tmp_path_factory.mktemp("slicer-server")
    studies, model_dir = tmp / "studies", tmp / "model"
    studies.mkdir()
    # PyTorch, as the local msa.Session these tests compare with voxel for voxel: OpenVINO's embeddings
    # (within 3e-6, tests/inference/test_runtime.py) flipped 1 voxel of 379,418 in the liver.
    running = start_server(tmp, studies, model_dir, conf={"runtime": "torch"})
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def gui_modules():
    """The module panel (MSAExtension.py) and the effect imported over effect_harness's small fakes
    of Slicer's GUI classes, for one test module; taken out again afterwards."""
    from effect_harness import gui, uninstall

    yield gui()
    uninstall()


@pytest.fixture
def mrml() -> Mrml:
    """A fresh headless scene (installed as slicer.mrmlScene) per test."""
    return new_mrml()


@dataclass(frozen=True)
class LiverCase:
    """The DICOM series' liver, prompted as a user would: one point inside, an ROI around it.

    Everything here comes from ITK (SimpleITK's DICOM reader, physical points in LPS turned into
    RAS), not from Slicer's matrices: the extension must find the same voxels on its own.
    """

    point_ijk: list[int]  # the liver's interior-most voxel of the ROI's middle slice
    roi_ijk: list[int]  # [i0, i1, j0, j1, k0, k1]: the liver's bounding box (its slice range) + margin in-plane
    point_world: list[float]  # RAS of that voxel's centre
    roi_world_min: np.ndarray  # RAS box through the centres of the ROI's corner voxels
    roi_world_max: np.ndarray
    reference_kji: np.ndarray  # TotalSegmentator's liver on the DICOM grid (by world coordinates)
    session_kji: np.ndarray  # msa.Session's mask for point_ijk + roi_ijk, in process


def _ras(image, index) -> np.ndarray:
    x, y, z = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in index])
    return np.array([-x, -y, z])  # ITK's LPS -> RAS


@pytest.fixture(scope="session")
def liver_case(dicom_dir: Path, data_dir: Path) -> LiverCase:
    from scipy import ndimage

    import msa
    from msa.engine import Engine
    from msa.io import load_image, resample_labels_to
    from msa.modeling.build import default_adapters
    from msa.session import Session

    volume = load_image(dicom_dir)
    liver = resample_labels_to(data_dir / DICOM_LABELS, volume) == LIVER  # (K, J, I), by world coordinates
    k, j, i = np.nonzero(liver)  # the whole liver: its full slice range
    size = volume.shape_ijk
    roi = [max(int(i.min()) - ROI_MARGIN, 0), min(int(i.max()) + ROI_MARGIN, size[0] - 1),
           max(int(j.min()) - ROI_MARGIN, 0), min(int(j.max()) + ROI_MARGIN, size[1] - 1), int(k.min()), int(k.max())]
    mid = (roi[4] + roi[5]) // 2
    depth = ndimage.distance_transform_edt(liver[mid])
    jj, ii = np.unravel_index(int(np.argmax(depth)), depth.shape)
    point = [int(ii), int(jj), mid]

    # The server's model: the backbone with the adapters msa ships (what the app serves by default).
    model = msa.build_model("lite_medsam", adapters=default_adapters("lite_medsam", False))
    session = Session(Engine(model), volume)
    session.add_roi(roi)
    session.add_point(point, positive=True)

    corners = np.array([_ras(volume.geometry, c) for c in
                        ([roi[0], roi[2], roi[4]], [roi[1], roi[3], roi[5]])])
    return LiverCase(point, roi, _ras(volume.geometry, point).tolist(), corners.min(axis=0), corners.max(axis=0),
                     liver, session.mask(1))


@pytest.fixture(scope="session")
def liver_run(server, dicom_dir, liver_case) -> Run:
    """The DICOM series loaded by Slicer's reader, the case's prompts, one `msa` request."""
    mrml = new_mrml()
    volume = mrml.load_dicom(dicom_dir)
    segmentation, liver, nodes = place_case(mrml, volume, liver_case)
    return run_case(mrml, volume, segmentation, liver, nodes, Segmenter(MSAClient(server.url)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that used the server shows the server's last log lines."""
    outcome = yield
    report = outcome.get_result()
    server = item.funcargs.get("server") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(server, Server):
        report.sections.append(("server log (last lines)", server.log_tail(80)))
