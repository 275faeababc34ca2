"""Per-channel validation: a collapsed block of small-valued channels next to large ones fails.

A detector-like model packs 4 large box rows (values in the hundreds) and 6 class-score rows
(0–1) in one output ``[n, 10, 300]``. A candidate whose score rows are wrong keeps a whole-tensor
cosine above 0.99; the gate must fail it by default, name the channel, and pass it only with
``--whole-tensor``. Also: batching invariance, zero and negligible channels, NaN, axis rules,
``agreement``, JSON/JUnit, localization, tune's bar, and tune's fp16-on-CPU rule.
"""

from __future__ import annotations

import json
import logging
import math
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from graphopt.check.localize import compare_tensors
from graphopt.check.validate import (
    CHANNEL_AXIS_MAX,
    MIN_CHANNEL_ELEMENTS,
    Criteria,
    MetricAccumulator,
    agreement,
    channel_axes,
    compare_models,
    json_safe,
)
from graphopt.data.feeds import Feeds, input_specs, open_data
from graphopt.ir.model import model_from_proto
from graphopt.tuning.cache import Evaluation
from graphopt.tuning.executor import EvaluationTask, evaluate_task
from graphopt.tuning.search import LATENCY_TIE, Candidate, Trial, choose

from ..conftest import float_input, make_model, run_cli, run_ort
from ..tuning.trials import timed_trial

ANCHORS, CLASSES, FEATURES, SAMPLES = 300, 6, 16, 8
SCORE_ROW = re.compile(r"axis 1 index ([0-9]+)")


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def detector(score_seed: int = 1) -> onnx.ModelProto:
    """x [n, 16] → detections [n, 4 + 6, 300]: box rows ≈ 320 ± 20·N(0, 16), sigmoid scores."""
    rng = np.random.default_rng(0)
    box_weight = rng.standard_normal((FEATURES, 4 * ANCHORS)).astype(np.float32)
    score_weight = (
        np.random.default_rng(score_seed)
        .standard_normal((FEATURES, CLASSES * ANCHORS))
        .astype(np.float32)
    )
    make = helper.make_node
    nodes = [
        make("MatMul", ["x", "Wb"], ["hb"], name="boxes_mm"),
        make("Mul", ["hb", "box_scale"], ["hb_scaled"], name="box_scale"),
        make("Add", ["hb_scaled", "box_offset"], ["hb_pixels"], name="box_offset"),
        make("Reshape", ["hb_pixels", "box_shape"], ["boxes"], name="boxes"),
        make("MatMul", ["x", "Ws"], ["hs"], name="scores_mm"),
        make("Mul", ["hs", "score_scale"], ["hs_scaled"], name="score_scale"),
        make("Add", ["hs_scaled", "score_bias"], ["hs_biased"], name="score_bias"),
        make("Reshape", ["hs_biased", "score_shape"], ["score_logits"], name="score_logits"),
        make("Sigmoid", ["score_logits"], ["scores"], name="scores"),
        make("Concat", ["boxes", "scores"], ["detections"], axis=1, name="concat"),
    ]
    initializers = [
        numpy_helper.from_array(box_weight, "Wb"),
        numpy_helper.from_array(score_weight, "Ws"),
        _scalar("box_scale", 20.0),
        _scalar("box_offset", 320.0),
        _scalar("score_scale", 0.5),
        _scalar("score_bias", -3.0),
        numpy_helper.from_array(np.array([-1, 4, ANCHORS], np.int64), "box_shape"),
        numpy_helper.from_array(np.array([-1, CLASSES, ANCHORS], np.int64), "score_shape"),
    ]
    return make_model(
        nodes,
        [float_input("x", ["n", FEATURES])],
        [float_input("detections", ["n", 4 + CLASSES, ANCHORS])],
        initializers,
    )


def _inputs() -> np.ndarray:
    return np.random.default_rng(42).standard_normal((SAMPLES, FEATURES)).astype(np.float32)


def _feeds(batch: int) -> Feeds:
    specs = input_specs(model_from_proto(detector()).graph)
    x = _inputs()
    return open_data([{"x": x[i : i + batch]} for i in range(0, SAMPLES, batch)], specs)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("channels")
    paths = {
        "reference": folder / "reference.onnx",
        "collapsed": folder / "collapsed.onnx",
        "data": folder / "data.npz",
    }
    onnx.save(detector(), str(paths["reference"]))
    onnx.save(detector(score_seed=2), str(paths["collapsed"]))  # unrelated score weights
    np.savez(paths["data"], x=_inputs())
    return paths


# --- the gate ------------------------------------------------------------------------------------


def test_whole_tensor_cosine_hides_collapsed_scores_but_the_gate_fails() -> None:
    report = compare_models(detector(), detector(score_seed=2), _feeds(4))
    (row,) = report.comparisons
    assert row.cosine >= 0.999 and row.snr_db >= 40  # boxes dominate the whole tensor
    match = SCORE_ROW.fullmatch(row.worst_channel)
    assert match and 4 <= int(match.group(1)) < 4 + CLASSES  # a class-score row
    assert row.worst_channel_cosine < 0.9 and row.worst_channel_snr_db < 10
    assert row.channel_axes == [1] and row.channels == 4 + CLASSES
    assert not report.passed
    failures = " ".join(report.failures())
    assert f"at channel {row.worst_channel} < 0.99" in failures
    assert f"SNR {row.worst_channel_snr_db:.2f} dB at channel {row.worst_snr_channel}" in failures
    cosine_check = next(c for c in row.checks if c.criterion == "cosine")
    assert cosine_check.value == pytest.approx(row.worst_channel_cosine)
    assert f"whole tensor: cosine {row.cosine:.6f}" in cosine_check.detail

    whole = compare_models(
        detector(), detector(score_seed=2), _feeds(4), criteria=Criteria(per_channel=False)
    )
    assert whole.passed, whole.failures()
    assert whole.comparisons[0].worst_channel == row.worst_channel  # still measured, not gated
    assert "(whole tensor)" in whole.criteria.describe()


def test_an_identical_candidate_passes_every_channel() -> None:
    report = compare_models(detector(), detector(), _feeds(4))
    row = report.comparisons[0]
    assert report.passed and row.worst_channel_cosine == pytest.approx(1.0)
    assert row.worst_channel_snr_db == math.inf


@pytest.mark.parametrize("batch", [1, 4])
def test_batching_does_not_change_the_figures(batch: int) -> None:
    whole_batch = compare_models(detector(), detector(score_seed=2), _feeds(SAMPLES))
    batched = compare_models(detector(), detector(score_seed=2), _feeds(batch))
    one, other = whole_batch.comparisons[0], batched.comparisons[0]
    assert other.worst_channel == one.worst_channel
    assert other.worst_snr_channel == one.worst_snr_channel
    for name in ("cosine", "snr_db", "worst_channel_cosine", "worst_channel_snr_db"):
        assert getattr(other, name) == pytest.approx(getattr(one, name), rel=1e-9, abs=1e-12)
    # and the public scoring function gives the same figures on the stacked outputs
    (reference,) = run_ort(detector(), {"x": _inputs()})
    (candidate,) = run_ort(detector(score_seed=2), {"x": _inputs()})
    scored = agreement(reference, candidate, samples=SAMPLES)
    assert scored.worst_channel == one.worst_channel
    assert scored.worst_channel_cosine == pytest.approx(one.worst_channel_cosine, rel=1e-9)
    assert scored.cosine == pytest.approx(one.cosine, rel=1e-9)
    assert scored.score == pytest.approx(min(one.cosine, one.worst_channel_cosine), rel=1e-9)


# --- the measurement -----------------------------------------------------------------------------


def test_channel_axes_rule() -> None:
    assert channel_axes((1, 84, 8400), samples=1) == [1]
    assert channel_axes((4, 10), samples=4) == [1]  # axis 0 is the batch
    assert channel_axes((4, 10), samples=None) == [1]  # unknown count: axis 0 of rank ≥ 2
    assert channel_axes((2, 1, 128), samples=1) == [0, 2]  # a stacked state, not a batch
    assert channel_axes((1, 3, CHANNEL_AXIS_MAX + 1), samples=1) == [1]
    assert channel_axes((1, 3, 7, CHANNEL_AXIS_MAX), samples=1) == [1]  # rank 4: a map
    assert channel_axes((300,), samples=None) == []


def test_all_zero_and_negligible_channels_agree_and_json_stays_finite() -> None:
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((4, 3, 50))
    reference[:, 1] = 0.0
    candidate = reference.copy()
    same = agreement(reference, candidate)
    assert same.worst_channel_cosine == 1.0 and same.worst_channel_snr_db == math.inf
    candidate[:, 1] = 1e-8 * rng.standard_normal((4, 50))  # below NEGLIGIBLE_RMS: still agrees
    assert agreement(reference, candidate).worst_channel_cosine == 1.0
    candidate[:, 1] = 1e-3  # the reference is silent, the candidate is not
    broken = agreement(reference, candidate)
    assert broken.worst_channel == "axis 1 index 1" and broken.worst_channel_cosine == 0.0
    assert broken.worst_channel_snr_db == -math.inf and broken.score == 0.0
    zeros = agreement(np.zeros((2, 8, 8)), np.zeros((2, 8, 8)))
    assert zeros.score == 1.0 and zeros.score_snr_db == math.inf
    text = json.dumps(json_safe(asdict(broken)), allow_nan=False)
    assert '"worst_channel_snr_db": "-inf"' in text


def test_nan_in_a_channel_is_a_finding_not_a_crash() -> None:
    reference = np.random.default_rng(4).standard_normal((2, 5, 40)).astype(np.float32)
    candidate = reference.copy()
    candidate[0, 2, 7] = np.nan
    accumulator = MetricAccumulator("y", "cpu", Criteria(), seed=0)
    accumulator.add(reference, candidate, samples=2)
    result = accumulator.finish()
    assert not result.passed and result.nan_candidate == 1
    # the figures are withheld (not 1.0 beside a NaN); the finite ones are the check's detail
    assert result.status == "failed" and result.cosine is None
    assert result.worst_channel_cosine is None
    (finite,) = result.checks
    assert finite.message == "1 NaN values the reference does not have"
    assert "worst channel: cosine 1.000000" in finite.detail


def test_channel_sizes_may_differ_between_batches() -> None:
    rng = np.random.default_rng(5)
    first = rng.standard_normal((1, 5, 40))
    second = rng.standard_normal((1, 7, 40))
    accumulator = MetricAccumulator("y", "cpu", Criteria(), seed=0)
    accumulator.add(first, first, samples=1)
    broken = second.copy()
    broken[0, 6] *= -1.0  # index 6 exists only in the second batch
    broken[0, 0] += 0.5  # index 0 is in both: its figure pools both batches
    accumulator.add(second, broken, samples=1)
    result = accumulator.finish()
    assert result.channels == 7
    assert result.worst_channel == "axis 1 index 6"
    assert result.worst_channel_cosine == pytest.approx(-1.0)
    pooled_ref = np.concatenate([first[0, 0], second[0, 0]])
    pooled_cand = np.concatenate([first[0, 0], broken[0, 0]])
    expected = pooled_ref @ pooled_cand / np.linalg.norm(pooled_ref) / np.linalg.norm(pooled_cand)
    sums = accumulator.channels[1]
    assert sums.dot[0] / math.sqrt(sums.ref_sq[0] * sums.cand_sq[0]) == pytest.approx(expected)


def test_channels_need_enough_elements_to_be_judged() -> None:
    rng = np.random.default_rng(6)
    reference = rng.standard_normal((1, 10))
    candidate = reference + 0.3 * rng.standard_normal((1, 10))
    one_sample = agreement(reference, candidate)
    assert one_sample.worst_channel == "" and one_sample.score == one_sample.cosine
    rows = MIN_CHANNEL_ELEMENTS
    reference = rng.standard_normal((rows, 10))
    candidate = reference.copy()
    candidate[:, 3] = rng.standard_normal(rows)
    many = agreement(reference, candidate, samples=rows)
    assert many.worst_channel == "axis 1 index 3" and many.score < 0.8


def test_chunked_sums_give_the_same_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    import graphopt.check.validate as validate

    rng = np.random.default_rng(7)
    reference = rng.standard_normal((2, 37, 300))
    noise = rng.standard_normal(reference.shape) * np.linspace(0.0, 1.0, 37)[None, :, None]
    whole = agreement(reference, reference + noise)
    monkeypatch.setattr(validate, "_METRIC_CHUNK", 5000)
    monkeypatch.setattr(validate, "_CHANNEL_CHUNK", 999)  # slices straddle chunk borders
    chunked = agreement(reference, reference + noise)
    assert chunked.worst_channel == whole.worst_channel == "axis 1 index 36"
    assert chunked.worst_channel_cosine == pytest.approx(whole.worst_channel_cosine, rel=1e-12)
    assert chunked.worst_channel_snr_db == pytest.approx(whole.worst_channel_snr_db, rel=1e-12)


def test_agreement_rejects_different_shapes() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        agreement(np.zeros((1, 4, 5)), np.zeros((1, 5, 4)))


def test_per_tensor_rows_carry_the_worst_channel() -> None:
    rows = {row.name: row for row in compare_tensors(detector(), detector(2), _feeds(4))}
    assert rows["boxes"].passed and rows["boxes"].worst_channel_cosine == pytest.approx(1.0)
    assert not rows["detections"].passed and rows["detections"].cosine > 0.999
    assert SCORE_ROW.fullmatch(rows["detections"].worst_channel)


# --- the CLI -------------------------------------------------------------------------------------


def test_check_fails_names_the_channel_and_reports_it(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, junit = tmp_path / "report.json", tmp_path / "report.xml"
    args = ["check", str(files["reference"]), str(files["collapsed"]), "--data", str(files["data"])]
    code, stdout, _ = run_cli([*args, "--json", str(report), "--junit", str(junit)], capsys)
    assert code == 1, stdout
    row = json.loads(report.read_text())["validation"]["comparisons"][0]
    assert row["cosine"] >= 0.999 and row["worst_channel_cosine"] < 0.9
    assert SCORE_ROW.fullmatch(row["worst_channel"])
    assert f"cosine {row['worst_channel_cosine']:.6f} at channel {row['worst_channel']}" in stdout
    assert "worst_ch_cosine" in stdout and "check: FAILED" in stdout
    failures = {
        case.get("name"): case.find("failure")
        for case in ElementTree.parse(junit).getroot().iter("testcase")
        if case.find("failure") is not None
    }
    assert set(failures) == {"cosine", "snr"}
    assert row["worst_channel"] in (failures["cosine"].text or "")
    assert "whole tensor: cosine" in (failures["cosine"].text or "")

    code, stdout, _ = run_cli([*args, "--whole-tensor"], capsys)
    assert code == 0 and "check: PASSED" in stdout and "(whole tensor)" in stdout
    code, _, stderr = run_cli([*args, "--exact", "--whole-tensor"], capsys)
    assert code == 2 and "--whole-tensor" in stderr


def test_optimize_gate_is_per_channel_unless_whole_tensor(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    installed_plugin: str,
) -> None:
    args = ["optimize", str(files["reference"]), str(tmp_path / "out.onnx"), "--passes", "noise"]
    args += ["-o", "noise.scale=0.05", "-o", "noise.loud=scores_mm"]  # 10× the noise on scores
    args += ["--calib-data", str(files["data"])]
    report = tmp_path / "report.json"
    code, stdout, _ = run_cli([*args, "--report", str(report)], capsys)
    assert code == 1, stdout
    row = json.loads(report.read_text())["validation"]["comparisons"][0]
    assert row["cosine"] >= 0.99 and row["worst_channel_cosine"] < 0.99
    assert f"at channel {row['worst_channel']} < 0.99" in stdout
    code, stdout, _ = run_cli([*args, "--whole-tensor"], capsys)
    assert code == 0, stdout
    assert "validation: PASSED" in stdout


# --- tune ----------------------------------------------------------------------------------------


def test_tune_bar_is_the_worst_channel_figure(
    files: dict[str, Path], tmp_path: Path, installed_plugin: str
) -> None:
    task = EvaluationTask(
        key="noisy-scores",
        model_path=str(files["reference"]),
        calib_data=str(files["data"]),
        validation_data=str(files["data"]),
        passes=("noise",),
        options={"noise": {"scale": 0.05, "loud": ["scores_mm"]}},
        output_path=str(tmp_path / "candidate.onnx"),
    )
    evaluation = evaluate_task(task)
    assert evaluation.ok, evaluation.error
    figures = evaluation.outputs["detections [cpu]"]
    assert figures["whole_cosine"] >= 0.99 > figures["worst_channel_cosine"]
    assert evaluation.min_cosine == pytest.approx(figures["worst_channel_cosine"])
    assert figures["cosine"] == evaluation.min_cosine
    assert evaluation.min_snr_db == pytest.approx(figures["worst_channel_snr_db"])
    trial = Trial(0, "sensitivity", Candidate(("noise",), ("noise",), {}), "k", evaluation)
    assert not trial.meets(0.99) and trial.meets(figures["worst_channel_cosine"])
    restored = Evaluation.from_dict(json.loads(json.dumps(evaluation.to_dict())))
    assert restored.outputs == evaluation.outputs  # the cache keeps both parts


def test_fp16_on_cpu_must_be_measured_faster(caplog: pytest.LogCaptureFixture) -> None:
    plain = timed_trial(0, 0.80, 60, ("quant",))
    tied_fp16 = timed_trial(1, 0.80 * (1 + LATENCY_TIE / 2), 30, ("fp16", "quant"))  # smaller
    with caplog.at_level(logging.INFO, logger="graphopt.tuning.search"):
        assert choose([plain, tied_fp16], "latency", 0.99, 100) is plain
    assert "not choosing fp16 + quant" in caplog.text
    # off the CPU the plain tie rule applies: within LATENCY_TIE the smaller model wins
    assert choose([plain, tied_fp16], "latency", 0.99, 100, latency_provider="cuda") is tied_fp16
    faster_fp16 = timed_trial(2, 0.70, 30, ("fp16", "quant"))
    assert choose([plain, tied_fp16, faster_fp16], "latency", 0.99, 100) is faster_fp16
    # with no candidate without fp16, fp16 must clearly beat the original itself
    assert choose([timed_trial(3, 0.99, 30, ("fp16",))], "latency", 0.99, 100) is None
    alone = timed_trial(4, 0.90, 30, ("fp16",))
    assert choose([alone], "latency", 0.99, 100) is alone
    # the size objective is untouched by the rule
    assert choose([plain, tied_fp16], "size", 0.99, 100) is tied_fp16
