"""mlx-v4: DeepSeek V4 (Flash and Pro) on MLX.

    import mlx_v4
    model, tokenizer = mlx_v4.load("deepseek-ai/DeepSeek-V4-Flash")
    print(mlx_v4.generate(model, tokenizer, "Hello", max_tokens=64))
"""

from __future__ import annotations

# Must run before anything imports mlx.core (see platform.py).
from .platform import preload_blas as _preload_blas

_preload_blas()

from pathlib import Path  # noqa: E402

__version__ = "0.1.0"

#: The bundled tiny demo model (every V4 layer kind, real tokenizer; trained on Python docs).
DEMO_MODEL_PATH = Path(__file__).parent / "demo"


def load(path_or_repo: str | Path | None = None, *, model_config: dict | None = None, dtype=None,
         fp8: str | None = None, expert_budget: int | str | None = None, expert_policy: str | None = None):
    """Load a DeepSeek V4 model and its tokenizer.

    ``path_or_repo``: a model directory (the official release, a transformers-named checkpoint
    or an mlx-v4 conversion) or a Hugging Face repo id; None loads the bundled demo.
    ``model_config`` overrides config.json fields (e.g. ``{"fake_quant": False}``).
    ``dtype`` is the compute dtype of unquantized weights and activations (default float32 on
    the CPU backend, bfloat16 on Metal). ``fp8``: ``"mxfp8"`` keeps FP8 weights quantized
    (default on Metal), ``"dequantize"`` expands them to ``dtype`` (default on CPU, where
    quantized matmuls are slow).

    ``expert_budget``: None keeps every routed expert resident; bytes (int) or a size ("32GB")
    keeps the routed experts in their checkpoint files and reads the ones the router picks into
    slots that never exceed that many bytes (logits are bit-identical); ``"auto"`` fits them in
    the memory left after the other weights and a planned KV cache. ``expert_policy``: "lfu"
    (default) or "lru". ``model.expert_store.stats()`` reports hits, misses and bytes read.
    DeepSeek V4.1: the same budget also covers the Engram tables (resident only if they fit
    beside every routed expert; else, and without a budget, their rows are read from disk)."""
    from .loader import load_model
    from .tokenizer import load_tokenizer

    model, path = load_model(DEMO_MODEL_PATH if path_or_repo is None else path_or_repo,
                             model_config=model_config, dtype=dtype, fp8=fp8, expert_budget=expert_budget,
                             expert_policy=expert_policy)
    return model, load_tokenizer(path)


_LAZY = {"generate": ".generation", "stream_generate": ".generation", "ChatSession": ".chat",
         "batch_generate": ".batch_generation", "BatchGenerator": ".batch_generation",
         "make_sampler": "mlx_lm.sample_utils"}


def __getattr__(name):
    # Lazy re-exports: `import mlx_v4` (and so `mlx-v4 --help`) must not import mlx.core.
    if name not in _LAZY:
        raise AttributeError(f"module 'mlx_v4' has no attribute {name!r}")
    import importlib

    module = _LAZY[name]
    value = getattr(importlib.import_module(module, __name__ if module.startswith(".") else None), name)
    globals()[name] = value
    return value


__all__ = ["load", "generate", "stream_generate", "batch_generate", "BatchGenerator", "ChatSession", "make_sampler",
           "DEMO_MODEL_PATH"]
