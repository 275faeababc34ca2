"""``graphopt check`` as a CI gate, per-tensor localization, bisection, latency and placement."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.check.latency import measure_latency
from graphopt.check.localize import compare_tensors, first_divergence
from graphopt.check.validate import Criteria
from graphopt.data.feeds import synthesize
from graphopt.ir.model import model_from_proto
from graphopt.ir.normalize import normalize
from graphopt.ir.ort import node_placement

from ..conftest import DIGITS_DATA, DIGITS_MODEL, float_input, make_model, run_cli, weight


def _chain(depth: int = 6) -> onnx.ModelProto:
    """x → (MatMul → Tanh) × depth → y, every weight 16×16."""
    nodes, weights, previous = [], [], "x"
    for index in range(depth):
        output = "y" if index == depth - 1 else f"a{index}"
        nodes.append(
            helper.make_node("MatMul", [previous, f"W{index}"], [f"h{index}"], name=f"mm{index}")
        )
        nodes.append(helper.make_node("Tanh", [f"h{index}"], [output], name=f"act{index}"))
        weights.append(weight(f"W{index}", (16, 16), index))
        previous = output
    return make_model(nodes, [float_input("x", ["n", 16])], [float_input("y", ["n", 16])], weights)


def _broken_in_the_middle(proto: onnx.ModelProto, index: int) -> onnx.ModelProto:
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    for tensor in broken.graph.initializer:
        if tensor.name == f"W{index}":
            values = numpy_helper.to_array(tensor)
            noise = np.random.default_rng(7).standard_normal(values.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values + noise, tensor.name))
    return broken


def _feeds(proto: onnx.ModelProto):  # type: ignore[no-untyped-def]
    model = model_from_proto(proto)
    normalize(model)
    return synthesize(model.graph, samples=16, batch_size=8)


def test_per_tensor_points_at_the_first_broken_tensor() -> None:
    reference = _chain()
    rows = compare_tensors(
        reference,
        _broken_in_the_middle(reference, 3),
        _feeds(reference),
        criteria=Criteria(min_snr_db=30),
    )
    assert [row.name for row in rows][:4] == ["h0", "a0", "h1", "a1"]
    first = first_divergence(rows)
    assert first is not None and first.name == "h3" and first.op == "MatMul"
    assert all(row.passed for row in rows[: rows.index(first)])


def test_per_tensor_with_external_data_leaves_no_files(tmp_path: Path) -> None:
    reference = _chain()
    path = tmp_path / "ref.onnx"
    onnx.save_model(
        reference, str(path), save_as_external_data=True, location="ref.data", size_threshold=0
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    rows = compare_tensors(path, path, _feeds(reference))
    assert rows and all(row.passed for row in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_check_identical_models_pass_with_size_and_latency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junit, report = tmp_path / "check.xml", tmp_path / "check.json"
    code, stdout, _ = run_cli(
        [
            "check",
            str(DIGITS_MODEL),
            str(DIGITS_MODEL),
            "--data",
            str(DIGITS_DATA),
            "--max-size-ratio",
            "1.0",
            "--max-latency-ratio",
            "5",
            "--latency-runs",
            "5",
            "--junit",
            str(junit),
            "--json",
            str(report),
        ],
        capsys,
    )
    assert code == 0, stdout
    assert "check: PASSED" in stdout
    data = json.loads(report.read_text())
    assert data["passed"] and data["size_ratio"] == 1.0 and data["latency"]["runs"] == 5
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    names = {(c.get("classname"), c.get("name")) for c in suite.iter("testcase")}
    assert ("graphopt.check.cpu.logits", "cosine") in names
    assert ("graphopt.check.model", "latency_ratio") in names


def test_check_broken_candidate_fails_with_junit_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference = tmp_path / "ref.onnx"
    candidate = tmp_path / "cand.onnx"
    onnx.save(_chain(), str(reference))
    onnx.save(_broken_in_the_middle(_chain(), 2), str(candidate))
    junit = tmp_path / "check.xml"
    code, stdout, _ = run_cli(
        ["check", str(reference), str(candidate), "--junit", str(junit), "--per-tensor"], capsys
    )
    assert code == 1
    assert "check: FAILED" in stdout
    assert "error starts at 'h2'" in stdout
    failures = [
        c
        for c in ElementTree.parse(junit).getroot().iter("testcase")
        if c.find("failure") is not None
    ]
    assert {c.get("name") for c in failures} >= {"cosine", "snr"}
    assert all(c.get("classname") == "graphopt.check.cpu.y" for c in failures)


def test_check_flags_nan_candidates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference, candidate = tmp_path / "ref.onnx", tmp_path / "nan.onnx"
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Sqrt", ["h"], ["y"], name="sqrt"),
    ]
    good = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Abs", ["h"], ["y"], name="abs"),
        ],
        [float_input("x", ["n", 4])],
        [float_input("y", ["n", 4])],
        [weight("W", (4, 4))],
    )
    bad = make_model(
        nodes, [float_input("x", ["n", 4])], [float_input("y", ["n", 4])], [weight("W", (4, 4))]
    )
    onnx.save(good, str(reference))
    onnx.save(bad, str(candidate))
    code, stdout, _ = run_cli(
        ["check", str(reference), str(candidate), "--min-cosine", "-1", "--min-snr", "-1000"],
        capsys,
    )
    assert code == 1
    assert "NaN values the reference does not have" in stdout


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--providers", "cpu,cuda"], "execution provider 'cuda' is not available"),
        (["--exact", "--min-cosine", "0.9"], "--exact cannot be combined"),
        (["--json", "/no/such/folder/r.json"], "does not exist"),
    ],
)
def test_check_usage_errors(
    extra: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    if "cuda" in extra[-1] and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    code, _, stderr = run_cli(["check", str(DIGITS_MODEL), str(DIGITS_MODEL), *extra], capsys)
    assert code == 2
    assert expected in stderr and len(stderr.strip().splitlines()) == 1


def test_check_rejects_non_onnx_candidate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    code, _, stderr = run_cli(["check", str(DIGITS_MODEL), str(junk)], capsys)
    assert code == 2 and "not" in stderr


def test_bisect_finds_the_pass_and_the_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], installed_plugin: str
) -> None:
    source = tmp_path / "chain.onnx"
    onnx.save(_chain(), str(source))
    report = tmp_path / "report.json"
    code, stdout, _ = run_cli(
        [
            "optimize",
            str(source),
            str(tmp_path / "out.onnx"),
            "--passes",
            "noise,cleanup",
            "-o",
            "noise.scale=0.0005",
            "-o",
            "noise.loud=mm4",
            "--min-snr",
            "35",  # worst channel SNR: quiet noise alone 38.3 dB, with loud mm4 31.6 dB
            "--bisect",
            "--report",
            str(report),
        ],
        capsys,
    )
    assert code == 1, stdout
    assert (
        "bisect: first failing pass 'noise' (after [cleanup]); first harmful node 'mm4'" in stdout
    )
    data = json.loads(report.read_text())
    assert data["bisect"]["culprit_node"] == "mm4" and data["bisect"]["touched_nodes"] == 6


def test_latency_is_measured_side_by_side() -> None:
    feed = {"image": np.load(DIGITS_DATA)["image"][:8]}
    result = measure_latency(DIGITS_MODEL, DIGITS_MODEL, feed, runs=6, warmup=1)
    assert result.runs == 6 and result.reference_ms > 0 and result.candidate_ms > 0
    assert 0.2 < result.ratio < 5


def test_node_placement_reports_providers() -> None:
    feed = {"image": np.zeros((1, 1, 8, 8), np.float32)}
    placement = node_placement(DIGITS_MODEL, "cpu", feed)
    assert list(placement) == ["CPUExecutionProvider"]
    assert placement["CPUExecutionProvider"]


def test_check_unloadable_candidate_is_an_error_not_a_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16: an output that was not compared has no figures and is a JUnit <error>."""
    reference, candidate = tmp_path / "ref.onnx", tmp_path / "custom.onnx"
    onnx.save(_chain(2), str(reference))
    custom = _chain(2)
    custom.graph.node[-1].op_type, custom.graph.node[-1].domain = "Frobnicate", "com.example"
    custom.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(custom, str(candidate))
    junit, report = tmp_path / "check.xml", tmp_path / "check.json"
    code, stdout, _ = run_cli(
        ["check", str(reference), str(candidate), "--junit", str(junit), "--json", str(report)],
        capsys,
    )
    assert code == 1 and "check: FAILED" in stdout
    (row,) = json.loads(report.read_text())["validation"]["comparisons"]
    assert row["status"] == "error" and "does not load in onnxruntime" in row["reason"]
    assert row["cosine"] is None and row["snr_db"] is None
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "0", "1")
    (case,) = suite.iter("testcase")
    error = case.find("error")
    assert error is not None and "does not load in onnxruntime" in error.get("message", "")


def test_check_per_tensor_with_nan_candidate_does_not_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reference, candidate = tmp_path / "ref.onnx", tmp_path / "nan.onnx"
    onnx.save(_chain(2), str(reference))
    nan = _chain(2)
    nan.graph.node[1].op_type = "Sqrt"  # NaN where the first MatMul is negative
    onnx.save(nan, str(candidate))
    code, stdout, _ = run_cli(["check", str(reference), str(candidate), "--per-tensor"], capsys)
    assert code == 1, stdout
    assert "NaN values the reference does not have" in stdout
    assert "error starts at 'a0'" in stdout
