"""Held-aside scoring: the split of the batches and the bisection of a compression level."""

from __future__ import annotations

import numpy as np
import pytest

from graphopt.check.heldout import hold_aside, strongest_level
from graphopt.data.feeds import InputSpec, open_data


@pytest.mark.parametrize(
    ("strongest", "gentlest", "expected"),
    [(0.9, 0.05, 0.6), (0.1, 0.95, 0.4)],  # a sparsity grows, a kept ratio shrinks
)
def test_strongest_level_bisects_toward_the_last_passing_level(
    strongest: float, gentlest: float, expected: float
) -> None:
    def score_of(level: float) -> float:  # passes up to 0.6 sparsity / down to 0.4 ratio
        strength = level if strongest > gentlest else 1.0 - level
        return 1.0 - strength

    limit = 0.4
    level, tried = strongest_level(score_of, limit, gentlest, strongest, steps=8)
    assert tried[0][0] == strongest and tried[1][0] == gentlest
    assert level is not None and level == pytest.approx(expected, abs=0.01)
    assert score_of(level) >= limit
    assert len(tried) == 10


def test_strongest_level_stops_at_either_end() -> None:
    level, tried = strongest_level(lambda level: 1.0, 0.99, 0.05, 0.5, steps=4)
    assert level == 0.5 and len(tried) == 1
    level, tried = strongest_level(lambda level: 0.0, 0.99, 0.05, 0.5, steps=4)
    assert level is None and [t[0] for t in tried] == [0.5, 0.05]


def test_hold_aside_keeps_the_last_quarter_of_the_batches() -> None:
    specs = [InputSpec("x", np.dtype(np.float32), (None, 2))]
    batches = [{"x": np.full((1, 2), index, np.float32)} for index in range(8)]
    calibration, held = hold_aside(open_data(batches, specs), "test")
    assert [int(f["x"][0, 0]) for f in calibration] == [0, 1, 2, 3, 4, 5]
    assert [int(f["x"][0, 0]) for f in held] == [6, 7]
    few = open_data(batches[:3], specs)
    calibration, held = hold_aside(few, "test")
    assert sum(1 for _ in held) == 3 and sum(1 for _ in calibration) == 3
