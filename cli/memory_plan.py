"""What the memory planners share (`mlx-v4 info` for V4 and V4.1): the plan of one model on one
machine, the Mac sizes it is judged against, and the bits per weight of convert's recipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .common import UserError

MAC_SIZES_GB = (36, 48, 64, 96, 128, 192, 256, 512)
# macOS lets the GPU wire about 75% of unified memory by default; `sudo sysctl
# iogpu.wired_limit_mb=...` raises that to roughly all but a few GB.
DEFAULT_GPU_FRACTION = 0.75
RAISED_RESERVE_BYTES = 8e9

AFFINE_OVERHEAD_BITS = 0.5  # --bits: a bf16 scale and bias per 64 values

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
