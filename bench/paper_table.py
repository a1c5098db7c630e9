"""The MSA paper's BTCV table (Wu et al. 2023, Table 2 layout), measured here on BTCV validation.

    python bench/paper_table.py [--data BTCV_DATALIST] [--adapters FILE] [--three-d] [--cache-dir DIR]
                                [--protocols click1,click3,box] [--json-out FILE]
    python bench/paper_table.py --protocols roi,3d-click --backbone-protocols "" [--three-d --adapters FILE]
                                [--margin N] [--stop-iou X] [--stop-area F] [--stop-overlap D]

Rows: MSA (the shipped or given adapters) and the LiteMedSAM backbone alone, under the protocols of
`msa eval` (slice-wise Dice on every axial slice holding at least 10 voxels of the organ; one click at
the organ's interior-most pixel, two corrective clicks, or the tight box; roi and 3d-click: the organ's 3D
box or one click at its interior-most voxel, propagated through the volume, 3D Dice), on the validation cases of
the datalist (BTCV 18-23 in ../shared/data). The paper's 1-point averages are printed beside: it reports
them for SAM ViT-B at 1024 x 1024 on its own BTCV split, so they are a reference, not the same test.
The adrenal glands are one column, as in the paper: the slices of both, averaged together.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from msa import build_model
from msa.cli import add_walk_options, walk_settings
from msa.data import parse_source
from msa.engine import Engine
from msa.evaluate import evaluate
from msa.modeling.build import default_adapters
from msa.session import Walk
from msa.store import FeatureStore

COLUMNS = {  # the paper's column -> BTCV label names
    "Spleen": ("spleen",), "R.Kid": ("kidney_right",), "L.Kid": ("kidney_left",), "Gall.": ("gallbladder",),
    "Eso.": ("esophagus",), "Liver": ("liver",), "Stom.": ("stomach",), "Aorta": ("aorta",),
    "IVC": ("inferior_vena_cava",), "Veins": ("portal_and_splenic_vein",), "Panc.": ("pancreas",),
    "AG": ("adrenal_gland_right", "adrenal_gland_left"),
}
PAPER_ONE_POINT = {"SAM (paper, 1 point)": 0.548, "MedSAM (paper, 1 point)": 0.803, "MSA (paper, 1 point)": 0.883}
PROTOCOL_NAMES = {"click1": "1 point", "click3": "3 points", "box": "box", "roi": "3D box, 3D Dice",
                  "3d-click": "3D click, 3D Dice"}


def columns(summary: dict) -> dict[str, float]:
    """Per paper column: the slice-weighted mean Dice of its labels; plus the mean over the columns."""
    table = summary["per_label"]
    out = {}
    for column, labels in COLUMNS.items():
        rows = [table[label] for label in labels if label in table]
        out[column] = sum(r["dice"] * r["n"] for r in rows) / sum(r["n"] for r in rows)
    out["Avg"] = sum(out.values()) / len(COLUMNS)
    return out


def main() -> None:
    data_dir = Path(os.environ.get("MSA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(data_dir / "btcv" / "datalist.json"))
    parser.add_argument("--adapters", help="default: the adapters shipped for lite_medsam (3D with --three-d)")
    parser.add_argument("--three-d", action="store_true")
    parser.add_argument("--protocols", default="click1,click3,box")
    parser.add_argument("--backbone-protocols", default="click1,box", help="the backbone alone under these")
    add_walk_options(parser)  # the 3D protocols' walk (default: each model's, as msa.session)
    parser.add_argument("--cache-dir", default=os.environ.get("MSA_CACHE_DIR"))
    parser.add_argument("--json-out")
    args = parser.parse_args()

    source = parse_source(f"{args.data}::split=validation::labels={','.join(l for ls in COLUMNS.values() for l in ls)}")
    store = FeatureStore(args.cache_dir) if args.cache_dir else None
    adapters = args.adapters or default_adapters("lite_medsam", args.three_d)
    msa_engine = Engine(build_model("lite_medsam", adapters=adapters, three_d=args.three_d), store=store, progress=True)
    backbone = Engine(build_model("lite_medsam"), cache=msa_engine.cache, store=store, progress=True)
    runs = [("MSA", msa_engine, p) for p in args.protocols.split(",") if p] + \
           [("LiteMedSAM", backbone, p) for p in args.backbone_protocols.split(",") if p]
    walk = walk_settings(args)
    results = {}
    for name, engine, protocol in runs:
        start = time.time()
        summary = evaluate(engine, source, protocol, walk=walk)
        results[f"{name} ({PROTOCOL_NAMES[protocol]})"] = {**columns(summary), "seconds": round(time.time() - start)}

    header = list(COLUMNS) + ["Avg"]
    settings = ", ".join(f"{key.replace('_', ' ').replace('iou', 'IoU')} {walk.get(key, 'per model')}"
                         for key in Walk._fields)
    print(f"BTCV validation ({', '.join(c.name for c in source.cases)}), slice-wise Dice (3D Dice for the 3D "
          f"protocols, propagation {settings}); adapters: {adapters}{' (3D)' if args.three_d else ''}\n")
    print("| model | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for row, values in results.items():
        print(f"| {row} | " + " | ".join(f"{values[c]:.3f}" for c in header) + " |")
    for row, value in PAPER_ONE_POINT.items():
        print(f"| {row} | " + " | ".join("" for _ in COLUMNS) + f" | {value:.3f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
