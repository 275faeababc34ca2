"""Zoo models written with ``onnx.helper`` (no torch): the awkward forms exporters really write.

Rules:

1. Every model is seeded (weights from :class:`~models.zoo._graph.GraphBuilder`'s generator),
   checked with ``onnx.checker`` (full check) and run once in ONNX Runtime before it is returned,
   so a contract failure is never a broken zoo model.
2. Each builder takes a folder and returns the path of the ``.onnx`` file it wrote there; the
   file name is the zoo entry's name.
3. Each model's feeds come from a seeded function of the same module (``*_feeds``); they are
   valid for the model (shapes, dtypes, value ranges such as an ``If`` selector).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper

from models.zoo._graph import (
    GraphBuilder,
    Naming,
    WeightStyle,
    all_tensors,
    float_info,
    make_model,
)

Feeds = list[dict[str, np.ndarray]]
FEED_BATCHES = 4
"""Feeds per model: enough for quant's accuracy loop to hold a quarter aside. Batches hold 4
samples where the batch is free, so each class of a [N, 10] output gets 16 values, the fewest
graphopt's per-channel validation judges."""
CLASSES = 10


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save(
    model: onnx.ModelProto,
    path: Path,
    feeds: Feeds,
    *,
    runs: bool = True,
    external_data: bool = False,
) -> Path:
    """Check, save and smoke-run a zoo model (rule 1).

    ``runs=False`` skips the run for models ONNX Runtime refuses on purpose; ``external_data``
    stores the float tensors in ``<file>.data`` beside the model.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model, full_check=True)
    if external_data:
        _externalize_weights(model, f"{path.name}.data")
    onnx.save_model(model, str(path))
    if runs:
        _smoke_run(path, feeds[0])
    return path


SHAPE_OPERAND_OPS = frozenset(
    {
        "Pad",
        "Resize",
        "Upsample",
        "Split",
        "Squeeze",
        "Unsqueeze",
        "ReduceSum",
        "ReduceMean",
        "Reshape",
        "Expand",
        "Tile",
        "Slice",
        "ConstantOfShape",
    }
)
"""Ops whose inputs after the first are shape-like operands (pads, scales, axes, shapes)."""


def _externalize_weights(model: onnx.ModelProto, location: str) -> None:
    """Store every tensor in one external data file, except shape-like operands.

    ONNX Runtime's shape inference cannot read a Pad's ``pads`` or a Resize's ``scales`` from
    external data ("Cannot parse data from external tensors"), so, as torch's exporter does by
    its size threshold, the operands of :data:`SHAPE_OPERAND_OPS` after the first stay inline.
    """
    inline = {
        name
        for node in model.graph.node
        if node.op_type in SHAPE_OPERAND_OPS
        for name in node.input[1:]
    }
    external_data_helper.convert_model_to_external_data(
        model,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
        convert_attribute=True,
    )
    for tensor in all_tensors(model.graph):
        if tensor.name in inline:
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT


def _smoke_run(path: Path, feed: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)


def image_feeds(
    shape: tuple[int, ...], name: str = "image", seed: int = 0, batches: int = FEED_BATCHES
) -> Feeds:
    """Standard-normal images (the range of ImageNet-normalized inputs)."""
    rng = _rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(batches)]


# -- the opset family: one small conv/matmul classifier written for each opset ------------------


def classifier_graph(
    builder: GraphBuilder, image: str = "image", logits: str = "logits"
) -> onnx.GraphProto:
    """Conv/BN/Clip/Pad/Split/Resize/Reduce/Squeeze/MatMul/Gemm on ``image[N, 3, 32, 32]``.

    Every op whose form differs by opset is used once, in the form of ``builder.opset``.
    """
    b = builder
    h = b.op("Relu", b.batch_norm(b.conv(image, 3, 8, 3, stride=2, bias=False), 8))  # 16×16
    h = b.clip(h, 0.0, 6.0)
    h = b.pad(h, [0, 0, 1, 1, 0, 0, 1, 1])  # 18×18
    h = b.op("Relu", b.conv(h, 8, 16, 3, pad=0))  # 16×16
    left, right = b.split(h, [8, 8], axis=1)
    left = b.conv(left, 8, 8, 1)
    right = b.op("Mul", right, b.op("Sigmoid", right))
    h = b.op("Concat", left, right, axis=1)
    down = b.op("Relu", b.conv(h, 16, 16, 3, stride=2))  # 8×8
    h = b.op("Add", b.upsample2x(down), h)  # 16×16
    pooled = b.squeeze(b.reduce_mean(h, [2, 3], keepdims=1), [2, 3])  # [N, 16]
    hidden = b.op("Relu", b.matmul(pooled, 16, 32))
    hidden = b.reduce_sum(b.unsqueeze(hidden, [1]), [1], keepdims=0)  # identity, opset forms
    b.node("Identity", [b.gemm(hidden, 32, CLASSES)], [logits])
    return b.graph(
        "classifier",
        [float_info(image, ["N", 3, 32, 32])],
        [float_info(logits, ["N", CLASSES])],
    )


def classifier_builder(
    opset: int,
    *,
    weight_style: WeightStyle = "initializer",
    naming: Naming = "unique",
    seed: int = 0,
    external_data: bool = False,
) -> Callable[[Path, str], Path]:
    """A builder for :func:`classifier_graph` at ``opset`` with the given weight placement."""

    def build(folder: Path, name: str) -> Path:
        builder = GraphBuilder(opset, _rng(seed), weight_style=weight_style, naming=naming)
        model = make_model(classifier_graph(builder), opset)
        return _save(
            model,
            folder / f"{name}.onnx",
            classifier_feeds(),
            runs=naming != "duplicate",
            external_data=external_data,
        )

    return build


def classifier_feeds(seed: int = 0) -> Feeds:
    return image_feeds((4, 3, 32, 32), seed=seed)


# -- Caffe2 era: IR 3, initializers listed as graph inputs, a ConstantOfShape bias ---------------


def build_graph_inputs_ir3(folder: Path, name: str) -> Path:
    b = GraphBuilder(9, _rng(1), weight_style="input")
    h = b.op("Relu", b.conv("data", 1, 8, 3))
    h = b.op("MaxPool", h, kernel_shape=[2, 2], strides=[2, 2])  # 4×4
    h = b.op("Flatten", h, axis=1)
    w = b.weight([128, CLASSES], fan_in=128, stem="fc_w")
    bias = b.op(
        "ConstantOfShape",
        b.ints([CLASSES], "fc_b_shape"),
        value=helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.25]),
    )
    b.node("Add", [b.op("MatMul", h, w), bias], ["prob_logits"])
    graph = b.graph(
        "caffe2_net",
        [float_info("data", ["N", 1, 8, 8])],
        [float_info("prob_logits", ["N", CLASSES])],
    )
    return _save(make_model(graph, 9, ir_version=3), folder / f"{name}.onnx", ir3_feeds())


def ir3_feeds(seed: int = 0) -> Feeds:
    return image_feeds((4, 1, 8, 8), name="data", seed=seed)


# -- weights as Constant nodes inside If branches (a voice-activity detector's layout) ------------


def build_constant_if(folder: Path, name: str) -> Path:
    """``If(sr == 16000)``: two conv+matmul branches whose weights are Constant nodes.

    Inputs ``audio`` float [N, 64] and ``sr`` int64 scalar; output ``speech_prob`` [N, 1].
    """
    opset = 16
    b = GraphBuilder(opset, _rng(2))
    frames = b.unsqueeze("audio", [1])  # [N, 1, 64]
    is_16k = b.op("Equal", "sr", b.tensor(np.array(16000, np.int64), "sr_16k"))

    def branch(kernel: int, stride: int) -> onnx.GraphProto:
        body = b.body(weight_style="constant")
        h = body.op("Relu", body.conv(frames, 1, 8, kernel, stride=stride, dims=1))
        h = body.op("Relu", body.conv(h, 8, 8, 3, stride=2, dims=1))
        h = body.reduce_mean(h, [2], keepdims=0)  # [N, 8]
        out = body.op("Sigmoid", body.matmul(h, 8, 16))
        return body.graph(
            body.fresh("branch"), [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
        )

    (features,) = b.node("If", [is_16k], 1, then_branch=branch(3, 2), else_branch=branch(5, 4))
    b.node("Sigmoid", [b.matmul(features, 16, 1)], ["speech_prob"])
    graph = b.graph(
        "vad",
        [
            float_info("audio", ["N", 64]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [float_info("speech_prob", ["N", 1])],
    )
    return _save(make_model(graph, opset), folder / f"{name}.onnx", vad_feeds())


def vad_feeds(seed: int = 0) -> Feeds:
    """Audio in [-1, 1]; the sample rate alternates 16000 / 8000 so both branches run."""
    rng = _rng(seed)
    return [
        {
            "audio": rng.uniform(-1.0, 1.0, (4, 64)).astype(np.float32),
            "sr": np.array(16000 if index % 2 == 0 else 8000, np.int64),
        }
        for index in range(FEED_BATCHES)
    ]


# -- If / Loop / Scan bodies with MatMul and Conv on constant weights --------------------------


def if_bodies_builder(naming: Naming = "unique") -> Callable[[Path, str], Path]:
    """A builder for :func:`build_if_bodies` with the given node naming."""

    def build(folder: Path, name: str) -> Path:
        return build_if_bodies(folder, name, naming=naming)

    return build


def build_if_bodies(folder: Path, name: str, *, naming: Naming = "unique") -> Path:
    """``If(mean(x) > 0)`` with branch-local initializers feeding Conv and MatMul."""
    opset = 13
    b = GraphBuilder(opset, _rng(3), naming=naming)
    cond = b.op("Greater", b.op("ReduceMean", "x", keepdims=0), b.scalar(0.0, "zero"))

    def branch(kernel: int, activation: str) -> onnx.GraphProto:
        body = b.body()
        h = body.op(activation, body.conv("x", 4, 8, kernel))
        h = body.op("Flatten", body.op("GlobalAveragePool", h), axis=1)
        out = body.matmul(h, 8, CLASSES)
        return body.graph(
            body.fresh("branch"), [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
        )

    b.node(
        "If",
        [cond],
        ["logits"],
        then_branch=branch(3, "Relu"),
        else_branch=branch(1, "Sigmoid"),
    )
    graph = b.graph(
        "if_bodies",
        [float_info("x", ["N", 4, 16, 16])],
        [float_info("logits", ["N", CLASSES])],
    )
    return _save(make_model(graph, opset), folder / f"{name}.onnx", if_feeds())


def if_feeds(seed: int = 0) -> Feeds:
    """Shifted so the mean's sign (the branch taken) alternates between batches."""
    rng = _rng(seed)
    return [
        {"x": (rng.standard_normal((4, 4, 16, 16)) + (0.5 if i % 2 else -0.5)).astype(np.float32)}
        for i in range(FEED_BATCHES)
    ]


def build_loop_body(folder: Path, name: str) -> Path:
    """A 3-step Loop whose body holds Conv and MatMul on Constant-node weights (residual)."""
    opset = 13
    b = GraphBuilder(opset, _rng(4))
    state = b.op("Relu", b.conv("x", 3, 8, 3))  # [N, 8, 8, 8]
    body = b.body(weight_style="constant")
    step = body.op("Relu", body.conv("s_in", 8, 8, 3))
    mixed = body.op("MatMul", step, body.weight([8, 8], fan_in=8, stem="loop_mm_w"))
    body.node("Add", ["s_in", mixed], ["s_out"])
    body.node("Identity", ["cond_in"], ["cond_out"])
    body_graph = body.graph(
        "loop_body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, None),
            float_info("s_in", None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, None),
            float_info("s_out", None),
        ],
    )
    trips = b.tensor(np.array(3, np.int64), "trips")
    keep_going = b.tensor(np.array(True), "keep_going")
    (looped,) = b.node("Loop", [trips, keep_going, state], 1, body=body_graph)
    pooled = b.op("Flatten", b.op("GlobalAveragePool", looped), axis=1)
    b.node("Identity", [b.gemm(pooled, 8, CLASSES)], ["logits"])
    graph = b.graph(
        "loop_net", [float_info("x", ["N", 3, 8, 8])], [float_info("logits", ["N", CLASSES])]
    )
    return _save(make_model(graph, opset), folder / f"{name}.onnx", loop_feeds())


def loop_feeds(seed: int = 0) -> Feeds:
    return image_feeds((4, 3, 8, 8), name="x", seed=seed)


def build_scan_body(folder: Path, name: str) -> Path:
    """An RNN written as Scan (opset 11): each step runs Conv1d and two MatMuls.

    The body reads its weights from the main graph's initializers (outer scope).
    Input ``x`` [T, N, 16]; outputs ``h_last`` [N, 16] and ``y`` [T, N, 4].
    """
    opset = 11
    b = GraphBuilder(opset, _rng(5))
    conv_w = b.weight([4, 1, 3], stem="scan_conv_w")
    w_x = b.weight([64, 16], fan_in=64, stem="scan_wx")
    w_h = b.weight([16, 16], fan_in=16, stem="scan_wh")
    bias = b.bias(16, "scan_b")
    body = b.body()
    column = body.unsqueeze("x_t", [1])  # [N, 1, 16]
    conv = body.op(
        "Relu", body.op("Conv", column, conv_w, kernel_shape=[3], pads=[1, 1])
    )  # [N, 4, 16]
    flat = body.op("Flatten", conv, axis=1)  # [N, 64]
    mixed = body.op("Add", body.op("MatMul", flat, w_x), body.op("MatMul", "h_in", w_h))
    body.node("Tanh", [body.op("Add", mixed, bias)], ["h_out"])
    body.node("Identity", ["h_out"], ["h_seq"])
    body_graph = body.graph(
        "scan_body",
        [float_info("h_in", ["N", 16]), float_info("x_t", ["N", 16])],
        [float_info("h_out", ["N", 16]), float_info("h_seq", ["N", 16])],
    )
    h0 = b.op("Mul", b.reduce_sum("x", [0], keepdims=0), b.scalar(0.0, "zero"))  # zeros [N, 16]
    b.node("Scan", [h0, "x"], ["h_last", "hs"], body=body_graph, num_scan_inputs=1)
    b.node("MatMul", ["hs", b.weight([16, 4], fan_in=16, stem="head_w")], ["y"])
    graph = b.graph(
        "scan_rnn",
        [float_info("x", ["T", "N", 16])],
        [float_info("h_last", ["N", 16]), float_info("y", ["T", "N", 4])],
    )
    return _save(make_model(graph, opset), folder / f"{name}.onnx", sequence_feeds(16))


def sequence_feeds(features: int, seed: int = 0, steps: int = 6) -> Feeds:
    return image_feeds((steps, 2, features), name="x", seed=seed)


# -- recurrent ops ------------------------------------------------------------------------------


def build_lstm(folder: Path, name: str) -> Path:
    """LSTM (opset 14, hidden 16) on ``x`` [T, N, 8], then a MatMul head."""
    opset, hidden = 14, 16
    b = GraphBuilder(opset, _rng(6))
    w = b.weight([1, 4 * hidden, 8], fan_in=8, stem="lstm_W")
    r = b.weight([1, 4 * hidden, hidden], fan_in=hidden, stem="lstm_R")
    bias = b.tensor((0.1 * b.rng.standard_normal((1, 8 * hidden))).astype(np.float32), "lstm_B")
    seq, _, _ = b.node("LSTM", ["x", w, r, bias], 3, hidden_size=hidden)
    features = b.squeeze(seq, [1])  # [T, N, 16]
    b.node("MatMul", [features, b.weight([hidden, 4], fan_in=hidden, stem="head_w")], ["y"])
    graph = b.graph("lstm_net", [float_info("x", ["T", "N", 8])], [float_info("y", ["T", "N", 4])])
    return _save(make_model(graph, opset), folder / f"{name}.onnx", sequence_feeds(8))


def build_gru(folder: Path, name: str) -> Path:
    """Bidirectional GRU (opset 11, torch's linear_before_reset=1) on ``x`` [T, N, 8]."""
    opset, hidden = 11, 12
    b = GraphBuilder(opset, _rng(7))
    w = b.weight([2, 3 * hidden, 8], fan_in=8, stem="gru_W")
    r = b.weight([2, 3 * hidden, hidden], fan_in=hidden, stem="gru_R")
    bias = b.tensor((0.1 * b.rng.standard_normal((2, 6 * hidden))).astype(np.float32), "gru_B")
    seq, _ = b.node(
        "GRU",
        ["x", w, r, bias],
        2,
        hidden_size=hidden,
        direction="bidirectional",
        linear_before_reset=1,
    )
    seq = b.op("Transpose", seq, perm=[0, 2, 1, 3])  # [T, N, 2, 12]
    seq = b.op("Reshape", seq, b.ints([0, 0, -1], "shape"))  # [T, N, 24]
    b.node("MatMul", [seq, b.weight([2 * hidden, 4], fan_in=2 * hidden, stem="head_w")], ["y"])
    graph = b.graph("gru_net", [float_info("x", ["T", "N", 8])], [float_info("y", ["T", "N", 4])])
    return _save(make_model(graph, opset), folder / f"{name}.onnx", sequence_feeds(8))


# -- shapes: dynamic stride-32 spatial dims, static batch 8 --------------------------------------


def build_dynamic_stride32(folder: Path, name: str) -> Path:
    """A Paddle-OCR-detector-like FPN (opset 12) on ``x`` [N, 3, H, W] with H, W dynamic.

    Five stride-2 convs (stride 32) and two ×2 upsamplings added to lateral convs: the spatial
    size must be a multiple of 32, or the Adds see mismatched shapes.
    """
    opset = 12
    b = GraphBuilder(opset, _rng(8))
    widths = [8, 8, 16, 16, 16]
    levels, h, cin = [], "x", 3
    for width in widths:
        h = b.op("Relu", b.batch_norm(b.conv(h, cin, width, 3, stride=2, bias=False), width))
        levels.append(h)
        cin = width
    p4 = b.op("Add", b.upsample2x(levels[4]), b.conv(levels[3], 16, 16, 1))
    p3 = b.op("Add", b.upsample2x(p4), b.conv(levels[2], 16, 16, 1))
    b.node("Sigmoid", [b.conv(p3, 16, 1, 3)], ["maps"])
    graph = b.graph(
        "db_detector",
        [float_info("x", ["N", 3, "H", "W"])],
        [float_info("maps", ["N", 1, "H_8", "W_8"])],
    )
    return _save(make_model(graph, opset), folder / f"{name}.onnx", stride32_feeds())


def stride32_feeds(seed: int = 0) -> Feeds:
    """Valid feeds (64 × 96 images in [0, 1]); the contract itself lets graphopt synthesize."""
    rng = _rng(seed)
    return [
        {"x": rng.uniform(0.0, 1.0, (1, 3, 64, 96)).astype(np.float32)} for _ in range(FEED_BATCHES)
    ]


def build_static_batch8(folder: Path, name: str) -> Path:
    """A TensorRT-style export whose batch is fixed at 8: ``input`` [8, 1, 8, 8]."""
    opset = 13
    b = GraphBuilder(opset, _rng(9))
    h = b.op("Relu", b.conv("input", 1, 8, 3))
    h = b.op("Flatten", h, axis=1)  # [8, 512]
    b.node("Identity", [b.gemm(h, 512, CLASSES)], ["output"])
    graph = b.graph(
        "static_batch", [float_info("input", [8, 1, 8, 8])], [float_info("output", [8, CLASSES])]
    )
    return _save(make_model(graph, opset), folder / f"{name}.onnx", static_batch_feeds())


def static_batch_feeds(seed: int = 0) -> Feeds:
    return image_feeds((8, 1, 8, 8), name="input", seed=seed)


# -- a YOLOv8-style detector: one output packing box rows and class-score rows ------------------

YOLO_SIZE = 64
YOLO_CLASSES = 20
YOLO_REG_MAX = 16
YOLO_CLASS_PRIOR = -4.0
"""Added to the class conv's bias, as ultralytics initialises it (a low prior probability); with
the class conv's weights scaled up, class scores are mostly near 0 with a few peaks, as a trained
detector's are."""


def build_yolo_head(folder: Path, name: str) -> Path:
    """Backbone + YOLOv8 head: DFL box decoding to pixel xywh and sigmoid class scores.

    Input ``images`` [1, 3, 64, 64] in [0, 1]; output ``output0`` [1, 4 + 20, 84]: rows 0-3 are
    box centre x, y, width, height in pixels (values up to 64), rows 4-23 class scores in (0, 1),
    one column per anchor (8×8 + 4×4 + 2×2). As in ultralytics, the DFL is a fixed 1×1 Conv whose
    weights are 0 … 15, and the class bias starts at a low prior (:data:`YOLO_CLASS_PRIOR`).
    """
    opset = 17
    b = GraphBuilder(opset, _rng(10))
    h = "images"
    cin, features = 3, []
    for width, stride in ((8, 2), (16, 4), (16, 8), (32, 16), (32, 32)):
        h = b.op("Relu", b.conv(h, cin, width, 3, stride=2))
        h = b.op("Mul", h, b.op("Sigmoid", h))
        cin = width
        if stride >= 8:
            features.append((h, width, stride))
    boxes_raw, scores_raw, anchors, strides = [], [], [], []
    box_prior = np.tile(-0.5 * np.arange(YOLO_REG_MAX, dtype=np.float32), 4)  # short distances
    for tensor, width, stride in features:
        side = YOLO_SIZE // stride
        box_features = b.op("Relu", b.conv(tensor, width, 16, 3))
        box = b.conv(box_features, 16, 4 * YOLO_REG_MAX, 1, bias_shift=box_prior)
        cls_features = b.op("Relu", b.conv(tensor, width, 16, 3))
        cls = b.conv(cls_features, 16, YOLO_CLASSES, 1, bias_shift=YOLO_CLASS_PRIOR, gain=16.0)
        boxes_raw.append(b.op("Reshape", box, b.ints([1, 4 * YOLO_REG_MAX, -1], "shape")))
        scores_raw.append(b.op("Reshape", cls, b.ints([1, YOLO_CLASSES, -1], "shape")))
        grid = np.arange(side, dtype=np.float32) + 0.5
        xs, ys = np.meshgrid(grid, grid)
        anchors.append(np.stack([xs.ravel(), ys.ravel()]))
        strides.append(np.full((1, side * side), stride, np.float32))
    box = b.op("Concat", *boxes_raw, axis=2)  # [1, 64, A]
    anchor_count = sum(a.shape[1] for a in anchors)
    # DFL: softmax over 16 bins, expectation via a fixed Conv with weights 0..15.
    dist = b.op("Reshape", box, b.ints([1, 4, YOLO_REG_MAX, anchor_count], "shape"))
    dist = b.op("Softmax", b.op("Transpose", dist, perm=[0, 2, 1, 3]), axis=1)  # [1, 16, 4, A]
    dfl_weight = b.tensor(
        np.arange(YOLO_REG_MAX, dtype=np.float32).reshape(1, YOLO_REG_MAX, 1, 1), "dfl_w"
    )
    dist = b.op("Conv", dist, dfl_weight, kernel_shape=[1, 1])  # [1, 1, 4, A]
    dist = b.op("Reshape", dist, b.ints([1, 4, anchor_count], "shape"))
    left_top, right_bottom = b.split(dist, [2, 2], axis=1)
    points = b.tensor(np.concatenate(anchors, axis=1)[None], "anchor_points")  # [1, 2, A]
    top_left = b.op("Sub", points, left_top)
    bottom_right = b.op("Add", points, right_bottom)
    centre = b.op("Div", b.op("Add", top_left, bottom_right), b.scalar(2.0, "two"))
    size = b.op("Sub", bottom_right, top_left)
    xywh = b.op("Concat", centre, size, axis=1)
    pixels = b.op("Mul", xywh, b.tensor(np.concatenate(strides, axis=1)[None], "strides"))
    scores = b.op("Sigmoid", b.op("Concat", *scores_raw, axis=2))
    b.node("Concat", [pixels, scores], ["output0"], axis=1)
    graph = b.graph(
        "yolo",
        [float_info("images", [1, 3, YOLO_SIZE, YOLO_SIZE])],
        [float_info("output0", [1, 4 + YOLO_CLASSES, anchor_count])],
    )
    return _save(make_model(graph, opset), folder / f"{name}.onnx", yolo_feeds())


def yolo_feeds(seed: int = 0) -> Feeds:
    rng = _rng(seed)
    return [
        {"images": rng.uniform(0.0, 1.0, (1, 3, YOLO_SIZE, YOLO_SIZE)).astype(np.float32)}
        for _ in range(FEED_BATCHES)
    ]
