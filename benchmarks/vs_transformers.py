"""Prefill and decode speed of this port against transformers' PyTorch DeepseekV4ForCausalLM,
on the CPU in float32, same config and same weights, measured side by side in one run.

Needs the fixtures extra (torch + transformers): pip install -e ".[fixtures]"

    python benchmarks/vs_transformers.py                 # hidden 1024, 4 layers, 1024-token prompt
    python benchmarks/vs_transformers.py --vocab 129280  # the real vocabulary (the head dominates decode)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import mlx_v4  # noqa: F401  # isort: skip  (first: its BLAS preload must run before mlx.core loads)
import mlx.core as mx
import numpy as np

from mlx_v4.cache import make_cache


def config(vocab: int) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=1024, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4], num_hash_layers=1,
        num_attention_heads=16, head_dim=512, qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=256,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=512, index_n_heads=16, index_head_dim=128,
        index_topk=512, max_position_embeddings=65536,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                      "beta_fast": 32, "beta_slow": 1},
    )


def bench_transformers(model, ids, decode_steps: int):
    import torch

    torch.set_num_threads(2)
    x = torch.tensor(ids)
    with torch.no_grad():
        t = time.perf_counter()
        out = model(x, use_cache=True, logits_to_keep=1)
        prefill = x.shape[1] / (time.perf_counter() - t)
        last_logits = out.logits[0, -1].numpy()
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        tokens = [int(tok)]
        t = time.perf_counter()
        for _ in range(decode_steps):
            out = model(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(int(tok))
        decode = decode_steps / (time.perf_counter() - t)
    return prefill, decode, last_logits, tokens


def bench_mlx(model_dir: str, ids, decode_steps: int, chunk: int):
    model, _ = mlx_v4.load(model_dir, model_config={"fake_quant": False}, dtype=mx.float32)
    x = mx.array(ids, dtype=mx.int32)
    cache = make_cache(model.args)
    t = time.perf_counter()
    for s in range(0, x.shape[1], chunk):
        out = model(x[:, s:s + chunk], cache, last_only=True)
        mx.eval(out, [c.state for c in cache])
    prefill = x.shape[1] / (time.perf_counter() - t)
    last_logits = np.array(out[0, -1])
    tok = mx.argmax(out[:, -1], axis=-1)[:, None]
    tokens = [tok.item()]
    t = time.perf_counter()
    for _ in range(decode_steps):
        tok = mx.argmax(model(tok, cache)[:, -1], axis=-1)[:, None]
        tokens.append(tok.item())
    decode = decode_steps / (time.perf_counter() - t)
    return prefill, decode, last_logits, tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512)
    a = p.parse_args()

    import torch
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**config(a.vocab), attn_implementation="eager")).eval()
    with torch.no_grad():  # non-trivial values for the parameters initialised to constants
        for name, prm in hf.named_parameters():
            if name.endswith(("sinks", "position_bias", "e_score_correction_bias")):
                prm.normal_(0, 0.5)
    ids = torch.randint(0, a.vocab, (1, a.prompt), generator=torch.Generator().manual_seed(1)).tolist()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)  # mlx-v4 loads the same weights from transformers' files
        results = {"transformers (torch, 2 threads)": bench_transformers(hf, ids, a.decode)}
        del hf
        results["mlx-v4"] = bench_mlx(d, ids, a.decode, a.chunk)
    print(f"config: hidden 1024, layers [0, 4, 128, 4], 16 heads x 512, 16 experts top-4, vocab {a.vocab}, "
          f"{a.prompt}-token prompt, float32, CPU")
    print(f"{'':34} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, (pf, dc, *_) in results.items():
        print(f"{name:34} {pf:14.1f} {dc:13.1f}")
    (tp, td, tl, tt), (mp, md, ml, mt) = results.values()
    print(f"{'ratio mlx-v4 / transformers':34} {mp / tp:14.2f} {md / td:13.2f}   (targets: prefill >= 1, decode >= 1.5)")
    print(f"same function: max |logits difference| at the last prompt position = {np.abs(tl - ml).max():.2e}; "
          f"greedy decode tokens identical: {sum(a == b for a, b in zip(tt, mt))}/{len(tt)}")


if __name__ == "__main__":
    main()
