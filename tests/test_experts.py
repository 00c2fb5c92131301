"""The routed-expert store: bit-identical logits to the resident model (official layout,
transformers layout, mlx-v4 conversions), the budget as a hard cap (peak RSS in a fresh
process), bad budgets, shards that vanish or are truncated mid-run (cache left intact),
concurrent reads, stats, policies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_v4 import experts
from mlx_v4.expert_plan import auto_expert_budget
from mlx_v4.experts import ExpertBudgetError, ExpertReadError, parse_budget
from mlx_v4.loader import load_model
from mlx_v4.testing.tiny import run_chunks

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "tiny"
IDS = mx.array(np.random.default_rng(0).integers(0, 1000, (1, 90)), dtype=mx.int32)
CHUNKS = [70, 1, 1, 18]  # prefill, two decode steps, a second prefill chunk


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from mlx_v4.quantize import convert

    d = tmp_path_factory.mktemp("conversions")
    return {"official": OFFICIAL, "transformers": FIXTURES / "tiny_hf",
            "4bit": convert(OFFICIAL, d / "q4", recipe="4bit", progress=False).path,
            "mxfp4": convert(OFFICIAL, d / "mx", recipe="mxfp4", progress=False).path}


def _minimum(path) -> int:
    m, _ = load_model(path, expert_budget=1 << 40)
    return m.expert_store.minimum


@pytest.mark.parametrize("layout", ["official", "transformers", "4bit", "mxfp4"])
def test_logits_bit_identical_to_resident(checkpoints, layout):
    path = checkpoints[layout]
    resident, _ = load_model(path)
    want = run_chunks(resident, IDS, CHUNKS)
    minimum = _minimum(path)
    for budget in (minimum, minimum * 5 // 2, 1 << 40):  # the 70-token chunk needs more than fits
        model, _ = load_model(path, expert_budget=budget)
        got = run_chunks(model, IDS, CHUNKS)
        assert mx.array_equal(got, want).item(), (layout, budget)
        stats = model.expert_store.stats()
        assert stats["misses"] > 0 and stats["resident_bytes"] <= budget
        assert model.fingerprint == resident.fingerprint  # saved caches move between the two


def test_conversion_reads_each_miss_in_one_pread(checkpoints):
    for layout in ("4bit", "mxfp4", "official"):
        model, _ = load_model(checkpoints[layout], expert_budget=_minimum(checkpoints[layout]))
        run_chunks(model, IDS, CHUNKS)
        s = model.expert_store.stats()
        specs = model.expert_store.specs
        if layout == "official":  # adjacent too, except where an expert straddles two shard files
            assert max(spec.reads_per_expert for spec in specs.values()) == 2
            assert s["misses"] < s["reads"] <= 2 * s["misses"]
        else:
            assert all(spec.reads_per_expert == 1 for spec in specs.values())
            assert s["reads"] == s["misses"], layout
        assert s["bytes_read"] == s["misses"] * specs[1].read_bytes


def test_parse_budget():
    assert parse_budget(None) is None and parse_budget("auto") == "auto" and parse_budget("AUTO") == "auto"
    assert parse_budget(12345) == 12345
    assert parse_budget("32GB") == 32 * 10**9 and parse_budget("512MiB") == 512 * 2**20
    assert parse_budget("1.5G") == 1_500_000_000 and parse_budget("100") == 100
    for bad in ("lots", "-3GB", "0", "12XB", 0, -5):
        with pytest.raises(ExpertBudgetError, match="expert budget"):
            parse_budget(bad)


def test_budget_below_top_k_is_refused_naming_the_minimum():
    minimum = _minimum(OFFICIAL)
    with pytest.raises(ExpertBudgetError) as e:
        load_model(OFFICIAL, expert_budget=minimum - 1)
    slot = minimum // 2  # tiny: top-2
    assert str(e.value) == (f"expert budget {experts.format_bytes(minimum - 1)} ({minimum - 1} bytes) is below the "
                            f"minimum {experts.format_bytes(minimum)} ({minimum} bytes): one layer's top-2 experts "
                            f"of {experts.format_bytes(slot)} each must fit at once")
    load_model(OFFICIAL, expert_budget=minimum)  # the minimum itself works


def test_auto_budget():
    assert auto_expert_budget(10, 5, 50, 100) is None  # 75 - 15 >= 50: every expert fits, keep them resident
    assert auto_expert_budget(10, 5, 80, 100) == 60
    model, _ = load_model(OFFICIAL, expert_budget="auto")  # a tiny model fits any machine
    assert model.expert_store is None


def _copy(tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(OFFICIAL, dst)
    return dst


def _expert_shard(path: Path, layer: int) -> Path:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    return path / index[f"layers.{layer}.ffn.experts.0.w1.weight"]


def _snapshot(cache):
    return [(c.offset, [np.array(a.astype(mx.float32)) for a in c.state], set(c.checkpoints)) for c in cache]


@pytest.mark.parametrize("damage", ["vanish", "truncate"])
def test_damaged_shard_names_the_file_and_leaves_the_cache_intact(tmp_path, damage):
    path = _copy(tmp_path)
    model, _ = load_model(path, expert_budget=_minimum(path))
    cache = model.make_cache()
    mx.eval(model(IDS[:, :30], cache))
    shard = _expert_shard(path, 2)
    original = shard.read_bytes()
    if damage == "vanish":
        shard.unlink()
    else:
        shard.write_bytes(original[: len(original) // 2])
    fed = []
    with pytest.raises(ExpertReadError) as e:
        for token in IDS[0, 30:40].tolist():  # some step misses an expert kept in that shard
            before = _snapshot(cache)
            mx.eval(model(mx.array([[token]], dtype=mx.int32), cache))
            fed.append(token)
    assert str(shard) in str(e.value)
    assert ("vanished" if damage == "vanish" else "truncated") in str(e.value)
    for c, (offset, state, checkpoints) in zip(cache, before):  # exactly as before the failed step
        assert c.offset == offset and set(c.checkpoints) == checkpoints
        assert all(np.array_equal(np.array(a.astype(mx.float32)), b) for a, b in zip(c.state, state))

    shard.write_bytes(original)  # the file comes back: the conversation carries on, unharmed
    resident, _ = load_model(OFFICIAL)
    ref = resident.make_cache()
    resident(IDS[:, :30], ref)
    for token in fed:
        resident(mx.array([[token]], dtype=mx.int32), ref)
    rest = IDS[:, 30 + len(fed):42]
    assert mx.array_equal(model(rest, cache), resident(rest, ref)).item()


def test_concurrent_reads_are_bit_exact():
    resident, _ = load_model(OFFICIAL)
    model, _ = load_model(OFFICIAL, expert_budget=1 << 40)
    store = experts.ExpertStore(model.expert_store.specs, model.expert_store.convert, 1 << 40, 2, threads=8)
    E = resident.args.n_routed_experts
    blocks = list(resident.layers) + [b for _, _, b in experts.drafter_blocks(resident)]  # the MTP block: layer n
    assert sorted(store.specs) == list(range(len(blocks)))
    for layer, block in enumerate(blocks):
        groups = list(store.stream(layer, range(E)))  # every expert of the layer read at once
        assert [e for g, _ in groups for e in g] == list(range(E))
        ref = block.ffn.experts
        for group, arrays in groups:
            for e, slot in zip(group, arrays):
                for name, a in slot.items():
                    w, leaf = name.split(".")
                    assert mx.array_equal(a, ref[w][leaf][e]).item() and a.dtype == ref[w][leaf].dtype
    s = store.stats()
    assert s["misses"] == E * len(blocks)
    assert s["reads"] == sum(len(x.runs) for spec in store.specs.values() for x in spec.experts)

    # two threads asking the same store at once get whole, correct answers (one at a time)
    def ask(layer, out):
        for group, arrays in store.stream(layer, [3, 1, 5]):
            out.extend((e, np.array(slot["w2.weight"])) for e, slot in zip(group, arrays))

    results = [[], []]
    threads = [threading.Thread(target=ask, args=(i, results[i])) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for layer, got in enumerate(results):
        assert sorted(e for e, _ in got) == [1, 3, 5]
        for e, a in got:
            assert np.array_equal(a, np.array(resident.layers[layer].ffn.experts.w2["weight"][e]))


def test_stats_and_the_budget_cap():
    minimum = _minimum(OFFICIAL)
    model, _ = load_model(OFFICIAL, expert_budget=minimum * 2)
    store = model.expert_store
    cache = model.make_cache()
    for i in range(0, 40, 4):
        mx.eval(model(IDS[:, i:i + 4], cache))
        s = store.stats()
        assert s["resident_bytes"] <= s["budget_bytes"] == minimum * 2
        assert s["resident_bytes"] == s["resident_experts"] * store.specs[0].slot_bytes
    s = store.stats()
    assert s["bytes_read"] == s["misses"] * store.specs[0].read_bytes
    assert s["hit_rate"] == s["hits"] / (s["hits"] + s["misses"]) and s["evictions"] > 0
    assert set(s) >= {"hits", "misses", "bytes_read", "resident_bytes", "budget_bytes"}

    big, _ = load_model(OFFICIAL, expert_budget=1 << 40)
    run_chunks(big, IDS, [90])
    first = big.expert_store.stats()
    run_chunks(big, IDS, [90])  # everything it needs is resident now
    second = big.expert_store.stats()
    assert second["misses"] == first["misses"] and second["hits"] == first["hits"] + first["hits"] + first["misses"]
    big.expert_store.reset_stats()
    assert big.expert_store.stats()["hits"] == 0


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import mlx.core as mx, numpy as np
    from mlx.utils import tree_flatten
    from mlx_v4.loader import load_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    start = status("VmRSS")
    model, _ = load_model(sys.argv[1], expert_budget=int(sys.argv[2]))
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    cache = model.make_cache()
    y = model(mx.array(np.random.default_rng(0).integers(0, 1000, (1, 64)), dtype=mx.int32), cache)
    for _ in range(8):
        y = model(mx.argmax(y[:, -1:], -1).astype(mx.int32), cache)
        mx.eval(y)
    print(json.dumps({"start": start, "peak": status("VmHWM"), "resident": resident,
                      "stats": model.expert_store.stats()}))
""")
#: What a run adds besides resident weights and the budget: MLX/BLAS pages touched by the first
#: computation, activations, the KV cache, the allocator's free-buffer cache, one read in flight.
RSS_OVERHEAD = 48 << 20


def test_peak_rss_stays_within_resident_weights_plus_budget(tmp_path):
    from mlx_v4.testing.synthetic import expert_nbytes, synthetic_config, write_synthetic_checkpoint

    cfg = synthetic_config(layers=4, experts=128, inter=2048)  # 512 experts of 418 KB: 214 MB
    path = write_synthetic_checkpoint(tmp_path / "synthetic", cfg)
    budget = 16 << 20
    total = 4 * 128 * expert_nbytes(cfg)
    assert total >= 10 * budget
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(budget)], capture_output=True, text=True,
                         env=dict(os.environ), check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["stats"]["total_bytes"] == total and r["stats"]["bytes_read"] > budget  # it streamed
    assert r["peak"] <= r["start"] + r["resident"] + budget + RSS_OVERHEAD, r


# ---- the CLI and the server show the store ----------------------------------------------------
def test_cli_bench_shows_expert_reads_and_refuses_a_tiny_budget():
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    runner = CliRunner()
    r = runner.invoke(app, ["bench", "--expert-budget", "100KB", "--contexts", "32", "--gen", "4"])
    assert r.exit_code == 0, r.output
    assert "Routed experts read on demand" in r.stdout and "hit rate" in r.stdout and "read per token" in r.stdout
    for budget, words in (("1KB", ["below the minimum", "--expert-budget"]), ("lots", ["expected a size"])):
        r = runner.invoke(app, ["generate", "-p", "hi", "--expert-budget", budget])
        assert r.exit_code == 1 and "Traceback" not in r.output
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and all(w in lines[0] for w in words), r.stderr


def test_server_health_and_chat_stats_show_expert_stats():
    from starlette.testclient import TestClient

    import mlx_v4
    from mlx_v4.server import create_app

    model, tok = mlx_v4.load(None, expert_budget="100KB")
    with TestClient(create_app(model, tok), base_url="http://127.0.0.1") as client:  # a loopback Host
        body = client.post("/v1/chat/completions", json={"model": "deepseek-v4", "messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 3}).json()
        assert body["choices"][0]["message"] is not None, body
        health = client.get("/health").json()
    assert health["experts"]["budget_bytes"] == 100_000 and health["experts"]["misses"] > 0

    from mlx_v4.cli.chat import ChatLoop

    shown = {}

    class UI:
        def session_stats(self, stats, breakdown, context, experts=None):
            shown.update(experts)

    loop = ChatLoop(UI(), model, tok, mlx_v4.ChatSession(model, tok), {})
    loop.show_stats()
    assert shown == model.expert_store.stats()


def test_each_needed_expert_counted_once_per_call_and_read_at_most_once():
    minimum = _minimum(OFFICIAL)
    model, _ = load_model(OFFICIAL, expert_budget=minimum * 5 // 2)  # a 70-token chunk needs more than fits
    store = model.expert_store
    calls, original = [], store.stream

    def recording(layer, needed):
        needed = list(needed)
        before = {e for e in needed if (layer, e) in store.slots}
        misses = store.stats()["misses"]
        yield from original(layer, needed)
        calls.append((len(needed), len(needed) - len(before), store.stats()["misses"] - misses))

    store.stream = recording
    run_chunks(model, IDS, CHUNKS)
    s = store.stats()
    assert s["hits"] + s["misses"] == sum(n for n, _, _ in calls)
    assert all(read <= cold for _, cold, read in calls)  # never read twice within one call
    assert any(n * store.specs[0].slot_bytes > store.budget for n, _, _ in calls)  # groups were needed


def test_resident_experts_compute_while_misses_are_read(monkeypatch):
    model, _ = load_model(OFFICIAL, expert_budget=1 << 40)
    store = model.expert_store
    list(store.stream(1, [0, 1]))  # 0 and 1 resident
    started = threading.Event()
    release = threading.Event()
    slow = store._read_runs

    def held_read(runs, views):
        started.set()
        assert release.wait(10)
        return slow(runs, views)

    monkeypatch.setattr(store, "_read_runs", held_read)
    groups = store.stream(1, [0, 1, 5])
    first, _ = next(groups)
    assert first == [0, 1] and started.wait(10)  # the hits are handed out while expert 5 is being read
    assert not store.pending[(1, 5)].future.done()
    release.set()
    second, arrays = next(groups)
    assert second == [5] and list(groups) == []


def test_fallback_when_mlx_buffers_are_not_host_memory(monkeypatch):
    monkeypatch.setattr(experts, "_SHARED", [False])
    resident, _ = load_model(OFFICIAL)
    model, _ = load_model(OFFICIAL, expert_budget=_minimum(OFFICIAL))
    assert mx.array_equal(run_chunks(model, IDS, CHUNKS), run_chunks(resident, IDS, CHUNKS)).item()


def test_auto_budget_too_small_says_so(monkeypatch):
    from mlx_v4 import platform

    monkeypatch.setattr(platform, "total_memory_bytes", lambda: 1_000_000)  # a machine far too small
    with pytest.raises(ExpertBudgetError, match="expert budget 'auto': 75% of this machine's memory"):
        load_model(OFFICIAL, expert_budget="auto")
