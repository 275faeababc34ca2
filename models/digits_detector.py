"""Train a small YOLOv8-style digit detector on composed scenes and export it (TorchScript).

Usage: ``python -m models.digits_detector --out-dir models`` (about 5 minutes on 2 idle cores).

Rules:

1. Data: every training step composes fresh scenes from the training digit pool
   (``models/digit_scenes.py``: 256×256 grey scenes of 3-10 scanned digits, strokes and noise),
   seeded by the step; calibration and held-out scenes come from the other two pools, so no
   digit a model is calibrated or judged on was seen in training.
2. Network, YOLOv8's layout at a small width (483 k parameters, about 0.2 G multiply-adds per
   image): Conv(k3, s2)+BN+SiLU stem, C2f blocks, SPPF, an FPN/PAN neck and a decoupled
   anchor-free head per stride 8, 16, 32 (box branch with a 16-bin distribution-focal-loss
   (DFL) decoder, class branch with sigmoid scores).
3. Training, YOLOv8's recipe in miniature: task-aligned assignment (top 10, α 0.5, β 6), BCE
   class loss, CIoU box loss and DFL with gains 0.5 / 7.5 / 1.5, AdamW with warm-up and cosine
   decay, gradient norm clipped at 10; deterministic algorithms on :data:`THREADS` torch threads,
   so a rerun with the same thread count writes the same bytes.
4. Export, TorchScript exporter at opset 17 (``models/_common.py``), BatchNorm folded into the
   Convs, batch dimension dynamic, image size static. ``digits_detector.onnx``: input ``image``
   float32 [batch, 1, 256, 256] in [0, 1]; output ``output0`` float32 [batch, 14, 1344] packed
   like YOLOv8: rows 0-3 box centre x, centre y, width, height in pixels, rows 4-13 the sigmoid
   scores of digits 0-9, over 32² + 16² + 8² anchors. ONNX Runtime must agree with torch.
5. Written next to it: ``digits_detector_calib.npz`` / ``digits_detector_eval.npz`` (key
   ``image``: the first :data:`CALIB_SCENES` calibration and :data:`EVAL_SCENES` held-out
   scenes, usable as ``--calib-data`` / ``--data``) and ``digits_detector_calib_boxes.npz`` /
   ``digits_detector_eval_boxes.npz`` (their ground truth: ``boxes`` x1, y1, x2, y2 in pixels,
   ``labels``, ``scene``).
6. The log ends with recall and precision (score > 0.25, class match, IoU > 0.5) and mAP@0.5 on
   :data:`REPORT_SCENES` held-out scenes. Seed 0: recall 0.942, precision 0.913, mAP@0.5 0.971
   on 128 scenes (834 digits).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import detection
from models._common import deterministic, export_onnx
from models.digit_scenes import DigitPool, SceneSet, load_digit_pool, make_scenes

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
STRIDES = (8, 16, 32)
REG_MAX = 16
WIDTHS = (16, 32, 48, 64, 64)
HEAD_WIDTH = 32
STEPS = 600
BATCH_SIZE = 24
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 5e-4
WARMUP_STEPS = 60
BOX_GAIN, CLASS_GAIN, DFL_GAIN = 7.5, 0.5, 1.5
TOP_K = 10
ALPHA, BETA = 0.5, 6.0
TRAIN_SEED = 1
THREADS = 2
CALIB_SEED, EVAL_SEED = 2, 3
CALIB_SCENES, EVAL_SCENES = 12, 12
REPORT_SCENES = 128
MAP_SCORE_THRESHOLD = 0.001
INPUT_NAME, OUTPUT_NAME = "image", "output0"


# --- network -----------------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """Conv2d (no bias) → BatchNorm → SiLU, 'same' padding."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3×3 ConvBlocks with a residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cv1 = ConvBlock(channels, channels, 3)
        self.cv2 = ConvBlock(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: 1×1 conv, split in two, n bottlenecks on one half, concat all, 1×1 conv."""

    def __init__(self, c_in: int, c_out: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = ConvBlock(c_in, 2 * self.hidden)
        self.cv2 = ConvBlock((2 + n) * self.hidden, c_out)
        self.blocks = nn.ModuleList(
            Bottleneck(self.hidden) if shortcut else ConvBlock(self.hidden, self.hidden, 3)
            for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.cv1(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5×5 max-pools, concatenated."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.cv1 = ConvBlock(c_in, c_in // 2)
        self.cv2 = ConvBlock(c_in // 2 * 4, c_out)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.cv1(x)]
        for _ in range(3):
            parts.append(self.pool(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class DFL(nn.Module):
    """Expected value of a softmax over ``REG_MAX`` bins, as a fixed 1×1 conv (YOLOv8's DFL)."""

    def __init__(self, bins: int = REG_MAX) -> None:
        super().__init__()
        self.bins = bins
        self.conv = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, anchors = x.shape
        x = x.view(batch, 4, self.bins, anchors).transpose(2, 1).softmax(1)
        return self.conv(x).view(batch, 4, anchors)


def make_anchors(
    sizes: list[tuple[int, int]], strides: tuple[int, ...] = STRIDES, offset: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres in grid units [A, 2] (x, y) and the stride of each anchor [A, 1]."""
    points, stride_column = [], []
    for (height, width), stride in zip(sizes, strides, strict=True):
        ys = torch.arange(height, dtype=torch.float32) + offset
        xs = torch.arange(width, dtype=torch.float32) + offset
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack((grid_x, grid_y), -1).view(-1, 2))
        stride_column.append(torch.full((height * width, 1), float(stride)))
    return torch.cat(points), torch.cat(stride_column)


def distances_to_boxes(distances: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Left/top/right/bottom distances [..., 4] around anchor points → x1, y1, x2, y2."""
    left_top, right_bottom = distances.chunk(2, dim=-1)
    return torch.cat((anchors - left_top, anchors + right_bottom), dim=-1)


class DigitsDetector(nn.Module):
    """YOLOv8-style detector (module docstring). ``forward`` returns the packed export output
    [batch, 4 + 10, anchors]; ``raw`` returns the per-anchor logits for training."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, head_width: int = HEAD_WIDTH) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.stem = nn.Sequential(ConvBlock(1, w0, 3, 2), ConvBlock(w0, w1, 3, 2), C2f(w1, w1))
        self.stage3 = nn.Sequential(ConvBlock(w1, w2, 3, 2), C2f(w2, w2))
        self.stage4 = nn.Sequential(ConvBlock(w2, w3, 3, 2), C2f(w3, w3))
        self.stage5 = nn.Sequential(ConvBlock(w3, w4, 3, 2), C2f(w4, w4), SPPF(w4, w4))
        self.top_down4 = C2f(w4 + w3, w3, shortcut=False)
        self.top_down3 = C2f(w3 + w2, w2, shortcut=False)
        self.down3 = ConvBlock(w2, w2, 3, 2)
        self.bottom_up4 = C2f(w2 + w3, w3, shortcut=False)
        self.down4 = ConvBlock(w3, w3, 3, 2)
        self.bottom_up5 = C2f(w3 + w4, w4, shortcut=False)
        levels = (w2, w3, w4)
        self.box_heads = nn.ModuleList(
            nn.Sequential(
                ConvBlock(c, head_width, 3),
                ConvBlock(head_width, head_width, 3),
                nn.Conv2d(head_width, 4 * REG_MAX, 1),
            )
            for c in levels
        )
        self.class_heads = nn.ModuleList(
            nn.Sequential(
                ConvBlock(c, head_width, 3),
                ConvBlock(head_width, head_width, 3),
                nn.Conv2d(head_width, NUM_CLASSES, 1),
            )
            for c in levels
        )
        self.dfl = DFL()
        self._init_head_biases()

    def _init_head_biases(self) -> None:
        """YOLOv8's prior: box logits 1.0, class logits log(5 / C / (640 / stride)²)."""
        for box, cls, stride in zip(self.box_heads, self.class_heads, STRIDES, strict=True):
            box[-1].bias.data[:] = 1.0
            cls[-1].bias.data[:] = math.log(5 / NUM_CLASSES / (640 / stride) ** 2)

    def features(self, image: torch.Tensor) -> list[torch.Tensor]:
        p3 = self.stage3(self.stem(image))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        n4 = self.top_down4(torch.cat([F.interpolate(p5, scale_factor=2.0), p4], 1))
        n3 = self.top_down3(torch.cat([F.interpolate(n4, scale_factor=2.0), p3], 1))
        o4 = self.bottom_up4(torch.cat([self.down3(n3), n4], 1))
        o5 = self.bottom_up5(torch.cat([self.down4(o4), p5], 1))
        return [n3, o4, o5]

    def raw(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Box-bin logits [B, 4·REG_MAX, A], class logits [B, C, A] and each level's grid size."""
        levels = self.features(image)
        boxes = [head(x).flatten(2) for head, x in zip(self.box_heads, levels, strict=True)]
        scores = [head(x).flatten(2) for head, x in zip(self.class_heads, levels, strict=True)]
        sizes = [(int(x.shape[2]), int(x.shape[3])) for x in levels]
        return torch.cat(boxes, 2), torch.cat(scores, 2), sizes

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        box_logits, class_logits, sizes = self.raw(image)
        anchors, strides = make_anchors(sizes)
        distances = self.dfl(box_logits)  # [B, 4, A], grid units
        corners = distances_to_boxes(distances.transpose(1, 2), anchors)  # [B, A, 4]
        centre = (corners[..., :2] + corners[..., 2:]) / 2
        size = corners[..., 2:] - corners[..., :2]
        boxes = (torch.cat([centre, size], -1) * strides).transpose(1, 2)
        return torch.cat([boxes, class_logits.sigmoid()], 1)


# --- loss: task-aligned assignment, BCE, CIoU, DFL --------------------------------------------


def bbox_ciou(first: torch.Tensor, second: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of corner boxes broadcast over leading dims [..., 4] → [...]."""
    (x1, y1, x2, y2), (u1, v1, u2, v2) = first.unbind(-1), second.unbind(-1)
    w1, h1 = (x2 - x1).clamp(min=eps), (y2 - y1).clamp(min=eps)
    w2, h2 = (u2 - u1).clamp(min=eps), (v2 - v1).clamp(min=eps)
    inter = (torch.min(x2, u2) - torch.max(x1, u1)).clamp(min=0) * (
        torch.min(y2, v2) - torch.max(y1, v1)
    ).clamp(min=0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.max(x2, u2) - torch.min(x1, u1)
    ch = torch.max(y2, v2) - torch.min(y1, v1)
    diagonal = cw**2 + ch**2 + eps
    centre_distance = ((u1 + u2 - x1 - x2) ** 2 + (v1 + v2 - y1 - y2) ** 2) / 4
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre_distance / diagonal + v * alpha)


@dataclass
class Targets:
    """Per-anchor training targets of one batch (boxes in grid units)."""

    boxes: torch.Tensor  # [B, A, 4]
    scores: torch.Tensor  # [B, A, C]
    foreground: torch.Tensor  # [B, A] bool


@torch.no_grad()
def assign(
    scores: torch.Tensor,
    boxes: torch.Tensor,
    anchors: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_mask: torch.Tensor,
) -> Targets:
    """YOLOv8's task-aligned assigner.

    ``scores`` [B, A, C] sigmoid, ``boxes`` [B, A, 4] predicted corners, ``anchors`` [A, 2] and
    ``gt_boxes`` [B, M, 4] in one unit (the loss uses pixels); ``gt_labels`` [B, M] padded with
    ``gt_mask`` False. Rules: an anchor is a candidate of a box whose inside holds its centre; per
    box the :data:`TOP_K` candidates with the best score^α · CIoU^β are positive; an anchor
    positive for several boxes keeps the one it overlaps most; its class target is that box's
    alignment, normalised so the best anchor of each box gets the box's best CIoU.
    """
    batch, count = gt_labels.shape
    if count == 0:
        return Targets(
            torch.zeros_like(boxes), torch.zeros_like(scores), torch.zeros_like(scores[..., 0]) > 0
        )
    lt = anchors[None, None] - gt_boxes[:, :, None, :2]
    rb = gt_boxes[:, :, None, 2:] - anchors[None, None]
    inside = torch.cat([lt, rb], -1).amin(-1) > 1e-9  # [B, M, A]
    candidates = inside & gt_mask[:, :, None]
    overlaps = bbox_ciou(gt_boxes[:, :, None, :], boxes[:, None, :, :]).clamp(min=0)
    overlaps = overlaps * candidates
    label_index = gt_labels.clamp(min=0)[:, :, None].expand(-1, -1, scores.shape[1])
    class_scores = scores.transpose(1, 2).gather(1, label_index)  # [B, M, A]
    metric = class_scores.pow(ALPHA) * overlaps.pow(BETA) * candidates
    top = metric.topk(min(TOP_K, metric.shape[-1]), dim=-1).indices
    chosen = torch.zeros_like(metric).scatter_(-1, top, 1.0) > 0
    positive = chosen & candidates & (metric > 0)
    several = positive.sum(1, keepdim=True) > 1  # anchor claimed by several boxes
    best = F.one_hot(overlaps.argmax(1), count).permute(0, 2, 1) > 0
    positive = torch.where(several, best & candidates, positive)
    foreground = positive.any(1)
    gt_index = positive.float().argmax(1)  # [B, A]
    batch_index = torch.arange(batch)[:, None]
    target_boxes = gt_boxes[batch_index, gt_index]
    target_labels = gt_labels[batch_index, gt_index].clamp(min=0)
    metric = metric * positive
    best_metric = metric.amax(-1, keepdim=True)
    best_overlap = (overlaps * positive).amax(-1, keepdim=True)
    normalised = (metric * best_overlap / (best_metric + 1e-9)).amax(1)  # [B, A]
    target_scores = F.one_hot(target_labels, scores.shape[-1]).float()
    target_scores = target_scores * (normalised * foreground)[..., None]
    return Targets(target_boxes, target_scores, foreground)


def dfl_loss(bin_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss: cross-entropy on the two bins around each target distance."""
    left = target.long()
    right = left + 1
    weight_left = right.float() - target
    loss = F.cross_entropy(bin_logits, left.view(-1), reduction="none").view(left.shape)
    loss = loss * weight_left
    loss = loss + F.cross_entropy(bin_logits, right.view(-1), reduction="none").view(left.shape) * (
        1 - weight_left
    )
    return loss.mean(-1, keepdim=True)


def detection_loss(
    model: DigitsDetector, images: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """YOLOv8's loss on one batch; ``gt_boxes`` in pixels, padded with label -1."""
    box_logits, class_logits, sizes = model.raw(images)
    anchors, strides = make_anchors(sizes)
    batch = images.shape[0]
    bins = box_logits.view(batch, 4, REG_MAX, -1).permute(0, 3, 1, 2)  # [B, A, 4, R]
    distances = bins.softmax(-1) @ torch.arange(REG_MAX, dtype=torch.float32)
    pred_boxes = distances_to_boxes(distances, anchors)  # grid units
    scores = class_logits.transpose(1, 2)  # [B, A, C]
    gt_mask = gt_labels >= 0
    targets = assign(
        scores.detach().sigmoid(),
        (pred_boxes.detach() * strides),
        anchors * strides,
        gt_labels,
        gt_boxes,
        gt_mask,
    )
    target_boxes = targets.boxes / strides  # per-anchor grid units
    score_sum = targets.scores.sum().clamp(min=1.0)
    cls = F.binary_cross_entropy_with_logits(scores, targets.scores, reduction="sum") / score_sum
    fg = targets.foreground
    if fg.any():
        weight = targets.scores.sum(-1)[fg][:, None]
        ciou = bbox_ciou(pred_boxes[fg], target_boxes[fg])[:, None]
        box = ((1.0 - ciou) * weight).sum() / score_sum
        anchor_points = anchors[None].expand(batch, -1, -1)[fg]
        lt = anchor_points - target_boxes[fg][:, :2]
        rb = target_boxes[fg][:, 2:] - anchor_points
        target_distances = torch.cat([lt, rb], -1).clamp(0, REG_MAX - 1 - 0.01)
        dfl = (dfl_loss(bins[fg].reshape(-1, REG_MAX), target_distances) * weight).sum()
        dfl = dfl / score_sum
    else:
        box = dfl = scores.sum() * 0.0
    total = (BOX_GAIN * box + CLASS_GAIN * cls + DFL_GAIN * dfl) * batch
    parts = {"box": float(box.detach()), "cls": float(cls.detach()), "dfl": float(dfl.detach())}
    return total, parts


# --- training --------------------------------------------------------------------------------


def _padded_truth(scenes: SceneSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth as [B, M] labels (-1 = padding) and [B, M, 4] boxes."""
    most = max((int((scenes.scene == i).sum()) for i in range(len(scenes))), default=0)
    labels = torch.full((len(scenes), most), -1, dtype=torch.int64)
    boxes = torch.zeros((len(scenes), most, 4), dtype=torch.float32)
    for index in range(len(scenes)):
        scene_boxes, scene_labels = scenes.truth(index)
        labels[index, : len(scene_labels)] = torch.from_numpy(scene_labels)
        boxes[index, : len(scene_labels)] = torch.from_numpy(scene_boxes)
    return labels, boxes


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the peak."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(steps - WARMUP_STEPS, 1)
    return LEARNING_RATE * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_detector(
    seed: int = 0, steps: int = STEPS, batch_size: int = BATCH_SIZE, threads: int = THREADS
) -> DigitsDetector:
    """Train :class:`DigitsDetector` on fresh training scenes each step; eval-mode model back."""
    pool = load_digit_pool("train")
    started = time.perf_counter()
    with deterministic(seed, num_threads=threads):
        model = DigitsDetector()
        decay = [p for n, p in model.named_parameters() if p.ndim > 1 and p.requires_grad]
        no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 and p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay}],
            lr=LEARNING_RATE,
            weight_decay=0.0,
        )
        model.train()
        for step in range(steps):
            scenes = _training_batch(pool, step, batch_size, seed)
            labels, boxes = _padded_truth(scenes)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps)
            loss, parts = detection_loss(model, torch.from_numpy(scenes.images), labels, boxes)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            if step % 50 == 0 or step == steps - 1:
                logger.info(
                    "step %d/%d loss %.3f (box %.3f cls %.3f dfl %.3f) %.0f s",
                    step,
                    steps,
                    float(loss.detach()) / batch_size,
                    parts["box"],
                    parts["cls"],
                    parts["dfl"],
                    time.perf_counter() - started,
                )
    model.eval()
    logger.info(
        "trained %d steps × %d scenes in %.0f s", steps, batch_size, time.perf_counter() - started
    )
    return model


def _training_batch(pool: DigitPool, step: int, batch_size: int, seed: int) -> SceneSet:
    """Scenes of one step: seeded by (train seed, run seed, step), never reused."""
    return make_scenes(pool, batch_size, seed=TRAIN_SEED * 1_000_003 + seed * 10_007 + step)


# --- evaluation and export -------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorQuality:
    """How well a detector finds the ground truth of a scene set."""

    scenes: int
    digits: int
    recall: float
    precision: float
    map50: float


def evaluate_outputs(outputs: np.ndarray, scenes: SceneSet) -> DetectorQuality:
    """Recall and precision at the default score threshold and mAP@0.5 against ground truth."""
    truths = [detection.Detections.ground_truth(*scenes.truth(i)) for i in range(len(scenes))]
    found = detection.decode_batch(outputs)
    counts = detection.count_matches(truths, found)
    ranked = detection.decode_batch(outputs, score_threshold=MAP_SCORE_THRESHOLD)
    return DetectorQuality(
        scenes=len(scenes),
        digits=counts.reference,
        recall=counts.recall,
        precision=counts.precision,
        map50=detection.mean_average_precision(truths, ranked, NUM_CLASSES),
    )


def run_in_batches(path: Path, images: np.ndarray, batch: int = 8) -> np.ndarray:
    """The model's output on ``images`` (ONNX Runtime CPU, one session), batch by batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    parts = [
        session.run(None, {INPUT_NAME: images[i : i + batch]})[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(parts)


def scene_sets(calib_count: int, eval_count: int) -> tuple[SceneSet, SceneSet]:
    """Calibration and held-out scenes (digit pools ``calib`` and ``eval``, fixed seeds)."""
    calib = make_scenes(load_digit_pool("calib"), calib_count, seed=CALIB_SEED)
    held_out = make_scenes(load_digit_pool("eval"), eval_count, seed=EVAL_SEED)
    return calib, held_out


def write_scene_sets(out_dir: Path) -> None:
    """The committed calibration and held-out scenes and their ground truth (module docstring)."""
    calib, held_out = scene_sets(CALIB_SCENES, EVAL_SCENES)
    calib.save(out_dir / "digits_detector_calib.npz", out_dir / "digits_detector_calib_boxes.npz")
    held_out.save(out_dir / "digits_detector_eval.npz", out_dir / "digits_detector_eval_boxes.npz")


def export_digits_detector(
    out_dir: Path, seed: int = 0, steps: int = STEPS, threads: int = THREADS
) -> Path:
    """Train, export ``digits_detector.onnx`` and write the scene sets into ``out_dir``.

    The report at the end scores the exported model on :data:`REPORT_SCENES` held-out scenes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = train_detector(seed, steps=steps, threads=threads)
    write_scene_sets(out_dir)
    _, held_out = scene_sets(0, REPORT_SCENES)
    onnx_path = export_onnx(
        model,
        (torch.from_numpy(held_out.images[:2]),),
        out_dir / "digits_detector.onnx",
        exporter="torchscript",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )
    outputs = run_in_batches(onnx_path, held_out.images)
    with torch.no_grad():
        reference = model(torch.from_numpy(held_out.images[:8])).numpy()
    max_diff = float(np.abs(outputs[:8] - reference).max())
    if max_diff > 1e-2:
        raise RuntimeError(f"onnxruntime and torch disagree on the digits detector: {max_diff}")
    quality = evaluate_outputs(outputs, held_out)
    logger.info(
        "held-out (%d scenes, %d digits): recall %.4f precision %.4f mAP@0.5 %.4f; "
        "max |ORT - torch| %.2e",
        quality.scenes,
        quality.digits,
        quality.recall,
        quality.precision,
        quality.map50,
        max_diff,
    )
    return onnx_path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch intra-op threads (results depend on it)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    path = export_digits_detector(
        args.out_dir, seed=args.seed, steps=args.steps, threads=args.threads
    )
    for name in (
        path.name,
        "digits_detector_calib.npz",
        "digits_detector_calib_boxes.npz",
        "digits_detector_eval.npz",
        "digits_detector_eval_boxes.npz",
    ):
        file = args.out_dir / name
        print(f"{file}  {file.stat().st_size} bytes")


if __name__ == "__main__":
    main()
