"""Decoders of the packed FP8 / FP4 formats the model rounds to and the KV cache stores.

These are the MLX definitions; ``DECODE_HEADER`` in ``mlx_v4/kernels/_base.py`` holds the
same decoders in Metal. They live outside ``layers/`` and ``kernels/`` so that both can use
them (the encoders are in ``mlx_v4/layers/fake_quant.py``):

* FP8 e4m3 codes with one E8M0 (power-of-two) scale byte per block;
* FP4 e2m1 nibbles, two per byte (low nibble = even element), one E8M0 byte per block;
* a main KV entry: FP8 non-RoPE dims plus bf16 RoPE dims.
"""

from __future__ import annotations

import mlx.core as mx


def pow2(e: mx.array) -> mx.array:
    """2**e for integer e in the normal float32 range, exactly."""
    return ((e + 127).astype(mx.uint32) << 23).view(mx.float32)


def dequantize_fp8(codes: mx.array, scale: mx.array, dtype=mx.float32) -> mx.array:
    """Inverse of ``quantize_fp8`` in layers/fake_quant.py (exact): codes [..., n], scale bytes
    [..., n // block] -> values [..., n]."""
    n = codes.shape[-1]
    block = n // scale.shape[-1]
    v = mx.from_fp8(codes, dtype=mx.float32).reshape(*codes.shape[:-1], -1, block)
    v = v * pow2(scale.astype(mx.int32) - 127)[..., None]
    return v.reshape(codes.shape).astype(dtype)


# e2m1 magnitudes by code 0..7 (code 8..15: the same, negative)
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_TABLE = mx.array(list(_E2M1_VALUES) + [-v for v in _E2M1_VALUES], dtype=mx.float32)


def dequantize_fp4(packed: mx.array, scale: mx.array, dtype=mx.float32) -> mx.array:
    """Inverse of ``quantize_fp4`` in layers/fake_quant.py (exact): packed [..., n // 2], scale
    bytes [..., n // block] -> values [..., n]."""
    lo, hi = packed & 0x0F, packed >> 4
    codes = mx.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1)
    v = _E2M1_TABLE[codes.astype(mx.int32)]
    n = v.shape[-1]
    block = n // scale.shape[-1]
    v = v.reshape(*v.shape[:-1], -1, block) * pow2(scale.astype(mx.int32) - 127)[..., None]
    return v.reshape(*packed.shape[:-1], n).astype(dtype)


def dequantize_kv_entry(codes: mx.array, scale: mx.array, rope: mx.array, dtype=mx.float32) -> mx.array:
    """A packed main KV entry (FP8 codes, scale bytes, bf16 RoPE dims) -> values [..., head_dim]."""
    return mx.concatenate([dequantize_fp8(codes, scale, dtype), rope.astype(dtype)], axis=-1)
