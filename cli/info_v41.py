"""`mlx-v4 info v41-flash` (or a DeepSeek V4.1 checkpoint): weights, Engram tables, KV cache.

The Engram tables (about 197B parameters, 2 x ~101 GB as released) are read from disk on demand
(mlx_v4.v41.engram), so they are listed apart and not counted in memory. The KV cache is the
packed V4.1 layout: windows on every layer plus the entries of the four kv sources
(mlx_v4.v41.cache.bytes_per_token).
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


def parameter_bytes(args, expert_bits: float, other_bits: float) -> tuple[float, float, float]:
    """(parameters, bytes) of the resident model, and the Engram tables' parameters."""
    from mlx.utils import tree_flatten

    from mlx_v4.v41.model import Model

    token_map = (range(args.engram_compressed_vocab_size), args.engram_compressed_vocab_size)
    count, nbytes = 0, 0.0
    for name, p in tree_flatten(Model(args, token_map if args.engram_layer_ids else None).parameters()):
        n = math.prod(p.shape)
        count += n
        if ".experts." in name and "shared" not in name:
            bits = expert_bits
        elif p.ndim >= 2 and not name.startswith("embed"):
            bits = other_bits
        else:
            bits = 16.0
        nbytes += n * bits / 8
    engram = float(sum(args.engram_num_embeddings)) * args.engram_head_dim
    return count, nbytes, engram


def plan_v41(model: str, *, recipe: str | None, bits: float | None, context: int):
    from mlx_v4 import platform
    from mlx_v4.v41.cache import bytes_per_token
    from mlx_v4.v41.config import V41Args, preset

    from .memory_plan import MemoryPlan, split_bits

    # the same recipe names and bits as convert and `info flash` (quantize/recipes.py)
    expert_bits, other_bits = split_bits(recipe, bits)
    label = f"{bits:g}-bit" if bits is not None else (recipe or "native")
    if model == PRESET:
        args, name = preset(PRESET), "DeepSeek V4.1 Flash"
    else:
        args, name = V41Args.from_file(Path(model).expanduser()), model
    if context > args.max_position_embeddings:
        raise UserError(f"--context {context} is past this model's maximum {args.max_position_embeddings}",
                        "choose a smaller --context")
    params, weights, engram = parameter_bytes(args, expert_bits, other_bits)
    converted = converted_sizes(Path(model).expanduser()) if model != PRESET and recipe is None and bits is None else None
    if converted is not None:  # an `mlx-v4 convert` output: its own files say what it weighs
        weights, label = converted[0], converted[2]
    per_token = bytes_per_token(args)
    kv = per_token["total"] * context + per_token["window_constant"]
    notes = [
        f"Engram tables: {engram / 1e9:.0f}B parameters ({engram * 8.25 / 8 / 1e9:.0f} GB as FP8) stay on disk "
        "and are read row by row; not counted above.",
        f"KV cache grows {per_token['total']:.0f} bytes per token (compressed {per_token['compressed']:.0f}, "
        f"index keys {per_token['index_keys']:.0f}; shared across layers) plus "
        f"{per_token['window_constant'] / 1e6:.1f} MB of windows.",
        "Images are not supported (text model only).",
    ]
    if converted is not None:
        notes.insert(0, f"Converted by mlx-v4 convert with the {label} recipe: {_size(converted[0])} of weights in "
                        f"memory, {_size(converted[1])} of Engram tables on disk (as released).")
    return MemoryPlan(name=name, weights_bytes=weights,
                      weights_source=f"{label}, from the conversion's files" if converted else f"{label}, from parameter counts",
                      context=context, cache_bytes=kv, params=params, machine_bytes=platform.total_memory_bytes(),
                      notes=notes)


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
