"""``graphopt capture``: record the feeds a program passes to ONNX Runtime, for ``--calib-data``.

Rules:

1. ``graphopt capture --out DIR [--model PATH] [--max-feeds N] [--every K] [--max-bytes SIZE]
   -- COMMAND …`` runs COMMAND with recording active (:mod:`graphopt.data.capture`) in each of
   its Python processes that imports onnxruntime, child processes included: a bootstrap
   ``sitecustomize.py`` goes first on the command's ``PYTHONPATH`` (a ``sitecustomize`` of the
   user's still runs after it). ``--max-feeds`` and ``--max-bytes`` hold across all those
   processes together; ``--every`` counts each process's calls.
   Everything after ``--`` (or after the first word that is not an option) is the command.
2. DIR must be new, empty, or hold only a previous capture, which is replaced; anything else is
   exit 2, and nothing is deleted.
3. Exit codes: 0 the command succeeded and feeds were captured; 1 the command failed (a non-zero
   exit code or a signal, said on stderr), with what was captured kept and summarized; 2 nothing
   was captured (one line saying why, with hints), a bad flag or folder, or a command that
   cannot be started. An interrupt waits for the command to end (terminating it after a few
   seconds), keeps what was captured, and exits as the CLI's rule 1 says (130, 143).
4. Output: one line per model folder on stdout: its feeds, their bytes, the calls seen and
   skipped, and the ``--calib-data`` path to use.
5. SIZE is a number of bytes, or a number with K, M, G or T: powers of 1024 (KB, KiB and
   the like mean the same).
"""

from __future__ import annotations

import contextlib
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click

from graphopt.cli.logs import DEBUG_HELP, VERBOSE_HELP, apply_subcommand_flags
from graphopt.data.capture import (
    DEFAULT_MAX_BYTES,
    CaptureFolder,
    CaptureSummary,
    ModelCapture,
    child_environment,
)
from graphopt.errors import InputError

EXIT_OK, EXIT_FAILED = 0, 1
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_STOP_WAIT_S = 5.0
_COMMAND_CHARS = 80


def parse_size(text: str) -> int:
    """Rule 5: ``512``, ``200M``, ``1.5GiB`` → bytes (at least 1)."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise InputError(f"--max-bytes {text!r}: give bytes or a size such as 500M or 2G")
    value = int(float(match.group(1)) * 1024 ** _UNITS[match.group(2).upper()])
    if value < 1:
        raise InputError(f"--max-bytes {text!r}: must be at least 1 byte")
    return value


def _size_text(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _command_text(command: Sequence[str]) -> str:
    text = shlex.join(command)
    return text if len(text) <= _COMMAND_CHARS else text[: _COMMAND_CHARS - 1] + "…"


def _skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in skipped.items())


def _model_line(model: ModelCapture, out_arg: Path, out_dir: Path) -> str:
    folder = out_arg / model.folder.relative_to(out_dir)
    label = model.folder.name if model.folder != out_dir else Path(model.source).stem
    calls = f"{model.calls} call{'s' if model.calls != 1 else ''}"
    if model.skipped:
        calls += f", skipped: {_skipped_text(model.skipped)}"
    return (
        f"{label}: {model.feeds} feed{'s' if model.feeds != 1 else ''}, "
        f"{_size_text(model.bytes)} ({calls}) → --calib-data {folder}"
    )


def _nothing_captured(summary: CaptureSummary, model: Path | None) -> str:
    """Rule 3: why no feed was written, with what to do about it (one line)."""
    seen = sum(item.calls for item in summary.models)
    if model is not None and seen == 0 and summary.ignored:
        others = ", ".join(Path(source).name for source in summary.ignored)
        return (
            f"no run of --model {model} was seen ({sum(summary.ignored.values())} runs of "
            f"other models: {others}); give the model file the program loads"
        )
    if seen == 0 and summary.processes == 0:
        return (
            "no ONNX Runtime session run was seen: no Python process of the command imported "
            "onnxruntime (the program must use onnxruntime's Python API; Python started with "
            "-I, -E or -S is not recorded)"
        )
    if seen == 0:
        return (
            "no ONNX Runtime session run was seen (the program must call "
            "InferenceSession.run or run_with_ort_values from Python; "
            "run_with_iobinding calls are not recorded)"
        )
    skipped: dict[str, int] = {}
    for item in summary.models:
        for reason, count in item.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    hints = []
    if "run_with_iobinding" in skipped:
        hints.append("run_with_iobinding calls are not recorded: use run for the capture")
    if "max_bytes" in skipped:
        hints.append("the first feed was larger than --max-bytes")
    if "failed" in skipped:
        hints.append("a run that raises is not recorded")
    return (
        f"no feed was recorded from {seen} ONNX Runtime run{'s' if seen != 1 else ''} "
        f"(skipped: {_skipped_text(skipped) or 'none'})"
        + (f"; {'; '.join(hints)}" if hints else "")
    )


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _run_command(command: Sequence[str], env: dict[str, str]) -> int:
    """Run the command; on an interrupt, let it end (then terminate, then kill it), re-raise."""
    try:
        process = subprocess.Popen(list(command), env=env)
    except FileNotFoundError as error:
        raise InputError(f"cannot run {command[0]}: no such command") from error
    except PermissionError as error:
        raise InputError(f"cannot run {command[0]}: not executable") from error
    try:
        return process.wait()
    except KeyboardInterrupt:
        for stop in (None, process.terminate, process.kill):
            if stop is not None:
                stop()
            try:
                process.wait(timeout=_STOP_WAIT_S)
                break
            except subprocess.TimeoutExpired:
                continue
        raise


@click.command(
    "capture",
    context_settings={
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
        "help_option_names": ["-h", "--help"],
    },
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    metavar="DIR",
    help="Folder for the feeds: new, empty, or a previous capture (replaced).",
)
@click.option(
    "--model",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="PATH",
    help="Record only sessions of this model file; feeds go straight into --out.",
)
@click.option(
    "--max-feeds", type=click.IntRange(min=1), metavar="N", help="Stop a model after N feeds."
)
@click.option(
    "--every",
    type=click.IntRange(min=1),
    metavar="K",
    default=1,
    show_default=True,
    help="Keep a model's 1st call and every K-th after it (per process).",
)
@click.option(
    "--max-bytes",
    "max_bytes_text",
    default="1G",
    show_default=True,
    metavar="SIZE",
    help="Stop when the feeds would exceed SIZE in all (K, M, G: powers of 1024).",
)
@click.option("-v", "--verbose", "sub_verbose", count=True, help=VERBOSE_HELP)
@click.option("--debug", "sub_debug", is_flag=True, help=DEBUG_HELP)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def capture_command(
    out_dir: Path,
    model: Path | None,
    max_feeds: int | None,
    every: int,
    max_bytes_text: str,
    sub_verbose: int,
    sub_debug: bool,
    command: tuple[str, ...],
) -> int:
    """Run COMMAND and record the feeds its Python code passes to ONNX Runtime.

    Example: graphopt capture --out feeds/ -- python app.py --input photos/

    Each run call's inputs become one .npz file; give the folder printed to
    'graphopt optimize --calib-data'.
    """
    apply_subcommand_flags(sub_verbose, sub_debug)
    args = list(command)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise InputError("no command given: graphopt capture --out DIR -- python app.py …")
    if args[0].startswith("-"):
        raise InputError(f"unknown option {args[0]} (put the command after --)")
    if "/" not in args[0] and shutil.which(args[0]) is None:
        raise InputError(f"cannot run {args[0]}: no such command")
    max_bytes = parse_size(max_bytes_text) if max_bytes_text else DEFAULT_MAX_BYTES
    capture = CaptureFolder.create(
        out_dir, every=every, max_feeds=max_feeds, max_bytes=max_bytes, model=model
    )
    try:
        with tempfile.TemporaryDirectory(prefix="graphopt-capture-") as bootstrap:
            code = _run_command(args, child_environment(capture, Path(bootstrap)))
    except BaseException:  # an interrupt or a command that cannot start: keep what was captured
        with contextlib.suppress(Exception):
            capture.finish()
        raise
    summary = capture.finish()
    failed = code != 0
    if summary.feeds == 0:
        reason = _nothing_captured(summary, model)
        if failed:
            reason += f"; the command {_exit_text(code)}"
        raise InputError(reason)
    for item in summary.models:
        if item.feeds:
            click.echo(_model_line(item, out_dir, capture.out_dir))
    if summary.stopped == "max_bytes":
        click.echo(f"graphopt: recording stopped at --max-bytes {max_bytes_text}", err=True)
    if failed:
        click.echo(
            f"graphopt: the command {_exit_text(code)} ({_command_text(args)}); "
            f"kept the {summary.feeds} feeds captured",
            err=True,
        )
        return EXIT_FAILED
    return EXIT_OK
