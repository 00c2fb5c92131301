"""Kernel 1 (sparse decode attention): the reference against the model's own math, and the
Metal kernel (one pass and split-K) against the reference on the CPU emulator, under
ASan+UBSan and under TSan, on random ragged shapes."""

import math

import mlx.core as mx
import pytest
from metal_emu import emu

from mlx_v4.kernels import sparse_decode as sd
from mlx_v4.kernels.attend import attend
from mlx_v4.layers.fake_quant import quantize_kv_entry

pytestmark = pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")


def make_inputs(seed, B, H, D, rope, W, N, K, dtype=mx.float32, none_frac=0.3):
    mx.random.seed(seed)
    q = mx.random.normal((B, H, D)).astype(dtype)
    window = mx.random.normal((B, W, D)).astype(dtype)
    values, (codes, scales, rp) = quantize_kv_entry(3 * mx.random.normal((B, N, D)), rope)
    idx = mx.random.randint(0, N, (B, K)).astype(mx.int32)
    idx = mx.where(mx.random.uniform(shape=(B, K)) < none_frac, -1, idx)
    sinks = mx.random.normal((H,))
    return dict(q=q, window=window, codes=codes, scales=scales, rope=rp, indices=idx, sinks=sinks), values


def call(fn, x, **kw):
    return fn(x["q"], x["window"], x["codes"], x["scales"], x["rope"], x["indices"], x["sinks"], **kw)


def test_reference_is_attend_over_gathered_values():
    x, values = make_inputs(0, B=2, H=4, D=128, rope=64, W=7, N=30, K=9)
    B, H, D = x["q"].shape
    ref = call(sd.sparse_decode_reference, x, scale=D**-0.5)
    # Straight from the unpacked values: every window row plus the valid selected entries.
    for b in range(B):
        rows = [int(i) for i in x["indices"][b].tolist() if i >= 0]
        keys = mx.concatenate([x["window"][b], values[b][mx.array(rows, dtype=mx.int32)]], axis=0)
        want = attend(x["q"][b][None, None], keys[None], mx.ones((1, 1, keys.shape[0]), dtype=mx.bool_),
                      x["sinks"], D**-0.5)[0, 0]
        assert mx.allclose(ref[b], want, atol=1e-5, rtol=1e-5)


def test_use_kernel_false_is_the_reference():
    x, _ = make_inputs(1, B=1, H=2, D=128, rope=64, W=3, N=10, K=4)
    a = call(sd.sparse_decode_attention, x, scale=0.1, use_kernel=False)
    b = call(sd.sparse_decode_reference, x, scale=0.1)
    assert mx.array_equal(a, b)


# (B, H, D, rope, W, N, K, splits): ragged window/top-k sizes, a partial last split,
# more splits than some rows have valid keys.
CASES = [
    (2, 4, 128, 64, 5, 40, 12, 1),
    (1, 4, 128, 64, 1, 7, 33, 1),
    (2, 4, 128, 64, 13, 50, 70, 3),
    (1, 4, 128, 64, 2, 9, 5, 7),
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_asan(case):
    B, H, D, rope, W, N, K, splits = case
    x, _ = make_inputs(hash(case) % 1000, B, H, D, rope, W, N, K)
    x["indices"] = x["indices"].at[0, 0].add(0)  # keep dtype/contiguity as the model passes it
    ref = call(sd.sparse_decode_reference, x, scale=D**-0.5)
    out = call(sd.sparse_decode_kernel, x, scale=D**-0.5, splits=splits, heads_per_group=2, simdgroups=4,
               runner=emu.runner("asan"))
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert mx.allclose(out, ref, atol=2e-5, rtol=2e-5), float(mx.abs(out - ref).max())


def test_kernel_all_entries_none_gives_window_only():
    x, _ = make_inputs(5, B=2, H=4, D=128, rope=64, W=4, N=8, K=6, none_frac=1.0)
    ref = call(sd.sparse_decode_reference, x, scale=0.125)
    out = call(sd.sparse_decode_kernel, x, scale=0.125, splits=1, heads_per_group=2, simdgroups=4,
               runner=emu.runner("asan"))
    assert mx.allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_kernel_full_size_bf16():
    """head_dim 512 / rope 64 (Flash/Pro), bf16 activations, the default layout."""
    x, _ = make_inputs(7, B=1, H=2, D=512, rope=64, W=9, N=64, K=40, dtype=mx.bfloat16)
    ref = call(sd.sparse_decode_reference, x, scale=512**-0.5)
    x32 = dict(x, q=x["q"].astype(mx.float32), window=x["window"].astype(mx.float32))
    exact = call(sd.sparse_decode_reference, x32, scale=512**-0.5)
    out = call(sd.sparse_decode_kernel, x, scale=512**-0.5, splits=1, runner=emu.runner("asan"))
    assert out.dtype == mx.bfloat16
    # fp32 accumulation: within bf16 output rounding of the exact answer, never worse than
    # the bf16 reference itself
    err = mx.abs(out.astype(mx.float32) - exact)
    assert bool(mx.all(err <= 2**-8 * mx.abs(exact) + 1e-3)), float(err.max())
    assert float(err.max()) <= float(mx.abs(ref.astype(mx.float32) - exact).max())


@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_race_free_tsan(splits):
    x, _ = make_inputs(11, B=1, H=4, D=128, rope=64, W=6, N=30, K=20)
    ref = call(sd.sparse_decode_reference, x, scale=D_SCALE)
    out = call(sd.sparse_decode_kernel, x, scale=D_SCALE, splits=splits, heads_per_group=2, simdgroups=4,
               runner=emu.runner("tsan"))
    assert mx.allclose(out, ref, atol=2e-5, rtol=2e-5)


D_SCALE = 128**-0.5


def test_default_splits():
    assert sd.default_splits(128 + 512) == 2
    assert sd.default_splits(100) == 1
    assert sd.default_splits(128 + 1024) == 4
    assert sd.default_splits(10**6) == 32
    assert math.isclose(D_SCALE, 128**-0.5)
