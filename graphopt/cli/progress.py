"""Progress display for long, batch-by-batch steps of the command-line interface.

The library only emits events (``on_event("progress", {"label", "index", "total"})``); this module
decides what reaches the user's stream. One :class:`ProgressDisplay` lives for one CLI command.

Rules:

1. A *step* is a run of :meth:`ProgressDisplay.step` calls with the same label and a growing batch
   count. A new label, or a count that does not grow (the same label run again, e.g. validation on
   a second execution provider), finishes the current step and starts a new one.
   :meth:`ProgressDisplay.finish` finishes the current step explicitly; the CLI calls it at every
   event that marks a boundary (a pass starts, validation starts, …), and the next step's clock
   starts there.
2. On a terminal the step is a tqdm bar on the stream, with the total, a percentage and an ETA when
   the total is known, and a counter and rate when it is not. Finishing the step closes the bar,
   which redraws its final state and ends the line, so no partial ``\\r`` line is left behind.
3. Off a terminal (CI logs, ``| tee``) there is no bar: one plain line is written once the step has
   run for ``interval_s`` seconds, then at most one every ``interval_s`` seconds, each with the
   count, the total and percentage and an ETA when the total is known, the elapsed time, and the
   rate. A step shorter than ``interval_s`` writes nothing; a step that wrote anything writes one
   final line when it finishes.
4. Off a terminal, work that reports no batches (an SVD, a search loop, one slow batch) is not
   silent either: :meth:`ProgressDisplay.activity` names what runs now, and a heartbeat thread
   writes ``<activity>: still running, <elapsed>`` whenever nothing was written, and no batch
   reported, for ``interval_s``. The thread lives from the first :meth:`activity` call to
   :meth:`close` and writes under the same lock as everything else, so lines never interleave.
5. A disabled display writes nothing at all.
6. ``index`` is the 0-based index of the batch that has just finished, as the events carry it, so
   the count shown is ``index + 1``. ``total`` is the number of batches, or ``None`` when unknown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

DEFAULT_INTERVAL_S = 10.0
"""Seconds between two plain progress lines off a terminal."""


@dataclass
class _Step:
    """The step in progress: its label, counts and the times the plain-line rules need."""

    label: str
    total: int | None
    started: float
    """Clock time the step is measured from (the previous boundary)."""
    done: int = 0
    last_event: float = 0.0
    last_line: float = 0.0
    """Clock time of the last plain line (or of the start, before the first one)."""
    lines: int = 0
    first_event: float | None = None
    first_done: int = 0


def format_duration(seconds: float) -> str:
    """``"41 s"``, ``"6 min 43 s"`` or ``"1 h 05 min"``: coarse enough to read in a log."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def format_eta(seconds: float) -> str:
    """``"~40 s left"``, ``"~8 min left"``, ``"~1 h 20 min left"`` (rounded; it is an estimate)."""
    if seconds < 60:
        return f"~{max(1, round(seconds))} s left"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"~{minutes} min left"
    return f"~{minutes // 60} h {minutes % 60:02d} min left"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _bar_size_options(stream: TextIO) -> dict[str, object]:
    """tqdm size options: follow the window when it has a size, else a fixed 80×24.

    A pseudo-terminal without a size (some CI runners, ``script``) reports 0×0, with which tqdm
    draws nothing at all; a stream without a file descriptor gets tqdm's defaults.
    """
    try:
        columns, _ = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return {}
    if columns <= 0:
        return {"ncols": 80, "nrows": 24}
    return {"dynamic_ncols": True}


class ProgressDisplay:
    """Shows batch progress of long steps on ``stream`` (module rules); one per CLI command.

    ``stream`` defaults to ``sys.stderr`` as it is when the display is created. ``terminal``
    overrides ``stream.isatty()``. ``clock`` (seconds, monotonic) times the plain lines; the bar
    keeps its own time. Use it as a context manager, or call :meth:`close` at the end.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        enabled: bool = True,
        terminal: bool | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "batch",
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be ≥ 0, not {interval_s}")
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.interval_s = interval_s
        self.clock = clock
        self.unit = unit
        self._step: _Step | None = None
        self._bar: tqdm | None = None
        self._origin = clock()
        self._closed = False
        self._lock = threading.RLock()
        self._activity: tuple[str, float] | None = None
        self._last_output = self._origin
        self._stop_heartbeat = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def step(self, label: str, index: int, total: int | None = None) -> None:
        """Record that batch ``index`` (0-based) of ``total`` in step ``label`` has finished."""
        if not self.enabled or self._closed:
            return
        now = self.clock()
        done = index + 1
        current = self._step
        if current is not None and (current.label != label or done <= current.done):
            self._finish(origin=current.last_event)
            current = None
        if current is None:
            current = _Step(label=label, total=total, started=self._origin)
            current.last_line = current.started
            self._step = current
            if self.terminal:
                self._bar = self._open_bar(label, total)
        self._last_output = max(self._last_output, now)  # steps write their own lines (rule 3)
        if current.first_event is None:
            current.first_event, current.first_done = now, done
        current.done, current.last_event = done, now
        if total is not None:
            current.total = total
        if self._bar is not None:
            self._advance_bar(self._bar, done, current.total)
        elif not self.terminal and now - current.last_line >= self.interval_s:
            self._write_line(self._progress_line(current, now))
            current.last_line = now
            current.lines += 1

    def finish(self) -> None:
        """Finish the current step, if any (rule 1); the next step is timed from now."""
        if not self.enabled or self._closed:
            return
        self._finish(origin=self.clock())

    def write(self, message: str) -> None:
        """Write one line of other text without breaking an open bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self._write_line(message)

    @contextlib.contextmanager
    def logging_redirected(self, loggers: list[logging.Logger]) -> Iterator[None]:
        """While open, records of ``loggers`` that go to stdout/stderr don't break a bar.

        On a terminal their console handlers write through tqdm, which clears the bar, writes the
        record and redraws the bar; elsewhere (and when disabled) nothing changes.
        """
        if not (self.enabled and self.terminal):
            yield
            return
        with logging_redirect_tqdm(loggers=loggers):
            yield

    def activity(self, label: str) -> None:
        """Rule 4: ``label`` (e.g. ``running quant``) is what runs from now on."""
        if not self.enabled or self._closed or self.terminal:
            return
        with self._lock:
            self._activity = (label, self.clock())
        if self._heartbeat is None and self.interval_s > 0:
            self._heartbeat = threading.Thread(
                target=self._beat_until_closed, name="graphopt-progress", daemon=True
            )
            self._heartbeat.start()

    def beat(self) -> None:
        """Rule 4's check, once: write the heartbeat line if nothing was written for
        ``interval_s`` (the heartbeat thread calls this; tests call it with a fake clock)."""
        with self._lock:
            if self._closed or self._activity is None:
                return
            now = self.clock()
            if now - self._last_output < self.interval_s:
                return
            label, since = self._activity
            self._write_line(f"{label}: still running, {format_duration(now - since)} elapsed")

    def _beat_until_closed(self) -> None:
        while not self._stop_heartbeat.wait(min(self.interval_s, 1.0)):
            self.beat()

    def close(self) -> None:
        """Finish the current step; later calls do nothing. Safe to call more than once."""
        if self._closed:
            return
        self.finish()
        self._closed = True
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)

    def _finish(self, *, origin: float) -> None:
        current, bar = self._step, self._bar
        self._step, self._bar = None, None
        self._origin = origin
        if bar is not None:
            bar.close()
        elif current is not None and current.lines:
            self._write_line(self._final_line(current))

    def _open_bar(self, label: str, total: int | None) -> tqdm:
        return tqdm(
            total=total,
            desc=label,
            unit=self.unit,
            file=self.stream,
            leave=True,
            **_bar_size_options(self.stream),
        )

    @staticmethod
    def _advance_bar(bar: tqdm, done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def _write_line(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_output = self.clock()

    def _progress_line(self, current: _Step, now: float) -> str:
        elapsed = now - current.started
        parts = [f"{current.label}: {self.unit} {current.done}"]
        if current.total:
            percent = min(100, 100 * current.done // current.total)
            parts[0] += f"/{current.total} ({percent}%)"
        parts.append(f"{format_duration(elapsed)} elapsed")
        rate = _rate(current, now)
        if current.total and rate and current.done < current.total:
            parts.append(format_eta((current.total - current.done) / rate))
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s")
        return ", ".join(parts)

    def _final_line(self, current: _Step) -> str:
        elapsed = current.last_event - current.started
        plural = "" if current.done == 1 else "es" if self.unit.endswith(("s", "ch")) else "s"
        return (
            f"{current.label}: done, {current.done} {self.unit}{plural} "
            f"in {format_duration(elapsed)}"
        )


def _rate(current: _Step, now: float) -> float | None:
    """Batches per second: over the events seen when they span time, else over the whole step."""
    if current.first_event is not None and current.done > current.first_done:
        span = now - current.first_event
        if span > 0:
            return (current.done - current.first_done) / span
    elapsed = now - current.started
    return current.done / elapsed if elapsed > 0 else None
