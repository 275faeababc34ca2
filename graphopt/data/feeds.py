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

NaN or infinite values in a float input (after that cast, so float64 values beyond float16's range
count) are not an error, but each :class:`Feeds` warns once per input name, with the count and
where: for an ``.npz`` file the count over the whole array, when the file is opened; otherwise
the first feed that holds any (the file of a folder, the position in an iterable).

An ``.npz`` file must be a zip archive of ``.npy`` arrays without Python objects; anything else
(a text file, a truncated download, a single ``.npy``) is a :class:`~graphopt.errors.DataError`
saying so. The arrays of an ``.npz`` file (rule 1) are checked before batching, so that a rank or
dimension error shows the array's shape as stored (axis 0 = samples) beside the model's.

Batches of an ``.npz`` file (:func:`open_data`):

5. A model has a *static batch* when every input of rank ≥ 1 has a static leading dimension; the
   batch is the smallest of them (:func:`static_batch`). Its ``.npz`` samples are served in
   batches of exactly that size: a remainder that does not fill a batch is dropped (with a
   warning) when there is at least one full batch; fewer samples than one batch are repeated
   cyclically to fill it (with a warning); a ``batch_size`` (``--batch-size``) other than the
   static batch is an error naming both. The description says what happened. Otherwise batches
   hold ``batch_size`` samples (default :data:`DEFAULT_BATCH_SIZE`), the last one fewer.
6. A rank-0 model input may be given as a 0-d array: the same scalar goes into every batch.

Without data, :func:`synthesize` makes seeded inputs that respect their meaning and can run the
model:

7. Values: token ids below the size of the embedding table they index, attention masks of ones,
   token-type ids of zeros; *images* (rank-4 float or uint8 inputs with 1, 3 or 4 channels at
   axis 1, NCHW, or else at axis 3, NHWC) are uniform pixels in [0, 1) normalized per channel
   (ImageNet mean and std for 3 channels, mean 0.5 and std 0.25 otherwise, so about [-2, 2.6]),
   or 0–255 for uint8; *signals* (float inputs of rank 2 with a dynamic axis 1, or of rank 3 with
   a static axis 1 and a dynamic axis 2, the samples axis; not named like a mask, and not sharing
   that axis's symbol with an integer input, as a float mask beside token ids does) are
   audio-like, 0.1 × a standard normal clipped to [-1, 1]; integer inputs of at most one
   element named like a sample rate (:data:`SAMPLE_RATE_NAMES`) hold :data:`SAMPLE_RATE`; other
   floats are standard normal.
8. Batch axis: axis 0 of every input, except in a model with a dynamic batch (some input's
   axis 0 is dynamic) for an input whose axis 0 is static: there the first axis that is
   anonymous or carries the symbol of another input's axis 0 is the batch (a recurrent state
   ``[2, ?, 128]``), or none. Batch axes get the feed's sample count; a static batch (rule 5)
   fixes it.
9. Other dynamic dimensions take their size from :data:`SIZE_STEPS`, indexed by ``size_step``
   (0 unless the probe of rule 11 moved on): image spatial axes 256 first (a multiple of 64, so
   that stride-32 and stride-64 networks divide evenly), then 64 (text-line recognizers pool a
   small fixed height), then growing 512, 640, 1024, then 32 (:data:`SPATIAL_SIZES`,
   :data:`SMALL_SPATIAL_SIZES`); signal samples axes grow through :data:`SIGNAL_LENGTHS` (512
   first: one 32 ms frame at 16 kHz); anything else through :data:`OTHER_SIZES` (16 first); on
   the small-spatial steps signals and the rest keep their first size. A symbol has one size
   wherever it appears.
10. ``input_shapes`` (``--input-shapes NAME:1x3x640x640``) fixes the whole shape of the named
    inputs, batch included; their symbols bind the same dimensions of other inputs. An unknown
    input name, a wrong rank, a size that contradicts a static dimension, two sizes for one
    symbol or for the batch are one-line errors naming the flag.
11. :func:`synthesize_runnable` probes the original model once per size step with a feed of
    one sample (ONNX Runtime, CPU, graph optimizations off, errors silenced) and keeps the first
    step that runs; each failed step is logged. When none runs: a one-line
    :class:`~graphopt.errors.InputError` that lists the shapes tried and names
    ``--input-shapes`` and the data flag. A model ONNX Runtime cannot even open is not probed
    (logged); its inputs get step 0.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import DataError, InputError
from graphopt.ir.ort import make_session, quiet_run_options

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8
DEFAULT_SYNTHETIC_SAMPLES = 16
SPATIAL_SIZES = (256, 512, 640, 1024)
"""Rule 9: growing sizes of an image's dynamic spatial axes, one per probe step."""
SMALL_SPATIAL_SIZES = (64, 32)
"""Rule 9: spatial sizes tried after :data:`SPATIAL_SIZES` (text-line recognizers need these)."""
SIGNAL_LENGTHS = (512, 1024, 4096, 16000)
"""Rule 9: lengths of a signal's dynamic samples axis per probe step (512: 32 ms at 16 kHz)."""
OTHER_SIZES = (16, 32, 64, 128)
"""Rule 9: sizes of every other dynamic dimension, one per probe step."""
DEFAULT_DYNAMIC_DIM = OTHER_SIZES[0]


@dataclass(frozen=True)
class SizeStep:
    """Rule 9: the sizes of one probe step."""

    spatial: int
    signal: int
    other: int


SIZE_STEPS = (
    SizeStep(SPATIAL_SIZES[0], SIGNAL_LENGTHS[0], OTHER_SIZES[0]),
    SizeStep(SMALL_SPATIAL_SIZES[0], SIGNAL_LENGTHS[0], OTHER_SIZES[0]),
    SizeStep(SPATIAL_SIZES[1], SIGNAL_LENGTHS[1], OTHER_SIZES[1]),
    SizeStep(SPATIAL_SIZES[2], SIGNAL_LENGTHS[2], OTHER_SIZES[2]),
    SizeStep(SPATIAL_SIZES[3], SIGNAL_LENGTHS[3], OTHER_SIZES[3]),
    SizeStep(SMALL_SPATIAL_SIZES[1], SIGNAL_LENGTHS[0], OTHER_SIZES[0]),
)
"""Rule 9's steps in probe order. The small spatial size 64 comes second because it is cheap
(a failed probe at 1024² costs a text recognizer 13 s, at 64² 0.05 s) and is what text-line
recognizers need; a step whose shapes equal an earlier step's is skipped."""
SAMPLE_RATE = 16000
SAMPLE_RATE_NAMES = ("sr", "sample_rate", "sampling_rate")
IMAGE_CHANNELS = (1, 3, 4)
INPUT_SHAPES_FLAG = "--input-shapes"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_MASK_WORDS = ("mask",)
_ZERO_WORDS = ("token_type", "segment")
_ERROR_CHARS = 240
_ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")
"""How a zip archive with members, or an empty one, begins (what numpy.load looks for)."""
_ORT_NOISE = (
    re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "),
    re.compile(r"\S*onnxruntime_src/\S+:\d+ "),
    re.compile(r"\S+ onnxruntime::[\w:]+\([^)]*\)\s*"),
)


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


ANONYMOUS_DIMS = frozenset({"?", "-1"})
"""Dimension names exporters write for "unknown" (Paddle2ONNX writes ``?`` for both H and W):
placeholders, not symbols that bind equal sizes."""


def _dim(value: object) -> int | str | None:
    if isinstance(value, (int, np.integer)) and value >= 0:
        return int(value)
    if isinstance(value, str) and value and value not in ANONYMOUS_DIMS:
        return value
    return None


class Feeds:
    """A re-iterable, validated sequence of feed dicts, with a description of where it came from.

    ``labels`` name each feed in warnings (a folder's files); by default a feed is named by the
    description and its position. ``warned`` holds the inputs already warned about non-finite
    values (module rules); it is shared with :meth:`subset`. ``mask_input`` names the input
    that marks padding positions (:mod:`graphopt.data.masking`), or None; calibration counts
    valid positions only.
    """

    def __init__(
        self,
        factory: Any,
        specs: list[InputSpec],
        description: str,
        *,
        synthetic: bool = False,
        labels: Sequence[str] | None = None,
        warned: set[str] | None = None,
        mask_input: str | None = None,
    ) -> None:
        self._factory = factory
        self.mask_input = mask_input
        self._specs = {spec.name: spec for spec in specs}
        self.description = description
        self.synthetic = synthetic
        self._labels: Sequence[str] | None = labels
        # inputs already warned about non-finite values (shared with subsets); a caller that
        # checked every value itself (a whole .npz file) passes every input name
        self._warned: set[str] = set() if warned is None else warned
        self._scanned = False  # a full iteration looked at every value

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        scan = not self._scanned
        for index, feed in enumerate(self._factory()):
            checked = check_feed(feed, self._specs, self.description)
            if scan:
                self._warn_non_finite(index, checked)
            yield checked
        self._scanned = True

    def _warn_non_finite(self, index: int, feed: Mapping[str, np.ndarray]) -> None:
        """Module rule on non-finite values: once per input name, at its first feed."""
        for name, array in feed.items():
            if name in self._warned:
                continue
            count = _count_non_finite(array)
            if count:
                self._warned.add(name)
                _log_non_finite(self._feed_label(index), name, count, array)

    def _feed_label(self, index: int) -> str:
        if self._labels is not None and index < len(self._labels):
            return self._labels[index]
        return f"{self.description}, feed {index}"

    def subset(self, indices: range) -> Feeds:
        """The feeds at ``indices`` (batch positions), e.g. to hold some aside for checking."""
        wanted = set(indices)
        positions = sorted(index for index in wanted if index >= 0)

        def factory() -> Iterator[Mapping[str, Any]]:
            for index, feed in enumerate(self._factory()):
                if index in wanted:
                    yield feed

        description = f"{self.description} [batches {indices.start}–{indices.stop - 1}]"
        return Feeds(
            factory,
            list(self._specs.values()),
            description,
            synthetic=self.synthetic,
            labels=[self._feed_label(index) for index in positions],
            warned=self._warned,
            mask_input=self.mask_input,
        )

    def with_mask_input(self, name: str | None) -> Feeds:
        """The same feeds with ``name`` as the input that marks padding (None: no mask)."""
        return Feeds(
            self._factory,
            list(self._specs.values()),
            self.description,
            synthetic=self.synthetic,
            labels=self._labels,
            warned=self._warned,
            mask_input=name,
        )

    def samples_in(self, feed: Mapping[str, np.ndarray]) -> int:
        """Samples in one feed: the size of the batch axis (rule 8) of the first input that has
        one; 1 when no input has a batch axis."""
        axes = batch_axes(list(self._specs.values()))
        for name, array in feed.items():
            axis = axes.get(name)
            if axis is not None and np.ndim(array) > axis:
                return int(np.shape(array)[axis])
        return 1

    def count_samples(self) -> int:
        """Samples over all feeds (:meth:`samples_in`)."""
        return sum(self.samples_in(feed) for feed in self)


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
        # (ascontiguousarray alone would turn a 0-d scalar into shape [1]); values beyond the
        # target's range become inf, which Feeds reports (module rules), so numpy need not
        with np.errstate(over="ignore"):
            cast = np.ascontiguousarray(array, dtype=spec.dtype)
        checked[name] = cast.reshape(array.shape)
    return checked


def _count_non_finite(array: np.ndarray) -> int:
    """NaN and infinite values in a float or complex array (0 for other kinds)."""
    if array.dtype.kind not in "fc":
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _log_non_finite(where: str, name: str, count: int, array: np.ndarray) -> None:
    logger.warning(
        "%s: input '%s' holds %d NaN or infinite value%s (of %d, as %s); calibration and "
        "validation use them as they are",
        where,
        name,
        count,
        "" if count == 1 else "s",
        array.size,
        array.dtype,
    )


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
        raise DataError(_missing_path_message(path))
    if hasattr(source, "get_next"):
        return Feeds(_cached(_reader_items(source)), specs, f"{type(source).__name__} reader")
    if isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        return Feeds(_cached(iter(source)), specs, f"Python {type(source).__name__} of feeds")
    raise DataError(
        f"unsupported data source {type(source).__name__}: give an .npz file, a folder of .npz, "
        "an iterable of feed dicts or a CalibrationDataReader"
    )


def open_checked(
    source: str | os.PathLike[str] | Iterable[Mapping[str, Any]] | Any,
    specs: list[InputSpec],
    *,
    batch_size: int | None = None,
) -> tuple[Feeds, int]:
    """:func:`open_data`, then every feed read once: bad data is an input error before any work,
    not a crash in the middle of it. Returns the feeds and how many batches they hold."""
    feeds = open_data(source, specs, batch_size=batch_size)
    return feeds, sum(1 for _ in feeds)


def _missing_path_message(path: Path) -> str:
    """A data path that is neither a file nor a folder: name a file standing in for a folder."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"data path {path}: {parent} is a file, not a folder"
            break
    if path.exists():
        return f"data path {path} is neither a file nor a folder"
    return f"data path {path} does not exist"


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
    """The arrays of an ``.npz`` file; anything but a zip of plain ``.npy`` arrays is an error."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error
    if not head.startswith(_ZIP_STARTS) or not zipfile.is_zipfile(path):
        raise DataError(
            f"{path} is not a .npz archive (not a readable .npz: {_not_zip_reason(head)})"
        )
    arrays: dict[str, np.ndarray] = {}
    member = "the archive"
    try:
        with np.load(path, allow_pickle=False) as archive:
            for name in archive.files:
                member = f"array '{name}'"
                arrays[name] = _npz_member(path, name, archive[name])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        reason = _first_line(error)
        if "allow_pickle" in reason:
            reason = "it holds Python objects, which are not loaded; save numeric arrays"
        raise DataError(f"{path}: cannot read {member} of the .npz file ({reason})") from error
    return arrays


def _npz_member(path: Path, name: str, value: Any) -> np.ndarray:
    """numpy returns the raw bytes of a member that is not an ``.npy`` array: refuse them."""
    if not isinstance(value, np.ndarray):
        raise DataError(
            f"{path}: member '{name}' of the .npz archive is not a .npy array; "
            "save the data with numpy.savez"
        )
    return value


def _not_zip_reason(head: bytes) -> str:
    """Why a file is not a zip archive, as far as its first bytes tell."""
    if head.startswith(b"\x93NUMPY"):
        return "it is a single .npy array; save one array per model input with numpy.savez"
    if head.startswith(_ZIP_STARTS):
        return "a truncated or damaged zip archive"
    if not head:
        return "the file is empty"
    return "not a zip archive; save the data with numpy.savez"


def _npz_feeds(path: Path, specs: list[InputSpec], batch_size: int | None) -> Feeds:
    """Rules 1, 5 and 6."""
    if path.suffix != ".npz":
        raise DataError(f"{path}: data files must be .npz (one array per model input)")
    arrays = _load_npz(path)
    origin = str(path)
    if not arrays:
        raise DataError(f"{path}: the .npz file holds no arrays")
    shared = {n: a for n, a in arrays.items() if a.ndim == 0}  # rule 6 (check_feed checks)
    batched = {n: a for n, a in arrays.items() if n not in shared}
    if not batched:
        raise DataError(f"{path}: every array is a scalar; axis 0 must count the samples")
    _check_npz_shapes(path, batched, specs)
    counts = {name: array.shape[0] for name, array in batched.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{path}: arrays disagree on the number of samples (axis 0): {counts}")
    samples = next(iter(counts.values()))
    if samples == 0:
        raise DataError(f"{path}: the .npz file holds no samples (axis 0 has size 0)")
    batches, description = _npz_batches(path, specs, samples, batch_size)

    def factory() -> Iterator[dict[str, np.ndarray]]:
        for rows in batches:
            feed = {name: array[rows] for name, array in batched.items()}
            yield {**feed, **shared}

    check_feed(next(factory()), {s.name: s for s in specs}, origin)
    _warn_npz_non_finite(path, arrays, specs)
    warned = {spec.name for spec in specs}  # every value was just checked
    return Feeds(factory, specs, f"{origin} ({description})", warned=warned)


def _check_npz_shapes(
    path: Path, batched: Mapping[str, np.ndarray], specs: Sequence[InputSpec]
) -> None:
    """Rank and static dimensions after axis 0 (the samples), shown as the file stores them."""
    for spec in specs:
        array = batched.get(spec.name)
        if array is None or spec.shape is None:
            continue
        stored = f"the file's array '{spec.name}' is {list(array.shape)}"
        expected = _show_shape(spec.shape)
        if array.ndim != len(spec.shape):
            hint = ""
            if array.ndim + 1 == len(spec.shape):
                hint = f"; to give one sample, save {spec.name}[None]"
            raise DataError(
                f"{path}: input '{spec.name}' expects rank {len(spec.shape)} {expected} per "
                f"batch; {stored} (axis 0 counts the samples){hint}"
            )
        for axis in range(1, array.ndim):
            want, got = spec.shape[axis], array.shape[axis]
            if isinstance(want, int) and want != got:
                raise DataError(
                    f"{path}: input '{spec.name}' expects {expected} per batch; {stored}, "
                    f"whose axis {axis} is {got}, not {want} (axis 0 counts the samples)"
                )


def _warn_npz_non_finite(
    path: Path, arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec]
) -> None:
    """Module rules: one warning per input, counting the whole array as the model's dtype."""
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None or spec.dtype.kind not in "fc" or array.dtype.kind not in "fc":
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            values = array.astype(spec.dtype, copy=False)
        count = _count_non_finite(values)
        if count:
            _log_non_finite(str(path), spec.name, count, values)


def _npz_batches(
    path: Path, specs: list[InputSpec], samples: int, batch_size: int | None
) -> tuple[list[np.ndarray], str]:
    """Sample indices of each batch, and what was done (rule 5)."""
    static = static_batch(specs)
    noun = "sample" if samples == 1 else "samples"
    if static is None:
        size = batch_size or max(1, min(DEFAULT_BATCH_SIZE, samples))
        order = np.arange(samples)
        batches = [order[start : start + size] for start in range(0, samples, size)]
        return batches, f"{samples} {noun}, {_count(len(batches), 'batch')} of ≤{size}"
    if batch_size is not None and batch_size != static:
        fixed = next(s for s in specs if s.shape and s.shape[0] == static)
        raise DataError(
            f"--batch-size {batch_size} contradicts the model's static batch {static} "
            f"(input '{fixed.name}' is {_show_shape(fixed.shape or ())}); "
            f"use --batch-size {static} or leave it out"
        )
    if samples < static:
        logger.warning(
            "%s: %d %s, fewer than the model's static batch %d: repeating them cyclically to "
            "fill one batch (give at least %d samples)",
            path,
            samples,
            noun,
            static,
            static,
        )
        rows = np.arange(static) % samples
        return [rows], (
            f"{samples} {noun} repeated cyclically to fill 1 batch of {static}, "
            f"the model's static batch {static}"
        )
    full = samples // static
    batches = [np.arange(index * static, (index + 1) * static) for index in range(full)]
    description = (
        f"{samples} samples, {_count(full, 'batch')} of {static}, the model's static batch {static}"
    )
    left = samples - full * static
    if left:
        logger.warning(
            "%s: the last %d of %d samples do not fill a batch of the model's static batch %d "
            "and are dropped",
            path,
            left,
            samples,
            static,
        )
        description += f"; the last {left} samples dropped"
    return batches, description


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("ch") else "s")


def static_batch(specs: Sequence[InputSpec]) -> int | None:
    """Rule 5: the static batch, or None when some input's leading dimension is dynamic."""
    leading = [spec.shape[0] if spec.shape else None for spec in specs if spec.shape != ()]
    if not leading or not all(isinstance(dim, int) for dim in leading):
        return None
    return int(min(dim for dim in leading if isinstance(dim, int)))


def batch_axes(specs: Sequence[InputSpec]) -> dict[str, int | None]:
    """Rule 8: each input's batch axis (None: the input has none)."""
    ranked = [spec for spec in specs if spec.shape != ()]
    dynamic = static_batch(specs) is None and bool(ranked)
    leading_symbols = {
        spec.shape[0]
        for spec in ranked
        if spec.shape is not None and isinstance(spec.shape[0], str)
    }
    axes: dict[str, int | None] = {}
    for spec in specs:
        if spec.shape == ():
            axes[spec.name] = None
        elif spec.shape is None or not isinstance(spec.shape[0], int) or not dynamic:
            axes[spec.name] = 0
        else:
            axes[spec.name] = next(
                (
                    axis
                    for axis, dim in enumerate(spec.shape)
                    if dim is None or (isinstance(dim, str) and dim in leading_symbols)
                ),
                None,
            )
    return axes


def _folder_feeds(path: Path, specs: list[InputSpec]) -> Feeds:
    files = sorted(path.glob("*.npz"))
    if not files:
        raise DataError(f"{path}: the folder holds no .npz files")

    def factory() -> Iterator[dict[str, np.ndarray]]:
        for file in files:
            yield _load_npz(file)

    labels = [str(file) for file in files]
    return Feeds(factory, specs, f"{path}/ ({len(files)} .npz feeds)", labels=labels)


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


def parse_input_shapes(text: str | Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x640x640[,NAME:[1,3,640,640]...]`` (one string or several) (rule 10).

    The name is everything before the last colon, so TensorFlow names like ``input_1:0`` work;
    ``NAME:[]`` is a scalar.
    """
    entries: list[str] = []
    for chunk in [text] if isinstance(text, str) else list(text):
        entries.extend(_split_outside_brackets(chunk))
    shapes: dict[str, tuple[int, ...]] = {}
    for entry in entries:
        name, colon, dims = entry.rpartition(":")
        name, dims = name.strip(), dims.strip()
        if not colon or not name:
            raise InputError(
                f"{INPUT_SHAPES_FLAG}: '{entry}' is not NAME:SHAPE (e.g. x:1x3x640x640)"
            )
        if name in shapes:
            raise InputError(f"{INPUT_SHAPES_FLAG}: input '{name}' is given twice")
        shapes[name] = _parse_dims(name, dims)
    return shapes


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _parse_dims(name: str, text: str) -> tuple[int, ...]:
    bracketed = text.startswith("[") and text.endswith("]")
    body = text[1:-1] if bracketed else text
    if bracketed and not body.strip():
        return ()
    pieces = [piece.strip() for piece in body.split("," if bracketed else "x")]
    if not all(piece.isdigit() and int(piece) > 0 for piece in pieces):
        raise InputError(
            f"{INPUT_SHAPES_FLAG}: shape '{text}' of input '{name}' must be positive sizes "
            "joined by x (1x3x640x640) or a list ([1,3,640,640])"
        )
    return tuple(int(piece) for piece in pieces)


def check_input_shapes(
    specs: Sequence[InputSpec], input_shapes: Mapping[str, Sequence[int]] | None
) -> dict[str, tuple[int, ...]]:
    """Rule 10's checks; returns the shapes as tuples of int."""
    by_name = {spec.name: spec for spec in specs}
    checked: dict[str, tuple[int, ...]] = {}
    symbols: dict[str, tuple[int, str]] = {}
    axes = batch_axes(specs)
    batch: tuple[int, str] | None = None
    for name, raw in (input_shapes or {}).items():
        if name not in by_name:
            raise InputError(
                f"{INPUT_SHAPES_FLAG}: '{name}' is not a model input (inputs: {', '.join(by_name)})"
            )
        try:
            shape = tuple(int(dim) for dim in raw)
        except (TypeError, ValueError) as error:
            raise InputError(
                f"{INPUT_SHAPES_FLAG}: the shape of input '{name}' must be a sequence of "
                f"sizes, got {raw!r}"
            ) from error
        spec = by_name[name]
        shown = _show_sizes(shape)
        if any(dim < 1 for dim in shape):
            raise InputError(f"{INPUT_SHAPES_FLAG}: input '{name}': sizes must be ≥ 1, got {shown}")
        if spec.shape is not None:
            if len(shape) != len(spec.shape):
                raise InputError(
                    f"{INPUT_SHAPES_FLAG}: input '{name}' has rank {len(spec.shape)} "
                    f"{_show_shape(spec.shape)}, got {shown} (rank {len(shape)})"
                )
            for axis, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
                if isinstance(want, int) and want != got:
                    raise InputError(
                        f"{INPUT_SHAPES_FLAG}: input '{name}' is {_show_shape(spec.shape)}; "
                        f"{shown} contradicts axis {axis}, which is {want}"
                    )
                if isinstance(want, str):
                    seen = symbols.setdefault(want, (got, name))
                    if seen[0] != got:
                        raise InputError(
                            f"{INPUT_SHAPES_FLAG}: inputs '{seen[1]}' and '{name}' give "
                            f"dimension '{want}' different sizes ({seen[0]} and {got})"
                        )
            axis = axes.get(name)
            if axis is not None and not isinstance(spec.shape[axis], int):
                batch = batch or (shape[axis], name)
                if batch[0] != shape[axis]:
                    raise InputError(
                        f"{INPUT_SHAPES_FLAG}: inputs '{batch[1]}' and '{name}' give the "
                        f"batch different sizes ({batch[0]} and {shape[axis]})"
                    )
        checked[name] = shape
    return checked


def synthesize(
    graph: gs.Graph,
    *,
    samples: int = DEFAULT_SYNTHETIC_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    dim_values: Mapping[str, int] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    size_step: int = 0,
) -> Feeds:
    """Seeded synthetic feeds that respect input semantics (module rules 7 to 10).

    ``dim_values`` sets sizes of named dimensions (symbols); ``input_shapes`` fixes whole input
    shapes; ``size_step`` indexes :data:`SIZE_STEPS` (rule 9).
    """
    return _synthetic_feeds(
        graph, samples, batch_size, seed, dim_values, input_shapes, size_step, note=""
    )


def synthesize_runnable(
    graph: gs.Graph,
    model_path: str | os.PathLike[str],
    *,
    samples: int = DEFAULT_SYNTHETIC_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    data_flag: str = "--calib-data",
) -> Feeds:
    """:func:`synthesize` at the first size step the model at ``model_path`` runs (rule 11)."""
    specs = input_specs(graph)
    fixed = check_input_shapes(specs, input_shapes)
    session = _probe_session(Path(model_path))
    if session is None:
        return synthesize(
            graph, samples=samples, batch_size=batch_size, seed=seed, input_shapes=fixed
        )
    tried: list[dict[str, tuple[int, ...]]] = []
    error_text = ""
    for step in range(len(SIZE_STEPS)):
        probe = _synthetic_feeds(graph, 1, 1, seed, None, fixed, step, note="")
        feed = next(iter(probe))
        shapes = {name: tuple(array.shape) for name, array in feed.items()}
        if shapes in tried:
            continue
        tried.append(shapes)
        try:
            session.run(None, feed, quiet_run_options())
        except Exception as error:  # any ONNX Runtime failure: try larger sizes
            error_text = _first_line(error)
            logger.info(
                "synthesized inputs %s do not run %s (%s); trying other sizes",
                _show_feed_shapes(shapes),
                model_path,
                error_text,
            )
            continue
        note = ""
        if step:
            note = f"; sizes changed as ONNX Runtime failed at {_show_tried(tried[:-1])}"
        return _synthetic_feeds(graph, samples, batch_size, seed, None, fixed, step, note=note)
    raise InputError(
        f"ONNX Runtime cannot run {model_path} on synthesized inputs (tried "
        f"{_show_tried(tried)}; last error: {error_text}); give shapes that run with "
        f"{INPUT_SHAPES_FLAG} NAME:1x3x640x640 or real data with {data_flag}"
    )


def _probe_session(path: Path) -> Any:
    """A quiet CPU session on the original model, or None (logged) when it cannot be opened."""
    try:
        return make_session(path, optimize=False, quiet=True)
    except Exception as error:  # the probe is advisory: later stages report the real problem
        logger.warning(
            "cannot open %s in ONNX Runtime to check the synthesized shapes (%s); "
            "using the first sizes",
            path,
            _first_line(error),
        )
        return None


def _first_line(error: BaseException) -> str:
    """ONNX Runtime's message on one line, without its source paths and C++ signatures."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    for pattern in _ORT_NOISE:
        text = pattern.sub("", text)
    text = text.strip() or type(error).__name__
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 1] + "…"


def _show_sizes(shape: Sequence[int]) -> str:
    return "x".join(str(dim) for dim in shape) if len(shape) else "[]"


def _show_feed_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {_show_sizes(shape)}" for name, shape in shapes.items())


def _show_tried(tried: Sequence[Mapping[str, tuple[int, ...]]]) -> str:
    """The inputs whose shapes changed between attempts (all inputs when none did)."""
    names = [name for name in tried[0] if len({attempt[name] for attempt in tried}) > 1]
    names = names or list(tried[0])
    return "; ".join(
        ", ".join(f"{name} {_show_sizes(attempt[name])}" for name in names) for attempt in tried
    )


@dataclass(frozen=True)
class _Role:
    """What an input holds (rule 7) and which of its axes a size ladder sizes (rule 9)."""

    kind: str  # "image", "signal", "rate" or "other"
    sized_axes: tuple[int, ...] = ()
    channel_axis: int | None = None


def _role(spec: InputSpec, batch_axis: int | None, token_symbols: set[str]) -> _Role:
    """Rule 7. ``token_symbols``: dimension names of integer inputs (a float input sharing its
    length with token ids is a mask or an embedding, not a signal)."""
    shape, kind = spec.shape, spec.dtype.kind
    if shape is None:
        return _Role("other")
    if len(shape) == 4 and (kind == "f" or spec.dtype == np.uint8):
        if isinstance(shape[1], int) and shape[1] in IMAGE_CHANNELS:
            return _Role("image", (2, 3), channel_axis=1)
        if isinstance(shape[3], int) and shape[3] in IMAGE_CHANNELS:
            return _Role("image", (1, 2), channel_axis=3)
    masked = any(word in spec.name.lower() for word in _MASK_WORDS)
    if kind == "f" and batch_axis == 0 and not masked and len(shape) in (2, 3):
        axis = len(shape) - 1
        samples = shape[axis]
        if (
            not isinstance(samples, int)
            and samples not in token_symbols
            and (len(shape) == 2 or isinstance(shape[1], int))
        ):
            return _Role("signal", (axis,))
    if kind in "iu" and spec.name.lower() in SAMPLE_RATE_NAMES and list(shape) in ([], [1]):
        return _Role("rate")
    return _Role("other")


def _size(role: _Role, step: int) -> int:
    sizes = SIZE_STEPS[step]
    return {"image": sizes.spatial, "signal": sizes.signal}.get(role.kind, sizes.other)


def _plan_shapes(
    specs: Sequence[InputSpec],
    roles: Mapping[str, _Role],
    axes: Mapping[str, int | None],
    rows: int,
    step: int,
    fixed: Mapping[str, tuple[int, ...]],
    dim_values: Mapping[str, int] | None,
) -> dict[str, tuple[int, ...]]:
    """Rules 8 to 10: every input's shape for a feed of ``rows`` samples."""
    symbols: dict[str, int] = dict(dim_values or {})
    for name, shape in fixed.items():  # rule 10: the user's sizes bind their symbols first
        spec_shape = next(spec.shape for spec in specs if spec.name == name)
        for dim, size in zip(spec_shape or (), shape, strict=False):
            if isinstance(dim, str):
                symbols.setdefault(dim, size)
    free = [(spec, spec.shape) for spec in specs if spec.name not in fixed]
    for spec, shape in free:  # then the batch, then the sized axes of images and signals
        axis = axes[spec.name]
        batch_dim = None if axis is None or shape is None else shape[axis]
        if isinstance(batch_dim, str):
            symbols.setdefault(batch_dim, rows)
    for spec, shape in free:
        role = roles[spec.name]
        for dim in [shape[axis] for axis in role.sized_axes] if shape is not None else []:
            if isinstance(dim, str):
                symbols.setdefault(dim, _size(role, step))
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in fixed:
            shapes[spec.name] = fixed[spec.name]
            continue
        if spec.shape is None:
            shapes[spec.name] = (rows,)
            continue
        role = roles[spec.name]
        dims = []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                dims.append(dim)
            elif isinstance(dim, str):
                dims.append(symbols.setdefault(dim, SIZE_STEPS[step].other))
            elif axis == axes[spec.name]:
                dims.append(rows)
            elif axis in role.sized_axes:
                dims.append(_size(role, step))
            else:
                dims.append(SIZE_STEPS[step].other)
        shapes[spec.name] = tuple(dims)
    return shapes


def _synthetic_feeds(
    graph: gs.Graph,
    samples: int,
    batch_size: int,
    seed: int,
    dim_values: Mapping[str, int] | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    size_step: int,
    *,
    note: str,
) -> Feeds:
    specs = input_specs(graph)
    fixed = check_input_shapes(specs, input_shapes)
    if not 0 <= size_step < len(SIZE_STEPS):
        raise ValueError(f"size_step must be in [0, {len(SIZE_STEPS)}), got {size_step}")
    bounds = embedding_bounds(graph)
    axes = batch_axes(specs)
    token_symbols = {
        dim
        for spec in specs
        if spec.dtype.kind in "iu" and spec.shape
        for dim in spec.shape
        if isinstance(dim, str)
    }
    roles = {spec.name: _role(spec, axes[spec.name], token_symbols) for spec in specs}
    user_batch = [
        fixed[name][axis] for name, axis in axes.items() if name in fixed and axis is not None
    ]
    static = static_batch(specs)
    full = static or (user_batch[0] if user_batch else None)
    batch = full or max(1, min(batch_size, samples))

    def factory() -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        for start in range(0, samples, batch):
            rows = full or min(batch, samples - start)
            shapes = _plan_shapes(specs, roles, axes, rows, size_step, fixed, dim_values)
            yield {
                spec.name: _synthetic_array(spec, roles[spec.name], shapes[spec.name], bounds, rng)
                for spec in specs
            }

    first = _plan_shapes(specs, roles, axes, full or batch, size_step, fixed, dim_values)
    description = (
        f"SYNTHETIC data ({samples} samples, seed {seed}; {_show_feed_shapes(first)}{note}); "
        "pass --calib-data/--data for real inputs"
    )
    return Feeds(factory, specs, description, synthetic=True)


def _synthetic_array(
    spec: InputSpec,
    role: _Role,
    shape: tuple[int, ...],
    bounds: Mapping[str, int],
    rng: np.random.Generator,
) -> np.ndarray:
    lowered = spec.name.lower()
    kind = spec.dtype.kind
    if role.kind == "rate":
        return np.full(shape, SAMPLE_RATE, dtype=spec.dtype)
    if role.kind == "image":
        return _image(spec.dtype, shape, role.channel_axis or 1, rng)
    if role.kind == "signal":
        return np.clip(0.1 * rng.standard_normal(size=shape), -1.0, 1.0).astype(spec.dtype)
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


def _image(
    dtype: np.dtype, shape: tuple[int, ...], channel_axis: int, rng: np.random.Generator
) -> np.ndarray:
    """Rule 7's images: uniform pixels, normalized per channel (0–255 for uint8)."""
    if dtype.kind != "f":
        return rng.integers(0, 256, size=shape).astype(dtype)
    pixels = rng.random(size=shape)
    channels = shape[channel_axis]
    mean, std = (_IMAGENET_MEAN, _IMAGENET_STD) if channels == 3 else ((0.5,), (0.25,))
    view = [1] * len(shape)
    view[channel_axis] = -1 if channels == 3 else 1
    normalized = (pixels - np.reshape(mean, view)) / np.reshape(std, view)
    return normalized.astype(dtype)
