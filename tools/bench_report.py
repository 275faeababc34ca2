"""The results of :mod:`tools.benchmark` and their three forms: markdown, JSON and a PNG plot.

Kept apart from the measuring code so the writers can be tested on made-up rows in milliseconds
(``tests/tools/test_benchmark_tool.py``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tools.bench_common import fmt, machine_summary, markdown_table, write_json

PEAK_TARGET = 1.5
"""Scale target: peak RSS at most this many times the model's size on disk."""
REFERENCE = "fp32"
GRAPHOPT = "graphopt"


@dataclass(frozen=True)
class Metric:
    """One accuracy column: key in :attr:`Row.metrics`, header, number format."""

    key: str
    label: str
    spec: str = ".4f"


@dataclass
class Row:
    """One model variant: how it was built and what it measured (or why it failed)."""

    variant: str
    tool: str
    recipe: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    size_mb: float | None = None
    size_ratio: float | None = None
    latency_ratio: float | None = None
    build_s: float | None = None
    peak_rss_mib: float | None = None
    error: str = ""
    note: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``reference``, ``graphopt`` or ``anchor``."""
        if self.tool == REFERENCE:
            return "reference"
        return "graphopt" if self.tool == GRAPHOPT else "anchor"


@dataclass
class Section:
    """One model's table."""

    name: str
    description: str
    metrics: list[Metric]
    primary: str
    rows: list[Row] = field(default_factory=list)

    def primary_label(self) -> str:
        return next(m.label for m in self.metrics if m.key == self.primary)


@dataclass
class ScaleRow:
    """One step (a pass, ``check`` or an anchor) on one size of the large decoder."""

    step: str
    tool: str
    target_gb: float
    size_gb: float
    seconds: float | None = None
    peak_rss_mib: float | None = None
    output_gb: float | None = None
    error: str = ""
    note: str = ""

    @property
    def peak_over_size(self) -> float | None:
        if self.peak_rss_mib is None or not self.size_gb:
            return None
        return self.peak_rss_mib * 2**20 / (self.size_gb * 1e9)

    @property
    def seconds_per_gb(self) -> float | None:
        if self.seconds is None or self.error or not self.size_gb:
            return None
        return self.seconds / self.size_gb

    @property
    def meets_target(self) -> bool:
        ratio = self.peak_over_size
        return not self.error and ratio is not None and ratio <= PEAK_TARGET


@dataclass
class Report:
    command: str
    machine: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    scale: list[ScaleRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float | None = None


# --- markdown --------------------------------------------------------------------------------


def _row_cells(section: Section, row: Row) -> list[str]:
    variant = f"**{row.variant}**" if row.kind == "graphopt" else row.variant
    if row.error:
        metric_cells = ["–"] * len(section.metrics)
        note = f"**failed**: {row.error}" + (f"; {row.note}" if row.note else "")
    else:
        metric_cells = [fmt(row.metrics.get(m.key), m.spec) for m in section.metrics]
        note = row.note
    return [
        variant,
        row.tool,
        *metric_cells,
        fmt(row.size_mb, ".1f" if (row.size_mb or 0) >= 10 else ".3g"),
        fmt(row.size_ratio, ".3f"),
        fmt(row.latency_ratio, ".2f", "–") + ("×" if row.latency_ratio is not None else ""),
        fmt(row.build_s, ".1f"),
        fmt(row.peak_rss_mib, ".0f"),
        note,
    ]


def section_markdown(section: Section) -> str:
    headers = [
        "variant",
        "tool",
        *[m.label for m in section.metrics],
        "size MB",
        "size / fp32",
        "latency / fp32",
        "build s",
        "build peak RSS MiB",
        "notes",
    ]
    table = markdown_table(headers, [_row_cells(section, row) for row in section.rows])
    recipes = "\n".join(
        f"- {row.variant} ({row.tool}): `{row.recipe}`" for row in section.rows if row.recipe
    )
    details = (
        f"\n<details><summary>How each row was built</summary>\n\n{recipes}\n\n</details>\n"
        if recipes
        else ""
    )
    return f"## {section.name}\n\n{section.description}\n\n{table}\n{details}"


def _target_cell(row: ScaleRow) -> str:
    if row.error:
        return "**fail** (did not finish)"
    if row.peak_over_size is None:
        return "–"
    return "pass" if row.meets_target else "**fail**"


def scale_markdown(rows: list[ScaleRow]) -> str:
    headers = [
        "step",
        "tool",
        "model GB",
        "seconds",
        "s / GB",
        "peak RSS GB",
        "peak / size",
        f"≤ {PEAK_TARGET}×",
        "output GB",
        "notes",
    ]
    steps = list(dict.fromkeys(row.step for row in rows))
    ordered = sorted(rows, key=lambda row: (steps.index(row.step), row.size_gb))  # by step
    cells = [
        [
            row.step,
            row.tool,
            f"{row.size_gb:.2f}",
            fmt(row.seconds, ".1f"),
            fmt(row.seconds_per_gb, ".1f"),
            fmt(None if row.peak_rss_mib is None else row.peak_rss_mib * 2**20 / 1e9, ".2f"),
            fmt(row.peak_over_size, ".2f") + ("×" if row.peak_over_size is not None else ""),
            _target_cell(row),
            fmt(row.output_gb, ".2f"),
            (f"**failed**: {row.error}" if row.error else "")
            + ("; " if row.error and row.note else "")
            + row.note,
        ]
        for row in ordered
    ]
    sizes = sorted({row.size_gb for row in rows})
    steps_between = list(itertools.pairwise(sizes))
    linear = []
    for step in steps:
        per_gb = {row.size_gb: row.seconds_per_gb for row in rows if row.step == step}
        values = [v for v in per_gb.values() if v is not None]
        margins = marginal_seconds_per_gb(rows, step)
        linear.append(
            [
                step,
                *[fmt(per_gb.get(size), ".1f") for size in sizes],
                fmt(_spread(values), ".2f"),
                *[fmt(margins.get(pair), ".1f") for pair in steps_between],
                fmt(_spread(list(margins.values())), ".2f"),
            ]
        )
    linear_table = markdown_table(
        [
            "step",
            *[f"s / GB at {size:.2f} GB" for size in sizes],
            "max / min",
            *[f"Δs / ΔGB {low:.2f}→{high:.2f}" for low, high in steps_between],
            "Δ max / min",
        ],
        linear,
    )
    return (
        "## Scale: the large decoder at several sizes\n\n"
        f"{scale_summary(rows)}\n\n"
        "Each step runs in a fresh process on the generated decoder (external data): the passes "
        "as `graphopt optimize MODEL OUT --passes P --calib-data calib.npz --no-validate`, "
        "`check` as `graphopt check MODEL QUANT_OUT --data calib.npz`. Peak RSS is the process's "
        f"VmHWM; the target is at most {PEAK_TARGET}× the model's size on disk (at small sizes "
        "the process's fixed footprint — Python, ONNX Runtime, numpy — weighs on the ratio; "
        "the target is about the largest size). Outputs are deleted after each measurement.\n\n"
        f"{markdown_table(headers, cells)}\n\n"
        "Linearity: seconds per GB of model at each size, and the extra seconds per extra GB "
        "between consecutive sizes (Δs / ΔGB). A fixed cost (process start-up, the embedding "
        "and LM head that every size has) makes s / GB fall with size; time is linear in size "
        "when the Δs / ΔGB columns agree (Δ max / min near 1).\n\n"
        f"{linear_table}\n"
    )


def marginal_seconds_per_gb(rows: list[ScaleRow], step: str) -> dict[tuple[float, float], float]:
    """(Δ seconds) / (Δ GB) between consecutive sizes a step finished at, keyed by the sizes."""
    timed = sorted(
        (row.size_gb, row.seconds)
        for row in rows
        if row.step == step and row.seconds is not None and not row.error
    )
    return {
        (low, high): (high_s - low_s) / (high - low)
        for (low, low_s), (high, high_s) in itertools.pairwise(timed)
        if high > low
    }


def _spread(values: list[float]) -> float | None:
    return max(values) / min(values) if len(values) > 1 and min(values) > 0 else None


def scale_summary(rows: list[ScaleRow]) -> str:
    """One sentence: at the largest size, which graphopt steps meet the memory target."""
    largest = max(row.size_gb for row in rows)
    ours = [r for r in rows if r.size_gb == largest and r.tool.startswith(GRAPHOPT)]
    if not ours:
        return f"Largest size measured: {largest:.2f} GB."
    met = [r.step for r in ours if r.meets_target]
    missed = [r.step for r in ours if not r.meets_target]
    text = (
        f"At the largest size ({largest:.2f} GB), {len(met)} of {len(ours)} graphopt steps "
        f"stay within {PEAK_TARGET}× the model's size"
    )
    return text + (f"; over it: {', '.join(missed)}." if missed else ".")


def markdown(report: Report, plot_name: str | None = "benchmarks.png") -> str:
    machine = report.machine
    quick = report.settings.get("quick")
    lines = [
        "# Benchmarks",
        "",
        "Generated by one command; do not edit by hand, rerun it:",
        "",
        "```bash",
        report.command,
        "```",
        "",
        f"- Machine: {machine_summary(machine)}; {machine.get('os', '')}, "
        f"Python {machine.get('python', '')}.",
        f"- Date: {machine.get('date', '')}"
        + (f"; the whole run took {report.seconds / 60:.1f} min." if report.seconds else "."),
    ]
    if quick:
        lines.append(
            "- **`--quick` run** (fewer evaluation samples and latency runs): development "
            "numbers, not the ones to quote."
        )
    lines += [
        "",
        "How to read the tables:",
        "",
        "- Accuracy is measured against the float32 model on held-out data (never the "
        "calibration data); each section says which.",
        "- Size is bytes on disk, external data included (MB = 10⁶ bytes); `size / fp32` is "
        "the ratio to the float32 file.",
        "- `latency / fp32` is the candidate's median CPU latency over float32's, both sessions "
        "in one process with ONNX Runtime's full graph optimizations, runs interleaved "
        f"(ABBA), {report.settings.get('latency_runs', '?')} runs each; below 1 is faster.",
        "- `build s` and `build peak RSS` are the build's wall time and its process's peak "
        "resident set (VmHWM): every build runs in a fresh Python process.",
        "- **Bold** rows are graphopt; the others are the anchors (other tools at their "
        "defaults). A tool that fails is a row with the reason.",
        "",
    ]
    if plot_name:
        lines += [f"![accuracy against size and latency]({plot_name})", ""]
    out = "\n".join(lines)
    for section in report.sections:
        out += "\n" + section_markdown(section)
    if report.scale:
        out += "\n" + scale_markdown(report.scale)
    if report.notes:
        out += "\n## Notes\n\n" + "\n".join(f"- {note}" for note in report.notes) + "\n"
    return out


# --- JSON ------------------------------------------------------------------------------------


def to_dict(report: Report) -> dict[str, Any]:
    data = asdict(report)
    for section, raw in zip(report.sections, data["sections"], strict=True):
        for row, raw_row in zip(section.rows, raw["rows"], strict=True):
            raw_row["kind"] = row.kind
    for row, raw in zip(report.scale, data["scale"], strict=True):
        raw.update(
            peak_over_size=row.peak_over_size,
            seconds_per_gb=row.seconds_per_gb,
            meets_target=row.meets_target,
        )
    return data


def from_dict(data: dict[str, Any]) -> Report:
    """The :class:`Report` that :func:`to_dict` wrote (derived fields are recomputed)."""
    sections = [
        Section(
            name=raw["name"],
            description=raw["description"],
            metrics=[Metric(**metric) for metric in raw["metrics"]],
            primary=raw["primary"],
            rows=[Row(**{k: v for k, v in row.items() if k != "kind"}) for row in raw["rows"]],
        )
        for raw in data.get("sections", [])
    ]
    derived = {"peak_over_size", "seconds_per_gb", "meets_target"}
    scale = [
        ScaleRow(**{k: v for k, v in row.items() if k not in derived})
        for row in data.get("scale", [])
    ]
    return Report(
        command=data["command"],
        machine=data["machine"],
        settings=data.get("settings", {}),
        sections=sections,
        scale=scale,
        notes=data.get("notes", []),
        seconds=data.get("seconds"),
    )


# --- plot ------------------------------------------------------------------------------------

_REFERENCE_STYLE = {"marker": "*", "color": "black", "s": 150}
_GRAPHOPT_STYLE = {"marker": "o", "color": "tab:blue", "s": 50}
_ANCHOR_STYLES = (
    {"marker": "s", "color": "tab:orange", "s": 45},
    {"marker": "^", "color": "tab:green", "s": 55},
    {"marker": "D", "color": "tab:red", "s": 40},
    {"marker": "v", "color": "tab:purple", "s": 55},
)


def _plottable(section: Section) -> list[Row]:
    rows = []
    for row in section.rows:
        value = row.metrics.get(section.primary)
        if row.error or value is None or not math.isfinite(value):
            continue
        rows.append(row)
    return rows


def _styles(report: Report) -> dict[str, dict[str, Any]]:
    """Marker and colour per tool: fp32 a star, graphopt circles, each anchor tool its own."""
    styles: dict[str, dict[str, Any]] = {REFERENCE: _REFERENCE_STYLE, GRAPHOPT: _GRAPHOPT_STYLE}
    anchors = sorted({row.tool for s in report.sections for row in s.rows if row.kind == "anchor"})
    for index, tool in enumerate(anchors):
        styles[tool] = _ANCHOR_STYLES[index % len(_ANCHOR_STYLES)]
    return styles


def _scatter(axis: Any, rows: list[Row], attribute: str, primary: str, styles: dict) -> None:
    labels: dict[tuple[float, float], list[str]] = {}
    colours: dict[tuple[float, float], str] = {}
    for tool, style in styles.items():
        points = [row for row in rows if row.tool == tool and getattr(row, attribute) is not None]
        if not points:
            continue
        xs = [getattr(row, attribute) for row in points]
        ys = [row.metrics[primary] for row in points]
        axis.scatter(xs, ys, label=tool, zorder=4 if tool == REFERENCE else 3, **style)
        for x, y, row in zip(xs, ys, points, strict=True):
            key = (round(x, 2), round(y, 3))
            labels.setdefault(key, []).append(row.variant)
            colours.setdefault(key, style["color"])
    for (x, y), names in labels.items():  # one label per spot: coinciding points share it
        text = ", ".join(names) if len(names) <= 2 else "\n".join(names)
        axis.annotate(
            text,
            (x, y),
            xytext=(5, 4),
            textcoords="offset points",
            va="top",
            fontsize=6.5,
            color=colours[(x, y)],
        )


def write_plot(report: Report, path: Path) -> None:
    """One row per model: primary accuracy metric against size ratio and against latency ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    sections = [s for s in report.sections if _plottable(s)]
    styles = _styles(report)
    count = max(1, len(sections))
    figure, axes = plt.subplots(count, 2, figsize=(13, 4.4 * count), squeeze=False)
    for index, section in enumerate(sections):
        rows = _plottable(section)
        for column, (attribute, label) in enumerate(
            (("size_ratio", "size / fp32 (on disk)"), ("latency_ratio", "CPU latency / fp32"))
        ):
            axis = axes[index][column]
            _scatter(axis, rows, attribute, section.primary, styles)
            values = [getattr(row, attribute) for row in rows if getattr(row, attribute)]
            spread = max(values) / min(values) if values and min(values) > 0 else 1.0
            if attribute == "latency_ratio" and spread > 4:
                axis.set_xscale("log")  # one very slow anchor must not squash the rest
                axis.xaxis.set_major_formatter(ScalarFormatter())
                axis.xaxis.set_minor_formatter(NullFormatter())
            axis.margins(x=0.12, y=0.08)
            axis.set_xlabel(label)
            axis.set_ylabel(section.primary_label())
            axis.set_title(f"{section.name}: {section.primary_label()} vs {label.split(' (')[0]}")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7, loc="best")
    if not sections:
        axes[0][0].text(0.5, 0.5, "no results", ha="center")
        axes[0][0].set_axis_off()
        axes[0][1].set_axis_off()
    figure.suptitle("graphopt and anchors: accuracy against size and CPU latency", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.985))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_all(report: Report, folder: Path, stem: str = "benchmarks") -> dict[str, Path]:
    """``BENCHMARKS.md``, ``<stem>.json`` and ``<stem>.png`` in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": folder / "BENCHMARKS.md",
        "json": folder / f"{stem}.json",
        "plot": folder / f"{stem}.png",
    }
    write_plot(report, paths["plot"])
    write_json(paths["json"], to_dict(report))
    paths["markdown"].write_text(markdown(report, paths["plot"].name))
    return paths


def main(argv: list[str] | None = None) -> None:
    """Render BENCHMARKS.md and the plot again from a ``benchmarks.json`` (no measuring)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("json_path", type=Path, help="benchmarks.json written by tools.benchmark")
    parser.add_argument("--report-dir", type=Path, default=None, help="default: beside the JSON")
    args = parser.parse_args(argv)
    report = from_dict(json.loads(args.json_path.read_text()))
    folder = args.report_dir or args.json_path.parent
    for path in write_all(report, folder, args.json_path.stem).values():
        print(path)


if __name__ == "__main__":
    main()
