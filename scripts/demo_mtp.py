#!/usr/bin/env python
"""The MTP stage of the demo (run by ``scripts/train_demo.py``, or alone): train only the MTP
block (``mtp.0.*``, the drafter for speculative decoding) on the frozen demo model, then add
it to ``mlx_v4/demo/model.safetensors``.

    python scripts/demo_mtp.py --minutes 10        # train, add to mlx_v4/demo/, measure acceptance

The target is the demo exactly as users run it (quantized weights, fake_quant on). At position
i the block reads the target's last streams h_i and the token at i+1; it learns the target's own
greedy prediction for i+2 (self-distillation on the demo's chat turns), which is what greedy
verification accepts. The block trains in float32 with fake_quant
off (rounding is not differentiable), is saved quantized like the rest of the demo, and the
script measures the acceptance of greedy speculative decoding on chat prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

import mlx_v4  # noqa: E402
from mlx_v4.config import ModelArgs  # noqa: E402
from mlx_v4.draft.mtp import MTPBlock  # noqa: E402

#: chat prompts for the acceptance measurement (the demo's own domain), not training questions verbatim
EVAL_QUESTIONS = ["What is the assert statement?", "Explain the for statement.", "What are lambdas?",
                  "How do I use the with statement?", "What does the yield keyword do?",
                  "Tell me about classes.", "What is a list comprehension?", "How are exceptions raised?"]


#: Share of the time budget spent running the target over the data (the rest trains).
TEACHER_SHARE = 0.5


def init_block(args: ModelArgs, seed: int) -> MTPBlock:
    """Small healthy initial weights; e_proj/h_proj near identity-like scale, routing bias frozen."""
    block = MTPBlock(args)
    params = {}
    for i, (name, p) in enumerate(sorted(tree_flatten(block.parameters()))):
        k = mx.random.key(seed * 7919 + i)
        if name.endswith("norm.weight") or name.endswith(".scale"):
            params[name] = mx.ones(p.shape)
        elif name.startswith(("hc_", "hc_head")) or ".hc_" in name:
            params[name] = 0.01 * mx.random.normal(p.shape, key=k) if name.endswith(".fn") else mx.zeros(p.shape)
        elif name.endswith(("attn_sink", "gate.bias")):
            params[name] = mx.zeros(p.shape)
        else:
            params[name] = mx.random.normal(p.shape, key=k) * p.shape[-1] ** -0.5
    block.update(tree_unflatten(list(params.items())))
    block.ffn.gate.freeze(keys=["bias"], strict=False)
    mx.eval(block.parameters())
    return block


def dense_head(target) -> mx.array:
    head = target.head
    if isinstance(head, nn.QuantizedLinear):
        return mx.dequantize(head.weight, head.scales, head.get("biases"), group_size=head.group_size,
                             bits=head.bits, mode=head.mode).astype(mx.float32)
    return head.weight.astype(mx.float32)


def teacher_batches(target, rows: np.ndarray, seconds: float, batch: int, rng) -> list[tuple]:
    """Run the frozen target over random rows for ``seconds``: per batch (its last streams h
    [B, L-1, hc, D] at positions i, the tokens at i+1 [B, L-1], and the target's own greedy
    prediction for i+2 [B, L-1], over the ids that occur in the data)."""
    used = mx.array(np.unique(rows).astype(np.int32))
    w_used = dense_head(target)[used]
    out, t0 = [], time.time()
    order = rng.permutation(len(rows))
    while time.time() - t0 < seconds and len(out) * batch < len(rows):
        x = mx.array(rows[order[len(out) * batch:(len(out) + 1) * batch], :-1])
        h = target.streams(x)  # [B, L, hc, D]
        logits = target.norm(target.hc_head(h[:, 1:])).astype(mx.float32) @ w_used.T
        label = used[mx.argmax(logits, axis=-1)]  # the target's prediction after i+1
        item = (h[:, :-1].astype(mx.float16), x[:, 1:], label)
        mx.eval(item)
        out.append(item)
    print(f"mtp: target ran over {len(out)} batches ({len(out) * batch} rows) in {time.time() - t0:.0f}s", flush=True)
    return out


def train_block(target, rows: np.ndarray, minutes: float, batch: int, lr: float, seed: int) -> MTPBlock:
    """TEACHER_SHARE of the budget runs the target (teacher_batches); the rest trains the block for
    as many epochs over them as fit. Loss: cross-entropy to the target's greedy prediction over
    the ids it predicts, plus the full-vocabulary cross-entropy at 32 positions per step (so no
    other id wins the block's argmax)."""
    from train_demo import patch_selections_for_training

    patch_selections_for_training()
    rng = np.random.default_rng(seed)
    data = teacher_batches(target, rows, TEACHER_SHARE * minutes * 60, batch, rng)
    args = ModelArgs.from_dict(target.args.to_dict(), {"fake_quant": False})
    block = init_block(args, seed)
    head = dense_head(target)
    cand_np = np.unique(np.concatenate([np.array(d[2]).reshape(-1) for d in data]))
    cand = mx.array(cand_np.astype(np.int32))
    w_cand = head[cand]
    print(f"mtp: {len(cand_np)} distinct predicted ids", flush=True)

    def loss_fn(block, h, nxt, y_cand, full_pos, y_full):
        out = block(h, nxt, block.make_cache(), target.embed)
        x = block.norm(block.hc_head(out)).astype(mx.float32)  # [B, L, D]
        part = nn.losses.cross_entropy(x @ w_cand.T, y_cand, reduction="mean")
        xf = x.reshape(-1, x.shape[-1])[full_pos]
        return part + 0.5 * nn.losses.cross_entropy(xf @ head.T, y_full, reduction="mean")

    step_fn = nn.value_and_grad(block, loss_fn)
    opt = optim.AdamW(learning_rate=lr, betas=(0.9, 0.95), weight_decay=0.01)
    t0, step, ema = time.time(), 0, None
    budget = (1 - TEACHER_SHARE) * minutes * 60
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        opt.learning_rate = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        h, nxt, label = data[step % len(data)]
        lab = np.array(label)
        full_pos = rng.choice(lab.size, 32, replace=False)
        loss, grads = step_fn(block, h.astype(mx.float32), nxt, mx.array(np.searchsorted(cand_np, lab).astype(np.int32)),
                              mx.array(full_pos.astype(np.int32)), mx.array(lab.reshape(-1)[full_pos]))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(block, grads)
        mx.eval(loss, block.parameters(), opt.state)
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0 or step == 1:
            print(f"mtp step {step:5d}  {time.time() - t0:6.0f}s  loss {loss.item():.3f}  ema {ema:.3f}", flush=True)
    print(f"mtp: trained {step} steps ({step / max(len(data), 1):.1f} epochs) in {(time.time() - t0) / 60:.1f} min",
          flush=True)
    block.steps = step
    return block


def save_block(block: MTPBlock, out: Path) -> dict:
    """Quantize like the demo's other matrices and write mtp.0.* into out/model.safetensors
    (temp file, fsync, rename) and its plan into config.json. Returns the plan."""
    from train_demo import EXPERT_Q, OTHER_Q, _is_qparam, quant_plan

    plan = {f"mtp.0.{k}": v for k, v in quant_plan(block).items()}
    plan = {k: (dict(EXPERT_Q) if ".experts." in k else dict(OTHER_Q)) for k in plan}
    nn.quantize(block, class_predicate=lambda p, m: plan.get(f"mtp.0.{p}", False))
    weights = {k: v for k, v in mx.load(str(out / "model.safetensors")).items() if not k.startswith("mtp.")}
    for k, v in tree_flatten(block.parameters()):
        weights[f"mtp.0.{k}"] = v.astype(mx.float16) if v.dtype == mx.float32 and not _is_qparam(k) else v
    tmp = out / ".model.safetensors.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out / "model.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    q = {k: v for k, v in cfg["quantization"].items() if not k.startswith("mtp.")}
    cfg["quantization"] = q | plan
    tmp = out / ".config.json.tmp"
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    return plan


def measure_acceptance(model_dir: Path, questions=EVAL_QUESTIONS, max_tokens: int = 60, k: int = 1) -> dict:
    """Greedy speculative decoding on chat prompts: drafts, accepted, target forwards, and that
    the output equals plain decoding."""
    from mlx_v4.chat import ChatSession
    from mlx_v4.generation import Stats, Token

    model, tok = mlx_v4.load(model_dir)
    tot = dict(draft=0, accepted=0, forwards=0, tokens=0, same=True)
    for q in questions:
        outs = []
        for draft in (None, "mtp"):
            s = ChatSession(model, tok, thinking=False)
            ids = []
            for ev in s.send(q, max_tokens=max_tokens, temperature=0.0, draft=draft, draft_tokens=k):
                if isinstance(ev, Token):
                    ids.append(ev.id)
                elif isinstance(ev, Stats) and draft:
                    tot["draft"] += ev.draft_tokens
                    tot["accepted"] += ev.accepted_tokens
                    tot["forwards"] += ev.target_forwards
                    tot["tokens"] += ev.generation_tokens
            outs.append(ids)
        tot["same"] &= outs[0] == outs[1]
    tot["acceptance"] = tot["accepted"] / max(tot["draft"], 1)
    tot["mean_accepted"] = (tot["accepted"] + tot["forwards"]) / max(tot["forwards"], 1)
    return tot


def write_readme_section(out: Path, r: dict) -> None:
    """Replace (or add) the README's MTP section with this run's numbers."""
    path = out / "README.md"
    text = path.read_text() if path.exists() else ""
    head = "## MTP drafter"
    text = text.split(head)[0].rstrip() + "\n\n" if head in text else text.rstrip() + "\n\n"
    text += f"""{head}

`mtp.0.*` is the V4 multi-token-prediction block (window-only attention, its own scored MoE,
`e_proj`/`h_proj`, its own `hc_head`; embed and head shared), trained by `scripts/demo_mtp.py`
(also the last stage of `scripts/train_demo.py`) on the frozen model above for {r['minutes']:.0f} min
({r['steps']} steps; `python scripts/demo_mtp.py --minutes {r['minutes']:.0f} --seed {r.get('seed', 0)}`, CPU shared with
other jobs, so the step count varies): it learns the model's own greedy prediction of the token after next. Saved like the
rest (experts 4-bit, other large matrices 8-bit). `mlx-v4 chat` drafts with it by default.

Greedy speculative decoding on {len(EVAL_QUESTIONS)} chat prompts (60 tokens each, one draft per step):
acceptance {r['acceptance']:.2f}, {r['mean_accepted']:.2f} tokens per target forward; the output equals plain
decoding token for token: {'yes' if r['same'] else 'NO'}.
"""
    path.write_text(text)


def chat_rows(chats: list[list[int]], seq_len: int, seed: int) -> np.ndarray:
    """Rows of ``seq_len + 1`` ids made of whole chat turns (the demo's domain, where its drafts
    are used), each row starting at a turn."""
    import random

    rng = random.Random(seed)
    order = list(chats)
    rng.shuffle(order)
    rows, row = [], []
    for turn in order * 2:
        row += turn
        if len(row) >= seq_len + 1:
            rows.append(row[: seq_len + 1])
            row = []
    return np.array(rows, dtype=np.int32)


def run(out: Path, minutes: float, batch: int, lr: float, seed: int, seq_len: int) -> dict:
    from train_demo import build_data, load_tokenizer

    tok, _ = load_tokenizer()
    _, chats, _, _ = build_data(tok, seq_len, seed)
    rows = chat_rows(chats, seq_len, seed)
    target, _ = mlx_v4.load(out)
    target.freeze()
    if getattr(target, "mtp", None):
        del target["mtp"]  # train from scratch against the main model only
    block = train_block(target, rows, minutes, batch, lr, seed)
    steps = block.steps
    save_block(block, out)
    result = measure_acceptance(out)
    result.update(steps=steps, minutes=minutes, seed=seed)
    write_readme_section(out, result)
    print(f"mtp acceptance on {len(EVAL_QUESTIONS)} chat prompts (greedy, k=1): {result['acceptance']:.2f}, "
          f"{result['mean_accepted']:.2f} tokens per target forward; output equals plain decoding: {result['same']}",
          flush=True)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    ap.add_argument("--out", type=Path, default=ROOT / "mlx_v4" / "demo", help="the demo to add the block to")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-only", action="store_true", help="only measure the acceptance of --out")
    a = ap.parse_args()
    if a.measure_only:
        print(json.dumps(measure_acceptance(a.out), indent=1))
        return
    run(a.out, a.minutes, a.batch, a.lr, a.seed, a.seq_len)


if __name__ == "__main__":
    main()
