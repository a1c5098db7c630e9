"""Encoder features kept on disk, so that a slice is encoded once per machine, not once per run.

What is stored is the *trunk*: the input of one adapted encoder block, computed by the frozen
backbone (every adapter before that block adds nothing). It depends only on the weights of the
backbone's image encoder, the block index, the image content and its intensity preset, and those four
name it:

    ROOT/<encoder sha256[:16]>-block<index>/<volume sha1[:20]>-<preset>-<preprocessing>/<k>.npy   (float16)

where <preprocessing> hashes the preset's parameters and STORE_VERSION (bumped whenever the way a
slice becomes model input changes), so a store never serves trunks of other preprocessing.

Any adapter file whose earlier blocks are zero (decoder-side adapters, adapters trained in the last
N blocks, a 3D model whose depth branch starts at that block) computes its embeddings from the same
trunk in a fraction of an encoder pass. Files are written atomically; a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import MSAError

STORE_VERSION = 1  # bump when windowing, RGB conversion or resizing of slices changes


class FeatureStore:
    """Per-slice trunk tensors on disk under `root` (created if missing; must be writable)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe.")
            probe.close()
        except OSError as exc:
            raise MSAError(f"cache folder {self.root} is not writable: {exc.strerror or exc}") from None

    @staticmethod
    def space(encoder_hash: str, block: int) -> str:
        return f"{encoder_hash[:16]}-block{block}"

    @staticmethod
    def image(volume_key: str, preset: str) -> str:
        from .transforms import PRESETS

        preprocessing = hashlib.sha1(f"{STORE_VERSION}:{PRESETS[preset]!r}".encode()).hexdigest()[:8]
        return f"{volume_key[:20]}-{preset}-{preprocessing}"

    def path(self, space: str, image: str, k: int) -> Path:
        return self.root / space / image / f"{k}.npy"

    def get(self, space: str, image: str, k: int) -> torch.Tensor | None:
        path = self.path(space, image, k)
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (FileNotFoundError, ValueError, OSError):  # absent, or damaged: encode again
            return None

    def put(self, space: str, image: str, k: int, tensor: torch.Tensor) -> None:
        path = self.path(space, image, k)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{k}.", suffix=".npy", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, tensor.detach().to("cpu", torch.float16).numpy(), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
