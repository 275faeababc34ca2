"""Issue 17.2: one reading of MatMul/Gemm/Conv weight layouts for quant, lowrank and sparsify."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from graphopt.passkit.selection import weighted_op


def _node(op: str, weight_shape: tuple[int, ...] | None, **attrs: object) -> gs.Node:
    x = gs.Variable("x", dtype=np.float32)
    weight = (
        gs.Constant("w", np.zeros(weight_shape, np.float32))
        if weight_shape is not None
        else gs.Variable("y", dtype=np.float32, shape=[4, 3])
    )
    inputs = [x, weight]
    if op in ("Gemm", "Conv"):
        inputs.append(gs.Constant("b", np.zeros(3, np.float32)))
    return gs.Node(op, attrs=dict(attrs), inputs=inputs, outputs=[gs.Variable("out")])


@pytest.mark.parametrize(
    ("op", "shape", "attrs", "expected"),
    [
        ("MatMul", (4, 3), {}, (1, 0, -1, False, False, 1.0)),
        ("MatMul", (2, 4, 3), {}, (2, 1, -1, False, False, 1.0)),
        ("Gemm", (4, 3), {}, (1, 0, -1, False, False, 1.0)),
        ("Gemm", (3, 4), {"transB": 1, "alpha": 0.5}, (0, 1, -1, True, False, 0.5)),
        ("Gemm", (4, 3), {"transA": 1}, (1, 0, 0, False, True, 1.0)),
        ("Conv", (3, 2, 5, 5), {}, (0, 1, 1, False, False, 1.0)),
    ],
)
def test_layouts_follow_the_onnx_specs(
    op: str, shape: tuple[int, ...], attrs: dict[str, object], expected: tuple[object, ...]
) -> None:
    layout = weighted_op(_node(op, shape, **attrs))
    assert layout is not None
    got = (
        layout.out_axis,
        layout.in_axis,
        layout.activation_axis,
        layout.weight_transposed,
        layout.input_transposed,
        layout.alpha,
    )
    assert got == expected
    assert layout.weight is not None and layout.weight.name == "w"
    assert (layout.bias is not None) == (op in ("Gemm", "Conv"))


def test_activation_times_activation_and_other_ops() -> None:
    layout = weighted_op(_node("MatMul", None))
    assert layout is not None and layout.weight is None and layout.out_axis == 1
    relu = gs.Node("Relu", inputs=[gs.Variable("x")], outputs=[gs.Variable("y")])
    assert weighted_op(relu) is None
    lone = gs.Node("MatMul", inputs=[gs.Variable("x")], outputs=[gs.Variable("y")])
    assert weighted_op(lone) is None
