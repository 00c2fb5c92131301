"""A synthetic official-layout checkpoint whose routed experts dwarf the rest (expert store
tests and benchmarks/expert_stream.py): tiny attention, big FP4 experts written as random bytes
(seconds for hundreds of MB), a router whose bias can make some experts popular."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from ..config import ModelArgs
from .official import official_shapes, write_safetensors
from .tiny import TINY_CONFIG

_ROUTED = re.compile(r"\.ffn\.experts\.\d+\.")


def synthetic_config(*, layers: int = 4, experts: int = 64, top_k: int = 6, hidden: int = 128, inter: int = 2048,
                     hash_layers: int = 1) -> dict:
    ratios = ([0, 4, 128] * layers)[:layers] + [0]
    return dict(TINY_CONFIG, num_hidden_layers=layers, n_routed_experts=experts, num_experts_per_tok=top_k,
                hidden_size=hidden, moe_intermediate_size=inter, compress_ratios=ratios, num_hash_layers=hash_layers,
                num_nextn_predict_layers=0)


def expert_nbytes(cfg: dict) -> int:
    """Bytes of one routed expert on disk (FP4 weights + E8M0 scales of w1, w2, w3)."""
    D, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    return 3 * (D * inter // 2 + D * inter // 32)


def write_synthetic_checkpoint(path, cfg: dict, *, seed: int = 0, skew: float = 0.0) -> Path:
    """config.json + one shard per layer in the release's layout (FP4 experts, one tensor per
    expert with its ``.scale``). ``skew`` > 0 biases the router towards a Zipf-like popularity
    (bias = -skew * log(rank)), as trained routers are uneven; 0 leaves it near uniform."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = ModelArgs.from_dict(cfg)
    rng = np.random.default_rng(seed)
    shapes = official_shapes(cfg, include_mtp=False)
    shards: dict[str, dict] = {}
    for name, shape in shapes.items():
        m = re.match(r"layers\.(\d+)\.", name)
        shard = shards.setdefault(f"layer{m.group(1)}" if m else "top", {})
        if _ROUTED.search(name):
            out, inp = shape
            shard[name] = ("I8", rng.integers(-128, 128, (out, inp // 2), dtype=np.int8))
            # E8M0 exponent giving weights of RMS about 1/sqrt(in) (FP4 values have RMS ~3)
            e = 127 - round(math.log2(3 * math.sqrt(inp)))
            shard[name[: -len(".weight")] + ".scale"] = ("F8_E8M0", np.full((out, inp // 32), e, np.uint8))
            continue
        if name.endswith("tid2eid"):
            a = np.argsort(rng.random((shape[0], args.n_routed_experts)), axis=1)[:, : shape[1]].astype(np.int64)
            shard[name] = ("I64", a)
            continue
        if "norm.weight" in name:
            a = 1 + 0.1 * rng.standard_normal(shape)
        elif re.search(r"hc_(attn|ffn|head)_fn$", name):
            a = 0.02 * rng.standard_normal(shape)
        elif re.search(r"hc_(attn|ffn|head)_scale$", name):
            a = 0.5 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(("_base", "ape", "attn_sink")):
            a = 0.5 * rng.standard_normal(shape)
        elif name.endswith("gate.bias"):
            rank = rng.permutation(shape[0]) + 1
            a = -skew * np.log(rank) + 0.01 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        shard[name] = ("F32", a.astype(np.float32))
    weight_map = {}
    names = sorted(shards)
    for i, key in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        write_safetensors(path / fname, dict(sorted(shards[key].items())))
        weight_map |= dict.fromkeys(shards[key], fname)
    for fname, obj in (("model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map}),
                       ("config.json", dict(cfg, expert_dtype="fp4"))):
        tmp = path / (fname + ".tmp")
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path / fname)
    return path
