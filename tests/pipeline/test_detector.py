"""The bundled digits detector and the detection metrics its benchmark rests on.

- Metrics (models/detection.py, tools/bench_detect.py) on hand-made boxes: IoU, NMS, decoding of
  a packed ``[4 + C, anchors]`` output, greedy class-aware matching, AP, per-row cosine.
- The committed ``models/digits_detector.onnx`` finds the ground truth of the committed held-out
  scenes (bounds measured: see each test), and its output is packed as YOLOv8's.
- The scene sets are reproducible from their seeds and built from digits training never saw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models import detection
from models.detection import Detections
from tools.bench_detect import decode_tail_nodes, detection_metrics, row_cosines, whole_cosine

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "digits_detector.onnx"
EVAL_IMAGES = REPO / "models" / "digits_detector_eval.npz"
EVAL_BOXES = REPO / "models" / "digits_detector_eval_boxes.npz"
CALIB_IMAGES = REPO / "models" / "digits_detector_calib.npz"
CALIB_BOXES = REPO / "models" / "digits_detector_calib_boxes.npz"

# Measured on the first 8 committed held-out scenes (56 digits): recall 0.946 (53/56), precision
# 0.898 (53/59); on 128 held-out scenes recall 0.942, precision 0.913, mAP@0.5 0.971.
MIN_RECALL = 0.9
MIN_PRECISION = 0.85


def _dets(boxes: list[list[float]], labels: list[int], scores: list[float] | None = None):
    scores = scores if scores is not None else [1.0] * len(labels)
    return Detections(
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(scores, dtype=np.float32),
        np.asarray(labels, dtype=np.int64),
    )


# --- IoU and NMS -------------------------------------------------------------------------------


def test_box_iou_on_hand_made_boxes() -> None:
    boxes = np.array([[0, 0, 2, 2], [1, 0, 3, 2], [5, 5, 6, 6], [0, 0, 2, 2], [1, 1, 1, 4]])
    iou = detection.box_iou(boxes, boxes)
    assert iou[0, 1] == pytest.approx(2 / 6)  # half-overlapping squares: 2 / (4 + 4 - 2)
    assert iou[0, 2] == 0.0  # disjoint
    assert iou[0, 3] == pytest.approx(1.0)  # identical
    assert iou[4, 4] == 0.0  # zero area: IoU 0 even with itself
    np.testing.assert_allclose(iou, iou.T)


def test_nms_keeps_best_of_overlapping_and_all_of_separate() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    scores = np.array([0.6, 0.9, 0.5], dtype=np.float32)
    # box 0 and 1: IoU 81 / 100 → suppressed at 0.5, kept at 0.9
    assert detection.nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert detection.nms(boxes, scores, 0.9).tolist() == [1, 0, 2]


def _packed(entries: list[tuple[list[float], int, float]], anchors: int = 6) -> np.ndarray:
    """A [4 + 3, anchors] output with (cx, cy, w, h), class, score per leading anchor."""
    output = np.zeros((4 + 3, anchors), dtype=np.float32)
    output[4:] = 0.01
    for anchor, (box, label, score) in enumerate(entries):
        output[:4, anchor] = box
        output[4 + label, anchor] = score
    return output


def test_decode_converts_boxes_and_runs_classwise_nms() -> None:
    output = _packed(
        [
            ([10, 10, 4, 4], 0, 0.9),  # kept
            ([10.2, 10, 4, 4], 0, 0.8),  # same class, IoU ≈ 0.9 → suppressed
            ([10, 10, 4, 4], 1, 0.7),  # other class at the same place → kept
            ([50, 50, 8, 2], 2, 0.2),  # below the 0.25 threshold
        ]
    )
    found = detection.decode(output)
    assert found.labels.tolist() == [0, 1]
    np.testing.assert_allclose(found.scores, [0.9, 0.7])
    np.testing.assert_allclose(found.boxes[0], [8, 8, 12, 12])
    low = detection.decode(output, score_threshold=0.1)
    assert 2 in low.labels.tolist()
    np.testing.assert_allclose(low.boxes[low.labels == 2][0], [46, 49, 54, 51])


# --- matching and AP ---------------------------------------------------------------------------


def test_match_requires_class_and_iou_above_threshold() -> None:
    reference = _dets([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], [1, 2, 3])
    candidate = _dets(
        [[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 5]],  # last: IoU exactly 0.5
        [1, 7, 3],  # second: wrong class
    )
    assert detection.match(reference, candidate).tolist() == [0, -1, -1]
    assert detection.match(reference, candidate, iou_threshold=0.49).tolist() == [0, -1, 2]


def test_match_is_one_to_one_and_best_score_first() -> None:
    reference = _dets([[0, 0, 10, 10], [1, 0, 11, 10]], [4, 4], scores=[0.3, 0.9])
    candidate = _dets([[1, 0, 11, 10]], [4])
    # the higher-scoring reference takes the only candidate; the other stays unmatched
    assert detection.match(reference, candidate).tolist() == [-1, 0]
    counts = detection.count_matches([reference], [candidate])
    assert (counts.reference, counts.candidate, counts.matched) == (2, 1, 1)
    assert counts.recall == 0.5 and counts.precision == 1.0


def test_average_precision_on_a_known_ranking() -> None:
    truth = [_dets([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0])]
    perfect = [_dets([[0, 0, 10, 10], [20, 0, 30, 10]], [0, 0], [0.9, 0.8])]
    assert detection.average_precision(truth, perfect, 0) == pytest.approx(1.0)
    # TP 0.9, FP 0.8, TP 0.7: precision 1 up to recall 0.5, then 2/3 up to recall 1
    ranked = [
        _dets([[0, 0, 10, 10], [50, 50, 60, 60], [20, 0, 30, 10]], [0, 0, 0], [0.9, 0.8, 0.7])
    ]
    assert detection.average_precision(truth, ranked, 0) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert np.isnan(detection.average_precision(truth, ranked, 5))
    assert detection.mean_average_precision(truth, ranked, 6) == pytest.approx(0.5 + 0.5 * 2 / 3)


# --- the benchmark's agreement figures ---------------------------------------------------------


def test_row_cosines_expose_a_collapsed_small_row() -> None:
    rng = np.random.default_rng(0)
    reference = np.concatenate(
        [rng.uniform(0, 256, (2, 4, 50)), rng.uniform(0, 1, (2, 3, 50))], axis=1
    )
    candidate = reference.copy()
    candidate[:, 5] = 0.0  # one score row collapses
    cosines = row_cosines(reference, candidate)
    assert cosines[5] == 0.0
    assert np.delete(cosines, 5) == pytest.approx(1.0)
    assert whole_cosine(reference, candidate) > 0.999  # the whole tensor hardly notices
    assert row_cosines(np.zeros((1, 2, 3)), np.zeros((1, 2, 3))).tolist() == [1.0, 1.0]


def test_detection_metrics_count_lost_detections() -> None:
    reference = np.stack([_packed([([10, 10, 4, 4], 0, 0.9), ([30, 30, 4, 4], 1, 0.8)])])
    candidate = reference.copy()
    candidate[0, 4 + 1, 1] = 0.1  # second detection's score falls below the threshold
    truths = [_dets([[8, 8, 12, 12], [28, 28, 32, 32]], [0, 1])]
    same = detection_metrics(reference, reference, truths)
    assert same["kept"] == 1.0 and same["recall"] == 1.0
    lost = detection_metrics(reference, candidate, truths)
    assert lost["kept"] == 0.5 and lost["recall"] == 0.5 and lost["precision"] == 1.0
    assert lost["worst_row"] == "score 1"


# --- the committed detector --------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out():
    if not (MODEL.exists() and EVAL_IMAGES.exists() and EVAL_BOXES.exists()):
        pytest.skip("digits detector files missing: run python -m models.digits_detector")
    from models.digit_scenes import SceneSet

    return SceneSet.load(EVAL_IMAGES, EVAL_BOXES)


def _run(images: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]


def test_detector_output_is_packed_like_yolov8(held_out) -> None:
    output = _run(held_out.images[:2])
    assert output.shape == (2, 14, 32 * 32 + 16 * 16 + 8 * 8)
    scores = output[:, 4:]
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    boxes = output[:, :4]
    assert boxes[:, 2:].min() >= 0.0  # widths and heights
    assert np.median(boxes[:, :2]) == pytest.approx(128, abs=32)  # centres span the image


def test_detector_finds_held_out_digits(held_out) -> None:
    images = held_out.images[:8]
    found = detection.decode_batch(_run(images))
    truths = [Detections.ground_truth(*held_out.truth(i)) for i in range(len(images))]
    counts = detection.count_matches(truths, found)
    assert counts.reference >= 30
    assert counts.recall >= MIN_RECALL, counts
    assert counts.precision >= MIN_PRECISION, counts


def test_scene_sets_are_reproducible_and_unseen(held_out) -> None:
    pytest.importorskip("sklearn")
    from models.digit_scenes import SceneSet, load_digit_pool, make_scenes
    from models.digits_detector import CALIB_SEED, EVAL_SEED

    again = make_scenes(load_digit_pool("eval"), 3, seed=EVAL_SEED)
    np.testing.assert_array_equal(again.images, held_out.images[:3])
    np.testing.assert_array_equal(again.boxes, held_out.boxes[held_out.scene < 3])
    calib = SceneSet.load(CALIB_IMAGES, CALIB_BOXES)
    calib_again = make_scenes(load_digit_pool("calib"), 2, seed=CALIB_SEED)
    np.testing.assert_array_equal(calib_again.images, calib.images[:2])
    train = {image.tobytes() for image in load_digit_pool("train").images}
    for pool in ("calib", "eval"):
        assert not any(image.tobytes() in train for image in load_digit_pool(pool).images)


def test_decode_tail_is_what_no_conv_follows(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, numpy_helper, save

    weight = numpy_helper.from_array(np.ones((1, 1, 1, 1), dtype=np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="first"),
        helper.make_node("Sigmoid", ["a"], ["b"], name="act"),
        helper.make_node("Conv", ["b", "w"], ["c"], name="last"),
        helper.make_node("Relu", ["a"], ["d"], name="side"),
        helper.make_node("Concat", ["c", "d"], ["y"], name="pack", axis=1),
    ]
    value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2, 2])
    graph = helper.make_graph(nodes, "g", [value], [output], [weight])
    save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert decode_tail_nodes(tmp_path / "m.onnx") == ["last", "side", "pack"]


def test_task_aligned_assigner_picks_anchors_inside_the_box() -> None:
    torch = pytest.importorskip("torch")
    from models.digits_detector import TOP_K, assign

    ys, xs = torch.meshgrid(torch.arange(8.0) + 0.5, torch.arange(8.0) + 0.5, indexing="ij")
    anchors = torch.stack([xs.flatten(), ys.flatten()], -1)  # 64 anchors on a unit grid
    wide, narrow = [2.0, 0.0, 6.0, 4.0], [2.0, 0.0, 4.0, 4.0]  # narrow lies inside wide
    gt_boxes = torch.tensor([[wide, narrow]])
    gt_labels = torch.tensor([[5, 2]])
    boxes = torch.tensor([narrow]).expand(1, 64, 4)  # every anchor predicts the narrow box
    in_narrow = (anchors >= torch.tensor(narrow[:2])) & (anchors <= torch.tensor(narrow[2:]))
    in_narrow = in_narrow.all(-1)
    scores = torch.full((1, 64, 6), 0.5)
    scores[0, :, 5] = torch.where(in_narrow, 0.9, 0.1)  # wide's top-k includes narrow's anchors
    targets = assign(scores, boxes, anchors, gt_labels, gt_boxes, torch.tensor([[True, True]]))
    in_wide = ((anchors > torch.tensor(wide[:2])) & (anchors < torch.tensor(wide[2:]))).all(-1)
    fg = targets.foreground[0]
    assert 0 < fg.sum() <= 2 * TOP_K
    assert not (fg & ~in_wide).any()  # only anchors inside a box
    # anchors claimed by both boxes go to the one they overlap most (narrow: CIoU 1), not to
    # the first box in the list
    assert fg[in_narrow].all()
    assert (targets.scores[0, in_narrow, 2] > 0).all()
    assert (targets.scores[0, in_narrow, 5] == 0).all()
    assert (targets.scores[0, fg & ~in_narrow, 5] > 0).all()
    assert targets.scores[0, :, [0, 1, 3, 4]].abs().sum() == 0  # only the boxes' classes
    assert targets.scores[0].max() <= 1.0 + 1e-6


def test_benchmark_runs_end_to_end_on_an_exact_pass(held_out, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from tools.bench_detect import SOURCE, VARIANTS, markdown, measure

    cleanup = [variant for variant in VARIANTS if variant.key == "cleanup"]
    rows, setup = measure(cleanup, SOURCE, tmp_path, calib_scenes=8, eval_scenes=8, runs=2)
    fp32, row = rows
    assert not row.error, row.error
    assert fp32.kept == 1.0 and fp32.recall >= MIN_RECALL
    assert row.kept == 1.0 and row.recall == fp32.recall  # exact pass: nothing lost
    assert row.verdict == "PASS" and row.check_default == "PASS"
    assert row.latency_ratio_b1 is not None and row.size_mb == pytest.approx(fp32.size_mb, 0.05)
    assert "graphopt cleanup" in markdown(rows, setup)
