"""Numerical comparison of a candidate model against its reference on ONNX Runtime.

Rules:

1. Both models run on the same feeds, on each requested execution provider; outputs are matched
   by name. A missing output, or a shape or dtype mismatch, is a finding that fails the check,
   never a crash.
2. Metrics are accumulated batch by batch (running sums, not stored outputs): cosine similarity,
   SNR in dB = 20·log10(‖ref‖ / ‖ref − cand‖), max and median absolute error, max relative error,
   NaN/Inf counts of each side, the count of elements outside ``atol + rtol·|ref|`` and, for
   outputs that look like logits or scores, top-1 and top-5 agreement.
3. Per channel: a whole-tensor cosine hides a block of small values next to large ones (a
   detector's class-score rows next to its box rows). So every *channel axis* of an output is
   sliced, and dot, ref², cand² and err² are summed per slice (per index), batch by batch, the
   same way as for the whole tensor:

   a. A channel axis is an axis whose size is between :data:`CHANNEL_AXIS_MIN` and
      :data:`CHANNEL_AXIS_MAX` (2 and 256): ``[1, 84, 8400]`` has one (axis 1), ``[B, 10]``
      logits have axis 1. A rank-4 output is an image-like map: only its channel axis
      counts (axis 1, NCHW, or axis 3 when that one is smaller, NHWC), never its rows and
      columns: a segmentation or text-probability map's rows are not channels, and a
      mostly-empty row's cosine is noise. Axis 0 is the samples axis and never a channel axis
      when its size is the batch's sample count (the leading size of the first batched input)
      or, where that is unknown, when the output has two or more axes.
   b. Sizes may differ between batches: sums are kept per index and grow as needed; an axis
      counts in the batches where it is a channel axis.
   c. A channel is judged once it holds :data:`MIN_CHANNEL_ELEMENTS` finite elements (a slice of
      one element per sample would be an element-wise relative error, which is meaningless near
      zero). A channel whose reference and candidate are both all zero, or both below
      :data:`NEGLIGIBLE_RMS` in root-mean-square, agrees perfectly (cosine 1, SNR +inf), as does
      a channel without any error. Non-finite elements are left out of the sums (rule 2 counts
      them).
   d. Reported per output: the worst channel cosine and where (``"axis 1 index 17"``), and the
      worst channel SNR and where; whole-tensor figures stay as they are.
4. Criteria: an *exact* run (only exact passes) must have every element within
   ``atol + rtol·|ref|`` (defaults 1e-5 and 1e-4, as onnx-simplifier uses). A lossy run must meet
   ``min_cosine``, ``min_snr_db`` and, where given and applicable, ``min_top1``. With
   ``per_channel`` (the default) the cosine and SNR checks judge the lower of the whole-tensor
   and the worst-channel figure, and the message names the channel when it is the channel's;
   ``per_channel=False`` judges the whole tensor only. A candidate that produces NaN or Inf where
   the reference does not always fails.
5. :func:`agreement` scores one output pair with the figure the gate uses (rules 3 and 4), for
   code that searches (quant's accuracy loop, tune).
6. The library returns a typed :class:`ValidationReport`; it never prints.
7. One model is in memory at a time: the reference runs over every batch first and its outputs
   go to temporary files (memory-mapped back), then it is freed and the candidate runs. Peak
   memory is the larger model plus one batch, so a multi-GB model can be checked against its
   optimized version on a machine that could not hold both.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.data import Feeds
from graphopt.errors import InputError
from graphopt.ort import make_session, node_placement

logger = logging.getLogger(__name__)

_MEDIAN_SAMPLE_LIMIT = 200_000
_METRIC_CHUNK = 1 << 22
"""Elements compared at a time, so float64 temporaries stay small on large outputs."""
_CHANNEL_CHUNK = 1 << 20
"""Elements summed per channel at a time (seven float64/int64 temporaries each)."""
_LOGIT_WORDS = ("logit", "score", "prob", "class", "pred")
_NEAR_ZERO = 1e-12

CHANNEL_AXIS_MIN = 2
CHANNEL_AXIS_MAX = 256
"""Rule 3a: an output axis whose size is within these bounds is sliced into channels."""
MIN_CHANNEL_ELEMENTS = 16
"""Rule 3c: finite elements a channel must hold, over all batches, before it is judged."""
NEGLIGIBLE_RMS = 1e-6
"""Rule 3c: a channel whose reference and candidate RMS are both at most this agrees."""


@dataclass(frozen=True)
class Criteria:
    """What a candidate must meet; see rule 4."""

    exact: bool = False
    rtol: float = 1e-4
    atol: float = 1e-5
    min_cosine: float = 0.99
    min_snr_db: float = 20.0
    min_top1: float | None = None
    per_channel: bool = True
    """Judge cosine and SNR on the worst channel as well as the whole tensor (rule 4)."""

    def describe(self) -> str:
        if self.exact:
            return f"exact: every element within atol {self.atol:g} + rtol {self.rtol:g}·|ref|"
        text = f"cosine ≥ {self.min_cosine:g}, SNR ≥ {self.min_snr_db:g} dB"
        text += " (whole tensor and worst channel)" if self.per_channel else " (whole tensor)"
        if self.min_top1 is not None:
            text += f", top-1 ≥ {self.min_top1:g}"
        return text


@dataclass
class Check:
    """One criterion judged on one output and provider: what CI shows as one test case."""

    criterion: str
    passed: bool
    message: str
    value: float | None = None
    threshold: float | None = None
    detail: str = ""
    """More context for reports (e.g. whole-tensor and worst-channel figures side by side)."""


@dataclass(frozen=True)
class Agreement:
    """How closely one candidate output follows its reference, as the gate sees it (rule 5).

    ``score`` is what the gate's cosine check judges with per-channel criteria (the default):
    the lower of the whole-tensor cosine and the worst channel's cosine.
    """

    cosine: float
    """Whole-tensor cosine."""
    snr_db: float
    """Whole-tensor SNR in dB."""
    worst_channel_cosine: float
    worst_channel: str
    """Where the worst channel cosine is, e.g. ``"axis 1 index 17"``; empty when no channel."""
    worst_channel_snr_db: float
    score: float
    """min(cosine, worst_channel_cosine)."""
    score_snr_db: float
    """min(snr_db, worst_channel_snr_db)."""


@dataclass
class OutputComparison:
    """Metrics of one output on one provider (rules 2 and 3) and the checks judged on them."""

    output: str
    provider: str
    elements: int = 0
    cosine: float = 1.0
    snr_db: float = math.inf
    max_abs: float = 0.0
    median_abs: float = 0.0
    max_rel: float = 0.0
    not_close: int = 0
    nan_reference: int = 0
    nan_candidate: int = 0
    inf_reference: int = 0
    inf_candidate: int = 0
    top1: float | None = None
    top5: float | None = None
    worst_channel_cosine: float = 1.0
    worst_channel: str = ""
    """Where the worst channel cosine is (``"axis 1 index 17"``); empty when no channel judged."""
    worst_channel_snr_db: float = math.inf
    worst_snr_channel: str = ""
    """Where the worst channel SNR is; empty when no channel judged."""
    channel_axes: list[int] = field(default_factory=list)
    """The axes sliced into channels (rule 3a), in any batch."""
    channels: int = 0
    """Channels judged (rule 3c), over every channel axis."""
    findings: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def agreement(self) -> Agreement:
        """The figures of rule 5 for this output."""
        return Agreement(
            cosine=self.cosine,
            snr_db=self.snr_db,
            worst_channel_cosine=self.worst_channel_cosine,
            worst_channel=self.worst_channel,
            worst_channel_snr_db=self.worst_channel_snr_db,
            score=min(self.cosine, self.worst_channel_cosine),
            score_snr_db=min(self.snr_db, self.worst_channel_snr_db),
        )

    @property
    def failures(self) -> list[str]:
        return [check.message for check in self.checks if not check.passed]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def fail(self, criterion: str, message: str) -> None:
        """Record a structural failure (missing output, shape mismatch, load or run error)."""
        if not any(c.criterion == criterion and c.message == message for c in self.checks):
            self.checks.append(Check(criterion, False, message))


@dataclass
class ValidationReport:
    """Everything a human table, a JSON report or a CI gate needs."""

    data: str
    synthetic: bool
    providers: list[str]
    criteria: Criteria
    comparisons: list[OutputComparison]
    samples: int = 0
    placement: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """For non-CPU providers: execution provider → names of the candidate's nodes it ran."""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def failures(self) -> list[str]:
        return [
            f"{c.output} [{c.provider}]: {failure}"
            for c in self.comparisons
            for failure in c.failures
        ]

    def to_dict(self) -> dict[str, Any]:
        result = json_safe(asdict(self))
        result["passed"] = self.passed
        return result


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (which JSON cannot hold) by the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


class _ChannelSums:
    """Running per-index sums along one channel axis (rule 3b); grows with the axis size."""

    def __init__(self) -> None:
        self.dot = np.zeros(0)
        self.ref_sq = np.zeros(0)
        self.cand_sq = np.zeros(0)
        self.err_sq = np.zeros(0)
        self.count = np.zeros(0)

    def add(self, index: np.ndarray, size: int, terms: Sequence[np.ndarray]) -> None:
        if size > self.dot.size:
            grow = size - self.dot.size
            self.dot, self.ref_sq, self.cand_sq, self.err_sq, self.count = (
                np.concatenate([values, np.zeros(grow)])
                for values in (self.dot, self.ref_sq, self.cand_sq, self.err_sq, self.count)
            )
        for total, weights in zip(
            (self.dot, self.ref_sq, self.cand_sq, self.err_sq, self.count), terms, strict=True
        ):
            total[:size] += np.bincount(index, weights=weights, minlength=size)

    def figures(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-index cosine and SNR in dB of the judged channels, and the judged indices."""
        judged = np.flatnonzero(self.count >= MIN_CHANNEL_ELEMENTS)
        dot, ref_sq = self.dot[judged], self.ref_sq[judged]
        cand_sq, err_sq = self.cand_sq[judged], self.err_sq[judged]
        count = self.count[judged]
        floor = count * NEGLIGIBLE_RMS**2
        negligible = (ref_sq <= floor) & (cand_sq <= floor)
        with np.errstate(divide="ignore", invalid="ignore"):
            denominator = np.sqrt(ref_sq) * np.sqrt(cand_sq)
            cosine = np.where(denominator > 0, dot / denominator, 0.0)
            snr = np.where(
                err_sq > 0,
                np.where(ref_sq > 0, 10.0 * np.log10(ref_sq / err_sq), -np.inf),
                np.inf,
            )
        cosine = np.clip(np.where(negligible | (err_sq == 0), 1.0, cosine), -1.0, 1.0)
        snr = np.where(negligible, np.inf, snr)
        return cosine, snr, judged


def channel_axes(shape: Sequence[int], samples: int | None) -> list[int]:
    """Rule 3a: the axes of an output of ``shape`` that are sliced into channels."""
    axes = []
    for axis, size in enumerate(shape):
        if not CHANNEL_AXIS_MIN <= size <= CHANNEL_AXIS_MAX:
            continue
        if axis == 0 and (size == samples if samples is not None else len(shape) >= 2):
            continue
        axes.append(axis)
    if len(shape) == 4:  # an image-like map: its spatial rows and columns are not channels
        channels = 1 if shape[1] <= shape[3] else 3
        axes = [axis for axis in axes if axis in (0, channels)]
    return axes


class MetricAccumulator:
    """Running sums for one output on one provider (rules 2 and 3)."""

    def __init__(self, name: str, provider: str, criteria: Criteria, seed: int) -> None:
        self.result = OutputComparison(output=name, provider=provider)
        self.criteria = criteria
        self.dot = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.err_sq = 0.0
        self.channels: dict[int, _ChannelSums] = {}
        self.abs_samples: list[np.ndarray] = []
        self.sampled = 0
        self.top1_hits = 0
        self.top5_hits = 0
        self.rows = 0
        self.logit_like = _looks_like_logits(name)
        self.rng = np.random.default_rng(seed)

    def add(
        self, reference: np.ndarray, candidate: np.ndarray, *, samples: int | None = None
    ) -> None:
        """Add one batch; ``samples`` is the batch's sample count (rule 3a), None if unknown."""
        result = self.result
        if reference.shape != candidate.shape:
            finding = (
                f"shape mismatch: reference {list(reference.shape)}, "
                f"candidate {list(candidate.shape)}"
            )
            result.fail("shape", finding)
            return
        if reference.dtype != candidate.dtype:
            finding = f"dtype mismatch: reference {reference.dtype}, candidate {candidate.dtype}"
            if finding not in result.findings:
                result.findings.append(finding)
        if reference.dtype.kind not in "fiub" or candidate.dtype.kind not in "fiub":
            equal = np.array_equal(reference, candidate)
            result.elements += reference.size
            result.not_close += 0 if equal else reference.size
            return
        shape = tuple(int(size) for size in reference.shape)
        axes = channel_axes(shape, samples)
        for axis in axes:
            if axis not in result.channel_axes:
                result.channel_axes.append(axis)
        flat_ref, flat_cand = reference.reshape(-1), candidate.reshape(-1)
        for start in range(0, flat_ref.size, _METRIC_CHUNK):  # small float64 copies
            stop = start + _METRIC_CHUNK
            self._add_values(flat_ref[start:stop], flat_cand[start:stop])
            if axes:
                self._add_channels(flat_ref[start:stop], flat_cand[start:stop], start, shape, axes)
        if self.logit_like and reference.ndim >= 2 and reference.shape[-1] >= 2:
            self._topk(reference, candidate)

    def _add_channels(
        self,
        reference: np.ndarray,
        candidate: np.ndarray,
        start: int,
        shape: tuple[int, ...],
        axes: Sequence[int],
    ) -> None:
        """Rule 3: per-index sums along each channel axis for elements ``start`` onwards."""
        for offset in range(0, reference.size, _CHANNEL_CHUNK):
            ref = reference[offset : offset + _CHANNEL_CHUNK].astype(np.float64)
            cand = candidate[offset : offset + _CHANNEL_CHUNK].astype(np.float64)
            finite = np.isfinite(ref) & np.isfinite(cand)
            if not finite.all():
                ref, cand = np.where(finite, ref, 0.0), np.where(finite, cand, 0.0)
            diff = ref - cand
            terms = (ref * cand, ref * ref, cand * cand, diff * diff, finite.astype(np.float64))
            first = start + offset
            positions = np.arange(first, first + ref.size, dtype=np.int64)
            for axis in axes:
                stride = math.prod(shape[axis + 1 :])
                index = (positions // stride) % shape[axis]
                self.channels.setdefault(axis, _ChannelSums()).add(index, shape[axis], terms)

    def _add_values(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        result = self.result
        ref = reference.astype(np.float64)
        cand = candidate.astype(np.float64)
        result.elements += ref.size
        result.nan_reference += int(np.isnan(ref).sum())
        result.nan_candidate += int(np.isnan(cand).sum())
        result.inf_reference += int(np.isinf(ref).sum())
        result.inf_candidate += int(np.isinf(cand).sum())
        finite = np.isfinite(ref) & np.isfinite(cand)
        ref_f, cand_f = ref[finite], cand[finite]
        diff = np.abs(ref_f - cand_f)
        self.dot += float(ref_f @ cand_f)
        self.ref_sq += float(ref_f @ ref_f)
        self.cand_sq += float(cand_f @ cand_f)
        self.err_sq += float(diff @ diff)
        if diff.size:
            result.max_abs = max(result.max_abs, float(diff.max()))
            rel = diff / np.maximum(np.abs(ref_f), _NEAR_ZERO)
            result.max_rel = max(result.max_rel, float(rel.max()))
        tolerance = self.criteria.atol + self.criteria.rtol * np.abs(ref_f)
        result.not_close += int((diff > tolerance).sum())
        mismatched_nonfinite = ~finite & ~((np.isnan(ref) & np.isnan(cand)) | (ref == cand))
        result.not_close += int(mismatched_nonfinite.sum())
        self._sample_abs(diff)

    def _sample_abs(self, diff: np.ndarray) -> None:
        room = _MEDIAN_SAMPLE_LIMIT - self.sampled
        if room <= 0 or not diff.size:
            return
        if diff.size > room:
            diff = self.rng.choice(diff, size=room, replace=False)
        self.abs_samples.append(diff)
        self.sampled += diff.size

    def _topk(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        classes = reference.shape[-1]
        ref_rows = reference.reshape(-1, classes)
        cand_rows = candidate.reshape(-1, classes)
        ref_top = np.argmax(ref_rows, axis=1)
        self.top1_hits += int((np.argmax(cand_rows, axis=1) == ref_top).sum())
        k = min(5, classes)
        cand_top5 = np.argpartition(-cand_rows, k - 1, axis=1)[:, :k]
        self.top5_hits += int((cand_top5 == ref_top[:, None]).any(axis=1).sum())
        self.rows += ref_rows.shape[0]

    def finish(self) -> OutputComparison:
        result = self.result
        denominator = math.sqrt(self.ref_sq) * math.sqrt(self.cand_sq)
        if denominator > 0:
            result.cosine = self.dot / denominator
        elif self.ref_sq == 0 and self.cand_sq == 0:
            result.cosine = 1.0
        else:
            result.cosine = 0.0
        if self.err_sq > 0:
            result.snr_db = (
                10.0 * math.log10(self.ref_sq / self.err_sq) if self.ref_sq > 0 else -math.inf
            )
        if self.abs_samples:
            result.median_abs = float(np.median(np.concatenate(self.abs_samples)))
        if self.rows:
            result.top1 = self.top1_hits / self.rows
            result.top5 = self.top5_hits / self.rows
        self._finish_channels()
        self._judge()
        return result

    def _finish_channels(self) -> None:
        """Rule 3d: the worst channel cosine and SNR over every channel axis, and where."""
        result = self.result
        for axis in sorted(self.channels):
            cosine, snr, judged = self.channels[axis].figures()
            result.channels += int(judged.size)
            if not judged.size:
                continue
            worst = int(np.argmin(cosine))
            if not result.worst_channel or cosine[worst] < result.worst_channel_cosine:
                result.worst_channel_cosine = float(cosine[worst])
                result.worst_channel = f"axis {axis} index {int(judged[worst])}"
            worst = int(np.argmin(snr))
            if not result.worst_snr_channel or snr[worst] < result.worst_channel_snr_db:
                result.worst_channel_snr_db = float(snr[worst])
                result.worst_snr_channel = f"axis {axis} index {int(judged[worst])}"

    def _judge(self) -> None:
        result, criteria = self.result, self.criteria
        new_nan = result.nan_candidate - result.nan_reference
        new_inf = result.inf_candidate - result.inf_reference
        problems = []
        if new_nan > 0:
            problems.append(f"{new_nan} NaN values the reference does not have")
        if new_inf > 0:
            problems.append(f"{new_inf} Inf values the reference does not have")
        result.checks.append(
            Check(
                "finite",
                not problems,
                "; ".join(problems) or "no new NaN/Inf",
                float(max(new_nan, 0) + max(new_inf, 0)),
                0.0,
            )
        )
        if criteria.exact:
            result.checks.append(
                Check(
                    "exact",
                    result.not_close == 0,
                    f"{result.not_close} of {result.elements} elements differ by more than "
                    f"atol {criteria.atol:g} + rtol {criteria.rtol:g}·|ref| "
                    f"(max abs {result.max_abs:.3g})",
                    float(result.not_close),
                    0.0,
                )
            )
            return
        cosine, cosine_at = result.cosine, ""
        snr, snr_at = result.snr_db, ""
        if criteria.per_channel:
            if result.worst_channel and result.worst_channel_cosine < cosine:
                cosine, cosine_at = result.worst_channel_cosine, result.worst_channel
            if result.worst_snr_channel and result.worst_channel_snr_db < snr:
                snr, snr_at = result.worst_channel_snr_db, result.worst_snr_channel
        detail = _figures_detail(result, criteria.per_channel)
        result.checks.append(
            _at_least(
                "cosine", "cosine", cosine, criteria.min_cosine, where=cosine_at, detail=detail
            )
        )
        result.checks.append(
            _at_least(
                "snr",
                "SNR",
                snr,
                criteria.min_snr_db,
                digits=2,
                unit=" dB",
                where=snr_at,
                detail=detail,
            )
        )
        if criteria.min_top1 is not None and result.top1 is not None:
            result.checks.append(
                _at_least("top1", "top-1", result.top1, criteria.min_top1, digits=4)
            )


def _at_least(
    criterion: str,
    label: str,
    value: float,
    minimum: float,
    *,
    digits: int = 6,
    unit: str = "",
    where: str = "",
    detail: str = "",
) -> Check:
    """A check that ``value`` reaches ``minimum``; the message shows both when it does not, and
    the channel when ``value`` is a channel's (``where``)."""
    shown = f"{label} {value:.{digits}f}{unit}" + (f" at channel {where}" if where else "")
    passed = value >= minimum
    message = shown if passed else f"{shown} < {minimum:g}{unit}"
    return Check(criterion, passed, message, value, minimum, detail)


def _figures_detail(result: OutputComparison, per_channel: bool) -> str:
    """Whole-tensor and worst-channel figures side by side, for reports (rule 3d)."""
    text = f"whole tensor: cosine {result.cosine:.6f}, SNR {result.snr_db:.2f} dB"
    if not result.worst_channel:
        return text + "; no channel judged"
    text += (
        f"; worst channel: cosine {result.worst_channel_cosine:.6f} at {result.worst_channel}, "
        f"SNR {result.worst_channel_snr_db:.2f} dB at {result.worst_snr_channel} "
        f"({result.channels} channels on axes {', '.join(map(str, result.channel_axes))})"
    )
    return text if per_channel else text + "; not gated (whole tensor only)"


def agreement(
    reference: np.ndarray, candidate: np.ndarray, *, samples: int | None = None
) -> Agreement:
    """Score one candidate output against its reference with the gate's figures (rule 5).

    ``samples``: how many samples axis 0 holds, when it is the batch axis (rule 3a); None treats
    axis 0 of an output with two or more axes as the batch axis. Raises ValueError when the
    shapes differ.
    """
    ref, cand = np.asarray(reference), np.asarray(candidate)
    if ref.shape != cand.shape:
        raise ValueError(
            f"shape mismatch: reference {list(ref.shape)}, candidate {list(cand.shape)}"
        )
    accumulator = MetricAccumulator("output", "cpu", Criteria(), seed=0)
    accumulator.add(ref, cand, samples=samples)
    return accumulator.finish().agreement


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _looks_like_logits(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _LOGIT_WORDS)


ModelSource = str | os.PathLike[str] | onnx.ModelProto


def sample_count(feed: Mapping[str, np.ndarray]) -> int | None:
    """Rule 3a: the batch's sample count, the leading size of its first input with an axis."""
    for value in feed.values():
        if np.ndim(value) >= 1:
            return int(np.shape(value)[0])
    return None


class _ReferenceOutputs:
    """The reference's outputs of every batch, kept in ``.npy`` files (rule 7)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, batch: int, outputs: Sequence[np.ndarray]) -> None:
        for position, value in enumerate(outputs):
            np.save(self.folder / f"{batch}_{position}.npy", np.asarray(value))

    def load(self, batch: int, positions: Sequence[int]) -> list[np.ndarray]:
        return [np.load(self.folder / f"{batch}_{p}.npy", mmap_mode="r") for p in positions]


def _run_reference(
    reference: ModelSource, provider: str, feeds: Feeds, stored: _ReferenceOutputs
) -> list[str]:
    """Run the reference over every batch, store its outputs, free it; returns output names."""
    try:
        session = make_session(reference, provider, optimize=False)
    except Exception as error:  # onnxruntime's own exception types
        raise InputError(
            f"the reference model does not load in onnxruntime ({provider}): {_first_line(error)}"
        ) from error
    names = [o.name for o in session.get_outputs()]
    for batch_index, feed in enumerate(feeds):
        try:
            outputs = session.run(names, feed)
        except Exception as error:
            raise InputError(
                f"onnxruntime cannot run the reference model on {feeds.description}: "
                f"{_first_line(error)}"
            ) from error
        stored.save(batch_index, outputs)
        del outputs
    del session
    return names


def compare_models(
    reference: ModelSource,
    candidate: ModelSource,
    feeds: Feeds,
    *,
    providers: Sequence[str] = ("cpu",),
    criteria: Criteria | None = None,
    on_batch: Callable[[int], None] | None = None,
    seed: int = 0,
) -> ValidationReport:
    """Run both models on ``feeds`` on each provider and judge the candidate (module rules)."""
    criteria = criteria or Criteria()
    comparisons: list[OutputComparison] = []
    placement: dict[str, dict[str, list[str]]] = {}
    samples = 0
    for provider in providers:
        with tempfile.TemporaryDirectory(prefix="graphopt-validate-") as folder:
            stored = _ReferenceOutputs(Path(folder))
            ref_names = _run_reference(reference, provider, feeds, stored)
            try:
                cand_session = make_session(candidate, provider, optimize=False)
            except Exception as error:  # onnxruntime's own exception types
                for name in ref_names:
                    broken = OutputComparison(output=name, provider=provider)
                    broken.fail(
                        "loads", f"candidate does not load in onnxruntime: {_first_line(error)}"
                    )
                    comparisons.append(broken)
                continue
            cand_names = {o.name for o in cand_session.get_outputs()}
            common = [name for name in ref_names if name in cand_names]
            positions = [ref_names.index(name) for name in common]
            accumulators = {
                name: MetricAccumulator(name, provider, criteria, seed) for name in common
            }
            provider_samples = 0
            for batch_index, feed in enumerate(feeds if common else []):
                try:
                    cand_out = cand_session.run(common, feed)
                except Exception as error:
                    for name in common:
                        accumulators[name].result.fail(
                            "runs", f"candidate fails to run: {_first_line(error)}"
                        )
                    break
                ref_out = stored.load(batch_index, positions)
                batch_samples = sample_count(feed)
                for name, ref_value, cand_value in zip(common, ref_out, cand_out, strict=True):
                    accumulators[name].add(
                        np.asarray(ref_value), np.asarray(cand_value), samples=batch_samples
                    )
                del ref_out, cand_out
                first = next(iter(feed.values()))
                provider_samples += int(first.shape[0]) if first.ndim else 1
                if on_batch is not None:
                    on_batch(batch_index)
            del cand_session
        samples = max(samples, provider_samples)
        if provider != "cpu" and common:
            placement[provider] = node_placement(candidate, provider, next(iter(feeds)))
        for name in ref_names:
            if name in accumulators:
                comparisons.append(accumulators[name].finish())
            else:
                missing = OutputComparison(output=name, provider=provider)
                missing.fail("present", "output missing from the candidate")
                comparisons.append(missing)
    return ValidationReport(
        data=feeds.description,
        synthetic=feeds.synthetic,
        providers=list(providers),
        criteria=criteria,
        comparisons=comparisons,
        samples=samples,
        placement=placement,
    )
