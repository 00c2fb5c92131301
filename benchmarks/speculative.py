"""Speculative decoding with the MTP drafter: tok/s and target forwards per generated token with
and without drafts, acceptance on several kinds of text. Each run is its own process (the parent
only collects JSON), plain and drafted runs of the same prompt back to back.

    python benchmarks/speculative.py demo     # the bundled demo (its trained MTP block)
    python benchmarks/speculative.py bench    # the bench config (hidden 1024, vocab 32000), random
                                              # weights: random drafts, and drafts forced right
    python benchmarks/speculative.py projection   # V4-Flash on a Mac: arithmetic, not a measurement
    python benchmarks/speculative.py parts        # one step of each part on the demo, in one process

Greedy throughout; each drafted run also checks that its tokens equal the plain run's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

KINDS = {
    "python docs (the demo's domain)": ["What is the global statement?", "Explain the while statement.",
                                        "What are generators?"],
    "code request": ["Write a Python function that merges two sorted lists.",
                     "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""],
    "unrelated prose": ["Tell me a story about a dragon who learns to cook.", "What is the capital of France?"],
}


def bench_config(vocab: int = 32000) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vs_transformers import config

    return config(vocab) | {"model_type": "deepseek_v4", "compress_ratios": [0, 4, 128, 4, 0],
                            "num_nextn_predict_layers": 1}


def child(spec: dict) -> dict:
    import mlx.core as mx

    import mlx_v4
    from mlx_v4.chat import ChatSession
    from mlx_v4.draft.speculative import MTPDrafter
    from mlx_v4.generation import Stats, Token, stream_generate

    model, tok = mlx_v4.load(spec["model"], **({"model_config": {"fake_quant": False}, "dtype": mx.float32}
                                               if spec.get("float32") else {}))

    def run(prompt, draft):
        if isinstance(prompt, list):  # token ids
            events = stream_generate(model, tok, prompt, max_tokens=spec["tokens"], temperature=0.0,
                                     eos_token_ids={-1}, draft=draft, draft_tokens=spec["k"])
        else:
            events = ChatSession(model, tok, thinking=False).send(prompt, max_tokens=spec["tokens"], temperature=0.0,
                                                                    draft=draft, draft_tokens=spec["k"])
        ids, stats, t0 = [], None, time.perf_counter()
        for ev in events:
            if isinstance(ev, Token):
                ids.append(ev.id)
            elif isinstance(ev, Stats):
                stats = ev
        return ids, stats, time.perf_counter() - t0

    prompt = spec["prompt"]
    if spec["draft"] == "oracle":  # drafts forced right: the plain run's own tokens
        plain, _, _ = run(prompt, None)
        base = len(prompt) if isinstance(prompt, list) else None

        def draft(self, n):
            start = self.cache.offset + 1 - (base if base is not None else 0)
            return [plain[i] if 0 <= i < len(plain) else 0 for i in range(start, start + n)]

        assert base is not None, "oracle drafts need a token-id prompt"
        MTPDrafter.draft = draft
    run(prompt, None if spec["draft"] is None else "mtp")  # warm-up (compiles, page-ins)
    ids, stats, seconds = run(prompt, None if spec["draft"] is None else "mtp")
    # decode seconds (after the first token), as Stats.generation_tps counts them
    decode = (len(ids) - 1) / stats.generation_tps if stats.generation_tps else seconds
    return dict(ids=ids, tokens=len(ids), tps=stats.generation_tps, seconds=decode,
                forwards=stats.target_forwards if spec["draft"] else max(len(ids) - 1, 0),
                draft_tokens=stats.draft_tokens, accepted=stats.accepted_tokens)


def spawn(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(label: str, model: str, prompts: list, tokens: int, k: int, draft: str = "mtp", **extra) -> dict:
    tot = dict(tokens=0, plain_s=0.0, draft_s=0.0, forwards_plain=0, forwards_draft=0, drafted=0, accepted=0,
               same=True)
    for p in prompts:
        base = dict(model=model, prompt=p, tokens=tokens, k=k, **extra)
        plain = spawn(base | {"draft": None})
        drafted = spawn(base | {"draft": draft})
        tot["same"] &= plain["ids"] == drafted["ids"]
        tot["tokens"] += drafted["tokens"]
        tot["plain_s"] += plain["seconds"]
        tot["draft_s"] += drafted["seconds"]
        tot["forwards_plain"] += plain["forwards"]
        tot["forwards_draft"] += drafted["forwards"]
        tot["drafted"] += drafted["draft_tokens"]
        tot["accepted"] += drafted["accepted"]
    n = max(tot["tokens"], 1)
    decoded = tot["tokens"] - len(prompts)  # decode steps after each first token
    row = (f"| {label} | {k} | {tot['tokens']} | {decoded / tot['plain_s']:.2f} | {decoded / tot['draft_s']:.2f} "
           f"| {tot['plain_s'] / tot['draft_s']:.2f}x | {tot['forwards_plain'] / n:.2f} | {tot['forwards_draft'] / n:.2f} "
           f"| {tot['accepted'] / max(tot['drafted'], 1):.2f} | {'yes' if tot['same'] else 'NO'} |")
    print(row, flush=True)
    return tot


def projection(bandwidth_gbs: float = 819.0) -> None:
    """Bytes of weights one decode step reads for V4-Flash as mlx-v4 loads it on a Mac (FP8 ->
    mxfp8 8.25 bits, FP4 experts -> mxfp4 4.25 bits, wo_a bf16, compressors fp32, head bf16),
    plain vs speculative with one MTP draft, as a function of the acceptance rate. A
    projection (arithmetic on the config), not a measurement; KV reads (small at short context)
    and compute are left out."""
    from mlx_v4.config import preset

    a = preset("flash")
    D, H, hd, G, R, ql, inter = (a.hidden_size, a.num_attention_heads, a.head_dim, a.o_groups, a.o_lora_rank,
                             a.q_lora_rank, a.moe_intermediate_size)
    fp8, fp4, bf16, f32 = 8.25 / 8, 4.25 / 8, 2, 4
    attn = (D * ql + ql * H * hd + D * hd + G * R * D) * fp8 + (G * R) * (H * hd // G) * bf16
    comp = {0: 0, 128: 2 * hd * D * f32,
            4: 2 * 2 * hd * D * f32 + ql * a.index_n_heads * a.index_head_dim * fp8 + D * a.index_n_heads * bf16
            + 2 * 2 * a.index_head_dim * D * f32}
    expert, shared, gate = 3 * D * inter * fp4, 3 * D * inter * fp8, a.n_routed_experts * D * bf16
    head = a.vocab_size * D * bf16
    k = a.num_experts_per_tok
    # distinct experts two tokens route to, if independent (adjacent tokens share more: an upper bound)
    union2 = a.n_routed_experts * (1 - (1 - k / a.n_routed_experts) ** 2)

    def step(n_experts):
        return sum(attn + comp[r] + n_experts * expert + shared + gate for r in a.compress_ratios) + head

    plain, verify2 = step(k), step(union2)
    mtp = attn + k * expert + shared + gate + 2 * D * D * fp8 + head  # window-only block + e/h_proj + head
    print(f"V4-Flash, one decode step reads: plain {plain / 1e9:.2f} GB; verifying 2 positions {verify2 / 1e9:.2f} GB "
          f"(routed experts of both tokens: {union2:.1f} distinct of {a.n_routed_experts} if independent); "
          f"one MTP draft {mtp / 1e9:.2f} GB (of which the shared head {head / 1e9:.2f} GB)")
    print(f"at {bandwidth_gbs:.0f} GB/s (M3 Ultra peak), the bandwidth bound is {bandwidth_gbs / (plain / 1e9):.0f} tok/s plain")
    print("| acceptance | tokens per target forward | bytes per token vs plain | projected speed-up |")
    print("|---:|---:|---:|---:|")
    for alpha in (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9):
        per_token = (verify2 + mtp) / (1 + alpha)
        print(f"| {alpha:.2f} | {1 + alpha:.2f} | {per_token / plain:.2f} | {plain / per_token:.2f}x |")
    print(f"break-even acceptance: {(verify2 + mtp) / plain - 1:.2f}")


def dspark_projection(bandwidth_gbs: float = 819.0, block: int = 5, rank: int = 256) -> None:
    """Bytes of weights one decode step reads for V4-Flash-0731 with its DSpark drafter, as
    mlx-v4 loads it on a Mac (formats as :func:`projection`), against plain decoding: a step
    verifies k drafts (k + 1 positions, each routing to its own experts) after one drafter step
    (``main_proj``, three window-only stages over a block of ``block`` rows, the shared head, and
    one read of the Markov head's ``markov_w2`` per drafted row). Drafts are assumed accepted
    independently with probability a, so a step emits 1 + a + ... + a^k tokens. A projection
    (arithmetic on the config), not a measurement."""
    from mlx_v4.config import preset

    a = preset("flash")
    D, H, hd, G, R, ql, inter = (a.hidden_size, a.num_attention_heads, a.head_dim, a.o_groups, a.o_lora_rank,
                                 a.q_lora_rank, a.moe_intermediate_size)
    fp8, fp4, bf16, f32 = 8.25 / 8, 4.25 / 8, 2, 4
    attn = (D * ql + ql * H * hd + D * hd + G * R * D) * fp8 + (G * R) * (H * hd // G) * bf16
    comp = {0: 0, 128: 2 * hd * D * f32,
            4: 2 * 2 * hd * D * f32 + ql * a.index_n_heads * a.index_head_dim * fp8 + D * a.index_n_heads * bf16
            + 2 * 2 * a.index_head_dim * D * f32}
    expert, shared, gate = 3 * D * inter * fp4, 3 * D * inter * fp8, a.n_routed_experts * D * bf16
    head = a.vocab_size * D * bf16
    E, top = a.n_routed_experts, a.num_experts_per_tok

    def union(n):  # distinct experts n independent tokens route to (an upper bound for real text)
        return E * (1 - (1 - top / E) ** n)

    def step(n):
        return sum(attn + comp[r] + union(n) * expert + shared + gate for r in a.compress_ratios) + head

    plain = step(1)
    drafter_fixed = 3 * D * D * fp8 + 3 * (attn + union(block) * expert + shared + gate) + head
    markov_row = a.vocab_size * rank * bf16
    print(f"V4-Flash-0731: plain step {plain / 1e9:.2f} GB; DSpark step {drafter_fixed / 1e9:.2f} GB "
          f"(3 stages over {block} rows: {union(block):.1f} distinct experts each) + {markov_row / 1e9:.3f} GB "
          f"per drafted row (markov_w2); verifying k drafts: k=1 {step(2) / 1e9:.2f}, k=2 {step(3) / 1e9:.2f}, "
          f"k=3 {step(4) / 1e9:.2f}, k=5 {step(6) / 1e9:.2f} GB")
    ks = (1, 2, 3, 5)
    print("| per-draft acceptance | " + " | ".join(f"k={k}: tokens/step, speed-up" for k in ks) + " |")
    print("|---:|" + "---:|" * len(ks))
    for alpha in (0.5, 0.6, 0.7, 0.73, 0.82, 0.9):
        cells = []
        for k in ks:
            tokens = sum(alpha ** i for i in range(k + 1))
            cost = step(k + 1) + drafter_fixed + k * markov_row
            cells.append(f"{tokens:.2f}, {plain * tokens / cost:.2f}x")
        print(f"| {alpha:.2f} | " + " | ".join(cells) + " |")


def parts(model_dir: str, context: int = 100, n: int = 20) -> None:
    """Milliseconds of one target step (1 and 2 positions; layers and head apart) and one MTP
    step on ``model_dir``, each averaged over ``n`` runs after a warm-up, in this process."""
    import mlx.core as mx

    import mlx_v4
    from mlx_v4.cache import accept, speculate

    model, _ = mlx_v4.load(model_dir)
    cache = model.make_cache()
    model(mx.array([list(range(1000, 1000 + context))]), cache)
    mx.eval([c.state for c in cache])

    def timed(f):
        f()
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1000

    def target(ids, fn):
        def run():
            speculate(cache)  # fed, measured, then dropped: every run sees the same cache
            mx.eval(fn(mx.array([ids]), cache))
            accept(cache, context)
        return run

    h = model.streams(mx.array([[5]]), model.make_cache())
    block = model.mtp[0]

    def mtp():
        c = block.make_cache()
        c.offset = context
        mx.eval(block.logits(block(h, mx.array([[7]]), c, model.embed), model.head))

    print("| one decode step, CPU | ms |\n|---|---:|")
    for name, f in [("target, 1 position (plain decode)", target([5], model)),
                    ("target, 2 positions (verifying one draft)", target([5, 6], model)),
                    ("target layers only, 1 position", target([5], model.streams)),
                    ("the head, 1 position", lambda: mx.eval(model.logits(h))),
                    ("one MTP step (its layer and the shared head)", mtp)]:
        print(f"| {name} | {timed(f):.1f} |")


HEADER = ("| text | k | tokens | plain tok/s | drafted tok/s | speed-up | forwards/token plain | forwards/token drafted "
          "| acceptance | same output |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="?", choices=["demo", "bench", "projection", "dspark-projection", "parts"],
                    default="demo")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--k", type=int, nargs="+", default=[1])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.which == "projection":
        return projection()
    if a.which == "dspark-projection":
        return dspark_projection()
    if a.which == "parts":
        return parts(str(ROOT / "mlx_v4" / "demo"))
    print(HEADER, flush=True)
    if a.which == "demo":
        demo = str(ROOT / "mlx_v4" / "demo")
        for k in a.k:
            for label, prompts in KINDS.items():
                compare(label, demo, prompts, a.tokens, k)
            import numpy as np

            ids = [np.random.default_rng(0).integers(2, 120000, 64).tolist()]
            compare("random token ids", demo, ids, a.tokens, k)
        return
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_v4.config import ModelArgs
    from mlx_v4.testing.tiny import random_model

    cfg = bench_config()
    with tempfile.TemporaryDirectory() as d:
        model = random_model(ModelArgs.from_dict(cfg), seed=0, mtp=True)
        mx.save_safetensors(str(Path(d) / "model.safetensors"), dict(tree_flatten(model.parameters())))
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        del model
        import numpy as np

        ids = [np.random.default_rng(0).integers(2, 32000, 256).tolist()]
        for k in a.k:
            compare("random weights (drafts rejected)", d, ids, a.tokens, k, float32=True)
            compare("drafts forced right", d, ids, a.tokens, k, draft="oracle", float32=True)


if __name__ == "__main__":
    main()
