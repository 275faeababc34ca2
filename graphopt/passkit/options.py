"""Pass options, declared once.

Each pass declares its options as a tuple of :class:`Option`. That one declaration feeds the CLI
(``-o PASS.KEY=VALUE``), recipe files, ``graphopt passes`` and validation: a value of the wrong
type or outside the declared range fails with a one-line :class:`~graphopt.errors.OptionError`
that names the option. A float option is never NaN, and is infinite only where its declared range
reaches that infinity (``maximum=math.inf`` allows ``inf``, ``minimum=-math.inf`` allows
``-inf``). :class:`FiniteFloat` applies the same rule to the CLI's own float flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import click

from graphopt.errors import OptionError

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_KINDS: tuple[type, ...] = (bool, int, float, str, list)


@dataclass(frozen=True)
class Option:
    """One declared option of a pass.

    ``kind`` is one of ``bool``, ``int``, ``float``, ``str`` or ``list`` (a list of strings; on the
    command line a comma-separated value). ``choices`` restricts str values (and every item of a
    list); ``minimum``/``maximum`` bound numbers, inclusively.
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise TypeError(f"option {self.name}: unsupported kind {self.kind!r}")

    def describe_range(self) -> str:
        """Human-readable allowed values, for ``graphopt passes`` and error messages."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        if self.minimum is not None and self.maximum is not None:
            return f"{self.minimum:g} to {self.maximum:g}"
        if self.minimum is not None:
            return f">= {self.minimum:g}"
        if self.maximum is not None:
            return f"<= {self.maximum:g}"
        return self.kind.__name__

    def coerce(self, value: Any, owner: str) -> Any:
        """Turn ``value`` (a string from the CLI or a JSON/YAML value) into a checked value."""
        label = f"{owner}.{self.name}"
        converted = self._convert(value, label)
        self._check_range(converted, label)
        return converted

    def _convert(self, value: Any, label: str) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
            raise OptionError(f"option {label}: expected true or false, got {value!r}")
        if self.kind is int:
            if isinstance(value, bool):
                raise OptionError(f"option {label}: expected an integer, got {value!r}")
            try:
                as_float = float(value)
            except (TypeError, ValueError):
                raise OptionError(f"option {label}: expected an integer, got {value!r}") from None
            if not as_float.is_integer():
                raise OptionError(f"option {label}: expected an integer, got {value!r}")
            return int(as_float)
        if self.kind is float:
            if isinstance(value, bool):
                raise OptionError(f"option {label}: expected a number, got {value!r}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise OptionError(f"option {label}: expected a number, got {value!r}") from None
            if not self._allows(number):
                raise OptionError(f"option {label}: expected a finite number, got {value!r}")
            return number
        if self.kind is list:
            if isinstance(value, str):
                return [item.strip() for item in value.split(",") if item.strip()]
            if isinstance(value, Sequence):
                return [str(item) for item in value]
            raise OptionError(f"option {label}: expected a list, got {value!r}")
        return str(value)

    def _allows(self, number: float) -> bool:
        """False for NaN, and for an infinity the declared range does not reach."""
        if math.isnan(number):
            return False
        if number == math.inf:
            return self.maximum == math.inf
        if number == -math.inf:
            return self.minimum == -math.inf
        return True

    def _check_range(self, value: Any, label: str) -> None:
        if self.choices is not None:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if str(item) not in self.choices:
                    raise OptionError(
                        f"option {label}: {item!r} is not allowed ({self.describe_range()})"
                    )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            too_low = self.minimum is not None and value < self.minimum
            too_high = self.maximum is not None and value > self.maximum
            if too_low or too_high:
                raise OptionError(
                    f"option {label}: {value!r} is out of range ({self.describe_range()})"
                )


def resolve_options(
    owner: str, schema: Sequence[Option], given: Mapping[str, Any]
) -> dict[str, Any]:
    """Defaults overlaid with ``given``, every value checked; unknown names are an error."""
    by_name = {option.name: option for option in schema}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        known = ", ".join(sorted(by_name)) or "none"
        raise OptionError(f"pass '{owner}' has no option '{unknown[0]}' (options: {known})")
    resolved = {option.name: option.default for option in schema}
    for name, value in given.items():
        resolved[name] = by_name[name].coerce(value, owner)
    return resolved


def parse_option_assignments(assignments: Sequence[str]) -> dict[str, dict[str, str]]:
    """Parse CLI ``PASS.KEY=VALUE`` strings into ``{pass: {key: value}}`` (values stay strings)."""
    parsed: dict[str, dict[str, str]] = {}
    for text in assignments:
        key, sep, value = text.partition("=")
        pass_name, dot, option_name = key.partition(".")
        if not sep or not dot or not pass_name.strip() or not option_name.strip():
            raise OptionError(
                f"bad option {text!r}: expected PASS.KEY=VALUE, e.g. quant.per_channel=false"
            )
        parsed.setdefault(pass_name.strip(), {})[option_name.strip()] = value.strip()
    return parsed


class FiniteFloat(click.FloatRange):
    """A click float flag that refuses ``nan``, ``inf`` and ``-inf``; optionally bounded.

    Takes :class:`click.FloatRange`'s arguments (``min``, ``max``, ``min_open``, ``max_open``,
    ``clamp``). A non-finite value fails with click's usual ``Invalid value for '--flag'`` usage
    error (exit code 2) before the range is checked; an unbounded flag shows no range in
    ``--help``.
    """

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        if self.min is None and self.max is None:
            return ""
        return super()._describe_range()
