"""Shared pieces of the 3D depth branch: moving tokens between the slice axis and the batch axis.

The encoders see a batch of B*D slices (slice-major per volume: all D slices of volume 0, then
volume 1, ...). The depth branch attends over the D slices of each token position, so it needs the
tokens regrouped as (B*N, D, C); these two functions convert and are exact inverses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def slices_to_depth(x: torch.Tensor, depth: int) -> torch.Tensor:
    """(B*D, N, C) -> (B*N, D, C)."""
    bd, n, c = x.shape
    if bd % depth:
        raise ValueError(f"batch of {bd} slices is not a multiple of depth {depth}")
    return x.reshape(bd // depth, depth, n, c).transpose(1, 2).reshape(-1, depth, c)


def depth_to_slices(x: torch.Tensor, depth: int, tokens: int) -> torch.Tensor:
    """(B*N, D, C) -> (B*D, N, C)."""
    c = x.shape[-1]
    return x.reshape(-1, tokens, depth, c).transpose(1, 2).reshape(-1, tokens, c)


def multihead_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """Plain multi-head self-attention over the middle axis: q, k: (L, D, heads*dk), v: (L, D, heads*dv)."""
    L, D, _ = q.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(L, D, num_heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), scale=scale)
    return out.transpose(1, 2).reshape(L, D, -1)


def checkpointed(block: torch.nn.Module, x: torch.Tensor, depth: int, enabled: bool) -> torch.Tensor:
    """block(x, depth), with gradient checkpointing when enabled and gradients are being recorded."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, x, depth, use_reentrant=False)
    return block(x, depth)
