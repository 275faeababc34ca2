"""``quant`` on the models exporters really write: old opsets (rule 13), control-flow bodies and
recurrent ops (rule 14). Issue 15 items 1 and 3."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import InputError

from ..conftest import float_input, make_model, run_ort, sha256_of, weight

LIGHT_ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _conv_mlp(opset: int, ir_version: int = 7) -> onnx.ModelProto:
    """x[n,3,8,8] → Conv(8) → Relu → Flatten → Gemm(16) → MatMul(4): every weight op quant knows."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Conv", ["x", "Wc", "bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "Wm"], ["y"], name="matmul"),
    ]
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "Wc"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "bc"),
        numpy_helper.from_array(rng.standard_normal((16, 512)).astype(np.float32) * 0.05, "Wg"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "bg"),
        weight("Wm", (16, 4), 6),
    ]
    return make_model(
        nodes,
        [float_input("x", ["n", 3, 8, 8])],
        [float_input("y", ["n", 4])],
        initializers,
        opset=opset,
        ir_version=ir_version,
    )


def _data(samples: int = 32) -> list[dict[str, np.ndarray]]:
    x = np.random.default_rng(7).standard_normal((samples, 3, 8, 8)).astype(np.float32)
    return [{"x": x[start : start + 8]} for start in range(0, samples, 8)]


def _opset(path: Path) -> int:
    proto = onnx.load(str(path))
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _dq_axes(path: Path) -> list[int | None]:
    axes = []
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "DequantizeLinear":
            attrs = {a.name: a.i for a in node.attribute}
            axes.append(attrs.get("axis"))
    return axes


@pytest.mark.parametrize("opset", [9, 11, 12])
def test_old_opsets_are_upgraded_for_per_channel_weights(tmp_path: Path, opset: int) -> None:
    """Before: 'Unrecognized attribute: axis for operator DequantizeLinear' (opset 11/12) or
    'No Op registered for QuantizeLinear with domain_version of 9'."""
    source = tmp_path / "old.onnx"
    onnx.save(_conv_mlp(opset), str(source))
    before = sha256_of(source)
    events: list[tuple[str, dict]] = []
    report = graphopt.optimize(
        source,
        tmp_path / "q.onnx",
        ["quant"],
        data=_data(),
        options={"quant": {"min_macs": 0, "target_cosine": 0}},
        on_event=lambda kind, info: events.append((kind, info)),
    )
    out = tmp_path / "q.onnx"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _opset(out) == 13 and report.opset == {
        "source": opset,
        "target": 13,
        "converted": True,
        "reason": None,
    }
    assert any(kind == "opset" and "13" in info["description"] for kind, info in events)
    assert report.run.records[0].stats["quantized"] == 3
    assert 0 in _dq_axes(out) or 1 in _dq_axes(out)  # per-channel weights
    assert report.validation is not None and report.validation.passed
    assert sha256_of(source) == before


def _old_model_without_converter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, opset: int, complaint: str
) -> Path:
    """The conv MLP saved at ``opset``, with onnx's version converter failing as it does when
    it has no adapter for some op."""

    def no_adapter(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
        raise RuntimeError(f"adapter_lookup: Assertion `false` failed: {complaint}")

    monkeypatch.setattr("graphopt.ir.opset.version_converter.convert_version", no_adapter)
    source = tmp_path / "old.onnx"
    onnx.save(_conv_mlp(opset), str(source))
    return source


def test_converter_failure_falls_back_to_per_tensor_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = _old_model_without_converter(tmp_path, monkeypatch, 12, "No Adapter For Conv")
    opset_logger = logging.getLogger("graphopt.ir.opset")
    opset_logger.addHandler(caplog.handler)  # whatever other tests did to propagation
    try:
        with caplog.at_level(logging.WARNING, logger="graphopt.ir.opset"):
            report = graphopt.optimize(
                source,
                tmp_path / "q.onnx",
                ["quant"],
                data=_data(),
                options={"quant": {"min_macs": 0, "target_cosine": 0}},
            )
    finally:
        opset_logger.removeHandler(caplog.handler)
    out = tmp_path / "q.onnx"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _opset(out) == 12
    stats = report.run.records[0].stats
    assert stats["quantized"] == 3
    assert "No Adapter For Conv" in stats["per_tensor_weights"]
    assert set(_dq_axes(out)) == {None}  # nothing needs per-axis Q/DQ at opset 12
    assert report.opset is not None and report.opset["converted"] is False
    assert "cannot upgrade the model from opset 12 to 13" in caplog.text
    assert report.validation is not None and report.validation.passed


def test_below_opset_10_without_an_upgrade_quant_refuses_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _old_model_without_converter(
        tmp_path, monkeypatch, 9, "No Adapter From Version $9 for Upsample"
    )
    with pytest.raises(InputError, match=r"opset ≥ 10 .* opset 9 .*Upsample"):
        graphopt.optimize(source, tmp_path / "q.onnx", ["quant"], data=_data())
    assert not (tmp_path / "q.onnx").exists()


def test_passes_without_opset_needs_leave_the_opset_alone(tmp_path: Path) -> None:
    source = tmp_path / "old.onnx"
    onnx.save(_conv_mlp(11), str(source))
    report = graphopt.optimize(source, tmp_path / "c.onnx", ["cleanup"], data=_data())
    assert report.opset is None and _opset(tmp_path / "c.onnx") == 11


@pytest.mark.parametrize("name", ["light_squeezenet", "light_shufflenet", "light_inception_v1"])
def test_light_zoo_opset_9_quantizes_to_valid_smaller_weights(tmp_path: Path, name: str) -> None:
    """onnx's own light zoo (opset 9, IR 3, Caffe2-era initializer inputs and ConstantOfShape
    weights): quant upgrades, quantizes and the result loads and runs in ONNX Runtime. The
    input file builds its weights with ConstantOfShape, so "smaller" is measured against the
    same model with float weights (cleanup materialises none, so normalization's is used)."""
    source = LIGHT_ZOO / f"{name}.onnx"
    if not source.exists():
        pytest.skip(f"{source} is not in this onnx package")
    report = graphopt.optimize(
        source, tmp_path / "q.onnx", ["quant"], options={"quant": {"min_macs": 0}}
    )
    out = tmp_path / "q.onnx"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _opset(out) == 13
    stats = report.run.records[0].stats
    assert stats["quantized"] >= 20
    float_weights = graphopt.load_model(source)
    graphopt.normalize(float_weights, materialize_weights=True)
    assert report.output_bytes < 0.4 * float_weights.weight_bytes()
    assert report.validation is not None and report.validation.comparisons[0].nan_candidate == 0


def _branch(name: str, weight_name: str, output: str) -> onnx.GraphProto:
    """A body holding a Conv and a MatMul on Constant-node weights (torch/Paddle style)."""
    rng = np.random.default_rng(len(name))
    conv_w = rng.standard_normal((16, 2, 3, 3)).astype(np.float32) * 0.4
    mm_w = rng.standard_normal((256, 64)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node(
            "Constant", [], [f"{weight_name}_c"], value=numpy_helper.from_array(conv_w)
        ),
        helper.make_node("Constant", [], [f"{weight_name}_m"], value=numpy_helper.from_array(mm_w)),
        helper.make_node(
            "Conv",
            ["x", f"{weight_name}_c"],
            [f"{name}_conv"],
            pads=[1, 1, 1, 1],
            name=f"{name}_conv",
        ),
        helper.make_node("Relu", [f"{name}_conv"], [f"{name}_relu"]),
        helper.make_node(
            "Reshape", [f"{name}_relu", "flat_shape"], [f"{name}_flat"], name=f"{name}_reshape"
        ),
        helper.make_node(
            "MatMul", [f"{name}_flat", f"{weight_name}_m"], [output], name=f"{name}_mm"
        ),
    ]
    return helper.make_graph(nodes, name, [], [float_input(output, ["n", 64])])


def _if_model() -> onnx.ModelProto:
    """Like silero-VAD: every weight is a Constant node inside the branches of an If on a flag."""
    nodes = [
        helper.make_node("Equal", ["sr", "sr16k"], ["is16k"], name="check_sr"),
        helper.make_node(
            "If",
            ["is16k"],
            ["y"],
            name="by_rate",
            then_branch=_branch("then", "w16", "t_out"),
            else_branch=_branch("else", "w8", "e_out"),
        ),
    ]
    return make_model(
        nodes,
        [
            float_input("x", ["n", 2, 4, 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [float_input("y", ["n", 64])],
        [
            numpy_helper.from_array(np.array(16000, np.int64), "sr16k"),
            numpy_helper.from_array(np.array([-1, 256], np.int64), "flat_shape"),
        ],
        opset=16,
    )


def test_weights_inside_if_branches_are_quantized(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: 'nothing to quantize'. Bodies cannot be calibrated, so the MatMuls go dynamic and
    the Convs int8 weight-only; every node says why in the log."""
    source = tmp_path / "vad_like.onnx"
    onnx.save(_if_model(), str(source))
    x = np.random.default_rng(3).standard_normal((16, 2, 4, 4)).astype(np.float32)
    data = [{"x": x[i : i + 4], "sr": np.array(16000, np.int64)} for i in range(0, 16, 4)]
    with caplog.at_level(logging.INFO, logger="passes.quant"):
        report = graphopt.optimize(
            source,
            tmp_path / "q.onnx",
            ["quant"],
            data=data,
            options={"quant": {"min_macs": 0}},
            criteria=graphopt.Criteria(min_cosine=0.98, min_snr_db=15),
        )
    stats = report.run.records[0].stats
    assert stats["quantized"] == 4 and stats["in_control_flow_bodies"] == 4
    assert stats["by_scheme"] == {"weight-only": 2, "dynamic": 2}
    assert caplog.text.count("inside a control-flow body") == 4
    out = tmp_path / "q.onnx"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    for rate in (16000, 8000):  # both branches, including the one calibration never took
        feed = {"x": x[:4], "sr": np.array(rate, np.int64)}
        want, got = run_ort(source, feed)[0], run_ort(out, feed)[0]
        cosine = float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got))
        assert cosine > 0.99, rate
        assert not np.array_equal(want, got)  # it really is quantized
    assert report.output_bytes < report.input_bytes


def test_recurrent_nodes_stay_float_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(9)
    hidden = 8
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R"], ["seq", "h"], name="lstm", hidden_size=hidden),
    ]
    proto = make_model(
        nodes,
        [float_input("x", [5, "n", 4])],
        [float_input("seq", [5, 1, "n", hidden])],
        [
            numpy_helper.from_array(
                rng.standard_normal((1, 4 * hidden, 4)).astype(np.float32), "W"
            ),
            numpy_helper.from_array(
                rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R"
            ),
        ],
    )
    source = tmp_path / "lstm.onnx"
    onnx.save(proto, str(source))
    x = rng.standard_normal((5, 8, 4)).astype(np.float32)
    with caplog.at_level(logging.INFO, logger="passes.quant"):
        report = graphopt.optimize(source, tmp_path / "q.onnx", ["quant"], data=[{"x": x}])
    assert "lstm (LSTM): recurrent op" in caplog.text
    assert report.run.records[0].stats["skipped"] == {
        "recurrent op: the standard domain has no quantized LSTM/GRU/RNN": 1
    }


def _packed_head() -> onnx.ModelProto:
    """A detector-style output: 4 large box columns next to 8 sigmoid score columns."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["feat", "Wb"], ["boxes"], name="box_head"),
        helper.make_node("MatMul", ["cls", "Ws"], ["logits"], name="score_head"),
        helper.make_node("Sigmoid", ["logits"], ["scores"], name="sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["out"], name="pack", axis=1),
    ]
    return make_model(
        nodes,
        [float_input("feat", ["n", 64]), float_input("cls", ["n", 64])],
        [float_input("out", ["n", 12])],
        [
            numpy_helper.from_array((rng.standard_normal((64, 4)) * 30).astype(np.float32), "Wb"),
            numpy_helper.from_array((rng.standard_normal((64, 8)) * 0.3).astype(np.float32), "Ws"),
        ],
    )


def test_accuracy_loop_protects_small_channels_the_whole_tensor_hides(tmp_path: Path) -> None:
    """Issue 15.2: the loop scores with the gate's worst-channel figure. The score columns'
    input has one loud channel, so int8 blurs the scores while the whole-tensor cosine, ruled
    by the box columns, stays at 0.9999: the old whole-tensor loop kept everything int8."""
    source = tmp_path / "head.onnx"
    onnx.save(_packed_head(), str(source))
    rng = np.random.default_rng(1)
    feat = rng.standard_normal((256, 64)).astype(np.float32)
    cls = rng.standard_normal((256, 64)).astype(np.float32)
    cls[:, 0] *= 300
    data = [{"feat": feat[i : i + 16], "cls": cls[i : i + 16]} for i in range(0, 256, 16)]
    blind = graphopt.optimize(
        source,
        tmp_path / "all.onnx",
        ["quant"],
        data=data,
        options={"quant": {"min_macs": 0, "target_cosine": 0}},
    )
    comparison = blind.validation.comparisons[0]  # type: ignore[union-attr]
    assert comparison.cosine > 0.9999 and comparison.worst_channel_cosine < 0.99
    assert not blind.passed and comparison.worst_channel.startswith("axis 1 index ")
    driven = graphopt.optimize(
        source, tmp_path / "driven.onnx", ["quant"], data=data, options={"quant": {"min_macs": 0}}
    )
    assert list(driven.run.records[0].stats["excluded_for_accuracy"]) == ["score_head"]
    assert driven.passed


def _rapidocr_model(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("rapidocr-onnxruntime is not installed (pip install --no-deps it)")
    path = Path(spec.submodule_search_locations[0]) / "models" / name
    if not path.exists():
        pytest.skip(f"{path} is missing")
    return path


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("ch_PP-OCRv4_det_infer.onnx", (1, 3, 96, 96)),
        ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (1, 3, 48, 192)),
        ("ch_PP-OCRv4_rec_infer.onnx", (1, 3, 48, 160)),
    ],
)
def test_paddle_ocr_models_quantize_to_valid_smaller_models(
    tmp_path: Path, name: str, shape: tuple[int, ...]
) -> None:
    """Issue 15 done-when: Paddle2ONNX opset 11/12 OCR models through quant give valid, smaller
    models (before: 'Unrecognized attribute: axis for operator DequantizeLinear')."""
    source = _rapidocr_model(name)
    report = graphopt.optimize(
        source,
        tmp_path / "q.onnx",
        ["cleanup", "quant"],
        input_shapes={"x": shape},
        options={"quant": {"min_macs": 0}},
        validate=False,
    )
    out = tmp_path / "q.onnx"
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert _opset(out) == 13 and report.opset is not None and report.opset["converted"]
    stats = report.run.records[-1].stats
    assert stats["quantized"] >= 10 and "per_tensor_weights" not in stats
    assert report.output_bytes < 0.6 * report.input_bytes
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    (got,) = run_ort(out, {"x": x})[:1]
    assert np.isfinite(got).all()


def test_silero_vad_weights_inside_its_if_are_quantized(tmp_path: Path) -> None:
    """The real model of issue 15.3: before, quant reported nothing to do."""
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("silero-vad is not installed (pip install --no-deps silero-vad==6.2.3)")
    source = Path(spec.submodule_search_locations[0]) / "data" / "silero_vad.onnx"
    report = graphopt.optimize(source, tmp_path / "q.onnx", ["cleanup", "quant"], validate=False)
    stats = report.run.records[-1].stats
    assert stats["in_control_flow_bodies"] == stats["quantized"] == 12  # 6 Conv1d per branch
    assert stats["skipped"] == {
        "recurrent op: the standard domain has no quantized LSTM/GRU/RNN": 4
    }
    assert report.output_bytes < 0.7 * report.input_bytes
    onnx.checker.check_model(onnx.load(str(tmp_path / "q.onnx")), full_check=True)
