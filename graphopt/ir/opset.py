"""Opset upgrades for passes whose rewrites need a newer opset than the input model has.

Exporters still write old opsets (Paddle2ONNX 9-12, older torch 11, the Caffe2-era zoo 9),
while per-axis QuantizeLinear/DequantizeLinear need 13 and int4 Q/DQ 21 (GUIDE §3, Opsets).

Rules:

1. A pass declares the opset its rewrites need (:meth:`graphopt.passkit.api.Pass.required_opset`);
   the pipeline asks for the largest one among the planned passes when it loads the model.
2. Only upgrades: a model already at or above the target is left as it is.
3. The upgrade is onnx's version converter run on the model's structure only: initializers of
   :data:`HEAVY_BYTES` or more, and every initializer stored as external data, are taken out
   first (declared as typed graph inputs while converting) and put back unchanged, so no
   weight is copied and external data stays on disk. The IR version is raised to the least
   the new opset needs.
4. The converted graph must pass onnx's checker. When the converter has no adapter for some
   op, or its result fails the check, the model keeps its opset and the reason is recorded in
   the returned :class:`OpsetUpgrade`; passes then use what the old opset allows (``quant``:
   per-tensor weights) or refuse with that reason. Either way it is logged and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from onnx import external_data_helper, helper, version_converter

logger = logging.getLogger(__name__)

HEAVY_BYTES = 1 << 16
"""Initializers this large (or stored externally) never go through the converter."""
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpsetUpgrade:
    """What happened when the pipeline asked for ``target``: converted, or why not."""

    source: int
    target: int
    converted: bool
    reason: str | None = None

    def describe(self) -> str:
        if self.converted:
            return f"opset {self.source} → {self.target}"
        return f"opset stays {self.source} (upgrade to {self.target} failed: {self.reason})"


def default_opset(proto: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain (0 when it imports none)."""
    versions = [o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS]
    return max(versions, default=0)


def upgrade_proto(proto: onnx.ModelProto, target: int) -> tuple[onnx.ModelProto, OpsetUpgrade]:
    """Rules 2-4: ``proto`` converted to opset ``target`` (or unchanged, with the reason).

    On success the heavy initializers move into the returned model: the caller must use the
    returned proto, not the one it passed in.
    """
    source = default_opset(proto)
    if source >= target:
        return proto, OpsetUpgrade(source, source, converted=False, reason="already new enough")
    heavy, added = _take_out_heavy(proto)
    try:
        converted = version_converter.convert_version(proto, target)
        opsets = list(converted.opset_import)
        converted.ir_version = max(converted.ir_version, helper.find_min_ir_version_for(opsets))
        onnx.checker.check_model(converted)  # structure only: heavy tensors are still out
    except Exception as error:  # the converter raises RuntimeError/ValidationError/IndexError
        _put_back(proto, heavy, added)
        reason = _first_line(error)
        logger.warning("cannot upgrade the model from opset %d to %d: %s", source, target, reason)
        return proto, OpsetUpgrade(source, target, converted=False, reason=reason)
    _put_back(converted, heavy, added)  # moved, not copied: ``proto`` is spent
    logger.info("upgraded the model from opset %d to %d", source, target)
    return converted, OpsetUpgrade(source, target, converted=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line.split("Assertion `false` failed: ")[-1]


def _is_heavy(tensor: onnx.TensorProto) -> bool:
    if external_data_helper.uses_external_data(tensor):
        return True
    return tensor.ByteSize() >= HEAVY_BYTES


def _take_out_heavy(proto: onnx.ModelProto) -> tuple[list[onnx.TensorProto], set[str]]:
    """Move heavy initializers out of ``proto`` and declare them as typed graph inputs.

    Returns the tensors and the names of the inputs this added (Caffe2-era models already
    list their initializers as inputs; those declarations stay).
    """
    graph = proto.graph
    kept: list[onnx.TensorProto] = []
    heavy: list[onnx.TensorProto] = []
    while graph.initializer:  # protobuf: pop() hands the message over without a copy
        tensor = graph.initializer.pop()
        (heavy if _is_heavy(tensor) else kept).append(tensor)
    graph.initializer.extend(reversed(kept))
    heavy.reverse()
    declared = {value.name for value in graph.input}
    added = {tensor.name for tensor in heavy if tensor.name not in declared}
    graph.input.extend(
        helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        for tensor in heavy
        if tensor.name in added
    )
    return heavy, added


def _put_back(proto: onnx.ModelProto, heavy: list[onnx.TensorProto], added: set[str]) -> None:
    """Undo :func:`_take_out_heavy` on ``proto`` (the original or the converted model)."""
    graph = proto.graph
    keep = [value for value in graph.input if value.name not in added]
    del graph.input[:]
    graph.input.extend(keep)
    graph.initializer.extend(heavy)
