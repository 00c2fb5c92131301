"""Conversion: peak resident memory and throughput on a synthetic multi-GB official checkpoint.

    python benchmarks/convert.py                      # ~3 GB checkpoint, recipes mxfp4 and mixed-4-8
    python benchmarks/convert.py --layers 6 --recipes 4bit,bf16

Writes an official-format (FP8 + packed FP4 experts) checkpoint with wide layers but few of them
into a temp dir (deleted afterwards), then in fresh subprocesses: reads every file once (the
plain read speed of these files, measured in the same run), and converts with each recipe,
reporting peak RSS (``getrusage``) next to the largest single tensor, and MB/s of source read.
Expert bytes are generated once per shape and reused, so writing the fixture is quick.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def write_checkpoint(path: Path, layers: int, hidden: int, experts: int, inter: int, vocab: int,
                     shard_bytes: int) -> dict:
    from mlx_v4.testing import official
    from mlx_v4.testing.tiny import TINY_CONFIG

    cfg = TINY_CONFIG | dict(hidden_size=hidden, num_hidden_layers=layers, n_routed_experts=experts,
                             moe_intermediate_size=inter, vocab_size=vocab, q_lora_rank=1024, num_attention_heads=16,
                             head_dim=512, o_lora_rank=1024, o_groups=4, index_n_heads=16, index_head_dim=128,
                             num_experts_per_tok=4, num_hash_layers=1,
                             compress_ratios=([0, 4, 128] * layers)[:layers] + [0])
    shapes = official.official_shapes(cfg, include_mtp=False)
    rng = np.random.default_rng(0)
    cache: dict[tuple, tuple] = {}

    def encode(name, shape):
        """-> {tensor name: (dtype, array)}; FP8/FP4 bytes generated once per shape and reused."""
        expert = ".experts." in name and name.endswith(".weight")
        fp8 = not expert and bool(official._FP8_NAMES.search(name))
        stem = name[: -len(".weight")]
        if name.endswith("tid2eid"):
            return {name: ("I64", np.argsort(rng.random((shape[0], experts)), 1)[:, : shape[1]].astype(np.int64))}
        key = (expert, fp8, shape)
        if key not in cache:
            w = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1])).astype(np.float32)
            if expert:
                q, sc = official.quantize_fp4_e2m1(w)
                cache[key] = (("I8", q), ("F8_E8M0", sc))
            elif fp8:
                q, sc = official.quantize_fp8_block(w)
                cache[key] = (("F8_E4M3", q), ("F8_E8M0", sc))
            else:
                return {name: ("F32", w) if official._F32.search(name) else ("BF16", official._bf16(w))}
        w, sc = cache[key]
        return {name: w, stem + ".scale": sc}

    path.mkdir(parents=True)
    weight_map, shard, size, n, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            fname = f"model-{n:05d}.safetensors"
            official.write_safetensors(path / fname, shard)
            weight_map.update(dict.fromkeys(shard, fname))
            shard, size = {}, 0

    for name, shape in shapes.items():  # release order: experts of a layer stay together
        for k, (dt, arr) in encode(name, shape).items():
            if size + arr.nbytes > shard_bytes:
                flush()
            shard[k] = (dt, arr)
            size += arr.nbytes
            total += arr.nbytes
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(cfg | {"quantization_config": official.QUANTIZATION_CONFIG,
                                                        "expert_dtype": "fp4"}))
    return cfg


# ---- measurements, each in a fresh process ---------------------------------------------------
_READ = """
import resource, sys, time
from pathlib import Path
t = time.perf_counter(); n = 0
for f in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with open(f, "rb", buffering=0) as fh:
        while True:
            b = fh.read(16 << 20)
            if not b: break
            n += len(b)
dt = time.perf_counter() - t
print({"bytes": n, "seconds": dt, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
"""
_CONVERT = """
import resource, sys, time
import mlx_v4.quantize as q
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
r = q.convert(sys.argv[1], sys.argv[2], recipe=sys.argv[3], progress=False)
dt = time.perf_counter() - t
hwm = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024
print({"bytes": r.bytes_read, "seconds": dt, "base_rss": base, "hwm": hwm,
       "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
"""


def measure(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(out.stderr)
    return eval(out.stdout.strip().splitlines()[-1])  # our own dict literal


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--recipes", default="mxfp4,mixed-4-8")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, deleted afterwards)")
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.write:
        write_checkpoint(Path(a.write), a.layers, a.hidden, a.experts, a.inter, a.vocab, int(a.shard_gb * 1e9))
        return
    work = Path(tempfile.mkdtemp(prefix="mlxv4-convert-bench-", dir=a.dir))
    try:
        t = time.perf_counter()
        # In a child process: ru_maxrss carries over fork+exec, so the parent must stay small.
        subprocess.run([sys.executable, __file__, "--write", str(work / "src"), "--layers", str(a.layers),
                        "--hidden", str(a.hidden), "--experts", str(a.experts), "--inter", str(a.inter),
                        "--vocab", str(a.vocab), "--shard-gb", str(a.shard_gb)], check=True, cwd=ROOT)
        from mlx_v4.weights import read_header, read_index

        files = sorted(set(read_index(work / "src").values()))
        infos = [i for f in files for i in read_header(f).values()]
        src_bytes = sum(f.stat().st_size for f in files)
        nbytes = {"BF16": 2, "F32": 4, "I64": 8}
        big = max(infos, key=lambda i: int(np.prod(i.shape)) * nbytes.get(i.dtype, 1))
        big_bytes = int(np.prod(big.shape)) * nbytes.get(big.dtype, 1)
        print(f"checkpoint: {a.layers} layers, hidden {a.hidden}, {a.experts} experts x {a.inter}, vocab {a.vocab}: "
              f"{len(files)} shards, {src_bytes / 1e9:.2f} GB, written in {time.perf_counter() - t:.0f} s; "
              f"largest tensor {big.name} {big.dtype} {list(big.shape)} = {big_bytes / 1e6:.0f} MB")
        r = measure(_READ, work / "src")
        read_mbs = r["bytes"] / r["seconds"] / 1e6
        print(f"plain read of the same files: {read_mbs:.0f} MB/s ({r['seconds']:.1f} s)")
        rows = []
        for recipe in a.recipes.split(","):
            m = measure(_CONVERT, work / "src", work / recipe, recipe)
            out_bytes = sum(f.stat().st_size for f in (work / recipe).glob("*.safetensors"))
            largest_out = max(max(int(np.prod(i.shape)) * {"U32": 4, "U8": 1, "BF16": 2, "F32": 4, "I32": 4}[i.dtype]
                                  for i in read_header(f).values()) for f in (work / recipe).glob("*.safetensors"))
            rows.append((recipe, m, out_bytes, largest_out))
            shutil.rmtree(work / recipe)
        print("\n| recipe | output GB | seconds | MB/s (source) | vs plain read | peak RSS MB | import-only RSS MB "
              "| largest tensor MB (src / out) | bound 1.5x largest + 300 MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for recipe, m, out_bytes, largest_out in rows:
            mbs = m["bytes"] / m["seconds"] / 1e6
            largest = max(big_bytes, largest_out)
            print(f"| {recipe} | {out_bytes / 1e9:.2f} | {m['seconds']:.1f} | {mbs:.0f} | {mbs / read_mbs:.2f}x "
                  f"| {m['peak_rss'] / 1e6:.0f} (VmHWM {m['hwm'] / 1e6:.0f}) | {m['base_rss'] / 1e6:.0f} | {big_bytes / 1e6:.0f} / "
                  f"{largest_out / 1e6:.0f} | {(1.5 * largest + 300e6) / 1e6:.0f} MB: "
                  f"{'within' if m['peak_rss'] <= 1.5 * largest + 300e6 else 'EXCEEDED'} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
