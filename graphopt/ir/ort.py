"""ONNX Runtime sessions, created one way everywhere so results are reproducible."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphopt.errors import InputError, OptionError
from graphopt.settings import ORT_LEVELS, OrtLevel

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
"""Where a model loaded from bytes finds its external data (ONNX Runtime ≥ 1.21; 1.20 ignores
it, hence the minimum in pyproject.toml)."""
_ORT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
"""The levels of :data:`graphopt.settings.ORT_LEVELS`, as ONNX Runtime names them."""


@dataclass(frozen=True)
class InMemoryModel:
    """A model ONNX Runtime loads from bytes, without writing it anywhere.

    ``folder`` is where the proto's external-data locations resolve (ONNX Runtime refuses
    locations that leave it, absolute ones and symbolic links included); ``initializers`` are
    tensors handed over as arrays (typically read-only memory maps of files elsewhere), which
    replace the proto's initializers of the same names without reading their locations.
    """

    proto: bytes
    folder: Path | None = None
    initializers: Mapping[str, np.ndarray] = field(default_factory=dict)
    onnx_types: Mapping[str, int] = field(default_factory=dict)
    """Element types of initializers whose array holds another type's bits (bfloat16 and the
    8-bit floats, which NumPy lacks, as uint16/uint8)."""


SessionSource = onnx.ModelProto | InMemoryModel | str | os.PathLike[str]


def available_providers() -> list[str]:
    """Short names (``cpu``, ``cuda``) of the providers this onnxruntime build offers."""
    offered = set(ort.get_available_providers())
    return [short for short, full in PROVIDER_NAMES.items() if full in offered]


def resolve_providers(names: Sequence[str]) -> list[str]:
    """Check the requested short provider names; CUDA without a CUDA build is a clear error."""
    resolved: list[str] = []
    for raw in names:
        name = raw.strip().lower()
        if name not in PROVIDER_NAMES:
            raise InputError(f"unknown execution provider '{raw}' (choose from cpu, cuda)")
        if name not in available_providers():
            raise InputError(
                f"execution provider '{name}' is not available in this onnxruntime "
                f"({ort.__version__}, offers: {', '.join(ort.get_available_providers())}); "
                "install graphopt[gpu] on a machine with an NVIDIA GPU"
            )
        if name not in resolved:
            resolved.append(name)
    return resolved


def make_session(
    model: SessionSource,
    provider: str = "cpu",
    *,
    optimize: bool | OrtLevel = True,
    threads: int = 0,
    spinning: bool = True,
    arena: bool = True,
    quiet: bool = False,
) -> ort.InferenceSession:
    """A session on one provider; ``optimize=False`` turns off ORT's graph rewrites.

    ``optimize`` is a bool (``True``: every rewrite, ``False``: none) or one of the levels of
    :data:`graphopt.settings.ORT_LEVELS` (:class:`graphopt.settings.Settings` carries the levels
    of validation and latency). ``threads``: intra-op threads (0: ONNX Runtime's default).

    ``quiet=True`` keeps ONNX Runtime from printing errors itself (probes that expect some runs
    to fail; pair it with :func:`quiet_run_options` for ``run``).

    ``spinning=False`` stops idle worker threads from spinning (fair latency comparisons);
    ``arena=False`` returns activation memory after each run (calibration, where a run
    exposes many intermediate tensors).
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4 if quiet else 3
    options.graph_optimization_level = optimization_level(optimize)
    if not arena:  # memory goes back after each run: lower peak for many-output runs
        options.enable_cpu_mem_arena = False
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = [PROVIDER_NAMES[provider]]
    if provider != "cpu":
        providers.append(PROVIDER_NAMES["cpu"])
    source: bytes | str
    keep_alive: list[object] = []
    if isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, InMemoryModel):
        source = model.proto
        if model.folder is not None:
            options.add_session_config_entry(_EXTERNAL_FOLDER_KEY, str(model.folder))
        if model.initializers:
            values = [
                ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, model.onnx_types[name])
                if name in model.onnx_types
                else ort.OrtValue.ortvalue_from_numpy(array)
                for name, array in model.initializers.items()
            ]
            options.add_external_initializers(list(model.initializers), values)
            keep_alive = [values, model.initializers]
    else:
        source = str(Path(model))
    session = ort.InferenceSession(source, sess_options=options, providers=providers)
    if keep_alive:  # ONNX Runtime reads these buffers for as long as the session lives
        session._graphopt_buffers = keep_alive  # type: ignore[attr-defined]
    return session


def optimization_level(optimize: bool | str) -> ort.GraphOptimizationLevel:
    """ONNX Runtime's level for :func:`make_session`'s ``optimize`` (a bool or a level name)."""
    if isinstance(optimize, bool):
        return _ORT_LEVELS["all" if optimize else "disable"]
    if optimize not in _ORT_LEVELS:
        raise OptionError(
            f"unknown ONNX Runtime optimisation level {optimize!r} "
            f"(choose from {', '.join(ORT_LEVELS)})"
        )
    return _ORT_LEVELS[optimize]


def node_placement(
    model: onnx.ModelProto | str | os.PathLike[str],
    provider: str,
    feed: Mapping[str, np.ndarray],
) -> dict[str, list[str]]:
    """Which execution provider ran each node, read from one profiled run.

    Returns provider name → node names (sorted). Requested providers fall back to the CPU for
    nodes they have no kernel for; this shows which ones did.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="graphopt-profile-") as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        providers = [PROVIDER_NAMES[provider]]
        if provider != "cpu":
            providers.append(PROVIDER_NAMES["cpu"])
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
        session.run(None, dict(feed))
        events = json.loads(Path(session.end_profiling()).read_text())
    placement: dict[str, set[str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or "provider" not in args:
            continue
        node = str(event.get("name", "")).removesuffix("_kernel_time")
        placement.setdefault(args["provider"], set()).add(node)
    return {name: sorted(nodes) for name, nodes in sorted(placement.items())}


def quiet_run_options() -> ort.RunOptions:
    """Run options under which a failing run raises without ONNX Runtime printing the error."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options
