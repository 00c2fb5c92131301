"""Tiny V4-Flash-0731-format checkpoints (a DSpark drafter under ``mtp.0-2``) and an
independent numpy transcription of the drafter's forward, for tests.

The transcription follows the public references named in :mod:`mlx_v4.draft.dspark` (vLLM's
``DeepSeekV4DSpark`` / ``DeepSeekV4DSparkLayer`` and ``sample_dspark_markov_block``, DeepSpec's
block layout), written here from the math in float64 with plain numpy: no MLX, no code shared
with the port. Activation quantisation is not simulated (compare with ``fake_quant`` off).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..config import ModelArgs
from . import official
from .tiny import TINY_CONFIG

#: The DSpark fields of a tiny Flash-0731-style config (the release: block 5, noise 128799,
#: targets 40-42, rank 256); three stages, so compress_ratios gets three trailing zeros.
TINY_DSPARK = dict(dspark_block_size=5, dspark_noise_token_id=1000, dspark_target_layer_ids=[1, 2, 3],
                   dspark_markov_rank=16)


def tiny_dspark_config(**overrides) -> dict:
    """The tiny main model (mlx_v4/testing/tiny.py: every layer kind) with a 3-stage drafter."""
    cfg = dict(TINY_CONFIG) | TINY_DSPARK
    n = cfg["num_hidden_layers"]
    cfg["compress_ratios"] = list(TINY_CONFIG["compress_ratios"][:n]) + [0] * len(cfg["dspark_target_layer_ids"])
    cfg["num_nextn_predict_layers"] = 1  # as in the release: unchanged by the drafter
    return cfg | overrides


def dspark_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every drafter tensor of the release layout (float view) for a DSpark config dict."""
    a = ModelArgs.from_dict(cfg)
    n, stages = a.num_hidden_layers, len(a.dspark_target_layer_ids)
    # the stages are V4 layers n.. of a model with the stages as extra window-only layers
    extended = {k: v for k, v in cfg.items() if not k.startswith("dspark_")}
    extended |= dict(num_hidden_layers=n + stages, compress_ratios=a.compress_ratios + [0] * stages)
    layers = official.official_shapes(extended, include_mtp=False)
    D, hc, r, V = a.hidden_size, a.hc_mult, a.dspark_markov_rank, a.vocab_size
    shapes = {}
    for i in range(stages):
        prefix = f"layers.{n + i}."
        shapes |= {f"mtp.{i}." + k[len(prefix):]: s for k, s in layers.items() if k.startswith(prefix)}
    last = f"mtp.{stages - 1}."
    shapes |= {"mtp.0.main_proj.weight": (D, stages * D), "mtp.0.main_norm.weight": (D,),
               last + "norm.weight": (D,), last + "hc_head_fn": (hc, hc * D), last + "hc_head_base": (hc,),
               last + "hc_head_scale": (1,), last + "markov_head.markov_w1.weight": (V, r),
               last + "markov_head.markov_w2.weight": (V, r), last + "confidence_head.proj.weight": (1, D + r)}
    return shapes


def random_dspark_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random float32 weights of the main model and its drafter."""
    weights = official.random_official_weights(cfg, seed)
    rng = np.random.default_rng(seed + 7919)
    n_experts = ModelArgs.from_dict(cfg).n_routed_experts
    for name, shape in dspark_shapes(cfg).items():
        if name.endswith("tid2eid"):
            weights[name] = np.argsort(rng.random((shape[0], n_experts)), axis=1)[:, : shape[1]].astype(np.int64)
            continue
        if "norm.weight" in name:
            w = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("hc_attn_fn", "hc_ffn_fn", "hc_head_fn")):
            w = 0.02 * rng.standard_normal(shape)
        elif name.endswith(("hc_attn_scale", "hc_ffn_scale", "hc_head_scale")):
            w = 0.5 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("_base", "attn_sink")):
            w = 0.5 * rng.standard_normal(shape)
        elif name.endswith("gate.bias"):
            w = 0.1 * rng.standard_normal(shape)
        elif "markov_w1" in name:
            w = rng.standard_normal(shape)  # an embedding: unit rows
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        weights[name] = w.astype(np.float32)
    return weights


def write_tiny_dspark_checkpoint(path, seed: int = 0, **overrides) -> tuple[dict, dict[str, np.ndarray]]:
    """An official-format Flash-0731-style checkpoint (FP8 e4m3 + E8M0 scales, packed FP4
    experts, BF16/F32 elsewhere) -> (config dict, the exact float values every tensor encodes)."""
    cfg = tiny_dspark_config(**overrides)
    exact = official.write_official_checkpoint(Path(path), cfg, random_dspark_weights(cfg, seed))
    return cfg, exact


def teach_markov(net, sequence: list[int], wrong_every: int) -> None:
    """Point the Markov head of the drafter ``net`` at the bigrams of ``sequence`` (the first
    next token of each previous token, at most its rank of them), a wrong next token on every
    ``wrong_every``-th: a drafter with random weights then guesses right often and wrong
    sometimes, through its real forward and walk."""
    import mlx.core as mx

    V, r = net.markov_w1.weight.shape
    w1, w2 = np.zeros((V, r), np.float32), np.zeros((V, r), np.float32)
    pairs: dict[int, int] = {}
    for p, n in zip(sequence, sequence[1:]):
        pairs.setdefault(p, n)
    for i, (p, n) in enumerate(list(pairs.items())[:r]):
        w1[p, i] = 40.0
        w2[(n + 1) % V if (i + 1) % wrong_every == 0 else n, i] = 1.0
    net.markov_w1.update({"weight": mx.array(w1)})
    net.markov_w2.update({"weight": mx.array(w2)})


# ---- the transcription (float64, one sequence) -------------------------------------------------

def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 if w is None else w)


def _rope(x, pos, inv_freq, inverse=False):
    """Interleaved pairs on the last 2*len(inv_freq) dims; x [L, ..., d], pos [L]."""
    r = 2 * len(inv_freq)
    ang = pos[:, None] * inv_freq[None, :] * (-1 if inverse else 1)
    shape = (len(pos),) + (1,) * (x.ndim - 2) + (r // 2,)
    cos, sin = np.cos(ang).reshape(shape), np.sin(ang).reshape(shape)
    even, odd = x[..., -r::2], x[..., -r + 1::2]
    out = x.copy()
    out[..., -r::2], out[..., -r + 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _hc_split(x, W, p, a):
    """mHC before a sub-block: x [L, hc, D] -> (input [L, D], post [L, hc], comb [L, hc, hc])."""
    pre, post, comb = _hc_mixes(x, W, p, a)
    return (pre[..., None] * x).sum(1), post, comb


def _hc_mixes(x, W, p, a):
    """The Sinkhorn mixes of a sub-block: x [L, hc, D] -> (pre [L, hc], post [L, hc], comb [L, hc, hc])."""
    hc = a.hc_mult
    flat = x.reshape(len(x), -1)
    mixes = flat @ W[p + "_fn"].T / np.sqrt((flat * flat).mean(-1, keepdims=True) + a.rms_norm_eps)
    scale, base = W[p + "_scale"], W[p + "_base"]
    pre = _sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + a.hc_eps
    post = 2 * _sigmoid(mixes[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = (mixes[:, 2 * hc:] * scale[2] + base[2 * hc:]).reshape(-1, hc, hc)
    comb = np.exp(comb - comb.max(-1, keepdims=True))
    comb = comb / comb.sum(-1, keepdims=True) + a.hc_eps
    comb = comb / (comb.sum(-2, keepdims=True) + a.hc_eps)
    for _ in range(a.hc_sinkhorn_iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + a.hc_eps)
        comb = comb / (comb.sum(-2, keepdims=True) + a.hc_eps)
    return pre, post, comb


def _hc_merge(o, x, post, comb):
    return post[..., None] * o[:, None, :] + np.einsum("ljk,ljd->lkd", comb, x)


def _inv_freq(a):
    d = a.qk_rope_head_dim
    return 1.0 / (a.rope_theta ** (np.arange(0, d, 2) / d))  # window-only layers: no YaRN


def _kv(x, W, p, pos, a):
    return _rope(_rms(x @ W[p + "wkv.weight"].T, W[p + "kv_norm.weight"], a.rms_norm_eps), pos, _inv_freq(a))


def _block_attention(x, ctx, ctx_pos, W, p, pos, a):
    """Block rows x [B, D] at pos [B]; context rows ctx [n, D] (main_x) at ctx_pos [n]. Keys:
    the context within the window before the block, then the whole block (both directions)."""
    H, hd = a.num_attention_heads, a.head_dim
    q = _rms(x @ W[p + "wq_a.weight"].T, W[p + "q_norm.weight"], a.rms_norm_eps) @ W[p + "wq_b.weight"].T
    q = _rope(_rms(q.reshape(len(x), H, hd), None, a.rms_norm_eps), pos, _inv_freq(a))
    last = pos[0] - 1
    keep = (ctx_pos <= last) & (ctx_pos > last - a.sliding_window)
    keys = np.concatenate([_kv(ctx[keep], W, p, ctx_pos[keep], a), _kv(x, W, p, pos, a)])
    s = np.einsum("qhd,kd->qhk", q, keys) * hd**-0.5
    sink = W[p + "attn_sink"][None, :, None]
    m = np.maximum(s.max(-1, keepdims=True), sink)
    e = np.exp(s - m)
    o = np.einsum("qhk,kd->qhd", e / (e.sum(-1, keepdims=True) + np.exp(sink - m)), keys)
    o = _rope(o, pos, _inv_freq(a), inverse=True).reshape(len(x), a.o_groups, -1)
    wo_a = W[p + "wo_a.weight"].reshape(a.o_groups, a.o_lora_rank, -1)
    return np.einsum("lgi,gri->lgr", o, wo_a).reshape(len(x), -1) @ W[p + "wo_b.weight"].T


def _swiglu(x, w1, w2, w3, limit):
    g, u = np.minimum(x @ w1.T, limit), np.clip(x @ w3.T, -limit, limit)
    return (g * _sigmoid(g) * u) @ w2.T


def _moe(x, W, p, a):
    """Scored routing (sqrtsoftplus, bias for the choice only), one shared expert."""
    scores = np.sqrt(np.log1p(np.exp(x @ W[p + "gate.weight"].T)))
    top = np.argsort(-(scores + W[p + "gate.bias"]), axis=-1)[:, : a.num_experts_per_tok]
    w = np.take_along_axis(scores, top, -1)
    w = w / w.sum(-1, keepdims=True) * a.routed_scaling_factor
    y = _swiglu(x, *(W[f"{p}shared_experts.{n}.weight"] for n in ("w1", "w2", "w3")), a.swiglu_limit)
    for t in range(len(x)):
        for j, e in enumerate(top[t]):
            expert = [W[f"{p}experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3")]
            y[t] += w[t, j] * _swiglu(x[t:t + 1], *expert, a.swiglu_limit)[0]
    return y


def dspark_reference(W: dict, args: ModelArgs, hiddens: np.ndarray, ctx_pos: np.ndarray, anchor: int,
                     prev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The drafter's forward for one block.

    W: official names -> float64 values; hiddens [n, len(targets) * D] the target hiddens at
    ``ctx_pos`` (the block starts right after ``ctx_pos[-1]``); anchor: the token there;
    prev [block]: the token before each row's target (anchor, then the drafts).
    -> (base logits [block, V], logits with the Markov bias [block, V], confidence [block])."""
    a = args
    stages, B, eps = len(a.dspark_target_layer_ids), a.dspark_block_size, a.rms_norm_eps
    main_x = _rms(hiddens @ W["mtp.0.main_proj.weight"].T, W["mtp.0.main_norm.weight"], eps)
    pos = np.arange(ctx_pos[-1] + 1, ctx_pos[-1] + 1 + B, dtype=np.float64)
    ids = np.array([anchor] + [a.dspark_noise_token_id] * (B - 1))
    x = np.repeat(W["embed.weight"][ids][:, None, :], a.hc_mult, axis=1)  # [B, hc, D]
    for i in range(stages):
        p = f"mtp.{i}."
        h, post, comb = _hc_split(x, W, p + "hc_attn", a)
        o = _block_attention(_rms(h, W[p + "attn_norm.weight"], eps), main_x, ctx_pos, W, p + "attn.", pos, a)
        x = _hc_merge(o, x, post, comb)
        h, post, comb = _hc_split(x, W, p + "hc_ffn", a)
        x = _hc_merge(_moe(_rms(h, W[p + "ffn_norm.weight"], eps), W, p + "ffn.", a), x, post, comb)
    last = f"mtp.{stages - 1}."
    flat = x.reshape(B, -1)
    mixes = flat @ W[last + "hc_head_fn"].T / np.sqrt((flat * flat).mean(-1, keepdims=True) + eps)
    pre = _sigmoid(mixes * W[last + "hc_head_scale"] + W[last + "hc_head_base"]) + a.hc_eps
    hidden = _rms((pre[..., None] * x).sum(1), W[last + "norm.weight"], eps)
    base = hidden @ W["head.weight"].T
    markov = W[last + "markov_head.markov_w1.weight"][prev]
    biased = base + markov @ W[last + "markov_head.markov_w2.weight"].T
    confidence = _sigmoid(np.concatenate([hidden, markov], -1) @ W[last + "confidence_head.proj.weight"].T)[:, 0]
    return base, biased, confidence
