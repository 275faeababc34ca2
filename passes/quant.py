"""``quant``: QDQ insertion with streaming calibration, accuracy-driven by default.

The pass quantizes compute ops that have integer kernels and leaves everything else in float;
see :class:`QuantPass` for the rules. Placement is data (:data:`PLACEMENT`), not code paths.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.calibration import (
    CALIBRATORS,
    StatRequest,
    TensorStats,
    calibrated_range,
    collect,
)
from graphopt.data import Feeds
from graphopt.edit import replace_input
from graphopt.errors import InputError
from graphopt.model import Model, runnable_model
from graphopt.options import Option
from graphopt.ort import make_session
from graphopt.pass_api import Budget, Pass, PassContext, PassResult
from graphopt.qdq import (
    Namer,
    QuantParams,
    activation_params,
    dequantize_node,
    fake_quantize,
    quantize_bias,
    quantize_weight,
)

logger = logging.getLogger(__name__)


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

    @property
    def activations(self) -> list[gs.Tensor]:
        """Inputs quantized with calibrated Q/DQ pairs (both, for activation × activation)."""
        if isinstance(self.weight, gs.Constant):
            return [self.activation]
        return [self.activation, self.weight]


@dataclass
class QuantReport:
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    excluded_for_accuracy: dict[str, float] = field(default_factory=dict)
    unquantizable: dict[str, str] = field(default_factory=dict)


def _weight_axis(node: gs.Node, weight: gs.Constant, per_channel: bool) -> int | None:
    """The output-channel axis of a weight (GUIDE §3): Conv 0, MatMul 1, Gemm 1 or 0 with transB."""
    if not per_channel:
        return None
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return len(weight.shape) - 1


class QuantPass(Pass):
    """Int8 QDQ quantization. Rules:

    1. Candidates are MatMul/Gemm/Conv nodes whose weight input is a constant (after
       normalization, whatever the exporter did) of float32 type; Gemm with transA, MatMul with a
       weight of rank ≠ 2 and activation×activation MatMuls (unless ``quantize_act_matmul``) are
       skipped with a logged reason, as are nodes excluded by ``exclude`` globs or not matched by
       ``include`` globs, and op types not in ``op_types``.
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
       it alone; while the held-aside cosine of every output is below the target, the most harmful
       remaining node goes back to float. Excluded nodes and their measured harm are reported.
    6. ``smooth_alpha`` > 0 applies SmoothQuant to MatMul/Gemm candidates first: per input
       channel s_j = max|X_j|^α / max|W_j|^(1-α), the weight rows are multiplied by s and the
       activation divided by s, folded into a preceding LayerNormalization's scale and bias when
       every reader of that output is a smoothed candidate, else through an inserted Mul.
    7. Zeros stay zero (symmetric weights), so sparsity from earlier passes survives.
    """

    name: ClassVar[str] = "quant"
    summary: ClassVar[str] = "int8 QDQ quantization with calibration, accuracy-driven by default"
    exact: ClassVar[bool] = False
    run_after: ClassVar[frozenset[str]] = frozenset({"cleanup", "lowrank", "sparsify"})
    run_before: ClassVar[frozenset[str]] = frozenset({"fp16"})
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
            "smooth_alpha",
            float,
            0.0,
            "SmoothQuant migration strength (0 = off)",
            minimum=0.0,
            maximum=1.0,
        ),
    )

    def call(self, model: Model, context: PassContext) -> PassResult:
        if context.data is None or not isinstance(context.data, Feeds):
            raise InputError(
                "quant needs calibration data (or synthesized feeds from the pipeline)"
            )
        feeds: Feeds = context.data
        report = QuantReport()
        candidates = self._candidates(model.graph, context, report)
        if not candidates:
            logger.warning("quant: nothing to quantize (%d nodes skipped)", len(report.skipped))
            return PassResult(model, False, {"quantized": 0, "skipped": len(report.skipped)})
        calibration_feeds, held_aside = _split_feeds(feeds, self._accuracy_driven(feeds))
        if self.options["smooth_alpha"] > 0:
            smoothed = self._smooth(model, candidates, calibration_feeds)
            logger.info("quant: SmoothQuant rescaled %d nodes", smoothed)
        stats = collect(model, calibration_feeds, self._requests(candidates))
        ranges = self._ranges(candidates, stats, report)
        chosen = [c for c in candidates if _has_ranges(c, ranges)]
        if self._accuracy_driven(feeds) and held_aside is not None:
            chosen = self._accuracy_search(model, chosen, ranges, held_aside, report)
        self._apply(model.graph, chosen, ranges)
        report.quantized = [c.node.name for c in chosen]
        stats_out: dict[str, Any] = {
            "quantized": len(chosen),
            "by_op": _count_ops(c.node.op for c in chosen),
            "calibrator": self.options["calibrator"],
        }
        if report.skipped:
            stats_out["skipped"] = _count_reasons(report.skipped.values())
        if report.unquantizable:
            stats_out["unquantizable_tensors"] = len(report.unquantizable)
        if report.excluded_for_accuracy:
            stats_out["excluded_for_accuracy"] = {
                name: round(harm, 6) for name, harm in report.excluded_for_accuracy.items()
            }
        return PassResult(model, bool(chosen), stats_out, report.quantized)

    # --- rule 1 -------------------------------------------------------------------------------

    def _candidates(
        self, graph: gs.Graph, context: PassContext, report: QuantReport
    ) -> list[Candidate]:
        candidates: list[Candidate] = []
        op_types = set(self.options["op_types"])
        for node in graph.nodes:
            if node.op not in PLACEMENT:
                continue
            reason = self._skip_reason(node, op_types, context)
            if reason is not None:
                report.skipped[node.name] = reason
                logger.info("quant: skipping %s (%s): %s", node.name, node.op, reason)
                continue
            placement = PLACEMENT[node.op]
            weight = node.inputs[placement.weight_input]
            if not context.claims.claim(weight.name, self.name):
                reason = f"weight claimed by {context.claims.owner(weight.name)}"
                report.skipped[node.name] = reason
                logger.info("quant: skipping %s: %s", node.name, reason)
                continue
            candidates.append(
                Candidate(
                    node=node,
                    placement=placement,
                    weight=weight,
                    weight_axis=_weight_axis(node, weight, self.options["per_channel"]),
                    activation=node.inputs[0],
                )
            )
        return candidates

    def _skip_reason(self, node: gs.Node, op_types: set[str], context: PassContext) -> str | None:
        if node.op not in op_types:
            return "op type not requested"
        if not context.in_scope(node.name):
            return "outside the bisection scope"
        if self.options["include"] and not _matches(node.name, self.options["include"]):
            return "not matched by include"
        if _matches(node.name, self.options["exclude"]):
            return "excluded by option"
        placement = PLACEMENT[node.op]
        if len(node.inputs) <= placement.weight_input:
            return "no weight input"
        weight = node.inputs[placement.weight_input]
        if not isinstance(weight, gs.Constant):
            if node.op != "MatMul":
                return "weight is not a constant"
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

    def _requests(self, candidates: list[Candidate]) -> list[StatRequest]:
        histogram = self.options["calibrator"] != "minmax"
        requests = [
            StatRequest(t.name, histogram=histogram) for c in candidates for t in c.activations
        ]
        for candidate in candidates:
            output = _conv_output_tensor(candidate)
            if output is not None:
                requests.append(StatRequest(output.name, histogram=histogram))
        return requests

    def _ranges(
        self, candidates: list[Candidate], stats: dict[str, TensorStats], report: QuantReport
    ) -> dict[str, tuple[float, float]]:
        symmetric = self.options["backend"] == "tensorrt"
        ranges: dict[str, tuple[float, float]] = {}
        names = {t.name for c in candidates for t in c.activations}
        names |= {t.name for c in candidates if (t := _conv_output_tensor(c)) is not None}
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
        return ranges

    # --- rule 2 -------------------------------------------------------------------------------

    def _apply(
        self, graph: gs.Graph, chosen: list[Candidate], ranges: dict[str, tuple[float, float]]
    ) -> None:
        namer = Namer(graph)
        symmetric = self.options["backend"] == "tensorrt"
        dequantized: dict[int, gs.Variable] = {}
        for candidate in chosen:
            node = candidate.node
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
                weight.values, candidate.weight_axis, reduce_range=self.options["reduce_range"]
            )
            weight_output = dequantize_node(graph, namer, weight.name, quantized, weight_params)
            node.inputs[candidate.placement.weight_input] = weight_output
            self._quantize_bias(graph, namer, candidate, params, weight_params)
            output = _conv_output_tensor(candidate)
            if output is not None:
                out_params = activation_params(*ranges[output.name], symmetric=symmetric)
                readers = list(output.outputs)
                fake = fake_quantize(graph, namer, output, out_params)
                for reader in readers:
                    replace_input(reader, output, fake)
                if output in graph.outputs:
                    logger.debug(
                        "quant: %s is a graph output; its Q/DQ only feeds readers", output.name
                    )
        graph.toposort()

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
        quantized, params = quantize_bias(bias.values, float(activation.scale), weight.scale)
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
    ) -> list[Candidate]:
        target = self.options["target_cosine"]
        evaluator = _Evaluator(model, held_aside)
        score = evaluator.score(self, chosen, ranges)
        logger.info(
            "quant: held-aside cosine with all %d nodes quantized: %.6f", len(chosen), score
        )
        if score >= target:
            return chosen
        harm = {}
        for candidate in chosen:
            harm[candidate.node.name] = 1.0 - evaluator.score(self, [candidate], ranges)
        remaining = sorted(chosen, key=lambda c: harm[c.node.name])
        while remaining and score < target:
            worst = remaining.pop()
            report.excluded_for_accuracy[worst.node.name] = harm[worst.node.name]
            logger.info(
                "quant: %s back to float (alone it costs %.6f cosine)",
                worst.node.name,
                harm[worst.node.name],
            )
            score = evaluator.score(self, remaining, ranges) if remaining else 1.0
        logger.info("quant: held-aside cosine %.6f with %d nodes quantized", score, len(remaining))
        order = {id(c.node): index for index, c in enumerate(chosen)}
        return sorted(remaining, key=lambda c: order[id(c.node)])

    # --- rule 6 -------------------------------------------------------------------------------

    def _smooth(self, model: Model, candidates: list[Candidate], feeds: Feeds) -> int:
        eligible = [
            c
            for c in candidates
            if c.node.op in ("MatMul", "Gemm")
            and isinstance(c.weight, gs.Constant)
            and not (c.node.op == "Gemm" and int(c.node.attrs.get("transB", 0)))
        ]
        requests = [
            StatRequest(c.activation.name, minmax=False, channel_absmax=True) for c in eligible
        ]
        stats = collect(model, feeds, requests)
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
            w_max = np.max([np.abs(c.weight.values).max(axis=1) for c in group], axis=0)
            scales = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(
                np.maximum(w_max, 1e-5), 1 - alpha
            )
            scales = np.clip(scales, 1e-4, 1e4).astype(np.float32)
            for candidate in group:
                candidate.weight = gs.Constant(
                    namer(f"{candidate.weight.name}_smoothed"),
                    (candidate.weight.values * scales[:, None]).astype(np.float32),
                )
                candidate.node.inputs[candidate.placement.weight_input] = candidate.weight
            new_activation = _divide_activation(model.graph, namer, activation, group, scales)
            for candidate in group:
                replace_input(candidate.node, activation, new_activation)
                candidate.activation = new_activation
            smoothed += len(group)
        return smoothed


def _divide_activation(
    graph: gs.Graph,
    namer: Namer,
    activation: gs.Tensor,
    group: list[Candidate],
    scales: np.ndarray,
) -> gs.Tensor:
    """X / s: folded into a LayerNormalization that only the group reads, else a Mul."""
    producer = activation.inputs[0] if len(activation.inputs) == 1 else None
    readers = {id(r) for r in activation.outputs}
    group_nodes = {id(c.node) for c in group}
    foldable = (
        producer is not None
        and producer.op == "LayerNormalization"
        and readers <= group_nodes
        and activation not in graph.outputs
        and all(isinstance(t, gs.Constant) for t in producer.inputs[1:3])
        and int(producer.attrs.get("axis", -1)) == -1
    )
    if foldable:
        for index in (1, 2):
            if len(producer.inputs) > index:
                old = producer.inputs[index]
                producer.inputs[index] = gs.Constant(
                    namer(f"{old.name}_smoothed"), (old.values / scales).astype(np.float32)
                )
        return activation
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
    """Held-aside cosine of a quantization plan against the float model (rule 5)."""

    def __init__(self, model: Model, feeds: Feeds) -> None:
        self.model = model
        self.feeds = feeds
        self.reference = self._outputs(model)

    def _outputs(self, model: Model) -> list[list[np.ndarray]]:
        with runnable_model(model) as runnable:
            session = make_session(runnable, optimize=False)
            return [session.run(None, feed) for feed in self.feeds]

    def score(
        self, quant: QuantPass, plan: list[Candidate], ranges: dict[str, tuple[float, float]]
    ) -> float:
        """The worst per-output cosine over the held-aside feeds with ``plan`` quantized."""
        variant = _copy_model(self.model)
        mapping = _node_map(self.model.graph, variant.graph)
        moved = [_rebind(c, mapping) for c in plan]
        quant._apply(variant.graph, moved, ranges)
        outputs = self._outputs(variant)
        worst = 1.0
        for reference_batch, candidate_batch in zip(self.reference, outputs, strict=True):
            for reference, candidate in zip(reference_batch, candidate_batch, strict=True):
                worst = min(worst, _cosine(reference, candidate))
        return worst


def _copy_model(model: Model) -> Model:
    return Model(
        graph=model.graph.copy(),
        shell=model.shell,
        source=model.source,
        had_external_data=model.had_external_data,
        source_input_names=model.source_input_names,
    )


def _node_map(original: gs.Graph, copy: gs.Graph) -> dict[str, gs.Node]:
    del original
    return {node.name: node for node in copy.nodes}


def _rebind(candidate: Candidate, mapping: dict[str, gs.Node]) -> Candidate:
    node = mapping[candidate.node.name]
    placement = candidate.placement
    return Candidate(
        node=node,
        placement=placement,
        weight=node.inputs[placement.weight_input],
        weight_axis=candidate.weight_axis,
        activation=node.inputs[0],
    )


def _cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(candidate, np.float64).ravel()
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denominator == 0:
        return 1.0 if not a.any() and not b.any() else 0.0
    return float(a @ b) / denominator


def _has_ranges(candidate: Candidate, ranges: dict[str, tuple[float, float]]) -> bool:
    """Every tensor the candidate needs a calibrated range for has one."""
    output = _conv_output_tensor(candidate)
    needed = [t.name for t in candidate.activations] + ([output.name] if output is not None else [])
    return all(name in ranges for name in needed)


def _conv_output_tensor(candidate: Candidate) -> gs.Tensor | None:
    """For ops whose integer kernel needs a quantized output: the tensor to put Q/DQ on."""
    if not candidate.placement.quantize_output:
        return None
    tensor = candidate.node.outputs[0]
    while len(tensor.outputs) == 1 and tensor.outputs[0].op == "Relu":
        tensor = tensor.outputs[0].outputs[0]
    return tensor


def _split_feeds(feeds: Feeds, accuracy_driven: bool) -> tuple[Feeds, Feeds | None]:
    """Rule 5: the last quarter of the batches is held aside (when there are at least 4)."""
    if not accuracy_driven:
        return feeds, None
    batches = sum(1 for _ in feeds)
    if batches < 4:
        logger.info("quant: only %d calibration batches; the accuracy check reuses them", batches)
        return feeds, feeds
    cut = batches - batches // 4
    return feeds.subset(range(cut)), feeds.subset(range(cut, batches))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _count_ops(ops: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


def _count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    return _count_ops(reasons)
