"""The engine: one worker thread owns the model and serves every request.

MLX work for one model must stay on one thread, so HTTP handlers never touch the model: they
submit a :class:`Job` and read what it emits. The worker admits jobs first come, first served
(up to ``max_active`` at once) and then round-robins over the admitted ones, one model step
each: a prefill chunk of at most ``prefill_chunk`` ids, or one decoded token. A long prefill
therefore delays other streams by one chunk, not by the whole prompt.

Each job gets its cache from the :class:`PrefixCache` (``acquire``), feeds only the ids past
the reused prefix (checkpointing at turn boundaries), and gives the cache back (``release``)
when it ends, however it ends: finished, stopped by a stop sequence, cancelled because the
client went away, or failed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from ..cache import cache_offset, checkpoint
from ..generation import Finish, Stats, Token, prefill, stream_generate
from .prefix_cache import PrefixCache
from .protocols import Prepared, Sink

log = logging.getLogger("mlx_v4.server")


@dataclass
class Job:
    prep: Prepared
    emit: Callable[[tuple], None]  # ("data", sse text) | ("end", json or None) | ("error", status, message)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Run:
    job: Job
    sink: Sink
    cache: list
    keep: int
    pos: int  # ids of the prompt in the cache
    source: object = None  # the prefix-cache file the cache was loaded from, if any
    gen: object = None
    generated: list[int] = field(default_factory=list)
    stats: Stats | None = None


def drafting_usage(draft_tokens: int, accepted_tokens: int, target_forwards: int) -> dict:
    """Speculative-decoding counts with the acceptance rate and the mean tokens per target
    forward (accepted drafts + the target's own token)."""
    return {"draft_tokens": draft_tokens, "accepted_tokens": accepted_tokens, "target_forwards": target_forwards,
            "acceptance_rate": round(accepted_tokens / draft_tokens, 4) if draft_tokens else 0.0,
            "mean_accepted_length": round((accepted_tokens + target_forwards) / target_forwards, 4)
            if target_forwards else 0.0}




class Engine:
    def __init__(self, model, tokenizer, prefix_cache: PrefixCache, *, max_active: int = 4,
                 prefill_step: int = 512, prefill_chunk: int = 2048, max_queue: int = 256,
                 draft: str | None = None, draft_tokens: int | None = None):
        self.model, self.tokenizer, self.pool = model, tokenizer, prefix_cache
        self.draft, self.draft_tokens = draft, draft_tokens
        self.drafting = {"draft_tokens": 0, "accepted_tokens": 0, "target_forwards": 0}
        self.max_active, self.max_queue = max_active, max_queue
        self.prefill_step, self.prefill_chunk = prefill_step, max(prefill_step, prefill_chunk)
        self.eos = set(getattr(tokenizer, "eos_token_ids", {tokenizer.eos_id})) | {int(model.args.eos_token_id)}
        self.pending: collections.deque[Job] = collections.deque()
        self._calls: collections.deque = collections.deque()  # functions to run between steps
        self.active: list[_Run] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.served = 0
        self.failed = 0
        self.cancelled = 0
        self.thread = threading.Thread(target=self._loop, name="mlx-v4-engine", daemon=True)
        self.thread.start()

    # ---- the handler side ----------------------------------------------------------------------
    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the queue is full (the caller answers 503/429)."""
        with self.cv:
            if self.stopping or not self.thread.is_alive() or len(self.pending) >= self.max_queue:
                return False
            self.pending.append(job)
            self.cv.notify()
        return True

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self.cv:
            self.cv.notify()

    @property
    def alive(self) -> bool:
        """Whether the worker thread still runs (/health reports a dead one)."""
        return self.thread.is_alive()

    def stats(self) -> dict:
        return {"queued": len(self.pending), "active": len(self.active), "served": self.served,
                "cancelled": self.cancelled, "failed": self.failed, "drafting": drafting_usage(**self.drafting)}

    def call(self, fn, timeout: float | None = None):
        """Run ``fn()`` on the worker thread between steps (e.g. persisting the pool)."""
        done = threading.Event()
        box: dict = {}

        def task():
            try:
                box["value"] = fn()
            except Exception as e:  # handed back to the caller
                box["error"] = e
            done.set()

        with self.cv:
            self._calls.append(task)
            self.cv.notify()
        if not done.wait(timeout):
            raise TimeoutError("engine busy")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def shutdown(self, persist: bool = True, timeout: float = 30.0) -> None:
        """Cancel queued and running jobs, stop the worker, and write the pool to disk."""
        with self.cv:
            self.stopping = True
            for job in self.pending:
                job.cancelled = True
            for run in self.active:
                run.job.cancelled = True
            self.cv.notify()
        self.thread.join(timeout)
        if persist:
            self.pool.persist()

    # ---- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException:
            log.critical("the engine worker stopped", exc_info=True)
            raise
        finally:  # no handler may wait forever on a worker that is gone
            with self.cv:
                self.stopping = True
                stranded = list(self.pending) + [r.job for r in self.active]
                self.pending.clear()
            for job in stranded:
                self._safe_emit(job, ("error", 503, "the engine has stopped; see the server log"))

    def _next_work(self) -> list[Job] | None:
        """Wait for work; run the queued calls; -> the jobs to admit now (first come, first
        served, up to max_active), or None once the engine is stopping and idle."""
        with self.cv:
            while not (self.pending or self.active or self._calls or self.stopping):
                self.cv.wait()
            calls = list(self._calls)
            self._calls.clear()
            if self.stopping and not self.active:
                for job in self.pending:
                    self._safe_emit(job, ("error", 503, "the server is shutting down"))
                self.pending.clear()
                for task in calls:
                    task()
                return None
            admit = []
            while self.pending and len(self.active) + len(admit) < self.max_active:
                admit.append(self.pending.popleft())
        for task in calls:
            task()
        return admit

    def _serve(self) -> None:
        while (admit := self._next_work()) is not None:
            for job in admit:
                if job.cancelled:
                    self.cancelled += 1
                    continue
                run = self._start(job)
                if run is not None:
                    self.active.append(run)
            for run in list(self.active):
                try:
                    done = self._step(run)
                except Exception as e:  # a bug or a model failure: this request fails, the server stays
                    self._fail(run, e)
                    done = True
                if done and run in self.active:
                    self.active.remove(run)

    def _fail(self, run: _Run, e: Exception | None) -> None:
        """End ``run`` with a 500 for its client; nothing it raises may stop the worker."""
        log.error("request %s failed", run.job.prep.rid, exc_info=e)
        self.failed += 1
        why = f"{type(e).__name__}: {e}" if e is not None else "unknown error"
        self._safe_emit(run.job, ("error", 500, f"generation failed: {why}"))
        if run.source is not None:  # a cache read back from disk may be what broke: not again
            self.pool.discard(run.source, f"a request resumed from it failed ({why})")
        try:
            self._release_failed(run)
        except Exception:
            log.exception("cleaning up request %s failed", run.job.prep.rid)

    def _release_failed(self, run: _Run) -> None:
        """Free a failed run's slot and lease without storing its cache."""
        self._end(run, store=False)

    @staticmethod
    def _safe_emit(job: Job, item: tuple) -> None:
        try:
            job.emit(item)
        except Exception:  # the handler's event loop is gone
            job.cancelled = True

    def _start(self, job: Job) -> _Run | None:
        prep = job.prep
        try:
            lease = self.pool.acquire(prep.ids)
            sink = Sink(prep, self.tokenizer)
        except Exception as e:
            log.error("request %s could not start", prep.rid, exc_info=e)
            self.failed += 1
            self._safe_emit(job, ("error", 500, f"cannot start the response: {type(e).__name__}: {e}"))
            return None
        run = _Run(job, sink, lease.cache, lease.keep, lease.keep, source=lease.path)
        try:
            for piece in sink.start(len(prep.ids), lease.keep):
                self._safe_emit(job, ("data", piece))
        except Exception as e:
            self._fail(run, e)
            return None
        return run

    def _step(self, run: _Run) -> bool:
        """One model step for ``run``; True when the run is over."""
        job, ids = run.job, run.job.prep.ids
        if job.cancelled:
            self.cancelled += 1
            self._end(run, store=True)
            return True
        if run.pos < len(ids) - 1:  # prefill a chunk (the last prompt id goes through the generator)
            end = min(run.pos + self.prefill_chunk, len(ids) - 1)
            marks = [m - run.pos for m in job.prep.marks if run.pos < m <= end]
            prefill(self.model, ids[run.pos:end], run.cache, step_size=self.prefill_step, checkpoints=marks)
            run.pos = end
            return False
        if run.gen is None:
            s = job.prep.sampling
            run.gen = stream_generate(
                self.model, self.tokenizer, ids[run.pos:], cache=run.cache, max_tokens=job.prep.max_tokens,
                temperature=s.get("temperature"), top_p=s.get("top_p"), top_k=s.get("top_k"), seed=s.get("seed"),
                prefill_step_size=self.prefill_step,
                checkpoints=[m - run.pos for m in job.prep.marks if m > run.pos],
                draft=self.draft, draft_tokens=self.draft_tokens)
        for ev in run.gen:
            if isinstance(ev, Stats):
                run.stats = ev
            if isinstance(ev, Token):
                run.generated.append(ev.id)
                if ev.id not in self.eos:  # the end is told by the finish chunk
                    for piece in run.sink.token(ev.id):
                        self._safe_emit(job, ("data", piece))
                if run.sink.done:  # a stop sequence ended the reply
                    self._finish(run, length=False)
                    return True
                return False
            if isinstance(ev, Finish):
                self._finish(run, length=ev.reason == "length")
                return True
        self._finish(run, length=False)
        return True

    def _finish(self, run: _Run, length: bool) -> None:
        counts = self._draft_counts(run)
        extra = None
        if counts is not None and counts[0]:  # the reply's usage reports drafting when it drafted
            extra = {"drafting": drafting_usage(*counts)}
            for k, v in zip(("draft_tokens", "accepted_tokens", "target_forwards"), counts):
                self.drafting[k] += v
        pieces = run.sink.finish(length, extra)
        for piece in pieces:
            self._safe_emit(run.job, ("data", piece))
        result = None if run.job.prep.stream else run.sink.result()
        self._safe_emit(run.job, ("end", result))
        self.served += 1
        self._end(run, store=True)

    def _draft_counts(self, run: _Run) -> tuple[int, int, int] | None:
        """(draft tokens, accepted tokens, target forwards) of ``run``'s reply, if it drafted."""
        s = run.stats
        return None if s is None else (s.draft_tokens, s.accepted_tokens, s.target_forwards)

    def _end(self, run: _Run, store: bool) -> None:
        if run.gen is not None:
            run.gen.close()
        run.sink.close()
        if not store:
            return
        cache = run.cache
        mx.eval([c.state for c in cache])
        n = cache_offset(cache)
        tokens = (run.job.prep.ids + run.generated)[:n]
        if len(tokens) != n:  # should not happen: do not keep a cache whose ids are unknown
            return
        checkpoint(cache)
        self.pool.release(tokens, cache, run.job.prep.turn_mark)

