"""A small ONNX graph builder for the zoo: seeded weights, exporter-style weight placement, opsets.

Rules the builder follows:

1. Every weight comes from the builder's seeded ``numpy`` generator, drawn in call order, scaled
   by 1/√fan-in so activations keep roughly unit scale through a stack of layers.
2. ``weight_style`` says where weights live, as different exporters write them:
   ``initializer`` (torch, most tools), ``constant`` (a ``Constant`` node per weight: Paddle,
   tf2onnx, torch inside ``If`` branches) or ``input`` (an initializer that is also listed as a
   graph input: Caffe2-era, IR 3). Small integer tensors (axes, shapes, pads) follow the same
   style, because exporters treat them alike.
3. ``naming`` says how nodes are named: ``unique`` (``<op>_<n>`` across the whole model),
   ``empty`` (no names, as several converters write), ``duplicate`` (every node named after its
   op type alone, so names repeat inside one graph, which ONNX forbids and ONNX Runtime
   refuses) or ``per_graph`` (``<op>_<n>`` counted per graph, so a body reuses the names of the
   graph around it, which ONNX allows).
4. Tensor names are unique across the whole model, subgraph bodies included: bodies are built by
   :meth:`GraphBuilder.body`, which shares the parent's counters.
5. Ops whose form changed between opsets (Clip, Pad, Squeeze, Unsqueeze, ReduceSum, ReduceMean,
   Split, Resize/Upsample) are written in the form the model's opset defines.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WeightStyle = Literal["initializer", "constant", "input"]
Naming = Literal["unique", "empty", "duplicate", "per_graph"]


@dataclass
class _Counters:
    """Per-model counters shared by a graph and its bodies (rule 4)."""

    by_stem: defaultdict[str, itertools.count[int]] = field(
        default_factory=lambda: defaultdict(itertools.count)
    )

    def fresh(self, stem: str) -> str:
        return f"{stem}_{next(self.by_stem[stem])}"


class GraphBuilder:
    """Accumulates the nodes, weights and value infos of one graph (see module rules)."""

    def __init__(
        self,
        opset: int,
        rng: np.random.Generator,
        *,
        weight_style: WeightStyle = "initializer",
        naming: Naming = "unique",
        counters: _Counters | None = None,
    ) -> None:
        self.opset = opset
        self.rng = rng
        self.weight_style = weight_style
        self.naming = naming
        self.counters = counters or _Counters()
        self._local_names = _Counters()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weight_inputs: list[onnx.ValueInfoProto] = []

    # -- graph plumbing ------------------------------------------------------------------------

    def body(self, weight_style: WeightStyle | None = None) -> GraphBuilder:
        """A builder for a subgraph body that shares this model's name counters (rule 4)."""
        return GraphBuilder(
            self.opset,
            self.rng,
            weight_style=weight_style or self.weight_style,
            naming=self.naming,
            counters=self.counters,
        )

    def fresh(self, stem: str) -> str:
        return self.counters.fresh(stem)

    def node(
        self,
        op_type: str,
        inputs: Sequence[str],
        outputs: int | Sequence[str] = 1,
        *,
        domain: str = "",
        **attrs: Any,
    ) -> list[str]:
        """Append one node; returns its output names (fresh ones when ``outputs`` is a count)."""
        names = (
            [self.fresh(op_type.lower()) for _ in range(outputs)]
            if isinstance(outputs, int)
            else list(outputs)
        )
        if self.naming == "unique":
            node_name = self.fresh(op_type)
        elif self.naming == "duplicate":
            node_name = op_type
        elif self.naming == "per_graph":
            node_name = self._local_names.fresh(op_type)
        else:
            node_name = ""
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=node_name, domain=domain, **attrs)
        )
        return names

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        """Append a single-output node and return its output name."""
        return self.node(op_type, inputs, **attrs)[0]

    def tensor(self, array: np.ndarray, stem: str = "const") -> str:
        """Store ``array`` where this builder's weight style puts tensors (rule 2)."""
        name = self.fresh(stem)
        proto = numpy_helper.from_array(np.ascontiguousarray(array), name)
        if self.weight_style == "constant":
            self.node("Constant", [], [name], value=proto)
            return name
        self.initializers.append(proto)
        if self.weight_style == "input":
            self.weight_inputs.append(
                helper.make_tensor_value_info(name, proto.data_type, list(array.shape))
            )
        return name

    def ints(self, values: Sequence[int], stem: str = "axes") -> str:
        return self.tensor(np.asarray(values, dtype=np.int64), stem)

    def scalar(self, value: float, stem: str = "scalar") -> str:
        return self.tensor(np.asarray(value, dtype=np.float32), stem)

    def weight(
        self, shape: Sequence[int], fan_in: int | None = None, stem: str = "w", gain: float = 1.0
    ) -> str:
        """A seeded float32 weight scaled by gain/√fan-in (rule 1)."""
        fan = fan_in if fan_in is not None else int(np.prod(shape[1:])) or 1
        values = gain * self.rng.standard_normal(tuple(shape)).astype(np.float32) / np.sqrt(fan)
        return self.tensor(values.astype(np.float32), stem)

    def bias(self, size: int, stem: str = "b") -> str:
        return self.tensor((0.1 * self.rng.standard_normal(size)).astype(np.float32), stem)

    def graph(
        self,
        name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
    ) -> onnx.GraphProto:
        return helper.make_graph(
            self.nodes,
            name,
            [*inputs, *self.weight_inputs],
            list(outputs),
            self.initializers,
        )

    # -- layers ----------------------------------------------------------------------------------

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        kernel: int,
        *,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = True,
        bias_shift: float | np.ndarray = 0.0,
        gain: float = 1.0,
        dims: int = 2,
    ) -> str:
        """Conv with a seeded weight times ``gain``; ``bias_shift`` is added to the bias."""
        pad = kernel // 2 if pad is None else pad
        w = self.weight([cout, cin // group, *([kernel] * dims)], stem="conv_w", gain=gain)
        inputs = [x, w]
        if bias:
            values = 0.1 * self.rng.standard_normal(cout) + bias_shift
            inputs.append(self.tensor(values.astype(np.float32), "conv_b"))
        return self.op(
            "Conv",
            *inputs,
            kernel_shape=[kernel] * dims,
            strides=[stride] * dims,
            pads=[pad] * (2 * dims),
            group=group,
        )

    def batch_norm(self, x: str, channels: int) -> str:
        scale = self.tensor(self.rng.uniform(0.5, 1.5, channels).astype(np.float32), "bn_scale")
        shift = self.tensor((0.1 * self.rng.standard_normal(channels)).astype(np.float32), "bn_b")
        mean = self.tensor((0.2 * self.rng.standard_normal(channels)).astype(np.float32), "bn_m")
        var = self.tensor(self.rng.uniform(0.5, 2.0, channels).astype(np.float32), "bn_v")
        return self.op("BatchNormalization", x, scale, shift, mean, var, epsilon=1e-5)

    def matmul(self, x: str, k: int, n: int, *, bias: bool = True) -> str:
        y = self.op("MatMul", x, self.weight([k, n], fan_in=k, stem="mm_w"))
        return self.op("Add", y, self.bias(n, "mm_b")) if bias else y

    def gemm(self, x: str, k: int, n: int) -> str:
        """``Gemm(x, W[n, k], b, transB=1)``, the torch ``nn.Linear`` form."""
        w = self.weight([n, k], fan_in=k, stem="gemm_w")
        return self.op("Gemm", x, w, self.bias(n, "gemm_b"), transB=1)

    # -- ops whose form depends on the opset (rule 5) ----------------------------------------------

    def clip(self, x: str, low: float, high: float) -> str:
        if self.opset < 11:
            return self.op("Clip", x, min=low, max=high)
        return self.op("Clip", x, self.scalar(low, "clip_min"), self.scalar(high, "clip_max"))

    def pad(self, x: str, pads: Sequence[int]) -> str:
        if self.opset < 11:
            return self.op("Pad", x, pads=list(pads), mode="constant", value=0.0)
        return self.op("Pad", x, self.ints(pads, "pads"), self.scalar(0.0, "pad_value"))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset < 13:
            return self.op("Squeeze", x, axes=list(axes))
        return self.op("Squeeze", x, self.ints(axes))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset < 13:
            return self.op("Unsqueeze", x, axes=list(axes))
        return self.op("Unsqueeze", x, self.ints(axes))

    def reduce_sum(self, x: str, axes: Sequence[int], keepdims: int) -> str:
        if self.opset < 13:
            return self.op("ReduceSum", x, axes=list(axes), keepdims=keepdims)
        return self.op("ReduceSum", x, self.ints(axes), keepdims=keepdims)

    def reduce_mean(self, x: str, axes: Sequence[int], keepdims: int) -> str:
        if self.opset < 18:
            return self.op("ReduceMean", x, axes=list(axes), keepdims=keepdims)
        return self.op("ReduceMean", x, self.ints(axes), keepdims=keepdims)

    def split(self, x: str, sizes: Sequence[int], axis: int) -> list[str]:
        if self.opset < 13:
            return self.node("Split", [x], len(sizes), axis=axis, split=list(sizes))
        return self.node("Split", [x, self.ints(sizes, "split")], len(sizes), axis=axis)

    def upsample2x(self, x: str) -> str:
        """Nearest-neighbour ×2 on the last two axes of a 4-D tensor."""
        scales = self.tensor(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "scales")
        if self.opset < 10:
            return self.op("Upsample", x, scales, mode="nearest")
        if self.opset == 10:
            return self.op("Resize", x, scales, mode="nearest")
        if self.opset < 13:
            roi = self.tensor(np.zeros(0, np.float32), "roi")
            return self.op("Resize", x, roi, scales, mode="nearest")
        return self.op("Resize", x, "", scales, mode="nearest")


def float_info(name: str, shape: Sequence[int | str] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if shape is None else shape)


def make_model(
    graph: onnx.GraphProto, opset: int, *, ir_version: int | None = None
) -> onnx.ModelProto:
    """A model at ``opset`` with the IR version of its era (the lowest that allows the opset)."""
    opsets = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="graphopt-zoo")
    model.ir_version = ir_version or helper.find_min_ir_version_for(opsets)
    return model


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of ``graph`` and of every subgraph in it."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from all_tensors(attribute.g)
            for body in attribute.graphs:
                yield from all_tensors(body)
