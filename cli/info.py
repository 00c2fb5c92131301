"""`mlx-v4 info`: the memory planner.

Weights come from the checkpoint itself when there is one (the safetensors index's
``metadata.total_size``, else the file sizes; for a repo id only config.json and the index are
downloaded), or for the presets from the parameter counts at the chosen bits. The KV cache is
``mlx_v4.cache.planned_nbytes`` at the requested context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from .common import REAL_MODEL, UserError, looks_like_repo, user_errors
from .convert import RECIPE_LIST
from .drafter_plan import drafter_size
from .memory_plan import (
    DEFAULT_GPU_FRACTION,
    RAISED_RESERVE_BYTES,
    MemoryPlan,
    checkpoint_drafter,
    drafter_note,
    get_recipe,
    parameter_bytes,
    recipe_bits,
    split_bits,
    stream_drafter_note,
    uniform_bits,
)


def _index_bytes(index_file: Path) -> float | None:
    try:
        return float(json.loads(index_file.read_text())["metadata"]["total_size"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _checkpoint(model: str) -> tuple[Path, float, str]:
    """(directory holding config.json, weights bytes, where the number came from)."""
    p = Path(model).expanduser()
    if p.is_dir():
        size = _index_bytes(p / "model.safetensors.index.json")
        if size is not None:
            return p, size, "safetensors index"
        files = list(p.glob("*.safetensors"))
        if not files:
            raise UserError(f"{p}: no safetensors files here", "pass a model directory with weights")
        return p, float(sum(f.stat().st_size for f in files)), "file sizes"
    if p.exists() or not looks_like_repo(model):
        raise UserError(f"no such model directory: {model}",
                        f"pass a model directory, a repo id such as {REAL_MODEL}, or flash / pro")
    from huggingface_hub import hf_hub_download

    config = Path(hf_hub_download(model, "config.json"))
    try:
        index = Path(hf_hub_download(model, "model.safetensors.index.json"))
    except Exception as e:  # a single-file repo has no index
        raise UserError(f"{model}: no model.safetensors.index.json ({type(e).__name__})",
                        "download the repo and pass its directory") from None
    size = _index_bytes(index)
    if size is None:
        raise UserError(f"{model}: the safetensors index has no metadata.total_size",
                        "download the repo and pass its directory")
    return config.parent, size, "safetensors index"


def plan(model: str, *, recipe: str | None, bits: float | None, context: int) -> MemoryPlan:
    from mlx_v4 import cache, config, platform

    from .info_v41 import is_v41_model, plan_v41

    if is_v41_model(model):  # DeepSeek V4.1 (cli/info_v41.py)
        return plan_v41(model, recipe=recipe, bits=bits, context=context)

    if bits is not None:
        per_weight, label = uniform_bits(bits), f"{bits:g}-bit"
    else:
        rec = get_recipe(recipe or "native")
        per_weight, label = recipe_bits(rec), f"recipe {rec.name}"
    notes = []
    if model in config.PRESETS:
        args = config.preset(model)
        params, weights = parameter_bytes(args, per_weight)
        drafter = drafter_size(args, per_weight)  # the release ships it and mlx-v4 loads it
        weights += drafter.nbytes if drafter else 0.0
        name, source = f"DeepSeek V4 {model.capitalize()}", f"{label}, from parameter counts"
    else:
        if model in ("demo", ""):
            import mlx_v4

            model = str(mlx_v4.DEMO_MODEL_PATH)
        directory, weights, source = _checkpoint(model)
        args = config.ModelArgs.from_file(directory)
        params, name = parameter_bytes(args, lambda n, s: 16.0)[0], model
        drafter = checkpoint_drafter(directory, args)
        if recipe is not None or bits is not None:
            notes.append("--recipe/--bits apply to flash and pro; a checkpoint is sized from its files.")
    if drafter is not None:
        notes.append(drafter_note(drafter))
    if context > args.max_position_embeddings:
        raise UserError(f"--context {context} is past this model's maximum {args.max_position_embeddings}",
                        "choose a smaller --context")
    kv = cache.planned_nbytes(args, context)
    notes.append(f"KV cache grows about {cache.bytes_per_token(args) / 1e3:.1f} KB per token after the "
                 f"{args.sliding_window}-token window.")
    notes.append("'tight' means it fits only after raising the GPU memory limit: "
                 "sudo sysctl iogpu.wired_limit_mb=<MB>.")
    if model in config.PRESETS:
        notes.append(f"Smaller Mac? Routed experts can stream from SSD: mlx-v4 info {model} --memory 64GB.")
    return MemoryPlan(name=name, weights_bytes=weights, weights_source=source, context=context,
                      cache_bytes=kv, params=params, machine_bytes=platform.total_memory_bytes(), notes=notes,
                      drafter=drafter)


def parse_memory(spec: str, machines: int) -> list[float]:
    """'192GB' or '192GB,128GB,...' (GB = 2**30 bytes, as Macs are sold) -> bytes per machine."""
    import re

    sizes = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|G|TB|T|GIB|TIB)?\s*", part, re.IGNORECASE)
        if not m:
            raise UserError(f"--memory {spec!r}: {part!r} is not a size like 192GB", "e.g. --memory 192GB,128GB")
        unit = (m.group(2) or "GB").upper()
        sizes.append(float(m.group(1)) * (2**40 if unit.startswith("T") else 2**30))
    if len(sizes) == 1:
        sizes *= machines
    if len(sizes) != machines:
        raise UserError(f"--memory gives {len(sizes)} sizes for {machines} machines",
                        "give one size for all or one per machine")
    return sizes


@dataclass
class RankPlan:
    rank: int
    layers: str
    weights_bytes: float
    cache_bytes: float
    memory_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.cache_bytes + 2e9 + 0.03 * self.weights_bytes

    @property
    def verdict(self) -> str:
        if self.total_bytes <= DEFAULT_GPU_FRACTION * self.memory_bytes:
            return "yes"
        return "tight" if self.total_bytes <= self.memory_bytes - RAISED_RESERVE_BYTES else "no"


def split_plan(model: str, *, machines: int, memory: str, parallel: str, layers: str | None, context: int,
               recipe: str | None, bits: float | None) -> tuple[str, list[RankPlan]]:
    """Per-machine weights and KV for a pipeline or tensor split (see mlx_v4.split_plan)."""
    from mlx_v4 import config
    from mlx_v4 import split_plan as planner

    one = plan(model, recipe=recipe, bits=bits, context=context)
    if model in config.PRESETS:
        args = config.preset(model)
    else:
        import mlx_v4

        directory = mlx_v4.DEMO_MODEL_PATH if model in ("demo", "") else _checkpoint(model)[0]
        args = config.ModelArgs.from_file(directory)
    expert_bits, other_bits = split_bits(recipe, bits)
    split = planner.plan_split(args, machines, parallel, layers)
    drafter = one.drafter.nbytes if one.drafter else 0.0  # ranks of a split do not load the drafter
    shares = planner.plan_ranks(args, split, context, expert_bits=expert_bits, other_bits=other_bits,
                                total_bytes=one.weights_bytes - drafter)
    sizes = parse_memory(memory, machines)
    rows = [RankPlan(s.rank, f"{s.layers[0]}-{s.layers[1] - 1}" if parallel == "pipeline" else f"all (1/{machines})",
                     s.weights_bytes, s.kv_bytes, mem) for s, mem in zip(shares, sizes)]
    return f"{one.name}, {split.describe()}, {one.weights_source}", rows


@user_errors
def info(
    model: Annotated[str, typer.Argument(help="flash, pro, v41-flash, a model directory or a Hugging Face repo id.")] = "flash",
    recipe: Annotated[str | None, typer.Option(help=f"Weight format for flash/pro, as `mlx-v4 convert` writes "
                                                    f"it: {RECIPE_LIST} (default native).")] = None,
    bits: Annotated[float | None, typer.Option(help="Uniform affine bits for flash/pro (overrides --recipe).")] = None,
    context: Annotated[int, typer.Option(help="Context length to size the KV cache for.")] = 65536,
    machines: Annotated[int, typer.Option(help="Plan a split over this many machines (mlx.launch ranks).")] = 1,
    memory: Annotated[str | None, typer.Option(help="One Mac's memory (64GB): the recipe and expert budget "
                                                     "that fit it, streaming experts from SSD. With --machines: "
                                                     "memory per machine (192GB, or 192GB,128GB).")] = None,
    ssd_gbps: Annotated[float, typer.Option(help="SSD read bandwidth (GB/s) for the streaming projection "
                                                 "with --memory.")] = 5.0,
    parallel: Annotated[str, typer.Option(help="Split for --machines: pipeline (layers) or tensor "
                                                "(heads and experts).")] = "pipeline",
    layers: Annotated[str | None, typer.Option(help="Pipeline override, e.g. 0-30,31-60.")] = None,
):
    from .ui import UI

    if context < 0:
        raise UserError("--context must be >= 0", "pass a token count such as 65536")
    if machines < 1:
        raise UserError("--machines must be >= 1", "e.g. --machines 4")
    if machines == 1 and memory and not layers:
        return _stream_plan(model, memory, context, ssd_gbps)
    if machines > 1 or layers:
        title, rows = split_plan(model, machines=machines, memory=memory or "192GB", parallel=parallel, layers=layers,
                                 context=context, recipe=recipe, bits=bits)
        UI().split_plan(title, context, rows)
        if any(r.verdict == "no" for r in rows):
            raise typer.Exit(2)
        return
    result = plan(model, recipe=recipe, bits=bits, context=context)
    UI().memory_plan(result)


def _stream_plan(model: str, memory: str, context: int, ssd_gbps: float) -> None:
    """--memory on one machine: recipe and expert budget per Mac size (cli/stream_plan.py)."""
    from mlx_v4 import config

    from .info_v41 import is_v41_model, stream_plan_v41
    from .stream_plan import MAC_SIZES_GB, stream_plan
    from .ui import UI

    v41 = is_v41_model(model)
    if model not in config.PRESETS and not v41:
        raise UserError(f"--memory plans flash, pro or v41-flash, not {model!r}", "e.g. mlx-v4 info flash --memory 64GB")
    if ssd_gbps <= 0:
        raise UserError("--ssd-gbps must be positive", "e.g. --ssd-gbps 5")
    gb = round(parse_memory(memory, 1)[0] / 2**30)
    if v41:  # DeepSeek V4.1: experts and Engram tables under one budget (cli/info_v41.py)
        name, rows, notes = stream_plan_v41(model, gb, context=context, ssd_gbps=ssd_gbps,
                                            sizes_gb=sorted(set(MAC_SIZES_GB) | {gb, 384, 512}))
        UI().stream_plan(name, rows, gb, context, ssd_gbps, notes=notes)
        return
    args = config.preset(model)
    if context > args.max_position_embeddings:
        raise UserError(f"--context {context} is past this model's maximum {args.max_position_embeddings}",
                        "choose a smaller --context")
    rows = stream_plan(args, context=context, ssd_gbps=ssd_gbps, sizes_gb=sorted(set(MAC_SIZES_GB) | {gb}))
    drafter = stream_drafter_note(args)
    UI().stream_plan(f"DeepSeek V4 {model.capitalize()}", rows, gb, context, ssd_gbps,
                     notes=[drafter] if drafter else [])
