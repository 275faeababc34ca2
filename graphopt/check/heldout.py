"""Held-aside scores: how a lossy pass's variants compare with the model it received.

Rules:

1. :func:`hold_aside`: the last quarter of the calibration batches is held aside for scoring
   (when there are at least 4; with fewer, the scores reuse the calibration batches, logged).
2. :class:`HeldAsideScore` scores a variant of the model as the validation gate would: over
   the model's outputs, the lowest of each output's whole-tensor and worst-channel cosine on
   all held-aside feeds (:func:`graphopt.check.validate.agreement`), so a detector's collapsed
   score rows count, at valid positions only when the data has a padding mask (validation
   rule 9), with samples counted on each input's batch axis.
3. Scores are exact whatever the route: the reference model runs once, and a variant runs only
   where it differs from it, fed from the reference's cached activations
   (:mod:`graphopt.passkit.probe`), which gives the outputs a whole run gives, bit for bit.
4. :func:`strongest_level` finds the strongest level of a compression (a sparsity, a kept
   ratio) that still meets a score, by bisection; :func:`fit_to_target` runs it for a pass
   with one strength level and applies the level found.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.check.validate import Criteria, MetricAccumulator, PaddingFilter, sample_count
from graphopt.data.feeds import Feeds, batch_axes, input_specs
from graphopt.data.masking import RunMask
from graphopt.ir.model import Model
from graphopt.passkit.api import Pass, PassContext, PassResult, WeightClaims
from graphopt.passkit.probe import ProbeRunner

logger = logging.getLogger(__name__)

MIN_BATCHES_TO_SPLIT = 4


def hold_aside(feeds: Feeds, who: str) -> tuple[Feeds, Feeds]:
    """Rule 1: (calibration batches, held-aside batches); ``who`` names the caller in the log."""
    batches = sum(1 for _ in feeds)
    if batches < MIN_BATCHES_TO_SPLIT:
        logger.info("%s: only %d calibration batches; the accuracy check reuses them", who, batches)
        return feeds, feeds
    cut = batches - batches // 4
    return feeds.subset(range(cut)), feeds.subset(range(cut, batches))


class HeldAsideScore(contextlib.AbstractContextManager["HeldAsideScore"]):
    """Rules 2 and 3 against ``model`` (the reference) on ``feeds`` (the held-aside ones)."""

    def __init__(
        self, model: Model, feeds: Feeds, threads: int = 0, budget_bytes: int | None = None
    ) -> None:
        self.model = model
        self.runner = ProbeRunner(model, feeds, threads, budget_bytes)
        axes = batch_axes(input_specs(model.graph))
        self.padding = PaddingFilter(feeds.mask_input)
        self.samples: list[int | None] = []
        self.masks: list[RunMask | None] = []
        for feed in self.runner.feeds():
            self.samples.append(sample_count(feed, axes))
            self.masks.append(self.padding.mask_of(feed))

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the cached activations (their temporary file)."""
        self.runner.close()

    def prepare(self, variants: Iterable[gs.Graph]) -> None:
        """Cache the reference activations the variants read where they start to differ."""
        self.runner.prepare(variants)

    def score(self, variant: Model) -> float:
        """Rule 2's figure for ``variant`` (1.0 when the model has no outputs to compare)."""
        outputs = self.runner.outputs(variant)
        names = self.runner.output_names
        accumulators = [
            MetricAccumulator(str(index), "cpu", Criteria(), seed=0)
            for index in range(len(names) if self.runner.count else 0)
        ]
        for index, candidate_batch in enumerate(outputs):
            reference_batch = self.runner.reference(index)
            for name, accumulator, reference, candidate in zip(
                names, accumulators, reference_batch, candidate_batch, strict=True
            ):
                kept_reference, kept_candidate, samples = self.padding.kept(
                    name,
                    self.masks[index],
                    np.asarray(reference),
                    np.asarray(candidate),
                    self.samples[index],
                )
                accumulator.add(kept_reference, kept_candidate, samples=samples)
        return min((a.finish().agreement.score for a in accumulators), default=1.0)


def strongest_level(
    score_of: Callable[[float], float],
    target: float,
    gentlest: float,
    strongest: float,
    steps: int,
) -> tuple[float | None, list[tuple[float, float]]]:
    """Rule 4: the strongest compression level whose score meets ``target``, by bisection.

    Levels run from ``gentlest`` to ``strongest`` (either direction: a sparsity grows, a kept
    ratio shrinks); the score is assumed to fall as the level strengthens. ``strongest`` is
    tried first, then ``gentlest``, then ``steps`` halvings of the interval between the last
    level that met the target and the first that did not. Returns the level found (None when
    even ``gentlest`` misses the target) and every (level, score) tried, in order.
    """
    tried: list[tuple[float, float]] = []

    def meets(level: float) -> bool:
        score = score_of(level)
        tried.append((level, score))
        logger.info("held-aside score %.6f at level %g (target %g)", score, level, target)
        return score >= target

    if meets(strongest):
        return strongest, tried
    if not meets(gentlest):
        return None, tried
    passing, failing = gentlest, strongest
    for _ in range(steps):
        middle = (passing + failing) / 2
        if meets(middle):
            passing = middle
        else:
            failing = middle
    return passing, tried


@dataclass(frozen=True)
class LevelSearch:
    """What :func:`fit_to_target` found: the level (None: out of reach), every (level, score)
    tried, and the pass's result at that level on the model itself (None: left unchanged)."""

    level: float | None
    tried: list[tuple[float, float]]
    result: PassResult | None


def fit_to_target(
    model: Model,
    context: PassContext,
    who: str,
    build: Callable[[float], Pass],
    *,
    target: float,
    gentlest: float,
    strongest: float,
    steps: int,
) -> LevelSearch:
    """Rules 1 and 4 for a pass with one strength level: run ``build(level)`` on copies of the
    model calibrated on the kept batches, score each copy on the held-aside ones, and run the
    strongest passing level on ``model`` itself (with the run's weight claims)."""
    calibration, held_aside = hold_aside(context.require_feeds(who), who)

    def run(level: float, into: Model, claims: WeightClaims) -> PassResult:
        return build(level)(into, replace(context, data=calibration, claims=claims))

    settings = context.settings
    with HeldAsideScore(model, held_aside, settings.threads, settings.probe_cache_bytes) as scorer:

        def score_of(level: float) -> float:
            variant = replace(model, graph=model.graph.copy())
            return scorer.score(run(level, variant, WeightClaims()).model)

        level, tried = strongest_level(score_of, target, gentlest, strongest, steps)
    if level is None:
        logger.warning(
            "%s: even level %g scores %.6f on the held-aside batches, below the target %g; "
            "the model is left unchanged",
            who,
            gentlest,
            tried[-1][1],
            target,
        )
        return LevelSearch(None, tried, None)
    logger.info("%s: level %.4f meets the target %g", who, level, target)
    return LevelSearch(level, tried, run(level, model, context.claims))
