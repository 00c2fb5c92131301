"""Tiny DeepSeek V4.1 checkpoints with a DSpark drafter (``mtp.{i}.*`` in the release layout) and
an independent numpy transcription of the V4.1 drafter's forward, for tests.

The official V4.1 ``inference/model.py`` reads the ``dspark_*`` fields but builds no drafter
(its ``mtp`` list stays empty), so the transcription follows vLLM's V4.1 DSpark
(``vllm/models/deepseek_v4_1/nvidia/dspark.py``; see :mod:`mlx_v4.v41.dspark`), written from the
math in float64 numpy, no MLX. Activation quantisation is not simulated (compare with
``fake_quant`` off).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..v41.config import V41Args
from .dspark import _hc_merge, _hc_mixes, _inv_freq, _rms, _rope, _sigmoid, _swiglu
from .official_v41 import official_v41_shapes, random_official_v41_weights, write_official_v41_checkpoint

#: DSpark fields for the tiny V4.1 (fixture: 8 layers, vocab 512); two stages with their own
#: MoE size (the release: targets 37-39, 128 experts top-3).
TINY_V41_DSPARK = dict(dspark_block_size=4, dspark_noise_token_id=500, dspark_target_layer_ids=[3, 6],
                       dspark_markov_rank=16, dspark_n_routed_experts=4, dspark_n_activated_experts=3)


def v41_dspark_config(config: dict, stages: int = 2, **fields) -> dict:
    """``config`` (a V4.1 config.json dict) with a ``stages``-layer drafter: the dspark fields,
    ``num_nextn_predict_layers`` and one trailing 0 per stage in ``compress_ratios``."""
    cfg = copy.deepcopy(config)
    text = cfg.get("text_config", cfg)
    n = text["num_hidden_layers"]
    text.update(TINY_V41_DSPARK | fields)
    text["compress_ratios"] = list(text["compress_ratios"][:n]) + [0] * stages
    text["num_nextn_predict_layers"] = stages
    return cfg


def v41_dspark_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    """The drafter's tensors in the release layout (float view) for a text_config with dspark fields."""
    n, stages = text["num_hidden_layers"], text["num_nextn_predict_layers"]
    ext = dict(text, num_hidden_layers=n + stages, compress_ratios=list(text["compress_ratios"][:n]) + [0] * stages,
               n_routed_experts=text.get("dspark_n_routed_experts") or text["n_routed_experts"])
    shapes = {}
    for i in range(stages):
        prefix = f"layers.{n + i}."
        shapes |= {f"mtp.{i}." + k[len(prefix):]: s for k, s in official_v41_shapes(ext).items() if k.startswith(prefix)}
    D, V, r = text["hidden_size"], text["vocab_size"], text["dspark_markov_rank"]
    last = f"mtp.{stages - 1}."
    shapes |= {"mtp.0.main_proj.weight": (D, len(text["dspark_target_layer_ids"]) * D), "mtp.0.main_norm.weight": (D,),
               last + "norm.weight": (D,), last + "markov_head.embed.weight": (V, r),
               last + "markov_head.head.weight": (V, r), last + "confidence_head.proj.weight": (1, D + r)}
    return shapes


def write_tiny_v41_dspark_checkpoint(path, config: dict, seed: int = 0, confidence: bool = True,
                                     **fields) -> tuple[dict, dict[str, np.ndarray]]:
    """``config`` plus a drafter (without its confidence head unless ``confidence``), written in
    the release layout with random weights -> (config dict, the exact float32 values every
    stored tensor encodes)."""
    cfg = v41_dspark_config(config, **fields)
    text = cfg.get("text_config", cfg)
    weights = random_official_v41_weights(text, seed)
    rng = np.random.default_rng(seed + 7919)
    for name, shape in v41_dspark_shapes(text).items():
        if not confidence and "confidence_head" in name:
            continue
        if "norm.weight" in name:
            w = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("hc_attn_fn", "hc_ffn_fn")):
            w = 0.02 * rng.standard_normal(shape)
        elif name.endswith(("hc_attn_scale", "hc_ffn_scale")):
            w = 0.5 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("_base", "attn_sink")):
            w = 0.5 * rng.standard_normal(shape)
        elif name.endswith(("gate.bias", "gate.bias_vl")):
            w = 0.1 * rng.standard_normal(shape)
        elif name.endswith("markov_head.embed.weight"):
            w = rng.standard_normal(shape)  # an embedding: unit rows
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        weights[name] = w.astype(np.float32)
    return cfg, write_official_v41_checkpoint(Path(path), cfg, weights, max_shard_bytes=400_000)


# ---- the transcription (float64, one sequence) -------------------------------------------------

def _attention(x, ctx, ctx_pos, W, p, pos, a):
    """V4.1 window attention of the block rows x [B, D] at pos [B] (no query norm) over the
    context rows ctx [n, D] (main_x, within the window before the block) and the whole block."""
    H, hd = a.num_attention_heads, a.head_dim
    q = _rms(x @ W[p + "wq_a.weight"].T, W[p + "q_norm.weight"], a.rms_norm_eps) @ W[p + "wq_b.weight"].T
    q = _rope(q.reshape(len(x), H, hd), pos, _inv_freq(a))

    def kv(rows, at):
        return _rope(_rms(rows @ W[p + "wkv.weight"].T, W[p + "kv_norm.weight"], a.rms_norm_eps), at, _inv_freq(a))

    last = pos[0] - 1
    keep = (ctx_pos <= last) & (ctx_pos > last - a.sliding_window)
    keys = np.concatenate([kv(ctx[keep], ctx_pos[keep]), kv(x, pos)])
    s = np.einsum("qhd,kd->qhk", q, keys) * hd**-0.5
    sink = W[p + "attn_sink"][None, :, None]
    m = np.maximum(s.max(-1, keepdims=True), sink)
    e = np.exp(s - m)
    o = np.einsum("qhk,kd->qhd", e / (e.sum(-1, keepdims=True) + np.exp(sink - m)), keys)
    o = _rope(o, pos, _inv_freq(a), inverse=True).reshape(len(x), a.o_groups, -1)
    wo_a = W[p + "wo_a.weight"].reshape(a.o_groups, a.o_lora_rank, -1)
    return np.einsum("lgi,gri->lgr", o, wo_a).reshape(len(x), -1) @ W[p + "wo_b.weight"].T


def _moe(x, W, p, a):
    """The drafter's MoE: its own expert count and top-k, sqrtsoftplus over logits / gate_temp."""
    k = a.dspark_n_activated_experts or a.num_experts_per_tok
    scores = np.sqrt(np.log1p(np.exp((x @ W[p + "gate.weight"].T) / a.gate_temp)))
    top = np.argsort(-(scores + W[p + "gate.bias"]), axis=-1)[:, :k]
    w = np.take_along_axis(scores, top, -1)
    w = w / (w.sum(-1, keepdims=True) + 1e-20) * a.routed_scaling_factor
    y = _swiglu(x, *(W[f"{p}shared_experts.{n}.weight"] for n in ("w1", "w2", "w3")), a.swiglu_limit)
    for t in range(len(x)):
        for j, e in enumerate(top[t]):
            y[t] += w[t, j] * _swiglu(x[t:t + 1], *(W[f"{p}experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3")),
                                      a.swiglu_limit)[0]
    return y


def v41_dspark_reference(W: dict, args: V41Args, hiddens: np.ndarray, ctx_pos: np.ndarray, anchor: int,
                         prev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of the V4.1 drafter. W: official names -> float64; hiddens [n, targets * D] at
    ``ctx_pos`` (the block starts after ``ctx_pos[-1]``); prev [block]: the token before each
    row's target. -> (base logits [block, V], with the Markov bias [block, V], confidence [block])."""
    a, eps = args, args.rms_norm_eps
    stages, B = a.dspark_stages, a.dspark_block_size
    main_x = _rms(hiddens @ W["mtp.0.main_proj.weight"].T, W["mtp.0.main_norm.weight"], eps)
    pos = np.arange(ctx_pos[-1] + 1, ctx_pos[-1] + 1 + B, dtype=np.float64)
    ids = np.array([anchor] + [a.dspark_noise_token_id] * (B - 1))
    x = np.repeat(W["embed.weight"][ids][:, None, :], a.hc_mult, axis=1)  # [B, hc, D]
    pre = np.zeros((B, a.hc_mult))
    pre[:, 0] = 1  # entering: copy 0
    for i in range(stages):
        p = f"mtp.{i}."
        attn_pre, post, comb = _hc_mixes(x, W, p + "hc_attn", a)  # staggered: collapse with the previous pre
        o = _attention(_rms((pre[..., None] * x).sum(1), W[p + "attn_norm.weight"], eps), main_x, ctx_pos, W,
                       p + "attn.", pos, a)
        x = _hc_merge(o, x, post, comb)
        pre, post, comb = _hc_mixes(x, W, p + "hc_ffn", a)
        h = _rms((attn_pre[..., None] * x).sum(1), W[p + "ffn_norm.weight"], eps)
        x = _hc_merge(_moe(h, W, p + "ffn.", a), x, post, comb)
    last = f"mtp.{stages - 1}."
    hidden = _rms((pre[..., None] * x).sum(1), W[last + "norm.weight"], eps)  # no hc_head
    base = hidden @ W["head.weight"].T
    markov = W[last + "markov_head.embed.weight"][prev]
    biased = base + markov @ W[last + "markov_head.head.weight"].T
    confidence = _sigmoid(np.concatenate([hidden, markov], -1) @ W[last + "confidence_head.proj.weight"].T)[:, 0]
    return base, biased, confidence
