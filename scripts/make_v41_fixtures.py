"""Write the tiny official-format DeepSeek V4.1 checkpoint and the official reference's logits.

Run by hand, not in CI (needs torch and sympy: pip install -e ".[fixtures]"; the outputs are
committed, so the tests need neither):

    python scripts/make_v41_fixtures.py --reference PATH/TO/DeepSeek-V4.1-Flash/inference

``--reference`` is the ``inference/`` folder of the Hugging Face repo deepseek-ai/DeepSeek-V4.1-Flash
(its ``model.py`` and ``engram.py`` are imported from there, unmodified; nothing of them is
copied into this repository). Outputs, under tests/fixtures/tiny_v41/:

* ``model/``                 the release layout: config.json (``deepseek_v41`` with a
                             ``deepseek_v41_text`` text_config), FP8 e4m3 weights with E8M0
                             32x32 tile scales, packed FP4 experts, F8 Engram tables (each in a
                             shard of its own), BF16/F32 tensors, index;
* ``reference.safetensors``  token ids and the reference's float32 logits: one full forward
                             (``logits_full_<run>``) and prefill + one token at a time
                             (``logits_decode_<run>``) for the runs ``exact`` (no activation
                             rounding), ``qat`` (the KV/index roundings only) and ``gemm`` (as
                             released: those plus the FP8 rounding of every GEMM input), the
                             decode logits of the *unpatched* reference
                             (``logits_decode_unpatched``, see below), and the roundings on
                             random rows (``quant_*``).

Where the reference is changed, and why (search for "REPLACED" below):

1. ``kernel`` (tilelang/CUDA: act_quant, fp4_act_quant, fp8_gemm, fp4_gemm, hc_split_sinkhorn,
   sparse_attn) is replaced by the plain-torch module :func:`torch_kernels` below, installed as
   ``sys.modules["kernel"]`` before model.py is imported.
2. ``vision`` and ``image_processor`` are replaced by stubs: the fixtures are text only.
3. The model runs in float32. The ``exact`` and ``qat`` runs build it with ``dtype="bf16"``, so
   ``linear()`` takes its plain ``F.linear`` branch over the checkpoint's exact dequantized
   weights (no activation rounding: the port's ``act_quant: False``). The ``gemm`` run builds it
   as released, ``dtype="fp8"`` with ``expert_dtype="fp4"``, and loads the checkpoint's own FP8
   codes with their [32, 32] E8M0 tile scales and the packed FP4 experts, so ``linear()`` rounds
   every FP8/FP4 GEMM input with ``act_quant(x, 32, "ue8m0")`` and runs the plain-torch
   ``fp8_gemm``/``fp4_gemm`` (the port's default). Every other parameter is cast to float32 (the
   ``default_dtype`` of the GEMM outputs is float32 too). The Engram tables stay F8 as stored.
4. ``ParallelEngramEmbedding.forward`` returns its (bf16-exact) rows as float32 so that the
   float32 ``engram.wkv`` can take them; the values are the same.
5. ``ParallelHead`` is asked for every position's logits (it returns the last one by default).
6. The reference's indexer decode bug is patched: ``Indexer.forward`` publishes an index-key
   owner's cache to ``shared_attn.index_k`` only on steps where its compressor completes a group,
   so on the other decode steps a ratio-2 owner scores its queries against the *previous* owner's
   keys (in the release, layer 20's ratio-1 keys), and its own full forward and token-by-token
   runs disagree. The intended behaviour -- each owner scores against its own keys -- is what
   the patch does (a pre-forward hook republishes the owner's cache). The unpatched decode
   logits are saved too, so the size of the artifact is on record.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlx_v4.testing.official import quantize_fp4_e2m1, quantize_fp8_block, write_safetensors
from mlx_v4.testing.official_v41 import (
    FP8_BLOCK,
    QUANTIZATION_CONFIG,
    engram_layout,
    random_official_v41_weights,
    write_official_v41_checkpoint,
)
from mlx_v4.tokenizer import bundled_tokenizer_path
from mlx_v4.v41.engram_hash import compressed_token_map

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_v41"

# Every V4.1 layer kind: window-only (0, 1), a ratio-2 kv+index source (2) and its consumers
# (3, 4), a ratio-1 kv+index source that is also the candidate source (5), a ratio-1 consumer (6)
# and a later index source scoring inside the candidate blocks (7). Engram at a window layer and
# at a kv source, as the release does (1 and 14). (candidate_topk_blocks - 1) * block_size + 1 >=
# index_topk, as in the release, so that the second level never runs short of candidates.
TEXT = dict(
    model_type="deepseek_v41_text", vocab_size=512, hidden_size=64, moe_intermediate_size=32,
    num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=1, head_dim=64, qk_rope_head_dim=16,
    q_lora_rank=32, o_lora_rank=16, o_groups=2, hidden_act="silu", swiglu_limit=1.0, rms_norm_eps=1e-20,
    max_position_embeddings=256, rope_theta=10000,
    rope_scaling={"rope_type": "yarn", "factor": 4, "beta_fast": 32, "beta_slow": 1,
                  "original_max_position_embeddings": 32},
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, scoring_func="sqrtsoftplus",
    topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=1.5, gate_temp=1.25, sliding_window=16,
    compress_ratios=[0, 0, 2, 2, 2, 1, 1, 1, 0], compress_rope_theta=160000,
    kv_source_layer_ids=[2, 5], index_source_layer_ids=[2, 5, 7], index_n_heads=8, index_head_dim=32,
    index_topk=8, candidate_source_layer_id=5, candidate_topk_blocks=6, candidate_block_size=2,
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    engram_layer_ids=[1, 5], engram_max_ngram_size=3, engram_vocab_size=50, engram_n_heads=2,
    engram_head_dim=32, engram_pad_token_id=2, num_nextn_predict_layers=1,
)
LENGTH, PREFILL = 70, 21  # window 16 wraps several times; the prefill ends inside a ratio-2 group


def v41_config(text: dict) -> dict:
    return {"architectures": ["DeepseekV41ForCausalLM"], "model_type": "deepseek_v41", "bos_token_id": 0,
            "eos_token_id": 1, "image_token_id": 129264, "text_config": text,
            "vision_config": {"model_type": "deepseek_v41_vision", "num_hidden_layers": 0},
            "quantization_config": QUANTIZATION_CONFIG}


# ---- REPLACED 1: the GPU kernels, in plain torch -----------------------------------------------
def _pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2**ceil(log2(x)) for positive float32 x, exactly (from the bit pattern, as the kernels do)."""
    bits = x.float().contiguous().view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).int()
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e)


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """|v| <= 6 onto {0, .5, 1, 1.5, 2, 3, 4, 6}, nearest, ties to the even code."""
    a = v.abs()
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    code = torch.zeros_like(a, dtype=torch.long)
    for bound, inclusive in ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
                             (3.5, True), (5.0, False)):
        code += (a >= bound if inclusive else a > bound).long()
    return torch.copysign(grid[code], v)


def torch_kernels() -> types.ModuleType:
    """The kernels as plain torch. ``kernel.QAT["on"] = False`` turns the in-place activation
    roundings (the QAT simulation: window FP8, compressed and index FP4) into the identity."""
    k = types.ModuleType("kernel")
    k.QAT = {"on": True}

    def act_quant(x, block_size=128, scale_fmt=None, scale_dtype=torch.float32, inplace=False):
        if inplace and not k.QAT["on"]:
            return x
        g = x.float().unflatten(-1, (-1, block_size))
        amax = g.abs().amax(-1).clamp_min(1e-4)
        s = _pow2_ceil(amax * (1.0 / 448.0)) if scale_fmt is not None else amax * (1.0 / 448.0)
        q = (g / s.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        if inplace:
            x.copy_((q.float() * s.unsqueeze(-1)).flatten(-2).to(x.dtype))
            return x
        return q.flatten(-2), s.to(scale_dtype)

    def fp4_act_quant(x, block_size=32, inplace=False, scale_dtype=torch.float8_e8m0fnu):
        if inplace and not k.QAT["on"]:
            return x
        g = x.float().unflatten(-1, (-1, block_size))
        amax = g.abs().amax(-1)
        if scale_dtype == torch.float8_e4m3fn:
            s = (amax.clamp_min(6 * 2.0**-9) / 6.0).to(torch.float8_e4m3fn).float()
        else:
            s = _pow2_ceil(amax.clamp_min(6 * 2.0**-126) * (1.0 / 6.0))
        q = _round_e2m1((g / s.unsqueeze(-1)).clamp(-6.0, 6.0))
        if inplace:
            x.copy_((q * s.unsqueeze(-1)).flatten(-2).to(x.dtype))
            return x
        return q.flatten(-2), s.to(scale_dtype)

    def _dequant_tiles(w, s, block):
        s = s.float().repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
        return w.float() * s

    def _dequant_act(a, a_s, block):
        return (a.float().unflatten(-1, (-1, block)) * a_s.float().unsqueeze(-1)).flatten(-2)

    def fp8_gemm(a, a_s, b, b_s, scale_dtype=torch.float32, block_size=128):
        return (_dequant_act(a, a_s, block_size) @ _dequant_tiles(b, b_s, block_size).T).to(torch.get_default_dtype())

    def fp4_gemm(a, a_s, b, b_s, scale_dtype=torch.float32, act_block_size=128):
        codes = b.view(torch.uint8)
        nib = torch.stack([codes & 15, codes >> 4], -1).flatten(-2).long()
        grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
        w = torch.where(nib >= 8, -grid[nib & 7], grid[nib & 7])
        w = (w.unflatten(-1, (-1, 32)) * b_s.float().unsqueeze(-1)).flatten(-2)
        return (_dequant_act(a, a_s, act_block_size) @ w.T).to(torch.get_default_dtype())

    def hc_split_sinkhorn(mixes, hc_scale, hc_base, hc_mult=4, sinkhorn_iters=20, eps=1e-6):
        m = mixes.float()
        pre = torch.sigmoid(m[..., :hc_mult] * hc_scale[0] + hc_base[:hc_mult]) + eps
        post = 2 * torch.sigmoid(m[..., hc_mult:2 * hc_mult] * hc_scale[1] + hc_base[hc_mult:2 * hc_mult])
        comb = (m[..., 2 * hc_mult:] * hc_scale[2] + hc_base[2 * hc_mult:]).unflatten(-1, (hc_mult, hc_mult))
        comb = comb.softmax(-1) + eps
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
        for _ in range(sinkhorn_iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + eps)
            comb = comb / (comb.sum(-2, keepdim=True) + eps)
        return pre, post, comb

    def sparse_attn(q, kv, attn_sink, topk_idxs, softmax_scale):
        """q [b, m, h, d], kv [b, n, d], topk_idxs [b, m, k] (-1 = none) -> [b, m, h, d]; the sink
        only adds exp(sink) to each head's softmax denominator."""
        b = torch.arange(kv.size(0)).view(-1, 1, 1)
        rows = kv.float()[b, topk_idxs.long().clamp_min(0)]  # [b, m, k, d]
        scores = torch.einsum("bmhd,bmkd->bmhk", q.float(), rows) * softmax_scale
        scores = scores.masked_fill((topk_idxs < 0).unsqueeze(2), -torch.inf)
        sink = attn_sink.float().view(1, 1, -1, 1)
        peak = torch.maximum(scores.amax(-1, keepdim=True), sink)
        p = torch.exp(scores - peak)
        p = p / (p.sum(-1, keepdim=True) + torch.exp(sink - peak))
        return torch.einsum("bmhk,bmkd->bmhd", p, rows).to(q.dtype)

    for f in (act_quant, fp4_act_quant, fp8_gemm, fp4_gemm, hc_split_sinkhorn, sparse_attn):
        setattr(k, f.__name__, f)
    return k


def import_reference(reference: Path):
    """model.py from the official inference/ folder, with the replacements 1 and 2 installed."""
    if not (reference / "model.py").is_file() or not (reference / "engram.py").is_file():
        raise SystemExit(f"{reference}: no model.py and engram.py (pass the inference/ folder of "
                         "deepseek-ai/DeepSeek-V4.1-Flash)")
    sys.modules["kernel"] = torch_kernels()
    # REPLACED 2: text only.
    image_processor = types.ModuleType("image_processor")
    image_processor.IMAGE, image_processor.IMAGE_END, image_processor.IMAGE_NEW_LINE, image_processor.IMAGE_START = 0, 1, 2, 3
    vision = types.ModuleType("vision")
    vision.ViT = vision.Aligner = None
    sys.modules["image_processor"], sys.modules["vision"] = image_processor, vision
    sys.path.insert(0, str(reference))
    return importlib.import_module("model")


class _TokenizerShim:
    """What the reference's build_compressed_token_map reads of a transformers tokenizer."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_file(str(path))

    def __len__(self):
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)


def reference_args(ref, text: dict, max_seq_len: int, batch: int, gemm: bool = False):
    """``gemm``: as released (FP8 weights, FP4 experts: ``linear()`` rounds its inputs)."""
    rs = text["rope_scaling"]
    kw = dict(
        max_batch_size=batch, max_seq_len=max_seq_len, dtype="fp8" if gemm else "bf16",
        expert_dtype="fp4" if gemm else None,
        vocab_size=text["vocab_size"], dim=text["hidden_size"], moe_inter_dim=text["moe_intermediate_size"],
        n_layers=text["num_hidden_layers"], n_mtp_layers=0, n_heads=text["num_attention_heads"],
        n_routed_experts=text["n_routed_experts"], n_shared_experts=1,
        n_activated_experts=text["num_experts_per_tok"], score_func=text["scoring_func"],
        gate_temp=text["gate_temp"], norm_topk_prob=text["norm_topk_prob"],
        route_scale=text["routed_scaling_factor"], swiglu_limit=text["swiglu_limit"],
        q_lora_rank=text["q_lora_rank"], head_dim=text["head_dim"], rope_head_dim=text["qk_rope_head_dim"],
        norm_eps=text["rms_norm_eps"], o_groups=text["o_groups"], o_lora_rank=text["o_lora_rank"],
        window_size=text["sliding_window"], compress_ratios=tuple(text["compress_ratios"]),
        kv_source_layers=tuple(text["kv_source_layer_ids"]), index_source_layers=tuple(text["index_source_layer_ids"]),
        compress_rope_theta=text["compress_rope_theta"], original_seq_len=rs["original_max_position_embeddings"],
        rope_theta=text["rope_theta"], rope_factor=rs["factor"], beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"],
        index_n_heads=text["index_n_heads"], index_head_dim=text["index_head_dim"], index_topk=text["index_topk"],
        candidate_source_layer=text["candidate_source_layer_id"], candidate_topk_blocks=text["candidate_topk_blocks"],
        candidate_block_size=text["candidate_block_size"], hc_mult=text["hc_mult"],
        hc_sinkhorn_iters=text["hc_sinkhorn_iters"], hc_eps=text["hc_eps"],
        engram_layer_ids=tuple(text["engram_layer_ids"]), engram_num_embeddings=tuple(text["engram_num_embeddings"]),
        engram_max_ngram_size=text["engram_max_ngram_size"], engram_vocab_size=text["engram_vocab_size"],
        engram_n_heads=text["engram_n_heads"], engram_head_dim=text["engram_head_dim"],
        engram_pad_id=text["engram_pad_token_id"], engram_compressed_vocab_size=text["engram_compressed_vocab_size"],
    )
    fields = {f.name for f in dataclasses.fields(ref.ModelArgs)}
    missing = set(kw) - fields
    if missing:
        raise SystemExit(f"the reference's ModelArgs has no fields {sorted(missing)}: another revision?")
    return ref.ModelArgs(**kw)


def stored_quantized(raw: dict[str, np.ndarray], name: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    """The bytes the checkpoint stores for an FP8 (e4m3, [32, 32] tiles) or FP4 weight: the very
    quantizers write_official_v41_checkpoint wrote them with -> (codes, E8M0 scale bytes)."""
    if dtype == torch.float4_e2m1fn_x2:
        return quantize_fp4_e2m1(raw[name])
    return quantize_fp8_block(raw[name], FP8_BLOCK)


def build_reference(ref, args, exact: dict[str, np.ndarray], tokenizer, fix_decode_bug: bool,
                    raw: dict[str, np.ndarray] | None = None):
    torch.set_default_dtype(torch.float32)
    model = ref.Transformer(args, tokenizer).eval()
    # REPLACED 3: float32 parameters holding the exact dequantized checkpoint values, or (the
    # FP8/FP4 GEMM path) the stored codes and scales of the quantized weights.
    state = model.state_dict()
    for name, t in state.items():
        stem = name.removesuffix(".weight").removesuffix(".scale")
        weight = state.get(stem + ".weight")
        quantized = weight is not None and weight.dtype in (torch.float8_e4m3fn, torch.float4_e2m1fn_x2)
        if name.endswith("engram.embed.weight"):
            value = torch.from_numpy(exact[name + ":codes"]).view(torch.float8_e4m3fn)
        elif name.endswith("engram.embed.scale"):
            value = torch.from_numpy(exact[name.removesuffix(".scale") + ".weight:scale"]).view(torch.float8_e8m0fnu)
        elif quantized:
            codes, scale = stored_quantized(raw, stem + ".weight", weight.dtype)
            value = torch.from_numpy(np.ascontiguousarray(scale)).view(torch.float8_e8m0fnu) if name.endswith(
                ".scale") else torch.from_numpy(np.ascontiguousarray(codes).view(np.uint8)).view(weight.dtype)
        else:
            value = torch.from_numpy(np.ascontiguousarray(exact[name])).float()
        assert tuple(value.shape) == tuple(t.shape), (name, value.shape, t.shape)
        state[name] = value
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.dtype == torch.bfloat16:
                setattr(module, pname, torch.nn.Parameter(p.data.float(), requires_grad=False))
    missing, unexpected = model.load_state_dict(state, strict=True, assign=True)
    assert not missing and not unexpected
    for module in model.modules():  # Linear keeps a second handle on its weight
        if isinstance(module, ref.Linear):
            module.weight.scale = module.scale

    # REPLACED 4: Engram rows handed on as float32.
    def engram_rows(self, indices):
        w = F.embedding(indices, self.weight.view(torch.uint8)).view(torch.float8_e4m3fn).float()
        s = F.embedding(indices, self.scale.view(torch.uint8)).view(torch.float8_e8m0fnu).float()
        return (w.unflatten(-1, (-1, self.block_size)) * s.unsqueeze(-1)).flatten(-2)

    for layer in model.layers:
        if layer.engram is not None:
            layer.engram.embed.forward = types.MethodType(engram_rows, layer.engram.embed)
    # REPLACED 5: every position's logits.
    head_forward = model.head.forward
    model.head.forward = lambda x, full_logits=True: head_forward(x, full_logits=True)
    # REPLACED 6: the indexer decode bug (see the module docstring).
    if fix_decode_bug:
        for layer in model.layers:
            indexer = layer.attn.indexer
            if indexer is not None and indexer.owns_k:
                def publish_own_keys(module, inputs):
                    ref.shared_attn.index_k = module.k_cache

                indexer.register_forward_pre_hook(publish_own_keys)
    return model


def run(model, ids: torch.Tensor, chunks: list[int]) -> np.ndarray:
    """Logits of every position: the first chunk as a prefill at position 0, then one token each."""
    outs, pos = [], 0
    for n in chunks:
        _, logits, _ = model(ids[:, pos:pos + n], pos)
        outs.append(logits.float())
        pos += n
    return torch.cat(outs, 1).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", type=Path, required=True, help="the inference/ folder of DeepSeek-V4.1-Flash")
    a = ap.parse_args()
    ref = import_reference(a.reference.resolve())

    tokenizer_file = bundled_tokenizer_path()
    _, compressed_vocab = compressed_token_map(str(tokenizer_file))
    text = dict(TEXT, engram_compressed_vocab_size=compressed_vocab)
    text["engram_num_embeddings"] = engram_layout(text).table_rows()
    model_dir = FIXTURES / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    raw = random_official_v41_weights(text, seed=0)
    exact = write_official_v41_checkpoint(model_dir, v41_config(text), raw, max_shard_bytes=400_000)

    rng = np.random.default_rng(1)
    ids = torch.from_numpy(rng.integers(2, text["vocab_size"], (2, LENGTH)).astype(np.int64))
    # repeated n-grams, so that Engram rows are shared between positions
    ids[:, 40:46] = ids[:, 10:16]
    tok = _TokenizerShim(tokenizer_file)
    kernel = sys.modules["kernel"]
    decode_chunks = [PREFILL] + [1] * (LENGTH - PREFILL)
    out = {"ids": ("I32", ids.numpy().astype(np.int32)), "decode_chunks": ("I32", np.array(decode_chunks, np.int32))}
    # "exact": QAT simulation off on both sides, so parity is a matter of operation order only.
    # "qat": the KV and index roundings on, the GEMM inputs unrounded (the port's act_quant off).
    # "gemm": as released, the FP8/FP4 GEMM path rounding every GEMM input too.
    # FP8/FP4 rounding is discontinuous: operation-order noise that lands on a rounding midpoint
    # flips a code, and FP4 index scores tie; the reference's own full forward and decode then
    # differ (printed below), so the QAT logits are compared more loosely.
    for tag, qat, gemm in (("exact", False, False), ("qat", True, False), ("gemm", True, True)):
        kernel.QAT["on"] = qat
        model = build_reference(ref, reference_args(ref, text, 128, 2, gemm), exact, tok, fix_decode_bug=True,
                                raw=raw)
        with torch.no_grad():
            full, decode = run(model, ids, [LENGTH]), run(model, ids, decode_chunks)
        rel = np.abs(full - decode).max() / np.abs(full).max()
        print(f"{tag}: reference full vs decode, max relative difference {rel:.3e}")
        out[f"logits_full_{tag}"], out[f"logits_decode_{tag}"] = ("F32", full), ("F32", decode)
    model = build_reference(ref, reference_args(ref, text, 128, 2), exact, tok, fix_decode_bug=False)
    with torch.no_grad():
        unpatched = run(model, ids, decode_chunks)
    rel = np.abs(unpatched - out["logits_full_qat"][1]).max() / np.abs(out["logits_full_qat"][1]).max()
    print(f"unpatched reference (decode bug): full vs decode, max relative difference {rel:.3e}")
    out["logits_decode_unpatched"] = ("F32", unpatched)

    # The three activation roundings on random rows (with exact rounding midpoints mixed in), for
    # bit-exact unit tests of the port's quantizers.
    x = torch.from_numpy(rng.standard_normal((64, 64)).astype(np.float32)) * torch.logspace(-3, 2, 64).unsqueeze(1)
    x[::7, ::5] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, 5.0, 448.0, 6.0, 0.0])[
        torch.arange(x[::7, ::5].numel()) % 13].view(x[::7, ::5].shape)
    kernel.QAT["on"] = True
    out["quant_x"] = ("F32", x.numpy())
    out["quant_fp8_b32"] = ("F32", kernel.act_quant(x.clone(), 32, "ue8m0", torch.float8_e8m0fnu, True).numpy())
    out["quant_fp4_b16_e4m3"] = ("F32", kernel.fp4_act_quant(x.clone(), 16, True, torch.float8_e4m3fn).numpy())
    out["quant_fp4_b32"] = ("F32", kernel.fp4_act_quant(x.clone(), 32, True).numpy())
    # what linear() hands to fp8_gemm/fp4_gemm: codes times scales of act_quant(x, 32, "ue8m0")
    codes, scales = kernel.act_quant(x.clone(), 32, "ue8m0", torch.float8_e8m0fnu)
    out["quant_gemm_input_b32"] = ("F32", (codes.float().unflatten(-1, (-1, 32)) * scales.float().unsqueeze(-1))
                                   .flatten(-2).numpy())
    write_safetensors(FIXTURES / "reference.safetensors", out, metadata={
        "oracle": "DeepSeek-V4.1-Flash inference/model.py in float32 with plain-torch kernels "
                  "(scripts/make_v41_fixtures.py); indexer decode bug patched except in logits_decode_unpatched"})
    (FIXTURES / "README.md").write_text(
        "Made by scripts/make_v41_fixtures.py (see its docstring): a tiny DeepSeek V4.1 in the official\n"
        "release layout (model/) and the official reference's float32 logits (reference.safetensors).\n")
    print(json.dumps({p.name: p.stat().st_size for p in sorted(FIXTURES.rglob("*")) if p.is_file()}, indent=1))


if __name__ == "__main__":
    main()
