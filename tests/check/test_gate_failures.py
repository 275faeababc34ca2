"""Comparisons that did not happen (or ran into NaN) never read as passing (issue 16, defect 5).

A candidate that does not load, fails at run time, lacks an output, outputs NaN, or ran on another
execution provider than the one asked for: the comparison, the JSON reports and JUnit XML show no
cosine or SNR for it, a status of "error" or "failed" and the reason.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphopt.check.validate as validate
from graphopt.check.gate import GateReport, run_gate
from graphopt.check.validate import Criteria, OutputComparison, compare_models
from graphopt.data.feeds import Feeds, input_specs, open_data
from graphopt.errors import InputError
from graphopt.ir.model import model_from_proto

from ..conftest import float_input, make_model, weight

_FIGURES = ("cosine", "snr_db", "worst_channel_cosine", "worst_channel_snr_db", "max_abs")


def _reference() -> onnx.ModelProto:
    """x[n, 4] → MatMul → y, and z = Abs(y): two outputs."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
            helper.make_node("Abs", ["y"], ["z"], name="abs"),
        ],
        [float_input("x", ["n", 4])],
        [float_input("y", ["n", 4]), float_input("z", ["n", 4])],
        [weight("W", (4, 4))],
    )


def _with_y(nodes: list[onnx.NodeProto], extra: list[onnx.TensorProto] = ()) -> onnx.ModelProto:  # type: ignore[assignment]
    """A candidate whose y comes from ``nodes`` (which read h = x·W); z = Abs(y) as in the
    reference."""
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            *nodes,
            helper.make_node("Abs", ["y"], ["z"], name="abs"),
        ],
        [float_input("x", ["n", 4])],
        [float_input("y", ["n", 4]), float_input("z", ["n", 4])],
        [weight("W", (4, 4)), *extra],
    )
    return model


def _unloadable() -> onnx.ModelProto:
    model = _with_y([helper.make_node("Frobnicate", ["h"], ["y"], domain="com.example")])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return model


def _fails_at_run_time() -> onnx.ModelProto:
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [3, 5])
    model = _with_y([helper.make_node("Reshape", ["h", "shape"], ["y"], name="reshape")], [shape])
    for output in model.graph.output:  # shapes ORT cannot check before it runs
        output.type.tensor_type.shape.dim[0].dim_param = "a"
        output.type.tensor_type.shape.dim[1].dim_param = "b"
    return model


def _missing_z() -> onnx.ModelProto:
    model = _reference()
    del model.graph.output[1]
    return model


def _all_nan() -> onnx.ModelProto:
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    return _with_y(
        [
            helper.make_node("Mul", ["h", "zero"], ["nothing"], name="mul"),
            helper.make_node("Div", ["nothing", "nothing"], ["y"], name="div"),  # 0 / 0
        ],
        [zero],
    )


def _some_nan() -> onnx.ModelProto:
    """y = h + 0·√h: exactly h where h ≥ 0, NaN where h < 0."""
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    return _with_y(
        [
            helper.make_node("Sqrt", ["h"], ["root"], name="sqrt"),
            helper.make_node("Mul", ["root", "zero"], ["nothing"], name="mul"),
            helper.make_node("Add", ["h", "nothing"], ["y"], name="add"),
        ],
        [zero],
    )


def _feeds(proto: onnx.ModelProto) -> Feeds:
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((8, 4)).astype(np.float32)} for _ in range(2)]
    return open_data(batches, input_specs(model_from_proto(proto).graph))


# (candidate, broken output, status, reason, whether the other output still passes); two
# batches of 8 samples: 64 elements per output, z = Abs(y) inherits y's NaN
CASES: dict[str, tuple[Callable[[], onnx.ModelProto], str, str, str, bool]] = {
    "unloadable": (_unloadable, "y", "error", "candidate does not load in onnxruntime", False),
    "run-time": (_fails_at_run_time, "y", "error", "candidate fails to run", False),
    "missing": (_missing_z, "z", "error", "output missing from the candidate", True),
    "all-nan": (_all_nan, "y", "failed", "64 NaN values the reference does not have", False),
    "some-nan": (_some_nan, "y", "failed", "NaN values the reference does not have", False),
}


def _row(rows: list[Any], output: str) -> Any:
    return next(
        row for row in rows if (row["output"] if isinstance(row, dict) else row.output) == output
    )


def _assert_not_compared(row: OutputComparison | dict[str, Any], status: str, reason: str) -> None:
    values = row if isinstance(row, dict) else vars(row)
    for name in _FIGURES:
        assert values[name] is None, f"{name} = {values[name]!r} for a comparison that failed"
    if not isinstance(row, dict):
        values = {"status": row.status, "reason": row.reason}
    assert values["status"] == status
    assert reason in values["reason"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_comparison_that_did_not_happen_is_not_a_pass(case: str, tmp_path: Path) -> None:
    build, broken, status, reason, other_passes = CASES[case]
    reference, candidate = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(_reference(), str(reference))
    onnx.save(build(), str(candidate))
    gate = run_gate(
        reference, candidate, _feeds(_reference()), providers=["cpu"], criteria=Criteria()
    )
    validation = gate.validation
    assert not validation.passed and not gate.passed

    comparison = _row(validation.comparisons, broken)
    _assert_not_compared(comparison, status, reason)
    assert not comparison.passed
    other = _row(validation.comparisons, "z" if broken == "y" else "y")
    assert other.passed is other_passes

    for report in (validation.to_dict(), gate.to_dict()["validation"]):
        _assert_not_compared(_row(report["comparisons"], broken), status, reason)
    json.dumps(gate.to_dict(), allow_nan=False)  # strict JSON: no NaN or Infinity

    _assert_junit(gate, broken, status, reason)


def _assert_junit(gate: GateReport, broken: str, status: str, reason: str) -> None:
    root = ElementTree.fromstring(gate.to_junit())
    suite = root.find("testsuite")
    assert suite is not None
    cases = list(suite.iter("testcase"))
    failures = [c for c in cases if c.find("failure") is not None]
    errors = [c for c in cases if c.find("error") is not None]
    for element in (root, suite):
        assert element.get("tests") == str(len(cases))
        assert element.get("failures") == str(len(failures))
        assert element.get("errors") == str(len(errors))
    mine = [c for c in cases if c.get("classname") == f"graphopt.check.cpu.{broken}"]
    assert mine, "the broken output has no test case"
    assert all(c in failures or c in errors for c in mine), "a broken output shows a passed case"
    flagged = errors if status == "error" else failures
    assert any(c in flagged for c in mine)
    kind = "error" if status == "error" else "failure"
    messages = [c.find(kind).get("message", "") for c in mine if c.find(kind) is not None]  # type: ignore[union-attr]
    assert any(reason in message for message in messages)


def test_latency_not_measured_is_a_junit_error(tmp_path: Path) -> None:
    reference, candidate = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save(_reference(), str(reference))
    onnx.save(_unloadable(), str(candidate))
    gate = run_gate(
        reference,
        candidate,
        _feeds(_reference()),
        providers=["cpu"],
        criteria=Criteria(),
        max_latency_ratio=2.0,
    )
    (latency,) = gate.model_checks
    assert latency.error and not latency.passed
    suite = ElementTree.fromstring(gate.to_junit()).find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "0", "3")
    case = next(c for c in suite.iter("testcase") if c.get("name") == "latency_ratio")
    assert case.find("error") is not None


def test_some_nan_keeps_the_finite_figures_as_detail_only() -> None:
    reference = _reference()
    report = compare_models(reference, _some_nan(), _feeds(reference))
    row = _row(report.comparisons, "y")
    finite = next(check for check in row.checks if check.criterion == "finite")
    assert not finite.passed and finite.message.endswith("NaN values the reference does not have")
    assert "finite positions" in finite.detail and "cosine 1.000000" in finite.detail
    assert [check.criterion for check in row.checks] == ["finite"]  # no cosine or SNR pass


def test_nan_at_other_positions_than_the_reference_fails() -> None:
    """Counting NaN on each side is not enough: the candidate's NaN must sit where the
    reference's are."""
    reference = make_model(
        [helper.make_node("Sqrt", ["x"], ["y"], name="sqrt")],
        [float_input("x", ["n", 4])],
        [float_input("y", ["n", 4])],
    )
    candidate = make_model(
        [
            helper.make_node("Neg", ["x"], ["m"], name="neg"),
            helper.make_node("Sqrt", ["m"], ["y"], name="sqrt"),
        ],
        [float_input("x", ["n", 4])],
        [float_input("y", ["n", 4])],
    )
    batch = {"x": np.array([[1, -1, 4, -4]] * 2, np.float32)}
    feeds = open_data([batch], input_specs(model_from_proto(reference).graph))
    report = compare_models(
        reference, candidate, feeds, criteria=Criteria(min_cosine=-1, min_snr_db=-1e9)
    )
    row = report.comparisons[0]
    assert row.nan_candidate == row.nan_reference == 4
    assert not report.passed
    assert row.status == "failed" and "4 NaN values the reference does not have" in row.reason


def test_string_outputs_that_differ_fail_in_a_lossy_check() -> None:
    def model(value: str) -> onnx.ModelProto:
        text = helper.make_tensor("text", TensorProto.STRING, [1], [value.encode()])
        return make_model(
            [
                helper.make_node("Identity", ["x"], ["y"], name="id"),
                helper.make_node("Constant", [], ["label"], value=text, name="const"),
            ],
            [float_input("x", ["n", 4])],
            [
                float_input("y", ["n", 4]),
                helper.make_tensor_value_info("label", TensorProto.STRING, [1]),
            ],
        )

    report = compare_models(model("cat"), model("dog"), _feeds(model("cat")))
    label = _row(report.comparisons, "label")
    assert label.status == "failed" and "elements differ" in label.reason and label.cosine is None
    assert label.agreement.score == -1.0  # search code reads it as the worst
    same = _row(
        compare_models(model("cat"), model("cat"), _feeds(model("cat"))).comparisons, "label"
    )
    assert same.passed and same.agreement.score == 1.0


class _ClaimsCuda:
    """A CPU session that says it runs on CUDA, standing in for a real CUDA session."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _sessions(monkeypatch: pytest.MonkeyPatch, claims_cuda: Callable[[Any], bool]) -> None:
    """make_session builds CPU sessions (this machine has no GPU), ``claims_cuda(model)`` says
    which ones pretend to run on CUDA."""
    real = validate.make_session

    def fake(model: Any, provider: str = "cpu", **options: Any) -> Any:
        session = real(model, "cpu", **options)
        return _ClaimsCuda(session) if claims_cuda(model) else session

    monkeypatch.setattr(validate, "make_session", fake)
    monkeypatch.setattr(validate, "node_placement", lambda *args, **kwargs: {})


@pytest.mark.parametrize("fallback", ["candidate", "reference"])
def test_cuda_requested_but_session_runs_on_cpu_is_an_error(
    fallback: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference, candidate = _reference(), _reference()
    falls_back = candidate if fallback == "candidate" else reference
    _sessions(monkeypatch, lambda model: model is not falls_back)
    report = compare_models(reference, candidate, _feeds(reference), providers=["cuda"])
    assert not report.passed
    assert [row.output for row in report.comparisons] == ["y", "z"]
    for row in report.comparisons:
        assert row.provider == "cuda" and row.agreement.score == -1.0
        _assert_not_compared(
            row,
            "error",
            f"CUDAExecutionProvider requested but the {fallback} session runs on "
            "CPUExecutionProvider only",
        )


def test_cuda_session_that_has_cuda_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _reference()
    _sessions(monkeypatch, lambda model: True)
    report = compare_models(reference, _reference(), _feeds(reference), providers=["cuda"])
    assert report.passed and all(row.status == "passed" for row in report.comparisons)
    assert all(row.cosine == pytest.approx(1.0) for row in report.comparisons)


def test_reference_outputs_go_under_tmp_dir(tmp_path: Path) -> None:
    reference = _reference()
    seen: list[list[str]] = []

    def look(_: int) -> None:
        seen.append([p.name for p in tmp_path.iterdir() if p.name.startswith("graphopt-validate-")])

    report = compare_models(
        reference, reference, _feeds(reference), tmp_dir=tmp_path, on_batch=look
    )
    assert report.passed
    assert len(seen) == 2 and all(len(names) == 1 for names in seen)
    assert not list(tmp_path.iterdir())  # removed afterwards


def test_tmp_dir_defaults_to_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(validate.tempfile, "tempdir", None)  # forget the cached choice
    reference = _reference()
    seen: list[bool] = []
    compare_models(
        reference,
        reference,
        _feeds(reference),
        on_batch=lambda _: seen.append(any(tmp_path.glob("graphopt-validate-*"))),
    )
    assert seen and all(seen)
    assert os.environ["TMPDIR"] == str(tmp_path)


def test_gate_passes_tmp_dir_on(tmp_path: Path) -> None:
    model = tmp_path / "ref.onnx"
    onnx.save(_reference(), str(model))
    missing = tmp_path / "no-such-folder"
    with pytest.raises(InputError, match="no-such-folder"):
        run_gate(
            model,
            model,
            _feeds(_reference()),
            providers=["cpu"],
            criteria=Criteria(),
            tmp_dir=missing,
        )
