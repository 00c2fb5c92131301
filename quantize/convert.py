"""``convert(src, dst, recipe=...)``: a checkpoint -> an mlx-v4 model directory, streaming.

Order of work, so that no failure leaves something that looks finished:

1. a finished ``dst`` (completion marker) for the same request is a no-op (unless ``force``),
   once every shard has been checked against the marker and the index; a damaged output is
   converted again, keeping the shards that are sound;
2. the source is resolved (a Hub repo id is downloaded, resumably), every header validated and
   every output tensor planned: bad input fails here, before anything is written;
3. the resume manifest ``.mlx-v4-progress.json`` records finished shards and every file the
   converter may create; shards are written one by one (temp name, fsync, rename), skipping
   those a previous run finished;
4. tokenizer files, the chat template and mlx-lm's model file (``mlx_v4.mlx_lm_hook``), README.md,
   config.json, the index, and last the marker ``.mlx-v4-complete``.

Only files the converter recorded as its own are deleted or overwritten (``--force``, resuming):
a user's file in ``dst`` is left alone, or the conversion stops and names it (see marker.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_v4.mlx_lm_hook import HOOK_FILE, model_files
from mlx_v4.v41.config import is_v41_checkpoint
from mlx_v4.weights import INDEX_FILE, resolve_model_path

from . import card, plan_v41
from .io import TEMP_SUFFIX, Reader, ShardWriter, write_atomic, write_json
from .marker import FINISH_FILES, MANIFEST, MARKER, is_complete, owned_files, read_json, verify_output
from .plan import (
    Source,
    chunk_src_bytes,
    chunk_target,
    chunks,
    layout,
    open_source,
    plan_hash,
    plan_jobs,
    produce,
)
from .progress import Progress
from .recipes import DEFAULT_RECIPE, ConvertError, Override, Quant, get_recipe

log = logging.getLogger("mlx_v4.quantize")

FORMAT_VERSION = 1
#: Copied from the source when present (tokenizer, generation defaults). The tokenizer pair, the
#: chat template and mlx-lm's model file are then written by mlx_v4.mlx_lm_hook.model_files.
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "generation_config.json")


@dataclass
class ConvertResult:
    path: Path
    recipe: str
    noop: bool = False
    shards_written: list[str] = field(default_factory=list)
    shards_reused: list[str] = field(default_factory=list)
    bytes_read: int = 0
    seconds: float = 0.0
    verify: object = None  # verify.VerifyReport
    url: str | None = None

    def __str__(self) -> str:
        return str(self.path)


def _request(src, recipe: str, group_size: int, override, max_shard_bytes: int, calibration: str | None = None) -> dict:
    out = {"source": str(src), "recipe": recipe, "group_size": group_size, "override": override is not None,
           "max_shard_bytes": int(max_shard_bytes), "format_version": FORMAT_VERSION}
    if calibration is not None:
        out["calibration"] = calibration
    return out


def _calibration(recipe: str, calibration) -> tuple[str | None, str | None]:
    """(calibration text, its identity for the request) for a calibrated recipe, else (None, None)."""
    import hashlib

    from .calibrate import CALIBRATED_RECIPES, calibration_text

    if recipe not in CALIBRATED_RECIPES:
        if calibration not in (None, False):
            raise ConvertError(f"--calibration applies to {', '.join(CALIBRATED_RECIPES)}, not recipe {recipe!r}")
        return None, None
    if calibration is False:
        return None, "plain"
    text = calibration_text(None if calibration in (None, True) else calibration)
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def _delete_owned(dst: Path, record: dict | None) -> None:
    """Delete the files ``record`` (a marker or manifest) says the converter wrote, and the marker;
    keep a fresh manifest so that ``dst`` stays recognisably ours (user files stay)."""
    for name in owned_files(record, EXTRA_FILES):
        (dst / name).unlink(missing_ok=True)
        (dst / ("." + name + TEMP_SUFFIX)).unlink(missing_ok=True)
    (dst / MARKER).unlink(missing_ok=True)
    write_json(dst / MANIFEST, {"plan": None, "done": {}, "written": []})


def _prepare_dst(dst: Path, force: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a directory")
    if not dst.exists():
        return
    ours = (dst / MARKER).exists() or (dst / MANIFEST).exists()
    if any(dst.iterdir()) and not ours:
        raise ConvertError(f"{dst}: directory is not empty and is not an mlx-v4 conversion; choose a new "
                           "or empty directory")
    if force and ours:
        _delete_owned(dst, read_json(dst / MARKER) or read_json(dst / MANIFEST))


def _reopen(dst: Path, marker: dict, sound: dict[str, int], problem: str) -> None:
    """A finished output that fails verification becomes a resumable one: the sound shards go
    back into a manifest (reused if the plan still matches) and the marker is removed."""
    log.warning("%s: %s says the conversion finished, but %s; converting again (sound shards are kept)",
                dst, MARKER, problem)
    write_json(dst / MANIFEST, {"plan": marker.get("plan"), "request": marker.get("request"), "done": sound,
                                "written": sorted(owned_files(marker, EXTRA_FILES))})
    (dst / MARKER).unlink()


def convert(src: str | Path, dst: str | Path, *, recipe: str = DEFAULT_RECIPE, group_size: int = 64,
            override: Override | None = None, max_shard_bytes: int = 5_000_000_000, force: bool = False,
            verify: bool = False, upload_repo: str | None = None, private: bool = False,
            progress: bool | None = None, chunk_bytes: int = 256 << 20,
            on_shard: Callable[[str], None] | None = None, calibration=None) -> ConvertResult:
    """Convert ``src`` (a directory or a Hugging Face repo id: the official FP8/FP4 release, or
    bf16/fp32 safetensors with official or transformers names) into an mlx-v4 directory ``dst``.

    ``recipe``: one of ``RECIPE_NAMES`` (native, mxfp4, mxfp8, 4bit, 8bit, mixed-4-8, bf16; see
    recipes.RECIPES; ``native`` is lossless); ``group_size`` for affine
    formats (32/64/128); ``override(module, class, target)`` may return another target per
    module. ``max_shard_bytes`` caps output shards. ``force`` redoes a finished output. ``verify``
    compares the converted and the source model (mean KL, top-1 agreement); ``upload_repo``
    uploads the result. ``progress``: bars on a terminal (None = when stderr is one).
    ``on_shard(name)`` is called after each shard is durably written. ``calibration`` (the
    2bit-experts / 3bit-experts recipes): a text file to calibrate the routed experts on (None:
    the built-in text; False: plain rounding), see calibrate.py."""
    t0 = time.monotonic()
    dst = Path(dst).expanduser()
    rec = get_recipe(recipe, group_size)
    calib_text, calib_id = _calibration(rec.name, calibration)
    request = _request(src, rec.name, group_size, override, max_shard_bytes, calib_id)
    _prepare_dst(dst, force)
    result = ConvertResult(dst, rec.name)
    marker = read_json(dst / MARKER)
    if marker is not None:
        was = marker.get("request") if isinstance(marker.get("request"), dict) else {}
        if was != request:
            raise ConvertError(f"{dst}: holds a finished conversion of {was.get('source')!r} "
                               f"(recipe {was.get('recipe')!r}); pass force=True (--force) to replace it")
        sound, problem = verify_output(dst, marker)
        if problem is not None:
            _reopen(dst, marker, sound, problem)
            marker = None
    if marker is not None:
        log.info("%s: already converted (%s, every shard checked); nothing to do", dst, MARKER)
        _add_model_files(dst, marker)
        result.noop = True
        source_dir = None
    else:
        source_dir = resolve_model_path(str(src))
        if is_v41_checkpoint(source_dir):
            plan_v41.check_recipe(rec.name)
        moments = None
        if calib_text is not None:
            from .calibrate import calibrate

            moments = calibrate(source_dir, calib_text)
        _convert(source_dir, dst, rec, request, override, max_shard_bytes, progress, chunk_bytes, on_shard, result,
                 moments)
    result.seconds = time.monotonic() - t0
    if verify:
        from .verify import verify_conversion

        result.verify = verify_conversion(dst, source_dir or resolve_model_path(str(src)))
    if upload_repo:
        from .upload import upload

        result.url = upload(dst, upload_repo, private=private)
    return result


def _convert(source_dir: Path, dst: Path, rec, request, override, max_shard_bytes, progress, chunk_bytes,
             on_shard, result: ConvertResult, moments=None) -> None:
    v41 = is_v41_checkpoint(source_dir)  # DeepSeek V4.1: its names and formats in plan_v41
    src = plan_v41.open_source(source_dir) if v41 else open_source(source_dir)
    jobs, skipped = (plan_v41.plan_jobs if v41 else plan_jobs)(src, rec, override)
    if skipped:
        log.info("dropping %d drafter/vision tensors this mlx-v4 does not run (%s, ...)", len(skipped), skipped[0])
    shards = layout(jobs, max_shard_bytes)
    phash = plan_hash(src, shards, request)

    dst.mkdir(parents=True, exist_ok=True)
    manifest = read_json(dst / MANIFEST) or {}
    names = [s.name for s in shards]
    outputs = (names + [n for n in EXTRA_FILES if (src.path / n).is_file()] + list(_hook_files(src))
               + list(FINISH_FILES))
    written = owned_files(manifest)
    if "written" not in manifest:  # a manifest from before `written` (only the converter wrote here)
        written |= {n for n in outputs if (dst / n).is_file()}
    foreign = [n for n in outputs if (dst / n).exists() and n not in written]
    if foreign:
        raise ConvertError(f"{dst / foreign[0]}: exists and was not written by the converter; move it away "
                           "(it is not deleted or overwritten) and run again")
    for name in written | {MANIFEST, MARKER}:  # leftovers of a killed run
        (dst / ("." + name + TEMP_SUFFIX)).unlink(missing_ok=True)
    done = manifest.get("done") if manifest.get("plan") == phash and isinstance(manifest.get("done"), dict) else {}
    done = {k: v for k, v in done.items() if k in names and k in written and (dst / k).is_file()
            and (dst / k).stat().st_size == v}
    for name in sorted(written):
        if name.endswith(".safetensors") and name not in done:
            (dst / name).unlink(missing_ok=True)  # another plan's shard, or one not recorded as finished
    # every file this run may create is recorded before it is created
    written = (written - {n for n in written if not (dst / n).exists()}) | set(outputs)
    manifest = {"plan": phash, "request": request, "done": done, "written": sorted(written)}
    write_json(dst / MANIFEST, manifest)

    todo = [s for s in shards if s.name not in done]
    need = sum(j.out_bytes for s in todo for j in s.jobs)
    free = shutil.disk_usage(dst).free
    if need > free:
        raise ConvertError(f"{dst}: needs {need / 1e9:.2f} GB more for the remaining shards but the device "
                           f"has {free / 1e9:.2f} GB free")

    reader = Reader()
    total_src = sum(j.src_bytes for s in todo for j in s.jobs)
    with Progress(sum(len(s.jobs) for s in todo), total_src, f"{rec.name} -> {dst.name}", progress) as bar:
        for s in shards:
            if s.name in done:
                result.shards_reused.append(s.name)
                continue
            writer = ShardWriter(dst / s.name, s.tensors)
            try:
                for job in s.jobs:
                    for e, a, sub in chunks(job, src, chunk_bytes):
                        out = produce(job, sub, reader.read, src, quantizer=_quantizer(job, e, a, moments))
                        mx.eval(*out.values())
                        for name, arr in out.items():
                            writer.write(*chunk_target(job, e, a, name, arr), arr)
                        del out
                        bar.advance(nbytes=chunk_src_bytes(sub))
                    bar.advance(tensors=1)
                done[s.name] = writer.finish()
            except BaseException:
                writer.abort()
                reader.close()
                raise
            write_json(dst / MANIFEST, manifest)
            result.shards_written.append(s.name)
            log.info("wrote %s (%.2f GB)", s.name, done[s.name] / 1e9)
            if on_shard is not None:
                on_shard(s.name)
    reader.close()
    result.bytes_read = reader.bytes_read
    _finish(src, dst, rec, request, shards, phash, manifest)


def _quantizer(job, e: int, a: int, moments):
    """The calibrated quantizer for a chunk of routed experts (None: plain mx.quantize): expert
    ``e`` of a stack of per-expert tensors, or experts ``a``, ``a + 1``... of a stacked [E, ...]
    source tensor."""
    if moments is None or job.klass != "experts":
        return None
    from .calibrate import quantize_weighted

    layer, w = int(job.name.split(".")[1]), job.name.split(".")[-2]

    def quantize(arr, **params):
        if arr.ndim == 2:
            return quantize_weighted(arr, moments.importance(layer, e if job.stacked else a, w), **params)
        parts = [quantize_weighted(arr[i], moments.importance(layer, a + i, w), **params) for i in range(arr.shape[0])]
        return tuple(mx.stack(p) for p in zip(*parts))

    return quantize


def _finish(src: Source, dst: Path, rec, request, shards, phash, manifest: dict) -> None:
    for name in EXTRA_FILES:
        f = src.path / name
        if f.is_file():
            write_atomic(dst / name, f.read_bytes())
    for name, data in _hook_files(src).items():  # what mlx-lm needs to open the directory
        write_atomic(dst / name, data)
    quantization, classes = {}, {}
    for s in shards:
        for j in s.jobs:
            if isinstance(j.target, Quant):
                quantization[j.module] = j.target.params()
            classes.setdefault(j.klass, set()).add(str(j.target) if j.klass != "tid2eid" else "int32")
    config = {k: v for k, v in src.config.items() if k not in ("quantization_config", "quantization")}
    if isinstance(config.get("text_config"), dict):  # V4.1: the weights' formats are now "quantization"
        config["text_config"] = {k: v for k, v in config["text_config"].items() if k != "quantization_config"}
    qc = src.config.get("quantization_config") or {}
    if isinstance(qc, dict) and qc.get("expert_dtype") and "expert_dtype" not in config:
        config["expert_dtype"] = qc["expert_dtype"]
    if quantization:
        common = max({json.dumps(q, sort_keys=True) for q in quantization.values()},
                     key=lambda q: sum(json.dumps(v, sort_keys=True) == q for v in quantization.values()))
        config["quantization"] = json.loads(common) | quantization
    conversion = {"recipe": rec.name, "description": rec.description, "source": request["source"],
                  "source_fingerprint": src.fingerprint,
                  "classes": {k: sorted(v)[0] if len(v) == 1 else sorted(v) for k, v in sorted(classes.items())}}
    if src.family != "v4":
        conversion["family"] = src.family
    config["mlx_v4_conversion"] = conversion
    if src.family == "v4":
        config["model_file"] = HOOK_FILE  # mlx-lm imports it (trust_remote_code) to build the model
    write_atomic(dst / "README.md", card.model_card(config, conversion, shards))
    write_json(dst / "config.json", config)
    weight_map = {n: s.name for s in shards for n, _, _ in s.tensors}
    total = sum(j.out_bytes for s in shards for j in s.jobs)
    write_json(dst / INDEX_FILE, {"metadata": {"total_size": total, "format": "mlx"}, "weight_map": weight_map})
    write_json(dst / MARKER, {"request": request, "plan": phash, "files": sorted(s.name for s in shards),
                              "sizes": manifest["done"], "written": manifest["written"],
                              "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    (dst / MANIFEST).unlink(missing_ok=True)


def _hook_files(src: Source) -> dict[str, bytes]:
    """mlx-lm's files (model file, chat template, tokenizer pair) for a V4 conversion; none for
    V4.1, which mlx-lm cannot run (the hook builds DeepSeek V4 only)."""
    return model_files(src.path) if src.family == "v4" else {}


def _add_model_files(dst: Path, marker: dict) -> None:
    """A conversion finished by an mlx-v4 that did not write mlx-lm's files gets them (its own
    tokenizer files are kept), so running convert again makes it open in mlx-lm. Only files that
    are absent or the converter's own are written; they are recorded in the marker."""
    config = read_json(dst / "config.json")
    if config is None or config.get("model_file") == HOOK_FILE and (dst / HOOK_FILE).is_file():
        return
    if (config.get("mlx_v4_conversion") or {}).get("family", "v4") != "v4":
        return  # mlx-lm's hook builds DeepSeek V4 only
    owned = owned_files(marker, EXTRA_FILES)
    files = {n: d for n, d in model_files(dst).items() if n in owned or not (dst / n).exists()}
    if HOOK_FILE not in files:
        log.warning("%s: %s exists and was not written by the converter; mlx-lm's files not added", dst, HOOK_FILE)
        return
    write_json(dst / MARKER, marker | {"written": sorted(owned | set(files))})  # recorded before written
    for name, data in files.items():
        write_atomic(dst / name, data)
    write_json(dst / "config.json", config | {"model_file": HOOK_FILE})
    log.info("%s: added mlx-lm's model file, chat template and tokenizer files", dst)


__all__ = ["convert", "ConvertResult", "is_complete", "MARKER", "MANIFEST"]
