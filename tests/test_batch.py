"""Model.step_batch (mlx_v4/batch.py): several sequences in one model step, each row the same
function as the single-sequence model call.

Exactness: with MLX's bundled reference BLAS every output element of a matmul is one fixed
sequential dot product whatever the number of rows, so a batched row must be bit-identical to
the row alone; that runs in a subprocess (the BLAS is chosen before mlx.core loads). With the
optimized BLAS the tests here use, a one-row product takes OpenBLAS's GEMV kernel and a
stacked one its GEMM kernel, which round differently: there the logits agree to a stated
bound and greedy tokens are equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.batch import restore_caches, snapshot_caches
from mlx_v4.model import PositionError
from mlx_v4.testing.tiny import random_model, tiny_args

#: Largest |batched - alone| logit difference accepted under the optimized BLAS, relative to
#: the largest |logit| (measured over 8 steps: 3.8e-6 on this tiny model, 1.4e-5 on the demo).
REL_BOUND = 1e-4


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args())


def _prompts(lengths, seed=0, vocab=1024):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, size=n).tolist() for n in lengths]


def _alone(model, ids, cache):
    out = model(mx.array([ids], dtype=mx.int32), cache, last_only=True)[0, -1]
    mx.eval(out, [c.state for c in cache])
    return out


def test_single_row_is_bit_identical_to_the_model_call(model):
    # one row: the same matmul shapes as Model.__call__ with last_only, so the same bits
    for n in (1, 7, 150):
        ids = _prompts([n], seed=n)[0]
        ref = _alone(model, ids, model.make_cache())
        out = model.step_batch([ids], [model.make_cache()])
        assert out.shape == (1, model.args.vocab_size) and out.dtype == mx.float32
        assert mx.array_equal(out[0], ref).item()


def test_rows_match_alone_with_joins_and_leaves(model):
    """Mixed prompt lengths (window-only, HCA and CSA layers all active past 128 tokens), then
    decode steps in which sequences leave and a new one joins mid-batch."""
    prompts = _prompts([1, 9, 140, 300])
    alone = [model.make_cache() for _ in prompts]
    batched = [model.make_cache() for _ in prompts]
    ref = [_alone(model, p, c) for p, c in zip(prompts, alone)]
    out = model.step_batch(prompts, batched)
    _close(out, ref)
    nxt = [int(r.argmax()) for r in ref]
    assert [int(o.argmax()) for o in out] == nxt
    joiner = _prompts([40], seed=5)[0]
    live = [0, 1, 2, 3]
    for step in range(6):
        if step == 2:
            live.remove(1)  # leaves
        if step == 3:  # joins with a whole prompt while the others decode
            prompts.append(joiner)
            alone.append(model.make_cache())
            batched.append(model.make_cache())
            nxt.append(None)
            live.append(4)
        rows = [[nxt[i]] if nxt[i] is not None else prompts[i] for i in live]
        out = model.step_batch(rows, [batched[i] for i in live])
        ref = [_alone(model, row, alone[i]) for row, i in zip(rows, live)]
        _close(out, ref)
        for k, i in enumerate(live):
            nxt[i] = int(ref[k].argmax())
            assert int(out[k].argmax()) == nxt[i]
    for i in live:
        assert batched[i][0].offset == alone[i][0].offset
        for a, b in zip(alone[i], batched[i]):
            for x, y in zip(a.state, b.state):
                assert x.shape == y.shape


def _close(out, ref):
    ref = mx.stack(ref)
    scale = mx.abs(ref).max().item()
    assert mx.abs(out - ref).max().item() <= REL_BOUND * scale


def test_restore_undoes_a_step(model):
    # offsets 19 and 151: the step closes a ratio-4 window on both, so the CSA layers append an
    # entry and an index key that the restore must drop
    prompts = _prompts([19, 151], seed=3)
    caches = [model.make_cache() for _ in prompts]
    model.step_batch(prompts, caches)
    mx.eval([c.state for cache in caches for c in cache])
    lengths = [[(c.entries.length, c.index_keys.length) for c in cache if c.kind == "csa"] for cache in caches]
    snaps = snapshot_caches(caches)
    first = model.step_batch([[5], [6]], caches)
    mx.eval(first, [c.state for cache in caches for c in cache])
    assert all(c.entries.length == n + 1 for cache, ls in zip(caches, lengths)
               for c, (n, _) in zip([c for c in cache if c.kind == "csa"], ls))
    restore_caches(caches, snaps)
    assert [c[0].offset for c in caches] == [19, 151]
    assert [[(c.entries.length, c.index_keys.length) for c in cache if c.kind == "csa"] for cache in caches] == lengths
    again = model.step_batch([[5], [6]], caches)
    assert mx.array_equal(first, again).item()
    nxt = model.step_batch([[7], [8]], caches)  # and it goes on as if the step had run once
    fresh = [model.make_cache() for _ in prompts]
    model.step_batch(prompts, fresh)
    model.step_batch([[5], [6]], fresh)
    assert mx.array_equal(nxt, model.step_batch([[7], [8]], fresh)).item()


def test_bad_rows_are_refused(model):
    c = model.make_cache()
    with pytest.raises(ValueError, match="2 token rows for 1 caches"):
        model.step_batch([[1], [2]], [c])
    with pytest.raises(ValueError, match="at least one id"):
        model.step_batch([[]], [c])
    with pytest.raises(ValueError, match="share one cache"):
        model.step_batch([[1], [2]], [c, c])
    small = random_model(tiny_args(max_position_embeddings=8))
    with pytest.raises(PositionError, match="row 1: position 9 is past max_position_embeddings=8"):
        small.step_batch([[1], list(range(2, 11))], [small.make_cache(), small.make_cache()])


EXACT_SCRIPT = textwrap.dedent("""
    import json
    import mlx_v4  # preloads no BLAS: MLX_V4_BLAS=none
    from mlx_v4 import platform
    import mlx.core as mx
    import numpy as np
    from mlx_v4.testing.tiny import random_model, tiny_args
    assert platform.loaded_blas is None
    model = random_model(tiny_args())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 1024, size=n).tolist() for n in (1, 9, 140, 300)]
    alone = [model.make_cache() for _ in prompts]
    batched = [model.make_cache() for _ in prompts]
    equal = []
    rows = prompts
    for step in range(4):
        out = model.step_batch(rows, batched)
        ref = [model(mx.array([r]), c, last_only=True)[0, -1] for r, c in zip(rows, alone)]
        equal.append(all(mx.array_equal(o, r).item() for o, r in zip(out, ref)))
        rows = [[int(r.argmax())] for r in ref]
    print(json.dumps(equal))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="MLX's reference BLAS is selectable on Linux only (MLX_V4_BLAS=none)")
def test_rows_bit_identical_to_alone_with_the_reference_blas():
    env = {**os.environ, "MLX_V4_BLAS": "none"}
    res = subprocess.run([sys.executable, "-c", EXACT_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [True] * 4


def test_cpu_dense_head_matches_the_quantized_head():
    """The float copy a batched CPU step uses for a quantized head computes the same product."""
    import mlx.nn as nn

    import mlx_v4
    from mlx_v4.batch import _dense_head, apply_head
    from mlx_v4.platform import metal_available

    model, _ = mlx_v4.load()
    head = model.head
    assert isinstance(head, nn.QuantizedLinear)
    if metal_available():
        assert _dense_head(head) is None  # Metal's quantized GEMM reads the weights once anyway
        return
    x = mx.random.normal((1, 5, model.args.hidden_size), key=mx.random.key(1))
    ref = head(x)
    out = apply_head(head, x)
    assert out.shape == ref.shape
    assert mx.abs(out - ref).max().item() <= 1e-5 * mx.abs(ref).max().item()
    first = _dense_head(head)
    assert _dense_head(head) is first  # made once
    assert "_mlx_v4_dense" not in dict(head.parameters())  # not a weight: the fingerprint is unchanged
    head.weight = mx.array(head.weight)  # replaced weights: a fresh copy
    assert _dense_head(head) is not first


@pytest.mark.parametrize("fake_quant", [True, False])
def test_batched_window_decode_matches_rows_attending_alone(fake_quant, monkeypatch):
    """Decode rows over full windows of a window-only layer attend as one batch; rows whose window
    is not full yet, and prefill rows, stay on their own. Same logits and caches as every row alone."""
    import mlx_v4.layers.attention as attention

    model = random_model(tiny_args(fake_quant=fake_quant))
    prompts = _prompts([140, 130, 160, 50, 20], seed=9)  # two windows not full (50, 20): alone

    def run(batched: bool):
        monkeypatch.setattr(attention, "BATCH_WINDOW_DECODE", batched)
        caches = [model.make_cache() for _ in prompts]
        model.step_batch(prompts, caches)
        outs, rows = [], [[7], [8], [9], [10], list(range(30, 40))]
        for _ in range(3):
            out = model.step_batch(rows, caches)
            outs.append(out)
            rows = [[int(t)] for t in mx.argmax(out, axis=-1).tolist()]
        mx.eval(outs, [c.state for cache in caches for c in cache])
        return mx.stack(outs), caches

    calls = []
    monkeypatch.setattr(attention.Attention, "_attend_windows",
                        lambda self, *a, f=attention.Attention._attend_windows: calls.append(len(a[0])) or f(self, *a))
    ref, ref_caches = run(False)
    assert calls == []
    out, caches = run(True)
    assert calls and max(calls) == 3  # the three rows with full windows, on the window-only layer
    assert mx.array_equal(out, ref).item()
    for a, b in zip(ref_caches, caches):
        assert a[0].offset == b[0].offset
        for la, lb in zip(a, b):
            assert all(mx.array_equal(x, y).item() for x, y in zip(la.state, lb.state))
