"""``fp16``: float16 (or bfloat16) conversion that never breaks a model.

Every float32 node is converted unless a rule keeps it in float32; blocked regions become float32
islands with one Cast per tensor and direction at their borders. The decisions come from
complete dtype information (ONNX shape inference, every subgraph included) and from the ONNX
operator schemas, never from guesses; see :class:`Fp16Pass` for the rules.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.data.calibration import MASK_MAGNITUDE, StatRequest, collect
from graphopt.data.feeds import Feeds
from graphopt.ir import weights
from graphopt.ir.edit import replace_output, replace_uses
from graphopt.ir.model import Model, skeleton_proto
from graphopt.passkit.api import Budget, Pass, PassContext, PassResult
from graphopt.passkit.options import Option, SearchPoint, SearchSpace
from graphopt.passkit.ordering import OrderRank
from graphopt.passkit.qdq import Namer
from graphopt.passkit.selection import matches_any

logger = logging.getLogger(__name__)

FLOAT = onnx.TensorProto.FLOAT
FLOAT16 = onnx.TensorProto.FLOAT16
BFLOAT16 = onnx.TensorProto.BFLOAT16

FP16_MAX = 65504.0
FP16_TINY = 2.0**-24
"""Smallest float16 subnormal (5.96e-8); smaller magnitudes flush to zero."""
BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
BF16_TINY = float(ml_dtypes.finfo(ml_dtypes.bfloat16).smallest_subnormal)
CONVERT_CHUNK = 1 << 22
"""Values converted per step (16 MiB of float32)."""

CPU_NOTE = (
    "validating on the CPU provider only: ONNX Runtime's CPU provider runs most fp16 ops "
    "through Casts to float32, so the model is smaller but usually not faster there (measured "
    "1.3-3x slower on a voice-activity detector); fp16 pays on GPUs (--providers cuda)"
)
"""Rule 13: what fp16 says when the run's providers are CPU only (issue 15.8)."""
DEFAULT_MAX_ACTIVATION = 4096.0
"""Data-aware bound: 16× below float16's largest finite value (65504), headroom for inputs the
calibration set did not cover. Measured on MiniLM (64 real sentences, 128 tokens, both exports):
the largest activation anywhere is 630 (layer-0 attention scores before scaling), the next 224;
NVIDIA AutoCast's 512 would keep that one MatMul and its consumer in float32 for no accuracy
gain, because float16's relative precision does not depend on magnitude, only overflow does."""

DEFAULT_OP_BLOCK_LIST: dict[str, str] = {
    "TopK": "discrete outputs: float16 rounding creates ties that reorder the selected indices",
    "NonMaxSuppression": "the ONNX schema allows only float32 boxes and scores",
    "RoiAlign": "box coordinates are pixel positions; float16 steps 0.5-2 px above 512-2048",
    "CumSum": "a running sum along a long axis accumulates rounding error and overflows",
    "Range": "index sequences: float16 holds integers exactly only up to 2048",
    "QuantizeLinear": "Q/DQ scales stay float32 so ONNX Runtime's QDQ fusions still match",
    "DequantizeLinear": "Q/DQ scales stay float32 so ONNX Runtime's QDQ fusions still match",
    "DynamicQuantizeLinear": "its scale output is float32 by definition",
}
"""Default ``op_block_list`` with the reason for each member (ORT CPU and CUDA)."""

ATTRIBUTE_TYPED_OPS = frozenset(
    {
        "Constant",
        "ConstantOfShape",
        "EyeLike",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "HannWindow",
        "HammingWindow",
        "BlackmanWindow",
        "MelWeightMatrix",
    }
)
"""Ops whose output dtype is fixed by an attribute: always float32 (rule 3)."""

AGNOSTIC_OPS = frozenset({"Shape", "Size"})
"""Ops that read only the shape of their input: they take it in whatever dtype it has."""

LOOP_OPS = frozenset({"Loop", "Scan"})

SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Pad": (1, 3),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "Split": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "Trilu": (1,),
    "CenterCropPad": (1,),
    "Col2Im": (1, 2),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,),
    "Loop": (0,),
}
"""Input slots that hold shapes, sizes, axes or counts (rule 5)."""

PINNED_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2), "Upsample": (1,)}
"""Float inputs that stay float32 in a converted node: Resize roi and scales (rule 5)."""


# --- dtypes -----------------------------------------------------------------------------------


def _onnx_type(dtype: Any) -> int | None:
    """A graphsurgeon dtype (NumPy dtype or ONNX enum) as an ONNX TensorProto enum."""
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool):
        return int(dtype)
    try:
        return int(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (KeyError, TypeError, ValueError):
        return None


def _graph_type_map(graph: onnx.GraphProto, types: dict[str, int]) -> None:
    for info in [*graph.value_info, *graph.input, *graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types.setdefault(info.name, int(info.type.tensor_type.elem_type))
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _graph_type_map(attribute.g, types)
            for sub in attribute.graphs:
                _graph_type_map(sub, types)


def inferred_types(model: Model) -> dict[str, int]:
    """Tensor name → ONNX elem type from shape inference over the graph and every subgraph."""
    proto = skeleton_proto(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception as error:  # onnx raises InferenceError and plain exceptions
        logger.warning("fp16: shape inference failed, only exported dtypes are used: %s", error)
    types: dict[str, int] = {}
    _graph_type_map(proto.graph, types)
    return types


# --- value conversion (rules 9 and 11) --------------------------------------------------------


@dataclass
class RangeCounts:
    """Values changed to fit the target type: clamped at its largest finite value, flushed."""

    clamped: int = 0
    flushed: int = 0

    def add(self, other: RangeCounts) -> None:
        self.clamped += other.clamped
        self.flushed += other.flushed


def convert_array(values: np.ndarray, target: int) -> tuple[np.ndarray, RangeCounts]:
    """Rule 9: clamp finite values at the target's limits only; ±inf and NaN stay as they are.

    Works through the tensor in chunks of :data:`CONVERT_CHUNK` values, so the only full-size
    array besides the source is the (half-size) result.
    """
    limit, tiny = (FP16_MAX, FP16_TINY) if target == FLOAT16 else (BF16_MAX, BF16_TINY)
    source = np.asarray(values).reshape(-1)
    dtype = np.float16 if target == FLOAT16 else ml_dtypes.bfloat16
    result = np.empty(source.size, dtype=dtype)
    counts = RangeCounts()
    for start in range(0, source.size, CONVERT_CHUNK):
        chunk = np.array(source[start : start + CONVERT_CHUNK], dtype=np.float32)
        magnitude = np.abs(chunk)
        over = np.isfinite(chunk) & (magnitude > limit)
        under = (magnitude < tiny) & (chunk != 0)
        counts.add(RangeCounts(int(over.sum()), int(under.sum())))
        np.copyto(chunk, np.copysign(np.float32(limit), chunk), where=over)
        chunk[under] = 0.0
        result[start : start + chunk.size] = chunk.astype(dtype)
    return result.reshape(np.shape(values)), counts


def _target_numpy(target: int) -> Any:
    return np.dtype(np.float16) if target == FLOAT16 else BFLOAT16


class ConvertedValues(weights.LazyWeight):
    """Float32 values converted to float16/bfloat16 only when read or saved (rule 11).

    Reads its source (a weight's storage captured by :func:`graphopt.ir.weights.source`: on disk
    or in memory) and holds no converted copy: saving streams each tensor through
    :meth:`raw_bytes` one at a time, so memory stays near one tensor and the bytes written are
    always the converted ones, never float32 bytes under a float16 label.
    """

    def __init__(self, source: weights.WeightSource, target: int) -> None:
        self.source = source
        self.target = target
        self.shape = source.shape
        self.element_type = target

    def load(self) -> np.ndarray:
        converted, _ = convert_array(self.source.read(), self.target)
        return converted

    def raw_bytes(self) -> bytes:
        return self.load().view(np.uint16).astype("<u2", copy=False).tobytes()


# --- the plan ---------------------------------------------------------------------------------


@dataclass
class NodePlan:
    """What happens to one node: ``fp16`` (converted), ``fp32`` (kept) or ``agnostic``."""

    mode: str
    reason: str = ""
    fp32_inputs: frozenset[int] = frozenset()
    fp32_outputs: frozenset[int] = frozenset()


@dataclass
class _Scope:
    """Where every node and tensor lives, for all graphs of the model."""

    nodes: list[tuple[gs.Node, gs.Graph]] = field(default_factory=list)
    graph_of: dict[int, gs.Graph] = field(default_factory=dict)
    """id(tensor) → the graph that defines it (producer's graph, or the graph it is input of)."""
    parent_of: dict[int, gs.Node] = field(default_factory=dict)
    """id(subgraph) → the node that owns it."""
    blocked_by_parent: dict[int, str] = field(default_factory=dict)
    """id(node) → reason, for nodes inside the subgraph of a blocked control-flow node."""
    graphs: list[gs.Graph] = field(default_factory=list)


def _subgraphs(node: gs.Node) -> Iterator[gs.Graph]:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, list):
            yield from (item for item in value if isinstance(item, gs.Graph))


def _walk(graph: gs.Graph, scope: _Scope) -> None:
    scope.graphs.append(graph)
    for tensor in graph.inputs:
        scope.graph_of[id(tensor)] = graph
    for node in graph.nodes:
        scope.nodes.append((node, graph))
        for tensor in node.outputs:
            scope.graph_of[id(tensor)] = graph
        for sub in _subgraphs(node):
            scope.parent_of[id(sub)] = node
            _walk(sub, scope)


def _schema_types(
    schema: onnx.defs.OpSchema, params: list[Any], index: int
) -> frozenset[str] | None:
    """The types the schema allows at position ``index`` of ``params`` (None: no parameter)."""
    if not params:
        return None
    if index < len(params):
        param = params[index]
    elif params[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        param = params[-1]
    else:
        return None
    for constraint in schema.type_constraints:
        if constraint.type_param_str == param.type_str:
            return frozenset(constraint.allowed_type_strs)
    return frozenset({param.type_str})


class Fp16Pass(Pass):
    """float16 conversion. Rules:

    1. Dtypes come from the model and ONNX shape inference over every graph and subgraph. A node
       that reads or writes a tensor of unknown dtype stays float32 (logged), never guessed.
    2. Only float32 tensors change; float64, existing float16 and integer tensors stay as they
       are. A node is converted as a whole: every float32 tensor it reads or writes becomes
       ``dtype`` (float16, or bfloat16), except the slots rule 4 and rule 5 pin to float32.
    3. Nodes stay float32 when their op is in ``op_block_list`` (default
       :data:`DEFAULT_OP_BLOCK_LIST`, each member with its reason), their name matches a
       ``node_block_list`` glob, they lie inside the subgraph of a blocked If/Loop/Scan, their
       output dtype is set by an attribute (:data:`ATTRIBUTE_TYPED_OPS`), their op has no ONNX
       schema at the model's opset (custom domains, local functions: types unknown), or they are
       outside the bisection scope. Every blocked node is logged with its reason.
    4. Schema check: a float32 input or output whose formal parameter does not allow the target
       type stays float32 (NonMaxSuppression boxes, Resize scales, DequantizeLinear scales before
       opset 19); a node all of whose float tensors are pinned this way stays float32.
    5. Shape arithmetic stays float32: every node from which a shape, size, axes or count input
       (:data:`SHAPE_INPUTS`: Reshape/Expand/Tile/Slice/ConstantOfShape/Range/Resize/...) is
       computed, walking back from those inputs and stopping at ``Shape``/``Size``. Resize roi
       and scales are float32 inputs even of a converted Resize. ``Shape``/``Size`` read their
       input in whatever dtype it has and never get a Cast.
    6. Borders: a tensor gets at most one Cast per direction, placed right after its producer
       (in the graph that defines it, so If/Loop/Scan bodies reading outer-scope tensors share
       it), and every consumer that needs the other dtype reads that one Cast.
       ``keep_io_types`` (globs, ``*`` = all, ``none``) keeps graph inputs and outputs float32:
       a kept output produced by a converted node keeps its name on a float32 Cast of the
       renamed float16 tensor. Loop/Scan keep their float32 interface (carried values must
       agree in three places) with their bodies converted inside; a converted If gets float16
       outputs and both branches produce float16.
    7. Existing ``Cast(to=FLOAT)`` nodes that are converted are rewritten to cast to ``dtype``.
       Afterwards Casts that became no-ops are bypassed, and a pair of adjacent Casts that this
       pass inserted or rewrote collapses into one Cast from the original source (or none).
    8. Initializers: converted in place when only converted nodes read them; a float32
       initializer also read by float32 nodes (or pinned slots) keeps its float32 copy and
       gets a second, converted copy, so no runtime Cast is needed (ONNX Runtime would fold
       such a Cast into the same two buffers at load anyway).
    9. Values are clamped only at the target's limits: finite magnitudes above 65504 become
       ±65504 and nonzero magnitudes below the smallest subnormal (5.96e-8) flush to zero
       (bfloat16: 3.39e38 and 9.2e-41). ±inf and NaN stay. Both counts are in the stats.
    10. Data-aware blocking (``data_aware=auto``: on with real, non-synthetic calibration data):
        the float32 model runs on the data and converted nodes whose float inputs or outputs
        have an abs-max above ``max_activation`` stay float32. Values of magnitude ≥ 1e30 or
        ±inf (attention masks) are not counted: float16 represents them as ±inf or ±65504.
        Graph inputs are measured on the feeds themselves. Only main-graph nodes are measured;
        a control-flow node kept float32 this way keeps its bodies float32 as well.
    11. External and large weights are converted lazily (:class:`ConvertedValues`): each is
        read, converted and written one at a time when the model is saved.
    12. Everything is linear in the number of nodes; names of new tensors and nodes are unique
        across all graphs and derived from the tensor they convert; the result is deterministic.
    13. When the run's providers are CPU only, the pass says (warning and ``cpu_note`` stat)
        that ONNX Runtime's CPU provider computes most fp16 ops through casts: smaller, usually
        not faster. ``tune`` does not pick fp16 for latency on CPU unless measured faster.
    """

    name: ClassVar[str] = "fp16"
    summary: ClassVar[str] = "float16/bfloat16 conversion with fp32 islands, schema- and data-aware"
    exact: ClassVar[bool] = False
    reads_weights: ClassVar[bool] = False
    budget: ClassVar[Budget] = Budget(min_cosine=0.999, min_snr_db=40.0)
    """float16 keeps ~11 significant bits: rounding alone gives an SNR near 60 dB per tensor and
    MiniLM's output cosine is 0.99999; 0.999 / 40 dB leaves room for deep models while still
    failing any real breakage (an overflow or a wrongly typed island drops far below)."""
    run_after: ClassVar[frozenset[str]] = frozenset({"cleanup", "quant", "lowrank", "sparsify"})
    order_rank: ClassVar[OrderRank] = OrderRank.CAST
    options_schema: ClassVar[tuple[Option, ...]] = (
        Option(
            "dtype",
            str,
            "float16",
            "target type of converted tensors",
            choices=("float16", "bfloat16"),
        ),
        Option(
            "keep_io_types",
            list,
            ["*"],
            "graph inputs/outputs (name globs) that stay float32; '*' = all, 'none' = convert all",
        ),
        Option(
            "op_block_list",
            list,
            sorted(DEFAULT_OP_BLOCK_LIST),
            "op types that stay float32 (default: ops unsafe or unsupported in float16 on ORT)",
        ),
        Option("node_block_list", list, [], "node name globs that stay float32"),
        Option(
            "data_aware",
            str,
            "auto",
            "keep nodes with large calibrated activations in float32 (auto: with real data)",
            choices=("auto", "on", "off"),
        ),
        Option(
            "max_activation",
            float,
            DEFAULT_MAX_ACTIVATION,
            "data-aware bound on a node's float input/output abs-max",
            minimum=1.0,
            maximum=FP16_MAX,
        ),
    )
    search_space: ClassVar[SearchSpace] = SearchSpace(
        points=(SearchPoint(objectives=("size",)),), slow_on=frozenset({"cpu"})
    )
    """``tune``: on, at its defaults; smaller, but ONNX Runtime's CPU provider runs most float16
    ops through casts (rule 13), so on the CPU it is picked for latency only when measured
    faster."""

    def call(self, model: Model, context: PassContext) -> PassResult:
        target = FLOAT16 if self.options["dtype"] == "float16" else BFLOAT16
        scope = _Scope()
        _walk(model.graph, scope)
        types = inferred_types(model)
        run = _Conversion(model, scope, types, target, self.options, context)
        run.classify()
        if self._data_aware(context):
            feeds = context.require_feeds("fp16 data_aware")  # _data_aware checked it
            run.block_by_activations(feeds, self.options["max_activation"])
        if not run.has_work():
            logger.info("fp16: nothing to convert")
            return PassResult(model, False, run.stats())
        run.apply()
        stats = run.stats()
        if "cuda" not in context.providers:
            stats["cpu_note"] = CPU_NOTE
            logger.warning("fp16: %s", CPU_NOTE)
        return PassResult(model, True, stats, run.touched())

    def _data_aware(self, context: PassContext) -> bool:
        mode = self.options["data_aware"]
        if mode == "off":
            return False
        if context.feeds is None:
            if mode == "on":
                logger.warning("fp16: data_aware=on but no calibration data; skipped")
            return False
        if mode == "auto" and not context.has_real_data:
            logger.info("fp16: data-aware blocking off: the calibration data is synthetic")
            return False
        return True


class _Conversion:
    """One run of the pass over one model (state lives here, not in the pass)."""

    def __init__(
        self,
        model: Model,
        scope: _Scope,
        types: dict[str, int],
        target: int,
        options: dict[str, Any],
        context: PassContext,
    ) -> None:
        self.model = model
        self.scope = scope
        self.types = types
        self.target = target
        self.options = options
        self.context = context
        self.plans: dict[int, NodePlan] = {}
        self.names = Namer(*scope.graphs)
        self.blocked: Counter[str] = Counter()
        self.counts = RangeCounts()
        self.casts_inserted = 0
        self.casts_rewritten = 0
        self.casts_removed = 0
        self.constants_converted = 0
        self.constants_copied = 0
        self.activation_checked = 0
        self._ours: set[int] = set()
        self._versions: dict[tuple[int, bool], gs.Tensor] = {}
        self._after: dict[int, list[gs.Node]] = {}
        self._front: dict[int, list[gs.Node]] = {}
        opsets = {o.domain: int(o.version) for o in model.shell.opset_import}
        opsets[""] = opsets["ai.onnx"] = model.opset
        self.opsets = opsets
        self._schemas: dict[tuple[str, str], onnx.defs.OpSchema | None] = {}

    # -- dtypes --

    def dtype(self, tensor: gs.Tensor) -> int | None:
        if isinstance(tensor, gs.Constant):
            return weights.element_type(tensor)
        known = _onnx_type(tensor.dtype)
        return known if known is not None else self.types.get(tensor.name)

    def is_float(self, tensor: gs.Tensor) -> bool:
        return not _empty(tensor) and self.dtype(tensor) == FLOAT

    # -- classification (rules 1-5) --

    def classify(self) -> None:
        shape_nodes = self._shape_arithmetic()
        keep_ops = set(self.options["op_block_list"])
        for node, graph in self.scope.nodes:
            plan = self._plan(node, graph, keep_ops, shape_nodes)
            self.plans[id(node)] = plan
            if plan.mode == "fp32" and plan.reason:
                self.blocked[plan.reason.split(":")[0]] += 1
                logger.info("fp16: keeping %s (%s) in float32: %s", node.name, node.op, plan.reason)
            if plan.mode == "fp32" and plan.reason and _is_control_flow(node):
                for sub in _subgraphs(node):
                    self._block_subgraph(sub, node)

    def _block_subgraph(self, graph: gs.Graph, parent: gs.Node) -> None:
        reason = f"inside-blocked-node: {parent.name}"
        for node in graph.nodes:
            self.scope.blocked_by_parent[id(node)] = reason
            for sub in _subgraphs(node):
                self._block_subgraph(sub, parent)

    def _plan(
        self, node: gs.Node, graph: gs.Graph, keep_ops: set[str], shape_nodes: set[int]
    ) -> NodePlan:
        tensors = [t for t in [*node.inputs, *node.outputs] if not _empty(t)]
        if node.op in LOOP_OPS and not self._user_blocked(node, keep_ops):
            return NodePlan("fp32")  # rule 6: float32 interface, body converted inside
        unknown = [t.name for t in tensors if self.dtype(t) is None]
        has_float = any(self.dtype(t) == FLOAT for t in tensors)
        if not has_float and not unknown and not _is_control_flow(node):
            return NodePlan("none")
        if node.op in AGNOSTIC_OPS and (node.domain or "") in ("", "ai.onnx"):
            return NodePlan("agnostic")
        reason = self._block_reason(node, keep_ops, shape_nodes, unknown)
        if reason:
            return NodePlan("fp32", reason)
        return self._schema_plan(node)

    def _user_blocked(self, node: gs.Node, keep_ops: set[str]) -> bool:
        return node.op in keep_ops or matches_any(node.name, self.options["node_block_list"])

    def _block_reason(
        self, node: gs.Node, keep_ops: set[str], shape_nodes: set[int], unknown: list[str]
    ) -> str:
        if id(node) in self.scope.blocked_by_parent:
            return self.scope.blocked_by_parent[id(node)]
        if matches_any(node.name, self.options["node_block_list"]):
            return "node_block_list"
        if node.op in keep_ops:
            return f"op_block_list: {DEFAULT_OP_BLOCK_LIST.get(node.op, 'requested')}"
        if node.op in ATTRIBUTE_TYPED_OPS:
            return "attribute-typed: its output dtype is set by an attribute"
        if unknown:
            return f"unknown-dtype: {', '.join(unknown[:3])}"
        if id(node) in shape_nodes:
            return "shape-arithmetic: computes a shape, size, axes or count input"
        if self._schema(node) is None:
            return f"no-schema: {node.domain or 'ai.onnx'}::{node.op} at this opset (types unknown)"
        if not self.context.in_scope(node.name):
            return "out-of-scope"
        return ""

    def _schema(self, node: gs.Node) -> onnx.defs.OpSchema | None:
        domain = node.domain or ""
        key = (domain, node.op)
        if key not in self._schemas:
            version = self.opsets.get(domain)
            schema = None
            if version is not None:
                try:
                    schema = onnx.defs.get_schema(node.op, version, domain)
                except onnx.defs.SchemaError:
                    schema = None
            self._schemas[key] = schema
        return self._schemas[key]

    def _schema_plan(self, node: gs.Node) -> NodePlan:
        """Rule 4 (and rule 5's pinned Resize inputs)."""
        schema = self._schema(node)
        assert schema is not None
        wanted = "tensor(float16)" if self.target == FLOAT16 else "tensor(bfloat16)"
        pinned_in = set(PINNED_INPUTS.get(node.op, ()))
        pinned_out: set[int] = set()
        for index, tensor in enumerate(node.inputs):
            allowed = _schema_types(schema, list(schema.inputs), index)
            if self.is_float(tensor) and (allowed is None or wanted not in allowed):
                pinned_in.add(index)
        for index, tensor in enumerate(node.outputs):
            allowed = _schema_types(schema, list(schema.outputs), index)
            if self.is_float(tensor) and (allowed is None or wanted not in allowed):
                pinned_out.add(index)
        floats_in = {i for i, t in enumerate(node.inputs) if self.is_float(t)}
        floats_out = {i for i, t in enumerate(node.outputs) if self.is_float(t)}
        if not _is_control_flow(node) and floats_in | floats_out:
            if floats_in <= pinned_in and floats_out <= pinned_out:
                return NodePlan("fp32", "schema: its float inputs and outputs must be float32")
        return NodePlan("fp16", "", frozenset(pinned_in), frozenset(pinned_out))

    def _shape_arithmetic(self) -> set[int]:
        """Rule 5: nodes that compute shape-like inputs, found by one backward walk."""
        marked: set[int] = set()
        stack: list[gs.Tensor] = []
        for node, _graph in self.scope.nodes:
            for index in SHAPE_INPUTS.get(node.op, ()):
                if index < len(node.inputs):
                    stack.append(node.inputs[index])
        while stack:
            tensor = stack.pop()
            for producer in tensor.inputs:
                if id(producer) in marked or producer.op in AGNOSTIC_OPS:
                    continue
                marked.add(id(producer))
                stack.extend(producer.inputs)
        return marked

    # -- data-aware blocking (rule 10) --

    def block_by_activations(self, feeds: Feeds, bound: float) -> None:
        main = {id(node) for node in self.model.graph.nodes}
        candidates = [
            node
            for node, _graph in self.scope.nodes
            if id(node) in main and self.plans[id(node)].mode == "fp16"
        ]
        produced = {id(t) for node in self.model.graph.nodes for t in node.outputs}
        names: dict[str, None] = {}
        for node in candidates:
            for tensor in [*node.inputs, *node.outputs]:
                if isinstance(tensor, gs.Variable) and id(tensor) in produced:
                    if self.is_float(tensor):
                        names[tensor.name] = None
        peaks = _input_peaks(feeds, [t.name for t in self.model.graph.inputs if self.is_float(t)])
        if names:
            stats = collect(
                self.model,
                feeds,
                [StatRequest(name) for name in names],
                on_batch=lambda index: self.context.report_progress("fp16: calibrating", index),
                settings=self.context.settings,
            )
            for name, found in stats.items():
                if found.count:
                    peaks[name] = max(abs(found.minimum), abs(found.maximum))
        self.activation_checked = len(peaks)
        for node in candidates:
            peak, where = 0.0, ""
            for tensor in [*node.inputs, *node.outputs]:
                value = peaks.get(tensor.name, 0.0) if isinstance(tensor, gs.Variable) else 0.0
                if value > peak:
                    peak, where = value, tensor.name
            if peak > bound:
                reason = f"activation: abs-max {peak:.4g} of {where} > max_activation {bound:g}"
                self.plans[id(node)] = NodePlan("fp32", reason)
                self.blocked["activation"] += 1
                logger.info("fp16: keeping %s (%s) in float32: %s", node.name, node.op, reason)
                self._keep_inside_float32(node, f"inside-blocked-node: {node.name}")

    def _keep_inside_float32(self, parent: gs.Node, reason: str) -> None:
        """A control-flow node kept float32 after classification keeps its bodies float32 too
        (subgraph activations are not measured, so the parent's verdict stands for them)."""
        for sub in _subgraphs(parent):
            for node in sub.nodes:
                if self.plans[id(node)].mode == "fp16":
                    self.plans[id(node)] = NodePlan("fp32", reason)
                    self.blocked["inside-blocked-node"] += 1
                self._keep_inside_float32(node, reason)

    # -- applying (rules 6-9, 11) --

    def has_work(self) -> bool:
        return any(p.mode == "fp16" for p in self.plans.values()) or any(
            self.is_float(t) and not self._keep_io(t.name) for t in self.model.graph.inputs
        )

    def _keep_io(self, name: str) -> bool:
        patterns = [p for p in self.options["keep_io_types"] if p.lower() not in ("none", "false")]
        patterns = ["*" if p.lower() in ("all", "true") else p for p in patterns]
        return matches_any(name, patterns)

    def _home16(self, tensor: gs.Tensor) -> bool:
        """Whether ``tensor`` is produced in the target type (before any Cast is added)."""
        if isinstance(tensor, gs.Constant):
            return False
        if tensor.inputs:
            producer = tensor.inputs[0]
            plan = self.plans.get(id(producer))
            if plan is None or plan.mode != "fp16":
                return False
            index = next(i for i, t in enumerate(producer.outputs) if t is tensor)
            return index not in plan.fp32_outputs
        if any(tensor is t for t in self.model.graph.inputs):
            return not self._keep_io(tensor.name)
        return False  # subgraph inputs: Loop/Scan interfaces stay float32, If has none

    def apply(self) -> None:
        homes: dict[int, bool] = {}
        for node, _graph in self.scope.nodes:
            for tensor in [*node.inputs, *node.outputs]:
                if self.is_float(tensor) and id(tensor) not in homes:
                    homes[id(tensor)] = self._home16(tensor)
        for tensor in self.model.graph.inputs:
            if self.is_float(tensor):
                homes[id(tensor)] = self._home16(tensor)
        self._count_constant_uses(homes)
        self._keep_output_names(homes)
        for node, _graph in self.scope.nodes:
            plan = self.plans[id(node)]
            for index, tensor in enumerate(list(node.inputs)):
                if not self.is_float(tensor):
                    continue
                if plan.mode == "agnostic":
                    continue
                want16 = plan.mode == "fp16" and index not in plan.fp32_inputs
                if want16 != homes[id(tensor)]:
                    node.inputs[index] = self._version(tensor, want16)
        self._rewire_graph_outputs(homes)
        self._relabel(homes)
        self._splice_casts()
        self._simplify_casts()

    def _count_constant_uses(self, homes: dict[int, bool]) -> None:
        """Rule 8: which constants need a float32 copy besides the converted one."""
        self._fp32_constant_users: set[int] = set()
        for node, _graph in self.scope.nodes:
            plan = self.plans[id(node)]
            if plan.mode in ("agnostic", "none"):
                continue  # Shape/Size read only the shape: either copy serves them
            for index, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant) and self.is_float(tensor):
                    want16 = plan.mode == "fp16" and index not in plan.fp32_inputs
                    if not want16:
                        self._fp32_constant_users.add(id(tensor))
        for graph in self.scope.graphs:
            for tensor in graph.outputs:
                if isinstance(tensor, gs.Constant):
                    self._fp32_constant_users.add(id(tensor))

    def _want16_for_output(self, graph: gs.Graph, index: int) -> bool | None:
        """What dtype graph output ``index`` must have (None: leave it as it is)."""
        if graph is self.model.graph:
            tensor = graph.outputs[index]
            return None if not self._keep_io(tensor.name) else False
        parent = self.scope.parent_of.get(id(graph))
        if parent is not None and parent.op == "If":
            return self.plans[id(parent)].mode == "fp16"
        return False

    def _keep_output_names(self, homes: dict[int, bool]) -> None:
        """Rule 6: a kept main-graph output made in the target type keeps its name as float32."""
        graph = self.model.graph
        for tensor in list(graph.outputs):
            if not self.is_float(tensor) or not homes.get(id(tensor)) or not tensor.inputs:
                continue
            if not self._keep_io(tensor.name) or (id(tensor), True) in self._versions:
                continue
            producer = tensor.inputs[0]
            renamed = gs.Variable(self.names(f"{tensor.name}_{self._suffix()}"), shape=tensor.shape)
            renamed.dtype = _target_numpy(self.target)
            replace_output(producer, tensor, renamed)
            cast = self._cast_node(renamed, tensor, FLOAT)
            self._after.setdefault(id(producer), []).append(cast)
            self._versions[(id(tensor), True)] = renamed
            self._versions[(id(tensor), False)] = tensor
            homes[id(renamed)] = True
            homes[id(tensor)] = False

    def _rewire_graph_outputs(self, homes: dict[int, bool]) -> None:
        for graph in self.scope.graphs:
            for index, tensor in enumerate(list(graph.outputs)):
                if not self.is_float(tensor):
                    continue
                want16 = self._want16_for_output(graph, index)
                if want16 is None or want16 == homes.get(id(tensor), False):
                    continue
                if graph is self.model.graph and (id(tensor), False) in self._versions:
                    continue  # renamed by _keep_output_names
                graph.outputs[index] = self._version(tensor, want16)

    def _suffix(self) -> str:
        return "fp16" if self.target == FLOAT16 else "bf16"

    def _version(self, tensor: gs.Tensor, want16: bool) -> gs.Tensor:
        """The one tensor holding ``tensor`` in the wanted type (created once)."""
        key = (id(tensor), want16)
        if key in self._versions:
            return self._versions[key]
        if isinstance(tensor, gs.Constant):
            version = self._converted_constant(tensor) if want16 else tensor
        else:
            suffix = self._suffix() if want16 else "fp32"
            version = gs.Variable(self.names(f"{tensor.name}_{suffix}"), shape=tensor.shape)
            version.dtype = _target_numpy(self.target) if want16 else np.dtype(np.float32)
            cast = self._cast_node(tensor, version, self.target if want16 else FLOAT)
            if tensor.inputs:
                self._after.setdefault(id(tensor.inputs[0]), []).append(cast)
            else:
                graph = self.scope.graph_of.get(id(tensor), self.model.graph)
                self._front.setdefault(id(graph), []).append(cast)
        self._versions[key] = version
        return version

    def _cast_node(self, source: gs.Tensor, output: gs.Tensor, to: int) -> gs.Node:
        label = "fp32" if to == FLOAT else self._suffix()
        node = gs.Node(
            "Cast",
            name=self.names(f"{source.name}_Cast_to_{label}"),
            attrs={"to": to},
            inputs=[source],
            outputs=[output],
        )
        self.plans[id(node)] = NodePlan("inserted")
        self._ours.add(id(node))
        self.casts_inserted += 1
        return node

    def _converted_constant(self, constant: gs.Constant) -> gs.Constant:
        """Rules 8, 9 and 11."""
        source = weights.source(constant)
        if not weights.is_loaded(constant):
            self.counts.add(convert_array(source.read(), self.target)[1])
            converted: np.ndarray | ConvertedValues = ConvertedValues(source, self.target)
        else:
            array, counts = convert_array(source.read(), self.target)
            self.counts.add(counts)
            converted = (
                array
                if self.target == FLOAT16
                else ConvertedValues(weights.WeightSource(array), self.target)  # 2-byte copy
            )
        self.constants_converted += 1
        if id(constant) not in self._fp32_constant_users:
            if isinstance(converted, ConvertedValues):
                weights.replace_lazily(constant, converted)
            else:
                weights.set_storage(constant, converted)
            return constant
        self.constants_copied += 1
        return weights.new_constant(self.names(f"{constant.name}_{self._suffix()}"), converted)

    def _relabel(self, homes: dict[int, bool]) -> None:
        """Set the new dtype on tensors produced in the target type; rewrite Cast(to=FLOAT)."""
        target_dtype = _target_numpy(self.target)
        for node, _graph in self.scope.nodes:
            plan = self.plans[id(node)]
            if plan.mode != "fp16":
                continue
            for tensor in node.outputs:
                if homes.get(id(tensor)) and isinstance(tensor, gs.Variable):
                    tensor.dtype = target_dtype
            if node.op == "Cast" and int(node.attrs.get("to", 0)) == FLOAT:
                if homes.get(id(node.outputs[0])):
                    node.attrs["to"] = self.target
                    self._ours.add(id(node))
                    self.casts_rewritten += 1
        for tensor in self.model.graph.inputs:
            if homes.get(id(tensor)):
                tensor.dtype = target_dtype

    def _splice_casts(self) -> None:
        """Rule 6: put each new Cast right after its producer (or first, for inputs)."""
        for graph in self.scope.graphs:
            front = self._front.get(id(graph), [])
            if not front and not any(id(n) in self._after for n in graph.nodes):
                continue
            ordered: list[gs.Node] = list(front)
            for node in graph.nodes:
                ordered.append(node)
                ordered.extend(self._after.get(id(node), []))
            graph.nodes = ordered

    def _simplify_casts(self) -> None:
        """Rule 7: bypass no-op Casts; collapse pairs of our own Casts."""
        for graph in self.scope.graphs:
            outputs = {id(t) for t in graph.outputs}
            for node in list(graph.nodes):
                if node.op != "Cast" or not node.inputs or not node.outputs:
                    continue
                source = node.inputs[0]
                inner = source.inputs[0] if len(source.inputs) == 1 else None
                if (
                    inner is not None
                    and inner.op == "Cast"
                    and id(node) in self._ours
                    and id(inner) in self._ours
                ):
                    node.inputs[0] = inner.inputs[0]
                    source = node.inputs[0]
                    self.casts_removed += 1
                target = int(node.attrs.get("to", 0))
                if self.dtype(source) == target and id(node.outputs[0]) not in outputs:
                    replace_uses(node.outputs[0], source)
                    node.inputs.clear()
                    node.outputs.clear()
                    self.casts_removed += 1
            self._drop_dead_casts(graph)

    def _drop_dead_casts(self, graph: gs.Graph) -> None:
        """Remove this pass's Casts that nothing reads any more (after rule 7's collapses)."""
        outputs = {id(t) for t in graph.outputs}
        for node in reversed(list(graph.nodes)):
            if id(node) not in self._ours or not node.outputs:
                continue
            result = node.outputs[0]
            if not result.outputs and id(result) not in outputs:
                node.inputs.clear()
                node.outputs.clear()
        graph.nodes = [n for n in graph.nodes if n.inputs or n.outputs]

    # -- reporting --

    def touched(self) -> list[str]:
        return [
            node.name
            for node, _graph in self.scope.nodes
            if self.plans[id(node)].mode == "fp16" and node.name
        ]

    def stats(self) -> dict[str, Any]:
        converted = sum(1 for p in self.plans.values() if p.mode == "fp16")
        stats: dict[str, Any] = {
            "dtype": self.options["dtype"],
            "nodes_converted": converted,
            "nodes_float32": sum(1 for p in self.plans.values() if p.mode == "fp32"),
            "constants_converted": self.constants_converted,
            "constants_copied": self.constants_copied,
            "casts_inserted": self.casts_inserted,
            "casts_rewritten": self.casts_rewritten,
            "casts_removed": self.casts_removed,
            "clamped": self.counts.clamped,
            "flushed": self.counts.flushed,
        }
        if self.blocked:
            stats["blocked"] = dict(sorted(self.blocked.items()))
        if self.activation_checked:
            stats["activations_checked"] = self.activation_checked
        return stats


def _input_peaks(feeds: Feeds, names: list[str]) -> dict[str, float]:
    """Largest finite magnitude of each float graph input over the calibration feeds."""
    peaks = dict.fromkeys(names, 0.0)
    for feed in feeds:
        for name in names:
            values = np.asarray(feed[name])
            finite = values[np.isfinite(values) & (np.abs(values) < MASK_MAGNITUDE)]
            if finite.size:
                peaks[name] = max(peaks[name], float(np.abs(finite).max()))
    return peaks


def _empty(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Variable) and not tensor.name


def _is_control_flow(node: gs.Node) -> bool:
    return any(True for _ in _subgraphs(node))
