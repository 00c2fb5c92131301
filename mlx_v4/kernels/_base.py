"""Shared pieces of the custom kernels: the kernel spec, the launcher, and the common header.

Every kernel body is written in the Metal dialect so that one string serves three consumers:
``mx.fast.metal_kernel`` on a Mac, the CPU emulator in ``tests/metal_emu`` (which captures
the source MLX generates and runs it as C++), and ``mx.fast.cuda_kernel`` through the small
compatibility prelude in :data:`CUDA_PRELUDE`. Portable-body rules (``docs/kernels.md``):
scalars arrive as shape-(1,) arrays,
local pointers are ``auto``, maths is done in ``float``, SIMD collectives only in
simdgroup-uniform control flow, threads are bounds-checked, threadgroup memory <= 32 KB.

A launch goes through a *runner* ``runner(spec, inputs, output_shapes, output_dtypes, grid,
threadgroup, template) -> list[mx.array]``: :func:`metal_runner` on a Mac; tests substitute
the emulator's runner, so the same wrapper code is exercised on Linux.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

# Decoders for the packed cache formats (the MLX twins: mlx_v4/formats.py), valid Metal, C++ and
# CUDA. Not covered: e4m3 NaN codes (the quantizer saturates, it never writes them) and the
# E8M0 bytes 0 / 255 (scales never reach 2**-127 or NaN: amax is floored).
DECODE_HEADER = r"""
inline float v4_e8m0(uint s) { return as_type<float>(s << 23); }
inline float v4_fp8_e4m3(uint c) {
  uint e = (c >> 3) & 15u;
  uint m = c & 7u;
  float mag = e == 0u ? float(m) * 0.001953125f : as_type<float>(((e + 120u) << 23) | (m << 20));
  return (c & 128u) ? -mag : mag;
}
inline float v4_bf16_bits(uint b) { return as_type<float>(b << 16); }
inline float v4_fp4_e2m1(uint nib) {
  uint m = nib & 7u;
  float mag = m < 4u ? 0.5f * float(m) : (m < 6u ? float(m) - 2.0f : 2.0f * float(m) - 8.0f);
  return (nib & 8u) ? -mag : mag;
}
"""

# Maps the Metal dialect onto CUDA; empty under Metal (no __CUDACC__) and the emulator.
CUDA_PRELUDE = r"""
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#ifndef V4_CUDA_PRELUDE
#define V4_CUDA_PRELUDE
typedef unsigned int uint;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef int int32_t;
#define device
#define constant
#define thread
#define threadgroup __shared__
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2 };
__device__ inline void threadgroup_barrier(mem_flags) { __syncthreads(); }
template <typename To, typename From> __device__ inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type size");
  To y; memcpy(&y, &x, sizeof(To)); return y;
}
__device__ inline float simd_sum(float x) {
  for (int k = 1; k < 32; k <<= 1) x += __shfl_xor_sync(0xffffffffu, x, k);
  return x;
}
__device__ inline float simd_max(float x) {
  for (int k = 1; k < 32; k <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, k));
  return x;
}
__device__ inline float simd_shuffle_xor(float x, unsigned k) { return __shfl_xor_sync(0xffffffffu, x, k); }
__device__ inline uint3 v4_uint3(dim3 d) { return make_uint3(d.x, d.y, d.z); }
#define thread_index_in_threadgroup (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))
#define thread_index_in_simdgroup (thread_index_in_threadgroup & 31u)
#define simdgroup_index_in_threadgroup (thread_index_in_threadgroup >> 5)
#define threadgroup_position_in_grid v4_uint3(blockIdx)
#define thread_position_in_threadgroup v4_uint3(threadIdx)
#define threads_per_threadgroup v4_uint3(blockDim)
#define thread_position_in_grid make_uint3(blockIdx.x * blockDim.x + threadIdx.x, blockIdx.y * blockDim.y + threadIdx.y, blockIdx.z * blockDim.z + threadIdx.z)
#endif
#endif
"""


@dataclass(frozen=True)
class KernelSpec:
    """What ``mx.fast.metal_kernel`` needs; built once per kernel, shared by every runner."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str


Runner = Callable[..., list]

_METAL: dict[str, object] = {}


def metal_runner(spec: KernelSpec, inputs: Sequence[mx.array], output_shapes, output_dtypes,
                 grid, threadgroup, template) -> list[mx.array]:
    """Launch ``spec`` with ``mx.fast.metal_kernel`` (needs Metal to run; export works anywhere)."""
    kernel = _METAL.get(spec.name)
    if kernel is None:
        kernel = _METAL[spec.name] = mx.fast.metal_kernel(
            name=spec.name, input_names=list(spec.input_names), output_names=list(spec.output_names),
            source=spec.source, header=spec.header)
    return kernel(inputs=list(inputs), output_shapes=list(output_shapes), output_dtypes=list(output_dtypes),
                  grid=grid, threadgroup=threadgroup, template=list(template))
