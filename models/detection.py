"""Detector post-processing and detection metrics in numpy (no torch, no torchvision).

Rules:

1. A YOLOv8-style output is ``[batch, 4 + C, anchors]``: rows 0-3 hold box centre x, centre y,
   width and height in pixels, rows 4.. hold the sigmoid score of each of the C classes.
2. :func:`decode` keeps, per anchor, the best class and its score (one label per anchor, as
   Ultralytics does by default), drops anchors scoring below ``score_threshold``, runs
   non-maximum suppression per class (boxes of different classes never suppress each other)
   and keeps the ``max_detections`` best. Boxes come out as ``x1, y1, x2, y2``.
3. IoU of boxes that do not overlap is 0; a box of zero area has IoU 0 with everything.
4. :func:`match` pairs reference boxes with candidate boxes greedily: references in order of
   decreasing score (ground truth: in the order given), each taking the unmatched candidate of
   the same class with the highest IoU, if that IoU is above the threshold (strictly). Each
   candidate is used at most once.
5. :func:`average_precision` is all-point interpolated AP (PASCAL VOC 2010+) of one class over
   a set of images; :func:`mean_average_precision` averages it over classes present in the
   ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_SCORE_THRESHOLD = 0.25
DEFAULT_NMS_IOU = 0.5
DEFAULT_MATCH_IOU = 0.5
DEFAULT_MAX_DETECTIONS = 100


@dataclass(frozen=True)
class Detections:
    """Boxes of one image: ``boxes`` float32 [n, 4] (x1, y1, x2, y2), ``scores`` [n], ``labels``
    int64 [n]. Ground truth uses scores of 1."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def ground_truth(cls, boxes: np.ndarray, labels: np.ndarray) -> Detections:
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        return cls(boxes, np.ones(len(boxes), dtype=np.float32), np.asarray(labels, np.int64))


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """Centre/size boxes [..., 4] to corner boxes."""
    centre, half = boxes[..., :2], boxes[..., 2:4] / 2
    return np.concatenate([centre - half, centre + half], axis=-1)


def box_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU matrix [len(first), len(second)] of corner boxes (rule 3)."""
    first = np.asarray(first, dtype=np.float64).reshape(-1, 4)
    second = np.asarray(second, dtype=np.float64).reshape(-1, 4)
    top_left = np.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = np.minimum(first[:, None, 2:], second[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=-1)
    area_first = np.clip(first[:, 2:] - first[:, :2], 0, None).prod(axis=-1)
    area_second = np.clip(second[:, 2:] - second[:, :2], 0, None).prod(axis=-1)
    union = area_first[:, None] + area_second[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order):
        best = int(order[0])
        keep.append(best)
        if len(order) == 1:
            break
        overlaps = box_iou(boxes[best], boxes[order[1:]])[0]
        order = order[1:][overlaps <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def decode(
    output: np.ndarray,
    *,
    score_threshold: float = DEFAULT_SCORE_THRESHOLD,
    iou_threshold: float = DEFAULT_NMS_IOU,
    max_detections: int = DEFAULT_MAX_DETECTIONS,
) -> Detections:
    """Detections of one image from its ``[4 + C, anchors]`` output (rules 1-2)."""
    output = np.asarray(output, dtype=np.float32)
    class_scores = output[4:].T
    labels = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(labels)), labels]
    keep = scores > score_threshold
    boxes = xywh_to_xyxy(output[:4].T[keep])
    scores, labels = scores[keep], labels[keep].astype(np.int64)
    kept: list[np.ndarray] = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        kept.append(index[nms(boxes[index], scores[index], iou_threshold)])
    selected = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    selected = selected[np.argsort(-scores[selected], kind="stable")][:max_detections]
    return Detections(boxes[selected].astype(np.float32), scores[selected], labels[selected])


def decode_batch(outputs: np.ndarray, **options: float) -> list[Detections]:
    """:func:`decode` for each image of a ``[batch, 4 + C, anchors]`` output."""
    return [decode(image, **options) for image in np.asarray(outputs)]  # type: ignore[arg-type]


def match(
    reference: Detections, candidate: Detections, iou_threshold: float = DEFAULT_MATCH_IOU
) -> np.ndarray:
    """For each reference box, the index of its matched candidate or -1 (rule 4)."""
    matched = np.full(len(reference), -1, dtype=np.int64)
    if not len(reference) or not len(candidate):
        return matched
    iou = box_iou(reference.boxes, candidate.boxes)
    iou[reference.labels[:, None] != candidate.labels[None, :]] = 0.0
    taken = np.zeros(len(candidate), dtype=bool)
    for index in np.argsort(-reference.scores, kind="stable"):
        row = np.where(taken, 0.0, iou[index])
        best = int(row.argmax())
        if row[best] > iou_threshold:
            matched[index] = best
            taken[best] = True
    return matched


@dataclass(frozen=True)
class MatchCounts:
    """How many reference boxes a candidate set found, over many images."""

    reference: int
    candidate: int
    matched: int

    @property
    def recall(self) -> float:
        """Matched over reference boxes (1.0 when there are none)."""
        return self.matched / self.reference if self.reference else 1.0

    @property
    def precision(self) -> float:
        """Matched over candidate boxes (1.0 when there are none)."""
        return self.matched / self.candidate if self.candidate else 1.0


def count_matches(
    references: Sequence[Detections],
    candidates: Sequence[Detections],
    iou_threshold: float = DEFAULT_MATCH_IOU,
) -> MatchCounts:
    """:func:`match` image by image, summed."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference images, {len(candidates)} candidate ones")
    matched = sum(
        int((match(ref, cand, iou_threshold) >= 0).sum())
        for ref, cand in zip(references, candidates, strict=True)
    )
    return MatchCounts(
        reference=sum(len(ref) for ref in references),
        candidate=sum(len(cand) for cand in candidates),
        matched=matched,
    )


def average_precision(
    truths: Sequence[Detections],
    detections: Sequence[Detections],
    label: int,
    iou_threshold: float = DEFAULT_MATCH_IOU,
) -> float:
    """All-point interpolated AP of one class (rule 5); NaN when the class has no ground truth."""
    scores: list[float] = []
    hits: list[bool] = []
    total = 0
    for truth, found in zip(truths, detections, strict=True):
        truth_boxes = truth.boxes[truth.labels == label]
        mask = found.labels == label
        total += len(truth_boxes)
        if not mask.any():
            continue
        ones = np.ones(len(truth_boxes), dtype=np.float32)
        matched = match(
            Detections(found.boxes[mask], found.scores[mask], found.labels[mask]),
            Detections(truth_boxes, ones, np.full(len(truth_boxes), label, dtype=np.int64)),
            iou_threshold,
        )
        scores.extend(found.scores[mask].tolist())
        hits.extend((matched >= 0).tolist())
    if total == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    true_positive = np.cumsum(np.asarray(hits, dtype=np.float64)[order])
    recall = np.concatenate([[0.0], true_positive / total, [1.0]])
    precision = np.concatenate([[1.0], true_positive / np.arange(1, len(order) + 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(((recall[steps + 1] - recall[steps]) * precision[steps + 1]).sum())


def mean_average_precision(
    truths: Sequence[Detections],
    detections: Sequence[Detections],
    num_classes: int,
    iou_threshold: float = DEFAULT_MATCH_IOU,
) -> float:
    """AP averaged over the classes that have ground truth (rule 5)."""
    values = [
        average_precision(truths, detections, label, iou_threshold) for label in range(num_classes)
    ]
    present = [value for value in values if not np.isnan(value)]
    return float(np.mean(present)) if present else float("nan")
