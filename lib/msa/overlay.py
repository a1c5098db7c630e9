"""Overlay PNGs: a slice with the reference (green outline), the prediction (red) and the prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .io import Volume
from .transforms import PRESETS, apply_window

SCALE = 3  # pixels per voxel, so small organs stay visible


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def save_overlay(path: Path, volume: Volume, k: int, reference: np.ndarray, prediction: np.ndarray,
                 points=(), box=None) -> Path:
    """points: (i, j, 1 | 0); box: (i0, j0, i1, j1). Returns the path written."""
    grey = apply_window(volume.voxels[k], PRESETS[volume.modality].window(volume.voxels))
    rgb = grey.astype(np.uint8) if grey.ndim == 3 else np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)
    pred = prediction.astype(bool)
    rgb[pred] = (0.55 * rgb[pred] + 0.45 * np.array([230, 40, 40])).astype(np.uint8)
    rgb[_outline(reference.astype(bool))] = (40, 230, 40)
    image = Image.fromarray(rgb).resize((rgb.shape[1] * SCALE, rgb.shape[0] * SCALE), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    if box is not None:
        i0, j0, i1, j1 = (v * SCALE for v in box)
        draw.rectangle([i0, j0, i1 + SCALE - 1, j1 + SCALE - 1], outline=(250, 220, 0))
    for i, j, positive in points:
        x, y = i * SCALE + SCALE // 2, j * SCALE + SCALE // 2
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(0, 200, 255) if positive else (255, 0, 255),
                     outline=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
