"""Model I/O: load without pulling weights into memory, save atomically.

Rules this module follows:

1. Loading parses the protobuf only. Weights stored as external data stay on disk until a pass
   reads them (:class:`ExternalValues` reads one tensor at a time, with the model's own folder
   as the base directory, and never rewrites the tensor proto it came from).
2. Every way a file can be unusable is a :class:`~graphopt.errors.ModelLoadError` with one line:
   missing, empty, not ONNX, truncated, unsupported IR version, missing or short external data,
   or a graph that onnx's checker rejects (e.g. one tensor name produced by two nodes); the
   checker's reason is the message.
3. Saving writes the model complete into a staging folder in the temporary folder, then
   publishes it (:mod:`graphopt.ir.files`): a failed or interrupted save leaves no partial file,
   and a save never writes over the input model or its external data.
4. External data is used when the model came with it or when it would not fit in one protobuf
   (~2 GB). Tensors are written into the data file one at a time, in graph order; those of
   1 MiB or more start at a 4 KiB boundary so ONNX Runtime can memory-map them (at most 0.4 %
   of padding; smaller tensors are packed, so a model of small tensors never grows); bytes
   of untouched weights are copied from the source file in chunks, never materialised as
   arrays. Tensors under 1 KiB, and those of control-flow bodies, are stored inline, never as
   references to the input's data file.
5. Saved models carry no value_info for intermediate tensors. With it, ONNX Runtime fuses
   Add + LayerNormalization into SkipLayerNormalization, which measured slower on x86 CPU
   (MiniLM: 14 ms against 1.9 ms for the unfused pair over 12 layers; ORT's own dynamically
   quantized MiniLM ran 1.52× faster than fp32 with value_info, 1.61× without).
6. Weights are touched through :mod:`graphopt.ir.weights` (its rules): reading never pins a
   weight in the graph, and weights a pass computes of at least 1 MiB go to the model's
   :class:`~graphopt.ir.weights.WeightSpill`, files in the temporary folder, read back one at
   a time when they are used or saved. Memory stays near the few tensors a pass works on,
   whatever the model's size.
7. A constant read in several control-flow bodies is written once, in the innermost graph
   that encloses all of them (bodies see outer-scope names), as the exporter had it:
   onnx-graphsurgeon exports a copy into every body that reads it, which made a torch
   export with weights declared in an If branch and read in nested bodies 1.42× larger.
8. A run that needs a few early tensors runs a prefix of the graph (:func:`prefix_model`):
   ONNX Runtime computes every node of a session whichever outputs a run asks for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains

from graphopt.errors import InputError, ModelLoadError
from graphopt.ir.files import (
    check_distinct,
    check_output_target,
    data_file_name,
    data_locations,
    model_roles,
    publish,
    resolve_tmp_dir,
    staging_folder,
    storage_error,
)
from graphopt.ir.opset import OpsetUpgrade, default_opset, upgrade_proto
from graphopt.ir.ort import InMemoryModel
from graphopt.ir.weights import (
    NATIVE_NUMPY_TYPES,
    ExternalValues,
    WeightSpill,
    attach_base_dir,
    element_type,
    external_ref,
    is_in_file,
    is_sparse,
    nbytes,
    point_to_external,
    storage,
    tensor_proto,
)

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT_BYTES = 2_000_000_000
"""Serialized protobufs cannot exceed 2 GiB; we switch to external data a little below that."""
EXTERNAL_THRESHOLD_BYTES = 1024
"""Tensors smaller than this stay inside the .onnx file even when external data is used."""
EXTERNAL_ALIGNMENT = 4096
ALIGN_MIN_BYTES = 1 << 20
"""Tensors this large start at an EXTERNAL_ALIGNMENT boundary in external data (rule 4)."""
MIN_IR_VERSION = 3
MIN_IR_WITHOUT_INPUT_INITIALIZERS = 4
"""The first IR version in which initializers need not also be graph inputs."""
SKELETON_INLINE_LIMIT_BYTES = 1 << 16
_COPY_CHUNK_BYTES = 64 * 1024 * 1024


def _inline_tensor_proto(constant: gs.Constant) -> onnx.TensorProto:
    """The constant as graphsurgeon exports it (lazy tensors: their original proto, uncopied)."""
    return OnnxExporter.export_tensor_proto(constant)


class ExternalWriter:
    """Writes tensors into one external-data file as a model is exported (module rule 4).

    ``keep_source_refs``: tensors still lazily stored in files (the source's data, spilled
    weights) keep pointing there instead of being copied; :attr:`kept` maps their names to the
    folder their locations resolve in (for :func:`runnable_model`). ``align_all``: every
    tensor starts at a 64-byte boundary, so each can be memory-mapped as an array.
    """

    def __init__(
        self,
        handle: BinaryIO,
        location: str,
        *,
        keep_source_refs: bool = False,
        align_all: bool = False,
    ) -> None:
        self.handle = handle
        self.location = location
        self.keep_source_refs = keep_source_refs
        self.align_all = align_all
        self.kept: dict[str, Path] = {}
        self.offset = 0

    def write(self, constant: gs.Constant) -> onnx.TensorProto:
        values = storage(constant)
        if isinstance(values, ExternalValues):
            proto = onnx.TensorProto()
            proto.CopyFrom(values.tensor)
            proto.name = constant.name
            if self.keep_source_refs:
                self.kept[constant.name] = values.base_dir
                return proto
            self._align(nbytes(constant))
            length = _copy_external_bytes(proto, values.base_dir, self.handle)
        else:
            source = _inline_tensor_proto(constant)
            raw = _raw_bytes(source)
            # A header-only proto: a copied proto keeps its cleared bytes in its protobuf arena
            # for as long as it lives, so memory would grow by every tensor written.
            proto = onnx.TensorProto(name=constant.name, data_type=source.data_type)
            proto.dims.extend(source.dims)
            del source
            self._align(len(raw))
            self.handle.write(raw)
            length = len(raw)
            del raw
        point_to_external(proto, self.location, self.offset, length)
        self.offset += length
        return proto

    def _align(self, nbytes: int) -> None:
        if nbytes < ALIGN_MIN_BYTES and not self.align_all:
            return
        padding = (-self.offset) % (EXTERNAL_ALIGNMENT if nbytes >= ALIGN_MIN_BYTES else 64)
        self.handle.write(b"\0" * padding)
        self.offset += padding


@dataclass
class Model:
    """An ONNX model opened for editing.

    ``graph`` is an onnx-graphsurgeon graph whose untouched weights stay lazy. ``shell`` keeps the
    model-level fields (metadata, producer, domain, doc string) so that saving preserves them.
    """

    graph: gs.Graph
    shell: onnx.ModelProto
    source: Path | None = None
    had_external_data: bool = False
    source_input_names: frozenset[str] = frozenset()
    spill: WeightSpill = field(default_factory=WeightSpill)
    """Where passes keep the large weights they compute (module rule 6)."""
    original_names: Mapping[str, str] = field(default_factory=dict)
    """Names normalization gave nodes → what the exporter wrote ("" for unnamed); saved
    models write the exporter's names."""
    opset_upgrade: OpsetUpgrade | None = None
    """Set when loading asked for a newer opset (see :mod:`graphopt.ir.opset`)."""

    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def to_proto(self, external: ExternalWriter | None = None) -> onnx.ModelProto:
        """Export to a ModelProto.

        Without ``external``, lazy external tensors keep their references to the source file and
        every other weight is copied into the proto. With it, each main-graph constant of at
        least 1 KiB is written to the writer's data file as it is exported (rule 4), so the
        proto never holds the weights. Intermediate tensors get no value_info (rule 5).
        """
        with _exporter_names(self):
            return self._export(external)

    def _export(self, external: ExternalWriter | None) -> onnx.ModelProto:
        graph = self.graph
        initializers: list[onnx.TensorProto] = []
        sparse: list[onnx.SparseTensorProto] = []
        for tensor in graph.tensors().values():
            if not isinstance(tensor, gs.Constant):
                continue
            if is_sparse(tensor):
                sparse.append(OnnxExporter.export_sparse_tensor_proto(tensor))
            elif external is not None and nbytes(tensor) >= EXTERNAL_THRESHOLD_BYTES:
                initializers.append(external.write(tensor))
            elif external is not None and not external.keep_source_refs:
                # small tensors stored in the source's data file: inline, never a reference
                # to the input's files (the output must be self-contained)
                initializers.append(tensor_proto(tensor))
            else:
                initializers.append(_inline_tensor_proto(tensor))
        proto = _shell_of(self.shell)
        target = proto.graph
        target.name = graph.name or ""
        if graph.doc_string:
            target.doc_string = graph.doc_string
        target.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
        target.input.extend(
            OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs
        )
        target.output.extend(
            OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs
        )
        target.initializer.extend(initializers)
        del initializers
        target.sparse_initializer.extend(sparse)
        hoist_body_initializers(target)
        _drop_body_value_info(target)
        if external is not None and not external.keep_source_refs:
            _inline_body_external(target, self)
        del proto.functions[:]
        proto.functions.extend(OnnxExporter.export_function(f) for f in graph.functions)
        domains = [helper.make_opsetid(d.domain, d.version) for d in update_import_domains(graph)]
        del proto.opset_import[:]
        proto.opset_import.extend(_merge_opsets(self.shell.opset_import, domains))
        return proto

    def weight_bytes(self) -> int:
        """Bytes held by constant tensors, lazy or not (no weight is loaded to count them)."""
        return sum(nbytes(c) for c in iter_constants(self.graph))


@contextlib.contextmanager
def _exporter_names(model: Model) -> Iterator[None]:
    """Export nodes (re)named by normalization under the names the exporter gave them."""
    hidden: list[tuple[gs.Node, str]] = []
    if model.original_names:
        for sub in iter_graphs(model.graph):
            for node in sub.nodes:
                if node.name in model.original_names:
                    hidden.append((node, node.name))
                    node.name = model.original_names[node.name]
    try:
        yield
    finally:
        for node, name in hidden:
            node.name = name


def hoist_body_initializers(graph: onnx.GraphProto) -> int:
    """Rule 7: copies of one constant in several bodies become one initializer of their
    innermost common enclosing graph. A name that stands for different contents somewhere in
    that graph's scope is left alone. Returns how many copies were removed."""
    parents: dict[int, onnx.GraphProto | None] = {id(graph): None}
    holders: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    stack = [graph]
    while stack:
        current = stack.pop()
        for node in current.node:
            for attribute in node.attribute:
                bodies = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
                for body in bodies:
                    parents[id(body)] = current
                    stack.append(body)
                    for tensor in body.initializer:
                        holders.setdefault(tensor.name, []).append((body, tensor))
    removed = 0
    for name, held in holders.items():
        if len(held) < 2:
            continue
        groups: dict[bytes, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
        for body, tensor in held:
            groups.setdefault(tensor.SerializeToString(deterministic=True), []).append(
                (body, tensor)
            )
        for content, group in groups.items():
            if len(group) < 2:
                continue
            home = _common_ancestor([body for body, _ in group], parents)
            others = [body for key, g in groups.items() if key != content for body, _ in g]
            if _defines(home, name) or any(
                _encloses(home, body, parents) or _encloses(body, home, parents) for body in others
            ):
                logger.debug("not hoisting %s: the name stands for other values nearby", name)
                continue
            kept = group[0][1]
            home.initializer.append(kept)
            for body, tensor in group:
                for index, candidate in enumerate(body.initializer):
                    if candidate is tensor or candidate.name == name:
                        del body.initializer[index]
                        break
            removed += len(group) - 1
    return removed


def _bodies(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every control-flow body under ``graph``, at any depth."""
    for node in graph.node:
        for attribute in node.attribute:
            bodies = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
            for body in bodies:
                yield body
                yield from _bodies(body)


def _drop_body_value_info(graph: onnx.GraphProto) -> None:
    """Rule 5 in bodies too: graphsurgeon annotates every tensor a body reads, outer-scope
    inputs included, which only grows the file."""
    for body in _bodies(graph):
        del body.value_info[:]


def _inline_body_external(graph: onnx.GraphProto, model: Model) -> None:
    """Constants inside bodies (exported by graphsurgeon as the source's protos) that point at
    the source's data files get their bytes inline: an output never depends on the input's
    data file (main-graph constants are handled by :meth:`Model.to_proto`)."""
    sources = _external_sources(model)
    fallback = model.source.parent if model.source else Path()
    for body in _bodies(graph):
        for tensor in body.initializer:
            if external_data_helper.uses_external_data(tensor):
                base_dir = sources.get(tensor.name, fallback)
                external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
                tensor.data_location = onnx.TensorProto.DEFAULT
                del tensor.external_data[:]


def _defines(graph: onnx.GraphProto, name: str) -> bool:
    return any(t.name == name for t in graph.initializer) or any(
        name in node.output for node in graph.node
    )


def _ancestors(
    graph: onnx.GraphProto, parents: dict[int, onnx.GraphProto | None]
) -> list[onnx.GraphProto]:
    chain = [graph]
    while (parent := parents.get(id(chain[-1]))) is not None:
        chain.append(parent)
    return chain


def _encloses(
    outer: onnx.GraphProto, inner: onnx.GraphProto, parents: dict[int, onnx.GraphProto | None]
) -> bool:
    return any(graph is outer for graph in _ancestors(inner, parents))


def _common_ancestor(
    graphs: list[onnx.GraphProto], parents: dict[int, onnx.GraphProto | None]
) -> onnx.GraphProto:
    chains = [_ancestors(graph, parents) for graph in graphs]
    for candidate in chains[0]:
        if all(any(candidate is graph for graph in chain) for chain in chains[1:]):
            return candidate
    return chains[0][-1]


def skeleton_proto(model: Model) -> onnx.ModelProto:
    """A light copy for checking and shape inference: big constants become typed graph inputs.

    Built node by node from the graphsurgeon graph, so no weight bytes are read or copied for
    constants above 64 KiB: cheap on multi-GB models.
    """
    graph = model.graph
    nodes = [OnnxExporter.export_node(node) for node in graph.nodes]
    light: list[onnx.TensorProto] = []
    heavy: list[onnx.ValueInfoProto] = []
    for tensor in graph.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        if nbytes(tensor) > SKELETON_INLINE_LIMIT_BYTES or is_in_file(tensor):
            heavy.append(
                helper.make_tensor_value_info(
                    tensor.name, element_type(tensor), list(tensor.shape or [])
                )
            )
        else:
            light.append(OnnxExporter.export_tensor_proto(tensor))
    value_infos = [
        OnnxExporter.export_value_info_proto(tensor, do_type_check=False)
        for tensor in graph.tensors().values()
        if isinstance(tensor, gs.Variable)
        and tensor not in graph.inputs
        and tensor not in graph.outputs
        and (tensor.dtype is not None or tensor.shape is not None)
    ]
    proto_graph = helper.make_graph(
        nodes,
        graph.name or "graph",
        [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.inputs]
        + heavy,
        [OnnxExporter.export_value_info_proto(t, do_type_check=False) for t in graph.outputs],
        initializer=light,
        value_info=value_infos,
    )
    proto = onnx.ModelProto()
    proto.CopyFrom(model.shell)
    proto.graph.CopyFrom(proto_graph)
    exported_domains = [
        helper.make_opsetid(d.domain, d.version) for d in update_import_domains(graph)
    ]
    del proto.opset_import[:]
    proto.opset_import.extend(_merge_opsets(model.shell.opset_import, exported_domains))
    proto.ir_version = max(proto.ir_version, MIN_IR_WITHOUT_INPUT_INITIALIZERS)
    _lighten_bodies(proto.graph)
    return proto


def _lighten_bodies(graph: onnx.GraphProto) -> None:
    """The skeleton's rule for control-flow bodies: external constants there (the source's, or
    spilled ones) would send onnx's checker looking for their files relative to the working
    folder. Each becomes a typed main-graph input of the same name, which the body reads from
    the outer scope; a name taken or typed differently elsewhere becomes an empty sparse
    placeholder of the same shape instead (the checker accepts it; nothing is read)."""
    taken = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    taken |= {out for node in graph.node for out in node.output}
    hoisted: dict[str, tuple[int, tuple[int, ...]]] = {}
    for body in _bodies(graph):
        kept: list[onnx.TensorProto] = []
        for tensor in body.initializer:
            if not external_data_helper.uses_external_data(tensor):
                kept.append(tensor)
                continue
            signature = (tensor.data_type, tuple(tensor.dims))
            if tensor.name not in taken and hoisted.get(tensor.name, signature) == signature:
                if tensor.name not in hoisted:
                    hoisted[tensor.name] = signature
                    graph.input.append(
                        helper.make_tensor_value_info(
                            tensor.name, tensor.data_type, list(tensor.dims)
                        )
                    )
                continue
            body.sparse_initializer.append(_empty_sparse(tensor))
        del body.initializer[:]
        body.initializer.extend(kept)


def _empty_sparse(tensor: onnx.TensorProto) -> onnx.SparseTensorProto:
    values = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=[0])
    values.raw_data = b""
    indices = onnx.TensorProto(name=f"{tensor.name}_indices", data_type=onnx.TensorProto.INT64)
    indices.dims.append(0)
    indices.raw_data = b""
    return onnx.SparseTensorProto(values=values, indices=indices, dims=list(tensor.dims))


def _merge_opsets(
    original: Iterator[onnx.OperatorSetIdProto] | list, exported: Iterator[onnx.OperatorSetIdProto]
) -> list[onnx.OperatorSetIdProto]:
    versions: dict[str, int] = {}
    for opset in list(original) + list(exported):
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    # the default domain is written as the exporter wrote it: unset, not an explicit ""
    return [
        onnx.OperatorSetIdProto(version=version)
        if not domain
        else helper.make_opsetid(domain, version)
        for domain, version in versions.items()
    ]


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield graph
    yield from graph.subgraphs(recursive=True)


def iter_constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every distinct Constant tensor used in the graph or its subgraphs."""
    seen: set[int] = set()
    for sub in iter_graphs(graph):
        for tensor in sub.tensors().values():
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


def load_model(
    path: str | os.PathLike[str],
    *,
    min_opset: int | None = None,
    tmp_dir: str | os.PathLike[str] | None = None,
) -> Model:
    """Open ``path`` for editing without reading external weights. See the module rules.

    ``min_opset``: upgrade the default domain to at least this opset when it is older
    (:mod:`graphopt.ir.opset`; the outcome is in :attr:`Model.opset_upgrade`). ``tmp_dir``: where
    the model's temporary files go (:class:`WeightSpill`; None: the system's).
    """
    model_path = Path(path)
    if not model_path.exists():
        raise ModelLoadError(f"{model_path}: no such file")
    if not model_path.is_file():
        raise ModelLoadError(f"{model_path}: not a file")
    if model_path.stat().st_size == 0:
        raise ModelLoadError(f"{model_path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as error:
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(
            f"{model_path}: not a valid ONNX model (file truncated or not a protobuf: {detail})"
        ) from error
    _check_header(proto, model_path)
    base_dir = model_path.parent
    external = _check_external_data(proto, base_dir, model_path)
    upgrade = None
    if min_opset is not None and default_opset(proto) < min_opset:
        proto, upgrade = upgrade_proto(proto, min_opset)
    graph = _import_graph(proto, model_path)
    attach_base_dir(iter_constants(graph), base_dir)
    shell = _shell_of(proto)
    model = Model(
        graph=graph,
        shell=shell,
        opset_upgrade=upgrade,
        source=model_path,
        had_external_data=external > 0,
        source_input_names=frozenset(i.name for i in proto.graph.input),
        spill=WeightSpill(None if tmp_dir is None else Path(tmp_dir)),
    )
    check_valid(model, model_path)
    return model


def model_from_proto(
    proto: onnx.ModelProto,
    base_dir: Path | None = None,
    *,
    tmp_dir: str | os.PathLike[str] | None = None,
) -> Model:
    """Wrap an in-memory ModelProto (tests, the Python API). External data resolves in base_dir;
    temporary files go to ``tmp_dir`` (None: the system's temporary folder)."""
    _check_header(proto, Path("<in-memory model>"))
    graph = _import_graph(proto, Path("<in-memory model>"))
    external = 0
    if base_dir is not None:
        external = _check_external_data(proto, base_dir, Path("<in-memory model>"))
        attach_base_dir(iter_constants(graph), base_dir)
    shell = _shell_of(proto)
    model = Model(
        graph=graph,
        shell=shell,
        had_external_data=external > 0,
        source_input_names=frozenset(i.name for i in proto.graph.input),
        spill=WeightSpill(None if tmp_dir is None else Path(tmp_dir)),
    )
    check_valid(model, Path("<in-memory model>"))
    return model


def _shell_of(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every model-level field except the graph, copied without copying the graph's weights."""
    shell = onnx.ModelProto()
    for descriptor, value in proto.ListFields():
        if descriptor.name == "graph":
            continue
        target = getattr(shell, descriptor.name)
        if hasattr(target, "extend"):  # repeated field
            target.extend(value)
        elif hasattr(target, "CopyFrom"):  # message field
            target.CopyFrom(value)
        else:
            setattr(shell, descriptor.name, value)
    return shell


def _check_header(proto: onnx.ModelProto, path: Path) -> None:
    if proto.ir_version == 0 and not proto.HasField("graph"):
        raise ModelLoadError(f"{path}: not an ONNX model (no IR version and no graph)")
    if not proto.HasField("graph") or not proto.graph.output:
        raise ModelLoadError(f"{path}: not a usable ONNX model (the graph has no outputs)")
    if proto.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            f"{path}: IR version {proto.ir_version} is newer than this onnx package supports "
            f"({onnx.IR_VERSION}); upgrade onnx"
        )
    if proto.ir_version < MIN_IR_VERSION:
        raise ModelLoadError(
            f"{path}: IR version {proto.ir_version} is not supported (minimum {MIN_IR_VERSION})"
        )


_TOLERATED_CHECKER_ERRORS = (
    "topologically sorted",  # ONNX Runtime and graphopt sort graphs themselves
    # graph inputs/outputs without type annotations: ONNX Runtime infers them
    "Field 'shape' of 'type' is required",
    "Field 'type' of 'value_info' is required",
    "Field 'elem_type' of 'type' is required",
)


def check_valid(model: Model, label: Path) -> None:
    """Rule 2: a broken input fails here, with a reason, not later inside a pass.

    Every tensor must have at most one producer (a node, a graph input or an initializer),
    then onnx's checker runs on the model's skeleton (no weight is read), the same check every
    pass's output must pass. Two checker complaints that ONNX Runtime accepts are tolerated:
    an unsorted graph (it must still have an order) and graph inputs/outputs without types or
    shapes.
    """
    for graph in iter_graphs(model.graph):
        _check_single_producers(graph, label)
    try:
        onnx.checker.check_model(skeleton_proto(model))
    except onnx.checker.ValidationError as error:
        text = str(error).strip()
        if "topologically sorted" in text:
            _check_sortable(model.graph, label)
            return
        if any(pattern in text for pattern in _TOLERATED_CHECKER_ERRORS):
            logger.debug("%s: tolerated checker complaint: %s", label, text.splitlines()[0])
            return
        reason = text.splitlines()[0] if text else "the checker rejected it"
        raise ModelLoadError(f"{label}: invalid ONNX model: {reason}") from error


def _check_single_producers(graph: gs.Graph, label: Path) -> None:
    inputs = {id(tensor) for tensor in graph.inputs}
    for node in graph.nodes:
        for tensor in node.outputs:
            producers = [n.name or n.op for n in tensor.inputs]
            if len(producers) > 1 or id(tensor) in inputs or isinstance(tensor, gs.Constant):
                if id(tensor) in inputs:
                    producers.append("the graph input")
                raise ModelLoadError(
                    f"{label}: invalid ONNX model: tensor '{tensor.name}' is produced more than "
                    f"once ({', '.join(producers) or 'an initializer and a node'}); an ONNX "
                    "graph must be in single static assignment form"
                )


def _check_sortable(graph: gs.Graph, label: Path) -> None:
    """An unsorted graph must at least have an order: no cycle, no tensor produced twice."""
    try:
        graph.copy().toposort()
    except Exception as error:  # graphsurgeon raises its own exception type
        raise ModelLoadError(
            f"{label}: invalid ONNX model: the graph has a cycle or a tensor produced by two "
            f"nodes ({_checker_detail(error)})"
        ) from error


def _checker_detail(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _all_tensor_protos(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    return external_data_helper._get_all_tensors(proto)


def _check_external_data(proto: onnx.ModelProto, base_dir: Path, model_path: Path) -> int:
    """Verify every external tensor's file exists and is long enough; return how many there are."""
    count = 0
    for tensor in _all_tensor_protos(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        count += 1
        info = external_data_helper.ExternalDataInfo(tensor)
        location = Path(info.location)
        if location.is_absolute() or ".." in location.parts:
            raise ModelLoadError(
                f"{model_path}: tensor '{tensor.name}' points outside the model's folder "
                f"({info.location})"
            )
        data_path = base_dir / location
        if not data_path.is_file():
            raise ModelLoadError(
                f"{model_path}: external data file '{info.location}' for tensor '{tensor.name}' "
                f"is missing (looked in {base_dir})"
            )
        end = int(info.offset or 0) + int(info.length or 0)
        if end > data_path.stat().st_size:
            raise ModelLoadError(
                f"{model_path}: external data file '{info.location}' is too short for tensor "
                f"'{tensor.name}' (needs {end} bytes, has {data_path.stat().st_size})"
            )
    return count


def _import_graph(proto: onnx.ModelProto, path: Path) -> gs.Graph:
    try:
        return gs.import_onnx(proto)
    except Exception as error:  # graphsurgeon raises bare exceptions on malformed graphs
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(f"{path}: malformed ONNX graph ({detail})") from error


def save_model(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; see the module rules. Returns the path written.

    The model is written complete into a staging folder in the model's temporary folder, then
    published (:func:`graphopt.ir.files.publish`). ``external_data``: ``None`` decides
    automatically (rule 4); ``True``/``False`` force it.
    """
    out_path = Path(path)
    check_output_path(out_path, model.source)
    with staging_folder(resolve_tmp_dir(model.spill.scratch())) as folder:
        staged = write_model(model, folder / out_path.name, external_data=external_data)
        try:
            publish(staged, out_path)
        except OSError as error:
            raise storage_error(error, f"cannot write {out_path}") from error
    return out_path


def write_model(
    model: Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` (and ``PATH.data`` when it uses external data) straight to ``path``.

    For private folders (staging, temporary copies): nothing is renamed into place, so use
    :func:`save_model` for a user's output. Rule 4 decides external data when ``None``.
    """
    out_path = Path(path)
    use_external = external_data
    if use_external is None:
        use_external = model.had_external_data or model.weight_bytes() > PROTOBUF_LIMIT_BYTES
    data_name = data_file_name(out_path)
    try:
        if use_external:
            with open(out_path.with_name(data_name), "wb") as handle:
                proto = model.to_proto(ExternalWriter(handle, data_name))
                handle.flush()
                os.fsync(handle.fileno())
        else:
            proto = model.to_proto()
            _inline_external(proto, model)
        with open(out_path, "wb") as handle:
            handle.write(proto.SerializeToString(deterministic=True))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise storage_error(error, f"cannot write {out_path}") from error
    return out_path


@contextlib.contextmanager
def runnable_model(model: Model, extra_outputs: Sequence[str] = ()) -> Iterator[InMemoryModel]:
    """The model as ONNX Runtime can load it, with ``extra_outputs`` exposed as graph outputs.

    Nothing is written beside the source model (its folder may be read-only). Weights computed
    in memory are streamed into a temporary data file in the model's temporary folder, one
    tensor at a time, so the Python side never holds a second copy of them. Untouched weights
    keep pointing into the source's data file, which ONNX Runtime reads in place; weights in
    other files (spilled ones, the temporary data file) are handed over as memory maps. The
    temporary files are removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="graphopt-run-", dir=model.spill.scratch()) as tmp:
        folder = Path(tmp)
        data_path = folder / "run.data"
        with open(data_path, "wb") as handle:
            writer = ExternalWriter(handle, data_path.name, keep_source_refs=True, align_all=True)
            proto = model.to_proto(writer)
        existing = {output.name for output in proto.graph.output}
        proto.graph.output.extend(
            helper.make_empty_tensor_value_info(name)
            for name in extra_outputs
            if name not in existing
        )
        homes = {**_external_sources(model), **writer.kept}  # small ones are not written
        source_dir = model.source.parent if model.source is not None else None
        ort_folder = source_dir if source_dir in set(homes.values()) else folder
        mapped: dict[str, np.ndarray] = {}
        onnx_types: dict[str, int] = {}
        for tensor in proto.graph.initializer:
            if not external_data_helper.uses_external_data(tensor):
                continue
            home = homes.get(tensor.name, folder)
            if home != ort_folder:
                array = _mapped_array(tensor, home)
                if array is None:
                    external_data_helper.load_external_data_for_tensor(tensor, str(home))
                    _mark_inline(tensor)
                else:
                    mapped[tensor.name] = array
                    if tensor.data_type in _STAND_IN_DTYPES:
                        onnx_types[tensor.name] = tensor.data_type
        for body in _bodies(proto.graph):
            for tensor in body.initializer:
                if external_data_helper.uses_external_data(tensor):
                    home = homes.get(tensor.name, folder)
                    if home != ort_folder:
                        external_data_helper.load_external_data_for_tensor(tensor, str(home))
                        _mark_inline(tensor)
        yield InMemoryModel(proto.SerializeToString(), ort_folder.resolve(), mapped, onnx_types)
        del proto, mapped


def prefix_model(runnable: InMemoryModel, outputs: Sequence[str]) -> InMemoryModel:
    """Rule 8: ``runnable`` cut down to what computing ``outputs`` needs, which become its only
    outputs.

    ONNX Runtime runs every node of a session whatever outputs a run asks for, so a caller that
    needs early tensors of a large graph (a sequential fit reads one layer's input at a time)
    runs a prefix instead. Nodes are kept walking back from ``outputs``, with the names a
    control-flow body reads from enclosing graphs; initializers (and handed-over arrays) nobody
    keeps reading are dropped; the graph inputs stay declared, so the same feeds work.
    """
    proto = onnx.ModelProto()
    proto.ParseFromString(runnable.proto)
    graph = proto.graph
    needed = set(outputs)
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if not needed.intersection(node.output):
            continue
        kept.append(node)
        needed.update(name for name in node.input if name)
        needed.update(_outer_reads(node))
    kept.reverse()
    produced = {name for node in kept for name in node.output}
    known = produced | {value.name for value in graph.input}
    known |= {tensor.name for tensor in graph.initializer}
    missing = [name for name in outputs if name not in known]
    if missing:
        raise ValueError(f"tensors not produced by the graph: {', '.join(missing[:5])}")
    return _cut(proto, runnable, kept, needed, outputs)


@dataclass(frozen=True)
class Segment:
    """Rule 8: the part of a graph between tensors already computed and the ones wanted."""

    model: InMemoryModel
    inputs: tuple[str, ...]
    """Already computed tensors the segment reads (graph inputs among them), in feed order."""
    outputs: tuple[str, ...]
    """The wanted tensors, then those computed here that nodes still to run read."""
    nodes: frozenset[str]
    """The nodes it runs, by :func:`node_key`."""
    live: frozenset[str]
    """Every tensor a node not yet run reads: what is worth keeping after this segment."""


def node_key(node: onnx.NodeProto) -> str:
    """A node's identity across exports: its first output (names may be empty)."""
    return node.output[0] if node.output else node.name


def segment_model(
    runnable: InMemoryModel,
    wanted: Sequence[str],
    available: Mapping[str, int],
    done: frozenset[str] | set[str],
) -> Segment:
    """Rule 8: the nodes computing ``wanted`` from ``available`` tensors (name → ONNX element
    type), which become graph inputs; nodes in ``done`` (by :func:`node_key`) ran before.

    Raises ValueError when a tensor the segment needs is neither available, nor computed by a
    node not yet run, nor an initializer.
    """
    proto = onnx.ModelProto()
    proto.ParseFromString(runnable.proto)
    graph = proto.graph
    needed = set(wanted)
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if not any(name in needed and name not in available for name in node.output):
            continue
        if node_key(node) in done:
            raise ValueError(f"{node_key(node)} ran before but its output was not kept")
        kept.append(node)
        needed.update(name for name in node.input if name)
        needed.update(_outer_reads(node))
    kept.reverse()
    ran = {node_key(node) for node in kept} | set(done)
    live: set[str] = set()
    for node in graph.node:
        if node_key(node) not in ran:
            live.update(name for name in node.input if name)
            live.update(_outer_reads(node))
    produced = {name for node in kept for name in node.output}
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = sorted(name for name in needed if name in available and name not in produced)
    missing = [
        name
        for name in needed
        if name not in produced and name not in available and name not in initializers
    ]
    if missing:
        raise ValueError(
            f"tensors neither computed nor available: {', '.join(sorted(missing)[:5])}"
        )
    extra = sorted(name for name in produced & live if name not in set(wanted))
    outputs = (*wanted, *extra)
    del graph.input[:]
    graph.input.extend(
        helper.make_tensor_value_info(name, available[name], None) for name in inputs
    )
    model = _cut(proto, runnable, kept, needed, outputs)
    ran_here = frozenset(node_key(node) for node in kept)
    return Segment(model, tuple(inputs), outputs, ran_here, frozenset(live))


def _cut(
    proto: onnx.ModelProto,
    runnable: InMemoryModel,
    kept: Sequence[onnx.NodeProto],
    needed: set[str],
    outputs: Sequence[str],
) -> InMemoryModel:
    """``proto`` with only the ``kept`` nodes, the initializers (and handed-over arrays) named
    in ``needed``, and ``outputs`` as its outputs (rule 8's prefixes and segments)."""
    graph = proto.graph
    del graph.node[:]
    graph.node.extend(kept)
    initializers = [tensor for tensor in graph.initializer if tensor.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    sparse = [tensor for tensor in graph.sparse_initializer if tensor.values.name in needed]
    del graph.sparse_initializer[:]
    graph.sparse_initializer.extend(sparse)
    del graph.output[:]
    graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs)
    del graph.value_info[:]
    handed = {name: array for name, array in runnable.initializers.items() if name in needed}
    types = {name: kind for name, kind in runnable.onnx_types.items() if name in handed}
    return InMemoryModel(proto.SerializeToString(), runnable.folder, handed, types)


def _outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names ``node``'s control-flow bodies (at any depth) read without defining them."""
    reads: set[str] = set()
    for attribute in node.attribute:
        bodies = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for body in bodies:
            defined = {value.name for value in body.input}
            defined |= {tensor.name for tensor in body.initializer}
            defined |= {name for inner in body.node for name in inner.output}
            read = {name for inner in body.node for name in inner.input if name}
            read |= {value.name for value in body.output}
            for inner in body.node:
                read |= _outer_reads(inner)
            reads |= read - defined
    return reads


def _mark_inline(tensor: onnx.TensorProto) -> None:
    tensor.data_location = onnx.TensorProto.DEFAULT
    del tensor.external_data[:]


_STAND_IN_DTYPES = {
    onnx.TensorProto.BFLOAT16: np.dtype(np.uint16),
    onnx.TensorProto.FLOAT8E4M3FN: np.dtype(np.uint8),
    onnx.TensorProto.FLOAT8E4M3FNUZ: np.dtype(np.uint8),
    onnx.TensorProto.FLOAT8E5M2: np.dtype(np.uint8),
    onnx.TensorProto.FLOAT8E5M2FNUZ: np.dtype(np.uint8),
}
"""Element types NumPy lacks, mapped as unsigned integers of the same width (their bits)."""


def _mapped_array(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray | None:
    """A read-only memory map of an external tensor (bfloat16 and 8-bit floats as their bits,
    :data:`_STAND_IN_DTYPES`), or None when it cannot be one (a packed 4-bit or string type,
    an offset not aligned to the element size, no elements)."""
    if tensor.data_type in _STAND_IN_DTYPES:
        dtype = _STAND_IN_DTYPES[tensor.data_type].newbyteorder("<")
    elif tensor.data_type in NATIVE_NUMPY_TYPES:
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")
    else:
        return None
    ref = external_ref(tensor, base_dir)
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0 or ref.offset % dtype.itemsize or ref.length != count * dtype.itemsize:
        return None
    return np.memmap(ref.path, dtype=dtype, mode="r", offset=ref.offset, shape=shape)


def model_file_bytes(path: Path) -> int:
    """Bytes on disk of a model file plus every external data file it references."""
    locations = data_locations(onnx.load(str(path), load_external_data=False))
    total = path.stat().st_size
    for location in sorted(locations):
        data_path = path.parent / location
        if data_path.is_file():
            total += data_path.stat().st_size
    return total


def check_output_path(out_path: Path, source: Path | None, *, report: Path | None = None) -> None:
    """Refuse outputs that cannot be written, that are not regular files (with their ``.data``
    file; :func:`graphopt.ir.files.check_output_target`), or whose model or data file would be the
    input model or one of the input's external-data files; likewise a ``report`` path, which
    must also differ from the output's files. The input is parsed once for all of it."""
    data_path = out_path.with_name(data_file_name(out_path))
    check_output_target(out_path)
    check_output_target(data_path, "output data file")
    if report is not None:
        check_output_target(report, "report")
    roles = {} if source is None else model_roles(source, "input")
    check_distinct(
        {**roles, "the output": out_path, "the output's data file": data_path, "the report": report}
    )


def _external_sources(model: Model) -> dict[str, Path]:
    """Map initializer name → base dir for tensors whose bytes live in the source's data files."""
    sources: dict[str, Path] = {}
    for constant in iter_constants(model.graph):
        values = storage(constant)
        if isinstance(values, ExternalValues):
            sources[constant.name] = values.base_dir
    return sources


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    if tensor.data_type == onnx.TensorProto.STRING:
        raise InputError(f"string tensor '{tensor.name}' cannot be stored as external data")
    return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor)).raw_data


def _copy_external_bytes(tensor: onnx.TensorProto, base_dir: Path, out: object) -> int:
    ref = external_ref(tensor, base_dir)
    remaining = ref.length
    with open(ref.path, "rb") as src:
        src.seek(ref.offset)
        while remaining > 0:
            chunk = src.read(min(_COPY_CHUNK_BYTES, remaining))
            if not chunk:
                raise InputError(f"external data for tensor '{tensor.name}' ends early")
            out.write(chunk)  # type: ignore[attr-defined]
            remaining -= len(chunk)
    return ref.length


def _inline_external(proto: onnx.ModelProto, model: Model) -> None:
    """Pull external bytes inline (the caller asked for a single-file model)."""
    sources = _external_sources(model)
    for tensor in _all_tensor_protos(proto):
        if external_data_helper.uses_external_data(tensor):
            base_dir = sources.get(tensor.name, model.source.parent if model.source else Path())
            external_data_helper.load_external_data_for_tensor(tensor, str(base_dir))
