"""Safetensors checkpoints on disk: finding a model (a directory or a Hugging Face repo id),
validating shard headers, and where each tensor's bytes are (file and offset), without reading
any data. :mod:`mlx_v4.weights` turns these tensors into our parameters."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: What resolve_model_path fetches from the Hub.
HUB_PATTERNS = ["config.json", "generation_config.json", INDEX_FILE, "*.safetensors", "tokenizer*",
                "special_tokens_map.json", "chat_template*"]


class WeightsError(ValueError):
    """A checkpoint we cannot load; the message names the file and tensor."""


class ModelNotFoundError(WeightsError):
    """The model path does not exist (and is not a repo id we can find)."""


class DownloadError(WeightsError):
    """The Hugging Face Hub refused or failed the download (gated repo, network)."""


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte position of the tensor's data in the file (for streaming readers)


# ---- files ------------------------------------------------------------------------------------
def resolve_model_path(path_or_repo: str, *, allow_download: bool = True) -> Path:
    """A local model directory, else a Hugging Face repo id (downloaded or from the cache)."""
    s = str(path_or_repo)
    p = Path(s).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists():
        raise ModelNotFoundError(f"{p}: is a file, not a model directory")
    if s.startswith((".", "/", "~")) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s):
        raise ModelNotFoundError(f"{s!r}: no such directory or repo id")
    from huggingface_hub import constants, errors, snapshot_download

    env_offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    offline = env_offline or constants.HF_HUB_OFFLINE
    try:
        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS, local_files_only=offline or not allow_download))
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled):
        why = "HF_HUB_OFFLINE is set" if offline else "downloading is disabled"
        raise ModelNotFoundError(f"{s!r}: no such directory, and the repo is not in the Hugging Face cache ({why})") from None
    except errors.GatedRepoError:
        raise DownloadError(f"{s!r}: the repo is gated; accept its terms on huggingface.co and log in") from None
    except (errors.RepositoryNotFoundError, errors.HFValidationError):
        raise ModelNotFoundError(f"{s!r}: no such directory or repo id (not on the Hugging Face Hub either)") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise DownloadError(f"{s!r}: download from the Hugging Face Hub failed: {e}") from None


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Validate one safetensors file from its header alone; return its tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= size - 8 else None
    except FileNotFoundError:
        raise WeightsError(f"{path}: shard file does not exist") from None
    if n is None or raw is None:
        raise WeightsError(f"{path}: truncated or not a safetensors file (header length "
                           f"{n if n is not None else '?'} but the file has {size} bytes)")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from None
    data_bytes = size - 8 - n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if dtype not in _DTYPE_BYTES:
            raise WeightsError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
        need = _DTYPE_BYTES[dtype] * math.prod(shape)
        if begin < 0 or end - begin != need:
            raise WeightsError(f"{path}: corrupt header: tensor '{name}' has data_offsets [{begin}, {end}] "
                               f"({end - begin} bytes) but {dtype} {list(shape)} needs {need} bytes")
        if end > data_bytes:
            raise WeightsError(f"{path}: truncated: tensor '{name}' ends at data byte {end} but the file holds "
                               f"only {data_bytes} data bytes")
        out[name] = TensorInfo(path, name, dtype, shape, 8 + n + begin)
    return out


def scan_with_listing(model_dir: Path) -> tuple[dict[str, TensorInfo], str]:
    """All tensors the checkpoint provides (validated headers) and the file listing them."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise WeightsError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        headers: dict[str, dict[str, TensorInfo]] = {}
        infos = {}
        for name, fname in weight_map.items():
            if fname not in headers:
                if not (model_dir / fname).is_file():
                    raise WeightsError(f"{model_dir / fname}: shard file does not exist (the index places "
                                       f"tensor '{name}' there)")
                headers[fname] = read_header(model_dir / fname)
            if name not in headers[fname]:
                raise WeightsError(f"{model_dir / fname}: has no tensor '{name}', which {INDEX_FILE} places there")
            infos[name] = headers[fname][name]
        return infos, INDEX_FILE
    files = [model_dir / SINGLE_FILE] if (model_dir / SINGLE_FILE).is_file() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir}: no {INDEX_FILE}, {SINGLE_FILE} or other *.safetensors file")
    infos = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in infos:
                raise WeightsError(f"{f}: tensor '{name}' is also in {infos[name].file.name}")
            infos[name] = info
    return infos, files[0].name if len(files) == 1 else "the *.safetensors files"


def scan_checkpoint(model_dir: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint with its file and byte offset (headers validated)."""
    return scan_with_listing(Path(model_dir))[0]


def read_index(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index or the single file; every header validated."""
    return {name: info.file for name, info in scan_with_listing(Path(model_dir))[0].items()}


def read_own_quantization(model_dir: str | Path) -> dict:
    """config.json ``"quantization"`` as written by mlx-lm / our quantize/ (or {} when absent)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    q = cfg.get("quantization") or cfg.get("quantization_config") or {}
    return q if isinstance(q, dict) and "bits" in q else {}
