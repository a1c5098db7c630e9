"""Intensity presets and the geometry between slice pixels and the model's square input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msa.transforms import CTWindow, Percentiles, SliceGeometry, slice_to_rgb


@pytest.mark.parametrize("shape", [(122, 101), (101, 122), (64, 64), (300, 37)])
def test_coords_and_boxes_round_trip(shape):
    """coords_to_model / coords_to_image and boxes_to_model / boxes_to_image are inverses, and
    the model side keeps the aspect ratio (longest side -> target)."""
    geometry = SliceGeometry(*shape, 256)
    h, w = shape
    rows, cols = geometry.resized
    assert max(rows, cols) == 256
    assert abs(rows - h * 256 / max(h, w)) <= 0.5 and abs(cols - w * 256 / max(h, w)) <= 0.5
    xy = np.array([[0.0, 0.0], [w - 1, h - 1], [w / 3, h / 2], [w, h]], dtype=np.float32)
    model_xy = geometry.coords_to_model(xy)
    torch.testing.assert_close(model_xy[-1], torch.tensor([float(cols), float(rows)]))
    torch.testing.assert_close(geometry.coords_to_image(model_xy), torch.from_numpy(xy), atol=1e-4, rtol=1e-6)
    boxes = np.array([[3, 5, w - 4, h - 6], [0, 0, w / 2, h / 3]], dtype=np.float32)
    model_boxes = geometry.boxes_to_model(boxes)
    torch.testing.assert_close(model_boxes[:, :2], geometry.coords_to_model(boxes[:, :2]))
    torch.testing.assert_close(model_boxes[:, 2:], geometry.coords_to_model(boxes[:, 2:]))
    torch.testing.assert_close(geometry.boxes_to_image(model_boxes), torch.from_numpy(boxes), atol=1e-4, rtol=1e-6)


def test_mask_survives_image_to_model_and_back():
    """A rectangle on a non-square 122 x 101 slice, resized and padded to 256 and brought back
    with logits_to_image, keeps Dice > 0.98 and its bounding box within one pixel."""
    geometry = SliceGeometry(122, 101, 256)
    mask = np.zeros((122, 101), dtype=bool)
    mask[30:91, 20:71] = True
    model_side = geometry.image_to_model(torch.from_numpy(mask).float()[None])  # (1, 256, 256)
    assert model_side.shape == (1, 256, 256)
    rows, cols = geometry.resized
    assert (rows, cols) == (256, 212)
    assert model_side[:, :, cols:].abs().max() == 0  # padding on the right
    for size in (256, 64):  # full resolution and the decoder's low-res logits
        logits = torch.nn.functional.interpolate(model_side[None], size=(size, size), mode="bilinear",
                                                 align_corners=False)
        back = geometry.logits_to_image(logits - 0.5)[0, 0].numpy() > 0
        assert back.shape == (122, 101)
        dice = 2 * (back & mask).sum() / (back.sum() + mask.sum())
        assert dice > 0.98, (size, dice)
        r, c = np.nonzero(back)
        assert abs(r.min() - 30) <= 1 and abs(r.max() - 90) <= 1
        assert abs(c.min() - 20) <= 1 and abs(c.max() - 70) <= 1


def test_ct_window_maps_its_edges_to_0_and_255():
    """W400 / L40: -160 HU -> 0, 240 HU -> 255, the level -> 127.5, clipped outside."""
    window = CTWindow()
    assert (window.level, window.width) == (40.0, 400.0)
    hu = np.array([-1000, -160, 40, 240, 1000], dtype=np.int16)
    np.testing.assert_allclose(window(hu), [0.0, 0.0, 127.5, 255.0, 255.0], atol=1e-4)
    assert window(hu).dtype == np.float32
    bone = CTWindow(level=400, width=1800)
    np.testing.assert_allclose(bone(np.array([-500.0, 1300.0])), [0.0, 255.0], atol=1e-4)


def test_percentiles_map_to_0_255():
    """MR-style scaling: output in [0, 255], reaching both ends; a constant image does not divide by 0."""
    image = np.random.default_rng(0).gamma(2.0, 100.0, size=(50, 60))
    out = Percentiles()(image)
    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 255.0
    assert (out == 0).mean() == pytest.approx(0.005, abs=0.002)
    assert np.all(np.isfinite(Percentiles()(np.full((4, 4), 7.0))))


def test_slice_to_rgb():
    """(H, W) -> 3 equal channels; (H, W, 3) -> channels first."""
    gray = np.arange(6, dtype=np.float32).reshape(2, 3)
    rgb = slice_to_rgb(gray)
    assert rgb.shape == (3, 2, 3) and all(torch.equal(rgb[c], torch.from_numpy(gray)) for c in range(3))
    color = np.random.default_rng(0).random((2, 3, 3)).astype(np.float32)
    assert torch.equal(slice_to_rgb(color), torch.from_numpy(color).permute(2, 0, 1))


def test_mask_to_model_pads_with_fill_not_with_the_mask():
    """A mask covering its whole slice must not spill into the padding (training targets)."""
    geometry = SliceGeometry(101, 122, 256)  # taller padding below the resized slice
    full = torch.ones(1, 1, 101, 122)
    out = geometry.mask_to_model(full, 256)
    rows, cols = geometry.resized
    assert out[..., :rows, :cols].min() == 1 and out[..., rows:, :].max() == 0
    assert geometry.mask_to_model(full, 256, fill=-20.0)[..., rows:, :].max() == -20.0
