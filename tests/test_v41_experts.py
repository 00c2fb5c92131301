"""DeepSeek V4.1 under one budget: routed experts and Engram tables through the expert store
(mlx_v4/v41/streaming.py, ExpertStore.admit_tables). Logits bit-identical to the fully resident
model, the budget never exceeded, tables many times the budget left on disk (peak RSS in a fresh
process), a budget too small for one layer refused with one clear error."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_v4 import experts
from mlx_v4.experts import ExpertBudgetError
from mlx_v4.loader import load_model
from mlx_v4.v41.engram import EngramTable, EngramTableError
from mlx_v4.v41.weights import load_v41

MODEL = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"
IDS = mx.array(np.random.default_rng(3).integers(3, 500, (1, 60)), dtype=mx.int32)
CHUNKS = [40, 1, 1, 1, 17]  # prefill, three decode steps, a second prefill chunk


def run_checked(model, ids=IDS, chunks=CHUNKS) -> mx.array:
    """Logits of ``ids`` fed in ``chunks``; with a store, the budget is checked after every step
    and at every group of experts handed out inside a step."""
    store = model.expert_store
    if store is not None:
        original = store.stream

        def checked(layer, needed):
            for group in original(layer, needed):
                assert store.resident_bytes + store.reserved <= store.budget
                yield group

        store.stream = checked
    cache, outs, pos = model.make_cache(), [], 0
    try:
        for n in chunks:
            outs.append(model(ids[:, pos:pos + n], cache))
            mx.eval(outs[-1])
            pos += n
            if store is not None:
                assert store.stats()["resident_bytes"] <= store.budget
    finally:
        if store is not None:
            del store.stream
    return mx.concatenate(outs, axis=1)


@pytest.fixture(scope="module")
def reference():
    """Everything resident: stacked experts, both Engram tables in memory."""
    model, _ = load_v41(MODEL, dtype=mx.float32, engram_budget_bytes=1 << 30)
    assert all(model.layers[i].engram.table.resident for i in (1, 5))
    return model, run_checked(model)


@pytest.fixture(scope="module")
def sizes():
    model, _ = load_v41(MODEL, dtype=mx.float32, expert_budget=1 << 40)
    store = model.expert_store
    t1, t5 = (model.layers[i].engram.table.nbytes for i in (1, 5))
    return {"minimum": store.minimum, "experts": store.total_bytes, "t1": t1, "t5": t5}


CASES = {  # name -> (budget from the sizes, experts evicted, tables resident)
    "experts evicted, Engram on disk": (lambda s: s["minimum"], True, (False, False)),
    "experts evicted in groups, Engram on disk": (lambda s: s["minimum"] * 5 // 2, True, (False, False)),
    "experts on demand, one table resident": (lambda s: s["experts"] + s["t1"] + s["t5"] - 1, False, (True, False)),
    "everything fits": (lambda s: 1 << 40, False, (True, True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_bit_identical_to_resident(reference, sizes, case):
    resident, want = reference
    budget_of, evicts, tables = CASES[case]
    budget = budget_of(sizes)
    model, _ = load_model(MODEL, dtype=mx.float32, expert_budget=budget)
    got = run_checked(model)
    assert mx.array_equal(got, want).item(), case
    assert model.fingerprint == resident.fingerprint  # saved caches move between the two
    s = model.expert_store.stats()
    assert s["misses"] > 0 and (s["evictions"] > 0) == evicts
    assert tuple(model.layers[i].engram.table.resident for i in (1, 5)) == tables
    engram = s["engram"]
    assert engram["resident_tables"] == sum(tables) and engram["tables"] == 2
    assert engram["resident_bytes"] == sizes["t1"] * tables[0] + sizes["t5"] * tables[1]
    assert (engram["hits"] > 0) == tables[0] and (engram["misses"] > 0) == (not tables[1])
    assert engram["bytes_read"] == engram["misses"] * model.layers[1].engram.table.row_bytes
    assert s["resident_bytes"] == s["resident_experts"] * model.expert_store.specs[0].slot_bytes + engram["resident_bytes"]


def test_mx_formats_stream_bit_identical():
    """Experts kept as mxfp4 (as on Metal): slots are the stack's views, evicted and read again."""
    kw = dict(dtype=mx.float32, fp4="mxfp4", fp8="mxfp8")
    resident, _ = load_v41(MODEL, **kw)
    want = run_checked(resident)
    probe, _ = load_v41(MODEL, expert_budget=1 << 40, **kw)
    spec = probe.expert_store.specs[0]
    assert spec.quant["w1"]["mode"] == "mxfp4" and spec.slot_bytes == spec.read_bytes  # stored as read
    model, _ = load_v41(MODEL, expert_budget=probe.expert_store.minimum * 3, **kw)
    assert mx.array_equal(run_checked(model), want).item()
    assert model.expert_store.stats()["evictions"] > 0 and model.fingerprint == resident.fingerprint


def test_without_a_budget_experts_resident_and_engram_on_disk(reference):
    _, want = reference
    model, _ = load_model(MODEL, dtype=mx.float32)
    assert model.expert_store is None
    assert not any(model.layers[i].engram.table.resident for i in (1, 5))
    assert mx.array_equal(run_checked(model), want).item()
    assert model.layers[1].engram.table.rows_read > 0


def test_every_expert_read_once_per_call_and_slot_bytes_exact(sizes):
    model, _ = load_model(MODEL, dtype=mx.float32, expert_budget=sizes["minimum"])
    run_checked(model)
    store = model.expert_store
    spec = store.specs[0]
    assert spec.reads_per_expert == 1  # scales and weights of one expert are adjacent: one pread
    s = store.stats()
    assert s["reads"] == s["misses"] and s["bytes_read"] == s["misses"] * spec.read_bytes
    assert store.total_bytes == 8 * 8 * spec.slot_bytes  # 8 layers x 8 experts


def test_budget_below_one_layers_experts_is_one_clear_error(sizes):
    minimum = sizes["minimum"]
    with pytest.raises(ExpertBudgetError) as e:
        load_model(MODEL, dtype=mx.float32, expert_budget=minimum - 1)
    assert str(e.value) == (f"expert budget {experts.format_bytes(minimum - 1)} ({minimum - 1} bytes) is below the "
                            f"minimum {experts.format_bytes(minimum)} ({minimum} bytes): one layer's top-2 experts "
                            f"of {experts.format_bytes(minimum // 2)} each must fit at once")

    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    for command in (["bench", "--contexts", "8", "--gen", "1"], ["generate", "-p", "hi"], ["chat"], ["serve"]):
        r = CliRunner().invoke(app, [*command, "-m", str(MODEL), "--expert-budget", "1KB"], input="")
        assert r.exit_code == 1 and "Traceback" not in r.output, command  # the flag reached V4.1's loader
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "below the minimum" in lines[0] and "--expert-budget" in lines[0], r.stderr


def test_bench_shows_engram_reads():
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["bench", "-m", str(MODEL), "--expert-budget", "60KB", "--contexts", "16",
                                 "--gen", "2"])
    assert r.exit_code == 0, r.output
    assert "Routed experts read on demand (with Engram tables)" in r.stdout
    assert "2 on disk" in r.stdout and "read from disk" in r.stdout


def test_auto_budget_loads_experts_resident_when_they_fit():
    model, _ = load_model(MODEL, dtype=mx.float32, expert_budget="auto")  # a tiny model fits any machine
    assert model.expert_store is None
    assert all(model.layers[i].engram.table.resident for i in (1, 5))  # what is left after the experts


def test_auto_budget_streams_when_the_experts_do_not_fit(monkeypatch, sizes, reference):
    from mlx.utils import tree_flatten

    from mlx_v4 import platform
    from mlx_v4.expert_plan import AUTO_CONTEXT_TOKENS
    from mlx_v4.v41.cache import bytes_per_token

    # 75% of this "machine" holds the other weights, the KV cache and twice the experts' minimum
    model, _ = load_v41(MODEL, dtype=mx.float32)
    other = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if ".ffn.experts.w" not in k)

    per = bytes_per_token(model.args)
    kv = int(per["total"] * AUTO_CONTEXT_TOKENS + per["window_constant"])
    monkeypatch.setattr(platform, "total_memory_bytes", lambda: int((other + kv + 2 * sizes["minimum"]) / 0.75) + 4)
    streamed, _ = load_model(MODEL, dtype=mx.float32, expert_budget="auto")
    store = streamed.expert_store
    assert store is not None and sizes["minimum"] <= store.budget < sizes["experts"]
    assert mx.array_equal(run_checked(streamed), reference[1]).item()
    monkeypatch.setattr(platform, "total_memory_bytes", lambda: 1000)
    with pytest.raises(ExpertBudgetError, match="expert budget 'auto': 75% of this machine's memory"):
        load_model(MODEL, dtype=mx.float32, expert_budget="auto")


# ---- tables far larger than the budget stay on disk ------------------------------------------
BIG_VOCAB = 2_000_000  # Engram tables of ~8M rows x 33 bytes: 264 MB each


def _sparse_table_shard(path: Path, name: str, rows: int, dim: int) -> None:
    """A shard holding one FP8 table and its scales, all zero, sparse on disk."""
    header = {name + ".weight": {"dtype": "F8_E4M3", "shape": [rows, dim], "data_offsets": [0, rows * dim]},
              name + ".scale": {"dtype": "F8_E8M0", "shape": [rows, dim // 32],
                                "data_offsets": [rows * dim, rows * dim + rows * (dim // 32)]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + rows * (dim + dim // 32))


def big_engram_checkpoint(dst: Path) -> tuple[Path, int]:
    """The tiny V4.1 checkpoint with Engram tables of ~8M rows (the hash layout of a larger
    ``engram_vocab_size``); -> (path, bytes of both tables)."""
    from mlx_v4.v41.engram_hash import EngramLayout

    shutil.copytree(MODEL, dst)
    config = json.loads((dst / "config.json").read_text())
    text = config["text_config"]
    layout = EngramLayout.build(text["engram_layer_ids"], text["engram_max_ngram_size"], text["engram_n_heads"],
                                text["engram_head_dim"], BIG_VOCAB)
    text["engram_vocab_size"], text["engram_num_embeddings"] = BIG_VOCAB, layout.table_rows()
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    total = 0
    for layer, rows in zip(text["engram_layer_ids"], layout.table_rows()):
        name = f"layers.{layer}.engram.embed"
        shard = dst / index[name + ".weight"]
        assert {k for k, v in index.items() if v == shard.name} == {name + ".weight", name + ".scale"}
        _sparse_table_shard(shard, name, rows, text["engram_head_dim"])
        total += rows * (text["engram_head_dim"] + text["engram_head_dim"] // 32)
    return dst, total


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import mlx_v4
    import mlx.core as mx, numpy as np
    from mlx.utils import tree_flatten

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    # the tokenizer's compressed map (the Engram hash input) first, whatever the tables' size
    # (built once: ~90 MB of the tokenizers library's working memory; then read from our cache
    # dir); the peak is measured from there, for the model alone (no chat tokenizer)
    from mlx_v4.loader import load_model
    from mlx_v4.v41.engram_hash import compressed_token_map
    from mlx_v4.v41.weights import tokenizer_file
    from pathlib import Path
    compressed_token_map(str(tokenizer_file(Path(sys.argv[1]))))
    start = status("VmHWM")
    model, _ = load_model(sys.argv[1], dtype=mx.float32, expert_budget=int(sys.argv[2]))
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    cache = model.make_cache()
    y = model(mx.array(np.random.default_rng(0).integers(3, 500, (1, 48)), dtype=mx.int32), cache)
    for _ in range(8):
        y = model(mx.argmax(y[:, -1:], -1).astype(mx.int32), cache)
        mx.eval(y)
    print(json.dumps({"start": start, "peak": status("VmHWM"), "resident": resident,
                      "stats": model.expert_store.stats()}))
""")
#: Besides the resident weights and the budget: MLX/BLAS pages touched by the first computation,
#: activations, the KV cache, the hasher's tables, reads in flight.
RSS_OVERHEAD = 48 << 20


def test_engram_tables_ten_times_the_budget_stay_on_disk(tmp_path):
    path, tables = big_engram_checkpoint(tmp_path / "big")
    budget = 2 << 20  # every tiny expert (1.6 MB) fits; neither 264 MB table does
    assert tables >= 100 * budget
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(budget)], capture_output=True, text=True,
                         env=dict(os.environ), check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    engram = r["stats"]["engram"]
    assert engram["total_bytes"] == tables and engram["resident_tables"] == 0 and engram["misses"] > 0
    assert r["stats"]["resident_bytes"] <= budget
    grew = r["peak"] - r["start"]
    print(f"peak RSS growth {grew / 2**20:.1f} MiB with {tables / 2**20:.0f} MiB of Engram tables, "
          f"budget {budget / 2**20:.0f} MiB, resident weights {r['resident'] / 2**20:.1f} MiB")
    assert r["peak"] <= r["start"] + r["resident"] + budget + RSS_OVERHEAD, r


def test_engram_table_admitted_only_beside_every_expert(sizes):
    model, _ = load_v41(MODEL, dtype=mx.float32, expert_budget=sizes["experts"] + sizes["t1"] - 1)
    store = model.expert_store
    assert store.table_bytes == 0 and not model.layers[1].engram.table.resident  # one byte short
    assert set(store.tables) == {"layers.1.engram.embed", "layers.5.engram.embed"}
    assert all(isinstance(t, EngramTable) for t in store.tables.values())
    store.reset_stats()
    assert store.stats()["engram"]["misses"] == 0


def test_chat_stats_show_engram_reads(capsys):
    from mlx_v4.cli.chat import ChatLoop
    from mlx_v4.cli.ui import UI

    import mlx_v4

    model, tok = mlx_v4.load(MODEL, dtype=mx.float32, expert_budget="60KB")
    run_checked(model, chunks=[60])
    ChatLoop(UI(interactive=False), model, tok, mlx_v4.ChatSession(model, tok), {}).show_stats()
    err = " ".join(capsys.readouterr().err.split())  # the table wraps at the console's width
    engram = model.expert_store.stats()["engram"]
    assert "expert hits" in err and "Engram tables" in err
    assert f"2 on disk (18.0 KB); rows 0 from memory, {engram['misses']:,} read from disk" in err


@pytest.mark.parametrize("read_ahead", [True, False])
def test_truncated_engram_table_names_the_file_and_leaves_the_cache_intact(tmp_path, sizes, read_ahead):
    path = tmp_path / "ckpt"
    shutil.copytree(MODEL, path)
    model, _ = load_model(path, dtype=mx.float32, expert_budget=sizes["minimum"])
    model.engram_read_ahead = read_ahead  # the error surfaces at the layer, from the reader thread or not
    cache = model.make_cache()
    mx.eval(model(IDS[:, :40], cache))
    shard = Path(model.layers[5].engram.table.path)
    original = shard.read_bytes()
    shard.write_bytes(original[:300])  # the header and a few rows: every other row is past the end
    before = [(c.offset, [np.array(a) for a in c.state]) for c in cache]
    history = cache.engram_history.copy()
    with pytest.raises(EngramTableError) as e:
        model(IDS[:, 40:41], cache)
    assert str(shard) in str(e.value) and "truncated" in str(e.value)
    assert np.array_equal(cache.engram_history, history)  # the step's n-gram history was rewound too
    for c, (offset, state) in zip(cache, before):
        assert c.offset == offset and all(np.array_equal(np.array(a), b) for a, b in zip(c.state, state))
    shard.write_bytes(original)  # back: the conversation carries on as if nothing happened
    resident, _ = load_v41(MODEL, dtype=mx.float32)
    ref = resident.make_cache()
    resident(IDS[:, :40], ref)
    assert mx.array_equal(model(IDS[:, 40:44], cache), resident(IDS[:, 40:44], ref)).item()


def test_server_health_shows_engram_reads():
    from starlette.testclient import TestClient

    import mlx_v4
    from mlx_v4.server import create_app

    model, tok = mlx_v4.load(MODEL, dtype=mx.float32, expert_budget="60KB")
    run_checked(model, chunks=[20])
    with TestClient(create_app(model, tok), base_url="http://127.0.0.1") as client:
        health = client.get("/health").json()
    assert health["experts"]["budget_bytes"] == 60_000
    assert health["experts"]["engram"] == model.expert_store.stats()["engram"]
    assert health["experts"]["engram"]["misses"] > 0


def test_expert_tensor_of_the_wrong_shape_is_named():
    from mlx_v4.v41.streaming import ExpertConversion, plan_experts
    from mlx_v4.weights import WeightsError, scan_checkpoint

    infos = scan_checkpoint(MODEL)
    pairs = [(f"layers.0.ffn.experts.{e}.w1.weight", f"layers.0.ffn.experts.{e}.w1.scale") for e in range(8)]
    convert = ExpertConversion("dequantize", mx.float32)
    specs = plan_experts(infos, {(0, "w1"): pairs, (0, "w2"): [(w.replace("w1", "w2"), s.replace("w1", "w2"))
                                                               for w, s in pairs],
                                 (0, "w3"): [(w.replace("w1", "w3"), s.replace("w1", "w3")) for w, s in pairs]},
                         {(0, "w1"): (32, 64), (0, "w2"): (64, 32), (0, "w3"): (32, 64)}, 8, convert)
    assert specs[0].arrays["w1.weight"] == ((32, 64), mx.float32)
    with pytest.raises(WeightsError) as e:  # a config whose hidden size disagrees with the tensors
        plan_experts(infos, {(0, "w1"): pairs}, {(0, "w1"): (32, 128)}, 8, convert)
    assert str(e.value) == (f"{infos[pairs[0][0]].file}: expert tensor 'layers.0.ffn.experts.0.w1.weight' is I8 "
                            "[32, 32], expected packed FP4 (I8) [32, 64]")


# ---- `mlx-v4 convert` outputs stream too ----------------------------------------------------------
#: Recipe -> loader formats: ``native`` twice (FP4 experts dequantized as on CPU, kept mxfp4 as on Metal).
CONVERSIONS = {"native": {}, "native-mx": {"fp8": "mxfp8", "fp4": "mxfp4"}, "mxfp4": {}, "4bit": {}, "8bit": {},
               "mixed-4-8": {}, "bf16": {}}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    from quantize import convert

    d = tmp_path_factory.mktemp("v41conv")
    return {r: convert(MODEL, d / r, recipe=r, max_shard_bytes=200_000, progress=False).path
            for r in dict.fromkeys(c.removesuffix("-mx") for c in CONVERSIONS)}


@pytest.mark.parametrize("case", list(CONVERSIONS))
def test_conversion_streams_bit_identical_to_resident(conversions, case):
    """A conversion (routed experts one tensor per expert, each expert's w1/w2/w3 adjacent) under
    the smallest budget: the logits of the resident conversion, prefill and decode, bit for bit;
    one read per miss; the budget never exceeded (run_checked)."""
    path, kw = conversions[case.removesuffix("-mx")], CONVERSIONS[case]
    load = load_v41 if kw else load_model  # (mlx_v4.load picks the formats for the machine)
    resident, _ = load(path, dtype=mx.float32, **kw)
    want = run_checked(resident)
    minimum = load(path, dtype=mx.float32, expert_budget=1 << 40, **kw)[0].expert_store.minimum
    model, _ = load(path, dtype=mx.float32, expert_budget=minimum, **kw)
    store = model.expert_store
    assert sorted(store.specs) == list(range(8))
    assert not any(".ffn.experts.w" in k for k, _ in _flat(model))  # no stack left resident beside the store
    if kw:  # slots as the resident stack holds them: the stored mxfp4 bytes
        assert store.specs[0].quant["w1"]["mode"] == "mxfp4"
    assert mx.array_equal(run_checked(model), want).item(), case
    s = store.stats()
    assert s["evictions"] > 0 and s["resident_bytes"] <= minimum == store.budget
    assert all(spec.reads_per_expert == 1 for spec in store.specs.values())
    assert s["reads"] == s["misses"] and s["bytes_read"] == s["misses"] * store.specs[0].read_bytes
    assert model.fingerprint == resident.fingerprint


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


def test_conversion_auto_budget_counts_the_experts_once(conversions, monkeypatch):
    """"auto" on a conversion sizes the other weights without the experts it has stacked (lazily)
    for a resident load, so they are not counted twice; a machine with room loads them resident."""
    from mlx_v4.v41 import streaming

    path = conversions["4bit"]
    seen, real = {}, streaming.auto_budget

    def spy(resident, args, experts_bytes):
        seen.update(resident=resident, experts=experts_bytes)
        return real(resident, args, experts_bytes)

    monkeypatch.setattr(streaming, "auto_budget", spy)
    model, _ = load_model(path, dtype=mx.float32, expert_budget="auto")
    assert model.expert_store is None  # a tiny model fits any machine
    params = _flat(model)
    stacked = sum(v.nbytes for k, v in params if ".ffn.experts.w" in k)
    assert seen["resident"] == sum(v.nbytes for _, v in params) - stacked
    assert seen["experts"] == load_model(path, dtype=mx.float32, expert_budget=1 << 40)[0].expert_store.total_bytes


def test_conversion_with_a_drafter_streams_its_experts(tmp_path):
    """A native conversion keeps DSpark (``dspark.*``): its stages' routed experts are store layers
    too, under the same budget, and the drafter's logits are bit-identical to the resident ones."""
    from mlx_v4.draft.speculative import DSparkDrafter
    from mlx_v4.experts import StreamedExperts, drafter_blocks
    from mlx_v4.testing.dspark_v41 import write_tiny_v41_dspark_checkpoint
    from quantize import convert

    write_tiny_v41_dspark_checkpoint(tmp_path / "src", json.loads((MODEL / "config.json").read_text()), seed=3)
    ids = np.random.default_rng(2).integers(3, 500, 20).tolist()
    for recipe in ("native", "4bit"):
        path = convert(tmp_path / "src", tmp_path / recipe, recipe=recipe, progress=False).path
        minimum = load_model(path, dtype=mx.float32, expert_budget=1 << 40)[0].expert_store.minimum
        results = []
        for budget in (None, minimum):
            model, _ = load_model(path, dtype=mx.float32, expert_budget=budget)
            if budget is not None:
                blocks = drafter_blocks(model)
                assert len(blocks) == 2 and all(isinstance(b.ffn.experts, StreamedExperts) for _, _, b in blocks)
                assert {i for i, _, _ in blocks} <= set(model.expert_store.specs)
            drafter = DSparkDrafter(model)
            _, tapped = model.tapped_streams(mx.array([ids]), model.make_cache(), drafter.taps)
            drafter.observe(tapped, ids[1:] + [7], 0)
            results.append(np.array(drafter.logits))
            if budget is not None:
                s = model.expert_store.stats()
                assert s["resident_bytes"] <= budget and s["evictions"] > 0
        np.testing.assert_array_equal(results[1], results[0])


def test_conversion_expert_tensor_missing_or_misshapen_is_named(conversions):
    from mlx_v4.v41.converted import converted_expert_entries, own_quantization
    from mlx_v4.weights import WeightsError, scan_checkpoint

    path = conversions["4bit"]
    infos, quant = scan_checkpoint(path), own_quantization(path)
    assert quant["layers.0.ffn.experts.w1"]["bits"] == 4
    stack = {"layers.0.ffn.experts.w1.weight": mx.zeros((8, 32, 64))}
    assert len(converted_expert_entries(path, infos, stack, quant)["layers.0.ffn.experts"]["w1"].parts) == 8
    w = infos["layers.0.ffn.experts.0.w1.weight"]
    with pytest.raises(WeightsError) as e:  # a config whose hidden size disagrees with the tensors
        converted_expert_entries(path, infos, {"layers.0.ffn.experts.w1.weight": mx.zeros((8, 32, 128))}, quant)
    assert str(e.value) == (f"{w.file}: expert tensor 'layers.0.ffn.experts.0.w1.weight' has shape [32, 8], the "
                            "config implies [32, 16]")
    del infos["layers.0.ffn.experts.5.w1.scales"]
    with pytest.raises(WeightsError) as e:
        converted_expert_entries(path, infos, stack, quant)
    assert str(e.value) == f"{path}: the conversion has no tensor 'layers.0.ffn.experts.5.w1.scales'"
