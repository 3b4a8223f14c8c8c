"""Progress of long work (training steps, evaluated images, parity tiles, bench rows), one way for
every verb: a rich progress bar on a terminal; when stderr is a file or a pipe (a log, CI, nohup),
a plain line every `SEGDEPLOY_PROGRESS_SECONDS` (30 s by default) with the step, the rate and the
time left, so hours of work are never silent in a log.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console

DEFAULT_EVERY_S = 30.0


def plain_interval() -> float:
    """Seconds between plain progress lines (SEGDEPLOY_PROGRESS_SECONDS; 0 prints every step)."""
    try:
        return max(0.0, float(os.environ.get("SEGDEPLOY_PROGRESS_SECONDS", DEFAULT_EVERY_S)))
    except ValueError:
        return DEFAULT_EVERY_S


def format_seconds(s: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class WorkProgress:
    """Progress of `total` steps of `unit` (None when unknown). `update(advance, **fields)` moves it
    on; `fields` (e.g. loss=0.41) are shown after the counts. On a terminal it is a rich bar with
    the rate and an estimate; otherwise plain lines at most every `every` seconds:

        train: epoch 3/12, 40/120 steps (33%), 12.5 images/s, loss 0.4132, ETA 1m04s

    `label` is called with the fields to name the position (e.g. "epoch 3/12"); `rate_unit` and
    `per_step` turn steps into what the rate counts (images per step)."""

    def __init__(self, console: Console, what: str, total: int | None, unit: str = "steps", *, enabled: bool = True,
                 every: float | None = None, rate_unit: str | None = None, per_step: float = 1.0,
                 transient: bool = False) -> None:
        self.console, self.what, self.total, self.unit = console, what, total, unit
        self.enabled, self.every = enabled, plain_interval() if every is None else every
        self.rate_unit, self.per_step = rate_unit or unit, per_step
        self.done, self.fields = 0, {}
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if enabled and console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=console, transient=transient)
            self.task = self.bar.add_task(what, total=total, status="")

    def __enter__(self) -> WorkProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if self.bar is not None:
            if exc_type is not None:  # a failure clears the bar rather than leave it above the error
                self.bar.live.transient = True
            self.bar.stop()

    def update(self, advance: int = 1, *, total: int | None = None, description: str | None = None,
               **fields: Any) -> None:
        self.done += advance
        if total is not None:
            self.total = total
        if description is not None:
            self.what = description
        self.fields.update(fields)
        status = self._status()
        if self.bar is not None:
            self.bar.update(self.task, advance=advance, total=self.total, description=self.what, status=status)
            return
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or (self.total and self.done >= self.total
                                                                and self.every == 0)):
            self.last = now
            self.console.print(self.line(now), markup=False, highlight=False, soft_wrap=True)

    def _status(self) -> str:
        return "  ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.fields.items() if v is not None and v != "")

    def rate(self, now: float | None = None) -> float:
        """`rate_unit` per second since the start."""
        elapsed = (now or time.perf_counter()) - self.t0
        return self.done * self.per_step / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        """The plain progress line: position, counts, rate, fields, time left."""
        now = now or time.perf_counter()
        elapsed = now - self.t0
        counts = f"{self.done}/{self.total} {self.unit} ({self.done / self.total:.0%})" if self.total else \
            f"{self.done} {self.unit}"
        eta = ""
        if self.total and self.done:
            eta = f", ETA {format_seconds(elapsed / self.done * (self.total - self.done))}"
        status = self._status()
        return (f"{self.what}: {counts}, {self.rate(now):.1f} {self.rate_unit}/s{', ' + status if status else ''}"
                f", {format_seconds(elapsed)} elapsed{eta}")
