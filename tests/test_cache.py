"""The KV cache: packed storage loses nothing, sizes, save/load, rewind."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_v4.cache import (
    CacheFileError,
    accept,
    cache_breakdown,
    cache_nbytes,
    cache_offset,
    checkpoint,
    entry_nbytes,
    load_cache,
    make_cache,
    planned_nbytes,
    reserve,
    rewind,
    save_cache,
    speculate,
)
from mlx_v4.config import preset
from mlx_v4.testing.tiny import random_model, tiny_args


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_args(), seed=7)


def _ids(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 1024, (1, n)), dtype=mx.int32)


def test_packed_cache_gives_the_same_logits_as_unpacked_rounded_values(model):
    ids = _ids(260)
    packed, plain = make_cache(model.args), make_cache(model.args, packed=False)
    assert packed[1].entries.length == 0
    a = [model(ids[:, :200], packed), model(ids[:, 200:], packed)]
    b = [model(ids[:, :200], plain), model(ids[:, 200:], plain)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.array(x), np.array(y))
    # and smaller: 64 FP8 + 1 scale + 64 bf16 = 193 bytes per entry vs 128 float32 = 512
    assert cache_breakdown(packed)["compressed"] * 512 == cache_breakdown(plain)["compressed"] * 193


def test_packed_storage_dtypes_and_bytes_per_entry(model):
    cache = make_cache(model.args)
    model(_ids(64), cache)
    codes, scale, rope = cache[1].entries.view()
    assert (codes.dtype, scale.dtype, rope.dtype) == (mx.uint8, mx.uint8, mx.bfloat16)
    assert codes.shape[-1] == 64 and scale.shape[-1] == 1 and rope.shape[-1] == 64
    packed, scales = cache[1].index_keys.view()
    assert packed.dtype == mx.uint8 and packed.shape[-1] == 32 and scales.shape[-1] == 2
    main, index = entry_nbytes(preset("flash"))
    assert (main, index) == (583, 68)


def test_unpacked_cache_requires_no_fake_quant_for_packing():
    with pytest.raises(ValueError, match="packed cache needs fake_quant=True"):
        make_cache(tiny_args(fake_quant=False), packed=True)


def test_nbytes_matches_allocated_arrays_and_the_plan(model):
    cache = make_cache(model.args)
    n = 1024
    ids = _ids(n, seed=3)
    reserve(cache, n)
    for s in range(0, n, 256):
        model(ids[:, s:s + 256], cache)
    allocated = sum(a.nbytes for c in cache for a in c.state if a is not None)
    reported = cache_nbytes(cache)
    # state views are sliced to the filled rows; with the cache reserved to n they coincide
    assert abs(reported - allocated) / allocated < 0.02, (reported, allocated)
    planned = planned_nbytes(model.args, n)
    assert abs(reported - planned) / planned < 0.02, (reported, planned)


def test_save_load_continues_exactly(model, tmp_path):
    ids = _ids(230, seed=4)
    cache = make_cache(model.args)
    model(ids[:, :201], cache)
    path = tmp_path / "s.safetensors"
    save_cache(path, cache, tokens=ids[0, :201].tolist(), fingerprint=model.fingerprint, meta={"k": 1})
    assert not list(tmp_path.glob(".*tmp*")), "temp file left behind"
    loaded, tokens, meta = load_cache(path, model)
    assert tokens == ids[0, :201].tolist() and meta == {"k": 1} and cache_offset(loaded) == 201
    cont_a = model(ids[:, 201:], cache)
    cont_b = model(ids[:, 201:], loaded)
    np.testing.assert_array_equal(np.array(cont_a), np.array(cont_b))


def test_load_refuses_other_model_and_version(model, tmp_path):
    cache = make_cache(model.args)
    model(_ids(10), cache)
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, tokens=list(range(10)), fingerprint="deadbeef")
    with pytest.raises(CacheFileError, match="made by a different model or quantization"):
        load_cache(path, model)
    other = random_model(tiny_args(index_topk=4), seed=7)
    save_cache(path, cache, tokens=list(range(10)), fingerprint=model.fingerprint)
    assert other.fingerprint != model.fingerprint
    with pytest.raises(CacheFileError, match="different model"):
        load_cache(path, other)
    arrays, md = mx.load(str(path), return_metadata=True)
    mx.save_safetensors(str(path), arrays, metadata=md | {"format_version": "99"})
    with pytest.raises(CacheFileError, match="cache format version 99, this mlx-v4 reads 2"):
        load_cache(path, model)
    with pytest.raises(CacheFileError, match="no such cache file"):
        load_cache(tmp_path / "missing.safetensors", model)


def test_rewind_and_regenerate_is_exact(model):
    ids = _ids(300, seed=5)
    cache = make_cache(model.args)
    model(ids[:, :140], cache)
    assert checkpoint(cache) == 140
    first = model(ids[:, 140:300], cache)
    rewind(cache, 140)
    assert cache_offset(cache) == 140
    again = model(ids[:, 140:300], cache)
    np.testing.assert_array_equal(np.array(first), np.array(again))
    with pytest.raises(ValueError, match="cannot rewind to position 150"):
        rewind(cache, 150)


def _layer_state(c) -> list[np.ndarray]:
    """Every array that defines a layer cache's future: window, compressor states, filled rows."""
    arrays = list(c.window_parts)
    for name in ("compressor", "index_compressor"):
        state = getattr(c, name, None)
        arrays += state.arrays() if state is not None else []
    for store in ("entries", "index_keys"):
        if hasattr(c, store) and getattr(c, store).length:  # (an empty store may hold spare rows)
            arrays += getattr(c, store).view()
    return [np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a) for a in arrays]


@pytest.mark.parametrize("start,fed,keep", [
    (2, 5, 0), (2, 5, 1), (2, 5, 2), (2, 5, 3), (2, 5, 5),  # across the ratio-4 windows at 4 and 8
    (125, 6, 1), (125, 6, 2), (125, 6, 3), (125, 6, 4), (125, 6, 6),  # across the 128 window
    (130, 3, 2),  # two speculations' worth of history, window full
])
def test_speculate_accept_keeps_exactly_a_prefix(model, start, fed, keep):
    """Feeding guesses and keeping a prefix leaves the cache of a run fed only that prefix:
    window, compressor states (ratio 4, 128 and the indexer's), entries and index keys."""
    ids = _ids(start + fed + 140, seed=11)
    spec, ref = make_cache(model.args), make_cache(model.args)
    model(ids[:, :start], spec)
    model(ids[:, :start], ref)
    assert speculate(spec) == start
    model(ids[:, start:start + fed], spec)
    accept(spec, start + keep)
    if keep:
        model(ids[:, start:start + keep], ref)
    assert cache_offset(spec) == cache_offset(ref) == start + keep
    for a, b in zip(spec, ref):
        sa, sb = _layer_state(a), _layer_state(b)
        assert [x.shape for x in sa] == [x.shape for x in sb]
        for x, y in zip(sa, sb):
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=1e-5, rtol=0)
    # and both continue identically, past the next 4- and 128-position boundaries
    rest = ids[:, start + keep:]
    np.testing.assert_allclose(np.array(model(rest, spec)), np.array(model(rest, ref)), atol=1e-4, rtol=0)


def test_accept_refuses_positions_outside_the_speculation(model):
    cache = make_cache(model.args)
    model(_ids(10), cache)
    with pytest.raises(RuntimeError, match="accept\\(\\) without speculate"):
        accept(cache, 10)
    speculate(cache)
    model(_ids(3, seed=1), cache)
    with pytest.raises(ValueError, match="cannot keep positions up to 14: speculation fed 10..13"):
        accept(cache, 14)


def test_nbytes_breakdown_sums(model):
    cache = make_cache(model.args)
    model(_ids(50), cache)
    assert cache_nbytes(cache) == sum(cache_breakdown(cache).values()) > 0


def test_saved_checkpoints_survive_load(model, tmp_path):
    """A resumed session can still rewind to the checkpoints made before it was saved."""
    ids = _ids(300, seed=6)
    cache = make_cache(model.args)
    model(ids[:, :150], cache)
    checkpoint(cache)
    model(ids[:, 150:260], cache)
    path = tmp_path / "c.safetensors"
    save_cache(path, cache, tokens=ids[0, :260].tolist(), fingerprint=model.fingerprint)
    loaded, _, _ = load_cache(path, model)
    rewind(loaded, 150)
    rewind(cache, 150)
    np.testing.assert_array_equal(np.array(model(ids[:, 150:300], loaded)), np.array(model(ids[:, 150:300], cache)))


# ---- damaged and crafted files (issue 15, item 10) -----------------------------------------------

def _split(path):
    """(header dict, data bytes) of a safetensors file."""
    import json
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data, *, sign=True):
    """Write a safetensors file from parts, with a valid checksum as an attacker who knows the
    format would compute it (sha256 over the header with the placeholder, then the data)."""
    import hashlib
    import json
    import struct

    header = json.loads(json.dumps(header))
    placeholder = "sha256:" + "0" * 64
    if sign and isinstance(header, dict) and isinstance(header.get("__metadata__"), dict):
        header["__metadata__"]["checksum"] = placeholder
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    if sign and placeholder.encode() in body:
        digest = "sha256:" + hashlib.sha256(body + data).hexdigest()
        body = body.replace(placeholder.encode(), digest.encode())
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A cache with a checkpoint, as save_cache writes it: (bytes, path to rewrite)."""
    ids = _ids(140, seed=8)
    cache = make_cache(model.args)
    model(ids[:, :70], cache)
    checkpoint(cache)
    model(ids[:, 70:], cache)
    path = tmp_path_factory.mktemp("saved") / "c.safetensors"
    save_cache(path, cache, tokens=ids[0].tolist(), fingerprint=model.fingerprint)
    return path.read_bytes()


def test_garbage_in_the_data_region_is_detected(model, saved, tmp_path):
    path = tmp_path / "c.safetensors"
    path.write_bytes(saved)
    load_cache(path, model)  # the untouched file loads
    raw = bytearray(saved)
    raw[-100] ^= 0x55  # one flipped byte, in some tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheFileError, match=r"c\.safetensors: contents do not match the checksum"):
        load_cache(path, model)
    path.write_bytes(saved[: len(saved) - 10])
    with pytest.raises(CacheFileError, match=r"c\.safetensors: truncated: tensor '.*' ends at data byte"):
        load_cache(path, model)
    path.write_bytes(saved[:6])
    with pytest.raises(CacheFileError, match="truncated or not a safetensors file"):
        load_cache(path, model)


def _edit_meta(key, value):
    def edit(header, data):
        header["__metadata__"][key] = value
        return header, data
    return edit


def _edit_tensor(name, **changes):
    def edit(header, data):
        header[name] |= changes
        return header, data
    return edit


def _drop(name):
    def edit(header, data):
        del header[name]
        return header, data
    return edit


def _add_tensor(header, data):
    header["9.extra.0"] = {"dtype": "U8", "shape": [1], "data_offsets": [len(data), len(data) + 1]}
    return header, data + b"\x00"


def _token_out_of_vocab(header, data):
    begin = header["tokens"]["data_offsets"][0]
    return header, data[:begin] + (10 ** 6).to_bytes(4, "little") + data[begin + 4:]


def _kv_width(header, data):
    # a window tensor re-declared one row narrower: same bytes, another shape
    t = header["1.window.0"]
    b, n, w = t["shape"]
    t["shape"] = [b, n * w // 32, 32]
    return header, data


@pytest.mark.parametrize("edit, message", [
    (_edit_meta("offset", "many"), "metadata field 'offset' is missing or not a non-negative integer"),
    (_edit_meta("offset", "-3"), "metadata field 'offset' is missing or not a non-negative integer"),
    (_edit_meta("offset", "99999999"), "metadata field 'offset' (99999999) exceeds the model's context"),
    (_edit_meta("meta", "{not json"), "metadata field 'meta' is not valid JSON"),
    (_edit_meta("meta", "[1]"), "metadata field 'meta' must be a JSON dict"),
    (_edit_meta("checkpoints", "[1, 2]"), "metadata field 'checkpoints' must list one object per layer"),
    (_edit_meta("checkpoints", '[{"70": [0, 0]}, {"70": [3, 0]}, {}, {}]'),
     "metadata field 'checkpoints' has a bad entry '70': [3, 0] (layer 1)"),
    (_edit_meta("checkpoints", '[{"x": [0, 0]}, {}, {}, {}]'), "metadata field 'checkpoints' has a bad entry 'x'"),
    (_edit_meta("checksum", "md5:1"), "metadata field 'checksum' is missing or malformed"),
    (_edit_meta("kinds", "window,window,window,window"), "layer layout does not match this model"),
    (_edit_tensor("1.window.1", dtype="F32", data_offsets=None), "corrupt header entry for tensor '1.window.1'"),
    (_edit_tensor("1.window.1", shape=[1, 69, 2]), "corrupt header: tensor '1.window.1'"),
    (_edit_tensor("1.window.1", data_offsets=[10 ** 9, 10 ** 9 + 127]), "truncated: tensor '1.window.1' ends"),
    (_edit_tensor("1.window.1", dtype="I64"), "corrupt header: tensor '1.window.1' (I64"),
    (_kv_width, "tensor '1.window.0' is U8 [1, 254, 32], expected U8 [1, 127, 64]"),
    (_drop("1.entries.0"), "missing tensor '1.entries.0'"),
    (_drop("tokens"), "missing tensor 'tokens'"),
    (_add_tensor, "unexpected tensor '9.extra.0'"),
    (_token_out_of_vocab, "tensor 'tokens' holds ids outside the vocabulary"),
])
def test_crafted_files_raise_cache_file_error(model, saved, tmp_path, edit, message):
    src = tmp_path / "src.safetensors"
    src.write_bytes(saved)
    header, data = edit(*_split(src))
    path = tmp_path / "c.safetensors"
    _write(path, header, data, sign="checksum" not in message)
    with pytest.raises(CacheFileError) as err:
        load_cache(path, model)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)


@pytest.mark.parametrize("raw, message", [
    (b"{not json" + b" " * 7, "corrupt header (invalid JSON"),
    (b"[1, 2, 3]" + b" " * 7, "corrupt header (not a JSON object)"),
    (b'{"__metadata__": {"format": 1}}', "not an mlx-v4 cache file (no string metadata)"),
    (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', "not an mlx-v4 cache file"),
    (b"\xff\xfe" + b" " * 6, "corrupt header (invalid JSON"),
])
def test_corrupt_headers_raise_cache_file_error(model, tmp_path, raw, message):
    import struct

    path = tmp_path / "c.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00")
    with pytest.raises(CacheFileError) as err:
        load_cache(path, model)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)


def test_version_1_files_are_refused_with_the_reason(model, saved, tmp_path):
    from mlx_v4.cache import CacheMismatchError

    src = tmp_path / "src.safetensors"
    src.write_bytes(saved)
    header, data = _split(src)
    header["__metadata__"]["format_version"] = "1"
    del header["__metadata__"]["checksum"]
    path = tmp_path / "old.safetensors"
    _write(path, header, data, sign=False)
    with pytest.raises(CacheMismatchError, match=r"cache format version 1, this mlx-v4 reads 2 \(a file from "
                                                 r"before content checksums: save it again\)"):
        load_cache(path, model)
