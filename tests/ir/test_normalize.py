"""Normalization is exact and puts weights where passes expect them, whatever the exporter did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir.model import load_model, model_from_proto, save_model
from graphopt.ir.normalize import normalize

from ..conftest import assert_same_outputs, float_input, make_model, run_ort, weight

BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _round_trip(
    proto: onnx.ModelProto, tmp_path: Path, **kwargs: object
) -> tuple[Path, Path, object]:
    source = tmp_path / "in.onnx"
    onnx.save(proto, str(source))
    model = load_model(source)
    stats = normalize(model, **kwargs)  # type: ignore[arg-type]
    out = tmp_path / "out.onnx"
    save_model(model, out)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return source, out, stats


def _weight_consumers(path: Path) -> dict[str, bool]:
    """For each MatMul/Gemm/Conv: whether its weight input is an initializer."""
    proto = onnx.load(str(path))
    initializers = {t.name for t in proto.graph.initializer}
    return {
        node.name: node.input[1] in initializers
        for node in proto.graph.node
        if node.op_type in ("MatMul", "Gemm", "Conv")
    }


def test_constant_node_weights_become_initializers(tmp_path: Path) -> None:
    """Paddle / tf2onnx style: weights live in Constant nodes."""
    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
        helper.make_node("Constant", [], ["bias"], value_floats=[0.5, -1.0, 2.0]),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "bias"], ["y"], name="add"),
    ]
    proto = make_model(nodes, [float_input("x", ["n", 4])], [float_input("y", ["n", 3])])
    source, out, stats = _round_trip(proto, tmp_path)
    assert stats.constant_nodes == 2
    assert _weight_consumers(out) == {"mm": True}
    assert not [n for n in onnx.load(str(out)).graph.node if n.op_type == "Constant"]
    assert_same_outputs(source, out, {"x": np.ones((2, 4), np.float32)})


def test_constant_node_graph_output_stays(tmp_path: Path) -> None:
    nodes = [helper.make_node("Constant", [], ["c"], value_float=3.0)]
    proto = make_model(nodes, [float_input("x", [1])], [float_input("c", [])])
    _, out, stats = _round_trip(proto, tmp_path)
    assert stats.constant_nodes == 0
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Constant"]


def test_caffe2_style_inputs_and_constant_of_shape(tmp_path: Path) -> None:
    """IR 3: initializers listed as inputs; a weight built by ConstantOfShape."""
    w = weight("W", (3, 4), 1)
    shape = numpy_helper.from_array(np.array([4], dtype=np.int64), "bias_shape")
    nodes = [
        helper.make_node(
            "ConstantOfShape",
            ["bias_shape"],
            ["bias"],
            value=numpy_helper.from_array(np.array([0.25], np.float32)),
        ),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "bias"], ["y"], name="add"),
    ]
    inputs = [
        float_input("x", [2, 3]),
        helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 4]),
        helper.make_tensor_value_info("bias_shape", TensorProto.INT64, [1]),
    ]
    proto = make_model(nodes, inputs, [float_input("y", [2, 4])], [w, shape], opset=9, ir_version=3)
    source, out, stats = _round_trip(proto, tmp_path)
    assert stats.initializer_inputs == 2
    assert stats.nodes_folded == 1
    saved = onnx.load(str(out))
    assert [i.name for i in saved.graph.input] == ["x"]
    assert saved.ir_version >= 4
    assert [n.op_type for n in saved.graph.node] == ["MatMul", "Add"]
    assert_same_outputs(source, out, {"x": np.ones((2, 3), np.float32)})


def test_identity_shared_initializer_stays_shared(tmp_path: Path) -> None:
    """torch ties weights through Identity: both MatMuls must read one initializer."""
    nodes = [
        helper.make_node("Identity", ["W"], ["W_tied"], name="tie"),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "W_tied"], ["y"], name="mm2"),
    ]
    proto = make_model(
        nodes, [float_input("x", ["n", 4])], [float_input("y", ["n", 4])], [weight("W", (4, 4))]
    )
    source, out, stats = _round_trip(proto, tmp_path)
    assert stats.identities_bypassed == 1
    saved = onnx.load(str(out))
    assert [t.name for t in saved.graph.initializer] == ["W"]
    assert [n.input[1] for n in saved.graph.node] == ["W", "W"]
    assert_same_outputs(source, out, {"x": np.ones((3, 4), np.float32)})


def test_transpose_of_shared_weight_is_not_duplicated_when_large(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], name="t"),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "Wt"], ["y"], name="mm2"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", ["n", 64])],
        [float_input("y", ["n", 64])],
        [weight("W", (64, 64))],
    )
    source, out, stats = _round_trip(proto, tmp_path, max_growth_bytes=1024)
    assert stats.skipped == {"would-grow-model": 1}
    assert [n.op_type for n in onnx.load(str(out)).graph.node] == ["Transpose", "MatMul", "MatMul"]
    # A pass that edits weights gets the transposed weight as a constant.
    source, out, stats = _round_trip(
        proto, tmp_path, max_growth_bytes=1024, materialize_weights=True
    )
    assert _weight_consumers(out) == {"mm1": True, "mm2": True}
    assert_same_outputs(source, out, {"x": np.ones((2, 64), np.float32)})


def test_dynamic_axes_keep_symbolic_shapes() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["y"], name="relu"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", ["batch", "seq", 4])],
        [float_input("y", ["batch", "seq", 4])],
        [weight("W", (4, 4))],
    )
    model = model_from_proto(proto)
    normalize(model)
    hidden = model.graph.tensors()["h"]
    assert hidden.dtype == np.float32
    assert list(hidden.shape) == ["batch", "seq", 4]


def test_shape_inference_failure_is_not_fatal() -> None:
    nodes = [helper.make_node("CustomOp", ["x"], ["y"], domain="com.example", name="custom")]
    proto = make_model(nodes, [float_input("x", [2])], [float_input("y", [2])])
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    model = model_from_proto(proto)
    normalize(model)  # must not raise
    assert isinstance(model.graph.nodes[0], gs.Node)


# --- real exporters --------------------------------------------------------------------------


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_torch_exports_normalize_exactly(tmp_path: Path, exporter: str) -> None:
    pytest.importorskip("torch")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    from models.torch_samples import export_tiny, tiny_inputs

    source = export_tiny(tmp_path / f"tiny_{exporter}.onnx", exporter)  # type: ignore[arg-type]
    model = load_model(source)
    normalize(model, materialize_weights=True)
    out = tmp_path / "normalized.onnx"
    save_model(model, out)
    feed = tiny_inputs(batch=3)
    assert_same_outputs(source, out, feed)
    saved = onnx.load(str(out), load_external_data=False)
    initializers = {t.name for t in saved.graph.initializer}
    for node in saved.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert node.input[1] in initializers, f"{node.name} weight is not a constant"
    assert not [
        n
        for n in saved.graph.node
        if n.op_type == "Constant" and n.output[0] not in {o.name for o in saved.graph.output}
    ]


# --- the ONNX package's own backend test models ---------------------------------------------


def _backend_cases() -> list[Path]:
    cases = []
    for folder in ("simple", "pytorch-converted", "pytorch-operator"):
        cases.extend(sorted(p for p in (BACKEND_DATA / folder).iterdir() if p.is_dir()))
    cases.extend(sorted((BACKEND_DATA / "light").glob("*.onnx")))
    return cases


def _backend_feed(case: Path, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    data_dir = case / "test_data_set_0"
    if case.is_dir() and data_dir.is_dir():
        feed = {}
        for index, name in enumerate(names):
            tensor = onnx.TensorProto()
            tensor.ParseFromString((data_dir / f"input_{index}.pb").read_bytes())
            feed[name] = numpy_helper.to_array(tensor)
        return feed
    from graphopt.data.feeds import synthesize

    model = model_from_proto(proto)
    normalize(model)
    return next(iter(synthesize(model.graph, samples=1, batch_size=1)))


@pytest.mark.parametrize("case", _backend_cases(), ids=lambda p: p.stem if p.is_file() else p.name)
def test_backend_models_round_trip(case: Path, tmp_path: Path) -> None:
    model_path = case / "model.onnx" if case.is_dir() else case
    proto = onnx.load(str(model_path))
    try:
        feed = _backend_feed(case, proto)
        run_ort(proto, feed)
    except Exception as error:  # the model or its data is outside what ORT runs
        pytest.skip(f"onnxruntime cannot run the original: {str(error).splitlines()[0][:120]}")
    model = load_model(model_path)
    normalize(model)
    out = tmp_path / "out.onnx"
    save_model(model, out)
    assert_same_outputs(model_path, out, feed)


def _if_model_with_unnamed_nodes() -> onnx.ModelProto:
    """Unnamed MatMuls in the main graph and in both If branches, plus a duplicated name."""
    branch_weight = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "Wb")
    then_body = helper.make_graph(
        [helper.make_node("MatMul", ["h", "Wb"], ["t"])],
        "then",
        [],
        [float_input("t", [2, 4])],
        [branch_weight],
    )
    else_body = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"], name="dup")], "else", [], [float_input("e", [2, 4])]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"], name="dup"),
        helper.make_node("ReduceSum", ["r"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_body, else_branch=else_body),
    ]
    return make_model(
        nodes,
        [float_input("x", [2, 4])],
        [float_input("y", [2, 4])],
        [weight("W", (4, 4), 3), numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )


def test_every_node_gets_a_unique_stable_name_that_saving_leaves_out(tmp_path: Path) -> None:
    """Issue 15.7: one identity per node for every pass; exporter names kept; the names
    normalization gave are not written to the output (an exact pass never grows the file)."""
    proto = _if_model_with_unnamed_nodes()
    names = []
    for _ in range(2):
        model = model_from_proto(proto)
        stats = normalize(model)
        graphs = [model.graph, *model.graph.subgraphs(recursive=True)]
        names.append([node.name for graph in graphs for node in graph.nodes])
    assert names[0] == names[1]  # stable
    assert len(set(names[0])) == len(names[0])  # unique across the main graph and bodies
    assert {"MatMul_0", "MatMul_1", "dup", "dup_1", "If_0"} <= set(names[0])
    assert stats.nodes_named == 6  # five unnamed nodes and one duplicate
    out = save_model(model, tmp_path / "out.onnx")
    saved = onnx.load(str(out))
    written = [n.name for n in saved.graph.node]
    written += [n.name for n in saved.graph.node[-1].attribute[0].g.node]
    written += [n.name for n in saved.graph.node[-1].attribute[1].g.node]
    assert sorted(written) == sorted(["", "dup", "", "", "", "", "dup"])  # as exported
    feed = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    assert_same_outputs(proto, out, feed)
