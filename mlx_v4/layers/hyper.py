"""Manifold-constrained hyper-connections (mHC), paper §2.2.

The residual stream is ``hc_mult`` parallel copies X [B, L, hc, D]. Around each sub-block a
learned projection of the RMS-normalised, flattened streams yields three mixings:

* ``pre``  [hc]    sigmoid + eps: collapses the streams into the sub-block input;
* ``post`` [hc]    2 * sigmoid: spreads the sub-block output back over the streams;
* ``comb`` [hc,hc] projected towards a doubly-stochastic matrix by Sinkhorn-Knopp
  (row softmax, then alternating column/row normalisation, ``hc_sinkhorn_iters`` in all).

``X'_k = post_k * o + sum_j comb[j, k] * X_j``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..kernels.hyper_mix import hyper_mix, mix_weights


def _mixes(x: mx.array, fn: mx.array, norm_eps: float) -> tuple[mx.array, mx.array]:
    """x [B, L, hc, D] -> (x flattened fp32 [B, L, hc*D], mixes [B, L, fn_rows])."""
    B, L, hc, D = x.shape
    xf = x.reshape(B, L, hc * D).astype(mx.float32)
    rsqrt = mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + norm_eps)
    return xf, (xf @ fn.T) * rsqrt


def _collapse(x, fn, base, scale, hc: int, iters: int, hc_eps: float, norm_eps: float,
              use_kernel: bool = False):
    xf, mixes = _mixes(x, fn, norm_eps)
    if use_kernel:  # one Metal thread per token does all of it (mlx_v4/kernels/hyper_mix.py)
        pre, post, comb = hyper_mix(mixes, base, scale, hc=hc, iters=iters, eps=hc_eps, use_kernel=True)
    else:
        # Sinkhorn is ~60 tiny ops: compiled, they fuse into a few kernels (decode is launch-bound).
        pre, post, comb = mix_weights(mixes, base, scale, hc, iters, hc_eps)
    y = (pre[..., None] * xf.reshape(x.shape)).sum(axis=2)
    return y.astype(x.dtype), post, comb


class HyperConnection(nn.Module):
    def __init__(self, hc_mult: int, hidden_size: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
                 use_kernel: bool = False):
        """``use_kernel``: the mixing weights come from the fused Metal kernel (kernel 4)."""
        super().__init__()
        self.use_kernel = use_kernel
        n_mix = (2 + hc_mult) * hc_mult
        self.fn = mx.zeros((n_mix, hc_mult * hidden_size))
        self.base = mx.zeros((n_mix,))
        self.scale = mx.ones((3,))
        self.hc_mult, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps

    def collapse(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x [B, L, hc, D] -> (sub-block input [B, L, D], post [B, L, hc], comb [B, L, hc, hc])."""
        return _collapse(x, self.fn, self.base, self.scale, self.hc_mult, self.iters, self.hc_eps, self.norm_eps,
                         self.use_kernel)

    @staticmethod
    def expand(o: mx.array, residual: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """o [B, L, D], residual [B, L, hc, D] -> new streams [B, L, hc, D]."""
        mixed = mx.swapaxes(comb, -1, -2) @ residual.astype(mx.float32)  # [B, L, hc, D]
        y = post[..., None] * o.astype(mx.float32)[..., None, :] + mixed
        return y.astype(o.dtype)


class HyperHead(nn.Module):
    """The final collapse before ``norm`` and ``head``: sigmoid weights, no Sinkhorn, no post."""

    def __init__(self, hc_mult: int, hidden_size: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.fn = mx.zeros((hc_mult, hc_mult * hidden_size))
        self.base = mx.zeros((hc_mult,))
        self.scale = mx.ones((1,))
        self.hc_eps, self.norm_eps = hc_eps, norm_eps

    def __call__(self, x: mx.array) -> mx.array:
        xf, mixes = _mixes(x, self.fn, self.norm_eps)
        pre = mx.sigmoid(mixes * self.scale + self.base) + self.hc_eps
        return (pre[..., None] * xf.reshape(x.shape)).sum(axis=2).astype(x.dtype)


def tapped_layers(layers, x: mx.array, taps, step) -> tuple[mx.array, mx.array | None]:
    """Streams x [B, L, hc, D] through ``layers`` (``step(i, layer, x)`` runs layer i) -> (the
    last streams, the input streams of the layers in ``taps`` averaged over the copies and
    concatenated [B, L, len(taps) * D], or None without taps). Shared by the single-sequence
    forward and the stacked step (mlx_v4/batch.py)."""
    tapped = []
    for i, layer in enumerate(layers):
        if i in taps:
            tapped.append(x.mean(axis=2))
        x = step(i, layer, x)
    return x, (mx.concatenate(tapped, axis=-1) if tapped else None)
