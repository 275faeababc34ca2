"""``lowrank``: the SVD numerics, each rule of LowRankPass on tiny graphs, CLI and composition."""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.data.feeds import input_specs, open_data, synthesize
from graphopt.errors import OptionError
from graphopt.ir.model import model_from_proto, save_model
from graphopt.ir.normalize import normalize
from graphopt.passkit.api import PassContext, PassResult
from graphopt.passkit.svd import (
    break_even_rank,
    decompose,
    factors,
    max_rank,
    rank_for_energy,
    rank_for_ratio,
    round_rank,
)
from graphopt.pipeline import optimize
from graphopt.settings import Settings
from passes.lowrank import LowRankPass

from ..conftest import (
    float_input,
    make_model,
    run_cli,
    run_ort,
    sha256_of,
    two_layer_chain,
    weight,
)

RTOL, ATOL = 1e-4, 1e-4


def _low_rank_matrix(rows: int, cols: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))).astype(
        np.float32
    )


def _correlated_activations(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Activations with a few dominant directions, as real hidden states have."""
    rng = np.random.default_rng(seed)
    scales = np.geomspace(30.0, 0.1, dim)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return (rng.standard_normal((rows, dim)) * scales) @ basis.T


def _feeds(proto: onnx.ModelProto, samples: int = 32, batch: int = 8):  # type: ignore[no-untyped-def]
    """Real (not flagged synthetic) feeds, as a user's data would be."""
    model = model_from_proto(proto)
    normalize(model)
    batches = list(synthesize(model.graph, samples=samples, batch_size=batch, seed=0))
    return open_data(batches, input_specs(model.graph))


def _run(
    proto: onnx.ModelProto, tmp_path: Path, *, data: bool = True, **options: object
) -> tuple[Path, PassResult]:
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    options.setdefault("min_size", 0)
    context = PassContext(data=_feeds(proto) if data else None)
    result = LowRankPass(options)(model, context)
    out = tmp_path / "lowrank.onnx"
    save_model(result.model, out)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    return out, result


def _ops(path: Path) -> collections.Counter[str]:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _matmul_model(values: np.ndarray) -> onnx.ModelProto:
    rows, cols = values.shape
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [float_input("x", ["batch", 3, rows])],
        [float_input("y", ["batch", 3, cols])],
        [numpy_helper.from_array(values, "W")],
    )


# --- numerics ---------------------------------------------------------------------------------


def test_break_even_and_rank_rules() -> None:
    assert break_even_rank(384, 384) == 192
    assert max_rank(384, 384) == 191
    assert max_rank(384, 1536) == 307
    assert rank_for_ratio(0.75, 384, 384, 8) == 144
    assert rank_for_ratio(0.5, 384, 1536, 8) == 152
    assert round_rank(189, 384, 384, 8) == 184  # 192 is at break-even: round down
    assert round_rank(5, 20, 20, 8) == 8  # at least one multiple while below break-even 10
    assert round_rank(9, 18, 18, 8) == 8
    assert round_rank(3, 6, 6, 8) == 2  # no multiple of 8 fits below 3: keep the rank, capped


@pytest.mark.parametrize("whiten", [False, True])
def test_full_rank_factors_reproduce_the_weight(whiten: bool) -> None:
    weight_values = np.random.default_rng(1).standard_normal((40, 24)).astype(np.float32)
    gram = None
    if whiten:
        activations = _correlated_activations(500, 40)
        gram = activations.T @ activations
    spectrum = decompose(weight_values, 24, gram=gram)
    first, second = factors(spectrum, 24, np.dtype(np.float64))
    np.testing.assert_allclose(first @ second, weight_values, rtol=1e-5, atol=1e-5)
    assert spectrum.relative_error(24) < 1e-6


def test_whitening_minimises_output_error() -> None:
    rng = np.random.default_rng(2)
    weight_values = rng.standard_normal((64, 64)).astype(np.float32)
    activations = _correlated_activations(2000, 64)
    reference = activations @ weight_values
    errors = {}
    for name, gram in (("plain", None), ("whiten", activations.T @ activations)):
        first, second = factors(decompose(weight_values, 16, gram=gram), 16, np.dtype(np.float64))
        errors[name] = np.linalg.norm(activations @ first @ second - reference)
    assert errors["whiten"] < 0.5 * errors["plain"]
    # the whitened spectrum predicts the output error exactly (SVD-LLM's truncation property)
    spectrum = decompose(weight_values, 16, gram=activations.T @ activations)
    predicted = spectrum.relative_error(16)
    assert predicted == pytest.approx(errors["whiten"] / np.linalg.norm(reference), rel=1e-3)


def test_randomized_svd_is_near_optimal_on_large_matrices() -> None:
    rng = np.random.default_rng(3)
    left, _ = np.linalg.qr(rng.standard_normal((1100, 300)))
    right, _ = np.linalg.qr(rng.standard_normal((1024, 300)))
    values = np.geomspace(100, 0.01, 300)
    matrix = ((left * values) @ right.T).astype(np.float32)
    spectrum = decompose(matrix, 64)
    first, second = factors(spectrum, 64, np.dtype(np.float64))
    optimal = np.sqrt(np.sum(values[64:] ** 2))
    assert np.linalg.norm(matrix - first @ second) <= 1.02 * optimal


def test_factors_have_balanced_ranges() -> None:
    weight_values = np.random.default_rng(4).standard_normal((96, 48)).astype(np.float32) * 50
    activations = _correlated_activations(400, 96)
    spectrum = decompose(weight_values, 16, gram=activations.T @ activations)
    first, second = factors(spectrum, 16, np.dtype(np.float32))
    np.testing.assert_allclose(np.abs(first).max(axis=0), np.abs(second).max(axis=1), rtol=1e-4)


def test_energy_ranks_round_up_so_the_target_holds() -> None:
    values = np.array([10.0] * 16 + [3.0] + [0.01] * 47)
    spectrum = decompose(np.diag(values).astype(np.float32), 31)
    assert rank_for_energy(spectrum, 0.999, 1) == 17
    assert rank_for_energy(spectrum, 0.999, 8) == 24  # not 16, which keeps only 0.994
    assert spectrum.relative_error(24) ** 2 <= 0.001
    assert round_rank(12, 384, 384, 8) == 16 and round_rank(20, 384, 384, 8) == 24  # halves up


def test_energy_rank_counts_the_whole_spectrum() -> None:
    matrix = np.diag([10.0, 5.0, 1.0, 0.5] + [0.0] * 60).astype(np.float32)
    spectrum = decompose(matrix, 31)
    assert rank_for_energy(spectrum, 0.95, 1) == 2  # (100 + 25) / 126.25 ≥ 0.95
    assert rank_for_energy(spectrum, 0.999, 1) == 4


# --- the pass ---------------------------------------------------------------------------------


def test_matmul_split_is_exact_for_a_low_rank_weight(tmp_path: Path) -> None:
    proto = _matmul_model(_low_rank_matrix(64, 96, 8))
    out, result = _run(proto, tmp_path, rank=8)
    assert result.modified and result.stats["split"] == 1
    assert result.stats["params_after"] == 8 * (64 + 96)
    assert _ops(out) == {"MatMul": 2}
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["y"]
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(
        run_ort(out, {"x": x})[0], run_ort(proto, {"x": x})[0], rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize(
    ("trans_a", "trans_b", "alpha", "beta", "bias_shape"),
    [
        (0, 0, 1.0, 1.0, None),
        (0, 1, 1.0, 1.0, (48,)),
        (1, 0, 0.5, 2.0, (48,)),
        (1, 1, 2.0, 0.25, (6, 48)),
        (0, 1, 1.5, 1.0, (1, 48)),
    ],
)
def test_gemm_variants_are_exact_for_a_low_rank_weight(
    tmp_path: Path,
    trans_a: int,
    trans_b: int,
    alpha: float,
    beta: float,
    bias_shape: tuple[int, ...] | None,
) -> None:
    values = _low_rank_matrix(64, 48, 8, seed=5)
    stored = values.T.copy() if trans_b else values
    initializers = [numpy_helper.from_array(stored, "B")]
    inputs = ["a", "B"]
    if bias_shape is not None:
        initializers.append(weight("C", bias_shape, 6))
        inputs.append("C")
    node = helper.make_node(
        "Gemm", inputs, ["y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha, beta=beta
    )
    a_shape = [64, 6] if trans_a else [6, 64]
    proto = make_model(
        [node], [float_input("a", a_shape)], [float_input("y", [6, 48])], initializers
    )
    out, result = _run(proto, tmp_path, rank=8)
    assert result.modified and _ops(out) == {"Gemm": 2}
    feed = {"a": np.random.default_rng(7).standard_normal(a_shape).astype(np.float32)}
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(proto, feed)[0], rtol=RTOL, atol=ATOL)


def test_rank_at_break_even_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proto = _matmul_model(np.random.default_rng(18).standard_normal((64, 64)).astype(np.float32))
    with caplog.at_level(logging.INFO, logger="passes.lowrank"):
        out, result = _run(proto, tmp_path, rank=32)  # break-even 64·64/128 = 32
    assert not result.modified
    assert _ops(out) == {"MatMul": 1}
    assert result.stats["skipped"] == {"rank at or above break-even": 1}
    assert "break-even" in caplog.text
    _, below = _run(proto, tmp_path, rank=31)
    assert below.modified


def test_energy_target_above_break_even_is_refused(tmp_path: Path) -> None:
    proto = _matmul_model(np.random.default_rng(8).standard_normal((64, 64)).astype(np.float32))
    _, result = _run(proto, tmp_path, energy=0.9999, data=False)
    assert not result.modified and "skipped" in result.stats
    _, low = _run(_matmul_model(_low_rank_matrix(64, 64, 4)), tmp_path, energy=0.9999, data=False)
    assert low.modified and low.stats["layers"]["mm"]["rank"] == 8  # 4, rounded up to 8


def test_shared_weight_gets_one_pair_of_factors(tmp_path: Path) -> None:
    values = _low_rank_matrix(32, 40, 4, seed=9)
    proto = make_model(
        [
            helper.make_node("MatMul", ["x1", "W"], ["y1"], name="mm1"),
            helper.make_node("MatMul", ["x2", "W"], ["y2"], name="mm2"),
        ],
        [float_input("x1", [5, 32]), float_input("x2", [5, 32])],
        [float_input("y1", [5, 40]), float_input("y2", [5, 40])],
        [numpy_helper.from_array(values, "W")],
    )
    out, result = _run(proto, tmp_path, rank=8)
    assert result.stats["split"] == 2 and result.stats["weights_factored"] == 1
    saved = onnx.load(str(out))
    assert sorted(t.name for t in saved.graph.initializer) == ["W_lowrank_A", "W_lowrank_B"]
    rng = np.random.default_rng(10)
    feed = {name: rng.standard_normal((5, 32)).astype(np.float32) for name in ("x1", "x2")}
    for got, want in zip(run_ort(out, feed), run_ort(proto, feed), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_weight_read_by_other_nodes_is_left_whole(tmp_path: Path) -> None:
    """A tied table (Gather) or an excluded reader would keep W beside the factors."""
    values = _low_rank_matrix(64, 64, 8, seed=25)
    proto = make_model(
        [
            helper.make_node("Gather", ["W", "ids"], ["rows"], name="embed"),
            helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
        ],
        [float_input("x", [2, 64]), helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [float_input("rows", [3, 64]), float_input("y", [2, 64])],
        [numpy_helper.from_array(values, "W")],
    )
    out, result = _run(proto, tmp_path, rank=8, data=False)
    assert not result.modified
    assert result.stats["skipped"] == {"weight also read by other nodes": 1}
    assert [t.name for t in onnx.load(str(out)).graph.initializer] == ["W"]


def test_skips_are_logged_with_reasons(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "y"], ["xy"], name="act_act"),
            helper.make_node("MatMul", ["W", "x"], ["wx"], name="left"),
            helper.make_node("MatMul", ["x", "S"], ["xs"], name="small"),
        ],
        [float_input("x", [16, 16]), float_input("y", [16, 16])],
        [float_input("xy", [16, 16]), float_input("wx", [16, 16]), float_input("xs", [16, 16])],
        [weight("W", (16, 16)), weight("S", (16, 16))],
    )
    with caplog.at_level(logging.INFO, logger="passes.lowrank"):
        _, result = _run(proto, tmp_path, min_size=1000)
    assert not result.modified
    assert result.stats["skipped"] == {
        "weight is not a constant": 1,
        "weight is the left operand": 1,
        "small matrix": 1,
    }
    for name in ("act_act", "left", "small"):
        assert f"skipping {name}" in caplog.text


def test_claimed_weights_and_excluded_nodes_are_left_alone(tmp_path: Path) -> None:
    proto = _matmul_model(_low_rank_matrix(64, 64, 4))
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    context = PassContext()
    context.claims.claim("W", "sparsify")
    result = LowRankPass({"min_size": 0, "method": "svd"})(model, context)
    assert not result.modified
    assert result.stats["skipped"] == {"weight claimed by sparsify": 1}
    _, excluded = _run(proto, tmp_path, exclude=["m*"])
    assert excluded.stats["skipped"] == {"excluded by option": 1}


def test_method_follows_the_data(tmp_path: Path) -> None:
    proto = _matmul_model(np.random.default_rng(11).standard_normal((64, 64)).astype(np.float32))
    _, with_data = _run(proto, tmp_path, ratio=0.5)
    assert with_data.stats["method"] == "whiten"
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    synthetic = synthesize(model.graph, seed=0)
    result = LowRankPass({"min_size": 0})(model, PassContext(data=synthetic))
    assert result.stats["method"] == "svd"
    _, forced = _run(proto, tmp_path, method="svd")
    assert forced.stats["method"] == "svd"


def test_whitening_beats_plain_svd_on_the_layer_output(tmp_path: Path) -> None:
    """Inputs feeding the weight through a fixed mixing layer have correlated channels."""
    rng = np.random.default_rng(12)
    mixing = (rng.standard_normal((64, 64)) * np.geomspace(10, 0.01, 64)).astype(np.float32)
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "M"], ["h"], name="mix"),
            helper.make_node("MatMul", ["h", "W"], ["y"], name="target"),
        ],
        [float_input("x", ["batch", 64])],
        [float_input("y", ["batch", 64])],
        [
            numpy_helper.from_array(mixing, "M"),
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
        ],
    )
    feed = {"x": rng.standard_normal((64, 64)).astype(np.float32)}
    reference = run_ort(proto, feed)[0]
    errors = {}
    for method in ("svd", "whiten"):
        out, _ = _run(proto, tmp_path, method=method, rank=16, include=["target"])
        errors[method] = np.linalg.norm(run_ort(out, feed)[0] - reference)
    assert errors["whiten"] < 0.5 * errors["svd"]


def test_global_allocation_spends_the_budget_where_it_helps(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    easy = _low_rank_matrix(64, 64, 8, seed=14) + 0.01 * rng.standard_normal((64, 64))
    hard = rng.standard_normal((64, 64))
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "E"], ["e"], name="easy"),
            helper.make_node("MatMul", ["e", "H"], ["y"], name="hard"),
        ],
        [float_input("x", ["batch", 64])],
        [float_input("y", ["batch", 64])],
        [
            numpy_helper.from_array(easy.astype(np.float32), "E"),
            numpy_helper.from_array(hard.astype(np.float32), "H"),
        ],
    )
    _, uniform = _run(proto, tmp_path, ratio=0.5, method="svd")
    _, spread = _run(proto, tmp_path, ratio=0.5, method="svd", allocation="global")
    assert spread.stats["params_after"] <= 0.5 * spread.stats["params_before"]
    ranks = {name: layer["rank"] for name, layer in spread.stats["layers"].items()}
    assert ranks["easy"] == 8 and ranks["hard"] > uniform.stats["layers"]["hard"]["rank"]

    def total_error(result: PassResult) -> float:
        return sum(layer["relative_error"] ** 2 for layer in result.stats["layers"].values())

    assert total_error(spread) < total_error(uniform)


def test_output_is_byte_identical_across_runs(tmp_path: Path) -> None:
    proto = _matmul_model(np.random.default_rng(15).standard_normal((64, 80)).astype(np.float32))
    first, _ = _run(proto, tmp_path, ratio=0.5)
    digest = sha256_of(first)
    second, _ = _run(proto, tmp_path, ratio=0.5)
    assert sha256_of(second) == digest


# --- CLI and composition -------------------------------------------------------------------------


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    onnx.save(proto, str(path))
    return path


def test_cli_ratio_option_and_conflicting_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _save(_matmul_model(_low_rank_matrix(64, 64, 8)), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    args = ["optimize", str(source), str(out), "--passes", "lowrank", "-o", "lowrank.min_size=0"]
    code, stdout, _ = run_cli([*args, "-o", "lowrank.ratio=0.5"], capsys)
    assert code == 0, stdout
    assert "split=1" in stdout and "layers=[1 entries in --report]" in stdout
    code, _, stderr = run_cli([*args, "-o", "lowrank.rank=8", "-o", "lowrank.energy=0.9"], capsys)
    assert code == 2 and "lowrank: set either rank or energy, not both" in stderr
    code, _, stderr = run_cli([*args, "-o", "lowrank.ratio=1.5"], capsys)
    assert code == 2 and "ratio" in stderr


def test_factors_are_quantized_when_composed_with_quant(tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        [float_input("x", ["batch", 128])],
        [float_input("y", ["batch", 128])],
        [numpy_helper.from_array(_low_rank_matrix(128, 128, 16, seed=17), "W")],
    )
    source = _save(proto, tmp_path / "in.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((64, 128)).astype(np.float32))
    out = tmp_path / "out.onnx"
    report = optimize(
        source,
        out,
        ["quant", "lowrank"],
        options={"lowrank": {"min_size": 0, "rank": 16}, "quant": {"min_macs": 0}},
        data=data,
    )
    assert report.plan == ["lowrank", "quant"]
    assert report.passed, report.validation
    saved = onnx.load(str(out))
    dequantized = {n.input[0] for n in saved.graph.node if n.op_type == "DequantizeLinear"}
    int8 = {t.name for t in saved.graph.initializer if t.data_type == TensorProto.INT8}
    assert {"W_lowrank_A_quantized", "W_lowrank_B_quantized"} <= int8 & dequantized


def test_sparsify_leaves_the_factors_alone(tmp_path: Path) -> None:
    """Conflict rule: lowrank plans first and claims the weights it splits and its factors."""
    rng = np.random.default_rng(19)
    source = _save(_matmul_model(_low_rank_matrix(64, 64, 8)), tmp_path / "in.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((16, 3, 64)).astype(np.float32))
    report = optimize(
        source,
        tmp_path / "out.onnx",
        ["sparsify", "lowrank"],
        options={"lowrank": {"min_size": 0, "rank": 8}, "sparsify": {"method": "magnitude"}},
        data=data,
    )
    assert report.plan == ["lowrank", "sparsify"]
    lowrank, sparsify = (record.stats for record in report.run.records)
    assert lowrank["split"] == 1
    assert sparsify["skipped"] == {"claimed": 2}
    assert report.passed


def test_unnamed_nodes_are_reported_by_their_normalized_names(tmp_path: Path) -> None:
    """Normalization names unnamed nodes <op>_<n> (issue 15.7): one identity for every pass."""
    values = _low_rank_matrix(64, 64, 8, seed=22)
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("MatMul", ["h", "V"], ["y"]),
        ],
        [float_input("x", ["batch", 64])],
        [float_input("y", ["batch", 64])],
        [numpy_helper.from_array(values, "W"), numpy_helper.from_array(values.T.copy(), "V")],
    )
    _, result = _run(proto, tmp_path, rank=8, exclude=["MatMul_1"])
    assert result.touched == ["MatMul_0"]
    assert list(result.stats["layers"]) == ["MatMul_0"]
    assert result.stats["skipped"] == {"excluded by option": 1}


def test_a_refused_weight_stays_free_for_other_passes(tmp_path: Path) -> None:
    proto = _matmul_model(np.random.default_rng(23).standard_normal((64, 64)).astype(np.float32))
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    context = PassContext()
    result = LowRankPass({"min_size": 0, "rank": 40, "method": "svd"})(model, context)
    assert not result.modified
    assert context.claims.owner("W") is None


@pytest.mark.parametrize("scale", [1.0, 1e20])
def test_gram_statistics_match_numpy_across_buffer_flushes(
    monkeypatch: pytest.MonkeyPatch, scale: float
) -> None:
    from graphopt.data import calibration

    monkeypatch.setattr(calibration, "GRAM_PRODUCT_ROWS", 5)
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["r"], name="relu")],
        [float_input("x", ["batch", 6])],
        [float_input("r", ["batch", 6])],
    )
    rng = np.random.default_rng(24)
    batches = [{"x": (rng.standard_normal((2, 6)) * scale).astype(np.float32)} for _ in range(7)]
    model = model_from_proto(proto)
    feeds = open_data(batches, input_specs(model.graph))
    stats = calibration.collect(
        model, feeds, [calibration.StatRequest("r", minmax=False, gram=True)]
    )
    rows = np.maximum(np.concatenate([b["x"] for b in batches]).astype(np.float64), 0.0)
    assert stats["r"].rows == 14
    np.testing.assert_allclose(stats["r"].gram, rows.T @ rows, rtol=1e-5)


def test_sequential_fit_absorbs_the_error_of_earlier_splits(tmp_path: Path) -> None:
    """Rule 9: mm2 fitted on the input split mm1 gives it beats mm2 fitted on the float input."""
    proto = two_layer_chain()
    feeds = list(_feeds(proto))
    errors = {}
    for method in ("whiten", "sequential"):
        out, result = _run(proto, tmp_path, method=method, rank=16)
        assert result.stats["method"] == method
        assert result.stats["split"] == 2
        errors[method] = sum(
            np.linalg.norm(run_ort(out, feed)[0] - run_ort(proto, feed)[0]) for feed in feeds
        )
    assert errors["sequential"] < 0.85 * errors["whiten"]


def test_sequential_refuses_global_allocation() -> None:
    with pytest.raises(OptionError, match="allocation=global"):
        LowRankPass({"method": "sequential", "allocation": "global"})


def test_sequential_is_byte_identical_across_runs(tmp_path: Path) -> None:
    proto = two_layer_chain()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    first, _ = _run(proto, tmp_path / "a", method="sequential", rank=16)
    second, _ = _run(proto, tmp_path / "b", method="sequential", rank=16)
    assert sha256_of(first) == sha256_of(second)


def test_sequential_segments_give_the_prefix_runs_model(tmp_path: Path) -> None:
    """Reconstruction rule 7: fed from kept activations or run from the feeds, the same bytes."""
    proto = two_layer_chain()
    outputs = []
    for budget in (None, 0):
        folder = tmp_path / f"cache{budget}"
        folder.mkdir()
        model = model_from_proto(proto)
        normalize(model, materialize_weights=True)
        context = PassContext(data=_feeds(proto), settings=Settings(probe_cache_bytes=budget))
        result = LowRankPass({"method": "sequential", "rank": 16, "min_size": 0})(model, context)
        outputs.append(folder / "m.onnx")
        save_model(result.model, outputs[-1])
    assert sha256_of(outputs[0]) == sha256_of(outputs[1])


def test_target_cosine_finds_the_lowest_ratio_that_passes(tmp_path: Path) -> None:
    """Rule 10: the ratio is bisected on held-aside batches; lower ratios that pass win."""
    proto = two_layer_chain()
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    options = {"target_cosine": 0.9, "ratio": 0.1, "min_size": 0}
    result = LowRankPass(options)(model, PassContext(data=_feeds(proto, samples=64)))
    tried = result.stats["ratios_tried"]
    chosen = result.stats["ratio"]
    assert tried[0][0] == 0.1 and tried[0][1] < 0.9
    assert 0.1 < chosen < 0.95  # bisection went below the gentlest ratio
    assert [ratio for ratio, score in tried if score >= 0.9 and ratio < chosen - 1e-3] == []
    assert all(score >= 0.9 for ratio, score in tried if abs(ratio - chosen) < 1e-3)
    assert result.stats["split"] == 2
    # out of reach: nothing is split, and the stats say so
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    options["target_cosine"] = 0.99
    result = LowRankPass(options)(model, PassContext(data=_feeds(proto, samples=64)))
    assert not result.modified and result.stats["ratio"] is None


def test_target_cosine_refuses_a_fixed_rank() -> None:
    with pytest.raises(OptionError, match="target_cosine"):
        LowRankPass({"target_cosine": 0.99, "rank": 8})
