"""``quant``: each rule of QuantPass on tiny graphs, calibrators, and the bundled CNN end to end."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.cli.commands import main
from graphopt.data.calibration import (
    RunningHistogram,
    StatRequest,
    TensorStats,
    calibrated_range,
    collect,
)
from graphopt.data.feeds import open_data, synthesize
from graphopt.errors import DataError
from graphopt.ir.model import model_from_proto, save_model
from graphopt.ir.normalize import normalize
from graphopt.passkit.api import PassContext
from graphopt.passkit.qdq import activation_params, dequantize, quantize_weight
from passes.quant import QuantPass

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


def _feeds(proto: onnx.ModelProto, samples: int = 64, batch: int = 8, seed: int = 0):  # type: ignore[no-untyped-def]
    """Real-looking (not flagged synthetic) feeds: a Python list, as a user would pass."""
    model = model_from_proto(proto)
    normalize(model)
    batches = list(synthesize(model.graph, samples=samples, batch_size=batch, seed=seed))
    from graphopt.data.feeds import input_specs

    return open_data(batches, input_specs(model.graph))


def _quantize(proto: onnx.ModelProto, tmp_path: Path, **options: object):  # type: ignore[no-untyped-def]
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    options.setdefault("min_macs", 0)  # the tiny test graphs are below the default size rule
    result = QuantPass(options)(model, PassContext(data=_feeds(proto)))
    out = tmp_path / "q.onnx"
    save_model(result.model, out)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return out, result


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _ops(path: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _fused_ops(path: Path, tmp_path: Path) -> collections.Counter[str]:
    """Op types after ONNX Runtime's own optimizations: shows which integer kernels it uses."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(
        n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node
    )


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _mlp(hidden: int = 32) -> onnx.ModelProto:
    return relu_mlp(inputs=16, hidden=hidden, outputs=8, batch="n")


def _loud_channel_model(channels: list[int], gain: float) -> onnx.ModelProto:
    """x → MatMul → ×gain on ``channels`` → MatMul. The loud channels do not dominate the output
    (their weight rows are divided by the gain); they only stretch mm2's input range."""
    boost = np.ones(32, np.float32)
    boost[channels] = gain
    w2 = numpy_helper.to_array(weight("W2", (32, 8), 2)).copy()
    w2[channels] /= gain
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Mul", ["h", "boost"], ["hb"], name="boost"),
        helper.make_node("MatMul", ["hb", "W2"], ["y"], name="mm2"),
    ]
    return make_model(
        nodes,
        [float_input("x", ["n", 16])],
        [float_input("y", ["n", 8])],
        [
            weight("W1", (16, 32), 1),
            numpy_helper.from_array(boost, "boost"),
            numpy_helper.from_array(w2, "W2"),
        ],
    )


def _layer_norm_model(readers: list[onnx.NodeProto], weights: list[str]) -> onnx.ModelProto:
    """LayerNorm with one loud channel in its scale, read by ``readers``."""
    gamma = np.ones(16, np.float32)
    gamma[5] = 60.0  # an outlier channel produced by the LayerNorm scale
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n1"], axis=-1, name="ln"),
        *readers,
    ]
    return make_model(
        nodes,
        [float_input("x", ["n", 16])],
        [float_input("y", ["n", 16])],
        [numpy_helper.from_array(gamma, "gamma"), weight("beta", (16,), 3)]
        + [weight(name, (16, 16), index + 1) for index, name in enumerate(weights)],
    )


# --- arithmetic -----------------------------------------------------------------------------


def test_weight_quantization_is_symmetric_per_output_channel_and_keeps_zeros() -> None:
    values = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    values[:, 2] *= 100.0  # one loud output channel must not ruin the others
    values[1, :] = 0.0
    quantized, params = quantize_weight(values, axis=1)
    assert quantized.dtype == np.int8 and params.scale.shape == (4,)
    assert np.abs(quantized).max() <= 127 and not params.zero_point.any()
    assert (quantized[1] == 0).all()
    restored = dequantize(quantized, params)
    np.testing.assert_allclose(restored, values, atol=float(params.scale.max()) / 2 + 1e-6)
    assert np.abs(restored[:, 0] - values[:, 0]).max() < np.abs(values[:, 0]).max() / 100
    reduced, _ = quantize_weight(values, axis=1, reduce_range=True)
    assert np.abs(reduced).max() <= 63


def test_activation_params_keep_zero_exact() -> None:
    params = activation_params(0.5, 6.0, symmetric=False)  # range widened to contain 0
    assert params.zero_point.dtype == np.uint8 and int(params.zero_point) == 0
    params = activation_params(-2.0, 6.0, symmetric=False)
    assert -2.0 / float(params.scale) == pytest.approx(-float(params.zero_point), abs=0.5)
    symmetric = activation_params(-2.0, 6.0, symmetric=True)
    assert symmetric.zero_point.dtype == np.int8 and float(symmetric.scale) == pytest.approx(
        6 / 127
    )


def test_histogram_rebins_exactly_when_the_range_grows() -> None:
    histogram = RunningHistogram(bins=16)
    histogram.add(np.array([0.1, -0.2, 0.3]))
    before = histogram.counts.sum()
    histogram.add(np.array([5.0]))
    assert histogram.limit >= 5.0 and histogram.counts.sum() == before + 1


def test_calibrators_clip_outliers_differently() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(2_000_000), [40.0]])
    stats = TensorStats("t")
    stats.update(values, StatRequest("t", histogram=True))
    minmax = calibrated_range(stats, "minmax")
    assert minmax[1] == pytest.approx(40.0)
    for calibrator in ("percentile", "entropy", "mse"):
        low, high = calibrated_range(stats, calibrator)
        assert low < 0 < high < 20, calibrator


def test_masks_and_nonfinite_values_are_flagged() -> None:
    stats = TensorStats("mask")
    stats.update(np.array([0.0, -3.4e38, 0.0, -np.inf]), StatRequest("mask"))
    assert "attention mask" in (stats.unquantizable_reason or "")
    nan_only = TensorStats("nan")
    nan_only.update(np.full(8, np.nan), StatRequest("nan"))
    assert nan_only.nonfinite == 8 and "no finite values" in (nan_only.unquantizable_reason or "")


def test_collector_memory_does_not_keep_activations() -> None:
    proto = _mlp()
    model = model_from_proto(proto)
    normalize(model)
    feeds = _feeds(proto, samples=256, batch=16)
    stats = collect(model, feeds, [StatRequest("r", histogram=True, channel_sumsq=True, gram=True)])
    result = stats["r"]
    assert result.count == 256 * 32 and result.rows == 256
    assert result.gram is not None and result.gram.shape == (32, 32)
    assert result.histogram is not None and result.histogram.counts.size == 4096


def test_collector_rejects_empty_data() -> None:
    proto = _mlp()
    model = model_from_proto(proto)
    normalize(model)
    from graphopt.data.feeds import input_specs

    with pytest.raises(DataError, match="no samples"):
        collect(model, open_data([], input_specs(model.graph)), [StatRequest("r")])


# --- placement ------------------------------------------------------------------------------


def test_matmul_weights_become_int8_per_channel(tmp_path: Path) -> None:
    out, result = _quantize(_mlp(), tmp_path, target_cosine=0.0)
    assert result.modified and result.stats["quantized"] == 2
    inits = _initializers(out)
    assert inits["W1_quantized"].dtype == np.int8
    assert inits["W1_scale"].shape == (32,)
    assert "W1" not in inits, "the float weight must not stay in the model"
    dq_axes = {
        n.input[0]: {a.name: a.i for a in n.attribute}
        for n in onnx.load(str(out)).graph.node
        if n.op_type == "DequantizeLinear"
    }
    assert dq_axes["W1_quantized"] == {"axis": 1}
    fused = _fused_ops(out, tmp_path)  # ORT fuses mm1+Relu+Q into QLinearMatMul
    assert fused["MatMul"] == 0
    assert fused["QLinearMatMul"] + fused["MatMulIntegerToFloat"] == 2
    feed = {"x": np.random.default_rng(5).standard_normal((4, 16)).astype(np.float32)}
    assert _cosine(run_ort(_mlp(), feed)[0], run_ort(out, feed)[0]) > 0.995


def test_per_tensor_option_and_tensorrt_backend(tmp_path: Path) -> None:
    out, _ = _quantize(_mlp(), tmp_path, per_channel=False, backend="tensorrt", target_cosine=0.0)
    inits = _initializers(out)
    assert inits["W1_scale"].shape == ()
    assert inits["x_zero_point"].dtype == np.int8 and int(inits["x_zero_point"]) == 0


def test_gemm_trans_b_axis_and_int32_bias(tmp_path: Path) -> None:
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1, name="gemm")]
    proto = make_model(
        nodes,
        [float_input("x", ["n", 16])],
        [float_input("y", ["n", 8])],
        [weight("W", (8, 16), 1), weight("b", (8,), 2)],
    )
    out, _ = _quantize(proto, tmp_path, target_cosine=0.0)
    inits = _initializers(out)
    assert inits["W_scale"].shape == (8,)
    assert inits["b_quantized"].dtype == np.int32
    np.testing.assert_allclose(inits["b_scale"], inits["x_scale"] * inits["W_scale"], rtol=1e-6)
    axis = [
        a.i
        for n in onnx.load(str(out)).graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] == "W_quantized"
        for a in n.attribute
    ]
    assert axis == [0]
    feed = {"x": np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)}
    assert _cosine(run_ort(proto, feed)[0], run_ort(out, feed)[0]) > 0.995


def test_conv_gets_output_qdq_after_relu_and_becomes_qlinearconv(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["y"], name="pool"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", ["n", 3, 8, 8])],
        [float_input("y", ["n", 4, 1, 1])],
        [weight("W", (4, 3, 3, 3), 1), weight("B", (4,), 2)],
    )
    out, _ = _quantize(proto, tmp_path, target_cosine=0.0)
    graph = onnx.load(str(out)).graph
    relu = next(n for n in graph.node if n.op_type == "Relu")
    assert [n.op_type for n in graph.node if relu.output[0] in n.input] == ["QuantizeLinear"]
    assert _fused_ops(out, tmp_path)["QLinearConv"] == 1
    feed = {"x": np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert _cosine(run_ort(proto, feed)[0], run_ort(out, feed)[0]) > 0.99


def test_activation_matmul_skipped_unless_asked(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
        helper.make_node("Transpose", ["h"], ["ht"], perm=[1, 0], name="t"),
        helper.make_node("MatMul", ["h", "ht"], ["y"], name="scores"),
    ]
    proto = make_model(
        nodes, [float_input("x", [4, 8])], [float_input("y", [4, 4])], [weight("W", (8, 8))]
    )
    _, result = _quantize(proto, tmp_path, target_cosine=0.0)
    assert result.touched == ["proj"]
    assert result.stats["skipped"] == {"activation × activation MatMul": 1}
    _, result = _quantize(proto, tmp_path, target_cosine=0.0, quantize_act_matmul=True)
    assert sorted(result.touched) == ["proj", "scores"]


def test_include_and_exclude_globs(tmp_path: Path) -> None:
    _, result = _quantize(_mlp(), tmp_path, exclude=["mm2"], target_cosine=0.0)
    assert result.touched == ["mm1"]
    _, result = _quantize(_mlp(), tmp_path, include=["mm*2"], target_cosine=0.0)
    assert result.touched == ["mm2"]


def test_attention_mask_input_is_not_quantized(tmp_path: Path) -> None:
    mask = numpy_helper.from_array(np.array([0.0, -3.4e38] * 8, np.float32).reshape(1, 16), "mask")
    nodes = [
        helper.make_node("Add", ["x", "mask"], ["masked"], name="add_mask"),
        helper.make_node("MatMul", ["masked", "W"], ["y"], name="mm_masked"),
        helper.make_node("MatMul", ["x", "W"], ["z"], name="mm_clean"),
    ]
    proto = make_model(
        nodes,
        [float_input("x", ["n", 16])],
        [float_input("y", ["n", 4]), float_input("z", ["n", 4])],
        [mask, weight("W", (16, 4))],
    )
    _, result = _quantize(proto, tmp_path, target_cosine=0.0)
    assert result.touched == ["mm_clean"]
    assert result.stats["unquantizable_tensors"] == 1


def test_nothing_to_quantize_is_a_clean_result(tmp_path: Path) -> None:
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [float_input("x", ["n", 4])],
        [float_input("y", ["n", 4])],
    )
    out, result = _quantize(proto, tmp_path)
    assert not result.modified and result.stats["quantized"] == 0
    assert _ops(out) == {"Relu": 1}


def test_zeros_survive_quantization(tmp_path: Path) -> None:
    proto = _mlp()
    w1 = numpy_helper.to_array(proto.graph.initializer[0]).copy()
    w1[np.abs(w1) < 0.7] = 0.0
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    out, _ = _quantize(proto, tmp_path, target_cosine=0.0)
    assert ((_initializers(out)["W1_quantized"] == 0) == (w1 == 0)).all()


def test_accuracy_driven_mode_moves_the_most_harmful_node_back(tmp_path: Path) -> None:
    # mm2 reads an activation with one huge outlier channel: its quantization hurts the most.
    proto = _loud_channel_model([3], 500.0)
    _, result = _quantize(proto, tmp_path, target_cosine=0.9999, calibrator="minmax")
    assert "mm2" in result.stats["excluded_for_accuracy"]
    assert "mm2" not in result.touched


def test_smoothquant_folds_into_layernorm_and_helps(tmp_path: Path) -> None:
    proto = _layer_norm_model(
        [
            helper.make_node("MatMul", ["n1", "Wq"], ["q"], name="q_proj"),
            helper.make_node("MatMul", ["n1", "Wk"], ["k"], name="k_proj"),
            helper.make_node("Add", ["q", "k"], ["y"], name="add"),
        ],
        ["Wq", "Wk"],
    )
    feed = {"x": np.random.default_rng(9).standard_normal((64, 16)).astype(np.float32)}
    reference = run_ort(proto, feed)[0]
    plain, _ = _quantize(proto, tmp_path, target_cosine=0.0, per_channel=False)
    plain_cosine = _cosine(reference, run_ort(plain, feed)[0])
    smooth, _ = _quantize(proto, tmp_path, target_cosine=0.0, per_channel=False, smooth_alpha=0.5)
    assert _ops(smooth)["Mul"] == 0, "the division must fold into the LayerNorm"
    assert _cosine(reference, run_ort(smooth, feed)[0]) > plain_cosine


def test_output_is_deterministic(tmp_path: Path) -> None:
    first, _ = _quantize(_mlp(), tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    data_first = first.read_bytes()
    second, _ = _quantize(_mlp(), tmp_path)
    assert data_first == second.read_bytes()


# --- the bundled CNN, end to end --------------------------------------------------------------


def test_small_nodes_stay_float_by_default(tmp_path: Path) -> None:
    _, result = _quantize(_mlp(), tmp_path, min_macs=1e6)
    assert not result.modified
    assert result.stats["skipped"] == {"too small to gain from int8": 2}


def test_digits_cnn_quantized_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "digits_int8.onnx"
    # By default its layers are too small to gain from int8 (rule 11): nothing changes.
    args = [
        "optimize",
        str(DIGITS_MODEL),
        str(out),
        "--passes",
        "cleanup,quant",
        "--calib-data",
        str(DIGITS_DATA),
    ]
    code = main(args)
    stdout = capsys.readouterr().out
    assert code == 0 and "quantized=0" in stdout and "too small to gain" in stdout
    code = main([*args, "-o", "quant.min_macs=0", "--min-top1", "0.95"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "plan: cleanup → quant" in stdout
    fused = _fused_ops(out, tmp_path)
    assert fused["QLinearConv"] == 2, fused
    labels = np.load(DIGITS_MODEL.parent / "digits_sample_labels.npy")
    images = np.load(DIGITS_DATA)["image"]
    predicted = run_ort(out, {"image": images})[0].argmax(axis=1)
    assert (predicted == labels).mean() >= 0.95


def test_bad_calibration_data_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=np.zeros((4, 8, 8), np.float32))
    code = main(
        [
            "optimize",
            str(DIGITS_MODEL),
            str(tmp_path / "o.onnx"),
            "--passes",
            "quant",
            "--calib-data",
            str(bad),
        ]
    )
    stderr = capsys.readouterr().err
    assert code == 2 and "expects rank 4" in stderr
    assert not (tmp_path / "o.onnx").exists()


# --- other schemes --------------------------------------------------------------------------


def test_dynamic_mode_uses_ort_dynamic_kernels(tmp_path: Path) -> None:
    out, result = _quantize(_mlp(), tmp_path, mode="dynamic", target_cosine=0.0)
    assert result.stats["by_scheme"] == {"dynamic": 2}
    assert _ops(out)["DynamicQuantizeLinear"] == 2 and _ops(out)["MatMul"] == 0
    fused = _fused_ops(out, tmp_path)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 2, fused
    feed = {"x": np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)}
    assert _cosine(run_ort(_mlp(), feed)[0], run_ort(out, feed)[0]) > 0.995


def test_int4_blocks_round_trip_and_match_matmulnbits(tmp_path: Path) -> None:
    from passes.quant import pack_int4_blocks, unpack_int4_blocks

    values = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)  # K not /32
    packed, scales = pack_int4_blocks(values, 32)
    assert packed.shape == (6, 2, 16) and scales.shape == (12,)
    restored = unpack_int4_blocks(packed, scales, 40)
    assert np.abs(restored - values).max() <= scales.max() / 2 + 1e-6
    out, _ = _quantize(
        _mlp(hidden=64), tmp_path, weight_bits=4, block_size=16, target_cosine=0.0, symmetric=True
    )
    assert _ops(out)["MatMulNBits"] == 2
    inits = _initializers(out)
    feed = {"x": np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)}
    # ORT's kernel must compute exactly what the packed weights mean.
    w1 = unpack_int4_blocks(inits["W1_int4"], inits["W1_int4_scales"], 16)
    w2 = unpack_int4_blocks(inits["W2_int4"], inits["W2_int4_scales"], 64)
    expected = np.maximum(feed["x"] @ w1, 0) @ w2
    np.testing.assert_allclose(run_ort(out, feed)[0], expected, rtol=1e-3, atol=1e-3)


def test_int4_asymmetric_blocks_with_zero_points_and_accuracy_level(tmp_path: Path) -> None:
    from passes.quant import unpack_int4_blocks

    out, result = _quantize(
        _mlp(hidden=48),
        tmp_path,
        weight_bits=4,
        block_size=32,
        target_cosine=0.0,
        accuracy_level=4,
        rounding="nearest",  # the weights themselves are compared below
    )
    assert result.stats["by_scheme"] == {"int4": 2}
    inits = _initializers(out)
    assert inits["W1_int4_zero_points"].dtype == np.uint8  # rule 8: asymmetric by default
    node = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "MatMulNBits")
    assert {a.name: a.i for a in node.attribute}["accuracy_level"] == 4
    w2 = unpack_int4_blocks(
        inits["W2_int4"], inits["W2_int4_scales"], 48, inits["W2_int4_zero_points"]
    )
    reference = numpy_helper.to_array(weight("W2", (48, 8), 2))
    assert np.abs(w2 - reference).max() < 0.2 * np.abs(reference).max()
    feed = {"x": np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)}
    assert _cosine(run_ort(_mlp(hidden=48), feed)[0], run_ort(out, feed)[0]) > 0.99


def test_int4_without_the_accuracy_loop_or_data_writes_a_valid_model(tmp_path: Path) -> None:
    """Regression (issue 19): with ``target_cosine=0``, or without data, ``weight_bits=4``
    wrote MatMulNBits without importing the com.microsoft domain (an invalid model)."""
    from graphopt.pipeline import optimize

    source = tmp_path / "mlp.onnx"
    onnx.save(_mlp(hidden=64), str(source))
    # held-out feeds from the calibration data's distribution (GPTQ fits that distribution)
    feed = next(iter(_feeds(_mlp(hidden=64), seed=5)))
    reference = run_ort(source, feed)[0]
    for label, data in (("no-loop", _feeds(_mlp(hidden=64))), ("no-data", None)):
        out = tmp_path / f"{label}.onnx"
        optimize(
            source,
            out,
            ["quant"],
            options={"quant": {"weight_bits": 4, "target_cosine": 0, "min_macs": 0}},
            data=data,
            validate=False,
        )
        saved = onnx.load(str(out))
        assert {o.domain for o in saved.opset_import} >= {"", "com.microsoft"}, label
        onnx.checker.check_model(saved, full_check=True)
        assert _ops(out)["MatMulNBits"] == 2, label
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert _cosine(reference, session.run(None, feed)[0]) > 0.99, label


def test_int4_dequantize_layout_asks_for_opset_21(tmp_path: Path) -> None:
    from graphopt.pipeline import optimize

    source = tmp_path / "mlp.onnx"
    onnx.save(_mlp(hidden=64), str(source))  # opset 17
    assert QuantPass({"weight_bits": 4, "int4_layout": "dequantize"}).required_opset() == 21
    assert QuantPass({"weight_bits": 4}).required_opset() == 13
    out = tmp_path / "dq.onnx"
    optimize(
        source,
        out,
        ["quant"],
        options={
            "quant": {
                "weight_bits": 4,
                "int4_layout": "dequantize",
                "target_cosine": 0,
                "min_macs": 0,
            }
        },
        data=_feeds(_mlp(hidden=64)),
        validate=False,
    )
    saved = onnx.load(str(out))
    onnx.checker.check_model(saved, full_check=True)
    assert next(o.version for o in saved.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert _ops(out)["DequantizeLinear"] == 2 and _ops(out)["MatMulNBits"] == 0
    feed = next(iter(_feeds(_mlp(hidden=64), seed=6)))  # the calibration data's distribution
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert _cosine(run_ort(source, feed)[0], session.run(None, feed)[0]) > 0.99


def test_int4_dequantize_layout_below_opset_21_writes_matmulnbits(tmp_path: Path) -> None:
    """Called without the pipeline's upgrade, an opset-17 model keeps MatMulNBits, noted."""
    out, result = _quantize(
        _mlp(), tmp_path, weight_bits=4, int4_layout="dequantize", target_cosine=0.0
    )
    assert "opset 17" in result.stats["int4_layout"]
    assert _ops(out)["MatMulNBits"] == 2


def test_int4_embeddings_become_gather_block_quantized(tmp_path: Path) -> None:
    vocab, hidden = 2048, 64  # 131072 values: above the embedding threshold
    table = np.random.default_rng(7).standard_normal((vocab, hidden)).astype(np.float32)
    proto = make_model(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
            helper.make_node("MatMul", ["e", "W"], ["y"], name="mm"),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5])],
        [float_input("y", ["n", 5, 8])],
        [numpy_helper.from_array(table, "table"), weight("W", (hidden, 8), 3)],
    )
    out, result = _quantize(
        proto, tmp_path, weight_bits=4, embedding_bits=4, block_size=32, target_cosine=0.0
    )
    assert result.stats["embeddings"] == 1
    assert _ops(out)["GatherBlockQuantized"] == 1 and _ops(out)["Gather"] == 0
    assert _initializers(out)["table_int4"].shape == (vocab, hidden // 2)
    feed = {"ids": np.random.default_rng(8).integers(0, vocab, (3, 5)).astype(np.int64)}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert _cosine(run_ort(proto, feed)[0], session.run(None, feed)[0]) > 0.99


def test_int4_block_size_must_be_a_power_of_two() -> None:
    from graphopt.errors import OptionError

    with pytest.raises(OptionError, match="quant.block_size"):
        QuantPass({"block_size": 48})
    with pytest.raises(OptionError, match="quant.int4_layout"):
        QuantPass({"int4_layout": "qdq"})


def test_bad_weight_bits_is_rejected() -> None:
    from graphopt.errors import OptionError

    with pytest.raises(OptionError, match="quant.weight_bits"):
        QuantPass({"weight_bits": "6"})


def test_outlier_split_keeps_loud_channels_in_float(tmp_path: Path) -> None:
    proto = _loud_channel_model([3, 17], 300.0)
    feed = {"x": np.random.default_rng(6).standard_normal((32, 16)).astype(np.float32)}
    reference = run_ort(proto, feed)[0]
    plain, _ = _quantize(proto, tmp_path, target_cosine=0.0, calibrator="minmax")
    plain_cosine = _cosine(reference, run_ort(plain, feed)[0])
    split, result = _quantize(
        proto, tmp_path, target_cosine=0.0, calibrator="minmax", outlier_threshold=20
    )
    assert result.stats["by_scheme"] == {"static": 1, "split": 1}
    index = _initializers(split)["mm2_outliers_index"]
    assert sorted(index.tolist()) == [3, 17]
    assert _cosine(reference, run_ort(split, feed)[0]) > max(plain_cosine, 0.999)


def test_fallback_dynamic_reports_what_moved(tmp_path: Path) -> None:
    proto = _loud_channel_model([3], 500.0)
    _, result = _quantize(
        proto, tmp_path, target_cosine=0.9999, calibrator="minmax", fallback="dynamic"
    )
    moved = set(result.stats.get("dynamic_for_accuracy", [])) | set(
        result.stats.get("excluded_for_accuracy", {})
    )
    assert "mm2" in moved


def test_embedding_tables_become_int8_rows(tmp_path: Path) -> None:
    table = np.random.default_rng(0).standard_normal((1000, 72)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")]
    proto = make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5])],
        [float_input("y", ["n", 5, 72])],
        [numpy_helper.from_array(table, "table")],
    )
    out, result = _quantize(proto, tmp_path)
    assert result.modified and result.stats["embeddings"] == 1
    inits = _initializers(out)
    assert inits["table_quantized"].dtype == np.int8 and inits["table_row_scale"].shape == (1000, 1)
    ids = np.array([[0, 5, 999, 5, 17]], np.int64)
    got = run_ort(out, {"ids": ids})[0]
    np.testing.assert_allclose(got, table[ids], atol=float(inits["table_row_scale"].max()))
    _, result = _quantize(proto, tmp_path, embeddings=False)
    assert not result.modified


def test_outlier_smoothing_uses_a_layernorm_copy_when_others_read_it(tmp_path: Path) -> None:
    proto = _layer_norm_model(
        [
            helper.make_node("MatMul", ["n1", "Wq"], ["q"], name="q_proj"),
            helper.make_node("Add", ["q", "n1"], ["y"], name="residual"),
        ],
        ["Wq"],
    )
    feed = {"x": np.random.default_rng(9).standard_normal((64, 16)).astype(np.float32)}
    reference = run_ort(proto, feed)[0]
    plain, _ = _quantize(proto, tmp_path, target_cosine=0.0, per_channel=False)
    plain_cosine = _cosine(reference, run_ort(plain, feed)[0])
    smooth, _ = _quantize(
        proto, tmp_path, target_cosine=0.0, per_channel=False, smooth_outliers=True
    )
    ops = _ops(smooth)
    assert ops["LayerNormalization"] == 2 and ops["Mul"] == 0
    assert _cosine(reference, run_ort(smooth, feed)[0]) > plain_cosine


def test_calibration_reports_progress(tmp_path: Path) -> None:
    import graphopt

    events: list[tuple[str, dict]] = []
    graphopt.optimize(
        DIGITS_MODEL,
        tmp_path / "o.onnx",
        ["quant"],
        data=DIGITS_DATA,
        options={"quant": {"min_macs": 0, "target_cosine": 0}},
        validate=False,
        on_event=lambda kind, info: events.append((kind, info)),
    )
    progress = [info for kind, info in events if kind == "progress"]
    assert [p["index"] for p in progress] == list(range(8))
    assert progress[0]["label"] == "quant: calibrating"


def _deep_mlp(seed: int = 3) -> onnx.ModelProto:
    """x → 4 × (MatMul 128×128 → Relu) → y: later layers see earlier layers' int4 error."""
    rng = np.random.default_rng(seed)
    nodes, initializers, previous = [], [], "x"
    for index in range(4):
        scales = np.geomspace(4.0, 0.25, 128)[:, None]
        values = (rng.standard_normal((128, 128)) * scales / np.sqrt(128)).astype(np.float32)
        initializers.append(numpy_helper.from_array(values, f"W{index}"))
        nodes.append(
            helper.make_node("MatMul", [previous, f"W{index}"], [f"h{index}"], name=f"mm{index}")
        )
        nodes.append(helper.make_node("Relu", [f"h{index}"], [f"r{index}"], name=f"relu{index}"))
        previous = f"r{index}"
    nodes[-1] = helper.make_node("Relu", ["h3"], ["y"], name="relu3")
    return make_model(
        nodes, [float_input("x", ["n", 128])], [float_input("y", ["n", 128])], initializers
    )


def test_int4_gptq_and_sequential_rounding_beat_round_to_nearest(tmp_path: Path) -> None:
    """Rule 8: GPTQ lowers the int4 output error on the calibration distribution, and the
    sequential fit (each layer on the input the quantized layers before it give it) lowers it
    further."""
    proto = _deep_mlp()
    feeds = [next(iter(_feeds(proto, seed=seed))) for seed in (11, 12)]
    errors = {}
    for rounding in ("nearest", "gptq", "sequential"):
        model = model_from_proto(proto)
        normalize(model, materialize_weights=True)
        options = {"weight_bits": 4, "target_cosine": 0.0, "rounding": rounding, "min_macs": 0}
        # 512 rows for 128 channels, damped as a small calibration set needs
        result = QuantPass({**options, "gptq_damp": 0.1})(
            model, PassContext(data=_feeds(proto, samples=512))
        )
        out = tmp_path / f"{rounding}.onnx"
        save_model(result.model, out)
        assert result.stats["by_scheme"] == {"int4": 4}
        errors[rounding] = sum(
            float(np.linalg.norm(run_ort(out, feed)[0] - run_ort(proto, feed)[0])) for feed in feeds
        )
    assert errors["gptq"] < 0.85 * errors["nearest"]
    assert errors["sequential"] < 0.92 * errors["gptq"]


def test_int4_rounding_auto_follows_the_data(tmp_path: Path) -> None:
    """Rule 8: ``auto`` fits sequentially with real data and rounds to nearest without."""
    from graphopt.pipeline import optimize

    source = tmp_path / "deep.onnx"
    onnx.save(_deep_mlp(), str(source))
    options = {"quant": {"weight_bits": 4, "target_cosine": 0, "min_macs": 0}}
    outputs = {}
    for label, data in (("real", _feeds(_deep_mlp(), samples=512)), ("none", None)):
        outputs[label] = tmp_path / f"{label}.onnx"
        optimize(source, outputs[label], ["quant"], options=options, data=data, validate=False)
    explicit = tmp_path / "explicit.onnx"
    optimize(
        source,
        explicit,
        ["quant"],
        options={"quant": {**options["quant"], "rounding": "sequential"}},
        data=_feeds(_deep_mlp(), samples=512),
        validate=False,
    )
    nearest = tmp_path / "nearest.onnx"
    optimize(
        source,
        nearest,
        ["quant"],
        options={"quant": {**options["quant"], "rounding": "nearest"}},
        data=None,
        validate=False,
    )
    assert sha256_of(outputs["real"]) == sha256_of(explicit)
    assert sha256_of(outputs["none"]) == sha256_of(nearest)
    assert sha256_of(outputs["real"]) != sha256_of(outputs["none"])


def test_int4_gptq_needs_two_rows_per_input_channel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule 8: with fewer calibration rows than 2 per input channel H is (nearly) singular;
    such a node keeps round-to-nearest weights, and the log says why."""
    proto = _deep_mlp()
    with caplog.at_level(logging.INFO, logger="passes.quant"):
        few, _ = _quantize(proto, tmp_path, weight_bits=4, target_cosine=0.0, rounding="gptq")
    nearest = tmp_path / "nearest.onnx"
    few.rename(tmp_path / "few.onnx")
    out, _ = _quantize(proto, tmp_path, weight_bits=4, target_cosine=0.0, rounding="nearest")
    out.rename(nearest)
    assert sha256_of(tmp_path / "few.onnx") == sha256_of(nearest)
    assert "64 calibration rows for 128 input channels" in caplog.text


def test_int4_nodes_step_down_to_int8_before_float(tmp_path: Path) -> None:
    """Rule 8 in accuracy-driven mode: a harmful int4 node tries int8 blocks first, and the
    report says which precision every node ended with."""
    proto = _deep_mlp()
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    options = {"weight_bits": 4, "target_cosine": 0.9999, "rounding": "nearest", "min_macs": 0}
    result = QuantPass(options)(model, PassContext(data=_feeds(proto, samples=128)))
    precision = result.stats["precision"]
    assert set(precision) == {"mm0", "mm1", "mm2", "mm3"}
    assert "int8" in precision.values()
    assert sorted(result.stats["int8_for_accuracy"]) == sorted(
        name for name, bits in precision.items() if bits == "int8"
    )
    out = tmp_path / "mixed.onnx"
    save_model(result.model, out)
    bits = [
        next(a.i for a in node.attribute if a.name == "bits")
        for node in onnx.load(str(out)).graph.node
        if node.op_type == "MatMulNBits"
    ]
    assert sorted(bits) == sorted(
        {"int4": 4, "int8": 8}[value] for value in precision.values() if value != "float"
    )


def test_int4_rounding_auto_rounds_large_models_to_nearest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rule 8: above SEQUENTIAL_AUTO_MAX_BYTES of weights ``auto`` rounds to nearest (the
    sequential fit is not yet within the memory bound on multi-GB models)."""
    import passes.quant as quant

    proto = _deep_mlp()
    outputs = []
    for limit in (0, 1 << 40):
        monkeypatch.setattr(quant, "SEQUENTIAL_AUTO_MAX_BYTES", limit)
        model = model_from_proto(proto)
        normalize(model, materialize_weights=True)
        options = {"weight_bits": 4, "target_cosine": 0.0, "min_macs": 0}
        result = QuantPass(options)(model, PassContext(data=_feeds(proto, samples=512)))
        outputs.append(tmp_path / f"limit{limit}.onnx")
        save_model(result.model, outputs[-1])
    nearest, _ = _quantize(proto, tmp_path, weight_bits=4, target_cosine=0.0, rounding="nearest")
    assert sha256_of(outputs[0]) == sha256_of(nearest)
    assert sha256_of(outputs[1]) != sha256_of(nearest)
