"""The V4.1 cache: shared stores, packed sizes, save/load and rewind round trips."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_v4
from mlx_v4.cache import CacheFileError
from mlx_v4.v41.cache import bytes_per_token, load_v41_cache, save_v41_cache, used_nbytes
from mlx_v4.v41.config import preset

MODEL = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"
IDS = mx.array(np.random.default_rng(3).integers(2, 512, (2, 64)).astype(np.int32))


@pytest.fixture(scope="module")
def model():
    m, _ = mlx_v4.load(MODEL, dtype=mx.float32)
    return m


def feed(model, cache, ids):
    out = model(ids, cache)
    mx.eval(out)
    return np.array(out)


def test_consumers_share_their_source_store(model):
    cache = model.make_cache()
    assert cache[3].source is cache[2].own and cache[4].source is cache[2].own
    assert cache[6].source is cache[5].own and cache[7].source is cache[5].own
    assert cache[7].keys is cache[5].own and cache[0].source is None
    assert [c.own is not None for c in cache] == [False, False, True, False, False, True, False, False]


def test_packed_bytes_per_token(model):
    """Per token: a ratio-2 entry every 2 tokens and a ratio-1 entry (FP4 + e4m3/16: 36 bytes at
    head_dim 64), index keys likewise (FP4 + E8M0/32: 17 bytes at 32 dims); windows are constant."""
    cache = model.make_cache()
    feed(model, cache, IDS[:, :40])
    at40 = used_nbytes(cache)
    feed(model, cache, IDS[:, 40:60])
    per_token = bytes_per_token(model.args)
    assert per_token["total"] == 36 / 2 + 36 + 17 / 2 + 17
    assert used_nbytes(cache) - at40 == 20 * 2 * per_token["total"]  # batch 2
    assert all(p.dtype == mx.uint8 for c in cache for p in c.window_parts)


def test_release_bytes_per_token():
    b = bytes_per_token(preset("v41-flash"))
    # 3 ratio-2 sources + 1 ratio-1 source of 288-byte entries, 4 owners of 68-byte index keys
    assert (b["compressed"], b["index_keys"], b["total"]) == (720, 170, 890)
    assert b["window_constant"] == 40 * 127 * 528


def test_save_load_round_trip(model, tmp_path):
    cache = model.make_cache()
    feed(model, cache, IDS[:, :33])  # ends inside a ratio-2 group
    save_v41_cache(tmp_path / "c.safetensors", cache, tokens=[1, 2, 3], fingerprint=model.fingerprint)
    loaded, tokens, _ = load_v41_cache(tmp_path / "c.safetensors", model)
    assert tokens == [1, 2, 3] and loaded.offset == 33 and sorted(loaded[0].checkpoints) == [33]
    np.testing.assert_array_equal(loaded.engram_history, cache.engram_history)
    for step in range(33, 40):
        np.testing.assert_array_equal(feed(model, loaded, IDS[:, step:step + 1]), feed(model, cache, IDS[:, step:step + 1]))
    assert not list(tmp_path.glob("*.tmp*"))


def test_load_refuses_another_model(model, tmp_path):
    cache = model.make_cache()
    feed(model, cache, IDS[:, :4])
    save_v41_cache(tmp_path / "c.safetensors", cache, tokens=[], fingerprint="0123456789abcdef")
    with pytest.raises(CacheFileError, match="saved for another model"):
        load_v41_cache(tmp_path / "c.safetensors", model)


def test_rewind_round_trip(model):
    fresh = feed(model, model.make_cache(), mx.concatenate([IDS[:, :25], IDS[:, 50:58]], axis=1))
    cache = model.make_cache()
    feed(model, cache, IDS[:, :25])
    assert cache.checkpoint() == 25
    feed(model, cache, IDS[:, 25:45])  # past a candidate block and the window
    cache.rewind(25)
    assert cache.offset == 25 and all(c.offset == 25 for c in cache)
    np.testing.assert_array_equal(feed(model, cache, IDS[:, 50:58]), fresh[:, 25:])
    with pytest.raises(ValueError, match="cannot rewind to 10"):
        cache.rewind(10)


def test_clone_at_a_checkpoint_leaves_the_original(model):
    import copy

    from mlx_v4.server.prefix_cache import clone_at

    cache = model.make_cache()
    feed(model, cache, IDS[:, :25])
    cache.checkpoint()
    feed(model, cache, IDS[:, 25:41])
    branch = clone_at(cache, 25)  # the server's prefix reuse
    assert branch[3].source is branch[2].own and branch[2].own is not cache[2].own
    fresh = feed(model, model.make_cache(), mx.concatenate([IDS[:, :25], IDS[:, 50:58]], axis=1))
    np.testing.assert_array_equal(feed(model, branch, IDS[:, 50:58]), fresh[:, 25:])
    whole = feed(model, model.make_cache(), IDS[:, :48])
    np.testing.assert_array_equal(feed(model, cache, IDS[:, 41:48]), whole[:, 41:])
    with pytest.raises(TypeError, match="clone_at"):
        copy.deepcopy(cache)


def test_cache_files_through_the_v4_entry_points(model, tmp_path):
    """mlx_v4.cache.save_cache / load_cache (used by chat and the server) hand V4.1 caches on."""
    from mlx_v4.cache import load_cache, save_cache

    cache = model.make_cache()
    feed(model, cache, IDS[:, :9])
    save_cache(tmp_path / "c.safetensors", cache, tokens=list(range(9)), fingerprint=model.fingerprint,
               meta={"server": True})
    loaded, tokens, meta = load_cache(tmp_path / "c.safetensors", model)
    assert tokens == list(range(9)) and meta == {"server": True} and loaded.offset == 9
