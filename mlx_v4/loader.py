"""Build a Model from a directory or repo id: config, weights, quantized layers, dtype."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import platform
from .config import ModelArgs
from .generation import load_generation_defaults
from .model import Model
from .weights import apply_quantization, load_weights, resolve_model_path, validate_weights


def _weights_id(path: Path) -> str:
    """Identity of the checkpoint files (names and sizes), cheap to compute."""
    files = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]


def load_model(path_or_repo, *, model_config: dict | None = None, dtype=None, fp8: str | None = None):
    """-> (model, model directory). See :func:`mlx_v4.load`."""
    path = resolve_model_path(str(path_or_repo))
    args = ModelArgs.from_file(path, model_config)
    dtype = dtype or platform.default_dtype()
    fp8 = fp8 or ("mxfp8" if platform.metal_available() else "dequantize")
    weights, quantization = load_weights(path, args, fp8=fp8, dtype=dtype)
    model = Model(args)
    if any(k.startswith("mtp.") for k in weights):
        from .draft.mtp import attach_mtp

        attach_mtp(model)  # the release's drafter (mtp.0.*), for speculative decoding
    apply_quantization(model, quantization)
    # Every parameter must come from the checkpoint, in the dtype weights.py chose for it.
    validate_weights(weights, dict(tree_flatten(model.parameters())))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.weights_id = _weights_id(path)
    model.generation_defaults = load_generation_defaults(path)
    model.eval()
    return model, path
