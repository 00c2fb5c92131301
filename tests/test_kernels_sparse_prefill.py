"""Kernel 2 (sparse prefill attention): the reference against the model's own math, and the
Metal kernel against the reference on the CPU emulator (ASan+UBSan, TSan), on ragged shapes,
with per-query picks (CSA) and with every visible entry (HCA); static and CUDA checks."""

import mlx.core as mx
import pytest
from metal_emu import clcheck, emu, nvrtc

from mlx_v4.kernels import sparse_prefill as sp
from mlx_v4.kernels.attend import attend
from mlx_v4.layers.fake_quant import quantize_kv_entry

pytestmark = pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")


def make_inputs(seed, B, L, H, D, rope, P, N, K, dtype=mx.float32, none_frac=0.3, spare=3):
    """A chunk of L queries after P kept window rows; N entries in a store of N + spare rows;
    K picks per query (K=0: every visible entry, ``indices`` None)."""
    mx.random.seed(seed)
    q = mx.random.normal((B, L, H, D)).astype(dtype)
    window = mx.random.normal((B, P + L, D)).astype(dtype)
    values, (codes, scales, rp) = quantize_kv_entry(3 * mx.random.normal((B, N + spare, D)), rope)
    indices = None
    if K:
        indices = mx.random.randint(0, N, (B, L, K)).astype(mx.int32)
        indices = mx.where(mx.random.uniform(shape=(B, L, K)) < none_frac, -1, indices)
    sinks = mx.random.normal((H,))
    return dict(q=q, window=window, codes=codes, scales=scales, rope=rp, indices=indices, sinks=sinks), values


def call(fn, x, **kw):
    return fn(x["q"], x["window"], x["codes"], x["scales"], x["rope"], x["indices"], x["sinks"], **kw)


def test_reference_is_attend_per_query():
    """Query by query: its window rows (causal, sliding) plus its valid picks, through attend."""
    B, L, H, D, P, N, window_len, offset = 2, 6, 2, 128, 5, 20, 4, 40
    for K in (5, 0):
        x, values = make_inputs(0, B, L, H, D, 64, P, N, K)
        ref = call(sp.sparse_prefill_reference, x, scale=0.1, offset=offset, sliding_window=window_len,
                   ratio=4, n_entries=N)
        for b in range(B):
            for row in range(L):
                t = offset + row
                wpos = range(offset + L - (P + L), offset + L)
                rows = [j for j, pos in enumerate(wpos) if t - window_len < pos <= t]
                keys = [x["window"][b][mx.array(rows)]]
                if K:
                    picks = [int(i) for i in x["indices"][b, row].tolist() if i >= 0]
                else:
                    picks = list(range(min(N, (t + 1) // 4)))
                if picks:
                    keys.append(values[b][mx.array(picks)])
                keys = mx.concatenate(keys, axis=0)
                want = attend(x["q"][b, row][None, None], keys[None], mx.ones((1, 1, keys.shape[0]), dtype=mx.bool_),
                              x["sinks"], 0.1)[0, 0]
                assert mx.allclose(ref[b, row], want, atol=1e-5, rtol=1e-5), (b, row, K)


def test_use_kernel_false_is_the_reference():
    x, _ = make_inputs(1, 1, 3, 2, 128, 64, 2, 10, 4)
    kw = dict(scale=0.1, offset=7, sliding_window=4, ratio=4, n_entries=10)
    a = call(sp.sparse_prefill_attention, x, use_kernel=False, **kw)
    assert mx.array_equal(a, call(sp.sparse_prefill_reference, x, **kw))


# (B, L, H, D, rope, P, N, K, offset, window, ratio): ragged chunks, P = 0, windows shorter and
# longer than the chunk, picks with -1, every-visible-entry mode at ratios 4 and 128, queries
# that see no entry yet.
CASES = [
    (2, 7, 4, 128, 64, 5, 40, 12, 60, 6, 4),
    (1, 9, 4, 128, 64, 0, 3, 0, 3, 16, 4),
    (2, 5, 4, 128, 64, 3, 30, 0, 250, 4, 128),
    (1, 13, 2, 128, 64, 11, 17, 33, 100, 8, 4),
    (1, 3, 4, 128, 64, 1, 9, 5, 0, 128, 4),
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_asan(case):
    B, L, H, D, rope, P, N, K, offset, window_len, ratio = case
    x, _ = make_inputs(sum(case), B, L, H, D, rope, P, N, K)
    kw = dict(scale=D**-0.5, offset=offset, sliding_window=window_len, ratio=ratio, n_entries=N)
    ref = call(sp.sparse_prefill_reference, x, **kw)
    out = call(sp.sparse_prefill_kernel, x, heads_per_group=2, simdgroups=4, runner=emu.runner("asan"), **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert mx.allclose(out, ref, atol=2e-5, rtol=2e-5), float(mx.abs(out - ref).max())


def test_kernel_race_free_tsan():
    x, _ = make_inputs(11, 1, 6, 4, 128, 64, 4, 30, 9)
    kw = dict(scale=0.09, offset=50, sliding_window=5, ratio=4, n_entries=30)
    ref = call(sp.sparse_prefill_reference, x, **kw)
    out = call(sp.sparse_prefill_kernel, x, heads_per_group=2, simdgroups=4, runner=emu.runner("tsan"), **kw)
    assert mx.allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_kernel_full_size_bf16():
    """head_dim 512 / rope 64 (Flash/Pro), bf16 activations, the default layout."""
    x, _ = make_inputs(7, 1, 4, 2, 512, 64, 6, 40, 24, dtype=mx.bfloat16)
    kw = dict(scale=512**-0.5, offset=90, sliding_window=8, ratio=4, n_entries=40)
    x32 = dict(x, q=x["q"].astype(mx.float32), window=x["window"].astype(mx.float32))
    exact = call(sp.sparse_prefill_reference, x32, **kw)
    out = call(sp.sparse_prefill_kernel, x, runner=emu.runner("asan"), **kw)
    assert out.dtype == mx.bfloat16
    err = mx.abs(out.astype(mx.float32) - exact)  # fp32 accumulation, bf16 output rounding
    assert bool(mx.all(err <= 2**-8 * mx.abs(exact) + 1e-3)), float(err.max())


def test_window_off_by_one_is_caught():
    """A planted bug: one window row too many (the row just past the query's position)."""
    x, _ = make_inputs(3, 1, 5, 2, 128, 64, 2, 12, 4)
    kw = dict(scale=0.1, offset=30, sliding_window=4, ratio=4, n_entries=12)
    ref = call(sp.sparse_prefill_reference, x, **kw)

    def mutate(src):
        old = "const int w_hi = l + (W - L) + 1;"
        assert old in src
        return src.replace(old, "const int w_hi = min(W, l + (W - L) + 2);")

    out = call(sp.sparse_prefill_kernel, x, heads_per_group=2, simdgroups=4,
               runner=emu.runner("asan", mutate=mutate), **kw)
    assert not mx.allclose(out, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not clcheck.have_clang(), reason="clang not installed (apt: clang)")
@pytest.mark.parametrize("picks", [4, 0])
def test_address_spaces(picks):
    log = []
    x, _ = make_inputs(0, 1, 3, 2, 128, 64, 1, 10, picks)
    call(sp.sparse_prefill_kernel, x, scale=0.1, offset=12, sliding_window=4, ratio=4, n_entries=10,
         runner=emu.capturing_runner(log))
    clcheck.check(log[0])


@pytest.mark.skipif(nvrtc.load() is None, reason="NVRTC not loadable (pip install nvidia-cuda-nvrtc-cu12)")
@pytest.mark.parametrize("picks", [8, 0])
def test_compiles_for_cuda(picks):
    log = []
    x, _ = make_inputs(0, 1, 3, 4, 512, 64, 2, 20, picks)
    call(sp.sparse_prefill_kernel, x, scale=0.1, offset=12, sliding_window=4, ratio=4, n_entries=20,
         runner=nvrtc.nvrtc_runner(log))
    assert ".entry v4_sparse_prefill" in log[0]
