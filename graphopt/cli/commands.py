"""Command-line interface.

Rules:

1. Exit codes: 0 success; 1 validation (or the gate, or tune's bar) failed; 2 usage or input
   error (a bad flag, model file, option, data set, shape or path, a full disk or read-only
   folder: the user can fix it); 3 a bug (any other exception: ``internal error … please report
   it``); 130 interrupted by Ctrl-C (SIGINT), 143 terminated by SIGTERM, after temporary files
   are removed. On 2, 3, 130 and 143 ``optimize`` leaves its output and report as they were
   (absent or the previous files), except for an interrupt that arrives while the finished
   output is being published: that takes effect right after publishing
   (:func:`graphopt.ir.files.publish`), with the new output and report in place.
2. Errors are one line on stderr. ``--debug`` adds the traceback and debug logs; ``-v`` logs every
   skipped candidate, ``-vv`` debug logs. Both are accepted before the subcommand and after it
   (``graphopt optimize … --debug``), and counts add up.
3. The library logs; this module decides what reaches the terminal: the plan, per-pass stats and
   tables go to stdout, warnings and (with ``-v``) every skipped candidate to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import yaml
from onnx_graphsurgeon.logger import G_LOGGER

from graphopt import __version__
from graphopt.check.gate import run_gate
from graphopt.check.localize import TensorComparison, compare_tensors, first_divergence
from graphopt.check.validate import Criteria, ValidationReport
from graphopt.cli.capture import capture_command
from graphopt.cli.logs import (
    DEBUG_HELP,
    LOGGER_NAMES,
    VERBOSE_HELP,
    logging_flags,
    setup_logging,
)
from graphopt.cli.progress import ProgressDisplay
from graphopt.data.feeds import (
    check_input_shapes,
    input_specs,
    open_checked,
    parse_input_shapes,
    synthesize_runnable,
)
from graphopt.data.masking import resolve_mask_input
from graphopt.errors import GraphoptError, InputError, PassError
from graphopt.ir.files import (
    ENVIRONMENT_ERRNOS,
    check_distinct,
    check_output_target,
    model_roles,
    resolve_tmp_dir,
    storage_error,
    write_atomic_text,
)
from graphopt.ir.model import load_model
from graphopt.ir.normalize import infer_types
from graphopt.ir.ort import resolve_providers
from graphopt.ir.summary import summarize
from graphopt.passkit.options import FiniteFloat, parse_option_assignments
from graphopt.passkit.registry import available_pass_names, load_pass_class
from graphopt.pipeline import OptimizeReport, budget_for, optimize
from graphopt.settings import ENVIRONMENT, ORT_LEVELS, Settings
from graphopt.tuning.report import front_rows
from graphopt.tuning.search import TuneResult, tune

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
"""128 + the signal's number, as shells report a process killed by SIGINT / SIGTERM."""
_RECIPE_KEYS = frozenset({"passes", "options", "order", "mask_input"})
_ORDERS = ("planned", "given")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )
    return "\n".join(lines)


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GB"


def _fmt(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


_STATUS_LABELS = {"passed": "PASS", "failed": "FAIL", "error": "ERROR"}
"""How a comparison's status reads in tables: ERROR when the comparison could not happen."""


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="graphopt")
@click.option("-v", "--verbose", count=True, help=VERBOSE_HELP)
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def cli(verbose: int, debug: bool) -> None:
    """graphopt: optimize ONNX models and validate them against the original."""
    setup_logging(verbose, debug)


def _load_recipe(path: Path | None) -> Recipe:
    """A recipe's passes, options, order (``planned`` or ``given``; None when not set) and
    mask input (a name or ``none``, as ``--mask-input``; tune writes it when it was given)."""
    if path is None:
        return Recipe([], {}, None, None)
    try:
        text = path.read_text()
    except OSError as error:
        raise InputError(f"cannot read recipe {path}: {error.strerror}") from error
    try:
        recipe = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        detail = str(error).splitlines()[0]
        raise InputError(
            f"recipe {path} is not valid {path.suffix[1:] or 'YAML'}: {detail}"
        ) from error
    if not isinstance(recipe, dict):
        raise InputError(f"recipe {path} must be a mapping with 'passes' and 'options'")
    unknown = sorted(set(recipe) - _RECIPE_KEYS)
    if unknown:
        raise InputError(
            f"recipe {path}: unknown key '{unknown[0]}' "
            "(allowed: passes, options, order, mask_input)"
        )
    passes = recipe.get("passes", [])
    options = recipe.get("options", {}) or {}
    if not isinstance(passes, list) or not all(isinstance(p, str) for p in passes):
        raise InputError(f"recipe {path}: 'passes' must be a list of pass names")
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise InputError(f"recipe {path}: 'options' must map pass names to option mappings")
    order = recipe.get("order")
    if order is not None and order not in _ORDERS:
        raise InputError(f"recipe {path}: 'order' must be one of {', '.join(_ORDERS)}")
    mask_input = recipe.get("mask_input")
    if mask_input is not None and not isinstance(mask_input, str):
        raise InputError(f"recipe {path}: 'mask_input' must be an input name or 'none'")
    return Recipe(passes, {str(k): dict(v) for k, v in options.items()}, order, mask_input)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a ``--recipe`` file sets (:func:`_load_recipe`)."""

    passes: list[str]
    options: dict[str, dict[str, Any]]
    order: str | None
    mask_input: str | None


def _split_names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _print_report(report: OptimizeReport) -> None:
    click.echo(f"normalize: {_describe_stats(report.normalize)}")
    for index, record in enumerate(report.run.records, start=1):
        state = "modified" if record.modified else "unchanged"
        kind = "exact" if record.exact else "lossy"
        click.echo(
            f"[{index}/{len(report.run.records)}] {record.name:<10} {kind:<5} "
            f"{record.seconds:7.3f}s  {state:<9}  {_describe_stats(record.stats)}"
        )
    ratio = report.output_bytes / report.input_bytes if report.input_bytes else float("nan")
    click.echo(
        f"saved {report.output}: {_human_bytes(report.input_bytes)} → "
        f"{_human_bytes(report.output_bytes)} ({ratio:.3f}×)"
    )
    if report.validation is not None:
        _print_validation(report.validation)
    if report.per_tensor is not None:
        _print_per_tensor(report.per_tensor)
    if report.bisect is not None:
        click.echo("bisect: " + report.bisect.describe())


def _describe_stats(stats: dict[str, Any]) -> str:
    """One line per pass: per-item details (dicts of dicts or lists) are left to ``--report``."""
    parts = []
    for key, value in stats.items():
        if isinstance(value, dict):
            if any(isinstance(item, dict | list) for item in value.values()):
                parts.append(f"{key}=[{len(value)} entries in --report]")
            elif value:
                inner = ", ".join(f"{k}: {v}" for k, v in value.items())
                parts.append(f"{key}={{{inner}}}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts) or "-"


def _print_validation(validation: ValidationReport) -> None:
    if validation.synthetic:
        click.secho(f"WARNING: validated on {validation.data}", fg="yellow", err=True)
    click.echo(f"validation on {validation.data}; criteria: {validation.criteria.describe()}")
    rows = []
    for c in validation.comparisons:
        rows.append(
            [
                c.output,
                c.provider,
                _fmt(c.cosine),
                _fmt(c.worst_channel_cosine) if c.worst_channel else "-",
                c.worst_channel or "-",
                _fmt(c.snr_db, 1),
                _sci(c.max_abs),
                _sci(c.median_abs),
                _fmt(c.top1, 4),
                str(c.nan_candidate + c.inf_candidate),
                _STATUS_LABELS[c.status],
            ]
        )
    headers = ["output", "ep", "cosine", "worst_ch_cosine", "worst_channel", "snr_db"]
    headers += ["max_abs", "median_abs", "top1", "nan/inf", ""]
    click.echo(_table(headers, rows))
    for comparison in validation.comparisons:
        if comparison.status != "passed":
            click.echo(
                f"  {_STATUS_LABELS[comparison.status]} {comparison.output} "
                f"[{comparison.provider}]: {comparison.reason}"
            )
    for provider, placement in validation.placement.items():
        counts = ", ".join(f"{ep}: {len(nodes)}" for ep, nodes in placement.items())
        click.echo(f"placement on {provider}: {counts}")
        for ep, nodes in placement.items():
            if ep == "CPUExecutionProvider":
                click.echo(f"  on CPU: {', '.join(nodes[:20])}" + (" …" if len(nodes) > 20 else ""))
    click.echo("validation: " + ("PASSED" if validation.passed else "FAILED"))


def _print_per_tensor(rows: Sequence[TensorComparison]) -> None:
    first = first_divergence(list(rows))
    click.echo(f"per-tensor comparison ({len(rows)} tensors matched by name, in graph order):")
    table = [
        [
            row.name,
            row.op,
            _fmt(row.cosine),
            _fmt(row.worst_channel_cosine) if row.worst_channel else "-",
            row.worst_channel or "-",
            _fmt(row.snr_db, 1),
            _sci(row.max_abs),
            "ok" if row.passed else "FAIL",
        ]
        for row in rows
    ]
    headers = ["tensor", "op", "cosine", "worst_ch_cosine", "worst_channel", "snr_db", "max_abs"]
    click.echo(_table([*headers, ""], table))
    if first is None:
        click.echo("per-tensor: every matched tensor is within the budget")
    else:
        click.echo(
            f"per-tensor: error starts at '{first.name}' ({first.op}): cosine "
            f"{_fmt(first.cosine)}, SNR {_fmt(first.snr_db, 1)} dB"
        )


def _criteria(
    min_cosine: float | None,
    min_snr: float | None,
    min_top1: float | None,
    *,
    whole_tensor: bool = False,
    default: Callable[[], Criteria] = Criteria,
) -> Criteria | None:
    """Criteria from the budget flags; None (the caller's default) when no flag is given.

    ``--whole-tensor`` alone keeps the ``default`` budget with per-channel gating off; a flag
    replaces its own figure only, the others keep the ``default`` budget's.
    """
    if min_cosine is None and min_snr is None and min_top1 is None:
        return dataclasses.replace(default(), per_channel=False) if whole_tensor else None
    defaults = default()
    if defaults.exact:
        defaults = Criteria()
    return Criteria(
        min_cosine=defaults.min_cosine if min_cosine is None else min_cosine,
        min_snr_db=defaults.min_snr_db if min_snr is None else min_snr,
        min_top1=min_top1,
        per_channel=not whole_tensor,
    )


_input_shapes_option = click.option(
    "--input-shapes",
    "input_shapes_text",
    multiple=True,
    metavar="NAME:1x3x640x640[,NAME:…]",
    help="Shapes of synthesized inputs (used without data; batch included); repeatable.",
)


def _input_shapes(texts: Sequence[str]) -> dict[str, tuple[int, ...]] | None:
    return parse_input_shapes(list(texts)) if texts else None


_STEP_BOUNDARIES = frozenset(
    {"pass-start", "pass-end", "validate-start", "per-tensor-start", "bisect-start", "saved"}
)
"""Events that end the current progress step (:class:`graphopt.cli.progress.ProgressDisplay`)."""
_ACTIVITIES = {
    "pass-start": "running {name}",
    "validate-start": "validating",
    "per-tensor-start": "comparing tensors",
    "bisect-start": "bisecting",
}
"""What the progress heartbeat names as running after each event (off a terminal)."""

_TMP_DIR_HELP = (
    "Folder for temporary files (spilled weights, the staged output); default: "
    f"${ENVIRONMENT['tmp_dir']}, else the system's ($TMPDIR). Nothing is ever written beside "
    "the input model."
)
_tmp_dir_option = click.option(
    "--tmp-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help=_TMP_DIR_HELP,
)
_threads_option = click.option(
    "--threads",
    type=click.IntRange(min=0),
    help="ONNX Runtime intra-op threads for calibration, validation and latency sessions; "
    f"default: ${ENVIRONMENT['threads']}, else 0 (ONNX Runtime's default, one per core).",
)
_validation_level_option = click.option(
    "--validation-ort-level",
    type=click.Choice(ORT_LEVELS),
    help="ONNX Runtime graph optimisations in validation sessions (default: disable, the "
    "graphs as written; all: what a default deployment runs).",
)


def _settings(**flags: Any) -> Settings:
    """The command's settings: ``GRAPHOPT_*`` read once, then the flags given (not None)."""
    given = {name: value for name, value in flags.items() if value is not None}
    settings = Settings.from_env(given=given)
    return dataclasses.replace(settings, **given) if given else settings


_WHOLE_TENSOR_HELP = (
    "Gate cosine and SNR on each whole output only. Default: also on the worst channel "
    "(slices along every axis of size 2-256), so collapsed small-valued channels fail."
)

_mask_input_option = click.option(
    "--mask-input",
    "mask_input_text",
    metavar="NAME|none",
    help="Input whose 0/1 values mark padding positions ([batch, sequence]); calibration "
    "statistics and validation count valid positions only. Default: an input named like an "
    "attention mask; none: off.",
)


@cli.command("optimize")
@logging_flags
@click.argument("input_model", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("output_model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--passes", "passes_text", help="Comma-separated set of passes, e.g. cleanup,quant.")
@click.option(
    "--calib-data",
    "data",
    type=click.Path(path_type=Path),
    help=".npz (axis 0 = samples) or a folder of .npz feeds; used for calibration and, "
    "without --data, validation.",
)
@click.option(
    "--data",
    "validation_data",
    type=click.Path(path_type=Path),
    help="Validation data (same formats); defaults to --calib-data.",
)
@click.option(
    "-o",
    "--option",
    "assignments",
    multiple=True,
    metavar="PASS.KEY=VALUE",
    help="Set a pass option; repeatable.",
)
@click.option(
    "--recipe",
    type=click.Path(path_type=Path, dir_okay=False),
    help="YAML or JSON file with 'passes' and 'options'.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the full report as JSON.",
)
@click.option(
    "--providers",
    default="cpu",
    show_default=True,
    help="Execution providers to validate on: cpu, cuda.",
)
@click.option("--no-validate", is_flag=True, help="Skip validation against the input model.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Batch size for .npz data (default 8; a static batch fixes it).",
)
@click.option("--min-cosine", type=FiniteFloat(-1, 1), help="Lossy budget: minimum cosine.")
@click.option("--min-snr", type=FiniteFloat(), help="Lossy budget: minimum SNR in dB.")
@click.option("--min-top1", type=FiniteFloat(0, 1), help="Lossy budget: minimum top-1 agreement.")
@click.option("--whole-tensor", is_flag=True, help=_WHOLE_TENSOR_HELP)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for synthetic data.")
@_input_shapes_option
@click.option(
    "--per-tensor",
    is_flag=True,
    help="Compare intermediate tensors by name; show where error starts.",
)
@click.option(
    "--bisect", is_flag=True, help="If validation fails, find the first failing pass and node."
)
@click.option(
    "--keep-order",
    is_flag=True,
    help="Run --passes in the order given instead of planning it; exit 2 naming any declared "
    "ordering relation the order breaks.",
)
@_mask_input_option
@_tmp_dir_option
@_threads_option
@_validation_level_option
def optimize_command(
    input_model: Path,
    output_model: Path,
    passes_text: str | None,
    data: Path | None,
    validation_data: Path | None,
    assignments: tuple[str, ...],
    recipe: Path | None,
    report_path: Path | None,
    providers: str,
    no_validate: bool,
    batch_size: int | None,
    min_cosine: float | None,
    min_snr: float | None,
    min_top1: float | None,
    whole_tensor: bool,
    seed: int,
    input_shapes_text: tuple[str, ...],
    per_tensor: bool,
    bisect: bool,
    keep_order: bool,
    mask_input_text: str | None,
    tmp_dir: Path | None,
    threads: int | None,
    validation_ort_level: str | None,
) -> int:
    """Apply a set of passes to INPUT_MODEL, write OUTPUT_MODEL, validate it against the input.

    OUTPUT_MODEL (and OUTPUT_MODEL.data) are replaced if they exist, once the new output is
    complete and validated; on an error or interrupt they are left as they were.
    """
    loaded = _load_recipe(recipe)
    order = "given" if keep_order else loaded.order or "planned"
    names = list(dict.fromkeys(loaded.passes + _split_names(passes_text)))
    if not names:
        raise InputError("no passes given: use --passes (see 'graphopt passes') or --recipe")
    options = loaded.options
    for pass_name, values in parse_option_assignments(assignments).items():
        options.setdefault(pass_name, {}).update(values)
    provider_names = resolve_providers(_split_names(providers) or ["cpu"])
    _check_writable(report_path)
    settings = _settings(
        tmp_dir=tmp_dir, threads=threads, validation_ort_level=validation_ort_level
    )
    resolve_tmp_dir(settings.tmp_dir)

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "plan":
            label = "plan (as given)" if order == "given" else "plan"
            click.echo(f"{label}: " + " → ".join(info["plan"]))
        elif kind == "opset":
            click.echo(f"opset: {info['description']}")
        elif kind == "criteria":
            click.echo(f"budget: {info['criteria'].describe()} ({info['source']})")
        elif kind == "data":
            click.echo(f"data: {info['description']}")
        elif kind == "validation-data":
            click.echo(f"validation data: {info['description']}")
        elif kind == "mask":
            click.echo(info["description"])
        elif kind in _STEP_BOUNDARIES:
            progress.finish()
            if kind == "pass-start":
                progress.write(f"running {info['name']} …")
            if kind in _ACTIVITIES:
                progress.activity(_ACTIVITIES[kind].format(**info))
        elif kind == "progress":
            progress.step(info["label"], info["index"], info.get("total"))
        elif kind == "validate-batch":
            progress.step("validating", info["index"], info.get("total"))

    progress = ProgressDisplay()  # stderr: a bar on a terminal, a line every ~10 s elsewhere
    loggers = [logging.getLogger(name) for name in LOGGER_NAMES]
    with progress, progress.logging_redirected(loggers):
        report = optimize(
            input_model,
            output_model,
            names,
            options=options,
            data=data,
            validation_data=validation_data,
            providers=provider_names,
            validate=not no_validate,
            criteria=_criteria(
                min_cosine,
                min_snr,
                min_top1,
                whole_tensor=whole_tensor,
                default=lambda: budget_for(names)[0],
            ),
            batch_size=batch_size,
            seed=seed,
            input_shapes=_input_shapes(input_shapes_text),
            per_tensor=per_tensor,
            bisect=bisect,
            on_event=on_event,
            report_path=report_path,
            settings=settings,
            order=order,
            mask_input=_mask_input(mask_input_text or loaded.mask_input),
        )
    _print_report(report)
    return EXIT_OK if report.passed else EXIT_FAILED


def _mask_input(text: str | None) -> str | bool | None:
    """``--mask-input``: None finds an attention mask, ``none`` turns masking off."""
    if text is None:
        return None
    return False if text.strip().lower() == "none" else text.strip()


def _check_writable(*paths: Path | None) -> None:
    """Report paths are checked before any work: a bad one is exit 2 with nothing written."""
    for path in paths:
        if path is not None:
            check_output_target(path, "report")


@cli.command("check")
@logging_flags
@click.argument("reference", type=click.Path(path_type=Path, dir_okay=False))
@click.argument("candidate", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    help=".npz (axis 0 = samples) or folder of .npz feeds; synthesized if absent.",
)
@click.option("--providers", default="cpu", show_default=True, help="cpu, cuda or cpu,cuda.")
@click.option(
    "--exact", is_flag=True, help="Require element-wise agreement (atol 1e-5, rtol 1e-4)."
)
@click.option(
    "--passes",
    "passes_text",
    help="The passes that made CANDIDATE, e.g. quant,lowrank: the default budget is theirs, "
    "as in optimize (default: quant's, cosine 0.99 and SNR 15 dB).",
)
@click.option("--min-cosine", type=FiniteFloat(-1, 1), help="Minimum cosine.")
@click.option("--min-snr", type=FiniteFloat(), help="Minimum SNR in dB.")
@click.option("--min-top1", type=FiniteFloat(0, 1), help="Minimum top-1 agreement.")
@click.option("--whole-tensor", is_flag=True, help=_WHOLE_TENSOR_HELP)
@click.option(
    "--max-size-ratio",
    type=FiniteFloat(min=0),
    help="Maximum candidate/reference size on disk.",
)
@click.option(
    "--max-latency-ratio",
    type=FiniteFloat(min=0),
    help="Maximum candidate/reference median CPU latency (interleaved runs).",
)
@click.option("--latency-runs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--latency-ort-level",
    type=click.Choice(ORT_LEVELS),
    help="ONNX Runtime graph optimisations in latency sessions (default: all).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Batch size for .npz data (default 8; a static batch fixes it).",
)
@click.option("--per-tensor", is_flag=True, help="Also compare intermediate tensors by name.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the report as JSON.",
)
@click.option(
    "--junit",
    "junit_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write JUnit XML: one test case per output × provider × criterion.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@_input_shapes_option
@_mask_input_option
@_tmp_dir_option
@_threads_option
@_validation_level_option
def check_command(
    reference: Path,
    candidate: Path,
    data: Path | None,
    providers: str,
    exact: bool,
    passes_text: str | None,
    min_cosine: float | None,
    min_snr: float | None,
    min_top1: float | None,
    whole_tensor: bool,
    max_size_ratio: float | None,
    max_latency_ratio: float | None,
    latency_runs: int,
    latency_ort_level: str | None,
    batch_size: int | None,
    per_tensor: bool,
    json_path: Path | None,
    junit_path: Path | None,
    seed: int,
    input_shapes_text: tuple[str, ...],
    mask_input_text: str | None,
    tmp_dir: Path | None,
    threads: int | None,
    validation_ort_level: str | None,
) -> int:
    """Gate a CANDIDATE model against its REFERENCE: exit 0 if every criterion holds, else 1."""
    _check_writable(json_path, junit_path)
    for models in (model_roles(reference, "reference"), model_roles(candidate, "candidate")):
        # (a model checked against itself is fine; a report written over one is not)
        check_distinct({**models, "the --json report": json_path, "the --junit report": junit_path})
    settings = _settings(
        tmp_dir=tmp_dir,
        threads=threads,
        validation_ort_level=validation_ort_level,
        latency_ort_level=latency_ort_level,
    )
    scratch = resolve_tmp_dir(settings.tmp_dir)
    provider_names = resolve_providers(_split_names(providers) or ["cpu"])
    if exact and (min_cosine is not None or min_snr is not None or whole_tensor):
        raise InputError("--exact cannot be combined with --min-cosine/--min-snr/--whole-tensor")
    default_budget, budget_source = budget_for(_split_names(passes_text) or None)
    if exact:
        criteria, budget_source = Criteria(exact=True), "--exact"
    else:
        given = _criteria(
            min_cosine, min_snr, min_top1, whole_tensor=whole_tensor, default=lambda: default_budget
        )
        criteria = given or default_budget
        if given is not None:
            budget_source = f"given; the rest from the {budget_source}"
    click.echo(f"budget: {criteria.describe()} ({budget_source})")
    reference_model = load_model(reference)
    load_model(candidate)  # a candidate that is not ONNX at all is an input error
    infer_types(reference_model)
    input_shapes = _input_shapes(input_shapes_text)
    if data is None:
        feeds = synthesize_runnable(
            reference_model.graph,
            reference,
            seed=seed,
            input_shapes=input_shapes,
            data_flag="--data",
        )
    else:
        specs = input_specs(reference_model.graph)
        if input_shapes:
            check_input_shapes(specs, input_shapes)
            click.secho("WARNING: --input-shapes is ignored with --data", fg="yellow", err=True)
        feeds, _ = open_checked(data, specs, batch_size=batch_size)
        mask = resolve_mask_input(feeds, specs, _mask_input(mask_input_text))
        if mask is not None:
            feeds = feeds.with_mask_input(mask.input)
            click.echo(mask.describe("the comparison"))
    del reference_model
    report = run_gate(
        reference,
        candidate,
        feeds,
        providers=provider_names,
        criteria=criteria,
        max_size_ratio=max_size_ratio,
        max_latency_ratio=max_latency_ratio,
        latency_runs=latency_runs,
        tmp_dir=scratch,
        settings=settings,
    )
    _print_validation(report.validation)
    for check in report.model_checks:
        click.echo(("PASS " if check.passed else "FAIL ") + check.message)
    if per_tensor:
        _print_per_tensor(compare_tensors(reference, candidate, feeds, criteria=criteria))
    if json_path is not None:
        write_atomic_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    if junit_path is not None:
        write_atomic_text(junit_path, report.to_junit())
    click.echo("check: " + ("PASSED" if report.passed else "FAILED"))
    return EXIT_OK if report.passed else EXIT_FAILED


@cli.command("tune")
@logging_flags
@click.argument("input_model", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--calib-data",
    "data",
    type=click.Path(path_type=Path),
    help=".npz (axis 0 = samples) or a folder of .npz feeds for the passes' calibration "
    "(synthesized if absent, with a warning).",
)
@click.option(
    "--data",
    "validation_data",
    type=click.Path(path_type=Path),
    help="Held-out validation data (default: the calibration data, with a warning).",
)
@click.option(
    "--objective",
    type=click.Choice(["size", "latency"]),
    default="size",
    show_default=True,
    help="size: the smallest model meeting the bar; latency: the fastest.",
)
@click.option(
    "--min-cosine",
    type=FiniteFloat(0, 1, min_open=True),
    default=0.99,
    show_default=True,
    help="The bar: min over outputs of each output's cosine to the original.",
)
@click.option("--budget", type=click.IntRange(min=1), help="Trials, cached ones included (24).")
@click.option(
    "--time-limit",
    type=FiniteFloat(0, min_open=True),
    help="Seconds after which no new trial starts.",
)
@click.option("--passes", "passes_text", help="Passes to search (default: every built-in pass).")
@click.option(
    "-o",
    "--option",
    "assignments",
    multiple=True,
    metavar="PASS.KEY=VALUE",
    help="Fix a pass option in every candidate (repeatable).",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder (default: INPUT_MODEL's name + _tune).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    help="Evaluation processes (default: cores and free memory allow; 0 = this process).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Batch size for .npz data (default 8; a static batch fixes it).",
)
@click.option("--latency-runs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_input_shapes_option
@_mask_input_option
@_threads_option
def tune_command(
    input_model: Path,
    data: Path | None,
    validation_data: Path | None,
    objective: str,
    min_cosine: float,
    budget: int | None,
    time_limit: float | None,
    passes_text: str | None,
    assignments: tuple[str, ...],
    out_dir: Path | None,
    workers: int | None,
    batch_size: int | None,
    latency_runs: int,
    seed: int,
    input_shapes_text: tuple[str, ...],
    mask_input_text: str | None,
    threads: int | None,
) -> int:
    """Search passes and options for the best model meeting --min-cosine (exit 1: none does)."""
    settings = _settings(threads=threads)  # a bad GRAPHOPT_* value is exit 2 here
    folder = out_dir if out_dir is not None else Path(f"{input_model.stem}_tune")

    def on_event(kind: str, info: dict[str, Any]) -> None:
        if kind == "start":  # (a missing --data is a warning from the library's logger)
            click.echo(
                f"tune: lossy passes {', '.join(info['lossy'])}"
                + (f" (always: {', '.join(info['base'])})" if info["base"] else "")
                + f"; workers: {info['workers']}",
                err=True,
            )
        elif kind == "trial":
            trial = info["trial"]
            evaluation = trial.evaluation
            total = info["budget"] or "?"
            if evaluation.status != "ok":
                detail = f"error: {evaluation.error}"
            else:
                size = evaluation.size_bytes / info["original_bytes"]
                bar = "meets bar" if trial.meets(info["min_cosine"]) else "below bar"
                detail = f"cosine {evaluation.min_cosine:.6f}, size {size:.3f}× ({bar})"
            cached = " [cached]" if trial.cached else ""
            click.echo(
                f"[{info['done']}/{total}] {trial.stage:<11} {trial.candidate.describe()}: "
                f"{detail}{cached}",
                err=True,
            )
        elif kind == "latency":
            trial = info["trial"]
            cached = " [cached]" if info["cached"] else ""
            click.echo(
                f"latency {trial.candidate.describe()}: {trial.latency_ratio:.3f}×{cached}",
                err=True,
            )

    result = tune(
        input_model,
        folder,
        calib_data=data,
        data=validation_data,
        objective=objective,
        min_cosine=min_cosine,
        budget=budget,
        time_limit=time_limit,
        passes=_split_names(passes_text) or None,
        options=parse_option_assignments(assignments),
        workers=workers,
        seed=seed,
        batch_size=batch_size,
        input_shapes=_input_shapes(input_shapes_text),
        latency_runs=latency_runs,
        on_event=on_event,
        settings=settings,
        mask_input=_mask_input(mask_input_text),
    )
    _print_tune(result)
    return EXIT_OK if result.passed else EXIT_FAILED


def _print_tune(result: TuneResult) -> None:
    click.echo(
        f"tune: {len(result.trials)} trials ({result.evaluated} evaluated, {result.cached} "
        f"cached) in {result.seconds:.1f} s; objective {result.objective}, "
        f"min cosine ≥ {result.min_cosine:g}"
    )
    front = result.size_front if result.objective == "size" else result.latency_front
    headers = ["", "passes", "options", "cosine", "snr_db", "MB", "size", "latency"]
    original = ["original", "-", "-", "1", "inf", f"{result.original_bytes / 1e6:.2f}", "1×", "1×"]
    click.echo(f"front (accuracy vs {result.objective}):")
    rows = [[cell.replace("**", "") for cell in row] for row in front_rows(result, front)]
    click.echo(_table(headers, [original, *rows]))
    click.echo(("tune: " if result.passed else "tune: FAILED: ") + result.message)
    for name in ("best", "recipe", "front_md", "front_json", "front_png"):
        if name in result.files:
            click.echo(f"  {name.replace('_', '.'):<10} {result.files[name]}")


@cli.command("passes")
@logging_flags
def passes_command() -> int:
    """List every pass with its options, defaults and help."""
    for name in available_pass_names():
        pass_class = load_pass_class(name)
        kind = "exact" if pass_class.exact else "lossy"
        click.echo(f"{name} ({kind}): {pass_class.summary}")
        constraints = []
        if pass_class.run_before:
            constraints.append("runs before " + ", ".join(sorted(pass_class.run_before)))
        if pass_class.run_after:
            constraints.append("runs after " + ", ".join(sorted(pass_class.run_after)))
        if constraints:
            click.echo("  " + "; ".join(constraints))
        for option in pass_class.options_schema:
            click.echo(
                f"  -o {name}.{option.name}={option.default!r:<12} "
                f"[{option.describe_range()}] {option.help}"
            )
    return EXIT_OK


@cli.command("inspect")
@logging_flags
@click.argument("model_path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_command(model_path: Path, as_json: bool) -> int:
    """Opset, producer, op histogram, parameters by dtype, sparsity, FLOPs, external data."""
    model = load_model(model_path)
    infer_types(model)
    summary = summarize(model)
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
        return EXIT_OK
    opsets = ", ".join(f"{domain} {version}" for domain, version in summary.opsets.items())
    click.echo(f"model:      {summary.path} ({_human_bytes(summary.file_bytes)})")
    click.echo(f"producer:   {summary.producer or '-'}; IR {summary.ir_version}; opsets {opsets}")
    click.echo(f"inputs:     {', '.join(summary.graph_inputs)}")
    click.echo(f"outputs:    {', '.join(summary.graph_outputs)}")
    click.echo(f"nodes:      {summary.nodes}")
    click.echo(
        f"parameters: {summary.parameters:,} "
        f"({summary.weight_sparsity:.2%} of float weights are zero)"
    )
    for dtype, count in summary.params_by_dtype.items():
        click.echo(
            f"  {dtype:<10} {count:>14,} values  {_human_bytes(summary.bytes_by_dtype[dtype])}"
        )
    click.echo(
        f"external:   {summary.external_tensors} tensors, {_human_bytes(summary.external_bytes)}"
    )
    total_flops = sum(summary.flops.values())
    click.echo(
        f"FLOPs:      {total_flops:,} per sample (dynamic dims = 1)"
        + (f"; {summary.flops_unknown} nodes without shapes" if summary.flops_unknown else "")
    )
    for op, value in summary.flops.items():
        click.echo(f"  {op:<10} {value:>16,}")
    click.echo("ops:")
    click.echo(_table(["op", "count"], [[op, str(n)] for op, n in summary.op_histogram.items()]))
    return EXIT_OK


cli.add_command(capture_command, "capture")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI and map every error to one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    with _logging_restored(), _terminate_cleanly():
        return _run(args, debug)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, and exits 143 rather than 130."""


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM (a CI timeout, ``kill``) unwinds like Ctrl-C: temporary files (spilled weights,
    the staged output) are removed instead of left behind, and the output is left as it was."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """Undo the CLI's logging setup on return, so in-process callers keep their own."""
    saved = [
        (logger, list(logger.handlers), logger.level, logger.propagate)
        for logger in map(logging.getLogger, LOGGER_NAMES)
    ]
    graphsurgeon_severity = G_LOGGER.severity
    try:
        yield
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        G_LOGGER.severity = graphsurgeon_severity


def _run(args: list[str], debug: bool) -> int:
    try:
        result = cli.main(args=args, prog_name="graphopt", standalone_mode=False)
    except click.exceptions.Exit as done:
        return int(done.exit_code)
    except click.Abort as abort:  # click turns KeyboardInterrupt into Abort
        return _interrupted(abort.__cause__ or abort.__context__)
    except click.ClickException as error:
        message = error.format_message().replace("\n", " ")
        hint = ""
        if isinstance(error, click.UsageError) and error.ctx is not None:
            hint = f" (see '{error.ctx.command_path} --help')"
        click.echo(f"graphopt: error: {message}{hint}", err=True)
        return EXIT_USAGE
    except PassError as error:  # a pass crashed or left an invalid graph: a bug, not the input
        if debug:
            traceback.print_exc()
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        click.echo(
            f"graphopt: internal error: {reason} — please report it; "
            "rerun with --debug for the traceback",
            err=True,
        )
        return EXIT_BUG
    except GraphoptError as error:
        if debug:
            traceback.print_exc()
        click.echo(f"graphopt: error: {error}", err=True)
        return EXIT_USAGE
    except KeyboardInterrupt as interrupt:
        return _interrupted(interrupt)
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            return _internal_error(error, debug)
        if debug:
            traceback.print_exc()
        click.echo(f"graphopt: error: {storage_error(error, 'cannot write a file')}", err=True)
        return EXIT_USAGE
    except Exception as error:  # rule 1: anything else is a bug
        return _internal_error(error, debug)
    return int(result or 0)


def _internal_error(error: Exception, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    lines = [line for line in str(error).splitlines() if line.strip()]
    what = type(error).__name__ + (f": {lines[0].strip()}" if lines else "")
    click.echo(
        f"graphopt: internal error: {what} — please report it; "
        "rerun with --debug for the traceback",
        err=True,
    )
    return EXIT_BUG


def _interrupted(cause: BaseException | None) -> int:
    """Rule 1: 143 for SIGTERM, 130 for Ctrl-C; an abort with no signal behind it is exit 2."""
    if isinstance(cause, Terminated):
        click.echo("graphopt: terminated (SIGTERM); the output was left as it was", err=True)
        return EXIT_TERMINATED
    if isinstance(cause, KeyboardInterrupt):
        click.echo("graphopt: interrupted; the output was left as it was", err=True)
        return EXIT_INTERRUPTED
    click.echo("graphopt: aborted", err=True)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
