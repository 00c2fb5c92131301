"""Static address-space check (clang, C++ for OpenCL with MSL address spaces) of every
captured kernel, with mutants proving that Metal-illegal pointer use is rejected."""

import mlx.core as mx
import pytest
from metal_emu import clcheck, emu
from test_kernels_sparse_decode import call, make_inputs

from mlx_v4.kernels import sparse_decode as sd

pytestmark = pytest.mark.skipif(not clcheck.have_clang(), reason="clang not installed (apt: clang)")


def sparse_decode_captures(dtype):
    log = []
    x, _ = make_inputs(0, B=1, H=4, D=512, rope=64, W=5, N=20, K=8, dtype=dtype)
    call(sd.sparse_decode_kernel, x, scale=0.1, splits=1, runner=emu.capturing_runner(log))
    call(sd.sparse_decode_kernel, x, scale=0.1, splits=2, runner=emu.capturing_runner(log))
    return log


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_sparse_decode_address_spaces(dtype):
    for cap in sparse_decode_captures(dtype):
        clcheck.check(cap)


HELPER = "inline float v4_first(const float* p) { return p[0]; }\n"


def test_threadgroup_array_as_device_pointer_is_rejected():
    cap = sparse_decode_captures(mx.float32)[0]

    def mutate(src):
        src = src.replace("inline float v4_e8m0", "inline float v4_dev(const device float* p) { return p[0]; }\n"
                          "inline float v4_e8m0", 1)
        return src.replace("threadgroup_barrier(mem_flags::mem_threadgroup);",
                           "threadgroup_barrier(mem_flags::mem_threadgroup); (void)v4_dev(tg_ms);", 1)

    with pytest.raises(emu.EmulatorError, match="from '__local float.*to 'const __global float"):
        clcheck.check(cap, mutate)


def test_unqualified_pointer_parameter_given_device_memory_is_rejected():
    cap = sparse_decode_captures(mx.float32)[0]

    def mutate(src):
        src = src.replace("inline float v4_e8m0", HELPER + "inline float v4_e8m0", 1)
        return src.replace("const float qscale = scale[0];", "const float qscale = v4_first(sinks);", 1)

    with pytest.raises(emu.EmulatorError, match="address space"):
        clcheck.check(cap, mutate)
