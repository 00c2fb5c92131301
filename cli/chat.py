"""`mlx-v4 chat`: the terminal chat. The conversation lives in a ChatSession (history in its
KV cache); this module reads input, dispatches slash commands and hands events to the UI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DRAFT_HELP,
    DRAFT_TOKENS_HELP,
    EXPERT_BUDGET_HELP,
    MODEL_HELP,
    UserError,
    consume,
    draft_kwargs,
    generation_kwargs,
    is_demo,
    load_model,
    no_distributed_budget,
    report,
    resolve_model,
    session_path,
    user_errors,
)
from .distributed import LayersOpt, ParallelOpt, TimeoutOpt, peer_errors

COMMANDS = [
    ("/help", "this list"),
    ("/reset", "forget the conversation (keeps the system prompt)"),
    ("/system TEXT", "set the system prompt (starts over)"),
    ("/think [on|off]", "toggle thinking (reasoning shown dimmed above the answer)"),
    ("/effort high|max", "reasoning effort when thinking"),
    ("/stats", "context used, KV cache by kind, last speeds, peak memory, expert reads"),
    ("/save NAME", "save the session (history and KV cache)"),
    ("/load NAME", "load a saved session"),
    ("/read FILE", "attach a file's text to your next message"),
    ("/exit", "leave (also Ctrl-D)"),
]
EFFORTS = ("high", "max")


def read_message(ui) -> str:
    """One user message: a line; a line ending in \\ continues; \"\"\" opens a block that runs
    to the next \"\"\"."""
    first = ui.prompt()
    if first.strip().startswith('"""'):
        rest = first.strip()[3:]
        if rest.endswith('"""'):
            return rest[:-3]
        lines = [rest] if rest else []
        while True:
            line = ui.prompt(continuation=True)
            if line.rstrip().endswith('"""'):
                lines.append(line.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(line)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(ui.prompt(continuation=True))
    return "\n".join(lines)


def messages_of(session) -> list[tuple[str, str]]:
    """(role, text) pairs of a session's history, whatever shape the library keeps them in."""
    raw = getattr(session, "messages", None) or getattr(session, "history", None) or []
    out = []
    for m in raw:
        if isinstance(m, dict):
            out.append((m.get("role", "?"), str(m.get("content", ""))))
        elif isinstance(m, (tuple, list)) and len(m) == 2:
            out.append((str(m[0]), str(m[1])))
        else:
            out.append((getattr(m, "role", "?"), str(getattr(m, "content", m))))
    return out


class ChatLoop:
    def __init__(self, ui, model, tokenizer, session, gen: dict, group=None):
        self.ui, self.model, self.tokenizer, self.session, self.gen = ui, model, tokenizer, session, gen
        self.last_stats = None
        self.attachment: str | None = None
        # distributed (rank 0 of an mlx.launch group): each turn goes to the other ranks first
        self.group, self.pending_reset = group, False

    # ---- slash commands ---------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.ui.chat_help(COMMANDS)
        elif name == "/reset":
            s.reset()
            self.pending_reset = True
            self.last_stats = None
            self.ui.notice("conversation cleared")
        elif name == "/system":
            if not arg:
                raise UserError("/system needs the text", "e.g. /system You are terse.")
            s.set_system(arg)
            self.ui.notice("system prompt set; conversation starts over")
        elif name == "/think":
            if arg not in ("", "on", "off"):
                raise UserError(f"/think takes on or off, not {arg!r}", "e.g. /think off")
            s.thinking = (not s.thinking) if not arg else arg == "on"
            self.ui.notice(f"thinking {'on' if s.thinking else 'off'}")
        elif name == "/effort":
            if arg not in EFFORTS:
                raise UserError(f"unknown effort {arg!r}", "use /effort high or /effort max")
            s.reasoning_effort = arg
            self.ui.notice(f"reasoning effort {arg}" + ("" if s.thinking else " (applies when /think is on)"))
        elif name == "/stats":
            self.show_stats()
        elif name in ("/save", "/load") and self.group is not None:
            raise UserError(f"{name} is not available in a distributed chat (each rank holds part of the cache)",
                            "run the chat on one machine to save or load sessions")
        elif name == "/save":
            path = session_path(arg)
            s.save(path)
            self.ui.notice(f"saved session {arg!r} to {path}")
        elif name == "/load":
            from mlx_v4.chat import ChatSession

            self.session = ChatSession.load(session_path(arg), self.model, self.tokenizer)
            self.last_stats = None
            self.ui.notice(f"loaded session {arg!r}")
            self.ui.history(messages_of(self.session))
        elif name == "/read":
            if not arg:
                raise UserError("/read needs a file name", "e.g. /read notes.md")
            path = Path(arg).expanduser()
            try:
                text = path.read_text(errors="replace")
            except OSError as e:
                raise UserError(f"/read: cannot read {path} ({e.strerror or e})", "check the file name") from None
            self.attachment = f"File {path.name}:\n```\n{text}\n```\n"
            self.ui.notice(f"attached {path} ({len(text):,} characters); it goes with your next message")
        else:
            raise UserError(f"unknown command {name}", "type /help for the list")
        return True

    def show_stats(self) -> None:
        import mlx_v4.cache as kv

        cache = getattr(self.session, "cache", None)
        breakdown = kv.cache_breakdown(cache) if cache else None
        context = None
        if cache:
            context = (kv.cache_offset(cache), self.model.args.max_position_embeddings)
        elif self.last_stats is not None:
            context = (self.last_stats.context_tokens, self.last_stats.max_context)
        store = getattr(self.model, "expert_store", None)
        self.ui.session_stats(self.last_stats, breakdown, context, store.stats() if store is not None else None)

    # ---- turns ------------------------------------------------------------------------------
    def turn(self, text: str) -> None:
        if self.attachment:
            text, self.attachment = self.attachment + "\n" + text, None
        gen = self.gen
        if self.group is not None:
            gen = self._mirror_turn(text)
        try:
            stats, _ = consume(self.ui, self.session.send(text, **gen))
        finally:
            if self.group is not None:
                self.model.idle()  # the user may take a while: no deadline until the next turn
        self.gen.pop("seed", None)  # seed the first answer only, not every turn alike
        if stats is not None:
            self.last_stats = stats
        self.ui.stats_line(stats)

    def _mirror_turn(self, text: str) -> dict:
        """Hand this turn to the other ranks: the text, the session settings, a pending reset
        and a seed (every rank must sample alike), as one broadcast JSON message."""
        import json
        import random

        from mlx_v4.distributed import broadcast_text

        s = self.session
        gen = dict(self.gen)
        gen.setdefault("seed", random.randrange(2**31))
        msg = {"op": "turn", "reset": self.pending_reset, "system": s.system, "thinking": s.thinking,
               "effort": getattr(s, "reasoning_effort", None), "text": text, "gen": gen}
        broadcast_text(json.dumps(msg), self.group)
        self.pending_reset = False
        return gen

    def run(self) -> None:
        try:
            self._run()
        finally:
            if self.group is not None:
                import json

                from mlx_v4.distributed import broadcast_text

                broadcast_text(json.dumps({"op": "quit"}), self.group)

    def _run(self) -> None:
        while True:
            try:
                text = read_message(self.ui)
            except (EOFError, KeyboardInterrupt):
                self.ui.err.print()
                return
            if not text.strip():
                continue
            try:
                if text.lstrip().startswith("/") and "\n" not in text.strip():
                    if not self.command(text):
                        return
                else:
                    self.turn(text)
            except (UserError, ValueError, OSError) as e:
                report(e, self.ui)  # one line; the chat goes on


def follow(model, tokenizer, session, group) -> None:
    """A rank other than 0 in a distributed chat: run every turn rank 0 hands over, silently."""
    import json

    from mlx_v4.distributed import broadcast_text

    while True:
        msg = json.loads(broadcast_text(None, group))
        if msg["op"] == "quit":
            return
        if msg["reset"]:
            session.reset()
        session.system, session.thinking, session.reasoning_effort = msg["system"], msg["thinking"], msg["effort"]
        try:
            for _ in session.send(msg["text"], **msg["gen"]):
                pass
        except (ValueError, OSError):
            pass  # rank 0 meets the same error (same inputs) and reports it
        model.idle()


@user_errors
@peer_errors
def chat(
    model: Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP)] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    think: Annotated[bool | None, typer.Option("--think/--no-think", help="Reason before answering "
                                               "(default: on, off for the bundled demo, which was trained without it).")] = None,
    effort: Annotated[str, typer.Option(help="Reasoning effort when thinking: high or max.")] = "high",
    temp: Annotated[float | None, typer.Option(help="Sampling temperature, 0 = greedy (default: the model's generation_config).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    min_p: Annotated[float | None, typer.Option(help="Drop tokens below this fraction of the top probability.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep only the k most likely tokens (0 = all).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 2048,
    seed: Annotated[int | None, typer.Option(help="Random seed for reproducible sampling.")] = None,
    draft: Annotated[str, typer.Option(help=DRAFT_HELP)] = "auto",
    draft_tokens: Annotated[int | None, typer.Option(help=DRAFT_TOKENS_HELP)] = None,
    resume: Annotated[str | None, typer.Option(help="Resume the session saved with /save NAME.")] = None,
    expert_budget: Annotated[str | None, typer.Option("--expert-budget", help=EXPERT_BUDGET_HELP)] = None,
    parallel: ParallelOpt = "pipeline",
    layers: LayersOpt = None,
    dist_timeout: TimeoutOpt = 300.0,
):
    from .distributed import group_if_launched, load
    from .ui import UI

    if effort not in EFFORTS:
        raise UserError(f"unknown effort {effort!r}", "use --effort high or --effort max")
    gen = generation_kwargs(max_tokens=max_tokens, temp=temp, top_p=top_p, min_p=min_p, top_k=top_k, seed=seed)
    group = group_if_launched(parallel, layers, dist_timeout)
    no_distributed_budget(group, expert_budget)
    gen |= draft_kwargs(draft, draft_tokens, distributed=group is not None)
    if group is not None and resume:
        raise UserError("--resume is not available in a distributed chat", "run the chat on one machine")
    saved = session_path(resume) if resume else None
    if saved is not None and not saved.exists():
        raise UserError(f"no saved session {resume!r} ({saved})", "save one in a chat with /save NAME")
    ui = UI()
    from mlx_v4.chat import ChatSession

    if group is not None:
        path = resolve_model(model)
        m, tok = load(ui, group, model, parallel, layers, dist_timeout)
        thinking = think if think is not None else not is_demo(path)
        session = ChatSession(m, tok, system=system, thinking=thinking, reasoning_effort=effort)
        if group.rank() != 0:
            return follow(m, tok, session, group)
        ui.banner(model_name=path, demo=is_demo(path), thinking=session.thinking, effort=effort,
                  max_context=m.args.max_position_embeddings)
        ui.notice(f"distributed: {m.split.describe()}; rank 0 of {group.size()} owns this terminal")
        return ChatLoop(ui, m, tok, session, gen, group).run()
    m, tok, path = load_model(ui, model, expert_budget)

    if saved is not None:
        session = ChatSession.load(saved, m, tok)
    else:
        thinking = think if think is not None else not is_demo(path)
        session = ChatSession(m, tok, system=system, thinking=thinking, reasoning_effort=effort)
    ui.banner(model_name=path, demo=is_demo(path), thinking=session.thinking,
              effort=getattr(session, "reasoning_effort", effort),
              max_context=m.args.max_position_embeddings)
    if saved is not None:
        ui.notice(f"resumed session {resume!r}: history restored from its saved KV cache (no re-prefill)")
        ui.history(messages_of(session))
    ChatLoop(ui, m, tok, session, gen).run()
