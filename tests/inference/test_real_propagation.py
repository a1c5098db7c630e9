"""Real LiteMedSAM weights on the real abdominal CT: ROI propagation, corrections, DICOM geometry.

Every test here uses the folder's one shared engine (conftest.real_engine), so each CT slice is
encoded once for all of them.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from msa.evaluate import interior_point
from msa.io import load_image, resample_labels_to, save_labels
from msa.metrics import dice
from msa.session import Session, mask_box

from inference_helpers import LIVER, SPLEEN, roi_of


def test_spleen_roi_propagated_3d_dice(real_engine, ct_volume, ct_reference, spleen_roi):
    before = real_engine.encoded_slices
    session = Session(real_engine, ct_volume)
    session.add_roi(spleen_roi, label=SPLEEN)
    n_roi = spleen_roi[5] - spleen_roi[4] + 1
    assert real_engine.encoded_slices - before <= n_roi  # each ROI slice encoded at most once
    ref = ct_reference == SPLEEN
    pred = session.mask(SPLEEN)
    assert dice(pred, ref) >= 0.85  # measured 0.964
    assert pred.any(axis=(1, 2)).all()  # the spleen is on all 30 slices, and so is the mask
    # Each slice away from the seed was prompted with its neighbour's mask box widened by the margin, within the ROI.
    track = session.tracks[SPLEEN]
    assert session.walk.margin == 3  # the backbone's (msa.session.propagation_defaults)
    (seed,) = track.seeds
    for k, box in track.boxes.items():
        if k != seed:
            i0, j0, i1, j1 = mask_box(track.masks[k - 1 if k > seed else k + 1])
            assert box == (max(i0 - 3, spleen_roi[0]), max(j0 - 3, spleen_roi[2]),
                           min(i1 + 3, spleen_roi[1]), min(j1 + 3, spleen_roi[3])), f"slice {k}"
    labels = session.label_map()
    assert set(np.unique(labels).tolist()) == {0, SPLEEN}
    np.testing.assert_array_equal(labels == SPLEEN, pred)
    # The same ROI in a new session on the same engine: no encoder pass, the same masks.
    again = Session(real_engine, ct_volume)
    encoded = real_engine.encoded_slices
    again.add_roi(spleen_roi, label=SPLEEN)
    assert real_engine.encoded_slices == encoded
    np.testing.assert_array_equal(again.mask(SPLEEN), pred)


def test_two_2d_boxes_fill_the_slices_between_them(real_engine, ct_volume, ct_reference, spleen_session):
    """Boxes (ROIs with k0 == k1) on the 2nd and the 2nd-to-last spleen slices, each propagated:
    every slice between them that holds spleen gets a mask (the module docstring's gap rule)."""
    ref = ct_reference == SPLEEN
    ks = np.nonzero(ref.any(axis=(1, 2)))[0]
    a, b = int(ks[1]), int(ks[-2])
    assert b - a >= 20
    session = Session(real_engine, ct_volume)
    for k in (a, b):
        i0, i1, j0, j1, _, _ = roi_of(ref[k:k + 1])
        session.add_roi([i0, i1, j0, j1, k, k], label=SPLEEN, propagate=True)
    pred = session.mask(SPLEEN)
    for k in range(a, b + 1):
        if ref[k].any():
            assert pred[k].any(), f"slice {k} between the boxed slices {a} and {b} was left empty"
    assert dice(pred[a:b + 1], ref[a:b + 1]) >= 0.8  # 0.96 when both boxes are kept as seeds


def test_a_click_repropagates_only_while_masks_change(real_engine, ct_volume, ct_reference, spleen_roi,
                                                      spleen_session, monkeypatch):
    session = Session(real_engine, ct_volume)
    session.add_roi(spleen_roi, label=SPLEEN)  # embeddings cached by spleen_session: decoder only
    before = session.mask(SPLEEN).copy()
    np.testing.assert_array_equal(before, spleen_session.mask(SPLEEN))

    calls: list[int] = []
    predict = real_engine.predict

    def counting(volume, k, *args, **kwargs):
        calls.append(k)
        return predict(volume, k, *args, **kwargs)

    monkeypatch.setattr(real_engine, "predict", counting)
    ref = ct_reference == SPLEEN
    k_click = 20  # not the ROI's seed slice (14)
    j, i = interior_point(ref[k_click])
    encoded = real_engine.encoded_slices
    session.add_point((i, j, k_click), positive=True, label=SPLEEN)
    after = session.mask(SPLEEN)

    n_roi = spleen_roi[5] - spleen_roi[4] + 1
    assert calls and calls[0] == k_click
    assert len(calls) < n_roi // 2  # measured: 3 (the clicked slice and one neighbour each way)
    assert real_engine.encoded_slices == encoded
    reach = len(calls)
    far = [k for k in range(n_roi) if abs(k - k_click) > reach]
    assert len(far) >= 10
    for k in far:
        np.testing.assert_array_equal(after[k], before[k], err_msg=f"slice {k}, far from the click, changed")
    changed = {k for k in range(n_roi) if not np.array_equal(after[k], before[k])}
    assert changed <= set(calls)
    assert 20 in session.tracks[SPLEEN].seeds and 14 in session.tracks[SPLEEN].seeds
    assert dice(after, ref) >= 0.85


def test_dicom_liver_in_world_coordinates(real_engine, shared_data, tmp_path):
    folder = shared_data / "ct_abdomen_dicom"
    ref_path = shared_data / "ct_abdomen_dicom_labels.nii.gz"
    volume = load_image(folder)
    assert volume.voxels.shape == (20, 512, 512)
    ref = resample_labels_to(ref_path, volume) == LIVER
    roi = roi_of(ref)
    session = Session(real_engine, volume)
    session.add_roi(roi, label=LIVER)
    out = save_labels(session.label_map(), volume, tmp_path / "liver.nii.gz")

    written = sitk.ReadImage(str(out))
    pred = sitk.GetArrayFromImage(written) == LIVER
    reference = sitk.ReadImage(str(ref_path))
    on_grid = sitk.Resample(reference, written, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            reference.GetPixelID())
    world = dice(pred, sitk.GetArrayFromImage(on_grid) == LIVER)
    assert world >= 0.8  # measured 0.976
    # The trap: the reference is stored in RAS, the series in LPS. Same array shape, flipped axes.
    raw_ref = sitk.GetArrayFromImage(reference) == LIVER
    assert raw_ref.shape == pred.shape
    raw = dice(pred, raw_ref)
    assert raw < 0.7 and raw < world - 0.3  # measured 0.53
