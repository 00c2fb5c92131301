"""Measure the DeepSeek V4.1 packed cache: bytes each token adds, at the release's cache layout.

The model is the released V4.1-Flash layer plan (40 layers, ratios [0,0, 2 x 18, 1 x 20], kv
sources 2/8/14/20, index sources 2/8/.../36, candidate source 20, 128-token windows, head_dim
512, index_head_dim 128) with small matrices elsewhere (hidden 256, 2 heads, 4 experts, no
Engram), random weights: the cache's layout and sizes depend only on the former. It feeds
``--tokens`` tokens in chunks and reports the bytes in use (window, compressed entries, index
keys, open groups) and their growth per token, beside the formula.

    python benchmarks/v41_cache_bytes.py --tokens 2048
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_v4.v41.cache import bytes_per_token, used_nbytes
from mlx_v4.v41.config import preset
from mlx_v4.v41.model import Model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    a = ap.parse_args()
    args = preset("v41-flash", hidden_size=256, num_attention_heads=2, q_lora_rank=64, o_lora_rank=32, o_groups=2,
                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, vocab_size=1024,
                  index_n_heads=4, engram_layer_ids=[], engram_num_embeddings=[])
    model = Model(args)
    params = []
    for i, (name, p) in enumerate(tree_flatten(model.parameters())):
        k = mx.random.key(i)
        if "norm" in name:
            params.append((name, 1 + 0.1 * mx.random.normal(p.shape, key=k)))
        elif "hc_" in name:
            params.append((name, (1.0 if name.endswith("scale") else 0.0) + 0.02 * mx.random.normal(p.shape, key=k)))
        else:
            params.append((name, mx.random.normal(p.shape, key=k) * p.shape[-1] ** -0.5))
    model.update(tree_unflatten(params))
    ids = mx.array(np.random.default_rng(0).integers(2, 1024, (1, a.tokens)).astype(np.int32))
    cache, used, t0 = model.make_cache(), {}, time.perf_counter()
    for s in range(0, a.tokens, a.chunk):
        mx.eval(model(ids[:, s:s + a.chunk], cache, last_only=True), [c.state for c in cache])
        used[cache.offset] = used_nbytes(cache)
    formula = bytes_per_token(args)
    first, last = a.chunk * 2, a.tokens
    measured = (used[last] - used[first]) / (last - first)
    print(f"fed {a.tokens} tokens in {time.perf_counter() - t0:.1f} s (2 shared CPU cores)")
    print(f"in use at {last} tokens: {used[last] / 1e6:.3f} MB; window part {formula['window_constant'] / 1e6:.3f} MB")
    print(f"measured growth {first}->{last}: {measured:.2f} bytes/token; formula {formula['total']:.2f} "
          f"(compressed {formula['compressed']:.0f} + index keys {formula['index_keys']:.0f})")
    print(f"projected at 1,048,576 tokens: {(formula['total'] * 2**20 + formula['window_constant']) / 2**30:.3f} GiB")


if __name__ == "__main__":
    main()
