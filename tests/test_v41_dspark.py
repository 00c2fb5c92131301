"""DeepSeek V4.1's DSpark drafter (mlx_v4/v41/dspark.py) and speculative decoding on V4.1: the
cache keeps any prefix of a speculation exactly; official-format drafter tensors load; the
forward matches an independent numpy transcription (mlx_v4/testing/dspark_v41.py); greedy output
with drafts equals plain greedy output; sampled output follows the target distribution."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_v4
from mlx_v4.cache import accept, cache_offset, speculate
from mlx_v4.config import ConfigError
from mlx_v4.draft.speculative import DSparkDrafter, Sampling, Speculator, make_drafter
from mlx_v4.testing.dspark import teach_markov
from mlx_v4.testing.dspark_v41 import (
    v41_dspark_config,
    v41_dspark_reference,
    write_tiny_v41_dspark_checkpoint,
)
from mlx_v4.testing.tiny import generate_ids
from mlx_v4.tokenizer import load_tokenizer
from mlx_v4.v41.config import V41Args
from mlx_v4.v41.dspark import V41DSpark, v41_dspark_name

MODEL = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"
BASE = json.loads((MODEL / "config.json").read_text())


@pytest.fixture(scope="module")
def model():
    m, _ = mlx_v4.load(MODEL, dtype=mx.float32)
    return m


def _arr(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(3, 512, (1, n)), dtype=mx.int32)


def _layer_state(c) -> list[np.ndarray]:
    out = [np.array(p) for p in c.window_parts or []]
    if c.own is not None:
        for store in (c.own.entries, c.own.index_keys):
            if store is not None and store.length:
                out += [np.array(p) for p in store.view()]
        out += [np.array(a) for a in c.own.group.arrays()]
    return out


# The fixture: window 16, ratio-2 source at layer 2, ratio-1 source at 5 (candidate blocks of 2
# entries, index top-8), Engram 3-grams at layers 1 and 5.
@pytest.mark.parametrize("start,fed", [(0, 4), (5, 5), (8, 6), (13, 6), (30, 5), (41, 3)])
def test_speculate_accept_keeps_exactly_a_prefix(model, start, fed):
    """For every k, feeding ``fed`` guesses and keeping k leaves the cache of a run fed only those
    k: windows, the ratio-2 open group, compressed entries, index keys, the Engram history."""
    ids = _arr(start + fed + 12, seed=start)
    for keep in range(fed + 1):
        spec, ref = model.make_cache(), model.make_cache()
        if start:
            model(ids[:, :start], spec)
            model(ids[:, :start], ref)
        assert speculate(spec) == start
        model(ids[:, start:start + fed], spec)
        accept(spec, start + keep)
        if keep:
            model(ids[:, start:start + keep], ref)
        assert cache_offset(spec) == cache_offset(ref) == start + keep
        assert not spec[0].speculating and spec.engram_fed is None
        for a, b in zip(spec, ref):
            sa, sb = _layer_state(a), _layer_state(b)
            assert [x.shape for x in sa] == [x.shape for x in sb]
            for x, y in zip(sa, sb):
                np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(spec.engram_history, ref.engram_history)
        # and both continue identically, past the next group, window and candidate-block boundaries
        rest = ids[:, start + keep:]
        np.testing.assert_allclose(np.array(model(rest, spec)), np.array(model(rest, ref)), atol=1e-4, rtol=0)


def test_abandon_returns_to_the_start(model):
    ids = _arr(20, seed=9)
    spec, ref = model.make_cache(), model.make_cache()
    model(ids[:, :11], spec)
    model(ids[:, :11], ref)
    speculate(spec)
    model(ids[:, 11:16], spec)
    for c in spec:
        c.abandon()
    assert cache_offset(spec) == 11
    np.testing.assert_array_equal(np.array(model(ids[:, 11:], spec)), np.array(model(ids[:, 11:], ref)))


def test_accept_refuses_positions_outside_the_speculation(model):
    cache = model.make_cache()
    model(_arr(10), cache)
    with pytest.raises(RuntimeError, match="accept\\(\\) without speculate"):
        accept(cache, 10)
    speculate(cache)
    model(_arr(3, seed=1), cache)
    with pytest.raises(ValueError, match="cannot keep positions up to 14: speculation fed 10..13"):
        accept(cache, 14)


# ---- config and names ----------------------------------------------------------------------------

def test_the_dspark_fields_are_read():
    a = V41Args.from_dict(v41_dspark_config(BASE))
    assert a.has_dspark and a.dspark_stages == 2 and a.dspark_target_layer_ids == [3, 6]
    assert (a.dspark_block_size, a.dspark_noise_token_id, a.dspark_markov_rank) == (4, 500, 16)
    assert (a.dspark_n_routed_experts, a.dspark_n_activated_experts) == (4, 3)
    assert V41Args.from_dict(a.to_dict()) == a  # round trip, stage ratios included
    # the release's config.json spells the drafter's top-k the transformers way
    released = v41_dspark_config(BASE, dspark_n_activated_experts=None, dspark_num_experts_per_tok=2)
    del released["text_config"]["dspark_n_activated_experts"]
    assert V41Args.from_dict(released).dspark_n_activated_experts == 2
    plain = V41Args.from_dict(BASE)
    assert not plain.has_dspark and not any(k.startswith("dspark_") for k in plain.to_dict())


def test_the_release_preset_declares_its_drafter():
    from mlx_v4.v41.config import preset

    a = preset("v41-flash")
    assert a.has_dspark and a.dspark_stages == 3 and a.dspark_target_layer_ids == [37, 38, 39]
    assert (a.dspark_n_routed_experts, a.dspark_n_activated_experts, a.dspark_noise_token_id) == (128, 3, 128799)


@pytest.mark.parametrize("fields,message", [
    (dict(dspark_noise_token_id=None), "dspark_noise_token_id is missing"),
    (dict(dspark_noise_token_id=512), "dspark_noise_token_id=512 is outside the vocabulary"),
    (dict(dspark_target_layer_ids=[6, 3]), "dspark_target_layer_ids=\\[6, 3\\]: must be increasing"),
    (dict(dspark_target_layer_ids=[3, 8]), "dspark_target_layer_ids=\\[3, 8\\]"),
    (dict(dspark_block_size=1), "dspark_block_size=1"),
    (dict(dspark_markov_rank=0), "dspark_markov_rank=0"),
    (dict(dspark_n_activated_experts=5), "dspark_n_activated_experts=5 must be between 1 and dspark_n_routed_experts=4"),
])
def test_bad_dspark_fields_are_named(fields, message):
    with pytest.raises(ConfigError, match=message):
        V41Args.from_dict(v41_dspark_config(BASE, **fields))


def test_the_draft_layers_must_be_window_only():
    cfg = v41_dspark_config(BASE)
    cfg["text_config"]["compress_ratios"][-1] = 2
    with pytest.raises(ConfigError, match="the 2 DSpark layers \\(n_mtp_layers\\) are window-only"):
        V41Args.from_dict(cfg)
    cfg = v41_dspark_config(BASE)
    cfg["text_config"]["num_nextn_predict_layers"] = 0
    with pytest.raises(ConfigError, match="n_mtp_layers \\(num_nextn_predict_layers\\) is 0"):
        V41Args.from_dict(cfg)


def test_official_names():
    assert v41_dspark_name("mtp.0.main_proj.weight") == "dspark.main_proj.weight"
    assert v41_dspark_name("mtp.0.main_proj.scale") == "dspark.main_proj.scale"
    assert v41_dspark_name("mtp.2.markov_head.embed.weight") == "dspark.markov_w1.weight"
    assert v41_dspark_name("mtp.2.markov_head.head.weight") == "dspark.markov_w2.weight"
    assert v41_dspark_name("mtp.2.confidence_head.proj.weight") == "dspark.confidence.weight"
    assert v41_dspark_name("mtp.1.hc_ffn_fn") == "dspark.layers.1.hc_ffn_fn"
    assert v41_dspark_name("mtp.1.ffn.experts.3.w2.weight") == "dspark.layers.1.ffn.experts.3.w2.weight"
    assert v41_dspark_name("layers.1.attn.wkv.weight") is None


# ---- the official-format checkpoint and the forward ----------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("v41dspark")
    cfg, exact = write_tiny_v41_dspark_checkpoint(path, BASE, seed=3)
    return path, exact


@pytest.fixture(scope="module")
def exact_model(checkpoint):
    path, exact = checkpoint
    model, _ = mlx_v4.load(path, model_config={"fake_quant": False}, dtype=mx.float32, fp8="dequantize")
    return model, {k: v.astype(np.float64) for k, v in exact.items() if ":" not in k}


def test_a_v41_checkpoint_loads_with_its_drafter(checkpoint, exact_model):
    model, W = exact_model
    net = model.dspark
    assert isinstance(net, V41DSpark) and len(net.layers) == 2
    ffn = net.layers[1].ffn
    assert ffn.gate.weight.shape == (4, 64) and ffn.gate.topk == 3  # the drafter's own MoE (get_moe_config)
    assert not hasattr(net, "hc_head")  # V4.1: no learned hc_head
    for ours, official in [("main_proj.weight", "mtp.0.main_proj.weight"),  # FP8 in the file
                           ("markov_w1.weight", "mtp.1.markov_head.embed.weight"),
                           ("layers.1.ffn.experts.w2.weight", None)]:
        got = np.array(dict(__import__("mlx.utils").utils.tree_flatten(net.parameters()))[ours])
        if official is None:  # FP4 experts, stacked
            want = np.stack([W[f"mtp.1.ffn.experts.{e}.w2.weight"] for e in range(4)])
        else:
            want = W[official]
        np.testing.assert_array_equal(got, want.astype(np.float32))
    assert make_drafter(model, "auto", None, custom_sampler=False).name == "dspark"


def test_the_confidence_head_is_optional(tmp_path, tok):
    write_tiny_v41_dspark_checkpoint(tmp_path, BASE, seed=4, confidence=False)
    model = _load(tmp_path)
    assert "confidence" not in model.dspark
    drafter = make_drafter(model, "dspark", 2, custom_sampler=False)
    ids = _ids(9, seed=6)
    assert _run(model, tok, ids, max_tokens=5, draft="dspark")[0] == _run(model, tok, ids, max_tokens=5)[0]
    from mlx_v4.draft.dspark import DSparkError

    with pytest.raises(DSparkError, match="has no confidence head"):
        drafter.net.acceptance(mx.zeros((1, 64)), mx.array([3]))
    from quantize.convert import convert

    out = convert(tmp_path, tmp_path / "native", recipe="native").path
    assert "confidence" not in _load(out).dspark


def test_without_dspark_fields_the_mtp_tensors_are_skipped(checkpoint, tmp_path):
    path, _ = checkpoint
    for f in path.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    cfg = json.loads((path / "config.json").read_text())
    for k in [k for k in cfg["text_config"] if k.startswith("dspark_")]:
        del cfg["text_config"][k]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, _ = mlx_v4.load(tmp_path, dtype=mx.float32)
    assert getattr(model, "dspark", None) is None
    assert make_drafter(model, "auto", None, custom_sampler=False) is None


@pytest.mark.parametrize("n,start", [(9, 0), (30, 7)], ids=["inside-window", "past-window"])
def test_drafter_matches_the_transcription(exact_model, n, start):
    """Context from the model's own taps (30 positions overflow the 16-position window), then
    one block: base logits, the greedy Markov walk, the biased logits and the confidence."""
    model, W = exact_model
    a = model.args
    rng = np.random.default_rng(n)
    ids = [int(t) for t in rng.integers(3, 500, start + n)]
    _, tapped = model.tapped_streams(mx.array([ids]), model.make_cache(), tuple(a.dspark_target_layer_ids))
    hiddens = np.array(tapped[0, start:]).astype(np.float64)
    drafter = DSparkDrafter(model)
    drafter.observe(tapped[:, start:], ids[start + 1:] + [ids[-1]], start)
    anchor = ids[-1]
    drafts = drafter.draft(a.dspark_block_size)
    prev = np.array([anchor] + drafts[:-1])
    base, biased, confidence = v41_dspark_reference(W, a, hiddens, np.arange(start, start + n, dtype=np.float64),
                                                    anchor, prev)
    np.testing.assert_allclose(np.array(drafter.logits), base, atol=5e-5, rtol=1e-4)
    assert drafts == np.argmax(biased, axis=-1).tolist()
    bias = drafter.net.markov_bias(mx.array(prev))
    np.testing.assert_allclose(np.array(drafter.logits + bias), biased, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(np.array(drafter.acceptance(drafts)), confidence, atol=1e-5, rtol=1e-4)


def test_taps_are_the_input_streams_after_the_engram(exact_model):
    """Layer 0's input is the embedding on every copy; the taps of the Engram layers (1 and 5)
    are their streams after the Engram's addition, averaged over the copies (the official loop:
    engram, then ``main_hiddens.append(h.mean(dim=2))``, then the block)."""
    from mlx_v4.v41.cache import SharedState

    model, _ = exact_model
    ids = mx.array([[5, 9, 300, 7, 8, 11]])
    h, tapped = model.tapped_streams(ids, model.make_cache(), (0,))
    np.testing.assert_allclose(np.array(tapped), np.array(model.embed(ids)), atol=1e-6)
    np.testing.assert_array_equal(np.array(model.logits(h)), np.array(model(ids)))
    assert model.tapped_streams(ids, model.make_cache())[1] is None
    _, tapped = model.tapped_streams(ids, model.make_cache(), (1, 5))
    hc, D = model.args.hc_mult, model.args.hidden_size
    x = mx.broadcast_to(model.embed(ids)[:, :, None], (1, 6, hc, D))
    pre = mx.zeros((1, 6, hc)).at[..., 0].add(1.0)
    rows, _ = model._hasher(np.array(ids), np.full((1, 2), -1))
    want, cache, shared = [], model.make_cache(), SharedState()
    for i, (layer, c) in enumerate(zip(model.layers, cache)):
        if i in (1, 5):
            before = x.mean(axis=2)
            x = layer.engram(x, rows[:, :, model.args.engram_layer_ids.index(i)])
            want.append(x.mean(axis=2))
            assert not np.allclose(np.array(before), np.array(want[-1]))  # the Engram added something
        x, pre = layer(x, pre, c, shared)
    np.testing.assert_array_equal(np.array(tapped), np.array(mx.concatenate(want, axis=-1)))


# ---- speculative decoding ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _load(path, **config):
    return mlx_v4.load(path, dtype=mx.float32, model_config=config or None)[0]


def _ids(n, seed=1):
    return np.random.default_rng(seed).integers(3, 500, n).tolist()


_run = generate_ids


def _teach_markov(model, sequence, wrong_every):
    teach_markov(model.dspark, sequence, wrong_every)


# The fixture's window is 16: ratio-2 groups close every 2 positions, ratio-1 entries every one,
# index top-8 and candidate blocks of 2 entries are exceeded after a few positions; the last case
# runs a 128-position window across position 128.
@pytest.mark.parametrize("prompt_len,max_tokens,k,config", [
    (2, 16, None, {}), (11, 14, 2, {}), (121, 14, None, {"sliding_window": 128}),
], ids=["start", "k2-past-window", "window128"])
def test_greedy_with_dspark_equals_plain(checkpoint, tok, prompt_len, max_tokens, k, config):
    model = _load(checkpoint[0], **config)
    ids = _ids(prompt_len)
    plain, _, pfin, pcache = _run(model, tok, ids, max_tokens=max_tokens)
    _teach_markov(model, ids[-1:] + plain, wrong_every=3)
    got, stats, fin, cache = _run(model, tok, ids, max_tokens=max_tokens, draft="dspark", draft_tokens=k)
    assert got == plain and fin.reason == pfin.reason == "length"
    assert 0 < stats.accepted_tokens < stats.draft_tokens  # drafts kept and drafts rejected (rewound)
    assert stats.target_forwards < max_tokens - 1
    assert fin.cache_offset == pfin.cache_offset == prompt_len + max_tokens - 1
    nxt = mx.array([[plain[-1]]])
    np.testing.assert_allclose(np.array(model(nxt, cache)), np.array(model(nxt, pcache)), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache.engram_history, pcache.engram_history)


def test_random_drafts_are_rejected_and_rewound(checkpoint, tok):
    model = _load(checkpoint[0])
    ids = _ids(20, seed=3)
    plain = _run(model, tok, ids, max_tokens=8)[0]
    got, stats, _, _ = _run(model, tok, ids, max_tokens=8, draft="auto")  # auto picks DSpark
    assert got == plain and stats.draft_tokens > 0 and stats.accepted_tokens < stats.draft_tokens


_CRIT2 = 13.82  # chi-square, 2 degrees of freedom, p = 0.001


def test_sampled_steps_follow_the_target(checkpoint):
    """Sampling at temperature 1, top-k 3: the token a speculative step emits after the pending
    one (the kept draft or the correction drawn on rejection) follows the target's filtered row
    (each step is abandoned, so all draw from the same position; 240 steps keep it quick)."""
    model = _load(checkpoint[0])
    ids = _ids(12, seed=5)
    settings = Sampling(1.0, top_k=3)
    row = model(mx.array([ids]))[0, -1]
    y = int(mx.argmax(row).item())
    target = model(mx.array([ids + [y]]))[0, -1]
    p = np.array(mx.softmax(settings.filtered(target - mx.logsumexp(target)), precise=True), dtype=np.float64)
    top = np.argsort(-p)[:3]
    _teach_markov(model, [y, int(top[1])], wrong_every=10**9)  # drafts favour the second likeliest
    cache = model.make_cache()
    spec = Speculator(model, cache, DSparkDrafter(model, 1), settings)
    _, tail = spec.prefill(ids[:-1], step_size=64)
    _, start = spec.first(ids[-1], tail, ids)
    start(y)
    mx.random.seed(7)
    counts, kept, n = np.zeros_like(p), 0, 240
    for _ in range(n):
        emitted = spec.step(y, 2)
        token = emitted[1] if len(emitted) > 1 else spec._pending[3]
        counts[token] += 1
        kept += len(emitted) > 1
        spec.abandon()
        assert cache_offset(cache) == len(ids)
    assert 0 < kept < n  # drafts both kept and rejected
    assert counts[np.setdiff1d(np.arange(len(p)), top)].sum() == 0
    expected = n * p[top]
    assert float(((counts[top] - expected) ** 2 / expected).sum()) < _CRIT2


# ---- the converter keeps the drafter ---------------------------------------------------------------

def test_a_native_conversion_keeps_the_drafter(checkpoint, tmp_path):
    """``mlx-v4 convert --recipe native`` writes the drafter as dspark.*; the converted model
    drafts exactly as the release does (mxfp8/mxfp4 kept bit for bit, dequantized here)."""
    from quantize.convert import convert

    out = convert(checkpoint[0], tmp_path / "native", recipe="native", max_shard_bytes=200_000).path
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert "dspark.main_proj.weight" in names and not any(n.startswith("mtp.") for n in names)
    assert "dspark.layers.1.ffn.experts.3.w2.weight" in names
    results = []
    for path in (checkpoint[0], out):
        model = _load(path)
        drafter = DSparkDrafter(model)
        ids = _ids(20, seed=2)
        _, tapped = model.tapped_streams(mx.array([ids]), model.make_cache(), drafter.taps)
        drafter.observe(tapped, ids[1:] + [7], 0)
        results.append(np.array(drafter.logits))
    np.testing.assert_array_equal(results[0], results[1])


def test_speculative_prefill_reads_the_next_chunk_ahead(checkpoint, monkeypatch):
    """Speculator.prefill starts each next chunk's Engram reads before the current chunk is
    evaluated, as generation.prefill does; cache and drafter features are those of a prefill
    without read-ahead, bit for bit."""
    from mlx_v4.v41 import engram

    ids = _ids(70, seed=3)
    plain = _load(checkpoint[0])
    plain.engram_read_ahead = False
    want_cache = plain.make_cache()
    _, want_tail = Speculator(plain, want_cache, DSparkDrafter(plain, 2), Sampling(0.0)).prefill(ids, step_size=30)
    model = _load(checkpoint[0])
    events = []
    request = engram.EngramTable.request
    monkeypatch.setattr(engram.EngramTable, "request",
                        lambda self, rows, inline=False: (events.append(rows.shape[1]), request(self, rows, inline))[1])
    cache = model.make_cache()
    spec = Speculator(model, cache, DSparkDrafter(model, 2), Sampling(0.0))
    forward = spec._forward
    monkeypatch.setattr(spec, "_forward", lambda ids: (events.append("step"), forward(ids))[1])
    fed, tail = spec.prefill(ids, step_size=30)
    assert fed == 70
    # chunks 0:30, 30:60, 60:70 (two Engram tables each): the step of chunk 0 reads its own rows,
    # the next chunk's are requested right after each step is built, and never again by that step
    assert events == ["step", 30, 30, 30, 30, "step", 10, 10, "step"]
    np.testing.assert_array_equal(np.array(tail), np.array(want_tail))
    np.testing.assert_array_equal(cache.engram_history, want_cache.engram_history)
    last = mx.array([ids[-1:]])
    np.testing.assert_array_equal(np.array(model(last, cache)), np.array(plain(last, want_cache)))
