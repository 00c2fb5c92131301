"""A fake mlx_v4 generation stack for CLI tests: the CLI only sees load() and ChatSession
events, so these pin its behaviour (stdout/stderr split, slash commands, sessions) without
weights. Run as a script it is `mlx-v4` with the fakes installed (used by the tmux test).

No tests live here; test_cli.py and test_chat_tmux.py use it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Reasoning:
    text: str


@dataclass
class Answer:
    text: str


@dataclass
class Stats:
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_bytes: int
    context_tokens: int
    max_context: int
    cache_bytes: int


@dataclass
class Finish:
    reason: str


def _raise_interrupt(self):
    raise KeyboardInterrupt


# Named "Answer" as the CLI dispatches on the event's class name; reading .text is the Ctrl-C.
_Interrupting = type("Answer", (), {"text": property(_raise_interrupt)})


class FakeArgs:
    max_position_embeddings = 4096
    vocab_size = 1024


class FakeModel:
    args = FakeArgs()


class FakeTokenizer:
    pass


class FakeSession:
    """History as (role, text); 'tokens' = words. The answer echoes the message."""

    def __init__(self, model, tokenizer, system=None, thinking=True, reasoning_effort="high"):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.thinking, self.reasoning_effort = system, thinking, reasoning_effort
        self.messages: list[dict] = []
        self.context = 0
        self.sent: list[tuple[str, dict]] = []
        self.closed = False

    def send(self, text, **gen):
        self.sent.append((text, gen))
        new = len(text.split()) + 2
        if self.thinking:
            yield Reasoning("pondering ")
            yield Reasoning(f"[{self.reasoning_effort}]")
        answer = f"You said: {text}"
        for word in answer.split(" "):
            yield Answer(word + " ")
            if text == "interrupt me":
                try:
                    yield _Interrupting()  # Ctrl-C while the CLI renders this event
                except GeneratorExit:
                    self.closed = True  # the CLI closed us: the library can tidy up
                    raise
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        self.context += new + len(answer.split())
        yield Stats(new, 100.0, len(answer.split()), 20.0, 1_000_000, self.context, 4096, 1000 * self.context)
        yield Finish("stop")

    def reset(self):
        self.messages, self.context = [], 0

    def set_system(self, text):
        self.system = text
        self.reset()

    def save(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(dict(messages=self.messages, context=self.context,
                                              system=self.system, thinking=self.thinking)))

    @classmethod
    def load(cls, path, model, tokenizer):
        if not Path(path).exists():
            raise FileNotFoundError(2, "no such session", str(path))
        d = json.loads(Path(path).read_text())
        s = cls(model, tokenizer, system=d["system"], thinking=d["thinking"])
        s.messages, s.context = d["messages"], d["context"]
        return s


def fake_load(path_or_repo=None, **kw):
    return FakeModel(), FakeTokenizer()


def install(setattr_=setattr) -> None:
    """Point mlx_v4.load and mlx_v4.chat.ChatSession at the fakes (``setattr_`` may be
    monkeypatch.setattr so tests undo it)."""
    import types

    import mlx_v4

    setattr_(mlx_v4, "load", fake_load)
    try:
        import mlx_v4.chat as chat_mod
    except ImportError:  # not written yet: a stand-in module
        chat_mod = types.ModuleType("mlx_v4.chat")
        sys.modules["mlx_v4.chat"] = chat_mod
        mlx_v4.chat = chat_mod
    setattr_(chat_mod, "ChatSession", FakeSession)


if __name__ == "__main__":
    install()
    from mlx_v4.cli.app import main

    sys.argv[0] = "mlx-v4"
    main()
