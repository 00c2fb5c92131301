"""The batching engine: every active request advances in one shared model step.

Same handler-side contract as :class:`Engine` (``submit``, ``cancel``, ``call``, ``shutdown``,
first come first served admission up to ``max_active``, prefix-cache ``acquire``/``release``),
but the worker runs a :class:`~mlx_v4.batch_generation.BatchGenerator`: each step feeds the
next token of every decoding request plus prompt chunks of the prefilling ones (at most
``prefill_chunk`` prompt ids per step, in chunks of ``prefill_step``), through one
:meth:`Model.step_batch`. So N concurrent streams cost about one model step per token instead
of N, and a long prompt is prefilled a chunk per step between the others' tokens.

Each request keeps its own sampling settings, seed, stop sequences (the protocol's stream
processor) and log-probabilities. With ``draft`` each decoding request also drafts and verifies
its own guesses inside the shared step (mlx_v4/batch_draft.py); its usage then reports them. A
failure in one request's work (its model rows, its output) ends that request alone with a 500;
a cancelled one (client gone) leaves at the next step.
"""

from __future__ import annotations

from ..batch_generation import BatchGenerator, SamplingParams, Sequence, StepOutput
from .engine import Engine, Job, _Run, log


class BatchEngine(Engine):
    supports_logprobs = True

    def __init__(self, model, tokenizer, prefix_cache, *, max_active: int = 8, prefill_step: int = 512,
                 prefill_chunk: int = 512, max_queue: int = 256, draft: str | None = None,
                 draft_tokens: int | None = None):
        self.batch = BatchGenerator(model, prefill_step=prefill_step, step_tokens=max(prefill_step, prefill_chunk),
                                    draft=draft, draft_tokens=draft_tokens)
        self.steps = 0  # batched model steps run
        self.max_rows = 0  # most requests one step has carried
        super().__init__(model, tokenizer, prefix_cache, max_active=max_active, prefill_step=prefill_step,
                         prefill_chunk=prefill_chunk, max_queue=max_queue, draft=draft, draft_tokens=draft_tokens)

    def _serve(self) -> None:  # run by Engine._loop, which answers the waiting requests if it dies
        while (admit := self._next_work()) is not None:
            for job in admit:
                self._admit(job)
            for run in list(self.active):
                if run.job.cancelled:
                    self.cancelled += 1
                    self._drop(run, store=True)
            if not self.batch.active:
                continue
            self.steps += 1
            self.max_rows = max(self.max_rows, len(self.batch.active))
            try:
                outs = self.batch.step()
            except Exception as e:  # the step itself broke (not one request's rows): fail them all
                log.exception("a batched step failed")
                outs = []
                for run in list(self.active):
                    self._fail(run, e)
            for out in outs:
                run = out.seq.tag
                try:
                    self._deliver(run, out)
                except Exception as e:  # a bug in this request's output: it fails, the others go on
                    self._fail(run, e)

    def stats(self) -> dict:
        return super().stats() | {"steps": self.steps, "max_batch": self.max_rows}

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self.cancelled += 1
            return
        run = self._start(job)
        if run is None:
            return
        prep, s = job.prep, job.prep.sampling
        sampling = SamplingParams(temperature=s.get("temperature"), top_p=s.get("top_p"), top_k=s.get("top_k"),
                                  seed=s.get("seed"), logprobs=bool(s.get("logprobs")),
                                  top_logprobs=int(s.get("top_logprobs") or 0))
        try:
            run.seq = Sequence(prep.ids, run.cache, max_tokens=prep.max_tokens, sampling=sampling, start=run.pos,
                               marks=prep.marks, eos=self.eos, tag=run)
            run.generated = run.seq.generated  # what _end stores with the cache
            self.batch.add(run.seq)
        except Exception as e:
            run.seq = None
            self._fail(run, e)
            return
        self.active.append(run)

    def _deliver(self, run: _Run, out: StepOutput) -> None:
        """Hand one step's output of ``run`` to its client."""
        if run not in self.active:  # ended earlier in this step (a stop sequence inside accepted drafts)
            return
        if out.finish == "error":
            self._fail(run, out.seq.error)
            return
        if out.token is not None:
            if out.token not in self.eos:  # the end is told by the finish chunk
                lp = None if out.logprob is None else (out.logprob, out.top_logprobs or [])
                for piece in run.sink.token(out.token, lp):
                    self._safe_emit(run.job, ("data", piece))
            if run.sink.done and out.finish is None:  # a stop sequence ended the reply
                self.batch.remove(run.seq)
                self._close(run, length=False)
                return
        if out.finish is not None:
            self._close(run, length=out.finish == "length")

    def _draft_counts(self, run: _Run) -> tuple[int, int, int] | None:
        seq = getattr(run, "seq", None)
        d = seq.draft if seq is not None else None
        return None if d is None else (d.counts.drafted, d.counts.accepted, d.counts.steps)

    def _close(self, run: _Run, length: bool) -> None:
        if run in self.active:
            self.active.remove(run)
        self._finish(run, length)

    def _drop(self, run: _Run, store: bool) -> None:
        if getattr(run, "seq", None) is not None:
            self.batch.remove(run.seq)
        if run in self.active:
            self.active.remove(run)
        self._end(run, store=store)

    def _release_failed(self, run: _Run) -> None:  # Engine._fail's cleanup: leave the batch too
        self._drop(run, store=False)
