"""`mlx-v4 serve` benchmarks on loopback: prefix reuse (``reuse``) and concurrent streams (``batch``).

``reuse``: time to first token per turn of a growing agent conversation, with and without prefix
reuse. Replays a coding-agent conversation (OpenAI Chat Completions, streamed, with tools): a
system prompt, then turns that each add a tool result of ``--turn-tokens`` tokens (file
contents) and a short question, so the context grows to roughly ``turns * turn_tokens``. The
same replay runs against two servers: one with the prefix cache (each turn reuses the previous
turn's KV cache and feeds only the new suffix) and one with a zero byte budget (every turn
prefills the whole context). TTFT is the time from sending the request to the first streamed
chunk that carries generated text.

``batch``: the batching engine against the round-robin one it replaced, each server in its own
process (this process only sends requests): aggregate decode tok/s at 1, 2, 4 and 8 concurrent
streams (tokens that arrive while every stream is decoding, over that window), the time to
first token of a short request while a ~4K-token prompt prefills, and each server's peak RSS
(VmHWM). Measurements alternate between the servers, round after round, and the medians are
reported, so load from elsewhere on the machine hits both alike.

    python benchmarks/server.py                       # reuse: tiny random model, real vocabulary
    python benchmarks/server.py reuse --turns 12 --turn-tokens 2000
    python benchmarks/server.py reuse --model deepseek-ai/DeepSeek-V4-Flash --turn-tokens 8000
    python benchmarks/server.py batch                 # the demo and the bench config
    python benchmarks/server.py batch --configs demo --rounds 5 --tokens 64
    python benchmarks/server.py batch --engines batched,drafted --streams 1,4,8 --no-ttft
                                                      # the batching engine without and with drafts
"""

from __future__ import annotations

import argparse
import json
import random
import time

import mlx_v4  # noqa: F401  (BLAS preload before mlx.core)

WORDS = ("def class return import self value index token cache layer attention window compress "
         "ratio entry store prefill decode sample stream event answer reason tool call result "
         "file path line error test assert config model weight tensor shape dtype").split()
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the repository",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]


def fake_file(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of code-like text."""
    lines = []
    n = 0
    while n < tokens:
        k = rng.randint(4, 12)
        lines.append("    " * rng.randint(0, 3) + " ".join(rng.choice(WORDS) for _ in range(k)))
        n += k + 2
    return "\n".join(lines)


SYSTEM = "You are a coding agent. Read files with read_file, then answer."


class Replay:
    """One agent conversation against one server, a turn at a time."""

    def __init__(self, url: str, turn_tokens: int, max_tokens: int, seed: int, system: str = SYSTEM):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=3600)
        self.rng = random.Random(seed)
        self.turn_tokens, self.max_tokens = turn_tokens, max_tokens
        self.messages = [{"role": "system", "content": system},
                         {"role": "user", "content": "Find where the KV cache is rewound and explain it."}]
        self.turn = 0

    def step(self) -> dict:
        body = {"model": "bench", "messages": self.messages, "tools": TOOLS, "stream": True,
                "max_tokens": self.max_tokens, "temperature": 0, "thinking": {"type": "disabled"}}
        t0 = time.perf_counter()
        ttft, text, usage = None, "", None
        with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for ch in chunk.get("choices") or []:
                    d = ch.get("delta") or {}
                    piece = (d.get("content") or "") + (d.get("reasoning_content") or "")
                    if ttft is None and (piece or d.get("tool_calls")):
                        ttft = time.perf_counter() - t0
                    text += d.get("content") or ""
                usage = chunk.get("usage") or usage
        total = time.perf_counter() - t0
        self.turn += 1
        row = {"turn": self.turn, "prompt": usage["prompt_tokens"],
               "cached": usage["prompt_tokens_details"]["cached_tokens"],
               "ttft": ttft if ttft is not None else total, "total": total}
        call_id = f"call_{self.turn}"
        self.messages.append({"role": "assistant", "content": text, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "read_file", "arguments": json.dumps({"path": f"mlx_v4/file{self.turn}.py"})}}]})
        self.messages.append({"role": "tool", "tool_call_id": call_id,
                              "content": fake_file(self.rng, self.turn_tokens)})
        return row


def reuse(args):
    from mlx_v4.server import ServerConfig, create_app
    from mlx_v4.server.background import running
    from mlx_v4.tokenizer import load_tokenizer

    if args.model:
        model, tok = mlx_v4.load(args.model)
        name = args.model
    else:
        from mlx_v4.testing.tiny import random_model, tiny_args

        model, tok = random_model(tiny_args(vocab_size=129280)), load_tokenizer()
        name = "tiny random model (4 layers, hidden 128, vocab 129280)"

    import contextlib

    results = {"reuse": [], "no reuse": []}
    with contextlib.ExitStack() as stack:
        replays = {}
        for label, budget in (("reuse", 64 << 30), ("no reuse", 0)):
            app = create_app(model, tok, ServerConfig(model_name="bench", cache_budget_bytes=budget))
            url = stack.enter_context(running(app))
            # warm-up (allocator, first-call costs) on another conversation: nothing it leaves
            # in the cache is a prefix of the measured one
            warm = Replay(url, args.turn_tokens, 2, args.seed + 99, system="Warm-up. " + SYSTEM)
            warm.step()
            warm.step()
            replays[label] = Replay(url, args.turn_tokens, args.max_tokens, args.seed)
        # the two servers take turns, so load from anything else on the machine hits both alike
        for _ in range(args.turns):
            for label, rep in replays.items():
                results[label].append(rep.step())

    print(f"model: {name}; {args.turns} turns, +{args.turn_tokens} tool-output tokens per turn, "
          f"max_tokens {args.max_tokens}")
    print(f"{'turn':>4} {'prompt':>8} {'cached':>8} {'TTFT reuse':>11} {'TTFT no reuse':>14} {'speedup':>8}")
    for a, b in zip(results["reuse"], results["no reuse"], strict=True):
        print(f"{a['turn']:>4} {a['prompt']:>8} {a['cached']:>8} {a['ttft']:>10.3f}s {b['ttft']:>13.3f}s "
              f"{b['ttft'] / max(a['ttft'], 1e-9):>7.1f}x")
    ta = sum(r["ttft"] for r in results["reuse"])
    tb = sum(r["ttft"] for r in results["no reuse"])
    print(f"total TTFT: {ta:.2f}s with reuse, {tb:.2f}s without ({tb / max(ta, 1e-9):.1f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode")
    r = sub.add_parser("reuse", help="TTFT per turn with and without prefix reuse")
    r.add_argument("--model", default=None, help="model dir or repo id (default: tiny random model, real vocab)")
    r.add_argument("--turns", type=int, default=8)
    r.add_argument("--turn-tokens", type=int, default=1500, help="tokens of tool output added per turn")
    r.add_argument("--max-tokens", type=int, default=8)
    r.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("batch", help="concurrent streams: batching engine vs round-robin")
    b.add_argument("--configs", default="demo,bench", help="comma list of: demo, bench")
    b.add_argument("--streams", default="1,2,4,8")
    b.add_argument("--tokens", type=int, default=48, help="max_tokens per stream")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--long-prompt", type=int, default=4000, help="tokens of the prompt prefilled during the TTFT test")
    b.add_argument("--engines", default="batched,round-robin", help="comma list of: batched, round-robin, drafted")
    b.add_argument("--draft-tokens", type=int, default=1, help="drafts per step of the drafted engine")
    b.add_argument("--no-ttft", action="store_true", help="skip the TTFT-under-a-long-prefill test")
    w = sub.add_parser("serve-worker", help=argparse.SUPPRESS)
    w.add_argument("--config", required=True)
    w.add_argument("--engine", required=True)
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--draft-tokens", type=int, default=1)
    argv = __import__("sys").argv[1:]
    args = ap.parse_args(argv if argv and argv[0] in ("reuse", "batch", "serve-worker", "-h", "--help")
                         else ["reuse", *argv])
    if args.mode == "reuse":
        reuse(args)
    elif args.mode == "batch":
        from server_batch import run_batch  # benchmarks/server_batch.py

        run_batch(args)
    else:
        from server_batch import serve_worker

        serve_worker(args)


if __name__ == "__main__":
    main()
