"""Pass options, declared once.

Each pass declares its options as a tuple of :class:`Option`. That one declaration feeds the CLI
(``-o PASS.KEY=VALUE``), recipe files, ``graphopt passes`` and validation: a value of the wrong
type or outside the declared range fails with a one-line :class:`~graphopt.errors.OptionError`
that names the option. A float option is never NaN, and is infinite only where its declared range
reaches that infinity (``maximum=math.inf`` allows ``inf``, ``minimum=-math.inf`` allows
``-inf``). :class:`FiniteFloat` applies the same rule to the CLI's own float flags.

Next to its options a pass declares what ``graphopt tune`` may search, as a :class:`SearchSpace`
(the pass's ``search_space`` class attribute); tune reads only that and knows no pass by name,
so a plugin is searched like a built-in pass. Rules:

1. A search space is an ordered tuple of :class:`SearchPoint`, most useful first: each point is
   one setting tune tries, the option values it sets (every other option at its default), plus
   the space's ``common`` values (a point's own value wins). :func:`sweep` makes one point per
   value of one option.
2. A point's ``objectives`` (a subset of :data:`OBJECTIVES`) say what the setting is expected
   to improve on its own; tune tries the points that cannot help its objective after all the
   others (an empty tuple: it helps neither, e.g. unstructured zeros that neither shrink the
   file nor speed ONNX Runtime up).
3. A value may be a :class:`BarCosine`: a cosine that follows tune's accuracy bar.
4. ``slow_on`` names execution providers on which the pass's output is often no faster than
   the original; for objective latency measured there, tune picks a candidate including the
   pass only when it is clearly faster than the best candidate without such passes.
5. :meth:`SearchSpace.check` holds a declaration to its schema: every searched name must be a
   declared option and every value one the option accepts (a :class:`BarCosine` only on a
   float option), or it raises :class:`~graphopt.errors.InputError` naming the pass and the
   option, so renaming an option can never silently drop it from the search.
6. A pass that declares nothing is tried once, at its defaults, for both objectives; an exact
   pass is in every candidate at its (fixed) options and its search space is not read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import click

from graphopt.errors import InputError, OptionError

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_KINDS: tuple[type, ...] = (bool, int, float, str, list)

OBJECTIVES: tuple[str, ...] = ("size", "latency")
"""What ``graphopt tune`` can optimise: the model file's size, or its latency."""


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


@dataclass(frozen=True)
class BarCosine:
    """A cosine that follows tune's accuracy bar (rule 3).

    ``slack`` is the fraction of the bar's slack (1 − bar) the value leaves: 1 gives the bar
    itself, exactly; any other fraction gives 1 − slack × (1 − bar) rounded to 6 decimals (0.5:
    halfway from the bar to 1).
    """

    slack: float = 1.0

    def at(self, bar: float) -> float:
        """The value for a search whose bar is ``bar``."""
        if self.slack == 1.0:
            return bar
        return round(1.0 - (1.0 - bar) * self.slack, 6)


@dataclass(frozen=True)
class SearchPoint:
    """One setting tune tries: option values (others at their defaults) and what it improves."""

    values: Mapping[str, Any] = field(default_factory=dict)
    objectives: tuple[str, ...] = OBJECTIVES

    def __post_init__(self) -> None:
        unknown = [name for name in self.objectives if name not in OBJECTIVES]
        if unknown:
            raise ValueError(f"unknown objective {unknown[0]!r} (objectives: {OBJECTIVES})")
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))


def sweep(
    option: str, values: Sequence[Any], objectives: tuple[str, ...] = OBJECTIVES
) -> tuple[SearchPoint, ...]:
    """One :class:`SearchPoint` per value of ``option``, in the given order."""
    return tuple(SearchPoint({option: value}, objectives) for value in values)


@dataclass(frozen=True)
class SearchSpace:
    """What tune may search for one pass (module rules 1 to 6)."""

    points: tuple[SearchPoint, ...] = (SearchPoint(),)
    common: Mapping[str, Any] = field(default_factory=dict)
    slow_on: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.points or not all(isinstance(p, SearchPoint) for p in self.points):
            raise TypeError("a search space needs a non-empty tuple of SearchPoint")
        object.__setattr__(self, "common", MappingProxyType(dict(self.common)))

    def check(self, owner: str, schema: Sequence[Option]) -> None:
        """Rule 5: raise InputError unless every searched name and value fits ``schema``."""
        by_name = {option.name: option for option in schema}
        for values in (self.common, *(point.values for point in self.points)):
            for name, value in values.items():
                option = by_name.get(name)
                if option is None:
                    known = ", ".join(sorted(by_name)) or "none"
                    raise InputError(
                        f"pass '{owner}' searches option '{name}', which it does not declare "
                        f"(options: {known})"
                    )
                if isinstance(value, BarCosine):
                    if option.kind is not float:
                        raise InputError(
                            f"pass '{owner}' searches {name} at the bar, but {name} is not a "
                            "float option"
                        )
                    continue
                try:
                    option.coerce(value, owner)
                except OptionError as error:
                    message = f"pass '{owner}' searches a value it refuses: {error}"
                    raise InputError(message) from None

    def resolve(self, bar: float) -> list[tuple[dict[str, Any], frozenset[str]]]:
        """Each point's option values (common ones included, :class:`BarCosine` resolved at
        ``bar``) and objectives, in declared order."""
        resolved = []
        for point in self.points:
            values = {**self.common, **point.values}
            concrete = {
                name: value.at(bar) if isinstance(value, BarCosine) else value
                for name, value in values.items()
            }
            resolved.append((concrete, frozenset(point.objectives)))
        return resolved


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
