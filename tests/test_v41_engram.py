"""Engram tables stay on disk: rows are read with pread, never the table."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.v41.engram import EngramTable, EngramTableError
from mlx_v4.weights import read_header

ROWS, DIM = 4 << 20, 256  # a 1 GiB table (+ 32 MiB of scales)
KNOWN = {3: 0.5, 123457: -3.0, ROWS - 1: 448.0}


def sparse_table(path) -> None:
    """A safetensors file holding one huge FP8 table, sparse on disk but for a few known rows."""
    header = {"t.weight": {"dtype": "F8_E4M3", "shape": [ROWS, DIM], "data_offsets": [0, ROWS * DIM]},
              "t.scale": {"dtype": "F8_E8M0", "shape": [ROWS, DIM // 32],
                          "data_offsets": [ROWS * DIM, ROWS * DIM + ROWS * DIM // 32]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(base + ROWS * DIM + ROWS * DIM // 32)
        for row, value in KNOWN.items():
            f.seek(base + row * DIM)
            f.write(np.full(DIM, value, ml_dtypes.float8_e4m3fn).view(np.uint8).tobytes())
            f.seek(base + ROWS * DIM + row * (DIM // 32))
            f.write(bytes([127 + 2] * (DIM // 32)))  # scale 4


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("engram") / "table.safetensors"
    sparse_table(path)
    return path


def table(path) -> EngramTable:
    info = read_header(path)
    return EngramTable(info["t.weight"], info["t.scale"], ROWS, DIM)


def test_rows_read_exactly(table_file):
    t = table(table_file)
    rows = np.array([[3, 123457], [ROWS - 1, 3]])
    got = np.array(t.read(rows))
    assert got.shape == (2, 2, DIM)
    for (i, j), row in np.ndenumerate(rows):
        np.testing.assert_array_equal(got[i, j], np.full(DIM, 4 * KNOWN[row], np.float32))
    assert t.rows_read == 3  # each distinct row once


def test_many_rows_read_in_parallel(table_file):
    rows = np.concatenate([np.random.default_rng(1).integers(0, ROWS, 3000), list(KNOWN)])
    got = np.array(table(table_file).read(rows))
    want = np.zeros((len(rows), DIM), np.float32)
    for i, r in enumerate(rows):
        want[i] = 4 * KNOWN.get(int(r), 0.0)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7), (2, 17, 4), (601,), (3, 300)])
def test_rows_requested_ahead_equal_the_table_in_memory(shape):
    """Reads spread over the reader threads (spans of 4..256 rows, ragged ends), the inline read
    and the resident table give the same values bit for bit, on the tiny release-format table."""
    from pathlib import Path

    from mlx_v4.v41 import engram

    path = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    info = read_header(path / index["layers.1.engram.embed.weight"])
    w, s = info["layers.1.engram.embed.weight"], info["layers.1.engram.embed.scale"]
    on_disk, in_memory = (EngramTable(w, s, *w.shape) for _ in range(2))
    in_memory.make_resident()
    rows = np.random.default_rng(sum(shape)).integers(0, w.shape[0], shape)
    want = in_memory.read(rows)
    assert want.shape == (*shape, w.shape[1])
    ahead = on_disk.request(rows)
    distinct = len(np.unique(rows))
    assert len(ahead.futures) <= engram.READ_THREADS and (len(ahead.futures) > 1) == (distinct > engram.READ_MIN_SPAN)
    assert mx.array_equal(ahead.result(), want).item()
    assert mx.array_equal(on_disk.read(rows), want).item()
    assert on_disk.rows_read == 2 * len(np.unique(rows)) and on_disk.rows_requested == 2 * rows.size


def test_row_out_of_range_is_named(table_file):
    with pytest.raises(EngramTableError, match=f"row {ROWS} is outside the table's {ROWS} rows"):
        table(table_file).read(np.array([ROWS]))


def test_wrong_shape_is_named(table_file):
    info = read_header(table_file)
    with pytest.raises(EngramTableError, match=r"'t.weight' is F8_E4M3 \[4194304, 256\], expected"):
        EngramTable(info["t.weight"], info["t.scale"], ROWS, 128)


def test_table_stays_on_disk(table_file):
    """In a fresh process, 20,000 lookups spread over a 1 GiB table raise the peak RSS by a few MB."""
    script = textwrap.dedent(f"""
        import numpy as np, mlx.core as mx
        from mlx_v4.v41.engram import EngramTable
        from mlx_v4.weights import read_header

        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        info = read_header({str(table_file)!r})
        t = EngramTable(info["t.weight"], info["t.scale"], {ROWS}, {DIM})
        mx.eval(t.read(np.array([0])))
        before = hwm()
        rng = np.random.default_rng(0)
        for _ in range(20):
            mx.eval(t.read(rng.integers(0, {ROWS}, (1000,))))
        print(hwm() - before, t.rows_read)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    grew, rows_read = map(int, out.stdout.split())
    print(f"peak RSS growth {grew / 2**20:.2f} MiB for {rows_read} rows of a {ROWS * DIM / 2**30:.0f} GiB table")
    assert rows_read > 19000
    assert grew < 32 << 20, f"peak RSS grew by {grew / 2**20:.1f} MiB reading a {ROWS * DIM / 2**30:.0f} GiB table"


def test_loaded_model_keeps_tables_as_readers():
    from pathlib import Path

    from mlx.utils import tree_flatten

    import mlx_v4

    model, _ = mlx_v4.load(Path(__file__).parent / "fixtures" / "tiny_v41" / "model", dtype=mx.float32)
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert not [n for n in names if "engram.embed" in n]
    assert isinstance(model.layers[1].engram.table, EngramTable)
    before = model.layers[1].engram.table.rows_read
    model(mx.array([[5, 6, 7, 5, 6, 7]]))
    assert model.layers[1].engram.table.rows_read > before


def test_resident_only_within_budget():
    from pathlib import Path

    from mlx_v4.v41.weights import load_v41

    path = Path(__file__).parent / "fixtures" / "tiny_v41" / "model"
    lazy, _ = load_v41(path, dtype=mx.float32)
    small = lazy.layers[1].engram.table.nbytes
    resident, _ = load_v41(path, dtype=mx.float32, engram_budget_bytes=small)  # room for the first table only
    assert resident.layers[1].engram.table.resident and not resident.layers[5].engram.table.resident
    assert not lazy.layers[1].engram.table.resident
    ids = mx.array([[5, 6, 7, 5, 6, 7, 9]])
    np.testing.assert_array_equal(np.array(resident(ids)), np.array(lazy(ids)))
    assert resident.layers[1].engram.table.rows_read == 0 and resident.layers[5].engram.table.rows_read > 0


# ---- read-ahead: every Engram layer's rows requested when the step starts -----------------------
TINY = __import__("pathlib").Path(__file__).parent / "fixtures" / "tiny_v41" / "model"


def prefill_decode_rewind(model) -> list[np.ndarray]:
    """Logits of a prefill, three decode steps, a second chunk, a rewind and the steps after."""
    ids = mx.array(np.random.default_rng(5).integers(2, 512, (2, 64)).astype(np.int32))
    cache, outs = model.make_cache(), []
    for lo, hi in ((0, 40), (40, 41), (41, 42), (42, 43)):
        outs.append(np.array(model(ids[:, lo:hi], cache)))
    assert cache.checkpoint() == 43
    outs.append(np.array(model(ids[:, 43:60], cache)))
    cache.rewind(43)
    for lo, hi in ((50, 58), (58, 59), (59, 60)):
        outs.append(np.array(model(ids[:, lo:hi], cache)))
    return outs


def test_read_ahead_bit_identical(monkeypatch):
    import time

    import mlx_v4

    model, _ = mlx_v4.load(TINY, dtype=mx.float32)
    assert model.engram_read_ahead  # the default
    overlapped = []
    async_eval = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (overlapped.append(1), async_eval(*a)))
    for i in model.args.engram_layer_ids:  # a slow disk: layers compute while rows are still read
        model.layers[i].engram.table.read_hook = lambda: time.sleep(2e-4)
    ahead = prefill_decode_rewind(model)
    assert overlapped  # the path where a layer waits on rows still in flight was taken
    model.engram_read_ahead = False
    at_layer = prefill_decode_rewind(model)
    for a, b in zip(ahead, at_layer):
        np.testing.assert_array_equal(a, b)
    table = model.layers[1].engram.table
    assert table.rows_read > 0 and table.wait_seconds <= table.read_seconds


def test_read_ahead_requests_every_layer_before_the_first_engram_layer(monkeypatch):
    import mlx_v4
    from mlx_v4.v41 import engram

    model, _ = mlx_v4.load(TINY, dtype=mx.float32)
    tables = {id(model.layers[i].engram.table): i for i in model.args.engram_layer_ids}
    modules = {id(model.layers[i].engram): i for i in model.args.engram_layer_ids}
    events = []
    request, call = engram.EngramTable.request, engram.Engram.__call__

    def logged_request(self, rows, inline=False):
        events.append(("request", tables[id(self)]))
        return request(self, rows, inline)

    def logged_call(self, x, rows):
        events.append(("use", modules[id(self)], type(rows).__name__))
        return call(self, x, rows)

    monkeypatch.setattr(engram.EngramTable, "request", logged_request)
    monkeypatch.setattr(engram.Engram, "__call__", logged_call)
    mx.eval(model(mx.array([[5, 6, 7, 5, 6, 7]]), model.make_cache()))
    assert list(model.args.engram_layer_ids) == [1, 5]
    assert events == [("request", 1), ("request", 5), ("use", 1, "EngramRead"), ("use", 5, "EngramRead")]


# ---- the tokenizer's compressed map (the hash input): lean build, cached outside the model ------
@pytest.fixture(scope="module")
def reference_map():
    from mlx_v4.testing.token_map_reference import reference_compressed_token_map
    from mlx_v4.tokenizer import bundled_tokenizer_path

    path = str(bundled_tokenizer_path())
    return path, reference_compressed_token_map(path)


@pytest.fixture
def map_home(tmp_path, monkeypatch):
    from mlx_v4.v41 import engram_hash

    monkeypatch.setenv("MLX_V4_HOME", str(tmp_path / "home"))
    engram_hash.compressed_token_map.cache_clear()
    yield tmp_path / "home" / "engram"
    engram_hash.compressed_token_map.cache_clear()


def test_token_map_equals_the_reference_and_is_cached(reference_map, map_home, monkeypatch):
    from mlx_v4.v41 import engram_hash

    path, (want, want_size) = reference_map
    monkeypatch.setattr(engram_hash, "TOKEN_MAP_CHUNK", 997)  # ragged chunks, the last one short
    lookup, size = engram_hash.compressed_token_map(path)
    assert size == want_size and lookup.dtype == np.int32 and not lookup.flags.writeable
    np.testing.assert_array_equal(lookup, np.array(want, dtype=np.int32))
    [cached] = map_home.iterdir()
    assert cached.name.startswith("token_map-") and cached.suffix == ".npy"

    def no_build(_):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(engram_hash, "build_compressed_token_map", no_build)
    engram_hash.compressed_token_map.cache_clear()
    again, again_size = engram_hash.compressed_token_map(path)
    assert again_size == want_size
    np.testing.assert_array_equal(again, lookup)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong size"])
def test_damaged_token_map_cache_is_rebuilt(reference_map, map_home, damage, monkeypatch):
    from mlx_v4.v41 import engram_hash

    path, (want, want_size) = reference_map
    built = []  # the build itself is tested above (seconds each): here, that a damaged cache rebuilds
    monkeypatch.setattr(engram_hash, "build_compressed_token_map",
                        lambda _: (built.append(1), (np.array(want, dtype=np.int32), want_size))[1])
    cached = engram_hash._cached_map_path(path)
    cached.parent.mkdir(parents=True)
    good = np.append(np.array(want, dtype=np.int32), np.int32(want_size))
    if damage == "garbage":
        cached.write_bytes(b"not a map")
    elif damage == "truncated":
        np.save(cached, good)
        cached.write_bytes(cached.read_bytes()[:1000])
    else:
        np.save(cached, np.append(good[:-1], np.int32(want_size + 1)))  # a compressed id never used
    lookup, size = engram_hash.compressed_token_map(path)
    assert size == want_size and built == [1]
    np.testing.assert_array_equal(lookup, good[:-1])
    np.testing.assert_array_equal(np.load(cached), good)  # replaced by the good map


def test_token_map_without_a_writable_cache(reference_map, tmp_path, monkeypatch):
    from mlx_v4.v41 import engram_hash

    path, (want, want_size) = reference_map
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("MLX_V4_HOME", str(blocker))  # engram/ cannot be made under a file
    engram_hash.compressed_token_map.cache_clear()
    try:
        lookup, size = engram_hash.compressed_token_map(path)
    finally:
        engram_hash.compressed_token_map.cache_clear()
    assert size == want_size and list(tmp_path.iterdir()) == [blocker]
    np.testing.assert_array_equal(lookup, np.array(want, dtype=np.int32))


def test_repetitive_prompt_reads_each_distinct_row_once_per_step():
    import mlx_v4

    model, _ = mlx_v4.load(TINY, dtype=mx.float32)
    phrase = [17, 230, 41, 99, 5, 311]
    ids = np.array([phrase * 10], dtype=np.int32)  # one chunk of 60 tokens: the same 6 ten times
    history = np.full((1, model._hasher.history_len), -1, dtype=np.int64)
    rows, _ = model._hasher(ids, history)  # [1, 60, layers, cols]
    mx.eval(model(mx.array(ids), model.make_cache()))
    for j, i in enumerate(model.args.engram_layer_ids):
        table = model.layers[i].engram.table
        distinct = np.unique(rows[:, :, j])
        assert table.rows_requested == rows[:, :, j].size == 60 * model._hasher.layout.n_cols
        assert table.rows_read == len(distinct) < rows[:, :, j].size // 5  # read once, not per repeat
        print(f"layer {i}: {table.rows_requested} rows looked up, {table.rows_read} read from disk")
        one_by_one = mx.stack([table.read(np.array([r]))[0] for r in rows[0, :, j].reshape(-1)])
        assert mx.array_equal(table.read(rows[0, :, j]).reshape(-1, table.dim), one_by_one).item()


def test_prefill_reads_the_next_chunk_while_the_current_one_computes(monkeypatch):
    import mlx_v4
    from mlx_v4 import generation
    from mlx_v4.v41 import engram

    model, _ = mlx_v4.load(TINY, dtype=mx.float32)
    ids = np.random.default_rng(9).integers(2, 512, 70).tolist()
    want = model.make_cache()
    for lo, hi in ((0, 30), (30, 50), (50, 69)):  # the same chunks, no prefetch
        mx.eval(model(mx.array([ids[lo:hi]]), want))
    events = []
    request, eval_cache = engram.EngramTable.request, generation._eval_cache
    monkeypatch.setattr(engram.EngramTable, "request",
                        lambda self, rows, inline=False: (events.append("request"), request(self, rows, inline))[1])
    monkeypatch.setattr(generation, "_eval_cache", lambda cache: (events.append("eval"), eval_cache(cache))[1])
    cache = model.make_cache()
    assert generation.prefill(model, ids[:-1], cache, step_size=30, checkpoints=(50,)) == 69
    # chunks 0:30, 30:50 (the checkpoint), 50:69: each next chunk's 2 tables requested before the
    # current chunk is evaluated, and never again by the step itself
    assert events == ["request"] * 4 + ["eval"] + ["request"] * 2 + ["eval", "eval"]
    last = mx.array([ids[-1:]])
    model.prefetch([[123]], cache)  # a head start the next step cannot use (other ids): read anew
    np.testing.assert_array_equal(np.array(model(last, cache)), np.array(model(last, want)))
    assert np.array_equal(cache.engram_history, want.engram_history)
