"""The pass contract: one typed base class that every pass, built-in or plugin, derives from.

A pass declares, as class attributes: its CLI ``name``, a one-line ``summary``, whether it is
``exact`` (validated at tight tolerance) or lossy (validated against the user's budget), whether
it ``reads_weights`` (then normalization materialises every MatMul/Gemm/Conv weight), the default
validation ``budget`` of a lossy pass, its
``options_schema`` and the ``search_space`` ``graphopt tune`` tries (see
:mod:`graphopt.passkit.options`) and its ordering: hard relations
(``run_before`` / ``run_after``, names of other passes; relations to passes that were not
requested are ignored) and an ``order_rank`` for passes it has no relation with (see
:mod:`graphopt.passkit.ordering`).

It implements one method, :meth:`Pass.call`, returning a :class:`PassResult`. The base class runs
the optional :meth:`Pass.requires` and :meth:`Pass.ensures` hooks around it and turns anything a
pass raises into a :class:`~graphopt.errors.PassError` that names the pass.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.data.feeds import Feeds
from graphopt.errors import GraphoptError, InputError, PassError
from graphopt.ir.files import ENVIRONMENT_ERRNOS, storage_error
from graphopt.ir.model import Model, iter_graphs
from graphopt.passkit.options import Option, SearchSpace, resolve_options
from graphopt.passkit.ordering import OrderRank
from graphopt.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class PassResult:
    """What a pass returns: the (possibly same) model, whether it changed, and counters.

    ``touched`` names the nodes the pass rewrote, in graph order; bisection narrows a failing
    pass down to one of them (see :mod:`graphopt.check.bisect`).
    """

    model: Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Budget:
    """Default validation budget of a lossy pass (the user's --min-* flags override it)."""

    min_cosine: float = 0.99
    min_snr_db: float = 20.0


class WeightClaims:
    """Which pass owns which weight during one run.

    Conflict rule: the first pass in plan order that claims a weight owns it; a later pass that
    asks for the same weight is refused and must skip it (and log that it did). Structural
    passes that replace a weight by an approximation claim it (``lowrank`` also claims the
    factors it creates, ``sparsify`` the weights it prunes), so one weight is compressed one
    way; passes that compose with any earlier edit (``quant``, ``fp16``) claim nothing.
    """

    def __init__(self) -> None:
        self._owners: dict[str, str] = {}

    def claim(self, weight_name: str, pass_name: str) -> bool:
        owner = self._owners.setdefault(weight_name, pass_name)
        return owner == pass_name

    def owner(self, weight_name: str) -> str | None:
        return self._owners.get(weight_name)


@dataclass
class PassContext:
    """Everything a pass may read besides the model: data, seed, and the run's weight claims.

    ``scope``, when set, limits a pass to rewriting the nodes named in it; lossy passes check
    :meth:`in_scope` for every candidate (bisection uses this to find one harmful node).
    """

    data: Feeds | Iterable[dict[str, np.ndarray]] | None = None
    """Calibration data. The pipeline always gives :class:`~graphopt.data.feeds.Feeds` (real, or
    synthesized and flagged so); a plain iterable from a Python caller is accepted, and counts
    as no data for data-aware methods. Passes read it through :attr:`feeds`,
    :attr:`has_real_data` and :meth:`require_feeds`."""
    seed: int = 0
    claims: WeightClaims = field(default_factory=WeightClaims)
    scope: frozenset[str] | None = None
    progress: Callable[[str, int, int | None], None] | None = None
    """Called with a step label, a 0-based index and the step's total (None: the run's number
    of data batches) during long steps (for the CLI's progress display)."""
    providers: tuple[str, ...] = ("cpu",)
    """Execution providers the result will be validated (and presumably deployed) on."""
    settings: Settings = field(default_factory=Settings)
    """How the run uses the machine (:class:`~graphopt.settings.Settings`); a pass hands it on
    to :func:`~graphopt.data.calibration.collect` and
    :func:`~graphopt.data.calibration.gram_budget`."""

    @property
    def feeds(self) -> Feeds | None:
        """The calibration data when it is :class:`Feeds` (real or synthesized), else None."""
        return self.data if isinstance(self.data, Feeds) else None

    @property
    def has_real_data(self) -> bool:
        """Whether real (not synthesized) calibration data was given: what data-aware methods
        (whitening, SparseGPT, accuracy loops) want."""
        feeds = self.feeds
        return feeds is not None and not feeds.synthetic

    def describe_data(self) -> str:
        """What the data is, for a log line: ``real``, ``synthetic``, ``none`` or ``a plain
        list`` (an iterable that is not Feeds)."""
        if self.data is None:
            return "none"
        if self.feeds is None:
            return f"a plain {type(self.data).__name__}"
        return "synthetic" if self.feeds.synthetic else "real"

    def require_feeds(self, who: str) -> Feeds:
        """The calibration data as :class:`Feeds`; an InputError naming ``who`` otherwise."""
        feeds = self.feeds
        if feeds is None:
            got = "none" if self.data is None else f"a plain {type(self.data).__name__}"
            raise InputError(
                f"{who} needs calibration data opened as Feeds "
                f"(graphopt.data.feeds.open_data); got {got}"
            )
        return feeds

    def report_progress(self, label: str, index: int, total: int | None = None) -> None:
        if self.progress is not None:
            self.progress(label, index, total)

    def in_scope(self, node_name: str) -> bool:
        return self.scope is None or node_name in self.scope


class Pass(abc.ABC):
    """Base class of every graph pass. See the module docstring for the contract."""

    name: ClassVar[str]
    summary: ClassVar[str]
    exact: ClassVar[bool]
    reads_weights: ClassVar[bool] = True
    budget: ClassVar[Budget] = Budget()
    options_schema: ClassVar[tuple[Option, ...]] = ()
    search_space: ClassVar[SearchSpace] = SearchSpace()
    """What ``graphopt tune`` tries for this pass (:class:`~graphopt.passkit.options.SearchSpace`):
    by default one point, the option defaults."""
    run_before: ClassVar[frozenset[str]] = frozenset()
    """Passes this one must run before when both are planned (a hard relation, checked; see
    :mod:`graphopt.passkit.ordering`). Declare a relation on either side, or both."""
    run_after: ClassVar[frozenset[str]] = frozenset()
    """Passes this one must run after when both are planned (the converse of ``run_before``)."""
    order_rank: ClassVar[OrderRank | None] = None
    """Where this pass runs among passes it has no relation with (lower first; a preference
    that relations and a given order override). None: ``EXACT`` for an exact pass, ``VALUES``
    for a lossy one."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = resolve_options(
            self.name, self.options_schema, options or {}
        )

    def required_opset(self) -> int | None:
        """The default-domain opset this pass's rewrites need with its options (None: any).

        The pipeline loads the model upgraded to the largest requirement of the plan
        (:mod:`graphopt.ir.opset`); a pass must still handle a model the converter could not
        upgrade (use what the model's opset allows, or refuse with the reason).
        """
        return None

    def requires(self, model: Model) -> None:  # noqa: B027 - optional hook
        """Check preconditions; raise :class:`GraphoptError` to refuse the model."""

    def ensures(self, model: Model) -> None:  # noqa: B027 - optional hook
        """Check postconditions on the result."""

    @abc.abstractmethod
    def call(self, model: Model, context: PassContext) -> PassResult:
        """Transform ``model`` and report what changed."""

    def __call__(self, model: Model, context: PassContext | None = None) -> PassResult:
        context = context or PassContext()
        try:
            self.requires(model)
            result = self.call(model, context)
            if not isinstance(result, PassResult):
                raise TypeError(f"call() returned {type(result).__name__}, not PassResult")
            self.ensures(result.model)
        except (InputError, PassError):
            raise
        except OSError as error:
            if error.errno not in ENVIRONMENT_ERRNOS:
                raise PassError(self.name, (), f"{type(error).__name__}: {error}") from error
            raise storage_error(error, f"pass '{self.name}' could not write a file") from error
        except GraphoptError as error:
            raise PassError(self.name, (), str(error)) from error
        except Exception as error:
            raise PassError(self.name, (), f"{type(error).__name__}: {error}") from error
        return result


def plan_opset(passes: Iterable[Pass]) -> int | None:
    """The newest opset any of ``passes`` needs (None when none needs one)."""
    wanted = [needed for item in passes if (needed := item.required_opset()) is not None]
    return max(wanted, default=None)


def graph_fingerprint(graph: gs.Graph) -> tuple[object, ...]:
    """Identity of every node and edge, to tell exactly whether a pass modified the graph."""
    parts: list[object] = []
    for sub in iter_graphs(graph):
        for node in sub.nodes:
            parts.append(
                (
                    id(node),
                    node.op,
                    tuple(
                        (id(t), type(t).__name__, id(getattr(t, "_values", None)))
                        for t in node.inputs
                    ),
                    tuple(id(t) for t in node.outputs),
                    tuple(
                        sorted(
                            (k, repr(v))
                            for k, v in node.attrs.items()
                            if not isinstance(v, gs.Graph)
                        )
                    ),
                )
            )
        parts.append(tuple(id(t) for t in sub.inputs))
        parts.append(tuple(id(t) for t in sub.outputs))
    return tuple(parts)
