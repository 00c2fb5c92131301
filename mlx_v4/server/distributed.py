"""The server across several ranks (``mlx-v4 serve`` under ``mlx.launch``): lockstep engines.

Rank 0 runs the HTTP side and a :class:`LeaderEngine`: the usual :class:`Engine`, except that
before every model-touching step it tells the other ranks what it is about to do, on its
worker thread, in order — ``start`` (a request's ids, checkpoint marks, limits and sampling
with a seed fixed by rank 0), ``step`` (one prefill chunk or one decoded token of a request)
and ``end`` — and ``quit`` at shutdown. The other ranks run :func:`follow`, which replays the
same model calls on their own caches, so every collective happens in the same order on every
rank. Cancellation, stop sequences and errors are decided by rank 0 alone and reach the
others as ``end``.

Limitation: no prefix reuse across requests (the pool has a zero budget), because cache reuse
decisions and evictions would have to be mirrored too; each request prefills from scratch.
"""

from __future__ import annotations

import json
import random

import mlx.core as mx

from ..cache import checkpoint
from ..distributed import broadcast_text
from ..generation import Finish, Token, prefill, stream_generate
from .engine import Engine
from .prefix_cache import PrefixCache


def _sampling(s: dict) -> dict:
    return {k: s.get(k) for k in ("temperature", "top_p", "top_k", "seed")}


class LeaderEngine(Engine):
    """Rank 0's engine: an :class:`Engine` that announces each step to the other ranks."""

    def __init__(self, model, tokenizer, group, **kwargs):
        self.group = group
        self._ids = 0
        super().__init__(model, tokenizer, PrefixCache(model, budget_bytes=0), **kwargs)

    def _tell(self, msg: dict) -> None:
        broadcast_text(json.dumps(msg), self.group)

    def _start(self, job):
        self._ids += 1
        job.dist_id = self._ids
        prep = job.prep
        if prep.sampling.get("seed") is None:
            prep.sampling["seed"] = random.randrange(2**31)  # every rank samples alike
        self._tell({"op": "start", "id": job.dist_id, "ids": prep.ids, "marks": prep.marks,
                    "max_tokens": prep.max_tokens, "sampling": _sampling(prep.sampling)})
        run = super()._start(job)
        if run is None:  # it failed to start: the replicas drop it too (a repeated end is ignored)
            self._tell({"op": "end", "id": job.dist_id})
        return run

    def _step(self, run) -> bool:
        if not run.job.cancelled:  # a cancelled run only ends (told by _end)
            self._tell({"op": "step", "id": run.job.dist_id})
        return super()._step(run)

    def _end(self, run, store: bool) -> None:
        self._tell({"op": "end", "id": run.job.dist_id})
        super()._end(run, store)
        if not any(r is not run for r in self.active):
            self.model.idle()  # no deadline while no request runs

    def _loop(self) -> None:
        try:
            super()._loop()
        finally:
            self._tell({"op": "quit"})


class _Replica:
    def __init__(self, msg: dict, model):
        self.ids, self.marks, self.max_tokens = msg["ids"], msg["marks"], msg["max_tokens"]
        self.sampling = msg["sampling"]
        self.cache, self.pos, self.gen = model.make_cache(), 0, None


def follow(model, tokenizer, group, *, prefill_step: int = 512, prefill_chunk: int = 2048) -> None:
    """A rank other than 0: replay rank 0's engine steps until it quits (mirrors Engine._step)."""
    prefill_chunk = max(prefill_step, prefill_chunk)
    runs: dict[int, _Replica] = {}
    while True:
        msg = json.loads(broadcast_text(None, group))
        op = msg["op"]
        if op == "quit":
            return
        if op == "start":
            runs[msg["id"]] = _Replica(msg, model)
            continue
        run = runs.get(msg["id"])
        if op == "end":
            if run is not None:
                del runs[msg["id"]]
                if run.gen is not None:
                    run.gen.close()
                mx.eval([c.state for c in run.cache])
                checkpoint(run.cache)
            if not runs:
                model.idle()
            continue
        ids = run.ids  # op == "step"
        if run.pos < len(ids) - 1:
            end = min(run.pos + prefill_chunk, len(ids) - 1)
            marks = [m - run.pos for m in run.marks if run.pos < m <= end]
            prefill(model, ids[run.pos:end], run.cache, step_size=prefill_step, checkpoints=marks)
            run.pos = end
            continue
        if run.gen is None:
            s = run.sampling
            run.gen = stream_generate(model, tokenizer, ids[run.pos:], cache=run.cache, max_tokens=run.max_tokens,
                                      temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                      seed=s["seed"], prefill_step_size=prefill_step,
                                      checkpoints=[m - run.pos for m in run.marks if m > run.pos])
        for ev in run.gen:
            if isinstance(ev, (Token, Finish)):
                break
