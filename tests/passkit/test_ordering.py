"""Pass ordering (graphopt.passkit.ordering): relations, contradictions, rank, given orders."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import onnx
import pytest

from graphopt.errors import OptionError, PlanError
from graphopt.ir.model import Model, model_from_proto
from graphopt.passkit.api import Pass, PassContext, PassResult
from graphopt.passkit.manager import PassManager, plan_order
from graphopt.passkit.ordering import (
    OrderRank,
    Relation,
    declared_relations,
    plan_reasons,
    relation_problems,
)
from graphopt.passkit.registry import load_pass_class

BUILTINS = ("cleanup", "quant", "lowrank", "sparsify", "fp16")

# Every subset's plan as the manager made it before ordering had ranks (commit fad609c, computed
# with every request order: all gave the same plan). Keys are the sorted names of the set.
PLANS_BEFORE = {
    "cleanup": "cleanup",
    "fp16": "fp16",
    "lowrank": "lowrank",
    "quant": "quant",
    "sparsify": "sparsify",
    "cleanup,fp16": "cleanup fp16",
    "cleanup,lowrank": "cleanup lowrank",
    "cleanup,quant": "cleanup quant",
    "cleanup,sparsify": "cleanup sparsify",
    "fp16,lowrank": "lowrank fp16",
    "fp16,quant": "quant fp16",
    "fp16,sparsify": "sparsify fp16",
    "lowrank,quant": "lowrank quant",
    "lowrank,sparsify": "lowrank sparsify",
    "quant,sparsify": "sparsify quant",
    "cleanup,fp16,lowrank": "cleanup lowrank fp16",
    "cleanup,fp16,quant": "cleanup quant fp16",
    "cleanup,fp16,sparsify": "cleanup sparsify fp16",
    "cleanup,lowrank,quant": "cleanup lowrank quant",
    "cleanup,lowrank,sparsify": "cleanup lowrank sparsify",
    "cleanup,quant,sparsify": "cleanup sparsify quant",
    "fp16,lowrank,quant": "lowrank quant fp16",
    "fp16,lowrank,sparsify": "lowrank sparsify fp16",
    "fp16,quant,sparsify": "sparsify quant fp16",
    "lowrank,quant,sparsify": "lowrank sparsify quant",
    "cleanup,fp16,lowrank,quant": "cleanup lowrank quant fp16",
    "cleanup,fp16,lowrank,sparsify": "cleanup lowrank sparsify fp16",
    "cleanup,fp16,quant,sparsify": "cleanup sparsify quant fp16",
    "cleanup,lowrank,quant,sparsify": "cleanup lowrank sparsify quant",
    "fp16,lowrank,quant,sparsify": "lowrank sparsify quant fp16",
    "cleanup,fp16,lowrank,quant,sparsify": "cleanup lowrank sparsify quant fp16",
}

# The ranks the built-in passes are meant to declare (rule 3 of graphopt.passkit.ordering).
INTENDED_RANKS = {
    "cleanup": OrderRank.EXACT,
    "lowrank": OrderRank.STRUCTURE,
    "sparsify": OrderRank.VALUES,
    "quant": OrderRank.ENCODING,
    "fp16": OrderRank.CAST,
}


def _fake(
    name: str,
    *,
    exact: bool = False,
    before: Iterable[str] = (),
    after: Iterable[str] = (),
    rank: Any = None,
) -> Pass:
    class Fake(Pass):
        summary: ClassVar[str] = "test"

        def call(self, model: Model, context: PassContext) -> PassResult:
            return PassResult(model, False)

    Fake.name = name  # type: ignore[misc]
    Fake.exact = exact  # type: ignore[misc]
    Fake.run_before = frozenset(before)  # type: ignore[misc]
    Fake.run_after = frozenset(after)  # type: ignore[misc]
    Fake.order_rank = rank  # type: ignore[misc]
    return Fake()


def _names(passes: Iterable[Pass]) -> str:
    return " ".join(item.name for item in passes)


def _builtins(ranked: bool) -> dict[str, Pass]:
    found = {}
    for name in BUILTINS:
        pass_class = load_pass_class(name)
        if ranked:  # as the pass will declare it
            pass_class = type(
                pass_class.__name__, (pass_class,), {"order_rank": INTENDED_RANKS[name]}
            )
        found[name] = pass_class()
    return found


@pytest.mark.parametrize("ranked", [False, True], ids=["as-declared", "intended-ranks"])
def test_every_builtin_subset_plans_as_before(ranked: bool) -> None:
    passes = _builtins(ranked)
    for size in range(1, len(BUILTINS) + 1):
        for subset in itertools.combinations(BUILTINS, size):
            expected = PLANS_BEFORE[",".join(sorted(subset))]
            for request in itertools.permutations(subset):
                assert _names(plan_order([passes[n] for n in request])) == expected, request


def test_builtin_relations_are_consistent() -> None:
    classes = [load_pass_class(name) for name in BUILTINS]
    assert relation_problems(classes) == []


def test_why_lowrank_runs_before_sparsify() -> None:
    passes = _builtins(ranked=True)
    planned = plan_order(list(passes.values()))
    assert plan_reasons(planned) == [
        "cleanup before lowrank: declared (cleanup.run_before, lowrank.run_after)",
        "lowrank before sparsify: rank structure before values",
        "sparsify before quant: declared (quant.run_after, sparsify.run_before)",
        "quant before fp16: declared (fp16.run_after, quant.run_before)",
    ]


def test_an_undeclared_lossy_plugin_runs_before_fp16_and_after_exact_passes() -> None:
    passes = _builtins(ranked=True)
    plugin = _fake("anoise")  # lossy, no rank, no relation: VALUES
    exact_plugin = _fake("zrename", exact=True)  # exact, no rank: EXACT
    planned = plan_order([passes["fp16"], passes["quant"], plugin, exact_plugin])
    assert _names(planned) == "zrename anoise quant fp16"


def test_exact_passes_run_first_whatever_their_names() -> None:
    # before ranks, the tie-break was the name: "aaa" ran before "zzz" although it is lossy
    assert _names(plan_order([_fake("aaa"), _fake("zzz", exact=True)])) == "zzz aaa"


def test_rank_orders_unrelated_passes_and_name_breaks_equal_ranks() -> None:
    values = _fake("aaa", rank=OrderRank.VALUES)
    structure = _fake("zzz", rank=OrderRank.STRUCTURE)
    same = _fake("bbb", rank=OrderRank.VALUES)
    for request in itertools.permutations([values, structure, same]):
        assert _names(plan_order(list(request))) == "zzz aaa bbb"


def test_a_relation_beats_rank() -> None:
    structure = _fake("factor", rank=OrderRank.STRUCTURE, after={"mask"})
    values = _fake("mask", rank=OrderRank.VALUES)
    assert _names(plan_order([structure, values])) == "mask factor"
    assert plan_reasons(plan_order([structure, values])) == [
        "mask before factor: declared (factor.run_after)"
    ]


def test_a_plan_of_a_prefix_is_the_prefix() -> None:
    planned = plan_order(list(_builtins(ranked=True).values()))
    for count in range(1, len(planned) + 1):
        assert plan_order(planned[:count]) == planned[:count]


def test_contradiction_names_the_cycle_not_the_passes_behind_it() -> None:
    passes = [
        _fake("a", before={"b"}, after={"c"}),
        _fake("c", after={"b"}),
        _fake("b"),
        _fake("d", after={"a"}),  # stuck behind the cycle, not on it
    ]
    with pytest.raises(PlanError) as raised:
        plan_order(passes)
    assert str(raised.value) == (
        "passes a, b, c have contradictory ordering constraints: a before b (a.run_before); "
        "b before c (c.run_after); c before a (a.run_after)"
    )


def test_contradiction_message_lists_each_relation_with_its_declarers() -> None:
    passes = [_fake("x", before={"y"}), _fake("y", before={"z"}), _fake("z", before={"x"})]
    for request in itertools.permutations(passes):
        with pytest.raises(PlanError) as raised:
            plan_order(list(request))
        assert str(raised.value) == (
            "passes x, y, z have contradictory ordering constraints: x before y (x.run_before); "
            "y before z (y.run_before); z before x (z.run_before)"
        )


def test_a_pass_ordered_against_itself_is_a_contradiction() -> None:
    with pytest.raises(
        PlanError, match=r"^pass a has contradictory .*: a before a \(a.run_after\)"
    ):
        plan_order([_fake("a", after={"a"}), _fake("b")])


def test_relations_from_both_sides_are_one_relation() -> None:
    passes = [_fake("a", before={"b", "absent"}), _fake("b", after={"a"})]
    assert declared_relations(passes, among={"a", "b"}) == [
        Relation("a", "b", ("a.run_before", "b.run_after"))
    ]
    assert [r.later for r in declared_relations(passes)] == ["absent", "b"]


def test_malformed_declarations_are_plan_errors() -> None:
    with pytest.raises(PlanError, match="pass 'a': run_after must be a set of pass names"):
        stringly = _fake("a")
        type(stringly).run_after = "cleanup"  # type: ignore[assignment,misc]  # not a set
        plan_order([stringly])
    with pytest.raises(PlanError, match="pass 'a': order_rank 'first' is not an OrderRank"):
        plan_order([_fake("a", rank="first")])


def test_relation_problems_name_unknown_passes_and_cycles() -> None:
    typo = _fake("mine", after={"cleanp"})
    assert relation_problems([typo, _fake("cleanup", exact=True)]) == [
        "cleanp before mine (mine.run_after): no pass named 'cleanp'"
    ]
    cycle = [_fake("a", before={"b"}), _fake("b", before={"a"})]
    assert relation_problems(cycle) == [
        "passes a, b have contradictory ordering constraints: a before b (a.run_before); "
        "b before a (b.run_before)"
    ]


# --- given orders (rule 5) -------------------------------------------------------------------


def test_a_given_order_is_kept_when_it_breaks_no_relation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    passes = _builtins(ranked=True)
    request = [passes[name] for name in ("cleanup", "sparsify", "lowrank", "quant")]
    with caplog.at_level(logging.INFO, logger="graphopt.passkit.ordering"):
        planned = plan_order(request, order="given")
    assert _names(planned) == "cleanup sparsify lowrank quant"
    assert "order as given: cleanup → sparsify → lowrank → quant" in caplog.text
    assert "planned order would be cleanup → lowrank → sparsify → quant" in caplog.text
    assert plan_reasons(planned, given=True)[1] == (
        "sparsify before lowrank: as given (no relation between them)"
    )


def test_a_given_order_that_breaks_relations_is_refused_not_resorted() -> None:
    passes = _builtins(ranked=False)
    request = [passes[name] for name in ("quant", "lowrank", "cleanup")]
    with pytest.raises(PlanError) as raised:
        plan_order(request, order="given")
    assert str(raised.value) == (
        "the given order quant, lowrank, cleanup breaks declared ordering: "
        "cleanup before lowrank (cleanup.run_before, lowrank.run_after); "
        "cleanup before quant (cleanup.run_before, quant.run_after); "
        "lowrank before quant (lowrank.run_before, quant.run_after)"
    )
    # the default still sorts the same request
    assert _names(plan_order(request)) == "cleanup lowrank quant"


def test_a_given_order_ignores_relations_to_unrequested_passes() -> None:
    request = [_fake("quant", after={"lowrank"}), _fake("cleanup", exact=True, before={"lowrank"})]
    assert _names(plan_order(request, order="given")) == "quant cleanup"


def test_a_given_order_still_reports_contradictions_and_duplicates() -> None:
    with pytest.raises(PlanError, match="contradictory ordering constraints: a before b"):
        plan_order([_fake("a", before={"b"}), _fake("b", before={"a"})], order="given")
    with pytest.raises(PlanError, match="pass 'a' is requested twice"):
        plan_order([_fake("a"), _fake("a")], order="given")


def test_unknown_order_mode() -> None:
    with pytest.raises(OptionError, match="order must be one of planned, given, not 'sorted'"):
        plan_order([_fake("a")], order="sorted")  # type: ignore[arg-type]


def test_manager_runs_a_given_order(mlp_model: onnx.ModelProto) -> None:
    second, first = _fake("b", rank=OrderRank.CAST), _fake("a", rank=OrderRank.EXACT)
    manager = PassManager([second, first], order="given")
    assert manager.plan == ["b", "a"]
    _, report = manager.run(model_from_proto(mlp_model))
    assert [record.name for record in report.records] == ["b", "a"]
    assert PassManager([second, first]).plan == ["a", "b"]
