"""Latency of a candidate relative to its reference, measured side by side in one run.

Rules: both sessions use ONNX Runtime's full graph optimizations (what deployment runs); each is
warmed up first; then runs alternate in ABBA order (reference, candidate, candidate, reference …)
so drift in machine load hits both equally; the ratio is of medians. Intra-op thread spinning is
off: with it on, the idle session's spinning workers steal cores from the one being timed (on a
2-core machine MiniLM timed against itself read 0.81 with spinning, 1.00 without). The level of
graph optimizations and the thread count come from :class:`~graphopt.settings.Settings`
(``latency_ort_level``, default ``all``; ``threads``, default ONNX Runtime's).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from graphopt.check.validate import ModelSource
from graphopt.ir.ort import make_session
from graphopt.settings import Settings


@dataclass(frozen=True)
class LatencyComparison:
    provider: str
    runs: int
    reference_ms: float
    candidate_ms: float

    @property
    def ratio(self) -> float:
        """Candidate median over reference median: below 1 means the candidate is faster."""
        return self.candidate_ms / self.reference_ms if self.reference_ms > 0 else float("inf")


def measure_latency(
    reference: ModelSource,
    candidate: ModelSource,
    feed: Mapping[str, np.ndarray],
    *,
    provider: str = "cpu",
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    settings: Settings | None = None,
) -> LatencyComparison:
    """Median latency of both models on ``feed`` (module rules).

    ``settings``: None reads ``GRAPHOPT_*`` (:meth:`Settings.from_env`); ``threads``, when
    given, overrides ``settings.threads``.
    """
    settings = Settings.from_env() if settings is None else settings
    count = settings.threads if threads is None else threads
    level = settings.latency_ort_level
    sessions = [
        make_session(model, provider, optimize=level, threads=count, spinning=False)
        for model in (reference, candidate)
    ]
    inputs = dict(feed)
    for session in sessions:
        for _ in range(warmup):
            session.run(None, inputs)
    timings: list[list[float]] = [[], []]
    for index in range(runs):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for which in order:
            started = time.perf_counter()
            sessions[which].run(None, inputs)
            timings[which].append((time.perf_counter() - started) * 1000.0)
    return LatencyComparison(
        provider=provider,
        runs=runs,
        reference_ms=statistics.median(timings[0]),
        candidate_ms=statistics.median(timings[1]),
    )
