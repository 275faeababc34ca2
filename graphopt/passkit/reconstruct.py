"""Sequential reconstruction: fit each layer to the input it will really receive.

A lossy pass that fits every layer to the float model's activations never lets a layer see the
error of the layers compressed before it. This engine measures, for each layer, its input X̃ in
the model as compressed so far next to its input X in the model as the pass received it, so the
pass can fit the layer's new weights Ŵ to the float target: minimise ‖X̃ Ŵ − X W‖. Rules:

1. A :class:`Layer` is one weight fitted as a unit: the activations it multiplies (several when
   nodes share the weight; their statistics are summed) and the axis of their channels.
2. Stages (:func:`stages`): a layer's stage is the number of layers on the longest path from the
   graph's inputs to it. Layers of one stage cannot see each other's error, so they are measured
   in one run; a pass applies a stage's new weights before the next stage is measured.
3. Measuring (:meth:`Reconstruction.measure`): the reference (the model as the pass received it,
   snapshot when the engine opens) and the current model, each cut down to the nodes the
   measured inputs need (:func:`~graphopt.ir.model.prefix_model`), run on the same parts of the
   same feeds. Per input the engine streams H = X̃ᵀX̃, G = X̃ᵀX and the channel sums of X and X̃
   over the valid positions only (padding is left out as the collector leaves it out, its
   rule 8) — never the activations themselves. A run's outputs from both sessions together stay
   within the collector's output budget (its rule 6).
4. Memory: H and G are two K×K float64 matrices per distinct input; a pass splits a stage into
   runs with :func:`~graphopt.data.calibration.chunk_by_budget` and :func:`layer_bytes`.
5. The fit target (:meth:`LayerFit.target`): W* = (H + μI)⁻¹ (G W + μ W) minimises
   ‖X̃ W* − X W‖² + μ‖W* − W‖², μ = λ·mean(diag H) (λ = ``damp``, raised ×10 up to
   :data:`DAMP_RETRIES` times while the Cholesky factor does not exist). The ridge pulls W*
   toward W, not toward 0: with few calibration rows per channel the unconstrained
   W* = H⁻¹ G W fits noise (4 × 128-wide int4 MLP, 64 rows: 3.3× the output error of rounding
   to nearest), and a damped H alone shrinks W* toward zero. A constrained fit (quantized,
   sparse or low-rank) of W* with H as the metric minimises ‖X̃ (Ŵ − W*)‖, which differs from
   ‖X̃ Ŵ − X W‖ by a constant.
6. Each layer's channel means of X and X̃ are kept too (``reference_mean``, ``current_mean``),
   for a bias correction E[X] W − E[X̃] Ŵ; no pass applies one yet.
7. Each model runs once in all, a segment at a time: every measurement runs only the nodes
   between what earlier measurements computed and the inputs now wanted, fed from the
   activations kept of the tensors that nodes still to run read (for the compressed model,
   nodes a pass rewrote after their inputs were measured run in the next segment). The kept
   activations stay in memory within ``Settings.probe_cache_bytes`` (default
   :data:`CACHE_BYTES`; 0 turns the cache off); past it, every later measurement runs the
   prefix of each model from the feeds (:func:`~graphopt.ir.model.prefix_model`), which gives
   the same statistics at more inference.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx.helper import np_dtype_to_tensor_dtype
from scipy import linalg

from graphopt.data.calibration import GRAM_PRODUCT_ROWS, MASK_MAGNITUDE, iter_runs, output_budget
from graphopt.data.feeds import Feeds
from graphopt.data.masking import LayoutDecision, RunMask
from graphopt.errors import DataError
from graphopt.ir.model import Model, Segment, prefix_model, runnable_model, segment_model
from graphopt.ir.ort import InMemoryModel, make_session
from graphopt.settings import Settings

logger = logging.getLogger(__name__)

DAMP_RETRIES = 4
CACHE_BYTES = 1 << 30
"""Rule 7's default budget (``Settings.probe_cache_bytes`` overrides it; 0 turns it off)."""


@dataclass(frozen=True)
class LayerInput:
    """An activation a layer's weight multiplies, with the axis of its reduction channels."""

    tensor: str
    channel_axis: int = -1


@dataclass(frozen=True)
class Layer:
    """Rule 1: one weight fitted as a unit. ``key`` names it in the pass's bookkeeping."""

    key: str
    inputs: tuple[LayerInput, ...]
    nodes: tuple[gs.Node, ...] = field(default=(), compare=False, hash=False)
    channels: int = 0
    """K, the reduction size of one input's rows (sizes :func:`layer_bytes`)."""


def layer_bytes(layer: Layer) -> dict[str, int]:
    """Rule 4: the bytes of H and G :meth:`Reconstruction.measure` holds per distinct input."""
    return {item.tensor: 2 * 8 * layer.channels * layer.channels for item in layer.inputs}


def stages(graph: gs.Graph, layers: Sequence[Layer]) -> list[list[Layer]]:
    """Rule 2: ``layers`` grouped by how many layers lie upstream of them, earliest first.

    ``graph`` must be topologically sorted; only main-graph nodes count (a layer whose nodes
    are all in a body, or not in the graph, is in stage 0).
    """
    owner = {id(node): layer for layer in layers for node in layer.nodes}
    depth_of: dict[int, int] = {}
    stage_of: dict[str, int] = {}
    for node in graph.nodes:
        depth = max((depth_of.get(id(t), 0) for t in node.inputs), default=0)
        layer = owner.get(id(node))
        if layer is not None:
            stage_of[layer.key] = max(stage_of.get(layer.key, 0), depth)
            depth += 1
        for tensor in node.outputs:
            depth_of[id(tensor)] = depth
    grouped: dict[int, list[Layer]] = {}
    for layer in layers:
        grouped.setdefault(stage_of.get(layer.key, 0), []).append(layer)
    return [grouped[key] for key in sorted(grouped)]


class PairStats:
    """Rule 3: H = X̃ᵀX̃, G = X̃ᵀX and channel sums of one input, over valid positions."""

    def __init__(self, name: str, layout: LayoutDecision) -> None:
        self.name = name
        self.layout = layout
        self.rows = 0
        self.hessian: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.current_sum: np.ndarray | None = None
        self.reference_sum: np.ndarray | None = None
        self._current: list[np.ndarray] = []
        self._reference: list[np.ndarray] = []
        self._buffered = 0

    def update(
        self, reference: np.ndarray, current: np.ndarray, axis: int, mask: RunMask | None
    ) -> None:
        if reference.shape != current.shape:
            raise DataError(
                f"sequential fit: {self.name} is {list(current.shape)} in the compressed model "
                f"but {list(reference.shape)} in the reference; the pass changed its shape"
            )
        if mask is not None:
            reference = self.layout.apply(mask, reference, axis).value
            selected = self.layout.apply(mask, current, axis)
            current, axis = selected.value, selected.channel_axis
            if axis is None:
                return
        self._current.append(_rows(current, axis))
        self._reference.append(_rows(reference, axis))
        self._buffered += self._current[-1].shape[0]
        if self._buffered >= GRAM_PRODUCT_ROWS:
            self.finish()

    def finish(self) -> None:
        """Fold buffered rows into the statistics (products in float32, sums in float64)."""
        if not self._current:
            return
        current = np.concatenate(self._current)
        reference = np.concatenate(self._reference)
        self._current, self._reference, self._buffered = [], [], 0
        hessian = (current.T @ current).astype(np.float64)
        cross = (current.T @ reference).astype(np.float64)
        current_sum = current.sum(axis=0, dtype=np.float64)
        reference_sum = reference.sum(axis=0, dtype=np.float64)
        if self.hessian is None or self.cross is None:
            self.hessian, self.cross = hessian, cross
            self.current_sum, self.reference_sum = current_sum, reference_sum
        else:
            if hessian.shape != self.hessian.shape:
                raise DataError(
                    f"sequential fit: {self.name} has {hessian.shape[0]} channels in one feed "
                    f"and {self.hessian.shape[0]} in another"
                )
            self.hessian += hessian
            self.cross += cross
            self.current_sum += current_sum
            self.reference_sum += reference_sum
        self.rows += current.shape[0]


def _rows(values: np.ndarray, axis: int) -> np.ndarray:
    """[positions, channels] float32 rows with non-finite and mask-sized values as 0."""
    rows = np.moveaxis(np.asarray(values), axis, -1)
    rows = rows.reshape(-1, rows.shape[-1]).astype(np.float32, copy=False)
    return np.where(np.isfinite(rows) & (np.abs(rows) < MASK_MAGNITUDE), rows, 0.0)


@dataclass
class LayerFit:
    """What :meth:`Reconstruction.measure` found for one layer (its inputs summed)."""

    hessian: np.ndarray
    """H = Σ X̃ᵀX̃ (K×K, float64)."""
    cross: np.ndarray
    """G = Σ X̃ᵀX (K×K, float64)."""
    current_mean: np.ndarray
    reference_mean: np.ndarray
    rows: int

    def target(self, weight: np.ndarray, damp: float = 0.01) -> np.ndarray:
        """Rule 5: W* (K×N, float64) for a [K, N] ``weight``; ``weight`` itself when X̃ = X."""
        matrix = np.asarray(weight, np.float64)
        factor, lower, ridge = damped_cholesky(self.hessian, damp)
        return linalg.cho_solve((factor, lower), self.cross @ matrix + ridge * matrix)


def damped_cholesky(hessian: np.ndarray, damp: float) -> tuple[np.ndarray, bool, float]:
    """Lower Cholesky factor of H + μI, μ = λ·mean(diag H) with λ raised ×10 while it does not
    exist: (factor, True, μ) for :func:`scipy.linalg.cho_solve` (``[:2]``).

    Dead channels (diag 0: never active in the data) get a unit diagonal. Raises
    :class:`numpy.linalg.LinAlgError` when H is not finite or no λ tried works.
    """
    if not np.all(np.isfinite(hessian)):
        raise np.linalg.LinAlgError("the Hessian has non-finite entries")
    h = np.array(hessian, dtype=np.float64)
    diagonal = np.diag(h).copy()
    dead = diagonal <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    for attempt in range(DAMP_RETRIES + 1):
        damped = h.copy()
        damped[np.diag_indices_from(damped)] += damp * mean
        try:
            factor, lower = linalg.cho_factor(damped, lower=True)
            return factor, lower, damp * mean
        except linalg.LinAlgError:
            if attempt == DAMP_RETRIES:
                break
            logger.info("sequential fit: H not positive definite with damp=%g; trying ×10", damp)
            damp *= 10
    raise np.linalg.LinAlgError(f"H is not positive definite even with damp={damp:g}")


class _Stream:
    """Rule 7: one model's side of the measurements, run a segment at a time.

    ``frontier[i]`` holds, for part ``i`` of the feeds, every tensor already computed that a
    node still to run reads (the part's feed to begin with); ``done`` the nodes that ran. Past
    the byte budget the frontier is dropped and every later run is a prefix from the feeds.
    """

    def __init__(self, label: str, parts: Sequence[Mapping[str, np.ndarray]]) -> None:
        self.label = label
        self.frontier: list[dict[str, np.ndarray]] | None = [dict(part) for part in parts]
        self.done: set[str] = set()
        self._segment: Segment | None = None

    def prepare(self, runnable: InMemoryModel, wanted: Sequence[str]) -> InMemoryModel:
        """The model that computes ``wanted``: a segment from the frontier, else a prefix."""
        self._segment = None
        if self.frontier is not None:
            available = {
                name: np_dtype_to_tensor_dtype(array.dtype)
                for name, array in self.frontier[0].items()
            }
            try:
                self._segment = segment_model(runnable, wanted, available, self.done)
                return self._segment.model
            except ValueError as error:  # a frontier that lost a tensor: measure from the feeds
                logger.info("%s: %s; running prefixes from here on", self.label, error)
                self.frontier = None
        return prefix_model(runnable, wanted)

    @property
    def output_names(self) -> tuple[str, ...] | None:
        return None if self._segment is None else self._segment.outputs

    def feed(self, index: int, part: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._segment is None or self.frontier is None:
            return dict(part)
        return {name: self.frontier[index][name] for name in self._segment.inputs}

    def keep(self, index: int, values: Mapping[str, np.ndarray]) -> None:
        """Fold a segment run's outputs into part ``index``'s frontier."""
        if self._segment is None or self.frontier is None:
            return
        live = self._segment.live
        merged = {**self.frontier[index], **values}
        self.frontier[index] = {name: array for name, array in merged.items() if name in live}

    def commit(self) -> None:
        if self._segment is not None:
            self.done |= self._segment.nodes

    def bytes(self) -> int:
        if self.frontier is None:
            return 0
        return sum(array.nbytes for part in self.frontier for array in part.values())

    def drop(self) -> None:
        if self.frontier is not None:
            logger.info(
                "%s: activation cache over budget; running prefixes from here on", self.label
            )
        self.frontier = None


class Reconstruction(contextlib.AbstractContextManager["Reconstruction"]):
    """Rule 3's two models side by side. Open it before the pass changes ``model``.

    ``label`` prefixes log lines and progress; ``on_batch`` is called with each feed's index.
    """

    def __init__(
        self,
        model: Model,
        feeds: Feeds,
        *,
        settings: Settings | None = None,
        label: str = "sequential",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model
        self.feeds = feeds
        self.settings = Settings() if settings is None else settings
        self.label = label
        self.on_batch = on_batch
        self.runs = 0
        self._stack = contextlib.ExitStack()
        self._reference: InMemoryModel = self._stack.enter_context(runnable_model(model))
        self._shapes = {name: tensor.shape for name, tensor in model.graph.tensors().items()}
        self._parts: list[tuple[int, dict[str, np.ndarray], RunMask | None]] | None = None
        self._streams: tuple[_Stream, _Stream] | None = None

    def __exit__(self, *_exc: object) -> None:
        self._stack.close()

    def measure(self, layers: Sequence[Layer]) -> dict[str, LayerFit]:
        """Rule 3 for ``layers`` against the model as it is now; keyed by :attr:`Layer.key`."""
        axes = _input_axes(layers)
        names = list(axes)
        if not names:
            return {}
        mask_input = self.feeds.mask_input
        mask_dims = self._shapes.get(mask_input) if mask_input is not None else None
        pairs = {
            name: PairStats(name, LayoutDecision(self._shapes.get(name), mask_dims))
            for name in names
        }
        with runnable_model(self.model) as current_model:
            parts = self._split(current_model, names)
            reference_stream, current_stream = self._open_streams(parts)
            reference = self._session(reference_stream.prepare(self._reference, names))
            current = self._session(current_stream.prepare(current_model, names))
            seen = -1
            for position, (index, part, mask) in enumerate(parts):
                expected = self._run(reference, reference_stream, names, position, part)
                got = self._run(current, current_stream, names, position, part)
                for name, want, have in zip(names, expected, got, strict=True):
                    pairs[name].update(want, have, axes[name], mask)
                del expected, got
                if index > seen:
                    seen = index
                    if self.on_batch is not None:
                        self.on_batch(index)
            del current, reference
        for stream in (reference_stream, current_stream):
            stream.commit()
        if reference_stream.bytes() + current_stream.bytes() > cache_budget(self.settings):
            reference_stream.drop()
            current_stream.drop()
        self.runs += 1
        for pair in pairs.values():
            pair.finish()
        if seen < 0:
            raise DataError(f"{self.feeds.description}: no samples to calibrate on")
        return {layer.key: _layer_fit(layer, pairs) for layer in layers}

    def _split(
        self, current_model: InMemoryModel, names: Sequence[str]
    ) -> list[tuple[int, dict[str, np.ndarray], RunMask | None]]:
        """Rule 3's parts of the feeds, decided on the first measurement and kept."""
        if self._parts is None:
            sessions = [
                self._session(prefix_model(runnable, names))
                for runnable in (self._reference, current_model)
            ]
            budget = output_budget(self.settings)
            self._parts = list(iter_runs(sessions, names, self.feeds, budget))
        return self._parts

    def _open_streams(
        self, parts: Sequence[tuple[int, dict[str, np.ndarray], RunMask | None]]
    ) -> tuple[_Stream, _Stream]:
        if self._streams is None:
            feeds = [part for _, part, _ in parts]
            self._streams = (
                _Stream(f"{self.label} (reference)", feeds),
                _Stream(f"{self.label} (compressed)", feeds),
            )
            if cache_budget(self.settings) == 0:
                for stream in self._streams:
                    stream.frontier = None
        return self._streams

    def _session(self, model: InMemoryModel) -> ort.InferenceSession:
        return make_session(model, optimize=False, arena=False, threads=self.settings.threads)

    @staticmethod
    def _run(
        session: ort.InferenceSession,
        stream: _Stream,
        names: Sequence[str],
        position: int,
        part: Mapping[str, np.ndarray],
    ) -> list[np.ndarray]:
        outputs = stream.output_names or tuple(names)
        values = session.run(list(outputs), stream.feed(position, part))
        arrays = dict(zip(outputs, (np.asarray(value) for value in values), strict=True))
        stream.keep(position, arrays)
        return [arrays[name] for name in names]


def cache_budget(settings: Settings) -> int:
    """Rule 7: bytes of activations both streams may keep between measurements."""
    if settings.probe_cache_bytes is not None:
        return settings.probe_cache_bytes
    return CACHE_BYTES


def _input_axes(layers: Iterable[Layer]) -> dict[str, int]:
    axes: dict[str, int] = {}
    for layer in layers:
        for item in layer.inputs:
            if axes.setdefault(item.tensor, item.channel_axis) != item.channel_axis:
                raise ValueError(f"conflicting channel axes requested for {item.tensor}")
    return axes


def _layer_fit(layer: Layer, pairs: Mapping[str, PairStats]) -> LayerFit:
    names = list(dict.fromkeys(item.tensor for item in layer.inputs))
    measured = [pairs[name] for name in names]
    if any(pair.hessian is None for pair in measured):
        raise DataError(f"sequential fit: no valid positions of {names[0]} in the data")
    hessian = sum(pair.hessian for pair in measured)  # type: ignore[misc]
    cross = sum(pair.cross for pair in measured)  # type: ignore[misc]
    rows = sum(pair.rows for pair in measured)
    current_sum = sum(pair.current_sum for pair in measured)  # type: ignore[misc]
    reference_sum = sum(pair.reference_sum for pair in measured)  # type: ignore[misc]
    return LayerFit(
        np.asarray(hessian),
        np.asarray(cross),
        np.asarray(current_sum) / max(rows, 1),
        np.asarray(reference_sum) / max(rows, 1),
        rows,
    )
