"""Intensity presets and the one place that does geometry between image pixels and model input.

Model input: the slice resized so its longest side is img_size (aspect kept), then zero-padded at
the bottom and right to img_size x img_size (SAM's ResizeLongestSide + pad). Every conversion has
its inverse next to it. 2D coordinates are SAM's (x, y) = (column, row) of the 2D array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ImageError

# --- intensity: everything leaves as float32 RGB-range values in [0, 255] ---------------------
# Each preset fits a window (low, high) on an image, and apply_window maps it.


@dataclass(frozen=True)
class CTWindow:
    """CT in Hounsfield units -> [0, 255] through a window (level, width); default: abdomen W400/L40."""

    level: float = 40.0
    width: float = 400.0

    def window(self, image: np.ndarray) -> tuple[float, float]:
        return self.level - self.width / 2, self.level + self.width / 2

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return apply_window(image, self.window(image))


@dataclass(frozen=True)
class Percentiles:
    """MR (or any modality without absolute units) -> [0, 255] between two percentiles of the image."""

    low: float = 0.5
    high: float = 99.5

    def window(self, image: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(image, [self.low, self.high])
        return float(lo), float(hi)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return apply_window(image, self.window(image))


@dataclass(frozen=True)
class RGB:
    """8-bit photographs (fundus, dermoscopy): already in [0, 255]."""

    def window(self, image: np.ndarray) -> tuple[float, float]:
        return 0.0, 255.0

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return apply_window(image, self.window(image))


def apply_window(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Linear map of [low, high] onto [0, 255], clipped. A preset's window is fitted on the whole
    volume once (percentiles need all of it) and then applied slice by slice."""
    low, high = window
    scale = high - low if high > low else 1.0
    return (np.clip((image - low) / scale, 0.0, 1.0) * 255.0).astype(np.float32)


PRESETS = {"ct": CTWindow(), "mr": Percentiles(), "rgb": RGB()}


def intensity_preset(name: str):
    if name not in PRESETS:
        raise ImageError(f"unknown intensity preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# --- geometry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceGeometry:
    """Maps one H x W slice to the model's S x S input and back."""

    height: int
    width: int
    target: int

    @property
    def scale(self) -> float:
        return self.target / max(self.height, self.width)

    @property
    def resized(self) -> tuple[int, int]:
        """(rows, cols) of the slice inside the padded model input."""
        return int(self.height * self.scale + 0.5), int(self.width * self.scale + 0.5)

    def image_to_model(self, image: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) or (C, H, W) float -> same rank at (S, S): resize (bilinear), pad bottom/right."""
        squeeze = image.ndim == 3
        x = image[None] if squeeze else image
        rows, cols = self.resized
        x = F.interpolate(x, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, (0, self.target - cols, 0, self.target - rows))
        return x[0] if squeeze else x

    def logits_to_image(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, M, h, w) mask logits at any model-side resolution -> (N, M, H, W) on the slice grid."""
        x = F.interpolate(logits, size=(self.target, self.target), mode="bilinear", align_corners=False)
        rows, cols = self.resized
        x = x[..., :rows, :cols]
        return F.interpolate(x, size=(self.height, self.width), mode="bilinear", align_corners=False)

    def mask_to_model(self, mask: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
        """(N, M, H, W) slice-grid values -> (N, M, size, size) on the model grid (e.g. 256 for mask
        prompts); the padding gets `fill` (0 for masks, a very negative logit for mask prompts)."""
        rows, cols = self.resized
        f = size / self.target
        r, c = int(rows * f + 0.5), int(cols * f + 0.5)
        x = F.interpolate(mask, size=(r, c), mode="bilinear", align_corners=False)
        return F.pad(x, (0, size - c, 0, size - r), value=fill)

    def coords_to_model(self, xy: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., 2) pixel (x, y) -> model input (x, y)."""
        xy = torch.as_tensor(xy, dtype=torch.float32)
        rows, cols = self.resized
        return xy * torch.tensor([cols / self.width, rows / self.height])

    def coords_to_image(self, xy: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Inverse of coords_to_model."""
        xy = torch.as_tensor(xy, dtype=torch.float32)
        rows, cols = self.resized
        return xy * torch.tensor([self.width / cols, self.height / rows])

    def boxes_to_model(self, boxes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., 4) pixel (x0, y0, x1, y1) -> model input (x0, y0, x1, y1)."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        return self.coords_to_model(boxes.reshape(*boxes.shape[:-1], 2, 2)).reshape(boxes.shape)

    def boxes_to_image(self, boxes: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Inverse of boxes_to_model."""
        boxes = torch.as_tensor(boxes, dtype=torch.float32)
        return self.coords_to_image(boxes.reshape(*boxes.shape[:-1], 2, 2)).reshape(boxes.shape)


def slice_to_rgb(slice_2d: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, 3) intensity-mapped float -> (3, H, W) tensor."""
    x = torch.as_tensor(np.ascontiguousarray(slice_2d), dtype=torch.float32)
    if x.ndim == 2:
        return x.expand(3, -1, -1)
    if x.ndim == 3 and x.shape[-1] == 3:
        return x.permute(2, 0, 1)
    raise ImageError(f"a slice must be H x W or H x W x 3, got shape {tuple(x.shape)}")
