"""The feature store and what stands on it (tiny random models, both encoder families):

- embeddings computed from stored trunks equal the full encoder pass (2D and 3D), to float16;
- a second engine on a warm store runs no encoder pass; a trunk is derived from a lower stored one;
- the depth branch on slabs of stacked per-slice trunks equals the full 3D pass while the blocks
  before the trunk have zero adapters, and does not when one of them adds something;
- a cache folder that cannot be written is a clear error.
"""

from __future__ import annotations

from pathlib import Path

import msa
import numpy as np
import pytest
import torch
from msa.engine import Engine
from msa.errors import MSAError
from msa.io import Volume
from msa.store import FeatureStore

FAMILIES = ("vit_tiny", "lite_medsam_tiny")


def volume(depth: int = 6, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(voxels=rng.normal(0, 300, (depth, 30, 36)).astype(np.float32), geometry=None, modality="ct",
                  source="random")


def randomise_adapters(model: msa.MSA, blocks: list[int], seed: int = 1) -> None:
    """Give the adapters of the chosen encoder blocks non-zero up-projections."""
    generator = torch.Generator().manual_seed(seed)
    adapted = model.image_encoder.adapted_blocks()
    with torch.no_grad():
        for index in blocks:
            for name, param in adapted[index].named_parameters():
                if "_adapter.up." in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    model.weights_changed()


@pytest.mark.parametrize("three_d", [False, True])
@pytest.mark.parametrize("backbone", FAMILIES)
def test_embeddings_from_stored_trunks_equal_the_full_pass(backbone: str, three_d: bool, tmp_path: Path) -> None:
    model = msa.build_model(backbone, pretrained=False, three_d=three_d)
    last = len(model.image_encoder.adapted_blocks()) - 1
    randomise_adapters(model, [last])  # trained last block: the trunk is that block's input
    assert model.first_adapted_block() == last
    vol = volume()
    plain = Engine(model, slab_depth=3)
    stored = Engine(model, slab_depth=3, store=FeatureStore(tmp_path))
    ks = list(range(6))
    expected, got = plain.embeddings(vol, ks), stored.embeddings(vol, ks)
    assert torch.allclose(got, expected, atol=5e-3), (got - expected).abs().max()
    assert stored.encoded_slices == 6
    files = list(tmp_path.rglob("*.npy"))
    assert len(files) == 6 and all(f"-block{last}" in str(f) for f in files)

    warm = Engine(model, slab_depth=3, store=FeatureStore(tmp_path))  # a later run on the same machine
    assert torch.equal(warm.embeddings(vol, ks), got)
    assert warm.encoded_slices == 0


def test_trunks_derive_from_a_lower_stored_block(tmp_path: Path) -> None:
    """Decoder-side adapters want the trunk after the last block; an encoder-adapted model stored the
    input of an earlier block: the later trunk comes from it, without a full encoder pass."""
    adapted = msa.build_model("lite_medsam_tiny", pretrained=False)
    backbone = msa.build_model("lite_medsam_tiny", pretrained=False)
    backbone.load_state_dict(adapted.state_dict())
    randomise_adapters(adapted, [2])
    vol = volume()
    first = Engine(adapted, store=FeatureStore(tmp_path))
    first.ensure_trunks(vol, [0, 1, 2])
    assert first.encoded_slices == 3
    second = Engine(backbone, store=FeatureStore(tmp_path))
    got = second.embeddings(vol, [0, 1, 2])
    assert second.encoded_slices == 0  # blocks 2-3 ran on the stored input of block 2
    expected = Engine(backbone).embeddings(vol, [0, 1, 2])
    assert torch.allclose(got, expected, atol=5e-3)


def test_a_trunk_past_the_first_adapted_block_is_refused(tmp_path: Path) -> None:
    model = msa.build_model("vit_tiny", pretrained=False)
    randomise_adapters(model, [1])
    with pytest.raises(ValueError, match="skip the adapters"):
        Engine(model, store=FeatureStore(tmp_path)).trunks(volume(), [0], block=3)


@pytest.mark.parametrize("backbone", FAMILIES)
def test_depth_branch_on_stacked_slice_trunks_equals_the_full_3d_pass(backbone: str) -> None:
    model = msa.build_model(backbone, pretrained=False, three_d=True)
    blocks = len(model.image_encoder.adapted_blocks())
    start = blocks - 2  # train the last two blocks, their depth adapters included
    randomise_adapters(model, [start, start + 1])
    encoder = model.image_encoder
    images = model.normalise(Engine(model).model_input(volume(depth=4), [0, 1, 2, 3]))
    with torch.no_grad():
        full = model.encode(Engine(model).model_input(volume(depth=4), [0, 1, 2, 3]), depth=4)
        per_slice = torch.cat([encoder.block_input(images[n:n + 1], start) for n in range(4)])  # 2D, one at a time
        from_slabs = encoder.from_block(per_slice, start, depth=4)
    assert torch.allclose(from_slabs, full, atol=1e-5), (from_slabs - full).abs().max()
    assert not torch.allclose(encoder.from_block(per_slice, start, depth=1), full, atol=1e-3)  # depth matters

    randomise_adapters(model, [start - 1], seed=2)  # an earlier block adds something: the condition fails
    with torch.no_grad():
        full = model.encode(Engine(model).model_input(volume(depth=4), [0, 1, 2, 3]), depth=4)
        per_slice = torch.cat([encoder.block_input(images[n:n + 1], start) for n in range(4)])
        assert not torch.allclose(encoder.from_block(per_slice, start, depth=4), full, atol=1e-3)


def test_unwritable_cache_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(MSAError, match="not writable"):
        FeatureStore(blocker / "features")
