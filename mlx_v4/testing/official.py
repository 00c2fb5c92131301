"""Write (and read) checkpoints in the layout of the official DeepSeek V4 release, and the
official ``linear()`` path (``act_quant`` + FP8/FP4 GEMM, ``Expert``, the MoE expert loop) in
numpy, for reference models.

For tests, benchmarks and fixtures: numpy + ml_dtypes only (the ``test`` extra), no torch, no
MLX. The format (see ``inference/convert.py`` and the release's index):

* FP8 e4m3 weights with one E8M0 byte per 128x128 tile in ``<name minus .weight>.scale``;
* routed experts as I8 bytes of packed FP4 e2m1 (low nibble = even input), one E8M0 byte per
  32 inputs in ``.scale``;
* BF16 embeddings, head, norms, compressor projections, router weight; F32 hyper-connection
  tensors, sinks, ``ape``, router bias; I64 ``tid2eid``.

:func:`write_official_checkpoint` returns the exact values the files encode, which is what a
reference implementation must be fed.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ..config import ModelArgs

QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                       "weight_block_size": [128, 128], "activation_scheme": "dynamic"}

_FP8_NAMES = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]"
                        r"|e_proj|h_proj|main_proj)\.weight$")
_EXPERT = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
_F32 = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias|confidence_head\.proj\.weight)$")


def _pow2_ceil_exponent(x: np.ndarray) -> np.ndarray:
    """ceil(log2(x)) for positive float32 x, exactly (from the bit pattern)."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.int32) - 127
    return exponent + ((bits & 0x7FFFFF) != 0)


def quantize_fp8_block(w: np.ndarray, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] float -> (e4m3 bytes uint8 [out, in], E8M0 bytes uint8 [ceil(out/128), ceil(in/128)])."""
    out, inp = w.shape
    ro, ri = -(-out // block), -(-inp // block)
    padded = np.zeros((ro * block, ri * block), np.float32)
    padded[:out, :inp] = w
    tiles = padded.reshape(ro, block, ri, block)
    amax = np.maximum(np.abs(tiles).max(axis=(1, 3)), 1e-4).astype(np.float32)
    e = _pow2_ceil_exponent(amax * np.float32(1 / 448))
    scale = np.ldexp(np.float32(1), e).astype(np.float32)
    q = np.clip(tiles / scale[:, None, :, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
    codes = q.reshape(ro * block, ri * block)[:out, :inp].view(np.uint8)
    return np.ascontiguousarray(codes), (e + 127).astype(np.uint8)


def dequantize_fp8_block(codes: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    out, inp = codes.shape
    v = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    s = np.ldexp(np.float32(1), scale.astype(np.int32) - 127).astype(np.float32)
    s = np.repeat(np.repeat(s, block, axis=0), block, axis=1)[:out, :inp]
    return v * s


def quantize_fp4_e2m1(w: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """w [out, in] -> (packed int8 [out, in // 2], low nibble = even input; E8M0 uint8 [out, in // 32])."""
    out, inp = w.shape
    blocks = w.astype(np.float32).reshape(out, inp // block, block)
    amax = np.maximum(np.abs(blocks).max(axis=-1), 6 * 2.0**-126).astype(np.float32)
    e = _pow2_ceil_exponent(amax * np.float32(1 / 6))
    scale = np.ldexp(np.float32(1), e).astype(np.float32)
    q = np.clip(blocks / scale[..., None], -6, 6).astype(ml_dtypes.float4_e2m1fn)
    nibbles = q.view(np.uint8).reshape(out, inp) & 0x0F
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.astype(np.uint8).view(np.int8), (e + 127).astype(np.uint8)


def dequantize_fp4_e2m1(packed: np.ndarray, scale: np.ndarray, block: int = 32) -> np.ndarray:
    b = packed.view(np.uint8)
    nibbles = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[0], -1)
    v = nibbles.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    s = np.ldexp(np.float32(1), scale.astype(np.int32) - 127).astype(np.float32)
    return v * np.repeat(s, block, axis=1)


# ---- the official linear() (inference/model.py + kernel.py), for reference models ----------

#: Release names whose GEMM the official code runs through ``linear()`` with an FP8/FP4 weight,
#: so its input is rounded by ``act_quant``. Not: ``wo_a`` (FP8 in the release, but the official
#: forward multiplies it as a bf16 einsum), compressor ``wkv``/``wgate`` (float32), indexer
#: ``weights_proj`` (bf16), the router ``gate``, ``head`` and the hyper-connection matrices.
ACT_QUANT_NAMES = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_b)|attn\.indexer\.wq_b|ffn\.(shared_experts|experts\.\d+)\.w[123]"
                             r"|e_proj|h_proj|main_proj)\.weight$")


def act_quant(x: np.ndarray, block: int = 128) -> np.ndarray:
    """The values ``act_quant(x, 128, "ue8m0")`` hands to the GEMM (e4m3 codes times scales),
    float32: per block of ``block`` along the last axis, amax floored at 1e-4, scale
    2**ceil(log2(amax * (1/448))) from the float32 bit pattern, ml_dtypes e4m3 cast of x / scale
    clipped to +-448. The official kernel asserts whole blocks; so does this."""
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"act_quant: last axis {n} is not a multiple of {block}")
    xb = x.reshape(*x.shape[:-1], n // block, block)
    amax = np.maximum(np.abs(xb).max(axis=-1, keepdims=True), np.float32(1e-4))
    scale = np.ldexp(np.float32(1), _pow2_ceil_exponent(amax * np.float32(1 / 448))).astype(np.float32)
    q = np.clip(xb / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return (q.astype(np.float32) * scale).reshape(x.shape)


def linear(x: np.ndarray, weight: np.ndarray, quantized: bool) -> np.ndarray:
    """The official ``linear(x, weight)``: x @ weight.T, with x rounded by :func:`act_quant`
    first when the weight is FP8/FP4 (``fp8_gemm``/``fp4_gemm`` accumulate in float32).
    ``weight``: the exact float values the checkpoint encodes."""
    x = np.asarray(x, np.float32)
    return (act_quant(x) if quantized else x) @ np.asarray(weight, np.float32).T


def expert(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray, limit: float,
           weights: np.ndarray | None = None, quantized: bool = True) -> np.ndarray:
    """The official ``Expert.forward``: SwiGLU in float32, up clamped to +-limit and the gate
    above at limit (the current revision clamps the shared expert too), routing weight applied
    before w2 (so w2's input rounding sees it)."""
    gate, up = linear(x, w1, quantized), linear(x, w3, quantized)
    if limit > 0:
        up, gate = np.clip(up, -limit, limit), np.minimum(gate, limit)
    h = gate / (1 + np.exp(-gate)) * up
    if weights is not None:
        h = weights * h
    return linear(h, w2, quantized)


def routed_experts(x: np.ndarray, indices: np.ndarray, weights: np.ndarray, experts: list, limit: float,
                   quantized: bool = True) -> np.ndarray:
    """The official ``MoE.forward`` expert loop. x [T, D]; indices/weights [T, k];
    experts[e] = (w1, w2, w3) -> [T, D] float32."""
    y = np.zeros(x.shape, np.float32)
    for e in np.unique(indices):
        rows, slot = np.nonzero(indices == e)
        y[rows] += expert(x[rows], *experts[e], limit, weights[rows, slot, None], quantized)
    return y


def _bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)


# ---- random weights with the official names ------------------------------------------------

def official_shapes(cfg: dict, include_mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of the release (float view, before quantization) for a config dict."""
    a = ModelArgs.from_dict(cfg)  # fills the defaults; pure Python
    D, H, hd, hc, n_layers = a.hidden_size, a.num_attention_heads, a.head_dim, a.hc_mult, a.num_hidden_layers
    E, inter, k = a.n_routed_experts, a.moe_intermediate_size, a.num_experts_per_tok
    G, R, ql = a.o_groups, a.o_lora_rank, a.q_lora_rank
    nI, dI, V = a.index_n_heads, a.index_head_dim, a.vocab_size
    ratios = a.compress_ratios + ([a.mtp_compress_ratio] if a.mtp_compress_ratio is not None else [])
    n_mix = (2 + hc) * hc
    shapes: dict[str, tuple[int, ...]] = {
        "embed.weight": (V, D), "head.weight": (V, D), "norm.weight": (D,),
        "hc_head_fn": (hc, hc * D), "hc_head_base": (hc,), "hc_head_scale": (1,),
    }

    def block(prefix: str, ratio: int, hash_layer: bool):
        s = {}
        for sub in ("attn", "ffn"):
            s[f"{prefix}hc_{sub}_fn"], s[f"{prefix}hc_{sub}_base"] = (n_mix, hc * D), (n_mix,)
            s[f"{prefix}hc_{sub}_scale"] = (3,)
        s[f"{prefix}attn_norm.weight"] = s[f"{prefix}ffn_norm.weight"] = (D,)
        a = prefix + "attn."
        s |= {a + "wq_a.weight": (ql, D), a + "q_norm.weight": (ql,), a + "wq_b.weight": (H * hd, ql),
              a + "wkv.weight": (hd, D), a + "kv_norm.weight": (hd,), a + "wo_a.weight": (G * R, H * hd // G),
              a + "wo_b.weight": (D, G * R), a + "attn_sink": (H,)}
        if ratio:
            c = 2 if ratio == 4 else 1
            s |= {a + "compressor.wkv.weight": (c * hd, D), a + "compressor.wgate.weight": (c * hd, D),
                  a + "compressor.ape": (ratio, c * hd), a + "compressor.norm.weight": (hd,)}
        if ratio == 4:
            s |= {a + "indexer.wq_b.weight": (nI * dI, ql), a + "indexer.weights_proj.weight": (nI, D),
                  a + "indexer.compressor.wkv.weight": (2 * dI, D), a + "indexer.compressor.wgate.weight": (2 * dI, D),
                  a + "indexer.compressor.ape": (4, 2 * dI), a + "indexer.compressor.norm.weight": (dI,)}
        f = prefix + "ffn."
        s[f + "gate.weight"] = (E, D)
        s[f + ("gate.tid2eid" if hash_layer else "gate.bias")] = (V, k) if hash_layer else (E,)
        for e in range(E):
            s |= {f"{f}experts.{e}.w1.weight": (inter, D), f"{f}experts.{e}.w3.weight": (inter, D),
                  f"{f}experts.{e}.w2.weight": (D, inter)}
        s |= {f + "shared_experts.w1.weight": (inter, D), f + "shared_experts.w3.weight": (inter, D),
              f + "shared_experts.w2.weight": (D, inter)}
        return s

    for i in range(n_layers):
        shapes |= block(f"layers.{i}.", ratios[i], a.is_hash_layer(i))
    if include_mtp and a.num_nextn_predict_layers and len(ratios) > n_layers:
        p = "mtp.0."
        shapes |= block(p, ratios[n_layers], False)
        shapes |= {p + "e_proj.weight": (D, D), p + "h_proj.weight": (D, D), p + "enorm.weight": (D,),
                   p + "hnorm.weight": (D,), p + "norm.weight": (D,), p + "hc_head_fn": (hc, hc * D),
                   p + "hc_head_base": (hc,), p + "hc_head_scale": (1,)}
    return shapes


def random_official_weights(cfg: dict, seed: int = 0, include_mtp: bool = True) -> dict[str, np.ndarray]:
    """Deterministic random float32 weights (int64 tid2eid) with healthy magnitudes."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in official_shapes(cfg, include_mtp).items():
        if name.endswith("tid2eid"):
            n_experts = ModelArgs.from_dict(cfg).n_routed_experts
            out[name] = np.argsort(rng.random((shape[0], n_experts)), axis=1)[:, : shape[1]].astype(np.int64)
        elif "norm.weight" in name:
            out[name] = 1 + 0.1 * rng.standard_normal(shape)
        elif re.search(r"hc_(attn|ffn|head)_fn$", name):
            out[name] = 0.02 * rng.standard_normal(shape)
        elif re.search(r"hc_(attn|ffn|head)_scale$", name):
            out[name] = 0.5 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("_base", "ape", "attn_sink")):
            out[name] = 0.5 * rng.standard_normal(shape)
        elif name.endswith("gate.bias"):
            out[name] = 0.1 * rng.standard_normal(shape)
        else:
            out[name] = rng.standard_normal(shape) / np.sqrt(shape[-1])
        if out[name].dtype != np.int64:
            out[name] = out[name].astype(np.float32)
    return out


# ---- safetensors ------------------------------------------------------------------------------

_ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64",
             np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32"}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """tensors: name -> (safetensors dtype string, array). Temp file, fsync, rename."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, arr) in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for b in blobs:
            f.write(b)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_safetensors(path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (dtype string, shape, raw bytes as uint8 array)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    body = np.frombuffer(data, np.uint8, offset=8 + n)
    return {k: (v["dtype"], tuple(v["shape"]), body[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}


def write_official_checkpoint(path, cfg: dict, weights: dict[str, np.ndarray], *, fp8: bool = True,
                              expert_fp4: bool = True, max_shard_bytes: int = 5 << 30,
                              bf16_names=None) -> dict[str, np.ndarray]:
    r"""Write config.json, shards and model.safetensors.index.json in the release's layout.
    Returns the exact float32 values every stored weight encodes (official names).

    ``bf16_names``: a regex (searched) or a collection of exact names stored BF16 even where
    the release quantizes them (e.g. ``r"attn\.wo_a"``, as convert.py dequantizes it)."""
    if bf16_names is None:
        force_bf16 = lambda name: False  # noqa: E731
    elif isinstance(bf16_names, (str, re.Pattern)):
        force_bf16 = re.compile(bf16_names).search
    else:
        force_bf16 = set(bf16_names).__contains__
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stored: dict[str, tuple[str, np.ndarray]] = {}
    exact: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        stem = name[: -len(".weight")] if name.endswith(".weight") else name
        if w.dtype == np.int64:
            stored[name], exact[name] = ("I64", w), w
        elif force_bf16(name):
            b = _bf16(w)
            stored[name], exact[name] = ("BF16", b), b.astype(np.float32)
        elif expert_fp4 and _EXPERT.search(name):
            packed, scale = quantize_fp4_e2m1(w)
            stored[name], stored[stem + ".scale"] = ("I8", packed), ("F8_E8M0", scale)
            exact[name] = dequantize_fp4_e2m1(packed, scale)
        elif fp8 and (_FP8_NAMES.search(name) or _EXPERT.search(name)):
            codes, scale = quantize_fp8_block(w)
            stored[name], stored[stem + ".scale"] = ("F8_E4M3", codes), ("F8_E8M0", scale)
            exact[name] = dequantize_fp8_block(codes, scale)
        elif _F32.search(name):
            stored[name], exact[name] = ("F32", w.astype(np.float32)), w.astype(np.float32)
        else:
            b = _bf16(w)
            stored[name], exact[name] = ("BF16", b), b.astype(np.float32)

    # Shards in name order, each at most max_shard_bytes (a tensor never splits).
    shards, current, size = [], {}, 0
    for name in sorted(stored):
        nbytes = stored[name][1].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = stored[name], size + nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(path / fname, shard)
        for name, (_, arr) in shard.items():
            weight_map[name] = fname
            total += arr.nbytes
    config = dict(cfg)
    if fp8:
        config["quantization_config"] = QUANTIZATION_CONFIG
    if expert_fp4:
        config["expert_dtype"] = "fp4"
    for fname, obj in (("model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}),
                       ("config.json", config)):
        tmp = path / (fname + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path / fname)
    return exact
