"""Load a DeepSeek V4.1 checkpoint in the official release layout.

Tensor names are the release's (``layers.N.attn.wq_a.weight``, ``layers.N.ffn.experts.E.w1.weight``,
``layers.N.engram.embed.weight``, ...), which are the parameter names of :class:`Model` except
for routed experts (stacked into ``ffn.experts.w1.weight`` [E, out, in]) and Engram tables
(attached as on-disk readers, never loaded). FP8 weights carry one E8M0 scale per 32x32 tile,
which is exactly MLX ``mxfp8`` once each tile scale is repeated down its 32 rows: ``fp8="mxfp8"``
keeps them quantized, ``"dequantize"`` expands them. FP4 experts are ``mxfp4`` as stored
(``fp4="mxfp4"``) or dequantised. ``mtp.*`` is the DSpark drafter (mlx_v4/v41/dspark.py),
loaded as ``dspark.*`` when config.json declares it (``dspark_*`` fields), else skipped; the
vision tower is recognised and not loaded.
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
    MXFP8,
    WeightsError,
    apply_quantization,
    dequantize_fp8,
    resolve_model_path,
    scan_checkpoint,
)
from .config import V41Args
from .converted import converted_weights, is_converted
from .engram import EngramTable
from .engram_hash import compressed_token_map
from .model import Model
from .streaming import fp4_expert_arrays

#: Tensors of the release that the text model does not use.
SKIPPED = re.compile(r"^(mtp\.|vision\.|aligner\.|image_(start|end|newline)$)")
_EXPERT = re.compile(r"^((?:dspark\.)?layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")
_ROUTED = re.compile(r"(dspark\.)?layers\.\d+\.ffn\.experts\.w[123]\.weight")  # our stacked names
_ROUTED_LEAF = re.compile(r"(dspark\.)?layers\.\d+\.ffn\.experts\.w[123]\.")  # their weight/scales/biases
#: Kept in float32 whatever the compute dtype (as the reference does).
_FP32 = re.compile(r"(hc_(attn|ffn)_(fn|base|scale)|attn_sink|gate\.bias(_vl)?|compressor\..*|dspark\.confidence\.weight)$")
#: Never quantized: the grouped ``wo_a`` is fine as mxfp8, but these feed float32 math.
_KEEP_DENSE = re.compile(r"(compressor\.|indexer\.(wk|weights_proj)\.)")


def tokenizer_file(model_dir: Path) -> Path:
    own = model_dir / "tokenizer.json"
    if own.is_file():
        return own
    from ..tokenizer import bundled_tokenizer_path

    return bundled_tokenizer_path()


def load_v41(path_or_repo, *, model_config: dict | None = None, dtype=None, fp8: str | None = None,
             fp4: str | None = None, engram_budget_bytes: int = 0, expert_budget=None,
             expert_policy: str | None = None) -> tuple[Model, Path]:
    """-> (model, model directory). Without ``expert_budget`` every routed expert is resident and
    Engram tables stay on disk, read row by row, except those that fit (in layer order) within
    ``engram_budget_bytes``. With it (bytes, a size or "auto", as :func:`mlx_v4.load`), routed
    experts and Engram tables share that one budget in an expert store (mlx_v4/v41/streaming.py),
    which decides which tables are resident (``engram_budget_bytes`` then does not apply)."""
    from ..experts import parse_budget

    budget = parse_budget(expert_budget)  # a bad value fails before anything is read
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
    infos = scan_checkpoint(path)
    infos, official = _drafter_names(path, model, infos)
    loaded: dict[Path, dict[str, mx.array]] = {}

    def get(name: str) -> mx.array:
        info = infos[name]
        if info.file not in loaded:
            loaded[info.file] = mx.load(str(info.file))  # lazy: read when evaluated
        return loaded[info.file][official.get(name, name)]

    expected = dict(tree_flatten(model.parameters()))
    weights, quantization, used = {}, {}, set()
    if is_converted(path):  # an `mlx-v4 convert` output: our names, MLX formats (v41/converted.py)
        weights, quantization, used = converted_weights(path, infos, get, expected, dtype=dtype, fp8=fp8, fp4=fp4,
                                                        fp32=_FP32)
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name in infos:
        if name not in used and (m := _EXPERT.match(name)):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = name
    sources: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (prefix, proj) -> (weight, scale) per expert
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
        sources[(prefix, proj)] = list(zip(names, scales))
        used.update(names + scales)

    for ours, param in expected.items():
        if ours in weights or ours.endswith(".scales") or _ROUTED.fullmatch(ours):
            continue
        if ours not in infos:
            if _UNUSED_BY_DRAFTER.fullmatch(ours):  # bias_vl steers image spans only: text never reads it
                weights[ours] = mx.zeros(param.shape, dtype=mx.float32)
                continue
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

    store, streamed = None, set()
    if budget is not None:  # the drafter's experts too: one store, one budget
        store, engram_budget_bytes = _expert_store(path, args, infos, sources, expected, weights, budget,
                                                   fp8=fp8, fp4=fp4, dtype=dtype, policy=expert_policy)
        streamed = {s.prefix for s in store.specs.values()} if store is not None else set()
        for prefix in streamed:  # a conversion's experts, stacked (lazily) above: the store has them
            for k in [k for k in weights if k.startswith(prefix + ".")]:
                del weights[k]
            for k in [k for k in quantization if k.startswith(prefix + ".")]:
                del quantization[k]
    for (prefix, proj), pairs in sources.items():  # resident, stacked [E, out, in]
        if prefix not in streamed:
            w, s = mx.stack([get(x) for x, _ in pairs]), mx.stack([get(x) for _, x in pairs])
            arrays, quant = fp4_expert_arrays(w, s, fp4, dtype)
            weights.update({f"{prefix}.{proj}.{k}": v for k, v in arrays.items()})
            if quant is not None:
                quantization[f"{prefix}.{proj}"] = quant

    tables = {}
    for i, layer in enumerate(model.layers):
        if "engram" in layer:
            base = f"layers.{i}.engram.embed"
            if base + ".weight" not in infos or base + ".scale" not in infos:
                raise WeightsError(f"{path}: the checkpoint has no Engram table '{base}.weight' with its '.scale'")
            rows = args.engram_num_embeddings[args.engram_layer_ids.index(i)]
            table = EngramTable(infos[base + ".weight"], infos[base + ".scale"], rows, args.engram_head_dim)
            if store is None and table.nbytes <= engram_budget_bytes:
                table.make_resident()
                engram_budget_bytes -= table.nbytes
            layer.engram.table = tables[base] = table
            used.update((base + ".weight", base + ".scale"))
    unexpected = sorted(n for n in infos if n not in used and not SKIPPED.match(n))
    if unexpected:
        raise WeightsError(f"{path}: tensors the DeepSeek V4.1 text model does not have: {unexpected[:8]}")

    apply_quantization(model, quantization)
    if store is not None:
        from ..experts import attach

        attach(model, store)
        store.admit_tables(tables)  # after the experts: each table resident only if it fits beside them
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    loaded.clear()
    files = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    model.weights_id = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    from ..generation import load_generation_defaults

    model.generation_defaults = load_generation_defaults(path)
    model.eval()
    return model, path


_UNUSED_BY_DRAFTER = re.compile(r"dspark\.layers\.\d+\.ffn\.gate\.bias_vl")


def _drafter_names(path: Path, model: Model, infos: dict) -> tuple[dict, dict[str, str]]:
    """With a DSpark config and ``mtp.*`` tensors (or a conversion's ``dspark.*``): attach the
    drafter and rename its tensors to ours -> (infos by our names, ours -> the file's name)."""
    if not model.args.has_dspark or not any(n.startswith(("mtp.", "dspark.")) for n in infos):
        return infos, {}
    from .dspark import attach_v41_dspark, v41_dspark_name

    net = attach_v41_dspark(model)
    out, official = {}, {}
    for name, info in infos.items():
        ours = v41_dspark_name(name) or name
        if ours in out:
            raise WeightsError(f"{path}: DSpark tensors '{official.get(ours, ours)}' and '{name}' are both "
                               f"'{ours}'")
        out[ours] = info
        if ours != name:
            official[ours] = name
    if "dspark.confidence.weight" not in out:  # optional, as in vLLM (its confidence_head is dropped)
        del net["confidence"]
    return out, official


def _expert_store(path: Path, args: V41Args, infos, sources, expected, weights, budget, *, fp8, fp4, dtype, policy):
    """-> (the expert store, or None when "auto" finds room for every expert; Engram bytes for
    the no-store path). ``sources``: the release's FP4 experts, (weight, scale) names per expert;
    a conversion's (``weights`` holds them stacked) are planned from its own per-expert tensors.
    ``weights`` holds the other (lazy) weights: "auto" sizes them."""
    from ..expert_plan import plan_expert_layers, store_layer
    from ..experts import DEFAULT_POLICY, ExpertBudgetError, ExpertStore
    from .converted import ConvertedExpertConversion, converted_expert_entries, own_quantization
    from .streaming import ExpertConversion, auto_budget, plan_experts

    def layer_of(prefix: str) -> int:  # drafter: n + stage
        return store_layer(prefix.removesuffix(".ffn.experts"), args.num_hidden_layers)

    def top_k_of(prefix: str) -> int:
        return (args.dspark_n_activated_experts if prefix.startswith("dspark.") else 0) or args.num_experts_per_tok

    if is_converted(path):
        quant = own_quantization(path)
        convert = ConvertedExpertConversion(quant, fp8, fp4, dtype)
        by_prefix = converted_expert_entries(path, infos, expected, quant)
        prefixes = {layer_of(p): p for p in by_prefix}
        n_experts = {layer_of(p): len(e["w1"].parts) for p, e in by_prefix.items()}
        top_k = {layer_of(p): top_k_of(p) for p in by_prefix}
        specs = plan_expert_layers({layer_of(p): e for p, e in by_prefix.items()}, n_experts, convert, prefixes)
    else:
        convert = ExpertConversion(fp4, dtype)
        layer_sources, shapes, prefixes, n_experts, top_k = {}, {}, {}, {}, {}
        for (prefix, proj), pairs in sources.items():
            layer = layer_of(prefix)
            layer_sources[(layer, proj)] = pairs
            shapes[(layer, proj)] = tuple(expected[f"{prefix}.{proj}.weight"].shape[1:])
            prefixes[layer] = prefix
            n_experts[layer] = len(pairs)
            top_k[layer] = top_k_of(prefix)
        specs = plan_experts(infos, layer_sources, shapes, n_experts, convert, prefixes)
    auto = budget == "auto"
    if auto:
        resident = sum(a.nbytes for k, a in weights.items() if not _ROUTED_LEAF.match(k))
        budget, engram = auto_budget(resident, args,
                                     sum(s.slot_bytes * len(s.experts) for s in specs.values()))
        if budget is None:
            return None, engram
    try:
        return ExpertStore(specs, convert, budget, top_k, policy=policy or DEFAULT_POLICY), 0
    except ExpertBudgetError as e:
        if not auto:
            raise
        from ..expert_plan import AUTO_CONTEXT_TOKENS, AUTO_MEMORY_SHARE

        raise ExpertBudgetError(
            f"expert budget 'auto': {AUTO_MEMORY_SHARE:.0%} of this machine's memory minus the other weights and a "
            f"{AUTO_CONTEXT_TOKENS:,}-token KV cache leaves too little for the experts ({e})") from None
