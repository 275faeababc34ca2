"""graphopt: a framework-agnostic ONNX graph optimizer, validated against the original model.

The Python API mirrors the CLI: :func:`optimize` runs the whole job; :func:`load_model`,
:func:`normalize`, :class:`PassManager` and :func:`compare_models` are the pieces it is built from;
:func:`tune` searches passes and options for the best model that meets an accuracy bar.
"""

from __future__ import annotations

__version__ = "0.1.0"

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
