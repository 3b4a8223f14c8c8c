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
        """Advance by `advance` units (and optionally set the total, the description or extra fields), redrawing the
        bar or printing a due line."""
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
        rate = self.rate(now)
        speed = f"{1 / rate:.1f} s per {self.rate_unit.rstrip('s')}" if 0 < rate < 1 else f"{rate:.1f} {self.rate_unit}/s"
        return (f"{self.what}: {counts}, {speed}{', ' + status if status else ''}"
                f", {format_seconds(elapsed)} elapsed{eta}")


class Heartbeat:
    """For work whose steps cannot be counted (an ONNX export, a TensorRT build, a calibration):
    `stage(text)` records (and prints) what it is doing; on a terminal a spinner shows the stage and
    the time spent, otherwise a thread prints "WHAT: still STAGE (2m30s elapsed)" whenever
    `every` seconds pass without a line, so a log never goes silent."""

    def __init__(self, console: Console, what: str, *, enabled: bool = True, every: float | None = None) -> None:
        import threading

        self.console, self.what, self.enabled = console, what, enabled
        self.every = plain_interval() if every is None else every
        self.current, self.t0, self.last = "starting", time.perf_counter(), time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="segdeploy-heartbeat")
        self.status = console.status("", spinner="dots") if enabled and console.is_terminal else None

    def __enter__(self) -> Heartbeat:
        if self.status is not None:
            self.status.start()
        elif self.enabled and self.every > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.status is not None:
            self.status.stop()
        if self._thread.is_alive():
            self._thread.join()

    def stage(self, text: str) -> None:
        """Print `text` as a line of the log and make it the stage the heartbeat reports."""
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.current, self.last = text.rstrip(".…"), time.perf_counter()
        if self.status is not None:
            self.status.update(f"{self.what}: {self.current[:80]}")

    def _beat(self) -> None:
        while not self._stop.wait(min(self.every, 1.0)):
            now = time.perf_counter()
            if now - self.last >= self.every:
                self.last = now
                self.console.print(f"{self.what}: still {self.current[:120]} ({format_seconds(now - self.t0)} elapsed)",
                                   markup=False, highlight=False, soft_wrap=True)


class Ticker:
    """Plain progress lines for a log from a verb that keeps its own counts: `tick(line)` prints
    `line()` when `every` seconds have passed since the last one (never on a terminal, where the
    verb's own bar shows progress)."""

    def __init__(self, console: Console, enabled: bool = True, every: float | None = None) -> None:
        self.console, self.every = console, plain_interval() if every is None else every
        self.enabled = enabled and not console.is_terminal
        self.t0 = self.last = time.perf_counter()

    def tick(self, line: Any) -> None:  # line: Callable[[], str], called only when a line is due
        """Print `line()` when the last line is at least `every` seconds old (`line` is called only then)."""
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self.console.print(line(), markup=False, highlight=False, soft_wrap=True)

    def eta(self, done: float, total: float) -> str:
        """'ETA 3m05s' from the rate so far, or '' before any progress."""
        elapsed = time.perf_counter() - self.t0
        return f"ETA {format_seconds(elapsed / done * (total - done))}" if done > 0 else ""
