"""graphopt: a framework-agnostic ONNX graph optimizer, validated against the original model.

The Python API mirrors the CLI: :func:`optimize` runs the whole job; :func:`load_model`,
:func:`normalize`, :class:`PassManager` and :func:`compare_models` are the pieces it is built from.
"""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt.data import Feeds, open_data, synthesize
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
from graphopt.manager import PassManager, plan_order
from graphopt.model import Model, load_model, model_from_proto, save_model
from graphopt.normalize import normalize
from graphopt.options import Option
from graphopt.pass_api import Pass, PassContext, PassResult
from graphopt.pipeline import OptimizeReport, optimize
from graphopt.validate import Criteria, ValidationReport, compare_models

__all__ = [
    "Criteria",
    "DataError",
    "Feeds",
    "GraphoptError",
    "InputError",
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
    "UnknownPassError",
    "ValidationReport",
    "__version__",
    "compare_models",
    "load_model",
    "model_from_proto",
    "normalize",
    "open_data",
    "optimize",
    "plan_order",
    "save_model",
    "synthesize",
]
