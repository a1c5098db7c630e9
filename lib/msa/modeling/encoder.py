"""What the two MSA image encoders (SAM's ViT, LiteMedSAM's TinyViT) share: a forward pass that can
stop before, or start at, any adapted block.

Training only the adapters of the last few blocks needs the input of those blocks, which does not
change while they learn: it is computed once per slice and cached, and each step runs only the last
blocks and the neck (cheap enough for a CPU, unlike backpropagating through the whole encoder).
"""

from __future__ import annotations

import torch
from torch import nn


class AdaptedEncoder(nn.Module):
    """Subclasses define _stem (normalised images -> input of block 0), _run (blocks [start, stop)),
    _neck (output of the last block -> embeddings) and adapted_blocks()."""

    def adapted_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def first_adapted_block(self) -> int:
        """Index of the first block whose adapters add anything (len(blocks) when none does).

        Up to that block the encoder computes exactly what the backbone computes, in 2D and in 3D
        (a zero depth adapter adds nothing either), so the input of that block is the backbone's.
        """
        for index, block in enumerate(self.adapted_blocks()):
            if any(p.any() for name, p in block.named_parameters() if "_adapter.up." in name):
                return index
        return len(self.adapted_blocks())

    def forward(self, x: torch.Tensor, depth: int = 1) -> torch.Tensor:
        """x: (B*D, 3, S, S) normalised images -> (B*D, 256, h, w) embeddings."""
        return self.from_block(self._stem(x), 0, depth)

    def block_input(self, x: torch.Tensor, index: int, depth: int = 1) -> torch.Tensor:
        """The input of adapted block `index` for normalised images x."""
        return self._run(self._stem(x), 0, index, depth)

    def run_blocks(self, h: torch.Tensor, start: int, stop: int, depth: int = 1) -> torch.Tensor:
        """The input of adapted block `stop` from the input h of adapted block `start`."""
        return self._run(h, start, stop, depth)

    def from_block(self, h: torch.Tensor, index: int, depth: int = 1) -> torch.Tensor:
        """Embeddings from the input h of adapted block `index`: that block, the ones after it, the neck."""
        return self._neck(self._run(h, index, len(self.adapted_blocks()), depth))
