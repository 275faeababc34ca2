"""Input checks that name the real problem: non-finite option values and data, unreadable .npz
files, and shapes as stored in the file."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from graphopt.data.feeds import InputSpec, input_specs, open_data
from graphopt.errors import DataError, OptionError
from graphopt.ir.model import model_from_proto
from graphopt.passkit.options import FiniteFloat, Option, resolve_options
from graphopt.pipeline import _feeds_for

from ..conftest import float_input, make_model

# --- (a) option values ---------------------------------------------------------------------

_BOUNDED = Option("target_cosine", float, 0.99, "budget", minimum=0.0, maximum=1.0)
_FREE = Option("scale", float, 1.0, "any number")
_OPEN_TOP = Option("limit", float, 1.0, "may be infinite", minimum=0.0, maximum=float("inf"))


@pytest.mark.parametrize("option", [_BOUNDED, _FREE, _OPEN_TOP])
@pytest.mark.parametrize("text", ["nan", "NaN", "-nan", float("nan")])
def test_nan_is_not_an_option_value(option: Option, text: object) -> None:
    with pytest.raises(OptionError, match=rf"option quant\.{option.name}: .*finite"):
        resolve_options("quant", [option], {option.name: text})


@pytest.mark.parametrize("text", ["inf", "-inf", "Infinity", float("inf")])
def test_infinity_is_refused_unless_the_range_allows_it(text: object) -> None:
    with pytest.raises(OptionError, match=r"option quant\.scale: .*finite"):
        resolve_options("quant", [_FREE], {"scale": text})
    with pytest.raises(OptionError, match=r"option quant\.target_cosine"):
        resolve_options("quant", [_BOUNDED], {"target_cosine": text})


def test_an_infinite_maximum_allows_infinity() -> None:
    assert resolve_options("quant", [_OPEN_TOP], {"limit": "inf"}) == {"limit": float("inf")}
    with pytest.raises(OptionError, match=r"option quant\.limit"):
        resolve_options("quant", [_OPEN_TOP], {"limit": "-inf"})


def test_finite_option_values_still_work() -> None:
    assert resolve_options("quant", [_BOUNDED], {"target_cosine": "0.5"}) == {"target_cosine": 0.5}
    assert resolve_options("quant", [_FREE], {"scale": "-1e30"}) == {"scale": -1e30}


def _flag_command(kind: click.ParamType) -> click.Command:
    @click.command()
    @click.option("--min-snr", type=kind)
    def command(min_snr: float | None) -> None:
        click.echo(f"value={min_snr!r}")

    return command


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN"])
def test_finite_float_flag_refuses_non_finite_values(text: str) -> None:
    result = CliRunner().invoke(_flag_command(FiniteFloat()), ["--min-snr", text])
    assert result.exit_code == 2
    assert "Invalid value for '--min-snr'" in result.output
    assert "finite" in result.output


def test_finite_float_flag_keeps_a_range_and_plain_numbers() -> None:
    ranged = _flag_command(FiniteFloat(-1, 1))
    assert CliRunner().invoke(ranged, ["--min-snr", "0.5"]).output == "value=0.5\n"
    assert CliRunner().invoke(_flag_command(FiniteFloat()), ["--min-snr", "-3"]).exit_code == 0
    result = CliRunner().invoke(ranged, ["--min-snr", "2"])
    assert result.exit_code == 2 and "not in the range -1<=x<=1" in result.output
    result = CliRunner().invoke(ranged, ["--min-snr", "abc"])
    assert result.exit_code == 2 and "'abc' is not a valid float" in result.output
    result = CliRunner().invoke(ranged, ["--min-snr", "nan"])
    assert result.exit_code == 2 and "finite" in result.output


def test_finite_float_help_shows_no_empty_range() -> None:
    result = CliRunner().invoke(_flag_command(FiniteFloat()), ["--help"])
    assert "None" not in result.output
    result = CliRunner().invoke(_flag_command(FiniteFloat(min=0)), ["--help"])
    assert "x>=0" in result.output


# --- (b) non-finite data -------------------------------------------------------------------


def _image_model() -> onnx.ModelProto:
    """x[1,3,8,8] → Relu → y: a static batch of 1."""
    return make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [float_input("x", [1, 3, 8, 8])],
        [float_input("y", [1, 3, 8, 8])],
    )


def _two_input_model() -> onnx.ModelProto:
    """x[batch,4] float and ids[batch,4] int64 → y."""
    nodes = [
        helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "f"], ["y"]),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])
    return make_model(
        nodes, [float_input("x", ["batch", 4]), ids], [float_input("y", ["batch", 4])]
    )


def _specs(proto: onnx.ModelProto) -> list[InputSpec]:
    return input_specs(model_from_proto(proto).graph)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "graphopt.data.feeds" and record.levelno == logging.WARNING
    ]


def test_nan_in_an_npz_file_is_warned_once_with_the_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    values = np.zeros((4, 3, 8, 8), np.float32)
    values[1, 0, 0, :3] = np.nan
    values[2, 0, 0, 0] = np.inf
    path = tmp_path / "calib.npz"
    np.savez(path, x=values)
    caplog.set_level(logging.WARNING, logger="graphopt.data.feeds")
    feeds = open_data(path, _specs(_image_model()))
    for _ in range(2):
        assert len(list(feeds)) == 4
    warned = _warnings(caplog)
    assert len(warned) == 1, warned
    assert "calib.npz" in warned[0] and "'x'" in warned[0] and " 4 " in warned[0]


def test_nan_in_a_folder_is_warned_once_per_input_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for index in range(5):
        values = np.ones((2, 4), np.float32)
        if index >= 2:
            values[0, index % 4] = np.nan
        np.savez(tmp_path / f"{index}.npz", x=values, ids=np.zeros((2, 4), np.int64))
    caplog.set_level(logging.WARNING, logger="graphopt.data.feeds")
    feeds = open_data(tmp_path, _specs(_two_input_model()))
    for _ in range(3):
        list(feeds)
    warned = _warnings(caplog)
    assert len(warned) == 1, warned
    assert "2.npz" in warned[0] and "'x'" in warned[0] and " 1 " in warned[0]


def test_nan_in_iterable_feeds_is_warned_once_per_input(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    feeds_list = [{"x": np.ones((1, 4), np.float32), "ids": np.zeros((1, 4), np.int64)}]
    feeds_list += [{"x": bad, "ids": np.zeros((1, 4), np.int64)}] * 10
    caplog.set_level(logging.WARNING, logger="graphopt.data.feeds")
    feeds = open_data(feeds_list, _specs(_two_input_model()))
    next(iter(feeds))  # a partial look leaves the rest to be checked
    assert _warnings(caplog) == []
    list(feeds)
    list(feeds)
    list(feeds.subset(range(2, 6)))
    warned = _warnings(caplog)
    assert len(warned) == 1, warned
    assert "'x'" in warned[0] and "feed 1" in warned[0] and " 3 " in warned[0]


def test_values_that_overflow_the_cast_are_warned(caplog: pytest.LogCaptureFixture) -> None:
    feeds = open_data([{"x": np.full((1, 3, 8, 8), 1e300)}], _specs(_image_model()))
    caplog.set_level(logging.WARNING, logger="graphopt.data.feeds")
    with np.errstate(over="ignore"):
        list(feeds)
    assert len(_warnings(caplog)) == 1


def test_finite_data_is_not_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.ones((4, 3, 8, 8), np.float32))
    caplog.set_level(logging.WARNING, logger="graphopt.data.feeds")
    list(open_data(path, _specs(_image_model())))
    assert _warnings(caplog) == []


def test_the_pipeline_check_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    values = np.ones((3, 4), np.float32)
    values[:, 0] = np.nan
    for index in range(3):
        np.savez(tmp_path / f"{index}.npz", x=values, ids=np.zeros((3, 4), np.int64))
    model = model_from_proto(_two_input_model())
    caplog.set_level(logging.WARNING, logger="graphopt.data.feeds")
    feeds = _feeds_for(model, tmp_path, None, 0, tmp_path / "m.onnx", None)
    list(feeds)  # a pass iterating again
    warned = _warnings(caplog)
    assert len(warned) == 1, warned
    assert "0.npz" in warned[0] and " 3 " in warned[0]


# --- (c) messages that name the real problem -----------------------------------------------


def _npz_error(path: Path, proto: onnx.ModelProto | None = None) -> str:
    with pytest.raises(DataError) as caught:
        list(open_data(path, _specs(proto or _image_model())))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_text_file_named_npz(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    path.write_text("1 2 3\n4 5 6\n")
    message = _npz_error(path)
    assert f"{path} is not a .npz archive" in message
    assert "pickle" not in message


def test_a_truncated_npz(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 3, 8, 8), np.float32))
    path = tmp_path / "x.npz"
    path.write_bytes(good.read_bytes()[:1000])
    assert f"{path} is not a .npz archive" in _npz_error(path)


def test_a_corrupt_member(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez_compressed(path, x=np.arange(4 * 3 * 8 * 8, dtype=np.float32).reshape(4, 3, 8, 8))
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)  # inside the compressed array; the zip directory stays intact
    path.write_bytes(bytes(data))
    assert str(path) in _npz_error(path)


def test_an_npy_file_named_npz(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    with path.open("wb") as handle:
        np.save(handle, np.zeros((4, 3, 8, 8), np.float32))
    message = _npz_error(path)
    assert f"{path} is not a .npz archive" in message and ".npy" in message


def test_a_zip_of_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.txt", "1 2 3")
    message = _npz_error(path)
    assert str(path) in message and "'x.txt'" in message


def test_object_arrays_are_named(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    message = _npz_error(path)
    assert str(path) in message and "'x'" in message


def test_rank_error_shows_the_arrays_shape_not_one_row(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((3, 8, 8), np.float32))  # one image saved without a samples axis
    message = _npz_error(path)
    assert "expects rank 4 [1, 3, 8, 8]" in message
    assert "[3, 8, 8]" in message and "[1, 8, 8]" not in message
    assert "axis 0" in message


def test_dimension_error_shows_the_arrays_shape_not_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((10, 3, 4, 4), np.float32))
    message = _npz_error(path)
    assert "[1, 3, 8, 8]" in message and "[10, 3, 4, 4]" in message
    assert "[1, 3, 4, 4]" not in message and "axis 2" in message


def test_dynamic_batch_dimension_error_shows_the_arrays_shape(tmp_path: Path) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((20, 5), np.float32), ids=np.zeros((20, 4), np.int64))
    message = _npz_error(path, _two_input_model())
    assert "[20, 5]" in message and "[8, 5]" not in message and "axis 1" in message


def test_a_file_used_as_a_folder_is_named(tmp_path: Path) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"calib\.npz is a file, not a folder") as caught:
        open_data(data / "more.npz", _specs(_image_model()))
    assert "does not exist" not in str(caught.value)
    with pytest.raises(DataError, match="does not exist"):
        open_data(tmp_path / "missing" / "more.npz", _specs(_image_model()))
