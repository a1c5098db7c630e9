"""Fixtures for the interactive-inference tests (io, engine, session, metrics, CLI segment/eval/bench).

Real-weight tests share ONE session-scoped Engine on LiteMedSAM, so a slice is encoded once for the
whole folder (each encoder pass costs seconds on a CPU). Fast tests use tiny random models.
The real data is found through $MSA_DATA_DIR, then <repo>/../shared/data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from inference_helpers import SPLEEN, roi_of, synthetic_ct, write_volume

REPO = Path(__file__).resolve().parents[2]


def _data_dir() -> Path:
    candidates = [Path(os.environ["MSA_DATA_DIR"])] if os.environ.get("MSA_DATA_DIR") else []
    candidates.append(REPO.parent / "shared" / "data")
    for folder in candidates:
        if (folder / "ct_abdomen.nii.gz").is_file() and (folder / "ct_abdomen_dicom").is_dir():
            return folder
    pytest.fail(f"no ct_abdomen.nii.gz / ct_abdomen_dicom in {', '.join(map(str, candidates))}; set MSA_DATA_DIR")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _data_dir()


@pytest.fixture(scope="session")
def ct_paths(shared_data: Path) -> tuple[Path, Path]:
    """(image, labels) of the abdominal CT: 122 x 101 x 30 voxels, label 1 spleen, 5 liver."""
    return shared_data / "ct_abdomen.nii.gz", shared_data / "ct_abdomen_labels.nii.gz"


@pytest.fixture(scope="session")
def ct_volume(ct_paths):
    from msa.io import load_image

    return load_image(ct_paths[0])


@pytest.fixture(scope="session")
def ct_reference(ct_paths, ct_volume) -> np.ndarray:
    """(K, J, I) reference label map on ct_volume's grid."""
    from msa.io import load_labels

    return load_labels(ct_paths[1], ct_volume)


@pytest.fixture(scope="session")
def spleen_roi(ct_reference) -> list[int]:
    roi = roi_of(ct_reference == SPLEEN)
    assert roi == [10, 43, 22, 57, 0, 29]  # the data the thresholds were measured on
    return roi


@pytest.fixture(scope="session")
def real_engine():
    """The one LiteMedSAM engine (real bundled weights, no adapters) of this folder: embeddings cached across
    tests, encoded by the runtime users get on a CPU (OpenVINO; about 2x faster than eager PyTorch here)."""
    import msa
    from msa.engine import Engine
    from msa.runtime import make_encoder

    model = msa.build_model("lite_medsam")
    return Engine(model, encoder=make_encoder(model, "auto"))


@pytest.fixture(scope="session")
def spleen_session(real_engine, ct_volume, spleen_roi):
    """A session with the spleen ROI propagated (computed once; tests must not mutate it)."""
    from msa.session import Session

    session = Session(real_engine, ct_volume)
    session.add_roi(spleen_roi, label=SPLEEN)
    return session


# -- tiny random models and synthetic images ----------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model():
    """A small random 2D model (64 x 64 input): encoder passes cost milliseconds."""
    import msa

    return msa.build_model("vit_tiny", pretrained=False)


@pytest.fixture(scope="session")
def tiny_model_3d():
    import msa

    return msa.build_model("vit_tiny", three_d=True, pretrained=False)


@pytest.fixture
def small_ct(tmp_path) -> Path:
    return write_volume(tmp_path / "small_ct.nii.gz", synthetic_ct())


@pytest.fixture
def tiny_volume(small_ct):
    from msa.io import load_image

    return load_image(small_ct)
