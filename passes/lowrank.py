"""``lowrank``: split MatMul/Gemm with a constant weight into two thinner nodes via (whitened) SVD.

The numerics (ranks, SVD, whitening, balanced factors) live in :mod:`graphopt.passkit.svd`; this
module finds candidates, gathers the activation statistics, chooses ranks and rewrites the graph.
See :class:`LowRankPass` for the rules.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs
from scipy import linalg

from graphopt.check.heldout import fit_to_target
from graphopt.data.calibration import (
    StatRequest,
    chunk_by_budget,
    collect,
    gram_budget,
    gram_bytes,
)
from graphopt.errors import InputError, OptionError
from graphopt.ir import weights
from graphopt.ir.model import Model, iter_graphs
from graphopt.passkit.api import Budget, Pass, PassContext, PassResult, WeightClaims
from graphopt.passkit.options import Option, SearchPoint, SearchSpace, sweep
from graphopt.passkit.ordering import OrderRank
from graphopt.passkit.qdq import Namer
from graphopt.passkit.reconstruct import (
    Layer,
    LayerFit,
    LayerInput,
    Reconstruction,
    damped_cholesky,
    layer_bytes,
    stages,
)
from graphopt.passkit.selection import (
    body_labels,
    count_reasons,
    matches_any,
    node_label,
    weighted_op,
)
from graphopt.passkit.svd import (
    Spectrum,
    balance,
    break_even_rank,
    decompose,
    factors,
    max_rank,
    rank_for_energy,
    rank_for_ratio,
)

logger = logging.getLogger(__name__)

GLOBAL_STEP = 8
TARGET_GENTLEST = 0.95
"""Rule 10: the highest ratio tried; when even it misses the target, nothing is split."""
TARGET_STEPS = 4
"""Rule 10: halvings after the two ends."""
REFIT_DAMP = 1e-6
"""Rule 9: damping of Aᵀ H A when the second factor is refitted (it is well conditioned)."""
"""Global allocation hands out rank in blocks of this many components (rule 6)."""
GEMM_OPTIONAL_C_OPSET = 11
"""The first opset whose Gemm may omit C (rule 2)."""
GEMM_IMPLICIT_BROADCAST_OPSET = 7
"""Below this opset Gemm broadcasts C only with ``broadcast=1`` (rule 2)."""


@dataclass
class Consumer:
    """One MatMul/Gemm reading a weight, how its activation is laid out, and where it lives."""

    node: gs.Node
    activation: gs.Tensor
    channel_axis: int
    graph: gs.Graph
    """The graph holding ``node``: the main graph or an If/Loop/Scan body (rule 8)."""
    body: str | None = None
    """The body holding ``node`` (e.g. ``If if_0.then_branch``), None in the main graph."""


@dataclass
class WeightGroup:
    """Every candidate node that multiplies by the same effective matrix W (K×N)."""

    weight: gs.Constant
    transposed: bool
    alpha: float
    label: str
    """The first consumer's label (:func:`~graphopt.passkit.selection.node_label`), for reports."""
    consumers: list[Consumer] = field(default_factory=list)

    @property
    def in_body(self) -> bool:
        """Whether a consumer sits in an If/Loop/Scan body (rule 8: no XᵀX there)."""
        return any(consumer.body is not None for consumer in self.consumers)

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = (int(d) for d in self.weight.shape)
        return (cols, rows) if self.transposed else (rows, cols)

    def matrix(self) -> np.ndarray:
        values = weights.read(self.weight)
        values = values.T if self.transposed else values
        return values * np.float32(self.alpha) if self.alpha != 1.0 else values


@dataclass
class Decision:
    """A group's rank and, once computed, its factors (spilled to disk when large)."""

    group: WeightGroup
    rank: int
    relative_error: float
    spectrum: Spectrum | None = None
    """Kept only until the factors are computed (global allocation needs every spectrum)."""
    first: weights.StoredValues | None = None
    second: weights.StoredValues | None = None


class LowRankPass(Pass):
    """Low-rank split of MatMul/Gemm weights. Rules:

    1. Candidates are MatMul nodes whose second input is a 2-D float32 constant and Gemm nodes
       whose B is one (any transA/transB/alpha/beta). Weights on the left, other ranks and
       dtypes, matrices under ``min_size`` parameters, nodes outside ``include``/inside
       ``exclude`` globs or the bisection scope, and weights another pass claimed are skipped,
       each with its reason logged.
    2. ``MatMul(x, W)`` becomes ``MatMul(MatMul(x, A), B)``; ``Gemm(a, W, c)`` becomes
       ``Gemm(Gemm(a, A, transA), B, c, beta)`` with alpha and transB folded into A·B. The
       second node writes the original output tensor, so names downstream are unchanged.
       Below opset 11, where Gemm's C is required, the first Gemm gets a zero scalar C.
    3. Rank choice: ``rank`` (fixed) if set, else ``energy`` (fraction of the spectral energy
       kept; of the whitened spectrum in data-aware mode) if set, else ``ratio`` (fraction of
       the matrix's parameters kept). A rank at or above break-even K·N/(K+N) is never
       emitted: the node stays as it is and the skip is logged. Derived ranks are rounded to a
       multiple of ``round_to`` where that stays below break-even.
    4. ``method``: ``whiten`` minimises the layer's output error on calibration activations
       (SVD-LLM: SVD of Lᵀ W with XᵀX = L Lᵀ); ``svd`` minimises ‖W − A·B‖. ``auto`` picks
       ``whiten`` when real calibration data is given and ``svd`` for synthetic or no data.
       XᵀX comes from one streaming calibration run over all candidates.
    5. A weight is split only when every node reading it is a candidate with the same transB
       and alpha (else the original would stay beside the factors). The pass claims each
       weight it splits and the factors it creates (when it rewrites, so a
       weight it leaves alone stays free for ``sparsify``), and skips weights another pass
       claimed. Nodes sharing one weight (with the same transB and alpha) share one pair of
       factors;
       in whitened mode the Gram matrices of all their inputs are summed, so the factors
       minimise the summed output error.
       Memory stays bounded on large models: groups are calibrated in runs whose Gram matrices
       fit :func:`~graphopt.data.calibration.gram_budget`, each group's factors are computed as
       soon as its rank is known and spilled to disk (:func:`graphopt.ir.weights.store`),
       and its Gram matrix and spectrum are dropped. ``allocation=global`` keeps every
       layer's leading singular vectors until the budget is spent.
    6. ``allocation=global`` (with ``ratio``): instead of the same ratio everywhere, the
       parameter budget ratio × (all candidates' parameters) is spent greedily on the rank
       blocks (8 components) with the largest relative error reduction per parameter across
       all layers, each layer keeping at least one block and staying below break-even.
       Measured on MiniLM (512 unpadded calibration sentences, 256 held-out): uniform scores
       higher (0.929 against 0.900 at ratio 0.75, 0.853 against 0.745 at 0.5), as did giving
       every layer the same relative error (0.908, 0.783): layer-local error does not predict
       a layer's effect on the output, so uniform stays the default.
    7. Factors split √Σ and are rebalanced per component so A's and B's ranges match
       (:mod:`graphopt.passkit.svd` rule 5): later ``quant`` and ``fp16`` see tame ranges.
    8. If/Loop/Scan bodies: candidates come from the main graph and every body, nested ones
       included (:func:`~graphopt.ir.model.iter_graphs`); a weight defined in an outer scope and
       read in a body is a constant like any other. The two new nodes go into the graph that
       holds the node they replace; new names are unique across the whole model. XᵀX can only
       be collected for main-graph tensors (ONNX Runtime cannot expose tensors inside a
       control-flow body as outputs), so a weight read by a node in a body is factored with
       plain SVD; in a data-aware run that is logged once per such node and counted
       (``data_free_in_subgraphs``). A weight read in several bodies (the same constant in both
       branches of an If) is one group: factored, claimed and counted once, each rewritten node
       reading the shared factors from its own graph. Stats count the rewritten nodes inside
       bodies (``in_subgraphs``) and the skipped body candidates by reason
       (``skipped_in_subgraphs``); every log line about a body node names its body. ``touched``
       lists node names (:func:`~graphopt.passkit.selection.node_label`), in every graph.
    9. ``method=sequential`` (:mod:`graphopt.passkit.reconstruct`): groups are split stage by
       stage in graph order; each is fitted to the input X̃ the layers split before it really
       give it, against the target X W of the model as the pass received it: W* = H⁻¹ G W
       (H = X̃ᵀX̃, G = X̃ᵀX, damped by ``fit_damp``), whitened SVD of W* with H, then the second
       factor refitted by least squares on X̃ given the first (SVD-LLM's parameter update).
       ``allocation=global`` is refused (it needs every spectrum before any split). Body
       groups get plain SVD as in rule 8.
    10. ``target_cosine`` > 0 with real calibration data: the last quarter of the batches is
        held aside; the pass runs on copies of the model at several ratios (the same for every
        matrix: ``ratio`` first, then 0.95, then 4 halvings between the lowest ratio that met
        the target and the highest that did not) and keeps the lowest whose held-aside score
        (the validation gate's figure) meets the target; nothing is split when even 0.95
        misses it. Stats list every ratio tried with its score. ``rank``/``energy`` refuse it.
    """

    name: ClassVar[str] = "lowrank"
    summary: ClassVar[str] = "SVD split of MatMul/Gemm weights into two low-rank nodes"
    exact: ClassVar[bool] = False
    run_after: ClassVar[frozenset[str]] = frozenset({"cleanup"})
    run_before: ClassVar[frozenset[str]] = frozenset({"quant", "fp16"})
    order_rank: ClassVar[OrderRank] = OrderRank.STRUCTURE
    budget: ClassVar[Budget] = Budget(min_cosine=0.85, min_snr_db=5.0)
    options_schema: ClassVar[tuple[Option, ...]] = (
        Option(
            "method",
            str,
            "auto",
            "whiten (data-aware, SVD-LLM), sequential (whitened, each layer fitted to the "
            "input the already split layers give it), svd (plain), auto (whiten with real data)",
            choices=("auto", "sequential", "whiten", "svd"),
        ),
        Option("rank", int, 0, "fixed rank for every split (0 = use energy or ratio)", minimum=0),
        Option(
            "ratio",
            float,
            0.75,
            "fraction of each matrix's parameters the two factors keep",
            minimum=0.01,
            maximum=0.99,
        ),
        Option(
            "energy",
            float,
            0.0,
            "fraction of the (whitened) spectral energy to keep (0 = use ratio)",
            minimum=0.0,
            maximum=1.0,
        ),
        Option(
            "allocation",
            str,
            "uniform",
            "with ratio: uniform (the same ratio for every matrix) or global (one parameter "
            "budget spent where it cuts the summed relative error most)",
            choices=("uniform", "global"),
        ),
        Option(
            "damping",
            float,
            1e-6,
            "whitening: add this fraction of XᵀX's mean diagonal before factoring it",
            minimum=0.0,
        ),
        Option(
            "target_cosine",
            float,
            0.0,
            "> 0: the lowest ratio down to `ratio` (the same for every matrix) whose held-aside "
            "score meets this, found by bisection (rule 10; 0 = the fixed ratio)",
            minimum=0.0,
            maximum=1.0,
        ),
        Option(
            "fit_damp",
            float,
            0.01,
            "sequential: damping λ of the fit target (H + λ·mean(diag H)·I)⁻¹ X̃ᵀX W",
            minimum=0.0,
        ),
        Option(
            "min_size",
            int,
            65536,
            "skip matrices with fewer parameters than this",
            minimum=0,
        ),
        Option(
            "round_to",
            int,
            8,
            "round derived ranks to a multiple of this (1 = no rounding)",
            minimum=1,
        ),
        Option(
            "op_types", list, ["MatMul", "Gemm"], "op types to split", choices=("MatMul", "Gemm")
        ),
        Option("include", list, [], "only split nodes whose names match one of these globs"),
        Option("exclude", list, [], "never split nodes whose names match these globs"),
    )
    search_space: ClassVar[SearchSpace] = SearchSpace(
        points=(*sweep("ratio", (0.9, 0.75, 0.5)), SearchPoint({"energy": 0.99}))
    )
    """``tune``: three parameter ratios, then a spectral-energy cut."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        if self.options["rank"] > 0 and self.options["energy"] > 0:
            raise InputError("lowrank: set either rank or energy, not both")
        if self.options["target_cosine"] > 0 and self._fixed_target():
            raise OptionError("lowrank: target_cosine chooses the ratio; drop rank and energy")
        if self.options["method"] == "sequential" and self.options["allocation"] == "global":
            raise OptionError(
                "lowrank: allocation=global needs every layer's spectrum before any split; "
                "method=sequential splits layer by layer (use allocation=uniform)"
            )

    def call(self, model: Model, context: PassContext) -> PassResult:
        if self.options["target_cosine"] > 0:
            if context.has_real_data:
                return self._to_target(model, context)
            logger.warning(
                "lowrank: target_cosine needs real calibration data; using ratio=%g",
                self.options["ratio"],
            )
        groups, skipped, bodies = self._groups(model.graph, context)
        groups = self._feasible(_whole_weights(groups, skipped), skipped)
        data_aware = bool(groups) and self._data_aware(context)
        measured = [group for group in groups if data_aware and not group.in_body]
        data_free = [group for group in groups if not data_aware or group.in_body]
        if data_aware:
            _log_data_free(data_free)
        use_global = self.options["allocation"] == "global" and not self._fixed_target()
        sequential = data_aware and self.options["method"] == "sequential"
        chunks = (
            chunk_by_budget(measured, _gram_tensors, gram_budget(model, context.settings))
            if measured and not sequential
            else []
        )
        decisions: list[Decision] = []
        touched: list[str] = []
        seed = context.seed
        runs = len(chunks)
        if sequential and measured:
            decisions, touched, runs = self._fit_sequentially(model, measured, context, skipped)
            seed += len(measured)
        for chunk in chunks:
            grams = self._grams(model, chunk, context)
            decisions += self._decide(model, chunk, grams, skipped, seed, use_global)
            seed += len(chunk)
            del grams
        data_free_decisions = self._decide(model, data_free, None, skipped, seed, use_global)
        decisions += data_free_decisions
        if use_global:
            decisions = _allocate_globally(decisions, self.options["ratio"])
            for decision in decisions:
                self._factor(model, decision)
        rewritten = decisions if not sequential else data_free_decisions
        touched += self._rewrite(model.graph, rewritten, context.claims, model.opset)
        params_before = sum(d.group.shape[0] * d.group.shape[1] for d in decisions)
        params_after = sum(d.rank * sum(d.group.shape) for d in decisions)
        stats: dict[str, Any] = {
            "method": ("sequential" if sequential else "whiten") if measured else "svd",
            "split": len(touched),
            "weights_factored": len(decisions),
            "params_before": params_before,
            "params_after": params_after,
            "layers": {d.group.label: _layer_stats(d) for d in decisions},
        }
        in_bodies = [c for d in decisions for c in d.group.consumers if c.body is not None]
        if bodies:
            stats["in_subgraphs"] = len(in_bodies)
        if data_aware and in_bodies:
            stats["data_free_in_subgraphs"] = len(in_bodies)
        if runs > 1:
            stats["calibration_runs"] = runs
        if skipped:
            stats["skipped"] = count_reasons(skipped.values())
        skipped_in_bodies = [reason for label, reason in skipped.items() if label in bodies]
        if skipped_in_bodies:
            stats["skipped_in_subgraphs"] = count_reasons(skipped_in_bodies)
        if not touched and not skipped:
            logger.info("lowrank: no MatMul/Gemm in the graph or its bodies; nothing to split")
        if touched:
            logger.info(
                "lowrank: split %d nodes (%d inside If/Loop/Scan bodies), %d → %d parameters",
                len(touched),
                len(in_bodies),
                params_before,
                params_after,
            )
        return PassResult(model, bool(touched), stats, touched)

    # --- rules 1, 8 ---------------------------------------------------------------------------

    def _groups(
        self, graph: gs.Graph, context: PassContext
    ) -> tuple[list[WeightGroup], dict[str, str], dict[str, str]]:
        """Candidate groups, skipped nodes (label → reason), and body nodes (label → body)."""
        skipped: dict[str, str] = {}
        bodies: dict[str, str] = {}
        groups: dict[tuple[int, bool, float], WeightGroup] = {}
        activation_axes: dict[str, int] = {}
        body_names = body_labels(graph)
        for home in iter_graphs(graph):
            body = body_names.get(id(home))
            for node in home.nodes:
                if node.op not in ("MatMul", "Gemm"):
                    continue
                label = node_label(node)
                if body is not None:
                    bodies[label] = body
                layout = weighted_op(node)  # None without a weight input: skipped below
                axis = layout.activation_axis if layout is not None else -1
                reason = self._skip_reason(node, context)
                if (
                    reason is None
                    and body is None
                    and activation_axes.get(node.inputs[0].name, axis) != axis
                ):
                    reason = "activation read on another axis by an earlier candidate"
                if reason is not None:
                    skipped[label] = reason
                    logger.info(
                        "lowrank: skipping %s (%s)%s: %s", label, node.op, _where(body), reason
                    )
                    continue
                if body is None:
                    activation_axes[node.inputs[0].name] = axis
                assert layout is not None  # _skip_reason refuses nodes without a weight
                transposed, alpha = layout.weight_transposed, layout.alpha
                weight = node.inputs[1]
                key = (id(weight), transposed, alpha)
                group = groups.setdefault(key, WeightGroup(weight, transposed, alpha, label))
                group.consumers.append(Consumer(node, node.inputs[0], axis, home, body))
        return list(groups.values()), skipped, bodies

    def _feasible(self, groups: list[WeightGroup], skipped: dict[str, str]) -> list[WeightGroup]:
        """Rule 3 before any data is collected: refuse ranks known to be at or above break-even."""
        kept = []
        for group in groups:
            wanted = self._planned_rank(*group.shape)
            if wanted is not None and wanted > max_rank(*group.shape):
                self._skip(group, _break_even_reason(wanted, *group.shape), skipped)
            else:
                kept.append(group)
        return kept

    def _skip_reason(self, node: gs.Node, context: PassContext) -> str | None:
        if node.op not in self.options["op_types"]:
            return "op type not requested"
        label = node_label(node)
        if not context.in_scope(label):
            return "outside the bisection scope"
        if self.options["include"] and not matches_any(label, self.options["include"]):
            return "not matched by include"
        if matches_any(label, self.options["exclude"]):
            return "excluded by option"
        if len(node.inputs) < 2:
            return "no weight input"
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant):
            if isinstance(node.inputs[0], gs.Constant):
                return "weight is the left operand"
            return "weight is not a constant"
        if isinstance(node.inputs[0], gs.Constant):
            return "both operands are constants (cleanup folds this node)"
        owner = context.claims.owner(weight.name)
        if owner not in (None, self.name):
            return f"weight claimed by {owner}"
        if weight.dtype != np.float32:
            return f"weight dtype {weight.dtype} is not float32"
        if len(weight.shape) != 2:
            return f"weight of rank {len(weight.shape)} (only 2-D weights are split)"
        rows, cols = (int(d) for d in weight.shape)
        if rows * cols < self.options["min_size"]:
            return f"small matrix ({rows}×{cols} < min_size {self.options['min_size']})"
        activation = node.inputs[0]
        if activation.dtype is not None and activation.dtype != np.float32:
            return f"activation dtype {activation.dtype} is not float32"
        return None

    # --- rule 4 -------------------------------------------------------------------------------

    def _data_aware(self, context: PassContext) -> bool:
        method = self.options["method"]
        if method == "svd":
            return False
        real_data = context.has_real_data
        if method in ("whiten", "sequential"):
            context.require_feeds(f"lowrank method={method}")
            if not real_data:
                logger.warning("lowrank: whitening with synthetic data; give --calib-data")
            return True
        if not real_data:
            logger.info("lowrank: no real calibration data, using plain SVD")
        return real_data

    def _grams(
        self, model: Model, groups: list[WeightGroup], context: PassContext
    ) -> dict[str, np.ndarray]:
        """XᵀX of every main-graph activation ``groups`` read (the caller checked the data)."""
        feeds = context.require_feeds("lowrank")  # _data_aware checked it
        requests = [
            StatRequest(
                consumer.activation.name,
                minmax=False,
                gram=True,
                channel_axis=consumer.channel_axis,
            )
            for group in groups
            for consumer in group.consumers
        ]
        stats = collect(
            model,
            feeds,
            requests,
            on_batch=lambda index: context.report_progress("lowrank: collecting XᵀX", index),
            settings=context.settings,
        )
        return {name: s.gram for name, s in stats.items() if s.gram is not None}

    # --- rule 10 ------------------------------------------------------------------------------

    def _to_target(self, model: Model, context: PassContext) -> PassResult:
        """Rule 10: bisect the ratio on held-aside batches, then split at the ratio found."""
        fixed = {**self.options, "target_cosine": 0.0}
        search = fit_to_target(
            model,
            context,
            "lowrank",
            lambda ratio: LowRankPass({**fixed, "ratio": ratio}),
            target=self.options["target_cosine"],
            gentlest=TARGET_GENTLEST,
            strongest=self.options["ratio"],
            steps=TARGET_STEPS,
        )
        stats = {
            "target_cosine": self.options["target_cosine"],
            "ratios_tried": [[round(r, 4), round(sc, 6)] for r, sc in search.tried],
            "ratio": search.level,
        }
        if search.result is None:
            return PassResult(model, False, stats, [])
        result = search.result
        return PassResult(result.model, result.modified, {**result.stats, **stats}, result.touched)

    # --- rule 9 -------------------------------------------------------------------------------

    def _fit_sequentially(
        self,
        model: Model,
        groups: list[WeightGroup],
        context: PassContext,
        skipped: dict[str, str],
    ) -> tuple[list[Decision], list[str], int]:
        """Rule 9: split stage by stage, each group fitted to the input the split layers
        before it give it. Returns the decisions, the rewritten nodes and the engine's runs."""
        feeds = context.require_feeds("lowrank method=sequential")  # _data_aware checked it
        by_key = {group.label: group for group in groups}
        layers = [
            Layer(
                group.label,
                tuple(LayerInput(c.activation.name, c.channel_axis) for c in group.consumers),
                tuple(c.node for c in group.consumers),
                group.shape[0],
            )
            for group in groups
        ]
        model.graph.toposort()
        budget = gram_budget(model, context.settings)
        decisions: list[Decision] = []
        touched: list[str] = []
        seed = context.seed
        with Reconstruction(
            model,
            feeds,
            settings=context.settings,
            label="lowrank",
            on_batch=lambda index: context.report_progress("lowrank: fitting", index),
        ) as engine:
            for stage in stages(model.graph, layers):
                fitted: list[Decision] = []
                for chunk in chunk_by_budget(stage, layer_bytes, budget):
                    fits = engine.measure(chunk)
                    for layer in chunk:
                        group = by_key[layer.key]
                        decision = self._fit_group(model, group, fits[layer.key], skipped, seed)
                        seed += 1
                        if decision is not None:
                            fitted.append(decision)
                    del fits
                touched += self._rewrite(model.graph, fitted, context.claims, model.opset)
                decisions += fitted
            runs = engine.runs
        logger.info("lowrank: fitted %d weights sequentially in %d runs", len(decisions), runs)
        return decisions, touched, runs

    def _fit_group(
        self,
        model: Model,
        group: WeightGroup,
        fit: LayerFit,
        skipped: dict[str, str],
        seed: int,
    ) -> Decision | None:
        """Rule 9 for one group: whitened SVD of W* with H, then B refitted given A."""
        rows, cols = group.shape
        wanted = self._planned_rank(rows, cols)
        keep = max_rank(rows, cols) if wanted is None else wanted
        weight = group.matrix().astype(np.float64)
        try:
            target = fit.target(weight, self.options["fit_damp"])
            spectrum = decompose(
                target, keep, gram=fit.hessian, damping=self.options["damping"], seed=seed
            )
        except (ValueError, np.linalg.LinAlgError) as error:
            self._skip(group, f"cannot whiten ({error})", skipped)
            return None
        rank = wanted if wanted is not None else self._energy_rank(spectrum)
        if rank > max_rank(rows, cols):
            self._skip(group, _break_even_reason(rank, rows, cols), skipped)
            return None
        first, second = factors(spectrum, rank, np.dtype(np.float64))
        # SVD-LLM's parameter update: B = (Aᵀ H A)⁻¹ Aᵀ G W, the least-squares second factor
        # on X̃ given A (it absorbs what damping and the truncation left of W*'s fit)
        projected = first.T @ fit.hessian @ first
        second = linalg.cho_solve(
            damped_cholesky(projected, REFIT_DAMP)[:2], first.T @ fit.cross @ weight
        )
        first, second = balance(first, second)
        decision = Decision(group, rank, spectrum.relative_error(rank))
        base = group.weight.name
        decision.first = weights.store(model, first.astype(np.float32), f"{base}_lowrank_A")
        decision.second = weights.store(model, second.astype(np.float32), f"{base}_lowrank_B")
        return decision

    # --- rules 3, 5, 6 ------------------------------------------------------------------------

    def _decide(
        self,
        model: Model,
        groups: list[WeightGroup],
        grams: dict[str, np.ndarray] | None,
        skipped: dict[str, str],
        seed: int,
        use_global: bool,
    ) -> list[Decision]:
        decisions: list[Decision] = []
        for index, group in enumerate(groups):
            rows, cols = group.shape
            wanted = self._planned_rank(rows, cols)
            gram = self._group_gram(group, grams, skipped)
            if grams is not None and gram is None:
                continue
            keep = max_rank(rows, cols) if wanted is None or use_global else wanted
            try:
                spectrum = decompose(
                    group.matrix(),
                    keep,
                    gram=gram,
                    damping=self.options["damping"],
                    seed=seed + index,
                )
            except ValueError as error:
                self._skip(group, f"cannot whiten ({error})", skipped)
                continue
            finally:
                del gram
            rank = wanted if wanted is not None else self._energy_rank(spectrum)
            if not use_global and rank > max_rank(rows, cols):
                self._skip(group, _break_even_reason(rank, rows, cols), skipped)
                continue
            decision = Decision(group, rank, spectrum.relative_error(rank), spectrum)
            if not use_global:
                self._factor(model, decision)
            decisions.append(decision)
        return decisions

    @staticmethod
    def _factor(model: Model, decision: Decision) -> None:
        """Rule 7: compute the factors, keep them on disk when large, drop the spectrum."""
        assert decision.spectrum is not None
        first, second = factors(decision.spectrum, decision.rank, np.dtype(np.float32))
        base = decision.group.weight.name
        decision.first = weights.store(model, first, f"{base}_lowrank_A")
        decision.second = weights.store(model, second, f"{base}_lowrank_B")
        decision.spectrum = None

    def _fixed_target(self) -> bool:
        return self.options["rank"] > 0 or self.options["energy"] > 0

    def _planned_rank(self, rows: int, cols: int) -> int | None:
        """The rank known before decomposing (None for energy targets)."""
        if self.options["rank"] > 0:
            return int(self.options["rank"])
        if self.options["energy"] > 0:
            return None
        return rank_for_ratio(self.options["ratio"], rows, cols, self.options["round_to"])

    def _energy_rank(self, spectrum: Spectrum) -> int:
        return rank_for_energy(spectrum, self.options["energy"], self.options["round_to"])

    def _group_gram(
        self, group: WeightGroup, grams: dict[str, np.ndarray] | None, skipped: dict[str, str]
    ) -> np.ndarray | None:
        if grams is None:
            return None
        names = dict.fromkeys(consumer.activation.name for consumer in group.consumers)
        missing = [name for name in names if name not in grams]
        if missing:
            self._skip(group, f"no activation statistics for {missing[0]}", skipped)
            return None
        first, *others = names
        if not others:
            return grams[first]
        total = np.array(grams[first], dtype=np.float64)
        for name in others:
            total += grams[name]
        return total

    def _skip(self, group: WeightGroup, reason: str, skipped: dict[str, str]) -> None:
        _skip_consumers(group, reason, skipped)

    # --- rules 2, 7 ---------------------------------------------------------------------------

    def _rewrite(
        self, graph: gs.Graph, decisions: list[Decision], claims: WeightClaims, opset: int
    ) -> list[str]:
        namer = Namer(*iter_graphs(graph))
        touched: list[str] = []
        for decision in decisions:
            group = decision.group
            assert decision.first is not None and decision.second is not None
            base = group.weight.name
            left = weights.new_constant(namer(f"{base}_lowrank_A"), decision.first)
            right = weights.new_constant(namer(f"{base}_lowrank_B"), decision.second)
            for claimed in (group.weight, left, right):
                claims.claim(claimed.name, self.name)
            for consumer in group.consumers:
                touched.append(node_label(consumer.node))
                split = _split_node(namer, consumer.node, left, right, opset)
                consumer.graph.nodes.extend(split)
        graph.cleanup(remove_unused_graph_inputs=False)
        graph.toposort()
        return touched


def _split_node(
    namer: Namer, node: gs.Node, left: gs.Constant, right: gs.Constant, opset: int
) -> list[gs.Node]:
    """Rule 2: the two nodes replacing ``node``; ``node`` itself is disconnected.

    Below opset 11 Gemm's C is required, so the first Gemm adds a zero scalar (with
    ``broadcast=1`` below opset 7, where broadcasting C had to be asked for).
    """
    base = node.name or node.outputs[0].name
    activation, output = node.inputs[0], node.outputs[0]
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 else None
    hidden = gs.Variable(namer(f"{base}_lowrank_hidden"), dtype=np.float32)
    node.inputs.clear()
    node.outputs.clear()
    if node.op == "MatMul":
        return [
            gs.Node(
                "MatMul", namer(f"{base}_lowrank_1"), inputs=[activation, left], outputs=[hidden]
            ),
            gs.Node("MatMul", namer(f"{base}_lowrank_2"), inputs=[hidden, right], outputs=[output]),
        ]
    first_attrs = {"transA": int(node.attrs.get("transA", 0))}
    first_inputs: list[gs.Tensor] = [activation, left]
    if opset < GEMM_OPTIONAL_C_OPSET:
        first_inputs.append(gs.Constant(namer(f"{base}_lowrank_zero"), np.zeros(1, np.float32)))
        if opset < GEMM_IMPLICIT_BROADCAST_OPSET:
            first_attrs["broadcast"] = 1
    second_inputs: list[gs.Tensor] = [hidden, right]
    second_attrs: dict[str, Any] = {}
    if bias is not None and bias.name:
        second_inputs.append(bias)
        second_attrs["beta"] = float(node.attrs.get("beta", 1.0))
    return [
        gs.Node(
            "Gemm",
            namer(f"{base}_lowrank_1"),
            attrs=first_attrs,
            inputs=first_inputs,
            outputs=[hidden],
        ),
        gs.Node(
            "Gemm",
            namer(f"{base}_lowrank_2"),
            attrs=second_attrs,
            inputs=second_inputs,
            outputs=[output],
        ),
    ]


def _allocate_globally(decisions: list[Decision], ratio: float) -> list[Decision]:
    """Rule 6: spend ratio × total parameters on the most useful rank blocks."""
    if not decisions:
        return decisions
    spectra = [d.spectrum for d in decisions]
    assert all(spectrum is not None for spectrum in spectra)
    budget = ratio * sum(d.group.shape[0] * d.group.shape[1] for d in decisions)
    limits = [
        min(max_rank(*d.group.shape), spectrum.computed)  # type: ignore[union-attr]
        for d, spectrum in zip(decisions, spectra, strict=True)
    ]
    ranks = [min(GLOBAL_STEP, limit) for limit in limits]
    costs = [sum(d.group.shape) for d in decisions]
    spent = sum(rank * cost for rank, cost in zip(ranks, costs, strict=True))
    blocks: list[tuple[float, int, int, int]] = []
    for index, spectrum in enumerate(spectra):
        assert spectrum is not None
        energy = spectrum.singular_values.astype(np.float64) ** 2
        total = spectrum.total_energy or 1.0
        for start in range(ranks[index], limits[index], GLOBAL_STEP):
            stop = min(start + GLOBAL_STEP, limits[index])
            gain = float(energy[start:stop].sum()) / total
            blocks.append((-gain / ((stop - start) * costs[index]), index, start, stop))
    for _, index, start, stop in sorted(blocks):
        cost = (stop - start) * costs[index]
        if ranks[index] != start or spent + cost > budget:
            continue
        ranks[index] = stop
        spent += cost
    return [
        Decision(decision.group, rank, spectrum.relative_error(rank), spectrum)  # type: ignore[union-attr]
        for decision, spectrum, rank in zip(decisions, spectra, ranks, strict=True)
    ]


def _gram_tensors(group: WeightGroup) -> dict[str, int]:
    """The activations whose XᵀX a group needs, with the bytes of each Gram matrix."""
    channels = group.shape[0]
    return {consumer.activation.name: gram_bytes(channels) for consumer in group.consumers}


def _whole_weights(groups: list[WeightGroup], skipped: dict[str, str]) -> list[WeightGroup]:
    """Rule 5: split a weight only when one group holds every node that reads it; otherwise the
    original would stay in the graph beside the factors and the model would grow."""
    by_weight: dict[int, list[WeightGroup]] = {}
    for group in groups:
        by_weight.setdefault(id(group.weight), []).append(group)
    kept = []
    for group in groups:
        siblings = by_weight[id(group.weight)]
        grouped = {id(consumer.node) for consumer in group.consumers}
        others = [node_label(n) for n in group.weight.outputs if id(n) not in grouped]
        if len(siblings) > 1:
            reason = f"weight read with different transB/alpha ({group.weight.name})"
        elif others:
            reason = f"weight also read by other nodes ({others[0]})"
        else:
            kept.append(group)
            continue
        _skip_consumers(group, reason, skipped)
    return kept


def _skip_consumers(group: WeightGroup, reason: str, skipped: dict[str, str]) -> None:
    for consumer in group.consumers:
        label = node_label(consumer.node)
        skipped[label] = reason
        logger.info("lowrank: skipping %s%s: %s", label, _where(consumer.body), reason)


def _log_data_free(groups: list[WeightGroup]) -> None:
    """Rule 8: once per body node of a data-aware run, say why it gets plain SVD."""
    for group in groups:
        for consumer in group.consumers:
            if consumer.body is not None:
                logger.info(
                    "lowrank: %s%s: XᵀX cannot be collected inside If/Loop/Scan bodies (ONNX "
                    "Runtime cannot expose their tensors as outputs); using plain SVD for %s",
                    node_label(consumer.node),
                    _where(consumer.body),
                    group.weight.name,
                )


def _layer_stats(decision: Decision) -> dict[str, Any]:
    group = decision.group
    entry: dict[str, Any] = {
        "shape": list(group.shape),
        "rank": decision.rank,
        "break_even": round(break_even_rank(*group.shape), 1),
        "relative_error": round(decision.relative_error, 6),
    }
    homes = list(dict.fromkeys(c.body for c in group.consumers if c.body is not None))
    if homes:
        entry["subgraphs"] = homes
    return entry


def _where(body: str | None) -> str:
    return f" in {body}" if body is not None else ""


def _break_even_reason(rank: int, rows: int, cols: int) -> str:
    return (
        f"rank at or above break-even (rank {rank} ≥ {break_even_rank(rows, cols):.1f} for "
        f"{rows}×{cols}: the split would be larger and slower)"
    )
