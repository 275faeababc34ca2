"""The int4/int8 block layouts, each run on ONNX Runtime CPU with optimisations off and at the
default level, against :meth:`BlockQuantized.dequantize`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.ir.model import iter_graphs, model_from_proto, save_model
from graphopt.passkit.blockquant import BlockFormat, BlockQuantized, quantize_rtn
from graphopt.passkit.int4 import (
    gather_block_constants,
    nbits_arrays,
    pack_nibbles,
    write_block_quantized,
    write_gather_block_quantized,
)
from graphopt.passkit.qdq import Namer

from ..conftest import float_input, make_model

LEVELS = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "default": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _session(path: Path | onnx.ModelProto, level: str, optimized: Path | None = None):  # type: ignore[no-untyped-def]
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    source = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _matmul_model(rows: int, columns: int, seed: int = 0) -> onnx.ModelProto:
    values = np.random.default_rng(seed).standard_normal((rows, columns)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [float_input("x", ["batch", "seq", rows])],
        [float_input("y", ["batch", "seq", columns])],
        [numpy_helper.from_array(values, "W")],
        opset=21,
        ir_version=10,
    )


def _rewritten(
    proto: onnx.ModelProto, tmp_path: Path, fmt: BlockFormat, **kwargs: object
) -> tuple[Path, BlockQuantized]:
    model = model_from_proto(proto)
    graph = model.graph
    node = next(n for n in graph.nodes if n.op == "MatMul")
    weight = numpy_helper.to_array(proto.graph.initializer[0])
    quantized = quantize_rtn(weight, fmt)
    write_block_quantized(graph, Namer(*iter_graphs(graph)), node, quantized, **kwargs)  # type: ignore[arg-type]
    graph.cleanup().toposort()
    path = tmp_path / "q.onnx"
    save_model(model, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path, quantized


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def test_pack_nibbles_matches_onnx_int4_storage() -> None:
    codes = np.array([[-8, 7, 1], [0, -1, 3]])
    assert pack_nibbles(np.array([1, 2, 15])).tolist() == [0x21, 0x0F]
    assert pack_nibbles(codes).tolist() == [[0x78, 0x01], [0xF0, 0x03]]


@pytest.mark.parametrize(
    ("bits", "block", "symmetric"),
    [(4, 32, True), (4, 16, False), (4, 128, False), (8, 32, True), (8, 16, False), (4, 0, True)],
)
def test_matmulnbits_computes_the_dequantized_weight(
    tmp_path: Path, bits: int, block: int, symmetric: bool
) -> None:
    proto = _matmul_model(80, 24)  # K = 80: not a whole number of blocks, odd block count
    path, quantized = _rewritten(proto, tmp_path, BlockFormat(bits, block, symmetric))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["MatMulNBits"]
    assert {o.domain for o in onnx.load(str(path)).opset_import} >= {"", "com.microsoft"}
    x = np.random.default_rng(1).standard_normal((2, 5, 80)).astype(np.float32)
    want = x @ quantized.dequantize()
    for level in LEVELS:
        got = _session(path, level).run(None, {"x": x})[0]
        assert _relative(got, want) < 1e-5, level


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_one_group_over_k_repeats_its_scale(tmp_path: Path, symmetric: bool) -> None:
    proto = _matmul_model(300, 8)
    path, quantized = _rewritten(proto, tmp_path, BlockFormat(4, 0, symmetric))
    node = onnx.load(str(path)).graph.node[0]
    assert {a.name: a.i for a in node.attribute}["block_size"] == 128
    x = np.random.default_rng(1).standard_normal((2, 3, 300)).astype(np.float32)
    want = x @ quantized.dequantize()
    for level in LEVELS:
        assert _relative(_session(path, level).run(None, {"x": x})[0], want) < 1e-5, level


def test_matmulnbits_accuracy_level_and_bias(tmp_path: Path) -> None:
    proto = _matmul_model(64, 16)
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    fmt = BlockFormat(4, 32, False)
    path, quantized = _rewritten(proto, tmp_path, fmt, accuracy_level=4, bias=bias)
    node = onnx.load(str(path)).graph.node[0]
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["accuracy_level"] == 4 and attrs["bits"] == 4 and attrs["block_size"] == 32
    assert len(node.input) == 6 and node.input[4] == "" and node.input[5] == "W_bias"
    x = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    want = x @ quantized.dequantize() + bias
    for level in LEVELS:
        got = _session(path, level).run(None, {"x": x})[0]
        # int8 activations: close, not exact
        assert 1e-6 < _relative(got, want) < 3e-2 and _cosine(got, want) > 0.9995, level


def test_nbits_arrays_layout() -> None:
    codes = np.arange(40 * 3).reshape(40, 3) % 16
    scales = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    zeros = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.uint8)
    quantized = BlockQuantized(codes.astype(np.uint8), scales, zeros, BlockFormat(4, 16, False), 40)
    packed, flat_scales, zero_points = nbits_arrays(quantized)
    assert packed.shape == (3, 3, 8)
    # column 0, block 0: rows 0 and 1 share the first byte, row 0 in the low nibble
    assert packed[0, 0, 0] == (codes[0, 0] | codes[1, 0] << 4)
    # K padded to 48 with each column's last zero code (dequantizes to 0)
    assert packed[0, 2, 7] == (zeros[2, 0] | zeros[2, 0] << 4)
    assert flat_scales.tolist() == scales.T.reshape(-1).tolist()
    # two blocks per byte per column, each column's row padded to a whole byte
    assert zero_points is not None
    assert zero_points.tolist() == [1 | 4 << 4, 7, 2 | 5 << 4, 8, 3 | 6 << 4, 9]


@pytest.mark.parametrize(
    ("bits", "block", "symmetric"),
    [(4, 32, True), (4, 16, False), (8, 32, True), (8, 64, False), (4, 0, False)],
)
def test_dequantize_layout_is_exact_at_every_level(
    tmp_path: Path, bits: int, block: int, symmetric: bool
) -> None:
    proto = _matmul_model(128, 48)
    path, quantized = _rewritten(
        proto, tmp_path, BlockFormat(bits, block, symmetric), layout="dequantize"
    )
    saved = onnx.load(str(path))
    assert [n.op_type for n in saved.graph.node] == ["DequantizeLinear", "Transpose", "MatMul"]
    codes = numpy_helper.to_array(next(i for i in saved.graph.initializer if i.dims[0] == 48))
    expected = quantized.codes.T.astype(np.int16) - (quantized.format.zero if symmetric else 0)
    np.testing.assert_array_equal(codes.astype(np.int16), expected)  # onnx reads our packing
    x = np.random.default_rng(3).standard_normal((2, 7, 128)).astype(np.float32)
    x[..., 5] *= 50.0  # an outlier channel, as transformers have
    want = x @ quantized.dequantize()
    for level in LEVELS:
        optimized = tmp_path / f"{level}.onnx"
        got = _session(path, level, optimized).run(None, {"x": x})[0]
        assert _relative(got, want) < 1e-5, level
        assert "MatMulNBits" not in {n.op_type for n in onnx.load(str(optimized)).graph.node}


def test_natural_axis0_layout_is_silently_fused_to_int8_activations(tmp_path: Path) -> None:
    """Why rule 2 stores [N, K]: ORT 1.32 at the default level turns an axis-0 blocked
    DequantizeLinear → MatMul into MatMulNBits with accuracy_level 4, which computes with int8
    activations instead of the file's weights. If this starts failing, ORT changed: re-measure
    and reconsider the natural layout."""
    rows, columns, block = 256, 64, 32
    weight = np.random.default_rng(4).standard_normal((rows, columns))
    quantized = quantize_rtn(weight, BlockFormat(4, block, True))
    signed = quantized.codes.astype(np.int16) - 8
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "S"], ["W"], axis=0, block_size=block),
        helper.make_node("MatMul", ["x", "W"], ["y"]),
    ]
    initializers = [
        helper.make_tensor("Wq", TensorProto.INT4, [rows, columns], signed.ravel().tolist()),
        numpy_helper.from_array(quantized.scales, "S"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", ["batch", rows])],
        [float_input("y", ["batch", columns])],
        initializers,
        opset=21,
        ir_version=10,
    )
    x = np.random.default_rng(5).standard_normal((16, rows)).astype(np.float32)
    x[:, 3] *= 50.0
    want = x @ quantized.dequantize()
    exact = _session(proto, "off").run(None, {"x": x})[0]
    assert _relative(exact, want) < 1e-5
    optimized = tmp_path / "fused.onnx"
    fused = _session(proto, "default", optimized).run(None, {"x": x})[0]
    assert [n.op_type for n in onnx.load(str(optimized)).graph.node] == ["MatMulNBits"]
    assert _relative(fused, want) > 1e-3  # measured 1–5 %: not what the file says


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_gather_block_quantized_rows(tmp_path: Path, bits: int, symmetric: bool) -> None:
    vocab, hidden = 300, 80  # 80 / 32: a shorter last block, an odd block count
    table = np.random.default_rng(6).standard_normal((vocab, hidden)).astype(np.float32)
    proto = make_model(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed", axis=0)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [float_input("y", ["batch", "seq", hidden])],
        [numpy_helper.from_array(table, "table")],
        opset=21,
        ir_version=10,
    )
    model = model_from_proto(proto)
    graph = model.graph
    fmt = BlockFormat(bits, 32, symmetric)
    namer = Namer(graph)
    constants = gather_block_constants(namer, "table", table, fmt)
    write_gather_block_quantized(graph, namer, graph.nodes[0], constants, fmt)
    graph.cleanup().toposort()
    path = tmp_path / "g.onnx"
    save_model(model, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    restored = quantize_rtn(table.T, fmt).dequantize().T
    ids = np.random.default_rng(7).integers(0, vocab, (3, 9)).astype(np.int64)
    for level in LEVELS:
        got = _session(path, level).run(None, {"ids": ids})[0]
        np.testing.assert_allclose(got, restored[ids], rtol=1e-6, atol=1e-6)
    saved = {i.name: i for i in onnx.load(str(path)).graph.initializer}
    assert saved[f"table_int{bits}"].dims[1] == hidden * bits // 8
    with pytest.raises(ValueError, match="block size"):
        gather_block_constants(namer, "table", table, BlockFormat(4, 0))
