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
      counts (axis 1, NCHW, or axis 3, NHWC), never its rows and columns: a segmentation or
      text-probability map's rows are not channels, and a mostly-empty row's cosine is noise.
      Its channel axis is the one of axes 1 and 3 whose size is the same in every batch while
      the other's changes (a network's channel count is fixed, its image size is not: a narrow
      image must not turn columns into channels); otherwise (one batch, or both axes steady
      or both changing) axis 3 when it is smaller (at the largest sizes seen), else axis 1
      (:func:`map_channel_axis`). Axis 0 is the samples axis and never a channel axis when its
      size is the batch's sample count (:func:`sample_count`: the size of the batch axis, rule
      8 of :mod:`graphopt.data.feeds`, of the first input that has one, so a recurrent state
      ``[1, batch, 16]`` listed first counts its axis 1) or, where that is unknown, when the
      output has two or more axes.
   b. Sizes may differ between batches: sums are kept per index and grow as needed; an axis
      counts in the batches where it is a channel axis. An image-like map's sums are kept on
      both axes 1 and 3 until the last batch says which one is its channel axis (rule 3a).
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
   the reference does not (position by position: the same count elsewhere is no excuse) always
   fails, and its cosine and SNR are not judged (rule 8).
5. :func:`agreement` scores one output pair with the figure the gate uses (rules 3 and 4), for
   code that searches (quant's accuracy loop, tune).
6. The library returns a typed :class:`ValidationReport`; it never prints.
7. One model is in memory at a time: the reference runs over every batch first and its outputs
   go to temporary files (memory-mapped back), then it is freed and the candidate runs. Peak
   memory is the larger model plus one batch, so a multi-GB model can be checked against its
   optimized version on a machine that could not hold both. The temporary files go in a
   ``graphopt-validate-*`` folder under ``tmp_dir`` (default: the system's temporary folder,
   ``TMPDIR`` honoured), removed afterwards.
8. A comparison that did not happen never reads as a pass. Each :class:`OutputComparison` has a
   ``status``:

   - ``"error"``: no comparison was made. The candidate does not load or fails to run, lacks the
     output, or a session asked for on a provider (``cuda``) does not have it among its
     ``get_providers()`` (ONNX Runtime silently falls back to the CPU when CUDA cannot start).
     Its check is marked ``error`` (a JUnit ``<error>``).
   - ``"failed"``: the candidate ran but misses a criterion: a shape mismatch, NaN/Inf values
     the reference does not have, string outputs that differ, or a metric below its budget.
   - ``"passed"``: every check passed.

   ``reason`` joins the failed checks' messages. Every error figure (cosine, SNR, max/median
   absolute and relative error, the worst channel's, top-1/top-5) is None unless every element
   was compared: after an error, a shape mismatch, on non-numeric outputs, and where the
   candidate has new NaN/Inf values. In that last case the figures over the finite positions
   are the detail of the ``finite`` check, and cosine and SNR are not judged. Search code that
   needs a number (:attr:`OutputComparison.agreement`) reads such a comparison as the worst
   agreement (cosine -1, SNR -inf), or as perfect when it passed (equal string outputs).
9. Padding: when the feeds name a mask input (``Feeds.mask_input``), an output laid out
   [batch, sequence, …] (or sequence-first, or flattened; decided per output as calibration
   does, :mod:`graphopt.data.masking` rule 4) is compared at its valid positions only, as
   ``[valid, …]`` with the valid positions as its samples: what a padded position holds is
   not used by anyone, and calibration does not fit it. Other outputs are compared whole.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from graphopt.data.feeds import ANONYMOUS_DIMS, Feeds, InputSpec, batch_axes
from graphopt.data.masking import Layout, LayoutDecision, RunMask, run_mask
from graphopt.errors import InputError
from graphopt.ir.ort import PROVIDER_NAMES, make_session, node_placement
from graphopt.settings import Settings

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
    min_snr_db: float = 15.0
    """The defaults are ``quant``'s budget, what ``graphopt check`` applies when it is not told
    which passes made the candidate (:func:`graphopt.pipeline.budget_for`)."""
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
    error: bool = False
    """The check could not be made (rule 8): the candidate does not load or run, lacks the
    output, or runs on another provider. Never passed; JUnit shows it as an ``<error>``."""


ERROR_CRITERIA = ("loads", "runs", "present", "provider")
"""Criteria whose failure means the comparison did not happen (rule 8)."""


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
    cosine: float | None = None
    """Whole-tensor cosine; None when not every element was compared (rule 8), as for every
    figure below."""
    snr_db: float | None = None
    max_abs: float | None = None
    median_abs: float | None = None
    max_rel: float | None = None
    not_close: int = 0
    nan_reference: int = 0
    nan_candidate: int = 0
    inf_reference: int = 0
    inf_candidate: int = 0
    new_nan: int = 0
    """Positions where the candidate is NaN and the reference is not (rule 4)."""
    new_inf: int = 0
    """Positions where the candidate is ±Inf and the reference is not the same Inf (rule 4)."""
    top1: float | None = None
    top5: float | None = None
    worst_channel_cosine: float | None = None
    worst_channel: str = ""
    """Where the worst channel cosine is (``"axis 1 index 17"``); empty when no channel judged."""
    worst_channel_snr_db: float | None = None
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
        """The figures of rule 5 for this output. Without figures (rule 8): perfect agreement
        when the comparison passed (equal string outputs), else the worst (cosine -1, SNR
        -inf)."""
        if self.cosine is None or self.snr_db is None:
            if self.passed:
                return Agreement(1.0, math.inf, 1.0, "", math.inf, 1.0, math.inf)
            return Agreement(-1.0, -math.inf, -1.0, "", -math.inf, -1.0, -math.inf)
        channel_cosine = 1.0 if self.worst_channel_cosine is None else self.worst_channel_cosine
        channel_snr = math.inf if self.worst_channel_snr_db is None else self.worst_channel_snr_db
        return Agreement(
            cosine=self.cosine,
            snr_db=self.snr_db,
            worst_channel_cosine=channel_cosine,
            worst_channel=self.worst_channel,
            worst_channel_snr_db=channel_snr,
            score=min(self.cosine, channel_cosine),
            score_snr_db=min(self.snr_db, channel_snr),
        )

    @property
    def failures(self) -> list[str]:
        return [check.message for check in self.checks if not check.passed]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def status(self) -> str:
        """Rule 8: ``"error"``, ``"failed"`` or ``"passed"``."""
        if any(check.error for check in self.checks):
            return "error"
        return "passed" if self.passed else "failed"

    @property
    def reason(self) -> str:
        """Rule 8: why the comparison is not a pass (the failed checks' messages); empty when
        it passed."""
        return "; ".join(self.failures)

    def fail(self, criterion: str, message: str) -> None:
        """Record a structural failure: a shape mismatch, or (``criterion`` in
        :data:`ERROR_CRITERIA`) a comparison that did not happen (rule 8)."""
        if not any(c.criterion == criterion and c.message == message for c in self.checks):
            self.checks.append(Check(criterion, False, message, error=criterion in ERROR_CRITERIA))


@dataclass
class ValidationReport:
    """Everything a human table, a JSON report or a CI gate needs."""

    data: str
    synthetic: bool
    providers: list[str]
    criteria: Criteria
    comparisons: list[OutputComparison]
    samples: int = 0
    """Samples compared: each batch's :func:`sample_count` (1 for a batch without a batch
    axis), added up."""
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
        """Every field, and per comparison its ``status`` and ``reason`` (rule 8)."""
        result = json_safe(asdict(self))
        for row, comparison in zip(result["comparisons"], self.comparisons, strict=True):
            row["status"], row["reason"] = comparison.status, comparison.reason
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
    axes = _sized_axes(shape, samples)
    if len(shape) == 4:  # an image-like map: its spatial rows and columns are not channels
        channels = map_channel_axis({1: {shape[1]}, 3: {shape[3]}})
        axes = [axis for axis in axes if axis in (0, channels)]
    return axes


def _sized_axes(shape: Sequence[int], samples: int | None) -> list[int]:
    """Rule 3a without the image-map rule: axes of a channel's size, the samples axis left out."""
    axes = []
    for axis, size in enumerate(shape):
        if not CHANNEL_AXIS_MIN <= size <= CHANNEL_AXIS_MAX:
            continue
        if axis == 0 and (size == samples if samples is not None else len(shape) >= 2):
            continue
        axes.append(axis)
    return axes


def map_channel_axis(sizes: Mapping[int, Collection[int]]) -> int:
    """Rule 3a: the channel axis (1 or 3) of an image-like map whose axes 1 and 3 took
    ``sizes[1]`` and ``sizes[3]`` over the batches: the one whose size never changed while the
    other's did; otherwise 3 when its largest size is below axis 1's, else 1."""
    steady = [axis for axis in (1, 3) if len(set(sizes[axis])) == 1]
    if len(steady) == 1:
        return steady[0]
    return 3 if max(sizes[3]) < max(sizes[1]) else 1


class MetricAccumulator:
    """Running sums for one output on one provider (rules 2 and 3)."""

    def __init__(self, name: str, provider: str, criteria: Criteria, seed: int) -> None:
        self.result = OutputComparison(output=name, provider=provider)
        self.criteria = criteria
        self.dot = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.err_sq = 0.0
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.finite = 0
        """Elements finite on both sides: those the figures are computed over."""
        self.non_numeric = False
        self.channels: dict[int, _ChannelSums] = {}
        self.sliced: list[int] = []
        """Axes with channel sums, in the order they first appeared (rule 3a)."""
        self.map_sizes: dict[int, set[int]] = {}
        """An image-like map's sizes of axes 1 and 3 over the batches (rule 3a)."""
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
            self.non_numeric = True
            equal = np.array_equal(reference, candidate)
            result.elements += reference.size
            result.not_close += 0 if equal else reference.size
            return
        shape = tuple(int(size) for size in reference.shape)
        axes = self._axes_to_slice(shape, samples)
        self.sliced += [axis for axis in axes if axis not in self.sliced]
        flat_ref, flat_cand = reference.reshape(-1), candidate.reshape(-1)
        for start in range(0, flat_ref.size, _METRIC_CHUNK):  # small float64 copies
            stop = start + _METRIC_CHUNK
            self._add_values(flat_ref[start:stop], flat_cand[start:stop])
            if axes:
                self._add_channels(flat_ref[start:stop], flat_cand[start:stop], start, shape, axes)
        if self.logit_like and reference.ndim >= 2 and reference.shape[-1] >= 2:
            self._topk(reference, candidate)

    def _axes_to_slice(self, shape: tuple[int, ...], samples: int | None) -> list[int]:
        """Rule 3a and 3b: the channel axes of this batch; for an image-like map both axes 1
        and 3, whose sizes are recorded, until :meth:`finish` knows its channel axis."""
        if len(shape) != 4:
            return channel_axes(shape, samples)
        for axis in (1, 3):
            self.map_sizes.setdefault(axis, set()).add(shape[axis])
        return [axis for axis in _sized_axes(shape, samples) if axis in (0, 1, 3)]

    def _channel_axes(self) -> list[int]:
        """Rule 3a: the axes sliced into channels over all batches, in order of appearance."""
        if not self.map_sizes:
            return list(self.sliced)
        channels = map_channel_axis(self.map_sizes)
        return [axis for axis in self.sliced if axis in (0, channels)]

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
        result.new_nan += int((np.isnan(cand) & ~np.isnan(ref)).sum())
        result.new_inf += int((np.isinf(cand) & (cand != ref)).sum())
        finite = np.isfinite(ref) & np.isfinite(cand)
        ref_f, cand_f = ref[finite], cand[finite]
        self.finite += ref_f.size
        diff = np.abs(ref_f - cand_f)
        self.dot += float(ref_f @ cand_f)
        self.ref_sq += float(ref_f @ ref_f)
        self.cand_sq += float(cand_f @ cand_f)
        self.err_sq += float(diff @ diff)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            rel = diff / np.maximum(np.abs(ref_f), _NEAR_ZERO)
            self.max_rel = max(self.max_rel, float(rel.max()))
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
        """The figures and the checks (rules 3, 4 and 8)."""
        result = self.result
        if result.checks:  # an error or a shape mismatch while adding: nothing to judge on
            return result
        if self.non_numeric:
            differ = result.not_close
            message = (
                f"{differ} of {result.elements} elements differ"
                if differ
                else f"all {result.elements} elements equal"
            )
            result.checks.append(Check("equal", differ == 0, message, float(differ), 0.0))
            return result
        self._set_figures()
        self._finish_channels()
        if result.new_nan or result.new_inf:
            self._fail_non_finite()
            return result
        result.checks.append(Check("finite", True, "no new NaN/Inf", 0.0, 0.0))
        self._judge()
        return result

    def _set_figures(self) -> None:
        """Rule 2's whole-tensor figures, over the positions finite on both sides."""
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
        else:
            result.snr_db = math.inf
        result.max_abs, result.max_rel = self.max_abs, self.max_rel
        result.median_abs = (
            float(np.median(np.concatenate(self.abs_samples))) if self.abs_samples else 0.0
        )
        if self.rows:
            result.top1 = self.top1_hits / self.rows
            result.top5 = self.top5_hits / self.rows

    def _fail_non_finite(self) -> None:
        """Rules 4 and 8: new NaN/Inf fail; the figures over the finite positions become the
        check's detail, not figures of the output, and cosine and SNR are not judged."""
        result = self.result
        problems = []
        if result.new_nan:
            problems.append(f"{result.new_nan} NaN values the reference does not have")
        if result.new_inf:
            problems.append(f"{result.new_inf} Inf values the reference does not have")
        detail = f"over the {self.finite} finite positions only: " + _figures_detail(
            result, self.criteria.per_channel
        )
        result.checks.append(
            Check(
                "finite",
                False,
                "; ".join(problems),
                float(result.new_nan + result.new_inf),
                0.0,
                detail,
            )
        )
        result.cosine = result.snr_db = None
        result.max_abs = result.median_abs = result.max_rel = None
        result.top1 = result.top5 = None
        result.worst_channel_cosine = result.worst_channel_snr_db = None
        result.worst_channel = result.worst_snr_channel = ""

    def _finish_channels(self) -> None:
        """Rule 3d: the worst channel cosine and SNR over every channel axis, and where."""
        result = self.result
        result.channel_axes = self._channel_axes()
        for axis in sorted(axis for axis in result.channel_axes if axis in self.channels):
            cosine, snr, judged = self.channels[axis].figures()
            result.channels += int(judged.size)
            if not judged.size:
                continue
            worst = int(np.argmin(cosine))
            if result.worst_channel_cosine is None or cosine[worst] < result.worst_channel_cosine:
                result.worst_channel_cosine = float(cosine[worst])
                result.worst_channel = f"axis {axis} index {int(judged[worst])}"
            worst = int(np.argmin(snr))
            if result.worst_channel_snr_db is None or snr[worst] < result.worst_channel_snr_db:
                result.worst_channel_snr_db = float(snr[worst])
                result.worst_snr_channel = f"axis {axis} index {int(judged[worst])}"

    def _judge(self) -> None:
        """Rule 4 on an output whose every element was compared."""
        result, criteria = self.result, self.criteria
        if criteria.exact:
            result.checks.append(
                Check(
                    "exact",
                    result.not_close == 0,
                    f"{result.not_close} of {result.elements} elements differ by more than "
                    f"atol {criteria.atol:g} + rtol {criteria.rtol:g}·|ref| "
                    f"(max abs {self.max_abs:.3g})",
                    float(result.not_close),
                    0.0,
                )
            )
            return
        assert result.cosine is not None and result.snr_db is not None  # set by _set_figures
        cosine, cosine_at = result.cosine, ""
        snr, snr_at = result.snr_db, ""
        if criteria.per_channel:
            channel_cosine, channel_snr = result.worst_channel_cosine, result.worst_channel_snr_db
            if channel_cosine is not None and channel_cosine < cosine:
                cosine, cosine_at = channel_cosine, result.worst_channel
            if channel_snr is not None and channel_snr < snr:
                snr, snr_at = channel_snr, result.worst_snr_channel
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


def sample_count(
    feed: Mapping[str, np.ndarray], axes: Mapping[str, int | None] | None = None
) -> int | None:
    """Rule 3a: the batch's sample count: the size of the batch axis of the first input that
    has one. ``axes``: each input's batch axis (:func:`input_batch_axes`, feeds rule 8); None
    takes axis 0 of every input with an axis. None when no input has a batch axis."""
    for name, value in feed.items():
        axis = 0 if axes is None else axes.get(name, 0)
        if axis is not None and np.ndim(value) > axis:
            return int(np.shape(value)[axis])
    return None


class PaddingFilter:
    """Rule 9: outputs at valid positions only, when the feeds name a mask input."""

    def __init__(self, mask_input: str | None) -> None:
        self.mask_input = mask_input
        self.decisions: dict[str, LayoutDecision] = {}

    def mask_of(self, feed: Mapping[str, np.ndarray]) -> RunMask | None:
        return run_mask(feed, self.mask_input)

    def kept(
        self,
        name: str,
        mask: RunMask | None,
        reference: np.ndarray,
        candidate: np.ndarray,
        samples: int | None,
    ) -> tuple[np.ndarray, np.ndarray, int | None]:
        """Both values at the valid positions (and their count as the samples), or whole."""
        if mask is None or reference.shape != candidate.shape:
            return reference, candidate, samples
        decision = self.decisions.setdefault(name, LayoutDecision())
        kept = decision.apply(mask, reference, None)
        if not kept.dropped:
            return reference, candidate, samples
        other = mask.select(candidate, cast(Layout, decision.decided), None).value
        return kept.value, other, int(kept.value.shape[0])


def input_batch_axes(session: Any) -> dict[str, int | None]:
    """Each input's batch axis (rule 8 of :mod:`graphopt.data.feeds`) from the shapes an ONNX
    Runtime session declares for its model's inputs."""
    specs = [
        InputSpec(
            arg.name,
            _numpy_dtype(arg.type),
            None if arg.shape is None else tuple(_declared_dim(dim) for dim in arg.shape),
        )
        for arg in session.get_inputs()
    ]
    return batch_axes(specs)


def _declared_dim(dim: object) -> int | str | None:
    """A declared dimension as :class:`~graphopt.data.feeds.InputSpec` holds it: a size, a
    symbol, or None for an unknown or anonymous one."""
    if isinstance(dim, int) and dim >= 0:
        return dim
    if isinstance(dim, str) and dim and dim not in ANONYMOUS_DIMS:
        return dim
    return None


def _numpy_dtype(ort_type: str) -> np.dtype:
    """numpy's dtype for ONNX Runtime's ``tensor(float)``; object for what numpy lacks."""
    name = ort_type.removeprefix("tensor(").removesuffix(")").upper()
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(name)))
    except (KeyError, TypeError, ValueError):
        return np.dtype(object)


class _ReferenceOutputs:
    """The reference's outputs of every batch, kept in ``.npy`` files (rule 7)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.objects: set[tuple[int, int]] = set()
        """(batch, position) of outputs held as Python objects (strings): not memory-mapped."""

    def save(self, batch: int, outputs: Sequence[np.ndarray]) -> None:
        for position, value in enumerate(outputs):
            array = np.asarray(value)
            if array.dtype.hasobject:
                self.objects.add((batch, position))
            np.save(self.folder / f"{batch}_{position}.npy", array)

    def load(self, batch: int, positions: Sequence[int]) -> list[np.ndarray]:
        return [self._load(batch, position) for position in positions]

    def _load(self, batch: int, position: int) -> np.ndarray:
        path = self.folder / f"{batch}_{position}.npy"
        if (batch, position) in self.objects:  # a file this object wrote, in its own folder
            return np.load(path, allow_pickle=True)
        return np.load(path, mmap_mode="r")


def _provider_problem(session: Any, provider: str, which: str) -> str | None:
    """Rule 8: why ``session`` (the ``which`` model's) does not run on ``provider``, or None."""
    wanted = PROVIDER_NAMES[provider]
    actual = list(session.get_providers())
    if wanted in actual:
        return None
    return f"{wanted} requested but the {which} session runs on {', '.join(actual)} only"


def _errors(
    names: Sequence[str], provider: str, criterion: str, message: str
) -> list[OutputComparison]:
    """Rule 8: one errored comparison per output name."""
    rows = []
    for name in names:
        row = OutputComparison(output=name, provider=provider)
        row.fail(criterion, message)
        rows.append(row)
    return rows


def _run_reference(
    reference: ModelSource,
    provider: str,
    feeds: Feeds,
    stored: _ReferenceOutputs,
    settings: Settings,
) -> tuple[list[str], dict[str, int | None], str | None]:
    """Run the reference over every batch, store its outputs, free it.

    Returns the output names, each input's batch axis (rule 3a) and why it did not run on
    ``provider`` (rule 8), if so; then nothing ran.
    """
    try:
        session = _session(reference, provider, settings)
    except Exception as error:  # onnxruntime's own exception types
        raise InputError(
            f"the reference model does not load in onnxruntime ({provider}): {_first_line(error)}"
        ) from error
    names = [o.name for o in session.get_outputs()]
    axes = input_batch_axes(session)
    problem = _provider_problem(session, provider, "reference")
    for batch_index, feed in enumerate([] if problem else feeds):
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
    return names, axes, problem


def _session(model: ModelSource, provider: str, settings: Settings) -> Any:
    """A validation session: the settings' ONNX Runtime level (default: rewrites off) and
    threads, the same for both models."""
    return make_session(
        model, provider, optimize=settings.validation_ort_level, threads=settings.threads
    )


def _temporary_folder(tmp_dir: str | os.PathLike[str] | None) -> tempfile.TemporaryDirectory[str]:
    """Rule 7's folder for the reference outputs, under ``tmp_dir`` (None: the system's)."""
    try:
        return tempfile.TemporaryDirectory(prefix="graphopt-validate-", dir=tmp_dir)
    except OSError as error:
        where = tempfile.gettempdir() if tmp_dir is None else os.fspath(tmp_dir)
        raise InputError(
            f"cannot create a temporary folder in '{where}': {error.strerror or error}"
        ) from error


@dataclass
class _ProviderRun:
    """What one provider's comparison gives back to :func:`compare_models`."""

    comparisons: list[OutputComparison]
    samples: int = 0
    """Samples compared: each batch's :func:`sample_count` (1 for a batch without a batch
    axis), added up."""
    candidate_ran: bool = False


def _compare_on(
    reference: ModelSource,
    candidate: ModelSource,
    feeds: Feeds,
    provider: str,
    criteria: Criteria,
    stored: _ReferenceOutputs,
    on_batch: Callable[[int], None] | None,
    seed: int,
    settings: Settings,
) -> _ProviderRun:
    """Both models on one provider, the reference's outputs kept in ``stored`` (rules 1, 7, 8)."""
    ref_names, axes, problem = _run_reference(reference, provider, feeds, stored, settings)
    if problem:
        return _ProviderRun(_errors(ref_names, provider, "provider", problem))
    try:
        cand_session = _session(candidate, provider, settings)
    except Exception as error:  # onnxruntime's own exception types
        message = f"candidate does not load in onnxruntime: {_first_line(error)}"
        return _ProviderRun(_errors(ref_names, provider, "loads", message))
    problem = _provider_problem(cand_session, provider, "candidate")
    if problem:
        return _ProviderRun(_errors(ref_names, provider, "provider", problem))
    cand_names = {o.name for o in cand_session.get_outputs()}
    common = [name for name in ref_names if name in cand_names]
    positions = [ref_names.index(name) for name in common]
    accumulators = {name: MetricAccumulator(name, provider, criteria, seed) for name in common}
    padding = PaddingFilter(getattr(feeds, "mask_input", None))
    run = _ProviderRun([], candidate_ran=bool(common))
    for batch_index, feed in enumerate(feeds if common else []):
        try:
            cand_out = cand_session.run(common, feed)
        except Exception as error:
            for name in common:
                accumulators[name].result.fail(
                    "runs", f"candidate fails to run: {_first_line(error)}"
                )
            run.candidate_ran = False
            break
        ref_out = stored.load(batch_index, positions)
        batch_samples = sample_count(feed, axes)
        mask = padding.mask_of(feed)
        for name, ref_value, cand_value in zip(common, ref_out, cand_out, strict=True):
            ref_kept, cand_kept, samples = padding.kept(
                name, mask, np.asarray(ref_value), np.asarray(cand_value), batch_samples
            )
            accumulators[name].add(ref_kept, cand_kept, samples=samples)
        del ref_out, cand_out
        run.samples += 1 if batch_samples is None else batch_samples
        if on_batch is not None:
            on_batch(batch_index)
    del cand_session
    for name in ref_names:
        if name in accumulators:
            run.comparisons.append(accumulators[name].finish())
        else:
            run.comparisons += _errors(
                [name], provider, "present", "output missing from the candidate"
            )
    return run


def compare_models(
    reference: ModelSource,
    candidate: ModelSource,
    feeds: Feeds,
    *,
    providers: Sequence[str] = ("cpu",),
    criteria: Criteria | None = None,
    on_batch: Callable[[int], None] | None = None,
    seed: int = 0,
    tmp_dir: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
) -> ValidationReport:
    """Run both models on ``feeds`` on each provider and judge the candidate (module rules).

    ``tmp_dir``: where the reference outputs' temporary folder goes (rule 7); None for
    ``settings.tmp_dir`` (None there too: the system's temporary folder). A folder that cannot
    be created there is an InputError. ``settings``: ONNX Runtime level and threads of both
    sessions (:class:`~graphopt.settings.Settings`); None reads ``GRAPHOPT_*``.
    """
    settings = Settings.from_env() if settings is None else settings
    tmp_dir = settings.tmp_dir if tmp_dir is None else tmp_dir
    criteria = criteria or Criteria()
    comparisons: list[OutputComparison] = []
    placement: dict[str, dict[str, list[str]]] = {}
    samples = 0
    for provider in providers:
        with _temporary_folder(tmp_dir) as folder:
            run = _compare_on(
                reference,
                candidate,
                feeds,
                provider,
                criteria,
                _ReferenceOutputs(Path(folder)),
                on_batch,
                seed,
                settings,
            )
        comparisons += run.comparisons
        samples = max(samples, run.samples)
        if provider != "cpu" and run.candidate_ran:
            placement[provider] = node_placement(candidate, provider, next(iter(feeds)))
    return ValidationReport(
        data=feeds.description,
        synthetic=feeds.synthetic,
        providers=list(providers),
        criteria=criteria,
        comparisons=comparisons,
        samples=samples,
        placement=placement,
    )
