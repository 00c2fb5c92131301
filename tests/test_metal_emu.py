"""The Metal emulator itself: planted bugs (mutants of the real kernel source) must fail."""

import mlx.core as mx
import pytest
from metal_emu import emu
from test_kernels_sparse_decode import call, make_inputs

from mlx_v4.kernels import sparse_decode as sd

pytestmark = pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")

BARRIER = "threadgroup_barrier(mem_flags::mem_threadgroup);"


def run_mutant(mutate, sanitizer, splits=1):
    x, _ = make_inputs(3, B=1, H=4, D=128, rope=64, W=6, N=30, K=20)
    ref = call(sd.sparse_decode_reference, x, scale=0.1)
    out = call(sd.sparse_decode_kernel, x, scale=0.1, splits=splits, heads_per_group=2, simdgroups=4,
               runner=emu.runner(sanitizer, mutate=mutate))
    return out, ref


def first_only(old, new):
    def mutate(src):
        assert old in src, old
        return src.replace(old, new, 1)
    return mutate


def test_unmutated_kernel_passes():
    out, ref = run_mutant(None, "asan")
    assert mx.allclose(out, ref, atol=2e-5, rtol=2e-5)


def test_removed_barrier_is_a_race_under_tsan():
    # The barrier that publishes each simdgroup's running max/sum to the others.
    with pytest.raises(emu.EmulatorError, match="ThreadSanitizer: data race"):
        run_mutant(first_only(BARRIER, ""), "tsan")


def test_off_by_one_read_is_caught_by_asan():
    with pytest.raises(emu.EmulatorError, match="AddressSanitizer: heap-buffer-overflow"):
        run_mutant(first_only("j < k_end;", "j <= k_end;"), "asan")


def test_off_by_one_threadgroup_index_is_caught():
    # Reading one simdgroup past the end of the threadgroup array tg_ms.
    mutate = first_only("for (int g = 0; g < NSG; ++g) M = max(M, tg_ms[g * HG + h]);",
                        "for (int g = 0; g <= 2 * NSG; ++g) M = max(M, tg_ms[g * HG + h]);")
    with pytest.raises(emu.EmulatorError, match="AddressSanitizer|runtime error"):
        run_mutant(mutate, "asan")


def test_divergent_barrier_is_reported():
    mutate = first_only("if (lane == 0) {", "if (lane == 0) {\n    " + BARRIER)
    with pytest.raises(emu.EmulatorError, match="EMU divergence"):
        run_mutant(mutate, "asan")


def test_double_does_not_compile():
    with pytest.raises(emu.EmulatorError, match="compile failed"):
        run_mutant(first_only("float dot = 0.0f;", "double dot = 0.0;"), "asan")


def test_capture_is_mlx_generated_source():
    log = []
    x, _ = make_inputs(3, B=1, H=4, D=128, rope=64, W=6, N=30, K=20)
    call(sd.sparse_decode_kernel, x, scale=0.1, splits=2, heads_per_group=2, simdgroups=4,
         runner=emu.runner("asan", log=log))
    split, merge = log
    assert "[[kernel]] void custom_kernel_v4_sparse_decode_split" in split.source
    assert "simdgroup_index_in_threadgroup [[simdgroup_index_in_threadgroup]]" in split.source
    assert split.threadgroup == (128, 1, 1) and split.grid == (256, 2, 1)
    assert merge.grid == (128, 4, 1)
