"""Runtime settings: how graphopt uses the machine, in one typed object every stage can read.

Rules:

1. A :class:`Settings` is frozen and checked when made: a value of the wrong type or out of range
   is an :class:`~graphopt.errors.OptionError` naming the field (``Settings.threads``), the
   environment variable (``GRAPHOPT_THREADS``) or, in the CLI, the flag (``--threads``).
2. The defaults are graphopt's behaviour without settings. A field that is None means the
   built-in rule (the system's temporary folder, the calibration module's memory budgets).
3. Settings change how work uses the machine (folders, threads, memory, ONNX Runtime's graph
   rewrites during checks), never which passes run or with what options.
4. Environment variables (``GRAPHOPT_*``, :data:`ENVIRONMENT`) are read once, by
   :meth:`Settings.from_env`: in the CLI, and by the Python entry points (``optimize``,
   ``compare_models``, ``run_gate``, ``measure_latency``) when they are given no settings. An
   empty variable counts as unset. CLI flags override the variables; explicit arguments of the
   Python API override the settings object (``optimize(tmp_dir=…)`` beats ``settings.tmp_dir``).
   Internal helpers and a bare ``PassContext()`` use the defaults, never the environment.
5. ONNX Runtime optimisation levels have no environment variable: they change validation and
   latency figures, and a verdict should not depend on the shell it ran in (GUIDE §2.6); they
   are flags (``--validation-ort-level``, ``--latency-ort-level``) and fields.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

from graphopt.errors import OptionError

OrtLevel = Literal["disable", "basic", "extended", "all"]
"""ONNX Runtime graph optimisation levels (``ORT_DISABLE_ALL`` … ``ORT_ENABLE_ALL``)."""
ORT_LEVELS: tuple[str, ...] = get_args(OrtLevel)

ENVIRONMENT: Mapping[str, str] = {
    "tmp_dir": "GRAPHOPT_TMPDIR",
    "threads": "GRAPHOPT_THREADS",
    "calibration_output_bytes": "GRAPHOPT_CALIBRATION_OUTPUT_BYTES",
    "gram_budget_bytes": "GRAPHOPT_GRAM_BUDGET_BYTES",
    "probe_cache_bytes": "GRAPHOPT_PROBE_CACHE_BYTES",
}
"""Field → the environment variable :meth:`Settings.from_env` reads it from (rule 4)."""

_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BYTES_PATTERN = re.compile(r"(\d+)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)


@dataclass(frozen=True)
class Settings:
    """How a run uses the machine (module rules). Every field has the behaviour-free default."""

    tmp_dir: Path | None = None
    """Folder for temporary files (spilled weights, the staged output, the reference outputs
    during validation). None: the system's temporary folder (``TMPDIR``)."""
    threads: int = 0
    """ONNX Runtime intra-op threads of calibration, validation and latency sessions (inter-op
    threads are then 1). 0: ONNX Runtime's default, one per physical core."""
    validation_ort_level: OrtLevel = "disable"
    """ONNX Runtime graph optimisation level of validation sessions (both models). ``disable``
    compares the graphs as written; ``all`` compares what a default deployment runs."""
    latency_ort_level: OrtLevel = "all"
    """ONNX Runtime graph optimisation level of latency sessions (both models): what a default
    deployment runs."""
    calibration_output_bytes: int | None = None
    """Most bytes of requested tensors one calibration run may return; larger batches are
    split. None: :data:`graphopt.data.calibration.OUTPUT_BUDGET_BYTES` (512 MiB)."""
    gram_budget_bytes: int | None = None
    """Most bytes of XᵀX matrices one calibration run may hold (``lowrank``, ``sparsify``
    SparseGPT); more tensors take more runs. None: a quarter of the model's weight bytes, at
    least 256 MiB (:func:`graphopt.data.calibration.gram_budget`)."""
    probe_cache_bytes: int | None = None
    """Most bytes of feeds and float activations an accuracy search (``quant``) caches in the
    temporary folder to run each probe only where it differs; probes that do not fit run whole
    (same scores). 0: every probe runs whole. None:
    :data:`graphopt.passkit.probe.PROBE_CACHE_BYTES` (1 GiB)."""

    def __post_init__(self) -> None:
        """Rule 1: every field checked, named ``Settings.<field>``; ``tmp_dir`` made a Path."""
        if self.tmp_dir is not None:
            if not isinstance(self.tmp_dir, str | os.PathLike):
                raise OptionError(
                    f"Settings.tmp_dir must be a path, not {type(self.tmp_dir).__name__}"
                )
            object.__setattr__(self, "tmp_dir", Path(self.tmp_dir))
        for item in fields(self):
            check = _CHECKS.get(item.name)
            if check is not None:
                check(getattr(self, item.name), f"Settings.{item.name}")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, given: Iterable[str] = ()
    ) -> Settings:
        """Settings from the ``GRAPHOPT_*`` variables of ``environ`` (None: ``os.environ``).

        Unset or empty variables keep the defaults; a bad value is an OptionError naming the
        variable. ``GRAPHOPT_TMPDIR`` must be an existing, writable folder. Fields in ``given``
        (set by a flag or an argument, which wins, rule 4) are not read at all, so a bad
        variable a flag overrides does not stop the run.
        """
        source = os.environ if environ is None else environ
        skipped = set(given)
        values: dict[str, Any] = {}
        for name, variable in ENVIRONMENT.items():
            if name in skipped:
                continue
            text = source.get(variable, "").strip()
            if text:
                values[name] = _PARSERS[name](text, variable)
        return cls(**values)


_THREADS_RULE = "must be an integer ≥ 0 (0: ONNX Runtime's default)"


def _check_threads(value: object, label: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise OptionError(f"{label} {_THREADS_RULE}, not {value!r}")


def _check_level(value: object, label: str) -> None:
    if value not in ORT_LEVELS:
        raise OptionError(f"{label} must be one of {', '.join(ORT_LEVELS)}, not {value!r}")


def _check_bytes(value: object, label: str) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise OptionError(f"{label} must be a positive number of bytes or None, not {value!r}")


def _check_bytes_or_zero(value: object, label: str) -> None:
    if value == 0 and not isinstance(value, bool):
        return
    _check_bytes(value, label)


_CHECKS: dict[str, Callable[[object, str], None]] = {
    "threads": _check_threads,
    "validation_ort_level": _check_level,
    "latency_ort_level": _check_level,
    "calibration_output_bytes": _check_bytes,
    "gram_budget_bytes": _check_bytes,
    "probe_cache_bytes": _check_bytes_or_zero,
}


def _parse_bytes_or_zero(text: str, label: str) -> int:
    """:func:`parse_bytes`, or 0 for ``0`` (a cache turned off)."""
    return 0 if text.strip() == "0" else parse_bytes(text, label)


def parse_bytes(text: str, label: str) -> int:
    """A byte count such as ``536870912``, ``512M``, ``512MiB`` or ``1G`` (units of 1024)."""
    match = _BYTES_PATTERN.fullmatch(text.strip())
    count = 0 if match is None else int(match.group(1)) * _BYTE_UNITS[match.group(2).upper()]
    if count <= 0:
        raise OptionError(
            f"{label} must be a positive number of bytes such as 536870912, 512M or 1G, "
            f"not {text!r}"
        )
    return count


def _parse_threads(text: str, label: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise OptionError(f"{label} {_THREADS_RULE}, not {text!r}")
    return value


def temporary_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot hold temporary files (``does not exist``, ``is not a folder``,
    ``is not writable``), or None when it can."""
    if not folder.is_dir():
        return "is not a folder" if folder.exists() else "does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def _parse_folder(text: str, label: str) -> Path:
    """Rule 4: ``GRAPHOPT_TMPDIR`` names an existing folder graphopt may write in."""
    folder = Path(text).expanduser()
    problem = temporary_folder_problem(folder)
    if problem is not None:
        raise OptionError(f"{label}={text}: the temporary folder {problem}")
    return folder


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "tmp_dir": _parse_folder,
    "threads": _parse_threads,
    "calibration_output_bytes": parse_bytes,
    "gram_budget_bytes": parse_bytes,
    "probe_cache_bytes": _parse_bytes_or_zero,
}
