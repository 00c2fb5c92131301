"""What every command shares: turning library errors into one line, option help, paths.

Nothing here imports mlx_v4 at module level, so `mlx-v4 --help` never loads MLX.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import typer

MODEL_HELP = "Model directory, Hugging Face repo id, or 'demo' (the bundled tiny demo model)."
EXPERT_BUDGET_HELP = ("Keep routed experts on disk and read the ones the router picks into at most this much "
                      "memory (e.g. 32GB; 'auto' = what is left after the other weights and the KV cache). "
                      "Default: every expert resident.")
REAL_MODEL = "deepseek-ai/DeepSeek-V4-Flash"

# Library errors (all ValueError subclasses today) and the fix to suggest for each.
_FIXES = {
    "ConfigError": "check that --model points at a DeepSeek V4 checkpoint (config.json)",
    "WeightsError": "the checkpoint files are incomplete or not DeepSeek V4; re-download or re-convert them",
    "PositionError": "the conversation is longer than the model's context; /reset or start a new chat",
    "ModelNotFoundError": f"pass an existing model directory or a Hugging Face repo id such as {REAL_MODEL}",
    "DownloadError": "check your network and Hugging Face login (huggingface-cli login), then retry",
    "CacheMismatchError": "the saved session belongs to another model or version; start a new one",
    "CacheFileError": "the saved session file is damaged or incomplete; delete it and start a new one",
    "SessionFileError": "the saved session file is damaged or incomplete; delete it and start a new one",
    "FileNotFoundError": "check the path",  # model paths are checked earlier, with their own hint
    "RepositoryNotFoundError": f"check the repo id (e.g. {REAL_MODEL}) and your Hugging Face login",
    "ContextLengthError": "shorten the prompt, lower --max-tokens, or /reset the conversation",
    "TokenizerError": "the model directory has no usable tokenizer; re-download it",
    "LocalEntryNotFoundError": "the files are not in the Hugging Face cache and the network is unreachable",
    "ExpertBudgetError": "pass a larger --expert-budget (e.g. 32GB), or 'auto'",
    "ExpertReadError": "the model files changed while in use; put them back (or re-download) and retry",
    "DraftError": "use --draft auto (the checkpoint's drafter when it can run) or --draft none",
}

DRAFT_HELP = ("Speculative decoding drafter: auto (the checkpoint's drafter when it has one: DSpark on V4-Flash-0731 and V4.1, "
              "else its MTP block), mtp, dspark, or none. Greedy output is unchanged; sampled output keeps its "
              "distribution.")
DRAFT_TOKENS_HELP = ("Draft tokens verified per target forward (default: 1 for the MTP block, more chains it on its "
                     "own guesses; the block size, 5, for DSpark).")


def draft_kwargs(draft: str, draft_tokens: int | None, distributed: bool = False) -> dict:
    """--draft / --draft-tokens -> stream_generate's draft=, draft_tokens=."""
    choice = draft.strip().lower()
    if choice not in ("auto", "mtp", "dspark", "none", "off"):
        raise UserError(f"unknown --draft {draft!r}", "use --draft auto, mtp, dspark or none")
    if draft_tokens is not None and draft_tokens < 1:
        raise UserError(f"--draft-tokens must be >= 1, got {draft_tokens}", "pass e.g. --draft-tokens 1")
    if distributed and choice not in ("auto", "none", "off"):
        raise UserError(f"--draft {choice} does not run across several machines (speculative decoding is "
                        "single-machine for now)", "drop --draft (auto turns it off there) or run on one machine")
    off = choice in ("none", "off") or distributed
    return dict(draft=None if off else choice, draft_tokens=draft_tokens)


class UserError(Exception):
    """An error the command reports itself: message plus the fix."""

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.fix = fix


def _fix_for(exc: BaseException) -> str | None:
    for cls in type(exc).__mro__:
        if cls.__name__ in _FIXES:
            return _FIXES[cls.__name__]
    return None


def report(exc: BaseException, ui=None) -> None:
    from .ui import UI

    ui = ui or UI()
    if isinstance(exc, UserError):
        ui.error(str(exc), exc.fix)
    elif isinstance(exc, FileNotFoundError) and exc.filename and not exc.args[1:2]:
        ui.error(str(exc), _fix_for(exc))
    else:
        ui.error(str(exc) or type(exc).__name__, _fix_for(exc))


def user_errors(fn):
    """Run a command; user errors (bad paths, configs, inputs, network) become one red line on
    stderr and exit code 1. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, OSError) as e:  # library errors subclass ValueError
            report(e)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None

    return wrapper


def resolve_model(model: str | None) -> str:
    """'demo' or nothing -> the bundled demo directory; a path that should exist but does not ->
    a clear error before any download is attempted."""
    import mlx_v4

    if model in (None, "", "demo"):
        demo = Path(mlx_v4.DEMO_MODEL_PATH)
        if not (demo / "config.json").exists():
            raise UserError(f"the bundled demo model is missing ({demo})",
                            f"reinstall mlx-v4 or pass --model {REAL_MODEL}")
        return str(demo)
    p = Path(model).expanduser()
    if p.exists():
        return str(p)
    if not looks_like_repo(model):
        raise UserError(f"no such model directory: {model}",
                        f"pass an existing directory or a Hugging Face repo id such as {REAL_MODEL}")
    return model


def looks_like_repo(name: str) -> bool:
    """'owner/name' as Hugging Face spells repo ids (and not a relative path that is missing)."""
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None and not name.startswith(".")


def is_demo(path: str) -> bool:
    import mlx_v4

    try:
        return Path(path).resolve() == Path(mlx_v4.DEMO_MODEL_PATH).resolve()
    except OSError:
        return False


def home() -> Path:
    """~/.cache/mlx-v4, or $MLX_V4_HOME."""
    env = os.environ.get("MLX_V4_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlx-v4"


def session_path(name: str) -> Path:
    name = name.strip()
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"bad session name {name!r}", "use a plain name such as 'work' (no slashes)")
    # the KV cache file (ChatSession.save writes its messages beside it as NAME.json)
    return home() / "sessions" / f"{name}.safetensors"


def consume(ui, events, show_reasoning: bool = True):
    """Stream generation events through the UI; returns (stats, finish_reason). Ctrl-C stops
    this answer only: the generator is closed (so the library can tidy its cache) and
    (stats, "interrupted") comes back."""
    stats, reason = None, None
    with ui.stream(show_reasoning=show_reasoning) as view:
        try:
            for ev in events:
                kind = type(ev).__name__
                if kind == "Reasoning":
                    view.reasoning_text(ev.text)
                elif kind == "Answer":
                    view.answer_text(ev.text)
                elif kind == "Stats":
                    stats = ev
                elif kind == "Finish":
                    reason = ev.reason
        except KeyboardInterrupt:
            reason = "interrupted"
            close = getattr(events, "close", None)
            if close is not None:
                close()
    if reason == "interrupted":
        ui.interrupted()
    return stats, reason


def generation_kwargs(*, max_tokens: int, temp: float | None = None, top_p: float | None = None,
                      min_p: float | None = None, top_k: int | None = None, seed: int | None = None) -> dict:
    """The keyword arguments of ChatSession.send / stream_generate. Unset sampling values are
    left out so the model's generation_config.json (or V4's defaults) decide."""
    if max_tokens <= 0:
        raise UserError(f"--max-tokens must be positive, got {max_tokens}", "pass e.g. --max-tokens 512")
    if ((temp is not None and temp < 0) or (top_p is not None and not 0 < top_p <= 1)
            or (min_p is not None and not 0 <= min_p < 1) or (top_k is not None and top_k < 0)):
        raise UserError("sampling options out of range",
                        "use --temp >= 0, 0 < --top-p <= 1, 0 <= --min-p < 1, --top-k >= 0")
    sampling = dict(temperature=temp, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed)
    return dict(max_tokens=max_tokens, **{k: v for k, v in sampling.items() if v is not None})


def load_model(ui, model: str | None, expert_budget: str | None = None):
    """(model, tokenizer, resolved path or repo id) with a spinner while loading."""
    import mlx_v4

    path = resolve_model(model)
    with ui.status(f"loading {path}"):
        m, tok = mlx_v4.load(path, expert_budget=expert_budget)
    store = getattr(m, "expert_store", None)
    if store is not None:
        from .ui import human_bytes

        tables = store.stats().get("engram")
        also = "" if tables is None else (f" and {human_bytes(tables['total_bytes'])} of Engram tables "
                                          f"({tables['resident_tables']} of {tables['tables']} resident)")
        ui.notice(f"routed experts read from disk on demand: {human_bytes(store.budget)} budget for "
                  f"{human_bytes(store.total_bytes)} of experts{also}")
    return m, tok, path


def no_distributed_budget(group, expert_budget) -> None:
    if group is not None and expert_budget is not None:
        raise UserError("--expert-budget is not available with --parallel (each rank keeps its experts resident)",
                        "drop --expert-budget, or run on one machine")
