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
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Agreement": "graphopt.validate",
    "agreement": "graphopt.validate",
    "bisect_passes": "graphopt.bisect",
    "BisectReport": "graphopt.bisect",
    "Budget": "graphopt.pass_api",
    "compare_models": "graphopt.validate",
    "compare_tensors": "graphopt.localize",
    "Criteria": "graphopt.validate",
    "DataError": "graphopt.errors",
    "Feeds": "graphopt.data",
    "first_divergence": "graphopt.localize",
    "GateReport": "graphopt.gate",
    "GraphoptError": "graphopt.errors",
    "InputError": "graphopt.errors",
    "LatencyComparison": "graphopt.latency",
    "load_model": "graphopt.model",
    "measure_latency": "graphopt.latency",
    "Model": "graphopt.model",
    "model_from_proto": "graphopt.model",
    "ModelLoadError": "graphopt.errors",
    "normalize": "graphopt.normalize",
    "open_data": "graphopt.data",
    "optimize": "graphopt.pipeline",
    "OptimizeReport": "graphopt.pipeline",
    "Option": "graphopt.options",
    "OptionError": "graphopt.errors",
    "parse_input_shapes": "graphopt.data",
    "Pass": "graphopt.pass_api",
    "PassContext": "graphopt.pass_api",
    "PassError": "graphopt.errors",
    "PassManager": "graphopt.manager",
    "PassResult": "graphopt.pass_api",
    "plan_order": "graphopt.manager",
    "PlanError": "graphopt.errors",
    "run_gate": "graphopt.gate",
    "save_model": "graphopt.model",
    "synthesize": "graphopt.data",
    "synthesize_runnable": "graphopt.data",
    "TensorComparison": "graphopt.localize",
    "tune": "graphopt.tune",
    "TuneResult": "graphopt.tune",
    "UnknownPassError": "graphopt.errors",
    "ValidationReport": "graphopt.validate",
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


class _Package(types.ModuleType):
    """``graphopt.normalize`` and ``graphopt.tune`` name both a function and its module. Importing
    the module sets it as the package's attribute; here that is declined, so the attribute stays
    the function (resolved on first use) and the module lives in ``sys.modules`` as usual."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and name in _EXPORTS:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from graphopt.bisect import BisectReport, bisect_passes
    from graphopt.data import Feeds, open_data, parse_input_shapes, synthesize, synthesize_runnable
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
    from graphopt.gate import GateReport, run_gate
    from graphopt.latency import LatencyComparison, measure_latency
    from graphopt.localize import TensorComparison, compare_tensors, first_divergence
    from graphopt.manager import PassManager, plan_order
    from graphopt.model import Model, load_model, model_from_proto, save_model
    from graphopt.normalize import normalize
    from graphopt.options import Option
    from graphopt.pass_api import Budget, Pass, PassContext, PassResult
    from graphopt.pipeline import OptimizeReport, optimize
    from graphopt.tune import TuneResult, tune
    from graphopt.validate import Agreement, Criteria, ValidationReport, agreement, compare_models

__all__ = [
    "Agreement",
    "BisectReport",
    "Budget",
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
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PlanError",
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
    "run_gate",
    "save_model",
    "synthesize",
    "synthesize_runnable",
    "tune",
]
