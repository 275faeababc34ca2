"""The whole job behind ``graphopt optimize``, as one function the CLI and Python users share.

load → normalize → plan → passes (with checks between them) → stage → validate → report →
publish. The input file is only read. The output is written complete into a staging folder in
the temporary folder (``tmp_dir`` or ``settings.tmp_dir``, default the system's), validated there
against the input file (on the validation data when given, else on the calibration data), and
published only then, together with the report (:mod:`graphopt.ir.files`): a run that stops with
an error or an interrupt before publishing leaves ``OUT`` and the report as they were, absent or
the previous files (an interrupt during publishing waits for it to finish). A failed validation
still publishes the output (exit 1 in the CLI), for inspection. When validation fails, ``bisect``
finds the first failing pass and node, and ``per_tensor`` reports where the error starts.

Default budget (:func:`budget_for`, the same rule in ``graphopt check``): exact passes only are
held to the exact tolerance; otherwise the loosest ``budget`` declared by the lossy passes
applies, unless the caller gives criteria.

Arguments are checked before anything runs: a string where a list of passes or providers is
expected, an empty plan, options that are not mappings, criteria that are not
:class:`~graphopt.check.validate.Criteria`, or a provider this onnxruntime lacks are
:class:`~graphopt.errors.OptionError` / :class:`~graphopt.errors.InputError` up front.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.check.bisect import BisectReport, bisect_passes
from graphopt.check.localize import TensorComparison, compare_tensors
from graphopt.check.validate import Criteria, ValidationReport, compare_models, json_safe
from graphopt.data.feeds import (
    Feeds,
    check_input_shapes,
    input_specs,
    open_checked,
    synthesize,
    synthesize_runnable,
)
from graphopt.data.masking import MaskSummary, resolve_mask_input
from graphopt.errors import InputError, OptionError, PlanError
from graphopt.ir.files import (
    publish,
    resolve_tmp_dir,
    staging_folder,
    storage_error,
)
from graphopt.ir.model import Model, check_output_path, model_file_bytes, write_model
from graphopt.ir.normalize import load_normalized
from graphopt.ir.ort import resolve_providers
from graphopt.passkit.api import Pass, PassContext, plan_opset
from graphopt.passkit.manager import PassManager, RunReport
from graphopt.passkit.ordering import OrderMode
from graphopt.passkit.registry import load_pass_class
from graphopt.settings import Settings

logger = logging.getLogger(__name__)

EventHook = Callable[[str, dict[str, Any]], None]
DataSource = str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | Any


@dataclass
class OptimizeReport:
    input: str
    output: str
    plan: list[str]
    normalize: dict[str, Any]
    run: RunReport
    input_bytes: int
    output_bytes: int
    data: str
    synthetic_data: bool
    calibration_mask: str | None = None
    """Which input marked padding in the calibration data and how much (None: no mask)."""
    opset: dict[str, Any] | None = None
    """The opset upgrade the plan asked for (:class:`graphopt.ir.opset.OpsetUpgrade`), if any."""
    validation: ValidationReport | None = None
    per_tensor: list[TensorComparison] | None = None
    bisect: BisectReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.validation is None or self.validation.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "output": self.output,
            "plan": self.plan,
            "normalize": self.normalize,
            "passes": [asdict(record) for record in self.run.records],
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "data": self.data,
            "synthetic_data": self.synthetic_data,
            "calibration_mask": self.calibration_mask,
            "opset": self.opset,
            "validation": self.validation.to_dict() if self.validation else None,
            "per_tensor": None
            if self.per_tensor is None
            else json_safe([asdict(row) for row in self.per_tensor]),
            "bisect": asdict(self.bisect) if self.bisect else None,
            "passed": self.passed,
            "seconds": self.seconds,
        }


def build_passes(names: Sequence[str], options: Mapping[str, Mapping[str, Any]]) -> list[Pass]:
    """Instantiate the named passes with their options; options for unrequested passes fail."""
    _check_plan_arguments(names, options)
    stray = sorted(set(options) - set(names))
    if stray:
        raise InputError(f"options given for pass '{stray[0]}', which is not in --passes")
    return [load_pass_class(name)(options.get(name, {})) for name in names]


def optimize(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    passes: Sequence[str],
    *,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    data: DataSource | None = None,
    validation_data: DataSource | None = None,
    providers: Sequence[str] = ("cpu",),
    validate: bool = True,
    criteria: Criteria | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    per_tensor: bool = False,
    bisect: bool = False,
    on_event: EventHook | None = None,
    tmp_dir: str | os.PathLike[str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
    order: OrderMode = "planned",
    mask_input: str | bool | None = None,
) -> OptimizeReport:
    """Run the pipeline; see the module docstring. Raises InputError on unusable input.

    ``tmp_dir``: where temporary files go; it overrides ``settings.tmp_dir`` (an explicit
    argument beats the settings, as a flag beats an environment variable); None for
    ``settings.tmp_dir``, else the system's (``TMPDIR`` honoured).
    ``report_path``: the report as JSON, written before the output is published.
    ``order``: ``"planned"`` sorts the passes by their declared relations and ranks;
    ``"given"`` runs them as listed, refusing an order that breaks a declared relation
    (:mod:`graphopt.passkit.ordering`).
    ``settings``: how the run uses the machine (:class:`~graphopt.settings.Settings`: threads,
    calibration memory budgets, the validation sessions' ONNX Runtime level); the passes get it
    as ``context.settings``. None reads the ``GRAPHOPT_*`` variables (``Settings.from_env``).
    ``mask_input``: the input marking padding positions in the data: calibration statistics and
    validation then count valid positions only (:mod:`graphopt.data.masking`,
    :mod:`graphopt.check.validate` rule 9); None finds an attention mask by name and values,
    False turns masking off.
    """
    emit = on_event or (lambda _kind, _info: None)
    source, target = Path(input_path), Path(output_path)
    _check_plan_arguments(passes, options)
    providers = resolve_providers(_provider_names(providers))
    if criteria is not None and not isinstance(criteria, Criteria):
        raise OptionError(f"criteria must be a graphopt.Criteria, not {type(criteria).__name__}")
    settings = _run_settings(settings, tmp_dir)
    scratch = resolve_tmp_dir(settings.tmp_dir)
    report_target = None if report_path is None else Path(report_path)
    check_output_path(target, source, report=report_target)
    pass_objects = build_passes(list(passes), options or {})
    manager = PassManager(pass_objects, order=order, on_event=emit)
    emit("plan", {"plan": manager.plan})
    chosen = criteria or default_criteria(manager.passes)
    if validate:
        emit("criteria", {"criteria": chosen, "source": _budget_source(criteria, manager.passes)})
    timings: dict[str, float] = {}

    started = time.perf_counter()
    model, normalize_stats = load_normalized(
        source,
        materialize_weights=any(item.reads_weights for item in pass_objects),
        min_opset=plan_opset(manager.passes),
        tmp_dir=scratch,
    )
    timings["load_normalize"] = time.perf_counter() - started
    upgrade = model.opset_upgrade
    opset = None if upgrade is None else asdict(upgrade)
    if upgrade is not None:
        emit("opset", {"upgrade": upgrade, "description": upgrade.describe()})
    emit("normalized", {"stats": normalize_stats.as_dict()})

    # synthesized data is probed on the input model only when something will run it
    probe = validate or not all(item.exact for item in pass_objects)
    feeds, batches = _feeds_for(model, data, batch_size, seed, source, input_shapes, probe=probe)
    emit("data", {"description": feeds.description, "synthetic": feeds.synthetic})
    mask = _padding_mask(model, feeds, mask_input)
    if mask is not None:
        feeds = feeds.with_mask_input(mask.input)
        emit("mask", {"description": mask.describe()})
    check_feeds, check_batches = feeds, batches
    if validation_data is not None:
        check_feeds, check_batches = _feeds_for(
            model, validation_data, batch_size, seed, source, None
        )
        emit("validation-data", {"description": check_feeds.description})
        validation_mask = _padding_mask(model, check_feeds, mask_input)
        if validation_mask is not None:
            check_feeds = check_feeds.with_mask_input(validation_mask.input)

    started = time.perf_counter()
    context = PassContext(
        data=feeds,
        seed=seed,
        progress=lambda label, index, total: emit(
            "progress",
            {"label": label, "index": index, "total": batches if total is None else total},
        ),
        providers=tuple(providers),
        settings=settings,
    )
    model, run_report = manager.run(model, context)
    timings["passes"] = time.perf_counter() - started

    with staging_folder(scratch) as stage:
        started = time.perf_counter()
        staged = write_model(model, stage / target.name)
        timings["save"] = time.perf_counter() - started
        del model
        report = OptimizeReport(
            input=str(source),
            output=str(target),
            plan=manager.plan,
            normalize=normalize_stats.as_dict(),
            run=run_report,
            input_bytes=model_file_bytes(source),
            output_bytes=model_file_bytes(staged),
            data=check_feeds.description,
            synthetic_data=check_feeds.synthetic,
            calibration_mask=None if mask is None else mask.describe(),
            opset=opset,
            seconds=timings,
        )
        if validate:
            _validate_staged(
                report,
                source,
                staged,
                manager.passes,
                check_feeds,
                chosen,
                emit,
                providers=providers,
                seed=seed,
                per_tensor=per_tensor,
                bisect=bisect,
                tmp_dir=scratch,
                batches=check_batches,
                settings=settings,
            )
        written = None if report_target is None else (report_target, report_json(report))
        try:
            publish(staged, target, report=written)
        except OSError as error:
            raise storage_error(error, f"cannot write {target}") from error
    emit("saved", {"path": str(target)})
    return report


def _run_settings(settings: Settings | None, tmp_dir: str | os.PathLike[str] | None) -> Settings:
    """The run's settings: ``settings`` (None: from ``GRAPHOPT_*``), ``tmp_dir`` overriding."""
    if settings is not None and not isinstance(settings, Settings):
        raise OptionError(
            f"settings must be a graphopt.settings.Settings, not {type(settings).__name__}"
        )
    overridden = () if tmp_dir is None else ("tmp_dir",)
    chosen = Settings.from_env(given=overridden) if settings is None else settings
    return chosen if tmp_dir is None else dataclasses.replace(chosen, tmp_dir=Path(tmp_dir))


def report_json(report: OptimizeReport) -> str:
    """The report as ``--report`` writes it."""
    return json.dumps(report.to_dict(), indent=2, default=str) + "\n"


def _validate_staged(
    report: OptimizeReport,
    source: Path,
    staged: Path,
    planned: Sequence[Pass],
    feeds: Feeds,
    criteria: Criteria,
    emit: EventHook,
    *,
    providers: Sequence[str],
    seed: int,
    per_tensor: bool,
    bisect: bool,
    tmp_dir: Path,
    batches: int | None,
    settings: Settings,
) -> None:
    """Validate the staged output against the input; fill the report's validation parts."""
    timings = report.seconds
    started = time.perf_counter()
    emit("validate-start", {"providers": list(providers), "total": batches})
    report.validation = compare_models(
        source,
        staged,
        feeds,
        providers=providers,
        criteria=criteria,
        on_batch=lambda index: emit("validate-batch", {"index": index, "total": batches}),
        seed=seed,
        tmp_dir=tmp_dir,
        settings=settings,
    )
    timings["validate"] = time.perf_counter() - started
    if per_tensor:
        emit("per-tensor-start", {})
        report.per_tensor = compare_tensors(source, staged, feeds, criteria=criteria)
    if bisect and not report.validation.passed:
        emit("bisect-start", {})
        started = time.perf_counter()
        report.bisect = bisect_passes(
            source,
            planned,
            feeds,
            criteria,
            providers=providers,
            seed=seed,
            tmp_dir=tmp_dir,
            settings=settings,
        )
        timings["bisect"] = time.perf_counter() - started


def _provider_names(providers: object) -> list[str]:
    if isinstance(providers, str) or not isinstance(providers, Sequence):
        raise OptionError(
            f"providers must be a list such as ['cpu'] or ['cpu', 'cuda'], not {providers!r}"
        )
    if not providers:
        raise OptionError("providers is empty; give at least one, e.g. ['cpu']")
    return [str(name) for name in providers]


def _check_plan_arguments(passes: object, options: object) -> None:
    """Module docstring: the plan's arguments are checked before anything runs."""
    if isinstance(passes, str) or not isinstance(passes, Sequence):
        raise OptionError(
            f"passes must be a list of pass names such as ['cleanup'], not {passes!r}"
        )
    if not passes:
        raise PlanError("no passes given (see 'graphopt passes')")
    if not all(isinstance(name, str) for name in passes):
        raise OptionError(f"passes must be pass names (strings), not {list(passes)!r}")
    if options is None:
        return
    if not isinstance(options, Mapping):
        raise OptionError(f"options must map pass names to option mappings, not {options!r}")
    for name, values in options.items():
        if not isinstance(values, Mapping):
            raise OptionError(
                f"options[{name!r}] must be a mapping of option names to values, "
                f"e.g. {{'{name}': {{...}}}}, not {type(values).__name__} {values!r}"
            )


def default_criteria(planned: Sequence[Pass]) -> Criteria:
    """The module's default budget for a plan (the loosest lossy pass's; exact when none)."""
    budgets = [item.budget for item in planned if not item.exact]
    if not budgets:
        return Criteria(exact=True)
    return Criteria(
        min_cosine=min(b.min_cosine for b in budgets),
        min_snr_db=min(b.min_snr_db for b in budgets),
    )


def _feeds_for(
    model: Model,
    data: DataSource | None,
    batch_size: int | None,
    seed: int,
    source: Path,
    input_shapes: Mapping[str, Sequence[int]] | None,
    *,
    probe: bool = True,
) -> tuple[Feeds, int]:
    """Real data checked up front, or synthesized data the input model can run (``probe``);
    with the number of batches (for progress totals)."""
    specs = input_specs(model.graph)
    if data is None:
        if probe:
            feeds = synthesize_runnable(model.graph, source, seed=seed, input_shapes=input_shapes)
        else:
            feeds = synthesize(model.graph, seed=seed, input_shapes=input_shapes)
        logger.warning("no calibration/validation data given: using %s", feeds.description)
        return feeds, sum(1 for _ in feeds)
    if input_shapes:
        check_input_shapes(specs, input_shapes)
        logger.warning("--input-shapes only shapes synthesized data; ignored for the data given")
    return open_checked(data, specs, batch_size=batch_size)


def _padding_mask(model: Model, feeds: Feeds, requested: str | bool | None) -> MaskSummary | None:
    """Which input marks padding in ``feeds`` (:mod:`graphopt.data.masking`): calibration
    statistics and validation then count valid positions only; a mask named for synthesized
    data is ignored, with a warning."""
    if feeds.synthetic:
        if isinstance(requested, str):
            logger.warning("--mask-input %s ignored: the data is synthesized", requested)
        return None
    return resolve_mask_input(feeds, input_specs(model.graph), requested)


GENERIC_BUDGET_PASS = "quant"
"""Whose budget ``graphopt check`` applies when it is not told which passes made the candidate."""


def budget_for(names: Sequence[str] | None) -> tuple[Criteria, str]:
    """The default budget (module docstring) for the passes ``names``, and where it comes from.

    ``None`` (the passes are not known, as in ``graphopt check`` without ``--passes``): the
    budget of ``quant``, graphopt's default lossy pass.
    """
    if names is None:
        planned = [load_pass_class(GENERIC_BUDGET_PASS)({})]
        return default_criteria(planned), f"default budget of {GENERIC_BUDGET_PASS}"
    planned = build_passes(list(names), {})
    return default_criteria(planned), _budget_source(None, planned)


def _budget_source(criteria: Criteria | None, planned: Sequence[Pass]) -> str:
    if criteria is not None:
        return "given"
    lossy = [item for item in planned if not item.exact]
    if not lossy:
        return "exact passes only"
    loosest = min(lossy, key=lambda item: (item.budget.min_cosine, item.budget.min_snr_db))
    return f"default budget of {loosest.name}" + (
        f", the loosest of {', '.join(item.name for item in lossy)}" if len(lossy) > 1 else ""
    )
