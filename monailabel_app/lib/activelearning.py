"""Active learning by the model's own confidence: label next the image MSA is least sure about."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from .infers import VolumeCache
from .models import ModelProvider

logger = logging.getLogger(__name__)
KEY = "msa_confidence"
PROBE_DEPTHS = (0.25, 0.5, 0.75)  # fractions of the volume's depth where the model is probed


def confidence(provider: ModelProvider, volumes: VolumeCache, path: str) -> dict[str, float]:
    """The model's confidence on an image: a click at the centre of three slices.

    Returns the mean predicted IoU (the decoder's own estimate) and the mean binary entropy of
    the predicted mask probabilities inside the image (lower confidence, higher entropy: label it).
    """
    engine = provider.engine()
    volume = volumes.load(path)
    depth, rows, cols = volume.voxels.shape[:3]
    ious, entropies = [], []
    for fraction in PROBE_DEPTHS:
        k = min(int(depth * fraction), depth - 1)
        logits, iou = engine.predict(volume, k, points=[(cols / 2, rows / 2, 1)])
        p = torch.sigmoid(torch.from_numpy(logits)).clamp(1e-6, 1 - 1e-6)
        entropies.append(float(-(p * p.log() + (1 - p) * (1 - p).log()).mean()))
        ious.append(iou)
    return {"confidence": float(np.mean(ious)), "entropy": float(np.mean(entropies))}


class ConfidenceScoring(ScoringMethod):
    """Scores every unlabeled image and stores the result in the datastore's image info."""

    def __init__(self, provider: ModelProvider, volumes: VolumeCache) -> None:
        super().__init__("MSA confidence (predicted IoU, mask entropy) on unlabeled images")
        self.provider, self.volumes = provider, volumes

    def __call__(self, request: dict, datastore: Datastore) -> dict:
        scored = {}
        for image_id in datastore.get_unlabeled_images():
            scored[image_id] = confidence(self.provider, self.volumes, datastore.get_image_uri(image_id))
            datastore.update_image_info(image_id, {KEY: scored[image_id]})
        return scored


class LeastConfident(Strategy):
    """Next sample: the unlabeled image with the lowest confidence (scored now if never scored)."""

    def __init__(self, scoring: ConfidenceScoring) -> None:
        super().__init__("Unlabeled image the model is least confident about (MSA confidence)")
        self.scoring = scoring

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        images = datastore.get_unlabeled_images()
        if not images:
            return None
        scores = {}
        for image_id in images:
            score = datastore.get_image_info(image_id).get(KEY)
            if score is None:
                score = confidence(self.scoring.provider, self.scoring.volumes, datastore.get_image_uri(image_id))
                datastore.update_image_info(image_id, {KEY: score})
            scores[image_id] = score["confidence"]
        image_id = min(scores, key=scores.get)
        logger.info(f"least confident: {image_id} ({scores[image_id]:.3f}) of {len(scores)}")
        return {"id": image_id, KEY: scores[image_id]}


class RandomUnlabeled(Strategy):
    """A random unlabeled image, uniformly. (MONAI Label's Random weighs images by the seconds since
    each was last served, and fails when all of them were served within the current second.)"""

    def __init__(self) -> None:
        super().__init__("Random unlabeled image")

    def __call__(self, request: dict, datastore: Datastore) -> dict | None:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        return {"id": random.choice(images)} if images else None
