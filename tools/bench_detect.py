"""Detection benchmark: graphopt's passes and ONNX Runtime's quantizers on a YOLOv8-style detector.

    python -m tools.bench_detect [--out-dir models/build/bench_detect] [--calib-scenes 64]
        [--eval-scenes 128] [--runs 20] [--variants quant,sparsify,...] [--json FILE] [--quick]

The detector is ``models/digits_detector.onnx`` (``models/digits_detector.py``: trained on scenes
of scikit-learn's scanned digits; output ``[batch, 4 + 10, 1344]``, box rows in pixels and
sigmoid score rows). Rules:

1. Data: calibration scenes from the calibration digit pool and held-out scenes from the
   evaluation pool (never seen in training) are regenerated from their seeds (the committed
   ``digits_detector_{calib,eval}.npz`` are their first 12 scenes) and written image-only into
   the output folder, so graphopt and ORT read the same ``.npz``.
2. Each variant is built in a fresh process (tools.bench_common.run_worker): build time is that
   process's wall time. graphopt variants run ``graphopt optimize`` with defaults, calibrating on
   the calibration scenes and validating on the held-out scenes; their verdict is the report's
   ``passed``. Every candidate, ORT's too, is also judged by ``graphopt check`` on the held-out
   scenes, with the default gate and with ``--whole-tensor``.
3. Detections (models/detection.py): best class per anchor, score > 0.25, class-wise NMS at IoU
   0.5. *Kept* is the share of fp32 detections the candidate reproduces (same class, IoU > 0.5,
   greedy one-to-one matching); recall and precision are against the ground truth; mAP@0.5
   decodes at score > 0.001.
4. Output agreement is reported on the whole output (cosine) and per output row (the worst of
   the 14 rows: 4 box rows, 10 score rows), which is what a whole-tensor gate cannot see.
5. Latency is the median of interleaved runs against fp32 (graphopt.check.latency) at batch 1 and at
   batch 8, ONNX Runtime CPU with all graph optimizations; speed ratio = candidate / fp32.
6. A variant that fails to build is a row with its error, not a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.check.latency import measure_latency
from graphopt.ir.model import model_file_bytes
from models import detection
from models.digit_scenes import SceneSet
from tools.bench_common import (
    REPO,
    machine_info,
    machine_summary,
    markdown_table,
    model_outputs,
    run_worker,
    write_json,
)

logger = logging.getLogger(__name__)

SOURCE = REPO / "models" / "digits_detector.onnx"
INPUT_NAME = "image"
ROW_NAMES = ("cx", "cy", "w", "h", *(f"score {digit}" for digit in range(10)))
NUM_CLASSES = 10
MAP_SCORE_THRESHOLD = 0.001


@dataclass(frozen=True)
class Variant:
    """One way of making a candidate: a graphopt pass set or an ORT quantizer and its options."""

    key: str
    label: str
    tool: str  # "graphopt", "ort_static" or "ort_dynamic"
    options: dict[str, Any] = field(default_factory=dict)
    float_tail: bool = False
    """ORT only: leave the decode tail (:func:`decode_tail_nodes`) in float."""


VARIANTS: tuple[Variant, ...] = (
    Variant("quant", "graphopt quant (defaults)", "graphopt", {"passes": "quant"}),
    Variant("sparsify", "graphopt sparsify (defaults)", "graphopt", {"passes": "sparsify"}),
    Variant("cleanup", "graphopt cleanup", "graphopt", {"passes": "cleanup"}),
    Variant("ort-static", "ORT quantize_static (QDQ, defaults)", "ort_static"),
    Variant(
        "ort-static-pc", "ORT quantize_static per-channel", "ort_static", {"per_channel": True}
    ),
    Variant(
        "ort-static-pc-u8",
        "ORT quantize_static per-channel, uint8 activations",
        "ort_static",
        {"per_channel": True, "activation_type": "QUInt8"},
    ),
    Variant(
        "ort-static-pc-u8-tail",
        "ORT quantize_static per-channel, uint8, decode tail float",
        "ort_static",
        {"per_channel": True, "activation_type": "QUInt8"},
        float_tail=True,
    ),
    Variant("ort-dynamic", "ORT quantize_dynamic", "ort_dynamic"),
)


@dataclass
class Row:
    """Everything measured on one candidate (rules 2-5); ``error`` when it could not be built."""

    key: str
    label: str
    kept: float | None = None
    kept_detections: int = 0
    fp32_detections: int = 0
    candidate_detections: int = 0
    recall: float | None = None
    precision: float | None = None
    map50: float | None = None
    cosine: float | None = None
    worst_row_cosine: float | None = None
    worst_row: str = ""
    verdict: str = ""
    check_default: str = ""
    check_whole_tensor: str = ""
    gate_cosine: float | None = None
    gate_worst_channel_cosine: float | None = None
    size_mb: float | None = None
    latency_ratio_b1: float | None = None
    latency_ratio_b8: float | None = None
    fp32_ms_b1: float | None = None
    fp32_ms_b8: float | None = None
    build_s: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: str = ""


# --- metrics -----------------------------------------------------------------------------------


def row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each output row (axis 1) over all images and anchors; 1 where both are zero."""
    ref = np.moveaxis(np.asarray(reference, np.float64), 1, 0).reshape(reference.shape[1], -1)
    cand = np.moveaxis(np.asarray(candidate, np.float64), 1, 0).reshape(candidate.shape[1], -1)
    dot = (ref * cand).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    both_zero = (np.abs(ref).sum(axis=1) == 0) & (np.abs(cand).sum(axis=1) == 0)
    return np.where(both_zero, 1.0, dot / np.where(norms > 0, norms, 1.0))


def whole_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine of the two outputs flattened."""
    ref, cand = np.ravel(reference).astype(np.float64), np.ravel(candidate).astype(np.float64)
    norms = np.linalg.norm(ref) * np.linalg.norm(cand)
    return float(ref @ cand / norms) if norms > 0 else float(np.array_equal(ref, cand))


def detection_metrics(
    reference: np.ndarray, candidate: np.ndarray, truths: Sequence[detection.Detections]
) -> dict[str, Any]:
    """Rule 3 and 4 figures of a candidate output against the fp32 output and the ground truth."""
    fp32 = detection.decode_batch(reference)
    found = detection.decode_batch(candidate)
    kept = detection.count_matches(fp32, found)
    truth = detection.count_matches(truths, found)
    ranked = detection.decode_batch(candidate, score_threshold=MAP_SCORE_THRESHOLD)
    cosines = row_cosines(reference, candidate)
    worst = int(np.argmin(cosines))
    return {
        "kept": kept.recall,
        "kept_detections": kept.matched,
        "fp32_detections": kept.reference,
        "candidate_detections": kept.candidate,
        "recall": truth.recall,
        "precision": truth.precision,
        "map50": detection.mean_average_precision(truths, ranked, NUM_CLASSES),
        "cosine": whole_cosine(reference, candidate),
        "worst_row_cosine": float(cosines[worst]),
        "worst_row": ROW_NAMES[worst] if worst < len(ROW_NAMES) else f"row {worst}",
    }


# --- builds (fresh processes) ------------------------------------------------------------------


def decode_tail_nodes(model: Path) -> list[str]:
    """Names of the main-graph nodes from which no Conv is reachable: the box decoding (DFL
    softmax and its fixed Conv, anchor arithmetic), the score sigmoid and the output Concat that
    packs pixel-sized boxes next to 0-1 scores."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    nodes = list(graph.node)
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    feeds_conv = [False] * len(nodes)
    for index in reversed(range(len(nodes))):  # exporters write nodes in topological order
        feeds_conv[index] = any(
            nodes[child].op_type == "Conv" or feeds_conv[child]
            for output in nodes[index].output
            for child in consumers.get(output, [])
        )
    tail = [node.name for node, feeds in zip(nodes, feeds_conv, strict=True) if not feeds]
    if not all(tail):
        raise ValueError(f"{model}: unnamed nodes in the decode tail; cannot exclude them by name")
    return tail


def build(
    variant: Variant, source: Path, target: Path, calib: Path, data: Path, log_dir: Path
) -> tuple[float | None, str, dict[str, Any]]:
    """Build one candidate (rule 2): ``(seconds, error, info)``; info holds graphopt's report."""
    log = log_dir / f"{variant.key}.log"
    if variant.tool == "graphopt":
        report = target.with_suffix(".report.json")
        args = ["optimize", str(source), str(target), "--passes", variant.options["passes"]]
        args += ["--calib-data", str(calib), "--data", str(data), "--report", str(report)]
        result = run_worker("tools.bench_common:run_cli", {"args": args}, log_path=log)
        info: dict[str, Any] = {"exit_code": result.info.get("exit_code")}
        if report.exists():
            info["report"] = json.loads(report.read_text())
        return result.seconds, result.error, info
    call = {"ort_static": "_ort_static", "ort_dynamic": "_ort_dynamic"}[variant.tool]
    options = dict(variant.options)
    if variant.float_tail:
        options["nodes_to_exclude"] = decode_tail_nodes(source)
    kwargs = {"source": str(source), "target": str(target), "calib": str(calib), "options": options}
    result = run_worker(f"tools.bench_quant:{call}", kwargs, log_path=log)
    return result.seconds, result.error, {}


def gate(reference: Path, candidate: Path, data: Path, whole_tensor: bool, log: Path) -> str:
    """``graphopt check`` verdict on the held-out scenes: PASS, FAIL or the error."""
    report = log.with_suffix(".json")
    args = ["check", str(reference), str(candidate), "--data", str(data), "--json", str(report)]
    if whole_tensor:
        args.append("--whole-tensor")
    result = run_worker("tools.bench_common:run_cli", {"args": args}, log_path=log)
    if not result.ok:
        return f"error: {result.error}"
    return {0: "PASS", 1: "FAIL"}.get(result.info.get("exit_code"), str(result.info))


def _report_figures(report: dict[str, Any]) -> tuple[float | None, float | None]:
    """Whole-tensor and worst-channel cosine of the first output in a graphopt report."""
    validation = report.get("validation") or {}
    comparisons = validation.get("comparisons") or []
    if not comparisons:
        return None, None
    first = comparisons[0]
    return _number(first.get("cosine")), _number(first.get("worst_channel_cosine"))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _pass_stats(report: dict[str, Any]) -> dict[str, Any]:
    """The counters each pass reported (quantized, excluded, pruned …)."""
    return {
        record.get("name", f"pass {i}"): record.get("stats", {})
        for i, record in enumerate(report.get("passes") or [])
    }


# --- the run -----------------------------------------------------------------------------------


def prepare_data(folder: Path, calib_scenes: int, eval_scenes: int) -> tuple[Path, Path, SceneSet]:
    """Rule 1: write ``calib.npz`` and ``eval.npz`` (key ``image``); return the held-out set."""
    from models.digits_detector import scene_sets

    calib, held_out = scene_sets(calib_scenes, eval_scenes)
    calib_path, eval_path = folder / "calib.npz", folder / "eval.npz"
    np.savez(calib_path, image=calib.images)
    np.savez(eval_path, image=held_out.images)
    return calib_path, eval_path, held_out


def measure_variant(
    variant: Variant,
    source: Path,
    folder: Path,
    calib: Path,
    data: Path,
    held_out: SceneSet,
    reference: np.ndarray,
    runs: int,
) -> Row:
    """Build one candidate and measure it (rules 2-6)."""
    log_dir = folder / "logs"
    target = folder / f"{variant.key}.onnx"
    target.unlink(missing_ok=True)
    seconds, error, info = build(variant, source, target, calib, data, log_dir)
    row = Row(variant.key, variant.label, build_s=seconds, error=error)
    report = info.get("report") or {}
    if report:
        row.verdict = "PASS" if report.get("passed") else "FAIL"
        row.gate_cosine, row.gate_worst_channel_cosine = _report_figures(report)
        row.stats = _pass_stats(report)
    elif variant.tool != "graphopt":
        row.verdict = "n/a"
    if not target.exists():
        row.error = error or f"no model written (exit code {info.get('exit_code')})"
        logger.warning("%s: %s", variant.label, row.error)
        return row
    truths = [detection.Detections.ground_truth(*held_out.truth(i)) for i in range(len(held_out))]
    candidate = model_outputs(target, {INPUT_NAME: held_out.images})
    for key, value in detection_metrics(reference, candidate, truths).items():
        setattr(row, key, value)
    row.size_mb = model_file_bytes(target) / 1e6
    row.check_default = gate(source, target, data, False, log_dir / f"{variant.key}.check")
    row.check_whole_tensor = gate(
        source, target, data, True, log_dir / f"{variant.key}.check-whole"
    )
    for batch in (1, 8):
        latency = measure_latency(source, target, {INPUT_NAME: held_out.images[:batch]}, runs=runs)
        setattr(row, f"latency_ratio_b{batch}", latency.ratio)
        setattr(row, f"fp32_ms_b{batch}", latency.reference_ms)
    return row


def measure(
    variants: Sequence[Variant],
    source: Path,
    folder: Path,
    calib_scenes: int,
    eval_scenes: int,
    runs: int,
) -> tuple[list[Row], dict[str, Any]]:
    """Build and measure every variant; the fp32 row comes first."""
    calib, data, held_out = prepare_data(folder, calib_scenes, eval_scenes)
    truths = [detection.Detections.ground_truth(*held_out.truth(i)) for i in range(len(held_out))]
    reference = model_outputs(source, {INPUT_NAME: held_out.images})
    fp32 = Row("fp32", "fp32 (reference)", size_mb=model_file_bytes(source) / 1e6)
    for key, value in detection_metrics(reference, reference, truths).items():
        setattr(fp32, key, value)
    rows = [fp32]
    for variant in variants:
        row = measure_variant(variant, source, folder, calib, data, held_out, reference, runs)
        rows.append(row)
        if not row.error:
            logger.info(
                "%s: kept %.3f, recall %.3f, verdict %s, latency %.2f / %.2f",
                variant.label,
                row.kept,
                row.recall,
                row.verdict,
                row.latency_ratio_b1,
                row.latency_ratio_b8,
            )
    setup = {
        "machine": machine_info(),
        "source": str(source),
        "calib_scenes": calib_scenes,
        "eval_scenes": eval_scenes,
        "ground_truth_digits": len(held_out.labels),
        "latency_runs": runs,
    }
    return rows, setup


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _worst_row(row: Row) -> str:
    if row.worst_row_cosine is None:
        return "–"
    where = f" ({row.worst_row})" if row.worst_row_cosine < 1.0 - 1e-6 else ""
    return f"{row.worst_row_cosine:.4f}{where}"


def markdown(rows: Sequence[Row], setup: dict[str, Any]) -> str:
    """The report: setup, one table, the errors."""
    headers = [
        "variant",
        "kept vs fp32",
        "recall (GT)",
        "precision (GT)",
        "mAP@0.5",
        "cosine (whole)",
        "worst row cosine",
        "graphopt verdict",
        "check / --whole-tensor",
        "size MB",
        "latency ×fp32 b1 / b8",
        "build s",
    ]
    table = markdown_table(
        headers,
        [
            [
                row.label,
                f"{_pct(row.kept)} ({row.kept_detections}/{row.fp32_detections})",
                _pct(row.recall),
                _pct(row.precision),
                _num(row.map50, ".3f"),
                _num(row.cosine, ".4f"),
                _worst_row(row),
                row.verdict or "–",
                f"{row.check_default or '–'} / {row.check_whole_tensor or '–'}",
                _num(row.size_mb, ".2f"),
                f"{_num(row.latency_ratio_b1, '.2f')} / {_num(row.latency_ratio_b8, '.2f')}",
                _num(row.build_s, ".1f"),
            ]
            for row in rows
        ],
    )
    fp32 = next((row for row in rows if row.key != "fp32" and row.fp32_ms_b1), None)
    timing = (
        f" fp32 median: {fp32.fp32_ms_b1:.1f} ms at batch 1, {fp32.fp32_ms_b8:.1f} ms at batch 8."
        if fp32 and fp32.fp32_ms_b8
        else ""
    )
    lines = [
        "# Detection benchmark (digits detector, YOLOv8-style output [1, 14, 1344])",
        "",
        f"Machine: {machine_summary(setup['machine'])}.",
        f"Calibration: {setup['calib_scenes']} scenes; evaluation: {setup['eval_scenes']} "
        f"held-out scenes with {setup['ground_truth_digits']} digits. Detections: score > 0.25, "
        "class-wise NMS IoU 0.5; kept = fp32 detections reproduced (same class, IoU > 0.5). "
        f"Latency: median of {setup['latency_runs']} interleaved runs per model against fp32."
        + timing,
        "",
        table,
    ]
    errors = [row for row in rows if row.error]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {row.label}: {row.error}" for row in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "models" / "build" / "bench_detect")
    parser.add_argument("--model", type=Path, default=SOURCE, help="the fp32 detector")
    parser.add_argument("--calib-scenes", type=int, default=64)
    parser.add_argument("--eval-scenes", type=int, default=128)
    parser.add_argument("--runs", type=int, default=50, help="latency runs per model and batch")
    parser.add_argument(
        "--variants",
        default=",".join(v.key for v in VARIANTS),
        help="comma-separated: " + ", ".join(v.key for v in VARIANTS),
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="32 + 32 scenes, 10 latency runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    known = {v.key: v for v in VARIANTS}
    wanted = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r} (choose from {', '.join(known)})")
    if args.quick:
        args.calib_scenes, args.eval_scenes, args.runs = 32, 32, 10
    folder: Path = args.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    rows, setup = measure(
        [known[name] for name in wanted],
        args.model,
        folder,
        args.calib_scenes,
        args.eval_scenes,
        args.runs,
    )
    text = markdown(rows, setup)
    (folder / "detect_benchmark.md").write_text(text)
    payload = {"setup": setup, "rows": [asdict(row) for row in rows]}
    write_json(folder / "detect_benchmark.json", payload)
    if args.json:
        write_json(args.json, payload)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
