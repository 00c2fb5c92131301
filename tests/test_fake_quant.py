"""The activation roundings of the official code, bit for bit against known-correct casts."""

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.layers import fake_quant as fq


def _np_pow2_ceil(x):
    return 2.0 ** np.ceil(np.log2(x.astype(np.float64)))


def _ref_fp8(x: np.ndarray, block: int) -> np.ndarray:
    """Reference: ml_dtypes e4m3 cast of the block-scaled values (the official act_quant)."""
    xb = x.reshape(*x.shape[:-1], -1, block).astype(np.float32)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), 1e-4)
    scale = _np_pow2_ceil(amax.astype(np.float32) * np.float32(1 / 448)).astype(np.float32)
    q = np.clip(xb / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return (q * scale).reshape(x.shape)


def _ref_fp4(x: np.ndarray, block: int = 32) -> np.ndarray:
    xb = x.reshape(*x.shape[:-1], -1, block).astype(np.float32)
    amax = np.maximum(np.abs(xb).max(-1, keepdims=True), 6 * 2.0**-126)
    scale = _np_pow2_ceil(amax.astype(np.float32) * np.float32(1 / 6)).astype(np.float32)
    q = np.clip(xb / scale, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return (q * scale).reshape(x.shape)


@pytest.mark.parametrize("shape", [(3, 448), (2, 5, 64), (1, 128)])
@pytest.mark.parametrize("spread", [1e-3, 1.0, 300.0])
def test_fp8_rounding_matches_e4m3_cast(shape, spread):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * spread).astype(np.float32)
    x.reshape(-1)[::7] = 0.0  # zeros and a zero block edge case
    got = np.array(fq.fake_quant_fp8(mx.array(x)))
    np.testing.assert_array_equal(got, _ref_fp8(x, 64))


def test_fp8_ties_and_saturation_bits():
    # values exactly between two e4m3 neighbours round to the even mantissa
    x = np.array([[1.0625, 1.1875, 448.0, -448.0] + [0.0] * 60], dtype=np.float32)
    got = np.array(fq.fake_quant_fp8(mx.array(x)))
    np.testing.assert_array_equal(got, _ref_fp8(x, 64))
    assert got[0, 0] == 1.0 and got[0, 1] == 1.25


@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 128), (1, 32)])
def test_fp4_rounding_matches_e2m1_cast(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32) * 3
    np.testing.assert_array_equal(np.array(fq.fake_quant_fp4(mx.array(x))), _ref_fp4(x))


def test_fp4_grid_ties_go_to_even_codes():
    vals = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4, dtype=np.float32)[None]
    vals[0, -1] = 6.0
    np.testing.assert_array_equal(np.array(fq.fake_quant_fp4(mx.array(vals))), _ref_fp4(vals))


def test_fp4_packing_layout_low_nibble_is_even_element():
    x = mx.array([[0.5, -6.0] + [0.0] * 30])  # amax 6 -> scale 1
    packed, scale = fq.quantize_fp4(x)
    assert int(packed[0, 0]) == 0xF1  # 0.5 = code 1 (low), -6 = sign|7 = 0xF (high)
    assert int(scale[0, 0]) == 127
    np.testing.assert_array_equal(np.array(fq.dequantize_fp4(packed, scale)), np.array(x))


def test_fp8_packed_form_is_e4m3_bytes_and_e8m0_scales():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 128)).astype(np.float32) * 10
    codes, scale = fq.quantize_fp8(mx.array(x))
    ref = _ref_fp8(x, 64).reshape(3, 2, 64)
    s = 2.0 ** (np.array(scale).astype(np.int32) - 127)
    q = np.array(codes).view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(3, 2, 64)
    np.testing.assert_array_equal(q * s[..., None], ref)


def test_kv_entry_keeps_rope_dims_in_bf16():
    x = mx.random.normal((2, 3, 128))
    values, (codes, scale, rope) = fq.quantize_kv_entry(x, 64)
    assert codes.dtype == mx.uint8 and codes.shape == (2, 3, 64) and scale.shape == (2, 3, 1)
    assert rope.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(values[..., 64:]), np.array(x[..., 64:].astype(mx.bfloat16).astype(mx.float32)))
    np.testing.assert_array_equal(np.array(fq.dequantize_kv_entry(codes, scale, rope)), np.array(values))


def test_hadamard_is_orthonormal_and_matches_sylvester():
    h = np.array(fq.hadamard_matrix(8)) * np.sqrt(8)
    np.testing.assert_allclose(np.abs(h), 1.0, rtol=1e-6)
    assert (np.sign(h[1]) == [1, -1, 1, -1, 1, -1, 1, -1]).all()
    np.testing.assert_allclose(np.array(fq.hadamard_matrix(128) @ fq.hadamard_matrix(128)), np.eye(128), atol=1e-6)
