"""3D quality: the 2D adapters against the 3D adapters (depth branch on), side by side in one run.

    python bench/three_d_quality.py [--data SOURCE] [--adapters-2d FILE] [--adapters-3d FILE]
                                    [--protocols roi,3d-click] [--cache-dir DIR] [--json-out FILE]

Protocols of `msa eval` scored per volume (3D Dice): `roi` (the structure's 3D bounding box, the
middle slice prompted with its cross-section, propagated slice by slice inside it) and `3d-click`
(one click at the structure's interior-most voxel, propagated both ways until the structure ends).
The 2D model encodes each slice alone; the 3D model encodes slabs of 8 consecutive slices together.
Default data: BTCV validation (cases 18-23 of ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from msa import build_model
from msa.data import parse_source
from msa.engine import Engine
from msa.evaluate import evaluate
from msa.modeling.build import default_adapters
from msa.store import FeatureStore


def main() -> None:
    data_dir = Path(os.environ.get("MSA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=f"{data_dir / 'btcv' / 'datalist.json'}::split=validation")
    parser.add_argument("--adapters-2d", default=default_adapters("lite_medsam"))
    parser.add_argument("--adapters-3d", default=default_adapters("lite_medsam", three_d=True))
    parser.add_argument("--protocols", default="roi,3d-click")
    parser.add_argument("--cache-dir", default=os.environ.get("MSA_CACHE_DIR"))
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if args.adapters_3d is None:
        parser.error("no 3D adapter file: give --adapters-3d")

    source = parse_source(args.data)
    store = FeatureStore(args.cache_dir) if args.cache_dir else None
    engines = {"2D adapters": Engine(build_model("lite_medsam", adapters=args.adapters_2d), store=store, progress=True),
               "3D adapters": Engine(build_model("lite_medsam", adapters=args.adapters_3d, three_d=True), store=store,
                                     progress=True)}
    results = {}
    for protocol in args.protocols.split(","):
        for name, engine in engines.items():
            start = time.time()
            results[f"{protocol}/{name}"] = evaluate(engine, source, protocol)
            results[f"{protocol}/{name}"]["seconds"] = round(time.time() - start)
    labels = list(next(iter(results.values()))["per_label"])
    print(f"{source.name}: {len(source.cases)} cases, 3D Dice per volume; 2D {args.adapters_2d}, 3D {args.adapters_3d}\n")
    print("| protocol | model | " + " | ".join(labels) + " | mean |")
    print("|---" * (len(labels) + 3) + "|")
    for key, summary in results.items():
        protocol, name = key.split("/")
        cells = [f"{summary['per_label'][label]['dice']:.3f}" for label in labels]
        print(f"| {protocol} | {name} | " + " | ".join(cells) + f" | **{summary['mean_dice']:.3f}** |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
