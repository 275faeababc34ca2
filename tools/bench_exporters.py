"""Exporters benchmark: graphopt's passes on real-weight models that torch did not write.

    python -m tools.bench_exporters [--out DIR] [--quick] [--models det,rec,...] [--runs 20]
        [--zoo-all-plans] [--timeout 300] [--keep-models]

Measures issue 15's "Done when" claims about exporters and opsets on the models installed here:
rapidocr-onnxruntime's Paddle2ONNX OCR models (detector and recognizer at opset 12, direction
classifier at opset 11), silero-vad's voice-activity detectors (opset 16 with its weights inside
an ``If`` on the sample rate, and the 16 kHz opset-15 export), onnx's backend "light" model zoo
(opset 9, IR 3) and the bundled digits CNN. Rules:

1. Models are only located, never downloaded and never imported through their packages; a
   missing model is a row saying why it was skipped. ``--quick`` leaves out the zoo's large
   VGG-19, ZFNet-512 and AlexNet and uses fewer samples; the default run gives those three only
   the cleanup, quant and fp16 plans (``--zoo-all-plans`` adds sparsify and lowrank).
2. Every model goes through every plan of :data:`PLANS` that applies (``cleanup,lowrank`` only
   where a MatMul or Gemm exists, in the main graph or a body) with :func:`graphopt.optimize`,
   each in a fresh process (:func:`tools.bench_common.run_worker`, ``--timeout`` seconds), so a
   segfault or a hang is a row, not the end of the benchmark. It calibrates on a folder of
   ``.npz`` calibration feeds and validates on a separate folder of held-out feeds.
   ``cleanup (no data)`` gives no data at all, so graphopt synthesizes inputs the model can run.
3. Each run is classed as ``ok`` (validation passed), ``validation failed`` (with the first
   failing check, and whether the whole-tensor gate alone would pass), ``refused`` (a
   ``GraphoptError`` whose root cause is graphopt's own: its one-line reason) or ``crash`` (any
   other exception, also one wrapped in a ``PassError``: its type; or the process killed by a
   signal or timed out). The output is then loaded in ONNX Runtime and checked with
   ``onnx.checker``; its opset, its size against the input (the zoo: also against its weights
   filled in) and the validation's whole-tensor and worst-channel cosine are recorded, with each
   pass's main stats. Build seconds include the worker's start (about half a second).
4. Task metrics compare the candidate with the fp32 model on every held-out sample (graphopt
   validates on the first few held-out feeds only), and with the ground truth where the data
   has one: OCR recognizer character error rate and decode agreement (CTC greedy decoding, the
   character list from the model's ``character`` metadata), detector text-pixel IoU of the maps
   binarized at 0.3 and text boxes kept (connected components, box IoU > 0.5), direction
   classifier decisions flipped, voice-activity decisions flipped at 0.5 when both models run
   statefully over a signal, chunk by chunk, and the digits CNN's accuracy. The light zoo's
   weights are ``ConstantOfShape`` fills: only validity and size mean anything there.
5. Data is rendered or synthesized here, seeded: text lines and pages drawn with Pillow in
   matplotlib's DejaVu Sans, preprocessed as PaddleOCR does; a speech-like signal (voiced
   segments of harmonic tones under formant envelopes, noise and tone distractors, silences).
   The zoo gets graphopt's own synthetic inputs.
6. Latency is the median of interleaved ONNX Runtime CPU runs against fp32
   (:func:`graphopt.check.latency.measure_latency`) for the quant and fp16 plans on the detector,
   the recognizer and the voice-activity detectors (one 576-sample chunk, ten times the runs).
7. Results go to ``DIR/exporters.json`` and ``DIR/exporters.md`` and the markdown to stdout;
   worker logs to ``DIR/logs``; candidate models and data folders are deleted after measuring
   unless ``--keep-models``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from tools.bench_common import (
    REPO,
    machine_info,
    machine_summary,
    markdown_table,
    run_worker,
    write_json,
)

logger = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

DEFAULT_OUT = REPO / "models" / "build" / "bench_exporters"
DET_THRESHOLD = 0.3
"""PaddleOCR's DB binarization threshold (rapidocr ``Det.thresh``)."""
BOX_IOU = 0.5
VAD_THRESHOLD = 0.5
VAD_RATE = 16000
VAD_CHUNK = 512
VAD_CONTEXT = 64
"""silero-vad 5+ prepends the previous chunk's last 64 samples: the model sees 576 samples."""
REC_HEIGHT, REC_WIDTH = 48, 320
CLS_HEIGHT, CLS_WIDTH = 48, 192
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TEXT_ALPHABET = "0123456789ABDEFGHJLMNPQRTUY" + "abdefghijkmnpqrtuy"
"""ASCII digits and letters, without the glyphs DejaVu Sans draws alike (0/O/o, 1/l/I, c/C…)."""
LARGE_ZOO = ("vgg19", "zfnet512", "bvlc_alexnet")


@dataclass(frozen=True)
class Plan:
    """One pass set and whether it gets data."""

    key: str
    passes: tuple[str, ...]
    with_data: bool = True
    needs_matmul: bool = False
    latency: bool = False


PLANS: tuple[Plan, ...] = (
    Plan("cleanup", ("cleanup",)),
    Plan("cleanup (no data)", ("cleanup",), with_data=False),
    Plan("cleanup,quant", ("cleanup", "quant"), latency=True),
    Plan("fp16", ("fp16",), latency=True),
    Plan("cleanup,sparsify", ("cleanup", "sparsify")),
    Plan("cleanup,lowrank", ("cleanup", "lowrank"), needs_matmul=True),
)


# --- metrics (pure functions) ----------------------------------------------------------------


def edit_distance(reference: Sequence[Any], hypothesis: Sequence[Any]) -> int:
    """Levenshtein distance (insertions, deletions and substitutions cost 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_item in enumerate(reference, start=1):
        current = [i] + [0] * len(hypothesis)
        for j, hyp_item in enumerate(hypothesis, start=1):
            current[j] = min(
                previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_item != hyp_item)
            )
        previous = current
    return previous[-1]


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER: summed edit distances over summed reference lengths."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references, {len(hypotheses)} hypotheses")
    total = sum(len(text) for text in references)
    if total == 0:
        raise ValueError("the references hold no characters")
    return sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True)) / total


def ctc_greedy_decode(probabilities: np.ndarray, blank: int = 0) -> list[int]:
    """Best class per time step ``[T, C]``; repeats collapsed, then blanks dropped."""
    best = np.asarray(probabilities).argmax(axis=-1)
    decoded: list[int] = []
    previous = -1
    for index in best.tolist():
        if index != previous and index != blank:
            decoded.append(index)
        previous = index
    return decoded


def indices_to_text(indices: Sequence[int], characters: Sequence[str] | None) -> str:
    """Map class indices to text; without a character list, ``<index>`` tokens."""
    if characters is None:
        return "".join(f"<{i}>" for i in indices)
    return "".join(characters[i] if 0 <= i < len(characters) else "?" for i in indices)


def mask_iou(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree (1.0)."""
    a, b = np.asarray(reference, bool), np.asarray(candidate, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """IoU of two boxes ``(top, left, bottom, right)``, bottom/right exclusive."""
    top, left = max(a[0], b[0]), max(a[1], b[1])
    bottom, right = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, bottom - top) * max(0, right - left)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def text_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes of the 8-connected components of a 2-D boolean mask."""
    from scipy import ndimage

    labels, _ = ndimage.label(np.asarray(mask, bool), structure=np.ones((3, 3), int))
    return [
        (s[0].start, s[1].start, s[0].stop, s[1].stop)
        for s in ndimage.find_objects(labels)
        if s is not None
    ]


def boxes_kept(
    reference: Sequence[tuple[int, int, int, int]],
    candidate: Sequence[tuple[int, int, int, int]],
    threshold: float = BOX_IOU,
) -> int:
    """How many reference boxes a distinct candidate box matches at IoU > ``threshold``
    (greedy one-to-one, best pairs first)."""
    pairs = sorted(
        ((box_iou(r, c), i, j) for i, r in enumerate(reference) for j, c in enumerate(candidate)),
        reverse=True,
    )
    used_ref: set[int] = set()
    used_cand: set[int] = set()
    for iou, i, j in pairs:
        if iou <= threshold:
            break
        if i not in used_ref and j not in used_cand:
            used_ref.add(i)
            used_cand.add(j)
    return len(used_ref)


def decision_flips(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> int:
    """How many thresholded decisions (``> threshold``) differ between two score arrays."""
    a, b = np.asarray(reference), np.asarray(candidate)
    if a.shape != b.shape:
        raise ValueError(f"score shapes differ: {a.shape} vs {b.shape}")
    return int(np.count_nonzero((a > threshold) != (b > threshold)))


# --- rendered OCR data ---------------------------------------------------------------------


def font_path() -> Path:
    """matplotlib's DejaVu Sans (matplotlib is a core dependency)."""
    import matplotlib

    path = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not path.is_file():
        raise FileNotFoundError(f"DejaVu Sans is not at {path}")
    return path


def random_text(rng: np.random.Generator, low: int = 4, high: int = 12) -> str:
    """A seeded string of :data:`TEXT_ALPHABET` characters, sometimes with one inner space."""
    length = int(rng.integers(low, high + 1))
    chars = [TEXT_ALPHABET[i] for i in rng.integers(0, len(TEXT_ALPHABET), length)]
    if length >= 6 and rng.random() < 0.3:
        chars[int(rng.integers(2, length - 2))] = " "
    return "".join(chars)


def render_line(rng: np.random.Generator, text: str) -> Any:
    """A tightly cropped text-line image (RGB PIL image): dark text on a light, noisy ground."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    font = ImageFont.truetype(str(font_path()), int(rng.integers(26, 38)))
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(4, 14)), int(rng.integers(4, 10))
    size = (right - left + 2 * pad_x, bottom - top + 2 * pad_y)
    ground = tuple(int(v) for v in rng.integers(200, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    image = Image.new("RGB", size, ground)
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(0.6))
    return image


def normalize_line(image: Any, height: int, width: int) -> np.ndarray:
    """PaddleOCR's ``resize_norm_img``: height fixed, width to aspect (at most ``width``),
    ``(x / 255 - 0.5) / 0.5``, CHW, zero-padded on the right."""
    resized_width = min(width, math.ceil(height * image.width / image.height))
    resized = np.asarray(image.resize((resized_width, height)), np.float32)
    chw = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    padded = np.zeros((3, height, width), np.float32)
    padded[:, :, :resized_width] = chw
    return padded


def render_page(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A page of a few text lines, normalized as PaddleOCR's detector wants (ImageNet
    mean/std, CHW; height and width are multiples of 32)."""
    from PIL import Image, ImageDraw, ImageFont

    ground = tuple(int(v) for v in rng.integers(190, 256, 3))
    image = Image.new("RGB", (width, height), ground)
    draw = ImageDraw.Draw(image)
    y = int(rng.integers(6, 20))
    while True:
        size = int(rng.integers(16, 34))
        if y + size + 6 > height:
            break
        font = ImageFont.truetype(str(font_path()), size)
        ink = tuple(int(v) for v in rng.integers(0, 80, 3))
        x = int(rng.integers(4, width // 4))
        draw.text((x, y), random_text(rng, 3, 16), font=font, fill=ink)
        y += size + int(rng.integers(6, 28))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 5, (height, width, 3))
    pixels = np.clip(pixels, 0, 255) / 255.0
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1).astype(np.float32)


def batched(arrays: np.ndarray, batch: int, name: str = "x") -> list[Feed]:
    """``[{name: arrays[i:i + batch]}, ...]``."""
    return [{name: arrays[i : i + batch]} for i in range(0, len(arrays), batch)]


# --- speech-like signal ----------------------------------------------------------------------


def speech_like_signal(
    rng: np.random.Generator, seconds: float, rate: int = VAD_RATE
) -> tuple[np.ndarray, np.ndarray]:
    """A seeded signal and its per-sample speech label: voiced segments (a glottal-like
    harmonic source with vibrato, shaped by three formant resonances that change every 200 ms,
    under a 3-5 Hz syllable envelope) separated by silences, with background noise and
    non-speech distractors (noise bursts and steady tones) in some silences."""
    total = int(seconds * rate)
    signal = np.zeros(total)
    speech = np.zeros(total, bool)
    position = 0
    while True:
        gap = int(rng.uniform(0.3, 1.5) * rate)
        if rng.random() < 0.4 and gap > rate // 4:
            signal[position : position + gap] += _distractor(rng, min(gap, total - position), rate)
        position += gap
        end = min(total, position + int(rng.uniform(0.5, 2.5) * rate))
        if end <= position:
            break
        signal[position:end] = _voiced(rng, end - position, rate) * rng.uniform(0.15, 0.6)
        speech[position:end] = True
        position = end
    signal += rng.normal(0, 0.005, total)
    return signal.astype(np.float32), speech


def _voiced(rng: np.random.Generator, length: int, rate: int) -> np.ndarray:
    t = np.arange(length) / rate
    pitch = rng.uniform(90, 230) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    shaped = np.zeros(length)
    syllable = int(0.2 * rate)
    for start in range(0, length, syllable):
        piece = source[start : start + syllable]
        spectrum = np.fft.rfft(piece)
        freqs = np.fft.rfftfreq(len(piece), 1 / rate)
        formants = (
            (rng.uniform(300, 900), 80),
            (rng.uniform(900, 2300), 120),
            (rng.uniform(2300, 3200), 200),
        )
        response = sum(1 / (1 + ((freqs - centre) / width) ** 2) for centre, width in formants)
        shaped[start : start + syllable] = np.fft.irfft(spectrum * response, len(piece)) * np.sqrt(
            np.hanning(len(piece))
        )
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 2 * np.pi))
    shaped *= envelope
    return shaped / (np.abs(shaped).max() + 1e-9)


def _distractor(rng: np.random.Generator, length: int, rate: int) -> np.ndarray:
    burst = np.zeros(length)
    span = min(length, int(rng.uniform(0.2, 0.6) * rate))
    t = np.arange(span) / rate
    if rng.random() < 0.5:
        burst[:span] = rng.normal(0, rng.uniform(0.02, 0.1), span)
    else:
        burst[:span] = rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(400, 2500) * t)
    return burst


def vad_chunks(signal: np.ndarray) -> np.ndarray:
    """``[n, 576]``: each 512-sample chunk after the previous chunk's last 64 samples."""
    count = len(signal) // VAD_CHUNK
    padded = np.concatenate([np.zeros(VAD_CONTEXT, np.float32), signal[: count * VAD_CHUNK]])
    return np.stack(
        [padded[i * VAD_CHUNK : i * VAD_CHUNK + VAD_CONTEXT + VAD_CHUNK] for i in range(count)]
    ).astype(np.float32)


def run_vad_stream(session: Any, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a silero-style model chunk by chunk with its state carried; returns the speech
    probability per chunk and the state each chunk was fed (``[2, n, 128]``)."""
    state = np.zeros((2, 1, 128), np.float32)
    rate = np.array(VAD_RATE, np.int64)
    probabilities, states = [], []
    for chunk in chunks:
        states.append(state[:, 0])
        output, state = session.run(None, {"input": chunk[None], "state": state, "sr": rate})
        probabilities.append(float(np.asarray(output).reshape(-1)[0]))
    return np.array(probabilities), np.stack(states, axis=1)


# --- tasks -----------------------------------------------------------------------------------


def _session(path: Path) -> Any:
    from graphopt.ir.ort import make_session

    return make_session(path, optimize=True, spinning=False)


def _first_outputs(path: Path, feeds: Sequence[Feed]) -> list[np.ndarray]:
    session = _session(path)
    return [np.asarray(session.run(None, feed)[0]) for feed in feeds]


@dataclass
class Task:
    """What a model is measured on: data and a task metric against the fp32 model."""

    calibration: list[Feed] | None
    held_out: list[Feed] | None
    note: str
    validation_feeds: int | None = None
    """How many held-out feeds graphopt validates on (None: all)."""
    latency_feed: Feed | None = None
    latency_runs_scale: int = 1
    """Sub-millisecond models get this many times more interleaved runs."""
    reference: Any = None

    def outputs(self, path: Path) -> Any:
        return None

    def score(self, reference: Any, candidate: Any) -> dict[str, float]:
        return {}

    def reference_metrics(self) -> dict[str, float]:
        return {}


@dataclass
class RecognizerTask(Task):
    """CTC greedy decodes of the held-out lines; CER against the rendered text."""

    texts: list[str] = field(default_factory=list)
    characters: list[str] | None = None

    def outputs(self, path: Path) -> list[list[int]]:
        assert self.held_out is not None
        return [
            ctc_greedy_decode(row) for batch in _first_outputs(path, self.held_out) for row in batch
        ]

    def _texts(self, decodes: list[list[int]]) -> list[str]:
        return [indices_to_text(d, self.characters) for d in decodes]

    def reference_metrics(self) -> dict[str, float]:
        if self.characters is None:
            return {}
        return {"cer": character_error_rate(self.texts, self._texts(self.reference))}

    def score(self, reference: list[list[int]], candidate: list[list[int]]) -> dict[str, float]:
        same = sum(r == c for r, c in zip(reference, candidate, strict=True))
        metrics = {"decode_agreement": same / len(reference)}
        if self.characters is not None:
            metrics["cer"] = character_error_rate(self.texts, self._texts(candidate))
            metrics["fp32_cer"] = character_error_rate(self.texts, self._texts(reference))
        nonempty = [(r, c) for r, c in zip(reference, candidate, strict=True) if r]
        if nonempty:
            metrics["cer_vs_fp32"] = sum(edit_distance(r, c) for r, c in nonempty) / sum(
                len(r) for r, _ in nonempty
            )
        return metrics


@dataclass
class DetectorTask(Task):
    """Probability maps binarized at :data:`DET_THRESHOLD`; text-pixel IoU and boxes kept."""

    def outputs(self, path: Path) -> list[np.ndarray]:
        assert self.held_out is not None
        maps = _first_outputs(path, self.held_out)
        return [m[:, 0] > DET_THRESHOLD for m in maps]

    def reference_metrics(self) -> dict[str, float]:
        masks = [page for batch in self.reference for page in batch]
        return {
            "text_pixels": float(np.mean([m.mean() for m in masks])),
            "boxes": float(sum(len(text_boxes(m)) for m in masks)),
        }

    def score(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict[str, float]:
        ref = np.concatenate([m.reshape(-1) for m in reference])
        cand = np.concatenate([m.reshape(-1) for m in candidate])
        kept = total = 0
        for ref_batch, cand_batch in zip(reference, candidate, strict=True):
            for ref_page, cand_page in zip(ref_batch, cand_batch, strict=True):
                ref_boxes = text_boxes(ref_page)
                kept += boxes_kept(ref_boxes, text_boxes(cand_page))
                total += len(ref_boxes)
        return {"text_iou": mask_iou(ref, cand), "boxes_kept": kept / total if total else 1.0}


@dataclass
class ClassifierTask(Task):
    """0° / 180° decisions; flips against fp32 and accuracy against the rendered rotation."""

    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def outputs(self, path: Path) -> np.ndarray:
        assert self.held_out is not None
        return np.concatenate(_first_outputs(path, self.held_out)).argmax(axis=1)

    def reference_metrics(self) -> dict[str, float]:
        return {"accuracy": float((self.reference == self.labels).mean())}

    def score(self, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        return {
            "flipped": float((reference != candidate).mean()),
            "accuracy": float((candidate == self.labels).mean()),
        }


@dataclass
class VadTask(Task):
    """Speech probabilities of a stateful chunk-by-chunk run; decisions flipped at 0.5."""

    chunks: np.ndarray = field(default_factory=lambda: np.zeros((0, 576), np.float32))
    speech: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def outputs(self, path: Path) -> np.ndarray:
        return run_vad_stream(_session(path), self.chunks)[0]

    def reference_metrics(self) -> dict[str, float]:
        decided = self.reference > VAD_THRESHOLD
        return {
            "speech_frames": float(decided.mean()),
            "label_agreement": float((decided == self.speech).mean()),
        }

    def score(self, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        return {
            "flipped": decision_flips(reference, candidate, VAD_THRESHOLD) / len(reference),
            "label_agreement": float(((candidate > VAD_THRESHOLD) == self.speech).mean()),
            "max_abs_prob": float(np.abs(reference - candidate).max()),
        }


@dataclass
class DigitsTask(Task):
    """Top-1 digit against the labels and against fp32."""

    images: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 8, 8), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def outputs(self, path: Path) -> np.ndarray:
        return np.concatenate(_first_outputs(path, batched(self.images, 64, "image"))).argmax(1)

    def reference_metrics(self) -> dict[str, float]:
        return {"accuracy": float((self.reference == self.labels).mean())}

    def score(self, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        return {
            "accuracy": float((candidate == self.labels).mean()),
            "top1_agreement": float((candidate == reference).mean()),
        }


@dataclass(frozen=True)
class Sizes:
    """Sample counts (rule 1: ``--quick`` uses fewer). graphopt validates on the first
    ``validation_feeds`` held-out feeds; task metrics use every held-out sample (the validation
    feeds' cost grows with every plan, the task metric's only with one more model run)."""

    det_calib: int
    det_eval: int
    rec_calib: int
    rec_eval: int
    cls_calib: int
    cls_eval: int
    vad_calib_seconds: float
    vad_eval_seconds: float
    validation_feeds: int = 2

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        if quick:
            return cls(4, 8, 16, 16, 32, 32, 8.0, 10.0)
        return cls(8, 16, 16, 64, 32, 128, 12.0, 30.0)


def recognizer_characters(path: Path) -> list[str] | None:
    """rapidocr's character list: blank, the ``character`` metadata lines, then a space."""
    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == "character":
            return ["blank", *prop.value.splitlines(), " "]
    return None


def _validation_note(task_feeds: Sequence[Feed], validation_feeds: int, unit: str) -> str:
    count = sum(len(next(iter(feed.values()))) for feed in task_feeds[:validation_feeds])
    return f"graphopt validates on the first {count} held-out {unit}"


def make_recognizer_task(path: Path, sizes: Sizes, seed: int) -> RecognizerTask:
    characters = recognizer_characters(path)
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(sizes.rec_calib + sizes.rec_eval):
        text = random_text(rng)
        lines.append((text, normalize_line(render_line(rng, text), REC_HEIGHT, REC_WIDTH)))
    calib, held = lines[: sizes.rec_calib], lines[sizes.rec_calib :]
    held_images = np.stack([image for _, image in held])
    held_feeds = batched(held_images, 8)
    note = (
        f"{sizes.rec_calib} rendered calibration lines and {sizes.rec_eval} held-out lines "
        f"(48×{REC_WIDTH}), {_validation_note(held_feeds, sizes.validation_feeds, 'lines')}; "
        + (
            f"characters from the model's metadata ({len(characters)} classes)"
            if characters
            else "no 'character' metadata: decode agreement with fp32 only"
        )
    )
    return RecognizerTask(
        calibration=batched(np.stack([image for _, image in calib]), 8),
        held_out=held_feeds,
        validation_feeds=sizes.validation_feeds,
        note=note,
        latency_feed={"x": held_images[:6]},
        texts=[text for text, _ in held],
        characters=characters,
    )


def make_detector_task(
    sizes: Sizes, seed: int, height: int = 256, width: int = 384
) -> DetectorTask:
    rng = np.random.default_rng(seed)
    pages = np.stack(
        [render_page(rng, height, width) for _ in range(sizes.det_calib + sizes.det_eval)]
    )
    calib, held = pages[: sizes.det_calib], pages[sizes.det_calib :]
    held_feeds = batched(held, 4)
    return DetectorTask(
        calibration=batched(calib, 4),
        held_out=held_feeds,
        validation_feeds=sizes.validation_feeds,
        note=(
            f"{sizes.det_calib} rendered calibration pages and {sizes.det_eval} held-out pages "
            f"({height}×{width}, ImageNet mean/std), "
            f"{_validation_note(held_feeds, sizes.validation_feeds, 'pages')}; "
            f"maps binarized at {DET_THRESHOLD}"
        ),
        latency_feed={"x": held[:1]},
    )


def make_classifier_task(sizes: Sizes, seed: int) -> ClassifierTask:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(sizes.cls_calib + sizes.cls_eval):
        image = render_line(rng, random_text(rng))
        flipped = bool(rng.random() < 0.5)
        if flipped:
            image = image.rotate(180)
        images.append(normalize_line(image, CLS_HEIGHT, CLS_WIDTH))
        labels.append(int(flipped))
    stacked = np.stack(images)
    held_feeds = batched(stacked[sizes.cls_calib :], 16)
    return ClassifierTask(
        calibration=batched(stacked[: sizes.cls_calib], 16),
        held_out=held_feeds,
        validation_feeds=sizes.validation_feeds,
        note=(
            f"{sizes.cls_calib} calibration and {sizes.cls_eval} held-out rendered lines "
            f"(48×{CLS_WIDTH}), half of them turned 180°, "
            f"{_validation_note(held_feeds, sizes.validation_feeds, 'lines')}"
        ),
        labels=np.array(labels[sizes.cls_calib :], np.int64),
    )


def make_vad_task(path: Path, sizes: Sizes, seed: int, batch: int = 32) -> VadTask:
    """Calibration/validation feeds are chunks with the states the fp32 model carried there."""
    reference = _session(path)
    feeds: list[list[Feed]] = []
    for offset, seconds in ((0, sizes.vad_calib_seconds), (1, sizes.vad_eval_seconds)):
        signal, _ = speech_like_signal(np.random.default_rng(seed + offset), seconds)
        chunks = vad_chunks(signal)
        _, states = run_vad_stream(reference, chunks)
        feeds.append(
            [
                {
                    "input": chunks[i : i + batch],
                    "state": np.ascontiguousarray(states[:, i : i + batch]),
                    "sr": np.array(VAD_RATE, np.int64),
                }
                for i in range(0, len(chunks) - batch + 1, batch)
            ]
        )
    signal, speech = speech_like_signal(np.random.default_rng(seed + 1), sizes.vad_eval_seconds)
    chunks = vad_chunks(signal)
    frame_speech = speech[: len(chunks) * VAD_CHUNK].reshape(len(chunks), VAD_CHUNK).mean(1) > 0.5
    validation = 2 * sizes.validation_feeds
    return VadTask(
        calibration=feeds[0],
        held_out=feeds[1],
        validation_feeds=validation,
        note=(
            f"speech-like signal: {sizes.vad_calib_seconds:.0f} s to calibrate, "
            f"{sizes.vad_eval_seconds:.0f} s held out, run statefully in 512-sample chunks "
            f"(+64 context) at 16 kHz; graphopt's feeds carry the fp32 states "
            f"({_validation_note(feeds[1], validation, 'chunks')})"
        ),
        latency_feed={
            "input": chunks[:1],
            "state": np.zeros((2, 1, 128), np.float32),
            "sr": np.array(VAD_RATE, np.int64),
        },
        latency_runs_scale=10,
        chunks=chunks,
        speech=frame_speech,
    )


def make_digits_task(sizes: Sizes) -> DigitsTask:
    try:
        from models.digits_cnn import load_digits_split

        x_train, _, x_test, y_test = load_digits_split()
        calib, images, labels, origin = x_train[:64], x_test, y_test, "scikit-learn digits"
    except ImportError:
        sample = np.load(REPO / "models" / "digits_sample.npz")["image"]
        all_labels = np.load(REPO / "models" / "digits_sample_labels.npy")
        calib, images, labels = sample[:32], sample[32:], all_labels[32:]
        origin = "the committed 64-image sample (scikit-learn is not installed)"
    held_feeds = batched(images, 64, "image")
    return DigitsTask(
        calibration=batched(calib, 16, "image"),
        held_out=held_feeds,
        validation_feeds=sizes.validation_feeds,
        note=(
            f"{origin}: {len(calib)} calibration images, {len(images)} held-out with labels, "
            f"{_validation_note(held_feeds, sizes.validation_feeds, 'images')}"
        ),
        images=images,
        labels=labels,
    )


# --- subjects --------------------------------------------------------------------------------


@dataclass
class Subject:
    """One model: where it is (or why it is missing) and how to measure it."""

    key: str
    label: str
    family: str
    path: Path | None
    missing: str = ""
    make_task: Callable[[], Task] | None = None
    latency: bool = False
    zoo_samples: int | None = None
    """Zoo models: synthetic samples (None: graphopt's default synthesis, as a user gets)."""
    plans: tuple[str, ...] | None = None
    """The plan keys to run (None: every plan that applies)."""
    plans_note: str = ""


def _package_folder(package: str, sub: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _located(
    key: str, label: str, family: str, folder: Path | None, name: str, install: str
) -> Subject:
    if folder is None:
        return Subject(key, label, family, None, f"not installed ({install})")
    path = folder / name
    if not path.is_file():
        return Subject(key, label, family, None, f"{path} is missing")
    return Subject(key, label, family, path)


LARGE_ZOO_PLANS = ("cleanup", "cleanup,quant", "fp16")
LARGE_ZOO_NOTE = (
    "sparsify and lowrank left out to keep the default run near 10 minutes (--zoo-all-plans "
    "runs them): their SparseGPT and whitened SVD factor the 9216- to 25088-wide Gram matrix of "
    "the first Gemm, minutes each on 2 cores, and a crash inside OpenBLAS's multithreaded "
    "Cholesky on some machines"
)


def subjects(quick: bool, seed: int = 0, *, zoo_all_plans: bool = False) -> list[Subject]:
    """Every model of rule 1, located; tasks are built lazily (only for models that run)."""
    sizes = Sizes.for_run(quick)
    ocr = _package_folder("rapidocr_onnxruntime", "models")
    vad = _package_folder("silero_vad", "data")
    ocr_install = "pip install --no-deps rapidocr-onnxruntime==1.4.4"
    vad_install = "pip install --no-deps silero-vad==6.2.3"
    found: list[Subject] = []
    det = _located("det", "PP-OCRv4 det", "ocr-det", ocr, "ch_PP-OCRv4_det_infer.onnx", ocr_install)
    det.make_task, det.latency = (lambda: make_detector_task(sizes, seed)), True
    found.append(det)
    rec = _located("rec", "PP-OCRv4 rec", "ocr-rec", ocr, "ch_PP-OCRv4_rec_infer.onnx", ocr_install)
    if rec.path is not None:
        rec_path = rec.path
        rec.make_task = lambda: make_recognizer_task(rec_path, sizes, seed + 10)
    rec.latency = True
    found.append(rec)
    cls = _located(
        "cls",
        "PP-OCR mobile cls",
        "ocr-cls",
        ocr,
        "ch_ppocr_mobile_v2.0_cls_infer.onnx",
        ocr_install,
    )
    cls.make_task = lambda: make_classifier_task(sizes, seed + 20)
    found.append(cls)
    for key, name in (("vad", "silero_vad.onnx"), ("vad16k", "silero_vad_16k_op15.onnx")):
        subject = _located(key, name.removesuffix(".onnx"), "vad", vad, name, vad_install)
        if subject.path is not None:
            vad_path = subject.path
            subject.make_task = lambda p=vad_path: make_vad_task(p, sizes, seed + 30)
        subject.latency = True
        found.append(subject)
    light = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    names = sorted(p.stem.removeprefix("light_") for p in light.glob("light_*.onnx"))
    if not names:
        found.append(Subject("zoo", "light zoo", "zoo", None, f"no models under {light}"))
    for name in names:
        subject = Subject(f"zoo:{name}", f"light {name}", "zoo", light / f"light_{name}.onnx")
        if name in LARGE_ZOO:
            if quick:
                subject.path, subject.missing = None, "left out by --quick (large once filled)"
            subject.zoo_samples = 4
            if not zoo_all_plans:
                subject.plans, subject.plans_note = LARGE_ZOO_PLANS, LARGE_ZOO_NOTE
        found.append(subject)
    digits = REPO / "models" / "digits_cnn.onnx"
    found.append(
        Subject(
            "digits",
            "digits CNN",
            "digits",
            digits if digits.is_file() else None,
            "" if digits.is_file() else f"{digits} is missing (python -m models.digits_cnn)",
            make_task=lambda: make_digits_task(sizes),
        )
    )
    return found


# --- one optimize run ------------------------------------------------------------------------


@dataclass
class RunResult:
    """Everything rule 3 records for one model × plan."""

    model: str
    plan: str
    outcome: str = ""
    reason: str = ""
    opset_in: int | None = None
    opset_out: int | None = None
    opset_upgrade: str = ""
    loads_in_ort: bool | None = None
    checker: str = ""
    size_in: int = 0
    size_out: int | None = None
    size_ratio: float | None = None
    size_vs_materialized: float | None = None
    build_s: float = 0.0
    peak_rss_mib: float | None = None
    passed: bool | None = None
    whole_tensor_passed: bool | None = None
    """The verdict the gate would give judging whole tensors only (``--whole-tensor``)."""
    data: str = ""
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    highlights: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    task: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)


def default_opset(path: Path) -> int | None:
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def has_matmul(path: Path) -> bool:
    """Whether a MatMul or Gemm sits in the main graph or any subgraph body."""
    proto = onnx.load(str(path), load_external_data=False)

    def walk(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
        for node in graph.node:
            yield node
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g)
                for sub in attribute.graphs:
                    yield from walk(sub)

    return any(node.op_type in ("MatMul", "Gemm") for node in walk(proto.graph))


def classify_failure(error: BaseException) -> tuple[str, str]:
    """Rule 3: ``refused`` with its reason when graphopt's own error is the root cause,
    else ``crash`` with the root exception's type."""
    from graphopt.errors import GraphoptError

    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = " ".join(str(error).split())
    if isinstance(root, GraphoptError):
        return "refused", text
    return "crash", f"{type(root).__name__}: {text}"


def _highlights(records: Sequence[Any], upgrade: Mapping[str, Any] | None) -> str:
    parts: list[str] = []
    if upgrade:
        done = (
            "converted" if upgrade.get("converted") else f"not converted: {upgrade.get('reason')}"
        )
        parts.append(f"opset {upgrade.get('source')}→{upgrade.get('target')} ({done})")
    for record in records:
        stats = record.stats
        if record.name == "quant":
            schemes = ", ".join(f"{k} {v}" for k, v in (stats.get("by_scheme") or {}).items())
            text = f"int8 {stats.get('quantized', 0)}" + (f" ({schemes})" if schemes else "")
            if stats.get("in_control_flow_bodies"):
                text += f", {stats['in_control_flow_bodies']} in bodies"
            if stats.get("per_tensor_weights"):
                text += f", per-tensor: {stats['per_tensor_weights']}"
            if stats.get("excluded_for_accuracy"):
                text += f", {len(stats['excluded_for_accuracy'])} kept float for accuracy"
            if stats.get("skipped"):
                text += f", skipped {sum(stats['skipped'].values())}"
            parts.append(text)
        elif record.name == "sparsify":
            text = f"sparsified {stats.get('sparsified', 0)} at {stats.get('sparsity', 0):.2f}"
            if stats.get("in_subgraphs"):
                text += f", {stats['in_subgraphs']} in bodies"
            parts.append(text)
        elif record.name == "lowrank":
            text = f"factored {stats.get('weights_factored', 0)}"
            if stats.get("params_before"):
                text += f" (params {stats['params_before']}→{stats['params_after']})"
            parts.append(text)
        elif record.name == "fp16":
            text = (
                f"fp16 nodes {stats.get('nodes_converted', 0)}, "
                f"fp32 kept {stats.get('nodes_float32', 0)}"
            )
            if stats.get("clamped"):
                text += f", clamped {stats['clamped']}"
            parts.append(text)
        elif record.name == "cleanup" and stats.get("nodes_removed"):
            parts.append(f"cleanup removed {stats['nodes_removed']} nodes")
    return "; ".join(parts)


def _comparison_row(comparison: Any) -> dict[str, Any]:
    return {
        "output": comparison.output,
        "provider": comparison.provider,
        "cosine": comparison.cosine,
        "snr_db": comparison.snr_db,
        "worst_channel_cosine": comparison.worst_channel_cosine if comparison.channels else None,
        "worst_channel": comparison.worst_channel if comparison.channels else "",
        "channels": comparison.channels,
        "passed": comparison.passed,
    }


def whole_tensor_verdict(validation: Any) -> bool:
    """Whether every output meets the criteria on its whole-tensor figures alone (the channel
    figures left out), other checks (finite values, top-1, exactness) as judged."""
    criteria = validation.criteria
    if criteria.exact:
        return bool(validation.passed)
    for comparison in validation.comparisons:
        others = [c for c in comparison.checks if c.criterion not in ("cosine", "snr")]
        if not all(check.passed for check in others):
            return False
        if comparison.cosine is None or comparison.snr_db is None:
            continue  # no figures and every other check passed (equal non-numeric outputs)
        if comparison.cosine < criteria.min_cosine or comparison.snr_db < criteria.min_snr_db:
            return False
    return True


def check_output(path: Path) -> tuple[bool, str]:
    """Whether ONNX Runtime loads ``path``, and onnx.checker's verdict ('ok' or its reason)."""
    try:
        _session(path)
        loads = True
    except Exception as error:  # the output's own failure is a result
        logger.warning("%s does not load in ONNX Runtime: %s", path.name, error)
        loads = False
    try:
        onnx.checker.check_model(str(path))
        verdict = "ok"
    except Exception as error:  # onnx.checker raises ValidationError (and others)
        verdict = " ".join(str(error).split())[:160]
    return loads, verdict


def optimize_worker(
    source: str,
    target: str,
    passes: list[str],
    data: str | None,
    validation_data: str | None,
    zoo_samples: int | None,
) -> dict[str, Any]:
    """Worker (fresh process, :func:`tools.bench_common.run_worker`): one
    :func:`graphopt.optimize` and what rule 3 records of it, as JSON-ready values. A raised
    exception is classified here; a crash of the process itself is classified by the parent."""
    import graphopt

    feeds: Any = data
    if data is None and zoo_samples is not None:
        model = graphopt.load_model(source)
        feeds = [dict(f) for f in graphopt.synthesize(model.graph, samples=zoo_samples)]
    try:
        report = graphopt.optimize(
            source, target, passes, data=feeds, validation_data=validation_data
        )
    except Exception as error:  # rule 3: every failure is a result
        outcome, reason = classify_failure(error)
        return {"outcome": outcome, "reason": reason}
    validation = report.validation
    assert validation is not None
    failures = [message for c in validation.comparisons for message in c.failures]
    return {
        "outcome": "ok" if validation.passed else "validation failed",
        "reason": "" if validation.passed else "; ".join(failures)[:200],
        "passed": validation.passed,
        "whole_tensor_passed": whole_tensor_verdict(validation),
        "data": report.data,
        "comparisons": [_comparison_row(c) for c in validation.comparisons],
        "failures": failures,
        "stats": {  # per-layer detail left out: the pass's summary is what the report needs
            record.name: {k: v for k, v in record.stats.items() if k != "layers"}
            for record in report.run.records
        },
        "highlights": _highlights(report.run.records, report.opset),
        "opset_upgrade": (
            f"{report.opset.get('source')}→{report.opset.get('target')}" if report.opset else ""
        ),
        "size_out": report.output_bytes,
        "seconds": report.seconds,
    }


def run_plan(
    subject: Subject,
    plan: Plan,
    data: tuple[Path, Path] | None,
    target: Path,
    materialized: int | None,
    timeout_s: float,
    log_path: Path | None = None,
) -> RunResult:
    """Rules 2 and 3 for one model and plan: optimize in a fresh process (a segfault or a hang
    is a result, not the end of the benchmark), then check the output here."""
    assert subject.path is not None
    result = RunResult(subject.label, plan.key, opset_in=default_opset(subject.path))
    result.size_in = subject.path.stat().st_size
    calib, held = data if (data is not None and plan.with_data) else (None, None)
    worker = run_worker(
        "tools.bench_exporters:optimize_worker",
        {
            "source": str(subject.path),
            "target": str(target),
            "passes": list(plan.passes),
            "data": None if calib is None else str(calib),
            "validation_data": None if held is None else str(held),
            "zoo_samples": subject.zoo_samples if plan.with_data else None,
        },
        timeout_s=timeout_s,
        log_path=log_path,
    )
    result.build_s = worker.seconds or 0.0
    result.peak_rss_mib = worker.peak_rss_mib
    if not worker.ok:
        result.outcome, result.reason = "crash", worker.error
        logger.warning("%s × %s: crash: %s", subject.label, plan.key, worker.error)
        return result
    info = worker.info
    for name in (
        "outcome", "reason", "passed", "whole_tensor_passed", "data", "comparisons",
        "failures", "stats", "highlights", "opset_upgrade", "size_out",
    ):  # fmt: skip
        if name in info:
            setattr(result, name, info[name])
    if result.outcome in ("refused", "crash"):
        logger.warning("%s × %s: %s: %s", subject.label, plan.key, result.outcome, result.reason)
        return result
    result.opset_out = default_opset(target)
    assert result.size_out is not None
    result.size_ratio = result.size_out / result.size_in
    if materialized:
        result.size_vs_materialized = result.size_out / materialized
    result.loads_in_ort, result.checker = check_output(target)
    return result


def materialized_worker(source: str, target: str) -> dict[str, Any]:
    """Worker: the size of the model once graphopt's normalize has filled every weight
    (ConstantOfShape fills become tensors), the fair fp32 size for the zoo's outputs."""
    from graphopt.ir.model import model_file_bytes, save_model
    from graphopt.ir.normalize import load_normalized

    model, _ = load_normalized(Path(source), materialize_weights=True)
    save_model(model, target)
    return {"bytes": model_file_bytes(Path(target))}


def write_feeds(feeds: Sequence[Feed], folder: Path) -> Path:
    """A folder of ``.npz`` feeds (graphopt's data convention), one file per feed, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(folder / f"feed_{index:04d}.npz", **feed)
    return folder


def materialized_bytes(path: Path, folder: Path) -> int | None:
    """:func:`materialized_worker` in a fresh process; None (logged) when it fails."""
    target = folder / f"{path.stem}_materialized.onnx"
    worker = run_worker(
        "tools.bench_exporters:materialized_worker", {"source": str(path), "target": str(target)}
    )
    _remove_model(target)
    if not worker.ok:
        logger.warning("%s: could not materialize the weights: %s", path.name, worker.error)
        return None
    return int(worker.info["bytes"])


def _remove_model(path: Path) -> None:
    for candidate in path.parent.glob(path.name + "*"):
        candidate.unlink(missing_ok=True)
    data = path.with_suffix(".data")
    data.unlink(missing_ok=True)


def measure_subject(
    subject: Subject, folder: Path, *, runs: int, keep_models: bool, timeout_s: float
) -> dict[str, Any]:
    """Every applicable plan on one model, with task metrics and latency (rules 2-6)."""
    from graphopt.check.latency import measure_latency

    assert subject.path is not None
    entry: dict[str, Any] = {
        "key": subject.key,
        "label": subject.label,
        "family": subject.family,
        "path": str(subject.path),
        "opset": default_opset(subject.path),
        "bytes": subject.path.stat().st_size,
        "runs": [],
    }
    task = subject.make_task() if subject.make_task else None
    data: tuple[Path, Path] | None = None
    if task is not None:
        task.reference = task.outputs(subject.path)
        if task.calibration is not None and task.held_out is not None:
            feeds = folder / "data" / subject.key.replace(":", "_")
            data = (
                write_feeds(task.calibration, feeds / "calibration"),
                write_feeds(task.held_out[: task.validation_feeds], feeds / "validation"),
            )
        entry["task_note"] = task.note
        entry["fp32"] = task.reference_metrics()
    elif subject.family == "zoo":
        entry["task_note"] = (
            "weights are ConstantOfShape fills: only validity and size are meaningful"
        )
    materialized = None
    if subject.family == "zoo":
        materialized = materialized_bytes(subject.path, folder)
        entry["materialized_bytes"] = materialized
    matmul = has_matmul(subject.path)
    if subject.plans_note:
        entry["plans_note"] = subject.plans_note
    for plan in PLANS:
        if subject.plans is not None and plan.key not in subject.plans:
            continue
        if plan.needs_matmul and not matmul:
            logger.info("%s: no MatMul/Gemm, so no %s", subject.label, plan.key)
            continue
        if not plan.with_data and task is None:
            continue  # the zoo's "cleanup" row already runs without data
        target = folder / f"{subject.key.replace(':', '_')}__{plan.key.replace(',', '_')}.onnx"
        target = target.with_name(target.name.replace(" ", "_").replace("(", "").replace(")", ""))
        logger.info("%s × %s", subject.label, plan.key)
        log_path = folder.parent / "logs" / target.with_suffix(".log").name
        result = run_plan(subject, plan, data, target, materialized, timeout_s, log_path)
        if result.loads_in_ort and task is not None:
            try:
                result.task = task.score(task.reference, task.outputs(target))
            except Exception as error:  # a candidate that cannot run is a result
                result.task = {}
                result.reason = (result.reason + "; " if result.reason else "") + (
                    f"task metric failed: {type(error).__name__}: {error}"
                )[:200]
        if result.loads_in_ort and plan.latency and subject.latency and task is not None:
            feed = task.latency_feed
            if feed is not None:
                comparison = measure_latency(
                    subject.path, target, feed, runs=runs * task.latency_runs_scale
                )
                result.latency = {
                    "fp32_ms": comparison.reference_ms,
                    "candidate_ms": comparison.candidate_ms,
                    "ratio": comparison.ratio,
                }
        entry["runs"].append(asdict(result))
        if not keep_models:
            _remove_model(target)
        logger.info("  %s: %s %s", plan.key, result.outcome, result.reason)
    if data is not None and not keep_models:
        shutil.rmtree(data[0].parent, ignore_errors=True)
    return entry


# --- report ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _validation_cell(run: Mapping[str, Any]) -> str:
    if not run["comparisons"]:
        return "–"
    measured = [c for c in run["comparisons"] if c["cosine"] is not None]
    if not measured:  # no comparison produced figures (errors, new NaN/Inf): nothing to show
        return "– (no figures)"
    whole = min(measured, key=lambda c: c["cosine"])
    text = f"{whole['cosine']:.4f}"
    channelled = [c for c in run["comparisons"] if c["worst_channel_cosine"] is not None]
    if channelled:
        worst = min(channelled, key=lambda c: c["worst_channel_cosine"])
        text += (
            f" / {worst['worst_channel_cosine']:.4f} ({worst['output']} {worst['worst_channel']})"
        )
    return text


def _outcome_cell(run: Mapping[str, Any]) -> str:
    if run["outcome"] in ("refused", "crash"):
        return f"{run['outcome']}: {run['reason']}"
    if run["outcome"] == "validation failed" and run["failures"]:
        whole = " (whole-tensor gate: passes)" if run["whole_tensor_passed"] else ""
        return f"validation failed: {run['failures'][0]}{whole}"
    return run["outcome"]


def _validity_cell(run: Mapping[str, Any]) -> str:
    if run["loads_in_ort"] is None:
        return "–"
    ort_text = "loads" if run["loads_in_ort"] else "ORT fails"
    return f"{ort_text}, checker {run['checker']}"


def _size_cell(run: Mapping[str, Any]) -> str:
    if run["size_ratio"] is None:
        return "–"
    text = f"{run['size_ratio']:.3g}"
    if run["size_vs_materialized"] is not None:
        text = f"{run['size_vs_materialized']:.3g} of filled fp32 ({text} of file)"
    return text


def results_table(entries: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for entry in entries:
        for run in entry["runs"]:
            opset = f"{run['opset_in']}→{run['opset_out']}" if run["opset_out"] else "–"
            rows.append(
                [
                    entry["label"],
                    run["plan"],
                    _outcome_cell(run),
                    opset,
                    _validity_cell(run),
                    _size_cell(run),
                    _validation_cell(run),
                    run["highlights"] or "–",
                    f"{run['build_s']:.1f}",
                ]
            )
    return markdown_table(
        [
            "model",
            "plan",
            "outcome",
            "opset",
            "output",
            "size out/in",
            "cosine whole / worst channel",
            "pass stats",
            "build s",
        ],
        rows,
    )


TASK_COLUMNS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "ocr-rec": (
        ("cer", "CER vs truth", ".4f"),
        ("decode_agreement", "lines decoded as fp32", ".3f"),
        ("cer_vs_fp32", "CER vs fp32", ".4f"),
    ),
    "ocr-det": (("text_iou", "text-pixel IoU", ".4f"), ("boxes_kept", "boxes kept", ".3f")),
    "ocr-cls": (("flipped", "decisions flipped", ".3f"), ("accuracy", "accuracy", ".3f")),
    "vad": (
        ("flipped", "frames flipped", ".4f"),
        ("label_agreement", "agreement with labels", ".3f"),
        ("max_abs_prob", "max |Δp|", ".4f"),
    ),
    "digits": (("accuracy", "accuracy", ".4f"), ("top1_agreement", "top-1 agreement", ".4f")),
}
FP32_COLUMNS: dict[str, tuple[str, str]] = {
    "ocr-rec": ("cer", "CER {:.4f}"),
    "ocr-det": ("boxes", "{:.0f} boxes"),
    "ocr-cls": ("accuracy", "accuracy {:.3f}"),
    "vad": ("label_agreement", "agreement with labels {:.3f}"),
    "digits": ("accuracy", "accuracy {:.4f}"),
}


def task_table(entries: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for entry in entries:
        columns = TASK_COLUMNS.get(entry["family"])
        if not columns:
            continue
        key, template = FP32_COLUMNS[entry["family"]]
        fp32 = entry.get("fp32", {})
        rows.append([entry["label"], "fp32", template.format(fp32[key]) if key in fp32 else "–"])
        for run in entry["runs"]:
            if not run["task"]:
                continue
            cells = [
                f"{label} {_fmt(run['task'].get(metric), spec)}"
                for metric, label, spec in columns
                if metric in run["task"]
            ]
            rows.append([entry["label"], run["plan"], ", ".join(cells)])
    return markdown_table(["model", "plan", "task metrics (held-out data)"], rows)


def latency_table(entries: Sequence[Mapping[str, Any]]) -> str:
    rows = [
        [
            entry["label"],
            run["plan"],
            f"{run['latency']['fp32_ms']:.2f}",
            f"{run['latency']['candidate_ms']:.2f}",
            f"{run['latency']['ratio']:.2f}",
        ]
        for entry in entries
        for run in entry["runs"]
        if run["latency"]
    ]
    return markdown_table(["model", "plan", "fp32 ms", "candidate ms", "ratio"], rows)


def _data_notes(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """One bullet per distinct data note, naming every model it applies to."""
    grouped: dict[str, list[str]] = {}
    for entry in entries:
        if entry.get("task_note"):
            grouped.setdefault(entry["task_note"], []).append(entry["label"])
    return [f"- {', '.join(labels)}: {note}" for note, labels in grouped.items()]


def markdown(payload: Mapping[str, Any]) -> str:
    entries = payload["models"]
    lines = [
        "# graphopt on real-weight models from other exporters",
        "",
        f"Command: `{payload['command']}`",
        f"Machine: {payload['machine_summary']} (shared with other work while measuring).",
        f"Total wall time {payload['seconds']:.0f} s.",
        "",
        "Outcome: ok = validation passed; refused = graphopt's own error, with its reason; "
        "crash = any other exception. Cosine: the lowest whole-tensor cosine over outputs / "
        "the worst channel and where (outputs without a channel axis have none). Size: output "
        "file over input file; for the light zoo, over the model with its ConstantOfShape fills "
        "materialized.",
        "",
        "## Runs",
        "",
        results_table(entries),
        "",
        "## Task metrics",
        "",
        "fp32 rows give the reference model's own figure; the candidates' figures compare with "
        "the ground truth (CER, accuracy, labels) or with fp32 (IoU, boxes, flips, agreement).",
        "",
        task_table(entries),
        "",
        "Data:",
        "",
        *_data_notes(entries),
        "",
        "## CPU latency against fp32 (interleaved medians)",
        "",
        latency_table(entries),
    ]
    synthesized = [
        f"{entry['label']}: {run['data']}"
        for entry in entries
        for run in entry["runs"]
        if run["plan"] == "cleanup (no data)" and run["data"]
    ]
    if synthesized:
        lines += ["", "## What graphopt synthesized without data", ""]
        lines += [f"- {item}" for item in synthesized]
    skipped = payload["skipped"]
    partial = [entry for entry in entries if entry.get("plans_note")]
    if skipped or partial:
        lines += ["", "## Skipped", ""]
        lines += [f"- {item['label']}: {item['reason']}" for item in skipped]
        notes: dict[str, list[str]] = {}
        for entry in partial:
            notes.setdefault(entry["plans_note"], []).append(entry["label"])
        lines += [f"- {', '.join(labels)}: {note}" for note, labels in notes.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    parser.add_argument("--quick", action="store_true", help="fewer samples, no large zoo models")
    parser.add_argument(
        "--models",
        default="",
        help="comma-separated keys or families (det, rec, cls, vad, vad16k, zoo, zoo:resnet50, "
        "digits); default: all",
    )
    parser.add_argument("--runs", type=int, default=20, help="interleaved latency runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-models", action="store_true", help="keep the candidate models")
    parser.add_argument(
        "--zoo-all-plans",
        action="store_true",
        help="also sparsify and lowrank the large zoo models (slow; may crash in OpenBLAS)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one optimize run may take"
    )
    args = parser.parse_args(argv)
    wanted = {item.strip() for item in args.models.split(",") if item.strip()}
    folder: Path = args.out
    models_folder = folder / "models"
    models_folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for subject in subjects(args.quick, args.seed, zoo_all_plans=args.zoo_all_plans):
        family_key = subject.key.split(":")[0]
        if wanted and not wanted & {subject.key, subject.family, family_key}:
            continue
        if subject.path is None:
            logger.info("skipping %s: %s", subject.label, subject.missing)
            skipped.append({"label": subject.label, "reason": subject.missing})
            continue
        logger.info("measuring %s", subject.label)
        entries.append(
            measure_subject(
                subject,
                models_folder,
                runs=args.runs,
                keep_models=args.keep_models,
                timeout_s=args.timeout,
            )
        )
    if not args.keep_models:
        shutil.rmtree(models_folder, ignore_errors=True)
    command = "python -m tools.bench_exporters" + (
        " " + " ".join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )
    payload = {
        "command": command,
        "quick": args.quick,
        "machine": machine_info(),
        "machine_summary": machine_summary(),
        "seconds": time.perf_counter() - started,
        "plans": [asdict(plan) for plan in PLANS],
        "models": entries,
        "skipped": skipped,
    }
    write_json(folder / "exporters.json", payload)
    text = markdown(payload)
    (folder / "exporters.md").write_text(text)
    sys.stdout.write(text)
    return 0


def _configure_logging() -> None:
    """Progress from this module on stderr; graphopt's own warnings go to the worker logs."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("graphopt", "passes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


if __name__ == "__main__":
    _configure_logging()
    raise SystemExit(main())
