"""The training data as slices: volumes sliced in their sources' directions, the structures in each,
and the (slice, structure) samples drawn from them, with their encoder trunks in the feature store."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from msa.data import Source, Structures
from msa.engine import Engine, slab_of
from msa.errors import MSAError
from msa.evaluate import MIN_SLICE_VOXELS
from msa.io import Volume, load_image, resample_labels_to, reslice
from msa.transforms import SliceGeometry
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    case: int  # index into SliceData.volumes (a volume as sliced and zoomed for training)
    k: int
    label: str  # structure name, a key of SliceData.structures[case]


class SliceData:
    """Volumes, reference label maps (K, J, I), the structures in each, and the (slice, structure)
    samples drawn from them, grouped by source and structure so that every structure of every
    source is drawn as often as any other (the adrenal glands as often as the liver).

    pairs / labels: one source from (volume, label map) pairs and label ids (None: all present).
    """

    def __init__(self, engine: Engine, pairs: list[tuple[Volume, np.ndarray]] = (), labels: list[int] | None = None,
                 scales: Sequence[float] = (1.0,)) -> None:
        self.engine = engine
        self.scales = tuple(scales)
        self.volumes: list[Volume] = []
        self.references: list[np.ndarray] = []
        self.structures: list[Structures] = []
        self.labelled: list[list[int]] = []  # per volume: the slices holding any structure (samples, slabs)
        self.samples: list[Sample] = []
        self.source_of: list[int] = []  # per volume: its source's index
        self.image_of: list[int] = []  # per volume: the image file it comes from (its zoomed and resliced copies too)
        self.images = 0
        self.source_names: list[str] = []
        self.weights: list[float] = []
        self.first_trained_block = 0
        self.held_out: set[tuple[int, int, str]] = set()  # (case, k, label) validated on, never trained on
        self.provenance: list[dict] = []  # per source: what it is (recorded in the adapter files trained on it)
        if pairs:
            self.source_names.append("data")
            self.weights.append(1.0)
            self.provenance.append({"name": "data", "images": [Path(v.source).name for v, _ in pairs],
                                    "labels": labels})
            for volume, reference in pairs:
                present = set(np.unique(reference).tolist()) - {0}
                chosen = present if labels is None else [v for v in labels if v in present]
                self._add(volume, reference, {str(v): (int(v),) for v in sorted(chosen)}, 0, 1)
                self.images += 1
            self._check()

    @classmethod
    def from_sources(cls, engine: Engine, sources: list[Source], scales: Sequence[float] = (1.0,)) -> "SliceData":
        """Every case of every source, in each of the source's slice directions; checked before any encoding."""
        data = cls(engine, scales=scales)
        for index, source in enumerate(sources):
            data.source_names.append(source.name)
            data.weights.append(source.weight)
            data.provenance.append(source.describe())
            before = len(data.samples)
            for case in source.cases:
                volume = load_image(case.image, modality=source.preset)
                reference = resample_labels_to(case.labels, volume)
                structures = source.structures(case, set(np.unique(reference).tolist()))
                for axis in source.axes:
                    data._add(*reslice(volume, reference, axis), structures, index, source.stride)
                data.images += 1
            if len(data.samples) == before:
                raise MSAError(f"no training samples in source {source.name!r}: none of its cases holds the structures "
                               f"asked for ({source.labels or 'all labels'}) on {MIN_SLICE_VOXELS} voxels of a slice")
        data._check()
        return data

    def _add(self, volume: Volume, reference: np.ndarray, structures: Structures, source: int, stride: int) -> None:
        for scale in self.scales:
            zoomed, ref = zoom_in_plane(volume, reference, scale)
            index = len(self.volumes)
            labelled = np.nonzero((ref > 0).any(axis=(1, 2)))[0]  # slices far from any structure: none
            self.volumes.append(zoomed)
            self.references.append(ref)
            self.structures.append(structures)
            self.source_of.append(source)
            self.image_of.append(self.images)
            self.labelled.append([int(k) for k in labelled])
            sampled = labelled[::stride]
            for name, ids in structures.items():
                areas = np.isin(ref[sampled], ids).sum(axis=(1, 2))
                self.samples += [Sample(index, int(k), name) for k in sampled[areas >= MIN_SLICE_VOXELS]]

    def _check(self) -> None:
        if not self.samples:
            raise MSAError("no training samples: the chosen labels are absent or too small in the data")

    def groups(self) -> list[tuple[int, list[list[int]]]]:
        """Per source with samples: (source index, [sample indices of each of its structures])."""
        by_key: dict[tuple[int, str], list[int]] = {}
        for n, s in enumerate(self.samples):
            by_key.setdefault((self.source_of[s.case], s.label), []).append(n)
        sources = sorted({source for source, _ in by_key})
        return [(source, [by_key[key] for key in sorted(by_key) if key[0] == source]) for source in sources]

    def draw(self, rng: np.random.Generator, n: int) -> list[Sample]:
        """n samples: a source by weight, then one of its structures, then one of that structure's slices."""
        groups = self.groups()
        weights = np.array([self.weights[source] for source, _ in groups])
        out = []
        for source in rng.choice(len(groups), size=n, p=weights / weights.sum()):
            structures = groups[source][1]
            members = structures[int(rng.integers(len(structures)))]
            out.append(self.samples[members[int(rng.integers(len(members)))]])
        return out

    def prepare(self, block: int | None, samples: list[Sample] | None = None, slabs: bool = False) -> None:
        """Encode, once and in batches, the trunks training reads (msa.store): the input of `block` (where
        encoder adapters train from; None: the model's first adapted block) of the slices of `samples`
        (default: all samples), or with `slabs` of every slice of the engine's slabs (msa.engine.slab_of)
        that hold a labelled slice."""
        self.first_trained_block = block or 0
        samples = self.samples if samples is None else samples
        if slabs:
            wanted = [sorted({j for k in ks for j in self.slab(index, k)}) for index, ks in enumerate(self.labelled)]
        else:
            wanted = [sorted({s.k for s in samples if s.case == index}) for index in range(len(self.volumes))]
        for index, ks in enumerate(tqdm(wanted, desc="encoding volumes", unit="volume",
                                        disable=not self.engine.progress or len(wanted) < 2)):
            self.engine.ensure_trunks(self.volumes[index], ks, block)

    def slab(self, case: int, k: int) -> list[int]:
        """The slices encoded together with slice k of volume `case` in 3D: the engine's slab (slab_of)."""
        return list(slab_of(k, self.engine.slab_depth, self.volumes[case].voxels.shape[0]))

    def target(self, s: Sample) -> np.ndarray:
        return np.isin(self.references[s.case][s.k], self.structures[s.case][s.label])

    def around(self, s: Sample, reach: int | None) -> np.ndarray:
        """The structure on the slices within `reach` of the sample's (None: all of them), projected onto one
        slice: what a 3D walk's box (the neighbour's mask) or an ROI's cross-section covers."""
        reference = self.references[s.case]
        lo, hi = (0, len(reference)) if reach is None else (max(s.k - reach, 0), s.k + reach + 1)
        return np.isin(reference[lo:hi], self.structures[s.case][s.label]).any(axis=0)

    def geometry(self, s: Sample) -> SliceGeometry:
        return self.engine.geometry(self.volumes[s.case])

    def embeddings(self, samples: list[Sample], encoder_blocks: int = 0, train_encoder: bool = False) -> torch.Tensor:
        """(B, C, h, w): from the engine's cache, or through the last `encoder_blocks` blocks of the encoder
        (from their stored inputs), or through the whole encoder (train_encoder), with gradients.

        With train_encoder in 3D, each sample's slice is encoded inside its slab, as the engine encodes it.
        """
        model, depth = self.engine.model, self.engine.slab_depth
        if encoder_blocks:
            trunks = [self.engine.trunks(self.volumes[s.case], [s.k], self.first_trained_block) for s in samples]
            inputs = torch.cat(trunks).to(model.device, torch.float32)
            return model.image_encoder.from_block(inputs, self.first_trained_block)
        if not train_encoder:
            return torch.stack([self.engine.embeddings(self.volumes[s.case], [s.k])[0] for s in samples])
        if depth == 1:
            images = torch.cat([self.engine.model_input(self.volumes[s.case], [s.k]) for s in samples])
            return model.encode(images.to(model.device))
        out = []
        for s in samples:
            ks = self.slab(s.case, s.k)
            slab = self.engine.model_input(self.volumes[s.case], ks).to(model.device)
            out.append(model.encode(slab, depth=len(ks))[ks.index(s.k)])
        return torch.stack(out)


def zoom_in_plane(volume: Volume, reference: np.ndarray, scale: float) -> tuple[Volume, np.ndarray]:
    """The volume and its labels with a field of view `scale` times as wide (scale > 1: padding with the
    image's minimum, i.e. air in CT; scale < 1: a centre crop), so structures look 1/scale as large."""
    if scale == 1:
        return volume, reference
    voxels = volume.voxels
    pads, crops = [(0, 0)] * voxels.ndim, [slice(None)] * voxels.ndim
    for axis in (1, 2):  # (K, J, I[, 3]): rows and columns
        n = voxels.shape[axis]
        m = max(1, round(n * scale))
        if m > n:
            pads[axis] = ((m - n) // 2, m - n - (m - n) // 2)
        else:
            crops[axis] = slice((n - m) // 2, (n - m) // 2 + m)
    voxels = np.pad(voxels[tuple(crops)], pads, constant_values=voxels.min())
    reference = np.pad(reference[tuple(crops[:3])], pads[:3], constant_values=0)
    zoomed = Volume(voxels=voxels, geometry=None, modality=volume.modality, source=f"{volume.source} x{scale:g}")
    return zoomed, reference


def split_validation(samples: list[Sample], data: SliceData, every: int) -> tuple[list[Sample], list[Sample]]:
    """(training, validation) samples when no validation data is given, split so that no validation
    slice has its neighbours (or a zoomed copy of itself) in training:
    - several images: whole images are held out, every n-th one (at least one);
    - one image: per structure, the last 1/n of its labelled slices, one block (only the block's
      edge touches training slices); a structure on a single slice stays in training.
    """
    images = sorted({data.image_of[s.case] for s in samples})
    if len(images) > 1:
        held = set(images[every - 1::every] or images[-1:])
        return ([s for s in samples if data.image_of[s.case] not in held],
                [s for s in samples if data.image_of[s.case] in held])
    logger.warning("one training image and no validation data: validating on a held-out block of its slices "
                   "(the best adapters are picked on the image they were trained on; give --val data)")
    held_slices = set()
    for label in sorted({s.label for s in samples}):
        ks = sorted({s.k for s in samples if s.label == label})
        if len(ks) > 1:
            held_slices |= {(label, k) for k in ks[-max(1, len(ks) // every):]}
    return ([s for s in samples if (s.label, s.k) not in held_slices],
            [s for s in samples if (s.label, s.k) in held_slices])


def spread(samples: list[Sample], data: SliceData, per_structure: int) -> list[Sample]:
    """At most per_structure samples of each (source, structure), evenly spaced over its slices (0: all)."""
    if not per_structure:
        return samples
    groups: dict[tuple[int, str], list[Sample]] = {}
    for s in sorted(samples, key=lambda s: (s.case, s.k)):
        groups.setdefault((data.source_of[s.case], s.label), []).append(s)
    out = []
    for members in groups.values():
        picks = np.linspace(0, len(members) - 1, min(per_structure, len(members))).round().astype(int)
        out += [members[p] for p in picks]
    return out
