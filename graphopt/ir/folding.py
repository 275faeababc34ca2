"""Exact constant folding, shared by normalization and the ``cleanup`` pass.

Rules:

1. A node folds when it is a deterministic standard-domain op without subgraphs whose every
   input is a constant or the output of another folding node. Quantize/Dequantize nodes never
   fold (they are how quantized weights are stored), nor do random ops or control flow.
2. Only the *frontier* is materialised: folded tensors read by a node that stays, inside a
   subgraph, or nowhere else. Intermediate results of a folded chain simply disappear.
3. A frontier tensor folds only if the model does not grow by more than ``max_growth_bytes``
   (default 0: an exact fold never grows the file). Growth is the new initializer (values plus
   its header) minus what dies with it: constants and nodes of its folded cone that nothing
   outside that cone reads. A constant shared by two folds dies with neither alone, so a
   weight read by two consumers (in one graph or in two control-flow bodies) stays shared
   instead of being materialised twice, and an ``Expand``/``Tile``/``ConstantOfShape``
   blow-up is refused.
   With ``materialize_weights``, tensors read as the weight or bias of MatMul/Gemm/Conv/
   ConvTranspose are exempt: passes that edit weights need them as constants. Sizes known from
   shape inference are checked before anything is evaluated.
4. Graph outputs are never turned into initializers.
5. All frontier values come from one ONNX Runtime run with graph optimizations off; when that
   run fails, nodes are evaluated one at a time and the ones ORT cannot run are left in place.
6. Every tensor that stays unfolded for a reason is logged with that reason and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from graphopt.ir import weights
from graphopt.ir.model import iter_graphs
from graphopt.ir.ort import make_session

logger = logging.getLogger(__name__)

NEVER_FOLD = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
        "If",
        "Loop",
        "Scan",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceInsert",
        "SequenceAt",
        "SplitToSequence",
        "ConcatFromSequence",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
    }
)
DEFAULT_MAX_GROWTH_BYTES = 0
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1),
    "Gemm": (0, 1, 2),
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
}
"""Input positions of compute ops that hold weights when they are constant."""


def feeds_weight_slot(tensor: gs.Tensor) -> bool:
    """Whether some consumer reads ``tensor`` in a weight position (see WEIGHT_SLOTS)."""
    for consumer in tensor.outputs:
        slots = WEIGHT_SLOTS.get(consumer.op, ())
        if any(i < len(consumer.inputs) and consumer.inputs[i] is tensor for i in slots):
            return True
    return False


@dataclass
class FoldStats:
    """What a folding run did: nodes removed, tensors materialised, and why others stayed."""

    nodes_folded: int = 0
    tensors_folded: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    refused: set[int] = field(default_factory=set, repr=False)

    def merge(self, other: FoldStats) -> None:
        self.nodes_folded += other.nodes_folded
        self.tensors_folded += other.tensors_folded
        self.skipped.update(other.skipped)


def fold_constants(
    graph: gs.Graph,
    *,
    max_growth_bytes: int = DEFAULT_MAX_GROWTH_BYTES,
    fold_static_shapes: bool = False,
    materialize_weights: bool = False,
) -> FoldStats:
    """Fold constant subgraphs of ``graph`` and its subgraphs in place; see the module rules.

    ``fold_static_shapes`` also turns ``Shape`` of a tensor with a fully known static shape into
    a constant (exact: ONNX Runtime enforces static dims of graph inputs).
    """
    stats = FoldStats()
    for sub in list(iter_graphs(graph)):
        limit = _GrowthLimit(max_growth_bytes, materialize_weights)
        stats.merge(_fold_graph(sub, graph.opset, limit, fold_static_shapes))
    graph.cleanup(remove_unused_graph_inputs=False)
    return stats


def _is_foldable_op(node: gs.Node) -> bool:
    if node.op in NEVER_FOLD or (node.domain or "") not in ("", "ai.onnx"):
        return False
    if any(isinstance(value, gs.Graph) for value in node.attrs.values()):
        return False
    return bool(node.inputs) or node.op == "Constant"


def _static_shape(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(dim, (int, np.integer)) and dim >= 0 for dim in shape):
        return None
    return [int(dim) for dim in shape]


def _shape_value(node: gs.Node) -> np.ndarray | None:
    """Value of ``Shape(x)`` when x's shape is fully static (honours start/end attributes)."""
    source = node.inputs[0]
    shape = list(source.shape) if isinstance(source, gs.Constant) else _static_shape(source)
    if shape is None:
        return None
    rank = len(shape)
    start = int(node.attrs.get("start", 0))
    end = int(node.attrs.get("end", rank))
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return np.array(shape[start:end], dtype=np.int64)


def _fold_graph(
    graph: gs.Graph, opset: int, limit: _GrowthLimit, fold_static_shapes: bool
) -> FoldStats:
    stats = FoldStats()
    graph.toposort(recurse_subgraphs=False)
    foldable_nodes: list[gs.Node] = []
    known: set[int] = set()  # ids of tensors that are constant or computed by foldable nodes
    shape_values: dict[int, np.ndarray] = {}
    for node in graph.nodes:
        inputs = [t for t in node.inputs if not t.is_empty()]
        if fold_static_shapes and node.op == "Shape" and inputs:
            value = _shape_value(node)
            if value is not None:
                shape_values[id(node.outputs[0])] = value
                known.add(id(node.outputs[0]))
                foldable_nodes.append(node)
                continue
        if not _is_foldable_op(node):
            continue
        if all(isinstance(t, gs.Constant) or id(t) in known for t in inputs):
            foldable_nodes.append(node)
            known.update(id(t) for t in node.outputs)
    if not foldable_nodes:
        return stats
    foldable_ids = {id(node) for node in foldable_nodes}
    graph_outputs = {id(t) for t in graph.outputs}

    frontier: list[gs.Variable] = []
    for node in foldable_nodes:
        for tensor in node.outputs:
            consumers = list(tensor.outputs)
            read_outside = any(id(c) not in foldable_ids for c in consumers)
            if id(tensor) in graph_outputs:
                if read_outside or not consumers:
                    stats.skipped["graph-output"] += 1
                    logger.debug("not folding %s: it is a graph output", tensor.name)
                continue
            if read_outside:
                frontier.append(tensor)
    frontier = [t for t in frontier if limit.allows(t, _predicted_nbytes(t), foldable_ids, stats)]
    if not frontier:
        return stats

    values = _evaluate(graph, foldable_nodes, frontier, shape_values, opset, stats)
    chosen = [
        t
        for t in frontier
        if id(t) in values and limit.allows(t, int(values[id(t)].nbytes), foldable_ids, stats)
    ]
    chosen = _drop_partial_producers(chosen, graph_outputs, stats)
    for tensor in chosen:
        tensor.to_constant(values[id(tensor)])
    for tensor in chosen:
        tensor.inputs.clear()
    stats.tensors_folded = len(chosen)
    before = len(graph.nodes)
    graph.cleanup(remove_unused_graph_inputs=False, recurse_subgraphs=False)
    stats.nodes_folded = before - len(graph.nodes)
    return stats


def _evaluate(
    graph: gs.Graph,
    nodes: list[gs.Node],
    frontier: list[gs.Variable],
    shape_values: dict[int, np.ndarray],
    opset: int,
    stats: FoldStats,
) -> dict[int, np.ndarray]:
    """Values of the frontier tensors; rule 5 (one ORT run, then node-by-node fallback)."""
    known: dict[int, np.ndarray] = dict(shape_values)
    run_nodes = [n for n in nodes if not all(id(t) in known for t in n.outputs)]
    wanted = [t for t in frontier if id(t) not in known]
    if wanted:
        try:
            known.update(_run_nodes(graph, run_nodes, wanted, known, opset))
        except Exception as error:  # ORT raises its own exception types for unsupported ops
            logger.debug("batch constant evaluation failed (%s); evaluating node by node", error)
            known.update(_run_node_by_node(graph, run_nodes, known, opset, stats))
    return {id(t): known[id(t)] for t in frontier if id(t) in known}


def _run_nodes(
    graph: gs.Graph,
    nodes: list[gs.Node],
    outputs: list[gs.Variable],
    known: dict[int, np.ndarray],
    opset: int,
) -> dict[int, np.ndarray]:
    """Run ``nodes`` alone in ONNX Runtime (optimizations off) and return ``outputs``' values."""
    initializers: dict[str, onnx.TensorProto] = {}
    produced = {id(t) for node in nodes for t in node.outputs}
    for node in nodes:
        for tensor in node.inputs:
            if tensor.is_empty() or tensor.name in initializers or id(tensor) in produced:
                continue
            if id(tensor) in known:
                initializers[tensor.name] = onnx.numpy_helper.from_array(
                    known[id(tensor)], tensor.name
                )
            elif isinstance(tensor, gs.Constant):
                initializers[tensor.name] = weights.tensor_proto(tensor)
    proto_graph = onnx.helper.make_graph(
        [OnnxExporter.export_node(node) for node in nodes],
        "fold",
        inputs=[],
        outputs=[onnx.helper.make_empty_tensor_value_info(t.name) for t in outputs],
        initializer=list(initializers.values()),
    )
    opsets = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains or []]
    if not any(o.domain in ("", "ai.onnx") for o in opsets):
        opsets.append(onnx.helper.make_opsetid("", opset))
    proto = onnx.helper.make_model(proto_graph, opset_imports=opsets)
    proto.ir_version = max(onnx.helper.find_min_ir_version_for(opsets), 7)
    session = make_session(proto, optimize=False, threads=1)
    results = session.run([t.name for t in outputs], {})
    return {id(t): np.asarray(value) for t, value in zip(outputs, results, strict=True)}


def _run_node_by_node(
    graph: gs.Graph,
    nodes: list[gs.Node],
    known: dict[int, np.ndarray],
    opset: int,
    stats: FoldStats,
) -> dict[int, np.ndarray]:
    values = dict(known)
    for node in nodes:
        if any(id(t) in values for t in node.outputs):
            continue
        inputs_ready = all(
            t.is_empty() or isinstance(t, gs.Constant) or id(t) in values for t in node.inputs
        )
        if not inputs_ready:
            continue
        outputs = [t for t in node.outputs if not t.is_empty()]
        try:
            values.update(_run_nodes(graph, [node], outputs, values, opset))
        except Exception as error:
            stats.skipped["runtime-cannot-evaluate"] += 1
            logger.info(
                "not folding %s (%s): onnxruntime cannot evaluate it: %s",
                node.name or node.op,
                node.op,
                str(error).splitlines()[0],
            )
    return values


def _predicted_nbytes(tensor: gs.Tensor) -> int | None:
    shape = _static_shape(tensor)
    if shape is None or tensor.dtype is None:
        return None
    try:
        itemsize = np.dtype(tensor.dtype).itemsize
    except TypeError:
        return None
    return int(np.prod(shape, dtype=np.int64)) * itemsize


@dataclass(frozen=True)
class _GrowthLimit:
    """Rule 3."""

    max_growth_bytes: int
    materialize_weights: bool

    def allows(
        self, tensor: gs.Tensor, nbytes: int | None, foldable_ids: set[int], stats: FoldStats
    ) -> bool:
        if nbytes is None:
            return True  # size unknown until evaluated; checked again afterwards
        if self.materialize_weights and feeds_weight_slot(tensor):
            return True
        growth = nbytes + _header_bytes(tensor) - _freed_bytes(tensor, foldable_ids)
        if growth <= self.max_growth_bytes:
            return True
        if id(tensor) not in stats.refused:
            stats.refused.add(id(tensor))
            stats.skipped["would-grow-model"] += 1
            logger.info(
                "not folding %s: it would add %d bytes to the model (limit %d)",
                tensor.name,
                growth,
                self.max_growth_bytes,
            )
        return False


_RAW_DATA_TAG_BYTES = 6
"""The raw_data field's tag and length prefix (at most 6 bytes for tensors under 4 GiB)."""


def _header_bytes(tensor: gs.Tensor) -> int:
    """Bytes of an initializer's proto besides its values (name, dims, type, field tags)."""
    dims = [int(d) if isinstance(d, (int, np.integer)) else 1 for d in (tensor.shape or ())]
    header = onnx.TensorProto(name=tensor.name, data_type=onnx.TensorProto.FLOAT, dims=dims)
    return header.ByteSize() + _RAW_DATA_TAG_BYTES


def _cone(tensor: gs.Tensor, foldable_ids: set[int]) -> tuple[list[gs.Node], list[gs.Constant]]:
    """The folding nodes ``tensor`` is computed by, and the constants they read."""
    nodes: list[gs.Node] = []
    constants: list[gs.Constant] = []
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        for producer in current.inputs:
            if id(producer) in seen or id(producer) not in foldable_ids:
                continue
            seen.add(id(producer))
            nodes.append(producer)
            for source in producer.inputs:
                if source.is_empty() or id(source) in seen:
                    continue
                seen.add(id(source))
                if isinstance(source, gs.Constant):
                    constants.append(source)
                else:
                    stack.append(source)
    return nodes, constants


def _freed_bytes(tensor: gs.Tensor, foldable_ids: set[int]) -> int:
    """Bytes of the cone's nodes and constants that nothing outside the cone reads (rule 3)."""
    nodes, constants = _cone(tensor, foldable_ids)
    in_cone = {id(node) for node in nodes}
    freed = 0
    for node in nodes:
        outputs_die = all(
            output is tensor or all(id(reader) in in_cone for reader in output.outputs)
            for output in node.outputs
        )
        if outputs_die:
            freed += OnnxExporter.export_node(node).ByteSize()
    for constant in constants:
        if all(id(reader) in in_cone for reader in constant.outputs):
            freed += weights.nbytes(constant) + _header_bytes(constant)
    return freed


def _drop_partial_producers(
    chosen: list[gs.Variable], graph_outputs: set[int], stats: FoldStats
) -> list[gs.Variable]:
    """Detaching a producer's outputs changes its arity, so fold all of them or none."""
    chosen_ids = {id(t) for t in chosen}
    kept: list[gs.Variable] = []
    for tensor in chosen:
        producer = tensor.inputs[0]
        siblings_ok = all(
            id(sibling) in chosen_ids
            or (not sibling.outputs and id(sibling) not in graph_outputs)
            or sibling.is_empty()
            for sibling in producer.outputs
        )
        if siblings_ok:
            kept.append(tensor)
        else:
            stats.skipped["sibling-output-kept"] += 1
            logger.debug("not folding %s: another output of %s stays", tensor.name, producer.name)
    return kept
