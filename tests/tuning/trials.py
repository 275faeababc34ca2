"""Trials built by hand, for tests of tune's choice between measured candidates."""

from __future__ import annotations

from graphopt.tuning.cache import Evaluation, LatencyRecord
from graphopt.tuning.search import Candidate, Trial


def timed_trial(index: int, ratio: float, size: int, lossy: tuple[str, ...]) -> Trial:
    """A sensitivity trial of ``cleanup`` plus ``lossy`` at min cosine 0.999, ``size`` bytes and
    latency ``ratio`` against the original."""
    candidate = Candidate(tuple(sorted(("cleanup", *lossy))), lossy, {})
    evaluation = Evaluation(
        key=f"k{index}",
        passes=list(candidate.passes),
        options={},
        min_cosine=0.999,
        size_bytes=size,
        model_sha256=f"sha{index}",
    )
    latency = LatencyRecord(ratio, 10.0, 10.0 * ratio, 5)
    return Trial(index, "sensitivity", candidate, f"k{index}", evaluation, latency=latency)
