"""Kernel 3 (lightning-indexer scoring over packed FP4 keys + top-k): the reference against
the Indexer's own math, the Metal kernels against the reference on the CPU emulator (ASan+UBSan
and TSan) on ragged shapes, planted bugs the emulator must catch, the clang address-space
check and the NVRTC compile of the same bodies.

Scores are random-normal data, so they are distinct and the picked sets must be equal (the
order of the k picks is not specified: compare sorted)."""

import mlx.core as mx
import pytest
from metal_emu import clcheck, emu, nvrtc

from mlx_v4.kernels import indexer_topk as ik
from mlx_v4.layers.fake_quant import dequantize_fp4, quantize_fp4
from mlx_v4.layers.indexer import Indexer
from mlx_v4.layers.rope import RoPE
from mlx_v4.testing.tiny import tiny_args

needs_emu = pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")


def make_inputs(seed, B, L, H, D, N, cap=None):
    """q [B, L, H, D] FP4-valued like the model's; w [B, L, H]; packed keys with ``cap`` rows."""
    mx.random.seed(seed)
    cap = cap or N
    q = dequantize_fp4(*quantize_fp4(mx.random.normal((B, L, H, D))))
    w = mx.random.normal((B, L, H)) * (D**-0.5 * H**-0.5)
    packed, scales = quantize_fp4(2 * mx.random.normal((B, cap, D)))
    return q, w, packed, scales


def same_sets(a, b):
    return a.shape == b.shape and bool(mx.array_equal(mx.sort(a, axis=-1), mx.sort(b, axis=-1)))


def test_reference_is_the_indexer_math(monkeypatch):
    """Indexer.select (its own pure-MLX scoring) == the reference on the same q, w, keys: the
    kernel path of select is routed to the reference to see what it is handed."""
    args = tiny_args(index_topk=5)
    rope = RoPE(args.rope_inv_freq(compressed=True), args.qk_rope_head_dim)
    idx = Indexer(args, rope)
    mx.random.seed(3)
    B, L, offset, N = 2, 12, 12, 24  # rows see 3..6 entries, k = 5
    x, qr = mx.random.normal((B, L, args.hidden_size)), mx.random.normal((B, L, args.q_lora_rank))
    cos, sin = rope.cos_sin(mx.arange(offset, offset + L))
    packed = list(quantize_fp4(mx.random.normal((B, N + 7, args.index_head_dim))))  # 7 spare rows
    keys = dequantize_fp4(packed[0][:, :N], packed[1][:, :N])
    want = idx.select(x, qr, offset, cos, sin, (keys,))
    # Scoring straight from the packed keys (mxfp4 quantized_matmul) picks the same entries.
    assert same_sets(idx.select(x, qr, offset, cos, sin, (packed[0][:, :N], packed[1][:, :N])), want)
    seen = []

    def fake_kernel(q, w, p, s, *, n_keys, offset, k, **kw):
        seen.append(n_keys)
        return ik.indexer_topk_reference(q, w, p, s, n_keys=n_keys, offset=offset, k=k)

    monkeypatch.setattr(ik, "indexer_topk_kernel", fake_kernel)
    idx.use_kernel = True
    got = idx.select(x, qr, offset, cos, sin, (keys,), packed=packed)
    assert seen == [N] and same_sets(got, want)
    assert bool(mx.any(got == -1)) and bool(mx.any(got >= 0))  # rows straddle visibility


def test_use_kernel_false_is_the_reference():
    q, w, p, s = make_inputs(1, 1, 3, 4, 64, 30)
    a = ik.indexer_topk(q, w, p, s, n_keys=30, offset=110, k=6, use_kernel=False)
    assert mx.array_equal(a, ik.indexer_topk_reference(q, w, p, s, n_keys=30, offset=110, k=6))


def test_reference_fill_when_fewer_than_k_visible():
    q, w, p, s = make_inputs(2, 1, 2, 4, 64, 5)
    out = ik.indexer_topk_reference(q, w, p, s, n_keys=5, offset=9, k=8)  # rows see 2 and 2 entries
    assert mx.sort(out, axis=-1).tolist() == [[[-1] * 6 + [0, 1]] * 2]


def test_default_select_splits():
    assert ik.default_select_splits(262144, 512, rows=1) == 64
    assert ik.default_select_splits(16384, 512, rows=1) == 4
    assert ik.default_select_splits(3000, 512, rows=1) == 1
    assert ik.default_select_splits(262144, 512, rows=64) == 1
    assert ik.heads_per_stage(64, 128) == 16 and ik.heads_per_stage(6, 64) == 6


# (B, L, H, D, N, cap, offset, k, splits): N not a multiple of the 64-thread tiles; L > 1 with
# the causal limit inside the chunk (rows see different counts, some fewer than k, some none);
# k larger than every row's visible count; chunked selects with short and empty chunks.
CASES = [
    (2, 3, 4, 64, 150, 160, 597, 8, 1),
    (1, 6, 8, 128, 70, 70, 266, 12, 1),
    (2, 4, 4, 64, 9, 12, 30, 16, 1),
    (1, 5, 4, 64, 200, 203, 780, 10, 3),
    (1, 1, 4, 64, 1, 4, 3, 4, 1),
    (1, 4, 4, 64, 30, 32, 94, 6, 3),  # chunks of 10: the last has fewer than k (-1 fill, merged)
    (2, 4, 4, 64, 30, 30, 14, 6, 3),  # every row sees fewer than k; two chunks empty
]


@needs_emu
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_asan(case):
    B, L, H, D, N, cap, offset, k, splits = case
    q, w, p, s = make_inputs(sum(case), B, L, H, D, N, cap)
    ref = ik.indexer_topk_reference(q, w, p, s, n_keys=N, offset=offset, k=k)
    run = emu.runner("asan")
    scores = ik.indexer_scores_kernel(q, w, p, s, n_keys=N, offset=offset, threads=64, heads_stage=2, runner=run)
    want = ik.indexer_scores_reference(q, w, p, s, n_keys=N, offset=offset)
    assert mx.array_equal(mx.isinf(scores), mx.isinf(want))
    assert mx.allclose(mx.where(mx.isinf(want), 0, scores), mx.where(mx.isinf(want), 0, want), atol=1e-5, rtol=1e-5)
    out = ik.indexer_topk_kernel(q, w, p, s, n_keys=N, offset=offset, k=k, splits=splits, score_threads=64,
                                 select_threads=64, heads_stage=2, runner=run)
    assert out.dtype == mx.int32 and same_sets(out, ref), (mx.sort(out, axis=-1), mx.sort(ref, axis=-1))


@needs_emu
def test_row_blocks_under_a_small_score_budget():
    """Prefill rows scored and selected in blocks (offset advanced per block)."""
    q, w, p, s = make_inputs(9, 2, 7, 4, 64, 40, 44)
    ref = ik.indexer_topk_reference(q, w, p, s, n_keys=40, offset=140, k=5)
    log = []
    out = ik.indexer_topk_kernel(q, w, p, s, n_keys=40, offset=140, k=5, score_threads=64, select_threads=64,
                                 heads_stage=2, score_budget=3 * 2 * 40, runner=emu.runner("asan", log=log))
    assert len(log) == 2 * 3 and same_sets(out, ref)  # rows 3 + 3 + 1


@needs_emu
def test_select_negative_and_signed_zero_scores():
    """The order-preserving key: all-negative rows, +-0 and large magnitudes, and -inf past
    the causal limit; k-th value found exactly."""
    mx.random.seed(4)
    vals = mx.random.normal((1, 3, 97)) * mx.array([1.0, 1e-30, 1e30])[:, None]
    vals = vals - mx.array([5.0, 0.0, 0.0])[:, None]  # row 0 all negative
    col = mx.arange(97)
    vals = mx.where(col == 3, 0.0, mx.where(col == 4, -0.0, vals))  # +0 and -0 in every row
    offset = 4 * 97 - 2  # rows see 97, 97, 97 entries
    ref = mx.argpartition(-vals, kth=6, axis=-1)[..., :7].astype(mx.int32)
    out = ik.topk_select_kernel(vals, offset=offset, k=7, threads=64, runner=emu.runner("asan"))
    assert same_sets(out, ref)


@needs_emu
@pytest.mark.parametrize("splits", [1, 2])
def test_kernel_race_free_tsan(splits):
    q, w, p, s = make_inputs(11, 1, 2, 4, 64, 100, 104)
    ref = ik.indexer_topk_reference(q, w, p, s, n_keys=100, offset=397, k=7)
    out = ik.indexer_topk_kernel(q, w, p, s, n_keys=100, offset=397, k=7, splits=splits, score_threads=64,
                                 select_threads=64, heads_stage=2, runner=emu.runner("tsan"))
    assert same_sets(out, ref)


@needs_emu
def test_model_size_head_dim_and_heads():
    """index_head_dim 128, 16 heads staged at once (the Flash/Pro staging), 256-thread tiles."""
    q, w, p, s = make_inputs(12, 1, 1, 16, 128, 300, 320)
    ref = ik.indexer_topk_reference(q, w, p, s, n_keys=300, offset=1203, k=32)
    out = ik.indexer_topk_kernel(q, w, p, s, n_keys=300, offset=1203, k=32, runner=emu.runner("asan"))
    assert same_sets(out, ref)


# ---- planted bugs -----------------------------------------------------------------------

BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def first_only(old, new):
    def mutate(src):
        assert old in src, old
        return src.replace(old, new, 1)
    return mutate


def run_mutant(mutate, sanitizer, splits=1):
    q, w, p, s = make_inputs(5, 1, 2, 4, 64, 90)
    return ik.indexer_topk_kernel(q, w, p, s, n_keys=90, offset=400, k=6, splits=splits, score_threads=64,
                                  select_threads=64, heads_stage=2, runner=emu.runner(sanitizer, mutate=mutate))


def only_in(name, mutate):
    """Apply ``mutate`` to one kernel (the runner sees both)."""
    return lambda src: mutate(src) if f"custom_kernel_{name}" in src else src


@needs_emu
def test_removed_staging_barrier_is_a_race():
    # The barrier between staging the heads' queries in threadgroup memory and reading them.
    with pytest.raises(emu.EmulatorError, match="ThreadSanitizer: data race"):
        run_mutant(only_in("v4_indexer_score", first_only(BARRIER, "")), "tsan")


@needs_emu
def test_removed_count_barrier_is_a_race():
    # The barrier after the simdgroups publish their per-threshold counts.
    with pytest.raises(emu.EmulatorError, match="ThreadSanitizer: data race"):
        run_mutant(only_in("v4_indexer_select", first_only(BARRIER, "")), "tsan")


@needs_emu
def test_score_write_past_the_row_is_caught():
    with pytest.raises(emu.EmulatorError, match="AddressSanitizer: heap-buffer-overflow"):
        run_mutant(only_in("v4_indexer_score", first_only("if (s < N) scores", "if (s <= N) scores")), "asan")


@needs_emu
def test_wrong_threshold_step_gives_wrong_picks():
    # Off-by-one in the radix digit (keeps the candidate one step too high): runs clean, but
    # the comparison with the reference fails.
    q, w, p, s = make_inputs(5, 1, 2, 4, 64, 90)
    ref = ik.indexer_topk_reference(q, w, p, s, n_keys=90, offset=400, k=6)
    out = run_mutant(only_in("v4_indexer_select", first_only("tot[d] >= uint(K) ? d", "tot[d] >= uint(K - 1) ? d")),
                     "asan")
    assert not same_sets(out, ref)


# ---- static checks ----------------------------------------------------------------------

def captures():
    log = []
    q, w, p, s = make_inputs(0, 1, 2, 64, 128, 600, 640)
    ik.indexer_topk_kernel(q, w, p, s, n_keys=600, offset=2398, k=64, splits=1, runner=emu.capturing_runner(log))
    ik.indexer_topk_kernel(q, w, p, s, n_keys=600, offset=2398, k=64, splits=3, runner=emu.capturing_runner(log))
    return log


@pytest.mark.skipif(not clcheck.have_clang(), reason="clang not installed (apt: clang)")
def test_address_spaces():
    log = captures()
    assert len(log) == 5  # score + select, then score + chunked select + merge
    for cap in log:
        clcheck.check(cap)


@pytest.mark.skipif(nvrtc.load() is None, reason="NVRTC not loadable (pip install nvidia-cuda-nvrtc-cu12)")
def test_compiles_for_cuda():
    log = []
    q, w, p, s = make_inputs(0, 1, 2, 64, 128, 600, 640)
    ik.indexer_topk_kernel(q, w, p, s, n_keys=600, offset=2398, k=64, splits=3, runner=nvrtc.nvrtc_runner(log))
    assert len(log) == 3
    assert ".entry v4_indexer_score" in log[0] and all(".entry v4_indexer_select" in x for x in log[1:])
