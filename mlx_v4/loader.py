"""Build a Model from a directory or repo id: config, weights, quantized layers, dtype."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import platform
from .config import ModelArgs
from .expert_plan import AUTO_CONTEXT_TOKENS, AUTO_MEMORY_SHARE, auto_expert_budget
from .generation import load_generation_defaults
from .model import Model
from .weights import apply_quantization, load_weights, resolve_model_path, validate_weights


def _weights_id(path: Path) -> str:
    """Identity of the checkpoint files (names and sizes), cheap to compute."""
    files = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


_ROUTED = re.compile(r"(?:(?:dspark\.)?layers|mtp)\.\d+\.ffn\.experts\.w[123](\.(weight|scales|biases))?")


def _expert_store(path: Path, args, weights, quantization: dict, budget, *, fp8: str, dtype, policy):
    """The store for every planned routed expert, the drafter's (MTP, DSpark) included; their
    weights and quantization leave ``weights``/``quantization`` (never read resident). Routed
    experts the plan does not cover stay in ``weights``, resident, and "auto" counts them there."""
    from . import experts
    from .cache import planned_nbytes
    from .weights import read_own_quantization, scan_checkpoint

    qc = args.quantization_config or {}
    block = tuple(int(b) for b in (qc.get("weight_block_size") or (128, 128)))
    convert = experts.Conversion(fp8, "mxfp4", dtype, block, read_own_quantization(path))
    specs = experts.plan_layers(scan_checkpoint(path), args, convert)
    planned = {s.prefix for s in specs.values()}
    routed = [k for k in weights if _ROUTED.fullmatch(k) and k.rsplit(".", 2)[0] in planned]
    auto = budget == "auto"
    if auto:
        skip = set(routed)
        resident = sum(a.nbytes for k, a in weights.items() if k not in skip)
        all_experts = sum(s.slot_bytes * len(s.experts) for s in specs.values())
        budget = auto_expert_budget(resident, planned_nbytes(args, AUTO_CONTEXT_TOKENS), all_experts,
                                    platform.total_memory_bytes())
        if budget is None:
            return None
        budget = max(budget, 0)
    for name in routed:
        del weights[name]  # never evaluated, so never read
    for module in [k for k in quantization if _ROUTED.fullmatch(k) and k.rsplit(".", 1)[0] in planned]:
        del quantization[module]
    try:
        return experts.ExpertStore(specs, convert, budget, args.num_experts_per_tok,
                                   policy=policy or experts.DEFAULT_POLICY)
    except experts.ExpertBudgetError as e:
        if not auto:
            raise
        raise experts.ExpertBudgetError(
            f"expert budget 'auto': {AUTO_MEMORY_SHARE:.0%} of this machine's memory minus the other weights and a "
            f"{AUTO_CONTEXT_TOKENS:,}-token KV cache leaves too little for the experts ({e})") from None


def load_model(path_or_repo, *, model_config: dict | None = None, dtype=None, fp8: str | None = None,
               expert_budget=None, expert_policy: str | None = None):
    """-> (model, model directory). See :func:`mlx_v4.load`."""
    from .experts import attach, parse_budget

    budget = parse_budget(expert_budget)  # a bad value fails before anything is read
    path = resolve_model_path(str(path_or_repo))
    from .v41.config import is_v41_checkpoint

    if is_v41_checkpoint(path):  # DeepSeek V4.1: its own model and loader (mlx_v4/v41)
        from .v41.weights import load_v41

        return load_v41(path, model_config=model_config, dtype=dtype, fp8=fp8, expert_budget=budget,
                        expert_policy=expert_policy)
    args = ModelArgs.from_file(path, model_config)
    dtype = dtype or platform.default_dtype()
    fp8 = fp8 or ("mxfp8" if platform.metal_available() else "dequantize")
    weights, quantization = load_weights(path, args, fp8=fp8, dtype=dtype)
    store = None
    if budget is not None:
        store = _expert_store(path, args, weights, quantization, budget, fp8=fp8, dtype=dtype, policy=expert_policy)
    model = Model(args)
    if any(k.startswith("mtp.") for k in weights):
        from .draft.mtp import attach_mtp

        attach_mtp(model)  # the release's drafter (mtp.0.*), for speculative decoding
    if any(k.startswith("dspark.") for k in weights):
        from .draft.dspark import attach_dspark

        attach_dspark(model)  # V4-Flash-0731's drafter (mtp.0-2.*), for speculative decoding
    apply_quantization(model, quantization)
    if store is not None:
        attach(model, store)
    # Every parameter must come from the checkpoint, in the dtype weights.py chose for it.
    validate_weights(weights, dict(tree_flatten(model.parameters())))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.weights_id = _weights_id(path)
    model.generation_defaults = load_generation_defaults(path)
    model.eval()
    return model, path
