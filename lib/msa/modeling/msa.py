"""The MSA model: adapted image encoder + SAM prompt encoder + adapted mask decoder."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import torch
from segment_anything.modeling.prompt_encoder import PromptEncoder
from torch import nn

from ..errors import PromptError
from .adapter import AdapterConfig
from .targets import TargetPrompts

# Adapters learn wherever they are; beyond them, what of the mask decoder learns (MSAConfig.decoder).
# Everything else (the backbone) stays frozen.
DECODER_TRAINED = {
    # The paper: the second two-way block, the final token-to-image attention and the whole mask head.
    "block2": (
        "mask_decoder.transformer.layers.1.",
        "mask_decoder.transformer.final_attn_token_to_image.",
        "mask_decoder.transformer.norm_final_attn.",
        "mask_decoder.iou_token.",
        "mask_decoder.mask_tokens.",
        "mask_decoder.output_upscaling.",
        "mask_decoder.output_hypernetworks_mlps.",
        "mask_decoder.iou_prediction_head.",
    ),
    # The head of the single-mask output only (upscaling, mask tokens, the first token's hypernetwork):
    # keeps a small backbone within MSA's 5% budget (LiteMedSAM has 9.9M parameters; its decoder's
    # second block alone is 1.6M).
    "head": (
        "mask_decoder.mask_tokens.",
        "mask_decoder.output_upscaling.",
        "mask_decoder.output_hypernetworks_mlps.0.",
    ),
}


def is_trainable(name: str, decoder: str = "block2") -> bool:
    """True for parameters that MSA trains: adapters, target prompts, and the decoder parts that `decoder` names."""
    return "_adapter." in name or name.startswith(("target_prompts.", *DECODER_TRAINED[decoder]))


@dataclass(frozen=True)
class MSAConfig:
    """What a model is: backbone name, adapter shape, 2D or 3D, what of the decoder trains (a key of
    DECODER_TRAINED), and input normalisation."""

    backbone: str
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    three_d: bool = False
    decoder: str = "block2"
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)

    def to_dict(self) -> dict:
        return asdict(self)


class MSA(nn.Module):
    """Segment Anything with MSA adapters.

    Images enter as float RGB in [0, 255], already resized and padded to img_size x img_size
    (see msa.transforms); the model applies its backbone's pixel normalisation itself.
    Prompts are in model input pixels: points (x, y), boxes (x0, y0, x1, y1).
    """

    def __init__(
        self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: nn.Module, config: MSAConfig
    ) -> None:
        super().__init__()
        self.config = config
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), persistent=False)
        self._backbone_hash: str | None = None
        self._encoder_key: str | None = None
        self._first_adapted_block: int | None = None
        self._encoder_backbone_hash: str | None = None
        self.adapters_meta: dict | None = None  # metadata of the adapter file loaded, if any
        self.target_prompts: TargetPrompts | None = None  # see set_targets
        self.freeze_backbone()

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def single_mask_trained(self) -> bool:
        """Whether the decoder's single-mask output was fine-tuned for clicks: adapters from MSA training
        (whose file records its "training"). The backbone's own single-mask output answers a lone click
        poorly (SAM learnt it for unambiguous prompts), and neither pretraining nor a bare model changes it."""
        return "training" in ((self.adapters_meta or {}).get("extra") or {})

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def is_trainable(self, name: str) -> bool:
        return is_trainable(name, self.config.decoder)

    @property
    def targets(self) -> tuple[str, ...]:
        """The structure names a prompt may name (msa.modeling.targets); () when the adapters learnt none."""
        return self.target_prompts.names if self.target_prompts is not None else ()

    def target_row(self, name: str) -> int:
        """The target_prompts row of a structure name; PromptError when the adapters did not learn it."""
        if self.target_prompts is None:
            raise PromptError(f"target {name!r}: these adapters learnt no target names (msa train --target-probability)")
        return self.target_prompts.index(name)

    def set_targets(self, names: list[str] | tuple[str, ...]) -> None:
        """Give the model target prompts for `names` (none: remove them). Tokens of names it already had are
        kept; a new name starts near SAM's "not a point" token (see TargetPrompts)."""
        old = self.target_prompts
        if not names:
            self.target_prompts = None
            return
        prompts = TargetPrompts(names, self.prompt_encoder.not_a_point_embed.weight[0]).to(self.device)
        if old is not None:
            with torch.no_grad():
                for row, name in enumerate(prompts.names):
                    if name in old.names:
                        prompts.embeddings[row] = old.embeddings[old.names.index(name)]
        self.target_prompts = prompts

    def freeze_backbone(self) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(self.is_trainable(name))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter file holds (adapters and the trained decoder parts)."""
        return {k: v for k, v in self.state_dict().items() if self.is_trainable(k)}

    def backbone_hash(self) -> str:
        """SHA-256 of the frozen backbone's tensors: names an adapter file's backbone exactly."""
        if self._backbone_hash is None:
            self._backbone_hash = _digest((n, t) for n, t in self.state_dict().items()
                                          if not self.is_trainable(n)).hexdigest()
        return self._backbone_hash

    def encoder_backbone_hash(self) -> str:
        """SHA-256 of what the image encoder computes before any adapter: its frozen tensors and the pixel
        normalisation. Stores of encoder features key on it (the decoder does not change them)."""
        if self._encoder_backbone_hash is None:
            digest = _digest((n, t) for n, t in self.state_dict().items()
                             if n.startswith("image_encoder.") and "_adapter." not in n)
            for value in (*self.config.pixel_mean, *self.config.pixel_std):
                digest.update(repr(float(value)).encode())
            self._encoder_backbone_hash = digest.hexdigest()
        return self._encoder_backbone_hash

    def encoder_key(self) -> str:
        """Names what the image encoder computes: its backbone and its adapter weights.

        Embedding caches key on it, so adapters that change only the decoder keep the cache valid.
        """
        if self._encoder_key is None:
            self._encoder_key = _digest(((n, t) for n, t in self.image_encoder.state_dict().items() if "_adapter." in n),
                                        hashlib.sha256(self.backbone_hash().encode())).hexdigest()
        return self._encoder_key

    def weights_changed(self) -> None:
        """Forget what was derived from the weights (call after changing any parameter in place)."""
        self._backbone_hash = self._encoder_backbone_hash = None
        self.adapters_changed()

    def adapters_changed(self) -> None:
        """Forget what was derived from the adapters only (training: the frozen backbone is hashed once)."""
        self._encoder_key = self._first_adapted_block = None

    def first_adapted_block(self) -> int:
        """The image encoder's first block with non-zero adapters (see AdaptedEncoder), cached."""
        if self._first_adapted_block is None:
            self._first_adapted_block = self.image_encoder.first_adapted_block()
        return self._first_adapted_block

    def load_state_dict(self, *args, **kwargs):  # noqa: D102 - nn.Module's, plus cache upkeep
        result = super().load_state_dict(*args, **kwargs)
        self.weights_changed()
        # TinyViT caches its attention biases in eval mode; rebuild them from the loaded weights.
        self.train(self.training)
        return result

    def encode(self, images: torch.Tensor, depth: int = 1) -> torch.Tensor:
        """images: (B*D, 3, S, S) in [0, 255], D consecutive slices per volume -> (B*D, C, h, w)."""
        if depth < 1 or images.shape[0] % depth:
            raise ValueError(f"batch of {images.shape[0]} slices does not split into volumes of depth {depth}")
        if depth > 1 and not self.config.three_d:
            depth = 1  # a 2D model treats every slice on its own
        return self.image_encoder(self.normalise(images), depth)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 255] -> the encoder's input (the backbone's pixel mean and std)."""
        return (images - self.pixel_mean) / self.pixel_std

    def adapters_add_nothing(self) -> bool:
        """True while every adapter's up-projection is zero (fresh adapters, no adapter file): the backbone's answers."""
        return all(not p.any() for name, p in self.named_parameters() if "_adapter.up." in name)

    def encoder_is_backbone(self) -> bool:
        """True while every encoder adapter adds nothing: the embeddings are the backbone's."""
        return self.first_adapted_block() == len(self.image_encoder.adapted_blocks())

    def decode(
        self,
        embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        targets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder, one prompt set per embedding (or many for one embedding).

        points: (coords (B, N, 2) as (x, y), labels (B, N): 1 positive, 0 negative, -1 padding);
        boxes: (B, 4); mask_inputs: (B, 1, 4h, 4w) logits of a previous prediction;
        targets: (B,) rows of target_prompts naming what each prompt set is meant to segment.
        Returns low-resolution mask logits (B, M, 4h, 4w) and predicted IoU (B, M).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_inputs)
        if targets is not None:
            if self.target_prompts is None:
                raise ValueError("this model has no target prompts (its adapters learnt none)")
            names = self.target_prompts.embeddings[targets].to(sparse.dtype)
            sparse = torch.cat([sparse, names.expand(sparse.shape[0], -1).unsqueeze(1)], dim=1)
        return self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(
        self,
        images: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
        depth: int = 1,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.encode(images, depth), points, boxes, mask_inputs, multimask_output)


def _digest(named_tensors, digest=None):
    """SHA-256 over (name, tensor) pairs in name order (continuing `digest` if given)."""
    digest = digest or hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest


def count_parameters(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_fraction": trainable / total}
