"""Weights of a DeepSeek V4.1 directory written by ``mlx-v4 convert`` (quantize/plan_v41.py).

Our parameter names; routed experts one tensor per expert (``layers.N.ffn.experts.E.w1.weight``
with its ``.scales``/``.biases``), stacked here; quantized modules listed in config.json
``"quantization"`` (MLX parameters per module); Engram tables as released (read by the loader
as for the release). mxfp8/mxfp4 modules follow the loader's ``fp8``/``fp4`` choice exactly as
the release's FP8/FP4 tensors do, so a ``native`` conversion gives the very same model: kept
quantized, or dequantized (exact) into the compute dtype. Affine modules stay quantized. Under an
expert budget the store reads each expert's own tensors (:func:`converted_expert_entries`) and
converts them as the resident stack is (:class:`ConvertedExpertConversion`, :func:`loaded_arrays`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from ..weights import WeightsError, _Entry, _Part

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
        arrays, q = loaded_arrays(arrays, quant[module], fp8=fp8, fp4=fp4, dtype=target)
        weights.update({f"{module}.{leaf}": a for leaf, a in arrays.items()})
        if q is not None:
            quantization[module] = q
    return weights, quantization, used


def loaded_arrays(arrays: dict[str, mx.array], q: dict, *, fp8: str, fp4: str,
                  dtype: mx.Dtype) -> tuple[dict[str, mx.array], dict | None]:
    """One quantized module's stored {"weight", "scales"[, "biases"]} -> the arrays the model holds
    and their quantization (None: dequantized into ``dtype``). Elementwise, so a stack of experts
    and each expert alone (the expert store's slots) convert to the same bits."""
    if (q["mode"], fp8) == ("mxfp8", "dequantize") or (q["mode"], fp4) == ("mxfp4", "dequantize"):
        return {"weight": mx.dequantize(arrays["weight"], arrays["scales"], arrays.get("biases"),
                                        group_size=q["group_size"], bits=q["bits"], mode=q["mode"],
                                        dtype=mx.float32).astype(dtype)}, None
    if q["mode"] == "affine":  # bf16 scales and biases, widened exactly: outputs in the compute dtype
        arrays = {k: v if k == "weight" else v.astype(dtype) for k, v in arrays.items()}
    return arrays, q


class ConvertedExpertConversion:
    """One converted expert's tensors (``layers.N.ffn.experts.E.w1.weight`` and its ``.scales``/
    ``.biases``) -> its arrays, as :func:`converted_weights` converts the stack."""

    def __init__(self, quant: dict[str, dict], fp8: str, fp4: str, dtype: mx.Dtype):
        self.quant, self.fp8, self.fp4, self.dtype = quant, fp8, fp4, dtype

    def __call__(self, name: str, entry: _Entry, get) -> tuple[dict[str, mx.array], dict | None]:
        module, part = name.removesuffix(".weight"), entry.parts[0]
        if module not in self.quant:
            return {name: get(part.w).astype(self.dtype)}, None
        arrays = {"weight": get(part.w), "scales": get(part.scales)}
        if part.biases is not None:
            arrays["biases"] = get(part.biases)
        arrays, q = loaded_arrays(arrays, self.quant[module], fp8=self.fp8, fp4=self.fp4,
                                  dtype=self.dtype)
        return {f"{module}.{k}": v for k, v in arrays.items()}, q


def converted_expert_entries(path: Path, infos: dict, expected: dict, quant: dict[str, dict]) -> dict[str, dict[str, _Entry]]:
    """The routed experts of a conversion, one tensor per expert and matrix (the converter writes
    each expert's w1, w2, w3 adjacent: one read per store miss) -> {"layers.N.ffn.experts":
    {"w1": entry with one part per expert}}; WeightsError naming a missing or misshapen tensor."""
    out: dict[str, dict[str, _Entry]] = {}
    for ours, param in expected.items():
        if not (m := _STACKED.match(ours)):
            continue
        module = f"{m[1]}.{m[2]}"
        n, rows, cols = param.shape
        q = quant.get(module)
        parts = []
        for e in range(n):
            base = f"{m[1]}.{e}.{m[2]}"
            leaves = {leaf: infos.get(f"{base}.{leaf}") for leaf in ("weight", "scales", "biases")}
            for leaf in ("weight", "scales") if q else ("weight",):
                if leaves[leaf] is None:
                    raise WeightsError(f"{path}: the conversion has no tensor '{base}.{leaf}'")
            w = leaves["weight"]
            want = (rows, cols * q["bits"] // 32) if q else (rows, cols)
            if tuple(w.shape) != want:
                raise WeightsError(f"{w.file}: expert tensor '{w.name}' has shape {list(w.shape)}, the config "
                                   f"implies {list(want)}")
            parts.append(_Part(w, scales=leaves["scales"] if q else None, biases=leaves["biases"] if q else None))
        out.setdefault(m[1], {})[m[2]] = _Entry(parts)
    return out
