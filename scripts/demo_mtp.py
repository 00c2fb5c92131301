#!/usr/bin/env python
"""The MTP stage of the demo (run by ``scripts/train_demo.py``, or alone): train only the MTP
block (``mtp.0.*``, the drafter for speculative decoding) on the frozen demo model, then add
it to ``mlx_v4/demo/model.safetensors``. The main model's tensors are copied unchanged.

    python scripts/demo_mtp.py --minutes 10             # train from scratch, add to mlx_v4/demo/, measure
    python scripts/demo_mtp.py --minutes 40 --resume    # continue from the demo's current mtp.0
    python scripts/demo_mtp.py --measure-only           # acceptance of the demo as it is

The target is the demo exactly as users run it (quantized weights, fake_quant on). The data
are the target's own chat replies (scripts/demo_mtp_data.py: greedy, plus some sampled, to
questions about the reference manual that leave out the topics of both acceptance sets). At
position i the block reads the target's last streams h_i and the token at i+1; it learns the
target's own greedy prediction for i+2 (self-distillation), which is what greedy verification
accepts. The block trains in float32 with fake_quant off (rounding is not differentiable); the
best block so far on held-out replies is checkpointed (float32) as it trains, and saved
quantized like the rest of the demo. The script then measures the acceptance of greedy
speculative decoding on two sets of chat prompts the block never trained on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_v4  # noqa: E402  # isort: skip  (first: its BLAS preload must run before mlx.core loads)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from demo_mtp_data import EVAL_QUESTIONS, HELDOUT_QUESTIONS  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from mlx_v4.config import ModelArgs  # noqa: E402
from mlx_v4.draft.mtp import MTPBlock  # noqa: E402

#: Other kinds of text (as in benchmarks/speculative.py): off the demo's domain.
OTHER_KINDS = {
    "code request": ["Write a Python function that merges two sorted lists.",
                     "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""],
    "unrelated prose": ["Tell me a story about a dragon who learns to cook.", "What is the capital of France?"],
}


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


def float_block(args: ModelArgs, shipped: MTPBlock) -> MTPBlock:
    """A float32 block (``args`` with fake_quant off) holding ``shipped``'s weights, the
    quantized matrices dequantized: the start of ``--resume``."""
    block = MTPBlock(args)
    params = {}
    for path, m in tree_flatten(shipped.leaf_modules(), is_leaf=nn.Module.is_module):
        for name, v in tree_flatten(m.parameters()):
            if name in ("scales", "biases") and "scales" in m:
                continue
            if name == "weight" and "scales" in m:
                v = mx.dequantize(v, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode)
            params[f"{path}.{name}"] = v.astype(mx.float32)
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


def teacher(target, ids: np.ndarray, mask: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """Run the frozen target over padded rows ids [N, L + 1]: its last streams h [N, L - 1, hc, D]
    at positions i (float16), the tokens at i+1 [N, L - 1], and the target's own greedy
    prediction for i+2 [N, L - 1]; mask as given. The head's quantized weights are dequantized
    once (MLX's CPU quantized matmul dequantizes them again for every row)."""
    hs, labels, t0 = [], [], time.time()
    head = dense_head(target)
    for s in range(0, len(ids), batch):
        x = mx.array(ids[s:s + batch, :-1])
        h = target.streams(x)  # [B, L, hc, D]
        y = target.norm(target.hc_head(h[:, 1:])).astype(mx.float32) @ head.T  # [B, L - 1, vocab]
        label = mx.argmax(y, axis=-1)  # the target's prediction after i+1
        mx.eval(h, label)
        hs.append(np.array(h[:, :-1].astype(mx.float16)))
        labels.append(np.array(label).astype(np.int32))
    print(f"mtp: target ran over {len(ids)} rows in {time.time() - t0:.0f}s", flush=True)
    return dict(h=np.concatenate(hs), nxt=ids[:, 1:-1], label=np.concatenate(labels), mask=mask)


def accuracy(block: MTPBlock, target, data: dict, w_cand: mx.array, cand: np.ndarray, batch: int = 32) -> float:
    """Share of masked positions where the block's argmax (over the candidate ids) is the
    target's greedy prediction: the acceptance of greedy drafts, teacher-forced."""
    hit = tot = 0.0
    for s in range(0, len(data["h"]), batch):
        out = block(mx.array(data["h"][s:s + batch]).astype(mx.float32), mx.array(data["nxt"][s:s + batch]),
                    block.make_cache(), target.embed)
        guess = cand[np.array(mx.argmax(block.norm(block.hc_head(out)).astype(mx.float32) @ w_cand.T, axis=-1))]
        m = data["mask"][s:s + batch]
        hit += float(((guess == data["label"][s:s + batch]) * m).sum())
        tot += float(m.sum())
    return hit / max(tot, 1.0)


def train_block(target, block: MTPBlock, train: dict, val: dict, minutes: float, batch: int, lr: float, seed: int,
                checkpoint: Path, eval_every: float = 120.0) -> MTPBlock:
    """Train ``block`` for ``minutes`` over the teacher data, cosine learning rate with warm-up.
    Loss: masked cross-entropy to the target's greedy prediction over the ids it predicts, plus the
    full-vocabulary cross-entropy at 32 positions per step (so no other id wins the block's
    argmax). Every ``eval_every`` seconds the teacher-forced accuracy on ``val``; the best
    block so far is written to ``checkpoint`` (float32) and returned at the end."""
    from train_demo import patch_selections_for_training

    patch_selections_for_training()
    rng = np.random.default_rng(seed)
    head = dense_head(target)
    cand_np = np.unique(np.concatenate([train["label"][train["mask"] > 0], val["label"][val["mask"] > 0]]))
    cand = mx.array(cand_np.astype(np.int32))
    w_cand = head[cand]
    print(f"mtp: {len(cand_np)} distinct predicted ids; {int(train['mask'].sum())} training positions in "
          f"{len(train['h'])} rows, {int(val['mask'].sum())} validation positions", flush=True)

    def loss_fn(block, h, nxt, y_cand, mask, full_pos, y_full):
        out = block(h, nxt, block.make_cache(), target.embed)
        x = block.norm(block.hc_head(out)).astype(mx.float32)  # [B, L, D]
        part = nn.losses.cross_entropy(x @ w_cand.T, y_cand, reduction="none")
        part = (part * mask).sum() / mx.maximum(mask.sum(), 1.0)
        xf = x.reshape(-1, x.shape[-1])[full_pos]
        return part + 0.5 * nn.losses.cross_entropy(xf @ head.T, y_full, reduction="mean")

    def save_best(acc: float) -> None:
        tmp = checkpoint.with_suffix(".tmp.safetensors")
        mx.save_safetensors(str(tmp), dict(tree_flatten(block.parameters())), metadata={"val_accuracy": f"{acc:.4f}"})
        os.replace(tmp, checkpoint)

    best = accuracy(block, target, val, w_cand, cand_np)
    save_best(best)
    print(f"mtp: validation accuracy at start {best:.4f}", flush=True)
    step_fn = nn.value_and_grad(block, loss_fn)
    opt = optim.AdamW(learning_rate=lr, betas=(0.9, 0.95), weight_decay=0.01)
    t0, step, ema, last_eval = time.time(), 0, None, time.time()
    budget = minutes * 60
    order, pos = rng.permutation(len(train["h"])), 0
    label_cand = np.searchsorted(cand_np, train["label"]).clip(0, len(cand_np) - 1).astype(np.int32)
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        opt.learning_rate = lr * min(1.0, (step + 1) / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        if pos + batch > len(order):
            order, pos = rng.permutation(len(train["h"])), 0
        idx = np.sort(order[pos:pos + batch])
        pos += batch
        m = train["mask"][idx]
        lab = train["label"][idx]
        full_pos = rng.choice(np.flatnonzero(m.reshape(-1)), 32, replace=False)
        loss, grads = step_fn(block, mx.array(train["h"][idx]).astype(mx.float32), mx.array(train["nxt"][idx]),
                              mx.array(label_cand[idx]), mx.array(m), mx.array(full_pos.astype(np.int32)),
                              mx.array(lab.reshape(-1)[full_pos]))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(block, grads)
        mx.eval(loss, block.parameters(), opt.state)
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 20 == 0 or step == 1:
            print(f"mtp step {step:5d}  {time.time() - t0:6.0f}s  loss {loss.item():.3f}  ema {ema:.3f}  "
                  f"lr {opt.learning_rate.item():.2e}", flush=True)
        if time.time() - last_eval > eval_every or time.time() - t0 >= budget:
            acc = accuracy(block, target, val, w_cand, cand_np)
            last_eval = time.time()
            if acc > best:
                best = acc
                save_best(acc)
            print(f"mtp step {step:5d}: validation accuracy {acc:.4f} (best {best:.4f})", flush=True)
    print(f"mtp: trained {step} steps ({step * batch / len(train['h']):.1f} epochs) in {(time.time() - t0) / 60:.1f} "
          f"min; best validation accuracy {best:.4f}", flush=True)
    block.load_weights(str(checkpoint), strict=True)
    block.steps = step
    return block


def save_block(block: MTPBlock, out: Path) -> dict:
    """Quantize like the demo's other matrices and write mtp.0.* into out/model.safetensors
    (temp file, fsync, rename; every other tensor copied as loaded) and its plan into
    config.json. Returns the plan."""
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


def measure_all(model_dir: Path) -> dict[str, dict]:
    """Acceptance on both chat sets of the demo's domain and on the other kinds of text."""
    sets = {"chat (eval)": EVAL_QUESTIONS, "chat (held out)": HELDOUT_QUESTIONS} | OTHER_KINDS
    out = {}
    for name, questions in sets.items():
        out[name] = r = measure_acceptance(model_dir, questions)
        print(f"mtp acceptance, {name} ({len(questions)} prompts, greedy, k=1): {r['acceptance']:.2f} "
              f"({r['accepted']}/{r['draft']}), {r['mean_accepted']:.2f} tokens per target forward; "
              f"output equals plain decoding: {r['same']}", flush=True)
    return out


def write_readme_section(out: Path, r: dict) -> None:
    """Replace (or add) the README's MTP section with this run's numbers."""
    path = out / "README.md"
    text = path.read_text() if path.exists() else ""
    head = "## MTP drafter"
    text = text.split(head)[0].rstrip() + "\n\n" if head in text else text.rstrip() + "\n\n"
    e, h = r["sets"]["chat (eval)"], r["sets"]["chat (held out)"]
    c, p = r["sets"]["code request"], r["sets"]["unrelated prose"]
    text += f"""{head}

`mtp.0.*` is the V4 multi-token-prediction block (window-only attention, its own scored MoE,
`e_proj`/`h_proj`, its own `hc_head`; embed and head shared), trained by `scripts/demo_mtp.py`
(also the last stage of `scripts/train_demo.py`) on the frozen model above: {r['how']}. It learns
the model's own greedy prediction of the token after next, on the model's own chat replies
(greedy and sampled) to questions about the reference manual. Saved like the rest (experts
4-bit, other large matrices 8-bit). `mlx-v4 chat` drafts with it by default.

Greedy speculative decoding (60 tokens at most per reply, one draft per step), on prompts whose
topics the block never trained on:

| prompts | acceptance | tokens per target forward | output equals plain decoding |
|---|---:|---:|---|
| {len(EVAL_QUESTIONS)} chat prompts (`EVAL_QUESTIONS`) | {e['acceptance']:.2f} | {e['mean_accepted']:.2f} | {'yes' if e['same'] else 'NO'} |
| {len(HELDOUT_QUESTIONS)} other chat prompts (`HELDOUT_QUESTIONS`) | {h['acceptance']:.2f} | {h['mean_accepted']:.2f} | {'yes' if h['same'] else 'NO'} |
| code requests (off domain) | {c['acceptance']:.2f} | {c['mean_accepted']:.2f} | {'yes' if c['same'] else 'NO'} |
| unrelated prose (off domain) | {p['acceptance']:.2f} | {p['mean_accepted']:.2f} | {'yes' if p['same'] else 'NO'} |
"""
    path.write_text(text)


def build_teacher_data(target, tok, seq_len: int, seed: int, sampled_share: float, cache: Path | None,
                       max_questions: int | None = None) -> tuple:
    """(train, validation) teacher data from the target's chat replies; the replies are cached
    in ``cache`` (npz) when given, since generating them is the slow part."""
    from demo_mtp_data import padded_rows, rollouts, split, training_questions
    from train_demo import EOS, _topic_sections

    if cache is not None and cache.exists():
        z = np.load(cache)
        seqs = [(list(map(int, s[s >= 0])), int(n)) for s, n in zip(z["seqs"], z["n_prompt"])]
        print(f"mtp data: {len(seqs)} replies from {cache}", flush=True)
    else:
        questions = training_questions([h for h, _ in _topic_sections()])[:max_questions]
        rng = np.random.default_rng(seed)
        sampled = [questions[i] for i in sorted(rng.choice(len(questions), int(len(questions) * sampled_share),
                                                           replace=False))]
        seqs = rollouts(target, tok, questions, 60, 0.0, seed) + rollouts(target, tok, sampled, 60, 0.7, seed)
        if cache is not None:
            width = max(len(s) for s, _ in seqs)
            arr = np.full((len(seqs), width), -1, dtype=np.int32)
            for i, (s, _) in enumerate(seqs):
                arr[i, :len(s)] = s
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, seqs=arr, n_prompt=np.array([n for _, n in seqs], dtype=np.int32))
            os.replace(tmp, cache)
    longest = max(len(s) for s, _ in seqs)
    length = min(seq_len, longest - 1)
    train, val = split(seqs, 0.08, seed)
    return tuple(teacher(target, *padded_rows(part, length, EOS)) for part in (train, val))


def run(out: Path, minutes: float, batch: int, lr: float, seed: int, seq_len: int, resume: bool = False,
        data_cache: Path | None = None, checkpoint: Path | None = None, sampled_share: float = 0.5,
        max_questions: int | None = None) -> dict:
    target, tok = mlx_v4.load(out)
    target.freeze()
    args = ModelArgs.from_dict(target.args.to_dict(), {"fake_quant": False})
    if resume and getattr(target, "mtp", None):
        block = float_block(args, target.mtp[0])
        how = "continued from the previous block"
    else:
        block = init_block(args, seed)
        how = "from scratch"
    if getattr(target, "mtp", None):
        del target["mtp"]  # the teacher is the main model only
    t0 = time.time()
    train, val = build_teacher_data(target, tok, seq_len, seed, sampled_share, data_cache, max_questions)
    data_minutes = (time.time() - t0) / 60
    checkpoint = checkpoint or Path(tempfile.gettempdir()) / "demo_mtp_best.safetensors"
    block = train_block(target, block, train, val, minutes, batch, lr, seed, checkpoint)
    steps = block.steps
    save_block(block, out)
    result = dict(sets=measure_all(out), how=f"{how}, {minutes:.0f} min, {steps} steps after {data_minutes:.0f} min "
                  f"making its data ({len(train['h']) + len(val['h'])} replies) "
                  f"(`python scripts/demo_mtp.py --minutes {minutes:.0f} --seed {seed}{' --resume' if resume else ''}`, "
                  "CPU shared with other jobs, so the step count varies)")
    write_readme_section(out, result)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training time budget (after the data)")
    ap.add_argument("--out", type=Path, default=ROOT / "mlx_v4" / "demo", help="the demo to add the block to")
    ap.add_argument("--seq-len", type=int, default=80, help="row length (longer replies are cut)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true", help="start from the demo's current mtp.0 (else from scratch)")
    ap.add_argument("--data-cache", type=Path, help="npz file caching the target's replies (made if missing)")
    ap.add_argument("--checkpoint", type=Path, help="where the best block so far is written (float32)")
    ap.add_argument("--max-questions", type=int, help="use only the first N training questions (quick checks)")
    ap.add_argument("--measure-only", action="store_true", help="only measure the acceptance of --out")
    a = ap.parse_args()
    if a.measure_only:
        print(json.dumps(measure_all(a.out), indent=1))
        return
    run(a.out, a.minutes, a.batch, a.lr, a.seed, a.seq_len, a.resume, a.data_cache, a.checkpoint,
        max_questions=a.max_questions)


if __name__ == "__main__":
    main()
