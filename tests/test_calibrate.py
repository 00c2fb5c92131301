"""Calibrated low-bit experts: packing identical to mx.quantize, the weighted error never worse
than plain rounding, moments equal to a direct computation, and the recipes end to end."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_v4.quantize import ConvertError, convert
from mlx_v4.quantize.calibrate import Moments, collect_moments, pack, quantize_weighted

import mlx_v4
from mlx_v4.testing.tiny import random_model, tiny_args


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_matches_mx_quantize(bits):
    w = mx.random.normal((5, 96), key=mx.random.key(bits)).astype(mx.bfloat16)
    q, s, b = mx.quantize(w, group_size=32, bits=bits)
    codes = mx.dequantize(q, mx.ones_like(s), mx.zeros_like(b), group_size=32, bits=bits)
    assert np.array_equal(pack(np.array(codes.astype(mx.int32)), bits), np.array(q))


def _weighted_error(w, imp, q, s, b, gs, bits):
    d = mx.dequantize(q, s, b, group_size=gs, bits=bits).astype(mx.float32)
    return np.array((mx.array(imp) * (w - d) ** 2).reshape(w.shape[0], -1, gs).sum(-1))


@pytest.mark.parametrize("bits,gs,rows,cols", [(2, 32, 7, 96), (3, 64, 16, 128), (2, 128, 3, 256), (3, 32, 1, 32)])
def test_weighted_error_never_worse_than_plain(bits, gs, rows, cols):
    rng = np.random.default_rng(bits * gs + rows)
    w = mx.array(rng.standard_normal((rows, cols)).astype(np.float32) * rng.gamma(1, 1, (rows, 1)).astype(np.float32))
    imp = rng.gamma(0.3, 1, cols).astype(np.float32)  # a few channels dominate, as in real activations
    q, s, b = quantize_weighted(w, imp, group_size=gs, bits=bits)
    q0, s0, b0 = mx.quantize(w.astype(mx.bfloat16), group_size=gs, bits=bits)
    assert (q.shape, q.dtype, s.shape, s.dtype, b.shape, b.dtype) == (q0.shape, q0.dtype, s0.shape, s0.dtype,
                                                                      b0.shape, b0.dtype)
    mine = _weighted_error(w, imp, q, s, b, gs, bits)
    plain = _weighted_error(w, imp, q0, s0, b0, gs, bits)
    assert (mine <= plain * (1 + 1e-6) + 1e-9).all()  # per group
    if rows * cols >= 1024:
        assert mine.sum() < 0.8 * plain.sum()  # and clearly better overall


def test_moments_equal_a_direct_computation():
    from mlx_v4.layers.moe import _expert_matmul, clamped_swiglu

    args = tiny_args()
    model = random_model(args, seed=3)
    ids = np.random.default_rng(0).integers(0, args.vocab_size, 40).tolist()
    seen = []  # an independent recorder: the MoE inputs and routing, computed by hand afterwards

    class Spy:
        def __init__(self, inner, layer):
            self.inner, self.layer = inner, layer

        def __call__(self, x, indices, weights):
            seen.append((self.layer, np.array(x), np.array(indices)))
            return self.inner(x, indices, weights)

    originals = [layer.ffn.experts for layer in model.layers]
    for i, layer in enumerate(model.layers):
        layer.ffn.experts = Spy(originals[i], i)
    cache = model.make_cache()
    for s in range(0, 40, 16):
        mx.eval(model(mx.array([ids[s:s + 16]], dtype=mx.int32), cache))
    for layer, original in zip(model.layers, originals):
        layer.ffn.experts = original
    moments = collect_moments(model, ids, chunk=16)
    want = Moments()
    for layer, x, idx in seen:
        k = idx.shape[-1]
        for e in np.unique(idx):
            rows = np.nonzero(idx.reshape(-1) == e)[0] // k
            ex = originals[layer]
            xe = mx.array(x[rows])
            h = clamped_swiglu(_expert_matmul(ex.w1, xe, int(e)), _expert_matmul(ex.w3, xe, int(e)), ex.limit)
            want.add(layer, int(e), x[rows], np.array(h))
    assert moments.rows == want.rows and sum(moments.rows.values()) == 40 * args.num_experts_per_tok * len(model.layers)
    for key in want.inputs:
        np.testing.assert_allclose(moments.inputs[key], want.inputs[key], rtol=1e-6)
        np.testing.assert_allclose(moments.hidden[key], want.hidden[key], rtol=1e-6)
        np.testing.assert_allclose(moments.importance(*key, "w1"), want.inputs[key] / want.rows[key], rtol=1e-6)
        np.testing.assert_allclose(moments.importance(*key, "w2"), want.hidden[key] / want.rows[key], rtol=1e-6)
    # an expert the text never reached takes its layer's average
    layer = 1
    unseen = [e for e in range(args.n_routed_experts) if (layer, e) not in moments.rows]
    if unseen:
        keys = [k for k in moments.rows if k[0] == layer]
        avg = sum(moments.inputs[k] for k in keys) / sum(moments.rows[k] for k in keys)
        np.testing.assert_allclose(moments.importance(layer, unseen[0], "w3"), avg, rtol=1e-6)


def test_calibration_option_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ConvertError, match="the calibration text is empty"):
        convert(mlx_v4.DEMO_MODEL_PATH, tmp_path / "a", recipe="2bit-experts", calibration=tmp_path / "empty.txt")
    with pytest.raises(ConvertError, match="cannot read the calibration text"):
        convert(mlx_v4.DEMO_MODEL_PATH, tmp_path / "b", recipe="2bit-experts", calibration=tmp_path / "missing.txt")
    with pytest.raises(ConvertError, match="--calibration applies to 2bit-experts, 3bit-experts"):
        convert(mlx_v4.DEMO_MODEL_PATH, tmp_path / "c", recipe="4bit", calibration=tmp_path / "empty.txt")
    tiny = Path(__file__).parent / "fixtures" / "tiny"  # no tokenizer.json: the bundled V4 one does not fit
    with pytest.raises(ConvertError, match="calibration needs the model's own tokenizer.json"):
        convert(tiny, tmp_path / "d", recipe="2bit-experts")
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["convert", str(tiny), str(tmp_path / "e"), "--recipe", "2bit-experts",
                                 "--calibration", str(tmp_path / "empty.txt"), "--no-calibration"])
    assert r.exit_code == 1 and "not both" in r.stderr


@pytest.mark.slow
def test_calibrated_2bit_beats_plain_2bit_on_the_demo(tmp_path):
    reports = {}
    for name, cal in (("plain", False), ("calibrated", None)):
        r = convert(mlx_v4.DEMO_MODEL_PATH, tmp_path / name, recipe="2bit-experts", calibration=cal, verify=True,
                    progress=False)
        reports[name] = r.verify
    assert reports["calibrated"].kl_mean < reports["plain"].kl_mean
    model, _ = mlx_v4.load(tmp_path / "calibrated")
    assert model.layers[1].ffn.experts.w1.bits == 2 and model.layers[1].attn.wq_b.bits == 8
