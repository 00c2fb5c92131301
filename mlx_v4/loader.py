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
    from .v41.config import is_v41_checkpoint

    if is_v41_checkpoint(path):  # DeepSeek V4.1: its own model and loader (mlx_v4/v41)
        from .v41.weights import load_v41

        return load_v41(path, model_config=model_config, dtype=dtype, fp8=fp8)
    args = ModelArgs.from_file(path, model_config)
    dtype = dtype or platform.default_dtype()
    fp8 = fp8 or ("mxfp8" if platform.metal_available() else "dequantize")
    weights, quantization = load_weights(path, args, fp8=fp8, dtype=dtype)
    model = Model(args)
    apply_quantization(model, quantization)
    # Every parameter must come from the checkpoint, in the dtype weights.py chose for it.
    validate_weights(weights, dict(tree_flatten(model.parameters())))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    model.weights_id = _weights_id(path)
    model.generation_defaults = load_generation_defaults(path)
    model.eval()
    return model, path
