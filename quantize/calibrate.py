"""Calibrated low-bit routed experts (the 2bit-experts / 3bit-experts recipes).

Plain rounding gives every weight of a group the same say. What matters is the error in the
layer's output, ``sum_j x_j (w_j - q_j)``, whose expectation over inputs weights each column's
squared error by that input channel's second moment ``E[x_j^2]`` (the "importance matrix" of
llama.cpp's imatrix, which ds4's gguf-tools also use). So:

1. :func:`collect_moments` runs the source model over calibration text and accumulates, per
   routed expert, ``sum x^2`` of the rows routed to it: the MoE input for w1/w3, the SwiGLU
   output for w2.
2. :func:`quantize_weighted` picks each group's scale, zero point and clipping to minimise the
   importance-weighted squared error: candidate clip ranges, each refitted by weighted least
   squares, plus MLX's own min/max rounding, keeping the best per group (so never worse than
   plain rounding on that measure). Codes are packed exactly as ``mx.quantize`` packs them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .recipes import ConvertError

#: The recipes whose routed experts are calibrated (quantize/recipes.py).
CALIBRATED_RECIPES = ("2bit-experts", "3bit-experts")
#: Clip factors tried for each end of a group's range.
CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
MAX_TOKENS = 4096

DEFAULT_TEXT = """\
The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work
quickly and integrate systems more effectively. A list is a mutable sequence; a tuple is an
immutable one. Dictionaries map hashable keys to values, and sets hold unique elements.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    out, a, b = [], 0, 1
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

The with statement wraps the execution of a block with methods defined by a context manager.
Exceptions are raised with raise and handled with try and except; finally always runs. Generators
yield values lazily, one at a time, and comprehensions build lists, sets and dicts in one line.
The standard library provides os for operating system interfaces, json for encoding and decoding
JSON, re for regular expressions, pathlib for filesystem paths and itertools for fast iterators.

Mathematics: the derivative of x^2 is 2x; the integral of 1/x is ln|x| + C. A prime number has
exactly two divisors. The sum of the first n integers is n(n + 1)/2. Matrices multiply rows by
columns, and the determinant of a product is the product of the determinants.

User: How do I read a file line by line in Python?
Assistant: Open it in a with block and iterate over the file object:
    with open("notes.txt", encoding="utf-8") as f:
        for line in f:
            print(line.rstrip())
User: And how do I sort a dictionary by value?
Assistant: sorted(d.items(), key=lambda kv: kv[1]) returns the pairs in order of their values.

History: the printing press spread books across Europe in the fifteenth century; the steam engine
powered the industrial revolution; the transistor made modern computers possible. Rivers carve
valleys over millions of years, and the water cycle moves water between oceans, air and land.
"""


def calibration_text(path: str | Path | None) -> str:
    if path is None:
        return DEFAULT_TEXT
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConvertError(f"{path}: cannot read the calibration text ({e.strerror})") from None
    if not text.strip():
        raise ConvertError(f"{path}: the calibration text is empty")
    return text


class Moments:
    """Per (layer, expert): sums of squared inputs of w1/w3 ([D]) and of w2 ([I]), row counts."""

    def __init__(self):
        self.inputs: dict[tuple[int, int], np.ndarray] = {}
        self.hidden: dict[tuple[int, int], np.ndarray] = {}
        self.rows: dict[tuple[int, int], int] = defaultdict(int)

    def add(self, layer: int, e: int, x: np.ndarray, h: np.ndarray) -> None:
        key = (layer, e)
        self.inputs[key] = self.inputs.get(key, 0) + (x.astype(np.float64) ** 2).sum(0)
        self.hidden[key] = self.hidden.get(key, 0) + (h.astype(np.float64) ** 2).sum(0)
        self.rows[key] += x.shape[0]

    def importance(self, layer: int, e: int, w: str) -> np.ndarray | None:
        """Mean squared input per channel of expert e's matrix w; an expert the text never
        reached takes its layer's average (None when the layer saw no tokens at all)."""
        table = self.hidden if w == "w2" else self.inputs
        key = (layer, e)
        if key in table:
            return (table[key] / self.rows[key]).astype(np.float32)
        seen = [k for k in table if k[0] == layer]
        if not seen:
            return None
        total = sum(table[k] for k in seen) / sum(self.rows[k] for k in seen)
        return total.astype(np.float32)


class _Recorder(nn.Module):
    """Stands in for a layer's RoutedExperts while calibrating: records, then computes as usual."""

    def __init__(self, inner, layer: int, moments: Moments):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_info", (layer, moments))

    def __call__(self, x, indices, weights):
        from mlx_v4.layers.moe import _expert_matmul, clamped_swiglu

        layer, moments = self._info
        inner, k = self.inner, indices.shape[-1]
        flat = np.array(indices).reshape(-1)
        for e in np.unique(flat):
            rows = mx.array(np.nonzero(flat == e)[0] // k)
            xe = x[rows]
            h = clamped_swiglu(_expert_matmul(inner.w1, xe, int(e)), _expert_matmul(inner.w3, xe, int(e)), inner.limit)
            moments.add(layer, int(e), np.array(xe.astype(mx.float32)), np.array(h.astype(mx.float32)))
        return inner(x, indices, weights)


def collect_moments(model, ids: list[int], chunk: int = 256) -> Moments:
    """Run ``model`` over ``ids`` (chunked prefill) recording every routed expert's inputs."""
    moments = Moments()
    originals = [layer.ffn.experts for layer in model.layers]
    try:
        for i, layer in enumerate(model.layers):
            layer.ffn.experts = _Recorder(originals[i], i, moments)
        cache = model.make_cache()
        for s in range(0, len(ids), chunk):
            mx.eval(model(mx.array([ids[s:s + chunk]], dtype=mx.int32), cache, last_only=True))
    finally:
        for layer, original in zip(model.layers, originals):
            layer.ffn.experts = original
    return moments


def calibrate(source_dir: Path, text: str, max_tokens: int = MAX_TOKENS) -> Moments:
    """Load the source model and tokenizer and collect the routed experts' input moments."""
    import mlx_v4

    model, tokenizer = mlx_v4.load(source_dir)
    ids = tokenizer.encode(text)[:max_tokens]
    if len(ids) < 16:
        raise ConvertError(f"the calibration text gives only {len(ids)} tokens; give a longer one")
    if max(ids) >= model.args.vocab_size:  # an id past the embedding would read out of bounds
        raise ConvertError(f"{source_dir}: its tokenizer gives token id {max(ids)} but the model's vocab_size is "
                           f"{model.args.vocab_size}; calibration needs the model's own tokenizer.json")
    return collect_moments(model, ids)


# ---- weighted quantization ----------------------------------------------------------------------
def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[R, C] integer codes -> [R, C * bits / 32] uint32, LSB first (mx.quantize's packing)."""
    R, C = codes.shape
    bitplanes = (codes.astype(np.uint32)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1  # [R, C, bits]
    stream = bitplanes.reshape(R, C * bits // 32, 32).astype(np.uint64)
    return (stream << np.arange(32, dtype=np.uint64)).sum(-1).astype(np.uint32)


def _bf16(a: np.ndarray) -> np.ndarray:
    return np.array(mx.array(a).astype(mx.bfloat16).astype(mx.float32))


def _codes(w, scale, bias, top):
    safe = np.where(scale == 0, 1.0, scale)
    return np.clip(np.round((w - bias) / safe), 0, top)


def _error(w, imp, scale, bias, q):
    return (imp * (w - (scale * q + bias)) ** 2).sum(-1)


def quantize_weighted(w: mx.array, importance: np.ndarray | None, *, group_size: int, bits: int,
                      mode: str = "affine") -> tuple[mx.array, mx.array, mx.array]:
    """``mx.quantize``'s output format (packed weight, bf16 scales and biases), with each group's
    scale, zero point and clip chosen to minimise sum_j importance_j (w_j - dequantized_j)^2."""
    if mode != "affine":
        raise ConvertError(f"calibrated quantization is affine only, not {mode!r}")
    W = np.array(w.astype(mx.float32))  # [R, C]
    R, C = W.shape
    G = C // group_size
    wg = W.reshape(R, G, group_size)
    imp = np.ones(C, np.float32) if importance is None else np.maximum(importance.astype(np.float32), 1e-12)
    ig = np.broadcast_to(imp.reshape(1, G, group_size), wg.shape)
    top = 2**bits - 1

    # MLX's own rounding (plain min/max) is the first candidate
    q0, s0, b0 = mx.quantize(w.astype(mx.bfloat16), group_size=group_size, bits=bits)
    best_s = np.array(s0.astype(mx.float32)).reshape(R, G, 1)
    best_b = np.array(b0.astype(mx.float32)).reshape(R, G, 1)
    best_q = _codes(wg, best_s, best_b, top)
    best_err = _error(wg, ig, best_s, best_b, best_q)

    lo, hi = wg.min(-1, keepdims=True), wg.max(-1, keepdims=True)
    for c_lo in CLIPS:
        for c_hi in CLIPS:
            a, b = lo * c_lo, hi * c_hi
            scale = np.maximum((b - a) / top, 1e-8)
            q = _codes(wg, scale, a, top)
            # weighted least squares for (scale, bias) given the codes
            sw, sq, sqq = ig.sum(-1, keepdims=True), (ig * q).sum(-1, keepdims=True), (ig * q * q).sum(-1, keepdims=True)
            sx, sqx = (ig * wg).sum(-1, keepdims=True), (ig * q * wg).sum(-1, keepdims=True)
            det = sw * sqq - sq * sq
            ok = np.abs(det) > 1e-20
            s_fit = np.where(ok, (sw * sqx - sq * sx) / np.where(ok, det, 1), scale)
            b_fit = np.where(ok, (sqq * sx - sq * sqx) / np.where(ok, det, 1), a)
            for s_c, b_c in ((scale, a), (s_fit, b_fit)):
                s_c, b_c = _bf16(s_c), _bf16(b_c)  # what will be stored
                q_c = _codes(wg, s_c, b_c, top)
                err = _error(wg, ig, s_c, b_c, q_c)
                better = err < best_err
                if better.any():
                    m = better[..., None]
                    best_s, best_b = np.where(m, s_c, best_s), np.where(m, b_c, best_b)
                    best_q, best_err = np.where(m, q_c, best_q), np.where(better, err, best_err)
    packed = pack(best_q.reshape(R, C).astype(np.uint32), bits)
    return (mx.array(packed), mx.array(best_s.reshape(R, G)).astype(mx.bfloat16),
            mx.array(best_b.reshape(R, G)).astype(mx.bfloat16))
