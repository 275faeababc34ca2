"""The one way to touch weights: read them lazily, replace them, learn their type and size.

A weight is a graph constant (an onnx-graphsurgeon ``gs.Constant``) whose values may live in the
source model's external data, in a file a pass spilled, or in memory. Every built-in pass reaches
weights through this module only, and plugins should too; it is what keeps a pass within memory
on models larger than RAM. The rules a memory-safe pass follows:

1. Decide without loading: :func:`shape`, :func:`element_type`, :func:`nbytes` and
   :func:`is_external` read the tensor's header, never its values.
2. Read with :func:`read`: the values are loaded for that call and not kept by the graph.
   (onnx-graphsurgeon's ``Constant.values`` caches what it loads in the graph, so a pass that
   used it would hold every weight it read until the end.)
3. Write with :func:`replace`: arrays of 1 MiB or more go to the run's temporary folder at once
   (:class:`WeightSpill`) and are read back one at a time when used or saved. Values computed
   on demand (a conversion of a weight still on disk) are a :class:`LazyWeight`, given with
   :func:`replace_lazily`; :func:`source` captures a weight's current storage for one.
4. A pass that rewrites a weight another pass may also rewrite claims it first
   (``context.claims``, :class:`graphopt.passkit.api.WeightClaims`).
5. Hold few arrays at once: read, compute, replace, drop the arrays.

The storage classes below (:class:`ExternalValues`, :class:`SpilledValues`,
:class:`WeightSpill`) and :func:`storage`, :func:`set_storage`, :func:`is_sparse`,
:func:`is_in_file`, :func:`attach_base_dir` and :func:`tensor_proto` are for graphopt's model
I/O (:mod:`graphopt.ir.model`); passes use the functions of rules 1-3. This is the only module
that touches onnx-graphsurgeon's storage (``Constant._values``, ``LazyValues``);
``tests/test_layout.py`` holds that.
"""

from __future__ import annotations

import abc
import contextlib
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper, helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

if TYPE_CHECKING:
    from graphopt.ir.model import Model

SPILL_MIN_BYTES = 1 << 20
"""Computed weights smaller than this stay in memory (rule 3)."""


@dataclass(frozen=True)
class ExternalRef:
    """Where the bytes of one external tensor live."""

    path: Path
    offset: int
    length: int


def external_ref(tensor: onnx.TensorProto, base_dir: Path) -> ExternalRef:
    """Resolve a tensor's external-data fields against ``base_dir``."""
    info = external_data_helper.ExternalDataInfo(tensor)
    path = base_dir / info.location
    offset = int(info.offset or 0)
    length = int(info.length) if info.length else max(path.stat().st_size - offset, 0)
    return ExternalRef(path=path, offset=offset, length=length)


class ExternalValues(LazyValues):
    """Lazy values of a tensor stored in an external file, read only when asked for."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path) -> None:
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        ref = external_ref(self.tensor, self.base_dir)
        np_dtype = helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        count = ref.length // np_dtype.itemsize if np_dtype.itemsize else 0
        native = self.tensor.data_type in NATIVE_NUMPY_TYPES
        if native and count == int(np.prod(self.shape, dtype=np.int64)):
            with open(ref.path, "rb") as handle:
                handle.seek(ref.offset)
                array = np.fromfile(handle, dtype=np_dtype.newbyteorder("<"), count=count)
            return array.astype(np_dtype, copy=False).reshape(self.shape)
        return np.array(onnx.numpy_helper.to_array(self.tensor, base_dir=str(self.base_dir)))


class SpilledValues(ExternalValues):
    """Lazy values of a weight a pass computed, kept in a :class:`WeightSpill` file (rule 3).

    The file is deleted when the last reference to these values goes away.
    """

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path, spill: WeightSpill) -> None:
        super().__init__(tensor, base_dir)
        self.spill = spill  # keeps the spill folder alive while these values exist
        path = external_ref(tensor, base_dir).path
        weakref.finalize(self, _remove_file, path)


def _remove_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class WeightSpill:
    """Temporary files for the weights passes compute, so they need not stay in memory.

    ``root`` is the run's temporary folder (None: the system's, ``TMPDIR`` honoured; never the
    source model's folder, which may be read-only). A ``graphopt-spill-*`` folder is created in
    it on first use and removed when the spill and every spilled value are gone, or at
    interpreter exit. :func:`runnable_model` hands spilled weights to ONNX Runtime as memory
    maps, so they need not sit beside the source's data.
    """

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self._folder: Path | None = None
        self._count = 0

    def values(self, array: np.ndarray, name: str) -> np.ndarray | SpilledValues:
        """``array`` as values for a Constant: spilled to a file when it is 1 MiB or more."""
        array = np.asarray(array)
        data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        if array.nbytes < SPILL_MIN_BYTES or data_type not in NATIVE_NUMPY_TYPES:
            return array
        folder = self._ensure_folder()
        self._count += 1
        path = folder / f"{self._count}.bin"
        with open(path, "wb") as handle:
            np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tofile(handle)
        proto = onnx.TensorProto(name=name, data_type=data_type)
        proto.dims.extend(array.shape)
        point_to_external(proto, f"{folder.name}/{path.name}", 0, array.nbytes)
        return SpilledValues(proto, folder.parent, self)

    def _ensure_folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="graphopt-spill-", dir=self.root))
            weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        return self._folder

    def scratch(self) -> Path:
        """The temporary folder the run writes in (see the class docstring)."""
        return self.root if self.root is not None else Path(tempfile.gettempdir())


def read(constant: gs.Constant) -> np.ndarray:
    """Rule 2: the constant's values, loaded for this call only, never cached in the graph."""
    values = constant._values
    if isinstance(values, LazyValues):
        return values.load()
    return np.asarray(values)


def replace(model: Model, constant: gs.Constant, array: np.ndarray) -> None:
    """Rule 3: give ``constant`` new values; 1 MiB or more go to the model's temporary folder
    (:class:`WeightSpill`) at once and are read back when used or saved."""
    set_storage(constant, model.spill.values(array, constant.name))


def set_storage(constant: gs.Constant, values: np.ndarray | LazyValues) -> None:
    """Give ``constant`` values kept elsewhere: an array, values spilled earlier
    (:meth:`WeightSpill.values`) or another constant's storage (:func:`storage`)."""
    constant._values = values
    # Imported external tensors carry data_location=EXTERNAL, which graphsurgeon copies onto
    # the exported proto; new in-memory values are plain data (spilled ones are lazy protos).
    constant.data_location = None


NATIVE_NUMPY_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
        onnx.TensorProto.INT16,
        onnx.TensorProto.UINT16,
        onnx.TensorProto.INT32,
        onnx.TensorProto.UINT32,
        onnx.TensorProto.INT64,
        onnx.TensorProto.UINT64,
        onnx.TensorProto.BOOL,
    }
)


def element_type(constant: gs.Constant) -> int:
    """Rule 1: the ONNX element type (``onnx.TensorProto`` enum), without loading."""
    values = constant._values
    if isinstance(values, LazyValues):
        dtype = values.dtype  # graphsurgeon keeps ONNX enums for types NumPy lacks
        if isinstance(dtype, int | np.integer):
            return int(dtype)
        return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    return int(helper.np_dtype_to_tensor_dtype(np.asarray(values).dtype))


def nbytes(constant: gs.Constant) -> int:
    """Rule 1: bytes of the values, without loading them."""
    values = constant._values
    if isinstance(values, LazyValues):
        return int(values.nbytes)
    return int(np.asarray(values).nbytes)


def point_to_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    clear_data_fields(tensor)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = value


def clear_data_fields(tensor: onnx.TensorProto) -> None:
    for name in (
        "raw_data",
        "float_data",
        "int32_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "string_data",
    ):
        tensor.ClearField(name)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def shape(constant: gs.Constant) -> tuple[int, ...]:
    """Rule 1: the weight's shape, without loading it."""
    values = constant._values
    if isinstance(values, LazyValues):
        return tuple(int(d) for d in values.shape)
    return tuple(np.shape(values))


def is_external(constant: gs.Constant) -> bool:
    """Rule 1: whether the values are in a file (the source's external data, or spilled)."""
    return isinstance(constant._values, ExternalValues)


def is_sparse(constant: gs.Constant) -> bool:
    """Whether the constant is a sparse tensor (``sparse_initializer``)."""
    return isinstance(constant._values, SparseValues)


def is_in_file(constant: gs.Constant) -> bool:
    """Rule 1: whether the values are read from a file when needed: the source's external
    data (:class:`ExternalValues`, or graphsurgeon's own lazy values of an external tensor)
    or a spilled file. Values computed on demand (a :class:`LazyWeight`) are not."""
    values = constant._values
    if isinstance(values, ExternalValues):
        return True
    return type(values) is LazyValues and external_data_helper.uses_external_data(values.tensor)


def attach_base_dir(constants: Iterable[gs.Constant], base_dir: Path) -> None:
    """Model I/O: graphsurgeon's lazy values of external tensors become
    :class:`ExternalValues` that resolve their files in ``base_dir``."""
    for constant in constants:
        values = constant._values
        if isinstance(values, LazyValues) and not isinstance(values, ExternalValues):
            if external_data_helper.uses_external_data(values.tensor):
                set_storage(constant, ExternalValues(values.tensor, base_dir))


def tensor_proto(constant: gs.Constant) -> onnx.TensorProto:
    """A self-contained TensorProto of ``constant`` (external bytes read in), named like it."""
    values = constant._values
    if isinstance(values, LazyValues):
        proto = onnx.TensorProto()
        proto.CopyFrom(values.tensor)
        if isinstance(values, ExternalValues):
            external_data_helper.load_external_data_for_tensor(proto, str(values.base_dir))
    else:
        proto = OnnxExporter.export_tensor_proto(constant)
    proto.name = constant.name
    return proto


def storage(constant: gs.Constant) -> np.ndarray | LazyValues:
    """The constant's storage as it is (an array or lazy values), to move it elsewhere with
    :func:`set_storage` without loading it (model I/O; passes use :func:`source`)."""
    return constant._values


class WeightSource:
    """A weight's storage captured at one moment (:func:`source`), readable later even after
    the constant itself was given other values."""

    def __init__(self, values: np.ndarray | LazyValues) -> None:
        self._values = values
        self.shape = (
            tuple(int(d) for d in np.shape(values))
            if not isinstance(values, LazyValues)
            else tuple(int(d) for d in values.shape)
        )

    def read(self) -> np.ndarray:
        if isinstance(self._values, LazyValues):
            return np.asarray(self._values.load())
        return np.asarray(self._values)


def source(constant: gs.Constant) -> WeightSource:
    """Rule 3: the weight's current values as a :class:`WeightSource`, e.g. for a
    :class:`LazyWeight` that converts them on demand."""
    return WeightSource(constant._values)


class LazyWeight(abc.ABC):
    """Rule 3: values computed only when read or saved, one weight at a time.

    Subclasses set :attr:`shape` and :attr:`element_type` (an ``onnx.TensorProto`` enum) and
    implement :meth:`load`; :meth:`raw_bytes` gives the bytes saved, little-endian (override it
    for element types NumPy lacks).
    """

    shape: tuple[int, ...]
    element_type: int

    @abc.abstractmethod
    def load(self) -> np.ndarray:
        """The values."""

    def raw_bytes(self) -> bytes:
        array = np.asarray(self.load())
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


class _LazyStorage(LazyValues):
    """A :class:`LazyWeight` as onnx-graphsurgeon storage: exported one tensor at a time."""

    def __init__(self, weight: LazyWeight) -> None:
        self.weight = weight
        self.shape = list(weight.shape)
        self.dtype = _numpy_or_enum(weight.element_type)
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(weight.element_type).itemsize
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * itemsize

    def load(self) -> np.ndarray:
        return self.weight.load()

    @property
    def tensor(self) -> onnx.TensorProto:  # type: ignore[override]
        proto = onnx.TensorProto(data_type=self.weight.element_type)
        proto.dims.extend(int(d) for d in self.shape)
        proto.raw_data = self.weight.raw_bytes()
        return proto

    def __str__(self) -> str:
        return f"{type(self.weight).__name__}(shape={self.shape})"


def _numpy_or_enum(element_type: int) -> np.dtype | int:
    """NumPy's dtype where NumPy has the type; the ONNX enum otherwise (as graphsurgeon does)."""
    if element_type in NATIVE_NUMPY_TYPES:
        return helper.tensor_dtype_to_np_dtype(element_type)
    return element_type


def replace_lazily(constant: gs.Constant, weight: LazyWeight) -> None:
    """Rule 3: give ``constant`` values computed on demand by ``weight``."""
    set_storage(constant, _LazyStorage(weight))


StoredValues = np.ndarray | LazyValues
"""Values kept for a constant: in memory, or in a file (:func:`store`)."""


def store(model: Model, array: np.ndarray, name: str) -> StoredValues:
    """Rule 3 for values computed before their constant exists (or before it may change):
    1 MiB or more go to the model's temporary folder now; give them to a constant later with
    :func:`new_constant` or :func:`set_storage`."""
    return model.spill.values(array, name)


def is_loaded(constant: gs.Constant) -> bool:
    """Rule 1: whether the values are held in memory (not in a file, not computed on demand)."""
    return not isinstance(constant._values, LazyValues)


def new_constant(name: str, values: np.ndarray | StoredValues | LazyWeight) -> gs.Constant:
    """A new graph constant holding ``values``: an array, values from :func:`store`, or a
    :class:`LazyWeight`."""
    constant = gs.Constant(name, np.zeros(0, np.float32))
    if isinstance(values, LazyWeight):
        replace_lazily(constant, values)
    else:
        set_storage(constant, values if isinstance(values, LazyValues) else np.asarray(values))
    return constant
