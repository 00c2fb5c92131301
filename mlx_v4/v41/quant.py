"""The three QAT activation roundings of DeepSeek V4.1 (official ``inference/model.py``).

* window KV: FP8 e4m3 in blocks of **32** over the whole post-RoPE vector (RoPE tail included),
  power-of-two (E8M0) scales: ``act_quant(kv, 32, "ue8m0", inplace=True)``;
* compressed entries: FP4 e2m1 in blocks of **16** with **e4m3** scales (``e4m3(amax / 6)``,
  amax floored at 6 * 2^-9): ``fp4_act_quant(latent, 16, True, scale_dtype=float8_e4m3fn)``;
* index keys and queries: FP4 e2m1 in blocks of 32 with E8M0 scales, no Hadamard rotation.

Each returns the rounded values and the packed form (codes + scale bytes), which is what the
cache stores: every rounded value is exactly representable, so packing is lossless.
"""

from __future__ import annotations

import mlx.core as mx

from ..layers.fake_quant import (
    FP4_MAX,
    _e2m1_code,
    dequantize_fp4,
    dequantize_fp8,
    quantize_fp4,
    quantize_fp8,
)

WINDOW_BLOCK = 32
ENTRY_BLOCK = 16
INDEX_BLOCK = 32

_E2M1 = mx.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_window(x: mx.array) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """x [..., d] -> (values in x.dtype, (e4m3 codes uint8 [..., d], E8M0 bytes [..., d / 32]))."""
    codes, scale = quantize_fp8(x, WINDOW_BLOCK)
    return dequantize_fp8(codes, scale, x.dtype), (codes, scale)


def dequantize_window(codes: mx.array, scale: mx.array, dtype=mx.float32) -> mx.array:
    return dequantize_fp8(codes, scale, dtype)


def quantize_entry(x: mx.array) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """FP4 with one e4m3 scale per 16: x [..., d] -> (values, (packed uint8 [..., d / 2],
    e4m3 scale bytes uint8 [..., d / 16]))."""
    xb = x.astype(mx.float32).reshape(*x.shape[:-1], -1, ENTRY_BLOCK)
    amax = mx.maximum(mx.abs(xb).max(axis=-1), FP4_MAX * 2.0**-9)
    scale_codes = mx.to_fp8(amax / FP4_MAX)
    scale = mx.from_fp8(scale_codes, dtype=mx.float32)
    q = mx.clip(xb / scale[..., None], -FP4_MAX, FP4_MAX)
    nibble = (_e2m1_code(q) | ((q < 0).astype(mx.uint8) << 3)).reshape(*x.shape[:-1], -1, 2)
    packed = nibble[..., 0] | (nibble[..., 1] << 4)
    return dequantize_entry(packed, scale_codes, x.dtype), (packed, scale_codes)


def dequantize_entry(packed: mx.array, scale_codes: mx.array, dtype=mx.float32) -> mx.array:
    codes = mx.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    v = _E2M1[codes.astype(mx.int32)].reshape(*packed.shape[:-1], -1, ENTRY_BLOCK)
    v = v * mx.from_fp8(scale_codes, dtype=mx.float32)[..., None]
    return v.reshape(*packed.shape[:-1], -1).astype(dtype)


def quantize_index(x: mx.array) -> tuple[mx.array, tuple[mx.array, mx.array]]:
    """x [..., d] -> (values, (packed uint8 [..., d / 2], E8M0 bytes [..., d / 32]))."""
    packed, scale = quantize_fp4(x, INDEX_BLOCK)
    return dequantize_fp4(packed, scale, x.dtype), (packed, scale)


def dequantize_index(packed: mx.array, scale: mx.array, dtype=mx.float32) -> mx.array:
    return dequantize_fp4(packed, scale, dtype)
