"""Multi-machine inference on MLX's own distributed engine (``mx.distributed``, started by
``mlx.launch``; the ring backend runs over TCP, Thunderbolt or Ethernet, also on Linux).

Two modes, chosen per run:

* ``pipeline``: rank r holds layers ``[start_r, end_r)`` (balanced by weight bytes, or given
  with ``--layers 0-20,21-42``); rank 0 also holds the embedding, the last rank ``hc_head``,
  ``norm`` and ``head``. Between neighbours travels the residual of hyper-connections, the
  ``[B, L, hc_mult, hidden]`` streams (paper §2.2) — the only state that crosses a layer
  boundary (each layer's KV cache stays on its rank; token ids, needed by the hash-routed
  layers, are known to every rank). The last rank's logits reach every rank with one
  ``all_sum`` (other ranks add zeros), so every rank samples the same token and runs the same
  generation loop (:mod:`mlx_v4.generation`, unchanged).
* ``tensor``: see :mod:`mlx_v4.parallel` (heads, output groups and experts split).

A rank reads only what it needs: the index's ``weight_map`` decides which shard files to open
(a pipeline rank never opens a file holding only other ranks' layers), the official
per-expert tensors of other ranks' experts are never planned, and everything else is sliced
lazily (``mx.load`` reads an array when it is evaluated).

Failure: the ring backend raises when a peer's socket closes but blocks forever on a peer
that hangs (or a machine that loses power or its cable). :class:`Watchdog` arms a deadline
at every model call; when no step starts within it, the rank prints one line naming itself
and the step and exits with status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .parallel import Traffic
from .split_plan import Split, plan_split

#: Seconds a rank waits for a step to start before concluding that a peer died or hung.
DEFAULT_TIMEOUT = float(os.environ.get("MLX_V4_DIST_TIMEOUT", "300"))


# ---- the group --------------------------------------------------------------------------------

def launched() -> bool:
    """True under ``mlx.launch`` (or any launcher that sets the ring/MPI variables)."""
    return any(k in os.environ for k in ("MLX_HOSTFILE", "OMPI_COMM_WORLD_SIZE", "MLX_JACCL_COORDINATOR"))


def launched_rank_size() -> tuple[str, str]:
    """This process's rank and the rank count as the launcher announced them (for messages
    before the group exists): MLX_RANK and the ring hostfile's length."""
    size = "?"
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            size = str(len(json.load(f)))
    except (KeyError, OSError, ValueError, TypeError):
        pass
    return os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?")), size


def init_group(backend: str = "any", timeout: float = DEFAULT_TIMEOUT):
    """The world group, or None when this process runs alone. Connecting waits for every peer
    to start (the ring backend retries forever) while holding the GIL, so no Python thread can
    watch it: faulthandler's C watchdog ends the process after ``timeout`` seconds instead,
    printing "Timeout" and the stack (which names this function)."""
    if not launched():
        return None
    import faulthandler

    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return group if group.size() > 1 else None


def broadcast_ints(values: list[int] | None, group) -> list[int]:
    """Rank 0's list of ints on every rank (others pass anything). Two small ``all_sum``."""
    mine = group.rank() == 0
    n = int(mx.distributed.all_sum(mx.array([len(values) if mine else 0], mx.int32), group=group).item())
    a = mx.array(values, mx.int32) if mine and n else mx.zeros((n,), mx.int32)
    return mx.distributed.all_sum(a, group=group).tolist() if n else []


def broadcast_text(text: str | None, group) -> str:
    """Rank 0's string on every rank (UTF-8 bytes as ints)."""
    data = list(text.encode()) if group.rank() == 0 else None
    return bytes(broadcast_ints(data, group)).decode()


def peer_lost_message(rank: int, size: int, what: str, detail: str = "") -> str:
    return (f"mlx-v4 distributed: rank {rank} of {size}: lost the other ranks during {what}"
            f"{': ' + detail if detail else ''}; a peer process died or hung (see its output); exiting")


def is_peer_loss(e: BaseException) -> bool:
    """The ring backend's error when a peer's connection closes."""
    return isinstance(e, RuntimeError) and ("[ring]" in str(e) or "peer was lost" in str(e))


@contextlib.contextmanager
def exit_on_peer_loss(rank, size, what: str):
    """Turn the ring backend's 'connection to a peer was lost' into one line and exit status 1."""
    try:
        yield
    except RuntimeError as e:
        if not is_peer_loss(e):
            raise
        sys.stderr.write(peer_lost_message(rank, size, what, str(e)) + "\n")
        sys.stderr.flush()
        os._exit(1)  # a clean exit would wait on the collectives still queued


class Watchdog:
    """A thread that ends the process when no step starts within ``timeout`` seconds of the
    previous one while armed (:meth:`kick` arms it, :meth:`idle` disarms it)."""

    def __init__(self, rank: int, size: int, timeout: float = DEFAULT_TIMEOUT):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.deadline: float | None = None
        self.what = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mlx-v4-watchdog")
        self._thread.start()

    def kick(self, what: str) -> None:
        with self._lock:
            self.deadline, self.what = time.monotonic() + self.timeout, what

    def idle(self) -> None:
        with self._lock:
            self.deadline = None

    def _run(self) -> None:
        while True:
            time.sleep(min(0.25, self.timeout / 4))
            with self._lock:
                late = self.deadline is not None and time.monotonic() > self.deadline
                what = self.what
            if late:
                msg = peer_lost_message(self.rank, self.size, what, f"no progress for {self.timeout:g}s")
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()
                os._exit(1)


_WATCHDOG: Watchdog | None = None


def watchdog(rank, size, timeout: float = DEFAULT_TIMEOUT) -> Watchdog:
    """The process's one watchdog (created on first use; later calls update its timeout)."""
    global _WATCHDOG
    if _WATCHDOG is None:
        _WATCHDOG = Watchdog(rank, size, timeout)
    _WATCHDOG.rank, _WATCHDOG.size, _WATCHDOG.timeout = rank, size, timeout
    return _WATCHDOG


# ---- the pipeline stage -----------------------------------------------------------------------

class PipelineStage(nn.Module):
    """Layers ``[start, end)`` of the model on one rank, with the same call surface as
    :class:`~mlx_v4.model.Model`: ``stage(inputs, cache) -> logits`` (identical on every rank)."""

    def __init__(self, args, start: int, end: int, rank: int, size: int, group, dtype=mx.float32,
                 cpu: bool | None = None, use_kernel: bool | None = None, traffic: Traffic | None = None):
        super().__init__()
        from .model import DecoderLayer
        from .platform import metal_available

        cpu = not metal_available() if cpu is None else cpu
        use_kernel = metal_available() if use_kernel is None else use_kernel
        self.args, self.model_type = args, args.model_type
        self.start, self.end, self.rank, self.size = start, end, rank, size
        self.first, self.last = rank == 0, rank == size - 1
        self._group, self._dtype, self._traffic = group, dtype, traffic
        if self.first:
            self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i, cpu, use_kernel) for i in range(start, end)]
        if self.last:
            from .layers.hyper import HyperHead
            from .layers.norm import RMSNorm

            self.hc_head = HyperHead(args.hc_mult, args.hidden_size, args.hc_eps, args.rms_norm_eps)
            self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
            self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    weights_id: str = ""
    fingerprint = property(lambda self: _fingerprint(self))

    def output_dtype(self, in_dtype) -> mx.Dtype:
        """The dtype of the streams this stage sends, found by building (not evaluating) one
        step: with a quantized embedding the single-process model runs its streams in the
        scales' dtype, and every rank must receive exactly what one process would compute."""
        ids = mx.zeros((1, 1), mx.int32)
        D, hc = self.args.hidden_size, self.args.hc_mult
        x = (mx.broadcast_to(self.embed(ids)[:, :, None, :], (1, 1, hc, D)) if self.first
             else mx.zeros((1, 1, hc, D), in_dtype))
        for layer, c in zip(self.layers, self.make_cache()):
            x = layer(x, ids, c)
        return x.dtype

    def make_cache(self):
        from .cache import make_cache

        return make_cache(self.args)[self.start:self.end]

    def __call__(self, inputs: mx.array, cache=None, last_only: bool = False) -> mx.array:
        from .model import PositionError

        if cache is None:
            cache = self.make_cache()
        B, L = inputs.shape
        end = cache[0].offset + L
        if end > self.args.max_position_embeddings:
            raise PositionError(f"position {end} is past max_position_embeddings={self.args.max_position_embeddings}")
        D, hc = self.args.hidden_size, self.args.hc_mult
        if self.first:
            x = self.embed(inputs)
            x = mx.broadcast_to(x[:, :, None, :], (B, L, hc, D))
        else:
            x = mx.distributed.recv((B, L, hc, D), self._dtype, self.rank - 1, group=self._group)
        for layer, c in zip(self.layers, cache):
            x = layer(x, inputs, c)
        Lo = 1 if last_only else L
        if not self.last:
            x = mx.distributed.send(x, self.rank + 1, group=self._group)
            if self._traffic is not None:
                self._traffic.add("send", x)
            mx.async_eval(x)  # the next rank waits for it whether or not anyone reads the logits
            local = mx.zeros((B, Lo, self.args.vocab_size), mx.float32)
        else:
            if last_only:
                x = x[:, -1:]
            local = self.head(self.norm(self.hc_head(x)).astype(mx.float32)).astype(mx.float32)
        if self._traffic is not None:
            self._traffic.add("logits", local)
        return mx.distributed.all_sum(local, group=self._group)


_DTYPES = [mx.float32, mx.bfloat16, mx.float16]


def _agree_stream_dtypes(stage: PipelineStage, group) -> None:
    """Tell each rank the dtype it will receive: rank r finds its output dtype from its input's,
    in rank order, one small all_sum per boundary (at load time only)."""
    code = 0
    for r in range(group.size() - 1):
        mine = _DTYPES.index(stage.output_dtype(_DTYPES[code])) if group.rank() == r else 0
        code = int(mx.distributed.all_sum(mx.array([mine], mx.int32), group=group).item())
        if group.rank() == r + 1:
            stage._dtype = _DTYPES[code]


def _fingerprint(module) -> str:
    """Architecture, weights, and this rank's share (a saved cache belongs to one split)."""
    from .model import Model

    return Model.fingerprint.fget(module)


# ---- the model object generation sees ---------------------------------------------------------

class DistributedModel:
    """What :mod:`mlx_v4.generation` and :class:`~mlx_v4.chat.ChatSession` drive on every rank:
    ``__call__(inputs, cache)``, ``make_cache()``, ``args`` and the rest of the inner model
    (a :class:`PipelineStage` or a tensor-sharded :class:`~mlx_v4.model.Model`). Each call
    arms the watchdog; call :meth:`idle` when a generation is over."""

    #: Speculative decoding (mlx_v4.draft) runs on one machine only; generation checks this.
    distributed = True

    def __init__(self, inner, group, split: Split, watchdog: Watchdog | None = None,
                 traffic: Traffic | None = None):
        self.inner, self.group, self.split = inner, group, split
        self.rank, self.size = group.rank(), group.size()
        self.watchdog = watchdog
        self.traffic = traffic or Traffic()
        self.steps = 0

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __call__(self, inputs: mx.array, cache=None, last_only: bool = False) -> mx.array:
        self.steps += 1
        if self.watchdog is not None:
            pos = cache[0].offset if cache else 0
            self.watchdog.kick(f"model step {self.steps} ({inputs.shape[1]} tokens at position {pos})")
        return self.inner(inputs, cache, last_only)

    def make_cache(self):
        return self.inner.make_cache()

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def idle(self) -> None:
        if self.watchdog is not None:
            self.watchdog.idle()


# ---- loading ----------------------------------------------------------------------------------

_OUR_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.")
_OUR_EXPERT = re.compile(r"((?:model\.)?layers\.\d+\.ffn\.experts\.)(\d+)(\..*)")


def _needed(ours: str, args, split: Split, rank: int) -> bool:
    """Whether this rank needs a source tensor (given by its renamed name)."""
    if ours.startswith(("mtp.", "model.mtp.", "dspark.")):  # drafters: no drafting across machines
        return False
    m = _OUR_LAYER.match(ours)
    if m:
        layer = int(m.group(1))
        if layer >= args.num_hidden_layers:
            return False  # MTP block
        if split.mode == "pipeline":
            s, e = split.ranges[rank]
            return s <= layer < e
        m = _OUR_EXPERT.match(ours)
        if m:
            per = args.n_routed_experts // split.size
            return rank * per <= int(m.group(2)) < (rank + 1) * per
        return True
    if split.mode == "tensor":
        return True
    if ours.startswith("embed."):
        return rank == 0
    return rank == split.size - 1  # head, norm, hc_head


def needed_infos(model_dir: Path, args, split: Split, rank: int) -> tuple[dict, list[Path]]:
    """This rank's source tensors (``{name: TensorInfo}``, official per-expert names of this
    rank's experts renumbered from 0) and the files it opened to find them."""
    from . import weights as W

    index = model_dir / W.INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise W.WeightsError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        files = sorted({f for name, f in weight_map.items() if _needed(W.rename(name), args, split, rank)})
        paths = [model_dir / f for f in files]
    else:  # no index: every file's header must be read to know what is where
        single = model_dir / W.SINGLE_FILE
        paths = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    infos = {}
    per = args.n_routed_experts // split.size
    for p in paths:
        for name, info in W.read_header(p).items():
            ours = W.rename(name)
            if not _needed(ours, args, split, rank):
                continue
            m = _OUR_EXPERT.match(ours)
            if m and split.mode == "tensor":
                name = f"{m.group(1)}{int(m.group(2)) - rank * per}{m.group(3)}"
            infos[name] = info
    return infos, paths


def load_distributed(path_or_repo, group, *, mode: str = "pipeline", layers: str | None = None, dtype=None,
                     fp8: str | None = None, model_config: dict | None = None, timeout: float = DEFAULT_TIMEOUT,
                     use_watchdog: bool = True) -> DistributedModel:
    """This rank's share of the model, ready for :func:`mlx_v4.generation.stream_generate`."""
    import dataclasses

    from mlx.utils import tree_flatten

    from . import parallel, platform
    from . import weights as W
    from .config import ModelArgs
    from .generation import load_generation_defaults
    from .loader import _weights_id
    from .model import Model

    rank, size = group.rank(), group.size()
    path = W.resolve_model_path(str(path_or_repo))
    args = ModelArgs.from_file(path, model_config)
    split = plan_split(args, size, mode, layers)
    dtype = dtype or platform.default_dtype()
    fp8 = fp8 or ("mxfp8" if platform.metal_available() else "dequantize")
    infos, _ = needed_infos(path, args, split, rank)
    plan_args = args
    if mode == "tensor":  # the planner checks expert completeness against this rank's count
        plan_args = dataclasses.replace(args, n_routed_experts=args.n_routed_experts // size)
    entries, _ = W.plan_checkpoint(infos, plan_args)
    loaded: dict[Path, dict] = {}

    def get(info):
        if info.file not in loaded:
            loaded[info.file] = mx.load(str(info.file))  # lazy per array
        return loaded[info.file][info.name]

    qc = args.quantization_config or {}
    block = tuple(int(b) for b in (qc.get("weight_block_size") or (128, 128)))
    own = W.read_own_quantization(path)
    weights, quantization = {}, {}
    for ours, entry in entries.items():
        arrays, quant = W.materialise(ours, entry, get, fp8=fp8, fp4="mxfp4", dtype=dtype, block=block, own=own)
        weights.update(arrays)
        if quant is not None:
            quantization[ours.rsplit(".", 1)[0]] = dict(quant)
    loaded.clear()
    traffic = Traffic()
    if mode == "pipeline":
        start, end = split.ranges[rank]
        inner = PipelineStage(args, start, end, rank, size, group, dtype, traffic=traffic)

        def local(name: str) -> str:
            m = _OUR_LAYER.match(name)
            return f"layers.{int(m.group(1)) - start}.{name[m.end():]}" if m else name

        weights = {local(k): v for k, v in weights.items()}
        quantization = {local(k): v for k, v in quantization.items()}
    else:
        inner = Model(args)
        parallel.shard_structure(inner, rank, size, group, traffic)
        weights = parallel.shard_weights(weights, args, rank, size)
    W.apply_quantization(inner, quantization)
    expected = dict(tree_flatten(inner.parameters()))
    wts = W.Weights(weights)
    wts.sources, wts.model_dir, wts.index_file = {}, path, W.INDEX_FILE
    W.validate_weights(wts, expected)
    inner.load_weights(list(weights.items()), strict=True)
    mx.eval(inner.parameters())
    dog = watchdog(rank, size, timeout) if use_watchdog else None
    if mode == "tensor":
        parallel.wrap_outputs(inner, group, traffic)
    else:
        if dog is not None:
            dog.kick("start-up (waiting for the other ranks to load)")
        _agree_stream_dtypes(inner, group)
        if dog is not None:
            dog.idle()
    inner.weights_id = f"{_weights_id(path)}:{split.describe()}:rank{rank}"
    inner.generation_defaults = load_generation_defaults(path)
    inner.eval()
    return DistributedModel(inner, group, split, dog, traffic)
