"""``graphopt tune``: search passes and options for the best model that meets an accuracy bar.

Rules:

1. The bar gates one statistic, the figure the validation gate judges: the smallest, over the
   model's outputs, of the lower of the output's whole-tensor cosine and its worst channel's
   cosine (:attr:`graphopt.check.validate.Agreement.score`; channels are slices along the small
   axes, :mod:`graphopt.check.validate` rule 3), each accumulated over all validation batches
   and measured against the input model on the validation data (``data``; the calibration data
   when none is given, said loudly). A candidate meets the bar when that statistic is at least
   ``min_cosine`` and it has no other failed check (missing output, shape mismatch, new NaN/Inf,
   does not load or run). Every other use of "cosine" below (closeness, predicted error,
   fronts) means this statistic. The statistic's definition (:data:`GATED_STATISTIC`) is part
   of every cache key, so results cached under another definition are never reused.
2. Search space: the exact passes among the requested ones are part of every candidate; each
   lossy pass is tried at the settings it declares next to its options (its ``search_space``, a
   :class:`graphopt.passkit.options.SearchSpace`, checked against its option schema; a pass
   declaring none is tried once at its defaults). This module names no pass and no option: a
   plugin is searched like a built-in pass. ``options`` (``-o``) fix values for every
   candidate and override the settings; options equal to a pass's default are dropped, and
   settings that become identical merge.
3. Stage 1, sensitivity: each lossy pass alone at each setting, round-robin over the passes so a
   small budget still sees every pass, settings not declared to improve the objective on their
   own (a :class:`~graphopt.passkit.options.SearchPoint`'s ``objectives``) last.
   When the budget is given, the first round spends at most half of it (but at least one trial
   per pass) on stage 1; later rounds continue stage 1 only when stage 2 has run dry.
4. Stage 2, combinations of one setting per pass over at least two passes, built from settings
   that were promising alone: they met the bar or came close (1 − cosine ≤ ``CLOSE_FACTOR`` ×
   (1 − bar)) and improved the objective alone. Errors are taken as additive (predicted
   1 − cosine = Σ of the parts); combinations predicted beyond ``COMBINE_LIMIT`` × (1 − bar) are
   not tried. Order: predicted to meet the bar first, then by predicted objective (product of
   the parts' size or latency ratios), predicted error, fewer passes, canonical text.
5. Budget = number of trials, cached ones included, so a rerun with the same arguments
   evaluates nothing and a larger budget evaluates only new candidates. ``time_limit``: no
   trial starts after it (running ones finish). With neither, the budget is ``DEFAULT_BUDGET``.
6. Evaluation runs in the executor (:mod:`graphopt.tuning.executor`), results are cached by content
   hash (:mod:`graphopt.tuning.cache`). Latency is never measured in workers: afterwards, in this
   process, one candidate at a time, interleaved against the original
   (:func:`graphopt.check.latency.measure_latency` on the first validation batch), cached per model
   content and machine. Measured: for objective ``latency`` every candidate meeting the bar and
   the promising stage-1 settings (stage 2 needs their ratios); for objective ``size`` the
   candidates meeting the bar on the size front and those tied at the smallest size.
7. Fronts: a candidate is on the accuracy-size (accuracy-latency) front when no other candidate
   and not the original has lower-or-equal error and size (latency) with one strictly lower.
   Candidates producing byte-identical models count once (the one with fewer passes).
8. Choice: among candidates meeting the bar, ``size`` takes the smallest file, ``latency`` the
   lowest latency ratio (ratios within ``LATENCY_TIE`` of the lowest count as tied); ties go to
   the other objective, then to fewer lossy passes, then to the canonical text. The chosen
   model must improve the objective over the original (smaller, or latency ratio below 1);
   otherwise nothing is chosen.
   Passes slow on the latency provider: with objective ``latency``, a candidate that includes a
   pass declaring the provider latency is measured on (:data:`LATENCY_PROVIDER`) in its search
   space's ``slow_on`` (ONNX Runtime's CPU provider runs most float16 ops through casts) is
   eligible only when its latency ratio beats the best candidate meeting the bar without such
   passes (or the original, 1.0, when that is faster) by more than ``LATENCY_TIE``: such a pass
   must earn its place on measured speed and never wins a latency tie on size. Each candidate
   left out is logged with its ratio and the one it had to beat.
9. Outputs in the folder: ``best.onnx`` (only when something was chosen; a stale one is
   removed otherwise), ``recipe.json`` (``graphopt optimize --recipe`` reproduces best.onnx
   byte for byte with the same calibration data and seed), ``front.md``, ``front.json``,
   ``front.png``, plus ``cache/``, ``trials.jsonl`` and the model files of front candidates in
   ``candidates/``. Every file is written atomically. Everything is seeded and sorted, so the
   same inputs give the same result whatever the executor and worker count.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt import __version__
from graphopt.check.latency import measure_latency
from graphopt.data.feeds import (
    Feeds,
    InputSpec,
    check_input_shapes,
    input_specs,
    open_checked,
    open_data,
    synthesize_runnable,
)
from graphopt.data.masking import resolve_mask_input
from graphopt.errors import InputError
from graphopt.ir.model import load_model, model_file_bytes
from graphopt.ir.normalize import infer_types
from graphopt.passkit.api import Pass
from graphopt.passkit.options import OBJECTIVES, resolve_options
from graphopt.passkit.options import SearchSpace as PassSearchSpace
from graphopt.passkit.registry import BUILTIN_PASSES, load_pass_class
from graphopt.pipeline import EventHook
from graphopt.settings import Settings
from graphopt.tuning.cache import (
    Evaluation,
    LatencyRecord,
    TuneCache,
    canonical_json,
    data_content_hash,
    external_data_files,
    machine_fingerprint,
    model_content_hash,
    sha256_text,
    write_text_atomic,
)
from graphopt.tuning.executor import (
    EvaluationTask,
    Executor,
    LocalProcessExecutor,
    SerialExecutor,
    default_workers,
    evaluate_task,
    remove_model,
)
from graphopt.tuning.report import canonical_json_pretty, short_value, write_reports

logger = logging.getLogger(__name__)


DEFAULT_BUDGET = 24
CLOSE_FACTOR = 2.0
COMBINE_LIMIT = 2.0
SIZE_GAIN = 0.995
"""A setting shrinks the model when its size ratio is below this."""
LATENCY_GAIN = 0.98
"""A setting speeds the model up when its latency ratio is below this."""
LATENCY_TIE = 0.02
LATENCY_PROVIDER = "cpu"
"""Where latency is measured (rule 6); rule 8 holds passes declared slow there to a margin."""
GATED_STATISTIC = "min over outputs of min(whole-tensor cosine, worst-channel cosine)"
"""Rule 1, as recorded in front.json and in every cache key."""


# --- search space -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One way to run one pass: its non-default options and what it is expected to improve."""

    pass_name: str
    options: dict[str, Any]
    helps: frozenset[str] = frozenset(OBJECTIVES)

    def label(self) -> str:
        return _describe_options(self.pass_name, self.options)


@dataclass(frozen=True, eq=False)
class Candidate:
    """A set of passes with their options: what one trial builds (canonical, rule 2)."""

    passes: tuple[str, ...]
    lossy: tuple[str, ...]
    options: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"passes": list(self.passes), "options": self.options}

    def canonical(self) -> str:
        return canonical_json(self.to_dict())

    def describe(self) -> str:
        return " + ".join(
            _describe_options(name, self.options.get(name, {})) for name in self.lossy
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and self.canonical() == other.canonical()

    def __hash__(self) -> int:
        return hash(self.canonical())


def _describe_options(pass_name: str, options: Mapping[str, Any]) -> str:
    if not options:
        return pass_name
    inner = ", ".join(f"{key}={short_value(value)}" for key, value in sorted(options.items()))
    return f"{pass_name}({inner})"


def declared_search(pass_class: type[Pass]) -> PassSearchSpace:
    """The search space a pass declares (rule 2), checked against its option schema.

    Raises InputError when the declaration is not a SearchSpace, or searches an option the pass
    does not declare or a value the option refuses (so a renamed option is never dropped).
    """
    declared = getattr(pass_class, "search_space", None)
    if declared is None:
        return PassSearchSpace()
    if not isinstance(declared, PassSearchSpace):
        raise InputError(
            f"pass '{pass_class.name}': search_space is a {type(declared).__name__}, "
            "not a graphopt SearchSpace"
        )
    declared.check(pass_class.name, pass_class.options_schema)
    return declared


def pass_settings(pass_class: type[Pass], min_cosine: float) -> list[Setting]:
    """The stage-1 settings of one lossy pass (rule 2), in its declared order."""
    return [
        Setting(pass_class.name, options, objectives)
        for options, objectives in declared_search(pass_class).resolve(min_cosine)
    ]


def _normalized(pass_class: type[Pass], given: Mapping[str, Any]) -> dict[str, Any]:
    """Resolved options minus those equal to the schema default (rule 2); raises OptionError."""
    resolved = resolve_options(pass_class.name, pass_class.options_schema, given)
    defaults = {option.name: option.default for option in pass_class.options_schema}
    return {key: value for key, value in sorted(resolved.items()) if value != defaults.get(key)}


@dataclass
class SearchSpace:
    """The passes of a search: exact ones in every candidate, settings for the lossy ones."""

    base: dict[str, dict[str, Any]]
    settings: dict[str, list[Setting]]

    @property
    def lossy(self) -> list[str]:
        return list(self.settings)

    def candidate(self, chosen: Sequence[Setting]) -> Candidate:
        options = {name: dict(values) for name, values in self.base.items() if values}
        for setting in chosen:
            if setting.options:
                options[setting.pass_name] = dict(setting.options)
        lossy = tuple(sorted(setting.pass_name for setting in chosen))
        passes = tuple(sorted([*self.base, *lossy]))
        return Candidate(passes, lossy, {name: options[name] for name in sorted(options)})


def build_search_space(
    pass_names: Sequence[str], min_cosine: float, fixed: Mapping[str, Mapping[str, Any]]
) -> SearchSpace:
    """Rule 2. Raises InputError for unknown passes or bad fixed options."""
    stray = sorted(set(fixed) - set(pass_names))
    if stray:
        raise InputError(f"options given for pass '{stray[0]}', which is not searched (--passes)")
    base: dict[str, dict[str, Any]] = {}
    settings: dict[str, list[Setting]] = {}
    for name in pass_names:
        pass_class = load_pass_class(name)
        fixed_options = dict(fixed.get(name, {}))
        pass_class(_normalized(pass_class, fixed_options))  # bad fixed options fail here, loudly
        if pass_class.exact:
            base[name] = _normalized(pass_class, fixed_options)
            continue
        unique: dict[str, Setting] = {}
        for setting in pass_settings(pass_class, min_cosine):
            merged = {**setting.options, **fixed_options}
            try:
                options = _normalized(pass_class, merged)
                pass_class(options)
            except InputError as error:
                logger.info("setting %s skipped: %s", setting.label(), error)
                continue
            unique.setdefault(canonical_json(options), Setting(name, options, setting.helps))
        settings[name] = list(unique.values())
    if not settings:
        raise InputError(
            "no lossy pass to search: --passes must name at least one of "
            + ", ".join(name for name in BUILTIN_PASSES if not load_pass_class(name).exact)
        )
    return SearchSpace(base, settings)


def sensitivity_order(space: SearchSpace, objective: str) -> list[tuple[Setting, Candidate]]:
    """Rule 3: round-robin over passes; settings not expected to help the objective last."""
    helpful = [[s for s in space.settings[name] if objective in s.helps] for name in space.lossy]
    others = [[s for s in space.settings[name] if objective not in s.helps] for name in space.lossy]
    ordered: list[Setting] = []
    for group in (helpful, others):
        for row in itertools.zip_longest(*group):
            ordered.extend(setting for setting in row if setting is not None)
    return [(setting, space.candidate([setting])) for setting in ordered]


# --- trials, fronts and the choice ---------------------------------------------------------------


@dataclass
class Trial:
    """One candidate of this search, its evaluation and (when measured) its latency."""

    index: int
    stage: str
    candidate: Candidate
    key: str
    evaluation: Evaluation | None = None
    cached: bool = False
    latency: LatencyRecord | None = None
    settings: tuple[Setting, ...] = ()
    predicted_error: float | None = None

    @property
    def cosine(self) -> float:
        return self.evaluation.min_cosine if self.evaluation else 0.0

    @property
    def ok(self) -> bool:
        return self.evaluation is not None and self.evaluation.ok

    def meets(self, min_cosine: float) -> bool:
        return self.ok and self.cosine >= min_cosine

    @property
    def latency_ratio(self) -> float | None:
        return self.latency.ratio if self.latency else None

    def to_dict(self, original_bytes: int, min_cosine: float) -> dict[str, Any]:
        evaluation = self.evaluation
        return {
            "index": self.index,
            "stage": self.stage,
            "key": self.key,
            "candidate": self.candidate.to_dict(),
            "lossy": list(self.candidate.lossy),
            "describe": self.candidate.describe(),
            "cached": self.cached,
            "meets_bar": self.meets(min_cosine),
            "size_ratio": evaluation.size_bytes / original_bytes if evaluation else None,
            "latency": None
            if self.latency is None
            else {
                "ratio": self.latency.ratio,
                "reference_ms": self.latency.reference_ms,
                "candidate_ms": self.latency.candidate_ms,
                "runs": self.latency.runs,
            },
            "predicted_error": self.predicted_error,
            "evaluation": evaluation.to_dict() if evaluation else None,
        }


def pareto_indices(vectors: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the vectors no other vector dominates (every coordinate is minimised)."""
    front = []
    for index, vector in enumerate(vectors):
        dominated = any(
            all(o <= v for o, v in zip(other, vector, strict=True))
            and any(o < v for o, v in zip(other, vector, strict=True))
            for other_index, other in enumerate(vectors)
            if other_index != index
        )
        if not dominated:
            front.append(index)
    return front


def _distinct(trials: Iterable[Trial]) -> list[Trial]:
    """Rule 7: one trial per distinct model (the first by :func:`_tiebreak`)."""
    best: dict[str, Trial] = {}
    for trial in sorted(trials, key=_tiebreak):
        assert trial.evaluation is not None
        best.setdefault(trial.evaluation.model_sha256 or trial.key, trial)
    return sorted(best.values(), key=lambda t: t.index)


def front_of(
    trials: Sequence[Trial], measure: Callable[[Trial], float | None], original: float
) -> list[Trial]:
    """Rule 7 for one measure (size in bytes, or latency ratio), sorted by that measure."""
    usable = [t for t in _distinct(t for t in trials if t.ok) if measure(t) is not None]
    vectors = [[1.0 - t.cosine, float(measure(t))] for t in usable]  # type: ignore[arg-type]
    vectors.append([0.0, original])
    chosen = [usable[i] for i in pareto_indices(vectors) if i < len(usable)]
    return sorted(chosen, key=lambda t: (float(measure(t)), 1.0 - t.cosine, t.index))  # type: ignore[arg-type]


def _size(trial: Trial) -> float | None:
    return float(trial.evaluation.size_bytes) if trial.evaluation else None


def _tiebreak(trial: Trial) -> tuple[int, int, str]:
    """Fewer lossy passes, then fewer explicit options, then the canonical text."""
    options = sum(len(values) for values in trial.candidate.options.values())
    return (len(trial.candidate.lossy), options, trial.candidate.canonical())


def choose(
    trials: Sequence[Trial],
    objective: str,
    min_cosine: float,
    original_bytes: int,
    *,
    latency_provider: str = LATENCY_PROVIDER,
) -> Trial | None:
    """Rule 8."""
    feasible = [t for t in trials if t.meets(min_cosine)]
    if objective == "latency":
        feasible = _without_slow_passes(feasible, latency_provider)
    if objective == "size":
        better = [t for t in feasible if t.evaluation and t.evaluation.size_bytes < original_bytes]
        if not better:
            return None
        return min(
            better,
            key=lambda t: (
                t.evaluation.size_bytes,  # type: ignore[union-attr]
                t.latency_ratio if t.latency_ratio is not None else math.inf,
                *_tiebreak(t),
            ),
        )
    faster = [t for t in feasible if t.latency_ratio is not None and t.latency_ratio < 1.0]
    if not faster:
        return None
    fastest = min(t.latency_ratio for t in faster)  # type: ignore[type-var]
    tied = [t for t in faster if t.latency_ratio <= fastest * (1.0 + LATENCY_TIE)]  # type: ignore[operator]
    return min(
        tied,
        key=lambda t: (
            t.evaluation.size_bytes,  # type: ignore[union-attr]
            t.latency_ratio,
            *_tiebreak(t),
        ),
    )


def _slow_passes(trials: Sequence[Trial], provider: str) -> list[str]:
    """The lossy passes of ``trials`` whose search space declares them slow on ``provider``."""
    names = sorted({name for trial in trials for name in trial.candidate.lossy})
    return [name for name in names if provider in declared_search(load_pass_class(name)).slow_on]


def _without_slow_passes(feasible: Sequence[Trial], provider: str) -> list[Trial]:
    """Rule 8: drop candidates with a pass slow on ``provider`` that are not clearly faster
    than the best candidate without such passes."""
    slow = _slow_passes(feasible, provider)
    if not slow:
        return list(feasible)
    plain = [
        t.latency_ratio
        for t in feasible
        if not set(slow) & set(t.candidate.lossy) and t.latency_ratio is not None
    ]
    to_beat = min([1.0, *plain])
    kept = []
    for trial in feasible:
        ratio = trial.latency_ratio
        included = [name for name in slow if name in trial.candidate.lossy]
        if included and ratio is not None:
            if ratio * (1.0 + LATENCY_TIE) >= to_beat:
                names = " + ".join(included)
                logger.info(
                    "not choosing %s: %s on the %s provider is not measured faster "
                    "(latency %.3f× vs %.3f× without %s, tie margin %g)",
                    trial.candidate.describe(),
                    names,
                    provider.upper(),
                    ratio,
                    to_beat,
                    names,
                    LATENCY_TIE,
                )
                continue
        kept.append(trial)
    return kept


# --- stage 2 -------------------------------------------------------------------------------------


def combinations(
    singles: Mapping[str, Sequence[tuple[Setting, Trial]]],
    objective: str,
    min_cosine: float,
    original_bytes: int,
) -> list[tuple[tuple[Setting, ...], float]]:
    """Rule 4: promising settings, one per pass, over ≥ 2 passes, most promising first.

    Settings of one pass that produced byte-identical models count once (the simplest).

    ``singles`` maps a pass to its evaluated stage-1 (setting, trial) pairs; returns the
    settings of each combination with its predicted error (1 − cosine).
    """
    slack = max(1.0 - min_cosine, 0.0)
    parts: dict[str, list[tuple[Setting, float, float]]] = {}
    for pass_name, pairs in singles.items():
        usable = []
        models: set[str] = set()
        for setting, trial in sorted(pairs, key=lambda pair: _tiebreak(pair[1])):
            if not trial.ok or trial.evaluation is None:
                continue
            if trial.evaluation.model_sha256 in models:
                continue  # the same model as a simpler setting of this pass
            models.add(trial.evaluation.model_sha256)
            error = max(1.0 - trial.cosine, 0.0)
            if error > CLOSE_FACTOR * slack:
                continue
            ratio = _objective_ratio(trial, objective, original_bytes)
            gain_limit = SIZE_GAIN if objective == "size" else LATENCY_GAIN
            if ratio is None or ratio >= gain_limit:
                continue
            usable.append((setting, error, ratio))
        if usable:
            parts[pass_name] = usable
    ranked: list[tuple[tuple[Any, ...], tuple[Setting, ...], float]] = []
    names = sorted(parts)
    for count in range(2, len(names) + 1):
        for subset in itertools.combinations(names, count):
            for choice in itertools.product(*(parts[name] for name in subset)):
                error = sum(part[1] for part in choice)
                if error > COMBINE_LIMIT * slack:
                    continue
                ratio = math.prod(part[2] for part in choice)
                settings = tuple(part[0] for part in choice)
                labels = canonical_json([[s.pass_name, s.options] for s in settings])
                rank = (error > slack, ratio, error, count, labels)
                ranked.append((rank, settings, error))
    ranked.sort(key=lambda item: item[0])
    return [(settings, error) for _, settings, error in ranked]


def _objective_ratio(trial: Trial, objective: str, original_bytes: int) -> float | None:
    if trial.evaluation is None:
        return None
    if objective == "size":
        return trial.evaluation.size_bytes / original_bytes
    return trial.latency_ratio


# --- the search ----------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What :func:`tune` found and wrote (see the module rules)."""

    input: str
    out_dir: str
    objective: str
    min_cosine: float
    original_bytes: int
    calibration_data: str
    validation_data: str
    validation_is_calibration: bool
    trials: list[Trial]
    size_front: list[Trial]
    latency_front: list[Trial]
    chosen: Trial | None
    evaluated: int
    cached: int
    workers: int
    seconds: float
    search_seconds: float
    latency_seconds: float
    message: str
    stopped: str = ""
    """Why the search ended: budget reached, time limit reached or search space exhausted."""
    seed: int = 0
    batch_size: int | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    def to_dict(self) -> dict[str, Any]:
        def rows(trials: Sequence[Trial]) -> list[dict[str, Any]]:
            return [t.to_dict(self.original_bytes, self.min_cosine) for t in trials]

        return {
            "input": self.input,
            "out_dir": self.out_dir,
            "objective": self.objective,
            "min_cosine": self.min_cosine,
            "gated_statistic": GATED_STATISTIC,
            "original_bytes": self.original_bytes,
            "calibration_data": self.calibration_data,
            "validation_data": self.validation_data,
            "validation_is_calibration": self.validation_is_calibration,
            "chosen": None
            if self.chosen is None
            else self.chosen.to_dict(self.original_bytes, self.min_cosine),
            "message": self.message,
            "stopped": self.stopped,
            "size_front": rows(self.size_front),
            "latency_front": rows(self.latency_front),
            "trials": rows(self.trials),
            "evaluated": self.evaluated,
            "cached": self.cached,
            "workers": self.workers,
            "seconds": {
                "total": self.seconds,
                "search": self.search_seconds,
                "latency": self.latency_seconds,
            },
            "graphopt": __version__,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "files": self.files,
        }


DataSource = str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | Any


def tune(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    calib_data: DataSource | None = None,
    data: DataSource | None = None,
    objective: str = "size",
    min_cosine: float = 0.99,
    budget: int | None = None,
    time_limit: float | None = None,
    passes: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    workers: int | None = None,
    executor: Executor | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    latency_runs: int = 20,
    on_event: EventHook | None = None,
    settings: Settings | None = None,
    mask_input: str | bool | None = None,
) -> TuneResult:
    """Search, evaluate, choose and write the outputs (module rules). Raises InputError on bad
    input; returns a result whose ``chosen`` is None when nothing meets the bar.

    Without ``calib_data`` the calibration data is synthesized (seeded, with a warning; its
    shapes fixed by ``input_shapes`` where given, see
    :func:`graphopt.data.feeds.synthesize_runnable`) and written to ``data/calibration`` in the
    output folder like any non-path source.

    ``workers``: processes for evaluation (default:
    :func:`graphopt.tuning.executor.default_workers`; 0 evaluates in this process).
    ``executor`` overrides it (e.g. a distributed engine). Worker processes are spawned, so a
    script calling this needs the usual ``if __name__ == "__main__":`` guard.

    ``settings`` (:class:`~graphopt.settings.Settings`; None reads ``GRAPHOPT_*``) reach every
    candidate's build and validation and the latency measurements; the fields that change a
    result (the ONNX Runtime levels) are part of the cache keys.

    ``mask_input``: the calibration data's padding mask (:func:`graphopt.optimize`: None finds
    an attention mask, False turns masking off); checked before the search, part of the cache
    keys, and written to ``recipe.json`` when given.
    """
    settings = Settings.from_env() if settings is None else settings
    started = time.perf_counter()
    emit = on_event or (lambda _kind, _info: None)
    _check_arguments(objective, min_cosine, budget, time_limit, workers, latency_runs)
    inputs = _prepare(
        model,
        out_dir,
        calib_data,
        data,
        passes,
        options,
        min_cosine,
        batch_size,
        seed=seed,
        input_shapes=input_shapes,
        mask_input=mask_input,
    )
    context = {
        **inputs.hashes,
        "batch_size": batch_size,
        "seed": seed,
        "graphopt": __version__,
        "gated_statistic": GATED_STATISTIC,
        **_non_default(settings, "validation_ort_level"),
        # padding statistics changed with masking: results from before it are stale
        "calibration_mask": "auto" if mask_input is None else mask_input,
    }
    cache = TuneCache(inputs.folder)
    owned = executor is None
    if executor is None:
        count = default_workers(inputs.original_bytes) if workers is None else workers
        executor = SerialExecutor() if count == 0 else LocalProcessExecutor(count)
    emit(
        "start",
        {
            "workers": executor.capacity,
            "lossy": inputs.space.lossy,
            "base": list(inputs.space.base),
            "validation_is_calibration": inputs.validation_is_calibration,
            "validation_data": str(inputs.validation_path),
        },
    )
    search = _Search(
        source=inputs.source,
        space=inputs.space,
        objective=objective,
        min_cosine=min_cosine,
        budget=budget if budget is not None else (None if time_limit else DEFAULT_BUDGET),
        deadline=None if time_limit is None else time.monotonic() + time_limit,
        cache=cache,
        executor=executor,
        context=context,
        calib_path=inputs.calib_path,
        validation_path=inputs.validation_path,
        candidates_dir=inputs.folder / "candidates",
        seed=seed,
        batch_size=batch_size,
        original_bytes=inputs.original_bytes,
        emit=emit,
        settings=settings,
        mask_input=mask_input,
    )
    latency = _Latency(
        source=inputs.source,
        cache=cache,
        feed=_first_feed(inputs.validation_path, inputs.specs, batch_size),
        key_context={
            "reference": context["model"],
            "validation": context["validation"],
            "batch_size": batch_size,
            "runs": latency_runs,
            "machine": machine_fingerprint(),
            **_non_default(settings, "latency_ort_level", "threads"),
        },
        runs=latency_runs,
        search=search,
        emit=emit,
    )
    finished = False
    try:
        search.run(latency)
        finished = True
    finally:
        if owned:
            executor.close(wait=finished)
    trials = sorted(search.trials, key=lambda t: t.index)
    _final_latency(trials, objective, min_cosine, inputs.original_bytes, latency)
    chosen = choose(trials, objective, min_cosine, inputs.original_bytes)
    result = TuneResult(
        input=str(inputs.source),
        out_dir=str(inputs.folder),
        objective=objective,
        min_cosine=min_cosine,
        original_bytes=inputs.original_bytes,
        calibration_data=str(inputs.calib_path),
        validation_data=str(inputs.validation_path),
        validation_is_calibration=inputs.validation_is_calibration,
        trials=trials,
        size_front=front_of(trials, _size, float(inputs.original_bytes)),
        latency_front=front_of(trials, lambda t: t.latency_ratio, 1.0),
        chosen=chosen,
        evaluated=search.evaluated,
        cached=search.cached_count,
        workers=executor.capacity,
        seconds=0.0,
        search_seconds=search.seconds - latency.seconds,
        latency_seconds=latency.seconds,
        message=_message(trials, chosen, objective, min_cosine, inputs.original_bytes),
        stopped=search.stopped,
        seed=seed,
        batch_size=batch_size,
    )
    _write_outputs(result, search)
    result.seconds = time.perf_counter() - started
    write_reports(result, inputs.folder)
    emit("done", {"result": result})
    logger.info("tune: %s (%.1f s)", result.message, result.seconds)
    return result


@dataclass
class _Inputs:
    """Checked inputs of one search: paths workers can read, hashes, the search space."""

    source: Path
    folder: Path
    specs: list[InputSpec]
    calib_path: Path
    validation_path: Path
    validation_is_calibration: bool
    space: SearchSpace
    original_bytes: int
    hashes: dict[str, str]


def _prepare(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    calib_data: DataSource,
    data: DataSource | None,
    passes: Sequence[str] | None,
    options: Mapping[str, Mapping[str, Any]] | None,
    min_cosine: float,
    batch_size: int | None,
    *,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mask_input: str | bool | None = None,
) -> _Inputs:
    """Check every input before anything is written (bad input leaves no folder behind)."""
    source, folder = Path(model), Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output folder {folder} is a file")
    if (folder / "best.onnx").resolve() == source.resolve():
        raise InputError(f"the input model {source} is the output's best.onnx; copy it first")
    reference = load_model(source)
    infer_types(reference)
    specs = input_specs(reference.graph)
    if calib_data is not None and input_shapes:
        check_input_shapes(specs, input_shapes)
        logger.warning("input shapes only shape synthesized data; ignored for the data given")
    validation_feeds = None if data is None else _checked_feeds(data, specs, batch_size)
    names = list(dict.fromkeys(passes)) if passes else list(BUILTIN_PASSES)
    space = build_search_space(names, min_cosine, options or {})
    if calib_data is None:
        calib_feeds = synthesize_runnable(
            reference.graph, source, seed=seed, input_shapes=input_shapes
        )
        logger.warning("no calibration data given: using %s", calib_feeds.description)
    else:
        calib_feeds = _checked_feeds(calib_data, specs, batch_size)
        resolve_mask_input(calib_feeds, specs, mask_input)  # a bad --mask-input: exit 2 now
    del reference
    try:
        (folder / "candidates").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create {folder}: {error.strerror or error}") from error
    calib_path = _as_path(calib_data, calib_feeds, folder / "data" / "calibration")
    if validation_feeds is None:
        validation_path = calib_path
        logger.warning(
            "no validation data given: candidates are validated on the calibration data "
            "(%s), so the front is optimistic; pass held-out data",
            calib_path,
        )
    else:
        validation_path = _as_path(data, validation_feeds, folder / "data" / "validation")
    return _Inputs(
        source=source,
        folder=folder,
        specs=specs,
        calib_path=calib_path,
        validation_path=validation_path,
        validation_is_calibration=validation_feeds is None,
        space=space,
        original_bytes=model_file_bytes(source),
        hashes={
            "model": model_content_hash(source),
            "calibration": data_content_hash(calib_path),
            "validation": data_content_hash(validation_path),
        },
    )


def _check_arguments(
    objective: str,
    min_cosine: float,
    budget: int | None,
    time_limit: float | None,
    workers: int | None,
    latency_runs: int,
) -> None:
    if objective not in OBJECTIVES:
        raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not (isinstance(min_cosine, (int, float)) and 0.0 < min_cosine <= 1.0):
        raise InputError(f"min cosine must be in (0, 1], got {min_cosine!r}")
    if budget is not None and budget < 1:
        raise InputError(f"budget must be at least 1 trial, got {budget}")
    if time_limit is not None and not time_limit > 0:
        raise InputError(f"time limit must be positive, got {time_limit}")
    if workers is not None and workers < 0:
        raise InputError(f"workers must be 0 (this process) or more, got {workers}")
    if latency_runs < 1:
        raise InputError(f"latency runs must be at least 1, got {latency_runs}")


def _non_default(settings: Settings, *names: str) -> dict[str, Any]:
    """The named settings that differ from their defaults, for cache keys: results cached
    with default settings (and by graphopt versions before the settings existed) stay valid."""
    defaults = Settings()
    return {
        name: getattr(settings, name)
        for name in names
        if getattr(settings, name) != getattr(defaults, name)
    }


def _checked_feeds(source: DataSource, specs: list[InputSpec], batch_size: int | None) -> Feeds:
    """Open a data source and read it once: bad data is an input error before any work."""
    return open_checked(source, specs, batch_size=batch_size)[0]


def _as_path(source: DataSource, feeds: Feeds, materialized: Path) -> Path:
    """A path workers can read: paths stay as they are; other sources become a folder of one
    ``.npz`` per feed (deterministic names), so they hash and travel like files."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    materialized.mkdir(parents=True, exist_ok=True)
    for stale in materialized.glob("*.npz"):
        stale.unlink()
    for index, feed in enumerate(feeds):
        handle, name = tempfile.mkstemp(prefix=".feed.", suffix=".npz", dir=materialized)
        os.close(handle)
        try:
            np.savez(name, **feed)
            os.replace(name, materialized / f"{index:05d}.npz")
        finally:
            Path(name).unlink(missing_ok=True)
    return materialized


def _first_feed(
    path: Path, specs: list[InputSpec], batch_size: int | None
) -> dict[str, np.ndarray]:
    feeds: Feeds = open_data(path, specs, batch_size=batch_size)
    for feed in feeds:
        return feed
    raise InputError(f"validation data {path} holds no feed")


@dataclass
class _Search:
    """Rules 3 to 5: generates candidates in order and runs them through the executor."""

    source: Path
    space: SearchSpace
    objective: str
    min_cosine: float
    budget: int | None
    deadline: float | None
    cache: TuneCache
    executor: Executor
    context: dict[str, Any]
    calib_path: Path
    validation_path: Path
    candidates_dir: Path
    seed: int
    batch_size: int | None
    original_bytes: int
    emit: EventHook
    settings: Settings = field(default_factory=Settings)
    mask_input: str | bool | None = None
    trials: list[Trial] = field(default_factory=list)
    evaluated: int = 0
    cached_count: int = 0
    seconds: float = 0.0
    stopped: str = ""
    _keys: set[str] = field(default_factory=set)
    _running: dict[str, Trial] = field(default_factory=dict)

    def key(self, candidate: Candidate) -> str:
        return sha256_text(canonical_json({**self.context, "candidate": candidate.to_dict()}))

    def model_path(self, key: str) -> Path:
        return self.candidates_dir / f"{key[:24]}.onnx"

    def task(
        self,
        trial: Trial,
        *,
        validate: bool = True,
        keep_above: float | None = None,
        output: Path | None = None,
    ) -> EvaluationTask:
        return EvaluationTask(
            key=trial.key,
            model_path=str(self.source),
            calib_data=str(self.calib_path),
            validation_data=str(self.validation_path),
            passes=trial.candidate.passes,
            options=trial.candidate.options,
            output_path=str(output or self.model_path(trial.key)),
            seed=self.seed,
            batch_size=self.batch_size,
            keep_above=keep_above,
            validate=validate,
            settings=self.settings,
            mask_input=self.mask_input,
        )

    def keep_above(self) -> float:
        if self.objective == "latency":
            return 1.0 - CLOSE_FACTOR * (1.0 - self.min_cosine)
        return self.min_cosine

    def run(self, latency: _Latency) -> None:
        started = time.perf_counter()
        singles = sensitivity_order(self.space, self.objective)
        position = 0
        first_round = True
        while True:
            if self.budget is None:
                chunk = len(singles)
            elif first_round:
                chunk = max(len(self.space.lossy), math.ceil(self.budget / 2))
            else:
                chunk = len(singles) - position
            batch = singles[position : position + chunk]
            position += len(batch)
            first_round = False
            self.emit("stage", {"stage": "sensitivity", "candidates": len(batch)})
            self._run_batch(
                [(candidate, (setting,), None) for setting, candidate in batch], "sensitivity"
            )
            if self.objective == "latency":
                latency.measure(self._promising_singles())
            combos = [
                (self.space.candidate(settings), settings, error)
                for settings, error in combinations(
                    self._singles_by_pass(),
                    self.objective,
                    self.min_cosine,
                    self.original_bytes,
                )
            ]
            fresh = [item for item in combos if self.key(item[0]) not in self._keys]
            if fresh and not self.stopped:
                self.emit("stage", {"stage": "combination", "candidates": len(fresh)})
                self._run_batch(fresh, "combination")
            if self.stopped or position >= len(singles):
                break
        self.stopped = self.stopped or "search space exhausted"
        self.seconds = time.perf_counter() - started

    def _singles_by_pass(self) -> dict[str, list[tuple[Setting, Trial]]]:
        by_pass: dict[str, list[tuple[Setting, Trial]]] = {}
        for trial in sorted(self.trials, key=lambda t: t.index):
            if trial.stage == "sensitivity" and trial.evaluation is not None:
                setting = trial.settings[0]
                by_pass.setdefault(setting.pass_name, []).append((setting, trial))
        return by_pass

    def _promising_singles(self) -> list[Trial]:
        slack = 1.0 - self.min_cosine
        return [
            trial
            for trial in sorted(self.trials, key=lambda t: t.index)
            if trial.stage == "sensitivity"
            and trial.ok
            and 1.0 - trial.cosine <= CLOSE_FACTOR * slack
        ]

    def _out_of_budget(self) -> bool:
        if self.budget is not None and len(self.trials) >= self.budget:
            self.stopped = f"budget of {self.budget} trials reached"
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.stopped = "time limit reached"
            return True
        return False

    def _run_batch(
        self,
        items: Sequence[tuple[Candidate, tuple[Setting, ...], float | None]],
        stage: str,
    ) -> None:
        for candidate, settings, predicted in items:
            if self._out_of_budget():
                break
            key = self.key(candidate)
            if key in self._keys:
                continue
            trial = Trial(
                index=len(self.trials),
                stage=stage,
                candidate=candidate,
                key=key,
                settings=settings,
                predicted_error=predicted,
            )
            hit = self.cache.get(key)
            if hit is not None:
                self._keys.add(key)
                self.trials.append(trial)
                trial.evaluation, trial.cached = hit, True
                self.cached_count += 1
                self._report(trial)
                continue
            while self.executor.pending >= self.executor.capacity:
                self._collect()
            if self._out_of_budget():
                break
            self._keys.add(key)
            self.trials.append(trial)
            self._running[key] = trial
            self.executor.submit(self.task(trial, keep_above=self.keep_above()))
        while self.executor.pending:
            self._collect()

    def _collect(self) -> None:
        evaluation = self.executor.next_result()
        trial = self._running.pop(evaluation.key)
        trial.evaluation = evaluation
        self.evaluated += 1
        self.cache.put(evaluation, stage=trial.stage)
        self._report(trial)

    def _report(self, trial: Trial) -> None:
        evaluation = trial.evaluation
        assert evaluation is not None
        if evaluation.status != "ok":
            logger.info(
                "trial %d %s: error: %s", trial.index, trial.candidate.describe(), evaluation.error
            )
        else:
            logger.info(
                "trial %d %s: cosine %.6f, %d bytes%s",
                trial.index,
                trial.candidate.describe(),
                evaluation.min_cosine,
                evaluation.size_bytes,
                " (cached)" if trial.cached else "",
            )
        self.emit(
            "trial",
            {
                "trial": trial,
                "done": len([t for t in self.trials if t.evaluation is not None]),
                "budget": self.budget,
                "original_bytes": self.original_bytes,
                "min_cosine": self.min_cosine,
            },
        )

    def materialize(self, trial: Trial, target: Path | None = None) -> Path:
        """The trial's model file, rebuilt from its recipe when it was deleted (rule 9)."""
        path = target or self.model_path(trial.key)
        if target is None and path.exists():
            return path
        assert trial.evaluation is not None
        rebuilt = evaluate_task(self.task(trial, validate=False, output=path))
        if rebuilt.status != "ok":
            raise InputError(f"rebuilding {trial.candidate.describe()} failed: {rebuilt.error}")
        if not external_data_files(path) and rebuilt.model_sha256 != trial.evaluation.model_sha256:
            logger.warning(
                "rebuilt %s is not byte-identical to the evaluated model (sha256 %s, was %s)",
                trial.candidate.describe(),
                rebuilt.model_sha256[:12],
                trial.evaluation.model_sha256[:12],
            )
        return path


@dataclass
class _Latency:
    """Rule 6: serial, interleaved, cached latency measurements in this process."""

    source: Path
    cache: TuneCache
    feed: dict[str, np.ndarray]
    key_context: dict[str, Any]
    runs: int
    search: _Search
    emit: EventHook
    seconds: float = 0.0

    def measure(self, trials: Iterable[Trial]) -> None:
        started = time.perf_counter()
        for trial in trials:
            if trial.latency is not None or not trial.ok or trial.evaluation is None:
                continue
            key = sha256_text(
                canonical_json({**self.key_context, "candidate": trial.evaluation.model_sha256})
            )
            record = self.cache.get_latency(key)
            cached = record is not None
            if record is None:
                try:
                    path = self.search.materialize(trial)
                except InputError as error:
                    logger.warning("no latency for %s: %s", trial.candidate.describe(), error)
                    continue
                measured = measure_latency(
                    self.source,
                    path,
                    self.feed,
                    provider=LATENCY_PROVIDER,
                    runs=self.runs,
                    settings=self.search.settings,
                )
                record = LatencyRecord(
                    ratio=measured.ratio,
                    reference_ms=measured.reference_ms,
                    candidate_ms=measured.candidate_ms,
                    runs=measured.runs,
                )
                self.cache.put_latency(key, record)
            trial.latency = record
            logger.info(
                "latency %s: %.3f× (%.2f ms vs %.2f ms)%s",
                trial.candidate.describe(),
                record.ratio,
                record.candidate_ms,
                record.reference_ms,
                " (cached)" if cached else "",
            )
            self.emit("latency", {"trial": trial, "cached": cached})
        self.seconds += time.perf_counter() - started


def _final_latency(
    trials: Sequence[Trial],
    objective: str,
    min_cosine: float,
    original_bytes: int,
    latency: _Latency,
) -> None:
    """Rule 6: what is measured once the search is over."""
    feasible = [t for t in trials if t.meets(min_cosine)]
    if objective == "latency":
        latency.measure(feasible)  # byte-identical models share one (cached) measurement
        return
    front = {t.key for t in front_of(trials, _size, float(original_bytes))}
    smallest = min((t.evaluation.size_bytes for t in feasible if t.evaluation), default=None)
    wanted = [
        t
        for t in feasible
        if t.key in front or (t.evaluation is not None and t.evaluation.size_bytes == smallest)
    ]
    latency.measure(wanted)


def _message(
    trials: Sequence[Trial],
    chosen: Trial | None,
    objective: str,
    min_cosine: float,
    original_bytes: int,
) -> str:
    if chosen is not None and chosen.evaluation is not None:
        size = chosen.evaluation.size_bytes / original_bytes
        latency = f", latency {chosen.latency_ratio:.3f}×" if chosen.latency_ratio else ""
        return (
            f"chosen {chosen.candidate.describe()}: min cosine {chosen.cosine:.6f}, "
            f"size {size:.3f}×{latency}"
        )
    feasible = [t for t in trials if t.meets(min_cosine)]
    if not trials:
        return "no candidate was tried (the time limit ran out first)"
    if not feasible:
        evaluated = [t for t in trials if t.ok]
        if not evaluated:
            return f"no candidate meets min cosine {min_cosine:g}: none could be evaluated"
        best = max(evaluated, key=lambda t: (t.cosine, -t.index))
        return (
            f"no candidate meets min cosine {min_cosine:g} (closest: "
            f"{best.candidate.describe()} at {best.cosine:.6f})"
        )
    what = "smaller" if objective == "size" else "faster"
    return (
        f"{len(feasible)} candidates meet min cosine {min_cosine:g}, but none is {what} "
        "than the original"
    )


# --- outputs -------------------------------------------------------------------------------------


def _write_outputs(result: TuneResult, search: _Search) -> None:
    """best.onnx and recipe.json (or their removal), and pruning of candidate files (rule 9)."""
    folder = Path(result.out_dir)
    best = folder / "best.onnx"
    recipe = folder / "recipe.json"
    chosen = result.chosen
    if chosen is None:
        if best.exists() or recipe.exists():
            logger.warning("removing best.onnx and recipe.json of an earlier run from %s", folder)
        if best.exists():
            remove_model(best)
        recipe.unlink(missing_ok=True)
    else:
        source = search.model_path(chosen.key)
        if source.exists() and not external_data_files(source):
            handle, name = tempfile.mkstemp(prefix=".best.onnx.", suffix=".tmp", dir=folder)
            os.close(handle)
            try:
                shutil.copyfile(source, name)
                os.replace(name, best)
            finally:
                Path(name).unlink(missing_ok=True)
        else:
            remove_model(best)
            search.materialize(chosen, best)
        recipe_fields = chosen.candidate.to_dict()
        if search.mask_input is not None:  # optimize --recipe rebuilds with the same mask
            recipe_fields["mask_input"] = search.mask_input or "none"
        write_text_atomic(recipe, canonical_json_pretty(recipe_fields))
        result.files["best"] = str(best)
        result.files["recipe"] = str(recipe)
    keep = {t.key[:24] for t in (*result.size_front, *result.latency_front)}
    if chosen is not None:
        keep.add(chosen.key[:24])
    for path in sorted(search.candidates_dir.glob("*.onnx")):
        if path.stem not in keep:
            remove_model(path)
    for temp in search.candidates_dir.glob(".*.tmp"):
        temp.unlink(missing_ok=True)
