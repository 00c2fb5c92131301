"""The saved-cache file format (what :func:`mlx_v4.cache.save_cache` writes and
:func:`~mlx_v4.cache.load_cache` accepts): errors, the content checksum, the header checks and
the layout of arrays a model's cache must have. Imports nothing from cache.py.

A file is safetensors with string metadata: format, format_version, fingerprint, offset, kinds,
packed, meta (JSON), checkpoints (JSON) and checksum, the SHA-256 of the header (with
:data:`CHECKSUM_PLACEHOLDER` in the checksum's place) followed by the data region.
"""

from __future__ import annotations

#: 2: a SHA-256 of the header and data region in the metadata (version 1 had none).
CACHE_FORMAT_VERSION = 2


class CacheFileError(ValueError):
    """A saved cache file that cannot be read: missing, damaged, or crafted."""


class CacheMismatchError(CacheFileError):
    """A readable cache file made for another model, quantization, layout or format version."""


def model_fingerprint(model) -> str:
    """Identifies a model's architecture, numerics, parameter layout and weights (V4 and V4.1):
    a saved cache is only loaded into a model with the same one. A model whose routed experts
    stream (``model.expert_store``) has the identity it has with every expert resident."""
    import hashlib
    import json

    from mlx.utils import tree_flatten

    layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in tree_flatten(model.parameters())]
    if model.expert_store is not None:
        layout += model.expert_store.layout()
    # act_quant joins only when on, so caches saved before it existed stay valid
    numerics = [model.args.fake_quant] + (["act_quant"] if model.args.act_quant else [])
    blob = json.dumps([model.args.to_dict(), *numerics, sorted(layout), model.weights_id], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Written at save as the checksum's value, then overwritten in place with the digest of the
# file as it is with the placeholder (same length, so the header does not move).
CHECKSUM_PLACEHOLDER = "sha256:" + "0" * 64
_HASH_CHUNK = 1 << 24
_DTYPE_BYTES = {"U8": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4}  # what save_cache writes


def digest(f, header: bytes, data_start: int) -> str:
    """sha256 of ``header`` (with the placeholder in the checksum's place) and the data region."""
    import hashlib

    h = hashlib.sha256(header)
    f.seek(data_start)
    while chunk := f.read(_HASH_CHUNK):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


def read_cache_header(path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """(metadata, {name: (dtype, shape)}) of a cache file, after checking the header's structure,
    every tensor's byte range and the checksum. Raises CacheFileError naming the file and field."""
    import json
    import math
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > size - 8:
                raise CacheFileError(f"{path}: truncated or not a safetensors file ({size} bytes)")
            header = f.read(n)
            try:
                parsed = json.loads(header)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise CacheFileError(f"{path}: corrupt header (invalid JSON: {e})") from None
            if not isinstance(parsed, dict):
                raise CacheFileError(f"{path}: corrupt header (not a JSON object)")
            metadata = parsed.pop("__metadata__", None)
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise CacheFileError(f"{path}: not an mlx-v4 cache file (no string metadata)")
            if metadata.get("format") != "mlx-v4-cache":
                raise CacheFileError(f"{path}: not an mlx-v4 cache file")
            version = metadata.get("format_version")
            if version != str(CACHE_FORMAT_VERSION):
                hint = " (a file from before content checksums: save it again)" if version == "1" else ""
                raise CacheMismatchError(f"{path}: cache format version {version}, this mlx-v4 reads "
                                         f"{CACHE_FORMAT_VERSION}{hint}")
            tensors, spans = {}, []
            for name, e in parsed.items():
                try:
                    dtype, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
                    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                               for v in (*shape, begin, end)):
                        raise ValueError
                except (TypeError, KeyError, ValueError):
                    raise CacheFileError(f"{path}: corrupt header entry for tensor '{name}'") from None
                if dtype not in _DTYPE_BYTES or end - begin != _DTYPE_BYTES[dtype] * math.prod(shape):
                    raise CacheFileError(f"{path}: corrupt header: tensor '{name}' ({dtype} {list(shape)}) has "
                                         f"data_offsets [{begin}, {end}]")
                if end > size - 8 - n:
                    raise CacheFileError(f"{path}: truncated: tensor '{name}' ends at data byte {end}, the file "
                                         f"holds {size - 8 - n}")
                tensors[name] = (dtype, shape)
                spans.append((begin, end, name))
            spans.sort()
            for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
                if begin_b < end_a:
                    raise CacheFileError(f"{path}: corrupt header: tensors '{a}' and '{b}' overlap")
            checksum = metadata.get("checksum", "")
            at = header.find(checksum.encode()) if checksum else -1
            if len(checksum) != len(CHECKSUM_PLACEHOLDER) or at < 0:
                raise CacheFileError(f"{path}: metadata field 'checksum' is missing or malformed")
            blank = header[:at] + CHECKSUM_PLACEHOLDER.encode() + header[at + len(checksum):]
            if digest(f, blank, 8 + n) != checksum:
                raise CacheFileError(f"{path}: contents do not match the checksum (damaged or edited)")
    except OSError as e:
        raise CacheFileError(f"{path}: cannot read ({e})") from None
    return metadata, tensors


def meta_int(path, metadata: dict, key: str) -> int:
    try:
        value = int(metadata[key])
        if value < 0:
            raise ValueError
    except (KeyError, ValueError):
        raise CacheFileError(f"{path}: metadata field '{key}' is missing or not a non-negative integer") from None
    return value


def meta_json(path, metadata: dict, key: str, kind: type, default: str):
    import json

    try:
        value = json.loads(metadata.get(key, default))
    except (ValueError, RecursionError):
        raise CacheFileError(f"{path}: metadata field '{key}' is not valid JSON") from None
    if not isinstance(value, kind):
        raise CacheFileError(f"{path}: metadata field '{key}' must be a JSON {kind.__name__}")
    return value


def expected_arrays(args, c, i: int, prefix: str, offset: int, n_entries: int | None,
                    n_index: int | None) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """name -> (allowed dtypes, shape, required) of what ``c`` saves at ``offset`` (batch 1)."""
    floats = ("F32", "BF16", "F16")
    hd, ihd, rd = args.head_dim, args.index_head_dim, args.qk_rope_head_dim
    nope = hd - rd

    def entry(name: str, rows: int, index: bool) -> dict:
        if not c.packed:
            return {f"{name}.0": (floats, (1, rows, ihd if index else hd), rows > 0)}
        parts = ([("U8", ihd // 2), ("U8", ihd // 32)] if index
                 else [("U8", nope), ("U8", nope // 64), ("BF16", rd)])
        return {f"{name}.{k}": ((dt,), (1, rows, w), rows > 0) for k, (dt, w) in enumerate(parts)}

    out = entry(f"{prefix}window", min(offset, c.window - 1), index=False)
    if c.kind != "window":
        compressors = [("compressor", hd, c.ratio)] + ([("index_compressor", ihd, 4)] if c.kind == "csa" else [])
        for name, d, r in compressors:
            overlap = r == 4
            width = (2 if overlap else 1) * d
            for k in ("kv", "score"):
                out[f"{prefix}{name}.{k}"] = (("F32",), (1, offset % r, width), offset % r > 0)
            if overlap:
                for k in ("prev_kv", "prev_score"):
                    out[f"{prefix}{name}.{k}"] = (("F32",), (1, r, d), offset >= r)
        if n_entries is None:  # the live cache, not a checkpoint
            out |= entry(f"{i}.entries", offset // c.ratio, index=False)
            if c.kind == "csa":
                out |= entry(f"{i}.index", offset // 4, index=True)
    return out
