"""The drafters' routed experts in the expert store (mlx_v4/experts.py): V4's MTP block, the
V4-Flash-0731 DSpark stages and V4.1's DSpark stages read their experts on demand under the one
budget. Greedy output with drafts under a budget that forces evictions equals plain output and
drafting with everything resident; the drafter's logits are bit-identical streamed and resident
at every step; the budget holds after every step; "auto" counts what stays resident."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_v4
from mlx_v4 import expert_plan, experts, platform
from mlx_v4.draft.speculative import DSparkDrafter, MTPDrafter
from mlx_v4.experts import StreamedExperts, drafter_blocks
from mlx_v4.generation import Token, stream_generate
from mlx_v4.testing.dspark import write_tiny_dspark_checkpoint
from mlx_v4.testing.dspark_v41 import write_tiny_v41_dspark_checkpoint
from mlx_v4.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
V41 = FIXTURES / "tiny_v41" / "model"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("drafters")
    write_tiny_dspark_checkpoint(d / "dspark", seed=4)
    write_tiny_v41_dspark_checkpoint(d / "v41", json.loads((V41 / "config.json").read_text()), seed=3)
    from mlx_v4.quantize import convert

    q4 = convert(d / "dspark", d / "dspark-4bit", recipe="4bit", progress=False).path  # our names, affine experts
    return {"mtp": FIXTURES / "tiny", "dspark": d / "dspark", "v41": d / "v41", "dspark-4bit": q4}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _load(path, budget=None):
    model, _ = mlx_v4.load(path, dtype=mx.float32, expert_budget=budget)
    return model


def _minimum(path) -> int:
    return _load(path, 1 << 40).expert_store.minimum


def _guard(store) -> list[int]:
    """Check the budget after every group the store hands out and when each layer is done;
    -> the layers asked for, in order."""
    asked, inner = [], store.stream

    def stream(layer, needed):
        asked.append(layer)
        for group in inner(layer, needed):
            assert store.resident_bytes + store.reserved <= store.budget
            yield group
        assert store.resident_bytes <= store.budget

    store.stream = stream
    return asked


def _run(model, tok, ids, **kw):
    """Greedy generation -> (tokens, final stats, the drafter's logits after each observe)."""
    seen, store, events = [], model.expert_store, []
    with pytest.MonkeyPatch.context() as mp:
        for cls in (MTPDrafter, DSparkDrafter):
            def observe(self, *a, _orig=cls.observe, **k):
                _orig(self, *a, **k)
                seen.append(np.array(self.logits))
            mp.setattr(cls, "observe", observe)
        for e in stream_generate(model, tok, ids, cache=model.make_cache(), temperature=0.0, eos_token_ids={-1},
                                 **kw):
            events.append(e)
            if store is not None and isinstance(e, Token):
                assert store.resident_bytes <= store.budget  # after every step
    return [e.id for e in events if isinstance(e, Token)], events[-2], seen


@pytest.mark.parametrize("kind,draft,prompt_len,k", [
    ("mtp", "mtp", 6, 2), ("mtp", "mtp", 126, 1),  # across the 4- and 128-position compression boundaries
    ("dspark", "dspark", 6, None), ("dspark-4bit", "dspark", 6, 3), ("v41", "dspark", 6, None)])
def test_drafting_with_streamed_drafter_experts_equals_resident(checkpoints, tok, kind, draft, prompt_len, k):
    path = checkpoints[kind]
    ids = np.random.default_rng(7).integers(2, 500, prompt_len).tolist()
    resident = _load(path)
    plain, _, _ = _run(resident, tok, ids, max_tokens=10)
    want, want_stats, want_logits = _run(resident, tok, ids, max_tokens=10, draft=draft, draft_tokens=k)
    assert want == plain and want_stats.draft_tokens > 0 and want_logits

    budget = _minimum(path)  # one layer's top-k at a time: every layer evicts the last one's
    model = _load(path, budget)
    store = model.expert_store
    blocks = drafter_blocks(model)
    assert blocks and all(isinstance(b.ffn.experts, StreamedExperts) for _, _, b in blocks)
    asked = _guard(store)
    got, stats, logits = _run(model, tok, ids, max_tokens=10, draft=draft, draft_tokens=k)
    assert got == plain
    assert (stats.draft_tokens, stats.accepted_tokens) == (want_stats.draft_tokens, want_stats.accepted_tokens)
    assert len(logits) == len(want_logits)
    for a, b in zip(logits, want_logits):
        np.testing.assert_array_equal(a, b)  # bit-identical drafter logits at every step
    s = store.stats()
    assert s["evictions"] > 0 and s["resident_bytes"] <= budget
    drafter_layers = {i for i, _, _ in blocks}
    assert drafter_layers <= set(asked)  # the drafter read its experts through the store
    assert s["total_bytes"] == sum(sp.slot_bytes * len(sp.experts) for sp in store.specs.values())
    assert drafter_layers <= set(store.specs)  # counted in total_bytes, hits and misses with the rest
    assert model.fingerprint == resident.fingerprint


def test_the_drafter_experts_are_planned_with_their_own_names_and_sizes(checkpoints):
    v4 = _load(checkpoints["dspark"], 1 << 40).expert_store
    n = 4  # tiny main layers
    assert [v4.specs[n + i].prefix for i in range(3)] == [f"dspark.layers.{i}.ffn.experts" for i in range(3)]
    q4 = _load(checkpoints["dspark-4bit"], 1 << 40).expert_store  # a conversion's own quantization, by module
    assert all(q4.specs[n + i].quant["w2"]["mode"] == "affine" for i in range(3))
    mtp = _load(checkpoints["mtp"], 1 << 40)
    assert mtp.expert_store.specs[n].prefix == "mtp.0.ffn.experts"
    names = {name for name, _, _ in mtp.expert_store.layout()}
    assert {"mtp.0.ffn.experts.w1.weight", "mtp.0.ffn.experts.w2.weight"} <= names
    v41 = _load(checkpoints["v41"], 1 << 40)
    s = v41.expert_store
    n41 = len(v41.layers)
    assert s.top_k[n41] == 3 and s.top_k[0] == v41.args.num_experts_per_tok  # the drafter's own top-k
    assert len(s.specs[n41].experts) == v41.args.dspark_n_routed_experts
    assert s.minimum == max(s.top_k[i] * sp.slot_bytes for i, sp in s.specs.items())


def _resident_bytes(model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def test_auto_budget_counts_the_drafter(checkpoints, monkeypatch):
    """"auto" = share of memory - what stays resident - the planned KV cache; the drafter's
    streamed experts are among the experts it sizes, its other weights among the resident."""
    from mlx_v4.cache import planned_nbytes

    path = checkpoints["dspark"]
    streamed = _load(path, 1 << 40)
    resident, total = _resident_bytes(streamed), streamed.expert_store.total_bytes
    drafter = sum(streamed.expert_store.specs[i].slot_bytes * len(streamed.expert_store.specs[i].experts)
                  for i, _, _ in drafter_blocks(streamed))
    assert 0 < drafter < total
    kv = planned_nbytes(streamed.args, expert_plan.AUTO_CONTEXT_TOKENS)
    memory = int((resident + kv + total // 2) / expert_plan.AUTO_MEMORY_SHARE) + 1
    monkeypatch.setattr(platform, "total_memory_bytes", lambda: memory)
    model = _load(path, "auto")
    assert model.expert_store.budget == int(memory * expert_plan.AUTO_MEMORY_SHARE) - resident - kv
    assert _resident_bytes(model) == resident


def test_a_drafter_the_store_cannot_plan_stays_resident_with_a_notice(checkpoints, monkeypatch, tok):
    """Where the plan has no drafter layer, its experts stay resident (counted by "auto" among
    the resident bytes), a RuntimeWarning says so, and drafting still equals plain decoding."""
    path = checkpoints["mtp"]
    real = expert_plan.plan_layers

    def without_drafter(infos, args, convert):
        return {i: s for i, s in real(infos, args, convert).items() if i < args.num_hidden_layers}

    monkeypatch.setattr(experts, "plan_layers", without_drafter)
    with pytest.warns(RuntimeWarning, match=r"expert store: the drafter's routed experts of mtp\.0 stay resident, "
                                            r"outside the expert budget"):
        model = _load(path, _minimum(path))
    assert not isinstance(model.mtp[0].ffn.experts, StreamedExperts)
    assert "mtp.0.ffn.experts.w1.weight" in dict(tree_flatten(model.parameters()))
    from mlx_v4.cache import planned_nbytes

    resident, kv = _resident_bytes(model), planned_nbytes(model.args, expert_plan.AUTO_CONTEXT_TOKENS)
    memory = int((resident + kv + model.expert_store.total_bytes // 2) / expert_plan.AUTO_MEMORY_SHARE) + 1
    monkeypatch.setattr(platform, "total_memory_bytes", lambda: memory)
    with pytest.warns(RuntimeWarning, match="stay resident"):
        auto = _load(path, "auto")  # the resident drafter experts are counted among the resident weights
    assert auto.expert_store.budget == int(memory * expert_plan.AUTO_MEMORY_SHARE) - resident - kv
    monkeypatch.undo()
    ids = np.random.default_rng(2).integers(2, 500, 6).tolist()
    plain, _, _ = _run(_load(path), tok, ids, max_tokens=6)
    assert _run(model, tok, ids, max_tokens=6, draft="mtp")[0] == plain


def test_the_batching_engine_drafts_with_streamed_mtp_experts(checkpoints, tok):
    """Rows drafting with the MTP block in the batching engine (its rows stacked through the
    block's MoE) give the same tokens and counts with its experts streamed as resident."""
    from mlx_v4.batch_generation import batch_generate

    path = checkpoints["mtp"]
    rng = np.random.default_rng(3)
    prompts = [rng.integers(2, 500, n).tolist() for n in (5, 40, 130)]
    kw = dict(max_tokens=10, temperature=0, draft="mtp", draft_tokens=2)
    want = batch_generate(_load(path), tok, prompts, **kw)
    budget = _minimum(path)
    model = _load(path, budget)
    asked = _guard(model.expert_store)
    got = batch_generate(model, tok, prompts, **kw)
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert [(g.draft_tokens, g.accepted_tokens) for g in got] == [(w.draft_tokens, w.accepted_tokens) for w in want]
    assert len(model.layers) in asked and model.expert_store.stats()["evictions"] > 0


def test_a_failed_drafter_read_names_the_file_and_keeps_what_was_handed_out(checkpoints, tok, tmp_path):
    """The drafter's shard vanishes mid-run: generation stops with an error naming it; the cache
    holds the prompt and every token handed out, as the resident model computes them."""
    from dataclasses import replace

    path = checkpoints["mtp"]
    model = _load(path, _minimum(path))
    store, n = model.expert_store, len(model.layers)
    gone = tmp_path / "gone.safetensors"
    ids = np.random.default_rng(5).integers(2, 500, 8).tolist()
    cache, emitted = model.make_cache(), []
    with pytest.raises(experts.ExpertReadError) as e:
        for ev in stream_generate(model, tok, ids, cache=cache, temperature=0.0, eos_token_ids={-1}, max_tokens=12,
                                  draft="mtp"):
            if isinstance(ev, Token):
                emitted.append(ev.id)
                if len(emitted) == 3:  # the MTP block's experts are evicted by every step: its next read fails
                    for src in store.specs[n].experts:
                        src.runs = [replace(r, file=gone) for r in src.runs]
    assert str(gone) in str(e.value) and 3 <= len(emitted) < 12
    assert cache[0].offset == len(ids) + len(emitted)
    resident = _load(path)
    ref = resident.make_cache()
    resident(mx.array([ids + emitted]), ref)
    nxt = mx.array([[7]])  # fed in other chunks than the run's: equal to float rounding
    np.testing.assert_allclose(np.array(model(nxt, cache)), np.array(resident(nxt, ref)), atol=1e-4, rtol=0)
