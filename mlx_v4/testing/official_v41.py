"""Write checkpoints in the layout of the official DeepSeek V4.1 release (tests and fixtures).

numpy + ml_dtypes only. The format (the release's index and ``inference/model.py``):

* FP8 e4m3 weights with one E8M0 byte per **32x32** tile in ``<name minus .weight>.scale``
  (attention projections, indexer ``wq_b``, shared experts, ``engram.wkv``);
* routed experts as I8 bytes of packed FP4 e2m1 (low nibble = even input), E8M0 per 32 inputs;
* Engram tables ``layers.N.engram.embed.weight`` as F8_E4M3 rows with one E8M0 byte per 32
  columns in ``embed.scale``, each table in a shard of its own (as the release ships them);
* BF16 embeddings, head, norms, compressor and index-key projections, router weight, Engram
  ``q_weight``/``k_weight``; F32 hyper-connection tensors, sinks, router ``bias``/``bias_vl``.

:func:`write_official_v41_checkpoint` returns the exact float32 values the files encode.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np

from ..v41.engram_hash import EngramLayout
from .official import (
    _bf16,
    _pow2_ceil_exponent,
    dequantize_fp4_e2m1,
    dequantize_fp8_block,
    quantize_fp4_e2m1,
    quantize_fp8_block,
    write_safetensors,
)

FP8_BLOCK = 32
QUANTIZATION_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
                       "scale_fmt": "ue8m0", "expert_dtype": "fp4"}

_FP8_NAMES = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]"
                        r"|engram\.wkv|main_proj)\.weight$")  # main_proj: the DSpark drafter's
_EXPERT = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
_TABLE = re.compile(r"engram\.embed\.weight$")
_F32 = re.compile(r"(hc_(attn|ffn)_(fn|base|scale)|attn_sink|gate\.bias(_vl)?|confidence_head\.proj\.weight)$")


def engram_layout(text: dict) -> EngramLayout | None:
    if not text.get("engram_layer_ids"):
        return None
    return EngramLayout.build(text["engram_layer_ids"], text["engram_max_ngram_size"], text["engram_n_heads"],
                              text["engram_head_dim"], text["engram_vocab_size"])


def official_v41_shapes(text: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the text model (float view, before quantization) for a text_config."""
    D, H, hd = text["hidden_size"], text["num_attention_heads"], text["head_dim"]
    hc, n_layers, V = text["hc_mult"], text["num_hidden_layers"], text["vocab_size"]
    E, inter = text["n_routed_experts"], text["moe_intermediate_size"]
    G, R, ql = text["o_groups"], text["o_lora_rank"], text["q_lora_rank"]
    nI, dI = text["index_n_heads"], text["index_head_dim"]
    ratios = text["compress_ratios"]
    n_mix = (2 + hc) * hc
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (V, D), "head.weight": (V, D), "norm.weight": (D,)}
    layout = engram_layout(text)
    for i in range(n_layers):
        p = f"layers.{i}."
        for sub in ("attn", "ffn"):
            shapes |= {f"{p}hc_{sub}_fn": (n_mix, hc * D), f"{p}hc_{sub}_base": (n_mix,), f"{p}hc_{sub}_scale": (3,)}
        a = p + "attn."
        shapes |= {p + "attn_norm.weight": (D,), p + "ffn_norm.weight": (D,),
                   a + "wq_a.weight": (ql, D), a + "q_norm.weight": (ql,), a + "wq_b.weight": (H * hd, ql),
                   a + "wkv.weight": (hd, D), a + "kv_norm.weight": (hd,), a + "wo_a.weight": (G * R, H * hd // G),
                   a + "wo_b.weight": (D, G * R), a + "attn_sink": (H,)}
        if i in text["kv_source_layer_ids"]:
            shapes |= {a + "compressor.wkv.weight": (hd, D), a + "compressor.norm.weight": (hd,)}
            if ratios[i] > 1:
                shapes[a + "compressor.wgate.weight"] = (hd, D)
            if i in text["index_source_layer_ids"]:
                shapes |= {a + "indexer.wk.weight": (dI, hd), a + "indexer.k_norm.weight": (dI,)}
        if i in text["index_source_layer_ids"]:
            shapes |= {a + "indexer.wq_b.weight": (nI * dI, ql), a + "indexer.weights_proj.weight": (nI, D)}
        f = p + "ffn."
        shapes |= {f + "gate.weight": (E, D), f + "gate.bias": (E,), f + "gate.bias_vl": (E,)}
        for e in range(E):
            shapes |= {f"{f}experts.{e}.w1.weight": (inter, D), f"{f}experts.{e}.w3.weight": (inter, D),
                       f"{f}experts.{e}.w2.weight": (D, inter)}
        shapes |= {f + "shared_experts.w1.weight": (inter, D), f + "shared_experts.w3.weight": (inter, D),
                   f + "shared_experts.w2.weight": (D, inter)}
        if layout is not None and i in layout.layer_ids:
            rows = text["engram_num_embeddings"][layout.layer_ids.index(i)]
            g = p + "engram."
            shapes |= {g + "embed.weight": (rows, layout.head_dim), g + "wkv.weight": (D * (hc + 1), layout.n_cols * layout.head_dim),
                       g + "q_weight": (hc, D), g + "k_weight": (hc, D)}
    return shapes


def random_official_v41_weights(text: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic random float32 weights with healthy magnitudes."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in official_v41_shapes(text).items():
        if "norm.weight" in name or name.endswith(("q_weight", "k_weight")):
            v = 1 + 0.1 * rng.standard_normal(shape)
        elif re.search(r"hc_(attn|ffn)_fn$", name):
            v = 0.02 * rng.standard_normal(shape)
        elif re.search(r"hc_(attn|ffn)_scale$", name):
            v = 0.5 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("_base", "attn_sink")):
            v = 0.5 * rng.standard_normal(shape)
        elif name.endswith(("gate.bias", "gate.bias_vl")):
            v = 0.1 * rng.standard_normal(shape)
        elif _TABLE.search(name):
            v = rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[name] = v.astype(np.float32)
    return out


def quantize_fp8_rows(w: np.ndarray, block: int = FP8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """An Engram table [rows, dim] -> (e4m3 bytes [rows, dim], E8M0 bytes [rows, dim // block])."""
    rows, dim = w.shape
    b = w.astype(np.float32).reshape(rows, dim // block, block)
    amax = np.maximum(np.abs(b).max(axis=-1), 1e-4).astype(np.float32)
    e = _pow2_ceil_exponent(amax * np.float32(1 / 448))
    scale = np.ldexp(np.float32(1), e).astype(np.float32)
    q = np.clip(b / scale[..., None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return np.ascontiguousarray(q.view(np.uint8).reshape(rows, dim)), (e + 127).astype(np.uint8)


def dequantize_fp8_rows(codes: np.ndarray, scale: np.ndarray, block: int = FP8_BLOCK) -> np.ndarray:
    v = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = np.ldexp(np.float32(1), scale.astype(np.int32) - 127).astype(np.float32)
    return v * np.repeat(s, block, axis=-1)


def write_official_v41_checkpoint(path, config: dict, weights: dict[str, np.ndarray], *,
                                  max_shard_bytes: int = 1 << 20) -> dict[str, np.ndarray]:
    """Write config.json, shards and the index in the release's layout. Returns the exact
    float32 values every stored tensor encodes; for an Engram table also its raw bytes under
    ``<name>:codes`` and ``<name>:scale``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stored: dict[str, tuple[str, np.ndarray]] = {}
    exact: dict[str, np.ndarray] = {}
    tables: list[str] = []
    for name, w in weights.items():
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        if _TABLE.search(name):
            codes, scale = quantize_fp8_rows(w)
            stored[name], stored[stem + ".scale"] = ("F8_E4M3", codes), ("F8_E8M0", scale)
            exact[name], exact[name + ":codes"], exact[name + ":scale"] = dequantize_fp8_rows(codes, scale), codes, scale
            tables.append(name)
        elif _EXPERT.search(name):
            packed, scale = quantize_fp4_e2m1(w)
            stored[name], stored[stem + ".scale"] = ("I8", packed), ("F8_E8M0", scale)
            exact[name] = dequantize_fp4_e2m1(packed, scale)
        elif _FP8_NAMES.search(name):
            codes, scale = quantize_fp8_block(w, FP8_BLOCK)
            stored[name], stored[stem + ".scale"] = ("F8_E4M3", codes), ("F8_E8M0", scale)
            exact[name] = dequantize_fp8_block(codes, scale, FP8_BLOCK)
        elif _F32.search(name):
            stored[name], exact[name] = ("F32", w.astype(np.float32)), w.astype(np.float32)
        else:
            b = _bf16(w)
            stored[name], exact[name] = ("BF16", b), b.astype(np.float32)

    # Each Engram table (with its scales) alone in a shard; the rest in name order.
    groups: list[dict[str, tuple[str, np.ndarray]]] = []
    for t in tables:
        stem = t[: -len(".weight")]
        groups.append({t: stored.pop(t), stem + ".scale": stored.pop(stem + ".scale")})
    current, size = {}, 0
    for name in sorted(stored):
        nbytes = stored[name][1].nbytes
        if current and size + nbytes > max_shard_bytes:
            groups.append(current)
            current, size = {}, 0
        current[name], size = stored[name], size + nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(path / fname, shard)
        for name, (_, arr) in shard.items():
            weight_map[name] = fname
            total += arr.nbytes
    for fname, obj in (("model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}),
                       ("config.json", config)):
        tmp = path / (fname + ".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path / fname)
    return exact
