"""Click refinement: a click-only prompt is decoded again with the box of its first mask."""

from __future__ import annotations

import numpy as np
import torch

from msa.engine import REFINE_MARGIN, Engine, clicked_box


def test_clicked_box_takes_the_parts_under_positive_clicks():
    mask = np.zeros((20, 30), bool)
    mask[2:6, 3:9] = True  # a small part
    mask[10:18, 15:28] = True  # the largest part
    assert clicked_box(mask, [(4, 3, 1)]) == (3, 2, 8, 5)
    assert clicked_box(mask, [(4, 3, 1), (20, 12, 1)]) == (3, 2, 27, 17)  # both parts clicked: both
    # no positive click on the mask (a negative one on a part does not count): the largest part
    assert clicked_box(mask, [(0, 0, 1), (4, 3, 0)]) == (15, 10, 27, 17)
    assert clicked_box(mask, [(99, -5, 1)]) == (15, 10, 27, 17)  # off-image clicks are clamped, not errors
    assert clicked_box(np.zeros((5, 5), bool), [(1, 1, 1)]) is None
    # a margin widens each side by that share of the box's width / height, within the image
    assert clicked_box(mask, [(20, 12, 1)], margin=0.5) == (9.0, 6.5, 29.0, 19.0)


def _nonempty_click(engine: Engine, volume) -> tuple[list, np.ndarray]:
    """A click whose first (unrefined) mask is not empty, on slice 1, and that mask's logits."""
    engine.refine_clicks = False
    for j in range(2, 22, 4):
        for i in range(2, 30, 4):
            points = [(float(i), float(j), 1)]
            logits, _ = engine.predict(volume, 1, points=points)
            if (logits > 0).any() and not (logits > 0).all():
                return points, logits
    raise AssertionError("the tiny model gave no partial mask for any click")


def test_click_only_prompts_are_refined_with_the_first_masks_box(tiny_model, tiny_volume):
    torch.manual_seed(0)
    engine = Engine(tiny_model)
    points, first = _nonempty_click(engine, tiny_volume)
    box = clicked_box(first > 0, points, margin=REFINE_MARGIN)
    expected, expected_iou = engine.predict(tiny_volume, 1, points=points, box=box)
    engine.refine_clicks = True
    refined, iou = engine.predict(tiny_volume, 1, points=points)
    np.testing.assert_array_equal(refined, expected)
    assert iou == expected_iou
    assert not np.array_equal(refined, first)
    # An explicit box or a mask input is the user's own prompt: no refinement then.
    given = (0.0, 0.0, 10.0, 10.0)
    engine.refine_clicks = False
    plain = engine.predict(tiny_volume, 1, points=points, box=given)[0]
    engine.refine_clicks = True
    np.testing.assert_array_equal(engine.predict(tiny_volume, 1, points=points, box=given)[0], plain)


def test_refinement_reuses_the_embedding_without_a_cache(tiny_model, tiny_volume):
    engine = Engine(tiny_model, use_cache=False)
    points, _ = _nonempty_click(engine, tiny_volume)
    engine.refine_clicks = True
    before = engine.encoded_slices
    engine.predict(tiny_volume, 1, points=points)
    assert engine.encoded_slices == before + 1  # two decodes, one encoder pass
