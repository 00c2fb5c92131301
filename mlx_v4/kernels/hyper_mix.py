"""Kernel 4: the hyper-connection mixing weights of one step (paper §2.2), fused.

From the projected mixes of each token: ``pre = sigmoid(.) + eps``, ``post = 2 sigmoid(.)``
and ``comb`` = Sinkhorn-Knopp of the [hc, hc] logits (row softmax + eps, column
normalisation, then ``iters - 1`` alternating row/column normalisations). The definition is
:func:`mlx_v4.layers.hyper._mix_weights` (about 60 tiny ops per step in MLX); the kernel
runs one thread per token with the [hc, hc] matrix in registers.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

from ._base import CUDA_PRELUDE, KernelSpec, metal_runner

SOURCE = r"""
  // Template: HC streams, ITERS Sinkhorn iterations. One thread per token.
  constexpr int NM = (2 + HC) * HC;
  const int t = int(thread_position_in_grid.x);
  const int M = dims[0];
  if (t >= M) return;
  auto x = mixes + size_t(t) * NM;
  const float hc_eps = eps[0];
  for (int k = 0; k < HC; ++k) {
    pre[t * HC + k] = 1.0f / (1.0f + exp(-(x[k] * scale[0] + base[k]))) + hc_eps;
    post[t * HC + k] = 2.0f / (1.0f + exp(-(x[HC + k] * scale[1] + base[HC + k])));
  }
  float c[HC][HC];
  for (int i = 0; i < HC; ++i) {
    float peak = -INFINITY;
    for (int j = 0; j < HC; ++j) {
      c[i][j] = x[2 * HC + i * HC + j] * scale[2] + base[2 * HC + i * HC + j];
      peak = max(peak, c[i][j]);
    }
    float total = 0.0f;
    for (int j = 0; j < HC; ++j) {
      c[i][j] = exp(c[i][j] - peak);
      total += c[i][j];
    }
    for (int j = 0; j < HC; ++j) c[i][j] = c[i][j] / total + hc_eps;
  }
  for (int it = 0; it < ITERS; ++it) {
    if (it > 0) {
      for (int i = 0; i < HC; ++i) {
        float r = 0.0f;
        for (int j = 0; j < HC; ++j) r += c[i][j];
        for (int j = 0; j < HC; ++j) c[i][j] = c[i][j] / (r + hc_eps);
      }
    }
    for (int j = 0; j < HC; ++j) {
      float col = 0.0f;
      for (int i = 0; i < HC; ++i) col += c[i][j];
      for (int i = 0; i < HC; ++i) c[i][j] = c[i][j] / (col + hc_eps);
    }
  }
  for (int i = 0; i < HC; ++i)
    for (int j = 0; j < HC; ++j) comb[(size_t(t) * HC + i) * HC + j] = c[i][j];
"""

SPEC = KernelSpec(name="v4_hyper_mix", input_names=("mixes", "base", "scale", "eps", "dims"),
                  output_names=("pre", "post", "comb"), source=SOURCE, header=CUDA_PRELUDE)


def sinkhorn(logits: mx.array, iters: int, eps: float) -> mx.array:
    """[..., hc, hc] logits -> approximately doubly-stochastic matrix (official hc_split_sinkhorn)."""
    comb = mx.softmax(logits, axis=-1, precise=True) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


@partial(mx.compile, shapeless=False)
def mix_weights(mixes, base, scale, hc: int, iters: int, hc_eps: float):
    """mixes [..., (2+hc)*hc] -> (pre [..., hc], post [..., hc], comb [..., hc, hc]): the definition
    kernel 4 computes (the official ``hc_split_sinkhorn``)."""
    pre = mx.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + hc_eps
    post = 2 * mx.sigmoid(mixes[..., hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = mixes[..., 2 * hc:].reshape(*mixes.shape[:-1], hc, hc) * scale[2] + base[2 * hc:].reshape(hc, hc)
    return pre, post, sinkhorn(comb, iters, hc_eps)


def hyper_mix_reference(mixes, base, scale, *, hc: int, iters: int, eps: float):
    """mixes [..., (2+hc)*hc] -> (pre [..., hc], post [..., hc], comb [..., hc, hc])."""
    return mix_weights(mixes, base, scale, hc, iters, eps)


def hyper_mix_kernel(mixes, base, scale, *, hc: int, iters: int, eps: float, threads: int = 64,
                     runner=metal_runner):
    lead = mixes.shape[:-1]
    M = 1
    for n in lead:
        M *= n
    inputs = [mixes.reshape(M, -1).astype(mx.float32), base.astype(mx.float32), scale.astype(mx.float32),
              mx.array([eps], dtype=mx.float32), mx.array([M], dtype=mx.int32)]
    pre, post, comb = runner(SPEC, inputs, [(M, hc), (M, hc), (M, hc, hc)], [mx.float32] * 3,
                             (M, 1, 1), (min(threads, M), 1, 1), [("HC", hc), ("ITERS", iters)])
    return pre.reshape(*lead, hc), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)


def hyper_mix(mixes, base, scale, *, hc: int, iters: int, eps: float, use_kernel: bool):
    """The mixing weights of one hyper-connection step; ``use_kernel``: the Metal kernel."""
    if not use_kernel:
        return hyper_mix_reference(mixes, base, scale, hc=hc, iters=iters, eps=eps)
    return hyper_mix_kernel(mixes, base, scale, hc=hc, iters=iters, eps=eps, runner=metal_runner)
