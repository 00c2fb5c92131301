"""Every kernel body is valid CUDA through the compatibility prelude: compiled with NVRTC
from pip (no GPU needed). Running them for real: scripts/cuda_check.py on an NVIDIA machine."""

import mlx.core as mx
import pytest
from metal_emu import nvrtc
from test_kernels_sparse_decode import call, make_inputs

from mlx_v4.kernels import hyper_mix as hm
from mlx_v4.kernels import sparse_decode as sd

pytestmark = pytest.mark.skipif(nvrtc.load() is None,
                                reason="NVRTC not loadable (pip install nvidia-cuda-nvrtc-cu12)")


def test_sparse_decode_compiles_for_cuda():
    log = []
    x, _ = make_inputs(0, B=1, H=4, D=512, rope=64, W=5, N=20, K=8)
    call(sd.sparse_decode_kernel, x, scale=0.1, splits=1, runner=nvrtc.nvrtc_runner(log))
    call(sd.sparse_decode_kernel, x, scale=0.1, splits=2, runner=nvrtc.nvrtc_runner(log))
    assert len(log) == 3 and all(".entry v4_sparse_decode" in p for p in log)


def test_hyper_mix_compiles_for_cuda():
    log = []
    hm.hyper_mix_kernel(mx.zeros((3, 24)), mx.zeros((24,)), mx.ones((3,)), hc=4, iters=20, eps=1e-6,
                        runner=nvrtc.nvrtc_runner(log))
    assert ".entry v4_hyper_mix" in log[0]


@pytest.mark.skipif(nvrtc.toolkit_include() is None, reason="no CUDA toolkit headers (cuda_bf16.h) for bf16")
def test_sparse_decode_compiles_for_cuda_in_bf16():
    log = []
    x, _ = make_inputs(0, B=1, H=4, D=512, rope=64, W=5, N=20, K=8, dtype=mx.bfloat16)
    call(sd.sparse_decode_kernel, x, scale=0.1, splits=2, runner=nvrtc.nvrtc_runner(log, nvrtc.toolkit_include()))
    assert len(log) == 2 and all(".entry v4_sparse_decode" in p for p in log)
