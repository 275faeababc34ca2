"""The sequential reconstruction engine: stages, paired statistics, the fit target."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graphopt.data.feeds import input_specs, open_data
from graphopt.ir import weights
from graphopt.ir.model import Model, load_model
from graphopt.passkit.reconstruct import (
    Layer,
    LayerInput,
    Reconstruction,
    damped_cholesky,
    stages,
)

from ..conftest import relu_mlp


def _mlp(tmp_path: Path) -> Model:
    path = tmp_path / "mlp.onnx"
    onnx.save(relu_mlp(inputs=6, hidden=8, outputs=5), str(path))
    return load_model(path)


def _layers(model: Model) -> list[Layer]:
    nodes = {node.name: node for node in model.graph.nodes}
    return [
        Layer("mm2", (LayerInput("r"),), (nodes["mm2"],), 8),
        Layer("mm1", (LayerInput("x"),), (nodes["mm1"],), 6),
    ]


def _feeds(model: Model, count: int = 4, rows: int = 7):
    rng = np.random.default_rng(3)
    data = [{"x": rng.standard_normal((rows, 6)).astype(np.float32)} for _ in range(count)]
    return open_data(data, input_specs(model.graph)), data


def _reference_activations(model: Model, data: list[dict[str, np.ndarray]]) -> tuple:
    w1 = weights.read(model.graph.tensors()["W1"]).astype(np.float64)
    x = np.concatenate([feed["x"] for feed in data]).astype(np.float64)
    return x, np.maximum(x @ w1, 0.0)


def test_stages_follow_the_longest_path_of_layers(tmp_path: Path) -> None:
    model = _mlp(tmp_path)
    grouped = stages(model.graph, _layers(model))
    assert [[layer.key for layer in stage] for stage in grouped] == [["mm1"], ["mm2"]]


def test_measure_pairs_the_compressed_input_with_the_reference_input(tmp_path: Path) -> None:
    model = _mlp(tmp_path)
    feeds, data = _feeds(model)
    x, r = _reference_activations(model, data)
    w1 = model.graph.tensors()["W1"]
    with Reconstruction(model, feeds) as engine:
        first = engine.measure([_layers(model)[1]])["mm1"]
        np.testing.assert_allclose(first.hessian, x.T @ x, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(first.cross, x.T @ x, rtol=1e-5, atol=1e-4)
        # compress mm1 after the engine opened: X̃ of mm2 changes, its reference X does not
        changed = np.round(weights.read(w1) * 2) / 2
        weights.replace(model, w1, changed)
        second = engine.measure([_layers(model)[0]])["mm2"]
    r_tilde = np.maximum(x @ changed.astype(np.float64), 0.0)
    assert not np.allclose(r_tilde, r)
    np.testing.assert_allclose(second.hessian, r_tilde.T @ r_tilde, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(second.cross, r_tilde.T @ r, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(second.current_mean, r_tilde.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(second.reference_mean, r.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert second.rows == x.shape[0] == 28
    assert engine.runs == 2
    # rule 5: W* fits the reference output from the compressed input better than W does
    w2 = weights.read(model.graph.tensors()["W2"]).astype(np.float64)
    target = second.target(w2, damp=1e-6)
    before = np.linalg.norm(r_tilde @ w2 - r @ w2)
    after = np.linalg.norm(r_tilde @ target - r @ w2)
    assert after < 0.9 * before


def test_target_is_the_weight_when_nothing_upstream_changed(tmp_path: Path) -> None:
    model = _mlp(tmp_path)
    feeds, _ = _feeds(model, count=8)
    with Reconstruction(model, feeds) as engine:
        fit = engine.measure([_layers(model)[1]])["mm1"]
    w1 = weights.read(model.graph.tensors()["W1"]).astype(np.float64)
    np.testing.assert_allclose(fit.target(w1, damp=1e-9), w1, rtol=1e-4, atol=1e-4)


def test_padding_is_left_out_of_both_sides(tmp_path: Path) -> None:
    """Rows the mask marks as padding count in neither H nor G."""
    from onnx import TensorProto, helper

    from ..conftest import float_input, make_model, weight

    graph_nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),
    ]
    proto = make_model(
        graph_nodes,
        [
            float_input("x", ["b", "s", 6]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"]),
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
        ],
        [float_input("y", ["b", "s", 5])],
        [weight("W1", (6, 8), 1), weight("W2", (8, 5), 2)],
    )
    path = tmp_path / "seq.onnx"
    onnx.save(proto, str(path))
    model = load_model(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    x_padded = x.copy()
    x_padded[0, 3:] = 100.0  # padding values that would dominate H if counted
    feed = {"x": x_padded, "attention_mask": mask, "input_ids": np.ones((2, 5), np.int64)}
    feeds = open_data([feed], input_specs(model.graph)).with_mask_input("attention_mask")
    layer = Layer("mm1", (LayerInput("x"),), (model.graph.nodes[0],), 6)
    with Reconstruction(model, feeds) as engine:
        fit = engine.measure([layer])["mm1"]
    valid = x_padded.reshape(-1, 6)[mask.reshape(-1) == 1].astype(np.float64)
    assert fit.rows == 8
    np.testing.assert_allclose(fit.hessian, valid.T @ valid, rtol=1e-5, atol=1e-4)


def test_damped_cholesky_handles_dead_channels_and_refuses_nan() -> None:
    h = np.diag([4.0, 0.0, 1.0])
    lower, is_lower, ridge = damped_cholesky(h, 0.01)
    assert ridge == pytest.approx(0.01 * 6.0 / 3)  # dead channel counted as 1
    assert is_lower and np.all(np.isfinite(lower))
    with pytest.raises(np.linalg.LinAlgError):
        damped_cholesky(np.full((2, 2), np.nan), 0.01)


@pytest.mark.parametrize("budget", [None, 0])
def test_later_measurements_run_segments_from_kept_activations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: int | None
) -> None:
    """Rule 7: after the first measurement only the new segment runs, unless the cache is off;
    the statistics are the same either way."""
    import graphopt.passkit.reconstruct as reconstruct
    from graphopt.settings import Settings

    prefixes: list[tuple[str, ...]] = []
    original = reconstruct.prefix_model

    def counting(runnable, outputs):  # type: ignore[no-untyped-def]
        prefixes.append(tuple(outputs))
        return original(runnable, outputs)

    monkeypatch.setattr(reconstruct, "prefix_model", counting)
    model = _mlp(tmp_path)
    feeds, data = _feeds(model)
    _, r = _reference_activations(model, data)
    with Reconstruction(model, feeds, settings=Settings(probe_cache_bytes=budget)) as engine:
        engine.measure([_layers(model)[1]])
        second = engine.measure([_layers(model)[0]])["mm2"]
    np.testing.assert_allclose(second.hessian, r.T @ r, rtol=1e-5, atol=1e-4)
    # two prefixes size the runs; with the cache off each measurement runs two more
    assert len(prefixes) == (2 if budget is None else 6)
