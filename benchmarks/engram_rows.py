"""DeepSeek V4.1 Engram rows per prefill chunk: rows looked up against distinct rows read.

Hashes a text exactly as V4.1-Flash would (its hash layout: layers 1 and 14, 2- to 4-grams,
8 heads, ``engram_vocab_size`` 16M; the bundled tokenizer's compressed map) and counts, per
prefill chunk and table, the rows the layers look up (tokens x 24) and the distinct rows among
them: what one step reads from disk, since a lookup reads each distinct row once. No model and
no table are needed: the rows depend only on the token ids.

    python benchmarks/engram_rows.py README.md --chunk 512      # prose and code
    python benchmarks/engram_rows.py --repeat "def f(x): return x + 1" --times 200
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("text", nargs="?", help="a text file")
    ap.add_argument("--repeat", help="a phrase repeated --times times instead of a file")
    ap.add_argument("--times", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=512, help="prefill step size")
    args = ap.parse_args()

    from mlx_v4.tokenizer import bundled_tokenizer_path, load_tokenizer
    from mlx_v4.v41.config import preset
    from mlx_v4.v41.engram_hash import EngramLayout, NgramHasher, compressed_token_map

    if (args.text is None) == (args.repeat is None):
        raise SystemExit("give a text file or --repeat PHRASE")
    text = open(args.text, encoding="utf-8").read() if args.text else " ".join([args.repeat] * args.times)
    ids = np.array([load_tokenizer().encode(text)], dtype=np.int64)
    a = preset("v41-flash")
    layout = EngramLayout.build(a.engram_layer_ids, a.engram_max_ngram_size, a.engram_n_heads, a.engram_head_dim,
                                a.engram_vocab_size)
    lookup, size = compressed_token_map(str(bundled_tokenizer_path()))
    hasher = NgramHasher(layout, lookup, size, a.engram_pad_token_id)
    history = np.full((1, hasher.history_len), -1, dtype=np.int64)
    looked = distinct = 0
    for lo in range(0, ids.shape[1], args.chunk):
        rows, history = hasher(ids[:, lo:lo + args.chunk], history)
        for j in range(len(a.engram_layer_ids)):
            looked += rows[:, :, j].size
            distinct += len(np.unique(rows[:, :, j]))
    n_chunks = -(-ids.shape[1] // args.chunk)
    print(f"{ids.shape[1]} tokens in {n_chunks} chunks of {args.chunk}: {looked} rows looked up, {distinct} "
          f"distinct per step ({distinct / looked:.1%}; {looked / distinct:.2f}x fewer reads), "
          f"{distinct * (a.engram_head_dim + a.engram_head_dim // 32) / 2**20:.1f} MiB read")


if __name__ == "__main__":
    main()
