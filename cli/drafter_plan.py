"""A checkpoint's drafter as the planners see it (`mlx-v4 info`): what it is (V4's MTP block or
a DSpark drafter), its parameters and bytes, and its routed experts. Shapes only, nothing loaded;
a leaf of cli/ (the planners and the Rich rendering both import it)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Drafter:
    """A checkpoint's drafter as the loader builds it (V4's MTP block, a DSpark drafter):
    parameters, those of its routed experts, and its MoE layers' expert count and top-k."""

    kind: str  # "MTP" or "DSpark"
    params: int
    expert_params: int
    moe_layers: int
    n_experts: int
    top_k: int
    nbytes: float = 0.0  # at the plan's bits per weight
    expert_bytes: float = 0.0


def drafter_module(args):
    """-> (kind, the drafter built from ``args`` with our parameter names' prefix, its MoE
    layers' (experts, top-k)) or None. Shapes only: nothing is evaluated."""
    from mlx_v4.v41.config import V41Args

    if isinstance(args, V41Args):
        if not args.has_dspark:
            return None
        from mlx_v4.v41.dspark import V41DSpark

        net = V41DSpark(args, cpu=True)
        E = args.dspark_n_routed_experts or args.n_routed_experts
        return "DSpark", "dspark.", net, (E, args.dspark_n_activated_experts or args.num_experts_per_tok)
    moe = (args.n_routed_experts, args.num_experts_per_tok)
    if args.has_dspark:
        from mlx_v4.draft.dspark import DSpark

        return "DSpark", "dspark.", DSpark(args, cpu=True, use_kernel=False), moe
    if args.num_nextn_predict_layers >= 1:
        from mlx_v4.draft.mtp import MTPBlock

        return "MTP", "mtp.0.", MTPBlock(args, cpu=True, use_kernel=False), moe
    return None


def drafter_size(args, bits=None) -> Drafter | None:
    """The drafter of ``args`` (None: it has none); ``bits(name, shape)`` sizes its bytes."""
    built = drafter_module(args)
    if built is None:
        return None
    from mlx.utils import tree_flatten

    kind, prefix, net, (E, k) = built
    d = Drafter(kind, 0, 0, len(getattr(net, "layers", [net])), E, k)
    for name, p in tree_flatten(net.parameters()):
        n = math.prod(p.shape)
        routed = ".experts." in name and "shared" not in name
        nbytes = n * bits(prefix + name, tuple(p.shape)) / 8 if bits else 0.0
        d.params += n
        d.nbytes += nbytes
        if routed:
            d.expert_params += n
            d.expert_bytes += nbytes
    return d


def format_count(n: float) -> str:
    """A parameter count: 6.61B, 12.3M, 4,096."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{int(n):,}"
