"""MSA fine-tuning with simulated prompts: adapters, decoder block 2 and mask head learn.

Each step draws a batch of (slice, label) samples. A sample is prompted with a jittered box, with
clicks, or with both (the engine refines a click's mask with the box of that mask plus the clicks).
Clicks start random; then come 0..max_corrective_clicks rounds in which the model's own prediction
is computed (no gradient) and a click is added at the centre of its largest error. The loss (Dice +
BCE on the masks, MSE on the predicted IoU) is taken on the final prompt set. Box-only samples learn
the frozen backbone's answer when a teacher is given: the backbone is already good with boxes, and
one training volume would otherwise pull box quality towards that volume's look.

Scales other than 1 add copies of the training volumes zoomed in (centre crop) or out (padding),
so that structures are seen at more than one size relative to the field of view.

With the encoder adapters left untrained (the default, right for CPUs) the image embeddings are
constant, so each slice is encoded once up front and training runs on the mask decoder only.

Every step's randomness is a pure function of (seed, step, rank), so a resumed run replays exactly
the samples an uninterrupted one would have drawn. Under torchrun each rank draws its own
samples and gradients are averaged over ranks (all_reduce) before each optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss
from tqdm.auto import tqdm

from msa.checkpoint import atomic_save, read_checkpoint, save_adapters
from msa.data import Source, Structures
from msa.engine import Engine
from msa.errors import MSAError
from msa.evaluate import MIN_SLICE_VOXELS, interior_point
from msa.io import Volume, load_image, resample_labels_to, reslice
from msa.metrics import dice
from msa.store import FeatureStore
from msa.modeling.msa import MSA
from msa.transforms import SliceGeometry

from .prompts import corrective_click, jittered_box, random_clicks


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10  # linear warm-up, then cosine decay to 0
    seed: int = 0
    box_probability: float = 0.25  # box only
    box_click_probability: float = 0.4  # box and clicks; the rest of the samples get clicks only
    max_corrective_clicks: int = 2
    eval_every: int = 50
    train_encoder: bool = False  # also train the encoder adapters (backpropagates through the encoder)
    encoder_blocks: int = 0  # also train the adapters of the encoder's last N blocks, on cached inputs of those
    val_every_nth_slice: int = 5  # without validation cases, hold out every n-th sample
    scales: list[float] = field(default_factory=lambda: [1.0])  # in-plane zooms of the training volumes
    val_per_structure: int = 24  # validation samples per (source, structure), spread over its slices; 0: all
    slab_depth: int = 8  # 3D models with encoder_blocks: consecutive slices encoded together per sample

    def __post_init__(self) -> None:
        if not (0 <= self.box_probability and 0 <= self.box_click_probability
                and self.box_probability + self.box_click_probability <= 1):
            raise MSAError("box and box+click probabilities must be >= 0 and sum to at most 1")
        if not self.scales or not all(0 < s <= 4 for s in self.scales):
            raise MSAError(f"scales must lie in (0, 4], got {self.scales}")
        if self.encoder_blocks < 0 or (self.encoder_blocks and self.train_encoder):
            raise MSAError("encoder_blocks must be >= 0, and it trains part of what train_encoder trains: "
                           "choose one of them")
        if self.slab_depth < 1 or self.val_per_structure < 0:
            raise MSAError("slab_depth must be >= 1 and val_per_structure >= 0")


@dataclass
class Sample:
    case: int  # index into SliceData.volumes (a volume as sliced and zoomed for training)
    k: int
    label: str  # structure name, a key of SliceData.structures[case]


@dataclass
class Prompt:
    clicks: list[tuple[float, float, int]] | None = None
    box: tuple[float, float, float, float] | None = None

    @property
    def kind(self) -> str:
        return "both" if self.clicks and self.box else "clicks" if self.clicks else "box"


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
        self.slices: list[list[int]] = []  # per volume: the slices that may be encoded (samples and their slabs)
        self.samples: list[Sample] = []
        self.source_of: list[int] = []  # per volume: its source's index
        self.source_names: list[str] = []
        self.weights: list[float] = []
        self.first_trained_block = 0
        if pairs:
            self.source_names.append("data")
            self.weights.append(1.0)
            for volume, reference in pairs:
                present = set(np.unique(reference).tolist()) - {0}
                chosen = present if labels is None else [v for v in labels if v in present]
                self._add(volume, reference, {str(v): (int(v),) for v in sorted(chosen)}, 0, 1)
            self._check()

    @classmethod
    def from_sources(cls, engine: Engine, sources: list[Source], scales: Sequence[float] = (1.0,)) -> "SliceData":
        """Every case of every source, in each of the source's slice directions; checked before any encoding."""
        data = cls(engine, scales=scales)
        for index, source in enumerate(sources):
            data.source_names.append(source.name)
            data.weights.append(source.weight)
            before = len(data.samples)
            for case in source.cases:
                volume = load_image(case.image, modality=source.preset)
                reference = resample_labels_to(case.labels, volume)
                structures = source.structures(case, set(np.unique(reference).tolist()))
                for axis in source.axes:
                    data._add(*reslice(volume, reference, axis), structures, index, source.stride)
            if len(data.samples) == before:
                raise MSAError(f"no training samples in source {source.name!r}: none of its cases holds the structures "
                               f"asked for ({source.labels or 'all labels'}) on {MIN_SLICE_VOXELS} voxels of a slice")
        data._check()
        return data

    def _add(self, volume: Volume, reference: np.ndarray, structures: Structures, source: int, stride: int) -> None:
        for scale in self.scales:
            zoomed, ref = zoom_in_plane(volume, reference, scale)
            index = len(self.volumes)
            labelled = np.nonzero((ref > 0).any(axis=(1, 2)))[0][::stride]  # slices far from any structure: none
            self.volumes.append(zoomed)
            self.references.append(ref)
            self.structures.append(structures)
            self.source_of.append(source)
            self.slices.append([int(k) for k in labelled])
            for name, ids in structures.items():
                areas = np.isin(ref[labelled], ids).sum(axis=(1, 2))
                self.samples += [Sample(index, int(k), name) for k in labelled[areas >= MIN_SLICE_VOXELS]]

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

    def slab(self, s: Sample, depth: int, rng: np.random.Generator) -> list[int]:
        """Up to `depth` consecutive slices holding s.k, inside the run of encodable slices around it."""
        ks = self.slices[s.case]
        at = ks.index(s.k)
        lo = hi = at
        while lo > 0 and ks[lo - 1] == ks[lo] - 1 and hi - lo + 1 < 2 * depth:
            lo -= 1
        while hi + 1 < len(ks) and ks[hi + 1] == ks[hi] + 1 and hi - lo + 1 < 4 * depth:
            hi += 1
        first, last = max(ks[lo], s.k - depth + 1), min(s.k, ks[hi] - depth + 1)
        start = int(rng.integers(first, last + 1)) if last >= first else ks[lo]
        return [k for k in range(start, start + depth) if k <= ks[hi]]

    def prepare(self, block: int | None, samples: list[Sample] | None = None) -> None:
        """Encode, once and in batches, the trunks training reads (msa.store): the input of `block` (where
        encoder adapters train from; None: the model's first adapted block) of every slice that may be read,
        or of the slices of `samples` only."""
        self.first_trained_block = block or 0
        wanted = self.slices if samples is None else [sorted({s.k for s in samples if s.case == index})
                                                      for index in range(len(self.volumes))]
        for index, ks in enumerate(tqdm(wanted, desc="encoding volumes", unit="volume",
                                        disable=not self.engine.progress or len(wanted) < 2)):
            self.engine.ensure_trunks(self.volumes[index], ks, block)

    def target(self, s: Sample) -> np.ndarray:
        return np.isin(self.references[s.case][s.k], self.structures[s.case][s.label])

    def geometry(self, s: Sample) -> SliceGeometry:
        return self.engine.geometry(self.volumes[s.case])

    def embeddings(self, samples: list[Sample], config: TrainConfig) -> torch.Tensor:
        """(B, C, h, w): from the engine's cache, or through the (last blocks of the) encoder with gradients.

        In 3D mode each sample's slice is encoded inside a slab of slab_depth slices around it.
        """
        model, depth = self.engine.model, self.engine.slab_depth
        if config.encoder_blocks:
            trunks = [self.engine.trunks(self.volumes[s.case], [s.k], self.first_trained_block) for s in samples]
            inputs = torch.cat(trunks).to(model.device, torch.float32)
            return model.image_encoder.from_block(inputs, self.first_trained_block)
        if not config.train_encoder:
            return torch.stack([self.engine.embeddings(self.volumes[s.case], [s.k])[0] for s in samples])
        if depth == 1:
            images = torch.cat([self.engine.model_input(self.volumes[s.case], [s.k]) for s in samples])
            return model.encode(images.to(model.device))
        out = []
        for s in samples:
            n = self.volumes[s.case].voxels.shape[0]
            start = max(0, min(s.k - depth // 2, n - depth))
            ks = list(range(start, min(start + depth, n)))
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


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    def __init__(self, engine: Engine, train: SliceData, val_samples: list[Sample], val: SliceData,
                 config: TrainConfig, out: Path, teacher: MSA | None = None) -> None:
        self.engine, self.model, self.train, self.val = engine, engine.model, train, val
        self.teacher = teacher.to(self.model.device).eval() if teacher is not None else None
        self.val_samples, self.config, self.out = val_samples, config, Path(out)
        # Encoder adapters that get no gradient (fixed embeddings, or blocks before the trained ones)
        # must stay out of the optimizer: weight decay alone would shrink them.
        blocks = self.model.image_encoder.adapted_blocks()
        if config.encoder_blocks > len(blocks):
            raise MSAError(f"encoder_blocks {config.encoder_blocks}: this encoder has {len(blocks)} blocks")
        if config.encoder_blocks and self.model.first_adapted_block() < len(blocks) - config.encoder_blocks:
            raise MSAError(f"the adapters start with non-zero encoder adapters before the last {config.encoder_blocks} "
                           "blocks: the cached inputs of those blocks would not be theirs; train more blocks")
        # 3D with encoder_blocks: slabs of cached per-slice inputs. While the blocks before the trained ones
        # have zero adapters (depth adapters included), their output is the 2D pass, slice by slice; so the
        # stacked inputs of a slab's slices are exactly what the full 3D pass feeds the first trained block.
        self.slabs = config.encoder_blocks > 0 and self.model.config.three_d and config.slab_depth > 1
        trained_blocks = blocks if config.train_encoder else blocks[len(blocks) - config.encoder_blocks:]
        encoder_params = {id(p) for block in trained_blocks for p in block.parameters()}
        self.params = [p for name, p in self.model.named_parameters()
                       if p.requires_grad and (not name.startswith("image_encoder.") or id(p) in encoder_params)]
        # The teacher answers on the backbone's embeddings. While the student's encoder is the backbone's
        # those are the student's own; otherwise the teacher encodes (each slice once, cached).
        student_encoder_adapted = config.train_encoder or config.encoder_blocks or not self.model.encoder_is_backbone()
        self.teacher_engine = (Engine(self.teacher, cache=engine.cache, slab_depth=engine.slab_depth,
                                      batch_size=engine.batch_size, store=engine.store)
                               if self.teacher is not None and student_encoder_adapted else None)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.loss = DiceCELoss(sigmoid=True)
        self.step = 0
        self.best = -1.0
        self.history: list[dict] = []
        self.rank, self.world = _rank()
        cuda = self.model.device.type == "cuda"
        # On a GPU: bf16 autocast, and gradient checkpointing through the encoder blocks.
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
        self.model.image_encoder.checkpointing = cuda and config.train_encoder

    @property
    def state_path(self) -> Path:
        return self.out.with_name(self.out.name + ".state")

    def _lr_factor(self, step: int) -> float:
        warm = self.config.warmup_steps
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(self.config.steps - warm, 1)))

    # -- prompts and forward -----------------------------------------------------------------------

    def _decode(self, embeddings: torch.Tensor, samples: list[Sample], clicks: list | None, boxes: list | None,
                model: MSA | None = None):
        """Batched prompt encoder + decoder; returns low-res logits (B, 1, s, s) and IoU (B, 1)."""
        device = embeddings.device
        points = box = None
        if clicks is not None:
            n = max(len(c) for c in clicks)
            coords = torch.zeros(len(samples), n, 2)
            labels = -torch.ones(len(samples), n)  # -1: padding, ignored by the prompt encoder
            for b, (s, cs) in enumerate(zip(samples, clicks)):
                coords[b, :len(cs)] = self.train.geometry(s).coords_to_model(np.array([c[:2] for c in cs]))
                labels[b, :len(cs)] = torch.tensor([float(c[2]) for c in cs])
            points = (coords.to(device), labels.to(device))
        if boxes is not None:
            box = torch.stack([self.train.geometry(s).boxes_to_model(np.array(bx)) for s, bx in zip(samples, boxes)])
            box = box.to(device)
        with self.autocast:
            low_res, iou = (model or self.model).decode(embeddings, points, box, None, multimask_output=False)
        return low_res.float(), iou.float()

    def _decode_prompts(self, embeddings: torch.Tensor, samples: list[Sample], prompts: list[Prompt]):
        """_decode for mixed prompts: one batched call per kind (clicks / box / both), results in order."""
        low_res, iou = [None] * len(samples), [None] * len(samples)
        for kind in sorted({p.kind for p in prompts}):
            picked = [b for b, p in enumerate(prompts) if p.kind == kind]
            out = self._decode(embeddings[picked], [samples[b] for b in picked],
                               [prompts[b].clicks for b in picked] if prompts[picked[0]].clicks else None,
                               [prompts[b].box for b in picked] if prompts[picked[0]].box else None)
            for n, b in enumerate(picked):
                low_res[b], iou[b] = out[0][n], out[1][n]
        return torch.stack(low_res), torch.stack(iou)

    def _to_slice(self, s: Sample, low_res: torch.Tensor) -> np.ndarray:
        return (self.train.geometry(s).logits_to_image(low_res[None].detach().cpu())[0, 0] > 0).numpy()

    def _targets(self, samples: list[Sample], size: int) -> torch.Tensor:
        masks = [self.train.geometry(s).mask_to_model(torch.from_numpy(self.train.target(s)).float()[None, None], size)
                 for s in samples]
        return (torch.cat(masks) > 0.5).float()

    def _prompts(self, rng: np.random.Generator, samples: list[Sample], embeddings: torch.Tensor) -> list[Prompt]:
        """Per sample: a box, clicks, or both, clicks after their corrective rounds (no gradient)."""
        config = self.config
        prompts, rounds = [], []
        for s in samples:
            target = self.train.target(s)
            draw = rng.random()
            if draw < config.box_probability:
                prompts.append(Prompt(box=jittered_box(target, rng)))
                rounds.append(0)
                continue
            # A box drawn with the clicks stands for the box of the engine's first, click-only mask.
            with_box = draw < config.box_probability + config.box_click_probability
            box = jittered_box(target, rng, 0.2) if with_box else None
            prompts.append(Prompt(clicks=random_clicks(target, rng), box=box))
            rounds.append(int(rng.integers(0, config.max_corrective_clicks + 1)))
        for round_ in range(max(rounds, default=0)):
            active = [b for b, r in enumerate(rounds) if r > round_]
            with torch.no_grad():
                low_res, _ = self._decode_prompts(embeddings[active].detach(), [samples[b] for b in active],
                                                  [prompts[b] for b in active])
            for b, logits in zip(active, low_res):
                click = corrective_click(self._to_slice(samples[b], logits), self.train.target(samples[b]))
                if click is not None:
                    prompts[b].clicks.append(click)
        return prompts

    def _loss(self, embeddings: torch.Tensor, samples: list[Sample], prompts: list[Prompt]) -> torch.Tensor:
        low_res, iou_pred = self._decode_prompts(embeddings, samples, prompts)
        target = self._targets(samples, low_res.shape[-1]).to(low_res.device)
        box_only = [b for b, p in enumerate(prompts) if p.kind == "box"]
        if self.teacher is not None and box_only:
            picked = [samples[b] for b in box_only]
            with torch.no_grad():  # soft targets: the backbone's probabilities
                teacher, _ = self._decode(self._teacher_embeddings(picked, embeddings[box_only]), picked, None,
                                          [prompts[b].box for b in box_only], model=self.teacher)
            target[box_only] = torch.sigmoid(teacher)
        with torch.no_grad():
            pred, hard = (low_res > 0).float(), (target > 0.5).float()
            inter = (pred * hard).sum(dim=(1, 2, 3))
            union = ((pred + hard) > 0).float().sum(dim=(1, 2, 3))
            true_iou = (inter / union.clamp(min=1))[:, None]
        return self.loss(low_res, target) + F.mse_loss(iou_pred, true_iou)

    def _teacher_embeddings(self, samples: list[Sample], embeddings: torch.Tensor) -> torch.Tensor:
        if self.teacher_engine is None:
            return embeddings.detach()
        return torch.stack([self.teacher_engine.embeddings(self.train.volumes[s.case], [s.k])[0]
                            for s in samples]).to(embeddings.device)

    # -- loop --------------------------------------------------------------------------------------

    def train_step(self) -> float:
        rng = np.random.default_rng([self.config.seed, self.step, self.rank])
        if self.slabs:
            samples, embeddings = self._slab_batch(rng)
        else:
            samples = self.train.draw(rng, self.config.batch_size)
            with self.autocast:
                embeddings = self.train.embeddings(samples, self.config).float()
        prompts = self._prompts(rng, samples, embeddings)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(embeddings, samples, prompts)
        loss.backward()  # (no dropout or batch norm in the decoder: no train/eval switching needed)
        if self.world > 1:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return float(loss.detach())

    def _slab_batch(self, rng: np.random.Generator) -> tuple[list[Sample], torch.Tensor]:
        """3D: slabs of consecutive slices around drawn samples, encoded together from their cached inputs;
        every slice of a slab that holds the drawn structure is a sample."""
        depth = self.config.slab_depth
        samples, rows, out = [], [], []
        for anchor in self.train.draw(rng, max(1, self.config.batch_size // depth)):
            ks = self.train.slab(anchor, depth, rng)
            inputs = self.train.engine.trunks(self.train.volumes[anchor.case], ks, self.train.first_trained_block)
            with self.autocast:
                out.append(self.model.image_encoder.from_block(inputs.to(self.model.device, torch.float32),
                                                               self.train.first_trained_block, len(ks)).float())
            for n, k in enumerate(ks):
                sample = Sample(anchor.case, k, anchor.label)
                if self.train.target(sample).sum() >= MIN_SLICE_VOXELS:
                    samples.append(sample)
                    rows.append(sum(len(e) for e in out[:-1]) + n)
        return samples, torch.cat(out)[rows]

    @torch.no_grad()
    def validate(self) -> dict:
        """Slice Dice on the validation samples with one interior click and with the tight box, per source and
        structure; dice_click1 / dice_box are the means over sources of the means over their structures."""
        self.model.weights_changed()  # trained encoder adapters: cached embeddings of older weights don't apply
        scores: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for s in self.val_samples:
            target = self.val.target(s)
            j, i = interior_point(target)
            logits, _ = self.engine.predict(self.val.volumes[s.case], s.k, points=[(i, j, 1)])
            click = dice(logits > 0, target)
            rows, cols = np.nonzero(target)
            logits, _ = self.engine.predict(self.val.volumes[s.case], s.k,
                                            box=(cols.min(), rows.min(), cols.max(), rows.max()))
            source = self.val.source_names[self.val.source_of[s.case]]
            scores.setdefault(source, {}).setdefault(s.label, []).append((click, dice(logits > 0, target)))
        per_source = {source: {label: {"click1": float(np.mean([c for c, _ in rows])),
                                       "box": float(np.mean([b for _, b in rows]))}
                               for label, rows in sorted(labels.items())}
                      for source, labels in scores.items()}
        means = {source: {key: float(np.mean([row[key] for row in labels.values()])) for key in ("click1", "box")}
                 for source, labels in per_source.items()}
        return {"dice_click1": float(np.mean([m["click1"] for m in means.values()])),
                "dice_box": float(np.mean([m["box"] for m in means.values()])),
                "per_source": {source: {**means[source], "structures": labels} for source, labels in per_source.items()}}

    def save_state(self) -> None:
        atomic_save({"step": self.step, "best": self.best, "history": json.dumps(self.history),
                     "trainable": self.model.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "config": json.dumps(asdict(self.config))},
                    self.state_path)

    def resume(self) -> bool:
        if not self.state_path.is_file():
            return False
        state = read_checkpoint(self.state_path)
        if json.loads(state["config"]) != asdict(self.config):
            raise MSAError(f"{self.state_path} was written with other training options; remove it or match them")
        self.model.load_state_dict(state["trainable"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best, self.history = state["step"], state["best"], json.loads(state["history"])
        return True

    def run(self, on_progress=None) -> dict:
        bar = tqdm(total=self.config.steps, initial=self.step, desc="training", unit="step",
                   disable=self.rank != 0 or not self.engine.progress)
        started = time.time()
        losses: list[float] = []
        while self.step < self.config.steps:
            losses.append(self.train_step())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                self._evaluate_and_save(float(np.mean(losses)), time.time() - started)
                losses = []
            if on_progress is not None:
                on_progress(self.step, self.config.steps, self.history[-1] if self.history else {})
        bar.close()
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.trainable_state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        return {"steps": self.step, "best_score": self.best, "history": self.history, "adapters": str(self.out),
                "rank": self.rank, "trainable_sha256": digest.hexdigest(),
                "encoded_slices": self.engine.encoded_slices}  # full encoder passes: 0 when the cache was warm

    def _evaluate_and_save(self, mean_loss: float, seconds: float) -> None:
        if self.rank == 0:
            record = {"step": self.step, "loss": mean_loss, **self.validate(), "seconds": round(seconds, 1)}
            self.history.append(record)
            score = selection_score(record)
            if score > self.best:
                self.best = score
                save_adapters(self.model, self.out, extra={"training": {**record, "seed": self.config.seed,
                                                                        "steps": self.config.steps}})
            self.save_state()
            write_curves(self.history, self.out)
        if self.world > 1:
            dist.barrier()


def selection_score(record: dict) -> float:
    """What picks the best adapters among the validation records: clicks and boxes count alike."""
    return (record["dice_click1"] + record["dice_box"]) / 2


def split_validation(samples: list[Sample], every: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out every n-th sample (ordered by case, label, slice): validation slices interleave training ones."""
    ordered = sorted(samples, key=lambda s: (s.case, s.label, s.k))
    val = ordered[every - 1::every]
    return [s for s in ordered if s not in val], val


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


def write_curves(history: list[dict], out: Path) -> None:
    """TensorBoard scalars and a PNG of the curves next to the adapter file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    log_dir = out.with_name(out.name + ".logs")
    with SummaryWriter(str(log_dir)) as writer:
        record = history[-1]
        for key in ("loss", "dice_click1", "dice_box"):
            writer.add_scalar(key, record[key], record["step"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in history]
    for key in ("loss", "dice_click1", "dice_box"):
        ax.plot(steps, [r[key] for r in history], marker="o", label=key)
    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(log_dir / "curves.png", dpi=100)
    plt.close(fig)


def train(engine: Engine, sources: list[Source], out: str | Path, config: TrainConfig | None = None,
          val_sources: list[Source] | None = None, resume: bool = True, on_progress=None,
          teacher: MSA | None = None) -> dict:
    """Fine-tune engine.model on the sources' cases; best adapters go to `out` (atomically). Returns stats.

    Every image is read and checked before anything is encoded. teacher: the backbone without adapters;
    box-only samples then learn its answer instead of the labels.
    """
    config = config or TrainConfig()
    data = SliceData.from_sources(engine, sources, config.scales)
    val = SliceData.from_sources(engine, val_sources) if val_sources else None
    return train_on(engine, data, val, out, config, resume, on_progress, teacher)


def train_on(engine: Engine, data: SliceData, val: SliceData | None, out: str | Path, config: TrainConfig,
             resume: bool = True, on_progress=None, teacher: MSA | None = None) -> dict:
    """train() on data already loaded; without `val`, every n-th sample of `data` is held out.

    Slices are encoded once, up front, into the engine's feature store (a temporary one if it has none).
    """
    engine.model.eval()  # also while training: frozen batch norms keep their statistics
    engine.multimask_single_click = False  # we train (and so validate) the single-mask output
    torch.manual_seed(config.seed)
    if val is None:
        val = data
        data.samples, val_samples = split_validation(data.samples, config.val_every_nth_slice)
    else:
        val_samples = val.samples
    val_samples = spread(val_samples, val, config.val_per_structure)
    trainer = Trainer(engine, data, val_samples, val, config, Path(out), teacher)  # checks the config first
    with _feature_store(engine):
        if not config.train_encoder:  # (which re-encodes images every step)
            block = len(engine.model.image_encoder.adapted_blocks()) - config.encoder_blocks if config.encoder_blocks \
                else None  # decoder side only: the trunk each slice's fixed embedding is computed from
            data.prepare(block)
            val.prepare(block, val_samples)
        if resume:
            trainer.resume()
        return trainer.run(on_progress)


@contextmanager
def _feature_store(engine: Engine):
    """The engine's feature store, or a temporary one for the duration of the block."""
    if engine.store is not None:
        yield engine.store
        return
    with tempfile.TemporaryDirectory(prefix="msa-features-") as folder:
        engine.store = FeatureStore(folder)
        try:
            yield engine.store
        finally:
            engine.store = None


def init_distributed() -> None:
    """Join the torchrun process group if launched under torchrun (NCCL on GPUs, gloo on CPUs)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
