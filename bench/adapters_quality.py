"""MSA adapters vs the backbone alone, side by side in one run, under several prompt protocols.

    python bench/adapters_quality.py DATA [--labels a,b] [--adapters FILE] [--protocols box,click1,click3] [--noc]  (NoC only with click1)
                                          [--no-refine]  (clicks decoded once, without the box of their first mask)

Both models share one embedding cache: the shipped adapters train only the decoder side, so the
encoder (the expensive part) runs once per slice for both. Prints a Markdown table and writes JSON
with --json-out.
"""

from __future__ import annotations

import argparse
import json
import time

from msa import build_model
from msa.data import load_cases
from msa.engine import Engine
from msa.evaluate import evaluate
from msa.modeling.build import default_adapters


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--labels")
    parser.add_argument("--adapters", help="default: the adapters shipped for lite_medsam")
    parser.add_argument("--protocols", default="box,click1,click3")
    parser.add_argument("--noc", action="store_true")
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument("--json-out")
    args = parser.parse_args()

    cases = load_cases(args.data)
    backbone = Engine(build_model("lite_medsam"), progress=True)
    adapters = args.adapters or default_adapters("lite_medsam")
    msa_engine = Engine(build_model("lite_medsam", adapters=adapters), cache=backbone.cache, progress=True)
    results = {}
    for protocol in args.protocols.split(","):
        for name, engine in (("backbone", backbone), ("msa", msa_engine)):
            start = time.time()
            results[f"{protocol}/{name}"] = evaluate(engine, cases, protocol, labels=args.labels,
                                                     noc=args.noc and protocol == "click1",
                                                     refine_clicks=not args.no_refine)
            results[f"{protocol}/{name}"]["seconds"] = round(time.time() - start, 1)
    labels = list(next(iter(results.values()))["per_label"])
    print(f"adapters: {adapters}; click refinement {'off' if args.no_refine else 'on'} (slice click protocols)\n")
    print("| protocol | model | " + " | ".join(labels) + " | mean Dice | NoC@85 | NoC@90 |")
    print("|---" * (len(labels) + 5) + "|")
    for key, summary in results.items():
        protocol, name = key.split("/")
        cells = [f"{summary['per_label'][label]['dice']:.3f}" for label in labels]
        noc = [f"{summary[k]:.2f}" if k in summary else "" for k in ("mean_noc85", "mean_noc90")]
        print(f"| {protocol} | {name} | " + " | ".join(cells) + f" | **{summary['mean_dice']:.3f}** | "
              + " | ".join(noc) + " |")
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
