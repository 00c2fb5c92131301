"""The KV cache: packed storage loses nothing, sizes, save/load, rewind."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.cache import (
    CacheFileError,
    accept,
    cache_breakdown,
    cache_nbytes,
    cache_offset,
    checkpoint,
    entry_nbytes,
    load_cache,
    make_cache,
    planned_nbytes,
    reserve,
    rewind,
    save_cache,
    speculate,
)
from mlx_v4.config import preset
from mlx_v4.testing.tiny import random_model, tiny_args


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(), seed=7)


def _ids(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 1024, (1, n)), dtype=mx.int32)


def test_packed_cache_gives_the_same_logits_as_unpacked_rounded_values(model):
    ids = _ids(260)
    packed, plain = make_cache(model.args), make_cache(model.args, packed=False)
    assert packed[1].entries.length == 0
    a = [model(ids[:, :200], packed), model(ids[:, 200:], packed)]
    b = [model(ids[:, :200], plain), model(ids[:, 200:], plain)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.array(x), np.array(y))
    # and smaller: 64 FP8 + 1 scale + 64 bf16 = 193 bytes per entry vs 128 float32 = 512
    assert cache_breakdown(packed)["compressed"] * 512 == cache_breakdown(plain)["compressed"] * 193


def test_packed_storage_dtypes_and_bytes_per_entry(model):
    cache = make_cache(model.args)
    model(_ids(64), cache)
    codes, scale, rope = cache[1].entries.view()
    assert (codes.dtype, scale.dtype, rope.dtype) == (mx.uint8, mx.uint8, mx.bfloat16)
    assert codes.shape[-1] == 64 and scale.shape[-1] == 1 and rope.shape[-1] == 64
    packed, scales = cache[1].index_keys.view()
    assert packed.dtype == mx.uint8 and packed.shape[-1] == 32 and scales.shape[-1] == 2
    main, index = entry_nbytes(preset("flash"))
    assert (main, index) == (583, 68)


def test_unpacked_cache_requires_no_fake_quant_for_packing():
    with pytest.raises(ValueError, match="packed cache needs fake_quant=True"):
        make_cache(tiny_args(fake_quant=False), packed=True)


def test_nbytes_matches_allocated_arrays_and_the_plan(model):
    cache = make_cache(model.args)
    n = 1024
    ids = _ids(n, seed=3)
    reserve(cache, n)
    for s in range(0, n, 256):
        model(ids[:, s:s + 256], cache)
    allocated = sum(a.nbytes for c in cache for a in c.state if a is not None)
    reported = cache_nbytes(cache)
    # state views are sliced to the filled rows; with the cache reserved to n they coincide
    assert abs(reported - allocated) / allocated < 0.02, (reported, allocated)
    planned = planned_nbytes(model.args, n)
    assert abs(reported - planned) / planned < 0.02, (reported, planned)


def test_save_load_continues_exactly(model, tmp_path):
    ids = _ids(230, seed=4)
    cache = make_cache(model.args)
    model(ids[:, :201], cache)
    path = tmp_path / "s.safetensors"
    save_cache(path, cache, tokens=ids[0, :201].tolist(), fingerprint=model.fingerprint, meta={"k": 1})
    assert not list(tmp_path.glob(".*tmp*")), "temp file left behind"
    loaded, tokens, meta = load_cache(path, model)
    assert tokens == ids[0, :201].tolist() and meta == {"k": 1} and cache_offset(loaded) == 201
    cont_a = model(ids[:, 201:], cache)
    cont_b = model(ids[:, 201:], loaded)
    np.testing.assert_array_equal(np.array(cont_a), np.array(cont_b))


def test_load_refuses_other_model_and_version(model, tmp_path):
    cache = make_cache(model.args)
    model(_ids(10), cache)
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, tokens=list(range(10)), fingerprint="deadbeef")
    with pytest.raises(CacheFileError, match="made by a different model or quantization"):
        load_cache(path, model)
    other = random_model(tiny_args(index_topk=4), seed=7)
    save_cache(path, cache, tokens=list(range(10)), fingerprint=model.fingerprint)
    assert other.fingerprint != model.fingerprint
    with pytest.raises(CacheFileError, match="different model"):
        load_cache(path, other)
    arrays, md = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(path), arrays, metadata=md | {"format_version": "99"})
    with pytest.raises(CacheFileError, match="cache format version 99, this mlx-v4 reads 1"):
        load_cache(path, model)
    with pytest.raises(CacheFileError, match="no such cache file"):
        load_cache(tmp_path / "missing.safetensors", model)


def test_rewind_and_regenerate_is_exact(model):
    ids = _ids(300, seed=5)
    cache = make_cache(model.args)
    model(ids[:, :140], cache)
    assert checkpoint(cache) == 140
    first = model(ids[:, 140:300], cache)
    rewind(cache, 140)
    assert cache_offset(cache) == 140
    again = model(ids[:, 140:300], cache)
    np.testing.assert_array_equal(np.array(first), np.array(again))
    with pytest.raises(ValueError, match="cannot rewind to position 150"):
        rewind(cache, 150)


def _layer_state(c) -> list[np.ndarray]:
    """Every array that defines a layer cache's future: window, compressor states, filled rows."""
    arrays = list(c.window_parts)
    for name in ("compressor", "index_compressor"):
        state = getattr(c, name, None)
        arrays += state.arrays() if state is not None else []
    for store in ("entries", "index_keys"):
        if hasattr(c, store) and getattr(c, store).length:  # (an empty store may hold spare rows)
            arrays += getattr(c, store).view()
    return [np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a) for a in arrays]


@pytest.mark.parametrize("start,fed,keep", [
    (2, 5, 0), (2, 5, 1), (2, 5, 2), (2, 5, 3), (2, 5, 5),  # across the ratio-4 windows at 4 and 8
    (125, 6, 1), (125, 6, 2), (125, 6, 3), (125, 6, 4), (125, 6, 6),  # across the 128 window
    (130, 3, 2),  # two speculations' worth of history, window full
])
def test_speculate_accept_keeps_exactly_a_prefix(model, start, fed, keep):
    """Feeding guesses and keeping a prefix leaves the cache of a run fed only that prefix:
    window, compressor states (ratio 4, 128 and the indexer's), entries and index keys."""
    ids = _ids(start + fed + 140, seed=11)
    spec, ref = make_cache(model.args), make_cache(model.args)
    model(ids[:, :start], spec)
    model(ids[:, :start], ref)
    assert speculate(spec) == start
    model(ids[:, start:start + fed], spec)
    accept(spec, start + keep)
    if keep:
        model(ids[:, start:start + keep], ref)
    assert cache_offset(spec) == cache_offset(ref) == start + keep
    for a, b in zip(spec, ref):
        sa, sb = _layer_state(a), _layer_state(b)
        assert [x.shape for x in sa] == [x.shape for x in sb]
        for x, y in zip(sa, sb):
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=1e-5, rtol=0)
    # and both continue identically, past the next 4- and 128-position boundaries
    rest = ids[:, start + keep:]
    np.testing.assert_allclose(np.array(model(rest, spec)), np.array(model(rest, ref)), atol=1e-4, rtol=0)


def test_accept_refuses_positions_outside_the_speculation(model):
    cache = make_cache(model.args)
    model(_ids(10), cache)
    with pytest.raises(RuntimeError, match="accept\\(\\) without speculate"):
        accept(cache, 10)
    speculate(cache)
    model(_ids(3, seed=1), cache)
    with pytest.raises(ValueError, match="cannot keep positions up to 14: speculation fed 10..13"):
        accept(cache, 14)


def test_nbytes_breakdown_sums(model):
    cache = make_cache(model.args)
    model(_ids(50), cache)
    assert cache_nbytes(cache) == sum(cache_breakdown(cache).values()) > 0


def test_saved_checkpoints_survive_load(model, tmp_path):
    """A resumed session can still rewind to the checkpoints made before it was saved."""
    ids = _ids(300, seed=6)
    cache = make_cache(model.args)
    model(ids[:, :150], cache)
    checkpoint(cache)
    model(ids[:, 150:260], cache)
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, tokens=ids[0, :260].tolist(), fingerprint=model.fingerprint)
    loaded, _, _ = load_cache(path, model)
    rewind(loaded, 150)
    rewind(cache, 150)
    np.testing.assert_array_equal(np.array(model(ids[:, 150:300], loaded)), np.array(model(ids[:, 150:300], cache)))
