"""Tensor and expert parallelism: one model whose heavy modules are split across ranks.

Applied to a constructed :class:`~mlx_v4.model.Model` *before* its weights are loaded (so a
rank only ever holds its slices), the model files stay free of distributed code:

* **Attention heads** (paper §2.3): each rank keeps ``H / N`` query heads, i.e. its rows of
  ``wq_b`` and its ``attn_sink`` entries, and the ``G / N`` output groups those heads feed
  (its rows of ``wo_a``). ``wo_b`` keeps the matching input columns; each rank's partial
  product is summed with one ``all_sum`` (:class:`AllSumOutput`). Heads and groups must divide.
* **Routed experts** (paper §2.1, expert parallel): rank ``r`` keeps experts
  ``[r E/N, (r+1) E/N)``. The router runs on every rank (it is small and its choices are then
  identical everywhere, so no gather of choices is needed); each rank adds the contribution of
  the chosen experts it owns (others get weight 0) and one ``all_sum`` combines the ranks.
* **Replicated** (small, or shared by all heads): ``wq_a``/``q_norm``, the single shared KV
  head ``wkv``/``kv_norm`` (V4 is MQA: one 512-d K = V for all heads, so the KV cache cannot
  be split by heads and every rank keeps it whole), the compressors, the lightning indexer,
  the router (gate weight, bias, hash table), the shared expert, hyper-connections, norms,
  embedding and head.

Two ``all_sum`` of ``[tokens, hidden]`` per layer are the whole per-layer traffic. Every rank
ends with bit-identical logits (the ring all-reduce hands every rank the same sums), so all
ranks sample the same token.

Cost note: for many-token batches on the CPU path (prefill) each rank multiplies only the rows
routed to its own experts. Otherwise (the gather path: decode, and Metal) a slot routed to
another rank's expert goes through local expert 0 with weight 0 so shapes stay static: the
weight memory and bandwidth are divided (a rank reads its chosen experts plus at most one),
the few-token compute is not.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .layers.moe import RoutedExperts


class SplitError(ValueError):
    """A split the model's shapes do not allow (heads, groups or experts that do not divide,
    more ranks than layers, a malformed ``--layers`` override)."""


class Traffic:
    """Bytes of the arrays this rank hands to MLX collectives, by kind (``send``, ``all_sum``,
    ``logits``), counted from their shapes when the operation is built."""

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def add(self, kind: str, a: mx.array) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + a.nbytes
        self.calls[kind] = self.calls.get(kind, 0) + 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def check_tensor_split(args, n: int) -> None:
    """Raise :class:`SplitError` unless heads, output groups and routed experts divide by ``n``."""
    bad = [f"{what}={v}" for what, v in (("num_attention_heads", args.num_attention_heads),
                                          ("o_groups", args.o_groups), ("n_routed_experts", args.n_routed_experts))
           if v % n]
    if bad:
        raise SplitError(f"tensor parallel over {n} ranks needs heads, output groups and routed experts "
                         f"divisible by {n}, but {', '.join(bad)}; use --parallel pipeline or another rank count")
    local = args.o_groups // n * args.o_lora_rank
    if getattr(args, "act_quant", False) and local % 128:
        # each rank FP8-rounds its own wo_b input columns: its blocks of 128 must be the global ones
        raise SplitError(f"tensor parallel over {n} ranks with act_quant gives each rank {local} wo_b inputs, "
                         "not a multiple of 128; use --parallel pipeline or model_config {'act_quant': False}")


class AllSumOutput(nn.Module):
    """Wraps a row-parallel projection (``wo_b`` over this rank's input columns): output =
    all_sum of the ranks' partial products."""

    def __init__(self, inner: nn.Module, group, traffic: Traffic | None = None):
        super().__init__()
        self.inner = inner
        self._group, self._traffic = group, traffic

    def __call__(self, x: mx.array) -> mx.array:
        y = self.inner(x)
        if self._traffic is not None:
            self._traffic.add("all_sum", y)
        return mx.distributed.all_sum(y, group=self._group)


class ShardedExperts(RoutedExperts):
    """This rank's routed experts ``[start, start + n_local)``; same parameter names and
    layout as :class:`RoutedExperts`, so checkpoint slices load into it unchanged."""

    def __init__(self, dims: int, hidden: int, n_local: int, start: int, limit: float, grouped_dense: bool,
                 group, traffic: Traffic | None = None):
        super().__init__(dims, hidden, n_local, limit, grouped_dense)
        self.start, self.n_local = start, n_local
        self._group, self._traffic = group, traffic

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        if self.grouped_dense and indices.size >= self.grouped_dense_min_rows:
            y = self._local_grouped_dense(x, indices, weights)
        else:
            local = indices - self.start
            mine = (local >= 0) & (local < self.n_local)
            y = super().__call__(x, mx.where(mine, local, 0), mx.where(mine, weights, 0.0))
        if self._traffic is not None:
            self._traffic.add("all_sum", y)
        return mx.distributed.all_sum(y, group=self._group)


    def _local_grouped_dense(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """The many-token path (see RoutedExperts) over this rank's slots only: the rows routed
        to other ranks' experts are dropped on the host instead of multiplied by zero."""
        T, k = indices.shape
        flat = np.array(indices).reshape(-1) - self.start  # host sync, as in the parent's path
        keep = np.nonzero((flat >= 0) & (flat < self.n_local))[0]
        if keep.size == 0:
            return mx.zeros((T, x.shape[-1]), mx.float32)
        order = keep[np.argsort(flat[keep], kind="stable")]
        counts = np.bincount(flat[order], minlength=self.n_local)
        slots = mx.zeros((T * k, x.shape[-1]), mx.float32).at[mx.array(order)].add(
            self._run_groups(x, order, counts, weights, k).astype(mx.float32))
        return slots.reshape(T, k, -1).sum(axis=1)  # summed in slot order, like the parent


def shard_structure(model, rank: int, n: int, group, traffic: Traffic | None = None) -> None:
    """Replace the split modules of every layer by this rank's smaller ones (weights not yet
    loaded; call before :func:`~mlx_v4.weights.apply_quantization` and loading)."""
    args = model.args
    check_tensor_split(args, n)
    H, G, E = args.num_attention_heads // n, args.o_groups // n, args.n_routed_experts // n
    hd, R, D = args.head_dim, args.o_lora_rank, args.hidden_size
    for layer in model.layers:
        attn = layer.attn
        attn.n_heads, attn.groups = H, G
        attn.wq_b = nn.Linear(args.q_lora_rank, H * hd, bias=False)
        attn.attn_sink = mx.zeros((H,))
        attn.wo_a = nn.Linear(H * hd // G, G * R, bias=False)
        attn.wo_b = nn.Linear(G * R, D, bias=False)
        old = layer.ffn.experts
        layer.ffn.experts = ShardedExperts(D, args.moe_intermediate_size, E, rank * E, args.swiglu_limit,
                                           old.grouped_dense, group, traffic)
        layer.ffn.experts.act_quant = old.act_quant


def wrap_outputs(model, group, traffic: Traffic | None = None) -> None:
    """After loading: make every ``wo_b`` sum its partial products across ranks."""
    for layer in model.layers:
        layer.attn.wo_b = AllSumOutput(layer.attn.wo_b, group, traffic)


def _cols(a: mx.array, start: int, stop: int, total: int) -> mx.array:
    """Columns [start, stop) of ``total`` logical input columns, for dense or packed arrays
    (a packed weight or a scales array has ``total * k`` last-axis entries for some ratio k)."""
    k = a.shape[-1] / total
    lo, hi = start * k, stop * k
    if lo != int(lo) or hi != int(hi):
        raise SplitError(f"cannot split {total} input columns at {start}:{stop} in a packed array of "
                         f"{a.shape[-1]} columns (quantization groups straddle the ranks)")
    return a[..., int(lo):int(hi)]


def shard_weights(weights: dict[str, mx.array], args, rank: int, n: int) -> dict[str, mx.array]:
    """Our-named full (lazy) arrays -> this rank's slices, lazily (nothing is read here).
    Expert arrays that already hold only this rank's experts (the loader filtered the
    official per-expert tensors) pass through."""
    H, G, E = args.num_attention_heads // n, args.o_groups // n, args.n_routed_experts // n
    hd, R = args.head_dim, args.o_lora_rank
    out = {}
    for name, a in weights.items():
        parts = name.split(".")
        if ".attn.wq_b." in name:
            a = a[rank * H * hd:(rank + 1) * H * hd]
        elif name.endswith(".attn.attn_sink"):
            a = a[rank * H:(rank + 1) * H]
        elif ".attn.wo_a." in name:
            a = a[rank * G * R:(rank + 1) * G * R]
        elif ".attn.wo_b." in name:
            a = _cols(a, rank * G * R, (rank + 1) * G * R, args.o_groups * R)
        elif ".ffn.experts." in name and len(parts) >= 2:
            if a.shape[0] == args.n_routed_experts:
                a = a[rank * E:(rank + 1) * E]
            elif a.shape[0] != E:
                raise SplitError(f"'{name}' has {a.shape[0]} experts; expected {args.n_routed_experts} or {E}")
        out[name] = a
    return out

