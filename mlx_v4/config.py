"""ModelArgs: the DeepSeek V4 configuration, read from either config.json schema.

Two schemas exist for the same model:

* the official release (``compress_ratios`` with one trailing entry for the MTP block,
  ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``, ``quantization_config``,
  ``expert_dtype``), and
* transformers' ``DeepseekV4Config`` (``layer_types``, ``mlp_layer_types``,
  ``compress_rates``, ``rope_parameters`` keyed ``main``/``compress``).

Both are normalised here into one dataclass; nothing else in the package reads raw JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PositionError(ValueError):
    """A request that runs past the model's maximum context (max_position_embeddings)."""


class ConfigError(ValueError):
    """A config.json that is not a DeepSeek V4 checkpoint we can run."""


_LAYER_TYPE_TO_RATIO = {
    "sliding_attention": 0,
    "compressed_sparse_attention": 4,
    "heavily_compressed_attention": 128,
}

# Keys that mark a newer architecture we do not implement; each is named in the error.
_UNSUPPORTED_KEYS = {
    "engram_layer_ids": "Engram n-gram memory (DeepSeek V4.1)",
    "kv_source_layer_ids": "cross-layer KV sharing (DeepSeek V4.1)",
    "index_source_layer_ids": "shared indexers (DeepSeek V4.1)",
    "vision_config": "the vision tower (DeepSeek V4.1)",
}


# config.json keys that are not ModelArgs fields but are understood (folded into fields).
_SCHEMA_KEYS = {"layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor",
                "num_key_value_heads", "dim", "n_layers", "n_heads", "rope_head_dim", "moe_inter_dim",
                "n_activated_experts", "route_scale", "score_func", "n_hash_layers", "norm_eps", "window_size",
                "n_mtp_layers"}


KV_FP8_BLOCK = 64  # the KV cache's FP8 block (layers/fake_quant.py FP8_BLOCK)
INDEX_FP4_BLOCK = 32  # the indexer keys' FP4 block (layers/fake_quant.py FP4_BLOCK)

_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                  "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
                  "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size", "sliding_window",
                  "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters",
                  "max_position_embeddings")
_POSITIVE_FLOATS = ("routed_scaling_factor", "hc_eps", "rope_theta", "compress_rope_theta", "rms_norm_eps")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ConfigError(f"{name}={value} must be {'positive' if minimum == 1 else '>= ' + str(minimum)}")


def _check_float(name: str, value, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name}={value} must be {'positive' if positive else '>= 0'}")


def _check_rope_scaling(rs) -> None:
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise ConfigError(f"rope_scaling={rs!r} must be an object")
    if rs.get("type", rs.get("rope_type")) != "yarn":
        return
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rs:
            raise ConfigError(f"rope_scaling (yarn) needs '{key}'")
        _check_float(f"rope_scaling.{key}", rs[key], positive=True)
    for key in ("beta_fast", "beta_slow"):
        if key in rs:
            _check_float(f"rope_scaling.{key}", rs[key], positive=True)


@dataclass
class ModelArgs:
    model_type: str = "deepseek_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    # YaRN for compressed layers: factor, original_max_position_embeddings, beta_fast, beta_slow.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-6
    # One ratio per main layer (0 window-only, 4 CSA, 128 HCA, or any other ratio >= 1 without
    # overlap or indexer, like HCA); the MTP entry is split off.
    compress_ratios: list[int] = field(default_factory=list)
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    quantization_config: dict[str, Any] | None = None
    expert_dtype: str | None = None
    # Activation quantisation simulations of the official code (FP8 KV, FP4 + Hadamard in
    # the indexer). On by default; off for exact comparison with transformers.
    fake_quant: bool = True
    # FP8 rounding of the inputs of the GEMMs whose weights are FP8/FP4 in the release (the
    # official linear(): act_quant(x, 128, "ue8m0")). None = on with fake_quant wherever every
    # such input splits into blocks of 128 (every released config); resolved in validate().
    act_quant: bool | None = None
    # MTP weights are recognised in checkpoints but not instantiated (see weights.py).
    mtp_compress_ratio: int | None = None
    # The DSpark drafter of V4-Flash-0731 (mlx_v4/draft/dspark.py): draft block length, the
    # noise token filling the block after its anchor, the target layers whose (mean) input
    # streams it reads, the rank of its Markov head, and the compress ratios of its stages (the
    # trailing compress_ratios entries, one per target layer). Unset: no DSpark fields.
    dspark_block_size: int = 0
    dspark_noise_token_id: int | None = None
    dspark_target_layer_ids: list[int] = field(default_factory=list)
    dspark_markov_rank: int = 0
    dspark_compress_ratios: list[int] | None = None

    # ---- derived -------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def window_only_layers(self) -> list[int]:
        return [i for i, r in enumerate(self.compress_ratios) if r == 0]

    def layer_kind(self, layer: int) -> str:
        """'window' (ratio 0), 'csa' (ratio 4: overlapping windows, indexer) or 'hca' (any other
        ratio, 128 in the release: every visible entry is attended)."""
        r = self.compress_ratios[layer]
        return "window" if r == 0 else ("csa" if r == 4 else "hca")

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @property
    def has_dspark(self) -> bool:
        """The config describes a DSpark drafter (V4-Flash-0731)."""
        return self.dspark_compress_ratios is not None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Refuse, with the field named, every value that would otherwise fail later (in a
        reshape, a weight shape or a kernel) or compute something other than V4."""
        if self.model_type != "deepseek_v4":
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported: mlx-v4 runs 'deepseek_v4' "
                "(DeepSeek V4 Flash and Pro) only"
            )
        for name in _POSITIVE_INTS:
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("num_hash_layers", "num_nextn_predict_layers", "bos_token_id", "eos_token_id"):
            _check_int(name, getattr(self, name), minimum=0)
        for name in _POSITIVE_FLOATS:
            _check_float(name, getattr(self, name), positive=True)
        _check_float("swiglu_limit", self.swiglu_limit, positive=False)
        if not self.compress_ratios:
            self.compress_ratios = [0] * self.num_hidden_layers
        if not isinstance(self.compress_ratios, list) or len(self.compress_ratios) != self.num_hidden_layers:
            n = len(self.compress_ratios) if isinstance(self.compress_ratios, list) else "not a list of"
            raise ConfigError(f"compress_ratios has {n} entries for num_hidden_layers={self.num_hidden_layers}")
        # The official Compressor is generic in its ratio (only ratio 4 overlaps and has an
        # indexer; every other ratio attends to all visible entries, as 128 does).
        for i, r in enumerate(self.compress_ratios):
            _check_int(f"compress_ratios[{i}]", r, minimum=0)
        if self.mtp_compress_ratio is not None:
            _check_int("compress_ratios (MTP entry)", self.mtp_compress_ratio, minimum=0)
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not one of sqrtsoftplus, sigmoid, softmax")
        if self.n_shared_experts != 1:
            raise ConfigError(f"n_shared_experts={self.n_shared_experts}: V4 has exactly one shared expert")
        if self.head_dim <= self.qk_rope_head_dim or self.qk_rope_head_dim % 2:
            raise ConfigError(
                f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and below head_dim={self.head_dim}"
            )
        if self.nope_head_dim % KV_FP8_BLOCK:
            # the non-RoPE KV dims are rounded to FP8 in blocks of 64 (official act_quant(kv, 64))
            raise ConfigError(
                f"head_dim={self.head_dim}: the non-RoPE KV dims (head_dim - qk_rope_head_dim = "
                f"{self.nope_head_dim}) must be a multiple of {KV_FP8_BLOCK}, the FP8 block of the KV cache"
            )
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"o_groups={self.o_groups} does not divide the {self.num_attention_heads} heads")
        if self.index_head_dim & (self.index_head_dim - 1) or self.index_head_dim % INDEX_FP4_BLOCK:
            # Hadamard rotation, then FP4 in blocks of 32 (official fp4_act_quant(k, 32))
            raise ConfigError(f"index_head_dim={self.index_head_dim} must be a power of two (Hadamard rotation) "
                              f"and a multiple of {INDEX_FP4_BLOCK} (its FP4 block)")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds n_routed_experts="
                              f"{self.n_routed_experts}")
        if self.num_hash_layers > self.num_hidden_layers:
            raise ConfigError(f"num_hash_layers={self.num_hash_layers} exceeds num_hidden_layers="
                              f"{self.num_hidden_layers}")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary (vocab_size="
                                  f"{self.vocab_size})")
        _check_rope_scaling(self.rope_scaling)
        if self.has_dspark:
            self._validate_dspark()
        if self.expert_dtype not in (None, "fp4", "fp8", "bf16"):
            raise ConfigError(f"expert_dtype {self.expert_dtype!r} is not one of fp4, fp8, bf16")
        ragged = self.gemm_input_widths_not_blocked()
        if self.act_quant is None:
            self.act_quant = self.fake_quant and not ragged
        elif self.act_quant and ragged:
            raise ConfigError(
                "act_quant rounds GEMM inputs in blocks of 128, as the official act_quant does (it "
                f"requires whole blocks); not a multiple of 128: {', '.join(ragged)}"
            )

    def _validate_dspark(self) -> None:
        _check_int("dspark_block_size", self.dspark_block_size, minimum=1)
        _check_int("dspark_markov_rank", self.dspark_markov_rank, minimum=1)
        noise = self.dspark_noise_token_id
        if noise is None:
            raise ConfigError("dspark_noise_token_id is missing: a DSpark drafter fills its block with that token")
        _check_int("dspark_noise_token_id", noise, minimum=0)
        if noise >= self.vocab_size:
            raise ConfigError(f"dspark_noise_token_id={noise} is outside the vocabulary (vocab_size={self.vocab_size})")
        ids = self.dspark_target_layer_ids
        if not isinstance(ids, list) or not ids:
            raise ConfigError(f"dspark_target_layer_ids={ids!r} must be a non-empty list of layer indices")
        for i, t in enumerate(ids):
            _check_int(f"dspark_target_layer_ids[{i}]", t, minimum=0)
            if t >= self.num_hidden_layers:
                raise ConfigError(f"dspark_target_layer_ids[{i}]={t} is not a layer (num_hidden_layers="
                                  f"{self.num_hidden_layers})")
            if i and t <= ids[i - 1]:
                raise ConfigError(f"dspark_target_layer_ids={ids} must be strictly increasing")
        ratios = self.dspark_compress_ratios
        if len(ratios) != len(ids):
            raise ConfigError(
                f"compress_ratios has {self.num_hidden_layers + len(ratios)} entries: a DSpark drafter with "
                f"{len(ids)} stages (one per dspark_target_layer_ids entry) needs num_hidden_layers + {len(ids)} = "
                f"{self.num_hidden_layers + len(ids)}")
        for i, r in enumerate(ratios):
            if r != 0:
                raise ConfigError(f"compress_ratios[{self.num_hidden_layers + i}]={r}: DSpark stage {i} must be "
                                  "window-only (0), as in V4-Flash-0731")

    def gemm_input_widths_not_blocked(self) -> list[str]:
        """The widths of the GEMM inputs rounded by act_quant that are not multiples of 128:
        x (wq_a, wkv, experts' w1/w3, MTP e_proj/h_proj), qr (wq_b, indexer wq_b), the grouped
        output (wo_b) and the SwiGLU product (experts' w2)."""
        widths = {"hidden_size": self.hidden_size, "q_lora_rank": self.q_lora_rank,
                  "o_groups*o_lora_rank": self.o_groups * self.o_lora_rank,
                  "moe_intermediate_size": self.moe_intermediate_size}
        return [f"{name}={w}" for name, w in widths.items() if w % 128]

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> ModelArgs:
        """Build from either config.json schema; ``overrides`` win over the file."""
        cfg = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown_overrides = set(overrides or {}) - known - _SCHEMA_KEYS
        if unknown_overrides:
            raise ConfigError(f"model_config has unknown fields: {sorted(unknown_overrides)}")
        cfg.update(overrides or {})  # overrides speak the config.json schema too
        model_type = cfg.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type' field: is this a model directory?")
        if model_type in ("deepseek_v41", "deepseek_v41_text") or "text_config" in cfg:
            raise ConfigError(
                f"model_type {model_type!r}: DeepSeek V4.1 (Engram, shared KV, vision) is a different "
                "architecture and is not supported; mlx-v4 runs 'deepseek_v4'"
            )
        for key, what in _UNSUPPORTED_KEYS.items():
            if cfg.get(key):
                raise ConfigError(f"config field {key!r} ({what}) is not supported by mlx-v4")

        # Official inference/config.json names -> config.json names.
        aliases = {
            "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "rope_head_dim": "qk_rope_head_dim", "moe_inter_dim": "moe_intermediate_size",
            "n_activated_experts": "num_experts_per_tok", "route_scale": "routed_scaling_factor",
            "score_func": "scoring_func", "n_hash_layers": "num_hash_layers", "norm_eps": "rms_norm_eps",
            "window_size": "sliding_window", "n_mtp_layers": "num_nextn_predict_layers",
        }
        for old, new in aliases.items():
            if old in cfg and new not in cfg:
                cfg[new] = cfg.pop(old)

        n_layers = cfg.get("num_hidden_layers", cls.num_hidden_layers)
        ratios = _layer_ratios(cfg, n_layers)
        cfg["compress_ratios"] = ratios[:n_layers]
        extra = ratios[n_layers:]
        if any(k.startswith("dspark_") for k in cfg):  # V4-Flash-0731: one trailing ratio per DSpark stage
            cfg["dspark_compress_ratios"], cfg["mtp_compress_ratio"] = extra, None
        elif len(extra) > 1:
            raise ConfigError(
                f"compress_ratios has {len(extra)} entries past num_hidden_layers={n_layers}: a DSpark (V4-Flash-0731) "
                "checkpoint, whose config.json must also give dspark_block_size, dspark_noise_token_id, "
                "dspark_target_layer_ids and dspark_markov_rank")
        else:
            cfg["mtp_compress_ratio"] = extra[0] if extra else None
        if "mlp_layer_types" in cfg and "num_hash_layers" not in cfg:
            types = cfg["mlp_layer_types"]
            n_hash = sum(1 for t in types if t == "hash_moe")
            if types[:n_hash] != ["hash_moe"] * n_hash:
                raise ConfigError("mlp_layer_types: hash_moe layers must come first")
            cfg["num_hash_layers"] = n_hash
        _fold_rope_parameters(cfg)
        if "partial_rotary_factor" in cfg and "qk_rope_head_dim" not in cfg and cfg["partial_rotary_factor"]:
            cfg["qk_rope_head_dim"] = int(cfg.get("head_dim", cls.head_dim) * cfg["partial_rotary_factor"])
        qc = cfg.get("quantization_config") or {}
        if cfg.get("expert_dtype") is None and isinstance(qc, dict) and qc.get("expert_dtype"):
            cfg["expert_dtype"] = qc["expert_dtype"]
        if isinstance(cfg.get("eos_token_id"), list):
            cfg["eos_token_id"] = cfg["eos_token_id"][0]
        if cfg.get("num_key_value_heads", 1) != 1:
            raise ConfigError(
                f"num_key_value_heads={cfg['num_key_value_heads']}: V4 shares one 512-d KV head (K = V)"
            )
        return cls(**{k: v for k, v in cfg.items() if k in known})

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> ModelArgs:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json here; is this a model directory?") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: not a JSON object")
        try:
            return cls.from_dict(raw, overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The official schema (with the MTP or DSpark entries restored), as written by quantize/."""
        d = dataclasses.asdict(self)
        mtp = d.pop("mtp_compress_ratio")
        d.pop("fake_quant")
        d.pop("act_quant")
        if mtp is not None:
            d["compress_ratios"] = d["compress_ratios"] + [mtp]
        dspark = d.pop("dspark_compress_ratios")
        if dspark is None:  # configs without a DSpark drafter keep their dict (and model fingerprint)
            for k in [k for k in d if k.startswith("dspark_")]:
                del d[k]
        else:
            d["compress_ratios"] = d["compress_ratios"] + dspark
        return d

    # ---- rope ----------------------------------------------------------------------------
    def rope_inv_freq(self, compressed: bool) -> list[float]:
        """Per-pair inverse frequencies. Window-only layers: theta=rope_theta, no YaRN.
        Compressed layers: theta=compress_rope_theta with YaRN (attention factor 1)."""
        base = self.compress_rope_theta if compressed else self.rope_theta
        return rope_inv_freq(self.qk_rope_head_dim, base, self.rope_scaling if compressed else None)


def _layer_ratios(cfg: dict[str, Any], n_layers: int) -> list[int]:
    if "compress_ratios" in cfg:
        raw = cfg["compress_ratios"]
        if not isinstance(raw, list):
            raise ConfigError(f"compress_ratios={raw!r} must be a list of integers")
        ratios = [int(r) if isinstance(r, float) and r.is_integer() else r for r in raw]
        for i, r in enumerate(ratios):
            _check_int(f"compress_ratios[{i}]", r, minimum=0)
        if len(ratios) < n_layers:
            raise ConfigError(f"compress_ratios has {len(ratios)} entries, fewer than num_hidden_layers={n_layers}")
        return ratios
    if "layer_types" in cfg and cfg["layer_types"] is not None:
        rates = dict(cfg.get("compress_rates") or {})
        table = dict(_LAYER_TYPE_TO_RATIO)
        table.update({k: int(v) for k, v in rates.items()})
        out = []
        for t in cfg["layer_types"]:
            if t not in table:
                raise ConfigError(f"layer_types entry {t!r} is not one of {sorted(_LAYER_TYPE_TO_RATIO)}")
            out.append(table[t])
        return out
    return [0] * n_layers


def _fold_rope_parameters(cfg: dict[str, Any]) -> None:
    """transformers' rope_parameters {main: {...}, compress: {...}} -> rope_theta,
    compress_rope_theta, rope_scaling."""
    rp = cfg.get("rope_parameters")
    if not isinstance(rp, dict):
        return
    main, comp = rp.get("main"), rp.get("compress")
    if isinstance(main, dict) and "rope_theta" in main:
        cfg.setdefault("rope_theta", main["rope_theta"])
    if isinstance(comp, dict):
        if "rope_theta" in comp:
            cfg.setdefault("compress_rope_theta", comp["rope_theta"])
        if comp.get("rope_type") == "yarn" and "rope_scaling" not in cfg:
            af = comp.get("attention_factor", 1.0)
            if af not in (None, 1, 1.0):
                raise ConfigError(f"rope_parameters.compress.attention_factor={af}: V4 uses 1 (no mscale)")
            cfg["rope_scaling"] = {k: comp[k] for k in
                                   ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
                                   if k in comp} | {"type": "yarn"}
        for k in ("partial_rotary_factor",):
            if k in comp and k not in cfg:
                cfg[k] = comp[k]


def _flash() -> dict[str, Any]:
    return dict(
        model_type="deepseek_v4", vocab_size=129280, hidden_size=4096, num_hidden_layers=43,
        num_attention_heads=64, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8,
        o_lora_rank=1024, n_routed_experts=256, num_experts_per_tok=6, moe_intermediate_size=2048,
        routed_scaling_factor=1.5, num_hash_layers=3, index_topk=512,
        rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                      "beta_fast": 32, "beta_slow": 1},
        compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0], expert_dtype="fp4",
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                             "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
    )


def _pro() -> dict[str, Any]:
    d = _flash()
    d.update(hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
             o_groups=16, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
             index_topk=1024, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0])
    return d


#: The released configurations, for the memory planner and benchmarks.
PRESETS = {"flash": _flash, "pro": _pro}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"no preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelArgs.from_dict(PRESETS[name](), overrides)


def rope_inv_freq(dim: int, base: float, rope_scaling: dict | None) -> list[float]:
    """Inverse frequencies of ``dim`` RoPE dims at theta ``base``, YaRN-corrected when
    ``rope_scaling`` is a yarn entry with its original length (V4 and V4.1 compressed layers;
    attention factor 1, as the official code)."""
    freqs = [1.0 / (base ** (i / dim)) for i in range(0, dim, 2)]
    rs = rope_scaling or {}
    orig = int(rs.get("original_max_position_embeddings") or 0)
    if rs.get("type", rs.get("rope_type")) != "yarn" or orig <= 0:
        return freqs
    factor = float(rs["factor"])
    beta_fast, beta_slow = float(rs.get("beta_fast", 32)), float(rs.get("beta_slow", 1))

    def correction_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i, f in enumerate(freqs):
        smooth = 1.0 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f / factor * (1 - smooth) + f * smooth)
    return out
