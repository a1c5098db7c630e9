"""MSA on segment-anything's ViT image encoder (SAM ViT-B/L/H, MedSAM ViT-B).

The wrapped modules keep segment-anything's attribute names, so official checkpoint files load
unchanged; the adapters are new children next to them.
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT, window_partition, window_unpartition
from torch import nn

from .adapter import Adapter, AdapterConfig
from .depth import checkpointed
from .depth import depth_to_slices, multihead_attention, slices_to_depth
from .encoder import AdaptedEncoder


class MSAViTBlock(nn.Module):
    """A SAM ViT block with the paper's two adapters and, in 3D mode, the depth branch.

    space_adapter: after multi-head attention, before the residual add.
    mlp_adapter:   parallel to the MLP, scaled by s.
    depth branch:  the block's own attention weights applied across the D slices of each token
                   (no spatial relative-position bias: an in-plane offset is not a slice offset),
                   through the zero-initialised depth_adapter, added to the spatial branch.
    The depth branch runs before window partitioning, so windowed blocks mix slices, not windows.
    """

    def __init__(self, block: Block, config: AdapterConfig, three_d: bool) -> None:
        super().__init__()
        dim = block.norm1.normalized_shape[0]
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp
        self.window_size = block.window_size
        self.mlp_scale = config.mlp_scale
        self.space_adapter = Adapter(dim, config, skip=True)
        self.mlp_adapter = Adapter(dim, config, skip=False)
        self.depth_adapter = Adapter(dim, config, skip=False) if three_d else None

    def depth_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B*N, D, C) normalised tokens -> (B*N, D, C)."""
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)
        return self.attn.proj(multihead_attention(q, k, v, self.attn.num_heads, self.attn.scale))

    def forward(self, x: torch.Tensor, depth: int = 1) -> torch.Tensor:
        """x: (B*D, H, W, C) -> (B*D, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        depth_out = None
        if self.depth_adapter is not None and depth > 1:
            bd, h, w, c = x.shape
            tokens = slices_to_depth(x.reshape(bd, h * w, c), depth)
            depth_out = self.depth_adapter(self.depth_attention(tokens))
            depth_out = depth_to_slices(depth_out, depth, h * w).reshape(bd, h, w, c)

        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = self.space_adapter(x)
        if depth_out is not None:
            x = x + depth_out
        x = shortcut + x

        normed = self.norm2(x)
        return x + self.mlp(normed) + self.mlp_scale * self.mlp_adapter(normed)


class MSAViTEncoder(AdaptedEncoder):
    """segment-anything's ImageEncoderViT with every block replaced by an MSAViTBlock."""

    def __init__(self, encoder: ImageEncoderViT, config: AdapterConfig, three_d: bool) -> None:
        super().__init__()
        self.img_size = encoder.img_size
        self.patch_embed = encoder.patch_embed
        self.pos_embed = encoder.pos_embed
        self.blocks = nn.ModuleList(MSAViTBlock(b, config, three_d) for b in encoder.blocks)
        self.neck = encoder.neck
        self.checkpointing = False  # recompute block activations in backward (saves GPU memory when training)

    def adapted_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        return x + self.pos_embed if self.pos_embed is not None else x

    def _run(self, x: torch.Tensor, start: int, stop: int, depth: int) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            x = checkpointed(block, x, depth, self.checkpointing)
        return x

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(x.permute(0, 3, 1, 2))
