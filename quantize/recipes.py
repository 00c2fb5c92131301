"""Recipes: which tensor class gets which format.

A *target* is either a :class:`Quant` (MLX ``mx.quantize`` parameters) or a dense dtype name
(``"bf16"``, ``"fp16"``, ``"fp32"``). Every tensor of our parameter tree falls in one class
(:func:`classify`); a recipe maps the quantizable classes to targets (``native`` instead keeps
each tensor's source format), and everything else keeps a fixed dense format:
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


Target = Quant | str  # a Quant, or "bf16" / "fp16" / "fp32"
MXFP4 = Quant(4, 32, "mxfp4")
MXFP8 = Quant(8, 32, "mxfp8")
DENSE = ("bf16", "fp16", "fp32")

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
    (r"dspark\.main_proj\.weight", "attention"),  # DSpark's projection of the target hiddens (FP8)
    (r"dspark\.markov_w[12]\.weight", "markov"),  # DSpark's Markov head: bf16 in the release
    (r"dspark\.confidence\.weight", "confidence"),  # DSpark's confidence head: float32 in the release
    (r".*\.attn\.indexer\.(wq_b|weights_proj)\.weight", "indexer"),
    (r".*\.ffn\.shared_experts\.w[123]\.weight", "shared_expert"),
    (r".*\.ffn\.experts\.w[123]\.weight", "experts"),
    (r"(.*\.)?(norm|attn_norm|ffn_norm|q_norm|kv_norm|enorm|hnorm|main_norm)\.weight", "norm"),
]
_CLASS_RX = [(re.compile(p), c) for p, c in _CLASSES]
#: Classes the model can run quantized (Linear, Embedding, SwitchLinear modules).
QUANTIZABLE = ("embed", "head", "attention", "indexer", "shared_expert", "experts",
               "engram")  # DeepSeek V4.1's engram.wkv (quantize/plan_v41.py)
#: Always float32 / integer, whatever the recipe.
FP32_CLASSES = ("hyper", "sink", "ape", "router_bias", "confidence")


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
    #: Every tensor keeps its source format (``native``); the targets above then describe the
    #: official release, which is what sizing (``mlx-v4 info``) uses.
    keep_source: bool = False

    def target(self, klass: str) -> Target:
        if klass == "experts":
            return self.experts
        if klass in ("embed", "head"):
            return self.embed_head
        if klass in QUANTIZABLE:
            return self.linear
        return "fp32" if klass in FP32_CLASSES else "bf16"


@dataclass(frozen=True)
class RecipeSpec:
    """One row of :data:`RECIPES`. A format is an int (affine bits at the requested group size),
    a Quant, or a dense dtype name; ``{g}`` in the description becomes the group size."""

    experts: int | Target
    linear: int | Target
    embed_head: int | Target
    description: str
    keep_source: bool = False

    def build(self, name: str, group_size: int) -> Recipe:
        def fmt(f):
            return Quant(f, group_size) if isinstance(f, int) else f
        return Recipe(name, self.description.format(g=group_size), fmt(self.experts), fmt(self.linear),
                      fmt(self.embed_head), self.keep_source)


#: Every recipe, in the order the CLI and docs list them: adding one is one line here.
RECIPES: dict[str, RecipeSpec] = {
    "native": RecipeSpec(MXFP4, MXFP8, "bf16", "every tensor keeps its source format, so nothing is rounded "
                         "(FP4 -> mxfp4 and FP8 -> mxfp8 bit for bit, bf16 stays bf16)", keep_source=True),
    "mxfp4": RecipeSpec(MXFP4, MXFP8, "bf16", "routed experts mxfp4, attention/indexer/shared expert mxfp8, "
                        "embedding/head bf16 (the release's layout, imposed on any source)"),
    "mxfp8": RecipeSpec(MXFP8, MXFP8, "bf16", "routed experts and attention/indexer/shared expert mxfp8, "
                        "embedding/head bf16"),
    "4bit": RecipeSpec(4, 4, 4, "uniform affine 4-bit (group {g})"),
    "8bit": RecipeSpec(8, 8, 8, "uniform affine 8-bit (group {g})"),
    "mixed-4-8": RecipeSpec(4, 8, 8, "routed experts affine 4-bit, attention/indexer/shared expert/embedding/"
                            "head affine 8-bit (group {g})"),
    "bf16": RecipeSpec("bf16", "bf16", "bf16", "everything dense bf16 (fp32 where the model needs it)"),
    # for Macs that stream the experts from SSD (mlx_v4.experts): fewer bytes per miss; the routed
    # experts are calibrated on activations (quantize/calibrate.py)
    "3bit-experts": RecipeSpec(3, 8, 8, "routed experts affine 3-bit (calibrated), attention/indexer/shared "
                               "expert/embedding/head affine 8-bit (group {g})"),
    "2bit-experts": RecipeSpec(2, 8, 8, "routed experts affine 2-bit (calibrated), attention/indexer/shared "
                               "expert/embedding/head affine 8-bit (group {g})"),
}
RECIPE_NAMES = tuple(RECIPES)
#: Other spellings accepted for the same recipes (older mlx-v4 names, mlx-lm's q-bits names).
ALIASES = {"q4": "4bit", "q8": "8bit", "mixed": "mixed-4-8"}
DEFAULT_RECIPE = "native"
GROUP_SIZES = (32, 64, 128)


def recipe_name(name: str) -> str:
    """The canonical name of ``name`` (an alias resolved); ConvertError listing the choices."""
    name = ALIASES.get(name, name)
    if name not in RECIPES:
        raise ConvertError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPE_NAMES)}")
    return name


def get_recipe(name: str, group_size: int = 64) -> Recipe:
    name = recipe_name(name)
    if group_size not in GROUP_SIZES:
        raise ConvertError(f"group_size={group_size}: choose one of {', '.join(map(str, GROUP_SIZES))}")
    return RECIPES[name].build(name, group_size)


def bits_per_weight(target: Target) -> float:
    """Stored bits per weight of ``target``, scales included: affine adds a bf16 scale and bias per
    group, mxfp4/mxfp8 one 8-bit scale per 32 values."""
    if isinstance(target, Quant):
        return target.bits + (8 if target.mode != "affine" else 32) / target.group_size
    return {"bf16": 16.0, "fp16": 16.0, "fp32": 32.0}[target]


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


def choose(name: str, klass: str, recipe: Recipe, shape: tuple[int, ...], override: Override | None,
           source: Target | None = None) -> Target:
    """The target of one weight (our name), after the override and the shape checks. A quantized
    default that the shape does not allow (in-dim not a multiple of the group) falls back to bf16;
    an override that asks for the impossible is an error. ``source``: the tensor's own format,
    the target of a ``keep_source`` recipe."""
    module = name.rsplit(".", 1)[0]
    target = source if recipe.keep_source and source is not None else recipe.target(klass)
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
