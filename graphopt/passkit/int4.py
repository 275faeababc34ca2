"""The block-quantized layouts ONNX Runtime runs, written as onnx-graphsurgeon nodes.

:func:`write_block_quantized` replaces a MatMul with a 2-D constant weight [K, N] by the
quantized weight of :mod:`graphopt.passkit.blockquant` in one of :data:`LAYOUTS`;
:func:`write_gather_block_quantized` does the same for an embedding Gather. Rules, each checked
numerically on ONNX Runtime 1.32 CPU with graph optimisations off and at the default level
(``tests/passkit/test_int4.py``):

1. ``nbits``: ``com.microsoft.MatMulNBits`` (4 or 8 bits). B is uint8 [N, blocks, blob]
   (blob = block_size · bits / 8), K zero-padded to whole blocks with the zero code, 4-bit
   codes packed two per byte, low nibble first; scales float32 [N · blocks]; asymmetric
   formats add uint8 zero points [N · ⌈blocks · bits / 8⌉] (4-bit: two blocks per byte, each
   column's row padded to a whole byte); symmetric ones store none (ONNX Runtime's default
   zero is 2**(bits − 1), the format's). ``block_size = 0`` (one group over K) is written in
   blocks of 128 (:data:`NBITS_WHOLE_K_BLOCK`) that repeat the column's scale and zero
   point. ``accuracy_level`` (0 = unset, 1–4; 4 computes with int8 activations on CPU) is
   written when it is not 0. An optional bias becomes input 5.
2. ``dequantize``: standard opset-21 ``DequantizeLinear`` → ``Transpose`` → ``MatMul``. The
   weight is stored transposed, [N, K], blocked along axis 1 (K): symmetric formats as int4/
   int8 codes (code − 2**(bits − 1)) without zero point, asymmetric ones as uint4/uint8 with
   zero points [N, groups]; ``block_size = 0`` is one block of all K (``block_size`` = K).
   The natural layout, [K, N] blocked along axis 0 straight into the MatMul, is not written:
   at the default optimisation level ONNX Runtime 1.32 fuses it into MatMulNBits with int8
   activations (its ``session.qdq_matmulnbits_accuracy_level`` default, 4), so the session
   silently computes something other than the file's weights — measured on one 1536 × 384
   layer with outlier activations: max error 4.7 % of the output's peak (cosine 0.99946),
   0.5–0.8 % on plain Gaussian inputs, against 1e-6 with optimisations off. The transposed
   layout is not fused and computes the file's weights exactly at every level (the test
   keeps both facts). A per-axis DequantizeLinear (axis 0 of [N, K]) + Transpose is fused the
   same way (ORT moves the Transpose into the constant): 1.0 % max error with an outlier
   channel, hence one K-long block instead. The layout saves file size, not time: the weight
   is dequantized at every run.
3. ``GatherBlockQuantized`` (com.microsoft; 4 or 8 bits) for a Gather along axis 0 of a
   [V, D] table (:func:`gather_block_constants`, then :func:`write_gather_block_quantized`):
   blocks along D (``quantize_axis`` 1), data uint8 [V, ⌈D · bits / 8⌉] (4-bit packed low
   nibble first), scales [V, blocks], zero points as in rule 1 when asymmetric.
   ``block_size = 0`` is refused (the op needs a power of two ≥ 16).
4. Every written tensor is named after the weight (``<weight>_int4``, ``…_scales``,
   ``…_zero_points``), made unique by the caller's :class:`~graphopt.passkit.qdq.Namer`;
   the replaced node's output tensor is kept, so readers and graph outputs are unchanged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.ir import weights
from graphopt.passkit.blockquant import BlockFormat, BlockQuantized, quantize_rtn
from graphopt.passkit.qdq import Namer

logger = logging.getLogger(__name__)

LAYOUTS = ("nbits", "dequantize")
MICROSOFT = "com.microsoft"
BLOCKED_DQ_OPSET = 21
"""DequantizeLinear's ``block_size`` and the int4/uint4 types are opset 21."""
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


class PackedCodes(weights.LazyWeight):
    """An int4/uint4 (or int8/uint8) initializer written from one code per array element.

    NumPy has no 4-bit type: :meth:`raw_bytes` packs two codes per byte, the first in the low
    nibble, as ONNX stores INT4/UINT4 tensors.
    """

    def __init__(self, values: np.ndarray, element_type: int) -> None:
        self.values = np.ascontiguousarray(values)
        self.shape = tuple(int(d) for d in values.shape)
        self.element_type = element_type

    def load(self) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.element_type)
        return self.values.astype(dtype)

    def raw_bytes(self) -> bytes:
        if self.element_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            return self.load().tobytes()
        return pack_nibbles(self.values.reshape(-1)).tobytes()


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte along the last axis, the first in the low nibble; an odd last
    axis is padded with 0. Negative codes (int4) keep their two's-complement low bits."""
    nibbles = (np.asarray(codes).astype(np.int16) & 0x0F).astype(np.uint8)
    if nibbles.shape[-1] % 2:
        pad = np.zeros((*nibbles.shape[:-1], 1), np.uint8)
        nibbles = np.concatenate([nibbles, pad], axis=-1)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)


NBITS_WHOLE_K_BLOCK = 128
"""Rule 1: the MatMulNBits block that stores one group over all K (its scale repeated)."""


def _block_for_nbits(quantized: BlockQuantized) -> int:
    """Rule 1: the MatMulNBits block size; for one group over K, :data:`NBITS_WHOLE_K_BLOCK`
    (or the smallest power of two ≥ K, at least 16, when K is shorter)."""
    size = quantized.format.block_size
    if size:
        return size
    return min(NBITS_WHOLE_K_BLOCK, max(16, 1 << max(quantized.rows - 1, 1).bit_length()))


def nbits_arrays(
    quantized: BlockQuantized,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rule 1: MatMulNBits' B [N, blocks, blob], scales [N · blocks], zero points or None."""
    fmt = quantized.format
    size = _block_for_nbits(quantized)
    rows, columns = quantized.codes.shape
    blocks = -(-rows // size)
    padded = np.empty((blocks * size, columns), np.uint8)
    padded[:rows] = quantized.codes
    padded[rows:] = quantized.zeros()[-1]  # padding rows dequantize to 0
    by_column = padded.T.reshape(columns, blocks, size)
    packed = pack_nibbles(by_column) if fmt.bits == 4 else np.ascontiguousarray(by_column)
    repeat = blocks // quantized.scales.shape[0]  # > 1 only for one group over K
    block_scales = np.repeat(quantized.scales, repeat, axis=0)
    scales = np.ascontiguousarray(block_scales.T, dtype=np.float32).reshape(-1)
    zero_points = None
    if quantized.zero_points is not None:
        zeros = np.ascontiguousarray(np.repeat(quantized.zero_points, repeat, axis=0).T)
        zero_points = (pack_nibbles(zeros) if fmt.bits == 4 else zeros).reshape(-1)
    return packed.astype(np.uint8), scales, zero_points


def _detach(node: gs.Node) -> gs.Tensor:
    output = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    return output


def _suffix(fmt: BlockFormat) -> str:
    return f"int{fmt.bits}"


def write_block_quantized(
    graph: gs.Graph,
    namer: Namer,
    node: gs.Node,
    quantized: BlockQuantized,
    layout: str = "nbits",
    accuracy_level: int = 0,
    bias: np.ndarray | None = None,
) -> list[gs.Node]:
    """Replace MatMul ``node`` (input 1 a 2-D constant weight [K, N]) by ``quantized`` in
    ``layout`` (rules 1, 2 and 4); returns the new nodes. ``bias`` [N] is added to the output
    (MatMulNBits' bias input, or an Add in the ``dequantize`` layout)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown int4 layout {layout!r}; expected one of {LAYOUTS}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level must be one of {ACCURACY_LEVELS}, not {accuracy_level}")
    weight = node.inputs[1]
    rows, columns = quantized.codes.shape
    if tuple(weights.shape(weight)) != (rows, columns):
        raise ValueError(
            f"{node.name}: weight shape {weights.shape(weight)} but quantized {(rows, columns)}"
        )
    activation = node.inputs[0]
    output = _detach(node)
    base = weight.name
    name = node.name or output.name
    if layout == "nbits":
        new = _matmul_nbits(namer, name, base, activation, output, quantized, accuracy_level, bias)
    else:
        new = _dequantize_matmul(namer, name, base, activation, output, quantized, bias)
    graph.nodes.extend(new)
    return new


def _matmul_nbits(
    namer: Namer,
    name: str,
    base: str,
    activation: gs.Tensor,
    output: gs.Tensor,
    quantized: BlockQuantized,
    accuracy_level: int,
    bias: np.ndarray | None,
) -> list[gs.Node]:
    fmt = quantized.format
    packed, scales, zero_points = nbits_arrays(quantized)
    suffix = _suffix(fmt)
    inputs: list[gs.Tensor] = [
        activation,
        weights.new_constant(namer(f"{base}_{suffix}"), packed),
        weights.new_constant(namer(f"{base}_{suffix}_scales"), scales),
    ]
    if zero_points is not None:
        inputs.append(weights.new_constant(namer(f"{base}_{suffix}_zero_points"), zero_points))
    if bias is not None:
        while len(inputs) < 5:
            inputs.append(gs.Variable.empty())
        inputs.append(weights.new_constant(namer(f"{base}_bias"), bias.astype(np.float32)))
    attrs = {
        "K": int(quantized.rows),
        "N": int(quantized.codes.shape[1]),
        "bits": int(fmt.bits),
        "block_size": int(_block_for_nbits(quantized)),
    }
    if accuracy_level:
        attrs["accuracy_level"] = int(accuracy_level)
    return [
        gs.Node(
            "MatMulNBits",
            name=namer(f"{name}_MatMulNBits"),
            domain=MICROSOFT,
            attrs=attrs,
            inputs=inputs,
            outputs=[output],
        )
    ]


def _code_constant(name: str, codes: np.ndarray, fmt: BlockFormat) -> gs.Constant:
    """Rule 2: codes as int4/int8 (symmetric, shifted by the zero) or uint4/uint8."""
    if fmt.symmetric:
        values = codes.astype(np.int16) - fmt.zero
        kind = onnx.TensorProto.INT4 if fmt.bits == 4 else onnx.TensorProto.INT8
    else:
        values = codes
        kind = onnx.TensorProto.UINT4 if fmt.bits == 4 else onnx.TensorProto.UINT8
    if fmt.bits == 8:
        dtype = np.int8 if fmt.symmetric else np.uint8
        return weights.new_constant(name, np.ascontiguousarray(values, dtype=dtype))
    return weights.new_constant(name, PackedCodes(values, kind))


def _dequantize_matmul(
    namer: Namer,
    name: str,
    base: str,
    activation: gs.Tensor,
    output: gs.Tensor,
    quantized: BlockQuantized,
    bias: np.ndarray | None,
) -> list[gs.Node]:
    fmt = quantized.format
    suffix = _suffix(fmt)
    scales = np.ascontiguousarray(quantized.scales.T, dtype=np.float32)  # [N, groups]
    inputs: list[gs.Tensor] = [
        _code_constant(namer(f"{base}_{suffix}"), quantized.codes.T, fmt),
        weights.new_constant(namer(f"{base}_{suffix}_scales"), scales),
    ]
    if quantized.zero_points is not None:
        zeros = np.ascontiguousarray(quantized.zero_points.T)  # [N, groups]
        inputs.append(_code_constant(namer(f"{base}_{suffix}_zero_points"), zeros, fmt))
    block = fmt.group_rows(quantized.rows)
    attrs = {"axis": 1, "block_size": int(block)}
    transposed = gs.Variable(namer(f"{base}_{suffix}_dequantized"), dtype=np.float32)
    weight = gs.Variable(namer(f"{base}_{suffix}_weight"), dtype=np.float32)
    product = output if bias is None else gs.Variable(namer(f"{name}_product"), dtype=np.float32)
    nodes = [
        gs.Node(
            "DequantizeLinear",
            name=namer(f"{name}_DequantizeLinear"),
            attrs=attrs,
            inputs=inputs,
            outputs=[transposed],
        ),
        gs.Node(
            "Transpose",
            name=namer(f"{name}_Transpose"),
            attrs={"perm": [1, 0]},
            inputs=[transposed],
            outputs=[weight],
        ),
        gs.Node("MatMul", name=namer(name), inputs=[activation, weight], outputs=[product]),
    ]
    if bias is not None:
        constant = weights.new_constant(namer(f"{base}_bias"), bias.astype(np.float32))
        nodes.append(
            gs.Node("Add", name=namer(f"{name}_Bias"), inputs=[product, constant], outputs=[output])
        )
    return nodes


def gather_block_constants(
    namer: Namer, base: str, table: np.ndarray, fmt: BlockFormat, *, search_clip: bool = False
) -> list[gs.Constant]:
    """Rule 3: GatherBlockQuantized's data, scales and (asymmetric) zero points for a [V, D]
    table, blocks of ``fmt.block_size`` along D; share them between Gathers of one table."""
    if fmt.block_size == 0:
        raise ValueError("GatherBlockQuantized needs a block size (16…256), not 0")
    quantized = quantize_rtn(np.asarray(table).T, fmt, search_clip=search_clip)
    codes = quantized.codes.T  # [V, D]
    data = pack_nibbles(codes) if fmt.bits == 4 else np.ascontiguousarray(codes)
    suffix = _suffix(fmt)
    constants = [
        weights.new_constant(namer(f"{base}_{suffix}"), data.astype(np.uint8)),
        weights.new_constant(
            namer(f"{base}_{suffix}_scales"),
            np.ascontiguousarray(quantized.scales.T, dtype=np.float32),  # [V, blocks]
        ),
    ]
    if quantized.zero_points is not None:
        zeros = np.ascontiguousarray(quantized.zero_points.T)
        packed = pack_nibbles(zeros) if fmt.bits == 4 else zeros
        constants.append(weights.new_constant(namer(f"{base}_{suffix}_zero_points"), packed))
    return constants


def write_gather_block_quantized(
    graph: gs.Graph,
    namer: Namer,
    node: gs.Node,
    constants: list[gs.Constant],
    fmt: BlockFormat,
) -> list[gs.Node]:
    """Rule 3: replace Gather ``node`` (axis 0 of a [V, D] table) by GatherBlockQuantized
    reading ``constants`` from :func:`gather_block_constants`."""
    data, scales, *zero_points = constants
    indices = node.inputs[1]
    output = _detach(node)
    new = [
        gs.Node(
            "GatherBlockQuantized",
            name=namer(f"{node.name or output.name}_GatherBlockQuantized"),
            domain=MICROSOFT,
            attrs={
                "gather_axis": 0,
                "quantize_axis": 1,
                "block_size": int(fmt.block_size),
                "bits": int(fmt.bits),
            },
            inputs=[data, indices, scales, *zero_points],
            outputs=[output],
        )
    ]
    graph.nodes.extend(new)
    return new
