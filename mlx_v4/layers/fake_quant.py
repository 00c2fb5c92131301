"""FP8 / FP4 activation rounding and the Hadamard rotation of the official V4 code.

DeepSeek V4 was trained with these simulations in place (QAT), so the current official
inference code keeps them (paper §2.3 and §4; the official ``act_quant(..., inplace=True)``
and ``fp4_act_quant``):

* window and compressed KV: dims ``[:nope]`` rounded to FP8 e4m3 in blocks of 64 with
  power-of-two (E8M0) scales; the RoPE dims stay in bf16;
* indexer keys and queries: Hadamard rotation, then FP4 e2m1 in blocks of 32 with E8M0 scales;
* the input of every GEMM whose weight is FP8 or FP4 in the release: FP8 e4m3 in blocks of 128
  with E8M0 scales (the official ``linear()`` calls ``act_quant(x, 128, "ue8m0")`` before
  ``fp8_gemm``/``fp4_gemm``), see :func:`act_quant_fp8` and :func:`gemm_input`; V4.1's
  ``linear()`` does the same in blocks of 32.

Each rounding also returns its packed form (codes + exponent bytes) so the KV cache can store
exactly what the model computed, at its real size.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx

# The decoders live in mlx_v4/formats.py, shared with the kernels' references (re-exported here).
from ..formats import dequantize_fp4, dequantize_fp8, dequantize_kv_entry  # noqa: F401
from ..formats import pow2 as _pow2

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_BLOCK = 64  # per-block scale of the KV fake-quant (not the 128 of the weights)
GEMM_BLOCK = 128  # per-block scale of the GEMM inputs (the official ``block_size``)
FP4_BLOCK = 32


def _pow2_ceil_exponent(x: mx.array) -> mx.array:
    """ceil(log2(x)) for positive float32 x, exactly, from the bit pattern (as the kernels do)."""
    bits = x.astype(mx.float32).view(mx.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(mx.int32) - 127
    return exponent + ((bits & 0x7FFFFF) != 0).astype(mx.int32)


def block_scale_exponent(x: mx.array, block: int, fmt_max: float, amax_floor: float) -> mx.array:
    """E8M0 exponents (int32, unbiased) of the per-block power-of-two scales of ``x``.
    x: [..., n] -> [..., n // block]."""
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], -1, block)
    amax = mx.maximum(mx.abs(xb).max(axis=-1), amax_floor)
    return _pow2_ceil_exponent(amax * (1.0 / fmt_max))


def fp8_e4m3_round(x: mx.array) -> mx.array:
    """Round float32 to the nearest e4m3 value (ties to even), saturating at +-448."""
    return mx.from_fp8(mx.to_fp8(mx.clip(x, -FP8_MAX, FP8_MAX)), dtype=mx.float32)


def quantize_fp8(x: mx.array, block: int = FP8_BLOCK) -> tuple[mx.array, mx.array]:
    """x [..., n] -> (e4m3 codes uint8 [..., n], E8M0 scale bytes uint8 [..., n // block])."""
    e = block_scale_exponent(x, block, FP8_MAX, 1e-4)
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], -1, block) / _pow2(e)[..., None]
    codes = mx.to_fp8(mx.clip(xb, -FP8_MAX, FP8_MAX)).reshape(x.shape)
    return codes, (e + 127).astype(mx.uint8)


def fake_quant_fp8(x: mx.array, block: int = FP8_BLOCK) -> mx.array:
    """The value the official ``act_quant(x, 64, "ue8m0", inplace=True)`` leaves in x."""
    return dequantize_fp8(*quantize_fp8(x, block), dtype=x.dtype)


def _e2m1_code(v: mx.array) -> mx.array:
    """Magnitude code 0..7 of |v| (|v| <= 6) rounded to nearest, ties to even code."""
    a = mx.abs(v)
    # Upper bounds of each code's interval; '<=' where the tie goes down to an even code.
    code = mx.zeros(a.shape, dtype=mx.uint8)
    for bound, inclusive in ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                             (2.5, False), (3.5, True), (5.0, False)):
        over = (a >= bound) if inclusive else (a > bound)
        code = code + over.astype(mx.uint8)
    return code


def quantize_fp4(x: mx.array, block: int = FP4_BLOCK) -> tuple[mx.array, mx.array]:
    """x [..., n] -> (packed e2m1 uint8 [..., n // 2], low nibble = even element;
    E8M0 scale bytes uint8 [..., n // block])."""
    e = block_scale_exponent(x, block, FP4_MAX, FP4_MAX * 2.0**-126)
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], -1, block) / _pow2(e)[..., None]
    xb = mx.clip(xb, -FP4_MAX, FP4_MAX)
    nibble = _e2m1_code(xb) | ((xb < 0).astype(mx.uint8) << 3)
    nibble = nibble.reshape(*x.shape[:-1], -1, 2)
    packed = nibble[..., 0] | (nibble[..., 1] << 4)
    return packed, (e + 127).astype(mx.uint8)


def fake_quant_fp4(x: mx.array, block: int = FP4_BLOCK) -> mx.array:
    """The value the official ``fp4_act_quant(x, 32, inplace=True)`` leaves in x."""
    return dequantize_fp4(*quantize_fp4(x, block), dtype=x.dtype)


def _e4m3_grid(v: mx.array) -> mx.array:
    """Round float32 v (|v| <= 448) to the nearest e4m3 value, ties to even, in float32.
    Normal range: keep 3 mantissa bits by integer round-to-nearest-even on the bit pattern;
    below 2**-6 (e4m3 subnormals) the grid is uniform, 2**-9 apart. Equal to
    ``from_fp8(to_fp8(v))`` (tested) in plain integer/float ops, which mx.compile fuses."""
    bits = v.view(mx.uint32)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).view(mx.float32)
    subnormal = mx.round(v * 512.0) * (1.0 / 512.0)  # mx.round: ties to even
    return mx.where(mx.abs(v) < 2.0**-6, subnormal, normal)


def _act_quant_fp8(x: mx.array, block: int) -> mx.array:
    """x [..., n], n % block == 0 -> x rounded as in :func:`act_quant_fp8`, in x's dtype.
    One max-reduction per block, then one fused elementwise pass (compiled below)."""
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], -1, block)  # [..., n / block, block]
    amax = mx.maximum(mx.abs(xb).max(axis=-1, keepdims=True), 1e-4)
    e = _pow2_ceil_exponent(amax * (1.0 / FP8_MAX))  # [..., n / block, 1]
    # x / 2**e == x * 2**-e exactly (powers of two in the normal range)
    v = _e4m3_grid(mx.clip(xb * _pow2(-e), -FP8_MAX, FP8_MAX))
    return (v * _pow2(e)).reshape(x.shape).astype(x.dtype)


#: The official blocks: 128 in V4's ``linear()``, 32 in V4.1's (its ``fp8_block_size``).
GEMM_BLOCKS = (GEMM_BLOCK, 32)
_act_quant_fp8_compiled = {b: mx.compile(partial(_act_quant_fp8, block=b)) for b in GEMM_BLOCKS}


def act_quant_fp8(x: mx.array, block: int = GEMM_BLOCK) -> mx.array:
    """The value the official ``act_quant(x, block, "ue8m0")`` hands to ``fp8_gemm``/``fp4_gemm``
    (codes times scales): per block along the last axis, scale = 2**ceil(log2(amax / 448))
    with amax floored at 1e-4, values rounded to e4m3 (ties to even, saturating at 448). Returns
    x's dtype (exact in float32 and bfloat16). Like the official kernel it needs whole blocks.
    ``block``: 128 for V4, 32 for V4.1."""
    if block not in _act_quant_fp8_compiled:
        raise ValueError(f"act_quant_fp8 rounds in blocks of {' or '.join(map(str, GEMM_BLOCKS))} "
                         f"(the official block sizes of V4 and V4.1), not {block}")
    if x.shape[-1] % block:
        raise ValueError(f"act_quant_fp8: the last axis ({x.shape[-1]}) is not a multiple of {block}; "
                         "the official act_quant requires whole blocks")
    return _act_quant_fp8_compiled[block](x)


def gemm_input(x: mx.array, act_quant: bool | int) -> mx.array:
    """What a projection whose official weight is FP8/FP4 multiplies: x rounded by
    :func:`act_quant_fp8` when ``act_quant`` is on, else x itself (unchanged, no copy).
    ``act_quant``: False/0 off, True V4's block of 128, or the block itself (V4.1 passes 32)."""
    if not act_quant:
        return x
    return act_quant_fp8(x, GEMM_BLOCK if act_quant is True else int(act_quant))


_HADAMARD: dict[int, mx.array] = {}


def hadamard_matrix(n: int) -> mx.array:
    """Sylvester Hadamard matrix scaled by n**-0.5 (orthonormal, symmetric)."""
    if n not in _HADAMARD:
        if n & (n - 1):
            raise ValueError(f"Hadamard size {n} is not a power of two")
        h = mx.array([[1.0]])
        while h.shape[0] < n:
            h = mx.concatenate([mx.concatenate([h, h], 1), mx.concatenate([h, -h], 1)], 0)
        _HADAMARD[n] = h * (1.0 / math.sqrt(n))
    return _HADAMARD[n]


def hadamard(x: mx.array) -> mx.array:
    """Walsh-Hadamard rotation of the last axis (the official ``rotate_activation``)."""
    return (x.astype(mx.float32) @ hadamard_matrix(x.shape[-1])).astype(x.dtype)


def round_bf16(x: mx.array) -> mx.array:
    """Round to bf16 and back to x's dtype (the official keeps the RoPE dims of KV in bf16)."""
    return x.astype(mx.bfloat16).astype(x.dtype)


def quantize_kv_entry(x: mx.array, rope_dim: int) -> tuple[mx.array, tuple[mx.array, mx.array, mx.array]]:
    """A main KV entry as the official code leaves it: FP8 (block 64) on the non-RoPE dims,
    bf16 on the RoPE dims. x [..., head_dim] -> (values in x.dtype, packed form
    (e4m3 codes uint8 [..., nope], E8M0 bytes uint8 [..., nope // 64], rope bf16 [..., rope_dim]))."""
    codes, scale = quantize_fp8(x[..., :-rope_dim])
    rope = x[..., -rope_dim:].astype(mx.bfloat16)
    values = mx.concatenate([dequantize_fp8(codes, scale, x.dtype), rope.astype(x.dtype)], axis=-1)
    return values, (codes, scale, rope)


def quantize_index_key(x: mx.array) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """An indexer key after the Hadamard rotation: FP4 (block 32).
    x [..., d] -> (values in x.dtype, (packed uint8 [..., d // 2], E8M0 bytes [..., d // 32]))."""
    packed, scale = quantize_fp4(x)
    return dequantize_fp4(packed, scale, x.dtype), (packed, scale)
