"""Calibrated against plain rounding for the 2bit-experts / 3bit-experts recipes, on the bundled
demo model: mean KL(source || converted) and top-1 agreement, on quantize/verify.py's fixed
random tokens and on held-out text (not the calibration text), at equal bits, per group size;
and the variant keeping the first and last MoE layers' experts at 4 bits.

    python benchmarks/expert_recipes.py            # the table in BENCHMARKS.md (a few minutes)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx_v4.quantize import Quant, convert
from mlx_v4.quantize.verify import verify_conversion

import mlx_v4

HELD_OUT = """\
The for statement iterates over the items of any sequence, in the order that they appear. To
iterate over the indices of a sequence, combine range() and len(), or use enumerate(). The break
statement breaks out of the innermost enclosing loop, and a loop's else clause runs when the loop
finishes without a break. Functions are defined with def, take positional and keyword arguments,
and return None unless they return something else. Default values are evaluated once, when the
function is defined, so a mutable default is shared between calls. Modules are files containing
Python definitions; a package is a directory of modules with an __init__.py file. The import
system searches sys.path, caches modules in sys.modules, and runs a module's code only once.
"""


def bits_per_weight(bits: int, group_size: int) -> float:
    return bits + 32 / group_size  # bf16 scale and bias per group


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-sizes", default="32,64")
    ap.add_argument("--bits", default="2,3")
    a = ap.parse_args()
    src = mlx_v4.DEMO_MODEL_PATH
    _, tok = mlx_v4.load(src)
    text_ids = mx.array([tok.encode(HELD_OUT)], dtype=mx.int32)
    layers = mlx_v4.load(src)[0].args.num_hidden_layers
    print(f"demo model ({layers} layers); held-out text {text_ids.shape[1]} tokens; KL in nats")
    print(f"{'recipe':14} {'group':>5} {'bits/w':>6} {'rounding':>10} {'KL random':>10} {'top-1':>6} "
          f"{'KL text':>8} {'top-1':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(f"{b}bit-experts", gs, None) for b in map(int, a.bits.split(",")) for gs in map(int, a.group_sizes.split(","))]
        runs.append(("2bit-experts", 64, "edges-4bit"))
        for recipe, gs, variant in runs:
            for cal in (False, None):
                override = None
                if variant == "edges-4bit":
                    def override(module, klass, target, gs=gs):
                        edge = module.startswith(("layers.0.", f"layers.{layers - 1}."))
                        return Quant(4, gs) if klass == "experts" and edge else None
                out = Path(tmp) / f"{recipe}-{gs}-{variant}-{cal}"
                r = convert(src, out, recipe=recipe, group_size=gs, calibration=cal, override=override, progress=False)
                rand = verify_conversion(r.path, src)
                text = verify_conversion(r.path, src, tokens=text_ids)
                bpw = bits_per_weight(int(recipe[0]), gs)
                if variant:  # two of the layers at 4 bits: the average over the routed experts
                    bpw = (2 * bits_per_weight(4, gs) + (layers - 2) * bpw) / layers
                label = recipe + (" +4b edges" if variant else "")
                print(f"{label:14} {gs:>5} {bpw:>6.2f} {'calibrated' if cal is None else 'plain':>10} "
                      f"{rand.kl_mean:>10.4f} {rand.top1_agreement:>6.1%} {text.kl_mean:>8.4f} "
                      f"{text.top1_agreement:>6.1%}", flush=True)


if __name__ == "__main__":
    main()
