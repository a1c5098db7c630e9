"""Target prompts: a learned token per structure name, which says what a click or box is meant to give.

The MSA paper prompts with free text through CLIP's text encoder. No CLIP weights ship offline here, so a
name's token is learned instead, for the label names the adapters were trained on ("liver", "brain",
"left_hippocampus", ...). The token joins the click and box tokens in the mask decoder. It settles what a
click alone cannot: the same click inside the brain may mean the whole brain or the structure under it.
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import nn

from ..errors import PromptError


def canonical_name(name: str) -> str:
    """One spelling of a structure name: lower case, words joined by "_" ("Left-Hippocampus" ->
    "left_hippocampus", "inferior vena cava" -> "inferior_vena_cava")."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


class TargetPrompts(nn.Module):
    """One prompt token per name, in canonical spelling, starting at `start` (the decoder's width).

    The model starts every token at SAM's "not a point" token, which the decoder already reads as no
    information (it pads click-only prompts), plus a little noise of the name's own: an untrained name
    changes the answer little, and each learns away from there. (Tokens drawn at the scale of the point
    tokens instead made named clicks worse than unnamed ones after 100 training steps: README.)
    """

    def __init__(self, names: list[str] | tuple[str, ...], start: torch.Tensor, noise: float = 0.1) -> None:
        super().__init__()
        self.names = tuple(sorted({canonical_name(n) for n in names}))
        if not self.names or "" in self.names:
            raise ValueError(f"target names must be non-empty, got {list(names)}")
        # Each name's noise comes from a generator seeded by the name itself: a token does not depend on
        # which other names share the vocabulary.
        start = start.detach().float().cpu()
        self.embeddings = nn.Parameter(torch.stack([
            start + noise * torch.randn(start.shape, generator=torch.Generator().manual_seed(
                int(hashlib.sha256(n.encode()).hexdigest()[:15], 16)))
            for n in self.names]))

    def index(self, name: str) -> int:
        """The token row of `name` (any spelling canonical_name maps to a known name)."""
        key = canonical_name(name)
        if key not in self.names:
            raise PromptError(f"unknown target {name!r}: these adapters know {', '.join(self.names)}")
        return self.names.index(key)
