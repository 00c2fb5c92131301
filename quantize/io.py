"""Bounded-memory file I/O for conversion.

Reading: a source tensor, or a run of its leading rows, is read with ``pread`` into a fresh
buffer (never the whole shard, and nothing stays mapped, so resident memory is what is being
converted right now). Writing: an output shard's header is known before any data (shapes come
from the plan), so each chunk is written at its final offset as soon as it is computed; the file
has a temp name until it is complete and fsynced, then it is renamed. Every other file goes
through :func:`write_atomic`.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_v4.weights import TensorInfo

from .recipes import ConvertError

_NP = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
       "F8_E4M3": np.uint8, "F8_E5M2": np.uint8, "F8_E8M0": np.uint8, "I16": np.int16, "U16": np.uint16,
       "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_}
_MX = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint8: "U8", mx.int8: "I8",
       mx.uint32: "U32", mx.int32: "I32", mx.int64: "I64", mx.uint16: "U16"}
TEMP_SUFFIX = ".partial"


def st_dtype(dtype: mx.Dtype) -> str:
    return _MX[dtype]


def mx_dtype(st: str) -> mx.Dtype:
    """The MLX dtype a source tensor arrives in (F8 as uint8, BF16 as bfloat16)."""
    return mx.bfloat16 if st == "BF16" else mx.array(np.zeros(0, _NP.get(st, np.uint8))).dtype


class Reader:
    """Reads tensors (or leading-row slices described by a TensorInfo) from source shards."""

    def __init__(self):
        self._fds: dict[Path, int] = {}
        self.bytes_read = 0

    def read(self, info: TensorInfo) -> mx.array:
        n = _NP[info.dtype]().itemsize * int(np.prod(info.shape, dtype=np.int64))
        buf = np.empty(n, np.uint8)
        fd = self._fds.get(info.file)
        if fd is None:
            self.close()  # one source shard open at a time
            try:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            except OSError as e:
                raise ConvertError(f"{info.file}: cannot open ({e.strerror})") from None
        got, view = 0, memoryview(buf)
        while got < n:
            try:
                k = os.preadv(fd, [view[got:]], info.offset + got)
            except OSError as e:
                raise ConvertError(f"{info.file}: reading tensor '{info.name}' failed ({e.strerror})") from None
            if k == 0:
                raise ConvertError(f"{info.file}: truncated: tensor '{info.name}' ends past the end of the file")
            got += k
        self.bytes_read += n
        a = mx.array(buf.view(_NP[info.dtype]).reshape(info.shape))
        return a.view(mx.bfloat16) if info.dtype == "BF16" else a

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _write_all(fd: int, data, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ConvertError(f"{path}: no space left on the device while writing it") from None
            raise ConvertError(f"{path}: write failed ({e.strerror or e})") from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Temp name, write, fsync, rename: the file is either absent or complete."""
    path = Path(path)
    tmp = path.with_name("." + path.name + TEMP_SUFFIX)
    data = data.encode() if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise ConvertError(f"{path}: cannot create ({e.strerror})") from None
    try:
        _write_all(fd, data, 0, path)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class ShardWriter:
    """One output shard: header first, then chunks at their offsets; :meth:`finish` fsyncs and renames."""

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...], str]]):
        self.path = Path(path)
        self.tmp = self.path.with_name("." + self.path.name + TEMP_SUFFIX)
        header, pos = {"__metadata__": {"format": "mlx"}}, 0
        self.sizes = {}
        for name, shape, dtype in tensors:
            n = _NP[dtype]().itemsize * int(np.prod(shape, dtype=np.int64))
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.sizes[name] = n
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header, self.data_start, self.total = header, 8 + len(raw), 8 + len(raw) + pos
        self.written = dict.fromkeys(self.sizes, 0)
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise ConvertError(f"{self.path}: cannot create ({e.strerror})") from None
        self._write(len(raw).to_bytes(8, "little") + raw, 0)

    def _write(self, data, offset):
        try:
            _write_all(self.fd, data, offset, self.path)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, byte_offset: int, array: mx.array) -> None:
        """Place an evaluated array's bytes at ``byte_offset`` inside tensor ``name``."""
        a = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
        data = np.ascontiguousarray(np.asarray(a))
        if byte_offset + data.nbytes > self.sizes[name]:
            raise ConvertError(f"{self.path}: internal error: chunk past the end of tensor '{name}'")
        self._write(data, self.data_start + self.header[name]["data_offsets"][0] + byte_offset)
        self.written[name] += data.nbytes

    def finish(self) -> int:
        short = [n for n, w in self.written.items() if w != self.sizes[n]]
        if short:
            self.abort()
            raise ConvertError(f"{self.path}: internal error: tensors not fully written: {short[:4]}")
        try:
            os.fsync(self.fd)
        except OSError as e:
            self.abort()
            raise ConvertError(f"{self.path}: fsync failed ({e.strerror})") from None
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        return self.total

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)
