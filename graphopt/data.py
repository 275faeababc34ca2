"""Calibration and validation data: one convention for every pass and for validation.

Accepted sources (GUIDE §4):

1. an ``.npz`` file with one array per model input, axis 0 = samples, served in batches;
2. a folder of ``.npz`` files, each one ready feed (shapes may differ per file);
3. any Python iterable of ``dict[str, np.ndarray]`` feeds;
4. an object with ONNX Runtime's ``CalibrationDataReader`` interface (``get_next()`` returning a
   feed or ``None``).

Every feed is checked against the model's inputs: a missing or unknown input name, a dtype of
another kind (float vs int vs bool), a wrong rank or a wrong static dimension is a one-line
:class:`~graphopt.errors.DataError` naming the input, what was expected and what came. Dtypes of
the same kind are cast (float64 → float32). One-shot iterables and readers are read once and kept
(inputs only), so that calibration and validation can both iterate.

Without data, :func:`synthesize` makes inputs that respect their meaning: token ids below the size
of the embedding table they index, attention masks of ones, token-type ids of zeros, dynamic
dimensions filled with the same value wherever the same symbol appears; always seeded.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_SYNTHETIC_SAMPLES = 16
DEFAULT_DYNAMIC_DIM = 16
_MASK_WORDS = ("mask",)
_ZERO_WORDS = ("token_type", "segment")


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the data must match it. ``shape`` entries: int, a symbol, or None."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def input_specs(graph: gs.Graph) -> list[InputSpec]:
    specs = []
    for tensor in graph.inputs:
        if tensor.dtype is None:
            raise DataError(f"model input '{tensor.name}' has no dtype; cannot check data for it")
        shape = None if tensor.shape is None else tuple(_dim(d) for d in tensor.shape)
        specs.append(InputSpec(tensor.name, np.dtype(tensor.dtype), shape))
    return specs


def _dim(value: object) -> int | str | None:
    if isinstance(value, (int, np.integer)) and value >= 0:
        return int(value)
    if isinstance(value, str) and value:
        return value
    return None


class Feeds:
    """A re-iterable, validated sequence of feed dicts, with a description of where it came from."""

    def __init__(
        self,
        factory: Any,
        specs: list[InputSpec],
        description: str,
        *,
        synthetic: bool = False,
    ) -> None:
        self._factory = factory
        self._specs = {spec.name: spec for spec in specs}
        self.description = description
        self.synthetic = synthetic

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for feed in self._factory():
            yield check_feed(feed, self._specs, self.description)

    def subset(self, indices: range) -> Feeds:
        """The feeds at ``indices`` (batch positions), e.g. to hold some aside for checking."""
        wanted = set(indices)

        def factory() -> Iterator[Mapping[str, Any]]:
            for index, feed in enumerate(self._factory()):
                if index in wanted:
                    yield feed

        return Feeds(
            factory,
            list(self._specs.values()),
            f"{self.description} [batches {indices.start}–{indices.stop - 1}]",
            synthetic=self.synthetic,
        )

    def count_samples(self) -> int:
        """Samples (rows along axis 0 of the first input) over all feeds."""
        total = 0
        for feed in self:
            first = next(iter(feed.values()))
            total += int(first.shape[0]) if first.ndim else 1
        return total


def check_feed(
    feed: Mapping[str, Any], specs: Mapping[str, InputSpec], origin: str
) -> dict[str, np.ndarray]:
    """Validate one feed against the model inputs; see the module rules."""
    if not isinstance(feed, Mapping):
        raise DataError(
            f"{origin}: a feed must be a dict of input name to array, got {type(feed).__name__}"
        )
    missing = [name for name in specs if name not in feed]
    if missing:
        raise DataError(
            f"{origin}: no data for model input '{missing[0]}' "
            f"(data has: {', '.join(sorted(feed)) or 'nothing'})"
        )
    unknown = [name for name in feed if name not in specs]
    if unknown:
        raise DataError(
            f"{origin}: '{unknown[0]}' is not a model input (inputs: {', '.join(specs)})"
        )
    checked: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        array = np.asarray(feed[name])
        if array.dtype.kind != spec.dtype.kind and not (
            array.dtype.kind in "iu" and spec.dtype.kind in "iu"
        ):
            raise DataError(f"{origin}: input '{name}' expects {spec.dtype}, got {array.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise DataError(
                    f"{origin}: input '{name}' expects rank {len(spec.shape)} "
                    f"{_show_shape(spec.shape)}, got shape {list(array.shape)}"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
                if isinstance(want, int) and want != got:
                    raise DataError(
                        f"{origin}: input '{name}' expects {_show_shape(spec.shape)}, got "
                        f"{list(array.shape)} (axis {axis})"
                    )
        checked[name] = np.ascontiguousarray(array, dtype=spec.dtype)
    return checked


def _show_shape(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def open_data(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]] | Any,
    specs: list[InputSpec],
    *,
    batch_size: int | None = None,
) -> Feeds:
    """Wrap any accepted source (module rules 1–4) as validated :class:`Feeds`."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _folder_feeds(path, specs)
        if path.is_file():
            return _npz_feeds(path, specs, batch_size)
        raise DataError(f"data path {path} does not exist")
    if hasattr(source, "get_next"):
        return Feeds(_cached(_reader_items(source)), specs, f"{type(source).__name__} reader")
    if isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        return Feeds(_cached(iter(source)), specs, f"Python {type(source).__name__} of feeds")
    raise DataError(
        f"unsupported data source {type(source).__name__}: give an .npz file, a folder of .npz, "
        "an iterable of feed dicts or a CalibrationDataReader"
    )


def _reader_items(reader: Any) -> Iterator[Mapping[str, Any]]:
    while True:
        item = reader.get_next()
        if item is None:
            return
        yield item


def _cached(items: Iterator[Mapping[str, Any]]) -> Any:
    """Read a one-shot source once, on first use, and replay it afterwards."""
    cache: list[Mapping[str, Any]] = []
    state = {"filled": False}

    def factory() -> Iterator[Mapping[str, Any]]:
        if not state["filled"]:
            cache.extend(items)
            state["filled"] = True
        return iter(cache)

    return factory


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"{path}: not a readable .npz file ({error})") from error


def _npz_feeds(path: Path, specs: list[InputSpec], batch_size: int | None) -> Feeds:
    if path.suffix != ".npz":
        raise DataError(f"{path}: data files must be .npz (one array per model input)")
    arrays = _load_npz(path)
    origin = str(path)
    if not arrays:
        raise DataError(f"{path}: the .npz file holds no arrays")
    check_feed({n: a[:1] for n, a in arrays.items()}, {s.name: s for s in specs}, origin)
    counts = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{path}: arrays disagree on the number of samples (axis 0): {counts}")
    samples = next(iter(counts.values()))
    size = batch_size or _default_batch(specs, samples)

    def factory() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, samples, size):
            yield {name: array[start : start + size] for name, array in arrays.items()}

    batches = -(-samples // size)
    return Feeds(factory, specs, f"{origin} ({samples} samples, {batches} batches of ≤{size})")


def _default_batch(specs: list[InputSpec], samples: int) -> int:
    fixed = {spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], int)}
    if fixed:
        return int(min(fixed))
    return max(1, min(DEFAULT_BATCH_SIZE, samples))


def _folder_feeds(path: Path, specs: list[InputSpec]) -> Feeds:
    files = sorted(path.glob("*.npz"))
    if not files:
        raise DataError(f"{path}: the folder holds no .npz files")

    def factory() -> Iterator[dict[str, np.ndarray]]:
        for file in files:
            yield _load_npz(file)

    return Feeds(factory, specs, f"{path}/ ({len(files)} .npz feeds)")


def embedding_bounds(graph: gs.Graph) -> dict[str, int]:
    """For integer inputs used as ``Gather`` indices into constant tables: the table size.

    Follows Cast/Unsqueeze/Reshape/Flatten between the input and the Gather; when an input
    indexes several tables, the smallest bound wins.
    """
    bounds: dict[str, int] = {}
    passthrough = {"Cast", "Unsqueeze", "Reshape", "Flatten", "Squeeze", "Identity"}
    for tensor in graph.inputs:
        if tensor.dtype is None or np.dtype(tensor.dtype).kind not in "iu":
            continue
        stack = [tensor]
        seen: set[int] = set()
        while stack:
            current = stack.pop()
            for consumer in current.outputs:
                if id(consumer) in seen:
                    continue
                seen.add(id(consumer))
                if (
                    consumer.op == "Gather"
                    and len(consumer.inputs) > 1
                    and consumer.inputs[1] is current
                ):
                    table = consumer.inputs[0]
                    if isinstance(table, gs.Constant):
                        axis = int(consumer.attrs.get("axis", 0))
                        size = int(table.shape[axis])
                        bounds[tensor.name] = min(bounds.get(tensor.name, size), size)
                elif consumer.op in passthrough:
                    stack.extend(consumer.outputs)
    return bounds


def synthesize(
    graph: gs.Graph,
    *,
    samples: int = DEFAULT_SYNTHETIC_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    dim_values: Mapping[str, int] | None = None,
) -> Feeds:
    """Seeded synthetic feeds that respect input semantics (module docstring)."""
    specs = input_specs(graph)
    bounds = embedding_bounds(graph)
    symbols = dict(dim_values or {})
    batch = max(1, min(batch_size, samples))

    def resolve(spec: InputSpec, rows: int) -> tuple[int, ...]:
        if spec.shape is None:
            return (rows,)
        dims = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif axis == 0:
                dims.append(rows)
            else:
                key = dim if isinstance(dim, str) else f"{spec.name}:{axis}"
                dims.append(symbols.setdefault(key, DEFAULT_DYNAMIC_DIM))
        return tuple(dims)

    fixed_rows = {spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], int)}
    if fixed_rows:
        batch = int(min(fixed_rows))

    def factory() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        for start in range(0, samples, batch):
            rows = batch if fixed_rows else min(batch, samples - start)
            yield {
                spec.name: _synthetic_array(spec, resolve(spec, rows), bounds, rng)
                for spec in specs
            }

    description = (
        f"SYNTHETIC data ({samples} samples, seed {seed}); pass --calib-data/--data for real inputs"
    )
    return Feeds(factory, specs, description, synthetic=True)


def _synthetic_array(
    spec: InputSpec, shape: tuple[int, ...], bounds: Mapping[str, int], rng: np.random.Generator
) -> np.ndarray:
    lowered = spec.name.lower()
    kind = spec.dtype.kind
    if kind == "b":
        if any(word in lowered for word in _MASK_WORDS):
            return np.ones(shape, dtype=spec.dtype)
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    if kind in "iu":
        if any(word in lowered for word in _MASK_WORDS):
            return np.ones(shape, dtype=spec.dtype)
        if any(word in lowered for word in _ZERO_WORDS):
            return np.zeros(shape, dtype=spec.dtype)
        high = bounds.get(spec.name, 2)
        return rng.integers(0, high, size=shape).astype(spec.dtype)
    if any(word in lowered for word in _MASK_WORDS):
        return np.ones(shape, dtype=spec.dtype)
    return rng.standard_normal(size=shape).astype(spec.dtype)
