"""DeepSeek V4.1 assembly: embed -> hc_mult streams -> (Engram) blocks -> collapse -> norm -> head.

Hyper-connections are V4's (Sinkhorn mixing, paper §2.2), but V4.1 uses each sub-block's ``pre``
one sub-layer late: a block's attention collapses its input with the previous block's FFN
``pre`` (one-hot on copy 0 before the first block), its FFN with this block's attention ``pre``,
and the head with the last FFN's ``pre``; there is no ``hc_head``. Parameter names are the
official ones, so the release's tensors load by name.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..kernels.hyper_mix import mix_weights
from ..layers.fake_quant import gemm_input
from ..layers.hyper import HyperConnection, _mixes
from ..layers.moe import RoutedExperts, SharedExpert, route_scores
from ..layers.norm import RMSNorm
from ..platform import metal_available
from .attention import Attention
from .cache import SharedState, V41Cache, make_cache
from .config import V41Args
from .engram import Engram
from .engram_hash import EngramLayout, NgramHasher


class ImageInputError(ValueError):
    """Image inputs, which this port refuses (the vision tower is out of scope)."""


class Gate(nn.Module):
    """Router: ``score(x W^T / gate_temp)`` in float32; ``bias`` picks the top-k, the unbiased scores
    weigh them (normalised with +1e-20, times the route scale). ``bias_vl`` (image spans) is
    kept so checkpoints round-trip; text never uses it."""

    def __init__(self, args: V41Args):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        self.bias = mx.zeros((args.n_routed_experts,))
        self.bias_vl = mx.zeros((args.n_routed_experts,))
        self.topk, self.score_func, self.temp = args.num_experts_per_tok, args.scoring_func, args.gate_temp
        self.norm_topk, self.route_scale = args.norm_topk_prob, args.routed_scaling_factor

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        scores = route_scores((x.astype(mx.float32) @ self.weight.astype(mx.float32).T) / self.temp, self.score_func)
        indices = mx.argpartition(-(scores + self.bias), kth=self.topk - 1, axis=-1)[..., : self.topk]
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.norm_topk and self.topk > 1:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return weights * self.route_scale, indices


class MoE(nn.Module):
    def __init__(self, args: V41Args, grouped_dense: bool):
        super().__init__()
        self.gate = Gate(args)
        self.experts = RoutedExperts(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts,
                                     args.swiglu_limit, grouped_dense, act_quant=args.act_block)
        self.shared_experts = SharedExpert(args.hidden_size, args.moe_intermediate_size, args.swiglu_limit,
                                           act_quant=args.act_block)
        self.act_block = args.act_block

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1])
        weights, indices = self.gate(flat)  # the router sees x unrounded (its weight is not FP8)
        xq = gemm_input(flat, self.act_block)  # one rounding for w1/w3 of the shared and routed experts
        y = self.experts(xq, indices, weights) + self.shared_experts(xq).astype(mx.float32)
        return y.astype(x.dtype).reshape(x.shape)


def collapse(x: mx.array, pre: mx.array) -> mx.array:
    """[B, L, hc, D] weighted by pre [B, L, hc] -> [B, L, D] (summed in float32)."""
    return (pre[..., None] * x.astype(mx.float32)).sum(axis=2).astype(x.dtype)


class Block(nn.Module):
    def __init__(self, args: V41Args, layer: int, cpu: bool):
        super().__init__()
        hc, D = args.hc_mult, args.hidden_size
        n_mix = (2 + hc) * hc
        for sub in ("attn", "ffn"):
            setattr(self, f"hc_{sub}_fn", mx.zeros((n_mix, hc * D)))
            setattr(self, f"hc_{sub}_base", mx.zeros((n_mix,)))
            setattr(self, f"hc_{sub}_scale", mx.ones((3,)))
        self.attn_norm = RMSNorm(D, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(D, args.rms_norm_eps)
        self.attn = Attention(args, layer)
        self.ffn = MoE(args, grouped_dense=cpu)
        if layer in args.engram_layer_ids:
            self.engram = Engram(D, hc, (args.engram_max_ngram_size - 1) * args.engram_n_heads,
                                 args.engram_head_dim, args.rms_norm_eps, act_block=args.act_block)
        self._hc = (hc, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps)

    def _mix(self, x: mx.array, sub: str):
        hc, iters, hc_eps, norm_eps = self._hc
        _, mixes = _mixes(x, getattr(self, f"hc_{sub}_fn"), norm_eps)
        return mix_weights(mixes, getattr(self, f"hc_{sub}_base"), getattr(self, f"hc_{sub}_scale"), hc, iters, hc_eps)

    def __call__(self, x: mx.array, pre_mix: mx.array, cache, shared: SharedState):
        """x [B, L, hc, D], pre_mix [B, L, hc] (the previous FFN's) -> (x, this FFN's pre)."""
        return self.forward(x, pre_mix, lambda h: self.attn(h, cache, shared))

    def forward(self, x: mx.array, pre_mix: mx.array, attend):
        """:meth:`__call__` with the attention given as ``attend(h [B, L, D]) -> [B, L, D]``
        (the DSpark stages attend their block differently, mlx_v4/v41/dspark.py)."""
        attn_pre, post, comb = self._mix(x, "attn")
        h = attend(self.attn_norm(collapse(x, pre_mix)))
        x = HyperConnection.expand(h, x, post, comb)
        ffn_pre, post, comb = self._mix(x, "ffn")
        h = self.ffn(self.ffn_norm(collapse(x, attn_pre)))
        return HyperConnection.expand(h, x, post, comb), ffn_pre


class _Prefetched:
    """Engram reads started for a step before it runs (a plain object: nn.Module would keep a
    tuple among its children)."""

    def __init__(self, ids: np.ndarray, history: np.ndarray, rows: dict, history_after: np.ndarray):
        self.ids, self.history, self.rows, self.history_after = ids, history.copy(), rows, history_after

    def serves(self, ids: np.ndarray, history: np.ndarray) -> bool:
        return ids.shape == self.ids.shape and np.array_equal(ids, self.ids) and np.array_equal(history, self.history)


class Model(nn.Module):
    def __init__(self, args: V41Args, token_map=None, cpu: bool | None = None):
        """``token_map``: (compressed id per token id, compressed vocab size) from the tokenizer,
        needed when the model has Engram layers (see :func:`engram_hash.compressed_token_map`)."""
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        cpu = not metal_available() if cpu is None else cpu
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i, cpu) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self._hasher = None
        if args.engram_layer_ids:
            layout = EngramLayout.build(args.engram_layer_ids, args.engram_max_ngram_size, args.engram_n_heads,
                                        args.engram_head_dim, args.engram_vocab_size)
            if layout.table_rows() != list(args.engram_num_embeddings):
                raise ValueError(f"engram_num_embeddings {args.engram_num_embeddings} do not match the hash layout "
                                 f"({layout.table_rows()} rows from engram_vocab_size={args.engram_vocab_size})")
            if token_map is None:
                raise ValueError("a model with Engram layers needs the tokenizer's compressed token map")
            ids, size = token_map
            if size != args.engram_compressed_vocab_size:
                raise ValueError(f"the tokenizer compresses to {size} ids but engram_compressed_vocab_size is "
                                 f"{args.engram_compressed_vocab_size}: every Engram hash would be wrong")
            self._hasher = NgramHasher(layout, ids, size, args.engram_pad_token_id)

    def __call__(self, inputs: mx.array, cache: V41Cache | None = None, last_only: bool = False) -> mx.array:
        """inputs [B, L] token ids -> logits [B, L, vocab] float32 (or [B, 1, vocab])."""
        x, pre, _ = self._run(inputs, cache, ())
        if last_only:
            x, pre = x[:, -1:], pre[:, -1:]
        return self.logits(collapse(x, pre))

    def tapped_streams(self, inputs: mx.array, cache: V41Cache | None = None, taps=()) -> tuple[mx.array, mx.array | None]:
        """-> (the collapsed last streams [B, L, D], before ``norm``: what :meth:`logits` takes;
        the input streams of the layers in ``taps``, after their Engram, averaged over the copies
        and concatenated [B, L, len(taps) * D], or None without taps): what the DSpark drafter
        reads (official ``Transformer.forward``: ``main_hiddens.append(h.mean(dim=2))``)."""
        x, pre, tapped = self._run(inputs, cache, taps)
        return collapse(x, pre), (mx.concatenate(tapped, axis=-1) if tapped else None)

    def logits(self, h: mx.array) -> mx.array:
        """collapsed streams [B, L, D] -> logits [B, L, vocab] float32."""
        return self.head(self.norm(h).astype(mx.float32)).astype(mx.float32)

    def _run(self, inputs: mx.array, cache: V41Cache | None, taps) -> tuple[mx.array, mx.array, list]:
        """inputs [B, L] -> (streams [B, L, hc, D], the last FFN's pre-mix [B, L, hc], tapped)."""
        if cache is None:
            cache = self.make_cache()
        B, L = inputs.shape
        ids = np.array(inputs)
        if ids.size and (ids.min() < 0 or ids.max() >= self.args.vocab_size):
            raise ValueError(f"token id {int(ids.max() if ids.max() >= self.args.vocab_size else ids.min())} is "
                             f"outside the model's vocabulary of {self.args.vocab_size}")
        if (ids == self.args.image_token_id).any():
            raise ImageInputError(f"image token {self.args.image_token_id} in the input: image inputs are not "
                                  "supported (mlx-v4 runs the DeepSeek V4.1 text model only)")
        end = cache.offset + L
        if end > self.args.max_position_embeddings:
            raise ValueError(f"position {end} is past max_position_embeddings={self.args.max_position_embeddings}")
        x = self.embed(inputs)
        x = mx.broadcast_to(x[:, :, None, :], (B, L, self.args.hc_mult, x.shape[-1]))
        pre = mx.zeros((B, L, self.args.hc_mult)).at[..., 0].add(1.0)  # one-hot: copy 0
        tapped: list[mx.array] = []
        if self.expert_store is None:
            x, pre = self._blocks(x, pre, cache, ids, taps, tapped)
        else:  # a failed expert or Engram read rewinds the cache (and Engram history): no half step
            from ..experts import StepGuard

            with StepGuard(cache):
                x, pre = self._blocks(x, pre, cache, ids, taps, tapped)
        return x, pre, tapped

    def prefetch(self, inputs, cache: V41Cache) -> None:
        """Start the Engram reads of the step that will feed ``inputs`` [B, L] into ``cache``
        next (prefill calls this before evaluating the current chunk). That step uses them when
        its ids and n-gram history are these (the rows depend on nothing else), else reads anew."""
        self._prefetched = None
        if self._hasher is None or not self.engram_read_ahead:
            return
        ids = np.asarray(inputs, dtype=np.int64)
        history = self._history(cache, ids.shape[0])
        try:
            self._prefetched = _Prefetched(ids, history, *self._request(ids, history))
        except Exception:  # only a head start: the step itself reads again and reports the error
            self._prefetched = None

    def _history(self, cache: V41Cache, batch: int) -> np.ndarray:
        if cache.engram_history is None:
            return np.full((batch, self._hasher.history_len), -1, dtype=np.int64)
        return cache.engram_history

    def _request(self, ids: np.ndarray, history: np.ndarray):
        """-> (rows per Engram layer: their reads under way, or the row ids), history after ids."""
        rows, after = self._hasher(ids, history)
        layers = self.args.engram_layer_ids
        if self.engram_read_ahead:  # every layer's rows requested now, read while layers run
            return {i: self.layers[i].engram.table.request(rows[:, :, j]) for j, i in enumerate(layers)}, after
        return {i: rows[:, :, j] for j, i in enumerate(layers)}, after

    def _blocks(self, x: mx.array, pre: mx.array, cache: V41Cache, ids: np.ndarray, taps=(), tapped=None):
        rows = None
        if self._hasher is not None:
            history = self._history(cache, ids.shape[0])
            ahead, self._prefetched = self._prefetched, None
            if ahead is not None and ahead.serves(ids, history):
                rows, cache.engram_history = ahead.rows, ahead.history_after
            else:
                rows, cache.engram_history = self._request(ids, history)
            cache.record_engram(self._hasher.token_map[ids])  # kept only while speculating
        shared = SharedState()
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            if "engram" in layer:
                x = layer.engram(x, rows[i])
            if i in taps:  # the drafter reads the input of its target layers, after their Engram
                tapped.append(x.mean(axis=2))
            x, pre = layer(x, pre, c, shared)
        return x, pre

    weights_id: str = ""
    #: Request all Engram rows of a step when it starts (False: each layer reads its own when
    #: it gets there). Bit-identical either way.
    engram_read_ahead: bool = True
    _prefetched = None  # the next step's Engram reads, started by prefetch
    #: The store of routed experts and Engram tables under one budget (load(expert_budget=...)).
    expert_store = None

    @property
    def fingerprint(self) -> str:
        """Identifies architecture, quantization and weights; saved caches must match it."""
        from ..cache_file import model_fingerprint

        return model_fingerprint(self)

    def make_cache(self) -> V41Cache:
        return make_cache(self.args)
