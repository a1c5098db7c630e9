"""`msa eval`: segmentation quality under a fixed prompting protocol, with a report a person can read.

Protocols
- box:      every axial slice holding the structure, prompted with its tight bounding box;
- click1:   the same slices, one positive click at the structure's interior-most pixel;
- click3:   click1 plus two corrective clicks, each at the centre of the largest error region;
- roi:      the structure's 3D bounding box, propagated through the volume (3D Dice);
- 3d-click: one click at the structure's interior-most voxel, propagated (3D Dice).
2D protocols score each slice and average over slices; 3D ones score each volume.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from . import metrics
from .data import Case, Source, Structures
from .engine import Engine
from .errors import MSAError
from .io import load_image, resample_labels_to, reslice
from .modeling.targets import canonical_name
from .names import PROTOCOLS
from .overlay import save_overlay
from .session import Session

MIN_SLICE_VOXELS = 10  # smaller cross-sections are the structure's tips: too few pixels to score


def interior_point(mask: np.ndarray) -> tuple[int, ...]:
    """The voxel farthest from the mask's border (the simulated user's first click)."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1))[tuple(slice(1, -1) for _ in mask.shape)]
    return tuple(int(v) for v in np.unravel_index(np.argmax(depth), mask.shape))


def _worst_hd95(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """HD95 of an empty prediction: the image diagonal (keeps means finite and JSON valid)."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _score(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> dict[str, float]:
    out = metrics.scores(pred, ref, spacing)
    if not math.isfinite(out["hd95"]):
        out["hd95"] = _worst_hd95(ref.shape, spacing)
    return out


NOC_TARGETS = (0.85, 0.90)


class _SliceClicker:
    """Simulated clicks on one slice: keeps the click list, returns the engine's mask after each."""

    def __init__(self, engine: Engine, volume, k: int, refine_clicks: bool = True, target: str | None = None) -> None:
        self.engine, self.volume, self.k, self.points = engine, volume, k, []
        self.refine_clicks, self.target = refine_clicks, target

    def __call__(self, index: tuple[int, int], positive: bool) -> np.ndarray:
        j, i = index
        self.points.append((float(i), float(j), 1 if positive else 0))
        logits, _ = self.engine.predict(self.volume, self.k, points=self.points, refine_clicks=self.refine_clicks,
                                        target=self.target)
        return logits > 0


def evaluate(
    engine: Engine,
    source: Source | list[Case],
    protocol: str,
    labels: str | None = None,
    noc: bool = False,
    report_dir: Path | None = None,
    overlays_per_case: int = 4,
    refine_clicks: bool = True,
    named: bool = False,
    walk: dict | None = None,
) -> dict:
    """Score `protocol` on every case and structure of `source` (or of plain cases, with `labels`);
    returns the JSON-ready summary. refine_clicks: as Engine.predict's, for the slice click protocols.
    named: every prompt of a structure whose name the adapters learnt (engine.model.targets) also names it,
    as a target prompt; other structures get plain prompts (what the Slicer extension sends).
    walk: the 3D protocols' propagation settings as Session's keywords (margin, stop_iou, stop_area,
    stop_overlap); those not given are the model's (msa.session.propagation_defaults)."""
    if protocol not in PROTOCOLS:
        raise MSAError(f"unknown prompt protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if named and not engine.model.targets:
        raise MSAError("named prompts need adapters with target prompts (msa train --target-probability)")
    if not isinstance(source, Source):
        source = Source("data", list(source), labels=labels)
    source.check_labels_present()
    per_label: dict[str, list[dict]] = {}
    overlays: list[str] = []
    for case in source.cases:
        volume = load_image(case.image, modality=source.preset)
        ref_map = resample_labels_to(case.labels, volume)  # by world coordinates: any orientation
        structures = source.structures(case, set(np.unique(ref_map).tolist()))
        for axis in source.axes:
            view, view_map = reslice(volume, ref_map, axis)
            _evaluate_volume(engine, view, view_map, structures, protocol, source.stride, noc, per_label,
                             case.name + ("" if axis == "k" else f"_{axis}"), report_dir, overlays, overlays_per_case,
                             refine_clicks, named, walk or {})
    summary = _summarise(protocol, per_label, len(source.cases))
    summary["named"] = sorted(label for label in per_label if named and canonical_name(label) in engine.model.targets)
    summary["encoded_slices"] = engine.encoded_slices
    if report_dir is not None:
        summary["overlays"] = overlays
        (report_dir / "report.md").write_text(markdown_table(summary))
    return summary


def _evaluate_volume(engine: Engine, volume, ref_map: np.ndarray, structures: Structures, protocol: str,
                     stride: int, noc: bool, per_label: dict[str, list[dict]], name: str,
                     report_dir: Path | None, overlays: list[str], overlays_per_case: int, refine_clicks: bool,
                     named: bool, walk: dict) -> None:
    """Score every structure of one volume (as sliced for this protocol) into per_label."""
    spacing_kji = tuple(reversed(volume.geometry.GetSpacing()))
    scored = np.nonzero((ref_map > 0).any(axis=(1, 2)))[0][::stride]  # the slices 2D protocols may score
    masks = {label: np.isin(ref_map, ids) for label, ids in structures.items()}
    if protocol in ("box", "click1", "click3"):
        slices = sorted({int(k) for ref in masks.values() for k in scored[ref[scored].sum(axis=(1, 2)) >= MIN_SLICE_VOXELS]})
        engine.embeddings(volume, slices)  # all at once, in batches, with a progress bar
    shown = 0
    for label, ref in tqdm(masks.items(), desc=name, unit="label", disable=not engine.progress):
        if not ref.any():
            continue
        target = label if named and canonical_name(label) in engine.model.targets else None
        if protocol in ("roi", "3d-click"):
            session = Session(engine, volume, **walk)
            session.set_target(target)
            if protocol == "roi":
                kk, jj, ii = np.nonzero(ref)
                session.add_roi([ii.min(), ii.max(), jj.min(), jj.max(), kk.min(), kk.max()])
                clicks = []
            else:
                k, j, i = interior_point(ref)
                session.add_point((i, j, k))
                clicks = [(i, j, k, 1)]
            pred = session.mask(1)
            per_label.setdefault(label, []).append(_score(pred, ref, spacing_kji))
            if report_dir is not None and shown < overlays_per_case:
                k = interior_point(ref)[0]
                overlays.append(str(save_overlay(
                    report_dir / f"{name}_{label}_k{k}.png", volume, k, ref[k], pred[k],
                    [c[:2] + (c[3],) for c in clicks if c[2] == k], box=session.tracks[1].boxes.get(k))))
                shown += 1
            continue
        for k in scored[ref[scored].sum(axis=(1, 2)) >= MIN_SLICE_VOXELS]:
            ref_k = ref[k]
            row = {}
            box = None
            if protocol == "box":
                jj, ii = np.nonzero(ref_k)
                box = (ii.min(), jj.min(), ii.max(), jj.max())
                pred = engine.predict(volume, k, box=box, target=target)[0] > 0
                points = []
            else:
                # One simulated user serves the protocol and NoC: same click sequence.
                clicker = _SliceClicker(engine, volume, k, refine_clicks, target)
                clicks = 3 if protocol == "click3" else 1
                pred, reached = metrics.simulate_clicks(clicker, ref_k, NOC_TARGETS if noc else (), clicks,
                                                        first=(interior_point(ref_k), True))
                points = clicker.points[:clicks]
                row.update({f"noc{round(100 * t)}": n for t, n in reached.items()})
            row.update(_score(pred, ref_k, spacing_kji[1:]))
            per_label.setdefault(label, []).append(row)
            if report_dir is not None and shown < overlays_per_case and k == interior_point(ref)[0]:
                overlays.append(str(save_overlay(report_dir / f"{name}_{label}_k{k}.png", volume, k,
                                                 ref_k, pred, points, box=box)))
                shown += 1


def _summarise(protocol: str, per_label: dict[str, list[dict]], n_cases: int) -> dict:
    table = {}
    for name, rows in per_label.items():
        table[name] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
        table[name]["n"] = len(rows)
    if not table:
        raise MSAError("no structure to evaluate: the chosen labels are absent or too small")
    out = {"protocol": protocol, "cases": n_cases, "per_label": table}
    for key in ("dice", "iou", "hd95", "noc85", "noc90"):
        if key in next(iter(table.values())):
            out[f"mean_{key}"] = float(np.mean([row[key] for row in table.values()]))
    return out


def markdown_table(summary: dict) -> str:
    keys = [k for k in ("dice", "iou", "hd95", "noc85", "noc90") if f"mean_{k}" in summary]
    named = f" (named: {', '.join(summary['named'])})" if summary.get("named") else ""
    lines = [f"Protocol `{summary['protocol']}`{named}, {summary['cases']} case(s); "
             f"n = {'slices' if summary['protocol'] in ('box', 'click1', 'click3') else 'volumes'}.", "",
             "| label | " + " | ".join(keys) + " | n |", "|---" * (len(keys) + 2) + "|"]
    for name, row in summary["per_label"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + f" | {row['n']} |")
    lines.append("| **mean** | " + " | ".join(f"**{summary[f'mean_{k}']:.3f}**" for k in keys) + " | |")
    return "\n".join(lines) + "\n"
