"""ModelArgs from both config.json schemas, presets, and clear errors."""

import json

import pytest

from mlx_v4.config import ConfigError, ModelArgs, preset

OFFICIAL = dict(
    model_type="deepseek_v4", hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
    num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
    vocab_size=129280, n_routed_experts=256, num_experts_per_tok=6, n_shared_experts=1,
    moe_intermediate_size=2048, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, num_hash_layers=3,
    swiglu_limit=10.0, sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, rope_theta=10000, compress_rope_theta=160000,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                  "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=1048576, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
    compress_ratios=[0, 0] + [4, 128] * 20 + [4, 0], expert_dtype="fp4", topk_method="noaux_tc",
    quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                         "weight_block_size": [128, 128], "activation_scheme": "dynamic"},
)


def transformers_schema():
    """The same Flash config as transformers' DeepseekV4Config writes it."""
    names = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    d = {k: v for k, v in OFFICIAL.items() if k not in ("compress_ratios", "num_hash_layers", "rope_scaling",
                                                         "compress_rope_theta", "qk_rope_head_dim")}
    d["layer_types"] = [names[r] for r in OFFICIAL["compress_ratios"][:43]]
    d["mlp_layer_types"] = ["hash_moe"] * 3 + ["moe"] * 40
    d["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    d["partial_rotary_factor"] = 0.125
    d["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125},
        "compress": {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0, "attention_factor": 1.0,
                     "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
                     "partial_rotary_factor": 0.125},
    }
    return d


def test_official_schema_splits_off_the_mtp_ratio():
    a = ModelArgs.from_dict(OFFICIAL)
    assert len(a.compress_ratios) == 43 and a.mtp_compress_ratio == 0
    assert [a.layer_kind(i) for i in (0, 1, 2, 3, 42)] == ["window", "window", "csa", "hca", "csa"]
    assert a.is_hash_layer(2) and not a.is_hash_layer(3)
    assert a.expert_dtype == "fp4"


def test_transformers_schema_gives_the_same_args():
    a, b = ModelArgs.from_dict(OFFICIAL), ModelArgs.from_dict(transformers_schema())
    for f in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_theta", "compress_rope_theta"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.rope_inv_freq(True) == b.rope_inv_freq(True)


def test_presets_match_the_release():
    assert preset("flash").compress_ratios == ModelArgs.from_dict(OFFICIAL).compress_ratios
    pro = preset("pro")
    assert pro.num_hidden_layers == 61 and [pro.layer_kind(i) for i in (0, 1, 2, 3)] == ["hca", "hca", "csa", "hca"]
    assert sum(pro.layer_kind(i) == "csa" for i in range(61)) == 30


def test_yarn_only_on_compressed_layers():
    a = preset("flash")
    plain, yarn = a.rope_inv_freq(False), a.rope_inv_freq(True)
    assert plain[1] == pytest.approx(10000 ** (-2 / 64))
    # pairs below the correction range keep theta=160000's frequency, pairs above are divided by 16
    base = [160000 ** (-i / 64) for i in range(0, 64, 2)]
    assert yarn[0] == pytest.approx(base[0]) and yarn[-1] == pytest.approx(base[-1] / 16)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not supported: mlx-v4 runs 'deepseek_v4'"),
    ({"model_type": "deepseek_v41"}, "DeepSeek V4.1 (Engram, shared KV, vision) is a different architecture"),
    ({"engram_layer_ids": [1, 14]}, "config field 'engram_layer_ids' (Engram n-gram memory (DeepSeek V4.1))"),
    ({"compress_ratios": [0, -4] * 22}, "compress_ratios[1]=-4 must be >= 0"),
    ({"compress_ratios": [0, "4"] * 22}, "compress_ratios[1]='4' must be an integer"),
    ({"compress_ratios": "0,4"}, "compress_ratios='0,4' must be a list of integers"),
    # issue 15, item 7: the non-RoPE KV dims are rounded to FP8 in blocks of 64
    ({"head_dim": 96}, "head_dim=96: the non-RoPE KV dims (head_dim - qk_rope_head_dim = 32) must be a "
                       "multiple of 64"),
    ({"head_dim": 160, "qk_rope_head_dim": 64}, "(head_dim - qk_rope_head_dim = 96) must be a multiple of 64"),
    ({"index_head_dim": 16}, "index_head_dim=16 must be a power of two (Hadamard rotation) and a multiple of 32"),
    ({"index_head_dim": 96}, "index_head_dim=96 must be a power of two"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok=300 exceeds n_routed_experts=256"),
    ({"num_hash_layers": 50}, "num_hash_layers=50 exceeds num_hidden_layers=43"),
    ({"hidden_size": 0}, "hidden_size=0 must be positive"),
    ({"sliding_window": "128"}, "sliding_window='128' must be an integer"),
    ({"index_topk": 512.5}, "index_topk=512.5 must be an integer"),
    ({"hc_mult": True}, "hc_mult=True must be an integer"),
    ({"rms_norm_eps": 0}, "rms_norm_eps=0 must be positive"),
    ({"rope_theta": float("nan")}, "rope_theta=nan must be a finite number"),
    ({"swiglu_limit": -1}, "swiglu_limit=-1 must be >= 0"),
    ({"eos_token_id": 200000}, "eos_token_id=200000 is outside the vocabulary (vocab_size=129280)"),
    ({"rope_scaling": {"type": "yarn", "factor": 16}}, "rope_scaling (yarn) needs 'original_max_position_embeddings'"),
    ({"rope_scaling": {"type": "yarn", "factor": "x", "original_max_position_embeddings": 4}},
     "rope_scaling.factor='x' must be a finite number"),
    ({"num_key_value_heads": 8}, "num_key_value_heads=8: V4 shares one 512-d KV head"),
    ({"compress_ratios": [0, 4]}, "compress_ratios has 2 entries, fewer than num_hidden_layers=43"),
])
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(OFFICIAL | change)
    assert message in str(e.value)


def test_generic_compression_ratios_are_accepted():
    """The official Compressor takes any ratio (only 4 overlaps and has an indexer)."""
    a = ModelArgs.from_dict(OFFICIAL | {"compress_ratios": [0, 2, 8, 16, 64, 1] + [4, 128] * 18 + [4, 32]})
    assert [a.layer_kind(i) for i in range(7)] == ["window", "hca", "hca", "hca", "hca", "hca", "csa"]
    assert a.compress_ratios[:6] == [0, 2, 8, 16, 64, 1] and a.mtp_compress_ratio == 32


def test_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path}/config.json: no config.json here"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json: not a JSON object"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL | {"head_dim": 96}))
    with pytest.raises(ConfigError, match="config.json: head_dim=96: the non-RoPE KV dims"):
        ModelArgs.from_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL | {"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="config.json: model_type 'gpt2' is not supported"):
        ModelArgs.from_file(tmp_path)


def test_overrides_win_and_unknown_overrides_are_refused():
    assert ModelArgs.from_dict(OFFICIAL, {"fake_quant": False}).fake_quant is False
    with pytest.raises(ConfigError, match=r"model_config has unknown fields: \['fake_quantt'\]"):
        ModelArgs.from_dict(OFFICIAL, {"fake_quantt": False})


def test_to_dict_round_trips():
    a = ModelArgs.from_dict(OFFICIAL)
    assert ModelArgs.from_dict(a.to_dict()) == a
