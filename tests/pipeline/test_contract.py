"""Contract tier: every built-in pass over every model of the zoo (``models/zoo``), in process.

One test per (zoo entry, plan). Run one case with its id, e.g.
``python -m pytest "tests/pipeline/test_contract.py::test_contract[yolo_head_op17-cleanup+quant]"``;
the torch exports are marked ``slow`` (``-m slow``) except one TorchScript and one dynamo
export. The contract, checked on every run of
:func:`graphopt.optimize` with small seeded feeds:

1. No crash. An :class:`~graphopt.errors.InputError` refusal is accepted only where the zoo entry
   declares that the model honestly cannot be processed (``may_refuse``), and then its message
   is one line that gives a reason.
2. The input files (model and external data) are unchanged, byte for byte.
3. The output passes ``onnx.checker`` (full check) and loads and runs in ONNX Runtime with its
   default optimizations.
4. Exact plans: validation ran with exact criteria and passed, and the output files are no larger
   than the input files.
5. Lossy plans: every MatMul/Gemm/Conv with a constant weight (main graph and every body) that the
   pass handles but left alone is named in a log record that gives a reason.
6. Lossy plans: validation reached a verdict. ``quant`` (accuracy-driven by default) and ``fp16``
   (data-aware blocking) promise their budget at defaults, so they must meet the gate;
   ``lowrank`` and ``sparsify`` have no accuracy loop and may fail it honestly on random weights.
7. Lossy plans, honest gate: when validation passes, the test's own check agrees: on every output
   the cosine of each slice along each axis of 2-256 entries (not the batch axis) that holds at
   least 16 elements over all feeds is at least the criteria's ``min_cosine`` (a detector's class
   rows must not hide behind its box rows).

The zoo's layers are tiny, so the size thresholds that make passes skip small layers are turned
off (:data:`TINY_MODEL_OPTIONS`); otherwise every lossy pass would only log "too small".
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from graphopt import InputError, optimize
from models.zoo import ZooEntry, copy_model, model_files, zoo_entries

from ..conftest import run_ort

PLANS = ("cleanup", "quant", "lowrank", "sparsify", "fp16", "cleanup,quant")
TINY_MODEL_OPTIONS: dict[str, dict[str, object]] = {
    "quant": {"min_macs": 0.0},
    "lowrank": {"min_size": 0},
}
"""Per-pass options for tiny layers: quant's MAC floor and lowrank's matrix-size floor off."""
EXACT_PASSES = frozenset({"cleanup"})
GATE_PROMISED = frozenset({"quant", "fp16"})
"""Lossy passes that must meet their validation budget at defaults (rule 6)."""
WEIGHT_OPS: dict[str, frozenset[str]] = {
    "quant": frozenset({"MatMul", "Gemm", "Conv"}),
    "lowrank": frozenset({"MatMul", "Gemm"}),
    "sparsify": frozenset({"MatMul", "Gemm", "Conv"}),
    "fp16": frozenset({"MatMul", "Gemm", "Conv"}),
}
"""Op types each lossy pass handles (rule 5)."""
MAX_SLICE_AXIS = 256
MIN_SLICE_ELEMENTS = 16
"""Rule 7: a slice is judged once it holds this many elements over all feeds (as the gate)."""
SUBGRAPH_ATTRS = ("then_branch", "else_branch", "body")


def _cases() -> Iterator[object]:
    for entry in zoo_entries():
        for plan in PLANS:
            case_id = f"{entry.name}-{plan.replace(',', '+')}"
            yield pytest.param(
                entry, plan, id=case_id, marks=[pytest.mark.slow] if entry.slow else []
            )


class ZooBuilds:
    """Each zoo model built once per test session, into its own folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def path(self, entry: ZooEntry) -> Path:
        if entry.name not in self._built:
            self._built[entry.name] = entry.build_in(self.root / entry.name)
        return self._built[entry.name]


@pytest.fixture(scope="session")
def zoo_builds(tmp_path_factory: pytest.TempPathFactory) -> ZooBuilds:
    return ZooBuilds(tmp_path_factory.mktemp("zoo"))


@pytest.mark.parametrize(("entry", "plan"), list(_cases()))
def test_contract(
    entry: ZooEntry,
    plan: str,
    zoo_builds: ZooBuilds,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    passes = plan.split(",")
    source = copy_model(zoo_builds.path(entry), tmp_path / "in")
    digest_before = _digest(source)
    input_bytes = _bytes(source)
    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    feeds = entry.make_feeds()
    data = None if entry.synthesize else _data_for(entry, feeds, tmp_path)
    options = {name: TINY_MODEL_OPTIONS[name] for name in passes if name in TINY_MODEL_OPTIONS}
    caplog.set_level(logging.DEBUG)

    violations: list[str] = []
    try:
        report = optimize(source, target, passes, options=options, data=data, seed=0)
    except InputError as error:
        report = None
        violations += _judge_refusal(entry, plan, error)
    except Exception as error:  # rule 1: anything else is a crash
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise AssertionError(f"crashed: {type(error).__name__}: {detail}") from error
    finally:
        if _digest(source) != digest_before:  # rule 2
            violations.append("the input files changed")
    if report is not None:
        violations += _judge_output(target, feeds)
        if violations:  # an invalid output makes the later checks meaningless
            pytest.fail("; ".join(violations))
        if set(passes) <= EXACT_PASSES:
            violations += _judge_exact(report, input_bytes, _bytes(target))
        else:
            lossy = [name for name in passes if name not in EXACT_PASSES]
            violations += _judge_left_alone(source, target, lossy, caplog.records)
            violations += _judge_gate(report, lossy, source, target, feeds)
    assert not violations, "; ".join(violations)


# -- data ----------------------------------------------------------------------------------------


def _data_for(entry: ZooEntry, feeds: list[dict[str, np.ndarray]], folder: Path) -> object:
    if not entry.as_npz:
        return feeds
    path = folder / "data.npz"
    np.savez(path, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    return str(path)


# -- rule 1 and 2 --------------------------------------------------------------------------------


def _judge_refusal(entry: ZooEntry, plan: str, error: InputError) -> list[str]:
    message = str(error)
    if plan not in entry.may_refuse:
        return [f"refused: {message.splitlines()[0] if message else type(error).__name__}"]
    problems = []
    if "\n" in message.strip():
        problems.append(f"refusal message is not one line: {message!r}")
    if len(message.split()) < 4:
        problems.append(f"refusal message gives no reason: {message!r}")
    return problems


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in model_files(path):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in model_files(path))


# -- rule 3 --------------------------------------------------------------------------------------


def _judge_output(target: Path, feeds: list[dict[str, np.ndarray]]) -> list[str]:
    if not target.is_file():
        return ["no output file was written"]
    try:
        onnx.checker.check_model(str(target), full_check=True)
    except Exception as error:
        return [f"onnx.checker rejects the output: {_first_line(error)}"]
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(target), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds[0])
    except Exception as error:
        return [f"the output does not load/run in onnxruntime: {_first_line(error)}"]
    return []


# -- rule 4 --------------------------------------------------------------------------------------


def _judge_exact(report: object, input_bytes: int, output_bytes: int) -> list[str]:
    problems = []
    validation = report.validation  # type: ignore[attr-defined]
    if validation is None or not validation.criteria.exact:
        problems.append("an exact plan was not validated with exact criteria")
    elif not validation.passed:
        problems.append(f"exact plan not exact: {'; '.join(validation.failures())[:300]}")
    if output_bytes > input_bytes:
        problems.append(f"exact plan grew the model: {input_bytes} -> {output_bytes} bytes")
    return problems


# -- rule 5 --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightedNode:
    """A MatMul/Gemm/Conv whose second input resolves to a constant, found by its first output."""

    op: str
    name: str
    output: str
    weight: np.ndarray | None


def _weighted_nodes(path: Path) -> dict[str, WeightedNode]:
    """Every MatMul/Gemm/Conv in every graph, keyed by first output, with its constant weight."""
    proto = onnx.load(str(path))
    found: dict[str, WeightedNode] = {}
    _walk(proto.graph, {}, found)
    return found


def _walk(
    graph: onnx.GraphProto, outer: Mapping[str, np.ndarray], found: dict[str, WeightedNode]
) -> None:
    constants = dict(outer)
    for tensor in graph.initializer:
        constants[tensor.name] = numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None:
                constants[node.output[0]] = value
        elif node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
        if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1:
            found[node.output[0]] = WeightedNode(
                node.op_type, node.name, node.output[0], constants.get(node.input[1])
            )
        for attribute in node.attribute:
            if attribute.name in SUBGRAPH_ATTRS and attribute.HasField("g"):
                _walk(attribute.g, constants, found)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(onnx.helper.get_attribute_value(attribute))
    return None


def _normalized_names(source: Path) -> dict[str, str]:
    """First output name → the node's name after graphopt's normalization (its identity)."""
    from graphopt.ir.model import iter_graphs
    from graphopt.ir.normalize import load_normalized

    try:
        model, _ = load_normalized(source, materialize_weights=True)
    except Exception:  # the refusal or crash is reported by the other rules
        return {}
    return {
        node.outputs[0].name: node.name
        for graph in iter_graphs(model.graph)
        for node in graph.nodes
        if node.outputs
    }


def _judge_left_alone(
    source: Path, target: Path, lossy: list[str], records: list[logging.LogRecord]
) -> list[str]:
    handled = frozenset().union(*(WEIGHT_OPS.get(name, frozenset()) for name in lossy))
    before = _weighted_nodes(source)
    after = _weighted_nodes(target)
    names = _normalized_names(source)
    messages = [record.getMessage() for record in records]
    silent = []
    for output, node in before.items():
        if node.op not in handled or node.weight is None:
            continue
        kept = after.get(output)
        if kept is None or kept.op != node.op or not _same(kept.weight, node.weight):
            continue  # the pass rewrote it (or removed it)
        label = names.get(output) if names else node.name  # the normalized name is the identity
        labels = [label] if label else []
        if not any(_gives_reason(message, label) for message in messages for label in labels):
            silent.append(labels[0] if labels else output)
    if not silent:
        return []
    shown = ", ".join(silent[:6]) + (f" (+{len(silent) - 6} more)" if len(silent) > 6 else "")
    return [f"{len(silent)} weighted node(s) left alone without a logged reason: {shown}"]


def _same(left: np.ndarray | None, right: np.ndarray) -> bool:
    return (
        left is not None
        and left.dtype == right.dtype
        and left.shape == right.shape
        and bool(np.array_equal(left, right))
    )


def _gives_reason(message: str, label: str) -> bool:
    """The message names ``label`` as a whole token and says something more about it."""
    pattern = rf"(?<![\w.-]){re.escape(label)}(?![\w.-])"
    if not re.search(pattern, message):
        return False
    return len(re.sub(pattern, "", message).split()) >= 3


# -- rules 6 and 7 -------------------------------------------------------------------------------


def _judge_gate(
    report: object,
    lossy: list[str],
    source: Path,
    target: Path,
    feeds: list[dict[str, np.ndarray]],
) -> list[str]:
    validation = report.validation  # type: ignore[attr-defined]
    if validation is None:
        return ["a lossy plan was not validated"]
    if not validation.passed:
        promised = sorted(set(lossy) & GATE_PROMISED)
        if promised:
            return [
                f"{'+'.join(promised)} failed its validation gate: "
                f"{'; '.join(validation.failures())[:300]}"
            ]
        return []
    worst = _worst_slice(source, target, feeds)
    if worst is not None and worst[0] < validation.criteria.min_cosine:
        cosine, where = worst
        return [
            f"validation passed but {where} has cosine {cosine:.4f} "
            f"< {validation.criteria.min_cosine:g}"
        ]
    return []


@dataclass
class _SliceSums:
    """Running per-slice sums along one axis of one output (rule 7)."""

    dot: np.ndarray
    ref_sq: np.ndarray
    cand_sq: np.ndarray
    elements: int

    def add(self, ref: np.ndarray, cand: np.ndarray, axis: int) -> None:
        others = tuple(a for a in range(ref.ndim) if a != axis)
        self.dot = self.dot + (ref * cand).sum(axis=others)
        self.ref_sq = self.ref_sq + (ref * ref).sum(axis=others)
        self.cand_sq = self.cand_sq + (cand * cand).sum(axis=others)
        self.elements += ref.size // ref.shape[axis]


def _worst_slice(
    source: Path, target: Path, feeds: list[dict[str, np.ndarray]]
) -> tuple[float, str] | None:
    """Lowest per-slice cosine over all outputs and axes (rule 7), with where it is.

    An axis is sliced when its size is within 2-256 and it is not axis 0 (samples); a slice is
    judged once it holds :data:`MIN_SLICE_ELEMENTS` elements over all feeds; an axis whose size
    changes between feeds is not sliced; a slice whose reference is (near) zero is skipped.
    """
    sums: dict[tuple[int, int], _SliceSums | None] = {}
    graph = onnx.load(str(source), load_external_data=False).graph
    names = [output.name for output in graph.output]
    for feed in feeds:
        reference = run_ort(source, feed)
        candidate = run_ort(target, feed)
        for index, (ref_out, cand_out) in enumerate(zip(reference, candidate, strict=True)):
            ref = np.asarray(ref_out)
            cand = np.asarray(cand_out)
            if ref.dtype.kind != "f" or ref.shape != cand.shape:
                continue
            ref, cand = ref.astype(np.float64), cand.astype(np.float64)
            for axis in range(1, ref.ndim):
                key = (index, axis)
                size = ref.shape[axis]
                if not 2 <= size <= MAX_SLICE_AXIS or (key in sums and sums[key] is None):
                    continue
                current = sums.setdefault(
                    key, _SliceSums(np.zeros(size), np.zeros(size), np.zeros(size), 0)
                )
                if current is None or current.dot.shape != (size,):
                    sums[key] = None
                    continue
                current.add(ref, cand, axis)
    worst: tuple[float, str] | None = None
    for (index, axis), total in sums.items():
        if total is None or total.elements < MIN_SLICE_ELEMENTS:
            continue
        rms = np.sqrt(total.ref_sq)
        live = rms > 1e-6 * rms.max()
        if not live.any():
            continue
        norms = np.sqrt(total.ref_sq * total.cand_sq)
        cosines = np.where(live, total.dot / np.maximum(norms, 1e-300), 1.0)
        channel = int(np.argmin(cosines))
        value = float(cosines[channel])
        if worst is None or value < worst[0]:
            worst = (value, f"output '{names[index]}' channel {channel} of axis {axis}")
    return worst


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# -- the contract's own checks can fail -----------------------------------------------------------


def _entry(name: str) -> ZooEntry:
    return next(entry for entry in zoo_entries() if entry.name == name)


def test_worst_slice_sees_collapsed_class_rows(tmp_path: Path) -> None:
    """Rule 7 sees what a whole-tensor cosine hides: constant class scores next to box rows."""
    entry = _entry("yolo_head_op17")
    source = entry.build_in(tmp_path / "in")
    proto = onnx.load(str(source))
    final = proto.graph.node[-1]
    assert final.op_type == "Concat" and final.output[0] == "output0"
    collapsed = onnx.helper.make_node("Mul", [final.input[1], "half"], ["collapsed"], name="flat")
    half = numpy_helper.from_array(np.array(0.0, np.float32), "half")
    shift = onnx.helper.make_node("Add", ["collapsed", "mid"], ["scores_flat"], name="mid_add")
    mid = numpy_helper.from_array(np.array(0.5, np.float32), "mid")
    final.input[1] = "scores_flat"
    proto.graph.node.insert(len(proto.graph.node) - 1, collapsed)
    proto.graph.node.insert(len(proto.graph.node) - 1, shift)
    proto.graph.initializer.extend([half, mid])
    target = tmp_path / "collapsed.onnx"
    onnx.save(proto, str(target))
    feeds = entry.make_feeds()
    reference = np.concatenate([run_ort(source, feed)[0] for feed in feeds]).ravel()
    candidate = np.concatenate([run_ort(target, feed)[0] for feed in feeds]).ravel()
    whole = reference @ candidate / (np.linalg.norm(reference) * np.linalg.norm(candidate))
    worst = _worst_slice(source, target, feeds)
    assert whole > 0.99
    assert worst is not None and worst[0] < 0.9
    assert "axis 1" in worst[1]
    unchanged = _worst_slice(source, source, feeds)
    assert unchanged is not None and unchanged[0] > 0.999999


def test_left_alone_check_needs_a_reason_per_node(tmp_path: Path) -> None:
    """Rule 5 flags a lossy plan that changed nothing and said nothing, and accepts reasons."""
    source = _entry("classifier_op13").build_in(tmp_path)
    silent = _judge_left_alone(source, source, ["quant"], [])
    assert silent and silent[0].startswith("6 weighted node(s) left alone")
    names = [node.name for node in _weighted_nodes(source).values()]

    def records(message: str) -> list[logging.LogRecord]:
        return [
            logging.LogRecord("passes.quant", logging.INFO, __file__, 0, message, (name,), None)
            for name in names
        ]

    reasons = records("quant: skipping %s (Conv): below the size floor")
    assert _judge_left_alone(source, source, ["quant"], reasons) == []
    assert _judge_left_alone(source, source, ["quant"], records("%s"))


def test_zoo_models_are_deterministic(tmp_path: Path) -> None:
    """The helper-built zoo is seeded: two builds write the same bytes."""
    for entry in zoo_entries():
        if entry.torch:
            continue
        first = entry.build_in(tmp_path / "a")
        second = entry.build_in(tmp_path / "b")
        assert [f.read_bytes() for f in model_files(first)] == [
            f.read_bytes() for f in model_files(second)
        ], entry.name
