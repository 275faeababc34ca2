"""Where passes come from: an explicit table of built-ins, then ``graphopt.passes`` entry points.

Nothing registers itself by import side effect. A plugin module is imported only when its pass is
named; listing passes reads entry-point metadata without importing plugins.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType

from graphopt.errors import InputError, UnknownPassError
from graphopt.passkit.api import Pass

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "graphopt.passes"

BUILTIN_PASSES = MappingProxyType(
    {
        "cleanup": "passes.cleanup:CleanupPass",
        "fp16": "passes.fp16:Fp16Pass",
        "lowrank": "passes.lowrank:LowRankPass",
        "quant": "passes.quant:QuantPass",
        "sparsify": "passes.sparsify:SparsifyPass",
    }
)
"""CLI name → ``module:Class`` of every built-in pass."""


def _plugin_entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in BUILTIN_PASSES:
            logger.warning(
                "plugin pass '%s' (%s) ignored: a built-in pass has that name",
                point.name,
                point.value,
            )
            continue
        found.setdefault(point.name, point)
    return found


def available_pass_names() -> list[str]:
    """Built-in pass names in table order, then plugin names sorted."""
    return list(BUILTIN_PASSES) + sorted(_plugin_entry_points())


def load_pass_class(name: str) -> type[Pass]:
    """The pass class for a CLI name; imports the plugin's module only now."""
    if name in BUILTIN_PASSES:
        module_name, _, class_name = BUILTIN_PASSES[name].partition(":")
        pass_class = getattr(importlib.import_module(module_name), class_name)
    else:
        plugins = _plugin_entry_points()
        if name not in plugins:
            available = ", ".join(available_pass_names())
            raise UnknownPassError(f"unknown pass '{name}' (available: {available})")
        try:
            pass_class = plugins[name].load()
        except Exception as error:
            raise InputError(
                f"plugin pass '{name}' ({plugins[name].value}) failed to import: {error}"
            ) from error
    if not (isinstance(pass_class, type) and issubclass(pass_class, Pass)):
        raise InputError(f"pass '{name}' does not derive from graphopt.Pass")
    if pass_class.name != name:
        raise InputError(f"pass registered as '{name}' calls itself '{pass_class.name}'")
    return pass_class
