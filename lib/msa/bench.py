"""`msa bench latency`: what a click costs with and without the embedding cache, in one run;
`msa bench runtime`: the encoder in PyTorch and in OpenVINO, side by side (speed-up, embeddings, masks)."""

from __future__ import annotations

import resource
import time

import numpy as np

from .engine import Engine
from .io import Volume
from .session import Session


def _ms(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


def latency(engine: Engine, volume: Volume, reference: np.ndarray | None = None, clicks: int = 5,
            encode_slices: int = 4) -> dict:
    """Milliseconds per encoded slice, per first / next / re-encoding click, per propagated slice.

    The click lands at the centre of the reference's largest structure when a reference is given,
    else at the centre of the image. reencode_click_ms is the no-cache baseline (every click runs
    the encoder again, as the reference MSA code does); ratio = reencode_click_ms / next_click_ms.
    """
    n_k, n_j, n_i = volume.voxels.shape[:3]
    if reference is not None and reference.any():
        labels, counts = np.unique(reference[reference > 0], return_counts=True)
        kk, jj, ii = np.nonzero(reference == labels[np.argmax(counts)])
        k, j, i = int(np.median(kk)), int(np.median(jj)), int(np.median(ii))
        roi = [ii.min(), ii.max(), jj.min(), jj.max(), kk.min(), kk.max()]
    else:
        k, j, i = n_k // 2, n_j // 2, n_i // 2
        roi = [n_i // 4, 3 * n_i // 4, n_j // 4, 3 * n_j // 4, 0, n_k - 1]
    engine.encoder.prepare(engine.slab_depth)  # an OpenVINO export is built or loaded before timing
    engine.cache.clear()

    # Encoder alone, on slices the clicks below do not touch.
    others = [s for s in range(n_k) if s != k][:encode_slices]
    encode_ms = _ms(lambda: engine.embeddings(volume, others), 1) / max(len(others), 1)

    session = Session(engine, volume)
    first_ms = _ms(lambda: session.add_point((i, j, k), propagate=False), 1)  # encodes slice k
    next_ms = _ms(lambda: session.add_point((i, j, k), propagate=False), clicks)

    baseline = Engine(engine.model, use_cache=False, slab_depth=engine.slab_depth, encoder=engine.encoder)
    reencode_session = Session(baseline, volume)
    reencode_ms = _ms(lambda: reencode_session.add_point((i, j, k), propagate=False), clicks)

    # Propagation alone: the ROI's slices are encoded first, then timed through the decoder walk.
    engine.embeddings(volume, list(range(int(roi[4]), int(roi[5]) + 1)))
    propagation = Session(engine, volume)
    start = time.perf_counter()
    propagation.add_roi(roi)
    propagated = max(len(propagation.tracks[1].masks), 1)
    propagate_ms = 1000 * (time.perf_counter() - start) / propagated

    return {
        "image": volume.source,
        "backbone": engine.model.config.backbone,
        "device": str(engine.model.device),
        "runtime": engine.runtime_label,
        "encode_ms_per_slice": round(encode_ms, 1),
        "first_click_ms": round(first_ms, 1),
        "next_click_ms": round(next_ms, 1),
        "reencode_click_ms": round(reencode_ms, 1),
        "ratio": round(reencode_ms / next_ms, 1),
        "propagate_ms_per_slice": round(propagate_ms, 1),
        "propagated_slices": propagated,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def runtime_comparison(model, volume: Volume, reference: np.ndarray, runtimes: list[tuple[str, str]],
                       slices: int = 8, rounds: int = 5) -> dict:
    """Each (runtime, precision) against eager PyTorch fp32 on the same `slices` slices through the
    reference's structures: median ms per slice over interleaved rounds (the machine's noise hits
    both alike), the speed-up, the largest embedding difference, and the Dice of its masks against
    PyTorch's masks and against the reference (one tight box per structure and slice)."""
    from .evaluate import MIN_SLICE_VOXELS
    from .runtime import make_encoder

    ks = np.nonzero(reference.any(axis=(1, 2)))[0]
    ks = [int(k) for k in ks[np.linspace(0, len(ks) - 1, min(slices, len(ks))).round().astype(int)]]
    engines = {"torch": Engine(model, use_cache=False)}
    for runtime, precision in runtimes:
        encoder = make_encoder(model, runtime, precision)
        encoder.prepare(1)
        engines[f"{runtime}-{precision}"] = Engine(model, use_cache=False, encoder=encoder)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            times[name].append(_ms(lambda: engine.embeddings(volume, ks), 1) / len(ks))
    reference_emb = engines["torch"].embeddings(volume, ks)
    masks = {name: _box_masks(engine, volume, reference, ks, MIN_SLICE_VOXELS) for name, engine in engines.items()}
    masks["labels"] = {key: reference[key[1]] == key[0] for key in masks["torch"]}
    torch_ms = float(np.median(times["torch"]))
    out = {"image": volume.source, "slices": len(ks), "rounds": rounds, "torch_ms_per_slice": round(torch_ms, 1)}
    for name in engines:
        if name == "torch":
            continue
        diff = (engines[name].embeddings(volume, ks) - reference_emb).abs().max().item()
        out[name] = {
            "ms_per_slice": round(float(np.median(times[name])), 1),
            "speedup": round(torch_ms / float(np.median(times[name])), 2),
            "max_abs_diff": float(f"{diff:.3g}"),
            "mask_dice_vs_torch": round(_mean_dice(masks[name], masks["torch"]), 4),
            "dice_vs_labels": round(_mean_dice(masks[name], masks["labels"]), 4),
            "torch_dice_vs_labels": round(_mean_dice(masks["torch"], masks["labels"]), 4),
        }
    return out


def _box_masks(engine: Engine, volume: Volume, reference: np.ndarray, ks: list[int], min_voxels: int) -> dict:
    """(label, k) -> mask from the tight box of that structure on slice k."""
    from .session import mask_box

    masks = {}
    for k in ks:
        for label in np.unique(reference[k])[1:]:
            truth = reference[k] == label
            if truth.sum() >= min_voxels:
                logits, _ = engine.predict(volume, k, box=mask_box(truth))
                masks[(int(label), k)] = logits > 0
    return masks


def _mean_dice(a: dict, b: dict) -> float:
    from .session import slice_dice

    return float(np.mean([slice_dice(a[key], b[key]) for key in a]))
