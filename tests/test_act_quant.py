"""act_quant: the model rounds GEMM inputs where DeepSeek's official ``linear()`` does.

The reference is the port with ``act_quant`` off whose FP8/FP4 projections are replaced by an
independent numpy transcription of the official ``linear()`` / ``Expert`` / ``MoE`` expert loop
(:mod:`mlx_v4.testing.official`), fed the exact values the checkpoint encodes. Which projections
round is decided there from the release's names and the official forward, not by the port.
Everything else (attention, compressors, indexer, hyper-connections, KV and indexer roundings)
is shared, and checked elsewhere (test_parity, test_fake_quant). Roundings make the model
discontinuous (an ulp of accumulation order can move a value across an e4m3 rounding boundary),
so the comparison is top-1 agreement and the per-position median error, not a max bound.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_v4
from mlx_v4.config import ConfigError, ModelArgs
from mlx_v4.layers import fake_quant as fq
from mlx_v4.testing import official
from mlx_v4.testing.tiny import TINY_CONFIG, run_chunks

# TINY_CONFIG with every rounded GEMM input a whole number of 128-blocks (q_lora_rank and the
# expert width are 64 there, which the official act_quant refuses).
CONFIG = dict(TINY_CONFIG, q_lora_rank=128, moe_intermediate_size=128)
SEEDS = (0, 1, 2, 3, 4)
LENGTH = 300  # past the 128 window, two ratio-128 entries, 75 ratio-4 entries (> index_topk)
AGREEMENT = 0.95
# Median over positions of the largest logit error. Seeds 0-3 match exactly (dequantized FP8)
# or to 1e-6 (mxfp8); in seed 4 an ulp of accumulation order flips one rounding at position 144
# and every later position that reads that entry moves by ~0.03. Without act_quant: ~0.7.
MEDIAN = 0.1


class _RefLinear(nn.Module):
    def __init__(self, weight: np.ndarray, quantized: bool):
        super().__init__()
        self._w, self._q = weight, quantized

    def __call__(self, x: mx.array) -> mx.array:
        return mx.array(official.linear(np.array(x.astype(mx.float32)), self._w, self._q)).astype(x.dtype)


class _RefShared(nn.Module):
    def __init__(self, ws, limit: float, quantized: bool):
        super().__init__()
        self._ws, self._limit, self._q = ws, limit, quantized

    def __call__(self, x: mx.array) -> mx.array:
        return mx.array(official.expert(np.array(x), *self._ws, self._limit, quantized=self._q))


class _RefRouted(nn.Module):
    def __init__(self, experts, limit: float, quantized: bool):
        super().__init__()
        self._experts, self._limit, self._q = experts, limit, quantized

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        return mx.array(official.routed_experts(np.array(x), np.array(indices), np.array(weights),
                                                self._experts, self._limit, self._q))


def _stored_dtypes(path) -> dict[str, str]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out = {}
    for shard in set(index["weight_map"].values()):
        out |= {k: v[0] for k, v in official.read_safetensors(path / shard).items()}
    return out


def _official_linear_model(path, exact: dict[str, np.ndarray]):
    """The port with act_quant off and the official linear() path swapped in: a projection
    rounds its input iff the release stores its weight FP8/FP4 and the official forward calls
    linear() on it (official.ACT_QUANT_NAMES; wo_a is an unrounded einsum there)."""
    model, _ = mlx_v4.load(path, dtype=mx.float32, model_config={"act_quant": False})
    stored = _stored_dtypes(path)
    args = model.args

    def rounded(name: str) -> bool:
        return stored[name] in ("F8_E4M3", "I8") and bool(official.ACT_QUANT_NAMES.search(name))

    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        for proj in ("wq_a", "wq_b", "wkv", "wo_b"):
            name = f"{p}attn.{proj}.weight"
            setattr(layer.attn, proj, _RefLinear(exact[name], rounded(name)))
        if args.compress_ratios[i] == 4:
            name = f"{p}attn.indexer.wq_b.weight"
            layer.attn.indexer.wq_b = _RefLinear(exact[name], rounded(name))
        names = [f"{p}ffn.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")]
        assert len({rounded(n) for n in names}) == 1
        layer.ffn.shared_experts = _RefShared([exact[n] for n in names], args.swiglu_limit, rounded(names[0]))
        experts = [[exact[f"{p}ffn.experts.{e}.{w}.weight"] for w in ("w1", "w2", "w3")]
                   for e in range(args.n_routed_experts)]
        layer.ffn.experts = _RefRouted(experts, args.swiglu_limit, rounded(f"{p}ffn.experts.0.w1.weight"))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = []
    for seed in SEEDS:
        path = tmp_path_factory.mktemp(f"official{seed}")
        raw = official.random_official_weights(CONFIG, seed=seed, include_mtp=False)
        exact = official.write_official_checkpoint(path, CONFIG, raw)
        ids = mx.array(np.random.default_rng(100 + seed).integers(0, CONFIG["vocab_size"], (1, LENGTH)))
        out.append((path, exact, ids, np.array(_official_linear_model(path, exact)(ids))))
    return out


def _compare(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, median over positions of the largest logit error)."""
    return float((got.argmax(-1) == want.argmax(-1)).mean()), float(np.median(np.abs(got - want).max(-1)))


@pytest.mark.parametrize("fp8", ["dequantize", "mxfp8"])
def test_default_matches_the_official_linear_path(checkpoints, fp8):
    for path, _, ids, want in checkpoints:
        model, _ = mlx_v4.load(path, dtype=mx.float32, fp8=fp8)
        assert model.args.act_quant and model.args.fake_quant
        agree, median = _compare(np.array(model(ids)), want)
        assert agree >= AGREEMENT and median < MEDIAN, (path.name, agree, median)


def test_without_rounding_the_port_is_measurably_off(checkpoints):
    """The reference separates the two modes: act_quant off is far from it (this is the gap
    issue 18 measured against DeepSeek's own code), so the test above has power."""
    for path, _, ids, want in checkpoints:
        model, _ = mlx_v4.load(path, dtype=mx.float32, model_config={"act_quant": False})
        agree, median = _compare(np.array(model(ids)), want)
        assert agree < 0.9 and median > 3 * MEDIAN, (path.name, agree, median)


def test_chunked_decode_matches_one_pass(checkpoints):
    """The rounding is per token row, so prefill chunks and single-token steps see what the
    full pass sees."""
    path, _, ids, _ = checkpoints[0]
    model, _ = mlx_v4.load(path, dtype=mx.float32)
    full = np.array(model(ids))
    agree, median = _compare(np.array(run_chunks(model, ids, [100] + [1] * 30 + [170])), full)
    assert agree >= 0.99 and median < 1e-4, (agree, median)


def test_switch_off_never_rounds(checkpoints, monkeypatch):
    """act_quant off takes exactly the pre-act_quant graph: gemm_input returns x itself and the
    rounding is never reached."""
    path, _, ids, _ = checkpoints[0]
    model, _ = mlx_v4.load(path, dtype=mx.float32, model_config={"act_quant": False})
    before = np.array(model(ids))

    def boom(x, block=128):
        raise AssertionError("act_quant_fp8 called with act_quant off")

    monkeypatch.setattr(fq, "act_quant_fp8", boom)
    x = mx.ones((2, 128))
    assert fq.gemm_input(x, False) is x
    np.testing.assert_array_equal(np.array(model(ids)), before)
    with pytest.raises(AssertionError, match="act_quant off"):
        fq.gemm_input(x, True)


def test_each_rounded_projection_is_on_the_official_list():
    """The port rounds exactly the projections the official linear() rounds (names mapped 1:1)."""
    rounded = {n for n in official.official_shapes(CONFIG) if official.ACT_QUANT_NAMES.search(n)}
    kinds = {n.split(".", 2)[2].rsplit(".", 1)[0] for n in rounded if n.startswith("layers.")}
    kinds = {k if "experts." not in k or "shared" in k else "ffn.experts.N." + k.rsplit(".", 1)[1] for k in kinds}
    assert kinds == {"attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "attn.indexer.wq_b",
                     "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3",
                     "ffn.experts.N.w1", "ffn.experts.N.w2", "ffn.experts.N.w3"}
    assert {"mtp.0.e_proj.weight", "mtp.0.h_proj.weight"} <= rounded


# ---- configuration -------------------------------------------------------------------------

def test_default_follows_fake_quant_where_blocks_are_whole():
    assert ModelArgs.from_dict(CONFIG).act_quant is True
    assert ModelArgs.from_dict(CONFIG, {"fake_quant": False}).act_quant is False
    assert ModelArgs.from_dict(CONFIG, {"act_quant": False}).act_quant is False
    assert ModelArgs.from_dict(CONFIG, {"fake_quant": False, "act_quant": True}).act_quant is True
    # TINY_CONFIG's 64-wide q_lora and experts cannot be rounded the official way: default off
    assert ModelArgs.from_dict(TINY_CONFIG).act_quant is False
    for name in ("flash", "pro"):
        from mlx_v4.config import preset
        assert preset(name).act_quant is True


def test_explicit_act_quant_on_ragged_widths_is_refused():
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(TINY_CONFIG, {"act_quant": True})
    assert str(e.value) == ("act_quant rounds GEMM inputs in blocks of 128, as the official act_quant does (it "
                            "requires whole blocks); not a multiple of 128: q_lora_rank=64, moe_intermediate_size=64")


def test_to_dict_leaves_runtime_switches_out():
    d = ModelArgs.from_dict(CONFIG).to_dict()
    assert "act_quant" not in d and "fake_quant" not in d


def test_fingerprint_tells_the_numerics_apart(checkpoints):
    path = checkpoints[0][0]
    on, _ = mlx_v4.load(path, dtype=mx.float32)
    off, _ = mlx_v4.load(path, dtype=mx.float32, model_config={"act_quant": False})
    assert on.fingerprint != off.fingerprint


def test_tensor_split_keeps_the_blocks_global():
    """Each rank rounds its own wo_b input columns; that equals the one-process rounding only
    when every rank holds whole blocks of 128."""
    from mlx_v4.parallel import SplitError, check_tensor_split

    args = ModelArgs.from_dict(CONFIG)  # o_groups 2 x o_lora_rank 64: 128 wo_b inputs
    check_tensor_split(args, 1)
    with pytest.raises(SplitError, match="gives each rank 64 wo_b inputs, not a multiple of 128"):
        check_tensor_split(args, 2)
    check_tensor_split(ModelArgs.from_dict(CONFIG, {"act_quant": False}), 2)
    check_tensor_split(ModelArgs.from_dict(dict(CONFIG, o_lora_rank=128)), 2)
