"""`mlx-v4 info flash --memory 64GB`: which recipe and expert budget fit each Mac, streaming the
routed experts from SSD (mlx_v4.experts) where they do not all fit.

For each Mac size and recipe: the non-expert weights (the drafter's, MTP or DSpark, included),
the KV cache at the context and a fixed overhead stay resident; what is left of the GPU's share
of memory is the expert budget, the drafter's routed experts streaming with the model's. The
decode speed is a PROJECTION, not a measurement: bytes read per token = (1 - hit rate) x top-k
x MoE layers (the drafter's too) x one expert's bytes, divided by the SSD bandwidth you state.
The hit rate at a resident fraction comes from benchmarks/expert_stream.py on a synthetic model with a
near-uniform router (the worst case: a trained router is uneven, which only helps); the real
Flash routing pattern was not measured. Compute time is left out, so the figure is an upper
bound set by the SSD alone.
"""

from __future__ import annotations

from dataclasses import dataclass

MAC_SIZES_GB = (24, 36, 48, 64, 96, 128, 192, 256)
GPU_FRACTION = 0.75  # what macOS lets the GPU wire by default
FIXED_OVERHEAD = 2e9  # activations, MLX buffers, tokenizer, Python (as cli/info.py)
#: (bits per routed-expert weight, bits per other matrix weight), best quality first; the names
#: are convert's recipes. Affine: + 0.5 bit (fp16 scale and bias per 64); mx: + 0.25 bit.
STREAM_RECIPES = {
    "native": (4.25, 8.25),  # the release's own FP4 experts / FP8 elsewhere, unrounded
    "3bit-experts": (3.5, 8.5),
    "2bit-experts": (2.5, 8.5),
}
#: Hit rate at a fraction of the experts resident, measured by
#: `python benchmarks/expert_stream.py` (router skew 0, LFU; see BENCHMARKS.md). At 100% the
#: steady state is 1 (the 96% measured there is the first touch of each expert).
MEASURED_HIT_RATES = {0.0: 0.0, 0.125: 0.21, 0.25: 0.407, 0.5: 0.674, 1.0: 1.0}
DEFAULT_SSD_GBPS = 5.0
#: The smallest projected speed worth recommending a better-quality recipe for.
DEFAULT_TARGET_TPS = 2.0


def hit_rate(fraction: float) -> float:
    """Linear interpolation of the measured hit rates."""
    points = sorted(MEASURED_HIT_RATES.items())
    fraction = min(max(fraction, 0.0), 1.0)
    for (f0, h0), (f1, h1) in zip(points, points[1:]):
        if fraction <= f1:
            return h0 + (h1 - h0) * (fraction - f0) / (f1 - f0)
    return 1.0


@dataclass
class Option:
    recipe: str
    fits: bool  # at all (the budget holds one layer's top-k)
    resident: bool  # every expert resident: no streaming
    budget: float  # expert budget bytes (all experts when resident)
    expert_bytes: float
    hit: float
    read_per_token: float
    tps: float | None  # projected, SSD-bound; None when resident

    @property
    def fraction(self) -> float:
        return min(1.0, self.budget / self.expert_bytes) if self.expert_bytes else 1.0


@dataclass
class Row:
    memory_gb: int
    options: list[Option]
    choice: Option | None


def moe_experts(args) -> tuple[int, int, int]:
    """(routed experts over every MoE layer, experts read per token, the largest top-k), the
    drafter's MoE layers included (counted once per token: an upper bound, a drafter runs once
    per drafting step)."""
    from .drafter_plan import drafter_size

    L, E, k = args.num_hidden_layers, args.n_routed_experts, args.num_experts_per_tok
    d = drafter_size(args)
    if d is None:
        return L * E, L * k, k
    return L * E + d.moe_layers * d.n_experts, L * k + d.moe_layers * d.top_k, max(k, d.top_k)


def drafter_parameters(args):
    """(our name, parameter) of the drafter the loader builds for ``args`` (none: empty)."""
    from mlx.utils import tree_flatten

    from .drafter_plan import drafter_module

    built = drafter_module(args)
    return [] if built is None else [(built[1] + n, p) for n, p in tree_flatten(built[2].parameters())]


def parameter_counts(args) -> tuple[int, int, int]:
    """(routed expert weights, other matrix weights, 16-bit rest) as cli/info.parameter_bytes
    classifies them, the drafter's (MTP, DSpark) included (shapes only; nothing allocated)."""
    import math

    from mlx.utils import tree_flatten

    from mlx_v4.model import Model

    experts = matrices = rest = 0
    for name, p in tree_flatten(Model(args).parameters()) + drafter_parameters(args):
        n = math.prod(p.shape)
        if ".experts." in name and "shared" not in name:
            experts += n
        elif p.ndim >= 2 and not name.startswith("embed") and "tid2eid" not in name:
            matrices += n
        else:
            rest += n
    return experts, matrices, rest


def _sizes(counts: tuple[int, int, int], expert_bits: float, other_bits: float) -> tuple[float, float]:
    """(routed expert bytes, other bytes)."""
    experts, matrices, rest = counts
    return experts * expert_bits / 8, matrices * other_bits / 8 + rest * 2


def option(args, recipe: str, memory: float, kv: float, ssd_bytes_per_s: float, sizes: tuple[float, float],
           moe: tuple[int, int, int] | None = None) -> Option:
    """One recipe on one Mac: ``sizes`` = (routed expert bytes, other bytes) in that recipe;
    ``moe`` as :func:`moe_experts` gives it (the default)."""
    experts, other = sizes
    usable = GPU_FRACTION * memory
    n_experts, per_token, k = moe_experts(args) if moe is None else moe
    one = experts / n_experts
    fixed = other + kv + FIXED_OVERHEAD + 0.03 * other
    if fixed + experts * 1.03 <= usable:
        return Option(recipe, True, True, experts, experts, 1.0, 0.0, None)
    budget = max(0.0, (usable - fixed) / 1.03)
    fits = budget >= k * one
    h = hit_rate(budget / experts) if fits else 0.0
    read = (1 - h) * per_token * one
    return Option(recipe, fits, False, budget, experts, h, read, ssd_bytes_per_s / read if fits and read else None)


def stream_plan(args, *, context: int, ssd_gbps: float = DEFAULT_SSD_GBPS,
                target_tps: float = DEFAULT_TARGET_TPS, sizes_gb=MAC_SIZES_GB, kv: float | None = None,
                counts: tuple[int, int, int] | None = None, recipes: dict | None = None) -> list[Row]:
    """Per Mac size: every recipe's option and the suggested one: the best quality that keeps
    every expert resident or is projected at ``target_tps`` or more, else the fastest that fits.
    ``kv``, ``counts`` (see :func:`parameter_counts`) and ``recipes`` default to V4's."""
    from mlx_v4.cache import planned_nbytes

    kv = planned_nbytes(args, context) if kv is None else kv
    counts = parameter_counts(args) if counts is None else counts
    recipes = STREAM_RECIPES if recipes is None else recipes
    sizes = {r: _sizes(counts, *bits) for r, bits in recipes.items()}
    moe = moe_experts(args)
    rows = []
    for gb in sizes_gb:
        opts = [option(args, r, gb * 2**30, kv, ssd_gbps * 1e9, sizes[r], moe) for r in recipes]
        fitting = [o for o in opts if o.fits]
        choice = (next((o for o in fitting if o.resident or (o.tps and o.tps >= target_tps)), None)
                  or max(fitting, key=lambda o: o.tps or 0.0, default=None))
        rows.append(Row(gb, opts, choice))
    return rows
