"""``quant``: QDQ insertion with streaming calibration, accuracy-driven by default.

The pass quantizes compute ops that have integer kernels and leaves everything else in float;
see :class:`QuantPass` for the rules. Placement is data (:data:`PLACEMENT`), not code paths.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.check.heldout import HeldAsideScore, hold_aside
from graphopt.data.calibration import (
    CALIBRATORS,
    StatRequest,
    TensorStats,
    calibrated_range,
    chunk_by_budget,
    collect,
    gram_budget,
)
from graphopt.data.feeds import Feeds
from graphopt.errors import InputError
from graphopt.ir import weights
from graphopt.ir.edit import replace_input
from graphopt.ir.model import Model, iter_graphs
from graphopt.passkit.api import Budget, Pass, PassContext, PassResult
from graphopt.passkit.blockquant import BlockFormat, BlockQuantized, gptq, quantize_rtn
from graphopt.passkit.int4 import (
    BLOCKED_DQ_OPSET,
    LAYOUTS,
    gather_block_constants,
    nbits_arrays,
    write_block_quantized,
    write_gather_block_quantized,
)
from graphopt.passkit.options import BarCosine, Option, SearchPoint, SearchSpace, sweep
from graphopt.passkit.ordering import OrderRank
from graphopt.passkit.qdq import (
    Namer,
    QuantParams,
    activation_params,
    dequantize_node,
    fake_quantize,
    quantize_bias,
    quantize_weight,
)
from graphopt.passkit.reconstruct import Layer, LayerInput, Reconstruction, layer_bytes, stages
from graphopt.passkit.selection import (
    WeightedOp,
    count_reasons,
    count_values,
    matches_any,
    weighted_op,
)
from graphopt.settings import Settings

logger = logging.getLogger(__name__)


EMBEDDING_MIN_VALUES = 65536
PER_AXIS_OPSET = 13
"""QuantizeLinear/DequantizeLinear gained ``axis`` (per-channel) in opset 13."""
QDQ_OPSET = 10
"""The first opset with QuantizeLinear/DequantizeLinear and MatMulInteger."""
DYNAMIC_OPSET = 11
"""The first opset with DynamicQuantizeLinear."""
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
ROUNDINGS = ("auto", "nearest", "gptq", "sequential")
"""Rule 8's ways to round int4 weights."""
SEQUENTIAL_AUTO_MAX_BYTES = 2 * 1024**3
"""Rule 8: ``rounding=auto`` fits sequentially up to this many bytes of weights. On the 4.15 GB
generated decoder the sequential fit passed 1.64× the model's size (codes and the engine's
quantized copy are held in memory); rounding to nearest peaked at 1.20×."""
GPTQ_ROWS_PER_INPUT = 2
"""Rule 8: below 2 calibration rows per input channel GPTQ lost to rounding to nearest (a
4 × 128-wide MLP: 1.12× RTN's output error at 128 rows, 0.75× at 256)."""
SYMMETRIC_DEFAULT = False
"""Rule 8: asymmetric int4 blocks by default (measured on MiniLM: see the rule)."""
ACCURACY_LEVEL_DEFAULT = 0
"""Rule 8: MatMulNBits accuracy_level 0 by default (measured on MiniLM: see the rule)."""
CHAIN_COMPUTE_OPS = frozenset(
    {"Sigmoid", "LeakyRelu", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Softmax"}
)
"""Rule 15: ops ONNX Runtime runs on uint8/int8 (QLinearSigmoid, QLinearMul, QLinearConcat …)
when every data input and the output are Q/DQ'd; the output gets its own calibrated range."""
CHAIN_PASS_OPS = frozenset(
    {"MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice"}
)
"""Rule 15: ops ONNX Runtime runs directly on the integer tensor when input and output share one
scale (it drops the Q/DQ pair around them); the output reuses the input's range."""


@dataclass(frozen=True)
class OpPlacement:
    """How one op type is quantized (rule 2).

    ``weight_input``/``bias_input`` are input positions; ``quantize_output`` says whether ONNX
    Runtime needs a Q/DQ pair on the output to use its integer kernel (Conv → QLinearConv).
    """

    weight_input: int
    bias_input: int | None
    quantize_output: bool


PLACEMENT: dict[str, OpPlacement] = {
    "MatMul": OpPlacement(weight_input=1, bias_input=None, quantize_output=False),
    "Gemm": OpPlacement(weight_input=1, bias_input=2, quantize_output=False),
    "Conv": OpPlacement(weight_input=1, bias_input=2, quantize_output=True),
}
"""Op type → placement. MatMul/Gemm with a float output fuse into MatMulIntegerToFloat/QGemm on
ONNX Runtime CPU; Conv needs a quantized output to become QLinearConv."""


@dataclass
class Candidate:
    """One node the pass will quantize, with what it needs."""

    node: gs.Node
    placement: OpPlacement
    weight: gs.Tensor
    weight_axis: int | None
    activation: gs.Tensor
    scheme: str = "static"
    """static (calibrated Q/DQ), dynamic (per-batch activation scale), int4 (weight-only),
    int8-blocks (weight-only int8 in the int4 layout: rule 8's step down),
    weight-only (int8 weights through DequantizeLinear, float compute), split (outlier
    channels in float, the rest static)."""
    outliers: np.ndarray | None = None
    inlier_range: tuple[float, float] | None = None
    body: gs.Graph | None = None
    """The If/Loop/Scan body that holds the node; None for the main graph."""

    @property
    def activations(self) -> list[gs.Tensor]:
        """Inputs quantized with calibrated Q/DQ pairs (both, for activation × activation)."""
        if self.scheme in ("dynamic", "int4", "int8-blocks", "weight-only"):
            return []
        if isinstance(self.weight, gs.Constant):
            return [self.activation]
        return [self.activation, self.weight]

    def with_scheme(self, scheme: str) -> Candidate:
        return replace(self, scheme=scheme)


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    excluded_for_accuracy: dict[str, float] = field(default_factory=dict)
    dynamic_for_accuracy: dict[str, float] = field(default_factory=dict)
    int8_for_accuracy: dict[str, float] = field(default_factory=dict)
    unquantizable: dict[str, str] = field(default_factory=dict)


def _weighted(node: gs.Node) -> WeightedOp:
    """The layout of a quant candidate (always a MatMul, Gemm or Conv with a weight input)."""
    op = weighted_op(node)
    assert op is not None, node.op
    return op


def _weight_axis(node: gs.Node, per_channel: bool) -> int | None:
    """The weight's output-channel axis when quantizing per channel (:class:`WeightedOp`)."""
    op = weighted_op(node)
    return op.out_axis if per_channel and op is not None else None


class QuantPass(Pass):
    """Int8 QDQ quantization. Rules:

    1. Candidates are MatMul/Gemm/Conv nodes whose weight input is a constant (after
       normalization, whatever the exporter did) of float32 type; Gemm with transA, MatMul with a
       weight of rank ≠ 2 and activation×activation MatMuls (unless ``quantize_act_matmul``) are
       skipped with a logged reason, as are nodes excluded by ``exclude`` globs or not matched by
       ``include`` globs, and op types not in ``op_types``. quant claims no weights: it
       quantizes whatever the structural passes before it (lowrank, sparsify) left.
    2. Placement follows :data:`PLACEMENT`: the weight becomes an int8 initializer feeding a
       DequantizeLinear (per output channel by default), the activation input gets one shared
       Q→DQ pair per tensor, Conv/Gemm biases become int32 with scale s_x·s_w, and Conv outputs
       get a Q→DQ pair after any following Relu so ONNX Runtime can use QLinearConv.
    3. Activation ranges come from one streaming calibration run (``calibrator``: minmax,
       percentile, entropy, mse); tensors that hold attention-mask values (±inf, |x| ≥ 1e30) or
       no finite value are not quantized, with the reason in the report.
    4. ``backend``: ``x86`` uses uint8 asymmetric activations, ``tensorrt`` int8 symmetric.
    5. Accuracy-driven mode (``target_cosine`` > 0, with real calibration data): the last quarter
       of the calibration batches is held aside; each candidate's harm is measured by quantizing
       it alone; while the held-aside score is below the target, the most harmful remaining
       node goes back to float. The score is the validation gate's figure: over the outputs,
       the lowest whole-tensor or worst-channel cosine (a detector's class-score rows count
       even when its box rows dominate the tensor), at valid positions only when the data has a
       padding mask (as the gate compares). Excluded nodes and their harm are reported.
       A plan's variant runs only downstream of the nodes it changes, fed from the float
       model's activations cached once (:mod:`graphopt.passkit.probe`): the scores of whole
       runs, bit for bit, at about half the inference on MiniLM.
    6. Smoothing moves activation outliers into the weights before calibration: per input
       channel the weight rows are multiplied by s and the activation divided by s, folded into
       the preceding LayerNormalization's scale and bias (into a copy of it when other nodes
       read its output too), else through an inserted Mul. ``smooth_outliers`` (default) only
       scales the outlier channels, s_j = max(1, max|X_j| / p99 of the channel maxima);
       ``smooth_alpha`` > 0 uses SmoothQuant's s_j = max|X_j|^α / max|W_j|^(1-α) instead.
       Off by default: on MiniLM (256 held-out sentences, seq 128) it raises the mean
       embedding cosine from 0.9910 to 0.9959, but the LayerNorm copies and Muls lower the
       CPU speedup over fp32 from 1.63× to 1.55×.
    7. Zeros stay zero (symmetric weights), so sparsity from earlier passes survives.
    8. ``weight_bits=4``: MatMuls with 2-D constant weights get int4 weights in blocks of
       ``block_size`` (16–256) rows along K, rounded to nearest
       (:func:`graphopt.passkit.blockquant.quantize_rtn`): ``symmetric`` blocks (one scale,
       codes −8…7, scale chosen per block from max|w|/8, /7.5, /7 by squared error) or
       asymmetric ones (uint4 zero point per block, range [min(w, 0), max(w, 0)]);
       ``search_clip`` also tries each range shrunk down to 0.8× and keeps the lowest error.
       ``int4_layout=nbits`` writes com.microsoft MatMulNBits with ``accuracy_level`` (0 =
       ONNX Runtime's default fp32 compute, 4 = int8 activations on CPU); ``dequantize``
       writes standard opset-21 DequantizeLinear (int4 [N, K] blocked along K) → Transpose →
       MatMul, which ONNX Runtime computes exactly at every optimisation level
       (:mod:`graphopt.passkit.int4` rule 2) and the pass asks for opset 21 for; below it,
       MatMulNBits is written instead, with a note. Weight-only: activations stay float. In
       accuracy-driven mode int4 nodes are scored like any other and go back to float when
       they harm most. Defaults by measurement on MiniLM (every MatMul in int4,
       ``target_cosine=0``, 256 held-out sentences, mean embedding cosine): block 32
       symmetric 0.9639 (the former max|w|/7 rule: 0.9580), asymmetric 0.9735, asymmetric +
       clip search 0.9759; block 128 0.9522 / 0.9555 / 0.9592 (ONNX Runtime's own RTN
       quantizer: 0.969 / 0.954), so ``symmetric=false`` and ``search_clip=true``.
       ``accuracy_level=0``: on a 2-core Xeon (AVX-512 VNNI, AMX; ONNX Runtime 1.32, 2
       threads, a shared and loaded machine) MiniLM's MatMulNBits ran 0.89–1.12× fp32's speed
       at level 0 and 0.82–0.91× at level 4 (batch 1 and 8, 128 tokens); level 4 only caught
       up at 16 tokens. The ``dequantize`` layout ran 0.57–0.87×: it saves file size only.
       ``rounding``: ``nearest`` as above; ``gptq`` runs GPTQ (``act_order`` by default, with
       every group's scale fixed from the weight first so groups stay contiguous along K) on
       H = XᵀX of the float model's inputs; ``sequential`` quantizes a copy of the model stage
       by stage with the reconstruction engine (:mod:`graphopt.passkit.reconstruct`) and runs
       GPTQ on each layer's W* with H = X̃ᵀX̃ of the input the layers quantized before it give
       it; ``auto`` (default) is ``sequential`` with real calibration data on models up to
       :data:`SEQUENTIAL_AUTO_MAX_BYTES` of weights, else ``nearest``.
       A layer with fewer than :data:`GPTQ_ROWS_PER_INPUT` calibration rows per input channel
       keeps round-to-nearest weights, logged. MiniLM (512 unpadded sentences, every MatMul in
       int4, block 32): nearest 0.9759, gptq 0.9945, sequential 0.9962; block 128: 0.9592,
       –, 0.9943 (``tools.bench_sequential``).
    9. ``mode=dynamic``: MatMuls quantize activations per batch (DynamicQuantizeLinear →
       MatMulInteger → rescale, which ONNX Runtime fuses into DynamicQuantizeMatMul). In
       accuracy-driven mode ``fallback=dynamic`` first tries a harmful node as dynamic and keeps
       that only when the held-aside cosine improves; otherwise the node goes to float.
    10. ``outlier_threshold`` > 0: a MatMul whose input has a few channels (at most a tenth)
        with calibrated abs-max above threshold × median is split: those channels go through a
        small float MatMul, the rest through int8 with a range calibrated without them, and
        the two products are added (the LLM.int8() idea as a graph rewrite).
    11. Nodes with fewer than ``min_macs`` multiply-accumulates per sample (counted from the
        calibration activations, padding positions included: a padded batch computes them)
        stay float: for them the Q/DQ pair costs about what the integer kernel saves. With
        integer chains (rule 15) a small node whose input is already integer (a quantized
        neighbour's output, through chain ops) is quantized all the same: there its int8
        kernel costs no conversion. Measured on ONNX Runtime CPU (AVX2, 2 threads), without
        integer chains: the digits CNN (0.01–0.3 M MACs per layer) ran 0.97–0.99× as fast
        with all four layers quantized (0.78× with ORT's quantize_static), while MiniLM's
        MatMuls (≥ 4.7 M MACs at 32 tokens) gain 1.6×; the default, 1e6, sits between.
    12. ``embeddings``: a Gather along axis 0 of a constant float32 table with at least 65536
        values becomes Gather of an int8 table (symmetric, one scale per row) → Cast → Mul by
        the gathered row scales; with ``embedding_bits=4``, com.microsoft GatherBlockQuantized
        of an int4 table in blocks of ``block_size`` along the hidden axis (``symmetric`` and
        ``search_clip`` as in rule 8). Outside the accuracy-driven loop; validation measures it.
    13. Opsets: per-channel weights (per-axis Q/DQ) need opset 13, so the pass asks the
        pipeline for it (:meth:`required_opset`; the model is upgraded by onnx's version
        converter and the plan output says so). When the converter cannot upgrade the model,
        weights and biases are quantized per tensor (opset ≥ 10), ``mode=dynamic`` needs 11 and
        falls back to static below it, and below opset 10 the pass refuses with the reason.
    15. Integer chains (``integer_chains``, default on): between quantized nodes, the ops of
        :data:`CHAIN_COMPUTE_OPS` and :data:`CHAIN_PASS_OPS` whose data inputs are all Q/DQ'd
        get a Q/DQ pair on their output too, so a Conv → SiLU (Sigmoid, Mul) → Conv or a
        MaxPool/Concat/Resize neck stays integer on ONNX Runtime instead of converting to float
        and back around every activation. Only chains that lead to a quantized node's input
        are kept (a detector's decode tail stays float); pass-through ops reuse their input's
        scale. YOLOv8-style detector on ONNX Runtime CPU: see the README's detection table.
    14. Control-flow bodies (If/Loop/Scan): ONNX Runtime cannot expose tensors inside a body
        for calibration, so there a MatMul with a 2-D constant weight is quantized dynamically
        (per-batch activation scale, opset ≥ 11), and a Conv/Gemm (or a MatMul below opset 11)
        gets int8 weight-only storage (DequantizeLinear on the weight; compute stays float:
        a smaller file, no speedup). ``min_macs`` cannot be measured there and is not applied.
        LSTM/GRU/RNN nodes stay float (the standard domain has no quantized recurrent op);
        every such node is logged with its reason.
    """

    name: ClassVar[str] = "quant"
    summary: ClassVar[str] = "int8 QDQ quantization with calibration, accuracy-driven by default"
    exact: ClassVar[bool] = False
    run_after: ClassVar[frozenset[str]] = frozenset({"cleanup", "lowrank", "sparsify"})
    run_before: ClassVar[frozenset[str]] = frozenset({"fp16"})
    order_rank: ClassVar[OrderRank] = OrderRank.ENCODING
    budget: ClassVar[Budget] = Budget(min_cosine=0.99, min_snr_db=15.0)
    options_schema: ClassVar[tuple[Option, ...]] = (
        Option("calibrator", str, "percentile", "activation range calibrator", choices=CALIBRATORS),
        Option(
            "percentile",
            float,
            99.999,
            "percentile for the percentile calibrator",
            minimum=50.0,
            maximum=100.0,
        ),
        Option(
            "backend",
            str,
            "x86",
            "x86: uint8 asymmetric activations; tensorrt: int8 symmetric",
            choices=("x86", "tensorrt"),
        ),
        Option("per_channel", bool, True, "one weight scale per output channel"),
        Option("reduce_range", bool, False, "7-bit weights (for x86 CPUs without VNNI)"),
        Option(
            "op_types",
            list,
            ["MatMul", "Gemm", "Conv"],
            "op types to quantize",
            choices=tuple(PLACEMENT),
        ),
        Option("include", list, [], "only quantize nodes whose names match one of these globs"),
        Option("exclude", list, [], "never quantize nodes whose names match these globs"),
        Option(
            "quantize_act_matmul",
            bool,
            False,
            "also quantize MatMuls of two activations (attention scores)",
        ),
        Option(
            "target_cosine",
            float,
            0.99,
            "accuracy-driven mode: minimum held-aside output cosine (0 turns it off)",
            minimum=0.0,
            maximum=1.0,
        ),
        Option(
            "fallback",
            str,
            "float",
            "accuracy-driven mode: where a harmful MatMul goes first (float, or dynamic per-batch "
            "activation quantization; nodes still harmful then go to float)",
            choices=("float", "dynamic"),
        ),
        Option(
            "mode",
            str,
            "static",
            "activation quantization of MatMuls: static (calibrated) or dynamic (per batch)",
            choices=("static", "dynamic"),
        ),
        Option(
            "weight_bits",
            int,
            8,
            "8: int8 QDQ; 4: int4 block-wise weight-only MatMul (MatMulNBits), activations float",
            choices=("4", "8"),
        ),
        Option(
            "embeddings",
            bool,
            True,
            "store large Gather tables (≥ 64k values, e.g. word embeddings) as int8 with one "
            "scale per row; only the gathered rows are converted back to float",
        ),
        Option(
            "min_macs",
            float,
            1.0e6,
            "skip nodes with fewer multiply-accumulates per sample: their Q/DQ costs more than "
            "the integer kernel saves on ONNX Runtime CPU",
            minimum=0.0,
        ),
        Option(
            "block_size",
            int,
            32,
            "int4 block size along the reduction axis (and the hidden axis of int4 embeddings)",
            choices=("16", "32", "64", "128", "256"),
        ),
        Option(
            "symmetric",
            bool,
            SYMMETRIC_DEFAULT,
            "int4 blocks: symmetric (no zero points); false stores a uint4 zero point per block",
        ),
        Option(
            "search_clip",
            bool,
            True,
            "int4 blocks: also try each block's range shrunk (1.0 down to 0.8) and keep the one "
            "with the lowest squared error",
        ),
        Option(
            "int4_layout",
            str,
            "nbits",
            "int4 MatMuls: nbits (com.microsoft MatMulNBits) or dequantize (standard opset-21 "
            "DequantizeLinear with block_size; smaller file, no speed-up)",
            choices=LAYOUTS,
        ),
        Option(
            "accuracy_level",
            int,
            ACCURACY_LEVEL_DEFAULT,
            "MatMulNBits accuracy_level: 0 unset (fp32 compute), 4 = int8 activations on CPU",
            choices=("0", "1", "2", "3", "4"),
        ),
        Option(
            "rounding",
            str,
            "auto",
            "int4 weights: nearest (round to nearest), gptq (GPTQ on the float model's inputs), "
            "sequential (GPTQ of each layer fitted to the input the layers quantized before it "
            "give it), auto (sequential with real calibration data, else nearest)",
            choices=ROUNDINGS,
        ),
        Option("act_order", bool, True, "gptq/sequential: visit rows by decreasing H diagonal"),
        Option(
            "gptq_damp",
            float,
            0.01,
            "gptq/sequential: damping of H, a fraction of its mean diagonal",
            minimum=1e-6,
            maximum=1.0,
        ),
        Option(
            "embedding_bits",
            int,
            8,
            "large Gather tables: 8 (int8, one scale per row) or 4 (GatherBlockQuantized, "
            "blocks of block_size along the hidden axis)",
            choices=("4", "8"),
        ),
        Option(
            "outlier_threshold",
            float,
            0.0,
            "outlier-channel split: input channels whose calibrated abs-max exceeds this many "
            "times the median go through a small float MatMul (0 = off)",
            minimum=0.0,
        ),
        Option(
            "smooth_outliers",
            bool,
            False,
            "divide the few outlier input channels of each MatMul down to the 99th percentile "
            "of channel maxima (s = max(1, max|X_j| / p99)), folding s into the weights",
        ),
        Option(
            "smooth_alpha",
            float,
            0.0,
            "SmoothQuant migration strength (0 = off)",
            minimum=0.0,
            maximum=1.0,
        ),
        Option(
            "integer_chains",
            bool,
            True,
            "also Q/DQ the Sigmoid/Mul/Add/Concat/MaxPool/Resize… between quantized nodes so "
            "ONNX Runtime keeps them integer (rule 15)",
        ),
    )
    search_space: ClassVar[SearchSpace] = SearchSpace(
        common={"target_cosine": BarCosine()},
        points=(
            SearchPoint(),
            SearchPoint({"target_cosine": BarCosine(slack=0.5)}),
            SearchPoint({"fallback": "dynamic"}),
            SearchPoint({"smooth_outliers": True}),
            *sweep("calibrator", ("entropy", "mse")),
            SearchPoint({"mode": "dynamic"}),
            SearchPoint({"calibrator": "minmax"}),
            SearchPoint({"backend": "tensorrt"}),
        ),
    )
    """``tune``: target_cosine at the bar and halfway to 1 (how many harmful nodes the
    accuracy-driven loop excludes back to float), then one alternative at a time."""

    def required_opset(self) -> int | None:
        """Rule 13: per-axis Q/DQ need 13; per-tensor Q/DQ 10; DynamicQuantizeLinear 11;
        rule 8's blocked int4 DequantizeLinear 21."""
        if self.options["weight_bits"] == 4 and self.options["int4_layout"] == "dequantize":
            return BLOCKED_DQ_OPSET
        if self.options["per_channel"] or self.options["outlier_threshold"] > 0:
            return PER_AXIS_OPSET
        if "dynamic" in (self.options["mode"], self.options["fallback"]):
            return DYNAMIC_OPSET
        return QDQ_OPSET

    def _opset_limits(self, model: Model) -> dict[str, Any]:
        """Rule 13: what the model's opset allows; sets the per-call limits and returns notes."""
        opset = model.opset
        upgrade = model.opset_upgrade
        why = f" ({upgrade.describe()})" if upgrade is not None and not upgrade.converted else ""
        if opset < QDQ_OPSET:
            raise InputError(
                f"quant needs opset ≥ {QDQ_OPSET} for QuantizeLinear/DequantizeLinear; the "
                f"model has opset {opset}{why}"
            )
        self._per_axis = opset >= PER_AXIS_OPSET
        self._dynamic = opset >= DYNAMIC_OPSET
        self._int4_layout = self.options["int4_layout"]
        notes: dict[str, Any] = {}
        if self.options["weight_bits"] == 4 and self._int4_layout == "dequantize":
            if opset < BLOCKED_DQ_OPSET:
                self._int4_layout = "nbits"
                notes["int4_layout"] = f"nbits: opset {opset} has no blocked int4 DQ{why}"
                logger.warning(
                    "quant: int4 as MatMulNBits: opset %d has no blocked int4 DQ%s", opset, why
                )
        if self.options["per_channel"] and not self._per_axis:
            notes["per_tensor_weights"] = f"opset {opset} has no per-axis Q/DQ{why}"
            logger.warning("quant: per-tensor weights: opset %d has no per-axis Q/DQ%s", opset, why)
        if self.options["mode"] == "dynamic" and not self._dynamic:
            notes["static_not_dynamic"] = f"opset {opset} has no DynamicQuantizeLinear{why}"
            logger.warning("quant: static activations: opset %d has no dynamic Q", opset)
        return notes

    def call(self, model: Model, context: PassContext) -> PassResult:
        feeds = context.require_feeds("quant")
        opset_notes = self._opset_limits(model)
        self._int4_blocks: dict[str, BlockQuantized] = {}  # rule 8: _block_key → blocks
        report = QuantReport()
        candidates = self._candidates(model.graph, context, report)
        if not candidates:
            embeddings = (
                self._quantize_embeddings(model.graph, context)
                if self.options["embeddings"]
                else []
            )
            logger.warning("quant: nothing to quantize (%d nodes skipped)", len(report.skipped))
            stats = {"quantized": 0, "embeddings": len(embeddings), **opset_notes}
            if report.skipped:
                stats["skipped"] = count_reasons(report.skipped.values())
            return PassResult(model, bool(embeddings), stats, embeddings)
        candidates = [self._initial_scheme(c) for c in candidates]
        rounding = self._rounding(model, context)
        calibration_feeds, held_aside = _split_feeds(feeds, self._accuracy_driven(feeds))
        if self.options["smooth_alpha"] > 0 or self.options["smooth_outliers"]:
            smoothed = self._smooth(model, candidates, calibration_feeds, context.settings)
            logger.info("quant: smoothing rescaled %d nodes", smoothed)
        stats = collect(
            model,
            calibration_feeds,
            self._requests(model.graph, candidates, gram=rounding == "gptq"),
            on_batch=lambda index: context.report_progress("quant: calibrating", index),
            settings=context.settings,
        )
        candidates = self._large_enough(
            model.graph, candidates, stats, calibration_feeds.count_samples(), report
        )
        ranges = self._ranges(model.graph, candidates, stats, report)
        if self.options["outlier_threshold"] > 0:
            candidates = [self._outlier_split(c, stats) for c in candidates]
        chosen = [c for c in candidates if _has_ranges(c, ranges)]
        self._fit_int4(model, chosen, calibration_feeds, context, rounding, stats)
        if self._accuracy_driven(feeds) and held_aside is not None:
            chosen = self._accuracy_search(model, chosen, ranges, held_aside, report, context)
        self._apply(model.graph, chosen, ranges)
        report.quantized = [c.node.name for c in chosen]
        embeddings = (
            self._quantize_embeddings(model.graph, context) if self.options["embeddings"] else []
        )
        stats_out: dict[str, Any] = {
            "quantized": len(chosen),
            "embeddings": len(embeddings),
            "by_op": count_values(c.node.op for c in chosen),
            "by_scheme": count_values(c.scheme for c in chosen),
            "calibrator": self.options["calibrator"],
            **opset_notes,
        }
        in_bodies = sum(1 for c in chosen if c.body is not None)
        if in_bodies:
            stats_out["in_control_flow_bodies"] = in_bodies
        if report.skipped:
            stats_out["skipped"] = count_reasons(report.skipped.values())
        if report.unquantizable:
            stats_out["unquantizable_tensors"] = len(report.unquantizable)
        if report.dynamic_for_accuracy:
            stats_out["dynamic_for_accuracy"] = sorted(report.dynamic_for_accuracy)
        if report.int8_for_accuracy:
            stats_out["int8_for_accuracy"] = sorted(report.int8_for_accuracy)
        if self.options["weight_bits"] == 4:
            stats_out["precision"] = _precision(candidates, chosen)
        if report.excluded_for_accuracy:
            stats_out["excluded_for_accuracy"] = {
                name: round(harm, 6) for name, harm in report.excluded_for_accuracy.items()
            }
        return PassResult(
            model, bool(chosen or embeddings), stats_out, report.quantized + embeddings
        )

    def _initial_scheme(self, candidate: Candidate) -> Candidate:
        """Rules 8, 9 and 14: int4 weight-only or dynamic MatMuls when the options ask for them;
        in control-flow bodies, dynamic MatMuls and weight-only Conv/Gemm."""
        weight_only = candidate.node.op == "MatMul" and isinstance(candidate.weight, gs.Constant)
        if weight_only and self.options["weight_bits"] == 4:
            return candidate.with_scheme("int4")
        if candidate.body is not None:
            scheme = "dynamic" if weight_only and self._dynamic else "weight-only"
            logger.info(
                "quant: %s (%s) is inside a control-flow body, where activations cannot be "
                "calibrated: %s",
                candidate.node.name,
                candidate.node.op,
                "dynamic per-batch quantization" if scheme == "dynamic" else "int8 weight-only",
            )
            return candidate.with_scheme(scheme)
        if weight_only and self.options["mode"] == "dynamic" and self._dynamic:
            return candidate.with_scheme("dynamic")
        return candidate

    def _outlier_split(self, candidate: Candidate, stats: dict[str, TensorStats]) -> Candidate:
        """Rule 10: find the few input channels with extreme ranges."""
        if not _splittable(candidate):
            return candidate
        channel_max = stats[candidate.activation.name].channel_absmax
        if channel_max is None or channel_max.size < 8:
            return candidate
        threshold = self.options["outlier_threshold"] * float(np.median(channel_max))
        outliers = np.nonzero(channel_max > threshold)[0]
        if outliers.size == 0 or outliers.size > channel_max.size // 10:
            if outliers.size:
                logger.info(
                    "quant: not splitting %s: %d of %d channels are outliers",
                    candidate.node.name,
                    outliers.size,
                    channel_max.size,
                )
            return candidate
        inliers = np.setdiff1d(np.arange(channel_max.size), outliers)
        bound = float(channel_max[inliers].max())
        tensor = stats[candidate.activation.name]
        inlier_range = (max(tensor.minimum, -bound), min(tensor.maximum, bound))
        logger.info(
            "quant: %s: %d outlier channels go through a float MatMul",
            candidate.node.name,
            outliers.size,
        )
        return replace(
            candidate, scheme="split", outliers=outliers.astype(np.int64), inlier_range=inlier_range
        )

    def _quantize_embeddings(self, graph: gs.Graph, context: PassContext) -> list[str]:
        """Rule 12; returns the names of the rewritten Gather nodes."""
        namer = Namer(*iter_graphs(graph))
        done: list[str] = []
        tables: dict[int, tuple[gs.Constant, gs.Constant]] = {}
        blocked: dict[int, list[gs.Constant]] = {}
        for node in list(graph.nodes):
            if node.op != "Gather" or len(node.inputs) < 2 or not context.in_scope(node.name):
                continue
            table = node.inputs[0]
            if not isinstance(table, gs.Constant) or table.dtype != np.float32:
                continue
            if len(table.shape) != 2 or int(np.prod(table.shape)) < EMBEDDING_MIN_VALUES:
                continue
            if int(node.attrs.get("axis", 0)) != 0 or matches_any(
                node.name, self.options["exclude"]
            ):
                continue
            if self.options["embedding_bits"] == 4:
                if id(table) not in blocked:
                    blocked[id(table)] = gather_block_constants(
                        namer,
                        table.name,
                        weights.read(table),
                        self._int4_format(),
                        search_clip=self.options["search_clip"],
                    )
                write_gather_block_quantized(
                    graph, namer, node, blocked[id(table)], self._int4_format()
                )
                done.append(node.name)
                continue
            if id(table) not in tables:
                quantized, params = quantize_weight(weights.read(table), 0)
                tables[id(table)] = (
                    gs.Constant(namer(f"{table.name}_quantized"), quantized),
                    gs.Constant(namer(f"{table.name}_row_scale"), params.scale.reshape(-1, 1)),
                )
            int_table, row_scales = tables[id(table)]
            indices, output = node.inputs[1], _detach(node)
            base = node.name or output.name
            rows = _variable(namer, f"{base}_rows", np.int8)
            scales = _variable(namer, f"{base}_row_scales", np.float32)
            graph.nodes.extend(
                [
                    gs.Node(
                        "Gather",
                        name=namer(f"{base}_GatherInt8"),
                        attrs={"axis": 0},
                        inputs=[int_table, indices],
                        outputs=[rows],
                    ),
                    gs.Node(
                        "Gather",
                        name=namer(f"{base}_GatherScale"),
                        attrs={"axis": 0},
                        inputs=[row_scales, indices],
                        outputs=[scales],
                    ),
                    *_rescaled(namer, base, rows, scales, output),
                ]
            )
            done.append(node.name)
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
        return done

    # --- rule 1 -------------------------------------------------------------------------------

    def _candidates(
        self, graph: gs.Graph, context: PassContext, report: QuantReport
    ) -> list[Candidate]:
        """Rules 1 and 14: candidates of the main graph and of every control-flow body."""
        candidates: list[Candidate] = []
        op_types = set(self.options["op_types"])
        per_channel = self.options["per_channel"] and self._per_axis
        for sub in iter_graphs(graph):
            body = None if sub is graph else sub
            for node in sub.nodes:
                if node.op in RECURRENT_OPS:
                    reason = "recurrent op: the standard domain has no quantized LSTM/GRU/RNN"
                    report.skipped[node.name] = reason
                    logger.info("quant: skipping %s (%s): %s", node.name, node.op, reason)
                    continue
                if node.op not in PLACEMENT:
                    continue
                reason = self._skip_reason(node, op_types, context, body is not None)
                if reason is not None:
                    report.skipped[node.name] = reason
                    logger.info("quant: skipping %s (%s): %s", node.name, node.op, reason)
                    continue
                placement = PLACEMENT[node.op]
                weight = node.inputs[placement.weight_input]
                candidate = Candidate(
                    node=node,
                    placement=placement,
                    weight=weight,
                    weight_axis=_weight_axis(node, per_channel),
                    activation=node.inputs[0],
                    body=body,
                )
                candidates.append(candidate)
        return candidates

    def _skip_reason(
        self, node: gs.Node, op_types: set[str], context: PassContext, in_body: bool
    ) -> str | None:
        if node.op not in op_types:
            return "op type not requested"
        if not context.in_scope(node.name):
            return "outside the bisection scope"
        if self.options["include"] and not matches_any(node.name, self.options["include"]):
            return "not matched by include"
        if matches_any(node.name, self.options["exclude"]):
            return "excluded by option"
        placement = PLACEMENT[node.op]
        if len(node.inputs) <= placement.weight_input:
            return "no weight input"
        weight = node.inputs[placement.weight_input]
        if not isinstance(weight, gs.Constant):
            if node.op != "MatMul":
                return "weight is not a constant"
            if in_body:
                return "activation × activation MatMul inside a control-flow body (no calibration)"
            if not self.options["quantize_act_matmul"]:
                return "activation × activation MatMul"
            if weight.dtype is not None and weight.dtype != np.float32:
                return f"second input dtype {weight.dtype} is not float32"
        elif weight.dtype != np.float32:
            return f"weight dtype {weight.dtype} is not float32"
        if node.op == "MatMul" and isinstance(weight, gs.Constant) and len(weight.shape) != 2:
            return f"weight of rank {len(weight.shape)} (only 2-D weights have integer kernels)"
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return "Gemm with transA"
        activation = node.inputs[0]
        if activation.dtype is not None and activation.dtype != np.float32:
            return f"activation dtype {activation.dtype} is not float32"
        return None

    # --- rule 3 -------------------------------------------------------------------------------

    def _requests(
        self, graph: gs.Graph, candidates: list[Candidate], *, gram: bool = False
    ) -> list[StatRequest]:
        """What one calibration run collects; ``gram``: also XᵀX of int4 inputs (rule 8)."""
        histogram = self.options["calibrator"] != "minmax"
        split = self.options["outlier_threshold"] > 0
        candidates = [c for c in candidates if c.body is None]  # rule 14: bodies are not seen
        requests = [
            StatRequest(
                t.name,
                histogram=histogram,
                channel_absmax=split and t is c.activation and _splittable(c),
            )
            for c in candidates
            for t in c.activations
        ]
        requests += [  # sizes for rule 11; XᵀX for rule 8's rounding=gptq
            StatRequest(c.activation.name, gram=gram and c.scheme == "int4") for c in candidates
        ]
        for candidate in candidates:
            output = _conv_output_tensor(candidate)
            if output is not None:
                requests.append(StatRequest(output.name, histogram=histogram))
        if self.options["integer_chains"]:
            requests += [
                StatRequest(tensor.name, histogram=histogram)
                for tensor, source in integer_chain(graph, candidates)
                if source is None  # pass-through outputs reuse their source's range
            ]
        return requests

    def _large_enough(
        self,
        graph: gs.Graph,
        candidates: list[Candidate],
        stats: dict[str, TensorStats],
        samples: int,
        report: QuantReport,
    ) -> list[Candidate]:
        """Rule 11: skip nodes too small for an integer kernel to pay for its Q/DQ, unless
        (with integer chains) their input is already integer: then int8 costs no conversion."""
        small: dict[int, float] = {}
        for candidate in candidates:
            macs = _macs_per_sample(candidate, stats, samples)
            if macs is not None and macs < self.options["min_macs"]:
                small[id(candidate)] = macs
        kept = [c for c in candidates if id(c) not in small]
        if self.options["integer_chains"]:
            added = True
            while added:
                region = integer_region(graph, kept)
                joining = [
                    c
                    for c in candidates
                    if id(c) in small and c not in kept and id(c.activation) in region
                ]
                kept += joining
                added = bool(joining)
        for candidate in candidates:
            if candidate in kept:
                continue
            macs = small[id(candidate)]
            reason = f"too small to gain from int8 ({macs:,.0f} MACs per sample)"
            report.skipped[candidate.node.name] = reason
            logger.info("quant: skipping %s: %s", candidate.node.name, reason)
        order = {id(c): index for index, c in enumerate(candidates)}
        return sorted(kept, key=lambda c: order[id(c)])

    def _ranges(
        self,
        graph: gs.Graph,
        candidates: list[Candidate],
        stats: dict[str, TensorStats],
        report: QuantReport,
    ) -> dict[str, tuple[float, float]]:
        symmetric = self.options["backend"] == "tensorrt"
        ranges: dict[str, tuple[float, float]] = {}
        names = {t.name for c in candidates for t in c.activations}
        names |= {t.name for c in candidates if (t := _conv_output_tensor(c)) is not None}
        chain = integer_chain(graph, candidates) if self.options["integer_chains"] else []
        names |= {tensor.name for tensor, source in chain if source is None}
        for name in sorted(names):
            tensor_stats = stats[name]
            reason = tensor_stats.unquantizable_reason
            if reason is not None:
                report.unquantizable[name] = reason
                logger.info("quant: not quantizing tensor %s: %s", name, reason)
                continue
            ranges[name] = calibrated_range(
                tensor_stats,
                self.options["calibrator"],
                symmetric=symmetric,
                percentile=self.options["percentile"],
            )
        for tensor, source in chain:  # rule 15: pass-through outputs share their input's scale
            if source is not None and source.name in ranges:
                ranges[tensor.name] = ranges[source.name]
        return ranges

    # --- rule 2 -------------------------------------------------------------------------------

    def _apply(
        self, graph: gs.Graph, chosen: list[Candidate], ranges: dict[str, tuple[float, float]]
    ) -> None:
        namer = Namer(*iter_graphs(graph))
        symmetric = self.options["backend"] == "tensorrt"
        dequantized: dict[int, gs.Variable] = {}
        main = graph
        chain = integer_chain(main, chosen, ranges) if self.options["integer_chains"] else []
        for candidate in chosen:
            node = candidate.node
            graph = candidate.body or main
            if candidate.scheme == "dynamic":
                _apply_dynamic(graph, namer, candidate, self.options["reduce_range"])
                continue
            if candidate.scheme in ("int4", "int8-blocks"):
                self._apply_int4(graph, namer, candidate)
                continue
            if candidate.scheme == "split":
                _apply_split(
                    graph, namer, candidate, symmetric, self.options["reduce_range"], self._per_axis
                )
                continue
            if candidate.scheme == "weight-only":
                quantized, weight_params = quantize_weight(
                    weights.read(candidate.weight),
                    candidate.weight_axis,
                    reduce_range=self.options["reduce_range"],
                )
                node.inputs[candidate.placement.weight_input] = dequantize_node(
                    graph, namer, candidate.weight.name, quantized, weight_params
                )
                continue
            for tensor in candidate.activations:
                if id(tensor) not in dequantized:
                    tensor_params = activation_params(*ranges[tensor.name], symmetric=symmetric)
                    dequantized[id(tensor)] = fake_quantize(graph, namer, tensor, tensor_params)
                replace_input(node, tensor, dequantized[id(tensor)])
            weight = candidate.weight
            if not isinstance(weight, gs.Constant):
                continue
            params = activation_params(*ranges[candidate.activation.name], symmetric=symmetric)
            quantized, weight_params = quantize_weight(
                weights.read(weight),
                candidate.weight_axis,
                reduce_range=self.options["reduce_range"],
            )
            weight_output = dequantize_node(graph, namer, weight.name, quantized, weight_params)
            node.inputs[candidate.placement.weight_input] = weight_output
            self._quantize_bias(graph, namer, candidate, params, weight_params)
            output = _conv_output_tensor(candidate)
            if output is not None:
                out_params = activation_params(*ranges[output.name], symmetric=symmetric)
                readers = list(output.outputs)
                fake = fake_quantize(graph, namer, output, out_params)
                dequantized[id(output)] = fake
                for reader in readers:
                    replace_input(reader, output, fake)
                if output in graph.outputs:
                    logger.debug(
                        "quant: %s is a graph output; its Q/DQ only feeds readers", output.name
                    )
        self._apply_chain(main, namer, chain, ranges, dequantized)
        main.cleanup(remove_unused_graph_inputs=False)
        main.toposort()

    def _rounding(self, model: Model, context: PassContext) -> str:
        """Rule 8: how int4 weights are rounded (``auto`` follows the data and the size)."""
        rounding = self.options["rounding"]
        if self.options["weight_bits"] != 4:
            return "nearest"  # int8 weights are rounded to nearest whatever it says
        if rounding != "auto":
            return rounding
        if not context.has_real_data:
            return "nearest"
        if model.weight_bytes() > SEQUENTIAL_AUTO_MAX_BYTES:
            logger.info(
                "quant: rounding=auto rounds int4 to nearest on a model of %.1f GB (the "
                "sequential fit is not yet within the memory bound there; ask for it with "
                "rounding=sequential)",
                model.weight_bytes() / 1e9,
            )
            return "nearest"
        return "sequential"

    def _fit_int4(
        self,
        model: Model,
        candidates: list[Candidate],
        feeds: Feeds,
        context: PassContext,
        rounding: str,
        stats: dict[str, TensorStats],
    ) -> None:
        """Rule 8: GPTQ int4 weights for every int4 candidate, before any variant is built.

        ``gptq`` uses H = XᵀX of the float model's inputs, from ``stats`` (the pass's one
        calibration run). ``sequential`` quantizes a copy of the model stage by stage with the
        reconstruction engine (:mod:`graphopt.passkit.reconstruct`): each layer's GPTQ runs on
        its fit target W* (the engine's rule 5) with H = X̃ᵀX̃ of the input the layers quantized
        before it give it. The accuracy search and the final model then use these weights as
        they are.
        """
        int4 = [c for c in candidates if c.scheme == "int4" and c.body is None]
        if rounding == "nearest" or not int4:
            return
        if rounding == "gptq":
            for candidate in int4:
                measured = stats[candidate.activation.name]
                assert measured.gram is not None  # requested above
                if self._enough_rows(candidate, measured.rows):
                    self._store_gptq(candidate, weights.read(candidate.weight), measured.gram)
            return
        scratch = replace(model, graph=model.graph.copy())
        scratch.graph.toposort()
        mapping = _node_map(scratch.graph)
        on_scratch = {c.node.name: _rebind(c, mapping) for c in int4}
        layers = [
            Layer(
                name,
                (LayerInput(c.activation.name),),
                (c.node,),
                int(weights.shape(c.weight)[0]),
            )
            for name, c in on_scratch.items()
        ]
        namer = Namer(*iter_graphs(scratch.graph))
        budget = gram_budget(model, context.settings)
        with Reconstruction(
            scratch,
            feeds,
            settings=context.settings,
            label="quant",
            on_batch=lambda index: context.report_progress("quant: fitting int4", index),
        ) as engine:
            for stage in stages(scratch.graph, layers):
                for chunk in chunk_by_budget(stage, layer_bytes, budget):
                    fits = engine.measure(chunk)
                    for layer in chunk:
                        candidate = on_scratch[layer.key]
                        fit = fits[layer.key]
                        if not self._enough_rows(candidate, fit.rows):
                            continue
                        weight = weights.read(candidate.weight)
                        target = fit.target(weight, self.options["gptq_damp"])
                        self._store_gptq(candidate, target, fit.hessian)
                    del fits
                for layer in stage:
                    candidate = on_scratch[layer.key]
                    if _block_key(candidate, 4) in self._int4_blocks:
                        write_block_quantized(
                            scratch.graph,
                            namer,
                            candidate.node,
                            self._int4_blocks[_block_key(candidate, 4)],
                            self._int4_layout,
                            self.options["accuracy_level"],
                        )
                scratch.graph.cleanup(remove_unused_graph_inputs=False)
                scratch.graph.toposort()
            runs = engine.runs
        logger.info(
            "quant: int4 weights of %d MatMuls fitted sequentially in %d runs", len(int4), runs
        )

    @staticmethod
    def _enough_rows(candidate: Candidate, rows: int) -> bool:
        """Rule 8: GPTQ needs :data:`GPTQ_ROWS_PER_INPUT` calibration rows per input channel;
        with fewer, H is (nearly) singular and the fit follows noise, so the node stays RTN."""
        channels = int(weights.shape(candidate.weight)[0])
        if rows >= GPTQ_ROWS_PER_INPUT * channels:
            return True
        logger.info(
            "quant: %s keeps round-to-nearest int4: %d calibration rows for %d input channels "
            "(GPTQ needs %d per channel)",
            candidate.node.name,
            rows,
            channels,
            GPTQ_ROWS_PER_INPUT,
        )
        return False

    def _store_gptq(self, candidate: Candidate, weight: np.ndarray, hessian: np.ndarray) -> None:
        """Rule 8: GPTQ of one candidate's [K, N] weight; the node stays RTN when H is unusable."""
        try:
            self._int4_blocks[_block_key(candidate, 4)] = gptq(
                weight,
                hessian,
                self._int4_format(),
                act_order=self.options["act_order"],
                damp=self.options["gptq_damp"],
                search_clip=self.options["search_clip"],
            )
        except np.linalg.LinAlgError as error:
            logger.info("quant: %s keeps round-to-nearest int4: %s", candidate.node.name, error)

    def _int4_format(self) -> BlockFormat:
        return BlockFormat(4, self.options["block_size"], self.options["symmetric"])

    def _apply_int4(self, graph: gs.Graph, namer: Namer, candidate: Candidate) -> None:
        """Rule 8: MatMul → the int4 (or, scheme ``int8-blocks``, int8) layout, quantized once
        per node for all variants."""
        bits = 8 if candidate.scheme == "int8-blocks" else 4
        key = _block_key(candidate, bits)
        if key not in self._int4_blocks:
            fmt = BlockFormat(bits, self.options["block_size"], self.options["symmetric"])
            self._int4_blocks[key] = quantize_rtn(
                weights.read(candidate.weight), fmt, search_clip=self.options["search_clip"]
            )
        write_block_quantized(
            graph,
            namer,
            candidate.node,
            self._int4_blocks[key],
            self._int4_layout,
            self.options["accuracy_level"],
        )

    def _apply_chain(
        self,
        graph: gs.Graph,
        namer: Namer,
        chain: list[tuple[gs.Tensor, gs.Tensor | None]],
        ranges: dict[str, tuple[float, float]],
        dequantized: dict[int, gs.Variable],
    ) -> None:
        """Rule 15: Q/DQ on the data inputs and the output of every chain node (the chain was
        found before the candidates' own Q/DQ went in)."""
        symmetric = self.options["backend"] == "tensorrt"
        dequantized_sides = {id(v) for v in dequantized.values()}

        def dequantized_of(tensor: gs.Tensor) -> gs.Variable:
            if id(tensor) not in dequantized:
                params = activation_params(*ranges[tensor.name], symmetric=symmetric)
                dequantized[id(tensor)] = fake_quantize(graph, namer, tensor, params)
                dequantized_sides.add(id(dequantized[id(tensor)]))
            return dequantized[id(tensor)]

        for tensor, _source in chain:
            node = tensor.inputs[0]
            for data in list(_data_inputs(node)):
                if id(data) in dequantized_sides:
                    continue  # already the dequantized side (a Conv output's readers)
                replace_input(node, data, dequantized_of(data))
            readers = [r for r in tensor.outputs if r.op != "QuantizeLinear"]
            dequantized_of(tensor)
            # every reader takes the dequantized side (a Shape too), so the chain node's
            # only consumer is its QuantizeLinear and ONNX Runtime can fuse it
            for reader in readers:
                replace_input(reader, tensor, dequantized[id(tensor)])

    def _quantize_bias(
        self,
        graph: gs.Graph,
        namer: Namer,
        candidate: Candidate,
        activation: QuantParams,
        weight: QuantParams,
    ) -> None:
        index = candidate.placement.bias_input
        node = candidate.node
        if index is None or len(node.inputs) <= index:
            return
        bias = node.inputs[index]
        if not isinstance(bias, gs.Constant) or bias.dtype != np.float32 or len(bias.shape) != 1:
            return
        if node.op == "Gemm" and (
            float(node.attrs.get("alpha", 1.0)) != 1.0 or float(node.attrs.get("beta", 1.0)) != 1.0
        ):
            return
        quantized, params = quantize_bias(weights.read(bias), float(activation.scale), weight.scale)
        node.inputs[index] = dequantize_node(graph, namer, bias.name, quantized, params)

    # --- rule 5 -------------------------------------------------------------------------------

    def _accuracy_driven(self, feeds: Feeds) -> bool:
        return self.options["target_cosine"] > 0 and not feeds.synthetic

    def _accuracy_search(
        self,
        model: Model,
        chosen: list[Candidate],
        ranges: dict[str, tuple[float, float]],
        held_aside: Feeds,
        report: QuantReport,
        context: PassContext,
    ) -> list[Candidate]:
        started = time.perf_counter()
        settings = context.settings
        with _Evaluator(
            model, held_aside, settings.threads, settings.probe_cache_bytes
        ) as evaluator:
            kept = self._search(evaluator, chosen, ranges, report, context)
            logger.info(
                "quant: accuracy loop took %.1f s: %s",
                time.perf_counter() - started,
                evaluator.runner.stats.describe(),
            )
        return kept

    def _search(
        self,
        evaluator: _Evaluator,
        chosen: list[Candidate],
        ranges: dict[str, tuple[float, float]],
        report: QuantReport,
        context: PassContext,
    ) -> list[Candidate]:
        target = self.options["target_cosine"]
        score = evaluator.score(self, chosen, ranges)
        logger.info(
            "quant: held-aside cosine with all %d nodes quantized: %.6f", len(chosen), score
        )
        if score >= target:
            return chosen
        evaluator.prepare(self, [[candidate] for candidate in chosen], ranges)
        harm = {}
        for index, candidate in enumerate(chosen):
            harm[candidate.node.name] = 1.0 - evaluator.score(self, [candidate], ranges)
            context.report_progress("quant: each node's accuracy cost", index, len(chosen))
        remaining = sorted(chosen, key=lambda c: harm[c.node.name])
        demoted: list[Candidate] = []
        while remaining and score < target:
            worst = remaining.pop()
            name = worst.node.name
            context.report_progress(
                "quant: nodes back to float", len(chosen) - len(remaining) - 1, len(chosen)
            )
            if worst.scheme == "int4":  # rule 8: int8 blocks before float
                trial = evaluator.score(
                    self, [*remaining, *demoted, worst.with_scheme("int8-blocks")], ranges
                )
                if trial > score:
                    demoted.append(worst.with_scheme("int8-blocks"))
                    report.int8_for_accuracy[name] = harm[name]
                    logger.info("quant: %s to int8 blocks (cosine %.6f → %.6f)", name, score, trial)
                    score = trial
                    continue
            if self.options["fallback"] == "dynamic" and _can_be_dynamic(worst):
                trial = evaluator.score(
                    self, [*remaining, *demoted, worst.with_scheme("dynamic")], ranges
                )
                if trial > score:
                    demoted.append(worst.with_scheme("dynamic"))
                    report.dynamic_for_accuracy[name] = harm[name]
                    logger.info(
                        "quant: %s to dynamic quantization (cosine %.6f → %.6f)", name, score, trial
                    )
                    score = trial
                    continue
            report.excluded_for_accuracy[name] = harm[name]
            logger.info("quant: %s back to float (alone it costs %.6f cosine)", name, harm[name])
            score = evaluator.score(self, remaining + demoted, ranges)
        remaining += demoted
        logger.info("quant: held-aside cosine %.6f with %d nodes quantized", score, len(remaining))
        order = {id(c.node): index for index, c in enumerate(chosen)}
        return sorted(remaining, key=lambda c: order[id(c.node)])

    # --- rule 6 -------------------------------------------------------------------------------

    def _smooth(
        self, model: Model, candidates: list[Candidate], feeds: Feeds, settings: Settings
    ) -> int:
        eligible = [
            c
            for c in candidates
            if c.node.op in ("MatMul", "Gemm")
            and c.body is None
            and c.scheme in ("static", "dynamic")
            and isinstance(c.weight, gs.Constant)
            and not _weighted(c.node).weight_transposed
        ]
        requests = [
            StatRequest(c.activation.name, minmax=False, channel_absmax=True) for c in eligible
        ]
        stats = collect(model, feeds, requests, settings=settings)
        by_activation: dict[int, list[Candidate]] = {}
        for candidate in eligible:
            by_activation.setdefault(id(candidate.activation), []).append(candidate)
        alpha = self.options["smooth_alpha"]
        namer = Namer(model.graph)
        smoothed = 0
        for group in by_activation.values():
            activation = group[0].activation
            x_max = stats[activation.name].channel_absmax
            if x_max is None:
                continue
            if alpha > 0:
                w_max = np.max([np.abs(weights.read(c.weight)).max(axis=1) for c in group], axis=0)
                scales = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(
                    np.maximum(w_max, 1e-5), 1 - alpha
                )
                scales = np.clip(scales, 1e-4, 1e4).astype(np.float32)
            else:
                scales = outlier_scales(x_max)
                if not (scales > 1).any():
                    continue
            for candidate in group:
                candidate.weight = gs.Constant(
                    namer(f"{candidate.weight.name}_smoothed"),
                    (weights.read(candidate.weight) * scales[:, None]).astype(np.float32),
                )
                candidate.node.inputs[candidate.placement.weight_input] = candidate.weight
            new_activation = _divide_activation(model.graph, namer, activation, group, scales)
            for candidate in group:
                replace_input(candidate.node, activation, new_activation)
                candidate.activation = new_activation
            smoothed += len(group)
        return smoothed


def outlier_scales(channel_max: np.ndarray, quantile: float = 0.99) -> np.ndarray:
    """Rule 6: s_j = max(1, max|X_j| / q), q the 99th percentile of the channel maxima."""
    reference = float(np.quantile(channel_max, quantile))
    if reference <= 0:
        return np.ones_like(channel_max, dtype=np.float32)
    return np.maximum(channel_max / reference, 1.0).astype(np.float32)


def _block_key(candidate: Candidate, bits: int) -> str:
    """Rule 8: where a node's quantized blocks of ``bits`` are kept during one call."""
    return f"{candidate.node.name}/{bits}"


def _precision(candidates: list[Candidate], chosen: list[Candidate]) -> dict[str, str]:
    """Rule 8: each int4 candidate's final weights (int4, int8 or float), by node name."""
    final = {c.node.name: c.scheme for c in chosen}
    names = {"int4": "int4", "int8-blocks": "int8"}
    return {
        c.node.name: names.get(final.get(c.node.name, ""), "float")
        for c in candidates
        if c.scheme == "int4"
    }


def _detach(node: gs.Node) -> gs.Tensor:
    """Disconnect a node that is being replaced; returns the output its replacement must write."""
    output = node.outputs[0]
    node.inputs.clear()
    node.outputs.clear()
    return output


def _variable(namer: Namer, base: str, dtype: Any, shape: Any = None) -> gs.Variable:
    return gs.Variable(namer(base), dtype=dtype, shape=shape)


def _rescaled(
    namer: Namer, base: str, integer: gs.Tensor, scale: gs.Tensor, output: gs.Tensor
) -> list[gs.Node]:
    """Cast(integer → float) then Mul by ``scale``, writing ``output``."""
    as_float = _variable(namer, f"{base}_float", np.float32)
    return [
        gs.Node(
            "Cast",
            name=namer(f"{base}_Cast"),
            attrs={"to": 1},
            inputs=[integer],
            outputs=[as_float],
        ),
        gs.Node("Mul", name=namer(f"{base}_Rescale"), inputs=[as_float, scale], outputs=[output]),
    ]


def _apply_dynamic(graph: gs.Graph, namer: Namer, candidate: Candidate, reduce_range: bool) -> None:
    """Rule 9: DynamicQuantizeLinear → MatMulInteger → Cast → Mul (ORT: DynamicQuantizeMatMul)."""
    node, activation = candidate.node, candidate.activation
    quantized, params = quantize_weight(
        weights.read(candidate.weight), 1, reduce_range=reduce_range
    )
    output = _detach(node)
    base = node.name or output.name
    x_q = _variable(namer, f"{base}_x_quantized", np.uint8)
    x_scale = _variable(namer, f"{base}_x_scale", np.float32, [])
    x_zero = _variable(namer, f"{base}_x_zero_point", np.uint8, [])
    integer = _variable(namer, f"{base}_integer", np.int32)
    scale = _variable(namer, f"{base}_scale", np.float32)
    weight = gs.Constant(namer(f"{candidate.weight.name}_quantized"), quantized)
    weight_zero = gs.Constant(namer(f"{candidate.weight.name}_zero_point"), params.zero_point)
    weight_scale = gs.Constant(namer(f"{candidate.weight.name}_scale"), params.scale)
    graph.nodes.extend(
        [
            gs.Node(
                "DynamicQuantizeLinear",
                name=namer(f"{base}_DynamicQuantize"),
                inputs=[activation],
                outputs=[x_q, x_scale, x_zero],
            ),
            gs.Node(
                "MatMulInteger",
                name=namer(f"{base}_MatMulInteger"),
                inputs=[x_q, weight, x_zero, weight_zero],
                outputs=[integer],
            ),
            gs.Node(
                "Mul",
                name=namer(f"{base}_ScaleMul"),
                inputs=[x_scale, weight_scale],
                outputs=[scale],
            ),
            *_rescaled(namer, base, integer, scale, output),
        ]
    )


def pack_int4_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rule 8: symmetric int4 blocks along K of a [K, N] weight, in MatMulNBits' layout.

    Returns packed uint8 [N, blocks, block_size / 2] (value + 8, low nibble first) and float32
    scales [N · blocks]; dequantized value = (nibble − 8) · scale. K is padded to whole blocks.
    """
    quantized = quantize_rtn(weight, BlockFormat(4, block_size, True))
    packed, scales, _ = nbits_arrays(quantized)
    return packed, scales


def unpack_int4_blocks(
    packed: np.ndarray, scales: np.ndarray, rows: int, zero_points: np.ndarray | None = None
) -> np.ndarray:
    """The [K, N] float weight that MatMulNBits' 4-bit B, scales and optional packed zero
    points encode (for tests and checks)."""
    columns, blocks, half = packed.shape
    nibbles = np.empty((columns, blocks, half * 2), np.float32)
    nibbles[:, :, 0::2] = packed & 0x0F
    nibbles[:, :, 1::2] = packed >> 4
    zeros = np.full((columns, blocks), 8.0, np.float32)
    if zero_points is not None:
        pairs = zero_points.reshape(columns, -1)
        both = np.stack([pairs & 0x0F, pairs >> 4], axis=2).reshape(columns, -1)
        zeros = both[:, :blocks].astype(np.float32)
    values = (nibbles - zeros[:, :, None]) * scales.reshape(columns, blocks)[:, :, None]
    return values.reshape(columns, -1).T[:rows]


def _apply_split(
    graph: gs.Graph,
    namer: Namer,
    candidate: Candidate,
    symmetric: bool,
    reduce_range: bool,
    per_axis: bool,
) -> None:
    """Rule 10: Y = Q(X[:, in]) · Q(W[in]) + X[:, out] · W[out]."""
    assert candidate.outliers is not None and candidate.inlier_range is not None
    node, activation = candidate.node, candidate.activation
    weight = weights.read(candidate.weight)
    outliers = candidate.outliers
    inliers = np.setdiff1d(np.arange(weight.shape[0]), outliers).astype(np.int64)
    output = _detach(node)
    base = node.name or output.name
    parts = []
    for label, channels in (("inliers", inliers), ("outliers", outliers)):
        gathered = _variable(namer, f"{base}_{label}", np.float32)
        graph.nodes.append(
            gs.Node(
                "Gather",
                name=namer(f"{base}_Gather_{label}"),
                attrs={"axis": -1},
                inputs=[activation, gs.Constant(namer(f"{base}_{label}_index"), channels)],
                outputs=[gathered],
            )
        )
        part = _variable(namer, f"{base}_{label}_product", np.float32)
        rows = weight[channels]
        if label == "inliers":
            params = activation_params(*candidate.inlier_range, symmetric=symmetric)
            gathered = fake_quantize(graph, namer, gathered, params)
            axis = 1 if per_axis else None
            quantized, weight_params = quantize_weight(rows, axis, reduce_range=reduce_range)
            right: gs.Tensor = dequantize_node(
                graph, namer, f"{base}_{label}_weight", quantized, weight_params
            )
        else:
            right = gs.Constant(namer(f"{base}_{label}_weight"), rows.astype(np.float32))
        graph.nodes.append(
            gs.Node(
                "MatMul",
                name=namer(f"{base}_MatMul_{label}"),
                inputs=[gathered, right],
                outputs=[part],
            )
        )
        parts.append(part)
    graph.nodes.append(
        gs.Node("Add", name=namer(f"{base}_SplitAdd"), inputs=parts, outputs=[output])
    )


def _layer_norm_producer(activation: gs.Tensor) -> gs.Node | None:
    """The LayerNormalization (last axis, constant scale and bias) producing ``activation``."""
    if len(activation.inputs) != 1:
        return None
    producer = activation.inputs[0]
    if (
        producer.op == "LayerNormalization"
        and len(producer.outputs) == 1
        and all(isinstance(t, gs.Constant) for t in producer.inputs[1:3])
        and int(producer.attrs.get("axis", -1)) == -1
    ):
        return producer
    return None


def _divide_activation(
    graph: gs.Graph,
    namer: Namer,
    activation: gs.Tensor,
    group: list[Candidate],
    scales: np.ndarray,
) -> gs.Tensor:
    """X / s: folded into the LayerNormalization that produces X when there is one (into a copy
    of it that feeds only the group, when others read X too), else an inserted Mul."""
    producer = _layer_norm_producer(activation)
    readers = {id(r) for r in activation.outputs}
    group_nodes = {id(c.node) for c in group}
    if producer is not None:
        scaled = [producer.inputs[0]]
        for index in (1, 2):
            if len(producer.inputs) > index:
                old = producer.inputs[index]
                scaled.append(
                    gs.Constant(
                        namer(f"{old.name}_smoothed"),
                        (weights.read(old) / scales).astype(np.float32),
                    )
                )
        if readers <= group_nodes and activation not in graph.outputs:
            for index, tensor in enumerate(scaled[1:], start=1):
                producer.inputs[index] = tensor
            return activation
        copy = gs.Variable(
            namer(f"{activation.name}_smoothed"), dtype=np.float32, shape=activation.shape
        )
        graph.nodes.append(
            gs.Node(
                "LayerNormalization",
                name=namer(f"{producer.name}_smoothed"),
                attrs=dict(producer.attrs),
                inputs=scaled,
                outputs=[copy],
            )
        )
        return copy
    inverse = gs.Constant(
        namer(f"{activation.name}_smooth_inverse"), (1.0 / scales).astype(np.float32)
    )
    output = gs.Variable(
        namer(f"{activation.name}_smoothed"), dtype=np.float32, shape=activation.shape
    )
    graph.nodes.append(
        gs.Node(
            "Mul",
            name=namer(f"{activation.name}_SmoothMul"),
            inputs=[activation, inverse],
            outputs=[output],
        )
    )
    return output


class _Evaluator:
    """Held-aside cosine of a quantization plan against the float model (rule 5), scored by
    :class:`graphopt.check.heldout.HeldAsideScore` (exact, probes run where plans differ)."""

    def __init__(
        self, model: Model, feeds: Feeds, threads: int = 0, budget_bytes: int | None = None
    ) -> None:
        self.model = model
        self.scorer = HeldAsideScore(model, feeds, threads, budget_bytes)
        self.runner = self.scorer.runner

    def __enter__(self) -> _Evaluator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.scorer.close()

    def variant(
        self, quant: QuantPass, plan: list[Candidate], ranges: dict[str, tuple[float, float]]
    ) -> Model:
        """A copy of the model with ``plan`` quantized (sorted, as :meth:`QuantPass._apply`
        leaves it)."""
        variant = replace(self.model, graph=self.model.graph.copy())
        mapping = _node_map(variant.graph)
        quant._apply(variant.graph, [_rebind(c, mapping) for c in plan], ranges)
        return variant

    def prepare(
        self,
        quant: QuantPass,
        plans: list[list[Candidate]],
        ranges: dict[str, tuple[float, float]],
    ) -> None:
        """Cache the float activations the plans' variants read at their boundaries."""
        self.scorer.prepare(self.variant(quant, plan, ranges).graph for plan in plans)

    def score(
        self, quant: QuantPass, plan: list[Candidate], ranges: dict[str, tuple[float, float]]
    ) -> float:
        """The gate's figure with ``plan`` quantized (:meth:`HeldAsideScore.score`)."""
        return self.scorer.score(self.variant(quant, plan, ranges))


def _node_map(graph: gs.Graph) -> dict[str, tuple[gs.Node, gs.Graph | None]]:
    """Node name → (node, the body holding it or None) over the graph and its bodies."""
    return {
        node.name: (node, None if sub is graph else sub)
        for sub in iter_graphs(graph)
        for node in sub.nodes
    }


def _rebind(candidate: Candidate, mapping: dict[str, tuple[gs.Node, gs.Graph | None]]) -> Candidate:
    node, body = mapping[candidate.node.name]
    placement = candidate.placement
    return replace(
        candidate,
        node=node,
        weight=node.inputs[placement.weight_input],
        activation=node.inputs[0],
        body=body,
    )


def _macs_per_sample(
    candidate: Candidate, stats: dict[str, TensorStats], samples: int
) -> float | None:
    """Multiply-accumulates per sample, from the element counts seen during calibration."""
    if samples <= 0:
        return None
    node, weight = candidate.node, candidate.weight
    if node.op == "Conv":
        output = _conv_output_tensor(candidate)
        if output is None or output.name not in stats or not isinstance(weight, gs.Constant):
            return None
        per_output = float(np.prod(weight.shape[1:]))
        return _computed(stats[output.name]) / samples * per_output
    activation = stats.get(candidate.activation.name)
    if activation is None or weight.shape is None:
        return None
    columns = weight.shape[_weighted(node).out_axis]
    if not isinstance(columns, int):
        return None
    return _computed(activation) / samples * columns


def _computed(stats: TensorStats) -> int:
    """Values the model computed: those calibrated and those left out as padding (a served
    padded batch computes them too)."""
    return stats.count + stats.padded_values


def _splittable(candidate: Candidate) -> bool:
    """Rule 10: a static MatMul with a constant weight (its input's last axis is channels)."""
    return (
        candidate.scheme == "static"
        and candidate.node.op == "MatMul"
        and isinstance(candidate.weight, gs.Constant)
    )


def _can_be_dynamic(candidate: Candidate) -> bool:
    return (
        candidate.scheme in ("static", "split")
        and candidate.node.op == "MatMul"
        and isinstance(candidate.weight, gs.Constant)
    )


def _has_ranges(candidate: Candidate, ranges: dict[str, tuple[float, float]]) -> bool:
    """Every tensor the candidate needs a calibrated range for has one."""
    output = _conv_output_tensor(candidate)
    needed = [t.name for t in candidate.activations] + ([output.name] if output is not None else [])
    return all(name in ranges for name in needed)


def _conv_output_tensor(candidate: Candidate) -> gs.Tensor | None:
    """For ops whose integer kernel needs a quantized output: the tensor to put Q/DQ on."""
    if not candidate.placement.quantize_output or candidate.scheme != "static":
        return None
    tensor = candidate.node.outputs[0]
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Relu":
        tensor = tensor.outputs[0].outputs[0]
    return tensor


def _data_inputs(node: gs.Node) -> list[gs.Tensor]:
    """The inputs a chain node computes on (rule 15): all of a compute op's, the first of a
    pass-through op's (shapes, scales and axes stay as they are)."""
    if node.op in CHAIN_PASS_OPS:
        return [node.inputs[0]] if node.inputs else []
    return [t for t in node.inputs if not t.is_empty()]


def integer_chain(
    graph: gs.Graph,
    candidates: list[Candidate],
    ranges: dict[str, tuple[float, float]] | None = None,
) -> list[tuple[gs.Tensor, gs.Tensor | None]]:
    """Rule 15: the main-graph tensors that get a Q/DQ pair besides the candidates' own, in
    graph order, each with its pass-through source (None for compute ops).

    A chain node is a main-graph node of :data:`CHAIN_COMPUTE_OPS`/:data:`CHAIN_PASS_OPS` with
    one float32 output that is not a graph output, every data input of which is quantized (a
    static candidate's input or Conv output, or an earlier chain output); with ``ranges``, those
    inputs and the output must also have calibrated ranges. Only chains from which some static
    candidate's input can be reached through chain nodes are kept. Sorts ``graph`` (exact).
    """
    static = _static_main(candidates)
    targets = {id(t) for c in static for t in c.activations}
    chain = _forward_chain(graph, static, ranges)
    useful = set(targets)
    kept: list[tuple[gs.Tensor, gs.Tensor | None]] = []
    for output, source in reversed(chain):
        if id(output) in useful or any(
            id(t) in useful for reader in output.outputs for t in reader.outputs
        ):
            useful.add(id(output))
            kept.append((output, source))
    kept.reverse()
    return kept


def integer_region(graph: gs.Graph, candidates: list[Candidate]) -> set[int]:
    """Ids of the tensors rule 15 would keep integer around ``candidates``: their quantized
    inputs and Conv outputs and every chain output reachable from them (unpruned)."""
    static = _static_main(candidates)
    return _seeds(static) | {id(tensor) for tensor, _ in _forward_chain(graph, static, None)}


def _static_main(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates rule 15 builds on: statically quantized, in the main graph."""
    return [c for c in candidates if c.body is None and c.scheme == "static"]


def _seeds(static: list[Candidate]) -> set[int]:
    """Ids of the tensors those candidates Q/DQ themselves: their inputs and Conv outputs."""
    seeds = {id(t) for c in static for t in c.activations}
    return seeds | {id(t) for c in static if (t := _conv_output_tensor(c)) is not None}


def _forward_chain(
    graph: gs.Graph,
    static: list[Candidate],
    ranges: dict[str, tuple[float, float]] | None,
) -> list[tuple[gs.Tensor, gs.Tensor | None]]:
    """Chain nodes whose data inputs are all quantized, in graph order (rule 15, before
    pruning); sorts ``graph`` (exact)."""
    graph.toposort(recurse_subgraphs=False)
    quantized = _seeds(static)
    outputs = {id(t) for t in graph.outputs}

    def ready(tensor: gs.Tensor) -> bool:
        return id(tensor) in quantized and (ranges is None or tensor.name in ranges)

    chain: list[tuple[gs.Tensor, gs.Tensor | None]] = []
    for node in graph.nodes:
        if node.op not in CHAIN_COMPUTE_OPS | CHAIN_PASS_OPS or len(node.outputs) != 1:
            continue
        output = node.outputs[0]
        data = _data_inputs(node)
        if id(output) in outputs or output.dtype not in (None, np.float32) or not data:
            continue
        if any(isinstance(t, gs.Constant) or not ready(t) for t in data):
            continue
        source = data[0] if node.op in CHAIN_PASS_OPS else None
        if ranges is not None and source is None and output.name not in ranges:
            continue
        quantized.add(id(output))
        chain.append((output, source))
    return chain


def _split_feeds(feeds: Feeds, accuracy_driven: bool) -> tuple[Feeds, Feeds | None]:
    """Rule 5: the last quarter of the batches is held aside (when there are at least 4)."""
    if not accuracy_driven:
        return feeds, None
    return hold_aside(feeds, "quant")
