"""The DSpark drafter of V4-Flash-0731 (mlx_v4/draft/dspark.py): its config, its official-format
weights, its forward against an independent numpy transcription (mlx_v4/testing/dspark.py), and
speculative decoding with it (exact under greedy, distribution-preserving when sampling)."""

import math

import mlx.core as mx
import numpy as np
import pytest

import mlx_v4
from mlx_v4.config import ConfigError, ModelArgs
from mlx_v4.draft.dspark import DSparkError, attach_dspark, has_dspark
from mlx_v4.draft.dspark_names import dspark_rename
from mlx_v4.draft.speculative import DraftError, DSparkDrafter, Sampling, make_drafter, verify
from mlx_v4.model import Model
from mlx_v4.testing.dspark import (
    dspark_reference,
    teach_markov,
    tiny_dspark_config,
    write_tiny_dspark_checkpoint,
)
from mlx_v4.testing.tiny import generate_ids, random_model, tiny_args
from mlx_v4.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("flash0731")
    cfg, exact = write_tiny_dspark_checkpoint(path, seed=4)
    return path, cfg, exact


@pytest.fixture(scope="module")
def loaded(checkpoint):
    path, _, exact = checkpoint
    model, _ = mlx_v4.load(path, model_config={"fake_quant": False}, dtype=mx.float32, fp8="dequantize")
    W = {k: v.astype(np.float64) if v.dtype != np.int64 else v for k, v in exact.items()}
    return model, W


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


# ---- config ------------------------------------------------------------------------------------

def test_a_0731_config_is_recognised():
    args = ModelArgs.from_dict(tiny_dspark_config())
    assert args.has_dspark and args.dspark_compress_ratios == [0, 0, 0] and args.mtp_compress_ratio is None
    assert args.dspark_block_size == 5 and args.dspark_target_layer_ids == [1, 2, 3]
    assert len(args.compress_ratios) == args.num_hidden_layers
    d = args.to_dict()  # the official schema round-trips (quantize/ writes it)
    assert d["compress_ratios"] == tiny_dspark_config()["compress_ratios"] and d["dspark_noise_token_id"] == 1000
    assert ModelArgs.from_dict(d) == args
    plain = tiny_args()  # a config without the drafter keeps its dict (and model fingerprints)
    assert not plain.has_dspark and not any(k.startswith("dspark") for k in plain.to_dict())


@pytest.mark.parametrize("overrides,message", [
    (dict(dspark_block_size=0), "dspark_block_size=0 must be positive"),
    (dict(dspark_markov_rank=-1), "dspark_markov_rank=-1 must be positive"),
    (dict(dspark_noise_token_id=1024), r"dspark_noise_token_id=1024 is outside the vocabulary \(vocab_size=1024\)"),
    (dict(dspark_noise_token_id=None), "dspark_noise_token_id is missing"),
    (dict(dspark_target_layer_ids=[]), r"dspark_target_layer_ids=\[\] must be a non-empty list"),
    (dict(dspark_target_layer_ids=[1, 4, 2]), r"dspark_target_layer_ids\[1\]=4 is not a layer \(num_hidden_layers=4\)"),
    (dict(dspark_target_layer_ids=[2, 1, 3]), r"dspark_target_layer_ids=\[2, 1, 3\] must be strictly increasing"),
    (dict(compress_ratios=[0, 4, 128, 4, 0, 0]), "compress_ratios has 6 entries: a DSpark drafter with 3 stages"),
    (dict(compress_ratios=[0, 4, 128, 4, 0, 4, 0]), r"compress_ratios\[5\]=4: DSpark stage 1 must be window-only"),
])
def test_bad_dspark_fields_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_dict(tiny_dspark_config(**overrides))


def test_three_extra_ratios_without_dspark_fields_are_refused():
    cfg = {k: v for k, v in tiny_dspark_config().items() if not k.startswith("dspark_")}
    with pytest.raises(ConfigError, match="compress_ratios has 3 entries past num_hidden_layers=4: a DSpark"):
        ModelArgs.from_dict(cfg)


def test_stage_names():
    assert dspark_rename("mtp.0.main_proj.weight", 3) == "dspark.main_proj.weight"
    assert dspark_rename("mtp.2.markov_head.markov_w2.weight", 3) == "dspark.markov_w2.weight"
    assert dspark_rename("mtp.2.hc_head_fn", 3) == "dspark.hc_head.fn"
    assert dspark_rename("mtp.1.hc_attn_base", 3) == "dspark.layers.1.hc_attn.base"
    assert dspark_rename("mtp.1.ffn.experts.3.w2.weight", 3) == "dspark.layers.1.ffn.experts.3.w2.weight"
    assert dspark_rename("mtp.0.norm.weight", 3) == "dspark.layers.0.norm.weight"  # not a head there: unknown
    assert dspark_rename("layers.0.attn.wkv.weight", 3) is None


# ---- the official-format checkpoint --------------------------------------------------------------

def test_a_0731_checkpoint_loads_with_its_drafter(checkpoint, loaded):
    model, _ = loaded
    assert has_dspark(model) and not getattr(model, "mtp", None)
    assert len(model.dspark.layers) == 3 and model.dspark.confidence.weight.dtype == mx.float32
    assert all(s.attn.ratio == 0 and not s.ffn.gate.hash_routed for s in model.dspark.layers)
    path = checkpoint[0]
    quantized, _ = mlx_v4.load(path, dtype=mx.float32, fp8="mxfp8")  # FP8 kept quantized, FP4 experts too
    assert has_dspark(quantized)
    assert isinstance(make_drafter(quantized, "auto", None, custom_sampler=False), DSparkDrafter)


def test_the_stages_weights_are_checked(tmp_path):
    from mlx_v4.testing.dspark import random_dspark_weights
    from mlx_v4.testing.official import write_official_checkpoint
    from mlx_v4.weights import WeightsError

    cfg = tiny_dspark_config()
    weights = random_dspark_weights(cfg, seed=1)
    extra = dict(weights) | {"mtp.0.norm.weight": weights["mtp.2.norm.weight"]}  # a head on the wrong stage
    write_official_checkpoint(tmp_path / "extra", cfg, extra)
    with pytest.raises(WeightsError, match="unknown tensor 'mtp.0.norm.weight' \\(renamed 'dspark.layers.0.norm"):
        mlx_v4.load(tmp_path / "extra", dtype=mx.float32, fp8="dequantize")
    missing = {k: v for k, v in weights.items() if k != "mtp.1.attn.wkv.weight"}
    write_official_checkpoint(tmp_path / "missing", cfg, missing)
    with pytest.raises(WeightsError, match="no tensor for parameter 'dspark.layers.1.attn.wkv.weight'"):
        mlx_v4.load(tmp_path / "missing", dtype=mx.float32, fp8="dequantize")


def test_a_conversion_keeps_the_drafter_and_opens_in_mlx_lm(checkpoint, tmp_path):
    """quantize/ (recipe native) carries dspark.*; mlx-lm's hook builds the same model."""
    import mlx_lm
    from mlx.utils import tree_flatten
    from mlx_v4.quantize import convert

    dst = convert(checkpoint[0], tmp_path / "converted", recipe="native", progress=False).path
    ours, _ = mlx_v4.load(dst)
    a = ours.args
    assert has_dspark(ours) and (a.dspark_target_layer_ids, a.dspark_compress_ratios) == ([1, 2, 3], [0, 0, 0])
    theirs, _ = mlx_lm.load(str(dst), trust_remote_code=True)
    got, want = dict(tree_flatten(theirs.parameters())), dict(tree_flatten(ours.parameters()))
    assert got.keys() == want.keys() and any(k.startswith("dspark.") for k in want)
    assert all(got[k].dtype == want[k].dtype and mx.array_equal(got[k], want[k]) for k in want)


def test_distributed_ranks_skip_the_drafter():
    from mlx_v4.distributed import _needed, plan_split

    args = ModelArgs.from_dict(tiny_dspark_config())
    for mode in ("pipeline", "tensor"):
        split = plan_split(args, 2, mode, None)
        for rank in (0, 1):
            assert not _needed("dspark.layers.0.attn.wkv.weight", args, split, rank)
            assert not _needed("dspark.main_proj.weight", args, split, rank)
            assert not _needed("mtp.0.main_proj.weight", args, split, rank)


# ---- the forward against the transcription ------------------------------------------------------

@pytest.mark.parametrize("chunks", [[12], [5, 1, 9], [100, 60]], ids=["one", "three", "past-window"])
def test_drafter_matches_the_transcription(loaded, chunks):
    """Context fed in chunks (the last case overflows the 128-position window), then one block:
    base logits, the greedy Markov walk, the biased logits and the confidence."""
    model, W = loaded
    a = model.args
    rng = np.random.default_rng(len(chunks))
    start, n = 37, sum(chunks)
    hiddens = rng.standard_normal((n, 3 * a.hidden_size))
    anchor = int(rng.integers(2, a.vocab_size))
    drafter = DSparkDrafter(model)
    pos = start
    for c in chunks:
        ids = [int(t) for t in rng.integers(2, a.vocab_size, c)]
        ids[-1] = anchor if pos + c == start + n else ids[-1]
        drafter.observe(mx.array(hiddens[None, pos - start:pos - start + c], dtype=mx.float32), ids, pos)
        pos += c
    drafts = drafter.draft(5)
    prev = np.array([anchor] + drafts[:-1])
    base, biased, confidence = dspark_reference(W, a, hiddens, np.arange(start, start + n, dtype=np.float64),
                                                anchor, prev)
    np.testing.assert_allclose(np.array(drafter.logits), base, atol=5e-5, rtol=1e-4)
    assert drafts == np.argmax(biased, axis=-1).tolist()
    bias = drafter.net.markov_bias(mx.array(prev))
    np.testing.assert_allclose(np.array(drafter.logits + bias), biased, atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(np.array(drafter.acceptance(drafts)), confidence, atol=1e-5, rtol=1e-4)
    assert drafter.proposal is None and drafter.offset == start + n


@pytest.mark.parametrize("overrides", [
    dict(dspark_block_size=3, dspark_target_layer_ids=[0, 3], dspark_markov_rank=8, sliding_window=16,
         compress_ratios=[0, 4, 128, 4, 0, 0]),
    dict(dspark_block_size=1, dspark_target_layer_ids=[2], hc_mult=2, num_experts_per_tok=3,
         compress_ratios=[0, 4, 128, 4, 0]),
], ids=["2-stages-window16", "1-stage-block1"])
def test_drafter_matches_the_transcription_on_other_configs(tmp_path, overrides):
    _, exact = write_tiny_dspark_checkpoint(tmp_path, seed=9, **overrides)
    model, _ = mlx_v4.load(tmp_path, model_config={"fake_quant": False}, dtype=mx.float32, fp8="dequantize")
    W = {k: v.astype(np.float64) if v.dtype != np.int64 else v for k, v in exact.items()}
    a = model.args
    rng = np.random.default_rng(3)
    n, start = 30, 5  # more context than a 16-position window
    hiddens = rng.standard_normal((n, len(a.dspark_target_layer_ids) * a.hidden_size))
    ids = [int(t) for t in rng.integers(2, a.vocab_size, n)]
    drafter = DSparkDrafter(model)
    drafter.observe(mx.array(hiddens[None], dtype=mx.float32), ids, start)
    drafts = drafter.draft(a.dspark_block_size)
    prev = np.array([ids[-1]] + drafts[:-1])
    base, biased, confidence = dspark_reference(W, a, hiddens, np.arange(start, start + n, dtype=np.float64),
                                                ids[-1], prev)
    np.testing.assert_allclose(np.array(drafter.logits), base, atol=5e-5, rtol=1e-4)
    assert drafts == np.argmax(biased, axis=-1).tolist()
    np.testing.assert_allclose(np.array(drafter.acceptance(drafts)), confidence, atol=1e-5, rtol=1e-4)


def test_taps_are_the_mean_input_streams(loaded):
    model, _ = loaded
    ids = mx.array([[5, 9, 300, 7, 8, 1]])
    streams, tapped = model.tapped_streams(ids, model.make_cache(), (1, 3))
    cache = model.make_cache()
    x = mx.broadcast_to(model.embed(ids)[:, :, None], (1, 6, model.args.hc_mult, model.args.hidden_size))
    want = []
    for i, (layer, c) in enumerate(zip(model.layers, cache)):
        if i in (1, 3):
            want.append(x.mean(axis=2))
        x = layer(x, ids, c)
    np.testing.assert_array_equal(np.array(streams), np.array(x))
    np.testing.assert_array_equal(np.array(tapped), np.array(mx.concatenate(want, axis=-1)))
    assert model.tapped_streams(ids, model.make_cache())[1] is None


# ---- speculative decoding -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return random_model(ModelArgs.from_dict(tiny_dspark_config()), seed=5, dspark=True)


def _ids(n, seed=1):
    return np.random.default_rng(seed).integers(2, 1024, n).tolist()


_run = generate_ids


def _teach_markov(model, sequence, wrong_every):
    teach_markov(model.dspark, sequence, wrong_every)


@pytest.mark.parametrize("prompt_len,max_tokens", [(2, 16), (123, 16)])  # across 4/8/12.. and across 128
@pytest.mark.parametrize("k", [None, 2])
def test_greedy_with_dspark_equals_plain(tok, prompt_len, max_tokens, k):
    model = random_model(ModelArgs.from_dict(tiny_dspark_config()), seed=5, dspark=True)
    ids = _ids(prompt_len)
    plain, _, pfin, pcache = _run(model, tok, ids, max_tokens=max_tokens)
    _teach_markov(model, ids[-1:] + plain, wrong_every=4)
    got, stats, fin, cache = _run(model, tok, ids, max_tokens=max_tokens, draft="dspark", draft_tokens=k)
    assert got == plain and fin.reason == pfin.reason == "length"
    assert 0 < stats.accepted_tokens < stats.draft_tokens  # drafts kept and drafts rejected (rewound)
    assert stats.target_forwards < max_tokens - 1  # accepted drafts saved target forwards
    assert fin.cache_offset == pfin.cache_offset == prompt_len + max_tokens - 1
    nxt = mx.array([[plain[-1]]])
    np.testing.assert_allclose(np.array(model(nxt, cache)), np.array(model(nxt, pcache)), atol=1e-4, rtol=0)


def test_observe_rows_matches_observe_per_drafter(model):
    """The batched observe (one main_proj, one forward of the stages over every block, one head
    GEMM) against each drafter's own observe: the same contexts, hidden and logits, for a first
    observe, a window already full (past 128 positions) and a short history, fed ragged rows."""
    D = 3 * model.args.hidden_size
    rng = np.random.default_rng(11)
    histories, feeds = [0, 130, 5], []
    pairs = []
    for start, n in zip(histories, (3, 2, 1)):
        a, b = DSparkDrafter(model), DSparkDrafter(model)
        if start:
            h = mx.array(rng.standard_normal((1, start, D)), dtype=mx.float32)
            ids = rng.integers(2, 1024, start).tolist()
            a.observe(h, ids, 0)
            b.observe(h, ids, 0)
        pairs.append((a, b))
        feeds.append((mx.array(rng.standard_normal((1, n, D)), dtype=mx.float32), rng.integers(2, 1024, n).tolist(),
                      start))
    for (a, _), f in zip(pairs, feeds):
        a.observe(*f)
    DSparkDrafter.observe_rows([b for _, b in pairs], feeds)
    for a, b in pairs:
        assert (a.offset, a.anchor) == (b.offset, b.anchor)
        for ca, cb in zip(a.contexts, b.contexts):
            np.testing.assert_allclose(np.array(cb), np.array(ca), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.array(b.hidden), np.array(a.hidden), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.array(b.logits), np.array(a.logits), atol=1e-4, rtol=0)
    assert pairs[1][1].contexts[0].shape[1] == model.dspark.window
    with pytest.raises(RuntimeError, match="DSpark context at 132, fed position 5"):
        DSparkDrafter.observe_rows([pairs[1][1]], [feeds[2]])


def test_random_drafts_are_rejected_and_rewound(model, tok):
    ids = _ids(125, seed=3)
    plain = _run(model, tok, ids, max_tokens=10)[0]
    got, stats, _, _ = _run(model, tok, ids, max_tokens=10, draft="auto")  # auto picks DSpark
    assert got == plain and stats.draft_tokens > 0 and stats.accepted_tokens < stats.draft_tokens


def test_seeded_sampling_with_dspark_is_reproducible(model, tok):
    ids = _ids(10, seed=8)
    runs = [_run(model, tok, ids, max_tokens=8, temperature=1.0, top_p=0.9, seed=3, draft="dspark")[:2]
            for _ in range(2)]
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 8 and runs[0][1].draft_tokens > 0


def test_sampled_steps_verify_against_the_drafters_proposal(model, tok, monkeypatch):
    """Sampling: each step hands verify the q rows its drafts were drawn from; greedy: none."""
    import mlx_v4.draft.speculative as spec

    seen = []

    def spy(rows, drafts, sampling, proposal=None):
        seen.append((len(drafts), sampling.greedy, None if proposal is None else np.array(proposal)))
        return verify(rows, drafts, sampling, proposal)

    monkeypatch.setattr(spec, "verify", spy)
    _run(model, tok, _ids(6, seed=4), max_tokens=6, temperature=0.8, top_k=50, seed=1, draft="dspark")
    assert seen and all(not greedy and q is not None and q.shape == (k, model.args.vocab_size) for k, greedy, q in seen)
    for _, _, q in seen:
        np.testing.assert_allclose(q.sum(-1), 1, atol=1e-5)
        assert ((q > 0).sum(-1) <= 50).all()  # the drafts' rows are filtered like the target's
    seen.clear()
    _run(model, tok, _ids(6, seed=4), max_tokens=6, draft="dspark")
    assert seen and all(greedy and q is None for _, greedy, q in seen)


def test_draft_requests_dspark_cannot_serve(model, tok):
    with pytest.raises(DraftError, match="draft_tokens=6: a DSpark block drafts 1 to 5 tokens"):
        make_drafter(model, "dspark", 6, custom_sampler=False)
    with pytest.raises(DraftError, match="this checkpoint has no DSpark drafter"):
        make_drafter(random_model(tiny_args(), seed=1), "dspark", None, custom_sampler=False)
    assert make_drafter(model, "auto", None, custom_sampler=False).tokens == 5
    with pytest.raises(DSparkError, match="no DSpark drafter"):
        attach_dspark(Model(tiny_args()))
    from types import SimpleNamespace

    v41 = SimpleNamespace(args=SimpleNamespace(model_type="deepseek_v41"))
    with pytest.raises(DraftError, match="this checkpoint has no DSpark drafter"):  # a V4.1 without one
        make_drafter(v41, "dspark", None, custom_sampler=False)
    assert make_drafter(v41, "auto", None, custom_sampler=False) is None
    from mlx_v4.batch_draft import BatchDrafting

    for spec in ("dspark", "auto"):  # the batching engine drafts with DSpark too, reading its taps
        drafting = BatchDrafting(model, spec, None)
        assert drafting.enabled and drafting.taps == (1, 2, 3)
    with pytest.raises(DraftError, match="draft_tokens=6: a DSpark block drafts 1 to 5 tokens"):
        BatchDrafting(model, "dspark", 6)


# ---- sampling: the proposal q of sampled drafts --------------------------------------------------

def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


_CRIT = {3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # chi-square at p = 0.001


@pytest.mark.parametrize("settings", [Sampling(1.0), Sampling(0.7, top_p=0.9)], ids=["t1", "top_p"])
def test_rejection_sampling_with_a_proposal_follows_the_target(settings):
    """Drafts drawn from q (the second's q depends on the first draft, as the Markov head makes
    it): the first emitted token follows p0, the second (after a kept first) follows p1."""
    V, n = 8, 3000
    rng = np.random.default_rng(1)
    rows = mx.array(np.log(rng.dirichlet(np.ones(V) * 0.8, size=3)).astype(np.float32))
    target = np.array(mx.softmax(settings.filtered(rows), axis=-1))
    q0 = rng.dirichlet(np.ones(V))
    q1 = rng.dirichlet(np.ones(V), size=V)  # q1 given the first draft
    mx.random.seed(11)
    first, second, kept = np.zeros(V), np.zeros(V), 0
    for _ in range(n):
        d0 = int(rng.choice(V, p=q0))
        d1 = int(rng.choice(V, p=q1[d0]))
        a, nxt = verify(rows, [d0, d1], settings, mx.array(np.stack([q0, q1[d0]]).astype(np.float32)))
        if a == 0:
            first[nxt] += 1
        else:
            first[d0] += 1
            second[d1 if a == 2 else nxt] += 1
            kept += 1
    for counts, p in ((first, target[0]), (second, target[1])):
        assert _chi_square(counts, p) < _CRIT[int((p > 0).sum()) - 1]
    # the first draft is kept with probability sum_x q0(x) min(1, p0(x) / q0(x)) = sum_x min(q0, p0)
    assert abs(kept / n - np.minimum(q0, target[0]).sum()) < 4 * math.sqrt(0.25 / n)


def test_sampled_drafts_follow_their_proposal(model):
    """DSparkDrafter.draft samples each row from the distribution it reports as q."""
    drafter = DSparkDrafter(model)
    hid = mx.array(np.random.default_rng(2).standard_normal((1, 7, 3 * model.args.hidden_size)), dtype=mx.float32)
    drafter.observe(hid, [3, 4, 5, 6, 7, 8, 9], 0)
    settings = Sampling(1.5, top_k=5)
    mx.random.seed(5)
    counts, n = np.zeros(model.args.vocab_size), 1500
    q = None
    for _ in range(n):
        d = drafter.draft(1, settings)
        q = np.array(drafter.proposal[0]) if q is None else q
        np.testing.assert_array_equal(np.array(drafter.proposal[0]), q)  # row 0 does not depend on the draw
        counts[d[0]] += 1
    assert (q > 0).sum() == 5 and abs(q.sum() - 1) < 1e-5
    assert _chi_square(counts, q) < _CRIT[4]
    greedy = drafter.draft(3, Sampling(0.0))
    assert drafter.proposal is None and greedy[0] == int(np.argmax(np.array(
        drafter.logits[0] + drafter.net.markov_bias(mx.array([9]))[0])))
    assert math.isfinite(float(drafter.acceptance(greedy).sum()))
