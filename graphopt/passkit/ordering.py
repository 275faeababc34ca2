"""Pass ordering: declared relations, a rank for unrelated passes, and checking a given order.

Rules (the pass manager's rule 1, in full):

1. **Relations** are hard and declared by name: a pass's ``run_before = {"quant"}`` means "when
   quant is in the same plan, run first"; ``run_after`` is the converse. A relation may be
   declared on either side or on both; it is one relation, and messages name every side that
   declared it (``lowrank.run_before, quant.run_after``). A relation naming a pass that is not in
   the plan is ignored (a plugin may name a pass that is not installed). ``run_before`` and
   ``run_after`` must be collections of names; a bare string is a :class:`PlanError`.
2. **Contradictions**: the relations among the planned passes must be acyclic. A cycle is a
   :class:`PlanError` that names the passes on it and each relation of it, e.g. ``passes a, b
   have contradictory ordering constraints: a before b (a.run_before); b before a
   (b.run_before)``. A pass naming itself is a cycle of one. Requesting a pass twice is an error.
3. **Rank**: two passes with no relation between them, direct or through other planned passes,
   run in the order of their ``order_rank`` (:class:`OrderRank`, lower first) and, within one
   rank, by name. The rank is a preference, not a relation: a declared relation always wins,
   and a given order (rule 5) may put unrelated passes either way. A pass that declares no rank
   gets ``EXACT`` if it is exact, else ``VALUES`` (a lossy pass that says nothing is taken to
   edit weights in place, the common plugin). The ranks say which of two weight-editing passes
   goes first, and so (:class:`~graphopt.passkit.api.WeightClaims`: the first claimant owns a
   shared weight) which one owns a weight both want:

   - ``EXACT`` first: exact rewrites change no result and simplify what the lossy passes read;
   - ``STRUCTURE`` (``lowrank``: W becomes two factors) before ``VALUES`` (``sparsify``: W is
     masked in place). The structural pass is selective (it factors a weight only where the
     factors pay) while an in-place edit takes nearly every weight, so the other order would
     leave the structural pass nothing; and restructuring an edited weight would undo the edit
     (the factors of a masked W are dense), while the in-place pass can still edit every weight
     the structural pass left;
   - ``ENCODING`` (``quant``: integers and scales) after every edit of weight values: it
     encodes the final weights and composes with any earlier edit (it claims nothing);
   - ``CAST`` (``fp16``) last: it changes the float type of every tensor the others read.
4. **Planned order** (the default): the topological order of the relations that, at each step,
   takes the ready pass with the smallest (rank, name). The same set of passes always gives the
   same plan, whatever order it was requested in, and the plan of a plan's prefix is that prefix
   (bisection replays prefixes).
5. **Given order** (``order="given"``): the passes run in the order requested, never re-sorted.
   Rules 1 and 2 still hold; a given order that breaks a declared relation is a
   :class:`PlanError` naming every relation it breaks and who declared it. Rank plays no part;
   when the given order differs from the planned one, that is logged (info).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Literal, TypeVar

from graphopt.errors import OptionError, PlanError

if TYPE_CHECKING:
    from graphopt.passkit.api import Pass

logger = logging.getLogger(__name__)

OrderMode = Literal["planned", "given"]
ORDER_MODES: tuple[str, ...] = ("planned", "given")

PassLike = TypeVar("PassLike", bound="Pass | type[Pass]")


class OrderRank(IntEnum):
    """Where a pass goes among passes it has no relation with (rule 3; lower runs first)."""

    EXACT = 10
    """Exact rewrites (``cleanup``): the results do not change."""
    STRUCTURE = 20
    """Lossy; replaces a weight by other tensors or changes its shape (``lowrank``)."""
    VALUES = 30
    """Lossy; edits a weight's values in place, same tensor and shape (``sparsify``)."""
    ENCODING = 40
    """Lossy; encodes the final weights and activations as integers and scales (``quant``)."""
    CAST = 50
    """Lossy; converts the float type of the tensors every other pass reads (``fp16``)."""


@dataclass(frozen=True)
class Relation:
    """``earlier`` runs before ``later``; ``sources`` name the attributes that declared it."""

    earlier: str
    later: str
    sources: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.earlier} before {self.later} ({', '.join(self.sources)})"


def declared_names(item: Pass | type[Pass], attribute: str) -> frozenset[str]:
    """Rule 1: the names in ``item.run_before`` or ``item.run_after``, checked."""
    value = getattr(item, attribute, frozenset())
    if isinstance(value, str | bytes) or not isinstance(value, Collection):
        raise PlanError(
            f"pass '{item.name}': {attribute} must be a set of pass names, not {value!r}"
        )
    names = frozenset(value)
    stray = sorted(repr(name) for name in names if not isinstance(name, str))
    if stray:
        raise PlanError(f"pass '{item.name}': {attribute} holds {stray[0]}, not a pass name")
    return names


def order_rank(item: Pass | type[Pass]) -> int:
    """Rule 3: the declared ``order_rank``, or EXACT / VALUES from ``exact`` when none."""
    declared = getattr(item, "order_rank", None)
    if declared is None:
        return OrderRank.EXACT if item.exact else OrderRank.VALUES
    if isinstance(declared, bool) or not isinstance(declared, int):
        raise PlanError(f"pass '{item.name}': order_rank {declared!r} is not an OrderRank")
    return int(declared)


def _rank_name(rank: int) -> str:
    try:
        return OrderRank(rank).name.lower()
    except ValueError:
        return str(rank)


def declared_relations(
    passes: Iterable[Pass | type[Pass]], among: Collection[str] | None = None
) -> list[Relation]:
    """Rule 1: every relation ``passes`` declare, merged across sides, sorted.

    With ``among``, only relations whose two ends are both in it.
    """
    sources: dict[tuple[str, str], list[str]] = {}
    for item in passes:
        for later in declared_names(item, "run_before"):
            sources.setdefault((item.name, later), []).append(f"{item.name}.run_before")
        for earlier in declared_names(item, "run_after"):
            sources.setdefault((earlier, item.name), []).append(f"{item.name}.run_after")
    return [
        Relation(earlier, later, tuple(sorted(names)))
        for (earlier, later), names in sorted(sources.items())
        if among is None or (earlier in among and later in among)
    ]


def _by_name(passes: Sequence[PassLike]) -> dict[str, PassLike]:
    by_name: dict[str, PassLike] = {}
    for item in passes:
        if item.name in by_name:
            raise PlanError(f"pass '{item.name}' is requested twice")
        by_name[item.name] = item
    return by_name


def _cycle(remaining: Collection[str], relations: Sequence[Relation]) -> list[Relation]:
    """One cycle among ``remaining`` (every one of them has a predecessor among them)."""
    into: dict[str, list[Relation]] = {}
    for relation in relations:
        if relation.earlier in remaining and relation.later in remaining:
            into.setdefault(relation.later, []).append(relation)
    walk: list[Relation] = []
    seen: dict[str, int] = {}
    current = min(remaining)
    while current not in seen:
        seen[current] = len(walk)
        step = min(into[current], key=lambda relation: relation.earlier)
        walk.append(step)
        current = step.earlier
    loop = list(reversed(walk[seen[current] :]))
    start = min(range(len(loop)), key=lambda index: loop[index].earlier)
    return loop[start:] + loop[:start]


def _contradiction(cycle: Sequence[Relation]) -> PlanError:
    names = [relation.earlier for relation in cycle]
    subject = f"pass {names[0]} has" if len(names) == 1 else f"passes {', '.join(names)} have"
    steps = "; ".join(relation.describe() for relation in cycle)
    return PlanError(f"{subject} contradictory ordering constraints: {steps}")


def _sorted_names(ranks: Mapping[str, int], relations: Sequence[Relation]) -> list[str]:
    """Rules 2 and 4: the planned order of ``ranks``' names, or the cycle as a PlanError."""
    successors: dict[str, list[str]] = {name: [] for name in ranks}
    indegree = dict.fromkeys(ranks, 0)
    for relation in relations:
        successors[relation.earlier].append(relation.later)
        indegree[relation.later] += 1
    ready = [(ranks[name], name) for name, degree in indegree.items() if degree == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for target in successors[name]:
            indegree[target] -= 1
            if indegree[target] == 0:
                heapq.heappush(ready, (ranks[target], target))
    if len(order) != len(ranks):
        raise _contradiction(_cycle(set(ranks) - set(order), relations))
    return order


def _check_given(names: Sequence[str], relations: Sequence[Relation]) -> None:
    """Rule 5: a PlanError naming every relation the given order breaks."""
    position = {name: index for index, name in enumerate(names)}
    broken = [r for r in relations if position[r.earlier] > position[r.later]]
    if broken:
        details = "; ".join(relation.describe() for relation in broken)
        raise PlanError(f"the given order {', '.join(names)} breaks declared ordering: {details}")


def plan(passes: Sequence[PassLike], order: OrderMode = "planned") -> list[PassLike]:
    """Rules 1 to 5: ``passes`` in the order they run (``order``: "planned" or "given")."""
    if order not in ORDER_MODES:
        raise OptionError(f"order must be one of {', '.join(ORDER_MODES)}, not {order!r}")
    by_name = _by_name(passes)
    relations = declared_relations(passes, among=by_name.keys())
    ranks = {name: order_rank(item) for name, item in by_name.items()}
    planned = _sorted_names(ranks, relations)
    if order == "planned":
        chosen = planned
    else:
        chosen = list(by_name)
        _check_given(chosen, relations)
        if chosen != planned:
            logger.info(
                "order as given: %s (the planned order would be %s)",
                " → ".join(chosen),
                " → ".join(planned),
            )
    result = [by_name[name] for name in chosen]
    for reason in plan_reasons(result, given=order == "given"):
        logger.debug("plan: %s", reason)
    return result


def plan_reasons(planned: Sequence[Pass | type[Pass]], *, given: bool = False) -> list[str]:
    """Why each pass of ``planned`` runs before the next one: a declared relation, or rule 3's
    rank or name (``given``: "as given" instead of rank and name)."""
    relations = {
        (relation.earlier, relation.later): relation
        for relation in declared_relations(planned, among={item.name for item in planned})
    }
    reasons = []
    for first, second in itertools.pairwise(planned):
        pair = f"{first.name} before {second.name}"
        relation = relations.get((first.name, second.name))
        if relation is not None:
            reasons.append(f"{pair}: declared ({', '.join(relation.sources)})")
        elif given:
            reasons.append(f"{pair}: as given (no relation between them)")
        elif (rank := order_rank(first)) != (other := order_rank(second)):
            reasons.append(f"{pair}: rank {_rank_name(rank)} before {_rank_name(other)}")
        else:
            reasons.append(f"{pair}: same rank ({_rank_name(rank)}), by name")
    return reasons


def relation_problems(passes: Sequence[Pass | type[Pass]]) -> list[str]:
    """Checks of a whole registry (e.g. every available pass class), one message each: a
    relation naming a pass not among ``passes`` (a typo, or a plugin that is not installed),
    and a cycle among all of them (rule 2), which would make some pair unplannable."""
    known = {item.name for item in passes}
    problems = [
        f"{relation.describe()}: no pass named '{missing}'"
        for relation in declared_relations(passes)
        for missing in (relation.earlier, relation.later)
        if missing not in known
    ]
    try:
        plan(passes)
    except PlanError as error:
        problems.append(str(error))
    return problems
