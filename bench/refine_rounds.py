"""How many rounds of click refinement (msa.engine.REFINE_ROUNDS, CORRECTIVE_REFINE_ROUNDS)? Chosen on the
validation split.

    python bench/refine_rounds.py [--adapters FILE] [--rounds 1,2,3,5,8] [--corrective-rounds 1]
                                  [--click3] [--cache-dir DIR] [--data DIR]

A click-only prompt is decoded, then decoded again with the box of its mask joining the clicks, round
after round (Engine.predict, refine_clicks): --rounds for a lone click, --corrective-rounds for two or
more clicks. This scores 1-click and box Dice (and with --click3, 3 clicks: the second and third at the
centre of the largest error, as `msa eval --prompt click3`) on the recipe's validation samples
(trainers/recipes/lite_medsam.sh: BTCV 18-23, CHAOS 31-39, the brain's sagittal slices; 8 slices per
structure), as `msa train` validates and selects checkpoints. Prints one JSON line per setting: the mean
over sources of each source's mean over its structures, and each source's. The slices' encoder trunks
come from the feature store when the recipe filled it (--cache-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import types
from pathlib import Path

import numpy as np
import torch

from msa import cli, metrics
from msa import engine as engine_module
from msa.data import parse_source
from msa.evaluate import _SliceClicker, interior_point
from msa.trainers.finetune import Trainer
from msa.trainers.slices import SliceData, spread

VAL_ASEG = ("Left-Cerebral-White-Matter,Left-Cerebral-Cortex,Left-Lateral-Ventricle,Left-Thalamus,Left-Hippocampus,"
            "Left-Putamen,Left-Cerebellum-Cortex,Brain-Stem")


def validation_sources(data: Path) -> list[str]:
    """The recipe's --val sources."""
    brain = f"{data}/brain_t1/brain_t1.nii.gz:{data}/brain_t1/brain_t1_aseg.nii.gz::names=freesurfer-aseg::stride=2"
    return [f"{data}/btcv/datalist.json", f"{data}/chaos_mr/datalist.json",
            f"{brain}::name=brain::labels={VAL_ASEG}::whole=brain::axes=i"]


def click3(engine, val: SliceData, samples) -> dict[str, float]:
    """Mean 3-click Dice per source (mean over its structures), with msa eval's simulated user."""
    scores: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        target = val.target(s)
        clicker = _SliceClicker(engine, val.volumes[s.case], s.k)  # msa eval's click3 user
        pred, _ = metrics.simulate_clicks(clicker, target, (), 3, first=(interior_point(target), True))
        source = val.source_names[val.source_of[s.case]]
        scores.setdefault(source, {}).setdefault(s.label, []).append(metrics.dice(pred, target))
    return {source: float(np.mean([np.mean(v) for v in labels.values()])) for source, labels in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", help="default: the adapters shipped for lite_medsam")
    parser.add_argument("--rounds", default="1,2,3,5,8", help="for a lone click")
    parser.add_argument("--corrective-rounds", default="1", help="for two or more clicks (used by --click3 only)")
    parser.add_argument("--click3", action="store_true", help="also score 3 clicks (slower)")
    parser.add_argument("--cache-dir", default=os.environ.get("MSA_CACHE_DIR", str(Path.home() / ".cache/msa/features")))
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("MSA_DATA_DIR", "../shared/data")))
    parser.add_argument("--per-structure", type=int, default=8)
    args = parser.parse_args()

    argv = ["eval", "DATA", "--cache-dir", args.cache_dir] + (["--adapters", args.adapters] if args.adapters else [])
    engine = cli._engine(cli.build_parser().parse_args(argv))  # what `msa eval` builds
    engine.progress = False
    val = SliceData.from_sources(engine, [parse_source(spec, split="validation") for spec in validation_sources(args.data)])
    samples = spread(val.samples, val, args.per_structure)
    val.prepare(len(engine.model.image_encoder.adapted_blocks()) - 2, samples)  # the recipe's --encoder-blocks 2
    trainer = types.SimpleNamespace(model=engine.model, engine=engine, val=val, val_samples=samples)
    defaults = engine_module.REFINE_ROUNDS, engine_module.CORRECTIVE_REFINE_ROUNDS
    grid = [(r, c) for r in map(int, args.rounds.split(","))
            for c in (map(int, args.corrective_rounds.split(",")) if args.click3 else [defaults[1]])]
    try:
        with torch.inference_mode():
            for rounds, corrective in grid:
                # Engine.predict reads both at each call
                engine_module.REFINE_ROUNDS, engine_module.CORRECTIVE_REFINE_ROUNDS = rounds, corrective
                record = Trainer.validate(trainer)  # the trainer's own validation, unbound
                line = {"rounds": rounds, "click1": round(record["dice_click1"], 4), "box": round(record["dice_box"], 4),
                        "per_source": {source: {"click1": round(r["click1"], 4), "box": round(r["box"], 4)}
                                       for source, r in record["per_source"].items()}}
                if args.click3:
                    per_source = click3(engine, val, samples)
                    line["corrective_rounds"] = corrective
                    line["click3"] = round(float(np.mean(list(per_source.values()))), 4)
                    for source, value in per_source.items():
                        line["per_source"][source]["click3"] = round(value, 4)
                print(json.dumps(line), flush=True)
    finally:
        engine_module.REFINE_ROUNDS, engine_module.CORRECTIVE_REFINE_ROUNDS = defaults


if __name__ == "__main__":
    main()
