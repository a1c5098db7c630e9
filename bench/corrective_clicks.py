"""Corrective clicks: does reusing the previous prediction as the mask input (segment-anything's way) help?

    python bench/corrective_clicks.py [--adapters FILE | --no-adapters] [--labels a,b] [--clicks 3]

On the sample CT, every axial slice holding at least 10 voxels of each organ: one click at its
interior-most pixel, then corrective clicks at the centre of the largest error (the `msa eval` click3
user). Three ways to decode each corrective click, side by side in one run:

    clicks+refine          every click so far, refined with the box of its first mask (the engine's default);
    clicks+mask_input      every click so far and the previous logits as SAM's dense mask prompt;
    clicks+mask_input+box  the same, then refined with the box of that mask.

Prints the mean Dice after the last click per organ and variant (JSON lines).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from msa import metrics
from msa.data import sample_ct
from msa.engine import REFINE_MARGIN, Engine, clicked_box
from msa.evaluate import MIN_SLICE_VOXELS, interior_point
from msa.io import load_image, resample_labels_to
from msa.modeling.build import build_model, default_adapters
from msa.runtime import make_encoder

ORGANS = "spleen,liver,kidney_right,kidney_left,aorta,stomach,pancreas,inferior_vena_cava"
VARIANTS = ("clicks+refine", "clicks+mask_input", "clicks+mask_input+box")


def decode(engine: Engine, volume, k: int, points: list, previous: np.ndarray | None, variant: str) -> np.ndarray:
    if variant == "clicks+refine" or previous is None:  # the first click has no previous prediction
        return engine.predict(volume, k, points=points)[0]
    logits = engine.predict(volume, k, points=points, mask_input=previous)[0]
    if variant == "clicks+mask_input+box":
        box = clicked_box(logits > 0, points, margin=REFINE_MARGIN)
        if box is not None:
            logits = engine.predict(volume, k, points=points, box=box)[0]
    return logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", help="default: the adapters shipped for lite_medsam")
    parser.add_argument("--no-adapters", action="store_true")
    parser.add_argument("--labels", default=ORGANS)
    parser.add_argument("--clicks", type=int, default=3)
    args = parser.parse_args()

    image, labels = sample_ct()
    names = {v: int(k) for k, v in json.loads(labels.with_suffix("").with_suffix(".json").read_text())["labels"].items()}
    adapters = None if args.no_adapters else (args.adapters or default_adapters("lite_medsam"))
    model = build_model("lite_medsam", adapters=adapters)
    engine = Engine(model, encoder=make_encoder(model, "auto"), progress=True)
    volume = load_image(image)
    reference = resample_labels_to(labels, volume)
    engine.embeddings(volume, sorted({int(k) for k in np.nonzero(reference.any(axis=(1, 2)))[0]}))
    scores: dict[str, dict[str, list[float]]] = {v: {} for v in VARIANTS}
    for organ in args.labels.split(","):
        ref = reference == names[organ]
        for k in map(int, np.nonzero(ref.sum(axis=(1, 2)) >= MIN_SLICE_VOXELS)[0]):
            for variant in VARIANTS:
                points, previous = [], [None]

                def click(index, positive, variant=variant):
                    j, i = index
                    points.append((float(i), float(j), 1 if positive else 0))
                    previous[0] = decode(engine, volume, k, points, previous[0], variant)
                    return previous[0] > 0

                pred, _ = metrics.simulate_clicks(click, ref[k], (), args.clicks, first=(interior_point(ref[k]), True))
                scores[variant].setdefault(organ, []).append(metrics.dice(pred, ref[k]))
    for variant, per_organ in scores.items():
        means = {organ: round(float(np.mean(v)), 3) for organ, v in per_organ.items()}
        print(json.dumps({"variant": variant, "adapters": str(adapters), "clicks": args.clicks,
                          "mean": round(float(np.mean(list(means.values()))), 3), "per_organ": means}))


if __name__ == "__main__":
    main()
