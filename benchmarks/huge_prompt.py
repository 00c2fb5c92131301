"""What a prompt far beyond the context costs the server: time and peak memory to refuse it,
and how long a small request that arrives meanwhile waits.

Each case runs in a fresh process (peak memory is that process's VmHWM): ``prepare`` (JSON
parse, request conversion, the context check, prompt encoding) on a chat body of ``--mb``
megabytes of prose, against V4's context of 1,048,576 tokens, with a small request prepared on
another thread once the big one has started. ``--full-encode`` instead encodes the whole
conversation first (what the server did before it checked the size) for comparison.

    python benchmarks/huge_prompt.py --mb 5 50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONTEXT = 1 << 20


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def case(mb: float, full: bool) -> dict:
    import threading

    from mlx_v4.server.protocols import PROTOCOLS, ApiError, conversion_options, prepare, prompt_encoding
    from mlx_v4.tokenizer import load_tokenizer

    tok = load_tokenizer()
    options = conversion_options(["m"], CONTEXT)
    prompt_encoding(tok)
    from mlx_v4.server.prompt_size import longest_token_bytes

    longest_token_bytes(tok)
    line = "All work and no play makes Jack a dull boy, and the cache is rewound at turn boundaries.\n"

    def body(text):
        return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()

    big, small = body(line * int(mb * 1e6 / len(line))), body("Hello there")
    base = vm_hwm_mb()
    waited = {}

    def small_one():
        t0 = time.perf_counter()
        prepare(PROTOCOLS["chat"], small, tokenizer=tok, options=options, context=CONTEXT, default_max_tokens=16)
        waited["s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if full:  # the old order: encode everything, then compare with the context
        import deepseek_recipe as r

        conv = r.ChatCompletionRequest(json.loads(big)).convert(options).conversation
        thread = threading.Thread(target=small_one)
        thread.start()
        n = len(prompt_encoding(tok).encode(conv))
        outcome = f"encoded {n} tokens"
    else:
        thread = threading.Thread(target=small_one)
        thread.start()
        try:
            prepare(PROTOCOLS["chat"], big, tokenizer=tok, options=options, context=CONTEXT, default_max_tokens=16)
            outcome = "accepted"
        except ApiError as e:
            outcome = f"{e.status}: {e.message[:90]}"
    took = time.perf_counter() - t0
    thread.join()
    return {"mb": mb, "path": "full encode" if full else "server", "seconds": round(took, 2),
            "small_request_s": round(waited["s"], 3), "peak_mb_over_start": round(vm_hwm_mb() - base),
            "outcome": outcome}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[5.0, 50.0])
    ap.add_argument("--full-encode-up-to", type=float, default=5.0,
                    help="also time the full encode for sizes up to this many MB (it needs ~0.3 GB per MB)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        mb, full = args.case.split(":")
        print(json.dumps(case(float(mb), full == "full")))
        return
    for mb in args.mb:
        for full in ([False, True] if mb <= args.full_encode_up_to else [False]):
            out = subprocess.run([sys.executable, __file__, "--case", f"{mb}:{'full' if full else 'server'}"],
                                 capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
