"""Kernel 4 (hyper-connection mixing weights + Sinkhorn) against the reference, on the
emulator (ASan+UBSan, TSan) and through the static address-space check."""

import mlx.core as mx
import pytest
from metal_emu import clcheck, emu

from mlx_v4.kernels import hyper_mix as hm

pytestmark = pytest.mark.skipif(not emu.have_compiler(), reason="no C++20 compiler for the Metal emulator")


def inputs(seed, lead, hc=4):
    mx.random.seed(seed)
    n = (2 + hc) * hc
    return mx.random.normal((*lead, n)), 0.5 * mx.random.normal((n,)), 1 + 0.3 * mx.random.normal((3,))


@pytest.mark.parametrize("lead,sanitizer", [((2, 37), "asan"), ((1, 1), "asan"), ((3, 70), "tsan")])
def test_matches_reference(lead, sanitizer):
    mixes, base, scale = inputs(len(lead) + lead[-1], lead)
    want = hm.hyper_mix_reference(mixes, base, scale, hc=4, iters=20, eps=1e-6)
    got = hm.hyper_mix_kernel(mixes, base, scale, hc=4, iters=20, eps=1e-6, runner=emu.runner(sanitizer))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert mx.allclose(g, w, atol=1e-5, rtol=1e-5), float(mx.abs(g - w).max())


def test_use_kernel_false_is_the_reference():
    mixes, base, scale = inputs(0, (2, 3))
    got = hm.hyper_mix(mixes, base, scale, hc=4, iters=20, eps=1e-6, use_kernel=False)
    want = hm.hyper_mix_reference(mixes, base, scale, hc=4, iters=20, eps=1e-6)
    assert all(mx.array_equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.skipif(not clcheck.have_clang(), reason="clang not installed (apt: clang)")
def test_address_spaces():
    log = []
    mixes, base, scale = inputs(0, (1, 5))
    hm.hyper_mix_kernel(mixes, base, scale, hc=4, iters=20, eps=1e-6, runner=emu.capturing_runner(log))
    clcheck.check(log[0])
