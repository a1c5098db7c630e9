"""Session: prompt validation (PromptError, session left untouched), ROI normalisation, label maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import msa
from msa.engine import Engine
from msa.io import Volume
from msa.modeling.build import default_adapters
from msa.session import ADAPTERS_WALK, BACKBONE_WALK, Session, Walk, propagation_defaults, slice_dice

# tiny_volume: 6 slices of 24 rows x 32 columns -> shape_ijk (32, 24, 6)


@pytest.fixture
def session(tiny_model, tiny_volume):
    return Session(Engine(tiny_model), tiny_volume)


def test_volume_shape(tiny_volume):
    assert tiny_volume.shape_ijk == (32, 24, 6)


@pytest.mark.parametrize("point", [
    (-1, 5, 2), (-0.5, 5, 2), (32, 5, 2), (31.5, 5, 2),  # i
    (5, -1, 2), (5, 24, 2), (5, 23.01, 2),  # j
    (5, 5, -1), (5, 5, 6), (5, 5, 100),  # k
])
def test_point_outside_the_image(session, point):
    with pytest.raises(msa.PromptError, match="outside the image"):
        session.add_point(point)
    assert session.tracks == {} and session.engine.encoded_slices == 0


@pytest.mark.parametrize("point", [(5, 5, 2.5), (5, 5, 0.1)])
def test_point_k_must_be_a_slice_index(session, point):
    with pytest.raises(msa.PromptError, match="slice index"):
        session.add_point(point)
    assert session.tracks == {}


@pytest.mark.parametrize("point", [(math.nan, 5, 2), (5, math.inf, 2), (5, 5, math.nan), (5, 5), (5, 5, 2, 1), ()])
def test_point_malformed(session, point):
    with pytest.raises(msa.PromptError, match="three finite"):
        session.add_point(point)
    assert session.tracks == {}


def test_point_on_the_last_voxel_is_accepted(session):
    session.add_point((31, 23, 5), propagate=False)  # the far corner; float k = 5.0 is a slice index too
    session.add_point((0.0, 0.0, 5.0), positive=False, propagate=False)
    seed = session.tracks[1].seeds[5]
    assert seed.points == [(31.0, 23.0, 1), (0.0, 0.0, 0)]
    assert session.engine.encoded_slices == 1


@pytest.mark.parametrize("roi", [
    [1, 10, 1, 10, 0],  # five numbers
    [1, 10, 1, 10, 0, 3, 4],  # seven
    [1, 10, 1, math.nan, 0, 3],
])
def test_roi_malformed(session, roi):
    with pytest.raises(msa.PromptError, match="six finite"):
        session.add_roi(roi)
    assert session.tracks == {}


@pytest.mark.parametrize("roi", [
    [40, 50, 1, 10, 0, 3],  # i beyond the image
    [-10, -2, 1, 10, 0, 3],  # i before it
    [1, 10, 30, 40, 0, 3],  # j
    [1, 10, 1, 10, 7, 9],  # k
    [1, 10, 1, 10, -5, -1],
])
def test_roi_entirely_outside(session, roi):
    with pytest.raises(msa.PromptError, match="outside the image"):
        session.add_roi(roi)
    assert session.tracks == {} and session.engine.encoded_slices == 0


@pytest.mark.parametrize("roi", [
    [5, 5, 1, 10, 0, 3],  # zero width in i
    [1, 10, 7, 7, 0, 3],  # in j
    [31, 40, 1, 10, 0, 3],  # zero width once clipped to the image
])
def test_roi_zero_width(session, roi):
    with pytest.raises(msa.PromptError, match="empty"):
        session.add_roi(roi)
    assert session.tracks == {}


def test_roi_pairs_are_sorted(tiny_model, tiny_volume):
    engine = Engine(tiny_model)
    a, b = Session(engine, tiny_volume), Session(engine, tiny_volume)
    a.add_roi([5, 20, 4, 18, 1, 4])
    b.add_roi([20, 5, 18, 4, 4, 1])
    for s in (a, b):
        track = s.tracks[1]
        assert track.roi_box == (5, 4, 20, 18) and track.k_range == (1, 4)
        assert sorted(track.seeds) == [2] and track.seeds[2].box == (5, 4, 20, 18)
    np.testing.assert_array_equal(a.mask(1), b.mask(1))
    assert a.tracks[1].boxes == b.tracks[1].boxes
    assert not a.mask(1)[[0, 5]].any()  # propagation stays inside the ROI's slices
    assert engine.encoded_slices == 4  # the ROI's slices, once, shared by both sessions


def test_roi_is_clipped_to_the_image(session):
    session.add_roi([-5, 40, 2, 100, -3, 10], propagate=False)
    track = session.tracks[1]
    assert track.roi_box == (0, 2, 31, 23) and track.k_range == (0, 5)
    assert sorted(track.seeds) == [2]


def test_2d_box_is_one_seed(session):
    """A 2D box (k0 == k1) adds a seed on its slice; it does not narrow the label to that slice."""
    session.add_roi([3, 12, 4, 9, 3, 3], propagate=False)
    track = session.tracks[1]
    assert track.k_range == (0, session.shape_kji[0] - 1) and sorted(track.seeds) == [3]
    assert track.seeds[3].box == (3, 4, 12, 9)
    assert set(track.masks) == {3}
    session.add_roi([3, 12, 4, 9, 1, 1], propagate=False)
    assert sorted(track.seeds) == [1, 3]  # a second box keeps the first


def test_add_mask_shape_is_checked(session):
    with pytest.raises(msa.PromptError):
        session.add_mask(np.zeros((6, 32, 24), dtype=bool))


# -- label maps ---------------------------------------------------------------------------------


def block(shape, ks, js, is_):
    m = np.zeros(shape, dtype=bool)
    m[ks, js, is_] = True
    return m


def test_label_map_second_label_does_not_overwrite(session):
    shape = (6, 24, 32)
    first = block(shape, slice(1, 4), slice(2, 10), slice(2, 12))
    second = block(shape, slice(2, 5), slice(6, 14), slice(8, 20))
    session.add_mask(first, label=1)
    session.add_mask(second, label=2)
    np.testing.assert_array_equal(session.mask(1), first)
    np.testing.assert_array_equal(session.mask(2), second)

    out = session.label_map()
    assert out.dtype == np.uint16
    expected = np.zeros(shape, dtype=np.uint16)
    expected[first] = 1
    expected[second & ~first] = 2
    np.testing.assert_array_equal(out, expected)

    over = session.label_map(overwrite=True)
    expected = np.zeros(shape, dtype=np.uint16)
    expected[first] = 1
    expected[second] = 2
    np.testing.assert_array_equal(over, expected)


def test_label_map_preserves_the_base(session):
    shape = (6, 24, 32)
    mask = block(shape, slice(0, 3), slice(0, 8), slice(0, 8))
    session.add_mask(mask, label=1)
    base = np.zeros(shape, dtype=np.int64)
    base[0:2, 4:12, 4:12] = 7  # another structure, overlapping the new mask
    base[5, 20:, 20:] = 1  # this label elsewhere in the base stays
    kept = base.copy()

    out = session.label_map(base)
    expected = base.astype(np.uint16)
    expected[mask & (base == 0)] = 1
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(base, kept)  # the caller's array is not modified

    over = session.label_map(base, overwrite=True)
    expected = base.astype(np.uint16)
    expected[mask] = 1
    np.testing.assert_array_equal(over, expected)


def test_reset_and_unknown_labels(session):
    shape = (6, 24, 32)
    session.add_mask(block(shape, 1, slice(0, 5), slice(0, 5)), label=3)
    session.add_mask(block(shape, 2, slice(0, 5), slice(0, 5)), label=4)
    assert not session.mask(9).any() and 9 not in session.tracks
    session.reset(3)
    assert sorted(session.tracks) == [4]
    assert set(np.unique(session.label_map()).tolist()) == {0, 4}
    session.reset()
    assert session.tracks == {} and not session.label_map().any()


def test_propagation_defaults_follow_the_model(tiny_volume):
    """Trained adapters walk with a tight margin and stop at a higher predicted IoU; the backbone alone walks
    with room (measured: msa.session). A session takes them unless told otherwise."""
    backbone = msa.build_model("lite_medsam")
    shipped = msa.build_model("lite_medsam", adapters=default_adapters("lite_medsam"))
    assert backbone.adapters_add_nothing() and not shipped.adapters_add_nothing()
    assert propagation_defaults(backbone) == BACKBONE_WALK == (3, 0.5, 0, 0)
    assert propagation_defaults(shipped) == ADAPTERS_WALK == (1, 0.6, 0.3, 0.5)
    assert Session(Engine(shipped), tiny_volume).walk == ADAPTERS_WALK
    told = Session(Engine(shipped), tiny_volume, margin=2, stop_iou=0.3, stop_overlap=0.1)
    assert told.walk == Walk(margin=2, stop_iou=0.3, stop_area=0.3, stop_overlap=0.1)


@pytest.mark.parametrize("stop", ["stop_area", "stop_overlap"])
def test_a_walk_stops_at_the_first_slice_that_meets_a_stop(stop):
    """Without an ROI a walk ends at the first slice whose mask is smaller than stop_area times the largest mask on
    that walk so far (the seed's included), or overlaps its neighbour's (Dice) less than stop_overlap, and drops
    that slice; up to there it is the walk without the stop. Checked against the same walk run without the stops
    (this random model's masks vary in size and place from slice to slice)."""
    torch.manual_seed(2)
    engine = Engine(msa.build_model("vit_tiny", pretrained=False))
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 50, (16, 40, 48)).astype(np.float32), sitk.Image(48, 40, 16, sitk.sitkFloat32), "ct")
    # Here the area stop ends one walk on the seed's mask and the other on a larger one's; the overlap stop
    # ends one walk on its first slice and the other on its second.
    seed, value = 9, {"stop_area": 0.9, "stop_overlap": 0.65}[stop]
    no_stops = {"stop_iou": 0.0, "stop_area": 0.0, "stop_overlap": 0.0}
    free = Session(engine, volume, **no_stops)
    free.add_point((14, 16, seed))
    masks = free.mask()
    assert masks.any(axis=(1, 2)).all()  # without the stops the walk reaches both ends of the image

    expected = np.zeros(len(masks), dtype=bool)
    expected[seed] = True
    for step in (-1, 1):
        largest, k = masks[seed].sum(), seed + step
        while 0 <= k < len(masks):
            area, overlap = masks[k].sum(), slice_dice(masks[k], masks[k - step])
            if (area < value * largest) if stop == "stop_area" else (overlap < value):
                break
            expected[k], largest, k = True, max(largest, area), k + step
    assert 1 < expected.sum() < len(masks) - 1  # the stop cuts a walk, and not at its first slice

    stopped = Session(engine, volume, **{**no_stops, stop: value})
    stopped.add_point((14, 16, seed))
    assert np.array_equal(stopped.mask().any(axis=(1, 2)), expected)
    assert np.array_equal(stopped.mask()[expected], masks[expected])

    inside = Session(engine, volume, **{**no_stops, stop: value})
    inside.add_roi([0, 47, 0, 39, 0, 15])  # an ROI says where the structure is: the stops do not apply
    assert inside.mask().any(axis=(1, 2)).all()
