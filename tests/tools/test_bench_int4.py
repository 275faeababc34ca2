"""tools/bench_int4.py on a tiny generated model: counts, rows that fail, and one end-to-end run.

The model is two 256×256 MatMuls over 16 positions (1 M MACs per sample, above quant's
``min_macs``) followed by a mean over the positions, so its output is one embedding per sample
like MiniLM's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from tools import bench_int4 as bench

from ..conftest import float_input, make_model, weight

WIDTH, POSITIONS = 256, 16


def _tiny_model(path: Path) -> Path:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["o"], name="mm2"),
        helper.make_node("Transpose", ["o"], ["o_t"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["o", "o_t"], ["scores"], name="act_mm"),
        helper.make_node("ReduceMean", ["o"], ["y"], name="mean", axes=[1], keepdims=0),
    ]
    model = make_model(
        nodes,
        [float_input("x", ["batch", POSITIONS, WIDTH])],
        [float_input("y", ["batch", WIDTH]), float_input("scores", ["batch", 16, 16])],
        [weight("W1", (WIDTH, WIDTH), 1), weight("W2", (WIDTH, WIDTH), 2)],
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _data(path: Path, count: int, seed: int) -> Path:
    values = np.random.default_rng(seed).standard_normal((count, POSITIONS, WIDTH))
    np.savez(path, x=values.astype(np.float32))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    return {
        "model": _tiny_model(tmp_path / "tiny.onnx"),
        "calibration": _data(tmp_path / "calib.npz", 16, 3),
        "evaluation": _data(tmp_path / "eval.npz", 12, 4),
    }


def test_count_matmuls_counts_constant_weights_only(tiny: dict[str, Path]) -> None:
    # act_mm multiplies two activations: not a weighted MatMul.
    assert bench.count_matmuls(tiny["model"]) == (0, 2)


def test_graphopt_build_writes_every_weighted_matmul_as_matmulnbits(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    target = tmp_path / "int4.onnx"
    options = bench.GRAPHOPT_VARIANTS["graphopt-nearest-b32"]
    bench.build_graphopt(str(tiny["model"]), str(target), str(tiny["calibration"]), options)
    assert bench.count_matmuls(target) == (2, 0)


def test_variant_table_and_selection() -> None:
    assert bench.VARIANTS["ort-gptq-b128"] == bench.Variant(
        "ort", {"algorithm": "gptq", "block_size": 128}
    )
    assert bench.VARIANTS["graphopt-nearest-b128"].options["block_size"] == 128
    assert next(iter(bench.VARIANTS)) == "fp32"
    assert bench.parse_variants("graphopt-nearest-b32, ort-hqq-b32") == [
        "fp32",
        "graphopt-nearest-b32",
        "ort-hqq-b32",
    ]
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        bench.parse_variants("graphopt-nearest-b32,nope")


def test_same_embeddings_needs_every_sentence_to_match() -> None:
    rng = np.random.default_rng(0)
    first = rng.standard_normal((8, 16))
    assert bench.same_embeddings(first, first * 1.0001 + 1e-6)
    changed = first.copy()
    changed[3] += 0.05 * rng.standard_normal(16)  # one sentence moves: cosine ≈ 0.999
    assert not bench.same_embeddings(first, changed)


def test_end_to_end_rows_failures_and_reports(tiny: dict[str, Path], tmp_path: Path) -> None:
    table = {
        "fp32": bench.Variant("fp32"),
        "ort-default-b32": bench.VARIANTS["ort-default-b32"],
        "graphopt-nearest-b32": bench.VARIANTS["graphopt-nearest-b32"],
        "ort-rtn-b32": bench.VARIANTS["ort-rtn-b32"],
        "graphopt-unknown": bench.Variant(
            "graphopt", {"weight_bits": 4, "method": "not-an-option"}
        ),
        "ort-bad": bench.Variant("ort", {"algorithm": "nope", "block_size": 32}),
    }
    out = tmp_path / "out"
    rows = bench.run_benchmark(
        tiny["model"],
        tiny["calibration"],
        tiny["evaluation"],
        out,
        list(table),
        latency_runs=2,
        table=table,
    )
    by_name = {row.name: row for row in rows}
    assert [row.name for row in rows] == list(table)
    assert by_name["fp32"].size_ratio == 1.0 and by_name["fp32"].weighted_matmuls == 2
    for name in ("ort-default-b32", "graphopt-nearest-b32"):
        row = by_name[name]
        assert row.ok, row.outcome
        assert (row.int4_matmuls, row.weighted_matmuls) == (2, 2)
        assert 0.125 < row.size_ratio < 0.2  # 4 of 32 bits, plus one scale per block of 32
        assert 0.9 < row.cosine_min <= row.cosine_mean < 1.0
        assert set(row.latency_ratio) == {"batch 1", "batch 8"}
        assert row.build_s is not None and row.build_s > 0
    # ORT's RTN config computes its default config's model; graphopt's symmetric blocks differ.
    assert by_name["ort-rtn-b32"].same_as == "ort-default-b32"
    assert by_name["graphopt-nearest-b32"].same_as == ""
    unknown = by_name["graphopt-unknown"]
    assert unknown.outcome.startswith("OptionError: pass 'quant' has no option 'method'")
    assert unknown.cosine_mean is None and not unknown.latency_ratio
    assert "ValueError: unknown ONNX Runtime algorithm 'nope'" in by_name["ort-bad"].outcome
    assert (out / "logs" / "graphopt-unknown.log").exists()

    setup = {"command": "test", "machine": "test machine", "calibration": "c", "evaluation": "e"}
    text = bench.write_reports(rows, {**setup, "latency_runs": 2}, out, tmp_path / "report")
    assert (tmp_path / "report" / "INT4_BENCHMARK.md").read_text() == text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert "| **graphopt-unknown** | **failed**: OptionError: pass 'quant' has no option" in text
    assert any(line.startswith("| ort-default-b32 | ok | 2/2 |") for line in lines)
    assert "| ort-rtn-b32 | ok (same embeddings as ort-default-b32) | 2/2 |" in text
    payload = json.loads((out / "int4_benchmark.json").read_text())
    assert [row["name"] for row in payload["rows"]] == list(table)
    assert payload["rows"][2]["latency_ratio"]["batch 8"] > 0
