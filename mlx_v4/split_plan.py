"""Planning a multi-machine split (:mod:`mlx_v4.distributed`): which rank holds which layers,
and what each rank needs in weights and KV cache. Pure arithmetic over the config's shapes; it
starts no group and loads no weights, so ``mlx-v4 info --machines`` can use it anywhere."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .parallel import SplitError, check_tensor_split

MODES = ("pipeline", "tensor")


@dataclass
class Split:
    """Who holds what: ``mode``, ``size`` ranks and, for pipeline, ``ranges[r] = (start, end)``."""
    mode: str
    size: int
    ranges: list[tuple[int, int]] | None = None

    def describe(self) -> str:
        if self.mode == "tensor":
            return f"tensor parallel over {self.size} ranks"
        return "pipeline " + ",".join(f"{s}-{e - 1}" for s, e in self.ranges)


_SPLIT_PARAMS = re.compile(r"attn\.(wq_b|wo_a|wo_b)\.|attn\.attn_sink$|ffn\.experts\.")


def layer_bytes(args, expert_bits: float = 4.25, other_bits: float = 8.25,
                split_only: bool = False) -> tuple[float, list[float], float]:
    """Weight bytes (embedding, [per layer], hc_head + norm + head) from the shapes at the given
    bits per weight (default: the release, FP4 experts and FP8 matrices); 1-D tensors at 16 bits.
    ``split_only``: count only what tensor parallelism divides (see :mod:`mlx_v4.parallel`)."""
    from mlx.utils import tree_flatten

    from .model import DecoderLayer

    def size(name: str, shape) -> float:
        if split_only and not _SPLIT_PARAMS.search(name):
            return 0.0
        n = 1
        for d in shape:
            n *= d
        if ".experts." in name and "shared" not in name:
            return n * expert_bits / 8
        return n * (other_bits if len(shape) >= 2 and "tid2eid" not in name else 16) / 8

    cache: dict[tuple, float] = {}
    per_layer = []
    for i in range(args.num_hidden_layers):
        key = (args.layer_kind(i), args.is_hash_layer(i))
        if key not in cache:
            layer = DecoderLayer(args, i, cpu=True)
            cache[key] = sum(size(k, v.shape) for k, v in tree_flatten(layer.parameters()))
        per_layer.append(cache[key])
    if split_only:
        return 0.0, per_layer, 0.0
    D, V, hc = args.hidden_size, args.vocab_size, args.hc_mult
    embed = V * D * 2.0  # bf16 in every format
    last = V * D * other_bits / 8 + (hc * hc * D + 2 * hc + 1) * 4 + D * 2
    return embed, per_layer, last


@dataclass
class RankShare:
    rank: int
    layers: tuple[int, int]  # [start, end)
    weights_bytes: float
    kv_bytes: float


def plan_ranks(args, split: Split, context: int, *, expert_bits: float = 4.25, other_bits: float = 8.25,
               total_bytes: float | None = None) -> list[RankShare]:
    """Per-rank weights and KV cache at ``context`` tokens. ``total_bytes`` (a checkpoint's real
    size) rescales the shape-based estimate."""
    from .cache import planned_nbytes

    first, per_layer, last = layer_bytes(args, expert_bits, other_bits)
    whole = first + sum(per_layer) + last
    k = total_bytes / whole if total_bytes else 1.0
    n = args.num_hidden_layers
    if split.mode == "tensor":
        _, split_layers, _ = layer_bytes(args, expert_bits, other_bits, split_only=True)
        share = (whole - sum(split_layers) * (1 - 1 / split.size)) * k
        kv = planned_nbytes(args, context)  # one shared KV head: every rank keeps the whole cache
        return [RankShare(r, (0, n), share, kv) for r in range(split.size)]
    out = []
    for r, (s, e) in enumerate(split.ranges):
        w = sum(per_layer[s:e]) + (first if r == 0 else 0) + (last if r == split.size - 1 else 0)
        out.append(RankShare(r, (s, e), w * k, planned_nbytes(args, context, layers=range(s, e))))
    return out


def balance_layers(per_layer: list[float], size: int, first_extra: float = 0.0,
                   last_extra: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous ranges, one per rank, each with at least one layer, minimising the largest
    rank's bytes (rank 0 also carries ``first_extra``, the last rank ``last_extra``)."""
    n = len(per_layer)
    if size < 1:
        raise SplitError(f"need at least one rank, got {size}")
    if size > n:
        raise SplitError(f"cannot split {n} layers over {size} ranks: each pipeline rank needs at least one layer")
    prefix = [0.0]
    for b in per_layer:
        prefix.append(prefix[-1] + b)

    def cost(r: int, s: int, e: int) -> float:
        return prefix[e] - prefix[s] + (first_extra if r == 0 else 0) + (last_extra if r == size - 1 else 0)

    inf = float("inf")
    # best[r][e]: smallest max load placing layers [0, e) on ranks 0..r
    best = [[inf] * (n + 1) for _ in range(size)]
    cut = [[0] * (n + 1) for _ in range(size)]
    for e in range(1, n + 1):
        best[0][e] = cost(0, 0, e)
    for r in range(1, size):
        for e in range(r + 1, n + 1):
            for s in range(r, e):
                v = max(best[r - 1][s], cost(r, s, e))
                if v < best[r][e]:
                    best[r][e], cut[r][e] = v, s
    ranges, e = [], n
    for r in range(size - 1, 0, -1):
        s = cut[r][e]
        ranges.append((s, e))
        e = s
    ranges.append((0, e))
    return ranges[::-1]


def parse_layers(spec: str, n_layers: int, size: int | None = None) -> list[tuple[int, int]]:
    """``"0-20,21-42"`` (inclusive ranges, or single layers ``"5"``) -> [(0, 21), (21, 43)].
    The ranges must be in order, contiguous, cover every layer and, with ``size``, be one per rank."""
    ranges = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise SplitError(f"--layers {spec!r}: {part!r} is not a layer range like 0-20")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise SplitError(f"--layers {spec!r}: range {part.strip()!r} ends before it starts")
        ranges.append((a, b + 1))
    expect = 0
    for s, e in ranges:
        if s != expect:
            raise SplitError(f"--layers {spec!r}: ranges must be contiguous from layer 0; layer {expect} "
                             f"{'is missing' if s > expect else 'is given twice'}")
        expect = e
    if expect != n_layers:
        raise SplitError(f"--layers {spec!r} covers layers 0-{expect - 1}, but the model has {n_layers} "
                         f"(0-{n_layers - 1})")
    if size is not None and len(ranges) != size:
        raise SplitError(f"--layers {spec!r} gives {len(ranges)} ranges for {size} ranks; give one per rank")
    return ranges


def plan_split(args, size: int, mode: str = "pipeline", layers: str | None = None) -> Split:
    """The split for ``size`` ranks; raises :class:`SplitError` when it is impossible."""
    if mode not in MODES:
        raise SplitError(f"unknown parallel mode {mode!r}: choose pipeline or tensor")
    if mode == "tensor":
        if layers:
            raise SplitError("--layers applies to --parallel pipeline only")
        check_tensor_split(args, size)
        return Split("tensor", size)
    if layers:
        return Split("pipeline", size, parse_layers(layers, args.num_hidden_layers, size))
    first, per_layer, last = layer_bytes(args)
    return Split("pipeline", size, balance_layers(per_layer, size, first, last))
