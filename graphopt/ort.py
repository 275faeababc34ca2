"""ONNX Runtime sessions, created one way everywhere so results are reproducible."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnxruntime as ort

from graphopt.errors import InputError

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


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
    model: onnx.ModelProto | str | os.PathLike[str],
    provider: str = "cpu",
    *,
    optimize: bool = True,
    threads: int = 0,
) -> ort.InferenceSession:
    """A session on one provider; ``optimize=False`` turns off ORT's graph rewrites."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = [PROVIDER_NAMES[provider]]
    if provider != "cpu":
        providers.append(PROVIDER_NAMES["cpu"])
    source: bytes | str
    if isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    else:
        source = str(Path(model))
    return ort.InferenceSession(source, sess_options=options, providers=providers)
