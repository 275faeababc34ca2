"""Exact normalization: afterwards every weight a pass cares about is a Constant feeding its user.

Exporters disagree about where weights live. Rules, applied in this order:

1. ``Constant`` nodes (Paddle, tf2onnx, dynamo) become constant tensors. A Constant node whose
   output is a graph output stays a node (an initializer cannot be a graph output everywhere).
2. Initializers listed as graph inputs (IR < 4, Caffe2-era zoo models) stop being inputs; the IR
   version is raised to 4, the first that allows initializers which are not inputs.
3. ``Identity`` of a constant is bypassed: consumers read the constant itself, so weights shared
   through Identity (torch) stay one tensor.
4. Constant subgraphs (``ConstantOfShape``, ``Transpose``/``Cast``/``Reshape`` of initializers …)
   are folded with :mod:`graphopt.ir.folding`'s exact, size-guarded rules. With
   ``materialize_weights`` (set when a requested pass edits weights), a subgraph computing the
   weight or bias of MatMul/Gemm/Conv is folded whatever its size; otherwise a fold that would
   grow the model by more than ``max_growth_bytes`` is left alone and logged.
5. Shape and type inference annotates every tensor it can; incomplete symbolic inference (dynamic
   axes) is fine and logged, never fatal.
6. Every node, in the main graph and in every subgraph body, has a unique name: the one node
   that identity is, for every pass, report, ``include``/``exclude`` glob and bisection scope.
   Exporter names are kept; an unnamed node gets ``<op>_<n>`` (n counts that op type in graph
   order, main graph first, then bodies), and a later node repeating an earlier name gets
   ``<name>_<n>``. The same input always gives the same names. They live in memory only:
   saving writes the exporter's names again (unnamed, or a name repeated across scopes, which
   ONNX Runtime accepts), so an exact pass never grows the file by names; a name repeated
   within one graph, which ONNX Runtime refuses, keeps its new unique name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_dtype, get_onnx_tensor_shape

from graphopt.ir import weights
from graphopt.ir.edit import replace_uses
from graphopt.ir.folding import DEFAULT_MAX_GROWTH_BYTES, fold_constants
from graphopt.ir.model import (
    MIN_IR_WITHOUT_INPUT_INITIALIZERS,
    Model,
    iter_graphs,
    load_model,
    skeleton_proto,
)

logger = logging.getLogger(__name__)

_SCALAR_ATTRS = {
    "value_float": np.float32,
    "value_int": np.int64,
}
_LIST_ATTRS = {
    "value_floats": np.float32,
    "value_ints": np.int64,
}


@dataclass
class NormalizeStats:
    constant_nodes: int = 0
    initializer_inputs: int = 0
    identities_bypassed: int = 0
    nodes_folded: int = 0
    nodes_named: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "constant_nodes": self.constant_nodes,
            "initializer_inputs": self.initializer_inputs,
            "identities_bypassed": self.identities_bypassed,
            "nodes_folded": self.nodes_folded,
            "nodes_named": self.nodes_named,
            "skipped": dict(self.skipped),
        }


def normalize(
    model: Model,
    *,
    max_growth_bytes: int = DEFAULT_MAX_GROWTH_BYTES,
    materialize_weights: bool = False,
) -> NormalizeStats:
    """Apply the module's rules to ``model`` in place and return what changed."""
    stats = NormalizeStats()
    stats.initializer_inputs = _count_initializer_inputs(model)
    if stats.initializer_inputs and model.shell.ir_version < MIN_IR_WITHOUT_INPUT_INITIALIZERS:
        model.shell.ir_version = MIN_IR_WITHOUT_INPUT_INITIALIZERS
    for graph in list(iter_graphs(model.graph)):
        stats.constant_nodes += _constant_nodes_to_tensors(graph)
        stats.identities_bypassed += bypass_constant_identities(graph)
    model.graph.cleanup(remove_unused_graph_inputs=False)
    stats.nodes_named = name_nodes(model)
    infer_types(model)  # known sizes let the folding guard refuse blow-ups before evaluating
    folded = fold_constants(
        model.graph, max_growth_bytes=max_growth_bytes, materialize_weights=materialize_weights
    )
    stats.nodes_folded = folded.nodes_folded
    stats.skipped = dict(folded.skipped)
    infer_types(model)
    logger.info(
        "normalized: %d Constant nodes, %d initializer inputs, %d Identity bypasses, %d folded",
        stats.constant_nodes,
        stats.initializer_inputs,
        stats.identities_bypassed,
        stats.nodes_folded,
    )
    return stats


def load_normalized(
    source: Path,
    *,
    materialize_weights: bool = False,
    min_opset: int | None = None,
    tmp_dir: Path | None = None,
) -> tuple[Model, NormalizeStats]:
    """Load ``source`` (upgraded to ``min_opset`` when older; temporary files in ``tmp_dir``)
    and normalize it."""
    model = load_model(source, min_opset=min_opset, tmp_dir=tmp_dir)
    return model, normalize(model, materialize_weights=materialize_weights)


def name_nodes(model: Model) -> int:
    """Rule 6: give every node a unique, stable name; returns how many nodes were (re)named."""
    graphs = list(iter_graphs(model.graph))
    used = {node.name for graph in graphs for node in graph.nodes if node.name}
    seen: set[str] = set()
    per_op: dict[str, int] = {}
    original = dict(model.original_names)
    renamed = 0
    for graph in graphs:
        kept_here: set[str] = set()
        for node in graph.nodes:
            if node.name and node.name not in seen:
                seen.add(node.name)
                kept_here.add(node.name)
                continue
            if node.name:
                base = node.name
            else:
                per_op[node.op] = per_op.get(node.op, -1) + 1
                base = f"{node.op}_{per_op[node.op]}"
            name, index = base, 0
            while name in used or name in seen:
                index += 1
                name = f"{base}_{index}"
            if not node.name or node.name not in kept_here:
                original[name] = node.name  # unnamed, or repeated across scopes only
            node.name = name
            used.add(name)
            seen.add(name)
            renamed += 1
    model.original_names = original
    if renamed:
        logger.info("normalize: named %d unnamed or duplicate-named nodes", renamed)
    return renamed


def _count_initializer_inputs(model: Model) -> int:
    """Rule 2: graphsurgeon drops initializers from the input list on import; count them."""
    graph_input_names = {tensor.name for tensor in model.graph.inputs}
    return sum(
        1
        for tensor in model.graph.tensors().values()
        if isinstance(tensor, gs.Constant)
        and tensor.name in model.source_input_names
        and tensor.name not in graph_input_names
    )


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    for name, dtype in _SCALAR_ATTRS.items():
        if name in attrs:
            return np.array(attrs[name], dtype=dtype)
    for name, dtype in _LIST_ATTRS.items():
        if name in attrs:
            return np.array(attrs[name], dtype=dtype)
    return None


def _constant_nodes_to_tensors(graph: gs.Graph) -> int:
    """Rule 1."""
    converted = 0
    graph_outputs = {id(tensor) for tensor in graph.outputs}
    for node in list(graph.nodes):
        if (
            node.op != "Constant"
            or (node.domain or "") not in ("", "ai.onnx")
            or len(node.outputs) != 1
        ):
            continue
        output = node.outputs[0]
        if id(output) in graph_outputs:
            logger.debug("keeping Constant node %s: its output is a graph output", node.name)
            continue
        attr_value = node.attrs.get("value")
        if isinstance(attr_value, gs.Constant):
            output.to_constant(weights.storage(attr_value))  # keeps lazy/external values and dtype
        else:
            value = _constant_node_value(node)
            if value is None:
                logger.debug("keeping Constant node %s: sparse or string value", node.name)
                continue
            output.to_constant(value)
        output.inputs.clear()
        converted += 1
    return converted


def bypass_constant_identities(graph: gs.Graph) -> int:
    """Rule 3: consumers of ``Identity(constant)`` read the constant; returns how many."""
    bypassed = 0
    graph_outputs = {id(tensor) for tensor in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "Identity" or not node.inputs or not node.outputs:
            continue
        source, output = node.inputs[0], node.outputs[0]
        if not isinstance(source, gs.Constant) or id(output) in graph_outputs:
            continue
        replace_uses(output, source)
        bypassed += 1
    return bypassed


def infer_types(model: Model) -> int:
    """Rule 5: run ONNX shape inference and copy dtypes/shapes onto graphsurgeon Variables.

    Large initializers are declared as typed graph inputs for the inference run so that no weight
    is copied into the temporary proto. Returns how many tensors were annotated.
    """
    proto = skeleton_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as error:  # onnx raises InferenceError and plain exceptions
        logger.warning("shape inference failed, dtypes stay as exported: %s", str(error)[:200])
        return 0
    infos = list(inferred.graph.value_info) + list(inferred.graph.output)
    by_name = {info.name: info for info in infos}
    annotated = 0
    for tensor in model.graph.tensors().values():
        if not isinstance(tensor, gs.Variable) or tensor.name not in by_name:
            continue
        info = by_name[tensor.name]
        if not info.type.HasField("tensor_type"):
            continue
        dtype = get_onnx_tensor_dtype(info)
        shape = get_onnx_tensor_shape(info)
        if tensor.dtype is None and dtype is not None:
            tensor.dtype = dtype
            annotated += 1
        if shape is not None and (tensor.shape is None or _more_specific(shape, tensor.shape)):
            tensor.shape = shape
    missing = sum(
        1
        for tensor in model.graph.tensors().values()
        if isinstance(tensor, gs.Variable) and tensor.dtype is None and not tensor.is_empty()
    )
    if missing:
        logger.info("shape inference left %d tensors without a dtype", missing)
    return annotated


def _more_specific(new: list, old: list) -> bool:
    if len(new) != len(old):
        return False
    return sum(isinstance(d, int) for d in new) > sum(isinstance(d, int) for d in old)
