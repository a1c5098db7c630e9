"""Active learning by the model's own confidence: label next the image MSA is least sure about.

Scores live in each image's datastore info under `msa_confidence`, with the identity of the model
that made them (`model`: the serving adapters' sha256, or "<backbone>:none" for the bare backbone).
A score made by other adapters counts as missing: it is never ranked, and the next scoring run
replaces it. Scoring runs on the app's scoring thread (lib/scoring.py), never inside a request.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from scipy import ndimage

from msa.engine import Engine
from msa.io import Volume
from msa.transforms import PRESETS

from .infers import VolumeCache
from .models import ModelProvider

logger = logging.getLogger(__name__)
KEY = "msa_confidence"
PROBE_DEPTHS = (0.25, 0.5, 0.75)  # fractions of the volume's depth where the model is probed
GRID = (0.25, 0.5, 0.75)  # candidate clicks: a 3 x 3 grid over the body's bounding box
BODY_LEVEL = 0.05  # body: above 5% of the intensity window (CT W400/L40: -140 HU, fat in, air and lung out)
RANDOM_WHILE_SCORING = "random: confidence scores are being computed"


def model_id(engine: Engine) -> str:
    """What a score was made with: the adapters' sha256, or the backbone alone."""
    return (engine.model.adapters_meta or {}).get("sha256") or f"{engine.model.config.backbone}:none"


def current_score(info: dict, model: str) -> dict | None:
    """The image's stored score if `model` made it; a score of other adapters (or of an older
    version of this module, which stored none) is as good as none."""
    score = info.get(KEY)
    return score if isinstance(score, dict) and score.get("model") == model else None


def body_mask(pixels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """(J, I) bool: the largest connected region above BODY_LEVEL of the intensity window (the
    patient, without the table, air or noise). Colour slices are averaged to grey first."""
    grey = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
    low, high = window
    parts, n = ndimage.label(grey > low + BODY_LEVEL * (high - low))
    if n == 0:
        return np.zeros(grey.shape, dtype=bool)
    return parts == int(np.argmax(np.bincount(parts.ravel())[1:])) + 1


def candidate_clicks(body: np.ndarray) -> list[tuple[int, int]]:
    """Up to 9 clicks (i, j), all in the body: a 3 x 3 grid over its bounding box, each grid point
    outside the body moved to the nearest body pixel. The slice's centre when there is no body."""
    rows, cols = body.shape
    if not body.any():
        return [(cols // 2, rows // 2)]
    js, is_ = np.nonzero(body)
    _, (nearest_j, nearest_i) = ndimage.distance_transform_edt(~body, return_indices=True)
    clicks = []
    for fj in GRID:
        for fi in GRID:
            j = int(round(js.min() + fj * (js.max() - js.min())))
            i = int(round(is_.min() + fi * (is_.max() - is_.min())))
            click = (int(nearest_i[j, i]), int(nearest_j[j, i]))
            if click not in clicks:
                clicks.append(click)
    return clicks


def _entropy(logits: np.ndarray) -> float:
    p = torch.sigmoid(torch.from_numpy(logits)).clamp(1e-6, 1 - 1e-6)
    return float(-(p * p.log() + (1 - p) * (1 - p).log()).mean())


def probe_slice(engine: Engine, volume: Volume, k: int, window: tuple[float, float]) -> dict:
    """The model's confidence on slice k, where it is most confident.

    A click at a fixed place (the old probe: the slice's centre) measures the place more than the
    model: on air or on an edge between organs any model is unsure. So the probe tries a small grid
    of clicks inside the body (candidate_clicks) and keeps the one with the highest predicted IoU:
    the slice scores how well the model knows the best structure it can find there. A slice where
    even that is low is one the model does not know: label it. Cost: one encoding (cached, shared
    by all clicks), 9 predictions as a user's click makes them (at most 2 decoder passes each).

    Returns the chosen click (i, j, k), its predicted IoU and the mean binary entropy of its mask."""
    best = None
    for i, j in candidate_clicks(body_mask(volume.voxels[k], window)):
        logits, iou = engine.predict(volume, k, points=[(i, j, 1)])
        if best is None or iou > best[1]:
            best = ((i, j, k), iou, logits)
    click, iou, logits = best
    return {"click": click, "iou": float(iou), "entropy": _entropy(logits)}


def confidence(engine: Engine, volume: Volume) -> dict:
    """The model's confidence on an image: the probe of PROBE_DEPTHS' slices, averaged; lower
    confidence (predicted IoU), higher entropy: label it. Carries the model that made it."""
    depth = volume.voxels.shape[0]
    window = PRESETS[volume.modality].window(volume.voxels)  # the window the engine uses on this image
    ks = sorted({min(int(depth * f), depth - 1) for f in PROBE_DEPTHS})  # one slice for a 2D image
    probes = [probe_slice(engine, volume, k, window) for k in ks]
    return {"confidence": float(np.mean([p["iou"] for p in probes])),
            "entropy": float(np.mean([p["entropy"] for p in probes])),
            "clicks": [list(p["click"]) for p in probes],  # where the model was probed: (i, j, k)
            "model": model_id(engine)}


class ConfidenceScoring(ScoringMethod):
    """Scores the unlabeled images whose score is missing or was made by other adapters, and stores
    it in the datastore's image info. Runs on the app's scoring thread."""

    def __init__(self, provider: ModelProvider, volumes: VolumeCache) -> None:
        super().__init__("MSA confidence (predicted IoU, mask entropy) on unlabeled images")
        self.provider, self.volumes = provider, volumes

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        scored = {}
        for image_id in datastore.get_unlabeled_images():
            engine = self.provider.engine()  # per image: training may publish new adapters meanwhile
            if current_score(datastore.get_image_info(image_id), model_id(engine)) is not None:
                continue
            scored[image_id] = confidence(engine, self.volumes.load(datastore.get_image_uri(image_id)))
            datastore.update_image_info(image_id, {KEY: scored[image_id]})
        logger.info(f"MSA confidence: scored {len(scored)} image(s)")
        return scored


class LeastConfident(Strategy):
    """Next sample: the least confident of the unlabeled images that have a current score. Images
    without one are handed to the scoring thread (`submit_scoring`) and the answer comes at once:
    a random unlabeled image while no image has a current score yet (said in `selection`)."""

    def __init__(self, provider: ModelProvider, submit_scoring: Callable[[], object]) -> None:
        super().__init__("Unlabeled image the model is least confident about (MSA confidence)")
        self.provider, self.submit_scoring = provider, submit_scoring

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        model = model_id(self.provider.engine())  # reloads first if training published new adapters
        scores = {}
        for image_id in images:
            score = current_score(datastore.get_image_info(image_id), model)
            if score is not None:
                scores[image_id] = score["confidence"]
        pending = len(images) - len(scores)
        if pending:
            self.submit_scoring()
        # Not "strategy": MONAI Label overwrites that key of the answer with the image's info.
        if not scores:
            logger.info(f"uncertainty: no current confidence scores yet ({pending} being computed): a random image")
            return {"id": random.choice(images), "selection": RANDOM_WHILE_SCORING}
        image_id = min(scores, key=scores.get)
        logger.info(f"least confident: {image_id} ({scores[image_id]:.3f}) of {len(scores)} scored, {pending} pending")
        return {"id": image_id, "selection": f"least confident of {len(scores)} scored images ({pending} being scored)"}


class RandomUnlabeled(Strategy):
    """A random unlabeled image, uniformly. (MONAI Label's Random weighs images by the seconds since
    each was last served, and fails when all of them were served within the current second.)"""

    def __init__(self) -> None:
        super().__init__("Random unlabeled image")

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        return {"id": random.choice(images)} if images else None
