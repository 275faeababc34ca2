"""``quant`` rule 15: integer chains through SiLU, Concat and MaxPool between quantized Convs,
and rule 11's small nodes that join an integer region."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

import graphopt

from ..conftest import float_input, make_model


def _conv(name: str, source: str, out: str, channels_in: int, channels_out: int, seed: int):  # type: ignore[no-untyped-def]
    weights = np.random.default_rng(seed).standard_normal((channels_out, channels_in, 3, 3))
    initializer = numpy_helper.from_array(
        (weights / np.sqrt(9 * channels_in)).astype(np.float32), f"{name}_w"
    )
    node = helper.make_node("Conv", [source, f"{name}_w"], [out], name=name, pads=[1, 1, 1, 1])
    return node, initializer


def _silu(name: str, source: str, out: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("Sigmoid", [source], [f"{name}_sig"], name=f"{name}_sigmoid"),
        helper.make_node("Mul", [source, f"{name}_sig"], [out], name=f"{name}_mul"),
    ]


def _yolo_like() -> onnx.ModelProto:
    """Conv → SiLU → [Conv → SiLU, MaxPool] → Concat → Conv (large) → small Conv → Sigmoid out:
    a neck the integer chain should cover, and a decode tail it must leave float."""
    nodes, initializers = [], []
    for name, source, out, cin, cout, seed in (
        ("c1", "x", "c1_out", 3, 32, 1),
        ("c2", "s1", "c2_out", 32, 32, 2),
        ("c3", "cat", "c3_out", 64, 32, 3),
        ("c4", "s3", "c4_out", 32, 2, 4),  # small: 2 output channels
    ):
        conv, weight = _conv(name, source, out, cin, cout, seed)
        nodes.append(conv)
        initializers.append(weight)
    nodes += _silu("a1", "c1_out", "s1")
    nodes += _silu("a2", "c2_out", "s2")
    nodes.append(
        helper.make_node(
            "MaxPool", ["s1"], ["pool"], name="pool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        )
    )
    nodes.append(helper.make_node("Concat", ["s2", "pool"], ["cat"], name="concat", axis=1))
    nodes += _silu("a3", "c3_out", "s3")
    nodes.append(helper.make_node("Sigmoid", ["c4_out"], ["y"], name="scores"))
    # a C2f-style chunk reads its input's shape: Shape must not keep a2_mul out of the chain
    nodes.append(helper.make_node("Shape", ["s2"], ["s2_shape"], name="s2_shape"))
    return make_model(
        nodes,
        [float_input("x", ["n", 3, 32, 32])],
        [
            float_input("y", ["n", 2, 32, 32]),
            helper.make_tensor_value_info("s2_shape", onnx.TensorProto.INT64, [4]),
        ],
        initializers,
    )


def _data() -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(0).uniform(0, 1, (32, 3, 32, 32)).astype(np.float32)
    return [{"x": x[i : i + 8]} for i in range(0, 32, 8)]


def _fused(path: Path, tmp_path: Path) -> collections.Counter[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / f"{path.stem}_fused.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = onnx.load(options.optimized_model_filepath)
    return collections.Counter(n.op_type for n in fused.graph.node)


def test_silu_concat_and_maxpool_stay_integer_between_quantized_convs(tmp_path: Path) -> None:
    source = tmp_path / "neck.onnx"
    onnx.save(_yolo_like(), str(source))
    chained = graphopt.optimize(source, tmp_path / "chain.onnx", ["quant"], data=_data())
    plain = graphopt.optimize(
        source,
        tmp_path / "plain.onnx",
        ["quant"],
        data=_data(),
        options={"quant": {"integer_chains": False}},
    )
    assert chained.passed and plain.passed
    with_chain = _fused(tmp_path / "chain.onnx", tmp_path)
    without = _fused(tmp_path / "plain.onnx", tmp_path)
    # c1 reads the float image and is under min_macs, so its SiLU stays float; c2/c3's run int8
    assert with_chain["QLinearSigmoid"] == 2 and with_chain["QLinearMul"] == 2
    assert with_chain["QLinearConcat"] == 1
    assert without["QLinearSigmoid"] == without["QLinearMul"] == without["QLinearConcat"] == 0
    # the decode tail (Sigmoid → graph output) stays float: no Q/DQ on the output
    graph = onnx.load(str(tmp_path / "chain.onnx")).graph
    readers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node.op_type)
    for node in graph.node:  # a chain node's only reader is its QuantizeLinear (fusable)
        if node.name in ("a2_sigmoid", "a2_mul", "a3_sigmoid", "a3_mul", "concat"):
            assert readers[node.output[0]] == ["QuantizeLinear"], node.name
    (producer,) = [n for n in graph.node if "y" in n.output]
    assert producer.op_type == "Sigmoid"


def test_small_convs_join_when_their_input_is_already_integer(tmp_path: Path) -> None:
    """Rule 11 with rule 15: c4 (0.59 M MACs per sample) is under min_macs but reads the
    integer region; c1 (0.88 M) reads the float image and is large enough on its own."""
    source = tmp_path / "neck.onnx"
    onnx.save(_yolo_like(), str(source))
    options = {"quant": {"min_macs": 700_000, "target_cosine": 0}}
    report = graphopt.optimize(
        source, tmp_path / "q.onnx", ["quant"], data=_data(), options=options
    )
    stats = report.run.records[0].stats
    assert stats["quantized"] == 4 and "skipped" not in stats
    off = {"quant": {**options["quant"], "integer_chains": False}}
    report = graphopt.optimize(source, tmp_path / "p.onnx", ["quant"], data=_data(), options=off)
    assert report.run.records[0].stats["skipped"] == {"too small to gain from int8": 1}


def test_a_softmax_between_quantized_convs_runs_int8(tmp_path: Path) -> None:
    """YOLOv8's DFL decodes box bins with Softmax then a small Conv: with Softmax in the chain
    the small Conv's input is integer, so it joins (rule 11) and both run int8 (QLinearSoftmax,
    QLinearConv) instead of converting to float around them (0.86× → 0.78× fp32 latency on
    the digits detector at batch 1, 0.75× → 0.65× at batch 8)."""
    first, w1 = _conv("c1", "x", "logits", 3, 16, 5)
    second, w2 = _conv("c2", "bins", "boxes", 16, 1, 6)  # small, like the DFL's 1-channel Conv
    softmax = helper.make_node("Softmax", ["logits"], ["bins"], name="dfl_softmax", axis=1)
    tail = helper.make_node("Sigmoid", ["boxes"], ["y"], name="tail")
    proto = make_model(
        [first, softmax, second, tail],
        [float_input("x", ["n", 3, 32, 32])],
        [float_input("y", ["n", 1, 32, 32])],
        [w1, w2],
        opset=13,
    )
    source = tmp_path / "dfl.onnx"
    onnx.save(proto, str(source))
    report = graphopt.optimize(
        source,
        tmp_path / "q.onnx",
        ["quant"],
        data=_data(),
        options={"quant": {"min_macs": 300_000}},  # c1 442 k MACs per sample, c2 147 k
    )
    assert report.passed
    fused = _fused(tmp_path / "q.onnx", tmp_path)
    assert fused["QLinearSoftmax"] == 1 and fused["QLinearConv"] == 2 and fused["Softmax"] == 0
