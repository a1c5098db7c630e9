"""Helpers shared by the tests in tests/inference (imported by name: this folder is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

SPLEEN, LIVER = 1, 5


def roi_of(mask: np.ndarray) -> list[int]:
    """[i0, i1, j0, j1, k0, k1] (Slicer layout) of a (K, J, I) mask."""
    kk, jj, ii = np.nonzero(mask)
    return [int(ii.min()), int(ii.max()), int(jj.min()), int(jj.max()), int(kk.min()), int(kk.max())]


def write_volume(path: Path, array: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(-12.5, 30.0, 7.25),
                 direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)) -> Path:
    """(K, J, I) array -> an image file with a non-trivial grid (anisotropic, rotated, offset)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def synthetic_ct(shape=(6, 24, 32), seed: int = 0) -> np.ndarray:
    """int16 (K, J, I) CT-like volume: air background, a bright block in the middle."""
    rng = np.random.default_rng(seed)
    ct = rng.normal(-800, 50, size=shape).astype(np.int16)
    k, j, i = shape
    ct[:, j // 4:3 * j // 4, i // 4:3 * i // 4] = 60
    return ct
