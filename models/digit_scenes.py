"""Detection scenes composed from scikit-learn's scanned handwritten digits (numpy only).

Rules:

1. The 1797 ``load_digits()`` images are split by position into three disjoint pools: training
   (the first 1400), calibration (the next 100) and held-out evaluation (the last 297, the same
   test digits as ``digits_cnn.py``). Calibration and evaluation scenes never show a training
   digit.
2. Scene ``i`` of a set depends only on ``(seed, i)`` (``np.random.default_rng([seed, i])``), so
   the first n scenes of a larger set are exactly the scenes of a set of n.
3. A scene is a square grey image in [0, 1] (1 channel): a background level with a linear
   gradient, 0-3 distractor strokes, 3-10 digits, Gaussian noise, then quantized to 8 bits
   (value k/255), like a real camera image.
4. Each digit is its 8×8 scan (pixel / 16) resized bilinearly (half-pixel centres, as
   ``torch.nn.functional.interpolate(align_corners=False)``) to 20-56 px high with an aspect
   jitter of ±25 %, alpha-blended with an ink level, at a random position inside the image that
   keeps at least 2 px from every digit already placed (up to 30 tries, then the digit is left
   out).
5. The ground-truth box of a digit covers the 8×8 cells whose value is at least
   :data:`INK_LEVEL` (of 16), mapped to the resized glyph: tight around the ink, not the
   8×8 frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAIN_DIGITS = 1400
CALIB_DIGITS = 100
EVAL_DIGITS = 297
IMAGE_SIZE = 256
INK_LEVEL = 3
DIGITS_PER_SCENE = (3, 10)
DIGIT_HEIGHT_PX = (20.0, 56.0)
ASPECT_JITTER = 0.25
PLACEMENT_MARGIN_PX = 2
PLACEMENT_TRIES = 30
POOLS = ("train", "calib", "eval")


@dataclass(frozen=True)
class DigitPool:
    """8×8 digit scans in [0, 1] (``images`` float32 [n, 8, 8]) and their int64 ``labels``."""

    images: np.ndarray
    labels: np.ndarray


def load_digit_pool(name: str) -> DigitPool:
    """One of the three disjoint pools of rule 1: ``train``, ``calib`` or ``eval``."""
    from sklearn.datasets import load_digits

    if name not in POOLS:
        raise ValueError(f"unknown digit pool {name!r} (choose from {', '.join(POOLS)})")
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    labels = data.target.astype(np.int64)
    bounds = {
        "train": (0, TRAIN_DIGITS),
        "calib": (TRAIN_DIGITS, TRAIN_DIGITS + CALIB_DIGITS),
        "eval": (len(images) - EVAL_DIGITS, len(images)),
    }
    start, stop = bounds[name]
    return DigitPool(images[start:stop], labels[start:stop])


@dataclass(frozen=True)
class SceneSet:
    """Scenes and their ground truth.

    ``images`` float32 [n, 1, size, size]; ``boxes`` float32 [k, 4] (x1, y1, x2, y2 in pixels),
    ``labels`` int64 [k] and ``scene`` int64 [k] (which image each box belongs to), for all k
    digits of all scenes.
    """

    images: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    scene: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def truth(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes, labels)`` of scene ``index``."""
        mask = self.scene == index
        return self.boxes[mask], self.labels[mask]

    def head(self, count: int) -> SceneSet:
        """The first ``count`` scenes and their ground truth."""
        keep = self.scene < count
        return SceneSet(self.images[:count], self.boxes[keep], self.labels[keep], self.scene[keep])

    def save(self, images_path: Path, boxes_path: Path) -> None:
        """Images alone in ``images_path`` (key ``image``: usable as graphopt data), the ground
        truth in ``boxes_path`` (keys ``boxes``, ``labels``, ``scene``); both compressed."""
        np.savez_compressed(images_path, image=self.images)
        np.savez_compressed(boxes_path, boxes=self.boxes, labels=self.labels, scene=self.scene)

    @classmethod
    def load(cls, images_path: Path, boxes_path: Path) -> SceneSet:
        with np.load(images_path) as images, np.load(boxes_path) as truth:
            return cls(
                images["image"].astype(np.float32),
                truth["boxes"].astype(np.float32),
                truth["labels"].astype(np.int64),
                truth["scene"].astype(np.int64),
            )


def resize_matrix(source: int, target: int) -> np.ndarray:
    """[target, source] bilinear interpolation weights with half-pixel centres (rule 4)."""
    position = (np.arange(target) + 0.5) * source / target - 0.5
    position = np.clip(position, 0, source - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, source - 1)
    frac = position - low
    weights = np.zeros((target, source), dtype=np.float64)
    weights[np.arange(target), low] += 1 - frac
    weights[np.arange(target), high] += frac
    return weights


def render_digit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An 8×8 scan resized to ``height`` × ``width`` (values stay in [0, 1])."""
    rows, cols = image.shape
    return resize_matrix(rows, height) @ image.astype(np.float64) @ resize_matrix(cols, width).T


def ink_box(image: np.ndarray, left: int, top: int, height: int, width: int) -> np.ndarray:
    """Ground-truth box of a digit placed at (left, top) with the given size (rule 5)."""
    rows, cols = image.shape
    ink = image * 16 >= INK_LEVEL
    ink_rows, ink_cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return np.array(
        [
            left + ink_cols[0] * width / cols,
            top + ink_rows[0] * height / rows,
            left + (ink_cols[-1] + 1) * width / cols,
            top + (ink_rows[-1] + 1) * height / rows,
        ],
        dtype=np.float32,
    )


def _draw_stroke(canvas: np.ndarray, rng: np.random.Generator) -> None:
    """A straight distractor stroke (rule 3)."""
    size = canvas.shape[0]
    start, end = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
    thickness = int(rng.integers(1, 4))
    level = rng.uniform(0.2, 0.7)
    steps = int(np.abs(end - start).max()) + 1
    low = thickness // 2
    for x, y in np.linspace(start, end, steps).astype(np.int64):
        canvas[max(y - low, 0) : y - low + thickness, max(x - low, 0) : x - low + thickness] = level


def render_scene(
    pool: DigitPool, rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene (rules 3-5): ``(image [size, size], boxes [k, 4], labels [k])``."""
    grid = (np.arange(size, dtype=np.float64) + 0.5) / size - 0.5
    level = rng.uniform(0.0, 0.35)
    slope_x, slope_y = rng.uniform(-0.15, 0.15, 2)
    canvas = level + slope_x * grid[None, :] + slope_y * grid[:, None]
    for _ in range(int(rng.integers(0, 4))):
        _draw_stroke(canvas, rng)
    placed: list[tuple[int, int, int, int]] = []
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(DIGITS_PER_SCENE[0], DIGITS_PER_SCENE[1] + 1))):
        index = int(rng.integers(len(pool.labels)))
        height = round(rng.uniform(*DIGIT_HEIGHT_PX))
        width = round(height * rng.uniform(1 - ASPECT_JITTER, 1 + ASPECT_JITTER))
        ink = rng.uniform(0.55, 1.0)
        spot = _free_spot(placed, height, width, size, rng)
        if spot is None:
            continue
        left, top = spot
        alpha = render_digit(pool.images[index], height, width)
        patch = canvas[top : top + height, left : left + width]
        canvas[top : top + height, left : left + width] = patch * (1 - alpha) + ink * alpha
        placed.append((left, top, left + width, top + height))
        boxes.append(ink_box(pool.images[index], left, top, height, width))
        labels.append(int(pool.labels[index]))
    canvas = canvas + rng.normal(0.0, rng.uniform(0.0, 0.06), canvas.shape)
    image = np.round(np.clip(canvas, 0.0, 1.0) * 255) / 255
    return (
        image.astype(np.float32),
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
    )


def _free_spot(
    placed: list[tuple[int, int, int, int]],
    height: int,
    width: int,
    size: int,
    rng: np.random.Generator,
) -> tuple[int, int] | None:
    margin = PLACEMENT_MARGIN_PX
    for _ in range(PLACEMENT_TRIES):
        left = int(rng.integers(0, size - width + 1))
        top = int(rng.integers(0, size - height + 1))
        if all(
            left + width + margin <= x1
            or x2 + margin <= left
            or top + height + margin <= y1
            or y2 + margin <= top
            for x1, y1, x2, y2 in placed
        ):
            return left, top
    return None


def make_scenes(pool: DigitPool, count: int, seed: int, size: int = IMAGE_SIZE) -> SceneSet:
    """``count`` scenes from ``pool`` (rule 2: scene i depends only on seed and i)."""
    images, boxes, labels, scene = [], [], [], []
    for index in range(count):
        image, scene_boxes, scene_labels = render_scene(
            pool, np.random.default_rng([seed, index]), size
        )
        images.append(image[None])
        boxes.append(scene_boxes)
        labels.append(scene_labels)
        scene.append(np.full(len(scene_labels), index, dtype=np.int64))
    return SceneSet(
        np.stack(images).astype(np.float32) if images else np.zeros((0, 1, size, size), np.float32),
        np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        np.concatenate(scene) if scene else np.zeros(0, np.int64),
    )
