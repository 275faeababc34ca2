"""Numerical comparison of a candidate model against its reference on ONNX Runtime.

Rules:

1. Both models run on the same feeds, on each requested execution provider; outputs are matched
   by name. A missing output, or a shape or dtype mismatch, is a finding that fails the check,
   never a crash.
2. Metrics are accumulated batch by batch (running sums, not stored outputs): cosine similarity,
   SNR in dB = 20·log10(‖ref‖ / ‖ref − cand‖), max and median absolute error, max relative error,
   NaN/Inf counts of each side, the count of elements outside ``atol + rtol·|ref|`` and, for
   outputs that look like logits or scores, top-1 and top-5 agreement.
3. Criteria: an *exact* run (only exact passes) must have every element within
   ``atol + rtol·|ref|`` (defaults 1e-5 and 1e-4, as onnx-simplifier uses). A lossy run must meet
   ``min_cosine``, ``min_snr_db`` and, where given and applicable, ``min_top1``. A candidate that
   produces NaN or Inf where the reference does not always fails.
4. The library returns a typed :class:`ValidationReport`; it never prints.
5. One model is in memory at a time: the reference runs over every batch first and its outputs
   go to temporary files (memory-mapped back), then it is freed and the candidate runs. Peak
   memory is the larger model plus one batch, so a multi-GB model can be checked against its
   optimized version on a machine that could not hold both.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
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
_LOGIT_WORDS = ("logit", "score", "prob", "class", "pred")
_NEAR_ZERO = 1e-12


@dataclass(frozen=True)
class Criteria:
    """What a candidate must meet; see rule 3."""

    exact: bool = False
    rtol: float = 1e-4
    atol: float = 1e-5
    min_cosine: float = 0.99
    min_snr_db: float = 20.0
    min_top1: float | None = None

    def describe(self) -> str:
        if self.exact:
            return f"exact: every element within atol {self.atol:g} + rtol {self.rtol:g}·|ref|"
        text = f"cosine ≥ {self.min_cosine:g}, SNR ≥ {self.min_snr_db:g} dB"
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


@dataclass
class OutputComparison:
    """Metrics of one output on one provider (rule 2) and the checks judged on them."""

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
    findings: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

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


class MetricAccumulator:
    """Running sums for one output on one provider (rule 2)."""

    def __init__(self, name: str, provider: str, criteria: Criteria, seed: int) -> None:
        self.result = OutputComparison(output=name, provider=provider)
        self.criteria = criteria
        self.dot = 0.0
        self.ref_sq = 0.0
        self.cand_sq = 0.0
        self.err_sq = 0.0
        self.abs_samples: list[np.ndarray] = []
        self.sampled = 0
        self.top1_hits = 0
        self.top5_hits = 0
        self.rows = 0
        self.logit_like = _looks_like_logits(name)
        self.rng = np.random.default_rng(seed)

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
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
        flat_ref, flat_cand = reference.reshape(-1), candidate.reshape(-1)
        for start in range(0, flat_ref.size, _METRIC_CHUNK):  # small float64 copies
            stop = start + _METRIC_CHUNK
            self._add_values(flat_ref[start:stop], flat_cand[start:stop])
        if self.logit_like and reference.ndim >= 2 and reference.shape[-1] >= 2:
            self._topk(reference, candidate)

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
        self._judge()
        return result

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
        result.checks.append(_at_least("cosine", "cosine", result.cosine, criteria.min_cosine))
        result.checks.append(
            _at_least("snr", "SNR", result.snr_db, criteria.min_snr_db, digits=2, unit=" dB")
        )
        if criteria.min_top1 is not None and result.top1 is not None:
            result.checks.append(
                _at_least("top1", "top-1", result.top1, criteria.min_top1, digits=4)
            )


def _at_least(
    criterion: str, label: str, value: float, minimum: float, *, digits: int = 6, unit: str = ""
) -> Check:
    """A check that ``value`` reaches ``minimum``; the message shows both when it does not."""
    shown = f"{label} {value:.{digits}f}{unit}"
    passed = value >= minimum
    message = shown if passed else f"{shown} < {minimum:g}{unit}"
    return Check(criterion, passed, message, value, minimum)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _looks_like_logits(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _LOGIT_WORDS)


ModelSource = str | os.PathLike[str] | onnx.ModelProto


class _ReferenceOutputs:
    """The reference's outputs of every batch, kept in ``.npy`` files (rule 5)."""

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
                for name, ref_value, cand_value in zip(common, ref_out, cand_out, strict=True):
                    accumulators[name].add(np.asarray(ref_value), np.asarray(cand_value))
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
