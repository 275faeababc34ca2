"""Exact passes never grow a model, and outputs never depend on the input's files (issue 15.3;
issue 16.1 for the self-contained external data)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt

from ..conftest import DIGITS_DATA, DIGITS_MODEL, assert_same_outputs, run_ort, sha256_of


def _value(name: str, shape: list[int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _nested_bodies_model() -> onnx.ModelProto:
    """A weight declared as a Constant node in an If branch and read by both branches of a
    nested If (the shape of silero-VAD's LSTM weights). graphsurgeon exports such a constant
    into every body that reads it."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    )

    def leaf(name: str, out: str) -> onnx.GraphProto:
        node = helper.make_node("MatMul", ["x", "Wc"], [out], name=f"{name}_mm")
        return helper.make_graph([node], name, [], [_value(out, [1, 64])])

    inner = helper.make_node(
        "If", ["c"], ["z"], then_branch=leaf("a", "ta"), else_branch=leaf("b", "tb"), name="inner"
    )
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["Wc"], value=weight, name="const"), inner],
        "branch",
        [],
        [_value("z", [1, 64])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o"], name="id")], "other", [], [_value("o", [1, 64])]
    )
    outer = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other, name="if")
    graph = helper.make_graph(
        [outer],
        "g",
        [_value("x", [1, 64]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [_value("y", [1, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_constant_read_in_nested_bodies_is_written_once(tmp_path: Path) -> None:
    source = tmp_path / "nested.onnx"
    onnx.save(_nested_bodies_model(), str(source))
    report = graphopt.optimize(source, tmp_path / "out.onnx", ["cleanup"], validate=False)
    assert report.output_bytes <= report.input_bytes  # was 2× (a copy per nested body)
    out = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(out, full_check=True)
    for flag in (True, False):
        feed = {"x": np.ones((1, 64), np.float32), "c": np.array(flag)}
        assert_same_outputs(source, tmp_path / "out.onnx", feed)


def test_cleanup_refuses_folds_that_duplicate_a_shared_weight(tmp_path: Path) -> None:
    """Before: Unsqueeze(W) in two bodies folded into two copies of W (each under the old
    1 MiB limit), so silero-VAD grew 1.42× through cleanup."""
    weight = numpy_helper.from_array(np.ones((128, 128), np.float32), "W")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")

    def body(name: str, out: str) -> onnx.GraphProto:
        nodes = [
            helper.make_node("Unsqueeze", ["W", "axes"], [f"{name}_w"], name=f"{name}_unsq"),
            helper.make_node("Add", ["x", f"{name}_w"], [out], name=f"{name}_add"),
        ]
        return helper.make_graph(nodes, name, [], [_value(out, [1, 128, 128])])

    node = helper.make_node(
        "If", ["c"], ["y"], then_branch=body("t", "ty"), else_branch=body("e", "ey"), name="if"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [_value("x", [1, 128, 128]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [_value("y", [1, 128, 128])],
        [weight, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source = tmp_path / "shared.onnx"
    onnx.save(model, str(source))
    report = graphopt.optimize(source, tmp_path / "out.onnx", ["cleanup"], validate=False)
    assert report.output_bytes <= report.input_bytes
    assert report.run.records[0].stats["fold_skipped"]["would-grow-model"] == 2


def test_external_data_outputs_are_self_contained(tmp_path: Path) -> None:
    """Issue 16.1 repro: every tensor external (size_threshold=0); the output is written into
    another folder and must load there, and still after the input's folder is gone."""
    source_dir = tmp_path / "in"
    source_dir.mkdir()
    source = source_dir / "ext.onnx"
    onnx.save_model(
        onnx.load(str(DIGITS_MODEL)),
        str(source),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    before = sha256_of(source_dir / "ext.onnx.data")
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    report = graphopt.optimize(source, out_dir / "out.onnx", ["cleanup"], data=str(DIGITS_DATA))
    assert report.validation is not None and report.validation.passed
    assert report.output_bytes <= report.input_bytes
    assert sha256_of(source_dir / "ext.onnx.data") == before
    with np.load(DIGITS_DATA) as archive:
        feed = {name: archive[name][:4] for name in archive.files}
    expected = run_ort(source, feed)
    for path in source_dir.iterdir():
        path.unlink()
    source_dir.rmdir()
    np.testing.assert_allclose(run_ort(out_dir / "out.onnx", feed)[0], expected[0])


def _installed(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / relative
    return path if path.exists() else None


def test_cleanup_does_not_grow_silero_vad(tmp_path: Path) -> None:
    """The real model the defect was seen on: 2.33 MB in, 3.31 MB out before."""
    source = _installed("silero_vad", "data/silero_vad.onnx")
    if source is None:
        pytest.skip("silero-vad is not installed (pip install --no-deps silero-vad==6.2.3)")
    report = graphopt.optimize(source, tmp_path / "vad.onnx", ["cleanup"])
    assert report.output_bytes <= report.input_bytes
    assert report.validation is not None and report.validation.passed
