"""The decode policy, per call: click refinement (a click-only prompt decoded again with the box of its
mask) and SAM's multimask answer to a lone click."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import msa.engine as engine_module
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
    for j in range(2, 22, 4):
        for i in range(2, 30, 4):
            points = [(float(i), float(j), 1)]
            logits, _ = engine.predict(volume, 1, points=points, refine_clicks=False)
            if (logits > 0).any() and not (logits > 0).all():
                return points, logits
    raise AssertionError("the tiny model gave no partial mask for any click")


def _refinement_chain(engine: Engine, volume, points, first: np.ndarray, rounds: int) -> list[tuple]:
    """The boxes refinement decodes with, by hand: each the box of the previous answer, until one repeats."""
    boxes, logits = [], first
    while len(boxes) < rounds:
        box = clicked_box(logits > 0, points, margin=REFINE_MARGIN)
        if box is None or (boxes and box == boxes[-1]):
            break
        boxes.append(box)
        logits, _ = engine.predict(volume, 1, points=points, box=box)
    return boxes


def test_click_only_prompts_are_refined_with_the_first_masks_box(tiny_model, tiny_volume):
    torch.manual_seed(0)
    engine = Engine(tiny_model)
    points, first = _nonempty_click(engine, tiny_volume)
    box = clicked_box(first > 0, points, margin=REFINE_MARGIN)
    expected, expected_iou = engine.predict(tiny_volume, 1, points=points, box=box)
    refined, iou = engine.predict(tiny_volume, 1, points=points)  # refined by default, one round
    np.testing.assert_array_equal(refined, expected)
    assert iou == expected_iou
    assert not np.array_equal(refined, first)
    # An explicit box or a mask input is the user's own prompt: no refinement then.
    given = (0.0, 0.0, 10.0, 10.0)
    plain = engine.predict(tiny_volume, 1, points=points, box=given, refine_clicks=False)[0]
    np.testing.assert_array_equal(engine.predict(tiny_volume, 1, points=points, box=given)[0], plain)


def test_refinement_rounds_decode_with_the_box_of_the_previous_mask(tiny_model, tiny_volume, monkeypatch):
    """With REFINE_ROUNDS = 3 (bench/refine_rounds.py measures rounds): a lone click is decoded with the box of
    the previous answer, round after round, until the box repeats; corrective clicks get
    CORRECTIVE_REFINE_ROUNDS rounds."""
    monkeypatch.setattr(engine_module, "REFINE_ROUNDS", 3)
    engine = Engine(tiny_model)
    # a click whose refinement takes more than one round (one round would fail this test)
    for points in ([(float(i), float(j), 1)] for j in range(2, 22, 4) for i in range(2, 30, 4)):
        first, _ = engine.predict(tiny_volume, 1, points=points, refine_clicks=False)
        boxes = _refinement_chain(engine, tiny_volume, points, first, 3)
        if len(boxes) > 1:
            break
    assert len(boxes) > 1, "no click of the tiny model needs a second round"
    expected, expected_iou = engine.predict(tiny_volume, 1, points=points, box=boxes[-1])
    one_round, _ = engine.predict(tiny_volume, 1, points=points, box=boxes[0])
    refined, iou = engine.predict(tiny_volume, 1, points=points)
    np.testing.assert_array_equal(refined, expected)
    assert iou == expected_iou
    assert not np.array_equal(refined, one_round)
    # two clicks: CORRECTIVE_REFINE_ROUNDS (1) round
    clicks = points + [(points[0][0] + 4, points[0][1], 0)]
    first, _ = engine.predict(tiny_volume, 1, points=clicks, refine_clicks=False)
    box = clicked_box(first > 0, clicks, margin=REFINE_MARGIN)
    np.testing.assert_array_equal(engine.predict(tiny_volume, 1, points=clicks)[0],
                                  engine.predict(tiny_volume, 1, points=clicks, box=box)[0])


def test_refinement_reuses_the_embedding_without_a_cache(tiny_model, tiny_volume):
    engine = Engine(tiny_model, use_cache=False)
    points, _ = _nonempty_click(engine, tiny_volume)
    before = engine.encoded_slices
    engine.predict(tiny_volume, 1, points=points)
    assert engine.encoded_slices == before + 1  # two decodes, one encoder pass


def test_a_lone_click_gets_multimask_unless_the_single_mask_output_was_fine_tuned(tiny_model, tiny_volume, tmp_path):
    """None (the default) means: SAM's three candidates for a bare or only pretrained model, the single-mask
    output for adapters from MSA fine-tuning (their file records "training"). Per call, never engine state."""
    from msa.checkpoint import load_adapters, save_adapters

    engine = Engine(tiny_model)
    click = [(12.0, 9.0, 1)]
    multi = engine.predict(tiny_volume, 1, points=click, multimask_output=True, refine_clicks=False)[0]
    single = engine.predict(tiny_volume, 1, points=click, multimask_output=False, refine_clicks=False)[0]
    assert not np.array_equal(multi, single)  # else this test could not tell the policies apart
    assert not tiny_model.single_mask_trained
    np.testing.assert_array_equal(engine.predict(tiny_volume, 1, points=click, refine_clicks=False)[0], multi)
    # two clicks, a box or a mask input are not ambiguous: one mask, whatever multimask_output says
    two = click + [(20.0, 15.0, 0)]
    np.testing.assert_array_equal(engine.predict(tiny_volume, 1, points=two, multimask_output=True, refine_clicks=False)[0],
                                  engine.predict(tiny_volume, 1, points=two, multimask_output=False, refine_clicks=False)[0])

    pretrained, fine_tuned = tmp_path / "pretrained.pt", tmp_path / "fine_tuned.pt"
    save_adapters(tiny_model, pretrained, extra={"pretraining": {"steps": 1}})
    save_adapters(tiny_model, fine_tuned, extra={"training": {"step": 1}})
    try:
        load_adapters(tiny_model, pretrained)
        assert not tiny_model.single_mask_trained
        np.testing.assert_array_equal(engine.predict(tiny_volume, 1, points=click, refine_clicks=False)[0], multi)
        load_adapters(tiny_model, fine_tuned)
        assert tiny_model.single_mask_trained
        np.testing.assert_array_equal(engine.predict(tiny_volume, 1, points=click, refine_clicks=False)[0], single)
    finally:
        tiny_model.adapters_meta = None  # the session-wide fixture (same weights: the files hold them unchanged)


def test_prompt_tensors_batch_rows_decode_as_each_prompt_alone(tiny_model):
    """prompt_tensors (the prompt path of Engine._decode and Trainer._decode): each row of a batch decodes exactly as
    that slice's prompt alone, as the engine sends it; mixed click counts are refused, because padding
    with label -1 adds a "not a point" token that changes the answer (measured below)."""
    from msa.engine import prompt_tensors
    from msa.transforms import SliceGeometry

    cpu = torch.device("cpu")
    geometries = [SliceGeometry(24, 32, 64), SliceGeometry(40, 20, 64)]
    clicks = [[(10.0, 5.0, 1), (3.0, 20.0, 0)], [(7.0, 30.0, 1), (15.0, 2.0, 1)]]
    boxes = [(2.0, 1.0, 30.0, 20.0), (1.0, 4.0, 18.0, 36.0)]
    points, box = prompt_tensors(geometries, clicks, boxes, cpu)
    assert points[0].shape == (2, 2, 2) and points[1].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    np.testing.assert_allclose(points[0][1, 0].numpy(), geometries[1].coords_to_model([7.0, 30.0]).numpy())
    np.testing.assert_allclose(box[1].numpy(), geometries[1].boxes_to_model(boxes[1]).numpy())
    with torch.no_grad():
        embeddings = tiny_model.encode(torch.rand(2, 3, tiny_model.img_size, tiny_model.img_size) * 255)
        batched, _ = tiny_model.decode(embeddings, points, box)
        for b in range(2):
            alone = prompt_tensors(geometries[b:b + 1], clicks[b:b + 1], boxes[b:b + 1], cpu)
            torch.testing.assert_close(batched[b:b + 1], tiny_model.decode(embeddings[b:b + 1], *alone)[0],
                                       atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="one click count"):
            prompt_tensors(geometries, [clicks[0], clicks[1][:1]], None, cpu)
        # why: the same one click, padded with a label -1 point, is another prompt
        one = prompt_tensors(geometries[1:], [clicks[1][:1]], None, cpu)[0]
        padded = (torch.cat([one[0], torch.zeros(1, 1, 2)], 1), torch.cat([one[1], -torch.ones(1, 1)], 1))
        assert not torch.allclose(tiny_model.decode(embeddings[1:], one)[0], tiny_model.decode(embeddings[1:], padded)[0],
                                  atol=1e-3)
