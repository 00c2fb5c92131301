"""Checkpoint reading: the only module that knows checkpoint names and formats.

Three layouts load into one parameter tree (our names, see ``Model``):

* the official release: inference names (``layers.N.attn.wq_a.weight``), FP8 e4m3 weights with
  one E8M0 scale per 128x128 tile in ``<w>.scale``, routed experts as packed FP4 (two e2m1 per
  int8 byte, low nibble first) with one E8M0 scale per 32 inputs, one tensor per expert;
* transformers' ``DeepseekV4ForCausalLM`` names (``model.layers.N.self_attn.q_a_proj.weight``,
  experts fused as ``mlp.experts.gate_up_proj`` [E, 2I, D] / ``down_proj`` [E, D, I]);
* our own MLX output (written by ``quantize/``): our names, ``.scales``/``.biases`` and the
  per-module quantization in config.json ``"quantization"`` (mlx-lm convention).

Renames live in one table, :data:`RENAMES`; the structural steps are expert stacking (official)
and splitting ``gate_up_proj`` (transformers). FP8 becomes MLX ``mxfp8`` exactly (each tile
scale repeated over its 128 rows and 4 groups of 32 columns) and FP4 becomes ``mxfp4`` without
dequantising; either can be dequantised instead. Everything stays lazy (``mx.load`` reads a
tensor when it is evaluated), so peak memory stays near the size that is kept.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .checkpoint_files import (  # noqa: F401 (the file-level names stay importable from here)
    HUB_PATTERNS,
    INDEX_FILE,
    SINGLE_FILE,
    DownloadError,
    ModelNotFoundError,
    TensorInfo,
    WeightsError,
    read_header,
    read_index,
    read_own_quantization,
    resolve_model_path,
    scan_checkpoint,
    scan_with_listing,
)
from .config import ModelArgs
from .draft.dspark_names import OUR_HEAD_NAMES as _DSPARK_HEADS
from .draft.dspark_names import dspark_rename

log = logging.getLogger(__name__)


# ---- renames: regex (matched at the start of a name, up to a '.' or the end) -> template ----
_L = r"model\.layers\.(\d+)\."
RENAMES: list[tuple[str, str]] = [
    # official -> ours: only the hyper-connection tensors differ (experts are stacked apart)
    (r"hc_head_(fn|base|scale)", r"hc_head.\1"),
    (r"layers\.(\d+)\.hc_(attn|ffn)_(fn|base|scale)", r"layers.\1.hc_\2.\3"),
    (r"mtp\.(\d+)\.hc_(attn|ffn|head)_(fn|base|scale)", r"mtp.\1.hc_\2.\3"),
    # transformers as saved on disk by save_pretrained (v5 maps its modules back to official
    # names under "model.", except that attention's kv_norm comes out as "attn.norm")
    (_L + r"hc_(attn|ffn)_(fn|base|scale)", r"layers.\1.hc_\2.\3"),
    (_L + r"attn\.norm", r"layers.\1.attn.kv_norm"),
    (_L + r"(attn|ffn|attn_norm|ffn_norm)", r"layers.\1.\2"),
    # transformers module names -> ours
    (r"model\.embed_tokens", "embed"),
    (r"model\.norm", "norm"),
    (r"lm_head", "head"),
    (r"model\.hc_head\.hc_(fn|base|scale)", r"hc_head.\1"),
    (_L + r"(attn|ffn)_hc\.(fn|base|scale)", r"layers.\1.hc_\2.\3"),
    (_L + r"input_layernorm", r"layers.\1.attn_norm"),
    (_L + r"post_attention_layernorm", r"layers.\1.ffn_norm"),
    (_L + r"self_attn\.q_a_proj", r"layers.\1.attn.wq_a"),
    (_L + r"self_attn\.q_a_norm", r"layers.\1.attn.q_norm"),
    (_L + r"self_attn\.q_b_proj", r"layers.\1.attn.wq_b"),
    (_L + r"self_attn\.kv_proj", r"layers.\1.attn.wkv"),
    (_L + r"self_attn\.kv_norm", r"layers.\1.attn.kv_norm"),
    (_L + r"self_attn\.o_a_proj", r"layers.\1.attn.wo_a"),
    (_L + r"self_attn\.o_b_proj", r"layers.\1.attn.wo_b"),
    (_L + r"self_attn\.sinks", r"layers.\1.attn.attn_sink"),
    (_L + r"self_attn\.compressor\.indexer\.kv_proj", r"layers.\1.attn.indexer.compressor.wkv"),
    (_L + r"self_attn\.compressor\.indexer\.gate_proj", r"layers.\1.attn.indexer.compressor.wgate"),
    (_L + r"self_attn\.compressor\.indexer\.position_bias", r"layers.\1.attn.indexer.compressor.ape"),
    (_L + r"self_attn\.compressor\.indexer\.kv_norm", r"layers.\1.attn.indexer.compressor.norm"),
    (_L + r"self_attn\.compressor\.indexer\.q_b_proj", r"layers.\1.attn.indexer.wq_b"),
    (_L + r"self_attn\.compressor\.indexer\.scorer\.weights_proj", r"layers.\1.attn.indexer.weights_proj"),
    (_L + r"self_attn\.compressor\.kv_proj", r"layers.\1.attn.compressor.wkv"),
    (_L + r"self_attn\.compressor\.gate_proj", r"layers.\1.attn.compressor.wgate"),
    (_L + r"self_attn\.compressor\.position_bias", r"layers.\1.attn.compressor.ape"),
    (_L + r"self_attn\.compressor\.kv_norm", r"layers.\1.attn.compressor.norm"),
    (_L + r"mlp\.gate\.e_score_correction_bias", r"layers.\1.ffn.gate.bias"),
    (_L + r"mlp\.gate", r"layers.\1.ffn.gate"),
    (_L + r"mlp\.shared_experts\.gate_proj", r"layers.\1.ffn.shared_experts.w1"),
    (_L + r"mlp\.shared_experts\.up_proj", r"layers.\1.ffn.shared_experts.w3"),
    (_L + r"mlp\.shared_experts\.down_proj", r"layers.\1.ffn.shared_experts.w2"),
    (_L + r"mlp\.experts\.down_proj(?:\.weight)?", r"layers.\1.ffn.experts.w2.weight"),  # a bare parameter
]
_RENAMES = [(re.compile(p + r"(?=\.|$)"), t) for p, t in RENAMES]

# The structural steps: per-expert tensors to stack, the fused gate/up to split.
_OFFICIAL_EXPERT = re.compile(r"((?:dspark\.layers|layers|mtp)\.\d+)\.ffn\.experts\.(\d+)\.(w[123])\.weight")
_HF_GATE_UP = re.compile(_L + r"mlp\.experts\.gate_up_proj(?:\.weight)?")
#: Drafter tensors we do not load: V3-style MTP layers (layers.N, N >= num_hidden_layers) and
#: any MTP block past the first (V4 has one); all of them when the config asks for none.
_MTP = re.compile(r"(model\.)?mtp\.(\d+)\.|(model\.)?layers\.(\d+)\.")
_LAYER = re.compile(r"layers\.(\d+)\.")

_Q = r"\.(weight|scales|biases)"
#: Every name of our parameter tree (after renames); anything else is an unknown tensor.
_BLOCK = (
    r"hc_(attn|ffn)\.(fn|base|scale)|(attn|ffn)_norm\.weight|attn\.(q_norm|kv_norm)\.weight|attn\.attn_sink"
    rf"|attn\.(wq_a|wq_b|wkv|wo_a|wo_b){_Q}|attn\.indexer\.(wq_b|weights_proj){_Q}"
    rf"|attn\.(indexer\.)?compressor\.((wkv|wgate){_Q}|ape|norm\.weight)"
    rf"|ffn\.gate\.(weight|bias|tid2eid)|ffn\.(experts|shared_experts)\.w[123]{_Q}")
OUR_NAMES = re.compile(
    rf"(embed|head){_Q}|norm\.weight|hc_head\.(fn|base|scale)|layers\.\d+\.({_BLOCK})"
    rf"|mtp\.0\.({_BLOCK}|(e_proj|h_proj){_Q}|(enorm|hnorm|norm)\.weight|hc_head\.(fn|base|scale))"
    rf"|dspark\.layers\.\d+\.({_BLOCK})|{_DSPARK_HEADS}")
#: Kept float32 whatever the checkpoint or dtype (the official code runs them in fp32).
_KEEP_F32 = re.compile(r"(^|\.)hc_(head|attn|ffn)\.|^dspark\.confidence\.|\.attn_sink$|\.ape$|\.gate\.bias$|compressor\.(wkv|wgate)\.weight$")
#: Always dense: wo_a is applied per group (einsum); compressors run in fp32.
_DENSE_ONLY = re.compile(r"\.attn\.wo_a$|compressor\.(wkv|wgate)$")

_FLOATS = {"BF16", "F16", "F32"}
_SUPPORTED = "BF16, F16, F32, F8_E4M3 (+ F8_E8M0/F32 scale), I8 packed FP4, I64/I32/I16/U16/U8 tid2eid, U32 MLX-quantized"
_FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]



# ---- planning: source tensors -> our names ----------------------------------------------------
@dataclass
class _Part:
    w: TensorInfo
    scale: TensorInfo | None = None  # FP8/FP4 scale (official .scale, transformers .weight_scale_inv)
    scales: TensorInfo | None = None  # our MLX format
    biases: TensorInfo | None = None


@dataclass
class _Entry:
    parts: list[_Part]  # one tensor, or the experts to stack in order
    half: int | None = None  # gate_up_proj split: 0 -> first half (w1), 1 -> second (w3)


def rename(name: str) -> str:
    for rx, template in _RENAMES:
        m = rx.match(name)
        if m:
            return m.expand(template) + name[m.end():]
    return name


def _plan(infos: dict[str, TensorInfo], args: ModelArgs) -> tuple[dict[str, _Entry], list[str]]:
    n_layers, n_mtp = args.num_hidden_layers, args.num_nextn_predict_layers
    # V4-Flash-0731: mtp.{0..stages-1} are the DSpark drafter's stages (draft/dspark_names.py)
    stages = len(args.dspark_target_layer_ids) if args.has_dspark else 0

    def rename_(name: str) -> str:
        return (stages and dspark_rename(name, stages)) or rename(name)

    attached = {}
    for name in infos:  # scales belong to their weight
        for suffix, field in ((".scale", "scale"), (".weight_scale_inv", "scale"),
                              (".scales", "scales"), (".biases", "biases")):
            stem = name[: -len(suffix)]
            if name.endswith(suffix) and stem + ".weight" in infos:
                attached[name] = (stem + ".weight", field)
    entries: dict[str, _Entry] = {}
    origin: dict[str, str] = {}
    experts: dict[tuple[int, str], dict[int, _Part]] = {}
    skipped = []

    def part(name):
        p = _Part(infos[name])
        for other in (name[:-7] + s for s in (".scale", ".weight_scale_inv", ".scales", ".biases")):
            if other in attached:
                setattr(p, attached[other][1], infos[other])
        return p

    def put(ours, entry, src):
        if ours in entries:
            raise WeightsError(f"{infos[src].file}: tensors '{origin[ours]}' and '{src}' both map to '{ours}'")
        m = _LAYER.match(ours)
        if m and int(m.group(1)) >= n_layers:
            raise WeightsError(f"{infos[src].file}: tensor '{src}' is for layer {m.group(1)}, but the config "
                               f"has num_hidden_layers={n_layers}")
        entries[ours], origin[ours] = entry, src

    for name, info in infos.items():
        if name in attached:
            continue
        m = _MTP.match(name)
        if m and (int(m.group(2)) >= (stages or min(n_mtp, 1)) if m.group(2) is not None
                  else n_layers <= int(m.group(4)) < n_layers + n_mtp):
            skipped.append(name)
            continue
        if m := _OFFICIAL_EXPERT.fullmatch(rename_(name)):
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = part(name)
            continue
        if m := _HF_GATE_UP.fullmatch(name):
            for half, w in ((0, "w1"), (1, "w3")):
                put(f"layers.{m.group(1)}.ffn.experts.{w}.weight", _Entry([part(name) if name.endswith(".weight")
                                                                          else _Part(info)], half), name)
            continue
        ours = rename_(name)
        if not OUR_NAMES.fullmatch(ours):
            raise WeightsError(f"{info.file}: unknown tensor '{name}'" + (f" (renamed '{ours}')" if ours != name else ""))
        put(ours, _Entry([part(name)] if name.endswith(".weight") else [_Part(info)]), name)
    for (block, w), by_index in sorted(experts.items()):
        missing = sorted(set(range(args.n_routed_experts)) - set(by_index))
        extra = sorted(set(by_index) - set(range(args.n_routed_experts)))
        first = next(iter(by_index.values())).w
        if missing or extra:
            raise WeightsError(f"{first.file}: {block} {w}: experts {missing[:8] or extra[:8]} "
                               f"{'missing' if missing else 'beyond n_routed_experts'} "
                               f"(config n_routed_experts={args.n_routed_experts})")
        put(f"{block}.ffn.experts.{w}.weight", _Entry([by_index[e] for e in sorted(by_index)]), first.name)
    return entries, skipped


# ---- conversions ------------------------------------------------------------------------------
def e8m0_to_float(e: mx.array) -> mx.array:
    """E8M0 bytes -> 2**(e-127) exactly, as float32 (built from the exponent bits)."""
    e = e.astype(mx.uint32)
    return mx.where(e == 0, mx.array(2.0**-127, mx.float32), (e << 23).view(mx.float32))


def _tile_scales(scale: mx.array, out: int, inp: int, block: tuple[int, int]) -> mx.array:
    """[..., ceil(out/bo), ceil(in/bi)] float scales -> one per element [..., out, in]."""
    s = mx.repeat(scale, block[0], axis=-2)[..., :out, :]
    return mx.repeat(s, block[1], axis=-1)[..., :inp]


def dequantize_fp8(q: mx.array, scale: mx.array, block=(128, 128), scale_is_e8m0=True) -> mx.array:
    """FP8 e4m3 bytes [..., out, in] with per-tile scales -> float32."""
    s = e8m0_to_float(scale) if scale_is_e8m0 else scale.astype(mx.float32)
    return mx.from_fp8(q.view(mx.uint8), dtype=mx.float32) * _tile_scales(s, *q.shape[-2:], block)


def dequantize_fp4(packed: mx.array, scale: mx.array) -> mx.array:
    """Packed e2m1 [..., out, in/2] (low nibble = even element), E8M0 per 32 inputs -> float32."""
    b = packed.view(mx.uint8)
    lut = mx.array(_FP4_VALUES, mx.float32)
    vals = mx.stack([lut[b & 15], lut[b >> 4]], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    return vals * mx.repeat(e8m0_to_float(scale), 32, axis=-1)[..., : vals.shape[-1]]


MXFP8 = {"mode": "mxfp8", "group_size": 32, "bits": 8}
MXFP4 = {"mode": "mxfp4", "group_size": 32, "bits": 4}


@dataclass
class _Options:
    fp8: str
    fp4: str
    dtype: mx.Dtype
    block: tuple[int, int]
    own: dict  # config.json "quantization"
    get: Callable[[TensorInfo], mx.array]


def _own_params(module: str, o: _Options, info: TensorInfo) -> dict:
    per = o.own.get(module, True)
    if not o.own or per is False:
        raise WeightsError(f"{info.file}: tensor '{info.name}' is MLX-quantized (.scales) but config.json "
                           f"'quantization' does not describe module '{module}'")
    base = {"group_size": o.own.get("group_size", 64), "bits": o.own.get("bits", 4), "mode": o.own.get("mode", "affine")}
    return base | ({k: per[k] for k in ("group_size", "bits", "mode") if k in per} if isinstance(per, dict) else {})


def _target(name: str, o: _Options) -> mx.Dtype:
    return mx.float32 if _KEEP_F32.search(name) else o.dtype


def _convert(module: str, p: _Part, o: _Options, dense: bool) -> tuple[dict[str, mx.array], dict | None]:
    """One source weight (with its scales) -> {"weight", ["scales", "biases"]}, quantization or None."""
    w, info, tgt = o.get(p.w), p.w, _target(module + ".weight", o)
    dense = dense or bool(_DENSE_ONLY.search(module))
    if p.scales is not None:
        q = _own_params(module, o, info)
        b = o.get(p.biases) if p.biases is not None else None
        if dense:
            return {"weight": mx.dequantize(w, o.get(p.scales), b, **q, dtype=tgt)}, None
        return {"weight": w, "scales": o.get(p.scales)} | ({"biases": b} if b is not None else {}), q
    if info.dtype in _FLOATS:
        return {"weight": w.astype(tgt)}, None
    if info.dtype not in ("F8_E4M3", "I8") or p.scale is None:
        what = "has no scale tensor" if info.dtype in ("F8_E4M3", "I8") else f"has dtype {info.dtype}, which is not supported"
        raise WeightsError(f"{info.file}: tensor '{info.name}' {what} (supported: {_SUPPORTED})")
    s, sinfo = o.get(p.scale), p.scale
    e8m0 = sinfo.dtype in ("F8_E8M0", "U8")
    if sinfo.dtype not in ("F8_E8M0", "U8", "F32", "BF16"):
        raise WeightsError(f"{sinfo.file}: scale '{sinfo.name}' has dtype {sinfo.dtype}, which is not supported")
    lead, (out, inp) = info.shape[:-2], info.shape[-2:]
    if info.dtype == "F8_E4M3":
        want = (*lead, -(-out // o.block[0]), -(-inp // o.block[1]))
        if sinfo.shape != want:
            raise WeightsError(f"{sinfo.file}: scale '{sinfo.name}' has shape {list(sinfo.shape)}, expected "
                               f"{list(want)} for FP8 '{info.name}' {list(info.shape)} in {list(o.block)} tiles")
        if o.fp8 == "mxfp8" and not dense and e8m0 and inp % 32 == 0 and o.block[1] % 32 == 0:
            scales = mx.repeat(mx.repeat(s.view(mx.uint8), o.block[0], axis=-2)[..., :out, :], o.block[1] // 32, axis=-1)
            return {"weight": w.view(mx.uint32), "scales": scales[..., : inp // 32]}, MXFP8
        return {"weight": dequantize_fp8(w, s, o.block, e8m0).astype(tgt)}, None
    inp *= 2  # packed FP4
    want = (*lead, out, -(-inp // 32))
    if sinfo.shape != want or not e8m0:
        raise WeightsError(f"{sinfo.file}: scale '{sinfo.name}' is {sinfo.dtype} {list(sinfo.shape)}, expected "
                           f"F8_E8M0 {list(want)} for packed FP4 '{info.name}' {list(info.shape)}")
    if o.fp4 == "mxfp4" and not dense and inp % 32 == 0:
        return {"weight": w.view(mx.uint32), "scales": s.view(mx.uint8)}, MXFP4
    return {"weight": dequantize_fp4(w, s).astype(tgt)}, None


def _materialise(ours: str, e: _Entry, o: _Options) -> tuple[dict[str, mx.array], dict | None]:
    module, leaf = ours.rsplit(".", 1)
    p0 = e.parts[0]
    if leaf != "weight" or (p0.w.dtype not in ("F8_E4M3", "I8", "U32") and p0.scale is None and p0.scales is None):
        info = p0.w
        if info.dtype in ("I64", "I32", "I16", "U16", "U8") and leaf == "tid2eid":
            return {ours: o.get(info).astype(mx.int32)}, None
        if info.dtype not in _FLOATS:
            raise WeightsError(f"{info.file}: tensor '{info.name}' has dtype {info.dtype}, which is not supported "
                               f"for '{ours}' (supported: {_SUPPORTED})")
        w = o.get(info).astype(_target(ours, o))
        if e.half is not None:
            n = w.shape[-2] // 2
            w = w[..., e.half * n:(e.half + 1) * n, :]
        if len(e.parts) > 1:
            w = mx.stack([w] + [o.get(p.w).astype(w.dtype) for p in e.parts[1:]])
        return {ours: w}, None
    if p0.w.dtype == "U32" and p0.scales is None:
        raise WeightsError(f"{p0.w.file}: tensor '{p0.w.name}' is U32 (MLX-quantized) but has no .scales tensor")
    converted = [_convert(module, p, o, dense=e.half is not None) for p in e.parts]
    arrays, quant = converted[0]
    if e.half is not None:
        w = arrays["weight"]
        n = w.shape[-2] // 2
        arrays = {"weight": w[..., e.half * n:(e.half + 1) * n, :]}
    if len(converted) > 1:
        arrays = {k: mx.stack([c[0][k] for c in converted]) for k in arrays}
    return {f"{module}.{k}": v for k, v in arrays.items()}, quant


# ---- public API -------------------------------------------------------------------------------
def plan_checkpoint(infos: dict[str, TensorInfo], args: ModelArgs):
    """Source tensors -> ``({our name: entry}, skipped MTP names)``; an entry's ``parts`` are the
    source tensors to stack (experts, in order), each with ``w`` and its ``scale``/``scales``/
    ``biases``; ``half`` selects a half of a fused gate_up_proj. Used by quantize/ to stream."""
    return _plan(infos, args)


def materialise(ours: str, entry: _Entry, get: Callable[[TensorInfo], mx.array], *, fp8: str, fp4: str,
                dtype: mx.Dtype, block: tuple[int, int] = (128, 128), own: dict | None = None):
    """One planned entry -> ``({our name: lazy array}, quantization or None)``, exactly as
    :func:`load_weights` converts it; ``get`` reads a source tensor (or a slice quantize/ chose)."""
    return _materialise(ours, entry, _Options(fp8, fp4, dtype, block, own or {}, get))


class Weights(dict):
    """our name -> array; ``sources`` our name -> (file, source tensor, source shape),
    ``skipped`` (dropped MTP tensors), ``model_dir``, ``index_file``."""

    sources: dict[str, tuple[Path, str, tuple[int, ...]]]
    skipped: list[str]
    model_dir: Path | None = None
    index_file: str = ""


def _build(infos, args, get, *, fp8, fp4, dtype, own) -> tuple[Weights, dict[str, dict]]:
    if fp8 not in ("mxfp8", "dequantize") or fp4 not in ("mxfp4", "dequantize"):
        raise WeightsError(f"fp8={fp8!r} / fp4={fp4!r}: choose fp8 'mxfp8' or 'dequantize', fp4 'mxfp4' or 'dequantize'")
    qc = args.quantization_config or {}
    block = tuple(qc.get("weight_block_size") or (128, 128))
    o = _Options(fp8, fp4, dtype, (int(block[0]), int(block[1])), own, get)
    entries, skipped = _plan(infos, args)
    out, quantization = Weights(), {}
    out.sources, out.skipped = {}, skipped
    for ours, entry in entries.items():
        arrays, quant = _materialise(ours, entry, o)
        out.update(arrays)
        w = entry.parts[0].w
        for k in arrays:
            out.sources[k] = (w.file, w.name, w.shape)
        if quant is not None:
            quantization[ours.rsplit(".", 1)[0]] = dict(quant)
    if skipped:
        log.info("dropping %d drafter tensors this mlx-v4 does not run (%s, ...)", len(skipped), skipped[0])
    return out, quantization


def load_weights(model_dir: str | Path, args: ModelArgs, *, fp8: str = "mxfp8", fp4: str = "mxfp4",
                 dtype: mx.Dtype = mx.float32, expected: dict | None = None) -> tuple[Weights, dict[str, dict]]:
    """Read a checkpoint into our names and formats, lazily (nothing is evaluated here).

    Returns ``(weights, quantization)``: ``quantization`` maps our module path (e.g.
    ``layers.3.attn.wq_b``, ``layers.3.ffn.experts.w1``) to ``{"mode", "group_size", "bits"}``
    for :func:`apply_quantization`. With ``expected`` (name -> shape, from the model after
    apply_quantization) the result is checked by :func:`validate_weights`."""
    model_dir = Path(model_dir)
    infos, index_file = scan_with_listing(model_dir)
    loaded: dict[Path, dict[str, mx.array]] = {}

    def get(info: TensorInfo) -> mx.array:
        if info.file not in loaded:
            loaded[info.file] = mx.load(str(info.file))  # lazy: a tensor is read when evaluated
        return loaded[info.file][info.name]

    weights, quantization = _build(infos, args, get, fp8=fp8, fp4=fp4, dtype=dtype,
                                   own=read_own_quantization(model_dir))
    weights.model_dir, weights.index_file = model_dir, index_file
    loaded.clear()  # the graph holds what it needs; nothing else keeps file data alive
    if expected is not None:
        validate_weights(weights, expected)
    return weights, quantization


def validate_weights(weights: Weights, expected: dict) -> None:
    """Compare with the model's parameters (name -> shape or array); raise one WeightsError
    listing every missing tensor, unexpected tensor and shape mismatch."""
    problems = []
    where = f"{weights.model_dir}" if weights.model_dir else "checkpoint"
    for name, want in expected.items():
        want = tuple(want.shape if hasattr(want, "shape") else want)
        if name not in weights:
            problems.append(f"{where}: no tensor for parameter '{name}' (not in {weights.index_file or 'the checkpoint'})")
            continue
        got = tuple(weights[name].shape)
        if got != want:
            f, src, src_shape = weights.sources.get(name, ("?", "?", ()))
            problems.append(f"{f}: tensor '{src}' {list(src_shape)} gives '{name}' shape {list(got)}, "
                            f"but the model expects {list(want)}")
    for name in weights:
        if name not in expected:
            f, src, _ = weights.sources.get(name, ("?", "?", ()))
            problems.append(f"{f}: tensor '{src}' ('{name}') has no parameter in the model")
    if problems:
        more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise WeightsError("\n".join(problems[:20]) + more)


_MX_TO_ST = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.int8: "I8", mx.uint32: "U32",
             mx.int32: "I32", mx.int64: "I64", mx.float64: "F64"}


def rename_weights(weights: dict[str, mx.array], args: ModelArgs, dtype: mx.Dtype = mx.bfloat16) -> dict[str, mx.array]:
    """mlx-lm's ``sanitize`` hook: arrays already loaded (any schema) -> our names, dense
    (FP8/FP4 dequantised to ``dtype``). Arrays already in our names (and our MLX format, which
    mlx-lm quantizes from config.json itself) pass through unchanged."""
    if all(OUR_NAMES.fullmatch(k) for k in weights):
        return dict(weights)
    return dict(build_from_arrays(weights, args, fp8="dequantize", fp4="dequantize", dtype=dtype, own={})[0])


def build_from_arrays(weights: dict[str, mx.array], args: ModelArgs, *, fp8: str, fp4: str, dtype: mx.Dtype,
                      own: dict) -> tuple[Weights, dict[str, dict]]:
    """Arrays already loaded (by ``mx.load``, e.g. in mlx-lm) -> ``(weights, quantization)``
    exactly as :func:`load_weights` converts the same tensors read from files; ``own`` is
    config.json's ``"quantization"``."""
    infos = {}
    for name, a in weights.items():
        if a.dtype == mx.uint8:  # F8 loads as uint8: scales by name, else e4m3 weights
            st = "F8_E8M0" if name.endswith((".scale", ".scales")) else "F8_E4M3"
        else:
            st = _MX_TO_ST.get(a.dtype, str(a.dtype))
        infos[name] = TensorInfo(Path("<weights>"), name, st, tuple(a.shape))
    return _build(infos, args, lambda i: weights[i.name], fp8=fp8, fp4=fp4, dtype=dtype, own=own)


def apply_quantization(model: nn.Module, quantization: dict[str, dict]) -> None:
    """Swap exactly the modules named in ``quantization`` for their quantized versions
    (QuantizedLinear, QuantizedSwitchLinear, QuantizedEmbedding) with those parameters."""
    if not quantization:
        return
    left = set(quantization)

    def predicate(path: str, module: nn.Module):
        params = quantization.get(path)
        if params is None:
            return False
        left.discard(path)
        return {k: params[k] for k in ("group_size", "bits", "mode")}

    nn.quantize(model, class_predicate=predicate)
    if left:
        raise WeightsError(f"quantized tensors for modules the model does not have: {sorted(left)[:8]}")
