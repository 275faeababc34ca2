"""The benchmark report writers (tools/bench_report.py, tools/bench_common.py) on made-up rows.

No model is built or run: these check that BENCHMARKS.md, benchmarks.json and benchmarks.png
come out well-formed, that failed rows and the scale table are shown, and that the worker
reports failures as results.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tools.bench_common import markdown_table, run_worker
from tools.bench_report import (
    Metric,
    Report,
    Row,
    ScaleRow,
    Section,
    from_dict,
    main,
    marginal_seconds_per_gb,
    markdown,
    write_all,
)

MACHINE = {
    "cpu": "Test CPU",
    "cpu_flags": ["avx2"],
    "cores": 2,
    "usable_cores": 2,
    "ram_gib": 8.0,
    "os": "Linux",
    "python": "3.11",
    "versions": {"onnxruntime": "1.0", "onnx": "1.0", "numpy": "2.0"},
    "date": "2026-01-01T00:00:00+00:00",
}


def _section() -> Section:
    metrics = [Metric("cosine_mean", "cosine mean"), Metric("nn", "NN agreement", ".3f")]
    rows = [
        Row("fp32", "fp32", metrics={"cosine_mean": 1.0, "nn": 1.0}, size_mb=90.0,
            size_ratio=1.0, latency_ratio=1.0),
        Row("quant", "graphopt", metrics={"cosine_mean": 0.991, "nn": 0.9}, size_mb=23.0,
            size_ratio=0.25, latency_ratio=0.62, build_s=4.0, peak_rss_mib=500.0,
            note="quant: quantized=36"),
        Row("cleanup", "graphopt", metrics={"cosine_mean": 1.0, "nn": 1.0}, size_mb=90.0,
            size_ratio=1.0, latency_ratio=1.0, build_s=1.0, peak_rss_mib=200.0),
        Row("ORT dynamic", "ONNX Runtime", metrics={"cosine_mean": 0.96, "nn": 0.78},
            size_mb=22.9, size_ratio=0.25, latency_ratio=0.65, build_s=1.0, peak_rss_mib=300.0),
        Row("occ fp16", "onnxconverter-common", build_s=2.0, peak_rss_mib=400.0,
            error="output fails to load in ORT: Type Error | bad"),
        Row("nan fp16", "graphopt", metrics={"cosine_mean": math.nan, "nn": 0.0},
            size_mb=45.0, size_ratio=0.5, latency_ratio=None),
    ]  # fmt: skip
    return Section("MiniLM", "Test data.", metrics, "cosine_mean", rows)


def _report() -> Report:
    scale = [
        ScaleRow("cleanup", "graphopt optimize", 1.0, 0.93, seconds=3.0, peak_rss_mib=220.0),
        ScaleRow("cleanup", "graphopt optimize", 2.0, 1.93, seconds=6.1, peak_rss_mib=230.0),
        ScaleRow("quant", "graphopt optimize", 1.0, 0.93, seconds=12.0, peak_rss_mib=2700.0),
        ScaleRow("ORT quantize_dynamic", "ONNX Runtime", 2.0, 1.93, error="killed by SIGKILL"),
    ]
    return Report(
        command="python -m tools.benchmark --quick",
        machine=MACHINE,
        settings={"quick": True, "latency_runs": 6},
        sections=[_section()],
        scale=scale,
        notes=["Olive: not installed."],
        seconds=60.0,
    )


def _tables(text: str) -> list[list[str]]:
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip())) - 2


def test_markdown_tables_are_well_formed() -> None:
    text = markdown(_report())
    tables = _tables(text)
    assert len(tables) == 3  # the model, the scale runs, the linearity summary
    for table in tables:
        widths = {_cells(line) for line in table}
        assert len(widths) == 1, table
        assert re.fullmatch(r"\|(---\|)+", table[1])
    assert "python -m tools.benchmark --quick" in text
    assert "Test CPU" in text and "onnxruntime 1.0" in text
    assert "**quant**" in text  # graphopt rows stand out
    assert "**failed**: output fails to load in ORT: Type Error \\| bad" in text
    assert "![accuracy against size and latency](benchmarks.png)" in text
    assert "`--quick` run" in text
    assert "Olive: not installed." in text


def test_scale_table_shows_target_and_linearity() -> None:
    text = markdown(_report())
    scale = next(t for t in _tables(text) if "peak / size" in t[0])
    cleanup, quant, failed = scale[2], scale[4], scale[5]
    assert "| pass |" in cleanup and "0.25×" in cleanup  # 220 MiB of a 0.93 GB model
    assert "**fail**" in quant  # 2700 MiB is 3.0× of 0.93 GB
    assert "did not finish" in failed and "killed by SIGKILL" in failed
    linear = next(t for t in _tables(text) if "max / min" in t[0])
    assert linear[2].startswith("| cleanup | 3.2 | 3.2 | 1.02 | 3.1 |")  # (6.1 − 3) / 1 GB


def test_marginal_seconds_per_gb_separates_the_fixed_cost() -> None:
    # 10 s fixed + 20 s / GB: s / GB falls with size, Δs / ΔGB stays 20.
    rows = [ScaleRow("lowrank", "graphopt optimize", g, g, seconds=10 + 20 * g) for g in (1, 2, 4)]
    rows.append(ScaleRow("lowrank", "graphopt optimize", 8, 8, error="killed"))
    margins = marginal_seconds_per_gb(rows, "lowrank")
    assert margins == {(1, 2): pytest.approx(20.0), (2, 4): pytest.approx(20.0)}
    linear = next(t for t in _tables(markdown(_report())) if "Δ max / min" in t[0])
    assert "Δs / ΔGB 0.93→1.93" in linear[0]


def test_report_renders_again_from_its_json(tmp_path: Path) -> None:
    first = write_all(_report(), tmp_path / "first")
    again = tmp_path / "again"
    main([str(first["json"]), "--report-dir", str(again)])
    assert (again / "BENCHMARKS.md").read_text() == first["markdown"].read_text()
    reloaded = from_dict(json.loads(first["json"].read_text()))
    assert reloaded.scale[0].seconds_per_gb == pytest.approx(3.0 / 0.93)
    assert math.isnan(_report().sections[0].rows[5].metrics["cosine_mean"])
    assert reloaded.sections[0].rows[5].metrics["cosine_mean"] is None


def test_json_and_png_are_written(tmp_path: Path) -> None:
    paths = write_all(_report(), tmp_path)
    assert paths["markdown"].read_text().startswith("# Benchmarks")
    data = json.loads(paths["json"].read_text())
    rows = data["sections"][0]["rows"]
    assert [row["kind"] for row in rows[:4]] == ["reference", "graphopt", "graphopt", "anchor"]
    assert rows[4]["error"].startswith("output fails to load")
    assert rows[5]["metrics"]["cosine_mean"] is None  # NaN is written as null
    assert data["scale"][2]["meets_target"] is False
    assert data["scale"][0]["meets_target"] is True
    assert data["scale"][0]["seconds_per_gb"] == pytest.approx(3.0 / 0.93)
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_without_results(tmp_path: Path) -> None:
    report = Report(command="x", machine=MACHINE)
    paths = write_all(report, tmp_path)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert "## Scale" not in paths["markdown"].read_text()


def test_markdown_table_checks_widths() -> None:
    assert markdown_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [[1]])


def test_worker_reports_failures_as_results(tmp_path: Path) -> None:
    failed = run_worker("json:loads", {"s": "{"}, timeout_s=60, log_path=tmp_path / "w.log")
    assert not failed.ok and failed.error.startswith("JSONDecodeError")
    assert failed.peak_rss_mib and failed.peak_rss_mib > 0
    assert "Traceback" in (tmp_path / "w.log").read_text()
    done = run_worker("json:dumps", {"obj": [1, 2]}, timeout_s=60)
    assert done.ok and done.info == {"result": "[1, 2]"} and done.seconds is not None
