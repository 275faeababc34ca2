"""Quantization arithmetic and the QuantizeLinear/DequantizeLinear graph pieces passes build with.

Affine quantization: ``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x ≈ (q - z) · s``.

Rules:

1. Weights are symmetric (z = 0) int8 in [-127, 127] (or [-63, 63] with ``reduce_range``), one scale
   per output channel on the given axis, or one per tensor. A channel of zeros gets scale 1, so
   zeros stay exactly zero.
2. Activations are uint8 asymmetric (the fast u8×s8 path of x86 CPUs) or int8 symmetric (what
   TensorRT wants); the range always contains 0 so that 0 is exact, and a degenerate range
   gets a tiny positive scale instead of a zero division.
3. Biases of Conv/Gemm are int32 with scale ``s_x · s_w`` per channel and z = 0: the layout ONNX
   Runtime's QLinearConv/QGemm fusions expect.
4. New tensor names derive from the tensor they quantize and are made unique in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

_MIN_SCALE = 1e-12


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point (per tensor, or per channel along ``axis``)."""

    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None


def activation_params(low: float, high: float, *, symmetric: bool) -> QuantParams:
    """Rule 2."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        bound = max(abs(low), abs(high))
        scale = max(bound / 127.0, _MIN_SCALE)
        return QuantParams(np.array(scale, np.float32), np.array(0, np.int8))
    scale = max((high - low) / 255.0, _MIN_SCALE)
    zero_point = int(np.clip(np.round(-low / scale), 0, 255))
    return QuantParams(np.array(scale, np.float32), np.array(zero_point, np.uint8))


def quantize_weight(
    values: np.ndarray, axis: int | None, *, reduce_range: bool = False
) -> tuple[np.ndarray, QuantParams]:
    """Rule 1: int8 values and their per-channel (or per-tensor) parameters."""
    limit = 63.0 if reduce_range else 127.0
    weights = np.asarray(values, dtype=np.float32)
    # In place where possible: a multi-GB model's largest tensor needs one float32 temporary.
    if axis is None:
        peak = np.array(max(weights.max(), -weights.min()) if weights.size else 0.0)
    else:
        moved = np.moveaxis(weights, axis, 0).reshape(weights.shape[axis], -1)
        peak = (
            np.maximum(moved.max(axis=1), -moved.min(axis=1))
            if moved.size
            else np.zeros(weights.shape[axis])
        )
    scale = np.where(peak > 0, peak / limit, 1.0).astype(np.float32)
    shape = [1] * weights.ndim
    if axis is not None:
        shape[axis] = -1
    scaled = np.divide(weights, scale.reshape(shape), dtype=np.float32)
    np.round(scaled, out=scaled)
    np.clip(scaled, -limit, limit, out=scaled)
    quantized = scaled.astype(np.int8)
    del scaled
    zero_point = np.zeros_like(scale, dtype=np.int8)
    return quantized, QuantParams(scale, zero_point, axis)


def quantize_bias(
    bias: np.ndarray, activation_scale: float, weight_scale: np.ndarray
) -> tuple[np.ndarray, QuantParams]:
    """Rule 3 (a per-tensor weight scale gives one bias scale: no per-axis Q/DQ needed)."""
    scale = (np.float32(activation_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    if scale.ndim == 0:
        safe_scalar = float(scale) if scale > 0 else 1.0
        quantized = np.clip(np.round(bias / safe_scalar), -(2**31) + 1, 2**31 - 1)
        scalar = np.array(scale, np.float32)
        return quantized.astype(np.int32), QuantParams(scalar, np.array(0, np.int32), None)
    scale = np.broadcast_to(scale, bias.shape).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)
    quantized = np.clip(np.round(bias / safe), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    return quantized, QuantParams(scale, np.zeros(bias.shape, np.int32), 0)


def dequantize(quantized: np.ndarray, params: QuantParams) -> np.ndarray:
    """The float values a DequantizeLinear with ``params`` produces (for error estimates)."""
    shape = [1] * quantized.ndim
    if params.axis is not None and params.scale.ndim:
        shape[params.axis] = -1
    scale = params.scale.reshape(shape) if params.scale.ndim else params.scale
    zero = params.zero_point.reshape(shape) if params.zero_point.ndim else params.zero_point
    return (quantized.astype(np.float32) - zero.astype(np.float32)) * scale


class Namer:
    """Rule 4: unique names within the given graphs (pass a graph and its subgraphs to keep
    names unique across scopes)."""

    def __init__(self, *graphs: gs.Graph) -> None:
        self._used: set[str] = set()
        for graph in graphs:
            self._used.update(graph.tensors().keys())
            self._used.update(node.name for node in graph.nodes if node.name)

    def __call__(self, base: str) -> str:
        name, index = base, 1
        while name in self._used:
            name = f"{base}_{index}"
            index += 1
        self._used.add(name)
        return name


def _params_constants(namer: Namer, base: str, params: QuantParams) -> list[gs.Constant]:
    return [
        gs.Constant(namer(f"{base}_scale"), params.scale),
        gs.Constant(namer(f"{base}_zero_point"), params.zero_point),
    ]


def _axis_attrs(params: QuantParams) -> dict[str, int]:
    return {"axis": params.axis} if params.axis is not None and params.scale.ndim else {}


def dequantize_node(
    graph: gs.Graph, namer: Namer, base: str, quantized: np.ndarray, params: QuantParams
) -> gs.Variable:
    """An integer initializer feeding a DequantizeLinear; returns the float output."""
    source = gs.Constant(namer(f"{base}_quantized"), quantized)
    output = gs.Variable(
        namer(f"{base}_dequantized"), dtype=np.float32, shape=list(quantized.shape)
    )
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            name=namer(f"{base}_DequantizeLinear"),
            attrs=_axis_attrs(params),
            inputs=[source, *_params_constants(namer, base, params)],
            outputs=[output],
        )
    )
    return output


def fake_quantize(
    graph: gs.Graph, namer: Namer, tensor: gs.Tensor, params: QuantParams
) -> gs.Variable:
    """QuantizeLinear → DequantizeLinear on an activation; returns the dequantized tensor."""
    base = tensor.name
    scale, zero = _params_constants(namer, base, params)
    quantized = gs.Variable(
        namer(f"{base}_quantized"), dtype=params.zero_point.dtype, shape=tensor.shape
    )
    output = gs.Variable(namer(f"{base}_dequantized"), dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(
        gs.Node(
            "QuantizeLinear",
            name=namer(f"{base}_QuantizeLinear"),
            attrs=_axis_attrs(params),
            inputs=[tensor, scale, zero],
            outputs=[quantized],
        )
    )
    graph.nodes.append(
        gs.Node(
            "DequantizeLinear",
            name=namer(f"{base}_DequantizeLinear"),
            attrs=_axis_attrs(params),
            inputs=[quantized, scale, zero],
            outputs=[output],
        )
    )
    return output
