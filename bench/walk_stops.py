"""Where a 3D click's walk should stop: 3D Dice of stop settings, each on the same walks.

    python bench/walk_stops.py [--adapters FILE [--three-d]] [--cache-dir DIR] [--walks DIR]
                               [--sources btcv-chosen,btcv-validation,chaos-validation]

A walk's mask on a slice depends only on its neighbour's mask, so a stricter stop only cuts a walk
short. One permissive walk per structure (one click at its interior-most voxel, as `msa eval --prompt
3d-click`; stop IoU 0.3, no other stop) is run and stored under --walks; every stop setting in SETTINGS is
then scored on it exactly, as msa.session would walk (msa.session.Walk.ends_at), without encoding or
decoding again. A rerun with the walks stored only scores.

Sources: the BTCV training cases the stops were chosen on (00-03, 06-09), BTCV validation (18-23, the
paper's 12 columns) and CHAOS MR validation (31-39). Walks take about 3 min a BTCV case with the
features stored (--cache-dir), 8-10 min a training case without, 1 min a CHAOS case.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np

from msa import build_model
from msa.data import parse_source
from msa.engine import Engine
from msa.evaluate import interior_point
from msa.io import load_image, resample_labels_to
from msa.metrics import dice
from msa.modeling.build import default_adapters
from msa.session import ADAPTERS_WALK, Session, Walk
from msa.store import FeatureStore

from paper_table import COLUMNS

BASE = ADAPTERS_WALK._replace(stop_iou=0.6, stop_area=0.0, stop_overlap=0.0)  # the stop IoU alone
PERMISSIVE = BASE._replace(stop_iou=0.3)  # the walk run and stored; every setting below cuts it
SETTINGS = {  # row -> the walk scored
    "IoU 0.6 only": BASE,
    "+ area 0.3": BASE._replace(stop_area=0.3),
    "+ overlap 0.5": BASE._replace(stop_overlap=0.5),
    "+ area 0.3 + overlap 0.5": BASE._replace(stop_area=0.3, stop_overlap=0.5),
    "+ area 0.3 + overlap 0.5, IoU 0.65": BASE._replace(stop_iou=0.65, stop_area=0.3, stop_overlap=0.5),
    "+ area 0.2 + overlap 0.5": BASE._replace(stop_area=0.2, stop_overlap=0.5),
    "+ area 0.3 + overlap 0.4": BASE._replace(stop_area=0.3, stop_overlap=0.4),
    "IoU 0.3 only (the stored walks)": PERMISSIVE,
    "IoU 0.5 only": BASE._replace(stop_iou=0.5),
    "IoU 0.7 only": BASE._replace(stop_iou=0.7),
}
BTCV_LABELS = ",".join(label for labels in COLUMNS.values() for label in labels)


def sources(data: Path) -> dict[str, str]:
    btcv = data / "btcv" / "datalist.json"
    return {
        "btcv-chosen": f"{btcv}::split=training::cases=0-3,6-9::labels={BTCV_LABELS}",
        "btcv-validation": f"{btcv}::split=validation::labels={BTCV_LABELS}",
        "chaos-validation": f"{data / 'chaos_mr' / 'datalist.json'}::split=validation",
    }


class RecordingSession(Session):
    """A Session that keeps the predicted IoU of every slice it decodes."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ious: dict[int, float] = {}

    def _segment(self, track, k, box, points=None):
        mask, iou = super()._segment(track, k, box, points)
        self.ious[k] = float(iou)
        return mask, iou


def run_walks(engine: Engine, source, folder: Path) -> None:
    """Store each case's permissive walks: per structure its mask, reference, per-slice IoU and seed slice."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in source.cases:
        out = folder / f"{case.name}.npz"
        if out.exists():
            continue
        start = time.time()
        volume = load_image(case.image, modality=source.preset)
        ref_map = resample_labels_to(case.labels, volume)
        arrays = {"shape": np.array(volume.voxels.shape)}
        for label, ids in source.structures(case, set(np.unique(ref_map).tolist())).items():
            ref = np.isin(ref_map, ids)
            if not ref.any():
                continue
            session = RecordingSession(engine, volume, **PERMISSIVE._asdict())
            k, j, i = interior_point(ref)
            session.add_point((i, j, k))
            arrays[f"pred_{label}"] = np.packbits(session.mask(1))
            arrays[f"ref_{label}"] = np.packbits(ref)
            arrays[f"iou_{label}"] = np.array([session.ious.get(z, np.nan) for z in range(ref.shape[0])])
            arrays[f"seed_{label}"] = np.array(k)
        np.savez_compressed(out.with_suffix(".tmp.npz"), **arrays)
        os.replace(out.with_suffix(".tmp.npz"), out)  # a stopped run leaves no half-written case
        print(f"  {case.name}: walked in {time.time() - start:.0f} s", flush=True)
        engine.cache.clear()


def cut(walk: Walk, pred: np.ndarray, iou: np.ndarray, seed: int) -> np.ndarray:
    """The slices a walk with these stops keeps of the permissive walk `pred` (as Session._extend walks)."""
    keep = np.zeros(len(pred), dtype=bool)
    keep[seed] = True
    for step in (-1, 1):
        prev, largest, k = pred[seed], int(pred[seed].sum()), seed + step
        while 0 <= k < len(pred) and pred[k].any() and not walk.ends_at(pred[k], iou[k], prev, largest):
            keep[k], prev, largest, k = True, pred[k], max(largest, int(pred[k].sum())), k + step
    return keep


def score(folder: Path, source, by_column: bool) -> dict[str, float]:
    """Row -> mean 3D Dice: over the paper's columns for BTCV, else over the source's structures."""
    per: dict[str, dict[str, list[float]]] = {row: {} for row in SETTINGS}
    for case in source.cases:
        stored = np.load(folder / f"{case.name}.npz")
        shape = tuple(stored["shape"])
        for key in stored.files:
            if not key.startswith("pred_"):
                continue
            label = key[len("pred_"):]
            pred, ref = (np.unpackbits(stored[f"{kind}_{label}"])[: int(np.prod(shape))].reshape(shape).astype(bool)
                         for kind in ("pred", "ref"))
            for row, walk in SETTINGS.items():
                kept = pred & cut(walk, pred, stored[f"iou_{label}"], int(stored[f"seed_{label}"]))[:, None, None]
                per[row].setdefault(label, []).append(dice(kept, ref))
    means = {}
    for row, labels in per.items():
        if by_column:
            groups = [[d for label in names for d in labels.get(label, [])] for names in COLUMNS.values()]
        else:
            groups = list(labels.values())
        means[row] = float(np.mean([np.mean(g) for g in groups if g]))
    return means


def main() -> None:
    data_dir = Path(os.environ.get("MSA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", help="default: the adapters shipped for lite_medsam")
    parser.add_argument("--three-d", action="store_true", help="the depth branch on (a 3D adapters file)")
    parser.add_argument("--cache-dir", default=os.environ.get("MSA_CACHE_DIR"))
    parser.add_argument("--walks", default=str(Path.home() / ".cache" / "msa" / "walks"),
                        help="where the permissive walks are stored, per adapters file, margin and source")
    parser.add_argument("--sources", default="btcv-chosen,btcv-validation,chaos-validation")
    args = parser.parse_args()
    known = sources(data_dir)
    unknown = set(args.sources.split(",")) - set(known)
    if unknown:
        parser.error(f"unknown sources {', '.join(sorted(unknown))}; choose from {', '.join(known)}")

    adapters = Path(args.adapters or default_adapters("lite_medsam", args.three_d))
    engine = Engine(build_model("lite_medsam", adapters=adapters, three_d=args.three_d),
                    store=FeatureStore(args.cache_dir) if args.cache_dir else None)
    # Stored walks belong to these adapters and this margin: another file or margin walks anew.
    walks_key = (f"{adapters.stem}-{hashlib.sha1(adapters.read_bytes()).hexdigest()[:10]}-margin{BASE.margin}"
                 + ("-3d" if args.three_d else ""))
    table = {}
    for name in args.sources.split(","):
        source = parse_source(known[name])
        folder = Path(args.walks) / walks_key / name
        print(f"{name}: {len(source.cases)} cases", flush=True)
        run_walks(engine, source, folder)
        table[name] = score(folder, source, by_column=name.startswith("btcv"))

    print(f"\n3D click, 3D Dice (mean over the paper's 12 columns for BTCV, the structures for CHAOS); "
          f"margin {BASE.margin}; adapters: {adapters}{' (3D)' if args.three_d else ''}\n")
    print("| stops | " + " | ".join(table) + " |")
    print("|---" * (len(table) + 1) + "|")
    for row in SETTINGS:
        print(f"| {row} | " + " | ".join(f"{table[name][row]:.3f}" for name in table) + " |")


if __name__ == "__main__":
    main()
