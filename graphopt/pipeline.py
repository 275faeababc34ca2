"""The whole job behind ``graphopt optimize``, as one function the CLI and Python users share.

load → normalize → plan → passes (with checks between them) → save → validate → report.
The input file is only read; the output is written atomically; validation compares the output
file against the input file, on the validation data when given, else on the calibration data.
When validation fails, ``bisect`` finds the first failing pass and node, and ``per_tensor``
reports where the error starts.

Default budget: runs of exact passes only are held to the exact tolerance; otherwise the loosest
``budget`` declared by the lossy passes in the plan applies, unless the caller gives criteria.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.bisect import BisectReport, bisect_passes
from graphopt.data import (
    Feeds,
    check_input_shapes,
    input_specs,
    open_data,
    synthesize,
    synthesize_runnable,
)
from graphopt.errors import InputError
from graphopt.localize import TensorComparison, compare_tensors
from graphopt.manager import PassManager, RunReport
from graphopt.model import Model, check_output_path, model_file_bytes, save_model
from graphopt.normalize import load_normalized
from graphopt.pass_api import Pass, PassContext, plan_opset
from graphopt.registry import load_pass_class
from graphopt.validate import Criteria, ValidationReport, compare_models, json_safe

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
    opset: dict[str, Any] | None = None
    """The opset upgrade the plan asked for (:class:`graphopt.opset.OpsetUpgrade`), if any."""
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
) -> OptimizeReport:
    """Run the pipeline; see the module docstring. Raises InputError on unusable input."""
    emit = on_event or (lambda _kind, _info: None)
    source, target = Path(input_path), Path(output_path)
    check_output_path(target, source)
    pass_objects = build_passes(list(passes), options or {})
    manager = PassManager(pass_objects, on_event=emit)
    emit("plan", {"plan": manager.plan})
    timings: dict[str, float] = {}

    started = time.perf_counter()
    model, normalize_stats = load_normalized(
        source,
        materialize_weights=any(item.reads_weights for item in pass_objects),
        min_opset=plan_opset(manager.passes),
    )
    timings["load_normalize"] = time.perf_counter() - started
    upgrade = model.opset_upgrade
    opset = None if upgrade is None else asdict(upgrade)
    if upgrade is not None:
        emit("opset", {"upgrade": upgrade, "description": upgrade.describe()})
    emit("normalized", {"stats": normalize_stats.as_dict()})

    # synthesized data is probed on the input model only when something will run it
    probe = validate or not all(item.exact for item in pass_objects)
    feeds = _feeds_for(model, data, batch_size, seed, source, input_shapes, probe=probe)
    emit("data", {"description": feeds.description, "synthetic": feeds.synthetic})
    check_feeds = feeds
    if validation_data is not None:
        check_feeds = _feeds_for(model, validation_data, batch_size, seed, source, None)
        emit("validation-data", {"description": check_feeds.description})

    started = time.perf_counter()
    context = PassContext(
        data=feeds,
        seed=seed,
        progress=lambda label, index: emit("progress", {"label": label, "index": index}),
        providers=tuple(providers),
    )
    model, run_report = manager.run(model, context)
    timings["passes"] = time.perf_counter() - started

    started = time.perf_counter()
    save_model(model, target)
    timings["save"] = time.perf_counter() - started
    emit("saved", {"path": str(target)})
    del model

    report = OptimizeReport(
        input=str(source),
        output=str(target),
        plan=manager.plan,
        normalize=normalize_stats.as_dict(),
        run=run_report,
        input_bytes=model_file_bytes(source),
        output_bytes=model_file_bytes(target),
        data=check_feeds.description,
        synthetic_data=check_feeds.synthetic,
        opset=opset,
        seconds=timings,
    )
    if not validate:
        return report
    chosen = criteria or default_criteria(manager.passes)
    started = time.perf_counter()
    emit("validate-start", {"providers": list(providers)})
    report.validation = compare_models(
        source,
        target,
        check_feeds,
        providers=providers,
        criteria=chosen,
        on_batch=lambda index: emit("validate-batch", {"index": index}),
        seed=seed,
    )
    timings["validate"] = time.perf_counter() - started
    if per_tensor:
        emit("per-tensor-start", {})
        report.per_tensor = compare_tensors(source, target, check_feeds, criteria=chosen)
    if bisect and not report.validation.passed:
        emit("bisect-start", {})
        started = time.perf_counter()
        report.bisect = bisect_passes(
            source, manager.passes, check_feeds, chosen, providers=providers, seed=seed
        )
        timings["bisect"] = time.perf_counter() - started
    return report


def default_criteria(planned: Sequence[Pass]) -> Criteria:
    """The module's default budget for a plan."""
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
) -> Feeds:
    """Real data checked up front, or synthesized data the input model can run (``probe``)."""
    specs = input_specs(model.graph)
    if data is None:
        if probe:
            feeds = synthesize_runnable(model.graph, source, seed=seed, input_shapes=input_shapes)
        else:
            feeds = synthesize(model.graph, seed=seed, input_shapes=input_shapes)
        logger.warning("no calibration/validation data given: using %s", feeds.description)
        return feeds
    if input_shapes:
        check_input_shapes(specs, input_shapes)
        logger.warning("--input-shapes only shapes synthesized data; ignored for the data given")
    feeds = open_data(data, specs, batch_size=batch_size)
    for _ in feeds:  # check every feed up front: bad data is an input error, not a late crash
        pass
    return feeds
