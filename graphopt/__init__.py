"""graphopt: a framework-agnostic ONNX graph optimizer, validated against the original model.

The Python API mirrors the CLI: :func:`optimize` runs the whole job; :func:`load_model`,
:func:`normalize`, :class:`PassManager` and :func:`compare_models` are the pieces it is built from;
:func:`tune` searches passes and options for the best model that meets an accuracy bar.

Each public name is imported from its module on first use, so ``import graphopt`` (and the
``graphopt`` command's start-up, :mod:`graphopt.__main__`) does not load onnx and ONNX Runtime
before it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Settings": "graphopt.settings",
    "BarCosine": "graphopt.passkit.options",
    "sweep": "graphopt.passkit.options",
    "SearchPoint": "graphopt.passkit.options",
    "SearchSpace": "graphopt.passkit.options",
    "OrderRank": "graphopt.passkit.ordering",
    "Agreement": "graphopt.check.validate",
    "agreement": "graphopt.check.validate",
    "bisect_passes": "graphopt.check.bisect",
    "BisectReport": "graphopt.check.bisect",
    "Budget": "graphopt.passkit.api",
    "compare_models": "graphopt.check.validate",
    "compare_tensors": "graphopt.check.localize",
    "Criteria": "graphopt.check.validate",
    "DataError": "graphopt.errors",
    "Feeds": "graphopt.data.feeds",
    "first_divergence": "graphopt.check.localize",
    "GateReport": "graphopt.check.gate",
    "GraphoptError": "graphopt.errors",
    "InputError": "graphopt.errors",
    "LatencyComparison": "graphopt.check.latency",
    "load_model": "graphopt.ir.model",
    "measure_latency": "graphopt.check.latency",
    "Model": "graphopt.ir.model",
    "model_from_proto": "graphopt.ir.model",
    "ModelLoadError": "graphopt.errors",
    "normalize": "graphopt.ir.normalize",
    "open_data": "graphopt.data.feeds",
    "optimize": "graphopt.pipeline",
    "OptimizeReport": "graphopt.pipeline",
    "Option": "graphopt.passkit.options",
    "OptionError": "graphopt.errors",
    "parse_input_shapes": "graphopt.data.feeds",
    "Pass": "graphopt.passkit.api",
    "PassContext": "graphopt.passkit.api",
    "PassError": "graphopt.errors",
    "PassManager": "graphopt.passkit.manager",
    "PassResult": "graphopt.passkit.api",
    "plan_order": "graphopt.passkit.manager",
    "PlanError": "graphopt.errors",
    "record_feeds": "graphopt.data.capture",
    "CaptureSummary": "graphopt.data.capture",
    "run_gate": "graphopt.check.gate",
    "save_model": "graphopt.ir.model",
    "synthesize": "graphopt.data.feeds",
    "synthesize_runnable": "graphopt.data.feeds",
    "TensorComparison": "graphopt.check.localize",
    "tune": "graphopt.tuning.search",
    "TuneResult": "graphopt.tuning.search",
    "UnknownPassError": "graphopt.errors",
    "ValidationReport": "graphopt.check.validate",
}
"""Public name → the module defining it; imported on first use (module docstring)."""


def __getattr__(name: str) -> object:
    """Import a public name's module on first use, so ``import graphopt`` stays cheap."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from graphopt.check.bisect import BisectReport, bisect_passes
    from graphopt.check.gate import GateReport, run_gate
    from graphopt.check.latency import LatencyComparison, measure_latency
    from graphopt.check.localize import TensorComparison, compare_tensors, first_divergence
    from graphopt.check.validate import (
        Agreement,
        Criteria,
        ValidationReport,
        agreement,
        compare_models,
    )
    from graphopt.data.capture import CaptureSummary, record_feeds
    from graphopt.data.feeds import (
        Feeds,
        open_data,
        parse_input_shapes,
        synthesize,
        synthesize_runnable,
    )
    from graphopt.errors import (
        DataError,
        GraphoptError,
        InputError,
        ModelLoadError,
        OptionError,
        PassError,
        PlanError,
        UnknownPassError,
    )
    from graphopt.ir.model import Model, load_model, model_from_proto, save_model
    from graphopt.ir.normalize import normalize
    from graphopt.passkit.api import Budget, Pass, PassContext, PassResult
    from graphopt.passkit.manager import PassManager, plan_order
    from graphopt.passkit.options import BarCosine, Option, SearchPoint, SearchSpace, sweep
    from graphopt.passkit.ordering import OrderRank
    from graphopt.pipeline import OptimizeReport, optimize
    from graphopt.settings import Settings
    from graphopt.tuning.search import TuneResult, tune

__all__ = [
    "Agreement",
    "BarCosine",
    "BisectReport",
    "Budget",
    "CaptureSummary",
    "Criteria",
    "DataError",
    "Feeds",
    "GateReport",
    "GraphoptError",
    "InputError",
    "LatencyComparison",
    "Model",
    "ModelLoadError",
    "OptimizeReport",
    "Option",
    "OptionError",
    "OrderRank",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PlanError",
    "SearchPoint",
    "SearchSpace",
    "Settings",
    "TensorComparison",
    "TuneResult",
    "UnknownPassError",
    "ValidationReport",
    "__version__",
    "agreement",
    "bisect_passes",
    "compare_models",
    "compare_tensors",
    "first_divergence",
    "load_model",
    "measure_latency",
    "model_from_proto",
    "normalize",
    "open_data",
    "optimize",
    "parse_input_shapes",
    "plan_order",
    "record_feeds",
    "run_gate",
    "save_model",
    "sweep",
    "synthesize",
    "synthesize_runnable",
    "tune",
]
