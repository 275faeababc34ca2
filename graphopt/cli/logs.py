"""How the commands log: one stderr handler on graphopt's loggers, set by ``-v``/``--debug``.

Rules:

1. ``-v`` logs every skipped candidate (INFO), ``-vv`` or ``--debug`` everything (DEBUG);
   otherwise warnings only. onnx-graphsurgeon logs errors only, warnings with ``--debug``.
2. ``-v``/``--debug`` may also follow a subcommand; they add to the group's.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click
from onnx_graphsurgeon.logger import G_LOGGER

LOGGER_NAMES = ("graphopt", "passes")
VERBOSE_HELP = "-v: log every skipped candidate; -vv: debug."
DEBUG_HELP = "Show tracebacks and debug logs."


def setup_logging(verbose: int, debug: bool) -> None:
    """Rule 1."""
    level = logging.DEBUG if debug or verbose >= 2 else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
    G_LOGGER.severity = G_LOGGER.ERROR if not debug else G_LOGGER.WARNING


def apply_subcommand_flags(verbose: int, debug: bool) -> None:
    """Rule 2: a subcommand's ``-v``/``--debug`` added to the group's."""
    group = click.get_current_context().find_root().params
    total = int(group.get("verbose") or 0) + verbose
    setup_logging(total, bool(group.get("debug")) or debug)


def logging_flags(command: Callable[..., int]) -> Callable[..., int]:
    """Rule 2: give ``command`` its own ``-v``/``--debug`` options."""

    @functools.wraps(command)
    def run(*args: Any, sub_verbose: int, sub_debug: bool, **kwargs: Any) -> int:
        apply_subcommand_flags(sub_verbose, sub_debug)
        return command(*args, **kwargs)

    run = click.option("--debug", "sub_debug", is_flag=True, help=DEBUG_HELP)(run)
    return click.option("-v", "--verbose", "sub_verbose", count=True, help=VERBOSE_HELP)(run)
