"""Model I/O: clear load errors, lazy external data, atomic and deterministic saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from graphopt.errors import InputError, ModelLoadError
from graphopt.ir.model import load_model, save_model
from graphopt.ir.weights import ExternalValues

from ..conftest import assert_same_outputs, float_input, make_model, sha256_of, weight


def _big_model() -> onnx.ModelProto:
    """Two 64×64 weights (16 KiB each) so they go to external data; one unused by tests."""
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "B"], ["y"], name="mm2"),
    ]
    return make_model(
        nodes,
        [float_input("x", ["n", 64])],
        [float_input("y", ["n", 64])],
        [weight("A", (64, 64), 1), weight("B", (64, 64), 2)],
    )


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=0,
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"this is not a protobuf at all \xff\xfe", "not"),
        (b"\x08\x07", "not"),  # a valid protobuf varint header, but no graph
    ],
)
def test_load_rejects_non_onnx(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_load_rejects_truncated_file(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    data = mlp_model.SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated|not"):
        load_model(path)


def test_load_rejects_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_load_rejects_future_ir_version(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    mlp_model.ir_version = onnx.IR_VERSION + 5
    path = tmp_path / "future.onnx"
    path.write_bytes(mlp_model.SerializeToString())
    with pytest.raises(ModelLoadError, match="IR version"):
        load_model(path)


def test_load_rejects_missing_external_data(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    _save_external(_big_model(), path)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelLoadError, match="external data file 'ext.onnx.data'.*missing"):
        load_model(path)


def test_load_rejects_short_external_data(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    _save_external(_big_model(), path)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="too short"):
        load_model(path)


def test_load_rejects_a_tensor_produced_twice(tmp_path: Path) -> None:
    """Issue 15.6: a dynamo export whose output name collided with an internal name produced
    one tensor from two nodes; graphsurgeon then failed later with 'Cycle detected'."""
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="first"),
        helper.make_node("Neg", ["y"], ["y"], name="second"),
    ]
    path = tmp_path / "twice.onnx"
    onnx.save(make_model(nodes, [float_input("x", [2])], [float_input("y", [2])]), str(path))
    with pytest.raises(ModelLoadError, match="invalid ONNX model: .*'y'"):
        load_model(path)


def test_cli_reports_an_invalid_model_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ..conftest import run_cli

    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="first"),
        helper.make_node("Neg", ["y"], ["y"], name="second"),
    ]
    path = tmp_path / "twice.onnx"
    onnx.save(make_model(nodes, [float_input("x", [2])], [float_input("y", [2])]), str(path))
    code, _out, err = run_cli(
        ["optimize", str(path), str(tmp_path / "out.onnx"), "--passes", "cleanup"], capsys
    )
    assert code == 2
    assert err.count("\n") == 1 and "single static assignment" in err
    assert "internal error" not in err and "Traceback" not in err
    assert not (tmp_path / "out.onnx").exists()


def test_external_weights_stay_lazy_and_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "ext.onnx"
    _save_external(_big_model(), source)
    loads: list[str] = []
    original_load = ExternalValues.load

    def counting_load(self: ExternalValues) -> np.ndarray:
        loads.append(self.tensor.name)
        return original_load(self)

    monkeypatch.setattr(ExternalValues, "load", counting_load)
    model = load_model(source)
    assert model.had_external_data
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    save_model(model, out)
    assert loads == [], "saving untouched weights must copy bytes, not load arrays"
    assert (out.parent / "copy.onnx.data").exists()
    feed = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    assert_same_outputs(source, out, feed)


def test_external_tensor_values_read_from_model_folder(tmp_path: Path) -> None:
    source = tmp_path / "ext.onnx"
    _save_external(_big_model(), source)
    model = load_model(source)
    constant = next(t for t in model.graph.tensors().values() if t.name == "A")
    expected = onnx.numpy_helper.to_array(weight("A", (64, 64), 1))
    np.testing.assert_array_equal(constant.values, expected)


def test_save_refuses_to_overwrite_input(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model, str(path))
    before = sha256_of(path)
    model = load_model(path)
    with pytest.raises(InputError, match="is the input model"):
        save_model(model, path)
    assert sha256_of(path) == before


def test_save_refuses_missing_folder(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model, str(path))
    with pytest.raises(InputError, match="does not exist"):
        save_model(load_model(path), tmp_path / "missing" / "out.onnx")


def test_save_is_deterministic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    source = tmp_path / "ext.onnx"
    _save_external(_big_model(), source)
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    save_model(load_model(source), first)
    save_model(load_model(source), second)
    assert sha256_of(first.with_name("a.onnx.data")) == sha256_of(second.with_name("b.onnx.data"))
    first_proto = onnx.load(str(first), load_external_data=False)
    second_proto = onnx.load(str(second), load_external_data=False)
    for tensor in second_proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "a.onnx.data"
    assert first_proto.SerializeToString() == second_proto.SerializeToString()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_inline_model_stays_inline(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(mlp_model, str(source))
    out = tmp_path / "o.onnx"
    save_model(load_model(source), out)
    assert not (tmp_path / "o.onnx.data").exists()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_forced_external_data_for_inline_model(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(_big_model(), str(source))
    out = tmp_path / "o.onnx"
    save_model(load_model(source), out, external_data=True)
    assert (tmp_path / "o.onnx.data").stat().st_size >= 2 * 64 * 64 * 4
    feed = {"x": np.ones((1, 64), np.float32)}
    assert_same_outputs(source, out, feed)


def test_metadata_survives(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    onnx.helper.set_model_props(mlp_model, {"author": "graphopt-test"})
    mlp_model.producer_name = "unit-test"
    source = tmp_path / "m.onnx"
    onnx.save(mlp_model, str(source))
    out = tmp_path / "o.onnx"
    save_model(load_model(source), out)
    saved = onnx.load(str(out))
    assert saved.producer_name == "unit-test"
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "graphopt-test"}


def _if_model() -> onnx.ModelProto:
    """x → mm1 → h → mm2 → y, and an If whose branches read h and the outer weight C."""
    then_branch = helper.make_graph(
        [helper.make_node("MatMul", ["h", "C"], ["t"], name="then_mm")],
        "then",
        [],
        [float_input("t", ["n", 64])],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["e"], name="else_id")],
        "else",
        [],
        [float_input("e", ["n", 64])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "A"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "B"], ["y"], name="mm2"),
        helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["positive"], name="cmp"),
        helper.make_node(
            "If",
            ["positive"],
            ["z"],
            name="branch",
            then_branch=then_branch,
            else_branch=else_branch,
        ),
    ]
    zero = onnx.numpy_helper.from_array(np.zeros((), np.float32), "zero")
    return make_model(
        nodes,
        [float_input("x", ["n", 64])],
        [float_input("y", ["n", 64]), float_input("z", ["n", 64])],
        [weight("A", (64, 64), 1), weight("B", (64, 64), 2), weight("C", (64, 64), 3), zero],
    )


@pytest.mark.parametrize("external", [False, True])
def test_prefix_model_runs_only_what_the_outputs_need(tmp_path: Path, external: bool) -> None:
    from graphopt.ir.model import prefix_model, runnable_model
    from graphopt.ir.ort import make_session

    source = _if_model()
    path = tmp_path / "m.onnx"
    if external:
        _save_external(source, path)
    else:
        onnx.save(source, str(path))
    model = load_model(path)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    with runnable_model(model, extra_outputs=["h"]) as runnable:
        whole = make_session(runnable, optimize=False)
        expected = dict(zip(["h", "z"], whole.run(["h", "z"], {"x": x}), strict=True))
        early = prefix_model(runnable, ["h"])
        late = prefix_model(runnable, ["z"])
        (h,) = make_session(early, optimize=False).run(["h"], {"x": x})
        (z,) = make_session(late, optimize=False).run(["z"], {"x": x})
    early_proto = onnx.load_from_string(early.proto)
    assert [node.name for node in early_proto.graph.node] == ["mm1"]
    assert {t.name for t in early_proto.graph.initializer} | set(early.initializers) == {"A"}
    assert [output.name for output in early_proto.graph.output] == ["h"]
    late_proto = onnx.load_from_string(late.proto)
    # the If reads h from the outer graph (C travels inside the branch): mm1 stays, mm2 and B go
    assert "mm2" not in {node.name for node in late_proto.graph.node}
    assert {"mm1", "branch"} <= {node.name for node in late_proto.graph.node}
    kept = {t.name for t in late_proto.graph.initializer} | set(late.initializers)
    assert "B" not in kept and "A" in kept
    np.testing.assert_array_equal(h, expected["h"])
    np.testing.assert_array_equal(z, expected["z"])


def test_prefix_model_names_a_tensor_the_graph_lacks(tmp_path: Path) -> None:
    from graphopt.ir.model import prefix_model, runnable_model

    path = tmp_path / "m.onnx"
    onnx.save(_if_model(), str(path))
    with runnable_model(load_model(path)) as runnable, pytest.raises(ValueError, match="nope"):
        prefix_model(runnable, ["nope"])
