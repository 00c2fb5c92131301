"""``python benchmarks/server.py batch``: concurrent streams against the batching engine and the
round-robin engine, each server in its own process (see server.py's docstring).

``--engines batched,drafted``: the batching engine without and with drafts (MTP, k =
``--draft-tokens``) inside its shared step; the drafted column also reports the acceptance
rate and the mean tokens per verifying step from the replies' ``usage.drafting``."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = {"demo": "the bundled demo (4 layers, hidden 64, quantized 3/4/8-bit, vocab 129280)",
           "bench": "tiny random model (4 layers, hidden 128, float32, vocab 129280)"}


# ---- the server process ---------------------------------------------------------------------------

def serve_worker(args) -> None:
    import uvicorn

    import mlx_v4
    from mlx_v4.server import ServerConfig, create_app
    from mlx_v4.server.engine import Engine
    from mlx_v4.server.prefix_cache import PrefixCache
    from mlx_v4.tokenizer import load_tokenizer

    if args.config == "demo":
        model, tok = mlx_v4.load()
    else:
        from mlx_v4.testing.tiny import random_model, tiny_args

        # with a random MTP block (the drafted engine's drafts; the others never run it)
        model, tok = random_model(tiny_args(vocab_size=129280), mtp=True), load_tokenizer()
    drafted = args.engine == "drafted"
    config = ServerConfig(model_name="bench", max_active=8, draft="mtp" if drafted else None,
                          draft_tokens=args.draft_tokens)
    engine = None
    if args.engine == "round-robin":  # the engine before batching, as it was configured
        engine = Engine(model, tok, PrefixCache(model, config.cache_budget_bytes), max_active=8,
                        prefill_step=512, prefill_chunk=2048)
    app = create_app(model, tok, config, engine=engine)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


class Server:
    def __init__(self, config: str, engine: str, draft_tokens: int = 1):
        from mlx_v4.server.background import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(__file__).with_name("server.py")
        self.proc = subprocess.Popen([sys.executable, str(script), "serve-worker", "--config", config,
                                      "--engine", engine, "--port", str(self.port), "--draft-tokens",
                                      str(draft_tokens)])
        import httpx

        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"the {engine} server for {config} did not start")
            time.sleep(0.5)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# ---- the client side ----------------------------------------------------------------------------

def _stream(url: str, body: dict, out: dict, ready: threading.Event | None = None) -> None:
    """One streamed chat completion: time of the first ready chunk, of the first generated text, of
    the end, and the usage."""
    import httpx

    t0 = time.perf_counter()
    out["sent"] = t0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}},
                      timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            if ready is not None:
                ready.set()
            chunk = json.loads(line[6:])
            for ch in chunk.get("choices") or []:
                d = ch.get("delta") or {}
                if "first" not in out and (d.get("content") or d.get("reasoning_content")):
                    out["first"] = time.perf_counter()
            out["usage"] = chunk.get("usage") or out.get("usage")
    out["end"] = time.perf_counter()
    out.setdefault("first", out["end"])


def _body(text: str, max_tokens: int) -> dict:
    return {"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "thinking": {"type": "disabled"}}


def aggregate(url: str, streams: int, tokens: int, salt: int, drafting: list | None = None) -> float:
    """``streams`` requests sent together (short, distinct prompts): completion tokens of all of
    them over the wall time from sending to the last one's end (tok/s). ``drafting``: gets each
    reply's ``usage.drafting``, if any."""
    outs = [{} for _ in range(streams)]
    threads = [threading.Thread(target=_stream, args=(url, _body(
        f"Request {salt}-{i}: write a Python function that sorts a list of {i + 3} numbers.", tokens), outs[i]))
        for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(o["end"] for o in outs) - t0
    if drafting is not None:
        drafting += [o["usage"]["drafting"] for o in outs if "drafting" in o["usage"]]
    return sum(o["usage"]["completion_tokens"] for o in outs) / wall


def long_text(tok, tokens: int, seed: int) -> str:
    """Code-like text of exactly about ``tokens`` prompt tokens (trimmed with the tokenizer)."""
    from server import fake_file

    text = fake_file(random.Random(seed), tokens + 200)
    lines = text.split("\n")
    while len(tok.encode("\n".join(lines))) > tokens:
        lines = lines[:-max(1, len(lines) // 50)]
    return "\n".join(lines)


def ttft_during_prefill(url: str, long_prompt: str) -> tuple[float, float, int]:
    """(TTFT of a short request sent once a long prompt's request was admitted, that long
    request's own TTFT, its prompt tokens)."""
    long_out, short_out = {}, {}
    admitted = threading.Event()
    t_long = threading.Thread(target=_stream, args=(url, _body(long_prompt, 1), long_out, admitted))
    t_long.start()
    admitted.wait()
    _stream(url, _body("What is a list? Answer briefly.", 4), short_out)
    t_long.join()
    return (short_out["first"] - short_out["sent"], long_out["first"] - long_out["sent"],
            long_out["usage"]["prompt_tokens"])


def run_batch(args) -> None:
    from mlx_v4.tokenizer import load_tokenizer

    tok = load_tokenizer()
    levels = [int(x) for x in args.streams.split(",")]
    engines = args.engines.split(",")
    for config in args.configs.split(","):
        servers = {e: Server(config, e, args.draft_tokens) for e in engines}
        drafting: list = []
        try:
            for s in servers.values():  # warm-up: first-call costs, compiled shapes for each batch size
                for n in levels:
                    aggregate(s.url, n, 4, salt=-n)
            tps = {(e, n): [] for e in engines for n in levels}
            for rnd in range(args.rounds):  # alternate servers and levels, round after round
                for n in levels:
                    for e, s in servers.items():
                        tps[e, n].append(aggregate(s.url, n, args.tokens, salt=rnd * 100 + n, drafting=drafting))
            prompt = long_text(tok, args.long_prompt, seed=7)
            ttft = {}
            for e, s in servers.items():
                if args.no_ttft:
                    break
                idle = statistics.median(_short_alone(s.url) for _ in range(3))
                short, long_ttft, n_long = ttft_during_prefill(s.url, prompt)
                ttft[e] = (idle, short, long_ttft, n_long)
            rss = {e: s.peak_rss_mb() for e, s in servers.items()}
        finally:
            for s in servers.values():
                s.close()
        _report(config, engines, levels, tps, ttft, rss, args)
        if drafting:
            d, a, f = (sum(u[k] for u in drafting) for k in ("draft_tokens", "accepted_tokens", "target_forwards"))
            print(f"drafted: acceptance {a / max(d, 1):.2f} ({a}/{d} drafts), {(a + f) / max(f, 1):.2f} tokens per "
                  f"verifying step, k={args.draft_tokens}")


def _short_alone(url: str) -> float:
    out = {}
    _stream(url, _body("What is a list? Answer briefly.", 4), out)
    return out["first"] - out["sent"]


def _report(config, engines, levels, tps, ttft, rss, args) -> None:
    med = {k: statistics.median(v) for k, v in tps.items()}
    print(f"\n{CONFIGS.get(config, config)}; {args.tokens} tokens per stream, median of {args.rounds} rounds")
    head = " ".join(f"{e + ' tok/s':>20} {'vs 1':>6}" for e in engines)
    other = next((e for e in ("round-robin", "drafted") if e in engines), None) if "batched" in engines else None
    extra = f" {other + ' / batched':>22}" if other else ""
    print(f"{'streams':>7} {head}{extra}")
    for n in levels:
        cells = " ".join(f"{med[e, n]:>20.1f} {med[e, n] / med[e, levels[0]]:>5.2f}x" for e in engines)
        ratio = f" {med[other, n] / med['batched', n]:>21.2f}x" if extra else ""
        print(f"{n:>7} {cells}{ratio}")
    for e in engines:
        if e not in ttft:
            continue
        idle, short, long_ttft, n_long = ttft[e]
        print(f"{e}: short-request TTFT {idle:.3f}s idle, {short:.3f}s while a {n_long}-token prompt prefills "
              f"(that prompt's own TTFT {long_ttft:.2f}s); server peak RSS {rss[e]:.0f} MB")
