"""MSA fine-tuning with simulated prompts: the adapters and the backbone's trained decoder parts learn.

Each step draws a batch of (slice, structure) samples, every structure of every source alike
(msa.trainers.slices). A sample is prompted with a jittered box, with clicks, or with both (the engine
refines a click's mask with the box of that mask plus the clicks). Clicks start random; then come
0..max_corrective_clicks rounds in which the model's own prediction is computed (no gradient) and a
click is added at the centre of its largest error. The loss (Dice + BCE on the masks, MSE on the
predicted IoU) is taken on the final prompt set. Box-only samples learn the frozen backbone's answer
when a teacher is given (one training volume would otherwise pull box quality towards its look).

Encoder features are computed once, into the feature store (msa.store): with the encoder adapters
left untrained, each slice's fixed embedding comes from its stored trunk; with encoder_blocks N, the
last N blocks run with gradients on their stored inputs, in 2D, or in 3D on slabs of consecutive
slices (exact while the earlier blocks' adapters are zero). train_encoder re-encodes the images every
step (for GPUs).

Every step's randomness is a pure function of (seed, step, rank), so a resumed run replays exactly
the samples an uninterrupted one would have drawn. Under torchrun each rank draws its own
samples and gradients are averaged over ranks (all_reduce) before each optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.losses import DiceCELoss
from msa.checkpoint import atomic_save, read_checkpoint, save_adapters
from msa.data import Source
from msa.engine import Engine, prompt_tensors
from msa.errors import MSAError
from msa.evaluate import MIN_SLICE_VOXELS, interior_point
from msa.metrics import dice
from msa.modeling.msa import MSA
from msa.modeling.targets import canonical_name
from msa.store import FeatureStore
from tqdm.auto import tqdm

from .prompts import corrective_click, jittered_box, random_clicks
from .slices import Sample, SliceData, split_validation, spread


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
    # Of the box-only samples, the share boxed around the structure on the nearby slices too (SLAB_BOX_REACHES):
    # the looser boxes a 3D walk (the neighbour's mask box) and an ROI (its cross-section) prompt with.
    slab_box_probability: float = 0.0
    max_corrective_clicks: int = 2
    target_probability: float = 0.0  # samples whose prompt also names the structure (msa.modeling.targets)
    targets_only: bool = False  # train the target prompts alone: prompts without a name answer as before
    depth_only: bool = False  # 3D: train the depth adapters alone: the 2D answers stay those of the start file
    eval_every: int = 50
    train_encoder: bool = False  # also train the encoder adapters (backpropagates through the encoder)
    encoder_blocks: int = 0  # also train the adapters of the encoder's last N blocks, on cached inputs of those
    val_every_nth_image: int = 5  # without validation data, hold out every n-th image (slices.split_validation)
    scales: list[float] = field(default_factory=lambda: [1.0])  # in-plane zooms of the training volumes
    val_per_structure: int = 24  # validation samples per (source, structure), spread over its slices; 0: all

    def __post_init__(self) -> None:
        if not (0 <= self.box_probability and 0 <= self.box_click_probability
                and self.box_probability + self.box_click_probability <= 1):
            raise MSAError("box and box+click probabilities must be >= 0 and sum to at most 1")
        if not 0 <= self.slab_box_probability <= 1:
            raise MSAError(f"slab_box_probability must lie in [0, 1], got {self.slab_box_probability}")
        if not self.scales or not all(0 < s <= 4 for s in self.scales):
            raise MSAError(f"scales must lie in (0, 4], got {self.scales}")
        if self.encoder_blocks < 0 or (self.encoder_blocks and self.train_encoder):
            raise MSAError("encoder_blocks must be >= 0, and it trains part of what train_encoder trains: "
                           "choose one of them")
        if self.val_per_structure < 0:
            raise MSAError("val_per_structure must be >= 0")
        if not 0 <= self.target_probability <= 1:
            raise MSAError(f"target_probability must lie in [0, 1], got {self.target_probability}")
        if self.targets_only and not (self.target_probability and not self.encoder_blocks and not self.train_encoder):
            raise MSAError("targets_only trains the target prompts on the encoder as it is: it needs "
                           "target_probability > 0 and neither encoder_blocks nor train_encoder")
        if self.depth_only and (self.targets_only or not (self.encoder_blocks or self.train_encoder)):
            raise MSAError("depth_only trains the depth adapters of the trained encoder blocks: it needs "
                           "encoder_blocks (or train_encoder), and not targets_only")


@dataclass
class Prompt:
    clicks: list[tuple[float, float, int]] | None = None
    box: tuple[float, float, float, float] | None = None
    target: str | None = None  # the structure's name, as a target prompt

    @property
    def kind(self) -> str:
        return "both" if self.clicks and self.box else "clicks" if self.clicks else "box"

    @property
    def group(self) -> tuple[str, int, bool]:
        """Prompts decode in one batch only with the same tokens: kind, click count, named or not (padding
        would add tokens inference never sends)."""
        return self.kind, len(self.clicks or ()), self.target is not None


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
        # What the saved adapters come from: their data and the adapter file training started from.
        parent = self.model.adapters_meta or {}
        self.provenance = {"data": train.provenance, "validation": val.provenance if val is not train else "held out",
                           "parent_adapters": {"file": parent.get("file"), "sha256": parent.get("sha256")}
                           if parent else None}
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
        self.slabs = config.encoder_blocks > 0 and engine.slab_depth > 1
        if config.depth_only and not self.model.config.three_d:
            raise MSAError("depth_only trains the depth branch: build the model 3D (msa train --three-d)")
        trained_blocks = blocks if config.train_encoder else blocks[len(blocks) - config.encoder_blocks:]
        encoder_params = {id(p) for block in trained_blocks for p in block.parameters()}
        if config.target_probability:  # a token for every structure name trained on (the parent's kept)
            self.model.set_targets(sorted({*self.model.targets, *(name for structures in train.structures
                                                                   for name in structures)}))
        self.params = [p for name, p in self.model.named_parameters()
                       if p.requires_grad and (not name.startswith("image_encoder.") or id(p) in encoder_params)
                       and (not config.targets_only or name.startswith("target_prompts."))
                       and (not config.depth_only or ".depth_adapter." in name)]
        # The teacher answers on the backbone's embeddings. While the student's encoder is the backbone's
        # those are the student's own; otherwise the teacher encodes (each slice once, cached).
        student_encoder_adapted = config.train_encoder or config.encoder_blocks or not self.model.encoder_is_backbone()
        self.teacher_engine = (Engine(self.teacher, cache=engine.cache, slab_depth=engine.slab_depth,
                                      batch_size=engine.batch_size, store=engine.store)
                               if self.teacher is not None and student_encoder_adapted else None)
        # A target token is trained by the few samples that name its structure: tokens move TARGET_LR_SCALE
        # times faster than the adapters, without weight decay.
        targets = {id(p) for p in self.model.target_prompts.parameters()} if self.model.target_prompts else set()
        groups = [{"params": [p for p in self.params if id(p) not in targets]}]
        if targets:
            groups.append({"params": [p for p in self.params if id(p) in targets],
                           "lr": config.lr * TARGET_LR_SCALE, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.loss = DiceCELoss(sigmoid=True)
        self.fingerprint = self._fingerprint()
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
                model: MSA | None = None, targets: list[str] | None = None):
        """Batched prompt encoder + decoder (the engine's prompt path, msa.engine.prompt_tensors) on the
        single-mask output, which MSA trains; returns low-res logits (B, 1, s, s) and IoU (B, 1)."""
        model = model or self.model
        points, box = prompt_tensors([self.train.geometry(s) for s in samples], clicks, boxes, embeddings.device)
        rows = None if targets is None else torch.tensor([model.target_row(t) for t in targets], device=embeddings.device)
        with self.autocast:
            low_res, iou = model.decode(embeddings, points, box, None, multimask_output=False, targets=rows)
        return low_res.float(), iou.float()

    def _decode_prompts(self, embeddings: torch.Tensor, samples: list[Sample], prompts: list[Prompt]):
        """_decode for mixed prompts: one batched call per Prompt.group, results in order."""
        low_res, iou = [None] * len(samples), [None] * len(samples)
        for group in sorted({p.group for p in prompts}):
            picked = [b for b, p in enumerate(prompts) if p.group == group]
            first = prompts[picked[0]]
            out = self._decode(embeddings[picked], [samples[b] for b in picked],
                               [prompts[b].clicks for b in picked] if first.clicks else None,
                               [prompts[b].box for b in picked] if first.box else None,
                               targets=[prompts[b].target for b in picked] if first.target else None)
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
            # (drawn only when used: runs without target prompts replay the samples they always drew)
            name = s.label if config.target_probability and rng.random() < config.target_probability else None
            if draw < config.box_probability:
                if config.slab_box_probability and rng.random() < config.slab_box_probability:
                    reach = SLAB_BOX_REACHES[int(rng.integers(len(SLAB_BOX_REACHES)))]
                    box = jittered_box(self.train.around(s, reach), rng, SLAB_BOX_JITTER)
                else:
                    box = jittered_box(target, rng)
                prompts.append(Prompt(box=box, target=name))
                rounds.append(0)
                continue
            # A box drawn with the clicks stands for the box of the engine's first, click-only mask.
            with_box = draw < config.box_probability + config.box_click_probability
            box = jittered_box(target, rng, 0.2) if with_box else None
            prompts.append(Prompt(clicks=random_clicks(target, rng), box=box, target=name))
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
        # (named boxes learn the labels: the backbone knows no names)
        box_only = [b for b, p in enumerate(prompts) if p.kind == "box" and p.target is None]
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
                embeddings = self.train.embeddings(samples, self.config.encoder_blocks, self.config.train_encoder).float()
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
        """3D: the engine's slabs (msa.engine.slab_of) of drawn samples, encoded together from their cached
        inputs; every slice of a slab that holds the drawn structure is a sample."""
        samples, rows, out = [], [], []
        for anchor in self.train.draw(rng, max(1, self.config.batch_size // self.engine.slab_depth)):
            ks = self.train.slab(anchor.case, anchor.k)
            inputs = self.train.engine.trunks(self.train.volumes[anchor.case], ks, self.train.first_trained_block)
            with self.autocast:
                out.append(self.model.image_encoder.from_block(inputs.to(self.model.device, torch.float32),
                                                               self.train.first_trained_block, len(ks)).float())
            for n, k in enumerate(ks):
                sample = Sample(anchor.case, k, anchor.label)
                if (self.train.target(sample).sum() >= MIN_SLICE_VOXELS
                        and (sample.case, sample.k, sample.label) not in self.train.held_out):
                    samples.append(sample)
                    rows.append(sum(len(e) for e in out[:-1]) + n)
        return samples, torch.cat(out)[rows]

    @torch.no_grad()
    def validate(self) -> dict:
        """Slice Dice on the validation samples with one interior click and with the tight box, per source and
        structure; dice_click1 / dice_box are the means over sources of the means over their structures.
        With target prompts, also one click naming the structure (click1_named, for the names the model knows)."""
        self.model.adapters_changed()  # trained encoder adapters: cached embeddings of older weights don't apply
        known = set(self.model.targets)
        scores: dict[str, dict[str, list[dict[str, float]]]] = {}
        for s in self.val_samples:
            target, volume = self.val.target(s), self.val.volumes[s.case]
            j, i = interior_point(target)
            rows, cols = np.nonzero(target)
            # the single-mask output, which training trains (a bare or pretrained model would default to multimask)
            row = {"click1": dice(self.engine.predict(volume, s.k, points=[(i, j, 1)], multimask_output=False)[0] > 0,
                                  target),
                   "box": dice(self.engine.predict(volume, s.k, box=(cols.min(), rows.min(), cols.max(), rows.max()))[0]
                               > 0, target)}
            if canonical_name(s.label) in known:
                row["click1_named"] = dice(self.engine.predict(volume, s.k, points=[(i, j, 1)], multimask_output=False,
                                                              target=s.label)[0] > 0,
                                           target)
            source = self.val.source_names[self.val.source_of[s.case]]
            scores.setdefault(source, {}).setdefault(s.label, []).append(row)
        per_source = {source: {label: {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
                               for label, rows in sorted(labels.items())}
                      for source, labels in scores.items()}
        means = {source: {key: float(np.mean([row[key] for row in labels.values() if key in row]))
                          for key in ("click1", "box", "click1_named") if any(key in row for row in labels.values())}
                 for source, labels in per_source.items()}
        return {**{f"dice_{key}": float(np.mean([m[key] for m in means.values() if key in m]))
                   for key in ("click1", "box", "click1_named") if any(key in m for m in means.values())},
                "per_source": {source: {**means[source], "structures": labels} for source, labels in per_source.items()}}

    def _fingerprint(self) -> dict:
        """What makes a run this run: a saved state resumes only the same options, data (by content),
        backbone and starting adapters (taken before any step)."""
        volumes = self.train.volumes + ([] if self.val is self.train else self.val.volumes)
        return {"options": asdict(self.config), "data": [v.key for v in volumes],
                "backbone": self.model.backbone_hash(), "starting adapters": trainable_sha256(self.model)}

    def save_state(self) -> None:
        atomic_save({"step": self.step, "best": self.best, "history": json.dumps(self.history),
                     "trainable": self.model.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "run": json.dumps(self.fingerprint)},
                    self.state_path)

    def resume(self) -> bool:
        if not self.state_path.is_file():
            return False
        state = read_checkpoint(self.state_path)
        saved, this = json.loads(state.get("run", "{}")), self.fingerprint
        differ = [key for key in this if saved.get(key) != this[key]]
        if differ:
            raise MSAError(f"{self.state_path} is the state of another training run (its {', '.join(differ)} "
                           f"differ): start over with --restart, or remove it")
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
        return {"steps": self.step, "best_score": self.best, "history": self.history, "adapters": str(self.out),
                "rank": self.rank, "trainable_sha256": trainable_sha256(self.model),
                "encoded_slices": self.engine.encoded_slices}  # full encoder passes: 0 when the cache was warm

    def _evaluate_and_save(self, mean_loss: float, seconds: float) -> None:
        if self.rank == 0:
            record = {"step": self.step, "loss": mean_loss, **self.validate(), "seconds": round(seconds, 1)}
            self.history.append(record)
            score = selection_score(record)
            if score > self.best:
                self.best = score
                save_adapters(self.model, self.out, extra={"training": {**record, "seed": self.config.seed,
                                                                        "steps": self.config.steps},
                                                           **self.provenance},
                              # a run that trains no names keeps those it started with
                              targets=helpful_targets(record, self.model.targets) if self.config.target_probability
                              else None)
            self.save_state()
            write_curves(self.history, self.out)
        if self.world > 1:
            dist.barrier()


TARGET_LR_SCALE = 30
# Slab boxes: the structure on the slices within 1, 2 or 4 of the sample's (None: on all of them, an ROI's
# cross-section), each side moved by up to 5% of its length.
SLAB_BOX_REACHES = (1, 2, 4, None)
SLAB_BOX_JITTER = 0.05


def trainable_sha256(model: MSA) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.trainable_state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def helpful_targets(record: dict, names: tuple[str, ...]) -> list[str]:
    """The target names an adapter file keeps: those whose named click validated at least as well as the
    plain click (mean over the sources that validate the structure). A name no validation sample has is
    left out too: a name a user sends must not make the answer worse than sending none."""
    gains: dict[str, list[float]] = {}
    for source in record["per_source"].values():
        for label, row in source["structures"].items():
            if "click1_named" in row:
                gains.setdefault(canonical_name(label), []).append(row["click1_named"] - row["click1"])
    return [name for name in names if name in gains and np.mean(gains[name]) >= 0]


def selection_score(record: dict) -> float:
    """What picks the best adapters among the validation records: clicks, boxes and (where trained) named
    clicks count alike."""
    keys = [key for key in ("dice_click1", "dice_box", "dice_click1_named") if key in record]
    return sum(record[key] for key in keys) / len(keys)


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
    torch.manual_seed(config.seed)
    if val is None:
        val = data
        data.samples, val_samples = split_validation(data.samples, data, config.val_every_nth_image)
        data.held_out = {(s.case, s.k, s.label) for s in val_samples}  # 3D slabs must not train on them either
    else:
        val_samples = val.samples
    val_samples = spread(val_samples, val, config.val_per_structure)
    with _feature_store(engine):
        trainer = Trainer(engine, data, val_samples, val, config, Path(out), teacher)  # checks the config first
        if not config.train_encoder:  # (which re-encodes images every step)
            block = len(engine.model.image_encoder.adapted_blocks()) - config.encoder_blocks if config.encoder_blocks \
                else None  # decoder side only: the trunk each slice's fixed embedding is computed from
            data.prepare(block, slabs=trainer.slabs)
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
