"""Write the tiny official-format checkpoints and transformers' reference logits in tests/fixtures.

Run by hand, not in CI (needs the fixtures extra: pip install -e ".[fixtures]" for torch and
transformers). The outputs are committed:

* tests/fixtures/tiny/        official release layout: FP8 e4m3 + E8M0 128x128 scales, packed
                              FP4 experts, bf16/f32/i64 tensors, MTP weights, 3 shards + index;
* tests/fixtures/tiny_hf/     the same model saved by transformers (save_pretrained, bf16);
* tests/fixtures/tiny_reference.safetensors
                              token ids and logits of transformers' DeepseekV4ForCausalLM in
                              float32, fed the exact dequantized official weights.

    python scripts/make_fixtures.py
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4ForCausalLM

from mlx_v4.testing.official import random_official_weights, write_official_checkpoint, write_safetensors
from mlx_v4.testing.tiny import TINY_CONFIG

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

CONFIG = dict(TINY_CONFIG, architectures=["DeepseekV4ForCausalLM"], num_key_value_heads=1, n_shared_experts=1,
              scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0, norm_topk_prob=True,
              hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rope_theta=10000.0, compress_rope_theta=160000.0,
              rms_norm_eps=1e-6, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
              tie_word_embeddings=False)

# transformers module names -> official tensor names (the fused expert tensors are built apart)
_HF_TO_OFFICIAL = [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"lm_head\.weight", "head.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"model\.hc_head\.hc_(fn|base|scale)", r"hc_head_\1"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.(attn|ffn)_hc\.(fn|base|scale)", r"layers.\1.hc_\2_\3"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.", r"layers.\1.attn.wq_a."),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_norm\.", r"layers.\1.attn.q_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.", r"layers.\1.attn.wq_b."),
    (r"model\.layers\.(\d+)\.self_attn\.kv_proj\.", r"layers.\1.attn.wkv."),
    (r"model\.layers\.(\d+)\.self_attn\.kv_norm\.", r"layers.\1.attn.kv_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.o_a_proj\.", r"layers.\1.attn.wo_a."),
    (r"model\.layers\.(\d+)\.self_attn\.o_b_proj\.", r"layers.\1.attn.wo_b."),
    (r"model\.layers\.(\d+)\.self_attn\.sinks", r"layers.\1.attn.attn_sink"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.kv_proj\.", r"layers.\1.attn.indexer.compressor.wkv."),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.gate_proj\.", r"layers.\1.attn.indexer.compressor.wgate."),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.position_bias", r"layers.\1.attn.indexer.compressor.ape"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.kv_norm\.", r"layers.\1.attn.indexer.compressor.norm."),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.q_b_proj\.", r"layers.\1.attn.indexer.wq_b."),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", r"layers.\1.attn.indexer.weights_proj."),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.kv_proj\.", r"layers.\1.attn.compressor.wkv."),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.gate_proj\.", r"layers.\1.attn.compressor.wgate."),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.position_bias", r"layers.\1.attn.compressor.ape"),
    (r"model\.layers\.(\d+)\.self_attn\.compressor\.kv_norm\.", r"layers.\1.attn.compressor.norm."),
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", r"layers.\1.ffn.gate.bias"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.", r"layers.\1.ffn.gate."),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj\.", r"layers.\1.ffn.shared_experts.w1."),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.up_proj\.", r"layers.\1.ffn.shared_experts.w3."),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.down_proj\.", r"layers.\1.ffn.shared_experts.w2."),
]


def hf_state_dict(model: DeepseekV4ForCausalLM, exact: dict[str, np.ndarray], n_experts: int) -> dict:
    """The exact official values under transformers' names (every key of its state dict)."""
    out = {}
    for name, param in model.state_dict().items():
        if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name):
            def w(e, k, layer=m[1]):
                return exact[f"layers.{layer}.ffn.experts.{e}.{k}.weight"]

            if m[2] == "gate_up_proj":
                value = np.stack([np.concatenate([w(e, "w1"), w(e, "w3")], 0) for e in range(n_experts)])
            else:
                value = np.stack([w(e, "w2") for e in range(n_experts)])
        else:
            for pattern, template in _HF_TO_OFFICIAL:
                if re.match(pattern, name):
                    official = re.sub(pattern, template, name, count=1)
                    break
            else:
                raise KeyError(f"no official name for transformers parameter {name}")
            value = exact[official]
        t = torch.from_numpy(np.ascontiguousarray(value))
        assert tuple(t.shape) == tuple(param.shape), (name, t.shape, param.shape)
        out[name] = t.to(param.dtype) if value.dtype != np.int64 else t
    return out


def main():
    torch.manual_seed(0)
    tiny = FIXTURES / "tiny"
    shutil.rmtree(tiny, ignore_errors=True)
    raw = random_official_weights(CONFIG, seed=0, include_mtp=True)
    exact = write_official_checkpoint(tiny, CONFIG, raw, max_shard_bytes=600_000)
    print("official checkpoint:", sorted(p.name for p in tiny.iterdir()))

    hf_config = DeepseekV4Config(**{k: v for k, v in CONFIG.items() if k != "architectures"},
                                 attn_implementation="eager")
    print("transformers layer_types:", hf_config.layer_types, "mlp:", hf_config.mlp_layer_types)
    print("transformers rope:", json.dumps(hf_config.rope_parameters))
    model = DeepseekV4ForCausalLM(hf_config).eval().float()
    state = hf_state_dict(model, exact, CONFIG["n_routed_experts"])
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected

    rng = np.random.default_rng(1)
    ids_b1 = rng.integers(2, CONFIG["vocab_size"], (1, 300)).astype(np.int64)
    ids_b2 = rng.integers(2, CONFIG["vocab_size"], (2, 160)).astype(np.int64)
    with torch.no_grad():
        logits_b1 = model(torch.from_numpy(ids_b1)).logits.float().numpy()
        logits_b2 = model(torch.from_numpy(ids_b2)).logits.float().numpy()
        # transformers' own incremental path, for the record (not saved)
        out = model(torch.from_numpy(ids_b1[:, :100]), use_cache=True)
        cache, steps = out.cache if getattr(out, "cache", None) is not None else out.past_key_values, [out.logits]
        for t in range(100, 300):
            out = model(torch.from_numpy(ids_b1[:, t:t + 1]), cache=cache, use_cache=True)
            steps.append(out.logits)
        inc = torch.cat(steps, 1).float().numpy()
    print(f"transformers incremental vs full: max |diff| {np.abs(inc - logits_b1).max():.3e}")
    write_safetensors(FIXTURES / "tiny_reference.safetensors", {
        "ids_b1": ("I32", ids_b1.astype(np.int32)), "logits_b1": ("F32", logits_b1),
        "ids_b2": ("I32", ids_b2.astype(np.int32)), "logits_b2": ("F32", logits_b2),
    }, metadata={"oracle": "transformers DeepseekV4ForCausalLM float32 eager, exact dequantized weights"})

    hf_dir = FIXTURES / "tiny_hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(hf_dir)
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(FIXTURES)}: {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
