"""DeepSeek V4.1 under one byte budget: its routed experts and its Engram tables in one store.

``mlx_v4.load(v41_checkpoint, expert_budget=...)`` reads V4.1's routed experts (384 per layer,
6 per token, FP4 with one E8M0 scale per 32 inputs, one tensor per expert as released) on
demand through :class:`mlx_v4.experts.ExpertStore`, exactly as V4's; the slots are converted
by :func:`fp4_expert_arrays`, the function the resident loader stacks with, so logits are
bit-identical. An ``mlx-v4 convert`` output is planned from its own per-expert tensors
(mlx_v4/v41/converted.py) under the same store. The DSpark drafter's routed experts (their own count and top-k) are store
layers after the backbone's, under the same budget. The Engram tables are registered with the
same store (:meth:`ExpertStore.admit_tables`): they are counted in its budget and its
statistics, and a table is held resident only when it fits beside every routed expert (why:
see admit_tables).
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..weights import MXFP4, TensorInfo, WeightsError, _Entry, _Part, dequantize_fp4


def fp4_expert_arrays(w: mx.array, s: mx.array, fp4: str, dtype: mx.Dtype) -> tuple[dict[str, mx.array], dict | None]:
    """Packed FP4 expert weight(s) [..., out, in/2] + E8M0 scales [..., out, in/32] -> ({"weight",
    ["scales"]}, quantization or None), for one expert or the stack of all of them alike."""
    if fp4 == "mxfp4" and w.shape[-1] % 4 == 0:
        return {"weight": w.view(mx.uint8).view(mx.uint32), "scales": s.view(mx.uint8)}, MXFP4
    return {"weight": dequantize_fp4(w, s).astype(dtype)}, None


class ExpertConversion:
    """One V4.1 expert's source tensors -> its arrays, as :func:`load_v41` converts the stack."""

    def __init__(self, fp4: str, dtype: mx.Dtype):
        self.fp4, self.dtype = fp4, dtype

    def __call__(self, name: str, entry: _Entry, get) -> tuple[dict[str, mx.array], dict | None]:
        part = entry.parts[0]
        arrays, quant = fp4_expert_arrays(get(part.w), get(part.scale), self.fp4, self.dtype)
        module = name.removesuffix(".weight")
        return {f"{module}.{k}": v for k, v in arrays.items()}, quant


def plan_experts(infos: dict[str, TensorInfo], sources: dict[tuple[int, str], list[tuple[str, str]]],
                 shapes: dict[tuple[int, str], tuple[int, ...]], n_experts: int | dict[int, int],
                 convert: ExpertConversion, prefixes: dict[int, str] | None = None):
    """``sources[(layer, "w1")]``: (weight, scale) tensor names of each expert, in expert order;
    ``shapes[(layer, "w1")]``: the dense [out, in] the model expects; ``n_experts`` and
    ``prefixes`` (the module, e.g. ``dspark.layers.0.ffn.experts``) per layer where they differ
    (the DSpark stages' own MoE) -> the store's layer specs."""
    from ..expert_plan import plan_expert_layers

    by_layer: dict[int, dict[str, _Entry]] = {}
    for (layer, proj), pairs in sources.items():
        out, inp = shapes[(layer, proj)]
        parts = []
        for w_name, s_name in pairs:
            w, s = infos[w_name], infos[s_name]
            if w.dtype not in ("I8", "U8") or tuple(w.shape) != (out, inp // 2):
                raise WeightsError(f"{w.file}: expert tensor '{w_name}' is {w.dtype} {list(w.shape)}, expected packed "
                                   f"FP4 (I8) {[out, inp // 2]}")
            if tuple(s.shape) != (out, math.ceil(inp / 32)):
                raise WeightsError(f"{s.file}: expert scale '{s_name}' has shape {list(s.shape)}, expected "
                                   f"{[out, math.ceil(inp / 32)]} (one E8M0 per 32 inputs)")
            parts.append(_Part(w, scale=s))
        by_layer.setdefault(layer, {})[proj] = _Entry(parts)
    return plan_expert_layers(by_layer, n_experts, convert, prefixes)


def auto_budget(resident_bytes: int, args, experts_bytes: int) -> tuple[int | None, int]:
    """``expert_budget="auto"`` for V4.1: the memory left (as for V4: a share of the machine's
    minus the resident weights and a planned KV cache) -> (None, what is left after every expert)
    when every expert fits (they load resident; Engram tables take what is left), else (the
    budget, 0)."""
    from .. import platform
    from ..expert_plan import AUTO_CONTEXT_TOKENS, auto_expert_budget
    from .cache import bytes_per_token

    per = bytes_per_token(args)
    kv = int(per["total"] * AUTO_CONTEXT_TOKENS + per["window_constant"])
    total = platform.total_memory_bytes()
    budget = auto_expert_budget(resident_bytes, kv, experts_bytes, total)
    if budget is None:
        from ..expert_plan import AUTO_MEMORY_SHARE

        return None, int(total * AUTO_MEMORY_SHARE) - resident_bytes - kv - experts_bytes
    return max(budget, 0), 0
