"""V4's multi-token-prediction block (MTP, ``mtp.0`` in the release; official
``inference/model.py``, ``MTPBlock``).

At position i it reads the main model's last hyper-connection streams ``h_i`` (before
``hc_head``) and the embedding of the token at i+1, and predicts the token at i+2::

    x = e_proj(enorm(embed(t_{i+1})))  (broadcast over the streams)  +  h_proj(hnorm(h_i))
    x = one V4 decoder layer (window-only attention, scored MoE with its own experts)
    logits = head(norm(hc_head_mtp(x)))

Embedding and head are the main model's. The block's attention keeps its own window cache, fed
teacher-forced with the accepted tokens (see :mod:`.speculative`).
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from ..cache import LAYER_CACHES
from ..config import ModelArgs
from ..layers.fake_quant import gemm_input
from ..layers.hyper import HyperHead
from ..layers.norm import RMSNorm
from ..model import DecoderLayer
from ..platform import metal_available


class MTPError(ValueError):
    """A config or checkpoint whose MTP block we cannot run."""


def mtp_layer_args(args: ModelArgs) -> ModelArgs:
    """The config seen by the block: one more layer (index ``num_hidden_layers``) with the MTP
    compress ratio, so its attention and MoE are built like any layer's (not hash-routed)."""
    ratio = args.mtp_compress_ratio or 0
    if ratio != 0:
        raise MTPError(f"MTP compress ratio {ratio} is not supported: V4 releases use 0 (window-only)")
    return dataclasses.replace(args, num_hidden_layers=args.num_hidden_layers + 1,
                               compress_ratios=list(args.compress_ratios) + [0], mtp_compress_ratio=None)


class MTPBlock(DecoderLayer):
    def __init__(self, args: ModelArgs, cpu: bool | None = None, use_kernel: bool | None = None):
        cpu = not metal_available() if cpu is None else cpu
        use_kernel = metal_available() if use_kernel is None else use_kernel
        layer_args = mtp_layer_args(args)
        super().__init__(layer_args, args.num_hidden_layers, cpu, use_kernel)
        self.act_quant = args.act_quant
        D = args.hidden_size
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.enorm = RMSNorm(D, args.rms_norm_eps)
        self.hnorm = RMSNorm(D, args.rms_norm_eps)
        self.norm = RMSNorm(D, args.rms_norm_eps)
        self.hc_head = HyperHead(args.hc_mult, D, args.hc_eps, args.rms_norm_eps)
        self._layer_args = layer_args

    def make_cache(self):
        a = self._layer_args
        return LAYER_CACHES[a.layer_kind(a.num_hidden_layers - 1)](a.sliding_window, a.qk_rope_head_dim,
                                                                   a.fake_quant)

    def __call__(self, h: mx.array, next_ids: mx.array, cache, embed: nn.Module) -> mx.array:
        """h [B, L, hc, D] main streams at positions cache.offset..; next_ids [B, L] the tokens
        one position later -> the block's streams [B, L, hc, D]."""
        return super().__call__(self._input(h, next_ids, embed), next_ids, cache)

    def call_rows(self, h: mx.array, next_ids: mx.array, caches: list, bounds: list[tuple[int, int]],
                  positions: mx.array, embed: nn.Module) -> mx.array:
        """Several drafters' rows stacked along L (as mlx_v4/batch.py stacks sequences): h
        [1, T, hc, D], next_ids [1, T], row r = [:, s:e] for ``bounds[r] = (s, e)`` continuing
        ``caches[r]`` at ``positions`` [T] -> streams [1, T, hc, D]; each row as __call__ computes it."""
        x = self._input(h, next_ids, embed)
        return self.forward(x, next_ids, lambda a: self.attn.call_rows(a, caches, bounds, positions))

    def _input(self, h: mx.array, next_ids: mx.array, embed: nn.Module) -> mx.array:
        e = self.enorm(embed(next_ids))
        # e_proj/h_proj are FP8 GEMMs: the official linear() rounds their inputs (act_quant)
        x = (self.e_proj(gemm_input(e, self.act_quant))[:, :, None, :]
             + self.h_proj(gemm_input(self.hnorm(h), self.act_quant)))
        return x.astype(h.dtype)

    def logits(self, x: mx.array, head: nn.Module) -> mx.array:
        """streams [B, L, hc, D] -> logits [B, L, vocab] float32 through the shared head."""
        x = self.norm(self.hc_head(x))
        return head(x.astype(mx.float32)).astype(mx.float32)


def attach_mtp(model, cpu: bool | None = None, use_kernel: bool | None = None) -> MTPBlock:
    """Give ``model`` its MTP block (``model.mtp[0]``, weights ``mtp.0.*``) before loading."""
    n = model.args.num_nextn_predict_layers
    if n < 1:
        raise MTPError("the config has num_nextn_predict_layers=0: no MTP block")
    model.mtp = [MTPBlock(model.args, cpu, use_kernel) for _ in range(min(n, 1))]
    return model.mtp[0]


def has_mtp(model) -> bool:
    return bool(getattr(model, "mtp", None))
