"""Dice, IoU and HD95 (through MONAI's metrics) and NoC, the number of clicks to reach a Dice."""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from scipy import ndimage


def _onehot(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).float()[None, None]


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    return float(compute_dice(_onehot(pred), _onehot(ref), ignore_empty=False)[0, 0])


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    return float(compute_iou(_onehot(pred), _onehot(ref), ignore_empty=False)[0, 0])


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th-percentile Hausdorff distance (in the units of `spacing`, voxels if None).

    0 when both masks are empty, inf when exactly one is.
    """
    if not pred.any() and not ref.any():
        return 0.0
    if not pred.any() or not ref.any():
        return math.inf
    with warnings.catch_warnings():  # MONAI warns about its own deprecated internal argument
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(_onehot(pred), _onehot(ref), percentile=95,
                                           spacing=list(spacing) if spacing else None)
    return float(value[0, 0])


def scores(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...] | None = None) -> dict[str, float]:
    return {"dice": dice(pred, ref), "iou": iou(pred, ref), "hd95": hd95(pred, ref, spacing)}


def next_click(pred: np.ndarray, ref: np.ndarray) -> tuple[tuple[int, ...], bool] | None:
    """The simulated user's next click: the interior-most voxel of the largest error region.

    Returns (index, positive) — positive when the region is missed structure (false negative) —
    or None when the prediction is already exact.
    """
    best = None
    for positive, error in ((True, ref & ~pred), (False, pred & ~ref)):
        regions, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = ndimage.sum_labels(error, regions, index=range(1, count + 1))
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            region = regions == largest
            inside = ndimage.distance_transform_edt(np.pad(region, 1))[tuple(slice(1, -1) for _ in region.shape)]
            best = (sizes[largest - 1], tuple(int(v) for v in np.unravel_index(np.argmax(inside), region.shape)),
                    positive)
    return None if best is None else (best[1], best[2])


def simulate_clicks(
    click: Callable[[tuple[int, ...], bool], np.ndarray],
    ref: np.ndarray,
    targets: tuple[float, ...] = (),
    keep_after: int = 1,
    max_clicks: int = 20,
    first: tuple[tuple[int, ...], bool] | None = None,
) -> tuple[np.ndarray, dict[float, int]]:
    """A simulated user: each click at the centre of the largest error region (`first` overrides the
    first one). click(index, positive) adds one click and returns the new prediction.

    Returns the prediction after `keep_after` clicks (or the last one, if the mask became exact
    sooner) and {target: clicks until Dice >= target}, max_clicks when never reached (the usual
    NoC convention). Clicking stops once every target is reached and keep_after clicks are made.
    """
    pred = np.zeros_like(ref, dtype=bool)
    kept, reached = None, {}
    for n in range(1, max_clicks + 1):
        spot = first if n == 1 and first is not None else next_click(pred, ref)
        if spot is None:  # exact after n - 1 clicks (0 for an empty reference): every target is reached
            reached.update({t: n - 1 for t in targets if t not in reached})
            break
        pred = click(*spot)
        if n == keep_after:
            kept = pred
        score = dice(pred, ref)
        reached.update({t: n for t in targets if t not in reached and score >= t})
        if n >= keep_after and len(reached) == len(targets):
            break
    return (pred if kept is None else kept), {t: reached.get(t, max_clicks) for t in targets}


def number_of_clicks(
    click: Callable[[tuple[int, ...], bool], np.ndarray], ref: np.ndarray, target: float, max_clicks: int = 20
) -> int:
    """NoC@target: clicks until Dice >= target (max_clicks when never); see simulate_clicks."""
    return simulate_clicks(click, ref, (target,), max_clicks=max_clicks)[1][target]
