"""The V4.1 activation roundings, bit-exact against the reference runner's kernels.

reference.safetensors holds random rows (spanning five decades, with exact rounding midpoints
and values at the FP8/FP4 limits mixed in) and what the official in-place roundings leave in
them (scripts/make_v41_fixtures.py): FP8 block 32 with E8M0 scales (window), FP4 block 16 with
e4m3 scales (compressed entries), FP4 block 32 with E8M0 scales (index keys and queries).
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.v41.quant import (
    dequantize_entry,
    dequantize_index,
    dequantize_window,
    quantize_entry,
    quantize_index,
    quantize_window,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tiny_v41"
CASES = [(quantize_window, dequantize_window, "quant_fp8_b32", 64 + 2),
         (quantize_entry, dequantize_entry, "quant_fp4_b16_e4m3", 32 + 4),
         (quantize_index, dequantize_index, "quant_fp4_b32", 32 + 2)]


@pytest.fixture(scope="module")
def reference():
    return mx.load(str(FIXTURES / "reference.safetensors"))


@pytest.mark.parametrize("quantize,dequantize,key,row_bytes", CASES, ids=[c[2] for c in CASES])
def test_rounding_is_bit_exact_and_packing_lossless(reference, quantize, dequantize, key, row_bytes):
    x = reference["quant_x"]
    values, packed = quantize(x)
    np.testing.assert_array_equal(np.array(values), np.array(reference[key]))
    np.testing.assert_array_equal(np.array(dequantize(*packed)), np.array(values))
    assert sum(p.nbytes for p in packed) == x.shape[0] * row_bytes  # bytes per 64-value row


def test_rounding_keeps_dtype_and_shape():
    x = mx.random.normal((2, 3, 64)).astype(mx.bfloat16)
    for quantize, _, _, _ in CASES:
        v, _ = quantize(x)
        assert v.shape == x.shape and v.dtype == mx.bfloat16


def test_gemm_input_rounding_is_bit_exact(reference):
    """What the official V4.1 linear() hands to fp8_gemm/fp4_gemm: act_quant(x, 32, "ue8m0")'s
    codes times scales (the reference runner's kernel), in float32 and bfloat16."""
    from mlx_v4.layers.fake_quant import act_quant_fp8, gemm_input

    x, want = reference["quant_x"], np.array(reference["quant_gemm_input_b32"])
    np.testing.assert_array_equal(np.array(act_quant_fp8(x, 32)), want)
    np.testing.assert_array_equal(np.array(gemm_input(x, 32)), want)
    assert gemm_input(x, 0) is x
    got = act_quant_fp8(x.astype(mx.bfloat16), 32)
    assert got.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(got.astype(mx.float32)),
                                  np.array(act_quant_fp8(x.astype(mx.bfloat16).astype(mx.float32), 32)))


def test_gemm_input_blocks_are_the_official_ones():
    from mlx_v4.layers.fake_quant import act_quant_fp8

    with pytest.raises(ValueError, match="not a multiple of 32"):
        act_quant_fp8(mx.ones((2, 48)), 32)
    with pytest.raises(ValueError, match="blocks of 128 or 32 .*not 64"):
        act_quant_fp8(mx.ones((2, 64)), 64)
