"""The pass manager: plans a set of passes into one valid order and runs them with checks.

Rules:

1. ``--passes quant,lowrank`` is a set (:mod:`graphopt.passkit.ordering` has this rule in full).
   Each pass's ``run_before``/``run_after`` names that name another requested pass are hard
   relations, from either side; contradictory ones are a :class:`PlanError` naming the cycle.
   Passes with no relation between them run by ``order_rank``, then by name, so the same set
   always gives the same plan: exact passes first; of two lossy weight-editing passes, the one
   that changes a weight's structure (``lowrank``) before the one that edits its values in
   place (``sparsify``), so the structural one owns a weight both want; then ``quant``;
   ``fp16`` last.
   ``order="given"`` runs the passes in the order given instead, after checking it against
   every declared relation (a broken one is a :class:`PlanError` naming it); it is never
   re-sorted.
2. Between passes the manager removes dead nodes and sorts the graph topologically (both exact),
   then checks invariants: the graph passes ``onnx.checker`` and is in topological order.
3. A failing pass or a broken invariant raises :class:`PassError` naming the pass and the passes
   that ran before it.
4. Each pass is timed; its stats and whether it modified the model are recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from graphopt.errors import InputError, PassError
from graphopt.ir.model import Model, skeleton_proto
from graphopt.passkit.api import Pass, PassContext
from graphopt.passkit.ordering import OrderMode, plan

logger = logging.getLogger(__name__)


@dataclass
class PassRecord:
    name: str
    exact: bool
    seconds: float
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    plan: list[str]
    records: list[PassRecord] = field(default_factory=list)

    @property
    def all_exact(self) -> bool:
        return all(record.exact for record in self.records)


def plan_order(passes: Sequence[Pass], order: OrderMode = "planned") -> list[Pass]:
    """Rule 1: ``passes`` in the order they run; ``order`` is "planned" (sorted from the
    declared relations and ranks) or "given" (as given, checked against the relations)."""
    return plan(passes, order)


def check_invariants(model: Model) -> None:
    """Rule 2's checks; raises ValueError describing the first broken invariant."""
    proto = skeleton_proto(model)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        raise ValueError(f"graph is invalid: {str(error).splitlines()[0]}") from error


class PassManager:
    """Runs planned passes over a model. ``order``: "planned" (default) or "given" (rule 1).
    ``on_event`` receives progress messages for the CLI."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        order: OrderMode = "planned",
        check: bool = True,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.passes = plan_order(passes, order)
        self.check = check
        self.on_event = on_event or (lambda _kind, _info: None)

    @property
    def plan(self) -> list[str]:
        return [item.name for item in self.passes]

    def run(self, model: Model, context: PassContext | None = None) -> tuple[Model, RunReport]:
        context = context or PassContext()
        report = RunReport(plan=self.plan)
        done: list[str] = []
        for index, item in enumerate(self.passes):
            self.on_event(
                "pass-start", {"index": index, "total": len(self.passes), "name": item.name}
            )
            started = time.perf_counter()
            try:
                result = item(model, context)
            except PassError as error:
                raise PassError(item.name, done, error.reason) from error.__cause__
            except InputError:
                raise
            model = result.model
            model.graph.cleanup(remove_unused_graph_inputs=False)
            model.graph.toposort()
            if self.check:
                try:
                    check_invariants(model)
                except ValueError as error:
                    raise PassError(item.name, done, str(error)) from error
            record = PassRecord(
                name=item.name,
                exact=item.exact,
                seconds=time.perf_counter() - started,
                modified=result.modified,
                stats=dict(result.stats),
            )
            report.records.append(record)
            logger.info("pass %s: %.3fs, modified=%s", item.name, record.seconds, record.modified)
            self.on_event("pass-end", {"index": index, "total": len(self.passes), "record": record})
            done.append(item.name)
        return model, report
