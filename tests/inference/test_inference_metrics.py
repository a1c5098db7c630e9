"""msa.metrics on hand-made masks with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from msa import metrics


def test_dice_and_iou():
    ref = np.zeros((4, 4), dtype=bool)
    ref[0, :] = True  # 4 voxels
    pred = np.zeros((4, 4), dtype=bool)
    pred[0, :2] = True  # 2 of them
    pred[3, 3] = True  # + 1 false positive
    assert metrics.dice(pred, ref) == pytest.approx(2 * 2 / (3 + 4))
    assert metrics.iou(pred, ref) == pytest.approx(2 / 5)
    assert metrics.dice(ref, ref) == pytest.approx(1.0)
    assert metrics.dice(~ref, ref) == pytest.approx(0.0)


def test_dice_empty_cases():
    empty = np.zeros((3, 5, 5), dtype=bool)
    some = empty.copy()
    some[1, 2, 2] = True
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.iou(empty, empty) == 1.0
    assert metrics.dice(some, empty) == 0.0
    assert metrics.dice(empty, some) == 0.0


@pytest.mark.parametrize("spacing, expected", [
    (None, 2.0),
    ((3.0, 1.0, 1.0), 6.0),  # the shift is along axis 0
    ((1.0, 2.0, 2.0), 2.0),
])
def test_hd95_single_voxels_with_spacing(spacing, expected):
    pred = np.zeros((6, 5, 5), dtype=bool)
    ref = pred.copy()
    pred[1, 2, 2] = True
    ref[3, 2, 2] = True
    assert metrics.hd95(pred, ref, spacing) == pytest.approx(expected)


def test_hd95_anisotropic_diagonal():
    pred = np.zeros((5, 6, 7), dtype=bool)
    ref = pred.copy()
    pred[0, 0, 0] = True
    ref[2, 0, 3] = True  # 2 voxels along k, 3 along i
    assert metrics.hd95(pred, ref, (2.5, 1.0, 0.5)) == pytest.approx(math.hypot(2 * 2.5, 3 * 0.5))


def test_hd95_is_symmetric_and_ignores_the_farthest_5_percent():
    # ref: a 40-voxel row; pred: the same row plus one far outlier voxel. The outlier is 1 of 41 surface
    # voxels of pred (< 5 %), so the 95th percentile ignores it: HD95 0, while the maximum would be 10.
    ref = np.zeros((1, 12, 40), dtype=bool)
    ref[0, 0, :] = True
    pred = ref.copy()
    pred[0, 10, 0] = True
    assert metrics.hd95(pred, ref) == pytest.approx(0.0)
    assert metrics.hd95(ref, pred) == pytest.approx(0.0)


def test_hd95_empty_cases():
    empty = np.zeros((2, 4, 4), dtype=bool)
    some = empty.copy()
    some[0, 1, 1] = True
    assert metrics.hd95(empty, empty) == 0.0
    assert metrics.hd95(some, empty) == math.inf
    assert metrics.hd95(empty, some, (1.0, 2.0, 3.0)) == math.inf


def test_scores_keys():
    a = np.zeros((3, 3), dtype=bool)
    a[1, 1] = True
    assert metrics.scores(a, a, (1.0, 1.0)) == {"dice": pytest.approx(1.0), "iou": pytest.approx(1.0),
                                                "hd95": pytest.approx(0.0)}


# -- the simulated user ---------------------------------------------------------------------------


def test_next_click_goes_to_the_larger_missed_region():
    ref = np.zeros((12, 12), dtype=bool)
    pred = ref.copy()
    ref[1:6, 1:6] = True  # a missed 5 x 5 square (false negative, 25 voxels)
    pred[8:11, 8:11] = True  # a 3 x 3 false positive (9 voxels)
    assert metrics.next_click(pred, ref) == ((3, 3), True)  # the square's centre, positive


def test_next_click_goes_to_the_larger_false_positive():
    ref = np.zeros((12, 12), dtype=bool)
    pred = ref.copy()
    ref[0:2, 0:2] = True  # a missed 4 voxels
    pred[4:11, 3:10] = True  # a 7 x 7 false positive
    assert metrics.next_click(pred, ref) == ((7, 6), False)


def test_next_click_inside_a_partly_right_mask_in_3d():
    ref = np.zeros((5, 9, 9), dtype=bool)
    ref[1:4, 1:8, 1:8] = True
    pred = ref.copy()
    pred[1:4, 3:6, 1:4] = False  # the prediction misses a 3 x 3 x 3 block at the left edge
    index, positive = metrics.next_click(pred, ref)
    assert positive is True
    assert index == (2, 4, 2)
    assert ref[index] and not pred[index]


def test_next_click_none_when_exact():
    ref = np.zeros((4, 4), dtype=bool)
    ref[1:3, 1:3] = True
    assert metrics.next_click(ref.copy(), ref) is None
    assert metrics.next_click(np.zeros_like(ref), np.zeros_like(ref)) is None


def test_number_of_clicks_with_a_fake_user():
    ref = np.zeros((20, 20), dtype=bool)
    ref[1:4, 1:4] = True  # 9 voxels
    ref[10:12, 10:12] = True  # 4
    ref[17, 17] = True  # 1
    regions, _ = ndimage.label(ref)
    clicks = []
    pred = np.zeros_like(ref)

    def click(index, positive):  # a perfect model: a positive click fills the region it lands in
        clicks.append((index, positive))
        if positive:
            pred[regions == regions[index]] = True
        return pred.copy()

    # Dice after 1, 2, 3 clicks: 18/23 = 0.78, 26/27 = 0.96, 1.0
    assert metrics.number_of_clicks(click, ref, 0.9) == 2
    assert clicks == [((2, 2), True), ((10, 10), True)]
    pred[:] = False
    clicks.clear()
    assert metrics.number_of_clicks(click, ref, 1.0) == 3
    assert [c[0] for c in clicks] == [(2, 2), (10, 10), (17, 17)]
    pred[:] = False
    assert metrics.number_of_clicks(click, ref, 0.5) == 1


def test_number_of_clicks_caps_at_max_clicks():
    ref = np.zeros((6, 6), dtype=bool)
    ref[2:4, 2:4] = True
    calls = []

    def useless(index, positive):
        calls.append(index)
        return np.zeros_like(ref)

    assert metrics.number_of_clicks(useless, ref, 0.85, max_clicks=7) == 7
    assert len(calls) == 7


class _ScriptedModel:
    """A model whose answer after its n-th click is fixed in advance: the top rows[n] rows of a 10 x 10
    square, so its Dice is known, 2 r / (r + 10). It records where the simulated user clicked."""

    def __init__(self, rows: list[int]) -> None:
        self.ref = np.zeros((20, 20), dtype=bool)
        self.ref[5:15, 5:15] = True
        self.rows, self.clicks, self.answers = rows, [], []

    def __call__(self, index, positive):
        self.clicks.append((index, positive))
        assert len(self.clicks) <= len(self.rows), "the simulated user clicked past the script"
        pred = np.zeros_like(self.ref)
        pred[5:5 + self.rows[len(self.clicks) - 1], 5:15] = True
        self.answers.append(pred)
        return pred.copy()


DICE_OF_ROWS = {3: 6 / 13, 7: 14 / 17, 8: 16 / 18, 9: 18 / 19, 10: 1.0}


def test_simulated_user_noc85_noc90_from_one_click_sequence():
    """NoC@85 and NoC@90 exactly, as `msa eval --noc` counts them: Dice after clicks 1..4 is
    0.46, 0.82, 0.89, 0.95, so 0.85 is first reached at click 3 and 0.90 at click 4; the user stops there."""
    model = _ScriptedModel([3, 7, 8, 9, 10])
    for rows, expected in DICE_OF_ROWS.items():
        pred = np.zeros_like(model.ref)
        pred[5:5 + rows, 5:15] = True
        assert metrics.dice(pred, model.ref) == pytest.approx(expected, abs=1e-6)
    pred, noc = metrics.simulate_clicks(model, model.ref, (0.85, 0.90), keep_after=1, first=((9, 9), True))
    assert noc == {0.85: 3, 0.90: 4}
    assert len(model.clicks) == 4  # no click after every target is reached
    np.testing.assert_array_equal(pred, model.answers[0])  # the protocol's mask: after click 1 (click1)
    assert model.clicks[0] == ((9, 9), True)  # `first` is the first click
    # then the centre of the largest error region: the missed rows 8-14, positive
    assert model.clicks[1] == ((11, 8), True)
    for (index, positive), before in zip(model.clicks[1:], model.answers):
        assert positive and model.ref[index] and not before[index]


def test_simulated_user_noc_counts_the_first_click_that_reaches_the_target():
    """Dice 0.89, then 0.46, then 0.95: NoC@85 is 1 (a later drop does not undo it), NoC@90 is 3."""
    model = _ScriptedModel([8, 3, 9])
    _, noc = metrics.simulate_clicks(model, model.ref, (0.85, 0.90))
    assert noc == {0.85: 1, 0.90: 3}
    assert len(model.clicks) == 3


def test_simulated_user_keeps_clicking_for_the_protocol_and_caps_noc():
    """click3 keeps the mask after 3 clicks even when the targets were reached sooner; a target never
    reached counts max_clicks, and the user clicks max_clicks times."""
    model = _ScriptedModel([7, 9, 8])
    pred, noc = metrics.simulate_clicks(model, model.ref, (0.85, 0.90), keep_after=3)
    assert noc == {0.85: 2, 0.90: 2}
    assert len(model.clicks) == 3
    np.testing.assert_array_equal(pred, model.answers[2])

    model = _ScriptedModel([8] * 5)  # Dice 0.89 after every click
    _, noc = metrics.simulate_clicks(model, model.ref, (0.85, 0.90), max_clicks=5)
    assert noc == {0.85: 1, 0.90: 5}
    assert len(model.clicks) == 5


def test_number_of_clicks_zero_for_an_empty_reference():
    ref = np.zeros((5, 5), dtype=bool)
    assert metrics.number_of_clicks(lambda *a: pytest.fail("no click expected"), ref, 0.9) == 0
