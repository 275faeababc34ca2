"""tools/bench_exporters.py: its metric functions on hand-made inputs, and one end-to-end run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt.errors import InputError, PassError
from tools import bench_exporters as bench


def test_edit_distance_and_character_error_rate() -> None:
    assert bench.edit_distance("kitten", "sitting") == 3
    assert bench.edit_distance("", "abc") == 3
    assert bench.edit_distance("abc", "abc") == 0
    # corpus CER: (1 substitution + 2 deletions) over 4 + 4 reference characters
    assert bench.character_error_rate(["abcd", "wxyz"], ["abXd", "wx"]) == pytest.approx(3 / 8)
    with pytest.raises(ValueError, match="references"):
        bench.character_error_rate(["a"], ["a", "b"])


def test_ctc_greedy_decode_collapses_repeats_then_drops_blanks() -> None:
    best = [0, 1, 1, 0, 1, 2, 2, 0, 3]
    probabilities = np.eye(4)[best] * 0.9 + 0.025
    assert bench.ctc_greedy_decode(probabilities) == [1, 1, 2, 3]
    characters = ["blank", "a", "b", "c"]
    assert bench.indices_to_text([1, 1, 2, 3], characters) == "aabc"
    assert bench.indices_to_text([2, 7], None) == "<2><7>"


def test_mask_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    assert bench.mask_iou(a, b) == 1.0  # two empty maps agree
    a[0, :2] = True
    b[0, 1:3] = True
    assert bench.mask_iou(a, b) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="shapes"):
        bench.mask_iou(a, np.zeros((3, 4), bool))


def test_text_boxes_and_boxes_kept() -> None:
    reference = np.zeros((20, 40), bool)
    reference[2:6, 3:20] = True
    reference[10:14, 5:30] = True
    boxes = bench.text_boxes(reference)
    assert sorted(boxes) == [(2, 3, 6, 20), (10, 5, 14, 30)]
    shifted = np.zeros_like(reference)
    shifted[2:6, 4:21] = True  # same line, one pixel to the right: IoU 16/18
    shifted[16:19, 5:30] = True  # the second line moved off its place: IoU 0
    assert bench.boxes_kept(boxes, bench.text_boxes(shifted)) == 1
    # one candidate box cannot match two reference boxes
    merged = [(2, 3, 14, 30)]
    assert bench.boxes_kept([(2, 3, 14, 30), (2, 3, 14, 29)], merged) == 1
    assert bench.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


def test_decision_flips() -> None:
    reference = np.array([0.1, 0.6, 0.49, 0.51, 0.9])
    candidate = np.array([0.2, 0.4, 0.51, 0.52, 0.5])
    assert bench.decision_flips(reference, candidate, 0.5) == 3
    with pytest.raises(ValueError, match="shapes"):
        bench.decision_flips(reference, candidate[:2], 0.5)


def test_vad_chunks_carry_the_previous_context() -> None:
    signal = np.arange(3 * bench.VAD_CHUNK + 100, dtype=np.float32)
    chunks = bench.vad_chunks(signal)
    assert chunks.shape == (3, bench.VAD_CONTEXT + bench.VAD_CHUNK)
    assert np.all(chunks[0, : bench.VAD_CONTEXT] == 0)
    np.testing.assert_array_equal(chunks[1, : bench.VAD_CONTEXT], signal[512 - 64 : 512])
    np.testing.assert_array_equal(chunks[2, bench.VAD_CONTEXT :], signal[1024:1536])


def test_speech_like_signal_is_seeded_and_labelled() -> None:
    first, speech = bench.speech_like_signal(np.random.default_rng(3), 6.0)
    again, _ = bench.speech_like_signal(np.random.default_rng(3), 6.0)
    other, _ = bench.speech_like_signal(np.random.default_rng(4), 6.0)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == speech.shape == (6 * bench.VAD_RATE,)
    assert 0.2 < speech.mean() < 0.9
    # voiced parts are louder than the rest (background noise and non-speech distractors)
    assert np.sqrt(np.mean(first[speech] ** 2)) > 2 * np.sqrt(np.mean(first[~speech] ** 2))


def test_rendered_line_is_normalized_like_paddleocr() -> None:
    rng = np.random.default_rng(0)
    image = bench.render_line(rng, "AB12 cd")
    array = bench.normalize_line(image, 48, 320)
    assert array.shape == (3, 48, 320)
    assert array.min() >= -1.0 and array.max() <= 1.0
    width = min(320, int(np.ceil(48 * image.width / image.height)))
    assert np.all(array[:, :, width:] == 0)  # right padding
    assert array[:, :, :width].std() > 0.1  # text drawn


def test_render_page_is_chw_with_imagenet_normalization() -> None:
    page = bench.render_page(np.random.default_rng(1), 64, 96)
    assert page.shape == (3, 64, 96)
    assert page.dtype == np.float32
    assert page.min() >= (0 - bench.IMAGENET_MEAN.max()) / bench.IMAGENET_STD.min()
    assert page.max() <= (1 - bench.IMAGENET_MEAN.min()) / bench.IMAGENET_STD.min()


def test_recognizer_characters_from_metadata(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    plain = tmp_path / "plain.onnx"
    onnx.save(model, plain)
    assert bench.recognizer_characters(plain) is None
    helper.set_model_props(model, {"character": "a\nb\n7"})
    labelled = tmp_path / "labelled.onnx"
    onnx.save(model, labelled)
    assert bench.recognizer_characters(labelled) == ["blank", "a", "b", "7", " "]


def test_classify_failure() -> None:
    try:
        try:
            raise NameError("name 'x' is not defined")
        except NameError as inner:
            raise PassError("lowrank", ("cleanup",), f"NameError: {inner}") from inner
    except PassError as error:
        outcome, reason = bench.classify_failure(error)
    assert outcome == "crash"
    assert reason.startswith("NameError: pass 'lowrank' failed after [cleanup]")
    outcome, reason = bench.classify_failure(InputError("opset 9 has no per-axis Q/DQ"))
    assert (outcome, reason) == ("refused", "opset 9 has no per-axis Q/DQ")


def test_has_matmul_looks_inside_if_bodies(tmp_path: Path) -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [1.0, 0.0, 0.0, 1.0])
    branch = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"])],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z2"])],
        "else",
        [],
        [helper.make_tensor_value_info("z2", TensorProto.FLOAT, [1, 2])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weight],
    )
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    assert bench.has_matmul(path)
    flat = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    onnx.save(helper.make_model(flat, opset_imports=[helper.make_opsetid("", 13)]), path)
    assert not bench.has_matmul(path)


def test_end_to_end_on_the_digits_cnn(tmp_path: Path) -> None:
    code = bench.main(["--quick", "--models", "digits", "--out", str(tmp_path), "--runs", "3"])
    assert code == 0
    payload = json.loads((tmp_path / "exporters.json").read_text())
    assert [entry["key"] for entry in payload["models"]] == ["digits"]
    runs = {run["plan"]: run for run in payload["models"][0]["runs"]}
    assert set(runs) == {plan.key for plan in bench.PLANS}  # the CNN has Gemm: lowrank too
    for run in runs.values():
        assert run["outcome"] in {"ok", "validation failed"}, run
        assert run["loads_in_ort"] is True and run["checker"] == "ok"
        assert run["opset_in"] == run["opset_out"] == 17
        assert 0.0 <= run["task"]["top1_agreement"] <= 1.0
    assert runs["cleanup"]["outcome"] == "ok"
    assert runs["cleanup"]["task"]["top1_agreement"] == 1.0
    assert runs["fp16"]["size_ratio"] < 0.6
    fp32_accuracy = payload["models"][0]["fp32"]["accuracy"]
    assert fp32_accuracy > 0.9
    assert runs["cleanup"]["task"]["accuracy"] == fp32_accuracy
    markdown = (tmp_path / "exporters.md").read_text()
    assert "| digits CNN | fp16 |" in markdown
    assert not (tmp_path / "models").exists()  # candidates are deleted unless --keep-models


@pytest.mark.slow
def test_quick_run_on_the_paddle_direction_classifier(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None:
        pytest.skip(
            "rapidocr-onnxruntime is not installed (pip install --no-deps "
            "rapidocr-onnxruntime==1.4.4)"
        )
    assert bench.main(["--quick", "--models", "cls", "--out", str(tmp_path)]) == 0
    entry = json.loads((tmp_path / "exporters.json").read_text())["models"][0]
    runs = {run["plan"]: run for run in entry["runs"]}
    quant = runs["cleanup,quant"]
    assert quant["opset_in"] == 11 and quant["opset_out"] >= 13
    assert quant["loads_in_ort"] and quant["checker"] == "ok"
    assert quant["size_ratio"] < 1.0
    assert runs["cleanup (no data)"]["outcome"] == "ok"


def test_whole_tensor_verdict_leaves_only_the_channel_figures_out() -> None:
    from graphopt.check.validate import Check, Criteria, OutputComparison, ValidationReport

    def report(cosine: float, finite: bool, criteria: Criteria) -> ValidationReport:
        comparison = OutputComparison(output="y", provider="cpu", cosine=cosine, snr_db=30.0)
        comparison.worst_channel_cosine, comparison.worst_channel = 0.5, "axis 1 index 3"
        comparison.checks = [
            Check("finite", finite, "no new NaN/Inf"),
            Check("cosine", False, "cosine 0.5 at channel axis 1 index 3 < 0.99"),
            Check("snr", True, "SNR 30 dB"),
        ]
        return ValidationReport(
            data="d", synthetic=False, providers=["cpu"], criteria=criteria,
            comparisons=[comparison],
        )  # fmt: skip

    lossy = Criteria(min_cosine=0.99, min_snr_db=15.0)
    assert bench.whole_tensor_verdict(report(0.999, True, lossy))
    assert not bench.whole_tensor_verdict(report(0.98, True, lossy))
    assert not bench.whole_tensor_verdict(report(0.999, False, lossy))
    # exact runs keep the gate's own verdict (here a failing check)
    assert not bench.whole_tensor_verdict(report(0.999, True, Criteria(exact=True)))


def test_validation_cell_reads_comparisons_without_figures() -> None:
    """Since issue 16.5 a comparison that did not happen (or found new NaN) has no cosine; the
    exporters table crashed on it (fp16 of two light-zoo models), so exporters.md was not
    written."""
    nan_run = {
        "comparisons": [{"cosine": None, "worst_channel_cosine": None, "output": "y"}],
    }
    assert bench._validation_cell(nan_run) == "– (no figures)"
    mixed = {
        "comparisons": [
            {"cosine": None, "worst_channel_cosine": None, "output": "a"},
            {"cosine": 0.5, "worst_channel_cosine": 0.25, "output": "b", "worst_channel": "ax 1"},
        ],
    }
    assert bench._validation_cell(mixed) == "0.5000 / 0.2500 (b ax 1)"
