"""``quant`` rule 5 made cheaper (issue 18.4): the accuracy loop runs each plan's variant only
downstream of its changes (:mod:`graphopt.passkit.probe`), and must score exactly what a whole
re-run of the variant scores, so the loop's decisions and the quantized model stay the same."""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt.check.validate import Criteria, MetricAccumulator, sample_count
from graphopt.data.feeds import Feeds, input_specs, open_data
from graphopt.ir.model import Model, model_from_proto, runnable_model, save_model
from graphopt.ir.normalize import normalize
from graphopt.ir.ort import make_session
from graphopt.ir.weights import set_storage
from graphopt.passkit.api import PassContext
from graphopt.passkit.probe import changed_region, node_signatures
from graphopt.settings import Settings
from passes.quant import Candidate, QuantPass, _Evaluator, _node_map, _rebind

from ..conftest import float_input, make_model, relu_mlp, weight


def _residual_branch() -> onnx.ModelProto:
    """x → mm1 → Relu → mm2 → + x (residual) → mm3 → y; x → side (a branch) → z; out = y + z."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="mm2"),
        helper.make_node("Add", ["h2", "x"], ["s"], name="residual"),
        helper.make_node("MatMul", ["s", "W3"], ["y"], name="mm3"),
        helper.make_node("MatMul", ["x", "Ws"], ["z"], name="side"),
        helper.make_node("Add", ["y", "z"], ["out"], name="join"),
    ]
    return make_model(
        nodes,
        [float_input("x", ["n", 16])],
        [float_input("out", ["n", 8])],
        [
            weight("W1", (16, 32), 1),
            weight("W2", (32, 16), 2),
            weight("W3", (16, 8), 3),
            weight("Ws", (16, 8), 4),
        ],
    )


def _output_heads() -> onnx.ModelProto:
    """Two outputs: ``h`` written by mm1 (and read further), ``y`` by mm2: a probe of mm2 leaves
    ``h`` to the float model, a probe of mm1 changes both."""
    model = relu_mlp(16, 32, 8, batch="n")
    model.graph.output.insert(0, float_input("h", ["n", 32]))
    return model


def _body(name: str, seed: int) -> onnx.GraphProto:
    """A branch reading the outer ``x`` through a MatMul on its own weight."""
    values = np.random.default_rng(seed).standard_normal((16, 32)).astype(np.float32)
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_out"], name=f"{name}_mm")],
        name,
        [],
        [float_input(f"{name}_out", ["n", 32])],
        [numpy_helper.from_array(values, f"{name}_w")],
    )


def _if_then_head() -> onnx.ModelProto:
    """x → If(flag){MatMul}{MatMul} → Relu → head MatMul → y: candidates in bodies (dynamic)
    and one in the main graph downstream of the If."""
    nodes = [
        helper.make_node(
            "If",
            ["flag"],
            ["branch"],
            name="choose",
            then_branch=_body("then", 5),
            else_branch=_body("else", 6),
        ),
        helper.make_node("Relu", ["branch"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "Wh"], ["y"], name="head"),
    ]
    return make_model(
        nodes,
        [float_input("x", ["n", 16]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [float_input("y", ["n", 8])],
        [weight("Wh", (32, 8), 7)],
    )


def _batches(proto: onnx.ModelProto, batches: int = 8) -> list[dict[str, np.ndarray]]:
    """Feeds of one to four samples, so the held-aside ones differ in shape like sentences."""
    rng = np.random.default_rng(0)
    feeds = []
    for index in range(batches):
        feed: dict[str, np.ndarray] = {}
        for value in proto.graph.input:
            if value.type.tensor_type.elem_type == TensorProto.BOOL:
                feed[value.name] = np.array(True)
            else:
                feed[value.name] = rng.standard_normal((1 + index % 4, 16)).astype(np.float32)
        feeds.append(feed)
    return feeds


def _model(proto: onnx.ModelProto) -> Model:
    model = model_from_proto(proto)
    normalize(model, materialize_weights=True)
    return model


def _data(model: Model, proto: onnx.ModelProto) -> Feeds:
    return open_data(_batches(proto), input_specs(model.graph))


def _whole_score(
    quant: QuantPass,
    model: Model,
    plan: list[Candidate],
    ranges: dict[str, tuple[float, float]],
    feeds: Feeds,
) -> float:
    """The loop's figure the way it was computed before issue 18: the float model and the
    whole variant, each in its own session, over every feed."""
    variant = replace(model, graph=model.graph.copy())
    mapping = _node_map(variant.graph)
    quant._apply(variant.graph, [_rebind(c, mapping) for c in plan], ranges)
    outputs = []
    for each in (model, variant):
        with runnable_model(each) as runnable:
            session = make_session(runnable, optimize=False)
            outputs.append([session.run(None, dict(feed)) for feed in feeds])
    accumulators = [
        MetricAccumulator(str(index), "cpu", Criteria(), seed=0)
        for index in range(len(outputs[0][0]))
    ]
    for feed, reference_batch, candidate_batch in zip(feeds, *outputs, strict=True):
        for accumulator, reference, candidate in zip(
            accumulators, reference_batch, candidate_batch, strict=True
        ):
            accumulator.add(reference, candidate, samples=sample_count(feed))
    return min(a.finish().agreement.score for a in accumulators)


def _search_inputs(
    proto: onnx.ModelProto, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> dict[str, Any]:
    """Run the pass up to its accuracy loop and capture what the loop is given (the pass
    stops there, leaving the model float)."""
    captured: dict[str, Any] = {}

    def capture(
        self: QuantPass, model: Model, chosen: Any, ranges: Any, held: Feeds, *_: Any
    ) -> Any:
        captured.update(quant=self, model=model, chosen=chosen, ranges=ranges, held=held)
        raise _Stop

    monkeypatch.setattr(QuantPass, "_accuracy_search", capture)
    model = _model(proto)
    options = {"min_macs": 0, "calibrator": "minmax", "target_cosine": 0.9999, **options}
    with pytest.raises(_Stop):
        QuantPass(options).call(model, PassContext(data=_data(model, proto)))
    return captured


class _Stop(Exception):
    """Ends a pass run once its accuracy loop's inputs are captured."""


@pytest.mark.parametrize(
    "build", [_residual_branch, _output_heads, _if_then_head], ids=["residual", "heads", "if"]
)
def test_each_plan_scores_what_a_whole_rerun_scores(
    build: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _search_inputs(build(), monkeypatch)
    quant, model, chosen, ranges, held = (
        captured[key] for key in ("quant", "model", "chosen", "ranges", "held")
    )
    plans = [[c] for c in chosen] + [chosen, chosen[1:], chosen[:1], []]
    with _Evaluator(model, held) as evaluator:
        evaluator.prepare(quant, [[c] for c in chosen], ranges)
        for plan in plans:
            names = [c.node.name for c in plan]
            assert evaluator.score(quant, plan, ranges) == _whole_score(
                quant, model, plan, ranges, held
            ), names
        stats = evaluator.runner.stats
    assert stats.regions >= len(chosen) and stats.skipped_nodes > 0


def test_regions_skip_upstream_nodes_and_read_the_boundary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mm3's probe runs mm3, its Q/DQ and the join, fed ``s`` and ``z`` from the float model;
    the side branch's probe reads the graph input and ``y``."""
    captured = _search_inputs(_residual_branch(), monkeypatch)
    quant, model, chosen, ranges, held = (
        captured[key] for key in ("quant", "model", "chosen", "ranges", "held")
    )
    signatures = node_signatures(model.graph)
    assert signatures is not None
    by_name = {c.node.name: c for c in chosen}
    with _Evaluator(model, held) as evaluator:
        mm3 = changed_region(signatures, evaluator.variant(quant, [by_name["mm3"]], ranges).graph)
        side = changed_region(signatures, evaluator.variant(quant, [by_name["side"]], ranges).graph)
    assert mm3 is not None and side is not None
    assert {t.name for t in mm3.boundary} == {"s", "z"}
    assert {n.op for n in mm3.nodes} == {"QuantizeLinear", "DequantizeLinear", "MatMul", "Add"}
    assert "mm1" not in {n.name for n in mm3.nodes} and mm3.outputs == ["out"]
    assert {t.name for t in side.boundary} == {"x", "y"}


def test_a_changed_body_puts_its_control_flow_node_in_the_region(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    captured = _search_inputs(_if_then_head(), monkeypatch)
    quant, model, chosen, ranges, held = (
        captured[key] for key in ("quant", "model", "chosen", "ranges", "held")
    )
    body = next(c for c in chosen if c.body is not None)
    head = next(c for c in chosen if c.node.name == "head")
    signatures = node_signatures(model.graph)
    assert signatures is not None
    with _Evaluator(model, held) as evaluator:
        inside = changed_region(signatures, evaluator.variant(quant, [body], ranges).graph)
        after = changed_region(signatures, evaluator.variant(quant, [head], ranges).graph)
    assert inside is not None and after is not None
    assert "choose" in {n.name for n in inside.nodes}
    assert {t.name for t in inside.boundary} == {"flag", "x"}  # x: read inside the bodies
    assert "choose" not in {n.name for n in after.nodes}
    assert {t.name for t in after.boundary} == {"r"}


def test_a_reader_of_a_changed_tensor_through_a_body_joins_the_region() -> None:
    """``post`` reads ``h`` only as an outer-scope name inside its branches."""
    branch = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["b_out"], name="inner")],
        "branch",
        [],
        [float_input("b_out", ["n", 32])],
    )
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node(
                "If", ["flag"], ["y"], name="post", then_branch=branch, else_branch=branch
            ),
        ],
        [float_input("x", ["n", 16]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [float_input("y", ["n", 32])],
        [weight("W1", (16, 32), 1)],
    )
    model = _model(proto)
    signatures = node_signatures(model.graph)
    assert signatures is not None
    variant = model.graph.copy()
    node = next(n for n in variant.nodes if n.name == "mm1")
    node.inputs[1] = gs.Constant("W1_other", np.ones((16, 32), np.float32))
    region = changed_region(signatures, variant)
    assert region is not None
    assert [n.name for n in region.nodes] == ["mm1", "post"]
    assert {t.name for t in region.boundary} == {"x", "flag"}


def test_a_small_cache_runs_what_does_not_fit_whole_with_the_same_scores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With room for the feeds and only some boundaries, the probes that skip the most nodes
    are cached first; the others run whole, and every score stays the same."""
    captured = _search_inputs(_residual_branch(), monkeypatch)
    quant, model, chosen, ranges, held = (
        captured[key] for key in ("quant", "model", "chosen", "ranges", "held")
    )
    feed_bytes = sum(v.nbytes for feed in held for v in feed.values())
    boundary_bytes = sum(feed["x"].shape[0] * 8 * 4 for feed in held)  # one [n, 8] tensor
    budget = feed_bytes + boundary_bytes * 2
    with _Evaluator(model, held, budget_bytes=budget) as evaluator:
        evaluator.prepare(quant, [[c] for c in chosen], ranges)
        scores = {c.node.name: evaluator.score(quant, [c], ranges) for c in chosen}
        assert 0 < evaluator.runner.stats.regions < len(chosen)  # some fit, some did not
    for candidate in chosen:
        assert scores[candidate.node.name] == _whole_score(quant, model, [candidate], ranges, held)


def _run_pass(
    proto: onnx.ModelProto,
    tmp_path: Path,
    label: str,
    settings: Settings | None = None,
    **options: Any,
) -> tuple[dict[str, Any], bytes]:
    model = _model(proto)
    options = {"min_macs": 0, "calibrator": "minmax", **options}
    context = PassContext(data=_data(model, proto), settings=settings or Settings())
    result = QuantPass(options)(model, context)
    out = tmp_path / f"{label}.onnx"
    save_model(result.model, out)
    return result.stats, out.read_bytes()


@pytest.mark.parametrize("fallback", ["float", "dynamic"])
def test_the_loop_decides_as_with_whole_reruns(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fallback: str,
) -> None:
    """The same nodes go back to float (or dynamic) with the same harm, and the saved model
    has the same bytes, whether probes run their changed region or (no cache, the settings'
    ``probe_cache_bytes=0``) the whole model."""
    proto = _residual_branch()
    with caplog.at_level(logging.INFO, logger="passes.quant"):
        fast, fast_bytes = _run_pass(
            proto, tmp_path, "fast", target_cosine=0.99995, fallback=fallback
        )
    match = re.search(r"\((\d+) as their changed region", caplog.text)
    assert match is not None and int(match.group(1)) > 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="passes.quant"):
        whole, whole_bytes = _run_pass(
            proto,
            tmp_path,
            "whole",
            Settings(probe_cache_bytes=0),
            target_cosine=0.99995,
            fallback=fallback,
        )
    assert "(0 as their changed region" in caplog.text
    moved = set(fast.get("excluded_for_accuracy", {})) | set(fast.get("dynamic_for_accuracy", []))
    assert moved, "the target should move some node"
    assert fast == whole
    assert fast_bytes == whole_bytes


def test_new_values_under_an_old_name_change_the_node() -> None:
    """A constant given other storage keeps its name; its reader is in the region all the same."""
    proto = _output_heads()
    model = _model(proto)
    signatures = node_signatures(model.graph)
    assert signatures is not None
    variant = model.graph.copy()
    node = next(n for n in variant.nodes if n.name == "mm2")
    set_storage(node.inputs[1], np.zeros((32, 8), np.float32))
    region = changed_region(signatures, variant)
    assert region is not None
    assert [n.name for n in region.nodes] == ["mm2"] and region.outputs == ["y"]
    assert {t.name for t in region.boundary} == {"r"}
