"""Where each routed expert lives on disk, and how its bytes become the arrays the resident model
would hold: the plan :class:`mlx_v4.experts.ExpertStore` reads from.

V4 plans its experts from :func:`mlx_v4.weights.plan_checkpoint` (:func:`plan_layers`); any
other layout (DeepSeek V4.1, mlx_v4/v41/streaming.py) hands :func:`plan_expert_layers` the
expert tensors of each layer and a conversion, and gets the same per-layer specs.

Store layers are numbered as the model builds them: the main layers ``0 .. n-1``, then the
drafter's MoE layers, which the model builds as layers ``n ..`` too (V4's MTP block ``mtp.0`` is
layer n; DSpark stage i, ``dspark.layers.i``, is layer n + i). :func:`store_layer` maps names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from .weights import TensorInfo, WeightsError, materialise, plan_checkpoint

_EXPERT_STACK = re.compile(r"((?:dspark\.layers|layers|mtp)\.(\d+))\.ffn\.experts\.(w[123])\.weight")
_MX_DTYPE = {"BF16": mx.bfloat16, "F16": mx.float16, "F32": mx.float32, "I8": mx.int8, "U8": mx.uint8,
             "F8_E4M3": mx.uint8, "F8_E5M2": mx.uint8, "F8_E8M0": mx.uint8, "I16": mx.int16, "U16": mx.uint16,
             "I32": mx.int32, "U32": mx.uint32, "I64": mx.int64, "U64": mx.uint64}
_ITEM = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2,
         "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


#: Context the "auto" expert budget plans the KV cache for, and the share of memory it may use.
AUTO_CONTEXT_TOKENS = 32768
AUTO_MEMORY_SHARE = 0.75


def store_layer(block: str, n_layers: int) -> int:
    """A MoE block's name -> its store layer: ``layers.N`` -> N, ``mtp.0`` -> n_layers (the MTP
    block), ``dspark.layers.I`` -> n_layers + I (the DSpark stages)."""
    kind, _, index = block.rpartition(".")
    return int(index) + (0 if kind == "layers" else n_layers)


def expert_prefix(block: str) -> str:
    """``layers.3`` -> ``layers.3.ffn.experts``: the module the store's slots stand for."""
    return f"{block}.ffn.experts"


def auto_expert_budget(resident_bytes: int, kv_bytes: int, experts_bytes: int, total_memory: int) -> int | None:
    """What "auto" means: the memory left (of ``AUTO_MEMORY_SHARE`` of the machine's) after the
    resident weights and the planned KV cache; None when every expert fits."""
    left = int(total_memory * AUTO_MEMORY_SHARE) - resident_bytes - kv_bytes
    return None if left >= experts_bytes else left


@dataclass(frozen=True)
class _Run:
    """Adjacent bytes of one expert in one file: a single read."""

    file: Path
    offset: int
    nbytes: int


@dataclass
class _ExpertSource:
    runs: list[_Run]
    entries: dict[str, object]  # "w1" -> weights' planned entry holding just this expert's tensors


@dataclass
class _LayerSpec:
    experts: list[_ExpertSource]
    arrays: dict[str, tuple[tuple[int, ...], mx.Dtype]]  # "w1.weight" -> (shape, dtype) of one expert
    quant: dict[str, dict | None]  # "w1" -> quantization parameters (None: dense)
    slot_bytes: int
    read_bytes: int  # bytes read per miss
    prefix: str  # the module of the resident model these experts stand for ("mtp.0.ffn.experts")

    @property
    def reads_per_expert(self) -> int:
        return max(len(e.runs) for e in self.experts)


def _tensors(part) -> list[TensorInfo]:
    return [t for t in (part.w, part.scale, part.scales, part.biases) if t is not None]


def _slice_expert(info: TensorInfo, e: int) -> TensorInfo:
    """Expert ``e`` of a stacked tensor [E, ...] (its bytes are contiguous)."""
    per = _ITEM[info.dtype] * math.prod(info.shape[1:])
    return replace(info, shape=info.shape[1:], offset=info.offset + e * per)


def _runs(infos: list[TensorInfo]) -> list[_Run]:
    spans = sorted({(t.file, t.offset, _ITEM[t.dtype] * math.prod(t.shape)) for t in infos},
                   key=lambda s: (str(s[0]), s[1]))
    runs: list[_Run] = []
    for f, off, n in spans:
        last = runs[-1] if runs else None
        if last is not None and last.file == f and last.offset + last.nbytes >= off:
            runs[-1] = _Run(f, last.offset, max(last.nbytes, off + n - last.offset))
        else:
            runs.append(_Run(f, off, n))
    return runs


@dataclass
class Conversion:
    """How the loader converts tensors (so a slot is bit-identical to the resident stack)."""

    fp8: str
    fp4: str
    dtype: mx.Dtype
    block: tuple[int, int]
    own: dict

    def __call__(self, name: str, entry, get) -> tuple[dict[str, mx.array], dict | None]:
        return materialise(name, entry, get, fp8=self.fp8, fp4=self.fp4, dtype=self.dtype, block=self.block,
                           own=self.own)


def plan_layers(infos: dict[str, TensorInfo], args, convert: Conversion) -> dict[int, _LayerSpec]:
    """The routed experts of a V4 checkpoint, per store layer (the drafter's, MTP or DSpark,
    after the main layers): where each expert's tensors are, and the shapes, dtypes and
    quantization they load as."""
    entries, _ = plan_checkpoint(infos, args)
    by_layer: dict[int, dict[str, object]] = {}
    prefixes: dict[int, str] = {}
    for name, entry in entries.items():
        if m := _EXPERT_STACK.fullmatch(name):
            layer = store_layer(m.group(1), args.num_hidden_layers)
            by_layer.setdefault(layer, {})[m.group(3)] = entry
            prefixes[layer] = expert_prefix(m.group(1))
    return plan_expert_layers(by_layer, args.n_routed_experts, convert, prefixes)


def plan_expert_layers(by_layer: dict[int, dict[str, object]], n_experts: int | dict[int, int], convert,
                       prefixes: dict[int, str] | None = None) -> dict[int, _LayerSpec]:
    """{layer: {"w1"|"w2"|"w3": planned entry}} -> per-layer specs. An entry holds one part per
    expert or one stacked part [E, ...]; ``convert(name, entry of one expert, get)`` turns one
    expert's source tensors into {"<module>.<leaf>": array}, quantization (as the loader does).
    ``n_experts`` and ``prefixes`` (the resident module, default ``layers.N.ffn.experts``) may
    differ per layer (a drafter's own MoE)."""
    specs = {}
    for layer, mats in sorted(by_layer.items()):
        E = n_experts[layer] if isinstance(n_experts, dict) else n_experts
        prefix = (prefixes or {}).get(layer, f"layers.{layer}.ffn.experts")
        if set(mats) != {"w1", "w2", "w3"}:
            raise WeightsError(f"layer {layer}: routed experts need w1, w2 and w3; the checkpoint has {sorted(mats)}")
        experts = []
        for e in range(E):
            per: dict[str, object] = {}
            for w, entry in mats.items():
                if len(entry.parts) == E:  # one tensor per expert (official, mlx-v4 contiguous)
                    part = entry.parts[e]
                else:  # one stacked tensor [E, ...] (mlx-v4 stacked, transformers)
                    p = entry.parts[0]
                    part = replace(p, **{f: _slice_expert(getattr(p, f), e) for f in ("w", "scale", "scales", "biases")
                                         if getattr(p, f) is not None})
                per[w] = replace(entry, parts=[part])
            experts.append(_ExpertSource(_runs([t for en in per.values() for t in _tensors(en.parts[0])]), per))
        shapes, quant = {}, {}
        for w, entry in experts[0].entries.items():
            arrays, q = convert(f"{prefix}.{w}.weight", entry,
                                lambda i: mx.zeros(i.shape, _MX_DTYPE[i.dtype]))  # lazy: shapes only
            quant[w] = q
            for k, a in arrays.items():
                shapes[f"{w}.{k.rsplit('.', 1)[1]}"] = (tuple(a.shape), a.dtype)
        slot = sum(math.prod(s) * d.size for s, d in shapes.values())
        read = max(sum(r.nbytes for r in ex.runs) for ex in experts)
        specs[layer] = _LayerSpec(experts, shapes, quant, max(slot, read), read, prefix)
    return specs
