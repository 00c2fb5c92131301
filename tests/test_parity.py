"""Numerical parity with transformers' DeepseekV4ForCausalLM on the committed tiny fixtures.

tests/fixtures/tiny is an official-format checkpoint (FP8 + E8M0 128x128 scales, packed FP4
experts, MTP weights, several shards); tiny_reference.safetensors holds transformers' float32
logits for the exactly dequantized weights (scripts/make_fixtures.py). transformers has no FP8/FP4
activation simulation, so these tests load with fake_quant off.
"""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_v4
from mlx_v4.testing.tiny import run_chunks

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = 1e-4  # float32: only operation order differs from transformers
# bf16 (weights or activations): rounding can swap an indexer pick on this random model, so a
# few logits move a lot; we bound the mean and require the same greedy token almost everywhere.
BF16_MEAN = 0.1
BF16_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def reference():
    return mx.load(str(FIXTURES / "tiny_reference.safetensors"))


@pytest.fixture(scope="module", params=["dequantize", "mxfp8"])
def model(request):
    model, _ = mlx_v4.load(FIXTURES / "tiny", model_config={"fake_quant": False}, dtype=mx.float32,
                           fp8=request.param)
    return model




def test_full_sequence_logits(model, reference):
    got = model(reference["ids_b1"])
    np.testing.assert_allclose(np.array(got), np.array(reference["logits_b1"]), atol=ATOL, rtol=0)


def test_token_by_token_decoding(model, reference):
    # prefill 100, then one token at a time across the 128 window and both ratio-128 windows
    got = run_chunks(model, reference["ids_b1"], [100] + [1] * 200)
    np.testing.assert_allclose(np.array(got), np.array(reference["logits_b1"]), atol=ATOL, rtol=0)


def test_uneven_chunks(model, reference):
    got = run_chunks(model, reference["ids_b1"], [3, 61, 1, 127, 2, 70, 36])
    np.testing.assert_allclose(np.array(got), np.array(reference["logits_b1"]), atol=ATOL, rtol=0)


def test_batch_of_two(model, reference):
    np.testing.assert_allclose(np.array(model(reference["ids_b2"])), np.array(reference["logits_b2"]),
                               atol=ATOL, rtol=0)
    got = run_chunks(model, reference["ids_b2"], [90, 1, 1, 68])
    np.testing.assert_allclose(np.array(got), np.array(reference["logits_b2"]), atol=ATOL, rtol=0)


def test_bf16_compute_within_tolerance(reference):
    model, _ = mlx_v4.load(FIXTURES / "tiny", model_config={"fake_quant": False}, dtype=mx.bfloat16)
    got = np.array(model(reference["ids_b1"]).astype(mx.float32))
    want = np.array(reference["logits_b1"])
    assert np.abs(got - want).mean() < BF16_MEAN
    assert (got.argmax(-1) == want.argmax(-1)).mean() > BF16_AGREEMENT


def test_transformers_checkpoint_loads(reference):
    """The same model as transformers' save_pretrained wrote it (bf16 weights)."""
    model, _ = mlx_v4.load(FIXTURES / "tiny_hf", model_config={"fake_quant": False}, dtype=mx.float32)
    got = np.array(model(reference["ids_b1"]))
    want = np.array(reference["logits_b1"])
    assert np.abs(got - want).mean() < 0.01  # its weights were rounded to bf16; compute is fp32
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.98


def test_fake_quant_default_stays_close(reference):
    """With the official FP8/FP4 activation simulations on (the default), logits move a little."""
    model, _ = mlx_v4.load(FIXTURES / "tiny", dtype=mx.float32)
    assert model.args.fake_quant
    got = np.array(model(reference["ids_b1"]))
    want = np.array(reference["logits_b1"])
    diff = np.abs(got - want)
    assert 0 < diff.mean() < 0.2 and (got.argmax(-1) == want.argmax(-1)).mean() > 0.75
