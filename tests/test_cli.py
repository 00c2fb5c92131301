"""The mlx-v4 command. Fake-library tests pin the CLI's own behaviour (stdout/stderr split,
slash commands, sessions, errors as one line); demo-model tests run every command for real."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import test_cli_fakes as fakes
from mlx_v4.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    fakes.install(lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))
    monkeypatch.setenv("MLX_V4_HOME", str(tmp_path / "home"))
    return tmp_path  # an existing directory to pass as --model


# ---- startup ------------------------------------------------------------------------------------

def test_help_does_not_import_mlx():
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import mlx_v4.cli.app"],
                         capture_output=True, text=True, check=True).stderr
    modules = {line.split("|")[-1].strip() for line in out.splitlines() if "|" in line}
    assert not {"mlx", "mlx.core", "rich", "numpy"} & modules


def test_help_lists_commands():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in ("chat", "generate", "info", "bench", "convert"):
        assert cmd in r.stdout


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "mlx_v4.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout


# ---- generate (fake library) -----------------------------------------------------------------

def test_generate_answer_on_stdout_reasoning_and_stats_on_stderr(fake):
    r = run("generate", "--model", fake, "--prompt", "hi there", "--think", "--max-tokens", 7, "--temp", 0)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "You said: hi there"
    assert "pondering" in r.stderr and "pondering" not in r.stdout
    assert "tok/s" in r.stderr and "KV cache" in r.stderr and "peak mem" in r.stderr


def test_generate_prompt_file_and_no_think(fake):
    f = fake / "p.txt"
    f.write_text("from a file")
    r = run("generate", "--model", fake, "--prompt-file", f, "--no-think")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "You said: from a file"
    assert "pondering" not in r.output


@pytest.mark.parametrize("args,words", [
    ((), ["--prompt"]),
    (("--prompt", "a", "--prompt-file", "b"), ["exactly one"]),
    (("--prompt", "  "), ["empty"]),
    (("--prompt", "x", "--max-tokens", "0"), ["--max-tokens"]),
    (("--prompt", "x", "--effort", "low"), ["effort"]),
])
def test_generate_bad_input_is_one_line(fake, args, words):
    one_line_error(run("generate", "--model", fake, *args), *words)


def test_generate_missing_prompt_file(fake):
    r = run("generate", "--model", fake, "--prompt-file", fake / "nope.txt")
    one_line_error(r, "nope.txt", "(check the path)")
    assert "model directory" not in r.stderr  # not the hint for a missing model (issue 15, item 12)


# ---- chat (fake library) -----------------------------------------------------------------------

def test_chat_piped_turns_and_commands(fake):
    script = "\n".join([
        "hello", "/think", "second \\", "line", '"""', "block one", "block two", '"""',
        "/effort max", "/stats", "/bogus", "/exit", "never sent",
    ]) + "\n"
    r = run("chat", "--model", fake, input=script)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "You said: hello" in out
    assert "You said: second \nline" in out  # backslash continuation joins lines
    assert "You said: block one\nblock two" in out
    assert "never sent" not in out
    assert "pondering" in r.stderr and "pondering" not in out  # reasoning on stderr
    assert r.stderr.count("pondering") == 1  # /think turned it off after the first turn
    assert "thinking off" in r.stderr and "reasoning effort max" in r.stderr
    assert "unknown command /bogus" in r.stderr and "Traceback" not in r.output
    assert "context" in r.stderr


def test_chat_save_resume_and_load(fake):
    r = run("chat", "--model", fake, "--no-think", input="first question\n/save work\n/exit\n")
    assert r.exit_code == 0, r.output
    saved = fake / "home" / "sessions" / "work.safetensors"
    assert saved.exists()
    r = run("chat", "--model", fake, "--resume", "work", input="next\n")
    assert r.exit_code == 0, r.output
    assert "first question" in r.stderr  # history shown
    assert "resumed session 'work'" in r.stderr
    assert "prompt 3 tok" in r.stderr  # only the new message is prefilled
    r = run("chat", "--model", fake, input="/load work\n/load nope\n/save ../x\n")
    assert "first question" in r.stderr
    assert "no such session" in r.stderr and "bad session name" in r.stderr
    assert r.exit_code == 0


def test_chat_ctrl_c_stops_the_answer_and_keeps_the_session(fake, monkeypatch):
    sessions = []
    orig = fakes.FakeSession.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        sessions.append(self)

    monkeypatch.setattr(fakes.FakeSession, "__init__", init)
    r = run("chat", "--model", fake, "--no-think", input="interrupt me\nstill here\n")
    assert r.exit_code == 0, r.output
    assert "stopped" in r.stderr and "Traceback" not in r.output
    assert sessions[0].closed  # the generator was closed, not abandoned
    assert "You said: still here" in r.stdout


def test_chat_resume_missing_session(fake):
    one_line_error(run("chat", "--model", fake, "--resume", "ghost"), "ghost", "/save")


def test_chat_read_attaches_file(fake):
    f = fake / "notes.md"
    f.write_text("alpha beta")
    r = run("chat", "--model", fake, "--no-think", input=f"/read {f}\nsummarise\n/read {fake}/none.md\n")
    assert r.exit_code == 0, r.output
    assert "alpha beta" in r.stdout and "summarise" in r.stdout
    assert f"/read: cannot read {fake}/none.md (No such file or directory) (check the file name)" in r.stderr
    assert "model directory" not in r.stderr  # not the hint for a missing model (issue 15, item 12)


def test_chat_system_and_reset(fake):
    r = run("chat", "--model", fake, "--no-think", input="hi\n/system Be terse.\n/reset\n/stats\n/help\n")
    assert r.exit_code == 0, r.output
    assert "system prompt set" in r.stderr and "conversation cleared" in r.stderr
    assert "/save NAME" in r.stderr


# ---- errors, info, convert --------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [["chat"], ["generate", "--prompt", "x"], ["bench"]])
def test_missing_model_path_is_one_line(cmd, tmp_path):
    one_line_error(run(*cmd, "--model", tmp_path / "no-such-model"), "no-such-model")


@pytest.mark.parametrize("name,params", [("flash", "284.3 B"), ("pro", "1573.0 B")])
def test_info_presets(name, params):
    r = run("info", name, "--context", 131072)
    assert r.exit_code == 0, r.output
    assert params in r.stdout and "131,072" in r.stdout
    for size in ("36 GB", "192 GB", "512 GB"):
        assert size in r.stdout


def test_info_bits_shrinks_weights():
    def weights(*extra):
        r = run("info", "flash", *extra)
        line = next(ln for ln in r.stdout.splitlines() if "weights" in ln)
        return float(line.split("│")[-2].split()[0])

    assert weights("--bits", 2) < weights("--recipe", "native") < weights("--recipe", "bf16")


def test_info_and_convert_share_the_recipe_names():
    from mlx_v4.cli.convert import RECIPE_LIST
    from mlx_v4.quantize.recipes import RECIPE_NAMES

    assert RECIPE_LIST.split(", ") == list(RECIPE_NAMES)  # the --help text lists the real table

    def weights(recipe):
        r = run("info", "flash", "--recipe", recipe)
        assert r.exit_code == 0, r.output
        return next(ln for ln in r.stdout.splitlines() if "weights" in ln)

    assert "recipe 4bit" in weights("q4") and weights("q4") == weights("4bit")
    assert "recipe native" in weights("native")
    one_line_error(run("info", "flash", "--recipe", "q3"), "unknown recipe 'q3': choose one of native, mxfp4")


def test_info_checkpoint_dir_reads_index(tmp_path):
    from mlx_v4.testing.tiny import TINY_CONFIG

    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 123_000_000}, "weight_map": {}}))
    r = run("info", tmp_path, "--context", 1000)
    assert r.exit_code == 0, r.output
    assert "123.0 MB" in r.stdout and "safetensors index" in r.stdout


@pytest.mark.parametrize("args,words", [
    (("/no/such/dir",), ["/no/such/dir"]),
    (("flash", "--recipe", "nope"), ["recipe"]),
    (("flash", "--context", "99999999"), ["--context"]),
])
def test_info_errors(args, words):
    one_line_error(run("info", *args), *words)


def test_bench_bad_contexts(fake):
    one_line_error(run("bench", "--model", fake, "--contexts", "1,x"), "--contexts")


def test_convert_unavailable_is_one_line(tmp_path, monkeypatch):
    """A build without the quantize package (e.g. a trimmed install) says so in one line."""
    import sys

    monkeypatch.setitem(sys.modules, "mlx_v4.quantize", None)  # makes the import fail
    one_line_error(run("convert", tmp_path, tmp_path / "out", "--recipe", "native"), "not available")


# ---- a tiny random checkpoint through the real loader ------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_v4.testing.tiny import TINY_CONFIG, random_model, tiny_args

    d = tmp_path_factory.mktemp("tiny")
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(random_model(tiny_args()).parameters())))
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    return d


def test_bench_tiny_checkpoint(tiny_dir):
    r = run("bench", "--model", tiny_dir, "--contexts", "64,300", "--gen", 3)
    assert r.exit_code == 0, r.output
    assert "prefill tok/s" in r.stdout and "300" in r.stdout


@pytest.fixture(scope="module")
def tiny_mtp_dir(tmp_path_factory):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_v4.testing.tiny import TINY_CONFIG, random_model, tiny_args

    d = tmp_path_factory.mktemp("tiny_mtp")
    model = random_model(tiny_args(), mtp=True)
    mx.save_safetensors(str(d / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (d / "config.json").write_text(json.dumps(TINY_CONFIG))
    return d


def test_bench_with_drafts_reports_acceptance(tiny_mtp_dir):
    r = run("bench", "--model", tiny_mtp_dir, "--contexts", "64", "--gen", 4, "--draft", "mtp", "--draft-tokens", 2)
    assert r.exit_code == 0, r.output
    # 4 tokens: verifying steps draft 2, 2, then 1 (room for 2 tokens); the last token is never fed
    assert "accepted on these random ids: " in r.stdout and re.search(r"\b\d/5 \(context 64\)", r.stdout), r.stdout


def test_bench_drafts_with_dspark_on_a_0731_checkpoint(tmp_path):
    from mlx_v4.testing.dspark import write_tiny_dspark_checkpoint

    write_tiny_dspark_checkpoint(tmp_path)
    r = run("bench", "--model", tmp_path, "--contexts", "64", "--gen", 4)  # --draft auto picks DSpark
    assert r.exit_code == 0, r.output
    # 4 tokens: the first step drafts 3 (room for 4), each later one fewer (random drafts are rejected)
    assert re.search(r"accepted on these random ids: \d/[3-6] \(context 64\)", r.stdout), r.stdout


@pytest.mark.parametrize("args,words", [
    (("--draft", "eagle"), ["unknown --draft 'eagle'"]),
    (("--draft-tokens", "0"), ["--draft-tokens must be >= 1, got 0"]),
    (("--draft", "mtp"), ["no MTP block"]),
    (("--draft", "dspark"), ["no DSpark drafter"]),
])
def test_bench_bad_draft_is_one_line(tiny_dir, args, words):
    one_line_error(run("bench", "--model", tiny_dir, "--contexts", "64", "--gen", 2, *args), *words)


def test_bench_past_context_is_one_line(tiny_dir):
    one_line_error(run("bench", "--model", tiny_dir, "--contexts", "70000"), "70000")


def test_checkpoint_without_weights_is_one_line(tiny_dir, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    one_line_error(run("bench", "--model", tmp_path))


def test_dir_without_config_is_one_line(tiny_dir, tmp_path):
    one_line_error(run("bench", "--model", tmp_path))


def test_info_tiny_checkpoint_counts_parameters(tiny_dir):
    r = run("info", tiny_dir, "--context", 4096)
    assert r.exit_code == 0, r.output
    assert "file sizes" in r.stdout and "4,096" in r.stdout
    assert "drafter" not in r.stdout.lower()  # its config asks for an MTP block, its files hold none


def test_info_reports_the_drafter_apart(tmp_path):
    """A checkpoint's drafter (MTP, DSpark) is reported apart: its bytes from the shard headers
    (inside the weights total), its parameters from the block the loader builds."""
    import math
    from pathlib import Path

    from mlx_v4.cli.info import plan

    from mlx_v4.testing.dspark import write_tiny_dspark_checkpoint
    from mlx_v4.weights import scan_checkpoint

    item = {"BF16": 2, "F32": 4, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1}
    official = Path(__file__).parent / "fixtures" / "tiny"
    write_tiny_dspark_checkpoint(tmp_path, seed=4)
    for path, kind, layers in ((official, "MTP", 1), (tmp_path, "DSpark", 3)):
        infos = scan_checkpoint(path)
        on_disk = {n: item[i.dtype] * math.prod(i.shape) for n, i in infos.items() if n.startswith("mtp.")}
        p = plan(str(path), recipe=None, bits=None, context=64)
        d = p.drafter
        assert (d.kind, d.moe_layers) == (kind, layers)
        assert d.nbytes == sum(on_disk.values()) and d.nbytes < p.weights_bytes
        assert d.expert_bytes == sum(b for n, b in on_disk.items() if ".ffn.experts." in n)
        r = run("info", path, "--context", 64)
        assert r.exit_code == 0, r.output
        assert f"of which the drafter ({kind}, " in r.stdout
        assert f"Drafter ({kind}, for speculative decoding)" in " ".join(r.stdout.split())
    flash = plan("flash", recipe=None, bits=None, context=64)
    assert flash.drafter.kind == "MTP" and 6.5e9 < flash.drafter.params < 6.7e9  # the release's 6.6B mtp.0


# ---- the real demo model ---------------------------------------------------------------------



def test_demo_generate_pipes_only_the_answer():
    # the demo was trained in chat (non-thinking) mode; with --think its text would all be reasoning
    r = run("generate", "--prompt", "What is a Python list?", "--max-tokens", 24, "--temp", 0, "--no-think")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip()
    assert "tok/s" in r.stderr and "tok/s" not in r.stdout


def test_demo_chat_two_turns_save_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_V4_HOME", str(tmp_path))
    r = run("chat", "--no-think", "--max-tokens", 16, "--temp", 0,
            input="What is a dict?\nAnd a set?\n/stats\n/save t\n/exit\n")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("tok/s") >= 2 and "KV cache" in r.stderr
    assert "drafts" in r.stderr and "accepted" in r.stderr  # the demo's MTP block drafts by default
    r = run("chat", "--resume", "t", "--max-tokens", 8, "--temp", 0, input="/stats\n/exit\n")
    assert r.exit_code == 0, r.output
    assert "What is a dict?" in r.stderr


def test_demo_info_and_bench():
    r = run("info", "demo", "--context", 2048)
    assert r.exit_code == 0, r.output
    r = run("bench", "--contexts", "64,200", "--gen", 4)
    assert r.exit_code == 0, r.output
    assert "prefill tok/s" in r.stdout and "200" in r.stdout
    assert "Speculative decoding" in r.stdout and "accept" in r.stdout and "│   NO │" not in r.stdout


# ---- convert (the real quantize package on a tiny official checkpoint) -------------------------

def test_convert_verify_and_errors(tmp_path):
    from mlx_v4.testing import official
    from mlx_v4.testing.tiny import TINY_CONFIG

    raw = official.random_official_weights(TINY_CONFIG, seed=5, include_mtp=False)
    official.write_official_checkpoint(tmp_path / "src", TINY_CONFIG, raw)
    r = run("convert", tmp_path / "src", tmp_path / "out", "--recipe", "8bit", "--group-size", 32, "--verify")
    assert r.exit_code == 0, r.output
    assert "mean KL" in r.stdout and "top-1 agreement" in r.stdout
    assert (tmp_path / "out" / ".mlx-v4-complete").exists()
    r = run("convert", tmp_path / "src", tmp_path / "out", "--recipe", "8bit", "--group-size", 32)
    assert r.exit_code == 0 and "already converted" in r.stderr
    one_line_error(run("convert", tmp_path / "src", tmp_path / "out2", "--recipe", "3bit"), "recipe")
    one_line_error(run("convert", tmp_path / "nope", tmp_path / "out3"), "nope")


def test_convert_demo_default_native(tmp_path):
    r = run("convert", "demo", tmp_path / "d")
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["mlx_v4_conversion"]["recipe"] == "native" and (tmp_path / "d" / cfg["model_file"]).is_file()


# ---- misleading hints (issue 15, item 12) -------------------------------------------------------

def test_missing_convert_src_says_the_path_does_not_exist(tmp_path):
    r = run("convert", tmp_path / "no-such-src", tmp_path / "out")
    one_line_error(r, "no-such-src", "no such directory", "pass an existing model directory")
    assert "re-download" not in r.stderr


def test_truncated_session_is_not_called_another_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_V4_HOME", str(tmp_path))
    r = run("chat", "--no-think", "--max-tokens", 4, "--temp", 0, input="Hi\n/save t\n/exit\n")
    assert r.exit_code == 0, r.output
    saved = tmp_path / "sessions" / "t.safetensors"
    side, text = saved.with_suffix(".json"), saved.with_suffix(".json").read_text()
    side.write_text("[]")  # a damaged session file (issue 15, item 8)
    one_line_error(run("chat", "--resume", "t", input="/exit\n"), str(side), "not an mlx-v4 chat session file")
    side.write_text(text)
    saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    r = run("chat", "--resume", "t", input="/exit\n")
    one_line_error(r, str(saved), "damaged or incomplete")
    assert "another model" not in r.stderr
