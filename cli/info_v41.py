"""`mlx-v4 info v41-flash` (or a DeepSeek V4.1 checkpoint): weights, Engram tables, KV cache.

The Engram tables (about 197B parameters, 2 x ~101 GB as released) are read from disk on demand
(mlx_v4.v41.engram), so they are listed apart and not counted in memory. The KV cache is the
packed V4.1 layout: windows on every layer plus the entries of the four kv sources
(mlx_v4.v41.cache.bytes_per_token). ``--memory`` plans the expert budget (cli/stream_plan.py's
projection): routed experts and Engram tables share it, tables only once every expert fits.
"""

from __future__ import annotations

import math
from pathlib import Path

from .common import UserError

PRESET = "v41-flash"


def is_v41_model(model: str) -> bool:
    if model == PRESET:
        return True
    from mlx_v4.v41.config import is_v41_checkpoint

    p = Path(model).expanduser()
    return p.is_dir() and is_v41_checkpoint(p)


def weight_bits(expert_bits: float, other_bits: float):
    """-> bits(name, shape): routed experts, other matrices, 16-bit rest (as V4.1 is counted)."""
    def bits(name: str, shape: tuple[int, ...]) -> float:
        if ".experts." in name and "shared" not in name:
            return expert_bits
        return other_bits if len(shape) >= 2 and not name.startswith("embed") else 16.0
    return bits


def parameter_bytes(args, expert_bits: float, other_bits: float) -> tuple[float, float, float]:
    """(parameters, bytes) of the resident model without its drafter, and the Engram tables'
    parameters."""
    from mlx.utils import tree_flatten

    from mlx_v4.v41.model import Model

    token_map = (range(args.engram_compressed_vocab_size), args.engram_compressed_vocab_size)
    bits = weight_bits(expert_bits, other_bits)
    count, nbytes = 0, 0.0
    for name, p in tree_flatten(Model(args, token_map if args.engram_layer_ids else None).parameters()):
        n = math.prod(p.shape)
        count += n
        nbytes += n * bits(name, tuple(p.shape)) / 8
    engram = float(sum(args.engram_num_embeddings)) * args.engram_head_dim
    return count, nbytes, engram


def _has_drafter_tensors(path: Path) -> bool:
    from mlx_v4.weights import WeightsError, scan_checkpoint

    try:
        return any(n.startswith(("mtp.", "dspark.")) for n in scan_checkpoint(path))
    except (OSError, WeightsError):
        return False


def load_args(model: str):
    """-> (V41Args, display name) of the preset or a checkpoint directory."""
    from mlx_v4.v41.config import V41Args, preset

    if model == PRESET:
        return preset(PRESET), "DeepSeek V4.1 Flash"
    return V41Args.from_file(Path(model).expanduser()), model


def parameter_counts(args) -> tuple[int, int, int]:
    """(routed expert weights, other matrix weights, the rest) as cli/stream_plan counts V4's, the
    drafter's included; the Engram tables are not parameters of the model (they stay on disk)."""
    from mlx.utils import tree_flatten

    from mlx_v4.v41.model import Model

    from .stream_plan import drafter_parameters

    token_map = (range(args.engram_compressed_vocab_size), args.engram_compressed_vocab_size)
    experts = matrices = rest = 0
    model = Model(args, token_map if args.engram_layer_ids else None)
    for name, p in tree_flatten(model.parameters()) + drafter_parameters(args):  # the DSpark drafter too
        n = math.prod(p.shape)
        if ".experts." in name and "shared" not in name:
            experts += n
        elif p.ndim >= 2 and not name.startswith("embed"):
            matrices += n
        else:
            rest += n
    return experts, matrices, rest


def engram_read_per_token(args) -> tuple[int, float]:
    """(rows, bytes) read from the Engram tables per token: one row per n-gram size and head on
    each Engram layer (FP8 codes + one E8M0 byte per 32)."""
    rows = (args.engram_max_ngram_size - 1) * args.engram_n_heads * len(args.engram_layer_ids)
    return rows, rows * args.engram_head_dim * 33 / 32


def stream_plan_v41(model: str, memory_gb: int, *, context: int, ssd_gbps: float, sizes_gb):
    """`info v41-flash --memory`: the expert budget per Mac for the release's FP4/FP8 weights
    (the "native" recipe: V4.1 conversions are not planned here) -> (title, rows, notes)."""
    from mlx_v4.experts import format_bytes
    from mlx_v4.v41.cache import bytes_per_token

    from .stream_plan import FIXED_OVERHEAD, GPU_FRACTION, STREAM_RECIPES, _sizes, stream_plan

    args, name = load_args(model)
    if context > args.max_position_embeddings:
        raise UserError(f"--context {context} is past this model's maximum {args.max_position_embeddings}",
                        "choose a smaller --context")
    per = bytes_per_token(args)
    kv = per["total"] * context + per["window_constant"]
    counts = parameter_counts(args)
    rows = stream_plan(args, context=context, ssd_gbps=ssd_gbps, sizes_gb=sizes_gb, kv=kv, counts=counts,
                       recipes={"native": STREAM_RECIPES["native"]})
    # a table is resident only when it fits after every expert (ExpertStore.admit_tables)
    experts, other = _sizes(counts, *STREAM_RECIPES["native"])
    smallest = min(args.engram_num_embeddings, default=0) * args.engram_head_dim * 33 / 32
    holds = [r.memory_gb for r in rows if GPU_FRACTION * r.memory_gb * 2**30 - other * 1.03 - kv - FIXED_OVERHEAD
             - experts * 1.03 >= smallest > 0]
    tables = float(sum(args.engram_num_embeddings)) * args.engram_head_dim * 33 / 32
    n_rows, row_bytes = engram_read_per_token(args)
    where = f"from {holds[0]} GB up" if holds else "on none of these Macs"
    notes = [f"Engram tables: {format_bytes(tables)} on disk, in the same budget as the experts: a table is held "
             f"in memory only once every routed expert fits and it fits after them ({where}), since a byte of "
             f"budget saves far more reads as experts. Each token reads {n_rows} Engram rows "
             f"({row_bytes / 1e3:.1f} KB in {n_rows} small random reads the OS page cache partly absorbs), "
             "not included in read/tok*."]
    from .memory_plan import stream_drafter_note

    drafter = stream_drafter_note(args)
    return name, rows, notes + ([drafter] if drafter else [])


def plan_v41(model: str, *, recipe: str | None, bits: float | None, context: int):
    from mlx_v4 import platform
    from mlx_v4.v41.cache import bytes_per_token

    from .memory_plan import MemoryPlan, split_bits

    # the same recipe names and bits as convert and `info flash` (quantize/recipes.py)
    expert_bits, other_bits = split_bits(recipe, bits)
    label = f"{bits:g}-bit" if bits is not None else (recipe or "native")
    args, name = load_args(model)
    if context > args.max_position_embeddings:
        raise UserError(f"--context {context} is past this model's maximum {args.max_position_embeddings}",
                        "choose a smaller --context")
    params, weights, engram = parameter_bytes(args, expert_bits, other_bits)
    drafter = None
    if model == PRESET or _has_drafter_tensors(Path(model).expanduser()):  # the loader drops mtp.* it cannot run
        from .drafter_plan import drafter_size

        drafter = drafter_size(args, weight_bits(expert_bits, other_bits))
        weights += drafter.nbytes if drafter else 0.0
    converted = converted_sizes(Path(model).expanduser()) if model != PRESET and recipe is None and bits is None else None
    if converted is not None:  # an `mlx-v4 convert` output: its own files say what it weighs (drafter included)
        weights, label = converted[0], converted[2]
    per_token = bytes_per_token(args)
    kv = per_token["total"] * context + per_token["window_constant"]
    notes = [
        f"Engram tables: {engram / 1e9:.0f}B parameters ({engram * 8.25 / 8 / 1e9:.0f} GB as FP8) stay on disk "
        "and are read row by row; not counted above.",
        f"Smaller Mac? Routed experts stream from SSD within one budget with the Engram tables: "
        f"mlx-v4 info {model} --memory 256GB.",
        f"KV cache grows {per_token['total']:.0f} bytes per token (compressed {per_token['compressed']:.0f}, "
        f"index keys {per_token['index_keys']:.0f}; shared across layers) plus "
        f"{per_token['window_constant'] / 1e6:.1f} MB of windows.",
        "Images are not supported (text model only).",
    ]
    if drafter is not None:
        from .memory_plan import drafter_note

        notes.insert(0, drafter_note(drafter))
    if converted is not None:
        notes.insert(0, f"Converted by mlx-v4 convert with the {label} recipe: {_size(converted[0])} of weights in "
                        f"memory, {_size(converted[1])} of Engram tables on disk (as released).")
    return MemoryPlan(name=name, weights_bytes=weights,
                      weights_source=f"{label}, from the conversion's files" if converted else f"{label}, from parameter counts",
                      context=context, cache_bytes=kv, params=params, machine_bytes=platform.total_memory_bytes(),
                      notes=notes, drafter=drafter)


def converted_sizes(path: Path) -> tuple[int, int, str] | None:
    """(weight bytes held in memory, Engram table bytes on disk, recipe) of a directory written by
    ``mlx-v4 convert``, from its shard headers; None for anything else."""
    import json

    from mlx_v4.weights import scan_checkpoint

    try:
        conversion = json.loads((path / "config.json").read_text()).get("mlx_v4_conversion")
    except (OSError, ValueError):
        return None
    if not isinstance(conversion, dict):
        return None
    item = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4, "I32": 4, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1}
    held, tables = 0, 0
    for name, info in scan_checkpoint(path).items():
        nbytes = item.get(info.dtype, 1) * math.prod(info.shape)
        if ".engram.embed." in name:
            tables += nbytes
        else:
            held += nbytes
    return held, tables, str(conversion.get("recipe"))


def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"
