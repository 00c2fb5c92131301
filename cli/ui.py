"""All terminal rendering for the mlx-v4 command (Rich). Commands hand plain data in here.

Two modes: on a terminal the answer streams as Markdown in a Rich Live view with the reasoning
dimmed above it; otherwise (a pipe or a file) the answer goes to stdout as plain text and
everything else (reasoning, stats, notices) to stderr, so `mlx-v4 generate ... | tool` carries
only the answer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.markdown import Markdown
from rich.panel import Panel
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

GB = 1e9


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Tail:
    """Render only the last lines of a renderable so a long streaming answer keeps its newest
    text in view (Live cannot redraw what has scrolled off the screen)."""

    def __init__(self, renderable, reserve: int = 2):
        self.renderable, self.reserve = renderable, reserve

    def __rich_console__(self, console, options):
        lines = console.render_lines(self.renderable, options, pad=False)
        keep = max(1, console.size.height - self.reserve)
        for line in lines[-keep:]:
            yield from line
            yield Segment.line()


@dataclass
class StreamView:
    """One answer being streamed: collects reasoning and answer text and renders them."""

    ui: UI
    show_reasoning: bool = True
    reasoning: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    _live: Live | None = None
    _plain_reasoning_open: bool = False

    def __enter__(self):
        if self.ui.interactive:
            self._live = Live(console=self.ui.out, refresh_per_second=12, transient=True,
                              vertical_overflow="crop")
            self._live.__enter__()
        return self

    def _renderable(self, tail: bool):
        parts = []
        if self.show_reasoning and self.reasoning:
            parts.append(Text("".join(self.reasoning).strip(), style="dim italic"))
        if self.answer:
            parts.append(Markdown("".join(self.answer)))
        group = Group(*parts)
        return _Tail(group) if tail else group

    def reasoning_text(self, text: str) -> None:
        self.reasoning.append(text)
        if self._live is not None:
            self._live.update(self._renderable(tail=True))
        elif self.show_reasoning:
            self.ui.err.print(text, style="dim", end="", markup=False, highlight=False)
            self._plain_reasoning_open = True

    def answer_text(self, text: str) -> None:
        self.answer.append(text)
        if self._live is not None:
            self._live.update(self._renderable(tail=True))
        else:
            if self._plain_reasoning_open:
                self.ui.err.print()
                self._plain_reasoning_open = False
            sys.stdout.write(text)
            sys.stdout.flush()

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(None, None, None)
            if self.reasoning or self.answer:
                self.ui.out.print(self._renderable(tail=False))
        else:
            if self._plain_reasoning_open:
                self.ui.err.print()
            if self.answer and not "".join(self.answer).endswith("\n"):
                sys.stdout.write("\n")
            sys.stdout.flush()
        return False


class UI:
    """Rendering entry points. ``interactive`` is True when stdout is a terminal."""

    def __init__(self, interactive: bool | None = None):
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)
        self.interactive = sys.stdout.isatty() if interactive is None else interactive

    # ---- messages -----------------------------------------------------------------------------
    def error(self, message: str, fix: str | None = None) -> None:
        line = Text("Error: ", style="bold red") + Text(one_line(message), style="red")
        if fix:
            line += Text(f" ({one_line(fix)})", style="red")
        self.err.print(line, soft_wrap=True)

    def notice(self, message: str) -> None:
        self.err.print(Text(message, style="cyan"), soft_wrap=True)

    def status(self, message: str):
        """A spinner on a terminal, nothing otherwise (a context manager either way)."""
        if self.interactive:
            return self.err.status(message, spinner="dots")
        from contextlib import nullcontext

        return nullcontext()

    # ---- generation -------------------------------------------------------------------------
    def stream(self, show_reasoning: bool = True) -> StreamView:
        return StreamView(self, show_reasoning=show_reasoning)

    def interrupted(self) -> None:
        self.err.print(Text("[stopped; the session keeps what was said so far]", style="yellow"))

    @staticmethod
    def draft_summary(stats) -> str | None:
        """'drafts 12/20 accepted (0.60), 1.60 tok/forward' or None without drafts."""
        if not getattr(stats, "draft_tokens", 0):
            return None
        return (f"drafts {stats.accepted_tokens}/{stats.draft_tokens} accepted ({stats.acceptance_rate:.2f}), "
                f"{stats.mean_accepted:.2f} tok/forward")

    def stats_line(self, stats) -> None:
        """prompt tok/s, generation tok/s, context used of max, KV cache size, peak memory."""
        if stats is None:
            return
        parts = [
            f"prompt {stats.prompt_tokens} tok @ {stats.prompt_tps:.1f} tok/s",
            f"gen {stats.generation_tokens} tok @ {stats.generation_tps:.1f} tok/s",
            f"context {stats.context_tokens}/{stats.max_context}",
            f"KV cache {human_bytes(stats.cache_bytes)}",
            f"peak mem {human_bytes(stats.peak_memory_bytes)}",
        ]
        if (drafts := self.draft_summary(stats)) is not None:
            parts.append(drafts)
        self.err.print(Text(" | ".join(parts), style="dim cyan"), soft_wrap=True)

    # ---- chat -------------------------------------------------------------------------------
    def banner(self, *, model_name: str, demo: bool, thinking: bool, effort: str | None,
               max_context: int | None = None) -> None:
        lines = [Text.assemble(("mlx-v4 chat", "bold"), "  model: ", (model_name, "green"))]
        if demo:
            lines.append(Text(
                "This is the bundled tiny demo model (a few million parameters, trained on Python "
                "docs): it shows the machinery, not DeepSeek V4's quality.", style="yellow"))
            lines.append(Text(
                "For the real model: mlx-v4 chat --model deepseek-ai/DeepSeek-V4-Flash "
                "(needs a Mac with ~192 GB+; Pro needs several). See `mlx-v4 info flash`.", style="yellow"))
        mode = f"thinking {'on' if thinking else 'off'}" + (f", effort {effort}" if thinking and effort else "")
        if max_context:
            mode += f", context {max_context:,} tokens"
        lines.append(Text(mode + ".  /help for commands, /exit or Ctrl-D to leave; a line ending in "
                          "\\ continues, \"\"\" starts a block.", style="dim"))
        if self.interactive:
            self.err.print(Panel(Group(*lines), border_style="blue"))
        else:
            for line in lines:
                self.err.print(line, soft_wrap=True)

    def chat_help(self, commands: list[tuple[str, str]]) -> None:
        table = Table(show_header=False, box=None, padding=(0, 2))
        for name, text in commands:
            table.add_row(Text(name, style="bold"), text)
        self.err.print(table)

    def prompt(self, continuation: bool = False) -> str:
        """Read one line from the user (raises EOFError / KeyboardInterrupt)."""
        marker = "... " if continuation else ">>> "
        if sys.stdin.isatty():
            # the prompt goes where the user looks: stdout on a terminal, else stderr
            console = self.out if self.interactive else self.err
            return console.input(Text(marker, style="bold green"))
        return input()

    def history(self, messages: list[tuple[str, str]]) -> None:
        """Restored conversation: (role, text) pairs."""
        if not messages:
            return
        self.err.print(Text(f"--- restored {len(messages)} messages ---", style="dim"))
        for role, text in messages:
            style = {"user": "bold green", "assistant": "default", "system": "magenta"}.get(role, "dim")
            self.err.print(Text(f"{role}: ", style=style) + Text(one_line(text)[:400]), soft_wrap=True)
        self.err.print(Text("--- end of history ---", style="dim"))

    def session_stats(self, stats, breakdown: dict[str, int] | None, context: tuple[int, int] | None,
                      experts: dict | None = None) -> None:
        table = Table(title="session", show_header=False, box=None, padding=(0, 2))
        if context:
            table.add_row("context", f"{context[0]:,} / {context[1]:,} tokens")
        if stats is not None:
            table.add_row("last prompt", f"{stats.prompt_tokens} tok @ {stats.prompt_tps:.1f} tok/s")
            table.add_row("last generation", f"{stats.generation_tokens} tok @ {stats.generation_tps:.1f} tok/s")
            table.add_row("KV cache", human_bytes(stats.cache_bytes))
            table.add_row("peak memory", human_bytes(stats.peak_memory_bytes))
            if (drafts := self.draft_summary(stats)) is not None:
                table.add_row("last drafting", drafts)
        for kind, n in (breakdown or {}).items():
            table.add_row(f"  cache: {kind}", human_bytes(n))
        if experts is not None:
            table.add_row("experts resident", f"{human_bytes(experts['resident_bytes'])} of budget "
                          f"{human_bytes(experts['budget_bytes'])} ({experts['resident_experts']} experts)")
            table.add_row("expert hits", f"{experts['hits']:,} hits, {experts['misses']:,} misses "
                          f"({experts['hit_rate']:.1%}), {human_bytes(experts['bytes_read'])} read")
            if (engram := experts.get("engram")) is not None:
                table.add_row("Engram tables", engram_summary(engram))
        if stats is None and not breakdown and not context:
            table.add_row("", "nothing generated yet")
        self.err.print(table)

    # ---- info / bench -----------------------------------------------------------------------
    def memory_plan(self, plan) -> None:
        from .drafter_plan import format_count

        table = Table(title=f"Memory plan: {plan.name}", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("parameters", f"{plan.params / 1e9:.1f} B" if plan.params else "-")
        table.add_row(f"weights ({plan.weights_source})", human_bytes(plan.weights_bytes))
        if plan.drafter is not None:
            d = plan.drafter
            table.add_row(f"  of which the drafter ({d.kind}, {format_count(d.params)} params)", human_bytes(d.nbytes))
        table.add_row(f"KV cache at {plan.context:,} tokens", human_bytes(plan.cache_bytes))
        table.add_row("overhead (activations, buffers)", human_bytes(plan.overhead_bytes))
        table.add_row("total", Text(human_bytes(plan.total_bytes), style="bold"))
        here = Text("yes", style="green") if plan.fits_here else Text("no", style="red")
        table.add_row(f"fits this machine ({human_bytes(plan.machine_bytes)})", here)
        self.out.print(table)
        macs = Table(title="Mac memory sizes", show_header=True)
        macs.add_column("unified memory")
        macs.add_column("fits")
        for size, verdict in plan.macs:
            style = {"yes": "green", "tight": "yellow", "no": "red"}[verdict]
            label = {"yes": "yes", "tight": "only with iogpu.wired_limit_mb raised", "no": "no"}[verdict]
            macs.add_row(f"{size} GB", Text(label, style=style))
        self.out.print(macs)
        for note in plan.notes:
            self.out.print(Text(note, style="dim"), soft_wrap=True)

    def stream_plan(self, title: str, rows, memory_gb: int, context: int, ssd_gbps: float,
                    notes: list[str] = ()) -> None:
        from .stream_plan import DEFAULT_TARGET_TPS

        table = Table(title=f"{title}: recipe and expert budget per Mac (KV at {context:,} tokens)")
        for col in ("Mac", "recipe", "budget", "resident", "hit*", "read/tok*", f"tok/s* @{ssd_gbps:g}GB/s"):
            table.add_column(col, justify="right", no_wrap=col in ("Mac", "recipe"))
        for r in rows:
            c = r.choice
            style = "bold" if r.memory_gb == memory_gb else None
            if c is None:
                table.add_row(f"{r.memory_gb} GB", Text("does not fit", style="red"), "-", "-", "-", "-", "-",
                              style=style)
            elif c.resident:
                table.add_row(f"{r.memory_gb} GB", c.recipe, "all", "100%", "-", "0", "no reads", style=style)
            else:
                table.add_row(f"{r.memory_gb} GB", c.recipe, human_bytes(c.budget), f"{c.fraction:.0%}",
                              f"{c.hit:.0%}", human_bytes(c.read_per_token), f"{c.tps:.2f}" if c.tps else "-",
                              style=style)
        self.out.print(table)
        mine = next(r for r in rows if r.memory_gb == memory_gb)
        if mine.choice is None:
            self.out.print(Text(f"{memory_gb} GB: no recipe fits (the other weights and KV cache alone are too big).",
                                style="red"))
        else:
            c = mine.choice
            budget = "every expert resident" if c.resident else f"--expert-budget {c.budget / 1e9:.0f}GB"
            how = ("run the release's weights as they are, with" if c.recipe == "native"
                   else f"convert with --recipe {c.recipe}, run with")
            self.out.print(Text(f"{memory_gb} GB: {how} {budget}.", style="bold"))
            for o in mine.options:
                speed = "resident" if o.resident else (f"{o.tps:.2f} tok/s*" if o.tps else "does not fit")
                self.out.print(Text(f"  {o.recipe}: experts {human_bytes(o.expert_bytes)}, {speed}", style="dim"))
        self.out.print(Text("* PROJECTION, not a measurement: read/token = (1 - hit rate) x top-k x layers x one "
                            f"expert; tok/s = {ssd_gbps:g} GB/s / read per token (SSD alone, compute left out). "
                            "Hit rates were measured by benchmarks/expert_stream.py with a near-uniform synthetic "
                            "router (a pessimistic stand-in); the real Flash routing pattern was not measured. "
                            "Suggested: the best quality that keeps every expert resident or projects "
                            f"{DEFAULT_TARGET_TPS:g}+ tok/s, else the fastest.",
                            style="dim"), soft_wrap=True)
        for note in notes:
            self.out.print(Text(note, style="dim"), soft_wrap=True)

    def split_plan(self, title: str, context: int, rows) -> None:
        table = Table(title=f"Split plan: {title}")
        for col in ("rank", "layers", "weights", f"KV at {context:,}", "total", "memory", "fits"):
            table.add_column(col, justify="right")
        for r in rows:
            style = {"yes": "green", "tight": "yellow", "no": "red"}[r.verdict]
            label = {"yes": "yes", "tight": "tight (raise iogpu.wired_limit_mb)", "no": "NO"}[r.verdict]
            table.add_row(str(r.rank), r.layers, human_bytes(r.weights_bytes), human_bytes(r.cache_bytes),
                          human_bytes(r.total_bytes), human_bytes(r.memory_bytes), Text(label, style=style))
        self.out.print(table)
        bad = [r.rank for r in rows if r.verdict == "no"]
        if bad:
            self.out.print(Text(f"does not fit: rank(s) {', '.join(map(str, bad))} need more memory than their "
                                f"machine has; add machines, use more memory, or a smaller recipe", style="red"))
        self.out.print(Text("total includes ~2 GB + 3% of weights for activations and buffers; tensor mode "
                            "keeps the whole KV cache on every rank (one shared KV head).", style="dim"),
                       soft_wrap=True)

    def expert_stats(self, stats: dict, tokens: int | None = None) -> None:
        title = "Routed experts read on demand" + (" (with Engram tables)" if "engram" in stats else "")
        table = Table(title=f"{title} ({stats['policy']})", show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("budget", f"{human_bytes(stats['budget_bytes'])} of {human_bytes(stats['total_bytes'])}")
        tables = stats.get("engram", {}).get("resident_tables", 0)
        table.add_row("resident", f"{human_bytes(stats['resident_bytes'])} ({stats['resident_experts']} experts"
                      + (f" + {tables} Engram tables)" if tables else ")"))
        table.add_row("hit rate", f"{stats['hit_rate']:.1%} ({stats['hits']:,} hits, {stats['misses']:,} misses)")
        table.add_row("read", f"{human_bytes(stats['bytes_read'])} in {stats['reads']:,} reads, "
                      f"{stats['read_seconds']:.2f} s")
        if tokens:
            table.add_row("read per token", human_bytes(stats["bytes_read"] / tokens))
        if (engram := stats.get("engram")) is not None:  # DeepSeek V4.1: its tables share the budget
            table.add_row("Engram tables", engram_summary(engram))
            table.add_row("Engram read", f"{human_bytes(engram['bytes_read'])} in {engram['reads']:,} reads, "
                          f"{engram['read_seconds']:.2f} s" + (f", {human_bytes(engram['bytes_read'] / tokens)} "
                                                               "per token" if tokens else ""))
        self.out.print(table)

    def bench_table(self, model_name: str, rows: list[dict]) -> None:
        table = Table(title=f"Benchmark: {model_name}")
        for col in ("context", "prefill tok/s", "decode tok/s", "generated", "KV cache", "peak memory"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(f"{r['context']:,}", f"{r['prefill_tps']:.1f}", f"{r['decode_tps']:.1f}",
                          str(r["generated"]), human_bytes(r["cache_bytes"]), human_bytes(r["peak_memory_bytes"]))
        if any(r.get("draft_tokens") for r in rows):
            table.caption = "decoded with drafts; accepted on these random ids: " + ", ".join(
                f"{r['accepted_tokens']}/{r['draft_tokens']} (context {r['context']:,})" for r in rows)
        self.out.print(table)

    def draft_table(self, model_name: str, rows: list[dict], draft_tokens: int) -> None:
        """Plain vs speculative decoding per chat prompt, and the totals."""
        table = Table(title=f"Speculative decoding (greedy, {draft_tokens} draft token(s) per step): {model_name}")
        table.add_column("prompt", no_wrap=True, max_width=24, overflow="ellipsis")
        for col in ("tokens", "plain tok/s", "draft tok/s", "speed-up", "accept", "tok/fwd", "same"):
            table.add_column(col, justify="right")
        for r in rows + [_draft_totals(rows)]:
            table.add_row(r["prompt"], str(r["tokens"]), f"{r['plain_tps']:.1f}", f"{r['draft_tps']:.1f}",
                          f"{r['draft_tps'] / max(r['plain_tps'], 1e-9):.2f}x",
                          f"{r['accepted_tokens'] / max(r['draft_tokens'], 1):.2f}",
                          f"{(r['accepted_tokens'] + r['target_forwards']) / max(r['target_forwards'], 1):.2f}",
                          "yes" if r["same"] else "NO")
        self.out.print(table)


def _draft_totals(rows: list[dict]) -> dict:
    total = dict(prompt="all", same=all(r["same"] for r in rows))
    for k in ("tokens", "plain_seconds", "draft_seconds", "draft_tokens", "accepted_tokens", "target_forwards"):
        total[k] = sum(r[k] for r in rows)
    decoded = sum(max(r["tokens"] - 1, 0) for r in rows)  # decode steps after each first token
    total["plain_tps"] = decoded / max(total["plain_seconds"], 1e-9)
    total["draft_tps"] = decoded / max(total["draft_seconds"], 1e-9)
    return total


def engram_summary(engram: dict) -> str:
    """The Engram part of the expert store's stats, in one line."""
    held = (f"{engram['resident_tables']} of {engram['tables']} resident ({human_bytes(engram['resident_bytes'])})"
            if engram["resident_tables"] else f"{engram['tables']} on disk ({human_bytes(engram['total_bytes'])})")
    return f"{held}; rows {engram['hits']:,} from memory, {engram['misses']:,} read from disk"
