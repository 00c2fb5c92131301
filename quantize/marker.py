"""The bookkeeping files of a conversion directory, and what they let the converter trust.

* ``.mlx-v4-progress.json`` (the resume manifest) while a conversion runs: its plan, the shards
  finished (name -> size) and ``written``, every file the converter may have created (a name is
  recorded *before* the file is created, so a kill never leaves an unrecorded file of ours);
* ``.mlx-v4-complete`` (the completion marker), written last: the request, the shards with
  their sizes, and ``written``.

The marker is trusted only after :func:`verify_output` has checked every shard against it and
the index. Only names in ``written`` are ever deleted or overwritten: files a user placed in the
directory are left alone (:func:`owned_files`).
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_v4.mlx_lm_hook import HOOK_FILE
from mlx_v4.weights import INDEX_FILE, WeightsError, read_header

MARKER = ".mlx-v4-complete"
MANIFEST = ".mlx-v4-progress.json"
#: What a conversion writes besides its shards (the tokenizer files only when the source has
#: them); used for markers and manifests from before ``written`` was recorded.
FINISH_FILES = ("README.md", "config.json", INDEX_FILE, "chat_template.jinja", HOOK_FILE)


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not an object."""
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a finished conversion (its completion marker, written last)."""
    return read_json(Path(path) / MARKER) is not None


def _names(value) -> set[str]:
    """File names from a bookkeeping list; anything that is not a plain name is ignored, so a
    crafted manifest cannot point the converter outside its directory."""
    if not isinstance(value, (list, dict)):
        return set()
    return {n for n in value if isinstance(n, str) and n and "/" not in n and "\\" not in n
            and n not in (".", "..")}


def owned_files(record: dict | None, extra_files: tuple[str, ...] = ()) -> set[str]:
    """The names a marker or manifest says the converter wrote. Records from before ``written``
    existed: their shards, plus the files every finished conversion writes."""
    if not record:
        return set()
    if "written" in record:
        return _names(record["written"])
    legacy = _names(record.get("files")) | _names(record.get("done"))
    if "files" in record:  # a legacy marker: the conversion had finished
        legacy |= set(FINISH_FILES) | set(extra_files)
    return legacy


def verify_shard(path: Path, size: int | None) -> tuple[dict | None, str | None]:
    """(tensors of the shard, None) when it exists, has ``size`` bytes (if known) and a sound
    header; else (None, what is wrong)."""
    if not path.is_file():
        return None, f"shard {path.name} is missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return None, f"shard {path.name} has {actual} bytes, {size} were written"
    try:
        return read_header(path), None
    except WeightsError as e:
        return None, str(e)


def verify_output(dst: Path, marker: dict) -> tuple[dict[str, int], str | None]:
    """Check a finished conversion against its marker: every shard present, of the size written
    and readable, config.json present, and the index listing exactly the shards' tensors.
    Returns (sound shards: name -> size, the first problem or None)."""
    files = sorted(_names(marker.get("files")))
    sizes = marker.get("sizes") if isinstance(marker.get("sizes"), dict) else {}
    sound, where, problem = {}, {}, None
    if not files:
        problem = f"{MARKER} lists no shards"
    for name in files:
        size = sizes.get(name) if isinstance(sizes.get(name), int) else None
        tensors, why = verify_shard(dst / name, size)
        if why is not None:
            problem = problem or why
            continue
        sound[name] = (dst / name).stat().st_size
        where.update(dict.fromkeys(tensors, name))
    if problem is None and not (dst / "config.json").is_file():
        problem = "config.json is missing"
    if problem is None:
        index = read_json(dst / INDEX_FILE)
        weight_map = index.get("weight_map") if index else None
        if not isinstance(weight_map, dict):
            problem = f"{INDEX_FILE} is missing or unreadable"
        else:
            wrong = sorted(t for t, shard in weight_map.items() if where.get(t) != shard)
            extra = sorted(set(where) - set(weight_map))
            if wrong:
                problem = f"tensor '{wrong[0]}' is not in {weight_map[wrong[0]]} as {INDEX_FILE} says"
            elif extra:
                problem = f"tensor '{extra[0]}' in {where[extra[0]]} is not in {INDEX_FILE}"
    return sound, problem
