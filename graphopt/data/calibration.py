"""The calibration collector: run the current graph batch by batch, keep only running statistics.

Rules:

1. Passes say what they need per tensor with a :class:`StatRequest`; one collector run serves all
   requests, exposing the requested tensors as extra outputs of one ONNX Runtime session.
2. Only running statistics are kept (min/max, a histogram, per-channel abs-max, per-channel sums of
   squares, XᵀX), so peak memory is one batch of activations plus the statistics, whatever the
   number of samples.
3. Histograms are symmetric around zero with a fixed bin count; when a value falls outside the
   range, the range doubles and adjacent bins merge (exact re-binning), as often as needed.
4. Non-finite values are left out of every statistic and counted. A tensor holding ±inf or
   values of magnitude ≥ 1e30 (attention masks filled with ``finfo.min``) is marked
   unquantizable with its reason; a tensor with no finite value at all likewise.
5. Ranges for quantization come from :func:`calibrated_range` with one of four calibrators:
   ``minmax``, ``percentile``, ``entropy`` (KL divergence, as TensorRT) or ``mse``.
6. Memory is bounded on large models. Before the first batch, one sample is run to measure the
   bytes a sample's requested outputs take; sequence lengths and image sizes may vary from feed
   to feed, so a feed whose samples hold more input values than every feed measured so far is
   measured again (outputs grow with inputs; with varying shapes in random order that is a few
   extra single-sample runs, not one per shape); when a batch's outputs would exceed
   :func:`output_budget` (:data:`OUTPUT_BUDGET_BYTES` unless the run's
   :class:`~graphopt.settings.Settings` set ``calibration_output_bytes``), batches are split along
   axis 0 (statistics do not depend on how samples are grouped, except histogram bin edges).
   Values are reduced in chunks of :data:`VALUE_CHUNK` so float64 copies stay small. Passes that
   need XᵀX of many tensors split them into runs with :func:`chunk_by_budget` and
   :func:`gram_budget`, so the Gram matrices of one run take at most a quarter of the model's
   weight bytes (at least 256 MiB), or the settings' ``gram_budget_bytes``.
7. The collector's session runs the graph as written (ONNX Runtime's rewrites off, whatever the
   settings' validation level: requested tensors keep their names), with the settings' threads.
8. Padding: when the feeds name a mask input (``Feeds.mask_input``, see
   :mod:`graphopt.data.masking`), every statistic of a tensor laid out [batch, sequence, …] (or
   sequence-first, or flattened; decided per tensor by masking rule 4, with the graph's inferred
   shapes) counts the valid positions only; other tensors are untouched.
   Each tensor's ``padding`` says how many positions were left out, and one log line sums them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from graphopt.data.feeds import Feeds
from graphopt.data.masking import LayoutDecision, RunMask, run_mask
from graphopt.errors import DataError
from graphopt.ir.model import Model, runnable_model
from graphopt.ir.ort import make_session
from graphopt.settings import Settings

logger = logging.getLogger(__name__)

HISTOGRAM_BINS = 4096
GRAM_PRODUCT_ROWS = 1024
FLOAT32_PRODUCT_LIMIT = 1e15
"""Above this magnitude, sums of squares over many rows could overflow float32."""
MASK_MAGNITUDE = 1e30
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
OUTPUT_BUDGET_BYTES = 512 * 1024 * 1024
"""Most bytes of requested outputs one ONNX Runtime run may return (rule 6)."""
VALUE_CHUNK = 1 << 22
GRAM_BUDGET_FRACTION = 0.25
GRAM_BUDGET_MIN_BYTES = 256 * 1024 * 1024

Item = TypeVar("Item")


@dataclass(frozen=True)
class StatRequest:
    """What to collect for one tensor. ``channel_axis`` is the axis of per-channel statistics."""

    tensor: str
    minmax: bool = True
    histogram: bool = False
    channel_absmax: bool = False
    channel_sumsq: bool = False
    gram: bool = False
    channel_axis: int = -1

    def merge(self, other: StatRequest) -> StatRequest:
        if other.channel_axis != self.channel_axis and (
            other.channel_absmax or other.channel_sumsq or other.gram
        ):
            raise ValueError(f"conflicting channel axes requested for {self.tensor}")
        return StatRequest(
            tensor=self.tensor,
            minmax=self.minmax or other.minmax,
            histogram=self.histogram or other.histogram,
            channel_absmax=self.channel_absmax or other.channel_absmax,
            channel_sumsq=self.channel_sumsq or other.channel_sumsq,
            gram=self.gram or other.gram,
            channel_axis=self.channel_axis,
        )


class RunningHistogram:
    """Histogram of values over [-limit, limit] that doubles its range as needed (rule 3)."""

    def __init__(self, bins: int = HISTOGRAM_BINS) -> None:
        if bins % 4:
            raise ValueError("bins must be a multiple of 4")
        self.bins = bins
        self.limit = 0.0
        self.counts = np.zeros(bins, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        if not values.size:
            return
        peak = float(np.max(np.abs(values)))
        if self.limit == 0.0:
            self.limit = peak if peak > 0 else 1e-8
        while peak > self.limit:
            self._double()
        index = np.floor((values + self.limit) / (2 * self.limit) * self.bins).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _double(self) -> None:
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        doubled = np.zeros_like(self.counts)
        quarter = self.bins // 4
        doubled[quarter : quarter + merged.size] = merged
        self.counts = doubled
        self.limit *= 2

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(-self.limit, self.limit, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        edges = self.edges
        return (edges[:-1] + edges[1:]) / 2

    def abs_histogram(self) -> tuple[np.ndarray, float]:
        """Counts of |x| over [0, limit] in bins/2 bins, and the bin width."""
        half = self.bins // 2
        folded = self.counts[half:] + self.counts[:half][::-1]
        return folded, self.limit / half


@dataclass
class TensorStats:
    """Running statistics of one tensor (rule 2)."""

    name: str
    count: int = 0
    nonfinite: int = 0
    masked: int = 0
    padding: int = 0
    """Positions left out as padding (rule 8)."""
    padded_values: int = 0
    """Values left out as padding (rule 8): what the model computed beyond ``count``."""
    minimum: float = math.inf
    maximum: float = -math.inf
    histogram: RunningHistogram | None = None
    channel_absmax: np.ndarray | None = None
    channel_sumsq: np.ndarray | None = None
    gram: np.ndarray | None = None
    rows: int = 0
    layout: LayoutDecision = field(default_factory=LayoutDecision, repr=False)
    """How the padding mask applies to this tensor (rule 8, decided on the first clear run)."""
    _row_buffer: list[np.ndarray] = field(default_factory=list, repr=False)
    _buffered_rows: int = field(default=0, repr=False)

    @property
    def unquantizable_reason(self) -> str | None:
        """Rule 4."""
        if self.masked:
            return f"holds {self.masked} values of magnitude ≥ 1e30 or ±inf (an attention mask?)"
        if self.count == 0:
            return "no finite values seen during calibration"
        return None

    def update(self, array: np.ndarray, request: StatRequest, mask: RunMask | None = None) -> None:
        """Fold one run's value in; with ``mask``, only its valid positions (rule 8)."""
        values = np.asarray(array)
        if values.dtype.kind not in "fc":
            return
        per_channel = request.channel_absmax or request.channel_sumsq or request.gram
        axis: int | None = request.channel_axis if per_channel else None
        if mask is not None:
            selected = self.layout.apply(mask, values, axis)
            self.padding += selected.dropped
            self.padded_values += values.size - selected.value.size
            values, axis = selected.value, selected.channel_axis
        if request.minmax or request.histogram:
            self._update_values(values, request)
        if per_channel and axis is not None:
            self._update_channels(values, axis, request)

    def _update_values(self, values: np.ndarray, request: StatRequest) -> None:
        flat = values.reshape(-1)
        for start in range(0, flat.size, VALUE_CHUNK):  # rule 6: small float64 copies
            chunk = flat[start : start + VALUE_CHUNK].astype(np.float64, copy=False)
            finite_mask = np.isfinite(chunk)
            infinite = int(np.isinf(chunk).sum())
            self.nonfinite += int(chunk.size - finite_mask.sum())
            finite = chunk[finite_mask]
            del chunk, finite_mask
            huge = np.abs(finite) >= MASK_MAGNITUDE
            self.masked += int(huge.sum()) + infinite
            finite = finite[~huge]
            if finite.size:
                self.count += finite.size
                self.minimum = min(self.minimum, float(finite.min()))
                self.maximum = max(self.maximum, float(finite.max()))
            if request.histogram:
                self.histogram = self.histogram or RunningHistogram()
                self.histogram.add(finite)

    def _update_channels(self, values: np.ndarray, axis: int, request: StatRequest) -> None:
        if values.ndim == 0:
            return
        rows = np.moveaxis(values, axis, -1)
        rows = rows.reshape(-1, rows.shape[-1])
        if rows.dtype.itemsize < 4:  # float16 products would overflow
            rows = rows.astype(np.float32)
        rows = np.where(np.isfinite(rows) & (np.abs(rows) < MASK_MAGNITUDE), rows, 0.0)
        known = (self.channel_absmax, self.channel_sumsq, self.gram, *self._row_buffer[:1])
        seen = next((stat.shape[-1] for stat in known if stat is not None), None)
        if seen is not None and seen != rows.shape[1]:
            raise DataError(
                f"calibration: {self.name} has {rows.shape[1]} channels on axis {axis} in one "
                f"feed and {seen} in another; per-channel statistics need a fixed channel axis"
            )
        self.rows += rows.shape[0]
        if request.channel_absmax:
            peak = np.abs(rows).max(axis=0)
            self.channel_absmax = (
                peak if self.channel_absmax is None else np.maximum(self.channel_absmax, peak)
            )
        if request.channel_sumsq:
            sumsq = np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
            self.channel_sumsq = sumsq if self.channel_sumsq is None else self.channel_sumsq + sumsq
        if request.gram:
            self._accumulate_gram(rows)

    def _accumulate_gram(self, rows: np.ndarray) -> None:
        """XᵀX: rows are buffered until a product is worth a BLAS call (small batches would make
        every call a memory-bound pass over a K×K matrix); each product is added to the float64
        total, computed in float32 unless values are large enough to overflow it."""
        self._row_buffer.append(rows.astype(np.float32, copy=False))
        self._buffered_rows += rows.shape[0]
        if self._buffered_rows >= GRAM_PRODUCT_ROWS:
            self.finish()

    def finish(self) -> None:
        """Fold buffered rows into the exposed statistics (the collector calls this)."""
        if not self._row_buffer:
            return
        rows = np.concatenate(self._row_buffer)
        self._row_buffer, self._buffered_rows = [], 0
        if rows.size and float(np.abs(rows).max()) > FLOAT32_PRODUCT_LIMIT:
            rows = rows.astype(np.float64)
        product = (rows.T @ rows).astype(np.float64, copy=False)
        self.gram = product if self.gram is None else self.gram + product


def merge_requests(requests: Iterable[StatRequest]) -> dict[str, StatRequest]:
    merged: dict[str, StatRequest] = {}
    for request in requests:
        merged[request.tensor] = (
            merged[request.tensor].merge(request) if request.tensor in merged else request
        )
    return merged


def collect(
    model: Model,
    feeds: Feeds,
    requests: Sequence[StatRequest],
    *,
    on_batch: Callable[[int], None] | None = None,
    max_batches: int | None = None,
    settings: Settings | None = None,
) -> dict[str, TensorStats]:
    """Run ``model`` on ``feeds`` and return the requested statistics (module rules).

    ``settings``: the run's (a pass gives ``context.settings``); None: the defaults.
    """
    settings = Settings() if settings is None else settings
    merged = merge_requests(requests)
    names = list(merged)
    stats = {name: TensorStats(name) for name in names}
    mask_input = feeds.mask_input if isinstance(feeds, Feeds) else None
    if mask_input is not None:
        tensors = model.graph.tensors()
        mask_tensor = tensors.get(mask_input)
        mask_dims = None if mask_tensor is None else mask_tensor.shape
        for name in names:
            inferred = tensors[name].shape if name in tensors else None
            stats[name].layout = LayoutDecision(inferred, mask_dims)
    if not names:
        return stats
    batches = 0
    with runnable_model(model, extra_outputs=names) as runnable:
        session = make_session(runnable, optimize=False, arena=False, threads=settings.threads)
        available = {output.name for output in session.get_outputs()}
        missing = [name for name in names if name not in available]
        if missing:
            raise ValueError(f"tensors not produced by the graph: {', '.join(missing[:5])}")
        positions = padding = 0
        for index, part, mask in iter_runs(
            [session], names, feeds, output_budget(settings), max_batches=max_batches
        ):
            if mask is not None:
                positions += mask.valid.size
                padding += mask.padding
            values = session.run(names, part)
            for name, value in zip(names, values, strict=True):
                stats[name].update(np.asarray(value), merged[name], mask)
            del values
            if index >= batches:
                batches = index + 1
                if on_batch is not None:
                    on_batch(index)
        del session
    for tensor_stats in stats.values():
        tensor_stats.finish()
    if batches == 0:
        raise DataError(f"{feeds.description}: no samples to calibrate on")
    if padding:
        masked = sum(1 for s in stats.values() if s.padding)
        logger.info(
            "calibration: %s marks %d of %d positions as padding; %d of %d tensors counted "
            "valid positions only",
            mask_input,
            padding,
            positions,
            masked,
            len(stats),
        )
    skipped = {name: s.nonfinite for name, s in stats.items() if s.nonfinite}
    if skipped:
        logger.info("calibration skipped non-finite values in %d tensors", len(skipped))
    return stats


def iter_runs(
    sessions: Sequence[ort.InferenceSession],
    names: Sequence[str],
    feeds: Iterable[Mapping[str, np.ndarray]],
    budget: int,
    *,
    max_batches: int | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray], RunMask | None]]:
    """The runs rule 6 makes of ``feeds``: (feed index, part of the feed, its padding mask).

    Each part is small enough that every one of ``sessions`` returns at most ``budget`` bytes
    of ``names`` for it together (one sample of each is run to measure that); the mask comes
    from the feeds' mask input (rule 8), None without one.
    """
    mask_input = feeds.mask_input if isinstance(feeds, Feeds) else None
    share = max(1, budget // max(len(sessions), 1))
    probed: list[tuple[int, int]] = []  # (input values per sample, samples per run)
    for index, feed in enumerate(feeds):
        if max_batches is not None and index >= max_batches:
            break
        per_run = _known_samples_per_run(probed, feed)
        if per_run is None:
            per_run = min(_samples_per_run(each, list(names), feed, share) for each in sessions)
            probed.append((_values_per_sample(feed), per_run))
        for part in _split_feed(feed, per_run):
            yield index, part, run_mask(part, mask_input)


def _batch_length(feed: Mapping[str, np.ndarray]) -> int | None:
    """The common length of axis 0 of every input, or None when inputs do not share one."""
    lengths = {np.asarray(value).shape[0] if np.ndim(value) else None for value in feed.values()}
    if len(lengths) != 1:
        return None
    length = next(iter(lengths))
    return length if length is not None and length > 1 else None


def _values_per_sample(feed: Mapping[str, np.ndarray]) -> int:
    """What a sample's output size grows with (rule 6): its input values, all inputs together."""
    return sum(int(np.prod(np.shape(value)[1:], dtype=np.int64)) for value in feed.values())


def _known_samples_per_run(
    probed: Sequence[tuple[int, int]], feed: Mapping[str, np.ndarray]
) -> int | None:
    """Rule 6 without a new probe: the samples per run measured on a feed whose samples were at
    least as large as this feed's (the smallest such), or None when every probe was smaller."""
    size = _values_per_sample(feed)
    larger = [(values, per_run) for values, per_run in probed if values >= size]
    return min(larger)[1] if larger else None


def _split_feed(
    feed: Mapping[str, np.ndarray], samples_per_run: int
) -> Iterator[dict[str, np.ndarray]]:
    length = _batch_length(feed)
    if length is None or length <= samples_per_run:
        yield dict(feed)
        return
    for start in range(0, length, samples_per_run):
        yield {
            name: np.asarray(value)[start : start + samples_per_run] for name, value in feed.items()
        }


def _samples_per_run(
    session: ort.InferenceSession, names: list[str], feed: Mapping[str, np.ndarray], budget: int
) -> int:
    """Rule 6: how many samples one run may take so its outputs stay within ``budget`` bytes."""
    length = _batch_length(feed)
    if length is None:
        return 1 << 30
    one = {name: np.asarray(value)[:1] for name, value in feed.items()}
    try:
        sample_bytes = sum(np.asarray(v).nbytes for v in session.run(names, one))
    except Exception:
        logger.debug("calibration: cannot run a single sample; batches are not split")
        return 1 << 30
    per_run = max(1, budget // max(sample_bytes, 1))
    if per_run < length:
        logger.info(
            "calibration: %d MiB of outputs per sample; running %d samples at a time",
            sample_bytes >> 20,
            per_run,
        )
    return per_run


def output_budget(settings: Settings | None = None) -> int:
    """Rule 6: bytes of requested outputs one calibration run may return."""
    if settings is not None and settings.calibration_output_bytes is not None:
        return settings.calibration_output_bytes
    return OUTPUT_BUDGET_BYTES


def gram_budget(model: Model, settings: Settings | None = None) -> int:
    """Rule 6: bytes of XᵀX one calibration run may hold for ``model`` (a pass gives
    ``context.settings``; None: the built-in rule)."""
    if settings is not None and settings.gram_budget_bytes is not None:
        return settings.gram_budget_bytes
    return max(GRAM_BUDGET_MIN_BYTES, int(GRAM_BUDGET_FRACTION * model.weight_bytes()))


def gram_bytes(channels: int) -> int:
    """Bytes of one float64 channels × channels Gram matrix."""
    return 8 * channels * channels


def chunk_by_budget(
    items: Sequence[Item], tensors_of: Callable[[Item], Mapping[str, int]], budget: int
) -> list[list[Item]]:
    """Consecutive ``items`` grouped so each group's distinct tensors cost at most ``budget``.

    ``tensors_of(item)`` maps the tensors an item needs statistics of to their cost in bytes;
    a tensor shared by items of one group counts once. An item over budget alone is a group.
    """
    groups: list[list[Item]] = []
    current: list[Item] = []
    seen: dict[str, int] = {}
    for item in items:
        needed = {name: cost for name, cost in tensors_of(item).items() if name not in seen}
        if current and sum(seen.values()) + sum(needed.values()) > budget:
            groups.append(current)
            current, seen = [], {}
            needed = dict(tensors_of(item))
        current.append(item)
        seen.update(needed)
    if current:
        groups.append(current)
    return groups


# --- calibrators (rule 5) --------------------------------------------------------------------


def calibrated_range(
    stats: TensorStats,
    calibrator: str,
    *,
    symmetric: bool = False,
    percentile: float = 99.999,
    levels: int = 256,
) -> tuple[float, float]:
    """The (low, high) range to quantize ``stats``' tensor with; always contains zero."""
    if calibrator not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {calibrator!r}")
    low, high = min(stats.minimum, 0.0), max(stats.maximum, 0.0)
    if calibrator != "minmax":
        if stats.histogram is None:
            raise ValueError(f"calibrator {calibrator} needs a histogram of {stats.name}")
        if calibrator == "percentile":
            low, high = _percentile_range(stats.histogram, percentile, low, high)
        elif calibrator == "entropy":
            threshold = _entropy_threshold(stats.histogram, levels)
            low, high = max(low, -threshold), min(high, threshold)
        else:
            low, high = _mse_range(stats.histogram, low, high, symmetric, levels)
    if symmetric:
        bound = max(abs(low), abs(high))
        return -bound, bound
    return min(low, 0.0), max(high, 0.0)


def _percentile_range(
    histogram: RunningHistogram, percentile: float, low: float, high: float
) -> tuple[float, float]:
    counts = histogram.counts
    total = counts.sum()
    if total == 0:
        return low, high
    cumulative = np.cumsum(counts) / total
    edges = histogram.edges
    tail = (100.0 - percentile) / 100.0
    low_index = int(np.searchsorted(cumulative, tail, side="left"))
    high_index = int(np.searchsorted(cumulative, 1.0 - tail, side="left"))
    return max(low, float(edges[low_index])), min(
        high, float(edges[min(high_index + 1, len(edges) - 1)])
    )


def _entropy_threshold(histogram: RunningHistogram, levels: int) -> float:
    """TensorRT-style: the |x| clipping threshold minimising KL(P || Q)."""
    counts, width = histogram.abs_histogram()
    counts = counts.astype(np.float64)
    nonzero = np.nonzero(counts)[0]
    if nonzero.size == 0:
        return histogram.limit
    last = int(nonzero[-1]) + 1
    target = levels // 2
    if last <= target:
        return last * width
    best_divergence, best_stop = math.inf, last
    step = max(1, (last - target) // 256)
    for stop in range(target, last + 1, step):
        reference = counts[:stop].copy()
        reference[stop - 1] += counts[stop:].sum()
        chunks = np.array_split(counts[:stop], target)
        expanded = []
        for chunk in chunks:
            used = chunk > 0
            share = chunk.sum() / max(int(used.sum()), 1)
            expanded.append(np.where(used, share, 0.0))
        candidate = np.concatenate(expanded)
        p = reference / reference.sum()
        q_total = candidate.sum()
        if q_total == 0:
            continue
        q = candidate / q_total
        mask = p > 0
        with np.errstate(divide="ignore"):
            divergence = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if divergence < best_divergence:
            best_divergence, best_stop = divergence, stop
    return best_stop * width


def _mse_range(
    histogram: RunningHistogram, low: float, high: float, symmetric: bool, levels: int
) -> tuple[float, float]:
    """The clipping of [low, high] with the least expected squared quantization error.

    Each end is searched over 96 fractions of its extent while the other stays fixed, twice
    (coordinate descent), so a one-sided outlier does not drag the other end in.
    """
    centers, counts = histogram.centers, histogram.counts.astype(np.float64)
    used = counts > 0
    centers, counts = centers[used], counts[used]
    if not counts.size:
        return low, high

    def error(lo: float, hi: float) -> float:
        if symmetric:
            bound = max(abs(lo), abs(hi))
            lo, hi = -bound, bound
        scale = (hi - lo) / (levels - 1) if hi > lo else 1.0
        quantized = np.clip(np.round((centers - lo) / scale), 0, levels - 1) * scale + lo
        return float(np.sum(counts * (centers - quantized) ** 2))

    fractions = np.linspace(0.05, 1.0, 96)
    best_low, best_high = low, high
    for _ in range(2):
        best_high = high * min(fractions, key=lambda f: error(best_low, high * f))
        if not symmetric:
            best_low = low * min(fractions, key=lambda f: error(low * f, best_high))
    if symmetric:
        bound = max(abs(best_low), abs(best_high))
        return -bound, bound
    return best_low, best_high
