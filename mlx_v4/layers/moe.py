"""DeepSeek V4 mixture of experts (paper §2.1).

* Router scores ``sqrt(softplus(x Wg^T))`` in float32.
* Layers below ``num_hash_layers`` route by a frozen table, ``tid2eid[token_id]``; the others
  pick the top-k of ``scores + bias`` (the bias only selects).
* Weights: the unbiased scores at the chosen experts, normalised to sum 1, times the route scale.
* Routed and shared experts are SwiGLU with the gate clamped above at ``swiglu_limit`` and the
  up projection clamped to +-limit (the current official revision clamps the shared expert too).
* With ``act_quant`` every expert GEMM input is FP8-rounded as the official ``linear()`` does:
  x before w1/w3 (once, shared by all experts), the weighted SwiGLU product before w2.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear, _gather_sort, _scatter_unsort

from .fake_quant import gemm_input


def clamped_swiglu(gate: mx.array, up: mx.array, limit: float) -> mx.array:
    gate, up = gate.astype(mx.float32), up.astype(mx.float32)
    if limit > 0:
        gate = mx.minimum(gate, limit)
        up = mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


class SharedExpert(nn.Module):
    def __init__(self, dims: int, hidden: int, limit: float, act_quant: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dims, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dims, bias=False)
        self.w3 = nn.Linear(dims, hidden, bias=False)
        self.limit, self.act_quant = limit, act_quant

    def __call__(self, x: mx.array) -> mx.array:
        """x: already rounded by the caller when act_quant is on (MoE rounds it once)."""
        h = clamped_swiglu(self.w1(x), self.w3(x), self.limit).astype(x.dtype)
        return self.w2(gemm_input(h, self.act_quant))


def _expert_matmul(layer: nn.Module, x: mx.array, e: int) -> mx.array:
    """x [n, in] @ expert e of a (Quantized)SwitchLinear, transposed -> [n, out]."""
    if isinstance(layer, QuantizedSwitchLinear):
        biases = layer.get("biases")
        return mx.quantized_matmul(x, layer["weight"][e], layer["scales"][e], None if biases is None else biases[e],
                                   transpose=True, group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return x @ layer["weight"][e].T


class RoutedExperts(nn.Module):
    """All routed experts stacked: w1/w3 [E, I, D], w2 [E, D, I] (mlx-lm SwitchLinear layout)."""

    #: Many-token batches run as one dense matmul per expert over its rows (grouped on the
    #: host). MLX's CPU gather_mm does not use BLAS and is ~5x slower; on Metal it is fast.
    grouped_dense_min_rows = 64

    def __init__(self, dims: int, hidden: int, n_experts: int, limit: float, grouped_dense: bool = False,
                 act_quant: bool = False):
        super().__init__()
        self.w1 = SwitchLinear(dims, hidden, n_experts, bias=False)
        self.w2 = SwitchLinear(hidden, dims, n_experts, bias=False)
        self.w3 = SwitchLinear(dims, hidden, n_experts, bias=False)
        self.limit = limit
        self.grouped_dense = grouped_dense
        self.act_quant = act_quant  # FP8-round w2's input (x comes rounded from MoE)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x [T, D] (already rounded when act_quant is on), indices/weights [T, k]
        -> sum_k weights * expert_k(x) [T, D]."""
        return self.pair_outputs(x, indices, weights).astype(mx.float32).sum(axis=-2)

    def choose_path(self, n_pairs: int) -> tuple[bool, bool]:
        """(grouped dense, sorted gather) for a batch of ``n_pairs`` routed (token, expert) pairs."""
        return self.grouped_dense and n_pairs >= self.grouped_dense_min_rows, n_pairs >= 64

    def pair_outputs(self, x: mx.array, indices: mx.array, weights: mx.array,
                     path: tuple[bool, bool] | None = None) -> mx.array:
        """x [T, D], indices/weights [T, k] -> weights * expert_k(x) per pair [T, k, D] (x's dtype).
        Each pair's row is computed on its own, so a caller holding only some experts (the
        expert store) runs subsets of the pairs with ``path`` fixed to the whole batch's."""
        grouped, do_sort = self.choose_path(indices.size) if path is None else path
        if grouped:
            return self._grouped_dense(x, indices, weights)
        xe = mx.expand_dims(x, (-2, -3))  # [T, 1, 1, D]
        idx, inv = indices, None
        if do_sort:
            xe, idx, inv = _gather_sort(xe, indices)
        h = clamped_swiglu(self.w1(xe, idx, sorted_indices=do_sort), self.w3(xe, idx, sorted_indices=do_sort),
                           self.limit)
        if do_sort:
            h = h * weights.reshape(-1)[mx.argsort(inv)].reshape(-1, 1, 1)  # weights in sorted order
        else:
            h = h * weights[..., None, None]
        y = self.w2(gemm_input(h.astype(x.dtype), self.act_quant), idx, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv, indices.shape)
        return y.squeeze(-2)

    def _run_groups(self, x: mx.array, order: np.ndarray, counts: np.ndarray, weights: mx.array,
                    k: int) -> mx.array:
        """The slots ``order`` (indices into the flattened [T*k] routing, grouped by expert,
        ``counts[e]`` for expert e) through their experts, one dense GEMM per expert, weighted
        -> [len(order), D] in that order."""
        rows = x[mx.array(order // k)]  # grouped by expert
        w = weights.reshape(-1)[mx.array(order)][:, None]
        outs, start = [], 0
        for e in np.nonzero(counts)[0]:
            sl = slice(start, start + int(counts[e]))
            h = clamped_swiglu(_expert_matmul(self.w1, rows[sl], e), _expert_matmul(self.w3, rows[sl], e), self.limit)
            outs.append(_expert_matmul(self.w2, gemm_input((h * w[sl]).astype(x.dtype), self.act_quant), e))
            start = sl.stop
        return mx.concatenate(outs, axis=0)

    def _grouped_dense(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        T, k = indices.shape
        flat = np.array(indices).reshape(-1)  # host sync: row counts per expert decide the shapes
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=self.w1["weight"].shape[0])
        y = self._run_groups(x, order, counts, weights, k)[mx.array(np.argsort(order))]  # back to [T*k] order
        return y.reshape(T, k, -1)


def route_scores(logits: mx.array, score_func: str) -> mx.array:
    """Router logits [T, E] float32 -> scores: softmax, sigmoid or V4's sqrt(softplus)."""
    if score_func == "softmax":
        return mx.softmax(logits, axis=-1, precise=True)
    if score_func == "sigmoid":
        return mx.sigmoid(logits)
    return mx.sqrt(nn.softplus(logits))


class Gate(nn.Module):
    def __init__(self, args, hash_routed: bool):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        self.hash_routed = hash_routed
        if hash_routed:
            self.tid2eid = mx.zeros((args.vocab_size, args.num_experts_per_tok), dtype=mx.int32)
        else:
            self.bias = mx.zeros((args.n_routed_experts,))
        self.topk, self.score_func = args.num_experts_per_tok, args.scoring_func
        self.route_scale = args.routed_scaling_factor

    def __call__(self, x: mx.array, token_ids: mx.array) -> tuple[mx.array, mx.array]:
        """x [T, D], token_ids [T] -> (weights [T, k] fp32, expert ids [T, k])."""
        scores = route_scores(x.astype(mx.float32) @ self.weight.astype(mx.float32).T, self.score_func)
        if self.hash_routed:
            indices = self.tid2eid[token_ids]
        else:
            biased = scores + self.bias
            indices = mx.argpartition(-biased, kth=self.topk - 1, axis=-1)[..., : self.topk]
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.score_func != "softmax":
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return weights * self.route_scale, indices


class MoE(nn.Module):
    def __init__(self, args, layer: int, grouped_dense: bool = False):
        super().__init__()
        self.gate = Gate(args, hash_routed=args.is_hash_layer(layer))
        self.experts = RoutedExperts(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts,
                                     args.swiglu_limit, grouped_dense, act_quant=args.act_quant)
        self.shared_experts = SharedExpert(args.hidden_size, args.moe_intermediate_size, args.swiglu_limit,
                                           act_quant=args.act_quant)
        self.act_quant = args.act_quant

    def __call__(self, x: mx.array, token_ids: mx.array) -> mx.array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices = self.gate(flat, token_ids.reshape(-1))  # the router sees x unrounded (fp32 weight)
        xq = gemm_input(flat, self.act_quant)  # one rounding for w1/w3 of the shared and routed experts
        y = self.experts(xq, indices, weights) + self.shared_experts(xq).astype(mx.float32)
        return y.astype(x.dtype).reshape(shape)
