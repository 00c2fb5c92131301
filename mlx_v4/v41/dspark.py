"""DSpark, the block drafter of DeepSeek V4.1 (semi-autoregressive drafting), on V4.1 layers.

The generic parts (the projection of the target hiddens, the block ``[anchor, noise...]``, the
Markov and confidence heads, drafting and verification) are V4-Flash-0731's, see
:mod:`mlx_v4.draft.dspark` and :class:`mlx_v4.draft.speculative.DSparkDrafter`. What V4.1
changes, and where each fact comes from:

* **Config** (official V4.1 ``inference/model.py``, ``ModelArgs``): ``dspark_block_size``,
  ``dspark_noise_token_id``, ``dspark_target_layer_ids`` (37-39 in the release),
  ``dspark_markov_rank``, and ``dspark_n_routed_experts`` / ``dspark_n_activated_experts``, the
  drafter's own MoE size (``get_moe_config``: layers from ``n_layers`` on use them, 0 falls back
  to the backbone's); ``n_mtp_layers`` draft layers are appended after the backbone, indices
  ``n_layers ..``, each with a trailing 0 in ``compress_ratios`` (window-only attention). The
  release's config.json (as third-party V4.1 ports quote it) spells these the transformers way:
  ``num_nextn_predict_layers: 3``, ``dspark_block_size: 5``, ``dspark_noise_token_id: 128799``,
  ``dspark_target_layer_ids: [37, 38, 39]``, ``dspark_markov_rank: 256``,
  ``dspark_n_routed_experts: 128``, ``dspark_num_experts_per_tok: 3``.
* **What it reads** (``Transformer.forward``): ``main_hiddens.append(h.mean(dim=2))`` at the
  input of each target layer, after that layer's Engram (the Engram runs first in the loop).
  The reference builds ``self.mtp`` empty and never calls a drafter forward ("only the forward
  pass is implemented here -- nothing calls forward_spec"), so the stages follow vLLM.
* **Stages** (vLLM ``vllm/models/deepseek_v4_1/nvidia/dspark.py``, ``DSparkDeepseekV4Model``):
  ``n_mtp_layers`` V4.1 decoder layers (``layers.{n_layers + i}``): window-only attention in
  V4.1 form (no query norm), V4.1 MoE, staggered mHC: the block enters as its embeddings copied
  over the ``hc_mult`` streams; the first stage gets no pre-mix (``pre_mix = None``), which
  selects copy 0 as the reference's ``make_identity_pre_mix`` does for the backbone, and each
  sub-layer then collapses with the previous one's ``pre``.
* **Head**: "v4.1 has no learned hc_head": the streams are collapsed with the last stage's FFN
  pre-mix, then ``norm`` and the target's ``head`` (vLLM ``forward`` / ``compute_logits``). The
  hidden fed to the confidence head is the normed one, as for V4-Flash-0731; the confidence
  head is optional (vLLM drops it when the checkpoint has none).
* **Context KV** (vLLM ``combine_hidden_states`` / ``precompute_and_store_context_kv``):
  ``main_x = main_norm(main_proj(hiddens))``;
  each stage makes its own context KV with its ``wkv`` (the wkv half of the fused
  ``wq_a|wkv``), ``kv_norm`` and RoPE at the context positions, quantized like its window
  entries (V4.1: FP8 in blocks of 32 over all dims).
* **Names** (vLLM ``_remap_dspark_name``): ``mtp.{i}.main_proj|main_norm|norm|markov_head|
  confidence_head.*`` are the drafter's own (from whichever stage holds them), the Markov
  factors named ``markov_head.embed`` / ``markov_head.head`` (or ``markov_w1`` / ``markov_w2``);
  everything else of ``mtp.{i}`` is stage i's decoder layer.

Unverified without the released weights: the drafter's exact tensor names and head placement
in the real V4.1 checkpoint (this follows vLLM's mapping), and its acceptance.
"""

from __future__ import annotations

import dataclasses
import re

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigError
from ..draft.dspark import DSparkError, DSparkHeads
from ..kernels.attend import attend
from ..layers.attention import grouped_projection
from ..layers.fake_quant import gemm_input
from ..layers.norm import RMSNorm
from ..platform import metal_available
from .config import V41Args
from .model import Block, collapse
from .quant import quantize_window


def stage_args(args: V41Args) -> V41Args:
    """The config the stages are built with: the backbone plus the window-only draft layers
    (indices ``num_hidden_layers ..``) and the drafter's own expert counts."""
    if not args.has_dspark:
        raise DSparkError("this config has no DSpark drafter: config.json has no dspark_* fields")
    n, stages = args.num_hidden_layers, args.dspark_stages
    try:
        return dataclasses.replace(
            args, num_hidden_layers=n + stages, compress_ratios=list(args.compress_ratios) + [0] * stages,
            mtp_compress_ratios=[], num_nextn_predict_layers=0, dspark_block_size=0, dspark_target_layer_ids=[],
            n_routed_experts=args.dspark_n_routed_experts or args.n_routed_experts,
            num_experts_per_tok=args.dspark_n_activated_experts or args.num_experts_per_tok)
    except ConfigError as e:
        raise DSparkError(f"the DSpark layers cannot be built: {e}") from None


class V41DSparkStage(Block):
    """One stage: a V4.1 block whose attention reads the target's context window."""

    def context_kv(self, main_x: mx.array, positions: mx.array) -> mx.array:
        """main_x [1, n, D] at ``positions`` [n] -> this stage's context KV [1, n, hd]."""
        a = self.attn
        cos, sin = a._rope.cos_sin(positions)
        kv = a._rope(a.kv_norm(a.wkv(gemm_input(main_x, a.act_block))), cos, sin)
        return quantize_window(kv)[0] if a.fake_quant else kv

    def block(self, x: mx.array, pre: mx.array, positions: mx.array, context: mx.array | None):
        """x [1, B, hc, D], pre [1, B, hc] (the previous stage's FFN pre-mix), at ``positions``
        [B]; context [1, n, hd] or None -> (x, this stage's FFN pre). Every row sees the context
        and the whole block; no cache is touched."""
        a = self.attn

        def attend_block(h: mx.array) -> mx.array:
            B, L, _ = h.shape
            cos, sin = a._rope.cos_sin(positions)
            xq = gemm_input(h, a.act_block)
            _, q = a._queries(xq, cos, sin)
            kv = a._rope(a.kv_norm(a.wkv(xq)), cos, sin)
            if a.fake_quant:
                kv = quantize_window(kv)[0]
            keys = kv if context is None else mx.concatenate([context.astype(kv.dtype), kv], axis=1)
            visible = mx.ones((B, L, keys.shape[1]), dtype=mx.bool_)
            o = attend(q, keys, visible, a.attn_sink, a.head_dim**-0.5)
            o = a._rope(o, cos[:, None], sin[:, None], inverse=True)
            o = grouped_projection(o.reshape(B, L, a.groups, -1), a.wo_a, a.groups)
            return a.wo_b(gemm_input(o, a.act_block))

        return self.forward(x, pre, attend_block)


class V41DSpark(DSparkHeads):
    """The V4.1 drafter (``model.dspark``, weights ``dspark.*``)."""

    def __init__(self, args: V41Args, cpu: bool | None = None):
        cpu = not metal_available() if cpu is None else cpu
        built = stage_args(args)
        D = args.hidden_size
        super().__init__(D, len(args.dspark_target_layer_ids), args.vocab_size, args.dspark_markov_rank,
                         args.rms_norm_eps, args.act_block, args.dspark_block_size, args.dspark_noise_token_id,
                         args.hc_mult, args.sliding_window)
        self.layers = [V41DSparkStage(built, args.num_hidden_layers + i, cpu) for i in range(args.dspark_stages)]
        self.norm = RMSNorm(D, args.rms_norm_eps)

    def hidden(self, anchor: int, position: int, contexts: list[mx.array | None], embed: nn.Module) -> mx.array:
        """The block at ``position ..`` over each stage's context (positions before it) ->
        normed hidden [block_size, D], row j for the token at ``position + j + 1``."""
        _, positions, x = self.block_input(anchor, position, embed)
        pre = mx.zeros(x.shape[:3]).at[..., 0].add(1.0)  # entering: copy 0
        for stage, context in zip(self.layers, contexts, strict=True):
            x, pre = stage.block(x, pre, positions, context)
        return self.norm(collapse(x, pre))[0]  # no hc_head: the last FFN's pre-mix


def attach_v41_dspark(model, cpu: bool | None = None) -> V41DSpark:
    """Give the V4.1 ``model`` its DSpark drafter (``model.dspark``) before loading."""
    model.dspark = V41DSpark(model.args, cpu)
    return model.dspark


# ---- names ---------------------------------------------------------------------------------------
_STAGE = re.compile(r"mtp\.(\d+)\.(.+)")
_OWN = {"main_proj.weight": "main_proj.weight", "main_proj.scale": "main_proj.scale",
        "main_norm.weight": "main_norm.weight", "norm.weight": "norm.weight",
        "markov_head.embed.weight": "markov_w1.weight", "markov_head.markov_w1.weight": "markov_w1.weight",
        "markov_head.head.weight": "markov_w2.weight", "markov_head.markov_w2.weight": "markov_w2.weight",
        "markov_head.head.scale": "markov_w2.scale", "markov_head.markov_w2.scale": "markov_w2.scale",
        "confidence_head.proj.weight": "confidence.weight"}


def v41_dspark_name(name: str) -> str | None:
    """An official ``mtp.{i}.*`` name -> ours (``dspark.*``); None for other tensors."""
    m = _STAGE.fullmatch(name)
    if m is None:
        return None
    stage, rest = m.groups()
    if rest in _OWN:
        return "dspark." + _OWN[rest]
    return f"dspark.layers.{stage}.{rest}"
