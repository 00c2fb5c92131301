"""V41Args: the DeepSeek V4.1 text configuration (``model_type: deepseek_v41``).

The release's config.json wraps the text model in ``text_config`` (``deepseek_v41_text``) beside
a ``vision_config``; ``quantization_config`` may sit at either level. The official
``inference/config.json`` spells the same fields the reference's way (``dim``, ``n_layers``,
``kv_source_layers``, ``candidate_source_layer``, ...); both are read. Only the text model is
built: image inputs are refused (see :class:`mlx_v4.v41.model.Model`).

Layer roles (architecture notes §6): only ``kv_source_layer_ids`` compress; every other
compressed layer reads the most recent source at or before it. Index sources select entries
(their own ``wq_b``/``weights_proj``) and the ones that are also kv sources own the index keys;
a later index source scores against the most recent owner's keys. The candidate source keeps
``candidate_topk_blocks`` blocks of ``candidate_block_size`` entries and the index sources after
it pick ``index_topk`` inside them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, rope_inv_freq

MODEL_TYPES = ("deepseek_v41", "deepseek_v41_text")
GEMM_BLOCK = 32  # the official fp8_block_size: weight tiles [32, 32], activations per 32

# Official inference/config.json names -> ours (the transformers-style names of text_config).
_ALIASES = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "rope_head_dim": "qk_rope_head_dim", "moe_inter_dim": "moe_intermediate_size",
    "n_activated_experts": "num_experts_per_tok", "route_scale": "routed_scaling_factor",
    "score_func": "scoring_func", "norm_eps": "rms_norm_eps", "window_size": "sliding_window",
    "n_mtp_layers": "num_nextn_predict_layers", "kv_source_layers": "kv_source_layer_ids",
    "index_source_layers": "index_source_layer_ids", "candidate_source_layer": "candidate_source_layer_id",
    "engram_pad_id": "engram_pad_token_id",
    "dspark_num_experts_per_tok": "dspark_n_activated_experts",  # the release config.json's name
}


@dataclass
class V41Args:
    model_type: str = "deepseek_v41"
    vocab_size: int = 129280
    hidden_size: int = 5120
    num_hidden_layers: int = 40
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1280
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 384
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2304
    scoring_func: str = "sqrtsoftplus"
    gate_temp: float = 1.0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    sliding_window: int = 128
    compress_ratios: list[int] = field(default_factory=list)  # main layers only; MTP entries split off
    compress_rope_theta: float = 160000.0
    kv_source_layer_ids: list[int] = field(default_factory=list)
    index_source_layer_ids: list[int] = field(default_factory=list)
    candidate_source_layer_id: int = -1
    candidate_topk_blocks: int = 0
    candidate_block_size: int = 0
    index_n_heads: int = 32
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 1048576
    rms_norm_eps: float = 1e-20
    engram_layer_ids: list[int] = field(default_factory=list)
    engram_num_embeddings: list[int] = field(default_factory=list)
    engram_max_ngram_size: int = 4
    engram_vocab_size: int = 16000000
    engram_n_heads: int = 8
    engram_head_dim: int = 256
    engram_pad_token_id: int = 2
    engram_compressed_vocab_size: int = 0
    num_nextn_predict_layers: int = 0
    mtp_compress_ratios: list[int] = field(default_factory=list)
    image_token_id: int = 129264
    # The DSpark drafter (mlx_v4/v41/dspark.py; official ModelArgs.dspark_*): block length, the
    # noise token filling the block, the target layers whose input streams it reads, the Markov
    # head's rank, and its stages' own expert counts (0: the backbone's; get_moe_config).
    dspark_block_size: int = 0
    dspark_noise_token_id: int | None = None
    dspark_target_layer_ids: list[int] = field(default_factory=list)
    dspark_markov_rank: int = 256
    dspark_n_routed_experts: int = 0
    dspark_n_activated_experts: int = 0
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    quantization_config: dict[str, Any] | None = None
    # The QAT activation roundings of the official code (window FP8, compressed/index FP4).
    fake_quant: bool = True
    # The FP8 rounding of every FP8/FP4 GEMM input, in blocks of 32 (the official linear():
    # act_quant(x, 32, "ue8m0")). None = on with fake_quant wherever every width is whole blocks.
    act_quant: bool | None = None

    # ---- roles ---------------------------------------------------------------------------
    def latest(self, ids: list[int], layer: int) -> int | None:
        before = [i for i in ids if i <= layer]
        return max(before) if before else None

    def kv_source(self, layer: int) -> int | None:
        """The layer whose compressed cache ``layer`` reads (None for window-only layers)."""
        return self.latest(self.kv_source_layer_ids, layer) if self.compress_ratios[layer] else None

    def index_source(self, layer: int) -> int | None:
        """The layer whose selection ``layer`` uses."""
        return self.latest(self.index_source_layer_ids, layer) if self.compress_ratios[layer] else None

    def key_owner(self, layer: int) -> int | None:
        """The kv source whose index keys the index source ``layer`` scores against."""
        return self.latest(self.kv_source_layer_ids, layer)

    def uses_candidates(self, layer: int) -> bool:
        return 0 <= self.candidate_source_layer_id < layer and layer in self.index_source_layer_ids

    @property
    def has_dspark(self) -> bool:
        """Whether the config declares a DSpark drafter (``dspark_block_size`` or its targets)."""
        return self.dspark_block_size > 0 or bool(self.dspark_target_layer_ids)

    @property
    def dspark_stages(self) -> int:
        """The drafter's layers, appended after the backbone (official ``n_mtp_layers``)."""
        return self.num_nextn_predict_layers

    def _validate_dspark(self) -> None:
        n = self.num_hidden_layers
        if self.dspark_block_size < 2:
            raise ConfigError(f"dspark_block_size={self.dspark_block_size}: a DSpark block is the anchor and at "
                              "least one noise token (the release uses 5)")
        noise = self.dspark_noise_token_id
        if noise is None:
            raise ConfigError("dspark_noise_token_id is missing: a DSpark drafter fills its block with that token")
        if not 0 <= noise < self.vocab_size:
            raise ConfigError(f"dspark_noise_token_id={noise} is outside the vocabulary (vocab_size={self.vocab_size})")
        ids = self.dspark_target_layer_ids
        if not ids or any(not 0 <= t < n for t in ids) or list(ids) != sorted(set(ids)):
            raise ConfigError(f"dspark_target_layer_ids={ids}: must be increasing layer ids below "
                              f"num_hidden_layers={n}")
        if self.dspark_markov_rank < 1:
            raise ConfigError(f"dspark_markov_rank={self.dspark_markov_rank} must be positive")
        E = self.dspark_n_routed_experts or self.n_routed_experts
        k = self.dspark_n_activated_experts or self.num_experts_per_tok
        if self.dspark_n_routed_experts < 0 or not 1 <= k <= E:
            raise ConfigError(f"dspark_n_activated_experts={k} must be between 1 and dspark_n_routed_experts={E}")
        stages = self.dspark_stages
        if stages < 1:
            raise ConfigError("n_mtp_layers (num_nextn_predict_layers) is 0: a DSpark drafter needs its layers")
        if len(self.mtp_compress_ratios) != stages or any(self.mtp_compress_ratios):
            raise ConfigError(f"compress_ratios gives {self.mtp_compress_ratios} after the {n} backbone layers: the "
                              f"{stages} DSpark layers (n_mtp_layers) are window-only, one 0 each")

    def __post_init__(self):
        self.validate()
        if self.has_dspark:
            self._validate_dspark()
        ragged = self.gemm_input_widths_not_blocked()
        if self.act_quant is None:
            self.act_quant = self.fake_quant and not ragged
        elif self.act_quant and ragged:
            raise ConfigError(f"act_quant rounds GEMM inputs in blocks of {GEMM_BLOCK}, as the official V4.1 act_quant "
                              f"does (it requires whole blocks); not a multiple of {GEMM_BLOCK}: {', '.join(ragged)}")

    @property
    def act_block(self) -> int:
        """What the layers pass to :func:`mlx_v4.layers.fake_quant.gemm_input`: 32, or 0 (off)."""
        return GEMM_BLOCK if self.act_quant else 0

    def gemm_input_widths_not_blocked(self) -> list[str]:
        """The widths of the GEMM inputs rounded by act_quant that are not multiples of 32: x
        (wq_a, wkv, experts' w1/w3), qr (wq_b, indexer wq_b), the grouped output (wo_b), the
        SwiGLU product (experts' w2) and the Engram rows (engram.wkv)."""
        widths = {"hidden_size": self.hidden_size, "q_lora_rank": self.q_lora_rank,
                  "o_groups*o_lora_rank": self.o_groups * self.o_lora_rank,
                  "moe_intermediate_size": self.moe_intermediate_size}
        if self.engram_layer_ids:
            widths["engram_head_dim"] = self.engram_head_dim
        return [f"{name}={w}" for name, w in widths.items() if w % GEMM_BLOCK]

    def validate(self) -> None:
        n = self.num_hidden_layers
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type {self.model_type!r} is not DeepSeek V4.1 ({', '.join(MODEL_TYPES)})")
        if len(self.compress_ratios) != n:
            raise ConfigError(f"compress_ratios has {len(self.compress_ratios)} entries for num_hidden_layers={n}")
        bad = sorted({r for r in self.compress_ratios if r not in (0, 1, 2)})
        if bad:
            raise ConfigError(f"compress_ratios contains {bad}: DeepSeek V4.1 uses 0, 1 and 2")
        for name in ("kv_source_layer_ids", "index_source_layer_ids", "engram_layer_ids"):
            ids = getattr(self, name)
            if len(set(ids)) != len(ids) or any(not 0 <= i < n for i in ids):
                raise ConfigError(f"{name} {ids}: must be distinct layer ids below num_hidden_layers={n}")
        for s in self.kv_source_layer_ids:
            if not self.compress_ratios[s]:
                raise ConfigError(f"kv source layer {s} has compress_ratio 0: it would have nothing to compress")
            if s not in self.index_source_layer_ids:
                raise ConfigError(f"kv source layer {s} is not in index_source_layer_ids")
        for layer, r in enumerate(self.compress_ratios):
            if not r:
                continue
            src = self.kv_source(layer)
            if src is None or self.index_source(layer) is None:
                raise ConfigError(f"layer {layer} (compress_ratio {r}) has no kv source at or before it")
            if self.compress_ratios[src] != r:
                raise ConfigError(f"layer {layer} has compress_ratio {r} but reads layer {src}'s cache "
                                  f"(compress_ratio {self.compress_ratios[src]})")
            isrc = self.index_source(layer)
            if self.compress_ratios[isrc] != r or self.kv_source(isrc) != src:
                raise ConfigError(f"layer {layer} reuses layer {isrc}'s selection over a different cache")
        c = self.candidate_source_layer_id
        if c >= 0:
            if c not in self.index_source_layer_ids:
                raise ConfigError(f"candidate_source_layer_id {c} is not an index source")
            if self.candidate_topk_blocks < 1 or self.candidate_block_size < 1:
                raise ConfigError("candidate_topk_blocks and candidate_block_size must be positive")
            for layer in self.index_source_layer_ids:
                if layer > c and self.kv_source(layer) != self.kv_source(c):
                    raise ConfigError(f"index source {layer} picks inside the candidate blocks of layer {c}, "
                                      "which scores a different cache")
        if len(self.engram_num_embeddings) != len(self.engram_layer_ids):
            raise ConfigError(f"engram_num_embeddings has {len(self.engram_num_embeddings)} entries for "
                              f"{len(self.engram_layer_ids)} engram_layer_ids")
        if self.engram_layer_ids:
            if self.engram_head_dim % 32 or self.engram_max_ngram_size < 2:
                raise ConfigError("engram_head_dim must be a multiple of 32 and engram_max_ngram_size at least 2")
            if self.engram_compressed_vocab_size <= 0:
                raise ConfigError("engram_compressed_vocab_size is missing: the Engram hashes depend on it")
        if self.head_dim % 32 or self.index_head_dim % 32:
            raise ConfigError(f"head_dim={self.head_dim} and index_head_dim={self.index_head_dim} must be "
                              "multiples of 32 (the FP8/FP4 activation blocks)")
        if self.head_dim <= self.qk_rope_head_dim or self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and below head_dim")
        if self.n_shared_experts != 1:
            raise ConfigError(f"n_shared_experts={self.n_shared_experts}: V4.1 has exactly one shared expert")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not one of sqrtsoftplus, sigmoid, softmax")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"o_groups={self.o_groups} does not divide the heads")

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> V41Args:
        cfg = dict(raw)
        text = cfg.get("text_config")
        if isinstance(text, dict):
            outer_q = cfg.get("quantization_config")
            cfg = {**{k: v for k, v in cfg.items() if k in ("bos_token_id", "eos_token_id", "image_token_id")},
                   **text}
            if outer_q is not None and "quantization_config" not in cfg:
                cfg["quantization_config"] = outer_q
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides or {}) - known - set(_ALIASES)
        if unknown:
            raise ConfigError(f"model_config has unknown fields: {sorted(unknown)}")
        cfg.update(overrides or {})
        for old, new in _ALIASES.items():
            if old in cfg and new not in cfg:
                cfg[new] = cfg.pop(old)
        cfg.setdefault("model_type", "deepseek_v41")
        if cfg["model_type"] not in MODEL_TYPES:
            raise ConfigError(f"model_type {cfg['model_type']!r} is not DeepSeek V4.1")
        n = int(cfg.get("num_hidden_layers", cls.num_hidden_layers))
        ratios = [int(r) for r in cfg.get("compress_ratios", [])]
        if len(ratios) < n:
            raise ConfigError(f"compress_ratios has {len(ratios)} entries, fewer than num_hidden_layers={n}")
        cfg["compress_ratios"], cfg["mtp_compress_ratios"] = ratios[:n], ratios[n:]
        for k in ("kv_source_layer_ids", "index_source_layer_ids", "engram_layer_ids", "engram_num_embeddings",
                  "dspark_target_layer_ids"):
            if k in cfg:
                cfg[k] = [int(i) for i in cfg[k]]
        rs = cfg.get("rope_scaling")
        if rs is None and "original_seq_len" in cfg:  # the official inference/config.json
            if cfg["original_seq_len"]:
                cfg["rope_scaling"] = {"type": "yarn", "factor": cfg.get("rope_factor", 1),
                                       "original_max_position_embeddings": cfg["original_seq_len"],
                                       "beta_fast": cfg.get("beta_fast", 32), "beta_slow": cfg.get("beta_slow", 1)}
        if isinstance(cfg.get("eos_token_id"), list):
            cfg["eos_token_id"] = cfg["eos_token_id"][0]
        if cfg.get("num_key_value_heads", 1) != 1:
            raise ConfigError(f"num_key_value_heads={cfg['num_key_value_heads']}: V4.1 shares one KV head")
        try:
            return cls(**{k: v for k, v in cfg.items() if k in known})
        except TypeError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> V41Args:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            return cls.from_dict(json.loads(path.read_text()), overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = d["compress_ratios"] + d.pop("mtp_compress_ratios")
        d.pop("fake_quant")
        d.pop("act_quant")
        if not self.has_dspark:  # configs without a drafter keep their dict (and model fingerprint)
            for k in [k for k in d if k.startswith("dspark_")]:
                d.pop(k)
        return d

    # ---- rope ----------------------------------------------------------------------------
    def rope_inv_freq(self, compressed: bool) -> list[float]:
        """Window-only layers: theta ``rope_theta``, no YaRN. Compressed layers (their queries,
        window, compressed entries and indexer alike): ``compress_rope_theta`` with YaRN."""
        base = self.compress_rope_theta if compressed else self.rope_theta
        return rope_inv_freq(self.qk_rope_head_dim, base, self.rope_scaling if compressed else None)


def _flash() -> dict[str, Any]:
    """The released DeepSeek-V4.1-Flash text_config."""
    return dict(
        model_type="deepseek_v41_text", compress_ratios=[0, 0] + [2] * 18 + [1] * 20 + [0, 0, 0],
        kv_source_layer_ids=[2, 8, 14, 20], index_source_layer_ids=[2, 8, 14, 20, 24, 28, 32, 36],
        candidate_source_layer_id=20, candidate_topk_blocks=2048, candidate_block_size=8,
        rope_scaling={"rope_type": "yarn", "factor": 16, "beta_fast": 32, "beta_slow": 1,
                      "original_max_position_embeddings": 65536},
        engram_layer_ids=[1, 14], engram_num_embeddings=[384006168, 384016682], engram_compressed_vocab_size=99092,
        num_nextn_predict_layers=3,  # the DSpark drafter's layers, with its fields as the release states them
        dspark_block_size=5, dspark_noise_token_id=128799, dspark_target_layer_ids=[37, 38, 39], dspark_markov_rank=256,
        dspark_n_routed_experts=128, dspark_num_experts_per_tok=3,
        quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32],
                             "scale_fmt": "ue8m0", "expert_dtype": "fp4"},
    )


PRESETS = {"v41-flash": _flash}


def preset(name: str, **overrides) -> V41Args:
    if name not in PRESETS:
        raise ConfigError(f"no preset {name!r}; choose one of {sorted(PRESETS)}")
    return V41Args.from_dict(PRESETS[name](), overrides)


def is_v41_checkpoint(model_dir: str | Path) -> bool:
    """Whether ``model_dir/config.json`` declares DeepSeek V4.1 (at the top or in text_config)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    return cfg.get("model_type") in MODEL_TYPES or text.get("model_type") in MODEL_TYPES
