"""What passes share when choosing nodes: the layout of weighted ops, names and skip reasons."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import onnx_graphsurgeon as gs

WEIGHTED_OPS = frozenset({"MatMul", "Gemm", "Conv"})
"""Ops that multiply an activation (input 0) by a weight (input 1)."""


@dataclass(frozen=True)
class WeightedOp:
    """How a MatMul, Gemm or Conv node uses its weight: the one reading of ONNX's layouts that
    ``quant``, ``lowrank`` and ``sparsify`` share (ONNX operator specs; GUIDE §3).

    - ``weight``: input 1 when it is a constant, else None (an activation × activation MatMul);
      ``bias``: input 2 of a Gemm or Conv when it is a constant, else None.
    - ``out_axis``: the weight's output-channel axis: Conv 0 (O, C/g, k…), Gemm 1 (K×N) or 0
      with ``transB`` (N×K), MatMul its last axis. ``in_axis``: the reduction axis: Conv 1, Gemm
      0 or 1 with ``transB``, MatMul the one before the last.
    - ``activation_axis``: the channel axis of input 0: Conv 1, Gemm with ``transA`` 0, else -1.
    - ``weight_transposed`` / ``input_transposed``: Gemm's ``transB`` / ``transA``;
      ``alpha``: Gemm's ``alpha`` (1 for the others).
    """

    node: gs.Node
    weight: gs.Constant | None
    bias: gs.Constant | None
    out_axis: int
    in_axis: int
    activation_axis: int
    weight_transposed: bool
    input_transposed: bool
    alpha: float


def weighted_op(node: gs.Node) -> WeightedOp | None:
    """``node`` read as a :class:`WeightedOp`; None for other ops or a node without a weight
    input."""
    if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
        return None
    weight_input = node.inputs[1]
    weight = weight_input if isinstance(weight_input, gs.Constant) else None
    gemm = node.op == "Gemm"
    transposed_b = gemm and bool(int(node.attrs.get("transB", 0)))
    transposed_a = gemm and bool(int(node.attrs.get("transA", 0)))
    if node.op == "Conv":
        out_axis, in_axis = 0, 1
    elif gemm:
        out_axis, in_axis = (0, 1) if transposed_b else (1, 0)
    else:
        rank = len(weight_input.shape) if weight_input.shape is not None else 2
        out_axis, in_axis = rank - 1, rank - 2
    bias = None
    if node.op in ("Gemm", "Conv") and len(node.inputs) > 2:
        bias = node.inputs[2] if isinstance(node.inputs[2], gs.Constant) else None
    return WeightedOp(
        node=node,
        weight=weight,
        bias=bias,
        out_axis=out_axis,
        in_axis=in_axis,
        activation_axis=1 if node.op == "Conv" else 0 if transposed_a else -1,
        weight_transposed=transposed_b,
        input_transposed=transposed_a,
        alpha=float(node.attrs.get("alpha", 1.0)) if gemm else 1.0,
    )


def node_label(node: gs.Node) -> str:
    """How reports, globs and bisection scopes name a node: its name, else its first output's."""
    if node.name:
        return node.name
    return node.outputs[0].name if node.outputs else ""


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches one of the shell-style ``patterns`` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def count_values(values: Iterable[str]) -> dict[str, int]:
    """How often each value occurs, in first-seen order."""
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """Skip reasons grouped by kind: details in parentheses are for the log, not the counts."""
    return count_values(reason.split(" (")[0] for reason in reasons)


def body_labels(graph: gs.Graph) -> dict[int, str]:
    """``id`` of every If/Loop/Scan body under ``graph`` → ``"<op> <node>.<attr>"`` (reports name
    where a node inside a body lives)."""
    labels: dict[int, str] = {}
    pending = [graph]
    while pending:
        current = pending.pop()
        for node in current.nodes:
            for attr, value in node.attrs.items():
                for sub in value if isinstance(value, list) else [value]:
                    if isinstance(sub, gs.Graph):
                        labels[id(sub)] = f"{node.op} {node_label(node)}.{attr}"
                        pending.append(sub)
    return labels
