"""``sparsify``: weight sparsification — magnitude, N:M, data-aware (Wanda, SparseGPT), channels.

Unstructured and N:M sparsity zero weights in place (the model keeps its shapes; the zeros
compress and TensorRT turns 2:4 into speed on Ampere or newer GPUs). Structured ``channel``
pruning removes output channels and the matching input rows of the consumer, so the model gets
smaller and faster on every backend. See :class:`SparsifyPass` for the rules.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.check.heldout import fit_to_target
from graphopt.data.calibration import (
    StatRequest,
    TensorStats,
    chunk_by_budget,
    collect,
    gram_budget,
    gram_bytes,
)
from graphopt.errors import OptionError
from graphopt.ir import weights
from graphopt.ir.edit import replace_input
from graphopt.ir.model import Model, iter_graphs
from graphopt.passkit.api import Budget, Pass, PassContext, PassResult
from graphopt.passkit.blockquant import inverse_hessian_factor
from graphopt.passkit.options import Option, SearchPoint, SearchSpace
from graphopt.passkit.ordering import OrderRank
from graphopt.passkit.qdq import Namer
from graphopt.passkit.reconstruct import Layer, LayerFit, LayerInput, Reconstruction, stages
from graphopt.passkit.selection import (
    WeightedOp,
    body_labels,
    count_values,
    matches_any,
    node_label,
    weighted_op,
)

logger = logging.getLogger(__name__)

SPEED_NOTE = (
    "unstructured and N:M zeros give no speedup on ONNX Runtime CPU or CUDA (the kernels stay "
    "dense); 2:4 pays only on TensorRT with Ampere or newer GPUs; the zeros do shrink compressed "
    "size. Only pattern=channel makes the model faster everywhere."
)
CHANNEL_NOTE = "channel pruning makes the matrices smaller: fewer FLOPs on every backend."
METHODS = ("auto", "magnitude", "wanda", "sparsegpt")
TARGET_GENTLEST = 0.05
"""Rule 11: the lowest sparsity tried; when even it misses the target, the model stays dense."""
TARGET_STEPS = 4
"""Rule 11: halvings after the two ends (within ~3 % of the highest passing level at 0.5)."""
AUTO_DATA_METHOD = "sparsegpt"
"""What ``method=auto`` uses with real calibration data (measured on MiniLM, see rule 4)."""
FLOAT_KINDS = frozenset({"float16", "float32", "float64"})
ELEMENTWISE_UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Erf",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Softsign",
        "Mish",
        "Neg",
        "Abs",
        "Identity",
        "Clip",
        "Dropout",
    }
)
"""Channel-preserving unary ops of the standard domain (Clip's min/max and Dropout's ratio are
scalars). com.microsoft's FastGelu is not one: its input 1 is a per-channel bias."""
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"})
NORM_PER_CHANNEL = frozenset({"BatchNormalization"})
"""Ops whose extra inputs are per-channel vectors (inputs 1..4 of BatchNormalization)."""
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
"""Op-type lists above name ONNX ops; a custom-domain op of the same name is something else."""
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
"""Ops whose weights this pass does not handle; each one is logged as skipped (rule 1)."""
HESSIAN_RETRIES = 3
"""How often sparsegpt multiplies the dampening by 10 when the inverse Hessian is not positive
definite, before the layer is skipped."""


# --- weight layouts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How a weight maps to the canonical (outputs × reduction) matrix this pass works on.

    MatMul B (K×N) and Gemm B (K×N) are transposed; Gemm B with transB (N×K) is already in
    that layout; Conv W (O, C/g, k₁, …, k_d) of any spatial rank d ≥ 1 (Conv1d of audio models,
    Conv2d, Conv3d) becomes O × (k₁·…·k_d·C/g) with the input channel varying fastest, so N:M
    groups run along input channels for each output and kernel position.
    """

    op: str
    transposed: bool = False

    def rows(self, values: np.ndarray) -> np.ndarray:
        if self.op == "Conv":
            order = (0, *range(2, values.ndim), 1)
            return values.transpose(order).reshape(values.shape[0], -1)
        return values if self.transposed else values.T

    def back(self, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.op == "Conv":
            out, channels, *kernel = shape
            spread = rows.reshape(out, *kernel, channels)
            return spread.transpose(0, len(shape) - 1, *range(1, len(shape) - 1))
        return rows if self.transposed else rows.T

    def reduction_channels(self, shape: tuple[int, ...]) -> np.ndarray:
        """Input channel (of this group) of every canonical column."""
        if self.op == "Conv":
            return np.tile(np.arange(shape[1]), kernel_positions(shape))
        return np.arange(shape[0] if not self.transposed else shape[1])


def kernel_positions(shape: tuple[int, ...]) -> int:
    """Kernel positions of a Conv weight (O, C/g, k₁, …, k_d): k₁·…·k_d."""
    return int(np.prod(shape[2:], dtype=np.int64))


def _layout(node: gs.Node) -> Layout:
    return Layout(node.op, transposed=_weighted(node).weight_transposed)


def _weighted(node: gs.Node) -> WeightedOp:
    """The layout of a MatMul, Gemm or Conv with a weight input (every node this pass reads)."""
    op = weighted_op(node)
    assert op is not None, node.op
    return op


# --- masks --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """``keep`` of every ``group`` weights along the reduction axis (N:M), or unstructured."""

    keep: int = 0
    group: int = 0

    @property
    def is_nm(self) -> bool:
        return self.group > 0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.group


def parse_nm(text: str, label: str) -> Pattern:
    """``"2:4"`` → keep 2 of every 4; anything else is an :class:`OptionError`."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise OptionError(f"option {label}: expected N:M such as 2:4, got {text!r}")
    keep, group = int(match.group(1)), int(match.group(2))
    if not 0 < keep < group:
        raise OptionError(f"option {label}: N:M needs 0 < N < M, got {text!r}")
    return Pattern(keep, group)


def parse_layer_targets(items: Sequence[str], label: str) -> list[tuple[str, float]]:
    """``["*attention*=0.3"]`` → [(glob, fraction)], in the given order (first match wins)."""
    targets = []
    for item in items:
        glob, sep, value = item.rpartition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not sep or not glob or not 0.0 <= fraction < 1.0:
            raise OptionError(f"option {label}: expected GLOB=FRACTION in [0, 1), got {item!r}")
        targets.append((glob, fraction))
    return targets


def prune_count(size: int, sparsity: float) -> int:
    return round(size * sparsity)


def lowest_mask(scores: np.ndarray, count: int, axis: int | None) -> np.ndarray:
    """True at the ``count`` lowest scores per row (axis=1) or over the whole array (None)."""
    mask = np.zeros(scores.shape, dtype=bool)
    if count <= 0:
        return mask
    if axis is None:
        flat = scores.reshape(-1)
        count = min(count, flat.size)
        chosen = np.argpartition(flat, count - 1)[:count]
        mask.reshape(-1)[chosen] = True
        return mask
    count = min(count, scores.shape[1])
    chosen = np.argpartition(scores, count - 1, axis=1)[:, :count]
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask


def nm_mask(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """True at the ``group - keep`` lowest scores of every group of consecutive columns."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // pattern.group, pattern.group)
    drop = pattern.group - pattern.keep
    chosen = np.argsort(grouped, axis=2, kind="stable")[:, :, :drop]
    mask = np.zeros(grouped.shape, dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=2)
    return mask.reshape(rows, cols)


def sparsegpt(
    weights: np.ndarray,
    hessian: np.ndarray,
    sparsity: float,
    pattern: Pattern,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    per_row: bool = True,
) -> np.ndarray:
    """SparseGPT on canonical (outputs × reduction) ``weights`` with H = XᵀX over the reduction.

    Columns are visited in order; the mask of each block of ``block_size`` columns is chosen by
    w² / [H⁻¹]²_jj (per row, or over the block) — N:M-aware when ``pattern`` is N:M — and every
    pruned weight's error is spread over the later columns with the upper Cholesky factor of
    the dampened inverse Hessian (λ = ``damp`` × mean diagonal, multiplied by 10 up to
    :data:`HESSIAN_RETRIES` times while that factor does not exist). Returns float64 weights
    whose pruned entries are exactly zero; raises :class:`numpy.linalg.LinAlgError` when the
    Hessian is not finite or no dampening tried makes its inverse positive definite.
    """
    matrix = np.array(weights, dtype=np.float64)
    h = np.asarray(hessian, dtype=np.float64)
    cols = matrix.shape[1]
    dead = np.diag(h) <= 0
    if dead.any():
        h = h.copy()
        h[dead, dead] = 1.0
    upper = inverse_hessian_factor(h, damp, retries=HESSIAN_RETRIES, log=logger, caller="sparsify")
    if pattern.is_nm:
        block_size = max(pattern.group, block_size - block_size % pattern.group)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = matrix[:, start:stop].copy()
        inverse = upper[start:stop, start:stop]
        diagonal = np.diag(inverse)
        errors = np.zeros_like(block)
        mask = np.zeros(block.shape, dtype=bool)
        if not pattern.is_nm:
            scores = block**2 / diagonal[None, :] ** 2
            rows = 1 if per_row else block.shape[0]
            count = prune_count(rows * stop, sparsity) - prune_count(rows * start, sparsity)
            mask = lowest_mask(scores, count, 1 if per_row else None)
        for column in range(stop - start):
            if pattern.is_nm and column % pattern.group == 0:
                span = slice(column, column + pattern.group)
                scores = block[:, span] ** 2 / diagonal[None, span] ** 2
                mask[:, span] = nm_mask(scores, pattern)
            value = block[:, column]
            error = np.where(mask[:, column], value, 0.0) / diagonal[column]
            block[:, column:] -= np.outer(error, inverse[column, column:])
            block[mask[:, column], column] = 0.0
            errors[:, column] = error
        matrix[:, start:stop] = block
        matrix[:, stop:] -= errors @ upper[start:stop, stop:]
    return matrix


def gzip_bytes(values: np.ndarray) -> int:
    """Size of the tensor's raw bytes after deflate at gzip's default level (6)."""
    return len(zlib.compress(np.ascontiguousarray(values).tobytes(), 6))


# --- candidates ---------------------------------------------------------------------------------


@dataclass
class WeightJob:
    """One weight constant to sparsify, with every candidate node that reads it."""

    weight: gs.Constant
    nodes: list[gs.Node]
    layout: Layout
    sparsity: float
    stats_inputs: list[tuple[gs.Tensor, int]] = field(default_factory=list)
    """(activation tensor, channel axis) of each reading node, for data-aware methods."""
    data_free: bool = False
    """A reader sits in an If/Loop/Scan body, so a data-aware run uses magnitude (rule 10)."""

    @property
    def name(self) -> str:
        return node_label(self.nodes[0])


@dataclass(frozen=True)
class Candidate:
    """A node that passed rule 1's per-node checks, with the graph that holds it (rule 10)."""

    node: gs.Node
    graph: gs.Graph
    body: str | None
    """The If/Loop/Scan body holding ``node`` (``If if_0.then_branch``); None in the main graph."""


@dataclass
class ChannelPlan:
    """One structured-pruning site: a producer, the elementwise path after it, its consumers."""

    producer: gs.Node
    weight: gs.Constant
    out_axis: int
    bias: gs.Constant | None
    channels: int
    axis: int
    """Channel axis of every tensor on the path (-1 for MatMul/Gemm, 1 for Conv)."""
    rank: int | None
    tensors: list[gs.Variable]
    slices: list[tuple[gs.Node, int, int]]
    """(node, input index, constant axis) of per-channel constants on the path."""
    sinks: list[tuple[gs.Node, gs.Constant, int]]
    """(consumer, its weight, the weight's input-channel axis)."""
    sparsity: float
    graph: gs.Graph
    """The graph holding the producer and the whole path (rule 10)."""


@dataclass
class Report:
    skipped: dict[str, str] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: dict[str, str] = field(default_factory=dict)
    """Node name → the If/Loop/Scan body holding it, for every MatMul/Gemm/Conv in a body."""

    def skip(self, name: str, key: str, detail: str) -> None:
        self.skipped[name] = key
        logger.info("sparsify: skipping %s%s: %s", name, self.where(name), detail)

    def where(self, name: str) -> str:
        """`` in <body>`` for a node inside an If/Loop/Scan body, else an empty string."""
        body = self.bodies.get(name)
        return f" in {body}" if body is not None else ""


def _is_standard(node: gs.Node) -> bool:
    """Whether ``node`` is an ONNX op (so the op-type lists of this module apply to it)."""
    return (node.domain or "") in STANDARD_DOMAINS


def _weight_problem(node: gs.Node) -> tuple[str, str] | None:
    """Why ``node`` is not a candidate (key, detail), or None."""
    layout = weighted_op(node)
    weight = layout.weight if layout is not None else None
    if weight is None:
        return "weight-not-constant", "its weight input is not a constant"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "gemm-transA", "Gemm with transA=1"
    rank = len(weight.shape or ())
    if node.op == "Conv" and rank < 3:
        return "weight-rank", f"weight rank {rank}, expected 3 or more (O, C/g, kernel…)"
    if node.op != "Conv" and rank != 2:
        return "weight-rank", f"weight rank {rank}, expected 2"
    if np.dtype(weight.dtype).name not in FLOAT_KINDS:
        return "weight-not-float", f"weight dtype {np.dtype(weight.dtype).name}"
    return None


def _claim(context: PassContext, constants: Sequence[gs.Constant]) -> str | None:
    """Claim ``constants`` for this pass (rule 1); returns why not when another pass owns one.

    Nothing is claimed unless every weight is free, so a refused plan leaves no claims behind.
    """
    for weight in constants:
        owner = context.claims.owner(weight.name)
        if owner not in (None, SparsifyPass.name):
            return f"{weight.name} belongs to pass {owner}"
    for weight in constants:
        context.claims.claim(weight.name, SparsifyPass.name)
    return None


def _log_data_free(nodes: Sequence[gs.Node], method: str, report: Report) -> None:
    """Rule 10: once per body node of a data-aware run, say why it gets magnitude pruning."""
    for node in nodes:
        name = node_label(node)
        if name in report.bodies:
            logger.info(
                "sparsify: %s%s: %s statistics cannot be collected inside If/Loop/Scan bodies "
                "(ONNX Runtime cannot expose their tensors as outputs); using magnitude pruning",
                name,
                report.where(name),
                method,
            )


def _node_order(model: Model) -> dict[str, int]:
    """Position of every node, main graph first, then each body (:func:`iter_graphs` order)."""
    nodes = (node for graph in iter_graphs(model.graph) for node in graph.nodes)
    return {node_label(node): index for index, node in enumerate(nodes)}


def _input_channels(job: WeightJob) -> int:
    """Channels of the activation ``job``'s weight multiplies (all groups of a grouped Conv)."""
    shape = tuple(int(d) for d in job.weight.shape)
    if job.layout.op == "Conv":
        return shape[1] * int(job.nodes[0].attrs.get("group", 1))
    return shape[1] if job.layout.transposed else shape[0]


def _gram_tensors(job: WeightJob) -> dict[str, int]:
    """The activations whose XᵀX SparseGPT needs for ``job``, with each Gram matrix's bytes."""
    return {tensor.name: gram_bytes(_input_channels(job)) for tensor, _ in job.stats_inputs}


def _layer(job: WeightJob) -> Layer:
    """The engine's view of a job: its activations, keyed by the job's name (rule 4)."""
    inputs = tuple(LayerInput(tensor.name, axis) for tensor, axis in job.stats_inputs)
    return Layer(job.name, inputs, tuple(job.nodes), _input_channels(job))


def _stages(graph: gs.Graph, jobs: Sequence[WeightJob]) -> list[list[WeightJob]]:
    """Jobs grouped by how many sparsified nodes lie upstream of them (rule 4's sequential mode;
    :func:`graphopt.passkit.reconstruct.stages`). ``graph`` must be topologically sorted."""
    layers = [Layer(str(index), (), tuple(job.nodes)) for index, job in enumerate(jobs)]
    return [[jobs[int(layer.key)] for layer in stage] for stage in stages(graph, layers)]


class SparsifyPass(Pass):
    """Weight sparsification. Rules:

    1. Candidates are MatMul (2-D constant B), Gemm (constant B, transA=0; transB honoured) and
       Conv (constant W of rank ≥ 3: Conv1d, Conv2d, Conv3d) nodes of the standard ONNX domain
       with a float weight type in ``op_types``, not matched by ``exclude`` globs and in scope,
       in the main graph and in every If/Loop/Scan body (rule 10). LSTM/GRU/RNN nodes are
       logged as skipped (``recurrent-op``): their weights are left alone. A node is known by
       its name, or by its first output's name when it has none (globs, scope, reports,
       ``touched``).
       Everything else is skipped with its reason logged. A weight claimed by an earlier pass
       (``lowrank``) is skipped; sparsify claims the weights it prunes, so a later structural
       pass leaves them alone (``quant`` claims nothing and still quantizes them, keeping the
       zeros). A weight also read by a node that is not a candidate, or in another layout, is
       skipped. A weight shared by several candidates is pruned once, with their calibration
       statistics summed.
    2. ``sparsity`` is the fraction of weights zeroed; ``layer_sparsity`` entries
       ``GLOB=FRACTION`` override it per node name (first match wins; 0 keeps a layer dense,
       whatever the pattern).
    3. ``pattern=n:m`` keeps N of every M consecutive weights along the reduction axis
       (``n_m``, default 2:4): MatMul B axis 0, Gemm B axis 0 (axis 1 with transB), Conv W
       axis 1 for each output channel and kernel position; the sparsity is then 1 − N/M, so
       ``layer_sparsity`` fractions other than 0 are ignored (and logged as such). A reduction
       axis not divisible by M is skipped.
    4. ``method``: ``magnitude`` scores |W| with a per-row (per output), per-tensor or global
       threshold (``scope``); ``wanda`` scores |W_ij|·‖X_j‖₂ within each output; ``sparsegpt``
       chooses masks block by block with w²/[H⁻¹]²_jj and updates the remaining weights with
       the inverse Hessian of H = XᵀX (λ = ``damp`` × mean diagonal; Conv uses the channel
       Gram matrix for every kernel position; grouped Conv falls back to wanda). ``auto``
       (default) is sparsegpt with real calibration data (a :class:`~graphopt.data.feeds.Feeds` not
       flagged synthetic) and magnitude otherwise, logged (no data, synthetic data, or a plain
       iterable that was never opened as ``Feeds``): on MiniLM it beat wanda at 30 %, 50 % and
       2:4 (mean embedding cosine 0.968 / 0.834 / 0.715 against 0.961 / 0.811 / 0.675 with the
       64 padded calibration sentences; 50 % and 2:4 reach 0.946 and 0.901 against wanda's
       0.867 and 0.738 with 512 unpadded ones; ``python -m tools.bench_sparsify``). wanda and
       sparsegpt need ``Feeds``.
       Statistics come from one calibration run on the dense graph; ``sequential`` instead
       measures each stage of layers after the stages before it are pruned. For sparsegpt that
       is the reconstruction engine (:mod:`graphopt.passkit.reconstruct`): each layer is fitted
       to the float output X W from the input X̃ the pruned layers before it give it (SparseGPT
       on W* = (H + μI)⁻¹(G W + μW), H = X̃ᵀX̃, G = X̃ᵀX, μ from ``damp``; Conv layers keep W as
       the target, with H per channel); wanda ranks by the pruned graph's norms. Measured on
       MiniLM (512 unpadded sentences, 256 held out): 50 % sparsegpt 0.9461 → 0.9631, 2:4
       0.89 → 0.9367, in 45–50 s instead of 14 s; off by default until it is measured on more
       models. Data-aware methods skip, with the
       reason, a candidate whose input 0 is a constant (no activation to measure), one whose
       activation an earlier candidate reads on another channel axis (Conv axis 1 against
       MatMul/Gemm's last axis), and, for sparsegpt, a layer whose inverse Hessian is still not
       positive definite after ``damp`` was raised tenfold 3 times.
    5. Exact counts: per row and per tensor zero exactly round(size × sparsity) weights
       (existing zeros count); sparsegpt too, its per-block counts carrying the rounding.
    6. ``pattern=channel`` removes output channels: columns of MatMul/Gemm B (rows with
       transB), rows of Conv W, bias entries, and the matching input rows of every consumer.
       It applies when the producer's output reaches only channel-wise elementwise ONNX ops
       (activations, scalar or per-channel constants, BatchNormalization after Conv; no
       custom-domain op such as com.microsoft's FastGelu with its per-channel bias), and
       those reach only MatMul/Gemm/Conv (group 1, Gemm with transA=0, reading the channels on
       the producer's axis) that read the path as their data input through an unshared constant
       weight, and no node inside a nested If/Loop/Scan body reads a path tensor from the
       outer scope; otherwise the producer is skipped with the reason. Channels are ranked by
       Σ ‖X_c‖₂·‖W_consumer[c]‖ with data, else by ‖W_producer[:, c]‖·‖W_consumer[c]‖;
       ``sparsity`` is the fraction removed.
    7. Zeros are exact (0.0), so symmetric quantization (``quant``) keeps them zero.
    8. Per-layer stats: sparsity and the deflate (gzip level 6) size of the weight before and
       after, with a note that only channel pruning speeds up ONNX Runtime.
    9. ONNX ``sparse_initializer`` output is not offered: it needs int64 indices (a win only
       above ~67 % sparsity for fp32), ONNX Runtime densifies it at load, and the Model layer
       has no path for later passes to read such tensors back as dense float arrays.
    10. If/Loop/Scan bodies: candidates come from the main graph and every body, nested ones
        included (:func:`~graphopt.ir.model.iter_graphs`); a weight defined in an outer scope and
        read in a body is a constant like any other, and one read in several bodies (the same
        constant in both branches of an If) is one weight: pruned, claimed and counted once.
        Activation statistics can only be collected for main-graph tensors (ONNX Runtime
        cannot expose tensors inside a control-flow body as outputs), so in a wanda/sparsegpt
        run a weight read by a node in a body is pruned by magnitude (per row, or per tensor
        for ``scope`` per-tensor and global) and that is logged once per such node. Channel
        pruning runs inside a body under rule 6's checks applied to that body: the path stays
        inside it (a body output — If result, Loop-carried or Scan value — or a read from a
        nested body skips the producer), channels are ranked by weight norms there, and new
        constants get names unique across the whole model. Stats count the rewritten nodes
        inside bodies (``in_subgraphs``), those that fell back to data-free pruning
        (``data_free_in_subgraphs``) and the skipped body candidates by reason
        (``skipped_in_subgraphs``); every log line about a body node names its body.
        ``touched`` lists node names (:func:`~graphopt.passkit.selection.node_label`), main graph
        first.
    11. ``target_cosine`` > 0 with real calibration data: the last quarter of the batches is
        held aside (:func:`graphopt.check.heldout.hold_aside`); the pass runs on copies of the
        model at several sparsities (the same for every layer, ``sparsity`` first, then 5 %,
        then 4 halvings between the highest level that met the target and the lowest that did
        not) and keeps the highest whose held-aside score (the validation gate's figure: the
        worst channel counts) meets the target; the model stays dense when even 5 % misses it.
        Stats list every level tried with its score. ``pattern=n:m`` refuses it (its level is
        fixed).
    """

    name: ClassVar[str] = "sparsify"
    summary: ClassVar[str] = "weight sparsity: magnitude, N:M, Wanda, SparseGPT, channel pruning"
    exact: ClassVar[bool] = False
    reads_weights: ClassVar[bool] = True
    run_after: ClassVar[frozenset[str]] = frozenset({"cleanup"})
    run_before: ClassVar[frozenset[str]] = frozenset({"quant", "fp16"})
    order_rank: ClassVar[OrderRank] = OrderRank.VALUES
    budget: ClassVar[Budget] = Budget(min_cosine=0.9, min_snr_db=7.0)
    """Sparsity is lossy by design, so the exact-pass 0.99 would refuse every useful run. 0.9
    (≈ 7 dB SNR) is the quality bar of issue 6: on MiniLM (256 held-out sentences) sparsegpt
    passes it at 30 % (mean embedding cosine 0.968, magnitude 0.942) and, calibrated on 512
    unpadded sentences, at 50 % (0.946; magnitude 0.747), while padded calibration data falls
    short at 50 % (0.834), so validation tells users when a model was pruned too far or
    calibrated on the wrong data. --min-cosine overrides it."""
    options_schema: ClassVar[tuple[Option, ...]] = (
        Option(
            "sparsity",
            float,
            0.5,
            "fraction of weights zeroed (channels removed with pattern=channel)",
            minimum=0.0,
            maximum=0.99,
        ),
        Option(
            "pattern",
            str,
            "unstructured",
            "unstructured, n:m (see n_m) or channel (structured: removes output channels)",
            choices=("unstructured", "n:m", "channel"),
        ),
        Option("n_m", str, "2:4", "N:M for pattern=n:m: keep N of every M along the reduction"),
        Option(
            "method",
            str,
            "auto",
            "auto (sparsegpt with real calibration data, else magnitude), magnitude, wanda, "
            "sparsegpt",
            choices=METHODS,
        ),
        Option(
            "scope",
            str,
            "per-row",
            "threshold scope of magnitude pruning (per-row = per output channel)",
            choices=("per-row", "per-tensor", "global"),
        ),
        Option(
            "layer_sparsity",
            list,
            [],
            "per-node targets GLOB=FRACTION, first match wins (e.g. *layer.0/*=0.3)",
        ),
        Option("exclude", list, [], "never sparsify nodes whose names match these globs"),
        Option(
            "op_types",
            list,
            ["MatMul", "Gemm", "Conv"],
            "op types to sparsify",
            choices=("MatMul", "Gemm", "Conv"),
        ),
        Option("block_size", int, 128, "sparsegpt block of columns", minimum=8, maximum=4096),
        Option(
            "damp",
            float,
            0.01,
            "sparsegpt Hessian dampening, fraction of its mean diagonal",
            minimum=1e-6,
            maximum=1.0,
        ),
        Option(
            "sequential",
            bool,
            False,
            "wanda/sparsegpt: measure each stage of layers on the graph with the layers before "
            "it already sparsified; sparsegpt fits each layer to the float output (rule 4)",
        ),
        Option("report_gzip", bool, True, "measure deflate sizes of the weights (rule 8)"),
        Option(
            "target_cosine",
            float,
            0.0,
            "> 0: the highest sparsity up to `sparsity` (the same for every layer) whose "
            "held-aside score meets this, found by bisection (rule 11; 0 = the fixed level)",
            minimum=0.0,
            maximum=1.0,
        ),
    )
    search_space: ClassVar[SearchSpace] = SearchSpace(
        common={"report_gzip": False},
        points=(
            SearchPoint({"sparsity": 0.3}, objectives=()),
            SearchPoint({"pattern": "channel", "sparsity": 0.25}),
            SearchPoint({"sparsity": 0.5}, objectives=()),
            SearchPoint({"pattern": "n:m"}, objectives=()),
            SearchPoint({"sparsity": 0.3, "method": "wanda"}, objectives=()),
        ),
    )
    """``tune``: zeros (unstructured, N:M) neither shrink the file nor speed ONNX Runtime up on
    their own, so only channel pruning is expected to help alone; no gzip report."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.nm = parse_nm(self.options["n_m"], f"{self.name}.n_m")
        self.targets = parse_layer_targets(
            self.options["layer_sparsity"], f"{self.name}.layer_sparsity"
        )
        if self.options["target_cosine"] > 0 and self.options["pattern"] == "n:m":
            raise OptionError(
                "sparsify: target_cosine chooses a sparsity level; pattern=n:m fixes it at 1 - N/M"
            )

    # --- entry point ---------------------------------------------------------------------------

    def call(self, model: Model, context: PassContext) -> PassResult:
        if self.options["target_cosine"] > 0:
            if context.has_real_data:
                return self._to_target(model, context)
            logger.warning(
                "sparsify: target_cosine needs real calibration data; using sparsity=%g",
                self.options["sparsity"],
            )
        method = self._method(context)
        report = Report()
        if self.options["pattern"] == "channel":
            touched = self._prune_channels(model, context, method, report)
        else:
            touched = self._sparsify_weights(model, context, method, report)
        stats: dict[str, Any] = {
            "pattern": self._patternnode_label(),
            "method": method,
            "sparsified": len(report.layers),
        }
        if report.layers:
            stats.update(self._totals(report))
            stats["layers"] = report.layers
        if report.skipped:
            stats["skipped"] = count_values(report.skipped.values())
        if report.bodies:
            self._body_stats(stats, method, touched, report)
        if touched:
            channel = self.options["pattern"] == "channel"
            stats["speed_note"] = CHANNEL_NOTE if channel else SPEED_NOTE
        return PassResult(model, bool(touched), stats, touched)

    def _to_target(self, model: Model, context: PassContext) -> PassResult:
        """Rule 11: bisect the sparsity on held-aside batches, then prune at the level found."""
        fixed = {**self.options, "target_cosine": 0.0}
        search = fit_to_target(
            model,
            context,
            "sparsify",
            lambda level: SparsifyPass({**fixed, "sparsity": level}),
            target=self.options["target_cosine"],
            gentlest=TARGET_GENTLEST,
            strongest=self.options["sparsity"],
            steps=TARGET_STEPS,
        )
        stats = {
            "target_cosine": self.options["target_cosine"],
            "levels_tried": [[round(lv, 4), round(sc, 6)] for lv, sc in search.tried],
            "sparsity": 0.0 if search.level is None else search.level,
        }
        if search.result is None:
            return PassResult(model, False, stats, [])
        result = search.result
        return PassResult(result.model, result.modified, {**result.stats, **stats}, result.touched)

    def _body_stats(
        self, stats: dict[str, Any], method: str, touched: list[str], report: Report
    ) -> None:
        """Rule 10's counters: rewritten and skipped nodes inside If/Loop/Scan bodies."""
        in_bodies = [name for name in touched if name in report.bodies]
        stats["in_subgraphs"] = len(in_bodies)
        if method != "magnitude" and in_bodies:
            stats["data_free_in_subgraphs"] = len(in_bodies)
        skipped = [key for name, key in report.skipped.items() if name in report.bodies]
        if skipped:
            stats["skipped_in_subgraphs"] = count_values(skipped)

    def _patternnode_label(self) -> str:
        pattern = self.options["pattern"]
        return self.options["n_m"].strip() if pattern == "n:m" else pattern

    def _method(self, context: PassContext) -> str:
        """Rule 4's choice of method for this run's data."""
        method = self.options["method"]
        real = context.has_real_data
        if method == "auto":
            if real:
                return AUTO_DATA_METHOD
            kind = context.describe_data()
            if kind == "none":
                logger.info("sparsify: no calibration data, using magnitude pruning")
            elif kind == "synthetic":
                logger.info("sparsify: synthetic calibration data, using magnitude pruning")
            else:
                logger.info(
                    "sparsify: calibration data is %s, not Feeds (graphopt.data."
                    "open_data); using magnitude pruning",
                    kind,
                )
            return "magnitude"
        if method != "magnitude":
            context.require_feeds(f"sparsify method={method}")
            if not real:
                logger.warning("sparsify: method=%s on synthetic data; give real data", method)
        return method

    def _target(self, name: str) -> float:
        for glob, fraction in self.targets:
            if fnmatch.fnmatchcase(name, glob):
                return fraction
        return float(self.options["sparsity"])

    def _totals(self, report: Report) -> dict[str, Any]:
        layers = report.layers.values()
        size = sum(layer["size"] for layer in layers)
        zeros = sum(layer["zeros"] for layer in layers)
        totals: dict[str, Any] = {"sparsity": round(zeros / size, 4) if size else 0.0}
        if self.options["report_gzip"] and self.options["pattern"] != "channel":
            totals["gzip_bytes"] = (
                f"{sum(layer['gzip_before'] for layer in layers)}→"
                f"{sum(layer['gzip_after'] for layer in layers)}"
            )
        if self.options["pattern"] == "channel":
            totals["parameters"] = (
                f"{sum(layer['params_before'] for layer in layers)}→"
                f"{sum(layer['params_after'] for layer in layers)}"
            )
        return totals

    # --- candidates ----------------------------------------------------------------------------

    def _candidate_nodes(
        self, graph: gs.Graph, context: PassContext, report: Report
    ) -> list[Candidate]:
        """Rule 1's per-node checks, over the main graph and every body (rule 10)."""
        candidates = []
        body_names = body_labels(graph)
        for home in iter_graphs(graph):
            body = body_names.get(id(home))
            for node in home.nodes:
                if not _is_standard(node):
                    continue
                name = node_label(node)
                if node.op in RECURRENT_OPS and context.in_scope(name):
                    if body is not None:
                        report.bodies[name] = body
                    detail = f"{node.op} weights are not sparsified (only MatMul/Gemm/Conv are)"
                    report.skip(name, "recurrent-op", detail)
                    continue
                if node.op not in ("MatMul", "Gemm", "Conv"):
                    continue
                if body is not None:
                    report.bodies[name] = body
                if node.op not in self.options["op_types"]:
                    report.skip(name, "op-type-not-selected", f"{node.op} not in op_types")
                elif not context.in_scope(name):
                    continue
                elif matches_any(name, self.options["exclude"]):
                    report.skip(name, "excluded", "matched by exclude")
                elif (problem := _weight_problem(node)) is not None:
                    report.skip(name, problem[0], problem[1])
                else:
                    candidates.append(Candidate(node, home, body))
        return candidates

    def _weight_jobs(
        self, graph: gs.Graph, context: PassContext, method: str, report: Report
    ) -> list[WeightJob]:
        """Group candidate nodes by weight (rule 1), attach their targets (rule 2) and check
        that data-aware methods can measure their activations (rules 4, 10)."""
        candidates = self._candidate_nodes(graph, context, report)
        by_weight: dict[int, list[Candidate]] = {}
        for candidate in candidates:
            by_weight.setdefault(id(candidate.node.inputs[1]), []).append(candidate)
        candidate_ids = {id(candidate.node) for candidate in candidates}
        data_aware = method != "magnitude"
        read_axes: dict[str, tuple[int, str]] = {}  # activation → (axis, reader) accepted so far
        jobs = []
        for sites in by_weight.values():
            readers = [site.node for site in sites]
            weight = readers[0].inputs[1]
            name = node_label(readers[0])
            layouts = {_layout(node) for node in readers}
            others = [c for c in weight.outputs if id(c) not in candidate_ids]
            groups = {int(node.attrs.get("group", 1)) for node in readers}
            if others:
                detail = (
                    f"weight {weight.name} is also read by {node_label(others[0])} ({others[0].op})"
                )
                report.skip(name, "weight-read-elsewhere", detail)
            elif len(layouts) > 1 or len(groups) > 1:
                report.skip(name, "shared-layouts-differ", f"{weight.name} read in two layouts")
            elif any(weight is node.inputs[0] for node in readers):
                report.skip(name, "weight-is-data", f"{weight.name} is also a data input")
            elif (target := self._target(name)) <= 0.0:
                report.skip(name, "target-zero", "layer_sparsity keeps it dense")
            else:
                job = WeightJob(weight, readers, layouts.pop(), target)
                job.data_free = data_aware and any(site.body is not None for site in sites)
                if not job.data_free:
                    job.stats_inputs = [
                        (n.inputs[0], _weighted(n).activation_axis) for n in readers
                    ]
                if self._is_nm() and not self._nm_fits(job, report):
                    continue
                if data_aware and not job.data_free:
                    if not self._measurable(job, method, read_axes, report):
                        continue
                if (refusal := _claim(context, [weight])) is not None:
                    report.skip(name, "claimed", refusal)
                    continue
                for tensor, axis in job.stats_inputs:
                    read_axes.setdefault(tensor.name, (axis, name))
                if job.data_free:
                    _log_data_free(readers, method, report)
                jobs.append(job)
        return jobs

    def _measurable(
        self,
        job: WeightJob,
        method: str,
        read_axes: dict[str, tuple[int, str]],
        report: Report,
    ) -> bool:
        """Rule 4: every activation of ``job`` is computed by the graph and read on one axis."""
        for tensor, axis in job.stats_inputs:
            if not isinstance(tensor, gs.Variable):
                detail = f"its input {tensor.name} is a constant: no activation for {method}"
                report.skip(job.name, "activation-constant", detail)
                return False
            earlier = read_axes.get(tensor.name)
            if earlier is not None and earlier[0] != axis:
                detail = (
                    f"its input {tensor.name} is read on axis {axis}, but {earlier[1]} reads it "
                    f"on axis {earlier[0]}; {method} statistics need one channel axis"
                )
                report.skip(job.name, "activation-axes-differ", detail)
                return False
        return True

    def _is_nm(self) -> bool:
        return self.options["pattern"] == "n:m"

    # --- unstructured and N:M (rules 2-5) -------------------------------------------------------

    def _sparsify_weights(
        self, model: Model, context: PassContext, method: str, report: Report
    ) -> list[str]:
        if self._is_nm() and any(fraction > 0.0 for _, fraction in self.targets):
            logger.info(
                "sparsify: pattern=n:m ignores non-zero layer_sparsity fractions "
                "(the sparsity is 1 - N/M = %g); 0 still keeps a layer dense",
                self.nm.sparsity,
            )
        jobs = self._weight_jobs(model.graph, context, method, report)
        if not jobs:
            logger.info("sparsify: no weight to sparsify")
            return []
        thresholds = self._global_thresholds(jobs, method)
        sequential = method != "magnitude" and self.options["sequential"]
        if sequential:
            model.graph.toposort()
        grouped = _stages(model.graph, jobs) if sequential else [jobs]
        touched: list[str] = []
        budget = gram_budget(model, context.settings)
        runs = 0
        with contextlib.ExitStack() as stack:
            engine = (
                stack.enter_context(self._engine(model, context))
                if sequential and method == "sparsegpt"
                else None
            )
            for stage in grouped:
                # Every run of a stage sees the graph as the stage began: new weights are
                # applied once the stage is done (rule 4), only their spilled values are held.
                pending: list[tuple[WeightJob, Any]] = []
                chunks = (
                    chunk_by_budget(stage, _gram_tensors, budget)
                    if method == "sparsegpt"
                    else [stage]
                )
                for chunk in chunks:
                    statistics: dict[str, TensorStats] = {}
                    fits: dict[str, LayerFit] = {}
                    if engine is not None:
                        fits = engine.measure([_layer(job) for job in chunk if not job.data_free])
                    else:
                        statistics = self._collect(model, context, method, chunk)
                    for job in chunk:
                        original = weights.read(job.weight)
                        try:
                            job_method = "magnitude" if job.data_free else method
                            updated = self._sparsify_one(
                                job, job_method, statistics, thresholds, fits.get(job.name)
                            )
                        except np.linalg.LinAlgError as error:
                            report.skip(job.name, "hessian-not-invertible", f"sparsegpt: {error}")
                            continue
                        updated = updated.astype(original.dtype)
                        self._record(job, original, updated, report)
                        pending.append((job, weights.store(model, updated, job.weight.name)))
                        del original, updated
                        touched.extend(node_label(node) for node in job.nodes)
                    del statistics, fits
                    runs += 1
                for job, values in pending:
                    weights.set_storage(job.weight, values)
        logger.debug("sparsify: %d calibration runs", runs)
        logger.info(
            "sparsify: %d weights sparsified with %s in %d stages",
            len(report.layers),
            method,
            len(grouped),
        )
        order = _node_order(model)
        return sorted(touched, key=lambda name: order.get(name, -1))

    def _nm_fits(self, job: WeightJob, report: Report) -> bool:
        shape = tuple(job.weight.shape)
        reduction = shape[1] if job.layout.op == "Conv" or job.layout.transposed else shape[0]
        if reduction % self.nm.group:
            report.skip(
                job.name,
                "reduction-not-divisible",
                f"reduction axis of {reduction} is not divisible by M={self.nm.group}",
            )
            return False
        return True

    def _collect(
        self, model: Model, context: PassContext, method: str, jobs: Sequence[WeightJob]
    ) -> dict[str, TensorStats]:
        if method == "magnitude":
            return {}
        feeds = context.require_feeds(f"sparsify method={method}")  # _method checked it
        gram = method == "sparsegpt"
        requests = [
            StatRequest(tensor.name, minmax=False, channel_sumsq=True, gram=gram, channel_axis=axis)
            for job in jobs
            for tensor, axis in job.stats_inputs
        ]
        return collect(
            model,
            feeds,
            requests,
            on_batch=lambda index: context.report_progress("sparsify: calibrating", index),
            settings=context.settings,
        )

    def _global_thresholds(self, jobs: Sequence[WeightJob], method: str) -> dict[int, np.ndarray]:
        """scope=global: one magnitude threshold over every layer with the default target."""
        if method != "magnitude" or self._is_nm() or self.options["scope"] != "global":
            return {}
        pooled = [job for job in jobs if job.sparsity == float(self.options["sparsity"])]
        if not pooled:
            return {}
        magnitudes = [
            np.abs(np.asarray(weights.read(job.weight), np.float64)).reshape(-1) for job in pooled
        ]
        flat = np.concatenate(magnitudes)
        mask = lowest_mask(flat, prune_count(flat.size, self.options["sparsity"]), None)
        masks: dict[int, np.ndarray] = {}
        offset = 0
        for job, values in zip(pooled, magnitudes, strict=True):
            masks[id(job.weight)] = mask[offset : offset + values.size].reshape(job.weight.shape)
            offset += values.size
        return masks

    def _engine(self, model: Model, context: PassContext) -> Reconstruction:
        """Rule 4's sequential SparseGPT: the reconstruction engine on the calibration data."""
        return Reconstruction(
            model,
            context.require_feeds("sparsify sequential"),  # _method checked it
            settings=context.settings,
            label="sparsify",
            on_batch=lambda index: context.report_progress("sparsify: fitting", index),
        )

    def _sparsify_one(
        self,
        job: WeightJob,
        method: str,
        statistics: dict[str, TensorStats],
        global_masks: dict[int, np.ndarray],
        fit: LayerFit | None = None,
    ) -> np.ndarray:
        values = weights.read(job.weight)
        shape = tuple(values.shape)
        if id(job.weight) in global_masks:
            return np.where(global_masks[id(job.weight)], 0.0, values)
        rows = job.layout.rows(values.astype(np.float64))
        group = int(job.nodes[0].attrs.get("group", 1)) if job.layout.op == "Conv" else 1
        if method == "sparsegpt" and group > 1:
            logger.info("sparsify: %s is a grouped Conv; using wanda instead", job.name)
            method = "wanda"
        if method == "sparsegpt":
            if fit is None:
                hessian = self._hessian(job, statistics, shape)
            else:
                hessian = self._kernel_hessian(job, fit.hessian, shape)
                if job.layout.op != "Conv":  # rule 4: fit to the reference output X W
                    rows = fit.target(rows.T, self.options["damp"]).T
            pruned = sparsegpt(
                rows,
                hessian,
                job.sparsity,
                self.nm if self._is_nm() else Pattern(),
                block_size=self.options["block_size"],
                damp=self.options["damp"],
                per_row=self.options["scope"] != "per-tensor",
            )
            return job.layout.back(pruned, shape)
        scores = np.abs(rows)
        if method == "wanda":
            scores = scores * self._column_norms(job, statistics, shape, group, fit)
        mask = self._mask(scores, job.sparsity, method)
        return job.layout.back(np.where(mask, 0.0, rows), shape)

    def _mask(self, scores: np.ndarray, sparsity: float, method: str) -> np.ndarray:
        if self._is_nm():
            return nm_mask(scores, self.nm)
        per_tensor = method == "magnitude" and self.options["scope"] != "per-row"
        if per_tensor:
            return lowest_mask(scores, prune_count(scores.size, sparsity), None)
        return lowest_mask(scores, prune_count(scores.shape[1], sparsity), 1)

    def _column_norms(
        self,
        job: WeightJob,
        statistics: dict[str, TensorStats],
        shape: tuple[int, ...],
        group: int,
        fit: LayerFit | None = None,
    ) -> np.ndarray:
        """‖X_j‖₂ of every canonical column (rows × cols for grouped Conv, else 1 × cols);
        with ``fit`` (the sequential engine's), from the diagonal of its H."""
        if fit is not None:
            sumsq = np.diag(fit.hessian)
        else:
            sumsq = sum(statistics[tensor.name].channel_sumsq for tensor, _ in job.stats_inputs)
        norms = np.sqrt(np.asarray(sumsq, dtype=np.float64))
        channels = job.layout.reduction_channels(shape)
        if group == 1:
            return norms[channels][None, :]
        per_group = shape[1]
        outputs_per_group = shape[0] // group
        offsets = (np.arange(shape[0]) // outputs_per_group) * per_group
        return norms[offsets[:, None] + channels[None, :]]

    def _hessian(
        self, job: WeightJob, statistics: dict[str, TensorStats], shape: tuple[int, ...]
    ) -> np.ndarray:
        names = dict.fromkeys(tensor.name for tensor, _ in job.stats_inputs)
        first, *others = names
        gram = np.asarray(statistics[first].gram, dtype=np.float64)
        if others:
            gram = gram.copy()
            for name in others:
                gram += statistics[name].gram
        return self._kernel_hessian(job, gram, shape)

    @staticmethod
    def _kernel_hessian(job: WeightJob, gram: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """H over the canonical reduction axis: Conv repeats the channel Gram per position."""
        if job.layout.op == "Conv":
            return np.kron(np.eye(kernel_positions(shape)), gram)
        return gram

    def _record(
        self, job: WeightJob, before: np.ndarray, after: np.ndarray, report: Report
    ) -> None:
        entry: dict[str, Any] = {
            "weight": job.weight.name,
            "sparsity": round(float(np.mean(after == 0)), 4),
            "size": int(after.size),
            "zeros": int(np.count_nonzero(after == 0)),
        }
        if self.options["report_gzip"]:
            entry["gzip_before"] = gzip_bytes(before)
            entry["gzip_after"] = gzip_bytes(after)
        homes = [report.bodies[n] for n in map(node_label, job.nodes) if n in report.bodies]
        if homes:
            entry["subgraphs"] = list(dict.fromkeys(homes))
        if job.data_free:
            entry["method"] = "magnitude"
        report.layers[job.name] = entry

    # --- structured channel pruning (rule 6) ----------------------------------------------------

    def _prune_channels(
        self, model: Model, context: PassContext, method: str, report: Report
    ) -> list[str]:
        graph = model.graph
        plans = []
        scopes: dict[int, tuple[set[int], set[int]]] = {}  # graph → ids of outputs, nodes
        for candidate in self._candidate_nodes(graph, context, report):
            home = candidate.graph
            if id(home) not in scopes:
                scopes[id(home)] = ({id(t) for t in home.outputs}, {id(n) for n in home.nodes})
            outputs, home_nodes = scopes[id(home)]
            plan = self._plan(candidate.node, home, outputs, home_nodes, report)
            if plan is not None and self._claim_plan(plan, context, report):
                plans.append(plan)
        if not plans:
            logger.info("sparsify: no channel to prune")
            return []
        statistics: dict[str, TensorStats] = {}
        if method != "magnitude":
            feeds = context.require_feeds(f"sparsify method={method}")
            measured = [plan for plan in plans if plan.graph is graph]
            for plan in plans:
                if plan.graph is not graph:
                    name = node_label(plan.producer)
                    logger.info(
                        "sparsify: %s%s: %s statistics cannot be collected inside If/Loop/Scan "
                        "bodies; ranking its channels by weight norms",
                        name,
                        report.where(name),
                        method,
                    )
            requests = [
                StatRequest(
                    sink.inputs[0].name, minmax=False, channel_sumsq=True, channel_axis=axis
                )
                for plan in measured
                for sink, _, _ in plan.sinks
                for axis in [_weighted(sink).activation_axis]
            ]
            statistics = collect(
                model,
                feeds,
                requests,
                on_batch=lambda index: context.report_progress("sparsify: calibrating", index),
                settings=context.settings,
            )
        namer = Namer(*iter_graphs(graph))
        touched = []
        for plan in plans:
            keep = self._kept_channels(plan, statistics if plan.graph is graph else {})
            before = self._plan_parameters(plan)
            self._apply_plan(model, plan, keep, namer)
            after = self._plan_parameters(plan)
            name = node_label(plan.producer)
            report.layers[name] = {
                "channels": f"{plan.channels}→{keep.size}",
                "sparsity": round(1 - keep.size / plan.channels, 4),
                "size": before,
                "zeros": before - after,
                "params_before": before,
                "params_after": after,
            }
            if name in report.bodies:
                report.layers[name]["subgraphs"] = [report.bodies[name]]
            touched.append(node_label(plan.producer))
            touched.extend(node_label(sink) for sink, _, _ in plan.sinks)
        logger.info("sparsify: pruned channels of %d producers", len(plans))
        return touched

    def _plan(
        self,
        node: gs.Node,
        home: gs.Graph,
        outputs: set[int],
        home_nodes: set[int],
        report: Report,
    ) -> ChannelPlan | None:
        """Rule 6's graph checks for one producer; None (after logging why) when it can't.

        ``home`` is the graph holding ``node`` (the main graph or a body, rule 10);
        ``outputs`` and ``home_nodes`` are the ids of its outputs and nodes.
        """
        name = node_label(node)
        weight: gs.Constant = node.inputs[1]
        if node.op == "Conv" and int(node.attrs.get("group", 1)) != 1:
            report.skip(name, "grouped-conv", "grouped Conv producer")
            return None
        if len(weight.outputs) != 1:
            report.skip(name, "weight-shared", f"weight {weight.name} is shared")
            return None
        layout = _weighted(node)
        out_axis = layout.out_axis
        channels = int(weight.shape[out_axis])
        bias = layout.bias
        if node.op in ("Gemm", "Conv") and len(node.inputs) > 2 and not node.inputs[2].is_empty():
            if bias is None or len(bias.outputs) != 1:
                report.skip(name, "bias-not-prunable", "its bias is not an unshared constant")
                return None
            if bias.shape is None or tuple(bias.shape) != (channels,):
                report.skip(
                    name, "bias-not-prunable", f"bias shape {bias.shape} is not per channel"
                )
                return None
        rank = len(weight.shape) if node.op == "Conv" else None
        plan = ChannelPlan(
            producer=node,
            weight=weight,
            out_axis=out_axis,
            bias=bias,
            channels=channels,
            axis=1 if node.op == "Conv" else -1,
            rank=rank,
            tensors=[],
            slices=[],
            sinks=[],
            sparsity=self._target(name),
            graph=home,
        )
        if plan.sparsity <= 0.0:
            report.skip(name, "target-zero", "layer_sparsity keeps it dense")
            return None
        problem = self._walk(plan, node.outputs[0], outputs, home_nodes)
        if problem is None and not plan.sinks:
            problem = ("no-consumer", "no MatMul/Gemm/Conv reads the pruned channels")
        if problem is not None:
            report.skip(name, problem[0], problem[1])
            return None
        return plan

    def _walk(
        self, plan: ChannelPlan, start: gs.Variable, outputs: set[int], home_nodes: set[int]
    ) -> tuple[str, str] | None:
        """Collect the elementwise path from ``start`` and its sinks into ``plan``.

        A reader that is not a node of the producer's own graph sits in a nested If/Loop/Scan
        body and reads the tensor from the outer scope: the pruned shape would leak into that
        body, so the producer is skipped. ``outputs`` are the ids of the producer's graph's
        outputs (a body's outputs included: If results, Loop-carried and Scan values).
        """
        region: list[gs.Variable] = [start]
        seen = {id(start)}
        nodes: dict[int, gs.Node] = {}
        index = 0
        while index < len(region):
            tensor = region[index]
            index += 1
            if id(tensor) in outputs:
                return "graph-output", f"{tensor.name} on the channel path is a graph output"
            for consumer in tensor.outputs:
                if id(consumer) in nodes:
                    continue
                if id(consumer) not in home_nodes:
                    detail = (
                        f"{node_label(consumer)} ({consumer.op}) inside a subgraph body reads "
                        f"{tensor.name} from the outer scope"
                    )
                    return "read-in-subgraph", detail
                kind = self._consumer_kind(consumer, tensor, plan)
                if kind == "sink":
                    plan.sinks.append((consumer, consumer.inputs[1], self._sink_axis(consumer)))
                    nodes[id(consumer)] = consumer
                    continue
                if kind != "path":
                    return kind, f"{node_label(consumer)} ({consumer.op}) {self._why(kind)}"
                nodes[id(consumer)] = consumer
                for produced in consumer.outputs:
                    if id(produced) not in seen:
                        seen.add(id(produced))
                        region.append(produced)
        plan.tensors = region
        for node in nodes.values():
            if any(node is sink for sink, _, _ in plan.sinks):
                continue
            problem = self._check_path_inputs(node, seen, plan)
            if problem is not None:
                return problem
        return None

    def _why(self, kind: str) -> str:
        return {
            "not-elementwise": "is not a channel-wise elementwise op",
            "custom-domain": "is a custom-domain op, not the ONNX op of that name",
            "sink-weight-not-prunable": "reads the path but its weight is not an unshared constant",
            "sink-reads-as-weight": "reads the path as its weight input",
            "sink-grouped": "is a grouped Conv",
            "sink-gemm-transA": "is a Gemm with transA=1 (it reduces over the other axis)",
            "sink-axis-differs": "reads the channels on another axis than the producer writes "
            "them (Conv axis 1, MatMul/Gemm the last axis)",
        }.get(kind, kind)

    def _consumer_kind(self, consumer: gs.Node, tensor: gs.Tensor, plan: ChannelPlan) -> str:
        if not _is_standard(consumer):
            return "custom-domain"
        if consumer.op in ("MatMul", "Gemm", "Conv"):
            if consumer.inputs[0] is not tensor or any(t is tensor for t in consumer.inputs[1:]):
                return "sink-reads-as-weight"
            if consumer.op == "Conv" and int(consumer.attrs.get("group", 1)) != 1:
                return "sink-grouped"
            if consumer.op == "Gemm" and int(consumer.attrs.get("transA", 0)):
                return "sink-gemm-transA"
            weight = _weighted(consumer).weight
            if weight is None or len(weight.outputs) != 1:
                return "sink-weight-not-prunable"
            if (plan.axis == 1) != (consumer.op == "Conv"):
                return "sink-axis-differs"
            if (
                weight.shape is None
                or int(weight.shape[self._sink_axis(consumer)]) != plan.channels
            ):
                return "sink-weight-not-prunable"
            return "sink"
        if consumer.op in ELEMENTWISE_UNARY or consumer.op in ELEMENTWISE_BINARY:
            return "path"
        if consumer.op in NORM_PER_CHANNEL and plan.axis == 1 and consumer.inputs[0] is tensor:
            return "path"
        return "not-elementwise"

    @staticmethod
    def _sink_axis(consumer: gs.Node) -> int:
        """The sink weight's reduction axis, whose entries meet the pruned channels."""
        return _weighted(consumer).in_axis

    def _check_path_inputs(
        self, node: gs.Node, region: set[int], plan: ChannelPlan
    ) -> tuple[str, str] | None:
        """Every input of a path node is on the path, or a constant we can slice or broadcast."""
        per_channel_inputs = range(1, 5) if node.op in NORM_PER_CHANNEL else range(0)
        for position, tensor in enumerate(node.inputs):
            if tensor.is_empty() or id(tensor) in region:
                continue
            if not isinstance(tensor, gs.Constant):
                label = node_label(node)
                detail = f"{label} ({node.op}) also reads {tensor.name} from off the path"
                return "reads-off-path", detail
            if position in per_channel_inputs:
                plan.slices.append((node, position, 0))
                continue
            if node.op in ELEMENTWISE_UNARY:
                continue  # Clip bounds, Dropout ratio: scalars
            axis = self._constant_axis(tensor, plan)
            if axis == "bad":
                label = node_label(node)
                detail = f"{label} ({node.op}) constant {tensor.name} has shape {tensor.shape}"
                return "constant-not-per-channel", detail
            if axis is not None:
                plan.slices.append((node, position, int(axis)))
        return None

    @staticmethod
    def _constant_axis(constant: gs.Constant, plan: ChannelPlan) -> int | str | None:
        """Axis of ``constant`` that lines up with the channel axis: None (broadcast), or "bad"."""
        shape = tuple(constant.shape or ())
        if plan.axis == -1:
            position = len(shape) - 1
        else:
            position = len(shape) - (plan.rank or 4) + plan.axis
        if position < 0 or position >= len(shape):
            return None
        if shape[position] == 1:
            return None
        if shape[position] == plan.channels:
            return position
        return "bad"

    def _claim_plan(self, plan: ChannelPlan, context: PassContext, report: Report) -> bool:
        refusal = _claim(context, [plan.weight] + [weight for _, weight, _ in plan.sinks])
        if refusal is not None:
            report.skip(node_label(plan.producer), "claimed", refusal)
            return False
        return True

    def _kept_channels(self, plan: ChannelPlan, statistics: dict[str, TensorStats]) -> np.ndarray:
        """Indices of the channels that stay, ascending (rule 6's ranking)."""
        importance = np.zeros(plan.channels, dtype=np.float64)
        producer_norm = None
        if not statistics:
            produced = np.moveaxis(
                np.asarray(weights.read(plan.weight), np.float64), plan.out_axis, 0
            )
            producer_norm = np.linalg.norm(produced.reshape(plan.channels, -1), axis=1)
        for sink, weight, axis in plan.sinks:
            rows = np.moveaxis(np.asarray(weights.read(weight), np.float64), axis, 0)
            sink_norm = np.linalg.norm(rows.reshape(plan.channels, -1), axis=1)
            if producer_norm is None:
                activation = statistics[sink.inputs[0].name].channel_sumsq
                importance += np.sqrt(np.asarray(activation, np.float64)) * sink_norm
            else:
                importance += producer_norm * sink_norm
        remove = min(prune_count(plan.channels, plan.sparsity), plan.channels - 1)
        order = np.argsort(-importance, kind="stable")
        return np.sort(order[: plan.channels - remove])

    def _apply_plan(self, model: Model, plan: ChannelPlan, keep: np.ndarray, namer: Namer) -> None:
        weights.replace(model, plan.weight, np.take(weights.read(plan.weight), keep, plan.out_axis))
        if plan.bias is not None:
            weights.replace(model, plan.bias, np.take(weights.read(plan.bias), keep, axis=0))
        for _, weight, axis in plan.sinks:
            weights.replace(model, weight, np.take(weights.read(weight), keep, axis=axis))
        path_nodes = {id(node) for node, _, _ in plan.slices}
        sliced: dict[tuple[int, int], gs.Constant] = {}
        for node, position, axis in plan.slices:
            constant = node.inputs[position]
            key = (id(constant), axis)
            if key not in sliced:
                values = np.take(weights.read(constant), keep, axis=axis)
                if all(id(reader) in path_nodes for reader in constant.outputs):
                    weights.replace(model, constant, values)
                    sliced[key] = constant
                else:
                    sliced[key] = gs.Constant(namer(f"{constant.name}_pruned"), values)
            if sliced[key] is not constant:
                replace_input(node, constant, sliced[key])
        for tensor in plan.tensors:
            if tensor.shape is not None and len(tensor.shape) > 0:
                shape = list(tensor.shape)
                shape[plan.axis] = int(keep.size)
                tensor.shape = shape

    def _plan_parameters(self, plan: ChannelPlan) -> int:
        total = int(np.prod(plan.weight.shape))
        if plan.bias is not None:
            total += int(np.prod(plan.bias.shape))
        for _, weight, _ in plan.sinks:
            total += int(np.prod(weight.shape))
        return total
