"""Helpers passes share for choosing nodes by name and summarising why candidates were skipped."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import onnx_graphsurgeon as gs


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
