"""Checkpoint I/O: official SAM files, reference-MSA files (refused), adapter files, errors, atomic writes.

The reference MSA code dropped the relative-position tables on load (its names rel_h / rel_w did
not match SAM's rel_pos_h / rel_pos_w and the load was not strict), so a "fine-tuned" model ran
with zero tables. Here every key must land, or the load fails with a CheckpointError; files in the
reference code's own layout are refused with one message, since its blocks compute differently.
"""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from segment_anything import sam_model_registry
from torch import nn

import msa

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


# --- 8. reference-MSA files are refused, with one message ---------------------------------------

# What the reference MSA code (MedicineToken/Medical-SAM-Adapter, 2024-06 snapshot; `-net sam -mod
# sam_adpt`, ViT-B, default -mid_dim and -multimask_output) saves under "state_dict": key -> shape,
# written down from reading its model code. "rel" marks a relative-position table (2 * side - 1, 64):
# side 14 in windowed blocks, image_size // 16 in the global ones. A 3D run (-thd True) saves the
# same keys: every block has its Depth_Adapter whether or not it ever ran.
REFERENCE_HIDDEN = 192  # its adapters: int(768 * 0.25)
REFERENCE_GLOBAL_BLOCKS = (2, 5, 8, 11)
REFERENCE_ENCODER = {
    "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
    "pos_embed": (1, 64, 64, 768),  # 1024 // 16 whatever its image_size: interpolated at run time
    "neck.0.weight": (256, 768, 1, 1), "neck.1.weight": (256,), "neck.1.bias": (256,),
    "neck.2.weight": (256, 256, 3, 3), "neck.3.weight": (256,), "neck.3.bias": (256,),
}
REFERENCE_ENCODER_BLOCK = {
    "norm1.weight": (768,), "norm1.bias": (768,),
    "attn.rel_h": "rel", "attn.rel_w": "rel",
    "attn.qkv.weight": (2304, 768), "attn.qkv.bias": (2304,),
    "attn.proj.weight": (768, 768), "attn.proj.bias": (768,),
    "norm2.weight": (768,), "norm2.bias": (768,),
    "mlp.lin1.weight": (3072, 768), "mlp.lin1.bias": (3072,),
    "mlp.lin2.weight": (768, 3072), "mlp.lin2.bias": (768,),
    **{f"{kind}.{key}": shape for kind in ("MLP_Adapter", "Space_Adapter", "Depth_Adapter")
       for key, shape in {"D_fc1.weight": (REFERENCE_HIDDEN, 768), "D_fc1.bias": (REFERENCE_HIDDEN,),
                          "D_fc2.weight": (768, REFERENCE_HIDDEN), "D_fc2.bias": (768,)}.items()},
}
REFERENCE_PROMPT_ENCODER = {
    "pe_layer.positional_encoding_gaussian_matrix": (2, 128),
    **{f"point_embeddings.{i}.weight": (1, 256) for i in range(4)},
    "not_a_point_embed.weight": (1, 256), "no_mask_embed.weight": (1, 256),
    "mask_downscaling.0.weight": (4, 1, 2, 2), "mask_downscaling.0.bias": (4,),
    "mask_downscaling.1.weight": (4,), "mask_downscaling.1.bias": (4,),
    "mask_downscaling.3.weight": (16, 4, 2, 2), "mask_downscaling.3.bias": (16,),
    "mask_downscaling.4.weight": (16,), "mask_downscaling.4.bias": (16,),
    "mask_downscaling.6.weight": (256, 16, 1, 1), "mask_downscaling.6.bias": (256,),
}


def decoder_attention(name: str, inner: int) -> dict:
    """q/k/v/out projections of a two-way-transformer attention with internal width `inner`."""
    return {**{f"{name}.{p}_proj.weight": (inner, 256) for p in "qkv"},
            **{f"{name}.{p}_proj.bias": (inner,) for p in "qkv"},
            f"{name}.out_proj.weight": (256, inner), f"{name}.out_proj.bias": (256,)}


REFERENCE_DECODER_BLOCK = {
    **decoder_attention("self_attn", 256),
    **decoder_attention("cross_attn_token_to_image", 128),
    **decoder_attention("cross_attn_image_to_token", 128),
    **{f"norm{i}.{p}": (256,) for i in range(1, 5) for p in ("weight", "bias")},
    # Its MLP is layers.0 = (Linear, activation) then fc, where SAM has lin1 and lin2.
    "mlp.layers.0.0.weight": (2048, 256), "mlp.layers.0.0.bias": (2048,),
    "mlp.fc.weight": (256, 2048), "mlp.fc.bias": (256,),
}
REFERENCE_MASK_DECODER = {
    **decoder_attention("transformer.final_attn_token_to_image", 128),
    "transformer.norm_final_attn.weight": (256,), "transformer.norm_final_attn.bias": (256,),
    "iou_token.weight": (1, 256), "mask_tokens.weight": (4, 256),
    "output_upscaling.0.weight": (256, 64, 2, 2), "output_upscaling.0.bias": (64,),
    "output_upscaling.1.weight": (64,), "output_upscaling.1.bias": (64,),
    "output_upscaling.3.weight": (64, 32, 2, 2), "output_upscaling.3.bias": (32,),
    **{f"output_hypernetworks_mlps.{i}.layers.{j}.{p}": shape for i in range(4)
       for j, (out, inp) in enumerate([(256, 256), (256, 256), (32, 256)])
       for p, shape in (("weight", (out, inp)), ("bias", (out,)))},
    **{f"iou_prediction_head.layers.{j}.{p}": shape
       for j, (out, inp) in enumerate([(256, 256), (256, 256), (4, 256)])
       for p, shape in (("weight", (out, inp)), ("bias", (out,)))},
}


def reference_msa_state(image_size: int) -> dict[str, tuple]:
    """Every key of a reference ViT-B MSA state dict at `image_size`, with its shape."""
    shapes = {f"image_encoder.{k}": v for k, v in REFERENCE_ENCODER.items()}
    for block in range(12):
        side = image_size // 16 if block in REFERENCE_GLOBAL_BLOCKS else 14
        for key, shape in REFERENCE_ENCODER_BLOCK.items():
            shapes[f"image_encoder.blocks.{block}.{key}"] = (2 * side - 1, 64) if shape == "rel" else shape
    shapes.update({f"prompt_encoder.{k}": v for k, v in REFERENCE_PROMPT_ENCODER.items()})
    for layer in range(2):
        shapes.update({f"mask_decoder.transformer.layers.{layer}.{k}": v for k, v in REFERENCE_DECODER_BLOCK.items()})
    shapes.update({f"mask_decoder.{k}": v for k, v in REFERENCE_MASK_DECODER.items()})
    return shapes


def reference_msa_checkpoint(image_size: int) -> dict:
    """A checkpoint as the reference's train.py writes it, in that layout. The relative-position tables
    are zero, as in its real files (its loader drops SAM's rel_pos_h / rel_pos_w and its training
    freezes them); every other tensor is one random value broadcast to its shape (stride 0: the file
    has the reference's names and shapes and weighs a few kB)."""
    state = {key: (torch.zeros(1) if key.endswith((".rel_h", ".rel_w")) else torch.randn(1)).expand(shape)
             for key, shape in reference_msa_state(image_size).items()}
    return {"epoch": 3, "model": "sam", "state_dict": state, "best_tol": 0.8,
            "path_helper": {"ckpt_path": "logs/run/Model"}}


@pytest.fixture
def reference_msa_file(tmp_path, request) -> tuple:
    image_size = request.param
    path = tmp_path / f"reference_msa_{image_size}.pth"
    checkpoint = reference_msa_checkpoint(image_size)
    torch.save(checkpoint, path)
    return path, image_size, checkpoint["state_dict"]


def test_reference_fixture_is_sam_vit_b_renamed_plus_its_adapters(sam_vit_b):
    """The key list above, checked against segment-anything's ViT-B (which the reference code
    copies): without its adapters and with SAM's names for its rel-pos tables and decoder MLPs it is
    exactly SAM's key set, with SAM's shapes at image_size 1024 and smaller global tables at 256."""
    sam = sam_vit_b[1]
    renames = ((".attn.rel_h", ".attn.rel_pos_h"), (".attn.rel_w", ".attn.rel_pos_w"),
               (".mlp.layers.0.0.", ".mlp.lin1."), (".mlp.fc.", ".mlp.lin2."))

    def as_sam(key: str) -> str:
        for a, b in renames:
            key = key.replace(a, b)
        return key

    for image_size in (1024, 256):
        shapes = reference_msa_state(image_size)
        adapters = [k for k in shapes if "_Adapter." in k]
        assert len(adapters) == 12 * 3 * 4 and len([k for k in adapters if "Depth_Adapter" in k]) == 48
        renamed = {as_sam(k): v for k, v in shapes.items() if k not in adapters}
        assert set(renamed) == set(sam)
        differ = sorted(k for k, v in renamed.items() if tuple(sam[k].shape) != v)
        if image_size == 1024:
            assert differ == []
        else:  # the 8 tables of the 4 global blocks: (31, 64) against SAM's (127, 64)
            assert len(differ) == 8 and all(renamed[k] == (31, 64) for k in differ)


REFUSAL = ("is a reference-MSA checkpoint", "MedicineToken/Medical-SAM-Adapter",
           "residual on the first self-attention", "positional encoding into the attention values",
           "windowed encoder blocks normalise after zero-padding", "relative-position tables are all zero")


@pytest.mark.parametrize("reference_msa_file", [256, 1024], indirect=True)
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_reference_msa_checkpoint_is_refused_with_one_message(reference_msa_file, three_d):
    """A real reference-MSA state dict (its decoder names, Depth_Adapter in every block, zero rel-pos
    tables) is refused for a 2D and a 3D model, at its image_size 256 and 1024, with ONE message that
    names the layout and what computes differently: renaming keys would silently give other masks."""
    path, image_size, _ = reference_msa_file
    with pytest.raises(msa.CheckpointError) as error:
        msa.build_model("vit_b", checkpoint=path, three_d=three_d)
    message = str(error.value)
    assert message.startswith(f"{path} is a reference-MSA checkpoint")
    assert all(part in message for part in REFUSAL), message
    assert f"sized for its image_size {image_size}" in message and "\n" not in message


@pytest.mark.parametrize("reference_msa_file", [256], indirect=True)
def test_reference_msa_state_is_refused_by_every_loader(reference_msa_file):
    """load_backbone (file) and load_backbone_state (a state dict a caller read itself) give the same
    message as build_model, and leave the model untouched."""
    from msa.checkpoint import backbone_state_dict, load_backbone_state

    path, _, state = reference_msa_file
    model = msa.build_model("vit_tiny", three_d=True)
    before = state_of(model)
    with pytest.raises(msa.CheckpointError) as from_file:
        msa.load_backbone(model, path)
    with pytest.raises(msa.CheckpointError) as from_state:
        load_backbone_state(model, dict(state), source=str(path))
    with pytest.raises(msa.CheckpointError) as from_unwrap:
        backbone_state_dict({"model": "sam", "state_dict": state}, source=str(path))
    assert str(from_file.value) == str(from_state.value) == str(from_unwrap.value)
    assert all(part in str(from_file.value) for part in REFUSAL)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("reference_msa_file", [256, 1024], indirect=True)
def test_describe_reference_msa_checkpoint(reference_msa_file):
    """describe_checkpoint names the layout, reads the image size from the global rel-pos tables (its
    pos_embed is 64 x 64 at any size), and reports adapters, depth adapters and zero tables."""
    path, image_size, state = reference_msa_file
    info = msa.describe_checkpoint(path)
    assert info == {
        "file": str(path), "layout": "reference-msa", "image_size": image_size, "adapters": True,
        "depth_adapters": True, "rel_pos_zero": True, "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values())}


def test_describe_official_litemedsam_and_own_files(sam_vit_b, tmp_path):
    """An official SAM file (trained tables), a LiteMedSAM-layout file, a whole 3D MSA state dict and
    an adapter file are each described by their own layout."""
    path, state = sam_vit_b
    assert msa.describe_checkpoint(path) == {
        "file": str(path), "layout": "sam", "image_size": 1024, "adapters": False, "depth_adapters": False,
        "rel_pos_zero": False, "tensors": len(state), "parameters": sum(v.numel() for v in state.values())}

    lite = msa.build_model("lite_medsam_tiny", pretrained=False)
    torch.save({k: v for k, v in lite.state_dict().items() if "_adapter." not in k}, tmp_path / "lite.pth")
    info = msa.describe_checkpoint(tmp_path / "lite.pth")
    assert (info["layout"], info["image_size"], info["adapters"], info["rel_pos_zero"]) == ("litemedsam", None, False, None)

    whole = msa.build_model("vit_tiny", three_d=True)
    torch.save(whole.state_dict(), tmp_path / "whole.pth")
    info = msa.describe_checkpoint(tmp_path / "whole.pth")
    assert (info["layout"], info["image_size"], info["adapters"], info["depth_adapters"]) == ("sam", 64, True, True)

    meta = msa.save_adapters(whole, tmp_path / "adapters.pt")
    info = msa.describe_checkpoint(tmp_path / "adapters.pt")
    assert info["layout"] == "msa-adapters" and info["metadata"] == meta and info["depth_adapters"]


@pytest.mark.parametrize("reference_msa_file", [256], indirect=True)
def test_msa_params_checkpoint_describes_a_file(reference_msa_file, capsys):
    """`msa params --checkpoint FILE [--json]` prints describe_checkpoint; a missing file is one line
    and exit code 2."""
    from msa.cli import main

    path, _, _ = reference_msa_file
    assert main(["params", "--checkpoint", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == msa.describe_checkpoint(path)
    assert main(["params", "--checkpoint", str(path)]) == 0
    text = capsys.readouterr().out
    assert "layout reference-msa" in text and "image size 256" in text and "relative-position tables all zero" in text
    assert "depth adapters yes" in text and "refuses it" in text
    assert main(["params", "--checkpoint", str(path.with_name("nowhere.pth"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa params: error: checkpoint file not found") and err.count("\n") == 1


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
