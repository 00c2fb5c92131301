"""`mlx-v4 serve` under hostile and careless input (issue 15): empty keys, bodies over the cap
however they are sent, deep JSON, foreign content types, hosts and origins, an unkeyed health
endpoint, broken prefix-cache files and failing requests, and prompts far beyond the context.
Every refusal is a 4xx in the protocol's own error shape; the server stays up."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _fake_model import ScriptedModel  # noqa: E402

from mlx_v4.server import ServerConfig, create_app  # noqa: E402
from mlx_v4.server.background import running  # noqa: E402
from mlx_v4.tokenizer import load_tokenizer  # noqa: E402

NO_THINK = {"thinking": {"type": "disabled"}}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


# ---- 1: an empty key is no key ---------------------------------------------------------------------

def test_empty_api_key_is_refused_off_loopback(monkeypatch):
    import mlx_v4.cli.serve as cli_serve
    from mlx_v4.cli.app import app
    from typer.testing import CliRunner

    def load_model(*a, **k):  # reaching this means the server would start without a key
        raise AssertionError("serve went on to load the model")

    monkeypatch.setattr(cli_serve, "load_model", load_model)
    for args, env in ((["--api-key", ""], {}), (["--api-key", "  "], {}), ([], {"MLX_V4_API_KEY": ""})):
        r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", *args], env=env)
        assert r.exit_code == 1, (args, env, r.output)
        assert "binding 0.0.0.0 (beyond loopback) needs --api-key" in " ".join(r.output.split()), r.output


def test_empty_api_key_is_refused_by_the_library():
    for key in ("", "   "):
        with pytest.raises(ValueError, match="api_key is empty"):
            ServerConfig(api_key=key)
    assert ServerConfig(api_key="k").api_key == "k" and ServerConfig().api_key is None
