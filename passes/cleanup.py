"""``cleanup``: exact graph cleanup. Outputs stay equal to 1e-5 on every model.

Runs first among the built-in passes so that later passes see folded weights.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir.edit import replace_input, replace_output, replace_uses
from graphopt.ir.folding import DEFAULT_MAX_GROWTH_BYTES, fold_constants
from graphopt.ir.model import Model, iter_constants, iter_graphs
from graphopt.ir.normalize import bypass_constant_identities
from graphopt.passkit.api import Pass, PassContext, PassResult, graph_fingerprint
from graphopt.passkit.options import Option
from graphopt.passkit.ordering import OrderRank

logger = logging.getLogger(__name__)

# dtype → the dtypes that hold every one of its values exactly
_EXACT_WIDENINGS: dict[str, frozenset[str]] = {
    "bool": frozenset(
        {
            "int8",
            "uint8",
            "int16",
            "uint16",
            "int32",
            "uint32",
            "int64",
            "uint64",
            "float16",
            "float32",
            "float64",
        }
    ),
    "int8": frozenset({"int16", "int32", "int64", "float16", "float32", "float64"}),
    "uint8": frozenset(
        {"int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64"}
    ),
    "int16": frozenset({"int32", "int64", "float32", "float64"}),
    "uint16": frozenset({"int32", "uint32", "int64", "uint64", "float32", "float64"}),
    "int32": frozenset({"int64", "float64"}),
    "uint32": frozenset({"int64", "uint64", "float64"}),
    "float16": frozenset({"float32", "float64"}),
    "float32": frozenset({"float64"}),
}


def _dtype_name(tensor: gs.Tensor) -> str | None:
    dtype = tensor.dtype
    if dtype is None:
        return None
    try:
        return np.dtype(dtype).name
    except TypeError:
        return None


def _cast_target(node: gs.Node) -> str | None:
    to = node.attrs.get("to")
    if to is None:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to))).name
    except (KeyError, TypeError, ValueError):
        return None


class CleanupPass(Pass):
    """Exact cleanup. Rules, in order:

    1. Fold constant subgraphs (see :mod:`graphopt.ir.folding`: deterministic ops only, never
       Q/DQ, size-guarded by ``max_growth_bytes``), including ``Shape`` of tensors whose
       shape is fully static.
    2. Bypass ``Identity`` nodes: consumers read the Identity's input. When the Identity's
       output is a graph output, the producer of its input writes the graph output directly
       if nothing else reads that input; otherwise the Identity stays.
    3. A ``Cast`` to the dtype its input already has is an Identity (rule 2).
    4. ``Cast(Cast(x, A), B)`` becomes ``Cast(x, B)`` when A holds every value of x's dtype
       exactly (a widening such as float16→float32 or int32→int64); if B is x's dtype, the
       pair disappears.
    5. Remove nodes no graph output depends on and initializers nothing reads (graph inputs
       stay: they are the model's interface).
    6. Sort nodes topologically.
    """

    name: ClassVar[str] = "cleanup"
    summary: ClassVar[str] = "exact cleanup: constant folding, Identity/Cast removal, dead code"
    exact: ClassVar[bool] = True
    reads_weights: ClassVar[bool] = False
    run_before: ClassVar[frozenset[str]] = frozenset({"sparsify", "lowrank", "quant", "fp16"})
    order_rank: ClassVar[OrderRank] = OrderRank.EXACT
    options_schema: ClassVar[tuple[Option, ...]] = (
        Option("fold_constants", bool, True, "fold constant subgraphs (rule 1)"),
        Option(
            "max_growth_bytes",
            int,
            DEFAULT_MAX_GROWTH_BYTES,
            "largest increase of model size one folded tensor may cause",
            minimum=0,
        ),
        Option("fold_shapes", bool, True, "fold Shape of statically shaped tensors (rule 1)"),
    )

    def call(self, model: Model, context: PassContext) -> PassResult:
        graph = model.graph
        before = graph_fingerprint(graph)
        nodes_before = sum(len(g.nodes) for g in iter_graphs(graph))
        constants_before = sum(1 for _ in iter_constants(graph))
        stats: dict[str, object] = {}
        if self.options["fold_constants"]:
            folded = fold_constants(
                graph,
                max_growth_bytes=self.options["max_growth_bytes"],
                fold_static_shapes=self.options["fold_shapes"],
            )
            stats["nodes_folded"] = folded.nodes_folded
            if folded.skipped:
                stats["fold_skipped"] = dict(folded.skipped)
        identities = 0
        casts = 0
        for sub in list(iter_graphs(graph)):
            identities += bypass_constant_identities(sub)
            casts += self._fold_cast_pairs(sub)
            identities += self._bypass_identities(sub)
        stats["identities_removed"] = identities
        stats["cast_pairs_folded"] = casts
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
        stats["nodes_removed"] = nodes_before - sum(len(g.nodes) for g in iter_graphs(graph))
        stats["initializers"] = f"{constants_before}→{sum(1 for _ in iter_constants(graph))}"
        return PassResult(model, graph_fingerprint(graph) != before, stats)

    def _bypass_identities(self, graph: gs.Graph) -> int:
        """Rules 2 and 3."""
        removed = 0
        outputs = {id(t) for t in graph.outputs}
        inputs = {id(t) for t in graph.inputs}
        node_ids = {id(n) for n in graph.nodes}
        for node in list(graph.nodes):
            is_identity = node.op == "Identity"
            if node.op == "Cast" and node.inputs and node.outputs:
                source_dtype = _dtype_name(node.inputs[0])
                is_identity = source_dtype is not None and source_dtype == _cast_target(node)
            if not is_identity or not node.inputs or len(node.outputs) != 1:
                continue
            source, result = node.inputs[0], node.outputs[0]
            if id(result) not in outputs:
                replace_uses(result, source)
                node.inputs.clear()
                node.outputs.clear()
                removed += 1
                continue
            producer_writes_output = (
                len(source.inputs) == 1
                and id(source) not in outputs
                and id(source) not in inputs
                and len(source.outputs) == 1
                and id(source.inputs[0]) in node_ids
            )
            if producer_writes_output:
                producer = source.inputs[0]
                node.inputs.clear()
                node.outputs.clear()
                replace_output(producer, source, result)
                node.outputs.clear()
                removed += 1
            else:
                logger.debug(
                    "keeping %s %s: it feeds a graph output directly from %s",
                    node.op,
                    node.name,
                    source.name,
                )
        return removed

    def _fold_cast_pairs(self, graph: gs.Graph) -> int:
        """Rule 4."""
        folded = 0
        for node in list(graph.nodes):
            if node.op != "Cast" or not node.inputs:
                continue
            middle = node.inputs[0]
            if len(middle.inputs) != 1 or middle.inputs[0].op != "Cast":
                continue
            first = middle.inputs[0]
            source = first.inputs[0]
            source_dtype = _dtype_name(source)
            middle_dtype = _cast_target(first)
            if source_dtype is None or middle_dtype is None:
                logger.debug("keeping Cast pair at %s: unknown dtype", node.name)
                continue
            if middle_dtype != source_dtype and middle_dtype not in _EXACT_WIDENINGS.get(
                source_dtype, frozenset()
            ):
                logger.debug(
                    "keeping Cast pair at %s: %s→%s loses values",
                    node.name,
                    source_dtype,
                    middle_dtype,
                )
                continue
            replace_input(node, middle, source)
            folded += 1
        return folded
