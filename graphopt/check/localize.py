"""Per-tensor localization: where does the candidate start to diverge from the reference?

Rules:

1. Tensors are matched by name: every node output of the reference's main graph that the
   candidate also computes (graph inputs and subgraph-local tensors excluded).
2. Both models are run with graph optimizations off and every matched tensor exposed as an extra
   output, on the first ``max_batches`` feeds only (all intermediate tensors of a batch are held
   at once, so this is a debugging tool, not a streaming one).
3. Each tensor is judged like an output (:mod:`graphopt.check.validate`: with per-channel
   criteria, the worst channel counts too, and the row says which; a batch's sample count is
   read on the reference's batch axes). Rows come back in the reference's node order, so the
   first row below the budget is where error starts.
4. Models are loaded from memory, their external data read in place from their own folder:
   nothing is written anywhere (the models' folders may be read-only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from graphopt.check.validate import (
    Criteria,
    MetricAccumulator,
    ModelSource,
    input_batch_axes,
    sample_count,
)
from graphopt.data.feeds import Feeds
from graphopt.ir.ort import InMemoryModel, make_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorComparison:
    name: str
    op: str
    cosine: float | None
    """None when the figures could not be computed (new NaN/Inf, a shape change)."""
    snr_db: float | None
    max_abs: float | None
    new_nonfinite: int
    passed: bool
    worst_channel_cosine: float | None = 1.0
    worst_channel: str = ""


def _load_proto(model: ModelSource) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(model)
    return onnx.load(str(path), load_external_data=False), path.parent


def _with_outputs(model: ModelSource, names: list[str]) -> onnx.ModelProto | InMemoryModel:
    """The model with ``names`` added as graph outputs. A model file is loaded from memory with
    its external data read in place: nothing is written beside it (its folder may be
    read-only)."""
    proto, folder = _load_proto(model)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    existing = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in existing
    )
    if folder is None:
        return exposed
    return InMemoryModel(exposed.SerializeToString(), folder.resolve())


def matched_tensors(
    reference: onnx.ModelProto, candidate: onnx.ModelProto
) -> list[tuple[str, str]]:
    """Rule 1: (tensor name, producing op) in reference order, present in both graphs."""
    candidate_names = {out for node in candidate.graph.node for out in node.output if out}
    inputs = {i.name for i in reference.graph.input}
    matched: list[tuple[str, str]] = []
    for node in reference.graph.node:
        for out in node.output:
            if out and out in candidate_names and out not in inputs:
                matched.append((out, node.op_type))
    return matched


def compare_tensors(
    reference: ModelSource,
    candidate: ModelSource,
    feeds: Feeds,
    *,
    criteria: Criteria | None = None,
    provider: str = "cpu",
    max_batches: int = 2,
) -> list[TensorComparison]:
    """Compare every matched intermediate tensor (module rules); rows in reference order."""
    judge = criteria or Criteria()
    ref_proto, _ = _load_proto(reference)
    cand_proto, _ = _load_proto(candidate)
    matched = matched_tensors(ref_proto, cand_proto)
    names = [name for name, _ in matched]
    accumulators = {name: MetricAccumulator(name, provider, judge, 0) for name in names}
    ref_session = make_session(_with_outputs(reference, names), provider, optimize=False)
    cand_session = make_session(_with_outputs(candidate, names), provider, optimize=False)
    axes = input_batch_axes(ref_session)
    for index, feed in enumerate(feeds):
        if index >= max_batches:
            break
        ref_values = ref_session.run(names, feed)
        cand_values = cand_session.run(names, feed)
        samples = sample_count(feed, axes)
        for name, ref_value, cand_value in zip(names, ref_values, cand_values, strict=True):
            ref_array, cand_array = np.asarray(ref_value), np.asarray(cand_value)
            if ref_array.dtype.kind in "fc" or cand_array.dtype.kind in "fc":
                accumulators[name].add(ref_array, cand_array, samples=samples)
    rows: list[TensorComparison] = []
    for name, op in matched:
        accumulator = accumulators[name]
        if not accumulator.result.elements:
            continue
        result = accumulator.finish()
        new_nonfinite = result.new_nan + result.new_inf  # counted position by position
        rows.append(
            TensorComparison(
                name=name,
                op=op,
                cosine=result.cosine,
                snr_db=result.snr_db,
                max_abs=result.max_abs,
                new_nonfinite=new_nonfinite,
                passed=result.passed,
                worst_channel_cosine=result.worst_channel_cosine,
                worst_channel=result.worst_channel,
            )
        )
    return rows


def first_divergence(rows: list[TensorComparison]) -> TensorComparison | None:
    """The first tensor, in reference order, that misses the budget."""
    return next((row for row in rows if not row.passed), None)
