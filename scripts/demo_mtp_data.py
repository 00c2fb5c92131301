"""Training data for the demo's MTP block (scripts/demo_mtp.py): the demo's own chat replies.

Greedy speculative decoding drafts on the target's own greedy continuation of a chat prompt, so
the block learns best from exactly that: replies the target generates itself (greedy, plus
some sampled at the demo's default temperature for variety), labelled afterwards with the
target's greedy prediction at every position. The questions are about the demo's domain (the
Python reference manual) and leave out every topic of the two acceptance sets below, so both
sets measure prompts (and replies) the block never trained on.
"""

from __future__ import annotations

import builtins
import keyword
import random
import re
import time

import numpy as np

#: chat prompts for the acceptance measurement (the demo's own domain), not training questions verbatim
EVAL_QUESTIONS = ["What is the assert statement?", "Explain the for statement.", "What are lambdas?",
                  "How do I use the with statement?", "What does the yield keyword do?",
                  "Tell me about classes.", "What is a list comprehension?", "How are exceptions raised?"]

#: a second acceptance set in the same domain, on other topics (the first three are the
#: "python docs" prompts of benchmarks/speculative.py); never trained on either
HELDOUT_QUESTIONS = ["What is the global statement?", "Explain the while statement.", "What are generators?",
                     "What does the pass statement do?", "Explain the del statement.",
                     "How does the import statement work?", "Tell me about the return statement.",
                     "What are dictionary displays?"]

#: training questions naming a topic of either acceptance set are dropped
_HELD_TOPICS = re.compile(r"\b(assert|for|lambdas?|with|yield|class(es)?|comprehensions?|exceptions?|raised?|"
                          r"global|while|generators?|pass|del|import|return|dictionar(y|ies))\b", re.IGNORECASE)

_TEMPLATES = ["What is {t}?", "Explain {t}.", "Tell me about {t}.", "Can you describe {t}?",
              "How does {t} work in Python?", "What does {t} do?", "How do I use {t}?", "Give an example of {t}."]


def training_questions(headings: list[str]) -> list[str]:
    """Questions about the reference manual's topics, keywords and builtins, minus the held topics."""
    topics = []
    for h in headings:
        h = h.rstrip(".")
        low = h[0].lower() + h[1:] if not h[:2].isupper() else h
        topics += [low, low.replace('"', "")]
    topics += [f"the {k} keyword" for k in keyword.kwlist]
    topics += [f"the {n} function" for n in dir(builtins)
               if n.islower() and not n.startswith("_") and callable(getattr(builtins, n))]
    out = {tpl.format(t=t) for t in dict.fromkeys(topics) for tpl in _TEMPLATES}
    return sorted(q for q in out if not _HELD_TOPICS.search(q))


def _stop_ids(model, tokenizer) -> set[int]:
    from mlx_v4.tokenizer import ASSISTANT_ID, USER_ID

    return ({int(model.args.eos_token_id), USER_ID, ASSISTANT_ID}
            | set(getattr(tokenizer, "eos_token_ids", {tokenizer.eos_id})))


def chat_prompt_ids(model, tokenizer, question: str) -> list[int]:
    """The ids ``mlx-v4 chat`` feeds for ``question`` (non-thinking), as the acceptance runs do."""
    from mlx_v4.chat import ChatSession

    return ChatSession(model, tokenizer, thinking=False).render([{"role": "user", "content": question}])


def rollouts(model, tokenizer, questions: list[str], max_tokens: int, temperature: float, seed: int,
             batch: int = 64) -> list[tuple[list[int], int]]:
    """The target's replies, ``batch`` sequences per step (``Model.step_batch``):
    [(prompt + reply ids, prompt length)]. A reply ends at its first stop id (kept) or after
    ``max_tokens``. temperature 0: greedy."""
    import mlx.core as mx

    stop = _stop_ids(model, tokenizer)
    key = mx.random.key(seed)
    out, t0 = [], time.time()
    for s in range(0, len(questions), batch):
        prompts = [chat_prompt_ids(model, tokenizer, q) for q in questions[s:s + batch]]
        caches = [model.make_cache() for _ in prompts]
        logits = mx.concatenate([model(mx.array([p]), c, last_only=True)[:, -1] for p, c in zip(prompts, caches)])
        replies: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_tokens):
            if temperature > 0:
                key, sub = mx.random.split(key)
                nxt = mx.random.categorical(logits / temperature, key=sub)
            else:
                nxt = mx.argmax(logits, axis=-1)
            ids = nxt.tolist()
            for r, t in zip(live, ids):
                replies[r].append(t)
            live = [r for r, t in zip(live, ids) if t not in stop]
            if not live:
                break
            keep = [i for i, t in enumerate(ids) if t not in stop]
            logits = model.step_batch([[ids[i]] for i in keep], [caches[r] for r in live])
        out += [(p + r, len(p)) for p, r in zip(prompts, replies)]
        print(f"mtp data: {len(out)}/{len(questions)} replies (temperature {temperature}) "
              f"in {time.time() - t0:.0f}s", flush=True)
    return out


def padded_rows(seqs: list[tuple[list[int], int]], length: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """-> ids [N, length + 1] (padded with ``pad``) and mask [N, length - 1]: pair j (streams at
    j, token j+1) is trained when the token j+2 it predicts is a reply token after the first (the first
    comes from the prefill, not from a draft)."""
    ids = np.full((len(seqs), length + 1), pad, dtype=np.int32)
    mask = np.zeros((len(seqs), length - 1), dtype=np.float32)
    for i, (seq, n_prompt) in enumerate(seqs):
        seq = seq[: length + 1]
        ids[i, : len(seq)] = seq
        mask[i, max(n_prompt - 1, 0): len(seq) - 2] = 1.0
    return ids, mask


def split(seqs: list, share: float, seed: int) -> tuple[list, list]:
    """(train, validation): ``share`` of the sequences for validation."""
    order = list(range(len(seqs)))
    random.Random(seed).shuffle(order)
    n = max(1, int(len(seqs) * share))
    return [seqs[i] for i in order[n:]], [seqs[i] for i in order[:n]]
