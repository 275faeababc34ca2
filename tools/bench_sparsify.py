"""Sparsity benchmark: graphopt ``sparsify`` on MiniLM, magnitude against Wanda and SparseGPT.

    python -m tools.bench_sparsify [--model models/build/minilm.onnx]
        [--calib models/build/calib64x128.npz] [--out-dir models/build/bench_sparsify]

MiniLM (TorchScript export) is calibrated on the 64 built-in sentences and evaluated on 256
other real sentences (seq 128, batch 8), as ``tools.bench_quant`` does; rows marked "512
unpadded" calibrate on 512 unpadded documentation sentences disjoint from the evaluation set
(the evaluation's domain; the 64 built-in sentences are short generic ones, 90 % of their
padded positions left out through the attention mask).
Unstructured 30 % and 50 % and 2:4 rows report the embedding cosine against fp32 and the
deflate (gzip level 6) size of the file; unstructured and 2:4 sparsity give no speedup on ONNX
Runtime, so no latency is measured for them. Channel rows (FFN intermediate channels) report
parameters and the CPU latency ratio against fp32 from interleaved runs (graphopt.check.latency).
Prints a markdown table and writes it to ``sparsify_benchmark.md`` in the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from graphopt.check.latency import measure_latency
from graphopt.data.feeds import input_specs, open_data
from graphopt.ir.model import save_model
from graphopt.ir.normalize import load_normalized
from graphopt.passkit.api import PassContext
from passes.sparsify import SparsifyPass
from tools.bench_common import (
    BATCH,
    embedding_metrics,
    fmt,
    machine_summary,
    markdown_table,
    model_embeddings,
)

UNPADDED = "512 unpadded"
"""Label of the second calibration set: 512 unpadded documentation sentences."""


@dataclass
class Row:
    variant: str
    cosine_mean: float
    cosine_min: float
    sparsity: float
    gzip_mb: float
    parameters_m: float
    latency_ratio: float | None
    pass_s: float


def file_stats(path: Path) -> tuple[float, float]:
    """(deflate size in MB, parameters in millions) of a model file."""
    import onnx

    proto = onnx.load(str(path))
    parameters = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    return len(zlib.compress(path.read_bytes(), 6)) / 1e6, parameters / 1e6


def run_variant(
    source: Path, calib: Path, target: Path, options: dict[str, Any]
) -> tuple[float, float]:
    """Sparsify ``source`` into ``target``; returns (pass seconds, achieved sparsity)."""
    model, _ = load_normalized(source, materialize_weights=True)
    feeds = open_data(calib, input_specs(model.graph), batch_size=BATCH)
    started = time.perf_counter()
    result = SparsifyPass({"report_gzip": False, **options})(model, PassContext(data=feeds))
    seconds = time.perf_counter() - started
    save_model(result.model, target)
    return seconds, float(result.stats.get("sparsity", 0.0))


def variants() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for pattern, sparsities in (("unstructured", (0.3, 0.5)), ("n:m", (0.5,))):
        for sparsity in sparsities:
            for method in ("magnitude", "wanda", "sparsegpt"):
                label = f"{int(sparsity * 100)} %" if pattern == "unstructured" else "2:4"
                table[f"{label} {method}"] = {
                    "pattern": pattern,
                    "sparsity": sparsity,
                    "method": method,
                }
    table["50 % sparsegpt damp 0.1"] = {"sparsity": 0.5, "method": "sparsegpt", "damp": 0.1}
    for method in ("wanda", "sparsegpt"):
        table[f"50 % {method}, {UNPADDED}"] = {"sparsity": 0.5, "method": method}
        table[f"2:4 {method}, {UNPADDED}"] = {"pattern": "n:m", "method": method}
    table[f"50 % sparsegpt damp 0.1, {UNPADDED}"] = {
        "sparsity": 0.5,
        "method": "sparsegpt",
        "damp": 0.1,
    }
    for sparsity in (0.25, 0.5):
        table[f"channel {int(sparsity * 100)} % (FFN)"] = {
            "pattern": "channel",
            "sparsity": sparsity,
        }
        table[f"channel {int(sparsity * 100)} % (FFN), {UNPADDED}"] = {
            "pattern": "channel",
            "sparsity": sparsity,
        }
    return table


def markdown(rows: list[Row], setup: dict[str, Any]) -> str:
    lines = [
        "# Sparsity benchmark (MiniLM)",
        "",
        f"Machine: {setup['machine']}; onnxruntime {setup['onnxruntime']}; batch {BATCH}, "
        f"sequence length 128; calibration {setup['calib']}; 256 held-out sentences.",
        "Latency: channel rows only (median of interleaved runs, candidate / fp32); "
        "unstructured and 2:4 zeros give no speedup on ONNX Runtime CPU/CUDA (2:4 pays only "
        "on TensorRT with Ampere+).",
        "",
        markdown_table(
            [
                "variant",
                "cosine mean / min",
                "weight sparsity",
                "gzip MB",
                "params M",
                "latency",
                "pass s",
            ],
            [
                [
                    row.variant,
                    f"{row.cosine_mean:.4f} / {row.cosine_min:.4f}",
                    f"{row.sparsity:.3f}",
                    f"{row.gzip_mb:.1f}",
                    f"{row.parameters_m:.2f}",
                    fmt(row.latency_ratio, ".2f", "n/a") + ("×" if row.latency_ratio else ""),
                    f"{row.pass_s:.1f}",
                ]
                for row in rows
            ],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/build/minilm.onnx"))
    parser.add_argument("--calib", type=Path, default=Path("models/build/calib64x128.npz"))
    parser.add_argument("--eval", type=Path, default=None, help="held-out .npz (else built)")
    parser.add_argument("--out-dir", type=Path, default=Path("models/build/bench_sparsify"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", nargs="*", default=None, help="variant labels to run")
    args = parser.parse_args(argv)
    folder: Path = args.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    evaluation_path = args.eval
    if evaluation_path is None:
        from models.export_minilm import make_minilm_evaluation

        evaluation_path = make_minilm_evaluation(folder / "minilm_eval.npz", 256, 128)
    evaluation = dict(np.load(evaluation_path))
    reference = model_embeddings(args.model, evaluation)
    from models.export_minilm import make_minilm_unpadded_calibration

    unpadded = make_minilm_unpadded_calibration(folder / "minilm_unpadded_512", 512)
    latency_feed = {k: v[:BATCH] for k, v in evaluation.items()}
    gzip_mb, parameters = file_stats(args.model)
    rows = [Row("fp32", 1.0, 1.0, 0.0, gzip_mb, parameters, 1.0, 0.0)]
    for label, options in variants().items():
        if args.only and label not in args.only:
            continue
        target = folder / f"minilm_{label.replace(' ', '_').replace('%', 'pc')}.onnx"
        calibration = unpadded if label.endswith(UNPADDED) else args.calib
        seconds, sparsity = run_variant(args.model, calibration, target, options)
        metrics = embedding_metrics(reference, model_embeddings(target, evaluation))
        latency = None
        if options.get("pattern") == "channel":
            latency = measure_latency(args.model, target, latency_feed, runs=args.runs).ratio
        gzip_mb, parameters = file_stats(target)
        row = Row(
            label,
            metrics["cosine_mean"],
            metrics["cosine_min"],
            sparsity,
            gzip_mb,
            parameters,
            latency,
            seconds,
        )
        rows.append(row)
        print(f"  {label:<28} cosine {row.cosine_mean:.4f} / {row.cosine_min:.4f}", flush=True)
    setup = {
        "machine": machine_summary(),
        "onnxruntime": ort.__version__,
        "calib": str(args.calib),
    }
    text = markdown(rows, setup)
    (folder / "sparsify_benchmark.md").write_text(text)
    (folder / "sparsify_benchmark.json").write_text(
        json.dumps({"setup": setup, "rows": [asdict(r) for r in rows]}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
