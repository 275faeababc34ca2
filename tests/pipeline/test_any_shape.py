"""Issue 18, part 3: any shape, any batch.

Feeds whose dynamic sizes (sequence lengths, image sizes) and batch sizes (1, 3, 8) change from
one feed to the next, given as a folder of ``.npz`` files and as a Python iterable, work for every
pass (through :func:`graphopt.pipeline.optimize`, validation on), for ``graphopt check`` (the
gate, per-channel validation, per-tensor localization, bisection) and for ``graphopt tune``: no
crash, every sample counted, and per-channel statistics that mean the same thing in every feed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from graphopt.check.bisect import bisect_passes
from graphopt.check.gate import run_gate
from graphopt.check.localize import compare_tensors
from graphopt.check.validate import Criteria, MetricAccumulator, compare_models
from graphopt.data.feeds import Feeds, input_specs, open_data
from graphopt.ir.model import model_from_proto
from graphopt.pipeline import OptimizeReport, build_passes, optimize
from graphopt.tuning.cache import data_content_hash
from graphopt.tuning.executor import SerialExecutor
from graphopt.tuning.search import tune

from .any_shape_models import (
    BATCHES,
    MODELS,
    Feed,
    cnn_model,
    image_feeds,
    rnn_model,
    samples,
    sequence_feeds,
    text_feeds,
    write_folder,
)

SAMPLES = sum(BATCHES)
FIRST_INPUT = {"text": "input_ids", "cnn": "image", "rnn": "x"}
QUANT = {"min_macs": 0, "target_cosine": 0}
"""Plain static quantization of every node (the tiny layers are below the default min_macs)."""
LOSSLESS_ENOUGH = Criteria(min_cosine=0.0, min_snr_db=-float("inf"))
"""Every figure computed, none judged: these tests are about shapes, not accuracy."""

PASS_RUNS: dict[str, tuple[list[str], dict[str, dict[str, Any]]]] = {
    "cleanup": (["cleanup"], {}),
    "fp16": (["fp16"], {"fp16": {"data_aware": "on", "max_activation": 4.0}}),
    "quant-static": (["quant"], {"quant": QUANT}),
    "quant-dynamic": (["quant"], {"quant": {**QUANT, "mode": "dynamic"}}),
    "quant-accuracy": (
        ["quant"],
        {"quant": {"min_macs": 0, "target_cosine": 0.99999, "fallback": "dynamic"}},
    ),
    "quant-int4": (["quant"], {"quant": {"min_macs": 0, "weight_bits": 4, "block_size": 16}}),
    "quant-smooth": (["quant"], {"quant": {**QUANT, "smooth_alpha": 0.5}}),
    "sparsify-magnitude": (["sparsify"], {"sparsify": {"method": "magnitude"}}),
    "sparsify-wanda": (["sparsify"], {"sparsify": {"method": "wanda"}}),
    "sparsify-sparsegpt": (["sparsify"], {"sparsify": {"method": "sparsegpt"}}),
    "sparsify-channel": (
        ["sparsify"],
        {"sparsify": {"method": "wanda", "pattern": "channel", "sparsity": 0.25}},
    ),
    "lowrank-whiten": (["lowrank"], {"lowrank": {"min_size": 0, "method": "whiten"}}),
    "lowrank-svd": (["lowrank"], {"lowrank": {"min_size": 0, "method": "svd"}}),
}
"""Every pass in its modes, by name."""

UNCHANGED = {("rnn", "sparsify-channel")}
"""Runs that leave the model as it was: the LSTM model has no channel path to prune."""
SEARCHED = "quant-accuracy"
"""Whether the accuracy search keeps any node depends on each node's harm, not on shapes."""


def _model(tmp_path: Path, name: str, proto: onnx.ModelProto | None = None) -> Path:
    path = tmp_path / f"{name}.onnx"
    onnx.save(proto if proto is not None else MODELS[name][0](), str(path))
    return path


def _feeds(model: onnx.ModelProto, source: Any) -> Feeds:
    return open_data(source, input_specs(model_from_proto(model).graph))


def _checked(report: OptimizeReport, feeds: list[Feed], first_input: str) -> None:
    """Every output compared on every sample (all its elements), every figure computed."""
    validation = report.validation
    assert validation is not None
    assert validation.samples == samples(feeds, first_input) == SAMPLES
    elements = _output_elements(report.input, feeds)
    assert sorted(c.output for c in validation.comparisons) == sorted(elements)
    for comparison in validation.comparisons:
        assert comparison.status != "error", comparison.reason
        assert comparison.cosine is not None and comparison.snr_db is not None
        assert comparison.elements == elements[comparison.output]


def _output_elements(path: str, feeds: list[Feed]) -> dict[str, int]:
    """Elements of each output of the model at ``path`` over ``feeds``: of an output laid out
    like the attention mask ([batch, seq, …]), those at valid positions only (validation rule
    9: padding is not compared)."""
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    totals = dict.fromkeys(names, 0)
    for feed in feeds:
        mask = feed.get("attention_mask")
        for name, value in zip(names, session.run(names, feed), strict=True):
            shape = np.shape(value)
            if mask is not None and shape[:2] == mask.shape:
                totals[name] += int(mask.sum()) * int(np.prod(shape[2:], dtype=np.int64))
            else:
                totals[name] += int(np.asarray(value).size)
    return totals


# --- every pass, every model, varying shapes and batch sizes ------------------------------------


@pytest.mark.parametrize("run", sorted(PASS_RUNS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_pass_on_a_folder_of_varying_feeds(name: str, run: str, tmp_path: Path) -> None:
    passes, options = PASS_RUNS[run]
    feeds = MODELS[name][1](0)
    folder = write_folder(tmp_path / "data", feeds)
    report = optimize(
        _model(tmp_path, name),
        tmp_path / "out.onnx",
        passes,
        options=options,
        data=folder,
        criteria=LOSSLESS_ENOUGH,
    )
    _checked(report, feeds, FIRST_INPUT[name])
    (record,) = report.run.records
    if run != SEARCHED:
        expected = run != "cleanup" and (name, run) not in UNCHANGED
        assert record.modified == expected, record.stats


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_every_calibrator_on_varying_sequence_lengths(calibrator: str, tmp_path: Path) -> None:
    feeds = text_feeds()
    report = optimize(
        _model(tmp_path, "text"),
        tmp_path / "out.onnx",
        ["quant"],
        options={"quant": {**QUANT, "calibrator": calibrator}},
        data=feeds,
        criteria=LOSSLESS_ENOUGH,
    )
    _checked(report, feeds, "input_ids")
    assert report.run.records[0].stats["quantized"] == 7  # every MatMul/Gemm with a weight


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_chain_of_passes_on_an_iterable_of_varying_feeds(name: str, tmp_path: Path) -> None:
    feeds = MODELS[name][1](1)
    report = optimize(
        _model(tmp_path, name),
        tmp_path / "out.onnx",
        ["cleanup", "sparsify", "lowrank", "quant"],
        options={
            "sparsify": {"method": "wanda", "sparsity": 0.3, "exclude": ["*Gemm*", "MatMul_0"]},
            "lowrank": {"min_size": 0, "exclude": ["MatMul_1"]},
            "quant": QUANT,
        },
        data=iter(feeds),  # a one-shot iterable: read once, replayed for every stage
        criteria=LOSSLESS_ENOUGH,
    )
    _checked(report, feeds, FIRST_INPUT[name])


# --- validation: per-channel statistics across feeds of different shapes ------------------------


def _map_accumulator(shapes: list[tuple[int, ...]], broken: int, axis: int) -> MetricAccumulator:
    """An accumulator fed maps of ``shapes`` whose candidate flips the sign of index ``broken``
    along ``axis``."""
    rng = np.random.default_rng(0)
    accumulator = MetricAccumulator("features", "cpu", Criteria(), seed=0)
    for shape in shapes:
        reference = rng.standard_normal(shape).astype(np.float32)
        candidate = reference.copy()
        index = [slice(None)] * len(shape)
        index[axis] = broken
        candidate[tuple(index)] *= -1.0
        accumulator.add(reference, candidate, samples=shape[0])
    return accumulator


def test_an_nchw_map_is_sliced_on_its_channels_when_its_width_changes() -> None:
    """Rule 3a of validate: a map's rows and columns are never channels. With image sizes that
    vary, a feed whose width is below the channel count must not turn columns into channels."""
    shapes = [(2, 16, 24, 24), (3, 16, 6, 10), (1, 16, 12, 8)]
    result = _map_accumulator(shapes, broken=5, axis=1).finish()
    assert result.channel_axes == [1]
    assert result.channels == 16
    assert result.worst_channel == "axis 1 index 5"
    assert result.worst_channel_cosine == pytest.approx(-1.0)


def test_an_nchw_map_keeps_its_channel_axis_whatever_the_first_feed() -> None:
    shapes = [(1, 16, 12, 8), (2, 16, 24, 24), (3, 16, 6, 10)]
    result = _map_accumulator(shapes, broken=3, axis=1).finish()
    assert result.channel_axes == [1] and result.worst_channel == "axis 1 index 3"


def test_an_nhwc_map_keeps_axis_3_when_its_height_changes() -> None:
    shapes = [(2, 40, 40, 3), (1, 12, 20, 3), (3, 2, 2, 3)]
    result = _map_accumulator(shapes, broken=2, axis=3).finish()
    assert result.channel_axes == [3] and result.worst_channel == "axis 3 index 2"


def test_a_map_of_constant_shape_follows_the_smaller_axis_rule() -> None:
    """Unchanged behaviour where nothing varies: axis 3 when it is smaller."""
    nchw = _map_accumulator([(2, 8, 32, 32)] * 2, broken=1, axis=1).finish()
    assert nchw.channel_axes == [1] and nchw.worst_channel == "axis 1 index 1"
    nhwc = _map_accumulator([(2, 32, 32, 8)] * 2, broken=1, axis=3).finish()
    assert nhwc.channel_axes == [3] and nhwc.worst_channel == "axis 3 index 1"


def test_per_tensor_rows_name_a_feature_map_channel_when_image_sizes_vary(tmp_path: Path) -> None:
    """The CNN's stride-2 feature map is [batch, 16, H/2, W/2]; its first two feeds are 8 and 6
    columns wide, fewer than its 16 channels."""
    reference = _model(tmp_path, "cnn")
    feeds = _feeds(cnn_model(), image_feeds())
    candidate = tmp_path / "quant.onnx"
    optimize(reference, candidate, ["quant"], options={"quant": QUANT}, data=feeds)
    rows = {row.name: row for row in compare_tensors(reference, candidate, feeds)}
    feature_maps = [row for name, row in rows.items() if name.startswith(("conv", "relu"))]
    assert len(feature_maps) == 4
    for row in feature_maps:
        assert row.worst_channel.startswith("axis 1 index "), (row.name, row.worst_channel)


# --- validation: samples counted on the batch axis ----------------------------------------------


def _state_first(tmp_path: Path) -> tuple[Path, Feeds, list[Feed]]:
    """The LSTM model whose first input is its state h0 [1, batch, 16] (feeds rule 8: the batch
    is axis 1 there), with feeds of varying batch and length."""
    proto = rnn_model(state_first=True)
    raw = sequence_feeds(state=True)
    return _model(tmp_path, "rnn_state", proto), _feeds(proto, raw), raw


def test_validation_counts_samples_on_the_batch_axis(tmp_path: Path) -> None:
    path, feeds, raw = _state_first(tmp_path)
    report = compare_models(path, path, feeds)
    assert report.samples == samples(raw, "x") == SAMPLES
    assert report.passed


FLIPPED = (2, 5)
"""(feed, sample) whose ``y`` the flipping candidate negates: sample 5 of the third feed (8
samples)."""


def _flipping_candidate(reference: onnx.ModelProto) -> onnx.ModelProto:
    """``reference`` with ``y`` negated for every sample whose h0 sums to more than 5 (only
    :data:`FLIPPED`, whose h0 :func:`_flip_feeds` sets to ones)."""
    candidate = onnx.ModelProto()
    candidate.CopyFrom(reference)
    graph = candidate.graph
    (last,) = [node for node in graph.node if "y" in node.output]
    last.output[0] = "y_raw"
    constants = {
        "flip_axes": np.array([0, 2], np.int64),
        "flip_limit": np.array(5.0, np.float32),
        "flip_signs": np.array([1.0, -1.0], np.float32),
        "flip_unsqueeze": np.array([1, 2], np.int64),
    }
    graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in constants.items())
    make = onnx.helper.make_node
    graph.node.extend(
        [
            make("ReduceSum", ["h0", "flip_axes"], ["flip_sum"], keepdims=0),  # [batch]
            make("Greater", ["flip_sum", "flip_limit"], ["flip_mask"]),
            make("Cast", ["flip_mask"], ["flip_index"], to=onnx.TensorProto.INT64),
            make("Gather", ["flip_signs", "flip_index"], ["flip_sign"]),
            make("Unsqueeze", ["flip_sign", "flip_unsqueeze"], ["flip_factor"]),  # [batch, 1, 1]
            make("Mul", ["y_raw", "flip_factor"], ["y"]),
        ]
    )
    onnx.checker.check_model(candidate, full_check=True)
    return candidate


def _flip_feeds() -> list[Feed]:
    raw = sequence_feeds(state=True)
    feed, sample = FLIPPED
    assert raw[feed]["h0"].shape[1] == 8
    raw[feed]["h0"][0, sample] = 1.0
    return raw


def test_validation_never_slices_the_samples_axis_of_a_state_first_model(tmp_path: Path) -> None:
    """y is [batch, seq, 4]: its axis 0 holds the samples (3 or 8 of them), never channels, so
    one negated sample is not reported as a channel with cosine -1."""
    proto = rnn_model(state_first=True)
    reference = _model(tmp_path, "rnn_state", proto)
    feeds = _feeds(proto, _flip_feeds())
    report = compare_models(reference, _flipping_candidate(proto), feeds, criteria=Criteria())
    (comparison,) = report.comparisons
    assert comparison.channel_axes == [1, 2]
    assert not comparison.worst_channel.startswith("axis 0 ")
    assert comparison.worst_channel_cosine is not None and comparison.worst_channel_cosine > 0.5


def test_per_tensor_rows_never_slice_the_samples_axis(tmp_path: Path) -> None:
    proto = rnn_model(state_first=True)
    reference = _model(tmp_path, "rnn_state", proto)
    feeds = _feeds(proto, _flip_feeds())
    candidate = _flipping_candidate(proto)
    rows = {row.name: row for row in compare_tensors(reference, candidate, feeds, max_batches=3)}
    worst = rows["y"]
    assert not worst.worst_channel.startswith("axis 0 "), worst.worst_channel
    assert worst.worst_channel_cosine is not None and worst.worst_channel_cosine > 0.0


# --- graphopt check: gate, per-tensor localization, bisection -----------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gate_on_a_folder_of_varying_feeds(name: str, tmp_path: Path) -> None:
    reference = _model(tmp_path, name)
    raw = MODELS[name][1](0)
    feeds = _feeds(MODELS[name][0](), write_folder(tmp_path / "data", raw))
    candidate = tmp_path / "quant.onnx"
    optimize(reference, candidate, ["quant"], options={"quant": QUANT}, data=feeds, validate=False)
    for per_channel in (True, False):
        gate = run_gate(
            reference,
            candidate,
            feeds,
            providers=["cpu"],
            criteria=Criteria(min_cosine=0.99, min_snr_db=10.0, per_channel=per_channel),
            max_size_ratio=10.0,
            max_latency_ratio=100.0,
            latency_runs=2,
        )
        assert gate.validation.samples == SAMPLES
        assert gate.passed, gate.validation.failures()
        assert gate.latency is not None
        assert [check.criterion for check in gate.model_checks] == ["size_ratio", "latency_ratio"]


def test_optimize_localizes_and_bisects_on_varying_feeds(tmp_path: Path) -> None:
    """A pruning too harsh for the budget: per-tensor rows and bisection both run on the feeds."""
    feeds = text_feeds()
    report = optimize(
        _model(tmp_path, "text"),
        tmp_path / "out.onnx",
        ["cleanup", "sparsify"],
        options={"sparsify": {"method": "magnitude", "sparsity": 0.9}},
        data=write_folder(tmp_path / "data", feeds),
        criteria=Criteria(min_cosine=0.999),
        per_tensor=True,
        bisect=True,
    )
    _checked(report, feeds, "input_ids")
    assert not report.passed
    assert report.per_tensor and any(not row.passed for row in report.per_tensor)
    assert report.bisect is not None and report.bisect.culprit_pass == "sparsify"
    assert report.bisect.culprit_node is not None


def test_bisect_on_an_iterable_of_varying_feeds(tmp_path: Path) -> None:
    source = _model(tmp_path, "cnn")
    feeds = _feeds(cnn_model(), image_feeds())
    planned = build_passes(["cleanup", "quant"], {"quant": {**QUANT, "calibrator": "minmax"}})
    result = bisect_passes(source, planned, feeds, Criteria(min_cosine=0.9999999))
    assert result.culprit_pass == "quant" and result.culprit_node is not None


# --- graphopt tune -------------------------------------------------------------------------------


def _tune(model: Path, out: Path, calib: Any, data: Any) -> list[Any]:
    result = tune(
        model,
        out,
        calib_data=calib,
        data=data,
        passes=["quant", "lowrank"],
        options={"quant": {"min_macs": 0}, "lowrank": {"min_size": 0}},
        executor=SerialExecutor(),
        budget=3,
        latency_runs=2,
    )
    return result.trials


@pytest.mark.parametrize("name", ["text", "cnn"])
def test_tune_on_folders_of_varying_feeds(name: str, tmp_path: Path) -> None:
    model = _model(tmp_path, name)
    calib = write_folder(tmp_path / "calib", MODELS[name][1](0))
    validation = write_folder(tmp_path / "val", MODELS[name][1](1))
    trials = _tune(model, tmp_path / "tune", calib, validation)
    assert trials
    for trial in trials:
        evaluation = trial.evaluation
        assert evaluation is not None and evaluation.status == "ok", evaluation
        assert not evaluation.problems and evaluation.min_cosine > 0.5
    again = _tune(model, tmp_path / "tune", calib, validation)  # everything from the cache
    assert [t.key for t in again] == [t.key for t in trials]


def test_tune_on_iterables_of_varying_feeds_keys_them_by_content(tmp_path: Path) -> None:
    model = _model(tmp_path, "rnn")
    first = _tune(model, tmp_path / "one", sequence_feeds(0), sequence_feeds(1))
    assert all(t.evaluation is not None and t.evaluation.status == "ok" for t in first)
    same = _tune(model, tmp_path / "two", iter(sequence_feeds(0)), iter(sequence_feeds(1)))
    assert [t.key for t in same] == [t.key for t in first]


def test_data_hash_sees_a_feed_of_another_shape(tmp_path: Path) -> None:
    """The same values in another shape (the same bytes) are other data for tune's cache."""
    feeds = text_feeds()
    reshaped = [dict(feed) for feed in feeds]
    ids = reshaped[2]["input_ids"]
    reshaped[2] = {name: array.reshape(ids.shape[::-1]) for name, array in reshaped[2].items()}
    one = data_content_hash(write_folder(tmp_path / "one", feeds))
    other = data_content_hash(write_folder(tmp_path / "other", reshaped))
    assert one != other


# --- fixes in data/feeds.py, ir/model.py and passes/quant.py ------------------------------------


def test_count_samples_counts_the_batch_axis(tmp_path: Path) -> None:
    _, feeds, raw = _state_first(tmp_path)
    assert feeds.count_samples() == samples(raw, "x") == SAMPLES


def test_quant_min_macs_per_sample_with_a_state_first_model(tmp_path: Path) -> None:
    """The head MatMul does seq × 16 × 4 MACs per sample: 190 · 64 / 24 ≈ 507 on these feeds,
    under a min_macs of 1000 (counting 6 samples, one per feed, made it 2027)."""
    path, feeds, raw = _state_first(tmp_path)
    tokens = sum(feed["x"].shape[0] * feed["x"].shape[1] for feed in raw)
    assert tokens * 16 * 4 / SAMPLES < 1000 < tokens * 16 * 4 / len(raw)
    report = optimize(
        path,
        tmp_path / "out.onnx",
        ["quant"],
        options={"quant": {"min_macs": 1000, "target_cosine": 0}},
        data=feeds,
        validate=False,
    )
    assert report.run.records[0].stats["skipped"]["too small to gain from int8"] == 1


def test_quant_int4_without_the_accuracy_search(tmp_path: Path) -> None:
    feeds = text_feeds()
    report = optimize(
        _model(tmp_path, "text"),
        tmp_path / "out.onnx",
        ["quant"],
        options={"quant": {**QUANT, "weight_bits": 4, "block_size": 16}},
        data=feeds,
        criteria=LOSSLESS_ENOUGH,
    )
    _checked(report, feeds, "input_ids")
    assert report.run.records[0].stats["by_scheme"]["int4"] == 6  # every MatMul with a weight


def test_quant_outlier_split_with_varying_image_sizes(tmp_path: Path) -> None:
    feeds = image_feeds()
    report = optimize(
        _model(tmp_path, "cnn"),
        tmp_path / "out.onnx",
        ["quant"],
        options={"quant": {**QUANT, "outlier_threshold": 2.0}},
        data=feeds,
        criteria=LOSSLESS_ENOUGH,
    )
    _checked(report, feeds, "image")


def test_quant_outlier_split_with_varying_sequence_lengths(tmp_path: Path) -> None:
    feeds = text_feeds()
    report = optimize(
        _model(tmp_path, "text"),
        tmp_path / "out.onnx",
        ["quant"],
        options={"quant": {**QUANT, "outlier_threshold": 2.0, "quantize_act_matmul": True}},
        data=feeds,
        criteria=LOSSLESS_ENOUGH,
    )
    _checked(report, feeds, "input_ids")
