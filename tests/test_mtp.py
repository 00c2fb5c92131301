"""The MTP block (mlx_v4/draft/mtp.py) against an independent numpy transcription of the
official ``MTPBlock.forward`` (inference/model.py), on the official-format fixture's mtp.0.*
weights, decoded here from the raw FP8/FP4/BF16 bytes."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_v4
from mlx_v4.draft.mtp import MTPBlock, MTPError, attach_mtp, mtp_layer_args
from mlx_v4.model import Model
from mlx_v4.testing import official
from mlx_v4.testing.tiny import tiny_args

FIXTURE = Path(__file__).parent / "fixtures" / "tiny"


def _raw_weights(prefix="") -> dict[str, np.ndarray]:
    """Every tensor starting with ``prefix`` as float32 (int64 kept), decoded with numpy."""
    import ml_dtypes

    index = json.loads((FIXTURE / "model.safetensors.index.json").read_text())["weight_map"]
    files = {f: official.read_safetensors(FIXTURE / f) for f in sorted(set(index.values()))}
    raw = {k: v for f in files.values() for k, v in f.items()}
    out = {}
    for name, (dtype, shape, data) in raw.items():
        if not name.startswith(prefix) or name.endswith(".scale") and name[:-6] + ".weight" in raw:
            continue
        if dtype == "F8_E4M3":
            _, sshape, sdata = raw[name[:-7] + ".scale"]
            out[name] = official.dequantize_fp8_block(data.reshape(shape), sdata.reshape(sshape))
        elif dtype == "I8":
            _, sshape, sdata = raw[name[:-7] + ".scale"]
            out[name] = official.dequantize_fp4_e2m1(data.view(np.int8).reshape(shape), sdata.reshape(sshape))
        elif dtype == "BF16":
            out[name] = data.view(ml_dtypes.bfloat16).reshape(shape).astype(np.float32)
        elif dtype == "F32":
            out[name] = data.view(np.float32).reshape(shape)
        else:
            out[name] = data.view(np.int64).reshape(shape)
    return out


# ---- the transcription (float64, one sequence, a fresh window) ---------------------------------

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 if w is None else w)


def _rope(x, pos, inv_freq, inverse=False):
    """Interleaved rotation of the last 2*len(inv_freq) dims; x [L, ..., d], pos [L]."""
    r = 2 * len(inv_freq)
    ang = pos[:, None] * inv_freq[None, :] * (-1 if inverse else 1)  # [L, r/2]
    shape = (len(pos),) + (1,) * (x.ndim - 2) + (r // 2,)
    cos, sin = np.cos(ang).reshape(shape), np.sin(ang).reshape(shape)
    a, b = x[..., -r::2], x[..., -r + 1::2]
    out = x.copy()
    out[..., -r::2], out[..., -r + 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


def _hc_pre(x, fn, scale, base, a):
    hc = a.hc_mult
    xf = x.reshape(x.shape[0], -1)
    mixes = (xf @ fn.T) / np.sqrt((xf * xf).mean(-1, keepdims=True) + a.rms_norm_eps)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    pre = sig(mixes[:, :hc] * scale[0] + base[:hc]) + a.hc_eps
    post = 2 * sig(mixes[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = (mixes[:, 2 * hc:] * scale[2] + base[2 * hc:]).reshape(-1, hc, hc)
    comb = np.exp(comb - comb.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + a.hc_eps
    comb = comb / (comb.sum(-2, keepdims=True) + a.hc_eps)
    for _ in range(a.hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + a.hc_eps)
        comb = comb / (comb.sum(-2, keepdims=True) + a.hc_eps)
    return (pre[..., None] * x).sum(1), post, comb


def _hc_post(o, residual, post, comb):
    return post[..., None] * o[:, None, :] + np.einsum("ljk,ljd->lkd", comb, residual)


def _attention(x, W, p, pos, a):
    H, hd = a.num_attention_heads, a.head_dim
    inv = 1.0 / (a.rope_theta ** (np.arange(0, a.qk_rope_head_dim, 2) / a.qk_rope_head_dim))
    q = (_rms(x @ W[p + "wq_a.weight"].T, W[p + "q_norm.weight"], a.rms_norm_eps) @ W[p + "wq_b.weight"].T)
    q = _rope(_rms(q.reshape(len(x), H, hd), None, a.rms_norm_eps), pos, inv)
    kv = _rope(_rms(x @ W[p + "wkv.weight"].T, W[p + "kv_norm.weight"], a.rms_norm_eps), pos, inv)
    s = np.einsum("qhd,kd->qhk", q, kv) * hd**-0.5
    visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - a.sliding_window)
    s = np.where(visible[:, None, :], s, -np.inf)
    sink = W[p + "attn_sink"][None, :, None]
    m = np.maximum(s.max(-1, keepdims=True), sink)
    e = np.exp(s - m)
    o = np.einsum("qhk,kd->qhd", e / (e.sum(-1, keepdims=True) + np.exp(sink - m)), kv)
    o = _rope(o, pos, inv, inverse=True).reshape(len(x), a.o_groups, -1)
    wo_a = W[p + "wo_a.weight"].reshape(a.o_groups, a.o_lora_rank, -1)
    return np.einsum("lgi,gri->lgr", o, wo_a).reshape(len(x), -1) @ W[p + "wo_b.weight"].T


def _swiglu(x, w1, w2, w3, limit):
    g, u = x @ w1.T, x @ w3.T
    g, u = np.minimum(g, limit), np.clip(u, -limit, limit)
    return (g / (1 + np.exp(-g)) * u) @ w2.T


def _moe(x, W, p, a):
    scores = np.sqrt(np.log1p(np.exp(x @ W[p + "gate.weight"].T)))
    top = np.argsort(-(scores + W[p + "gate.bias"]), axis=-1)[:, : a.num_experts_per_tok]
    w = np.take_along_axis(scores, top, -1)
    w = w / w.sum(-1, keepdims=True) * a.routed_scaling_factor
    y = _swiglu(x, *(W[f"{p}shared_experts.{n}.weight"] for n in ("w1", "w2", "w3")), a.swiglu_limit)
    for t in range(len(x)):
        for j, e in enumerate(top[t]):
            y[t] += w[t, j] * _swiglu(x[t:t + 1], *(W[f"{p}experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3")),
                                      a.swiglu_limit)[0]
    return y


def mtp_reference(W, h, next_ids, pos, a):
    """Official MTPBlock.forward: h [L, hc, D] main streams, next_ids [L] -> (streams, logits)."""
    p = "mtp.0."
    e = _rms(W["embed.weight"][next_ids], W[p + "enorm.weight"], a.rms_norm_eps)
    x = (e @ W[p + "e_proj.weight"].T)[:, None, :] + _rms(h, W[p + "hnorm.weight"], a.rms_norm_eps) @ W[p + "h_proj.weight"].T
    res = x
    y, post, comb = _hc_pre(x, W[p + "hc_attn_fn"], W[p + "hc_attn_scale"], W[p + "hc_attn_base"], a)
    x = _hc_post(_attention(_rms(y, W[p + "attn_norm.weight"], a.rms_norm_eps), W, p + "attn.", pos, a), res, post, comb)
    res = x
    y, post, comb = _hc_pre(x, W[p + "hc_ffn_fn"], W[p + "hc_ffn_scale"], W[p + "hc_ffn_base"], a)
    x = _hc_post(_moe(_rms(y, W[p + "ffn_norm.weight"], a.rms_norm_eps), W, p + "ffn.", a), res, post, comb)
    xf = x.reshape(len(x), -1)
    mixes = (xf @ W[p + "hc_head_fn"].T) / np.sqrt((xf * xf).mean(-1, keepdims=True) + a.rms_norm_eps)
    pre = 1 / (1 + np.exp(-(mixes * W[p + "hc_head_scale"] + W[p + "hc_head_base"]))) + a.hc_eps
    out = _rms((pre[..., None] * x).sum(1), W[p + "norm.weight"], a.rms_norm_eps)
    return x, out @ W["head.weight"].T


@pytest.mark.parametrize("start", [0, 37])
def test_mtp_block_matches_the_official_forward(start):
    model, _ = mlx_v4.load(FIXTURE, model_config={"fake_quant": False}, dtype=mx.float32, fp8="dequantize")
    a = model.args
    W = {k: v.astype(np.float64) if v.dtype != np.int64 else v for k, v in _raw_weights().items()}
    rng = np.random.default_rng(start)
    L = 12
    h = rng.standard_normal((L, a.hc_mult, a.hidden_size))
    next_ids = rng.integers(2, a.vocab_size, L)
    want_x, want_logits = mtp_reference(W, h, next_ids, np.arange(start, start + L, dtype=np.float64), a)
    block = model.mtp[0]
    cache = block.make_cache()
    cache.offset = start  # positions start.. (nothing earlier in the window)
    x = block(mx.array(h[None], dtype=mx.float32), mx.array(next_ids[None]), cache, model.embed)
    logits = block.logits(x, model.head)
    np.testing.assert_allclose(np.array(x[0]), want_x, atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(np.array(logits[0]), want_logits, atol=2e-4, rtol=1e-4)
    assert cache.offset == start + L


def test_mtp_layer_is_window_only_and_score_routed():
    args = tiny_args()
    block = MTPBlock(args, cpu=True, use_kernel=False)
    assert block.attn.ratio == 0 and not block.ffn.gate.hash_routed
    assert mtp_layer_args(args).compress_ratios[-1] == 0 and block.make_cache().kind == "window"
    with pytest.raises(MTPError, match="MTP compress ratio 4 is not supported"):
        MTPBlock(tiny_args(compress_ratios=[0, 4, 128, 4, 4]))
    with pytest.raises(MTPError, match="num_nextn_predict_layers=0"):
        attach_mtp(Model(tiny_args(num_nextn_predict_layers=0)))
