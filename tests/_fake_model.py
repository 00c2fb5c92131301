"""A scripted stand-in for the V4 model: deterministic replies, a cache that records ids.

``ScriptedModel(replies)``: after the last ``<｜Assistant｜>`` id in its context (and the one
mode token, ``<think>`` or ``</think>``, that follows it), it puts a huge logit on the next id
of ``replies[turn]`` (turn = how many ``<｜User｜>`` ids the context holds, minus one), then
EOS once the reply is used up. With no ``<｜Assistant｜>`` in the context it emits EOS.
It counts every id it is fed (``fed``) and can raise KeyboardInterrupt at a given call.
``step_batch`` serves the batching engine (one call per step, each row as ``__call__``).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from mlx_v4.tokenizer import ASSISTANT_ID, EOS_ID, USER_ID

VOCAB = 129280


@dataclass
class FakeArgs:
    max_position_embeddings: int = 4096
    eos_token_id: int = EOS_ID
    vocab_size: int = VOCAB


class FakeCache:
    """One per layer, like the real caches: offset, state, checkpoint/rewind, nbytes."""

    def __init__(self):
        self.tokens: list[int] = []
        self.arr = mx.zeros((0,), dtype=mx.int32)
        self.checkpoints: dict[int, int] = {}

    @property
    def offset(self) -> int:
        return len(self.tokens)

    def append(self, ids: list[int]) -> None:
        self.tokens += ids
        self.arr = mx.concatenate([self.arr, mx.array(ids, dtype=mx.int32)])

    @property
    def state(self):
        return [self.arr]

    @property
    def nbytes(self) -> int:
        return 4 * len(self.tokens)

    def checkpoint(self) -> int:
        self.checkpoints[self.offset] = self.offset
        return self.offset

    def snapshot(self):
        return list(self.tokens), self.arr

    def restore(self, snap) -> None:
        self.tokens, self.arr = list(snap[0]), snap[1]

    def rewind(self, offset: int) -> None:
        if offset == self.offset:
            return
        if offset not in self.checkpoints:
            raise ValueError(f"cannot rewind to position {offset}: checkpoints exist at {sorted(self.checkpoints)}")
        self.tokens = self.tokens[:offset]
        self.arr = self.arr[:offset]
        self.checkpoints = {k: v for k, v in self.checkpoints.items() if k <= offset}


class ScriptedModel:
    def __init__(self, replies: list[list[int]] | None = None, n_layers: int = 2, max_positions: int = 4096,
                 interrupt_at_call: int | None = None, on_call=None):
        self.replies = replies or []
        self.args = FakeArgs(max_position_embeddings=max_positions)
        self.n_layers = n_layers
        self.fed = 0
        self.calls = 0
        self.fed_log: list[list[int]] = []
        self.interrupt_at_call = interrupt_at_call
        self.on_call = on_call
        self.fingerprint = "fake-model"

    def make_cache(self):
        return [FakeCache() for _ in range(self.n_layers)]

    def next_id(self, context: list[int]) -> int:
        if ASSISTANT_ID not in context:
            return EOS_ID
        a = len(context) - 1 - context[::-1].index(ASSISTANT_ID)
        j = len(context) - a - 2  # ids already replied after the tag and the mode token
        turn = context.count(USER_ID) - 1
        reply = self.replies[turn] if 0 <= turn < len(self.replies) else []
        return reply[j] if 0 <= j < len(reply) else EOS_ID

    def __call__(self, ids: mx.array, cache=None):
        self.calls += 1
        if self.interrupt_at_call is not None and self.calls == self.interrupt_at_call:
            raise KeyboardInterrupt
        if self.on_call is not None:
            self.on_call(self)
        return self._feed(ids[0].tolist(), self.make_cache() if cache is None else cache)

    def _feed(self, new: list[int], cache) -> mx.array:
        context = list(cache[0].tokens)
        targets = []
        for t in new:
            context.append(t)
            targets.append(self.next_id(context))
        for c in cache:
            c.append(new)
        self.fed += len(new)
        self.fed_log.append(new)
        hot = mx.arange(VOCAB)[None, None, :] == mx.array(targets)[None, :, None]
        return mx.where(hot, 1e4, 0.0).astype(mx.float32)

    def step_batch(self, token_rows, caches):
        """The batched step (Model.step_batch): one call, logits [R, vocab] at each row's end."""
        self.calls += 1
        if self.interrupt_at_call is not None and self.calls == self.interrupt_at_call:
            raise KeyboardInterrupt
        if self.on_call is not None:
            self.on_call(self)
        return mx.stack([self._feed([int(t) for t in r], c)[0, -1] for r, c in zip(token_rows, caches)])
