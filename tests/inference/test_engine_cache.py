"""EmbeddingCache (LRU by bytes) and the Engine's use of it: each slice (or 3D slab) encoded once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from msa.engine import EmbeddingCache, Engine
from msa.io import load_image

from inference_helpers import synthetic_ct, write_volume

# -- EmbeddingCache -----------------------------------------------------------------------------


def tensor(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype)


def test_lru_evicts_the_least_recently_used_by_bytes():
    cache = EmbeddingCache(max_bytes=80)  # room for two 10-float tensors (40 bytes each)
    cache.put("a", tensor(10))
    cache.put("b", tensor(10))
    assert cache.bytes == 80 and len(cache) == 2
    cache.put("c", tensor(10))
    assert "a" not in cache and "b" in cache and "c" in cache
    assert cache.get("a") is None
    assert cache.bytes == 80 and len(cache) == 2


def test_get_refreshes_recency():
    cache = EmbeddingCache(max_bytes=80)
    a = tensor(10)
    cache.put("a", a)
    cache.put("b", tensor(10))
    assert cache.get("a") is a  # "a" is now the most recently used
    cache.put("c", tensor(10))
    assert "a" in cache and "b" not in cache and "c" in cache
    assert cache.bytes == 80


def test_byte_accounting_is_exact():
    cache = EmbeddingCache(max_bytes=1000)
    cache.put("f32", tensor(10))  # 40
    cache.put("f16", tensor(10, torch.float16))  # 20
    cache.put("f64", torch.zeros(2, 3, dtype=torch.float64))  # 48
    assert cache.bytes == 108
    cache.put("f32", tensor(5))  # replacing an entry: 40 out, 20 in
    assert cache.bytes == 88 and len(cache) == 3
    cache.put("big", tensor(200))  # 800: 888 in all, fits
    assert cache.bytes == 888 and len(cache) == 4
    assert cache.get("f16") is not None  # recency now: f64, f32, big, f16
    cache.put("more", tensor(40))  # 160: 1048 > 1000, so the oldest (f64, 48) goes -> exactly 1000
    assert "f64" not in cache and all(k in cache for k in ("f32", "big", "f16", "more"))
    assert cache.bytes == 1000
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_the_newest_entry_is_kept_even_over_budget():
    cache = EmbeddingCache(max_bytes=50)
    cache.put("small", tensor(5))
    cache.put("huge", tensor(100))  # 400 bytes alone: the older entry goes, the new one stays
    assert "small" not in cache and "huge" in cache
    assert cache.bytes == 400 and len(cache) == 1


# -- Engine -------------------------------------------------------------------------------------

BOX = (6.0, 5.0, 24.0, 18.0)  # (i0, j0, i1, j1) inside the 32 x 24 synthetic slice


def test_second_predict_on_a_slice_reuses_its_embedding(tiny_model, tiny_volume):
    engine = Engine(tiny_model)
    logits, iou = engine.predict(tiny_volume, 2, box=BOX)
    assert logits.shape == (24, 32) and logits.dtype == np.float32
    assert isinstance(iou, float)
    assert engine.encoded_slices == 1
    again, _ = engine.predict(tiny_volume, 2, points=[(10.0, 10.0, 1), (20.0, 12.0, 0)])
    engine.predict(tiny_volume, 2, box=BOX, mask_input=logits)
    assert engine.encoded_slices == 1
    same, _ = engine.predict(tiny_volume, 2, box=BOX)
    np.testing.assert_array_equal(same, logits)  # the cached embedding gives the same answer
    engine.predict(tiny_volume, 3, box=BOX)
    assert engine.encoded_slices == 2
    assert len(engine.cache) == 2


def test_without_cache_every_predict_encodes(tiny_model, tiny_volume):
    engine = Engine(tiny_model, use_cache=False)
    first, _ = engine.predict(tiny_volume, 1, box=BOX)
    for n in range(2, 5):
        again, _ = engine.predict(tiny_volume, 1, box=BOX)
        assert engine.encoded_slices == n
        np.testing.assert_allclose(again, first, atol=1e-5)
    assert len(engine.cache) == 0 and engine.cache.bytes == 0


def test_identical_voxels_share_cache_entries(tiny_model, small_ct, tmp_path):
    engine = Engine(tiny_model)
    one, two = load_image(small_ct), load_image(small_ct)
    assert one is not two and one.key == two.key
    a, _ = engine.predict(one, 4, box=BOX)
    b, _ = engine.predict(two, 4, box=BOX)
    assert engine.encoded_slices == 1
    np.testing.assert_array_equal(a, b)
    other = load_image(write_volume(tmp_path / "other.nii.gz", synthetic_ct(seed=7)))
    assert other.key != one.key
    engine.predict(other, 4, box=BOX)
    assert engine.encoded_slices == 2


def test_embeddings_encode_only_missing_slices(tiny_model, tiny_volume):
    engine = Engine(tiny_model, batch_size=4)
    engine.predict(tiny_volume, 2, box=BOX)
    out = engine.embeddings(tiny_volume, list(range(6)))
    assert out.shape[0] == 6
    assert engine.encoded_slices == 6  # 1 before + the 5 missing ones
    engine.embeddings(tiny_volume, [5, 0, 3])
    assert engine.encoded_slices == 6
    assert torch.equal(engine.embeddings(tiny_volume, [3])[0], out[3])


def test_concurrent_requests_each_count_their_own_encodings(tiny_model, small_ct, tmp_path):
    """Two requests on one engine, counting at the same time: each gets the slices IT encoded (the
    engine's running total, read before and after, would give both the sum)."""
    import threading

    engine = Engine(tiny_model, batch_size=2)
    one, other = load_image(small_ct), load_image(write_volume(tmp_path / "other.nii.gz", synthetic_ct(seed=7)))
    both_counting = threading.Barrier(2)
    counts = {}

    def request(name, volume, ks):
        with engine.count_encodings() as encoded:
            both_counting.wait(timeout=30)
            engine.embeddings(volume, ks)
        counts[name] = encoded.slices

    threads = [threading.Thread(target=request, args=("one", one, list(range(6)))),
               threading.Thread(target=request, args=("other", other, [1, 2, 3]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert counts == {"one": 6, "other": 3} and engine.encoded_slices == 9
    with engine.count_encodings() as encoded:
        engine.embeddings(one, [0, 5])  # cached
    assert encoded.slices == 0


def _held_encoder(engine: Engine, volume):
    """Make `engine` stop inside the encoder for `volume` until released -> (inside, release) events."""
    import threading

    inside, release = threading.Event(), threading.Event()
    encode = engine.model_input

    def held(vol, ks):
        if vol.key == volume.key:
            inside.set()
            assert release.wait(60), "never released"
        return encode(vol, ks)

    engine.model_input = held
    return inside, release


def test_a_cached_slice_answers_while_another_image_is_encoded(tiny_model, small_ct, tmp_path):
    """The encoder runs outside the cache lock: a request whose slices are cached is not held up by
    another request's encoding (the lock used to be held over the whole encoder loop)."""
    import threading

    engine = Engine(tiny_model)
    cached, slow = load_image(small_ct), load_image(write_volume(tmp_path / "slow.nii.gz", synthetic_ct(seed=3)))
    engine.predict(cached, 4, box=BOX)
    inside, release = _held_encoder(engine, slow)
    encoding = threading.Thread(target=engine.embeddings, args=(slow, [0, 1, 2]))
    encoding.start()
    try:
        assert inside.wait(30)
        answered = threading.Thread(target=engine.predict, args=(cached, 4), kwargs={"box": BOX})
        answered.start()
        answered.join(30)
        assert not answered.is_alive(), "a cached click waited for another image's encoding"
    finally:
        release.set()
        encoding.join(60)
    assert engine.encoded_slices == 4


def test_two_requests_for_the_same_slices_encode_them_once(tiny_model, small_ct):
    """A second request for slices being encoded waits for that pass and gets its embeddings."""
    import threading

    engine = Engine(tiny_model, batch_size=4)
    volume = load_image(small_ct)
    inside, release = _held_encoder(engine, volume)
    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", engine.embeddings(volume, [1, 2, 3])))
    first.start()
    assert inside.wait(30)
    second = threading.Thread(target=lambda: results.setdefault("second", engine.embeddings(volume, [3, 2, 5])))
    second.start()
    second.join(1)  # it is waiting for the first request's pass (slices 2, 3) and encodes slice 5 itself
    release.set()
    first.join(60)
    second.join(60)
    assert engine.encoded_slices == 4  # slices 1, 2, 3 once, and 5
    assert torch.equal(results["second"][0], results["first"][2]) and torch.equal(results["second"][1], results["first"][1])


def test_cache_budget_bounds_the_engine(tiny_model, tiny_volume):
    probe = Engine(tiny_model)
    one = probe.embeddings(tiny_volume, [0])[0]
    size = one.element_size() * one.nelement()
    engine = Engine(tiny_model, cache_bytes=2 * size)
    for k in (0, 1, 2):
        engine.predict(tiny_volume, k, box=BOX)
    assert len(engine.cache) == 2 and engine.cache.bytes == 2 * size
    engine.predict(tiny_volume, 2, box=BOX)  # still cached
    assert engine.encoded_slices == 3
    engine.predict(tiny_volume, 0, box=BOX)  # evicted: encoded again
    assert engine.encoded_slices == 4


@pytest.fixture
def ten_slices(tmp_path):
    return load_image(write_volume(tmp_path / "ten.nii.gz", synthetic_ct(shape=(10, 24, 32))))


def test_3d_engine_encodes_whole_slabs(tiny_model_3d, ten_slices):
    engine = Engine(tiny_model_3d, slab_depth=4)
    assert engine.slab_depth == 4
    engine.predict(ten_slices, 5, box=BOX)  # slab [4, 8)
    assert engine.encoded_slices == 4 and len(engine.cache) == 4
    engine.predict(ten_slices, 7, box=BOX)
    engine.predict(ten_slices, 4, box=BOX)
    assert engine.encoded_slices == 4
    engine.predict(ten_slices, 9, box=BOX)  # the last slab [8, 10) is shorter
    assert engine.encoded_slices == 6 and len(engine.cache) == 6
    engine.embeddings(ten_slices, list(range(10)))  # only slab [0, 4) is missing
    assert engine.encoded_slices == 10 and len(engine.cache) == 10


def test_3d_engine_without_cache_encodes_a_slab_per_predict(tiny_model_3d, ten_slices):
    engine = Engine(tiny_model_3d, slab_depth=4, use_cache=False)
    engine.predict(ten_slices, 1, box=BOX)
    engine.predict(ten_slices, 1, box=BOX)
    engine.predict(ten_slices, 8, box=BOX)
    assert engine.encoded_slices == 4 + 4 + 2


def test_2d_model_ignores_slab_depth(tiny_model, ten_slices):
    engine = Engine(tiny_model, slab_depth=4)
    assert engine.slab_depth == 1
    engine.predict(ten_slices, 5, box=BOX)
    assert engine.encoded_slices == 1


def test_cached_entries_hold_only_their_own_memory(tiny_model_3d, ten_slices):
    """The byte budget is the memory held: an entry is not a view into its slab's batch tensor (which
    would keep all 4 slices alive after the other 3 are evicted)."""
    engine = Engine(tiny_model_3d, slab_depth=4)
    engine.embeddings(ten_slices, [0, 1, 2, 3])
    for key in list(engine.cache._items):
        entry = engine.cache.get(key)
        assert entry.untyped_storage().nbytes() == entry.element_size() * entry.nelement()
