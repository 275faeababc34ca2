"""Model summary for ``graphopt inspect``: what a model is made of, computed without running it.

Weights are read one tensor at a time (for the sparsity count) and released, so inspecting a
model with external data never holds more than one weight in memory. FLOPs are estimated per
MatMul/Gemm/Conv from inferred shapes, with every dynamic dimension taken as 1 (per-sample cost).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.ir import weights
from graphopt.ir.model import Model, iter_constants, iter_graphs, model_file_bytes

logger = logging.getLogger(__name__)


@dataclass
class ModelSummary:
    path: str
    file_bytes: int
    ir_version: int
    opsets: dict[str, int]
    producer: str
    graph_inputs: list[str]
    graph_outputs: list[str]
    nodes: int
    op_histogram: dict[str, int]
    parameters: int
    bytes_by_dtype: dict[str, int]
    params_by_dtype: dict[str, int]
    weight_sparsity: float
    external_tensors: int
    external_bytes: int
    flops: dict[str, int] = field(default_factory=dict)
    flops_unknown: int = 0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _dims(tensor: gs.Tensor) -> list[int] | None:
    shape = tensor.shape
    if shape is None:
        return None
    return [int(d) if isinstance(d, (int, np.integer)) and d > 0 else 1 for d in shape]


def _node_flops(node: gs.Node) -> int | None:
    """Multiply-adds × 2 for MatMul, Gemm and Conv; None when shapes are unknown."""
    if node.op == "MatMul":
        a, b = _dims(node.inputs[0]), _dims(node.inputs[1])
        out = _dims(node.outputs[0])
        if a is None or b is None or out is None or not a:
            return None
        reduction = a[-1]
        return 2 * int(np.prod(out, dtype=np.int64)) * reduction
    if node.op == "Gemm":
        a, out = _dims(node.inputs[0]), _dims(node.outputs[0])
        if a is None or out is None or len(a) != 2:
            return None
        reduction = a[0] if node.attrs.get("transA", 0) else a[1]
        return 2 * int(np.prod(out, dtype=np.int64)) * reduction
    if node.op == "Conv":
        weight, out = _dims(node.inputs[1]), _dims(node.outputs[0])
        if weight is None or out is None:
            return None
        per_output = int(np.prod(weight[1:], dtype=np.int64))
        return 2 * int(np.prod(out, dtype=np.int64)) * per_output
    return None


def summarize(model: Model) -> ModelSummary:
    graph = model.graph
    ops: Counter[str] = Counter()
    flops: Counter[str] = Counter()
    unknown = 0
    node_count = 0
    for sub in iter_graphs(graph):
        for node in sub.nodes:
            node_count += 1
            ops[node.op if not node.domain else f"{node.domain}.{node.op}"] += 1
            if node.op in ("MatMul", "Gemm", "Conv"):
                value = _node_flops(node)
                if value is None:
                    unknown += 1
                else:
                    flops[node.op] += value
    parameters = 0
    zeros = 0
    float_params = 0
    bytes_by_dtype: Counter[str] = Counter()
    params_by_dtype: Counter[str] = Counter()
    external_tensors = 0
    external_bytes = 0
    for constant in iter_constants(graph):
        dtype = np.dtype(constant.dtype).name if constant.dtype is not None else "unknown"
        count = int(np.prod(constant.shape, dtype=np.int64)) if constant.shape is not None else 0
        nbytes = weights.nbytes(constant)
        parameters += count
        params_by_dtype[dtype] += count
        bytes_by_dtype[dtype] += nbytes
        if weights.is_external(constant):
            external_tensors += 1
            external_bytes += nbytes
        if dtype.startswith(("float", "bfloat")) and count > 1:
            values = weights.read(constant)
            zeros += int(np.count_nonzero(values == 0))
            float_params += count
            del values
    path = model.source
    return ModelSummary(
        path=str(path) if path else "<in memory>",
        file_bytes=model_file_bytes(Path(path)) if path else 0,
        ir_version=int(model.shell.ir_version),
        opsets={o.domain or "ai.onnx": int(o.version) for o in model.shell.opset_import},
        producer=f"{model.shell.producer_name} {model.shell.producer_version}".strip(),
        graph_inputs=[t.name for t in graph.inputs],
        graph_outputs=[t.name for t in graph.outputs],
        nodes=node_count,
        op_histogram=dict(ops.most_common()),
        parameters=parameters,
        bytes_by_dtype=dict(bytes_by_dtype),
        params_by_dtype=dict(params_by_dtype),
        weight_sparsity=zeros / float_params if float_params else 0.0,
        external_tensors=external_tensors,
        external_bytes=external_bytes,
        flops=dict(flops),
        flops_unknown=unknown,
    )
