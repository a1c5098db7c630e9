"""Segmentation quality with the real LiteMedSAM weights on real CT: the spleen, with boxes.

An untrained MSA is LiteMedSAM (see test_model), so it must reach LiteMedSAM's zero-shot quality:
measured once at mean Dice 0.92 for the spleen with tight per-slice boxes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

CHUNK = 4  # slices per encoder pass


@pytest.fixture(scope="module")
def spleen_predictions(lite_medsam, spleen_slices):
    """Every spleen slice encoded once (chunks of 4), decoded with its tight box, on the slice grid."""
    embeddings = []
    with torch.inference_mode():
        for start in range(0, len(spleen_slices.images), CHUNK):
            embeddings.append(lite_medsam.encode(spleen_slices.images[start : start + CHUNK]))
        logits, iou = lite_medsam.decode(torch.cat(embeddings), boxes=spleen_slices.boxes)
        masks = spleen_slices.geometry.logits_to_image(logits)[:, 0] > 0
    return masks.numpy(), iou[:, 0]


def test_spleen_dice_with_boxes(spleen_slices, spleen_predictions, capsys):
    """Mean Dice >= 0.88 over the 30 axial slices holding spleen (label 1), W400/L40, tight boxes."""
    predicted, iou = spleen_predictions
    reference = spleen_slices.masks
    assert predicted.shape == reference.shape == (30, 122, 101)
    dice = 2 * (predicted & reference).sum(axis=(1, 2)) / (predicted.sum(axis=(1, 2)) + reference.sum(axis=(1, 2)))
    with capsys.disabled():
        print()
        for k, d, q, area in zip(spleen_slices.ks, dice, iou.tolist(), reference.sum(axis=(1, 2))):
            print(f"slice {k:2d}: spleen {int(area):3d} px, Dice {d:.3f}, predicted IoU {q:.3f}")
        print(f"spleen, {len(dice)} slices: mean Dice {dice.mean():.4f}, min {dice.min():.3f}")
    assert dice.mean() >= 0.88
    assert np.median(dice) >= 0.88
