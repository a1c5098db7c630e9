"""An interactive segmentation session on one image: prompts in, slice-coherent masks out.

Vocabulary (as in nnInteractive): add_point, add_roi, add_mask, reset, then read mask(label) or
label_map(). Coordinates are voxel indices [i, j, k] of the image as stored; slices run along k.

3D propagation. Each label keeps its prompted ("seed") slices. A seed is segmented from its own
prompts; every other slice is prompted with the bounding box (+margin) of its neighbour's mask,
walking away from the seeds in both directions:
- between two seeds the walk comes from both ends and never stops (if a neighbour's mask is
  empty, the box is interpolated between the two seeds' boxes), so the gap is never left empty;
- beyond the outermost seeds it stops where the structure ends (an empty mask; without an ROI,
  also a low-confidence one, one shrunk to a sliver of the walk's largest, or one that has moved off
  its neighbour's: see Walk) or at the ROI's first/last slice;
- a correction on one slice walks outward from it only while the masks it produces differ from
  the ones already there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .engine import Engine
from .errors import MSAError, PromptError
from .io import Volume

Box = tuple[float, float, float, float]  # (i0, j0, i1, j1) on one slice, inclusive voxel indices

class Walk(NamedTuple):
    """How a walk away from the seeds goes: the margin in voxels added around the neighbour's mask box for the
    next slice's box, and where a walk without an ROI ends (inside an ROI it ends at the ROI's slices only)."""

    margin: int
    stop_iou: float  # the predicted IoU falls below this
    stop_area: float  # the mask is smaller than this fraction of the largest mask on the walk so far
    stop_overlap: float  # the mask overlaps its neighbour's (Dice) less than this

    def ends_at(self, mask: np.ndarray, iou: float, prev: np.ndarray, largest: int) -> bool:
        """Whether a walk without an ROI ends at this slice's mask (`prev`: the neighbour's mask, whose box
        prompted it; `largest`: the pixels of the walk's largest mask so far)."""
        return (iou < self.stop_iou or int(mask.sum()) < self.stop_area * largest
                or slice_dice(mask, prev) < self.stop_overlap)

    def checked(self) -> Walk:
        """This walk, or an MSAError naming the setting that is out of range."""
        if not (isinstance(self.margin, (int, np.integer)) and self.margin >= 0):
            raise MSAError(f"the propagation margin must be a whole number of voxels >= 0, got {self.margin!r}")
        for name in ("stop_iou", "stop_area", "stop_overlap"):
            if not 0 <= getattr(self, name) <= 1:
                raise MSAError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        return self


# The walk each model goes best with, measured on BTCV validation with 3D Dice (README, "The propagation margin"
# and "Where a 3D click's walk stops"; `python bench/paper_table.py --protocols roi,3d-click`):
# - margin: trained adapters follow a box closely, so a looser box lets their mask leak further on every slice:
#   margin 1 / 2 / 3 / 6 gave 3D click 0.585 / 0.544 / 0.434 / 0.228, ROI 0.706 / 0.705 / 0.699 / 0.684. The
#   backbone alone needs room: ROI 0.640 / 0.685 / 0.710 / 0.723, and 3 kept the sample CT's spleen (3 mm voxels)
#   at 0.964 where 1 gave 0.525.
# - stops: the adapters' walks ran on past their structures (by up to 34 slices at an end on average) into the
#   next one. Stop IoU 0.3 / 0.5 / 0.6 / 0.7 gave 3D click 0.482 / 0.585 / 0.620 / 0.626 (0.7 cut the liver
#   short). A mask shrunk to a sliver of the walk's largest, or one that has moved off its neighbour, is the
#   next structure's edge, not this one's: the area and overlap stops (chosen on BTCV training cases,
#   `python bench/walk_stops.py`) gave 0.656, and CHAOS MR validation 0.696 -> 0.783.
#   The backbone's stops were not measured again: as they were, IoU only.
ADAPTERS_WALK = Walk(margin=1, stop_iou=0.6, stop_area=0.3, stop_overlap=0.5)
BACKBONE_WALK = Walk(margin=3, stop_iou=0.5, stop_area=0.0, stop_overlap=0.0)


def propagation_defaults(model) -> Walk:
    """The walk a model goes best with: the backbone's while its adapters add nothing, else the adapters'."""
    return BACKBONE_WALK if model.adapters_add_nothing() else ADAPTERS_WALK


@dataclass
class SeedPrompt:
    points: list[tuple[float, float, int]] = field(default_factory=list)  # (i, j, 1 positive | 0 negative)
    box: Box | None = None


@dataclass
class Track:
    """One label's prompts and current masks."""

    k_range: tuple[int, int]
    roi_box: Box | None = None
    seeds: dict[int, SeedPrompt] = field(default_factory=dict)
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # k -> bool (J, I)
    boxes: dict[int, Box] = field(default_factory=dict)  # k -> the box prompt slice k was given
    target: str | None = None  # the structure's name, sent with every prompt of this label (a target prompt)


def mask_box(mask: np.ndarray) -> Box | None:
    """(i0, j0, i1, j1) of a (J, I) mask, or None when empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())


def slice_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


class Session:
    """Prompts and results for one image; the engine behind it caches the image's embeddings."""

    def __init__(self, engine: Engine, volume: Volume, margin: int | None = None, min_pixels: int = 4,
                 stop_iou: float | None = None, stop_area: float | None = None, stop_overlap: float | None = None,
                 unchanged_dice: float = 0.98) -> None:
        self.engine = engine
        self.volume = volume
        given = Walk(margin, stop_iou, stop_area, stop_overlap)._asdict()  # see Walk; None: the model's default
        self.walk = propagation_defaults(engine.model)._replace(
            **{key: value for key, value in given.items() if value is not None}).checked()
        self.min_pixels = min_pixels  # a smaller mask means the structure has ended
        self.unchanged_dice = unchanged_dice  # a re-propagated slice this close to before: stop
        self.tracks: dict[int, Track] = {}
        self.decoded = 0  # engine.predict calls so far: what a prompt cost in decoder work (the server reports it)

    # -- prompts ---------------------------------------------------------------------------------

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return self.volume.voxels.shape[:3]

    def _track(self, label: int) -> Track:
        if label not in self.tracks:
            self.tracks[label] = Track(k_range=(0, self.shape_kji[0] - 1))
        return self.tracks[label]

    def add_point(self, ijk: tuple[float, float, float], positive: bool = True, label: int = 1,
                  propagate: bool = True) -> None:
        """A click at voxel [i, j, k]; corrects slice k and re-propagates as far as that changes masks."""
        i, j, k = self._check_point(ijk)
        track = self._track(label)
        seed = track.seeds.get(k)
        if seed is None:
            # A click on a propagated slice keeps the box that slice already had.
            seed = track.seeds[k] = SeedPrompt(box=track.boxes.get(k))
        seed.points.append((i, j, 1 if positive else 0))
        self._update_from(track, k, propagate)

    def add_roi(self, roi: list[float], label: int = 1, propagate: bool = True) -> None:
        """A 3D box [i0, i1, j0, j1, k0, k1] (Slicer's layout; each pair sorted): the structure lies inside.

        The middle slice becomes a seed prompted with the ROI's cross-section; propagation stays
        inside the ROI. With k0 == k1 it is a 2D box: one more seed on that slice, and the label's
        other seeds and extent stay (two boxes far apart fill the slices between them).
        """
        i0, i1, j0, j1, k0, k1 = self._check_roi(roi)
        track = self._track(label)
        if k0 == k1:
            track.seeds.setdefault(k0, SeedPrompt()).box = (i0, j0, i1, j1)
            self._run(track, propagate)
            return
        track.k_range, track.roi_box = (k0, k1), (i0, j0, i1, j1)
        for k in [k for k in track.masks if not k0 <= k <= k1]:
            del track.masks[k]
        for k in [k for k in track.seeds if not k0 <= k <= k1]:
            del track.seeds[k]
        mid = (k0 + k1) // 2
        track.seeds.setdefault(mid, SeedPrompt()).box = (i0, j0, i1, j1)
        if propagate:  # encode the ROI's slices in batches up front rather than one by one
            self.engine.embeddings(self.volume, list(range(k0, k1 + 1)))
        self._run(track, propagate)

    def set_target(self, name: str | None, label: int = 1, propagate: bool = True) -> None:
        """Name what this label is ("liver", "brain"): every prompt of it then carries the name, one of the
        adapters' target names (engine.model.targets). Prompts already given are segmented again."""
        if name is not None:
            self.engine.model.target_row(name)  # PromptError for a name the adapters did not learn
        track = self._track(label)
        track.target = name
        if track.seeds:
            self._run(track, propagate)

    def add_mask(self, mask: np.ndarray, label: int = 1) -> None:
        """A previous result (K, J, I) for this label, to be corrected by later clicks."""
        if mask.shape != self.shape_kji:
            raise PromptError(f"mask shape {mask.shape} does not match the image {self.shape_kji}")
        track = self._track(label)
        track.masks = {k: mask[k].astype(bool) for k in range(mask.shape[0]) if mask[k].any()}
        track.boxes = {k: self._grow(mask_box(m), track) for k, m in track.masks.items()}

    def reset(self, label: int | None = None) -> None:
        if label is None:
            self.tracks.clear()
        else:
            self.tracks.pop(label, None)

    # -- results ---------------------------------------------------------------------------------

    def mask(self, label: int = 1) -> np.ndarray:
        """(K, J, I) bool mask of one label."""
        out = np.zeros(self.shape_kji, dtype=bool)
        for k, m in self._track(label).masks.items() if label in self.tracks else ():
            out[k] = m
        return out

    def label_map(self, base: np.ndarray | None = None, overwrite: bool = False) -> np.ndarray:
        """All labels painted into `base` (or zeros); voxels of another label stay unless overwrite."""
        out = np.zeros(self.shape_kji, dtype=np.uint16) if base is None else base.astype(np.uint16).copy()
        for label in sorted(self.tracks):
            m = self.mask(label)
            free = m if overwrite else m & ((out == 0) | (out == label))
            out[free] = label
        return out

    # -- validation ------------------------------------------------------------------------------

    def _check_point(self, ijk) -> tuple[float, float, int]:
        if len(ijk) != 3 or not all(np.isfinite(float(v)) for v in ijk):
            raise PromptError(f"a point needs three finite voxel indices [i, j, k], got {list(ijk)}")
        i, j, k = (float(v) for v in ijk)
        ni, nj, nk = self.volume.shape_ijk
        if not (0 <= i <= ni - 1 and 0 <= j <= nj - 1 and 0 <= k <= nk - 1):
            raise PromptError(f"point [{i:g}, {j:g}, {k:g}] lies outside the image (size {ni} x {nj} x {nk})")
        if k != int(k):
            raise PromptError(f"point [{i:g}, {j:g}, {k:g}]: k must be a slice index")
        return i, j, int(k)

    def _check_roi(self, roi) -> tuple[int, int, int, int, int, int]:
        if len(roi) != 6 or not all(np.isfinite(float(v)) for v in roi):
            raise PromptError(f"an ROI needs six finite voxel indices [i0, i1, j0, j1, k0, k1], got {list(roi)}")
        sizes = self.volume.shape_ijk
        out = []
        for axis, (a, b) in enumerate(zip(roi[0::2], roi[1::2])):
            lo, hi = sorted((float(a), float(b)))
            lo, hi = max(lo, 0.0), min(hi, sizes[axis] - 1.0)
            if hi < lo:
                raise PromptError(f"ROI {list(roi)} lies outside the image (size {' x '.join(map(str, sizes))})")
            out += [int(round(lo)), int(round(hi))]
        i0, i1, j0, j1, k0, k1 = out
        if i0 == i1 or j0 == j1:
            raise PromptError(f"ROI {list(roi)} is empty: it must span more than one voxel in i and in j")
        return i0, i1, j0, j1, k0, k1

    # -- propagation -----------------------------------------------------------------------------

    def _grow(self, box: Box | None, track: Track) -> Box | None:
        """A mask box plus the margin, clipped to the ROI (if any) and the image."""
        if box is None:
            return None
        ni, nj, _ = self.volume.shape_ijk
        lo_i, lo_j, hi_i, hi_j = track.roi_box or (0, 0, ni - 1, nj - 1)
        m = self.walk.margin
        return (max(box[0] - m, lo_i), max(box[1] - m, lo_j), min(box[2] + m, hi_i), min(box[3] + m, hi_j))

    def _segment(self, track: Track, k: int, box: Box | None, points=None) -> tuple[np.ndarray, float]:
        if box is None and not any(p[2] == 1 for p in points or ()):
            return np.zeros(self.shape_kji[1:], dtype=bool), 0.0  # nothing says where the structure is
        self.decoded += 1
        logits, iou = self.engine.predict(self.volume, k, points=points or None, box=box, target=track.target)
        return logits > 0, iou

    def _segment_seed(self, track: Track, k: int) -> None:
        seed = track.seeds[k]
        mask, _ = self._segment(track, k, seed.box, seed.points)
        track.masks[k] = mask
        if seed.box is not None:
            track.boxes[k] = seed.box

    def _step(self, track: Track, k: int, prev: np.ndarray, fallback: Box | None) -> tuple[np.ndarray, float]:
        """Segment slice k from its neighbour's mask (or the fallback box when that is empty)."""
        box = self._grow(mask_box(prev), track) or fallback
        if box is None:
            return np.zeros_like(prev), 0.0
        track.boxes[k] = box
        return self._segment(track, k, box)

    def _ended(self, track: Track, mask: np.ndarray, iou: float, prev: np.ndarray, largest: int) -> bool:
        """The structure has ended: an (almost) empty mask, or, without an ROI, one that meets a stop of
        self.walk (Walk.ends_at).

        Inside an ROI the user has said the structure spans the ROI's slices, so only an empty mask stops
        the walk there (the structure's tips have small, low-confidence masks).
        """
        if int(mask.sum()) < self.min_pixels:
            return True
        return track.roi_box is None and self.walk.ends_at(mask, iou, prev, largest)

    def _run(self, track: Track, propagate: bool) -> None:
        """Segment every seed, fill the gaps between seeds, extend beyond the outermost ones."""
        seeds = sorted(track.seeds)
        for k in seeds:
            self._segment_seed(track, k)
        if not propagate:
            return
        for a, b in zip(seeds, seeds[1:]):
            self._fill_gap(track, a, b)
        self._extend(track, seeds[0], -1)
        self._extend(track, seeds[-1], +1)

    def _interpolated_box(self, track: Track, a: int, b: int, k: int) -> Box | None:
        box_a, box_b = mask_box(track.masks[a]), mask_box(track.masks[b])
        if box_a is None or box_b is None:
            return self._grow(box_a or box_b, track)
        t = (k - a) / (b - a)
        return self._grow(tuple((1 - t) * x + t * y for x, y in zip(box_a, box_b)), track)

    def _fill_gap(self, track: Track, a: int, b: int) -> None:
        """Slices strictly between seeds a < b, walking in from both ends alternately."""
        lo, hi = a + 1, b - 1
        while lo <= hi:
            mask, _ = self._step(track, lo, track.masks[lo - 1], self._interpolated_box(track, a, b, lo))
            track.masks[lo] = mask
            lo += 1
            if lo <= hi:
                mask, _ = self._step(track, hi, track.masks[hi + 1], self._interpolated_box(track, a, b, hi))
                track.masks[hi] = mask
                hi -= 1

    def _extend(self, track: Track, start: int, step: int, only_changes: bool = False) -> None:
        """Walk away from seed `start` until the structure ends, the ROI ends or a seed is reached.

        only_changes: stop as soon as a slice comes out (nearly) as it was. When the structure ends
        sooner than before, the older masks further out are cleared.
        """
        lo, hi = track.k_range
        k, prev = start + step, track.masks[start]
        largest = int(prev.sum())  # the walk's largest mask so far
        seeds = sorted(track.seeds)
        while lo <= k <= hi and k not in track.seeds:
            a = max((s for s in seeds if s < k), default=None)
            b = min((s for s in seeds if s > k), default=None)
            inside_gap = a is not None and b is not None
            fallback = self._interpolated_box(track, a, b, k) if inside_gap else None
            mask, iou = self._step(track, k, prev, fallback)
            if not inside_gap and self._ended(track, mask, iou, prev, largest):
                # The structure ends here: drop what older propagation left further out.
                while lo <= k <= hi and k not in track.seeds:
                    track.masks.pop(k, None)
                    track.boxes.pop(k, None)
                    k += step
                return
            old = track.masks.get(k)
            track.masks[k] = mask
            if only_changes and old is not None and slice_dice(old, mask) >= self.unchanged_dice:
                return
            prev, k, largest = mask, k + step, max(largest, int(mask.sum()))

    def _update_from(self, track: Track, k: int, propagate: bool) -> None:
        """After a new prompt on slice k: re-segment it, then re-propagate both ways while masks change."""
        if len(track.seeds) == 1 and len(track.masks) <= 1:
            self._run(track, propagate)  # the first prompt of this label
            return
        self._segment_seed(track, k)
        if propagate:
            self._extend(track, k, -1, only_changes=True)
            self._extend(track, k, +1, only_changes=True)
