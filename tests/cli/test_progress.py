"""Progress display: a tqdm bar on terminals, a plain line every ~10 s elsewhere (issue 16.8)."""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
import select
import sys
import time

import pytest

from graphopt.cli.progress import ProgressDisplay, format_duration, format_eta


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TerminalStream(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _run(
    display: ProgressDisplay,
    clock: FakeClock,
    label: str,
    batches: int,
    seconds: float,
    total: int | None,
) -> list[tuple[float, int]]:
    """Feed ``batches`` batches of ``seconds`` each; return (time, new line count) per event."""
    stream = display.stream
    marks = []
    for index in range(batches):
        clock.advance(seconds)
        before = stream.getvalue().count("\n")
        display.step(label, index, total)
        marks.append((clock.now, stream.getvalue().count("\n") - before))
    return marks


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --- off a terminal --------------------------------------------------------------------------


def test_plain_lines_come_every_interval_not_more_often() -> None:
    clock, stream = FakeClock(), io.StringIO()
    display = ProgressDisplay(stream, clock=clock)
    start = clock.now
    marks = _run(display, clock, "quant: calibrating", 1000, 0.5, 1000)  # 500 s of work
    times = [when for when, written in marks if written]
    assert all(written <= 1 for _, written in marks)
    assert 45 <= len(times) <= 50  # ~ elapsed / 10 s, no flood
    assert times[0] - start == pytest.approx(10.0)  # first line after one interval, not silent
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) >= 10.0
    assert max(gaps) <= 10.5  # never silent much longer than the interval (one batch)
    display.finish()
    lines = _lines(stream)
    assert len(lines) == len(times) + 1
    assert lines[-1] == "quant: calibrating: done, 1000 batches in 8 min 20 s"


def test_plain_line_carries_count_total_percent_elapsed_and_eta() -> None:
    clock, stream = FakeClock(), io.StringIO()
    display = ProgressDisplay(stream, clock=clock)
    _run(display, clock, "quant: calibrating", 10, 1.0, 200)
    assert _lines(stream) == [
        "quant: calibrating: batch 10/200 (5%), 10 s elapsed, ~3 min left, 1 batch/s"
    ]


def test_plain_line_without_total_has_count_and_rate_but_no_eta() -> None:
    clock, stream = FakeClock(), io.StringIO()
    display = ProgressDisplay(stream, clock=clock)
    _run(display, clock, "lowrank: collecting XᵀX", 40, 0.5, None)
    lines = _lines(stream)
    assert lines[0] == "lowrank: collecting XᵀX: batch 20, 10 s elapsed, 2 batch/s"
    assert not any("left" in line or "/" in line.split(",")[0] for line in lines)


def test_short_step_writes_nothing_off_a_terminal() -> None:
    clock, stream = FakeClock(), io.StringIO()
    display = ProgressDisplay(stream, clock=clock)
    _run(display, clock, "validating", 9, 1.0, 9)  # 9 s < 10 s
    display.close()
    assert stream.getvalue() == ""


def test_slow_batches_give_one_line_each_and_the_step_is_timed_from_the_boundary() -> None:
    clock, stream = FakeClock(), io.StringIO()
    display = ProgressDisplay(stream, clock=clock)
    clock.advance(100)  # loading, normalizing: not part of the step
    display.finish()
    marks = _run(display, clock, "sparsify: calibrating", 3, 25.0, 4)
    assert [written for _, written in marks] == [1, 1, 1]
    assert _lines(stream)[0].startswith("sparsify: calibrating: batch 1/4 (25%), 25 s elapsed")


def test_new_label_or_restarted_count_finishes_the_previous_plain_step() -> None:
    clock, stream = FakeClock(), io.StringIO()
    display = ProgressDisplay(stream, clock=clock)
    _run(display, clock, "validating", 30, 1.0, 30)
    _run(display, clock, "validating", 30, 1.0, 30)  # second provider: count starts again
    _run(display, clock, "quant: calibrating", 5, 1.0, 5)  # short: nothing of its own
    display.close()
    done = [line for line in _lines(stream) if ": done," in line]
    assert done == [
        "validating: done, 30 batches in 30 s",
        "validating: done, 30 batches in 30 s",
    ]
    assert not any(line.startswith("quant") for line in _lines(stream))


def test_disabled_display_is_silent() -> None:
    for terminal_stream in (io.StringIO(), TerminalStream()):
        clock = FakeClock()
        with ProgressDisplay(terminal_stream, clock=clock, enabled=False) as display:
            _run(display, clock, "quant: calibrating", 50, 1.0, 50)
            display.write("hello")
        assert terminal_stream.getvalue() == ""


def test_interval_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        ProgressDisplay(io.StringIO(), interval_s=-1)


# --- on a terminal ---------------------------------------------------------------------------


def _final_states(text: str) -> list[str]:
    """What each closed bar left on screen: the last ``\\r`` segment before each newline."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")[:-1]]


def test_terminal_bar_shows_total_and_is_closed_with_a_newline() -> None:
    stream = TerminalStream()
    with ProgressDisplay(stream) as display:
        assert display.terminal
        for index in range(5):
            display.step("quant: calibrating", index, 5)
        assert "\n" not in stream.getvalue()  # still one live line while running
    text = stream.getvalue()
    assert text.endswith("\n")  # no dangling "\r" line after the command
    [final] = _final_states(text)
    assert final.startswith("quant: calibrating: 100%")
    assert "5/5" in final


def test_terminal_bar_without_total_counts() -> None:
    stream = TerminalStream()
    with ProgressDisplay(stream) as display:
        for index in range(7):
            display.step("lowrank: collecting XᵀX", index, None)
    [final] = _final_states(stream.getvalue())
    assert re.match(r"lowrank: collecting XᵀX: 7batch \[", final)
    assert "%" not in final


def test_label_change_closes_the_previous_bar() -> None:
    stream = TerminalStream()
    display = ProgressDisplay(stream)
    for index in range(3):
        display.step("lowrank: collecting XᵀX", index, 3)
    assert "\n" not in stream.getvalue()
    display.step("quant: calibrating", 0, 4)
    text = stream.getvalue()
    closed = text[: text.index("quant: calibrating")]  # all written before the second bar
    assert closed.endswith("\n\r")  # the first bar ended its line before the second began
    assert "3/3" in _final_states(closed)[0]
    display.close()
    states = _final_states(stream.getvalue())
    assert len(states) == 2
    assert "3/3" in states[0] and "1/4" in states[1]


def test_finish_on_terminal_closes_the_bar_and_close_is_idempotent() -> None:
    stream = TerminalStream()
    display = ProgressDisplay(stream)
    display.step("validating", 0, 2)
    display.step("validating", 1, 2)
    display.finish()
    after_finish = stream.getvalue()
    assert after_finish.endswith("\n")
    display.close()
    display.close()
    display.step("validating", 0, 2)  # after close: ignored
    assert stream.getvalue() == after_finish


def test_write_keeps_the_bar_intact() -> None:
    stream = TerminalStream()
    with ProgressDisplay(stream) as display:
        display.step("quant: calibrating", 0, 3)
        display.write("warning: something")
        display.step("quant: calibrating", 1, 3)
    text = stream.getvalue()
    assert "warning: something\n" in text
    assert text.endswith("\n")
    assert "2/3" in _final_states(text)[-1]


def test_default_stream_is_stderr_and_terminal_is_detected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = TerminalStream()
    monkeypatch.setattr(sys, "stderr", fake)
    display = ProgressDisplay()
    assert display.stream is fake and display.terminal
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not ProgressDisplay().terminal


# --- formatting ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.2, "0 s"), (41, "41 s"), (403, "6 min 43 s"), (3900, "1 h 05 min")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.3, "~1 s left"), (40, "~40 s left"), (190, "~3 min left"), (4800, "~1 h 20 min left")],
)
def test_format_eta(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


def _read_until_quiet(fd: int) -> str:
    """All the pty has to give: the kernel hands output over asynchronously, so wait a little."""
    data = b""
    while select.select([fd], [], [], 0.2)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a POSIX pseudo-terminal")
def test_bar_is_drawn_on_a_pseudo_terminal_without_a_size() -> None:
    """Some CI runners give a pty that reports 0×0; tqdm alone then draws nothing."""
    master, slave = os.openpty()
    try:
        assert os.get_terminal_size(slave).columns == 0
        with open(slave, "w", encoding="utf-8", closefd=False) as stream:
            with ProgressDisplay(stream) as display:
                assert display.terminal
                for index in range(5):
                    display.step("quant: calibrating", index, 5)
        text = _read_until_quiet(master)
    finally:
        os.close(slave)
        os.close(master)
    assert "quant: calibrating: 100%" in text
    assert "5/5" in text


def test_log_records_during_a_bar_get_their_own_line(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = TerminalStream()
    monkeypatch.setattr(sys, "stderr", stream)
    logger = logging.getLogger("graphopt.test_progress")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    with ProgressDisplay() as display, display.logging_redirected([logger]):
        display.step("quant: calibrating", 0, 3)
        logger.warning("skipped %s", "MatMul_7")
        display.step("quant: calibrating", 1, 3)
    assert logger.handlers == [handler]  # restored
    text = stream.getvalue()
    message = "WARNING graphopt.test_progress: skipped MatMul_7"
    [line] = [line for line in text.split("\n") if message in line]
    *_, bar, blank, shown = line.split("\r")
    assert shown == message  # on a line of its own, not appended to the bar
    assert blank.strip() == "" and len(blank) >= len(bar)  # the bar was wiped first
    assert "%|" in bar
    assert text.endswith("\n")


def test_logging_is_left_alone_off_a_terminal() -> None:
    logger = logging.getLogger("graphopt.test_progress_plain")
    handler = logging.StreamHandler(io.StringIO())
    logger.addHandler(handler)
    try:
        with ProgressDisplay(io.StringIO()).logging_redirected([logger]):
            assert logger.handlers == [handler]
    finally:
        logger.removeHandler(handler)


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_names_the_running_activity_when_nothing_else_was_written() -> None:
    """Issue 16.8: an SVD or a search loop reports no batches; the log must not go silent."""
    clock, stream = _FakeClock(), io.StringIO()
    display = ProgressDisplay(stream, terminal=False, interval_s=10, clock=clock)
    display.activity("running lowrank")
    clock.now = 9.0
    display.beat()
    assert stream.getvalue() == ""
    clock.now = 25.0
    display.beat()
    assert stream.getvalue() == "running lowrank: still running, 25 s elapsed\n"
    clock.now = 30.0
    display.beat()  # 5 s after the last line: nothing yet
    assert stream.getvalue().count("\n") == 1
    display.finish()
    display.step("quant: calibrating", 0, 4)  # batches arrive: the step's own lines take over
    clock.now = 39.0
    display.step("quant: calibrating", 1, 4)
    display.beat()  # 14 s after the last line, but a batch came 0 s ago
    assert stream.getvalue().count("\n") == 1
    display.close()


def test_heartbeat_thread_writes_and_stops_with_close() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, terminal=False, interval_s=0.05)
    display.activity("validating")
    deadline = time.monotonic() + 5
    while "still running" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    display.close()
    assert "validating: still running" in stream.getvalue()
    written = stream.getvalue()
    time.sleep(0.2)
    assert stream.getvalue() == written  # closed: the thread is gone
    assert display._heartbeat is not None and not display._heartbeat.is_alive()


def test_no_heartbeat_on_a_terminal() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, terminal=True, interval_s=0.01)
    display.activity("running quant")
    time.sleep(0.05)
    display.close()
    assert "still running" not in stream.getvalue()
