"""Weights of a DeepSeek V4.1 directory written by ``mlx-v4 convert`` (quantize/plan_v41.py).

Our parameter names; routed experts one tensor per expert (``layers.N.ffn.experts.E.w1.weight``
with its ``.scales``/``.biases``), stacked here; quantized modules listed in config.json
``"quantization"`` (MLX parameters per module); Engram tables as released (read by the loader
as for the release). mxfp8/mxfp4 modules follow the loader's ``fp8``/``fp4`` choice exactly as
the release's FP8/FP4 tensors do, so a ``native`` conversion gives the very same model: kept
quantized, or dequantized (exact) into the compute dtype. Affine modules stay quantized.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from ..weights import WeightsError

_STACKED = re.compile(r"^((?:dspark\.)?layers\.\d+\.ffn\.experts)\.(w[123])\.weight$")


def is_converted(path: Path) -> bool:
    try:
        return "mlx_v4_conversion" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def own_quantization(path: Path) -> dict[str, dict]:
    """config.json "quantization" -> {module: {group_size, bits, mode}} (module entries only)."""
    q = json.loads((path / "config.json").read_text()).get("quantization") or {}
    base = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    return {m: base | p for m, p in q.items() if isinstance(p, dict)}


def converted_weights(path: Path, infos: dict, get, expected: dict, *, dtype, fp8: str, fp4: str,
                      fp32: re.Pattern) -> tuple[dict[str, mx.array], dict[str, dict], set[str]]:
    """-> (weights by our names, quantization of the modules kept quantized, tensor names used).
    ``expected``: the unquantized model's parameters; ``fp32``: names kept in float32."""
    quant = own_quantization(path)
    weights, quantization, used = {}, {}, set()

    def read(name: str) -> mx.array:
        if name not in infos:
            raise WeightsError(f"{path}: the conversion has no tensor '{name}'")
        used.add(name)
        return get(name)

    for ours, param in expected.items():
        module = ours.removesuffix(".weight")
        names = [ours]
        if m := _STACKED.match(ours):
            names = [f"{m[1]}.{e}.{m[2]}.weight" for e in range(param.shape[0])]
        target = mx.float32 if fp32.search(ours) else dtype
        if module not in quant:
            w = mx.stack([read(n) for n in names]) if m else read(ours)
            if tuple(w.shape) != tuple(param.shape):
                raise WeightsError(f"{path}: tensor '{ours}' has shape {list(w.shape)}, the config implies "
                                   f"{list(param.shape)}")
            weights[ours] = w.astype(target)
            continue
        arrays = {}
        for leaf in ("weight", "scales", "biases"):
            parts = [n.removesuffix(".weight") + "." + leaf for n in names]
            if leaf == "biases" and parts[0] not in infos:
                continue
            arrays[leaf] = mx.stack([read(p) for p in parts]) if m else read(parts[0])
        q = quant[module]
        if (q["mode"], fp8) == ("mxfp8", "dequantize") or (q["mode"], fp4) == ("mxfp4", "dequantize"):
            weights[ours] = mx.dequantize(arrays["weight"], arrays["scales"], arrays.get("biases"), group_size=q["group_size"],
                                          bits=q["bits"], mode=q["mode"], dtype=mx.float32).astype(target)
            continue
        if q["mode"] == "affine":  # bf16 scales and biases, widened exactly: outputs in the compute dtype
            arrays |= {k: v.astype(target) for k, v in arrays.items() if k != "weight"}
        weights.update({f"{module}.{leaf}": a for leaf, a in arrays.items()})
        quantization[module] = q
    return weights, quantization, used
