"""The activation roundings of the official code, bit for bit against known-correct casts."""

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.layers import fake_quant as fq
from mlx_v4.testing import official


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


# ---- act_quant_fp8: the GEMM-input rounding of the official linear() --------------------------

def _gemm_inputs(shape, seed):
    """Blocks spanning 1e-9 .. 1e5 (e4m3 subnormals, the 1e-4 amax floor, large scales), zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    blocks = x.reshape(*shape[:-1], -1, 128)
    blocks *= 10.0 ** rng.integers(-9, 6, blocks.shape[:-1] + (1,))
    blocks[..., ::9] *= 1e-3  # small values inside large blocks: the e4m3 subnormal range
    blocks.reshape(-1, 128)[::5] = 0.0  # whole zero blocks (amax floored at 1e-4)
    return x


@pytest.mark.parametrize("shape", [(1, 128), (3, 512), (2, 5, 256), (7, 1024)])
def test_act_quant_fp8_matches_independent_formulations(shape):
    x = _gemm_inputs(shape, shape[-1] + len(shape))
    got = np.array(fq.act_quant_fp8(mx.array(x)))
    assert got.dtype == np.float32 and got.shape == shape
    # scale from the float32 bit pattern + ml_dtypes cast (mlx_v4.testing.official)
    np.testing.assert_array_equal(got, official.act_quant(x))
    # scale from a float64 log2 + ml_dtypes cast
    np.testing.assert_array_equal(got, _ref_fp8(x, 128))
    # the MLX to_fp8/from_fp8 path the KV rounding uses, at block 128
    np.testing.assert_array_equal(got, np.array(fq.fake_quant_fp8(mx.array(x), 128)))


def test_e4m3_grid_exhaustive_around_every_e4m3_value():
    """Every finite e4m3 value, its float32 neighbours and the midpoints between consecutive
    values (ties to even), in the normal and subnormal range, against ml_dtypes."""
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    mids = (grid[:-1].astype(np.float64) + grid[1:]) / 2
    v = np.concatenate([grid, np.nextafter(grid, np.inf), np.nextafter(grid, -np.inf), mids.astype(np.float32),
                        np.nextafter(mids.astype(np.float32), np.inf), np.nextafter(mids.astype(np.float32), -np.inf)])
    v = np.clip(v, -448, 448).astype(np.float32)
    want = v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.array(fq._e4m3_grid(mx.array(v))), want)


def test_act_quant_fp8_scales_ties_and_saturation_by_hand():
    x = np.zeros((4, 128), np.float32)
    x[0, :3] = [448.0, 1.0625, -1.1875]  # amax 448: scale 1; ties go to the even mantissa
    x[1, :2] = [449.0, 224.5]  # amax 449: scale 2; 449/2 = 224.5 -> 224, 224.5/2 -> 112
    x[2, :3] = [5e-5, -2e-5, 1e-9]  # amax floored at 1e-4: scale 2**ceil(log2(1e-4 / 448)) = 2**-21
    got = np.array(fq.act_quant_fp8(mx.array(x)))
    assert got[0, :3].tolist() == [448.0, 1.0, -1.25]
    assert got[1, :2].tolist() == [448.0, 224.0]
    # 104.9 -> 104 (step 8), -41.9 -> -40 (step 4), 0.0021 -> one subnormal step 2**-9
    assert got[2, :3].tolist() == [104 * 2.0**-21, -40 * 2.0**-21, 2.0**-30]
    assert (got[3] == 0).all()
    np.testing.assert_array_equal(got, official.act_quant(x))


def test_act_quant_fp8_keeps_bf16():
    x = mx.array(_gemm_inputs((3, 256), 5)).astype(mx.bfloat16)
    got = fq.act_quant_fp8(x)
    assert got.dtype == mx.bfloat16
    want = official.act_quant(np.array(x.astype(mx.float32)))
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)), want)  # e4m3 * 2**e is exact in bf16


def test_act_quant_fp8_needs_whole_blocks():
    with pytest.raises(ValueError, match=r"act_quant_fp8: the last axis \(192\) is not a multiple of 128"):
        fq.act_quant_fp8(mx.zeros((2, 192)))
    with pytest.raises(ValueError, match="blocks of 128"):
        fq.act_quant_fp8(mx.zeros((2, 128)), block=64)
    with pytest.raises(ValueError, match="not a multiple of 128"):
        official.act_quant(np.zeros((2, 192), np.float32))


@pytest.mark.mac
@pytest.mark.skipif(not mx.metal.is_available(), reason="needs Metal (Apple GPU)")
def test_act_quant_fp8_on_metal_matches_the_reference():
    """The compiled rounding on the GPU (Metal's own float rules) gives the CPU's bits."""
    x = _gemm_inputs((6, 1024), 11)
    with mx.stream(mx.gpu):
        got = fq.act_quant_fp8(mx.array(x))
        got_bf16 = fq.act_quant_fp8(mx.array(x).astype(mx.bfloat16))
        grid = fq._e4m3_grid(mx.array(np.clip(x.reshape(-1)[:4096] * 1e3, -448, 448)))
        mx.eval(got, got_bf16, grid)
    np.testing.assert_array_equal(np.array(got), official.act_quant(x))
    want_bf16 = official.act_quant(np.array(mx.array(x).astype(mx.bfloat16).astype(mx.float32)))
    np.testing.assert_array_equal(np.array(got_bf16.astype(mx.float32)), want_bf16)
    v = np.clip(x.reshape(-1)[:4096] * 1e3, -448, 448).astype(np.float32)
    np.testing.assert_array_equal(np.array(grid), v.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
