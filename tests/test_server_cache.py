"""The server's prefix cache on the tiny random model: clones and rewinds continue exactly like
a fresh prefill, LRU eviction keeps the byte budget, and entries persisted to disk come back."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_v4.cache import cache_offset, checkpoint
from mlx_v4.generation import prefill
from mlx_v4.server.prefix_cache import PrefixCache, clone_at, common_prefix
from mlx_v4.testing.tiny import random_model, tiny_args


@pytest.fixture(scope="module")
def model():
    m = random_model(tiny_args())
    return m


def _logits(model, cache, ids):
    out = model(mx.array([ids], dtype=mx.int32), cache=cache)[:, -1, :]
    mx.eval(out)
    return out


def _ids(n, seed):
    return mx.random.randint(2, 1000, (n,), key=mx.random.key(seed)).tolist()


def test_common_prefix():
    a = list(range(1000))
    assert common_prefix(a, a[:700] + [5]) == 700
    assert common_prefix(a, []) == 0 and common_prefix(a, a) == 1000


def test_clone_and_rewind_match_fresh_prefill(model):
    base, tail_a, tail_b = _ids(260, 1), _ids(100, 2), _ids(20, 3)
    cache = model.make_cache()
    prefill(model, base + tail_a, cache, step_size=128, checkpoints=[len(base)])
    clone = clone_at(cache, len(base))
    assert cache_offset(clone) == len(base) and cache_offset(cache) == len(base) + len(tail_a)
    got_b = _logits(model, clone, tail_b)  # the clone branches off ...
    got_a = _logits(model, cache, tail_b)  # ... and the original goes on, untouched
    fresh = model.make_cache()
    prefill(model, base, fresh, step_size=128)
    want_b = _logits(model, fresh, tail_b)
    fresh = model.make_cache()
    prefill(model, base + tail_a, fresh, step_size=128)
    want_a = _logits(model, fresh, tail_b)
    assert mx.allclose(got_b, want_b, atol=1e-4).item()
    assert mx.allclose(got_a, want_a, atol=1e-4).item()


def _entry(model, ids, pool, turn_mark=None, marks=()):
    turn_mark = len(ids) - 10 if turn_mark is None else turn_mark
    lease = pool.acquire(ids)
    prefill(model, ids[lease.keep:], lease.cache, step_size=256,
            checkpoints=[m - lease.keep for m in (turn_mark, *marks)])
    checkpoint(lease.cache)
    pool.release(ids, lease.cache, turn_mark)
    return lease


def test_acquire_takes_continuations_and_clones_branches(model):
    pool = PrefixCache(model, budget_bytes=1 << 40)
    conv = _ids(200, 4)
    assert _entry(model, conv, pool).source == "new"
    # a continuation (diverges after the turn mark) takes the entry over
    lease = pool.acquire(conv[:195] + _ids(30, 5))
    assert lease.source == "taken" and lease.keep == 190 and not pool.entries
    # a branch that diverges early gets a clone at a checkpoint; the entry stays
    pool2 = PrefixCache(model, budget_bytes=1 << 40)
    _entry(model, conv, pool2, turn_mark=190)
    lease = pool2.acquire(conv[:190] + _ids(10, 6))
    assert lease.source == "taken"
    pool3 = PrefixCache(model, budget_bytes=1 << 40)
    _entry(model, conv, pool3, turn_mark=199, marks=(190,))
    lease = pool3.acquire(conv[:195] + _ids(10, 6))
    assert lease.source == "cloned" and lease.keep == 190 and len(pool3.entries) == 1


def test_lru_budget(model):
    probe = PrefixCache(model, budget_bytes=1 << 40)
    _entry(model, _ids(140, 7), probe)
    one = probe.resident_bytes
    pool = PrefixCache(model, budget_bytes=int(2.5 * one))
    convs = [_ids(140, 10 + i) for i in range(4)]
    for c in convs:
        _entry(model, c, pool)
    assert pool.resident_bytes <= pool.budget and len(pool.entries) == 2
    assert [e.tokens for e in pool.entries] == convs[2:]  # the oldest went first


def test_persisted_entries_resume(model, tmp_path):
    conv = _ids(200, 20)
    pool = PrefixCache(model, budget_bytes=1 << 40, cache_dir=tmp_path)
    _entry(model, conv, pool, turn_mark=180)
    assert pool.persist() == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # the end and the turn start
    restarted = PrefixCache(model, budget_bytes=1 << 40, cache_dir=tmp_path)
    assert restarted.stats()["disk_entries"] == 2
    nxt = conv + _ids(20, 21)
    lease = restarted.acquire(nxt)
    assert lease.source == "disk" and lease.keep == len(conv)
    got = _logits(model, lease.cache, nxt[len(conv):])
    fresh = model.make_cache()
    prefill(model, conv, fresh)
    assert mx.allclose(got, _logits(model, fresh, nxt[len(conv):]), atol=1e-4).item()
    # a branch after the turn start resumes from the other file
    lease = restarted.acquire(conv[:185] + [7, 8, 9])
    assert lease.source == "disk" and lease.keep == 180
    # another model's files are ignored
    other = random_model(tiny_args(), seed=1)
    other.weights_id = "another checkpoint"
    assert PrefixCache(other, cache_dir=tmp_path).stats()["disk_entries"] == 0


def test_bad_cache_files_are_skipped_and_removed(model, tmp_path, caplog):
    """Garbage, a truncated header and a header missing a field are skipped and removed with a
    log line (the files are the server's own); a file it did not name is left alone; a prompt
    that matched the broken file resumes from the next best one."""
    import logging
    import struct

    from mlx_v4.server.prefix_cache import _token_hash

    conv = _ids(200, 30)
    pool = PrefixCache(model, budget_bytes=1 << 40, cache_dir=tmp_path)
    _entry(model, conv, pool, turn_mark=180)
    assert pool.persist() == 1
    end = tmp_path / f"{_token_hash(conv)}.safetensors"
    arrays, meta = mx.load(str(end), return_metadata=True)
    del meta["offset"]
    mx.save_safetensors(str(end), arrays, metadata=meta)
    garbage = tmp_path / ("0" * 32 + ".safetensors")
    garbage.write_bytes(b"not a safetensors file at all")
    truncated = tmp_path / ("1" * 32 + ".safetensors")
    truncated.write_bytes(struct.pack("<Q", 1 << 40) + b"{")
    listed = tmp_path / ("2" * 32 + ".safetensors")
    listed.write_bytes(struct.pack("<Q", 2) + b"[]")
    notes = tmp_path / "notes.safetensors"
    notes.write_bytes(b"someone else's")
    with caplog.at_level(logging.WARNING, logger="mlx_v4.server"):
        restarted = PrefixCache(model, budget_bytes=1 << 40, cache_dir=tmp_path)
        assert restarted.stats()["disk_entries"] == 2
        assert not garbage.exists() and not truncated.exists() and not listed.exists() and notes.exists()
        lease = restarted.acquire(conv + _ids(20, 31))  # the end file is broken: the turn file serves
    assert lease.source == "disk" and lease.keep == 180 and not end.exists()
    assert restarted.stats()["disk_entries"] == 1 and restarted.hits == 1 and restarted.reused_tokens == 180
    logged = caplog.text
    for path in (garbage, truncated, listed, end):
        assert f"prefix cache: removing {path}: " in logged, logged
    # the edited file fails its content checksum (mlx_v4.cache_file) before any field is read
    assert f"prefix cache: skipping {notes}: " in logged and "contents do not match the checksum" in logged
