"""Tiny random DeepSeek V4 models for tests and benchmarks (every layer kind present)."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..config import ModelArgs
from ..model import Model

# 16 indexer heads: with few heads, ReLU zeroes every head of a (query, entry) pair often enough
# that top-k meets exact ties at 0, whose order is implementation-defined (transformers' own
# full and incremental paths then pick differently).
TINY_CONFIG = dict(
    model_type="deepseek_v4", vocab_size=1024, hidden_size=128, num_hidden_layers=4,
    compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1, num_attention_heads=4, head_dim=128,
    qk_rope_head_dim=64, q_lora_rank=64, o_groups=2, o_lora_rank=64, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=64, index_n_heads=16, index_head_dim=64, index_topk=8,
    sliding_window=128, max_position_embeddings=65536,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                  "beta_fast": 32, "beta_slow": 1},
)


def tiny_args(**overrides) -> ModelArgs:
    return ModelArgs.from_dict(TINY_CONFIG, overrides)


def random_model(args: ModelArgs, seed: int = 0, dtype=mx.float32, cpu: bool | None = None,
                 mtp: bool = False, dspark: bool = False) -> Model:
    """A Model with deterministic random weights of healthy magnitudes (``mtp``: with its MTP
    block, ``model.mtp[0]``; ``dspark``: with its DSpark drafter, ``model.dspark``)."""
    model = Model(args, cpu=cpu)
    if mtp:
        from ..draft.mtp import attach_mtp

        attach_mtp(model, cpu=cpu)
    if dspark:
        from ..draft.dspark import attach_dspark

        attach_dspark(model, cpu=cpu)
    params = {}
    for i, (name, p) in enumerate(sorted(tree_flatten(model.parameters()))):
        k = mx.random.key(seed * 100003 + i)
        if name.endswith("tid2eid"):
            # distinct expert ids per token
            order = mx.argsort(mx.random.uniform(shape=(p.shape[0], args.n_routed_experts), key=k), axis=-1)
            params[name] = order[:, : p.shape[1]].astype(mx.int32)
        elif name.endswith(("norm.weight",)):
            params[name] = (1 + 0.1 * mx.random.normal(p.shape, key=k)).astype(dtype)
        elif ".hc_" in name or name.startswith("hc_head") or ".hc_head." in name:
            scale = 0.02 if name.endswith(".fn") else 0.5
            params[name] = (1.0 if name.endswith(".scale") else 0.0) + scale * mx.random.normal(p.shape, key=k)
        elif name.endswith(("attn_sink", "ape", "gate.bias")):
            params[name] = 0.5 * mx.random.normal(p.shape, key=k)
        else:
            params[name] = (mx.random.normal(p.shape, key=k) * p.shape[-1] ** -0.5).astype(dtype)
    model.update(tree_unflatten(list(params.items())))
    mx.eval(model.parameters())
    return model


def run_chunks(model: Model, ids: mx.array, sizes: list[int]) -> mx.array:
    """Feed ``ids`` [B, L] through a fresh cache in chunks of ``sizes``; the logits of every
    position, evaluating each chunk (as generation does)."""
    cache, outs, pos = model.make_cache(), [], 0
    for n in sizes:
        outs.append(model(ids[:, pos:pos + n], cache))
        mx.eval(outs[-1], [c.state for c in cache])
        pos += n
    if pos != ids.shape[1] or cache[0].offset != pos:
        raise ValueError(f"chunk sizes {sizes} do not cover {ids.shape[1]} tokens")
    return mx.concatenate(outs, axis=1)


def generate_ids(model, tokenizer, ids: list[int], **kw) -> tuple[list[int], object, object, list]:
    """stream_generate on a fresh cache (greedy and no end token unless given) -> (the generated
    ids, the event before the last, the last event, the cache): the speculative tests compare
    these between plain and drafted runs."""
    from ..generation import Token, stream_generate

    kw.setdefault("temperature", 0.0)
    kw.setdefault("eos_token_ids", {-1})
    cache = model.make_cache()
    events = list(stream_generate(model, tokenizer, ids, cache=cache, **kw))
    return [e.id for e in events if isinstance(e, Token)], events[-2], events[-1], cache
