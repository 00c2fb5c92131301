"""DSpark, the block drafter of DeepSeek V4-Flash-0731 (semi-autoregressive drafting).

One forward of the drafter guesses a whole block; a small Markov head then makes the guesses
depend on each other, one token at a time. Facts and where they come from:

* **What it reads** (official V4.1 ``inference/model.py``, ``Transformer.forward``): the input
  streams of the target layers ``dspark_target_layer_ids`` (40, 41, 42 in Flash-0731), averaged
  over the hyper-connection copies and concatenated: ``main_hiddens.append(h.mean(dim=2))``
  before each target layer. A DSV4 vLLM target patch captures the same (the output of layer
  i-1, i.e. the input of layer i, averaged over the copies).
* **Context** (vLLM ``vllm/models/deepseek_v4/nvidia/dspark.py``, ``precompute_and_store_context_kv``
  and ``store_main_kv``): ``main_x = main_norm(main_proj(hiddens))``; each stage turns it into
  its own context KV through *its* ``wkv``, ``kv_norm`` and RoPE at the context positions, kept in
  a window of the last ``sliding_window`` positions.
* **Block** (DeepSpec ``deepspec/modeling/dspark/common.py``: ``create_noise_embed``,
  ``create_position_ids``, ``create_dspark_attention_mask``; vLLM ``vllm/v1/spec_decode/dspark.py``,
  ``set_inputs_first_pass``): ``[anchor, noise x (block_size - 1)]`` at positions
  ``anchor_pos ..``, where the anchor is the token the target just produced and ``noise`` is
  ``dspark_noise_token_id`` (128799). Row j predicts the token at ``anchor_pos + j + 1`` (the
  training labels are ``anchor + 1 .. anchor + block_size``), so one block gives ``block_size``
  drafts. Every block query attends the context window (positions < anchor_pos) and the whole
  block, both directions (vLLM ``_dspark_attention``: one mask for all rows).
* **Stages** (vLLM ``DeepSeekV4DSparkLayer``): ``len(dspark_target_layer_ids)`` V4 decoder
  layers (window-only attention with sink, scored MoE with their own experts, hyper-connections),
  numbered after the main layers; the block enters as its token embeddings copied over the
  ``hc_mult`` streams (no ``e_proj``/``h_proj``: the target enters only through the context KV).
* **Heads** (vLLM ``DeepSeekV4DSpark``; ``vllm/model_executor/models/qwen3_dspark.py``):
  ``hidden = norm(hc_head(streams))``, ``logits = head(hidden)`` with the target's head;
  the Markov bias ``markov_w2(markov_w1[prev])`` (rank ``dspark_markov_rank``, 256) is added to
  row j with ``prev`` the token before row j's target (the anchor, then each draft); the
  confidence ``sigmoid(confidence_head.proj([hidden, markov_w1[prev]]))`` (float32, no bias)
  estimates each draft's acceptance. ``hidden`` there is the normed one, as in DeepSpec's
  ``deepspec/modeling/dspark/qwen3/modeling.py`` (its confidence features are the backbone's
  normed output); an older vLLM revision passed the hidden before ``norm``.
* **Drafting** (vLLM ``vllm/v1/spec_decode/dspark_sampling.py``, ``sample_dspark_markov_block``):
  row by row, argmax under greedy decoding, else a sample from the row's tempered and filtered
  distribution, which is then the proposal q of rejection sampling.
* **Names** (vLLM ``DeepSeekV4DSpark.load_weights``): see :mod:`.dspark_names`.
* **Numerics**: the stages' KV (context and block) is rounded like every V4 window layer's
  (FP8 on the non-RoPE dims under ``fake_quant``), and ``main_proj`` (FP8 in the release) takes
  FP8-rounded inputs under ``act_quant``, as the official ``linear()`` does for FP8 weights.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelArgs
from ..kernels.attend import attend
from ..layers.fake_quant import gemm_input, quantize_kv_entry
from ..layers.hyper import HyperHead
from ..layers.norm import RMSNorm
from ..model import DecoderLayer
from ..platform import metal_available


class DSparkError(ValueError):
    """A config or model without the DSpark drafter we can run."""


def dspark_layer_args(args: ModelArgs) -> ModelArgs:
    """The config the stages are built with: the main layers plus one window-only layer per
    stage (indices ``num_hidden_layers ..``, so attention and MoE are built like any layer's)."""
    if not args.has_dspark:
        raise DSparkError("the config has no DSpark fields (dspark_block_size, dspark_target_layer_ids, ...)")
    return dataclasses.replace(args, num_hidden_layers=args.num_hidden_layers + len(args.dspark_compress_ratios),
                               compress_ratios=list(args.compress_ratios) + list(args.dspark_compress_ratios),
                               mtp_compress_ratio=None)


class DSparkStage(DecoderLayer):
    """One stage: a V4 decoder layer whose attention reads the target's context window."""

    def context_kv(self, main_x: mx.array, positions: mx.array) -> mx.array:
        """main_x [1, n, D] at ``positions`` [n] -> this stage's context KV [1, n, hd] (RoPE'd,
        rounded like the window entries)."""
        a = self.attn
        cos, sin = a._rope.cos_sin(positions)
        kv = a._rope(a.kv_norm(a.wkv(gemm_input(main_x, a.act_quant))), cos, sin)
        return quantize_kv_entry(kv, a._rope.rope_dim)[0] if a.fake_quant else kv

    def block(self, x: mx.array, ids: mx.array, positions: mx.array, contexts: list[mx.array | None]) -> mx.array:
        """x [1, R*B, hc, D]: R blocks of B rows stacked (one per drafting sequence), at
        ``positions`` [R*B]; ``contexts[r]`` [1, n_r, hd] block r's context or None -> [1, R*B,
        hc, D]. Block r's queries see its own context and its whole block; everything but the
        attention runs over all R*B rows at once. No cache is touched: block KV is never kept."""
        a = self.attn
        R = len(contexts)

        def attend_blocks(h: mx.array) -> mx.array:
            cos, sin = a._rope.cos_sin(positions)
            q, kv, _, _ = a.project(h, cos, sin)  # q [1, R*B, H, hd], kv [1, R*B, hd]
            B = q.shape[1] // R
            q, kv = q.reshape(R, B, *q.shape[2:]), kv.reshape(R, B, kv.shape[-1])
            keys, visible = kv, mx.ones((R, B, B), dtype=mx.bool_)  # the whole block, both directions
            n = max(0 if c is None else c.shape[1] for c in contexts)
            if n:  # contexts padded to the longest, the padding masked out
                lengths = mx.array([0 if c is None else c.shape[1] for c in contexts])
                ctx = mx.concatenate([mx.zeros((1, n, kv.shape[-1]), kv.dtype) if c is None else
                                      mx.pad(c.astype(kv.dtype), [(0, 0), (0, n - c.shape[1]), (0, 0)])
                                      for c in contexts])  # [R, n, hd]
                seen = mx.broadcast_to((mx.arange(n)[None, :] < lengths[:, None])[:, None, :], (R, B, n))
                keys, visible = mx.concatenate([ctx, kv], axis=1), mx.concatenate([seen, visible], axis=-1)
            o = attend(q, keys, visible, a.attn_sink, a.head_dim**-0.5)  # [R, B, H, hd]
            return a.output(o.reshape(1, R * B, *o.shape[2:]), cos, sin)

        return self.forward(x, ids, attend_blocks)


class DSparkHeads(nn.Module):
    """What every DSpark drafter has around its stages (V4-Flash-0731 and V4.1 alike): the
    projection of the target hiddens, the Markov and confidence heads, the block settings.
    Subclasses add ``layers`` (stages with ``context_kv``) and :meth:`hidden`."""

    def __init__(self, D: int, targets: int, vocab: int, rank: int, eps: float, act_quant, block_size: int,
                 noise_id: int, hc_mult: int, window: int):
        super().__init__()
        self.act_quant = act_quant
        self.main_proj = nn.Linear(targets * D, D, bias=False)
        self.main_norm = RMSNorm(D, eps)
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, vocab, bias=False)
        self.confidence = nn.Linear(D + rank, 1, bias=False)
        self.block_size, self.noise_id, self.hc_mult, self.window = block_size, noise_id, hc_mult, window

    def contexts(self, hiddens: mx.array, positions: mx.array) -> list[mx.array]:
        """Target hiddens [1, n, len(targets) * D] at ``positions`` [n] -> each stage's context
        KV [1, n, hd]."""
        main_x = self.main_norm(self.main_proj(gemm_input(hiddens, self.act_quant)))
        return [stage.context_kv(main_x, positions) for stage in self.layers]

    def block_input(self, anchor: int, position: int, embed: nn.Module) -> tuple[mx.array, mx.array, mx.array]:
        """The block ``[anchor, noise...]`` -> (ids [1, B], positions [B], streams [1, B, hc, D]:
        the embeddings copied over the hyper-connection streams)."""
        B = self.block_size
        ids = mx.array([[anchor] + [self.noise_id] * (B - 1)], dtype=mx.int32)
        e = embed(ids)
        return ids, mx.arange(position, position + B), mx.broadcast_to(e[:, :, None, :], (1, B, self.hc_mult, e.shape[-1]))

    @staticmethod
    def base_logits(hidden: mx.array, head: nn.Module) -> mx.array:
        """hidden [n, D] -> logits [n, vocab] float32 through the target's head."""
        return head(hidden.astype(mx.float32)).astype(mx.float32)

    def markov_bias(self, prev: mx.array) -> mx.array:
        """prev [n] the token before each row's target -> logit bias [n, vocab] float32."""
        return self.markov_w2(self.markov_w1(prev)).astype(mx.float32)

    def acceptance(self, hidden: mx.array, prev: mx.array) -> mx.array:
        """The confidence head: estimated acceptance [n] of each row's draft (float32)."""
        if "confidence" not in self:
            raise DSparkError("this checkpoint's DSpark drafter has no confidence head (confidence_head.proj)")
        x = mx.concatenate([hidden.astype(mx.float32), self.markov_w1(prev).astype(mx.float32)], axis=-1)
        return mx.sigmoid(x @ self.confidence.weight.astype(mx.float32).T)[:, 0]


class DSpark(DSparkHeads):
    """The V4-Flash-0731 drafter's weights and forward (``model.dspark``, weights ``dspark.*``)."""

    def __init__(self, args: ModelArgs, cpu: bool | None = None, use_kernel: bool | None = None):
        cpu = not metal_available() if cpu is None else cpu
        use_kernel = metal_available() if use_kernel is None else use_kernel
        stage_args = dspark_layer_args(args)
        D, n = args.hidden_size, len(args.dspark_target_layer_ids)
        super().__init__(D, n, args.vocab_size, args.dspark_markov_rank, args.rms_norm_eps, args.act_quant,
                         args.dspark_block_size, args.dspark_noise_token_id, args.hc_mult, args.sliding_window)
        self.layers = [DSparkStage(stage_args, args.num_hidden_layers + i, cpu, use_kernel) for i in range(n)]
        self.hc_head = HyperHead(args.hc_mult, D, args.hc_eps, args.rms_norm_eps)
        self.norm = RMSNorm(D, args.rms_norm_eps)

    def hidden(self, anchor: int, position: int, contexts: list[mx.array | None], embed: nn.Module) -> mx.array:
        """The block ``[anchor, noise...]`` at ``position ..`` over each stage's context window
        (positions before ``position``) -> normed hidden [block_size, D], row j for the token at
        ``position + j + 1``."""
        return self.hidden_rows([anchor], [position], [contexts], embed)[0]

    def hidden_rows(self, anchors: list[int], positions: list[int], contexts: list[list[mx.array | None]],
                    embed: nn.Module) -> mx.array:
        """:meth:`hidden` for R sequences' blocks in one forward of the stages (``contexts[r]``:
        sequence r's per-stage windows) -> [R, block_size, D]."""
        R, B = len(anchors), self.block_size
        ids = mx.array([[t for a in anchors for t in [a] + [self.noise_id] * (B - 1)]], dtype=mx.int32)  # [1, R*B]
        pos = mx.concatenate([mx.arange(p, p + B) for p in positions])  # [R*B]
        e = embed(ids)
        x = mx.broadcast_to(e[:, :, None, :], (1, R * B, self.hc_mult, e.shape[-1]))  # [1, R*B, hc, D]
        for s, stage in enumerate(self.layers):
            x = stage.block(x, ids, pos, [c[s] for c in contexts])
        return self.norm(self.hc_head(x))[0].reshape(R, B, -1)


def attach_dspark(model, cpu: bool | None = None, use_kernel: bool | None = None) -> DSpark:
    """Give ``model`` its DSpark drafter (``model.dspark``, weights ``dspark.*``) before loading."""
    if not model.args.has_dspark:
        raise DSparkError("this config has no DSpark drafter: config.json has no dspark_* fields")
    model.dspark = DSpark(model.args, cpu, use_kernel)
    return model.dspark


def has_dspark(model) -> bool:
    return getattr(model, "dspark", None) is not None
