"""Simulated prompts for training: random and iterative clicks, jittered boxes (numpy, slice grid).

Clicks are (i, j, label) with i the column and j the row of a (J, I) slice, label 1 positive,
0 negative, as msa.engine takes them.
"""

from __future__ import annotations

import numpy as np

from msa.metrics import next_click


def random_clicks(mask: np.ndarray, rng: np.random.Generator, max_positive: int = 1,
                  negative_probability: float = 0.3) -> list[tuple[float, float, int]]:
    """1..max_positive positive clicks inside the mask, maybe one negative click near it."""
    rows, cols = np.nonzero(mask)
    picks = rng.choice(rows.size, size=int(rng.integers(1, max_positive + 1)), replace=False)
    clicks = [(float(cols[p]), float(rows[p]), 1) for p in picks]
    if rng.random() < negative_probability:
        box = jittered_box(mask, rng, 0.0, margin=5)
        i0, j0, i1, j1 = (int(v) for v in box)
        ring = np.zeros_like(mask)
        ring[j0:j1 + 1, i0:i1 + 1] = True
        ring &= ~mask
        rows, cols = np.nonzero(ring)
        if rows.size:
            p = int(rng.integers(rows.size))
            clicks.append((float(cols[p]), float(rows[p]), 0))
    return clicks


def corrective_click(prediction: np.ndarray, mask: np.ndarray) -> tuple[float, float, int] | None:
    """The next click a user makes: centre of the largest error region (positive if missed)."""
    spot = next_click(prediction, mask)
    if spot is None:
        return None
    (j, i), positive = spot
    return float(i), float(j), 1 if positive else 0


def jittered_box(mask: np.ndarray, rng: np.random.Generator, jitter: float = 0.1,
                 margin: int = 0) -> tuple[float, float, float, float]:
    """The mask's box (i0, j0, i1, j1), each side moved by up to jitter x its side length (+ margin)."""
    rows, cols = np.nonzero(mask)
    i0, i1, j0, j1 = cols.min(), cols.max(), rows.min(), rows.max()
    wi, wj = i1 - i0 + 1, j1 - j0 + 1
    d = rng.uniform(-jitter, jitter, size=4) * np.array([wi, wj, wi, wj])
    h, w = mask.shape
    return (float(np.clip(i0 + d[0] - margin, 0, w - 1)), float(np.clip(j0 + d[1] - margin, 0, h - 1)),
            float(np.clip(i1 + d[2] + margin, 0, w - 1)), float(np.clip(j1 + d[3] + margin, 0, h - 1)))
