"""Tiny models with dynamic dimensions, and feeds whose shapes and batch sizes vary (issue 18).

Three models, built in code with :class:`models.zoo._graph.GraphBuilder` (seeded weights):

- :func:`text_model`: ``input_ids`` int64 [batch, seq] → Gather embedding → LayerNorm →
  single-head attention masked by ``attention_mask`` [batch, seq] → MatMul/Relu/MatMul FFN →
  LayerNorm → ``hidden`` [batch, seq, 32]; mean over ``seq`` → Gemm → ``logits`` [batch, 4].
- :func:`cnn_model`: ``image`` [batch, 3, H, W] → Conv/BatchNorm/Relu → Conv (stride 2)/Relu
  → GlobalAveragePool → Flatten → Gemm → ``logits`` [batch, 10].
- :func:`rnn_model`: ``x`` [batch, seq, 8] → Transpose → LSTM (hidden 16) → MatMul →
  Transpose → ``y`` [batch, seq, 4].

Feeds: :data:`BATCHES` and :data:`LENGTHS` / :data:`IMAGE_SIZES` pair up so that every feed
differs from the one before in its batch size and in its other dynamic sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from models.zoo._graph import GraphBuilder, float_info, make_model

BATCHES = (1, 3, 8, 3, 1, 8)
"""Batch sizes of the feeds, in order: 1, 3 and 8, each twice."""
LENGTHS = (5, 12, 7, 20, 9, 3)
"""Sequence lengths of the text and RNN feeds, paired with :data:`BATCHES`."""
IMAGE_SIZES = ((16, 16), (24, 12), (12, 20), (32, 16), (20, 28), (8, 8))
"""(H, W) of the CNN feeds, paired with :data:`BATCHES`."""
VOCAB = 50
HIDDEN = 32

Feed = dict[str, np.ndarray]


def text_model() -> onnx.ModelProto:
    """The transformer-like text model of the module docstring (opset 17)."""
    b = GraphBuilder(17, np.random.default_rng(11))
    table = b.tensor((0.5 * b.rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32), "embedding")
    embedded = b.op("Gather", table, "input_ids")
    x = _layer_norm(b, embedded)
    query = b.matmul(x, HIDDEN, HIDDEN)
    key = b.matmul(x, HIDDEN, HIDDEN)
    value = b.matmul(x, HIDDEN, HIDDEN)
    scores = b.op("MatMul", query, b.op("Transpose", key, perm=[0, 2, 1]))
    scores = b.op("Mul", scores, b.scalar(1.0 / np.sqrt(HIDDEN), "scale"))
    mask = b.op("Cast", "attention_mask", to=TensorProto.FLOAT)
    mask = b.unsqueeze(mask, [1])  # [batch, 1, seq]
    penalty = b.op("Mul", b.op("Sub", b.scalar(1.0, "one"), mask), b.scalar(-10000.0, "neg"))
    weights = b.op("Softmax", b.op("Add", scores, penalty), axis=-1)
    attended = b.matmul(b.op("MatMul", weights, value), HIDDEN, HIDDEN)
    x = _layer_norm(b, b.op("Add", x, attended))
    ffn = b.matmul(b.op("Relu", b.matmul(x, HIDDEN, 2 * HIDDEN)), 2 * HIDDEN, HIDDEN)
    b.node("LayerNormalization", [b.op("Add", x, ffn), *_norm_params(b)], ["hidden"], axis=-1)
    pooled = b.reduce_mean("hidden", [1], keepdims=0)  # [batch, HIDDEN]
    b.node("Gemm", [pooled, b.weight([4, HIDDEN], stem="head_w"), b.bias(4)], ["logits"], transB=1)
    graph = b.graph(
        "any_shape_text",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [float_info("hidden", ["batch", "seq", HIDDEN]), float_info("logits", ["batch", 4])],
    )
    return _checked(make_model(graph, 17))


def _norm_params(b: GraphBuilder) -> list[str]:
    scale = b.tensor(b.rng.uniform(0.8, 1.2, HIDDEN).astype(np.float32), "ln_scale")
    return [scale, b.bias(HIDDEN, "ln_b")]


def _layer_norm(b: GraphBuilder, x: str) -> str:
    return b.op("LayerNormalization", x, *_norm_params(b), axis=-1)


def cnn_model() -> onnx.ModelProto:
    """The CNN of the module docstring, H and W dynamic (opset 17)."""
    b = GraphBuilder(17, np.random.default_rng(12))
    x = b.op("Relu", b.batch_norm(b.conv("image", 3, 8, 3, bias=False), 8))
    x = b.op("Relu", b.conv(x, 8, 16, 3, stride=2))
    x = b.op("Flatten", b.op("GlobalAveragePool", x), axis=1)
    b.node("Gemm", [x, b.weight([10, 16], stem="head_w"), b.bias(10)], ["logits"], transB=1)
    graph = b.graph(
        "any_shape_cnn",
        [float_info("image", ["batch", 3, "height", "width"])],
        [float_info("logits", ["batch", 10])],
    )
    return _checked(make_model(graph, 17))


def rnn_model(*, state_first: bool = False) -> onnx.ModelProto:
    """The LSTM model of the module docstring, batch-first, seq dynamic (opset 14).

    ``state_first``: the model also takes the LSTM's initial state ``h0`` [1, batch, 16], listed
    before ``x``, so its first input's axis 0 is not the batch (feeds rule 8: axis 1 is).
    """
    hidden = 16
    b = GraphBuilder(14, np.random.default_rng(13))
    w = b.weight([1, 4 * hidden, 8], fan_in=8, stem="lstm_W")
    r = b.weight([1, 4 * hidden, hidden], fan_in=hidden, stem="lstm_R")
    bias = b.tensor((0.1 * b.rng.standard_normal((1, 8 * hidden))).astype(np.float32), "lstm_B")
    steps = b.op("Transpose", "x", perm=[1, 0, 2])  # [seq, batch, 8]
    state = ["", "h0"] if state_first else []
    seq, _, _ = b.node("LSTM", [steps, w, r, bias, *state], 3, hidden_size=hidden)
    features = b.squeeze(seq, [1])  # [seq, batch, 16]
    # the head before the Transpose: ONNX Runtime 1.32 crashes optimizing a float16
    # Transpose → MatMul (its MatmulTransposeFusion), which fp16 would make of the other order
    head = b.op("MatMul", features, b.weight([hidden, 4], stem="head_w"))
    b.node("Transpose", [head], ["y"], perm=[1, 0, 2])
    inputs = [float_info("x", ["batch", "seq", 8])]
    if state_first:
        inputs.insert(0, float_info("h0", [1, "batch", hidden]))
    graph = b.graph("any_shape_rnn", inputs, [float_info("y", ["batch", "seq", 4])])
    return _checked(make_model(graph, 14))


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return model


def text_feeds(seed: int = 0) -> list[Feed]:
    """Token ids below :data:`VOCAB`; each row's mask ends in zeros after a random length."""
    rng = np.random.default_rng(seed)
    feeds = []
    for batch, length in zip(BATCHES, LENGTHS, strict=True):
        ids = rng.integers(1, VOCAB, size=(batch, length)).astype(np.int64)
        kept = rng.integers(1, length + 1, size=(batch, 1))
        mask = (np.arange(length)[None, :] < kept).astype(np.int64)
        feeds.append({"input_ids": ids * mask, "attention_mask": mask})
    return feeds


def image_feeds(seed: int = 0) -> list[Feed]:
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.standard_normal((batch, 3, height, width)).astype(np.float32)}
        for batch, (height, width) in zip(BATCHES, IMAGE_SIZES, strict=True)
    ]


def sequence_feeds(seed: int = 0, *, state: bool = False) -> list[Feed]:
    """``x`` [batch, seq, 8]; with ``state``, also ``h0`` [1, batch, 16] first."""
    rng = np.random.default_rng(seed)
    feeds = []
    for batch, length in zip(BATCHES, LENGTHS, strict=True):
        feed = {"x": rng.standard_normal((batch, length, 8)).astype(np.float32)}
        if state:
            h0 = (0.1 * rng.standard_normal((1, batch, 16))).astype(np.float32)
            feed = {"h0": h0, **feed}
        feeds.append(feed)
    return feeds


MODELS: dict[str, tuple[Callable[[], onnx.ModelProto], Callable[[int], list[Feed]]]] = {
    "text": (text_model, text_feeds),
    "cnn": (cnn_model, image_feeds),
    "rnn": (rnn_model, sequence_feeds),
}
"""Name → (model builder, feeds builder)."""


def write_folder(folder: Path, feeds: Sequence[Feed]) -> Path:
    """One ``.npz`` per feed, named so that sorting keeps their order."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(folder / f"feed_{index:02d}.npz", **feed)
    return folder


def samples(feeds: Sequence[Feed], name: str) -> int:
    """Samples in ``feeds``: the sizes of axis 0 of input ``name`` added up."""
    return sum(int(feed[name].shape[0]) for feed in feeds)
