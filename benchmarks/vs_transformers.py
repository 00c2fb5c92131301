"""Prefill and decode speed of this port against transformers' PyTorch DeepseekV4ForCausalLM,
on the CPU in float32, same config and same weights, measured side by side in one run.

Each engine runs in a process of its own (torch's thread pool, left alive in a shared process,
competes with MLX's BLAS: MLX prefill fell from ~260 to ~13 tok/s that way). This script only
orchestrates: the transformers process builds the model, saves it and measures; the mlx-v4
process loads the saved files and measures; this one compares.

Needs the fixtures extra (torch + transformers): pip install -e ".[fixtures]"

    python benchmarks/vs_transformers.py                 # hidden 1024, 4 layers, 1024-token prompt
    python benchmarks/vs_transformers.py --vocab 129280  # the real vocabulary (the head dominates decode)

One engine alone (writes its results as JSON; the mlx engine needs a directory transformers'
``save_pretrained`` wrote, such as tests/fixtures/tiny_hf, and a JSON list of prompt ids):

    python benchmarks/vs_transformers.py --engine mlx --model-dir DIR --ids IDS.json --out R.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2  # torch's pool size; MLX's CPU BLAS uses its own default


def config(vocab: int) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=1024, num_hidden_layers=4, compress_ratios=[0, 4, 128, 4], num_hash_layers=1,
        num_attention_heads=16, head_dim=512, qk_rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=256,
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=512, index_n_heads=16, index_head_dim=128,
        index_topk=512, max_position_embeddings=65536,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                      "beta_fast": 32, "beta_slow": 1},
    )


# ---- engines (each runs in its own process) ---------------------------------------------------

def run_transformers(model_dir: Path, ids: list[list[int]], vocab: int, decode_steps: int) -> dict:
    """Build the model (seeded), save it to ``model_dir`` for the other engine, then measure."""
    import torch
    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4ForCausalLM

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**config(vocab), attn_implementation="eager")).eval()
    with torch.no_grad():  # non-trivial values for the parameters initialised to constants
        for name, prm in model.named_parameters():
            if name.endswith(("sinks", "position_bias", "e_score_correction_bias")):
                prm.normal_(0, 0.5)
    model.save_pretrained(model_dir)
    x = torch.tensor(ids)
    with torch.no_grad():
        t = time.perf_counter()
        out = model(x, use_cache=True, logits_to_keep=1)
        prefill = x.shape[1] / (time.perf_counter() - t)
        last_logits = out.logits[0, -1].tolist()
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        tokens = [int(tok)]
        t = time.perf_counter()
        for _ in range(decode_steps):
            out = model(tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(int(tok))
        decode = decode_steps / (time.perf_counter() - t)
    return {"engine": f"transformers {__import__('transformers').__version__} (torch {torch.__version__}, "
                      f"{THREADS} threads)", "prefill": prefill, "decode": decode, "last_logits": last_logits,
            "tokens": tokens}


def run_mlx(model_dir: Path, ids: list[list[int]], decode_steps: int, chunk: int) -> dict:
    import mlx_v4  # noqa: I001  (first: its BLAS preload must run before mlx.core loads)
    import mlx.core as mx
    from mlx_v4.cache import make_cache

    model, _ = mlx_v4.load(str(model_dir), model_config={"fake_quant": False}, dtype=mx.float32)
    x = mx.array(ids, dtype=mx.int32)
    cache = make_cache(model.args)
    t = time.perf_counter()
    for s in range(0, x.shape[1], chunk):
        out = model(x[:, s:s + chunk], cache, last_only=True)
        mx.eval(out, [c.state for c in cache])
    prefill = x.shape[1] / (time.perf_counter() - t)
    last_logits = out[0, -1].tolist()
    tok = mx.argmax(out[:, -1], axis=-1)[:, None]
    tokens = [tok.item()]
    t = time.perf_counter()
    for _ in range(decode_steps):
        tok = mx.argmax(model(tok, cache)[:, -1], axis=-1)[:, None]
        tokens.append(tok.item())
    decode = decode_steps / (time.perf_counter() - t)
    return {"engine": "mlx-v4", "prefill": prefill, "decode": decode, "last_logits": last_logits, "tokens": tokens}


def run_engine(a) -> None:
    ids = json.loads(Path(a.ids).read_text())
    if a.engine == "transformers":
        result = run_transformers(Path(a.model_dir), ids, a.vocab, a.decode)
    else:
        result = run_mlx(Path(a.model_dir), ids, a.decode, a.chunk)
    Path(a.out).write_text(json.dumps(result))


# ---- orchestration (no torch, no MLX in this process) ------------------------------------------

def spawn(engine: str, a, work: Path) -> dict:
    out = work / f"{engine}.json"
    cmd = [sys.executable, __file__, "--engine", engine, "--model-dir", str(work / "model"), "--ids",
           str(work / "ids.json"), "--out", str(out), "--vocab", str(a.vocab), "--decode", str(a.decode),
           "--chunk", str(a.chunk)]
    subprocess.run(cmd, check=True, env=os.environ.copy())
    return json.loads(out.read_text())


def compare(results: list[dict], a) -> None:
    print(f"config: hidden 1024, layers [0, 4, 128, 4], 16 heads x 512, 16 experts top-4, vocab {a.vocab}, "
          f"{a.prompt}-token prompt, float32, CPU; each engine in its own process")
    print(f"{'':44} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for r in results:
        print(f"{r['engine']:44} {r['prefill']:14.1f} {r['decode']:13.1f}")
    hf, ours = results
    print(f"{'ratio mlx-v4 / transformers':44} {ours['prefill'] / hf['prefill']:14.2f} "
          f"{ours['decode'] / hf['decode']:13.2f}   (targets: prefill >= 1, decode >= 1.5)")
    diff = max(abs(x - y) for x, y in zip(hf["last_logits"], ours["last_logits"]))
    same = sum(x == y for x, y in zip(hf["tokens"], ours["tokens"]))
    print(f"same function: max |logits difference| at the last prompt position = {diff:.2e}; "
          f"greedy decode tokens identical: {same}/{len(hf['tokens'])}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--work", help="keep the model, ids and results in this directory (default: a temp dir)")
    p.add_argument("--engine", choices=("transformers", "mlx"), help="run one engine in this process")
    p.add_argument("--model-dir", help="(--engine) the model directory (transformers writes it, mlx reads it)")
    p.add_argument("--ids", help="(--engine) JSON file with the prompt ids, [[...]]")
    p.add_argument("--out", help="(--engine) where to write the results as JSON")
    a = p.parse_args(argv)
    if a.engine:
        if not (a.model_dir and a.ids and a.out):
            p.error("--engine needs --model-dir, --ids and --out")
        return run_engine(a)

    import random

    rng = random.Random(1)
    ids = [[rng.randrange(a.vocab) for _ in range(a.prompt)]]
    with tempfile.TemporaryDirectory() as d:
        work = Path(a.work or d)
        work.mkdir(parents=True, exist_ok=True)
        (work / "ids.json").write_text(json.dumps(ids))
        results = [spawn("transformers", a, work), spawn("mlx", a, work)]
    compare(results, a)


if __name__ == "__main__":
    main()
