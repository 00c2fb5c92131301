"""DeepSeek V4 assembly: embed -> hc_mult streams -> decoder layers -> hc_head -> norm -> head.

Each decoder layer wraps attention and the MoE in manifold-constrained hyper-connections
(paper §2.2). The interface follows mlx-lm (``Model(inputs, cache)``, ``make_cache``,
``sanitize``, ``layers``) so its generation utilities can drive it.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import make_cache
from .config import ModelArgs, PositionError  # noqa: F401  (PositionError: its public home was here)
from .layers.attention import Attention
from .layers.hyper import HyperConnection, HyperHead, tapped_layers
from .layers.moe import MoE
from .layers.norm import RMSNorm
from .platform import metal_available


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int, cpu: bool, use_kernel: bool = False):
        super().__init__()
        hc = (args.hc_mult, args.hidden_size, args.hc_sinkhorn_iters, args.hc_eps, args.rms_norm_eps)
        self.hc_attn = HyperConnection(*hc, use_kernel=use_kernel)
        self.hc_ffn = HyperConnection(*hc, use_kernel=use_kernel)
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args, layer, use_kernel=use_kernel)
        self.ffn = MoE(args, layer, grouped_dense=cpu)

    def __call__(self, x: mx.array, token_ids: mx.array, cache) -> mx.array:
        return self.forward(x, token_ids, lambda h: self.attn(h, cache))

    def forward(self, x: mx.array, token_ids: mx.array, attend) -> mx.array:
        """x [B, L, hc, D] -> [B, L, hc, D]; ``attend`` maps the normed attention input
        [B, L, D] to the attention output (one cache, or several sequences' rows)."""
        h, post, comb = self.hc_attn.collapse(x)
        x = HyperConnection.expand(attend(self.attn_norm(h)), x, post, comb)
        h, post, comb = self.hc_ffn.collapse(x)
        return HyperConnection.expand(self.ffn(self.ffn_norm(h), token_ids), x, post, comb)


class Model(nn.Module):
    def __init__(self, args: ModelArgs, cpu: bool | None = None, use_kernel: bool | None = None):
        """``cpu``: choose the paths that are fast on MLX's CPU backend (default: when Metal is
        absent). Both choices compute the same function; tests run both. ``use_kernel``: use
        the custom Metal kernels (mlx_v4/kernels; default: when Metal is available)."""
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        cpu = not metal_available() if cpu is None else cpu
        use_kernel = metal_available() if use_kernel is None else use_kernel
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i, cpu, use_kernel) for i in range(args.num_hidden_layers)]
        self.hc_head = HyperHead(args.hc_mult, args.hidden_size, args.hc_eps, args.rms_norm_eps)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, last_only: bool = False) -> mx.array:
        """inputs [B, L] token ids -> logits [B, L, vocab] float32 (or [B, 1, vocab] with
        ``last_only``). With ``cache`` the tokens continue what the cache holds."""
        x = self.streams(inputs, cache)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    def streams(self, inputs: mx.array, cache=None) -> mx.array:
        """inputs [B, L] -> the last layer's hyper-connection streams [B, L, hc_mult, D] (what
        ``hc_head`` collapses; the MTP drafter reads them too)."""
        return self.tapped_streams(inputs, cache, ())[0]

    def tapped_streams(self, inputs: mx.array, cache=None, taps=()) -> tuple[mx.array, mx.array | None]:
        """:meth:`streams`, also returning the input streams of the layers in ``taps`` averaged
        over the hyper-connection copies and concatenated, [B, L, len(taps) * D] (None without
        taps): what the DSpark drafter reads (official V4.1 ``Transformer.forward``,
        ``main_hiddens.append(h.mean(dim=2))`` before each target layer)."""
        if cache is None:
            cache = self.make_cache()
        B, L = inputs.shape
        end = cache[0].offset + L
        if end > self.args.max_position_embeddings:
            raise PositionError(
                f"position {end} is past max_position_embeddings={self.args.max_position_embeddings}")
        x = self.embed(inputs)
        x = mx.broadcast_to(x[:, :, None, :], (B, L, self.args.hc_mult, x.shape[-1]))
        step = lambda i, layer, h: layer(h, inputs, cache[i])  # noqa: E731
        if self.expert_store is None:
            return tapped_layers(self.layers, x, taps, step)
        from .experts import StepGuard

        with StepGuard(cache):  # a failed expert read rewinds the cache: no half-updated step
            return tapped_layers(self.layers, x, taps, step)

    def logits(self, x: mx.array) -> mx.array:
        """streams [B, L, hc_mult, D] -> logits [B, L, vocab] float32."""
        x = self.norm(self.hc_head(x))
        return self.head(x.astype(mx.float32)).astype(mx.float32)

    def step_batch(self, token_rows, caches) -> mx.array:
        """One model step over several sequences: ``token_rows[r]`` (ids, length >= 1) continue
        ``caches[r]``. -> logits [R, vocab] float32 at each row's last token. Everything but
        the cache-reading part of attention runs over all rows' tokens at once (mlx_v4/batch.py)."""
        from .batch import step_batch

        return step_batch(self, token_rows, caches)

    #: Identity of the loaded weights (set by mlx_v4.load from the checkpoint files).
    weights_id: str = ""
    #: The routed-expert store when experts are read on demand (mlx_v4.load(expert_budget=...)).
    expert_store = None

    @property
    def fingerprint(self) -> str:
        """Identifies architecture, quantization and weights; saved caches must match it."""
        from .cache_file import model_fingerprint

        return model_fingerprint(self)

    def make_cache(self):
        return make_cache(self.args)

    def sanitize(self, weights: dict) -> dict:
        """Official or transformers names -> ours (mlx-lm's loading hook)."""
        from .weights import rename_weights

        return rename_weights(weights, self.args)
