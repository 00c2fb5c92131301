"""DeepSeek V4.1 in the streaming converter: its tensor names, classes and formats.

The V4.1 release (``deepseek_v41`` with a ``text_config``) names its tensors as our V4.1 model
does, except routed experts (``layers.N.ffn.experts.E.wK.weight``, stacked here as
``layers.N.ffn.experts.wK.weight`` and written back one tensor per expert, as for V4). Formats:

* FP8 e4m3 with one E8M0 byte per **[32, 32]** tile: that *is* MLX ``mxfp8`` (one E8M0 scale
  per 32 inputs) once each tile's scale is repeated down its 32 rows, so ``native`` keeps the
  codes and scales bit for bit, without requantizing (``wo_a`` and ``engram.wkv`` included: the
  V4.1 model runs them quantized); FP4 experts are ``mxfp4`` as stored;
* the Engram tables (``layers.N.engram.embed.weight`` F8 rows + ``.scale`` E8M0 per 32 columns)
  are copied byte for byte, in row chunks, each into a shard of its own: the model reads them
  from disk row by row (mlx_v4/v41/engram.py), whatever the recipe;
* the compressor, the index-key ``wk`` and ``weights_proj`` feed float32 math and stay dense.

The DSpark drafter (``mtp.*``) is kept, under our ``dspark.*`` names (mlx_v4/v41/dspark.py),
when config.json declares it (``dspark_*`` fields); otherwise it is dropped, as the vision tower
always is (the text model does not run it). The calibrated recipes (``3bit-experts``, ``2bit-experts``) run the V4 model on text,
so they do not apply here.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx

from mlx_v4.v41.config import V41Args
from mlx_v4.weights import _Entry, _Part, dequantize_fp8, read_header, read_index

from .plan import COPIED, Source, jobs_for
from .recipes import ConvertError, Override, Recipe, classify

#: The recipes that apply to V4.1 (every one but the calibrated ones).
RECIPES_V41 = ("native", "mxfp4", "mxfp8", "4bit", "8bit", "mixed-4-8", "bf16")

SKIPPED = re.compile(r"^(mtp\.|vision\.|aligner\.|image_(start|end|newline)$)")
_EXPERT = re.compile(r"^((?:dspark\.)?layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")
_TABLE = re.compile(r"^layers\.\d+\.engram\.embed\.weight$")
#: Dense whatever the recipe: they feed float32 math (the V4.1 loader keeps them dense too).
_KEEP_DENSE = re.compile(r"(compressor\.|indexer\.(wk|weights_proj)\.)")
_FLOATS = ("BF16", "F16", "F32")

# V4.1 names the V4 classes do not know; everything else classifies as in V4.
_CLASSES_V41 = [(re.compile(p), c) for p, c in [
    (r"(dspark\.)?layers\.\d+\.hc_(attn|ffn)_(fn|base|scale)", "hyper"),
    (r".*\.ffn\.gate\.bias_vl", "router_bias"),
    (r".*\.attn\.wo_a\.weight", "attention"),  # V4.1 runs the grouped wo_a quantized
    (r".*\.attn\.indexer\.(wk|weights_proj)\.weight", "index_dense"),
    (r".*\.attn\.indexer\.k_norm\.weight", "norm"),
    (r".*\.attn\.compressor\.norm\.weight", "norm"),
    (r".*\.engram\.wkv\.weight", "engram"),
    (r".*\.engram\.(q_weight|k_weight)", "engram_gate"),
    (r".*\.engram\.embed\.weight", COPIED),
]]


def classify_v41(name: str) -> str:
    for rx, c in _CLASSES_V41:
        if rx.fullmatch(name):
            return c
    return classify(name)


def check_recipe(recipe: str) -> None:
    """ConvertError naming ``recipe`` when it cannot apply to a V4.1 checkpoint."""
    if recipe not in RECIPES_V41:
        raise ConvertError(f"recipe {recipe!r} does not apply to DeepSeek V4.1 checkpoints (it calibrates the "
                           f"routed experts by running the DeepSeek V4 model); choose one of {', '.join(RECIPES_V41)}")


def open_source(path: Path) -> Source:
    """Validate config.json (V41Args) and every shard header; refuse an mlx-v4 output."""
    args = V41Args.from_file(path)  # ConfigError naming the file
    cfg_file = path / "config.json"
    config = json.loads(cfg_file.read_text())
    if "mlx_v4_conversion" in config:
        raise ConvertError(f"{path}: is already an mlx-v4 conversion; convert the original DeepSeek V4.1 release")
    files = read_index(path)
    headers = {f: read_header(f) for f in sorted(set(files.values()))}
    infos = {name: headers[f][name] for name, f in files.items()}
    h = hashlib.sha256(cfg_file.read_bytes())
    for f in headers:
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    qc = args.quantization_config or {}
    block = tuple(int(b) for b in (qc.get("weight_block_size") or (32, 32)))
    return Source(path, config, args, infos, h.hexdigest()[:16], block, {}, family="v41", materialise=materialise)


def _expected(args: V41Args, drafter: bool) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``args`` (lazy zeros: nothing is allocated)."""
    from mlx.utils import tree_flatten

    from mlx_v4.v41.model import Model

    size = args.engram_compressed_vocab_size
    model = Model(args, (range(size), size) if args.engram_layer_ids else None, cpu=True)
    if drafter:
        from mlx_v4.v41.dspark import attach_v41_dspark

        attach_v41_dspark(model, cpu=True)
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def plan_entries(src: Source) -> tuple[dict[str, _Entry], list[str]]:
    """Source tensors -> ({our name: entry}, skipped names); every parameter of the model must be
    there and nothing else (ConvertError naming the tensor)."""
    from mlx_v4.v41.dspark import v41_dspark_name

    infos, path = src.infos, src.path
    drafter = src.args.has_dspark and any(n.startswith("mtp.") for n in infos)
    expected = _expected(src.args, drafter)
    if drafter and not any(".confidence_head." in n for n in infos):  # optional (mlx_v4/v41/weights.py)
        expected.pop("dspark.confidence.weight")
    entries: dict[str, _Entry] = {}
    experts: dict[str, dict[int, _Part]] = {}
    skipped = []
    for source_name, info in infos.items():
        name = (drafter and v41_dspark_name(source_name)) or source_name  # the drafter's: dspark.*
        if SKIPPED.match(name):
            skipped.append(name)
            continue
        if source_name.endswith(".scale") and source_name.removesuffix(".scale") + ".weight" in infos:
            continue
        scale = source_name.removesuffix(".weight") + ".scale"
        part = _Part(info, infos.get(scale) if source_name.endswith(".weight") else None)
        if name in entries:
            raise ConvertError(f"{info.file}: tensor '{source_name}' is a second '{name}'")
        if m := _EXPERT.match(name):
            experts.setdefault(f"{m[1]}.{m[3]}.weight", {})[int(m[2])] = part
        elif name in expected or _TABLE.match(name):
            entries[name] = _Entry([part])
        else:
            raise ConvertError(f"{info.file}: tensor '{name}' is not a parameter of the DeepSeek V4.1 text model")
    for ours, by_index in experts.items():
        if ours not in expected:
            raise ConvertError(f"{path}: experts '{ours}' for a layer the model does not have")
        n = expected[ours][0]
        if sorted(by_index) != list(range(n)):
            raise ConvertError(f"{path}: '{ours.replace('.ffn.experts.', '.ffn.experts.*.')}' has {len(by_index)} "
                               f"experts, the config declares {n}")
        entries[ours] = _Entry([by_index[e] for e in range(n)])
    missing = [n for n in expected if n not in entries]
    if missing:
        raise ConvertError(f"{path}: the checkpoint has no tensor '{missing[0]}'")
    for i in src.args.engram_layer_ids:
        name = f"layers.{i}.engram.embed.weight"
        if name not in entries or entries[name].parts[0].scale is None:
            raise ConvertError(f"{path}: the checkpoint has no Engram table '{name}' with its '.scale'")
    return entries, skipped


def plan_jobs(src: Source, recipe: Recipe, override: Override | None):
    """-> (jobs, skipped names), as quantize.plan.plan_jobs does for V4."""
    entries, skipped = plan_entries(src)
    jobs = jobs_for(src, entries, recipe, override, classify_v41)
    for job in jobs:
        if job.klass == COPIED:  # the stored dtypes, not the uint8 the bytes travel in
            p = job.entry.parts[0]
            job.outputs = [(job.name, p.w.shape, p.w.dtype), (p.scale.name, p.scale.shape, p.scale.dtype)]
            job.target = "stored"
    return jobs, skipped


def materialise(ours: str, entry: _Entry, get, *, fp8: str, fp4: str, dtype: mx.Dtype, block=(32, 32), own=None):
    """One planned V4.1 entry -> ({our name: lazy array}, quantization or None): FP8 tiles as
    mxfp8 and FP4 experts as mxfp4 (exact; ``fp8``/``fp4`` are always the mx formats here, the
    signature is quantize.plan's), dense tensors in ``dtype``, Engram tables as their bytes."""
    module, _ = ours.rsplit(".", 1)
    p0 = entry.parts[0]
    if _TABLE.match(ours):
        return {ours: get(p0.w), p0.scale.name: get(p0.scale)}, None
    if p0.scale is None:
        if p0.w.dtype not in _FLOATS:
            raise ConvertError(f"{p0.w.file}: tensor '{p0.w.name}' is {p0.w.dtype} without a '.scale'")
        ws = [get(p.w).astype(dtype) for p in entry.parts]
        return {ours: ws[0] if len(ws) == 1 else mx.stack(ws)}, None
    converted = [_quantized(module, p, get, block, dtype) for p in entry.parts]
    arrays, quant = converted[0]
    if len(converted) > 1:
        arrays = {k: mx.stack([c[0][k] for c in converted]) for k in arrays}
    return {f"{module}.{k}": v for k, v in arrays.items()}, quant


def _quantized(module: str, p: _Part, get, block, dtype) -> tuple[dict[str, mx.array], dict | None]:
    w, s, info, sinfo = get(p.w), get(p.scale), p.w, p.scale
    out, inp = info.shape
    if sinfo.dtype not in ("F8_E8M0", "U8"):
        raise ConvertError(f"{sinfo.file}: scale '{sinfo.name}' is {sinfo.dtype}; DeepSeek V4.1 stores E8M0 scales")
    if info.dtype == "F8_E4M3":
        want = (-(-out // block[0]), -(-inp // block[1]))
        if tuple(sinfo.shape) != want:
            raise ConvertError(f"{sinfo.file}: scale '{sinfo.name}' has shape {list(sinfo.shape)}, expected {list(want)} "
                               f"for FP8 '{info.name}' {list(info.shape)} in {list(block)} tiles")
        if _KEEP_DENSE.search(module) or inp % 32 or block[1] % 32:
            return {"weight": dequantize_fp8(w, s, tuple(block)).astype(dtype)}, None
        scales = mx.repeat(mx.repeat(s.view(mx.uint8), block[0], axis=0)[:out], block[1] // 32, axis=1)
        return {"weight": w.view(mx.uint32), "scales": scales[:, : inp // 32]}, {"group_size": 32, "bits": 8,
                                                                                   "mode": "mxfp8"}
    if info.dtype == "I8":
        if tuple(sinfo.shape) != (out, 2 * inp // 32):
            raise ConvertError(f"{sinfo.file}: scale '{sinfo.name}' has shape {list(sinfo.shape)}, expected "
                               f"{[out, 2 * inp // 32]} for packed FP4 '{info.name}' {list(info.shape)}")
        return {"weight": w.view(mx.uint8).view(mx.uint32), "scales": s.view(mx.uint8)}, {"group_size": 32, "bits": 4,
                                                                                          "mode": "mxfp4"}
    raise ConvertError(f"{info.file}: tensor '{info.name}' has dtype {info.dtype} with a '.scale' (DeepSeek V4.1 "
                       "stores F8_E4M3 weights and I8 packed FP4 experts)")
