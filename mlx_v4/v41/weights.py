"""Load a DeepSeek V4.1 checkpoint in the official release layout.

Tensor names are the release's (``layers.N.attn.wq_a.weight``, ``layers.N.ffn.experts.E.w1.weight``,
``layers.N.engram.embed.weight``, ...), which are the parameter names of :class:`Model` except
for routed experts (stacked into ``ffn.experts.w1.weight`` [E, out, in]) and Engram tables
(attached as on-disk readers, never loaded). FP8 weights carry one E8M0 scale per 32x32 tile,
which is exactly MLX ``mxfp8`` once each tile scale is repeated down its 32 rows: ``fp8="mxfp8"``
keeps them quantized, ``"dequantize"`` expands them. FP4 experts are ``mxfp4`` as stored
(``fp4="mxfp4"``) or dequantised. ``mtp.*`` (the DSpark drafter) and the vision tower are
recognised and not loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from .. import platform
from ..weights import (
    MXFP4,
    MXFP8,
    WeightsError,
    _scan,
    apply_quantization,
    dequantize_fp4,
    dequantize_fp8,
    resolve_model_path,
)
from .config import V41Args
from .converted import converted_weights, is_converted
from .engram import EngramTable
from .engram_hash import compressed_token_map
from .model import Model

#: Tensors of the release that the text model does not use.
SKIPPED = re.compile(r"^(mtp\.|vision\.|aligner\.|image_(start|end|newline)$)")
_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")
#: Kept in float32 whatever the compute dtype (as the reference does).
_FP32 = re.compile(r"(hc_(attn|ffn)_(fn|base|scale)|attn_sink|gate\.bias(_vl)?|compressor\..*)$")
#: Never quantized: the grouped ``wo_a`` is fine as mxfp8, but these feed float32 math.
_KEEP_DENSE = re.compile(r"(compressor\.|indexer\.(wk|weights_proj)\.)")


def tokenizer_file(model_dir: Path) -> Path:
    own = model_dir / "tokenizer.json"
    if own.is_file():
        return own
    from ..tokenizer import bundled_tokenizer_path

    return bundled_tokenizer_path()


def load_v41(path_or_repo, *, model_config: dict | None = None, dtype=None, fp8: str | None = None,
             fp4: str | None = None, engram_budget_bytes: int = 0) -> tuple[Model, Path]:
    """-> (model, model directory). Engram tables stay on disk, read row by row, except those
    that fit (in layer order) within ``engram_budget_bytes``, which are read into memory."""
    path = resolve_model_path(str(path_or_repo))
    args = V41Args.from_file(path, model_config)
    dtype = dtype or platform.default_dtype()
    fp8 = fp8 or ("mxfp8" if platform.metal_available() else "dequantize")
    fp4 = fp4 or ("mxfp4" if platform.metal_available() else "dequantize")
    for flag, value in (("fp8", fp8), ("fp4", fp4)):
        if value not in ("dequantize", f"mx{flag}"):
            raise WeightsError(f"{flag}={value!r}: choose 'mx{flag}' or 'dequantize'")
    token_map = compressed_token_map(str(tokenizer_file(path))) if args.engram_layer_ids else None
    model = Model(args, token_map)
    infos, _ = _scan(path)
    loaded: dict[Path, dict[str, mx.array]] = {}

    def get(name: str) -> mx.array:
        info = infos[name]
        if info.file not in loaded:
            loaded[info.file] = mx.load(str(info.file))  # lazy: read when evaluated
        return loaded[info.file][name]

    expected = dict(tree_flatten(model.parameters()))
    weights, quantization, used = {}, {}, set()
    if is_converted(path):  # an `mlx-v4 convert` output: our names, MLX formats (v41/converted.py)
        weights, quantization, used = converted_weights(path, infos, get, expected, dtype=dtype, fp8=fp8, fp4=fp4,
                                                        fp32=_FP32)
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name in infos:
        if name not in used and (m := _EXPERT.match(name)):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = name
    for (prefix, proj), by_index in experts.items():
        ours = f"{prefix}.{proj}.weight"
        if ours not in expected:
            raise WeightsError(f"{path}: experts '{prefix}.*.{proj}' for a layer the model does not have")
        n = expected[ours].shape[0]
        if sorted(by_index) != list(range(n)):
            raise WeightsError(f"{path}: layer experts '{prefix}' has {len(by_index)} {proj} tensors, the config "
                               f"declares {n} experts")
        names = [by_index[e] for e in range(n)]
        scales = [n_.removesuffix(".weight") + ".scale" for n_ in names]
        if any(s not in infos for s in scales):
            raise WeightsError(f"{path}: FP4 expert tensor '{names[0]}' has no '.scale'")
        w, s = mx.stack([get(x) for x in names]), mx.stack([get(x) for x in scales])
        if fp4 == "mxfp4" and w.shape[-1] % 4 == 0:
            weights[ours] = w.view(mx.uint8).view(mx.uint32)
            weights[ours.removesuffix("weight") + "scales"] = s.view(mx.uint8)
            quantization[ours.removesuffix(".weight")] = MXFP4
        else:
            weights[ours] = dequantize_fp4(w, s).astype(dtype)
        used.update(names + scales)

    for ours, param in expected.items():
        if ours in weights or ours.endswith(".scales"):
            continue
        if ours not in infos:
            raise WeightsError(f"{path}: the checkpoint has no tensor '{ours}'")
        used.add(ours)
        scale_name = ours.removesuffix(".weight") + ".scale"
        if ours.endswith(".weight") and scale_name in infos:
            used.add(scale_name)
            w, s = get(ours), get(scale_name)
            module = ours.removesuffix(".weight")
            if fp8 == "mxfp8" and not _KEEP_DENSE.search(ours) and w.shape[-1] % 32 == 0:
                weights[ours] = w.view(mx.uint8).view(mx.uint32)
                weights[module + ".scales"] = mx.repeat(s.view(mx.uint8), 32, axis=0)[: w.shape[0]]
                quantization[module] = MXFP8
            else:
                weights[ours] = dequantize_fp8(w, s, (32, 32)).astype(mx.float32 if _FP32.search(ours) else dtype)
        else:
            v = get(ours)
            if tuple(v.shape) != tuple(param.shape):
                raise WeightsError(f"{path}: tensor '{ours}' has shape {list(v.shape)}, the config implies "
                                   f"{list(param.shape)}")
            weights[ours] = v.astype(mx.float32 if _FP32.search(ours) else dtype)

    for i, layer in enumerate(model.layers):
        if "engram" in layer:
            base = f"layers.{i}.engram.embed"
            if base + ".weight" not in infos or base + ".scale" not in infos:
                raise WeightsError(f"{path}: the checkpoint has no Engram table '{base}.weight' with its '.scale'")
            rows = args.engram_num_embeddings[args.engram_layer_ids.index(i)]
            table = EngramTable(infos[base + ".weight"], infos[base + ".scale"], rows, args.engram_head_dim)
            if table.nbytes <= engram_budget_bytes:
                table.make_resident()
                engram_budget_bytes -= table.nbytes
            layer.engram.table = table
            used.update((base + ".weight", base + ".scale"))
    unexpected = sorted(n for n in infos if n not in used and not SKIPPED.match(n))
    if unexpected:
        raise WeightsError(f"{path}: tensors the DeepSeek V4.1 text model does not have: {unexpected[:8]}")

    apply_quantization(model, quantization)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    loaded.clear()
    files = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    model.weights_id = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    from ..generation import load_generation_defaults

    model.generation_defaults = load_generation_defaults(path)
    model.eval()
    return model, path
