"""Checkpoint I/O: official SAM files, reference-MSA files, adapter files, errors, atomic writes.

The reference MSA code dropped the relative-position tables on load (its names rel_h / rel_w did
not match SAM's rel_pos_h / rel_pos_w and the load was not strict), so a "fine-tuned" model ran
with zero tables. Here every key must land, or the load fails with a CheckpointError.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from segment_anything import sam_model_registry
from torch import nn

import msa

REFERENCE_HIDDEN = 192  # the reference code's int(768 * 0.25)


def randomize_(tensors: dict[str, torch.Tensor], match: str, std: float = 0.5) -> None:
    for key, value in tensors.items():
        if match in key:
            value.normal_(0.0, std)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomize_trainable_(model: msa.MSA, std: float = 0.05) -> None:
    """Give every trainable tensor (adapters, decoder block 2, mask head) new random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_trainable(name):
                p.add_(torch.randn_like(p) * std)


def outputs(model: msa.MSA, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.decode(model.encode(images), boxes=boxes, multimask_output=True)


# --- 7. an official SAM ViT-B file round-trips --------------------------------------------------


@pytest.fixture(scope="module")
def sam_vit_b(tmp_path_factory):
    """A segment-anything ViT-B (random weights; its zero-initialised rel-pos tables randomised),
    saved as SAM publishes it: a plain state_dict. Built once per module: 94M parameters."""
    state = sam_model_registry["vit_b"]().state_dict()
    randomize_(state, ".attn.rel_pos_")
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b.pth"
    torch.save(state, path)
    return path, state


def test_sam_vit_b_checkpoint_round_trips(sam_vit_b):
    """Every tensor of an official-layout ViT-B file lands in the model unchanged, the 24
    rel-pos tables included; adapters stay at zero; nothing else is in the model."""
    path, state = sam_vit_b
    model = msa.build_model("vit_b", checkpoint=path)
    loaded = model.state_dict()
    rel_pos = [k for k in state if ".attn.rel_pos_" in k]
    assert len(rel_pos) == 24 and all(state[k].abs().sum() > 0 for k in rel_pos)
    assert set(loaded) - set(state) == {k for k in loaded if "_adapter." in k}
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert all(torch.count_nonzero(v) == 0 for k, v in loaded.items() if "_adapter.up." in k)
    assert model.config.adapter == msa.AdapterConfig()  # no adapters in the file: default width


# --- 8. a reference-MSA file loads, with its adapters ----------------------------------------


def reference_layout(state: dict[str, torch.Tensor], depth_adapters: bool = False) -> dict:
    """The reference MSA checkpoint layout: renamed rel-pos tables, D_fc1 / D_fc2 adapters with
    hidden width 192 and random values, wrapped with the training epoch."""
    ref = {}
    for key, value in state.items():
        key = key.replace(".attn.rel_pos_h", ".attn.rel_h").replace(".attn.rel_pos_w", ".attn.rel_w")
        ref[key] = value
    kinds = ["MLP_Adapter", "Space_Adapter"] + (["Depth_Adapter"] if depth_adapters else [])
    for block in range(12):
        for kind in kinds:
            prefix = f"image_encoder.blocks.{block}.{kind}"
            ref[f"{prefix}.D_fc1.weight"] = torch.randn(REFERENCE_HIDDEN, 768) * 0.02
            ref[f"{prefix}.D_fc1.bias"] = torch.randn(REFERENCE_HIDDEN) * 0.02
            ref[f"{prefix}.D_fc2.weight"] = torch.randn(768, REFERENCE_HIDDEN) * 0.02
            ref[f"{prefix}.D_fc2.bias"] = torch.randn(768) * 0.02
    return {"epoch": 3, "model": "sam", "state_dict": ref}


def ours(key: str) -> str:
    for a, b in ((".attn.rel_h", ".attn.rel_pos_h"), (".attn.rel_w", ".attn.rel_pos_w"),
                 ("MLP_Adapter", "mlp_adapter"), ("Space_Adapter", "space_adapter"),
                 ("Depth_Adapter", "depth_adapter"), ("D_fc1", "down"), ("D_fc2", "up")):
        key = key.replace(a, b)
    return key


@pytest.fixture(scope="module")
def reference_msa_files(sam_vit_b, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    files = {}
    for depth_adapters in (False, True):
        checkpoint = reference_layout(sam_vit_b[1], depth_adapters)
        path = folder / f"reference_msa_{'3d' if depth_adapters else '2d'}.pth"
        torch.save(checkpoint, path)
        files[depth_adapters] = (path, checkpoint["state_dict"])
    return files


def test_reference_msa_checkpoint_loads_with_its_adapters(reference_msa_files):
    """Guards against the reference code's dropped rel-pos tables: its rel_h / rel_w land in
    rel_pos_h / rel_pos_w, its D_fc1 / D_fc2 adapters in down / up, and the adapter width (192)
    is inferred from the file. Only our decoder adapters are absent from it."""
    path, ref = reference_msa_files[False]
    model = msa.build_model("vit_b", checkpoint=path)
    loaded = model.state_dict()
    assert len([k for k in ref if k.endswith((".attn.rel_h", ".attn.rel_w"))]) == 24
    for key, value in ref.items():
        assert torch.equal(loaded[ours(key)], value), key
    for block in model.image_encoder.blocks:
        assert block.space_adapter.down.out_features == REFERENCE_HIDDEN
        assert block.mlp_adapter.down.out_features == REFERENCE_HIDDEN
    assert int(768 * model.config.adapter.hidden_ratio) == REFERENCE_HIDDEN
    missing = msa.load_backbone(model, path)  # loading again reports what the file did not have
    assert missing and all(k.startswith("mask_decoder.transformer.layers.0.") and "_adapter." in k for k in missing)


def test_reference_msa_depth_adapters_need_a_3d_model(reference_msa_files):
    """A file with Depth_Adapter keys is refused by a 2D model with a message pointing to 3D, and
    loads completely into a 3D model."""
    path, ref = reference_msa_files[True]
    with pytest.raises(msa.CheckpointError, match="3D") as error:
        msa.build_model("vit_b", checkpoint=path)
    assert "depth_adapter" in str(error.value)
    model = msa.build_model("vit_b", checkpoint=path, three_d=True)
    loaded = model.state_dict()
    depth = [k for k in ref if "Depth_Adapter" in k]
    assert len(depth) == 48
    for key in depth + [k for k in ref if k.endswith(".attn.rel_h")]:
        assert torch.equal(loaded[ours(key)], ref[key]), key


@pytest.mark.parametrize("name", ["vit_tiny", "lite_medsam_tiny", "lite_medsam"])
def test_full_msa_state_dict_round_trips_through_build_model(name, tmp_path):
    """torch.save(model.state_dict()) of an MSA (adapters included, default width) builds back
    into the same model: the adapter width inferred from the file must fit every block, also in
    TinyViT, whose stages have different widths (16/32/320 in the tiny one, 128/160/320)."""
    model = msa.build_model(name, pretrained=False)
    randomize_trainable_(model)
    path = tmp_path / "full.pth"
    torch.save(model.state_dict(), path)
    rebuilt = msa.build_model(name, checkpoint=path)
    loaded = rebuilt.state_dict()
    assert set(loaded) == set(model.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


# --- 9. errors: never a silent drop ------------------------------------------------------------


@pytest.fixture
def tiny_model_and_state():
    model = msa.build_model("vit_tiny")
    state = state_of(model)
    randomize_(state, ".attn.rel_pos_")
    return model, state


@pytest.mark.parametrize("problem, pattern", [
    ("missing", r"1 backbone keys missing .*image_encoder\.blocks\.1\.attn\.rel_pos_h"),
    ("extra", r"1 keys the model does not have .*image_encoder\.blocks\.0\.attn\.rel_pos_t"),
    ("shape", r"1 shape mismatches .*image_encoder\.pos_embed is \(1, 4, 4, 16\) in the file, \(1, 4, 4, 32\)"),
    ("renamed", r"keys the model does not have .*blocks\.1\.attn\.rel_pos_hh.*backbone keys missing"),
])
def test_checkpoint_that_does_not_fit_is_refused(tiny_model_and_state, tmp_path, problem, pattern):
    """A missing key, an extra key, a wrong shape or a misnamed key is a CheckpointError naming
    the key, and the model is left untouched (no partial load)."""
    model, state = tiny_model_and_state
    before = state_of(model)
    key = "image_encoder.blocks.1.attn.rel_pos_h"
    if problem == "missing":
        del state[key]
    elif problem == "extra":
        state["image_encoder.blocks.0.attn.rel_pos_t"] = torch.zeros(3)
    elif problem == "shape":
        state["image_encoder.pos_embed"] = torch.zeros(1, 4, 4, 16)
    else:
        state[key + "h"] = state.pop(key)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(msa.CheckpointError, match=pattern):
        msa.load_backbone(model, path)
    with pytest.raises(msa.CheckpointError, match=pattern):
        msa.build_model("vit_tiny", checkpoint=path)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_unreadable_checkpoints_are_refused(tmp_path):
    """A non-existent file, garbage bytes, a pickle with a Python object (refused by
    weights_only) and a file without tensors are each a CheckpointError saying so."""
    model = msa.build_model("vit_tiny")
    assert issubclass(msa.CheckpointError, msa.MSAError)

    with pytest.raises(msa.CheckpointError, match="checkpoint file not found: .*nowhere.pth"):
        msa.load_backbone(model, tmp_path / "nowhere.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(msa.CheckpointError, match="cannot read checkpoint .*garbage.pth"):
        msa.load_backbone(model, garbage)

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, unsafe)
    with pytest.raises(msa.CheckpointError, match=r"cannot read checkpoint .*unsafe.pth: .*[Ww]eights only"):
        msa.load_backbone(model, unsafe)

    no_tensors = tmp_path / "no_tensors.pth"
    torch.save({"state_dict": {"a": 1}}, no_tensors)
    with pytest.raises(msa.CheckpointError, match="no state_dict of tensors"):
        msa.load_backbone(model, no_tensors)


def test_ddp_prefix_and_model_wrapper_are_unwrapped(tiny_model_and_state, tmp_path):
    """{'model': state} with DDP's 'module.' prefix (as training scripts save) loads fully."""
    model, state = tiny_model_and_state
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, path)
    assert msa.load_backbone(model, path) == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# --- 10. adapter files -------------------------------------------------------------------------


@pytest.fixture
def trained_tiny(tmp_path):
    """A vit_tiny with random 'trained' parts, and its backbone saved as a checkpoint file."""
    model = msa.build_model("vit_tiny")
    randomize_trainable_(model)
    backbone = tmp_path / "backbone.pth"
    torch.save({k: v for k, v in model.state_dict().items() if "_adapter." not in k}, backbone)
    return model, backbone


def test_adapter_file_round_trips(trained_tiny, tmp_path):
    """save_adapters -> load_adapters into a fresh model on the same backbone reproduces the
    outputs exactly; the file holds exactly the trainable tensors and names backbone and hash."""
    model, backbone = trained_tiny
    path = tmp_path / "adapters" / "run1.pt"
    meta = msa.save_adapters(model, path, extra={"epoch": 7, "dice": 0.91})

    payload = torch.load(path, weights_only=True)
    assert set(payload["state_dict"]) == set(model.trainable_state_dict())
    assert all(model.is_trainable(k) for k in payload["state_dict"])
    trainable_bytes = sum(v.numel() * v.element_size() for v in model.trainable_state_dict().values())
    total_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert trainable_bytes < total_bytes
    assert os.path.getsize(path) < trainable_bytes + 200_000
    assert meta == payload["metadata"] == msa.read_adapter_metadata(path)
    assert meta["backbone"] == "vit_tiny" and meta["format"] == "msa-adapters"
    assert meta["backbone_sha256"] == model.backbone_hash() and len(meta["backbone_sha256"]) == 64
    assert meta["extra"] == {"epoch": 7, "dice": 0.91}

    fresh = msa.build_model("vit_tiny", checkpoint=backbone)
    images, boxes = torch.rand(2, 3, 64, 64) * 255, torch.tensor([[4.0, 5, 40, 50], [10, 12, 60, 30]])
    assert not torch.equal(outputs(fresh, images, boxes)[0], outputs(model, images, boxes)[0])
    msa.load_adapters(fresh, path)
    for got, expected in zip(outputs(fresh, images, boxes), outputs(model, images, boxes)):
        assert torch.equal(got, expected)
    # The same through build_model(adapters=...).
    built = msa.build_model("vit_tiny", checkpoint=backbone, adapters=path)
    assert torch.equal(outputs(built, images, boxes)[0], outputs(model, images, boxes)[0])


def test_adapter_file_refuses_another_backbone(trained_tiny, tmp_path):
    """Adapters trained on one backbone do not load into another backbone, nor into the same
    backbone name with other weights (the sha256 differs), nor into a 3D or other-width model."""
    model, _ = trained_tiny
    path = tmp_path / "adapters.pt"
    msa.save_adapters(model, path)
    with pytest.raises(msa.CheckpointError, match="backbone 'vit_tiny', not 'lite_medsam_tiny'"):
        msa.load_adapters(msa.build_model("lite_medsam_tiny"), path)
    other = msa.build_model("vit_tiny")  # same name, new random backbone weights
    assert other.backbone_hash() != model.backbone_hash()
    before = state_of(other)
    with pytest.raises(msa.CheckpointError, match="other vit_tiny weights"):
        msa.load_adapters(other, path)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    not_adapters = tmp_path / "backbone_only.pth"
    torch.save(model.state_dict(), not_adapters)
    with pytest.raises(msa.CheckpointError, match="not an MSA adapter file"):
        msa.load_adapters(model, not_adapters)


def test_backbone_hash_tracks_backbone_weights_only(trained_tiny):
    """The hash changes when a backbone tensor changes (also through load_state_dict, which must
    invalidate the cached value) and not when a trainable tensor does."""
    model, _ = trained_tiny
    first = model.backbone_hash()
    state = model.state_dict()
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"] + 1  # trainable
    model.load_state_dict(state)
    assert model.backbone_hash() == first
    state["image_encoder.blocks.0.attn.rel_pos_h"] = state["image_encoder.blocks.0.attn.rel_pos_h"] + 1
    model.load_state_dict(state)
    assert model.backbone_hash() != first


def test_save_adapters_is_atomic(trained_tiny, tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous file byte-identical and no temporary file."""
    model, _ = trained_tiny
    folder = tmp_path / "out"
    path = folder / "adapters.pt"
    msa.save_adapters(model, path)
    previous = path.read_bytes()

    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(obj)
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    randomize_trainable_(model)
    with pytest.raises(OSError, match="disk full"):
        msa.save_adapters(model, path)
    assert len(calls) == 1  # the failure happened inside the write
    assert path.read_bytes() == previous
    assert sorted(p.name for p in folder.iterdir()) == ["adapters.pt"]


# --- 11. device and TinyViT's cached attention biases -----------------------------------------


def test_checkpoint_saved_on_gpu_loads_on_cpu(tmp_path, monkeypatch):
    """A file whose tensors were saved from cuda:0 loads on the CPU (map_location), and the model's
    tensors stay on the CPU."""
    model = msa.build_model("vit_tiny")
    state = state_of(model)
    randomize_(state, ".attn.rel_pos_")
    path = tmp_path / "from_gpu.pth"
    with monkeypatch.context() as patch:  # tag every storage as cuda:0, as a GPU save does
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    if not torch.cuda.is_available():  # the file really is a GPU file: plain torch.load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    msa.load_backbone(model, path)
    loaded = model.state_dict()
    assert all(v.device.type == "cpu" for v in loaded.values())
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_tinyvit_cached_attention_biases_follow_loaded_weights(tmp_path):
    """TinyViT caches attention biases (attention_biases[:, idxs]) when put in eval mode; loading
    other weights into an eval model must refresh that cache, or it keeps the old biases."""
    model = msa.build_model("lite_medsam_tiny")  # eval mode: caches its zero biases now
    source = msa.build_model("lite_medsam_tiny")
    state = {k: v for k, v in state_of(source).items() if "_adapter." not in k}  # a LiteMedSAM-style file
    randomize_(state, "attention_biases", std=1.0)
    path = tmp_path / "biases.pth"
    torch.save(state, path)

    def cache_is_fresh(m: msa.MSA) -> bool:
        caches = [(mod.ab, mod.attention_biases[:, mod.attention_bias_idxs])
                  for mod in m.modules() if hasattr(mod, "attention_bias_idxs")]
        return len(caches) == 4 and all(torch.equal(ab, expected) for ab, expected in caches)

    images = torch.rand(1, 3, 256, 256) * 255
    with torch.no_grad():
        stale = model.encode(images)
        msa.load_backbone(model, path)
        fresh = msa.build_model("lite_medsam_tiny", checkpoint=path)
        assert not model.training and not fresh.training
        assert cache_is_fresh(model)
        got = model.encode(images)
        assert torch.equal(got, fresh.encode(images))
    assert (got - stale).abs().max() > 1e-3  # the new biases matter

    # The same through load_state_dict directly.
    other = msa.build_model("lite_medsam_tiny")
    other.load_state_dict(state, strict=False)
    assert cache_is_fresh(other)
