"""Self-supervised encoder pretraining on unlabeled images (the paper's three objectives).

What learns: the encoder adapters (the backbone stays frozen, as everywhere in MSA) plus small
heads that exist only during pretraining. The result is an adapter file that `msa train
--adapters FILE` starts from.

- mae:  masked autoencoding. 75% of the input's patches are blanked; a head on the image
        embedding reconstructs the pixels; MSE on the blanked patches.
- emix: contrastive embedding-mixup. Two images are mixed with weight lam; the mix's pooled
        embedding, compared (cosine / temperature) with every unmixed embedding in the batch,
        must put weights lam and 1 - lam on its two sources (soft cross-entropy).
- shed: shuffled embedding detection. A fraction of the input's patches trade places; a head
        on the embedding predicts, per embedding position, whether its patch was moved (BCE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from msa.checkpoint import save_adapters
from msa.engine import Engine
from msa.errors import MSAError
from msa.io import Volume

OBJECTIVES = ("mae", "emix", "shed")


@dataclass
class PretrainConfig:
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    seed: int = 0
    objectives: tuple[str, ...] = OBJECTIVES
    mask_ratio: float = 0.75
    shuffle_ratio: float = 0.3
    temperature: float = 0.1


class PretrainHeads(nn.Module):
    """Training-only heads on the (B, C, h, w) image embedding."""

    def __init__(self, channels: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.reconstruct = nn.Conv2d(channels, 3 * patch * patch, kernel_size=1)  # mae: pixels of each patch
        self.shuffled = nn.Conv2d(channels, 1, kernel_size=1)  # shed: moved or not
        self.project = nn.Linear(channels, 128)  # emix: embedding for the contrast


def _patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, (S/p)^2, 3*p*p)."""
    b, c, s, _ = images.shape
    n = s // patch
    return images.reshape(b, c, n, patch, n, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c * patch * patch)


def _unpatchify(patches: torch.Tensor, patch: int, size: int) -> torch.Tensor:
    b = patches.shape[0]
    n = size // patch
    return patches.reshape(b, n, n, 3, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, size, size)


class Pretrainer:
    def __init__(self, engine: Engine, volumes: list[Volume], config: PretrainConfig) -> None:
        unknown = set(config.objectives) - set(OBJECTIVES)
        if unknown or not config.objectives:
            raise MSAError(f"unknown objectives {sorted(unknown)}; choose from {', '.join(OBJECTIVES)}")
        self.engine, self.model, self.volumes, self.config = engine, engine.model, volumes, config
        for name, param in self.model.named_parameters():
            param.requires_grad_(name.startswith("image_encoder.") and "_adapter." in name)
        with torch.no_grad():
            probe = self.model.encode(torch.zeros(1, 3, self.model.img_size, self.model.img_size))
        channels, side = probe.shape[1], probe.shape[-1]
        self.patch = self.model.img_size // side  # one embedding position covers patch x patch pixels
        self.heads = PretrainHeads(channels, self.patch).to(self.model.device)
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.heads.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=config.lr)
        self.slices = [(v, k) for v in volumes for k in range(v.voxels.shape[0])]
        self.step = 0

    def batch(self, rng: np.random.Generator) -> torch.Tensor:
        picks = rng.choice(len(self.slices), size=self.config.batch_size)
        images = [self.engine.model_input(self.slices[p][0], [self.slices[p][1]]) for p in picks]
        return torch.cat(images).to(self.model.device)

    def losses(self, images: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        out = {}
        b, size = images.shape[0], images.shape[-1]
        patches = _patchify(images, self.patch)
        n = patches.shape[1]
        if "mae" in self.config.objectives:
            masked = torch.from_numpy(rng.random((b, n)) < self.config.mask_ratio).to(images.device)
            mean = self.model.pixel_mean.view(1, 1, 3, 1).expand(1, 1, 3, self.patch * self.patch).reshape(1, 1, -1)
            inputs = torch.where(masked[..., None], mean, patches)
            embedding = self.model.encode(_unpatchify(inputs, self.patch, size))
            recon = self.heads.reconstruct(embedding).flatten(2).transpose(1, 2)  # (B, n, 3*p*p)
            target = (patches - mean) / self.model.pixel_std.mean()
            out["mae"] = ((recon - target) ** 2).mean(-1)[masked].mean()
        if "shed" in self.config.objectives:
            moved = torch.zeros(b, n, dtype=torch.bool)
            shuffled = patches.clone()
            for i in range(b):
                chosen = rng.choice(n, size=max(2, int(n * self.config.shuffle_ratio)), replace=False)
                perm = rng.permutation(chosen)
                shuffled[i, chosen] = patches[i, perm]
                moved[i, chosen[chosen != perm]] = True
            embedding = self.model.encode(_unpatchify(shuffled, self.patch, size))
            logits = self.heads.shuffled(embedding).flatten(1)
            out["shed"] = F.binary_cross_entropy_with_logits(logits, moved.float().to(logits.device))
        if "emix" in self.config.objectives:
            lam = float(rng.uniform(0.2, 0.8))
            partner = torch.roll(torch.arange(b), 1)
            mixed = lam * images + (1 - lam) * images[partner]
            z = F.normalize(self.heads.project(self.model.encode(torch.cat([images, mixed])).mean(dim=(2, 3))), dim=-1)
            clean, mix = z[:b], z[b:]
            logits = mix @ clean.T / self.config.temperature  # (B, B): which clean images made each mix
            target = torch.zeros(b, b, device=logits.device)
            target[torch.arange(b), torch.arange(b)] += lam
            target[torch.arange(b), partner] += 1 - lam
            out["emix"] = -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        return out

    def train_step(self) -> dict[str, float]:
        rng = np.random.default_rng([self.config.seed, self.step])
        images = self.batch(rng)
        losses = self.losses(images, rng)
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def evaluate(self, images: torch.Tensor, seed: int = 0) -> dict[str, float]:
        """Each objective's loss on `images` with the adapters and heads as they are now, no step taken.
        The seed fixes the masks, shuffles and mixing weights: two states of the model face the same task."""
        return {k: float(v) for k, v in self.losses(images, np.random.default_rng(seed)).items()}

    def run(self, progress: bool = True) -> list[dict[str, float]]:
        history = []
        for _ in tqdm(range(self.step, self.config.steps), desc="pretraining", unit="step", disable=not progress):
            history.append(self.train_step())
        self.model.freeze_backbone()
        self.model.adapters_changed()  # the encoder computes something else now: new embedding-cache keys
        return history


def pretrain(engine: Engine, volumes: list[Volume], out, config: PretrainConfig | None = None,
             progress: bool = True) -> dict:
    """Pretrain the encoder adapters of engine.model; write them as an adapter file to `out`."""
    config = config or PretrainConfig()
    torch.manual_seed(config.seed)
    trainer = Pretrainer(engine, volumes, config)
    history = trainer.run(progress)
    first, last = history[: max(1, len(history) // 10)], history[-max(1, len(history) // 10):]
    summary = {k: {"first": float(np.mean([h[k] for h in first])), "last": float(np.mean([h[k] for h in last]))}
               for k in history[0]}
    engine.model.eval()
    data = {"images": len(volumes), "slices": len(trainer.slices)}
    save_adapters(engine.model, out, extra={"pretraining": {"objectives": list(config.objectives),
                                                              "steps": config.steps, **data, "losses": summary}})
    return {"adapters": str(out), "steps": config.steps, **data, "losses": summary}


__all__ = ["OBJECTIVES", "PretrainConfig", "Pretrainer", "pretrain"]
