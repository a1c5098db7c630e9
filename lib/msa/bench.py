"""`msa bench latency`: what a click costs with and without the embedding cache, in one run."""

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
    engine.cache.clear()

    # Encoder alone, on slices the clicks below do not touch.
    others = [s for s in range(n_k) if s != k][:encode_slices]
    encode_ms = _ms(lambda: engine.embeddings(volume, others), 1) / max(len(others), 1)

    session = Session(engine, volume)
    first_ms = _ms(lambda: session.add_point((i, j, k), propagate=False), 1)  # encodes slice k
    next_ms = _ms(lambda: session.add_point((i, j, k), propagate=False), clicks)

    baseline = Engine(engine.model, use_cache=False, slab_depth=engine.slab_depth)
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
        "encode_ms_per_slice": round(encode_ms, 1),
        "first_click_ms": round(first_ms, 1),
        "next_click_ms": round(next_ms, 1),
        "reencode_click_ms": round(reencode_ms, 1),
        "ratio": round(reencode_ms / next_ms, 1),
        "propagate_ms_per_slice": round(propagate_ms, 1),
        "propagated_slices": propagated,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
