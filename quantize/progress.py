"""Progress of a conversion: Rich bars (tensors, bytes, ETA) on a terminal, plain logging otherwise.

Rich is imported only when bars are shown, so the library works (and logs) without it.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("mlx_v4.quantize")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


class Progress:
    """``advance(tensors=, nbytes=)`` as work is done; a context manager."""

    def __init__(self, total_tensors: int, total_bytes: int, title: str, enabled: bool | None = None):
        self.total_tensors, self.total_bytes, self.title = total_tensors, total_bytes, title
        self.tensors = self.nbytes = 0
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars = None
        self._start = self._last_log = time.monotonic()

    def __enter__(self):
        if self.enabled:
            try:
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                    TransferSpeedColumn,
                )
            except ImportError:
                self.enabled = False
            else:
                self._bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
                self._bars.__enter__()
                self._task = self._bars.add_task(self._describe(), total=self.total_bytes)
        log.info("%s: %d tensors, %s to read", self.title, self.total_tensors, _gb(self.total_bytes))
        return self

    def advance(self, tensors: int = 0, nbytes: int = 0) -> None:
        self.tensors += tensors
        self.nbytes += nbytes
        if self._bars is not None:
            self._bars.update(self._task, advance=nbytes, description=self._describe())
            return
        now = time.monotonic()
        if now - self._last_log >= 10 or (tensors and self.tensors == self.total_tensors):
            self._last_log = now
            rate = self.nbytes / max(now - self._start, 1e-9)
            eta = (self.total_bytes - self.nbytes) / rate if rate > 0 else float("inf")
            log.info("%d/%d tensors, %s / %s, %.0f MB/s, ETA %s", self.tensors, self.total_tensors,
                     _gb(self.nbytes), _gb(self.total_bytes), rate / 1e6,
                     f"{eta:.0f} s" if eta != float("inf") else "?")

    def _describe(self) -> str:
        return f"{self.title}: {self.tensors}/{self.total_tensors} tensors"

    def note(self, message: str) -> None:
        if self._bars is not None:
            self._bars.console.print(message)
        log.info("%s", message)

    def __exit__(self, *exc):
        if self._bars is not None:
            self._bars.__exit__(*exc)
            self._bars = None
        return False
