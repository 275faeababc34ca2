"""The reports of ``graphopt tune``: ``front.md``, ``front.json`` and ``front.png``.

Rules:

1. Everything here reads a finished :class:`~graphopt.tuning.search.TuneResult`; nothing changes it
   except the paths recorded in ``result.files``.
2. Files are written atomically (:func:`graphopt.tuning.cache.write_text_atomic`); JSON is indented
   and sorted, with non-finite floats as strings, so the same result gives the same bytes.
3. A trial and the chosen trial are the same model when their keys match or their outputs have
   the same content hash; the tables mark such a row as chosen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.check.validate import json_safe
from graphopt.tuning.cache import write_text_atomic
from graphopt.tuning.plot import PlotPoint, plot_front

if TYPE_CHECKING:
    from graphopt.tuning.search import Candidate, Trial, TuneResult


def short_value(value: Any) -> str:
    """An option value as the reports and candidate names show it."""
    if isinstance(value, list):
        return "[" + ",".join(str(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def canonical_json_pretty(value: Any) -> str:
    """Indented, sorted JSON with non-finite floats as strings (what front.json holds)."""
    return json.dumps(json_safe(value), indent=2, sort_keys=True) + "\n"


def write_reports(result: TuneResult, folder: Path) -> None:
    """front.md, front.json and front.png in ``folder`` (rules 1 and 2)."""
    paths = {
        "front_md": folder / "front.md",
        "front_json": folder / "front.json",
        "front_png": folder / "front.png",
    }
    result.files.update({name: str(path) for name, path in paths.items()})
    write_text_atomic(paths["front_md"], front_markdown(result))
    write_text_atomic(paths["front_json"], canonical_json_pretty(result.to_dict()))
    size_keys = {t.key for t in result.size_front}
    latency_keys = {t.key for t in result.latency_front}
    points = [
        PlotPoint(
            label=trial.candidate.describe(),
            cosine=trial.cosine,
            size_bytes=trial.evaluation.size_bytes,
            latency_ratio=trial.latency_ratio,
            on_size_front=trial.key in size_keys,
            on_latency_front=trial.key in latency_keys,
            chosen=same_model(trial, result.chosen),
        )
        for trial in result.trials
        if trial.ok and trial.evaluation is not None
    ]
    plot_front(
        paths["front_png"],
        points,
        original_bytes=result.original_bytes,
        min_cosine=result.min_cosine,
        title=f"graphopt tune: {Path(result.input).name} (objective {result.objective})",
    )


def _fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}×"


def _fmt_snr(value: float) -> str:
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}"


def _options_text(candidate: Candidate) -> str:
    parts = []
    for name in candidate.passes:
        values = candidate.options.get(name)
        if values:
            inner = ", ".join(f"{k}={short_value(v)}" for k, v in sorted(values.items()))
            parts.append(f"{name}: {inner}")
    return "; ".join(parts) or "defaults"


def front_rows(result: TuneResult, trials: Sequence[Trial]) -> list[list[str]]:
    """Table rows (passes, options, cosine, SNR, size, size ratio, latency ratio), chosen marked."""
    rows = []
    for trial in trials:
        evaluation = trial.evaluation
        assert evaluation is not None
        mark = "**chosen**" if same_model(trial, result.chosen) else ""
        rows.append(
            [
                mark,
                " → ".join(evaluation.plan or trial.candidate.passes),
                _options_text(trial.candidate),
                f"{evaluation.min_cosine:.6f}",
                _fmt_snr(evaluation.min_snr_db),
                f"{evaluation.size_bytes / 1e6:.2f}",
                _fmt_ratio(evaluation.size_bytes / result.original_bytes),
                _fmt_ratio(trial.latency_ratio),
            ]
        )
    return rows


def same_model(trial: Trial, other: Trial | None) -> bool:
    """Rule 3."""
    if other is None or trial.evaluation is None or other.evaluation is None:
        return False
    return trial.key == other.key or (
        trial.evaluation.model_sha256 == other.evaluation.model_sha256
        and bool(trial.evaluation.model_sha256)
    )


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def _reproduce_command(result: TuneResult) -> str:
    words = [
        "graphopt optimize",
        result.input,
        "best.onnx",
        "--recipe",
        str(Path(result.out_dir) / "recipe.json"),
        "--calib-data",
        result.calibration_data,
    ]
    if result.batch_size is not None:
        words += ["--batch-size", str(result.batch_size)]
    if result.seed:
        words += ["--seed", str(result.seed)]
    return " ".join(words)


def front_markdown(result: TuneResult) -> str:
    """``front.md``: settings, the chosen model, both fronts and every trial."""
    headers = ["", "passes", "options", "min cosine", "min SNR dB", "MB", "size", "latency"]
    original = ["original", "–", "–", "1", "inf", f"{result.original_bytes / 1e6:.2f}", "1×", "1×"]
    validation = result.validation_data + (
        " (**the calibration data: no held-out data was given, the front is optimistic**)"
        if result.validation_is_calibration
        else ""
    )
    lines = [
        f"# graphopt tune: {Path(result.input).name}",
        "",
        f"- objective: **{result.objective}**; bar: min cosine ≥ {result.min_cosine:g} (the "
        "smallest, over outputs, of the lower of each output's whole-tensor cosine and its "
        "worst channel's cosine over all validation batches: the figure the gate judges)",
        f"- calibration data: {result.calibration_data}",
        f"- validation data: {validation}",
        f"- trials: {len(result.trials)} ({result.evaluated} evaluated, {result.cached} from "
        f"the cache; {result.stopped}), workers: {result.workers}",
        f"- wall time: {result.seconds:.1f} s (search {result.search_seconds:.1f} s, latency "
        f"{result.latency_seconds:.1f} s)",
        f"- result: {result.message}",
        "",
    ]
    if result.chosen is not None:
        lines += [
            "Reproduce `best.onnx`:",
            "",
            "```bash",
            _reproduce_command(result),
            "```",
            "",
        ]
    lines += ["## Front: accuracy vs size", ""]
    lines += _markdown_table(headers, [original, *front_rows(result, result.size_front)])
    lines += ["", "## Front: accuracy vs latency", ""]
    if result.latency_front:
        lines += _markdown_table(headers, [original, *front_rows(result, result.latency_front)])
    else:
        lines.append("No candidate with a measured latency is faster than the original.")
    lines += ["", "## All trials", ""]
    rows = []
    for trial in result.trials:
        evaluation = trial.evaluation
        if evaluation is None:
            continue
        status = "meets bar" if trial.meets(result.min_cosine) else "below bar"
        if evaluation.status != "ok":
            status = f"error: {evaluation.error}"
        elif evaluation.problems:
            status = f"fails: {evaluation.problems[0]}"
        rows.append(
            [
                str(trial.index),
                trial.stage + (" (cached)" if trial.cached else ""),
                trial.candidate.describe(),
                f"{evaluation.min_cosine:.6f}" if evaluation.status == "ok" else "–",
                f"{evaluation.size_bytes / 1e6:.2f}" if evaluation.status == "ok" else "–",
                _fmt_ratio(trial.latency_ratio),
                f"{evaluation.build_seconds:.1f}",
                status,
            ]
        )
    lines += _markdown_table(
        ["#", "stage", "candidate", "min cosine", "MB", "latency", "build s", "status"], rows
    )
    return "\n".join(lines) + "\n"
