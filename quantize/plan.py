"""Planning a conversion: every output tensor's name, shape and dtype before any data is read.

``weights.plan_checkpoint`` maps source tensors to our names (experts to stack, fused gate/up
to split); ``weights.materialise`` converts one entry exactly as the loader would. Here each
entry becomes a :class:`Job` with a target format from the recipe. Shapes come from building
the conversion graph over placeholder arrays (MLX infers shapes without evaluating), so errors
about dtypes or shapes surface before anything is written. At conversion time a job runs in
chunks: one expert of a stack, and at most ``chunk_bytes`` of its leading rows at a time (FP8
chunks aligned to the 128-row scale tiles), each written straight to its place in the shard.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_v4.config import ModelArgs
from mlx_v4.weights import (
    TensorInfo,
    materialise,
    plan_checkpoint,
    read_header,
    read_index,
    read_own_quantization,
)

from .io import mx_dtype, st_dtype
from .recipes import QUANTIZABLE, ConvertError, Override, Quant, Recipe, Target, choose, classify

#: The class of tensors copied byte for byte, in row chunks (DeepSeek V4.1's Engram tables).
COPIED = "engram_table"
_DENSE_DTYPE = {"bf16": mx.bfloat16, "fp16": mx.float16, "fp32": mx.float32}
_SOURCE_DENSE = {"F32": "fp32", "F64": "fp32", "F16": "fp16"}
_ITEM = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
         "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1}


@dataclass
class Source:
    path: Path
    config: dict
    args: ModelArgs
    infos: dict[str, TensorInfo]
    fingerprint: str
    block: tuple[int, int]
    own: dict  # our own quantization, when the source is an mlx-v4 output
    #: "v4", or "v41" (DeepSeek V4.1: planned by plan_v41, materialised by its own function)
    family: str = "v4"
    materialise: Callable = field(default=materialise, repr=False)


def open_source(path: Path) -> Source:
    """Validate config.json and every shard header (missing shards, absent tensors, truncation)."""
    cfg_file = path / "config.json"
    args = ModelArgs.from_file(path)  # ConfigError naming the file: missing, invalid, unknown model type
    config = json.loads(cfg_file.read_text())
    files = read_index(path)
    headers = {f: read_header(f) for f in sorted(set(files.values()))}
    infos = {name: headers[f][name] for name, f in files.items()}
    h = hashlib.sha256(cfg_file.read_bytes())
    for f in headers:
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    qc = args.quantization_config or {}
    block = tuple(int(b) for b in (qc.get("weight_block_size") or (128, 128)))
    return Source(path, config, args, infos, h.hexdigest()[:16], block, read_own_quantization(path))


@dataclass
class Job:
    name: str  # our tensor name, e.g. layers.3.ffn.experts.w1.weight
    entry: object  # weights' planned entry (parts to stack)
    klass: str
    target: Target
    stacked: bool
    outputs: list[tuple[str, tuple[int, ...], str]]  # (name, shape, safetensors dtype)
    src_bytes: int
    work_dtype: mx.Dtype

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]

    @property
    def out_bytes(self) -> int:
        return sum(_ITEM[d] * math.prod(s) for _, s, d in self.outputs)


def _part_tensors(p) -> list[TensorInfo]:
    return [t for t in (p.w, p.scale, p.scales, p.biases) if t is not None]


def _zeros(info: TensorInfo) -> mx.array:
    return mx.zeros(info.shape, mx_dtype(info.dtype))  # lazy: never evaluated


def produce(job: Job, entry, get: Callable[[TensorInfo], mx.array], src: Source,
            target: Target | None = None, quantizer: Callable | None = None) -> dict[str, mx.array]:
    """One (sub-)entry -> {output name: lazy array} in the job's target format. ``quantizer``
    replaces ``mx.quantize`` (same signature and outputs; calibrate.quantize_weighted)."""
    t = job.target if target is None else target
    module, leaf = job.name.rsplit(".", 1)
    # FP8/FP4 always arrive as mxfp8/mxfp4 (exact): they pass through when that is the target, and
    # MLX's dequantize kernel expands them otherwise (faster than a table lookup, same values).
    arrays, quant = src.materialise(job.name, entry, get, fp8="mxfp8", fp4="mxfp4", dtype=job.work_dtype,
                                    block=src.block, own=src.own)
    if job.klass == COPIED:  # stored bytes, unchanged
        return arrays
    if quant is not None:
        q = Quant(quant["bits"], quant["group_size"], quant["mode"])
        w, s, b = arrays[f"{module}.weight"], arrays[f"{module}.scales"], arrays.get(f"{module}.biases")
        if q == t:  # the source format is the target (FP4 -> mxfp4, FP8 -> mxfp8): bytes pass through
            return arrays
        arrays = {job.name: mx.dequantize(w, s, b, **q.params(), dtype=mx.bfloat16)}
    a = arrays[job.name]
    if leaf != "weight" or not isinstance(t, Quant):
        if mx.issubdtype(a.dtype, mx.floating):
            a = a.astype(_DENSE_DTYPE.get(t, mx.bfloat16))
        return {job.name: a}
    out = (quantizer or mx.quantize)(a.astype(mx.bfloat16), **t.params())
    return dict(zip((f"{module}.weight", f"{module}.scales", f"{module}.biases"), out, strict=False))


def _work_dtype(entry) -> mx.Dtype:
    wide = ("F32", "F64", "F16")  # F16 too: bf16 cannot hold it, float32 holds it exactly
    return mx.float32 if any(t.dtype in wide for p in entry.parts for t in _part_tensors(p)) else mx.bfloat16


def source_format(job: Job, entry, src: Source) -> Target:
    """The format ``entry`` has in the source, as the model can hold it exactly: FP4/FP8 ->
    mxfp4/mxfp8 and MLX-quantized tensors keep their parameters where the model runs the module
    quantized; otherwise the float dtype (FP8/FP4 values dequantized are exact in bf16)."""
    _, quant = src.materialise(job.name, entry, _zeros, fp8="mxfp8", fp4="mxfp4", dtype=job.work_dtype,
                               block=src.block, own=src.own)
    if quant is not None and job.klass in QUANTIZABLE:
        return Quant(quant["bits"], quant["group_size"], quant["mode"])
    return _SOURCE_DENSE.get(entry.parts[0].w.dtype, "bf16")


def plan_jobs(src: Source, recipe: Recipe, override: Override | None) -> tuple[list[Job], list[str]]:
    entries, skipped = plan_checkpoint(src.infos, src.args)
    return jobs_for(src, entries, recipe, override, classify), skipped


def jobs_for(src: Source, entries: dict, recipe: Recipe, override: Override | None,
             classify: Callable[[str], str]) -> list[Job]:
    """Planned entries ({our name: entry}) -> jobs in source file order, each with its target and
    output shapes (from the conversion graph over placeholders)."""
    jobs = []
    for name, entry in entries.items():
        p0 = entry.parts[0]
        stacked = len(p0.w.shape) == 2 and ".ffn.experts." in name and entry.half is None
        sig0 = [(t.dtype, t.shape) for t in _part_tensors(p0)]
        for p in entry.parts[1:]:
            if [(t.dtype, t.shape) for t in _part_tensors(p)] != sig0:
                raise ConvertError(f"{p.w.file}: tensor '{p.w.name}' is {p.w.dtype} {list(p.w.shape)}, unlike "
                                   f"'{p0.w.name}' ({p0.w.dtype} {list(p0.w.shape)}) in the same expert stack")
        one = dataclasses.replace(entry, parts=[p0])
        klass = classify(name)
        job = Job(name, entry, klass, "bf16", stacked, [], sum(_ITEM[t.dtype] * math.prod(t.shape)
                  for p in entry.parts for t in _part_tensors(p)), _work_dtype(entry))
        dense = produce(job, one if stacked else entry, _zeros, src, target="bf16")
        source = source_format(job, one if stacked else entry, src) if recipe.keep_source else None
        job.target = choose(name, klass, recipe, tuple(dense[name].shape), override, source)
        if klass == "compressor" and job.target == "bf16" and job.work_dtype == mx.float32:
            job.target = "fp32"  # the model runs compressors in fp32: an fp32 source keeps them exact
        out = produce(job, one if stacked else entry, _zeros, src)
        lead = (len(entry.parts),) if stacked else ()
        job.outputs = [(k, lead + tuple(v.shape), st_dtype(v.dtype)) for k, v in out.items()]
        jobs.append(job)
    order = {f: i for i, f in enumerate(sorted({i.file for i in src.infos.values()}))}
    jobs.sort(key=lambda j: min((order[p.w.file], p.w.offset) for p in j.entry.parts))
    return jobs


def _rows(info: TensorInfo, a: int, b: int) -> TensorInfo:
    row = _ITEM[info.dtype] * math.prod(info.shape[1:])
    return dataclasses.replace(info, shape=(b - a, *info.shape[1:]), offset=info.offset + a * row)


def chunks(job: Job, src: Source, chunk_bytes: int) -> Iterator[tuple[int, int, object]]:
    """-> (expert index in the stack or 0, first row, sub-entry holding just those rows)."""
    parts = job.entry.parts if job.stacked else [None]
    for e, p in enumerate(parts):
        entry = dataclasses.replace(job.entry, parts=[p]) if job.stacked else job.entry
        p = entry.parts[0]
        if len(entry.parts) != 1 or len(p.w.shape) < 2:
            yield e, 0, entry
            continue
        fp8_tiles = p.w.dtype == "F8_E4M3" and p.scale is not None and len(p.w.shape) == 2 and job.klass != COPIED
        align = src.block[0] if fp8_tiles else 1
        row_elems = math.prod(p.w.shape[1:]) * (2 if p.w.dtype == "I8" else 1)
        step = max(align, chunk_bytes // (4 * row_elems) // align * align)
        rows = p.w.shape[0]
        for a in range(0, rows, step):
            b = min(rows, a + step)
            if a == 0 and b == rows:
                yield e, 0, entry
                break
            scale = None
            if p.scale is not None:
                scale = _rows(p.scale, a // align, -(-b // align)) if fp8_tiles else _rows(p.scale, a, b)
            sub = dataclasses.replace(p, w=_rows(p.w, a, b), scale=scale,
                                      scales=p.scales and _rows(p.scales, a, b), biases=p.biases and _rows(p.biases, a, b))
            yield e, a, dataclasses.replace(entry, parts=[sub])


def chunk_offset(job: Job, e: int, a: int, out_name: str, arr: mx.array) -> int:
    """Byte offset of a chunk's output inside its (stacked) output tensor."""
    shape = next(s for n, s, _ in job.outputs if n == out_name)
    rows = shape[1] if job.stacked else shape[0] if shape else 0
    rest = math.prod(arr.shape[1:]) if arr.ndim else 1
    return (e * rows + a) * rest * arr.itemsize


def expert_tensor(name: str, e: int) -> str:
    """A stacked expert output name -> expert ``e``'s own tensor (layers.3.ffn.experts.w1.weight
    -> layers.3.ffn.experts.7.w1.weight), the layout the expert store reads in one pread."""
    head, tail = name.split(".ffn.experts.", 1)
    return f"{head}.ffn.experts.{e}.{tail}"


def chunk_target(job: Job, e: int, a: int, out_name: str, arr: mx.array) -> tuple[str, int]:
    """(tensor written, byte offset in it) of a chunk: routed experts go to their own tensors."""
    if not job.stacked:
        return out_name, chunk_offset(job, e, a, out_name, arr)
    rest = math.prod(arr.shape[1:]) if arr.ndim else 1
    return expert_tensor(out_name, e), a * rest * arr.itemsize


def chunk_src_bytes(entry) -> int:
    return sum(_ITEM[t.dtype] * math.prod(t.shape) for p in entry.parts for t in _part_tensors(p))


# ---- output layout ----------------------------------------------------------------------------
@dataclass
class Shard:
    name: str
    jobs: list[Job]

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """In file order. A layer's routed experts are one tensor per expert and matrix, each
        expert's w1, w2, w3 (weights, scales, biases) adjacent: a streamed expert is one read."""
        out = []
        for unit in _units(self.jobs):
            if not unit[0].stacked:
                out += unit[0].outputs
                continue
            for e in range(unit[0].outputs[0][1][0]):
                out += [(expert_tensor(n, e), shape[1:], d) for j in unit for n, shape, d in j.outputs]
        return out


def _units(jobs: list[Job]) -> list[list[Job]]:
    """Jobs grouped as they must be placed: a layer's stacked expert jobs together."""
    units: list[list[Job]] = []
    where: dict[str, list[Job]] = {}
    for j in jobs:
        layer = j.name.split(".ffn.experts.")[0] if j.stacked else None
        if layer is not None and layer in where:
            where[layer].append(j)
            continue
        units.append([j])
        if layer is not None:
            where[layer] = units[-1]
    return units


def layout(jobs: list[Job], max_shard_bytes: int) -> list[Shard]:
    groups: list[list[Job]] = [[]]
    size = 0
    for unit in _units(jobs):
        nbytes = sum(j.out_bytes for j in unit)
        alone = unit[0].klass == COPIED  # an Engram table keeps a shard of its own, as released
        if groups[-1] and (alone or size + nbytes > max_shard_bytes):
            groups.append([])
            size = 0
        groups[-1].extend(unit)
        size += nbytes
        if alone:
            groups.append([])
            size = 0
    groups = [g for g in groups if g] or [[]]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def plan_hash(src: Source, shards: list[Shard], extra: dict) -> str:
    blob = json.dumps([src.fingerprint, extra, [(s.name, s.tensors, [str(j.target) for j in s.jobs]) for s in shards]],
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
