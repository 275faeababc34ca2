"""Typed errors. The CLI maps :class:`InputError` to exit code 2 with a one-line message."""

from __future__ import annotations

from collections.abc import Sequence


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class InputError(GraphoptError):
    """The user's input is unusable: a bad model file, option, data set or path."""


class ModelLoadError(InputError):
    """The model file cannot be read: not ONNX, truncated, missing external data, bad IR version."""


class OptionError(InputError):
    """A pass option or CLI option has an unknown name or an out-of-range value."""


class DataError(InputError):
    """Calibration or validation data does not fit the model's inputs."""


class UnknownPassError(InputError):
    """A pass name is neither built in nor registered through the ``graphopt.passes`` group."""


class PlanError(InputError):
    """The requested passes cannot be put into an order that meets every declared constraint."""


class PassError(GraphoptError):
    """A pass raised or left the graph invalid; names the pass and the passes run before it."""

    def __init__(self, pass_name: str, ran_before: Sequence[str], reason: str) -> None:
        self.pass_name = pass_name
        self.ran_before = tuple(ran_before)
        self.reason = reason
        before = ", ".join(self.ran_before)
        super().__init__(f"pass '{pass_name}' failed after [{before}]: {reason}")


class StorageError(InputError):
    """A file could not be written for a reason of the machine's: a full disk, a read-only or
    unwritable folder, a quota. The user fixes it (free space, ``--tmp-dir``), so exit code 2."""
