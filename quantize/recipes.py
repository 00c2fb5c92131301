"""Recipes: which tensor class gets which format.

A *target* is either a :class:`Quant` (MLX ``mx.quantize`` parameters) or a dense dtype name
(``"bf16"``, ``"fp32"``). Every tensor of our parameter tree falls in one class (:func:`classify`);
a recipe maps the quantizable classes to targets, and everything else keeps a fixed dense format:
hyper-connection tensors, attention sinks, the router bias and the compressor ``ape`` stay fp32,
``tid2eid`` stays integer, norms/router/compressors/``wo_a`` stay dense (the model runs them
unquantized: see ``weights._DENSE_ONLY``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass


class ConvertError(ValueError):
    """A conversion we cannot do; the message names the file, tensor or option."""


@dataclass(frozen=True)
class Quant:
    bits: int
    group_size: int
    mode: str = "affine"

    def params(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def __str__(self) -> str:
        return self.mode if self.mode != "affine" else f"affine {self.bits}-bit g{self.group_size}"


Target = Quant | str  # a Quant, or "bf16" / "fp32"
MXFP4 = Quant(4, 32, "mxfp4")
MXFP8 = Quant(8, 32, "mxfp8")
DENSE = ("bf16", "fp32")

#: Per-tensor override: (our module path, tensor class, the recipe's target) -> target, or None
#: to keep the recipe's choice. E.g. ``lambda m, c, t: Quant(8, 64) if m == "layers.0.attn.wq_b" else None``.
Override = Callable[[str, str, Target], Target | None]

# ---- tensor classes -------------------------------------------------------------------------
_CLASSES = [
    (r"embed\.weight", "embed"),
    (r"head\.weight", "head"),
    (r"(.*\.)?hc_(head|attn|ffn)\.(fn|base|scale)", "hyper"),
    (r".*\.attn\.attn_sink", "sink"),
    (r".*compressor\.ape", "ape"),
    (r".*compressor\.(wkv|wgate)\.weight", "compressor"),
    (r".*\.ffn\.gate\.weight", "router"),
    (r".*\.ffn\.gate\.bias", "router_bias"),
    (r".*\.ffn\.gate\.tid2eid", "tid2eid"),
    (r".*\.attn\.wo_a\.weight", "attention_wo_a"),
    (r".*\.attn\.(wq_a|wq_b|wkv|wo_b)\.weight", "attention"),
    (r"mtp\.\d+\.(e_proj|h_proj)\.weight", "attention"),  # the MTP block's input projections
    (r".*\.attn\.indexer\.(wq_b|weights_proj)\.weight", "indexer"),
    (r".*\.ffn\.shared_experts\.w[123]\.weight", "shared_expert"),
    (r".*\.ffn\.experts\.w[123]\.weight", "experts"),
    (r"(.*\.)?(norm|attn_norm|ffn_norm|q_norm|kv_norm|enorm|hnorm)\.weight", "norm"),
]
_CLASS_RX = [(re.compile(p), c) for p, c in _CLASSES]
#: Classes the model can run quantized (Linear, Embedding, SwitchLinear modules).
QUANTIZABLE = ("embed", "head", "attention", "indexer", "shared_expert", "experts")
#: Always float32 / integer, whatever the recipe.
FP32_CLASSES = ("hyper", "sink", "ape", "router_bias")


def classify(name: str) -> str:
    """Our tensor name (``layers.3.attn.wq_b.weight``) -> its class."""
    for rx, c in _CLASS_RX:
        if rx.fullmatch(name):
            return c
    raise ConvertError(f"tensor '{name}' has no class (not a DeepSeek V4 parameter)")


# ---- recipes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    experts: Target
    linear: Target  # attention, indexer, shared expert
    embed_head: Target

    def target(self, klass: str) -> Target:
        if klass == "experts":
            return self.experts
        if klass in ("embed", "head"):
            return self.embed_head
        if klass in QUANTIZABLE:
            return self.linear
        return "fp32" if klass in FP32_CLASSES else "bf16"


RECIPE_NAMES = ("4bit", "8bit", "mixed-4-8", "mxfp4", "bf16")
#: Names other parts of the project use for the same recipes.
ALIASES = {"q4": "4bit", "q8": "8bit", "native": "mxfp4", "mixed": "mixed-4-8"}
GROUP_SIZES = (32, 64, 128)


def get_recipe(name: str, group_size: int = 64) -> Recipe:
    name = ALIASES.get(name, name)
    if group_size not in GROUP_SIZES:
        raise ConvertError(f"group_size={group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    q4, q8 = Quant(4, group_size), Quant(8, group_size)
    recipes = {
        "4bit": Recipe("4bit", f"uniform affine 4-bit (group {group_size})", q4, q4, q4),
        "8bit": Recipe("8bit", f"uniform affine 8-bit (group {group_size})", q8, q8, q8),
        "mixed-4-8": Recipe("mixed-4-8", f"routed experts affine 4-bit, attention/indexer/shared expert/"
                            f"embedding/head affine 8-bit (group {group_size})", q4, q8, q8),
        "mxfp4": Recipe("mxfp4", "the release's own formats: FP4 experts -> mxfp4 and FP8 -> mxfp8 "
                        "without rounding; embedding/head bf16", MXFP4, MXFP8, "bf16"),
        "bf16": Recipe("bf16", "everything dense bf16 (fp32 where the model needs it)", "bf16", "bf16", "bf16"),
    }
    if name not in recipes:
        raise ConvertError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPE_NAMES)}")
    return recipes[name]


def check_target(target: Target, where: str) -> Target:
    if isinstance(target, Quant):
        ok = (target.mode == "affine" and target.bits in (2, 3, 4, 5, 6, 8) and target.group_size in GROUP_SIZES) \
            or target == MXFP4 or target == MXFP8
        if not ok:
            raise ConvertError(f"{where}: unsupported quantization {target.params()} (affine bits 2-8 with "
                               f"group 32/64/128, or mxfp4/mxfp8 with group 32)")
        return target
    if target not in DENSE:
        raise ConvertError(f"{where}: target {target!r} is neither a Quant nor one of {DENSE}")
    return target


def choose(name: str, klass: str, recipe: Recipe, shape: tuple[int, ...], override: Override | None) -> Target:
    """The target of one weight (our name), after the override and the shape checks. A quantized
    default that the shape does not allow (in-dim not a multiple of the group) falls back to bf16;
    an override that asks for the impossible is an error."""
    module = name.rsplit(".", 1)[0]
    target = recipe.target(klass)
    forced = override(module, klass, target) if override is not None else None
    if forced is not None:
        target = check_target(forced, f"override for '{module}'")
    if not isinstance(target, Quant):
        if klass in FP32_CLASSES:
            return "fp32"
        return target
    problem = None
    if klass not in QUANTIZABLE:
        problem = f"class {klass!r} runs unquantized in the model"
    elif shape[-1] % target.group_size:
        problem = f"in-dim {shape[-1]} is not a multiple of group size {target.group_size}"
    if problem and forced is not None:
        raise ConvertError(f"override for '{module}': cannot quantize ({problem})")
    return "bf16" if problem else target
