"""DeepSeek V4.1 speculative decoding: the cache keeps any prefix of a speculation exactly."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_v4
from mlx_v4.cache import accept, cache_offset, speculate

MODEL = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"


@pytest.fixture(scope="module")
def model():
    m, _ = mlx_v4.load(MODEL, dtype=mx.float32)
    return m


def _ids(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(3, 512, (1, n)), dtype=mx.int32)


def _layer_state(c) -> list[np.ndarray]:
    out = [np.array(p) for p in c.window_parts or []]
    if c.own is not None:
        for store in (c.own.entries, c.own.index_keys):
            if store is not None and store.length:
                out += [np.array(p) for p in store.view()]
        out += [np.array(a) for a in c.own.group.arrays()]
    return out


# The fixture: window 16, ratio-2 source at layer 2, ratio-1 source at 5 (candidate blocks of 2
# entries, index top-8), Engram 3-grams at layers 1 and 5.
@pytest.mark.parametrize("start,fed", [(0, 4), (5, 5), (8, 6), (13, 6), (30, 5), (41, 3)])
def test_speculate_accept_keeps_exactly_a_prefix(model, start, fed):
    """For every k, feeding ``fed`` guesses and keeping k leaves the cache of a run fed only those
    k: windows, the ratio-2 open group, compressed entries, index keys, the Engram history."""
    ids = _ids(start + fed + 24, seed=start)
    for keep in range(fed + 1):
        spec, ref = model.make_cache(), model.make_cache()
        if start:
            model(ids[:, :start], spec)
            model(ids[:, :start], ref)
        assert speculate(spec) == start
        model(ids[:, start:start + fed], spec)
        accept(spec, start + keep)
        if keep:
            model(ids[:, start:start + keep], ref)
        assert cache_offset(spec) == cache_offset(ref) == start + keep
        assert not spec[0].speculating and spec.engram_fed is None
        for a, b in zip(spec, ref):
            sa, sb = _layer_state(a), _layer_state(b)
            assert [x.shape for x in sa] == [x.shape for x in sb]
            for x, y in zip(sa, sb):
                np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(spec.engram_history, ref.engram_history)
        # and both continue identically, past the next group, window and candidate-block boundaries
        rest = ids[:, start + keep:]
        np.testing.assert_allclose(np.array(model(rest, spec)), np.array(model(rest, ref)), atol=1e-4, rtol=0)


def test_abandon_returns_to_the_start(model):
    ids = _ids(20, seed=9)
    spec, ref = model.make_cache(), model.make_cache()
    model(ids[:, :11], spec)
    model(ids[:, :11], ref)
    speculate(spec)
    model(ids[:, 11:16], spec)
    for c in spec:
        c.abandon()
    assert cache_offset(spec) == 11
    np.testing.assert_array_equal(np.array(model(ids[:, 11:], spec)), np.array(model(ids[:, 11:], ref)))


def test_accept_refuses_positions_outside_the_speculation(model):
    cache = model.make_cache()
    model(_ids(10), cache)
    with pytest.raises(RuntimeError, match="accept\\(\\) without speculate"):
        accept(cache, 10)
    speculate(cache)
    model(_ids(3, seed=1), cache)
    with pytest.raises(ValueError, match="cannot keep positions up to 14: speculation fed 10..13"):
        accept(cache, 14)
