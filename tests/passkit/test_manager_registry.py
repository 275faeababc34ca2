"""Pass contract, planning, invariant checks, error naming, built-in table and plugins."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs
import pytest

from graphopt.errors import InputError, OptionError, PassError, PlanError, UnknownPassError
from graphopt.ir.model import Model, model_from_proto
from graphopt.passkit.api import Pass, PassContext, PassResult, WeightClaims
from graphopt.passkit.manager import PassManager, plan_order
from graphopt.passkit.options import Option, parse_option_assignments
from graphopt.passkit.registry import available_pass_names, load_pass_class


def _fake(name: str, before: set[str] = frozenset(), after: set[str] = frozenset()) -> Pass:  # type: ignore[assignment]
    class Fake(Pass):
        exact: ClassVar[bool] = True
        summary: ClassVar[str] = "test"

        def call(self, model: Model, context: PassContext) -> PassResult:
            return PassResult(model, False, {"ran": True})

    Fake.name = name  # type: ignore[misc]
    Fake.run_before = frozenset(before)  # type: ignore[misc]
    Fake.run_after = frozenset(after)  # type: ignore[misc]
    return Fake()


def test_plan_follows_constraints_whatever_the_request_order() -> None:
    quant = _fake("quant", after={"lowrank", "sparsify"})
    lowrank = _fake("lowrank", before={"quant"})
    fp16 = _fake("fp16", after={"quant", "lowrank", "sparsify", "cleanup"})
    cleanup = _fake("cleanup", before={"quant", "lowrank", "fp16", "sparsify"})
    expected = ["cleanup", "lowrank", "quant", "fp16"]
    assert [p.name for p in plan_order([quant, lowrank, fp16, cleanup])] == expected
    assert [p.name for p in plan_order([fp16, cleanup, quant, lowrank])] == expected


def test_plan_ignores_constraints_on_unrequested_passes() -> None:
    assert [p.name for p in plan_order([_fake("quant", after={"lowrank"})])] == ["quant"]


def test_plan_rejects_cycles_and_duplicates() -> None:
    with pytest.raises(PlanError, match="contradictory"):
        plan_order([_fake("a", before={"b"}), _fake("b", before={"a"})])
    with pytest.raises(PlanError, match="twice"):
        plan_order([_fake("a"), _fake("a")])


def test_failure_names_the_pass_and_what_ran_before(mlp_model: onnx.ModelProto) -> None:
    class Broken(Pass):
        name: ClassVar[str] = "broken"
        summary: ClassVar[str] = "raises"
        exact: ClassVar[bool] = True
        run_after: ClassVar[frozenset[str]] = frozenset({"first", "second"})

        def call(self, model: Model, context: PassContext) -> PassResult:
            raise RuntimeError("boom")

    manager = PassManager([Broken(), _fake("second"), _fake("first")])
    with pytest.raises(PassError, match=r"pass 'broken' failed after \[first, second\]: .*boom"):
        manager.run(model_from_proto(mlp_model))


def test_invariant_violation_is_reported(mlp_model: onnx.ModelProto) -> None:
    class Corrupt(Pass):
        name: ClassVar[str] = "corrupt"
        summary: ClassVar[str] = "adds a node with an unknown standard op"
        exact: ClassVar[bool] = True

        def call(self, model: Model, context: PassContext) -> PassResult:
            graph = model.graph
            out = graph.outputs[0]
            bogus = gs.Variable("bogus", dtype=out.dtype)
            graph.nodes.append(gs.Node("NoSuchOp", inputs=[out], outputs=[bogus]))
            graph.outputs.append(bogus)
            return PassResult(model, True)

    with pytest.raises(PassError, match=r"pass 'corrupt' failed after \[\]: graph is invalid"):
        PassManager([Corrupt()]).run(model_from_proto(mlp_model))


def test_records_stats_and_time(mlp_model: onnx.ModelProto) -> None:
    _, report = PassManager([_fake("a"), _fake("b", after={"a"})]).run(model_from_proto(mlp_model))
    assert [r.name for r in report.records] == ["a", "b"]
    assert all(r.stats == {"ran": True} and r.seconds >= 0 for r in report.records)


def test_options_schema_validation() -> None:
    class WithOptions(Pass):
        name: ClassVar[str] = "opt"
        summary: ClassVar[str] = "options"
        exact: ClassVar[bool] = False
        options_schema: ClassVar[tuple[Option, ...]] = (
            Option("ratio", float, 0.5, "fraction kept", minimum=0.0, maximum=1.0),
            Option("mode", str, "a", "mode", choices=("a", "b")),
            Option("layers", list, [], "names"),
            Option("rank", int, 8, "rank", minimum=1),
        )

        def call(self, model: Model, context: PassContext) -> PassResult:
            return PassResult(model, False)

    parsed = WithOptions({"ratio": "0.75", "mode": "b", "layers": "x,y", "rank": "16"}).options
    assert parsed == {"ratio": 0.75, "mode": "b", "layers": ["x", "y"], "rank": 16}
    for bad, pattern in [
        ({"ratio": "1.5"}, "opt.ratio: 1.5 is out of range"),
        ({"mode": "c"}, "opt.mode: 'c' is not allowed"),
        ({"rank": "2.5"}, "opt.rank: expected an integer"),
        ({"nope": 1}, "pass 'opt' has no option 'nope'"),
    ]:
        with pytest.raises(OptionError, match=pattern):
            WithOptions(bad)


def test_option_assignment_parsing() -> None:
    assert parse_option_assignments(["lowrank.ratio=0.75", "quant.per_channel=false"]) == {
        "lowrank": {"ratio": "0.75"},
        "quant": {"per_channel": "false"},
    }
    with pytest.raises(OptionError, match="PASS.KEY=VALUE"):
        parse_option_assignments(["ratio=0.75"])


def test_weight_claims_first_pass_wins() -> None:
    claims = WeightClaims()
    assert claims.claim("W", "lowrank")
    assert claims.claim("W", "lowrank")
    assert not claims.claim("W", "sparsify")
    assert claims.owner("W") == "lowrank"


def test_builtin_table_and_unknown_pass() -> None:
    assert available_pass_names()[0] == "cleanup"
    assert load_pass_class("cleanup").name == "cleanup"
    with pytest.raises(UnknownPassError, match="unknown pass 'nope' \\(available: cleanup"):
        load_pass_class("nope")


def test_plugin_is_listed_without_import_and_loaded_when_named(
    installed_plugin: str, mlp_model: onnx.ModelProto
) -> None:
    assert "rename" in available_pass_names()
    assert installed_plugin not in sys.modules
    pass_class = load_pass_class("rename")
    assert installed_plugin in sys.modules
    model, report = PassManager([pass_class()]).run(model_from_proto(mlp_model))
    assert model.graph.name == "renamed"
    assert report.records[0].stats == {"renamed": 1}


def test_plugin_that_fails_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "broken_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[graphopt.passes]\nbroken = no_such_module:Pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InputError, match="plugin pass 'broken' .* failed to import"):
        load_pass_class("broken")
