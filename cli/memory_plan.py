"""What the memory planners share (`mlx-v4 info` for V4 and V4.1): the plan of one model on one
machine, the Mac sizes it is judged against, and the bits per weight of convert's recipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .common import UserError
from .drafter_plan import Drafter, drafter_size, format_count

MAC_SIZES_GB = (36, 48, 64, 96, 128, 192, 256, 512)
# macOS lets the GPU wire about 75% of unified memory by default; `sudo sysctl
# iogpu.wired_limit_mb=...` raises that to roughly all but a few GB.
DEFAULT_GPU_FRACTION = 0.75
RAISED_RESERVE_BYTES = 8e9

AFFINE_OVERHEAD_BITS = 0.5  # --bits: a bf16 scale and bias per 64 values

def checkpoint_drafter_bytes(directory) -> tuple[float, float] | None:
    """(all, routed experts') bytes of a local checkpoint's drafter tensors (``mtp.*``, a
    conversion's ``dspark.*``), from the shard headers; None when there are none or the headers
    cannot be read."""
    from mlx_v4.weights import WeightsError, scan_checkpoint

    item = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "F8_E4M3": 1,
            "F8_E8M0": 1}
    try:
        infos = scan_checkpoint(directory)
    except (OSError, WeightsError):
        return None
    sizes = {n: item.get(i.dtype, 1) * math.prod(i.shape) for n, i in infos.items() if n.startswith(("mtp.", "dspark."))}
    routed = sum(b for n, b in sizes.items() if ".ffn.experts." in n)
    return (float(sum(sizes.values())), float(routed)) if sizes else None


def checkpoint_drafter(directory, args) -> Drafter | None:
    """The drafter a checkpoint directory holds (its tensors, not only its config): its bytes
    from the shard headers where they are here, else (a repo's index alone) estimated from its
    parameter counts as the release stores them."""
    d = drafter_size(args, recipe_bits(get_recipe("native")))
    if d is None:
        return None
    on_disk = checkpoint_drafter_bytes(directory)
    if on_disk is not None:
        d.nbytes, d.expert_bytes = on_disk
        return d
    try:
        import json
        from pathlib import Path

        names = json.loads((Path(directory) / "model.safetensors.index.json").read_text())["weight_map"]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return d if any(n.startswith(("mtp.", "dspark.")) for n in names) else None


def drafter_note(d: Drafter) -> str:
    from mlx_v4.experts import format_bytes

    return (f"Drafter ({d.kind}, for speculative decoding): {format_count(d.params)} parameters, "
            f"{format_bytes(d.nbytes)}, included in the weights above (parameters count the main model only). "
            f"Under --expert-budget its routed experts ({format_bytes(d.expert_bytes)}) stream with the model's, "
            "in the same budget.")


@dataclass
class MemoryPlan:
    name: str
    weights_bytes: float
    weights_source: str
    context: int
    cache_bytes: float
    params: float | None = None
    machine_bytes: float = 0
    notes: list[str] = field(default_factory=list)
    drafter: Drafter | None = None  # its bytes are in weights_bytes; params are the main model's

    @property
    def overhead_bytes(self) -> float:
        # activations of a prefill chunk, MLX buffer cache, the tokenizer and Python: a rough
        # fixed part plus a small share of the weights.
        return 2e9 + 0.03 * self.weights_bytes

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.cache_bytes + self.overhead_bytes

    def verdict(self, memory_bytes: float) -> str:
        if self.total_bytes <= DEFAULT_GPU_FRACTION * memory_bytes:
            return "yes"
        if self.total_bytes <= memory_bytes - RAISED_RESERVE_BYTES:
            return "tight"
        return "no"

    @property
    def fits_here(self) -> bool:
        return self.machine_bytes > 0 and self.verdict(self.machine_bytes) != "no"

    @property
    def macs(self) -> list[tuple[int, str]]:
        return [(gb, self.verdict(gb * 2**30)) for gb in MAC_SIZES_GB]


def get_recipe(name: str):
    """convert's recipe ``name`` (aliases accepted); a UserError listing the choices."""
    from mlx_v4.quantize.recipes import ConvertError
    from mlx_v4.quantize.recipes import get_recipe as _get

    try:
        return _get(name)
    except ConvertError as e:
        raise UserError(str(e), "mlx-v4 convert --help describes each recipe") from None


def recipe_bits(recipe):
    """-> bits(name, shape): stored bits per weight of each parameter under convert's ``recipe``
    (the tensor classes and shape rules conversion uses; ``native`` as the release stores it)."""
    from mlx_v4.quantize.recipes import bits_per_weight, choose, classify

    def bits(name: str, shape: tuple[int, ...]) -> float:
        klass = classify(name)
        return 32.0 if klass == "tid2eid" else bits_per_weight(choose(name, klass, recipe, shape, None))
    return bits


def uniform_bits(bits: float):
    """--bits: every matrix but the embedding affine ``bits``; the rest 16-bit."""
    def per_weight(name: str, shape: tuple[int, ...]) -> float:
        matrix = len(shape) >= 2 and not name.startswith("embed") and "tid2eid" not in name
        return bits + AFFINE_OVERHEAD_BITS if matrix else 16.0
    return per_weight


def parameter_bytes(args, bits) -> tuple[float, float]:
    """(parameter count, bytes) of a model built from ``args`` (shapes only; nothing allocated),
    ``bits(name, shape)`` bits per weight of each parameter."""
    from mlx.utils import tree_flatten

    from mlx_v4.model import Model

    count, nbytes = 0, 0.0
    for name, p in tree_flatten(Model(args).parameters()):
        n = math.prod(p.shape)
        count += n
        nbytes += n * bits(name, tuple(p.shape)) / 8
    return count, nbytes


def split_bits(recipe: str | None, bits: float | None) -> tuple[float, float]:
    """(routed-expert bits, other matrices' bits) for the distributed planner."""
    if bits is not None:
        return bits + AFFINE_OVERHEAD_BITS, bits + AFFINE_OVERHEAD_BITS
    from mlx_v4.quantize.recipes import bits_per_weight

    rec = get_recipe(recipe or "native")
    return bits_per_weight(rec.experts), bits_per_weight(rec.linear)


def stream_drafter_note(args) -> str | None:
    """What --memory plans of the drafter (None: the model has none)."""
    d = drafter_size(args)
    if d is None:
        return None
    return (f"Included above: the {d.kind} drafter ({format_count(d.params)} parameters). Its "
            f"{d.moe_layers * d.n_experts} routed experts ({format_count(d.expert_params)} parameters) stream in the "
            f"same budget as the model's and count in read/tok* once per token (top-{d.top_k} on {d.moe_layers} "
            "layer(s)); its other weights stay resident.")
