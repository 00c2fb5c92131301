"""`mlx-v4 chat` in a real terminal (tmux): two turns, /stats, /save, /exit, then --resume
restores the history from the saved cache without prefilling it again.

Runs against the fake generation stack (always), a random tiny model with the real vocabulary
through the whole library, and the bundled demo model (once it exists)."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Pane:
    _count = itertools.count()

    def __init__(self, tmp: Path, command: list[str], env: dict[str, str]):
        # A fresh server per pane: a killed server may still hold the old socket for a moment.
        self.socket = str(tmp / f"tmux{next(Pane._count)}.sock")
        self.name = "chat"
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        shell = f"cd {shlex.quote(str(TESTS.parent))} && env {envs} {shlex.join(command)}"
        self.tmux("new-session", "-d", "-s", self.name, "-x", "200", "-y", "60", shell)
        self.tmux("set-option", "-t", self.name, "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True,
                              check=True).stdout

    def text(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", self.name)

    def wait(self, pred, timeout: float = 120.0, what: str = "") -> str:
        end = time.time() + timeout
        while time.time() < end:
            screen = self.text()
            if pred(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.text()}")

    def prompts(self, screen: str) -> int:
        return screen.count(">>> ")

    def send(self, line: str, timeout: float = 120.0) -> str:
        """Type a line, press Enter, wait for the next prompt."""
        before = self.prompts(self.text())
        self.tmux("send-keys", "-t", self.name, "-l", line)
        self.tmux("send-keys", "-t", self.name, "Enter")
        return self.wait(lambda s: self.prompts(s) > before, timeout, f"the prompt after {line!r}")

    def dead(self) -> bool:
        return self.tmux("display-message", "-p", "-t", self.name, "#{pane_dead}").strip() == "1"

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


def _tiny_full_vocab(d: Path) -> Path:
    """A random tiny model with the real vocabulary, so the real tokenizer and chat recipe run."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_v4.testing.tiny import TINY_CONFIG, random_model, tiny_args

    d.mkdir()
    model = random_model(tiny_args(vocab_size=129280), seed=1)
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (d / "config.json").write_text(json.dumps(dict(TINY_CONFIG, vocab_size=129280)))
    return d


@pytest.fixture(params=["fake", "tiny", "demo"])
def chat_command(request, tmp_path):
    if request.param == "tiny":
        model = _tiny_full_vocab(tmp_path / "tiny")
        base = [sys.executable, "-m", "mlx_v4.cli", "chat", "--model", str(model), "--max-tokens", "8",
                "--temp", "0"]
    elif request.param == "fake":
        model = tmp_path / "model"
        model.mkdir()
        base = [sys.executable, str(TESTS / "test_cli_fakes.py"), "chat", "--model", str(model)]
    else:
        base = [sys.executable, "-m", "mlx_v4.cli", "chat", "--max-tokens", "24", "--temp", "0"]
    env = {"MLX_V4_HOME": str(tmp_path / "home"), "PYTHONPATH": str(TESTS),
           "TERM": "xterm-256color", "PATH": os.environ.get("PATH", "")}
    return request.param, base, env


def _prompt_tokens(screen: str) -> list[int]:
    return [int(n) for n in re.findall(r"prompt (\d+) tok @", screen)]


def test_chat_in_tmux_save_and_resume(chat_command, tmp_path):
    kind, base, env = chat_command
    pane = Pane(tmp_path, [*base, "--no-think"], env)
    try:
        screen = pane.wait(lambda s: ">>> " in s, 180, "the first prompt")
        assert "mlx-v4 chat" in screen
        if kind == "demo":
            assert "tiny demo" in screen and "DeepSeek-V4-Flash" in screen
        pane.send("Tell me about lists.")
        screen = pane.send("And tuples?")
        first = _prompt_tokens(screen)
        assert len(first) == 2, screen
        assert screen.count("tok/s") >= 4 and "KV cache" in screen and "peak mem" in screen
        screen = pane.send("/stats")
        assert "context" in screen and "last generation" in screen
        screen = pane.send("/save talk")
        assert "saved session 'talk'" in screen
        pane.tmux("send-keys", "-t", pane.name, "-l", "/exit")
        pane.tmux("send-keys", "-t", pane.name, "Enter")
        pane.wait(lambda s: pane.dead(), 30, "the chat to exit")
        assert "Traceback" not in pane.text()
    finally:
        pane.close()
    assert (tmp_path / "home" / "sessions" / "talk.safetensors").exists()

    pane = Pane(tmp_path, [*base, "--no-think", "--resume", "talk"], env)
    try:
        screen = pane.wait(lambda s: ">>> " in s, 180, "the resumed prompt")
        assert "resumed session 'talk'" in screen
        assert "Tell me about lists." in screen and "And tuples?" in screen  # history shown
        screen = pane.send("/stats")
        assert "context" in screen
        screen = pane.send("Ok.")
        resumed = _prompt_tokens(screen)
        assert len(resumed) == 1, screen
        # only the new message is prefilled, not the restored history
        assert resumed[0] <= max(first), (resumed, first)
        # Ctrl-D at the prompt leaves cleanly
        pane.tmux("send-keys", "-t", pane.name, "C-d")
        pane.wait(lambda s: pane.dead(), 30, "the chat to exit on Ctrl-D")
        assert "Traceback" not in pane.text()
    finally:
        pane.close()
