"""Probes: run an edited copy of a model only where it can differ from the model itself.

A pass that measures its edits (quant's accuracy-driven mode) scores many variants of one
model on the same feeds. Each variant changes a few nodes; everything upstream of them computes
what the model computes. :class:`ProbeRunner` runs the model once, keeps what later probes
need, and runs each variant's changed region alone. Rules:

1. A variant is a copy of the model's graph (``gs.Graph.copy``) that a pass edited. Its edits
   put new values under new names (the quant pass's Q/DQ nodes and integer weights): a tensor
   that keeps its name, whose producer is unchanged and reads unchanged tensors, holds what the
   model computes.
2. The changed region (:func:`changed_region`): the nodes of the variant's main graph that are
   new or differ from the model's node of the same name (op, domain, attributes, control-flow
   bodies node by node, input and output names, the storage of constant inputs), and every node
   that reads a tensor the region writes, explicitly or as an outer-scope name in a body. Its
   boundary is what it reads from outside: graph inputs and tensors the model computes.
3. The region runs as a model of its own: its boundary tensors are its inputs, fed with the
   model's values of them, and its outputs are the graph outputs it writes; the other graph
   outputs are the model's. Sessions are made as for a whole run (same threads, no graph
   optimisation), so every kernel sees the inputs it would see in a whole run and the outputs
   are bit-identical to running the whole variant (tests/passes/test_quant_accuracy_loop.py).
4. The model runs once per :meth:`ProbeRunner.prepare` call, over all feeds, and what it
   computes is cached in one file in the run's temporary folder, read back memory-mapped: the
   feeds and reference outputs (the first run), the boundary tensors of the variants that
   prepare is given. Feeds and boundary tensors are cached within ``budget_bytes`` (boundaries
   by an estimate: the first feed's bytes scaled by all feeds' over its own), the variants that
   skip the most nodes first; the others run whole.
5. A variant runs whole (the model's graph as edited, fed with the cached feeds) when node
   names are not unique, its graph outputs are not the model's, or part of its boundary is not
   cached or not numeric. Both routes give the same outputs; the region is only cheaper.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.data.feeds import Feeds
from graphopt.ir import weights
from graphopt.ir.model import Model, runnable_model
from graphopt.ir.ort import make_session

logger = logging.getLogger(__name__)

PROBE_CACHE_BYTES = 1 << 30
"""Default most bytes of feeds and boundary tensors one :class:`ProbeRunner` caches (rule 4);
reference outputs are always cached (they were held in memory before)."""
_ALIGNMENT = 64

Signature = tuple[Any, ...]


@dataclass(frozen=True)
class Region:
    """Rule 2: the nodes of a variant that can compute other values than the model's."""

    nodes: list[gs.Node]
    """In the variant's graph order."""
    boundary: list[gs.Tensor]
    """Tensors the region reads that the model computes (or graph inputs), each once."""
    outputs: list[str]
    """Graph outputs the region writes."""
    skipped: int
    """Nodes of the variant's main graph outside the region (what running it alone saves)."""


def node_signatures(graph: gs.Graph) -> dict[str, Signature] | None:
    """Main-graph node name → what rule 2 compares; None when names are empty or repeated."""
    signatures: dict[str, Signature] = {}
    for node in graph.nodes:
        if not node.name or node.name in signatures:
            return None
        signatures[node.name] = _signature(node)
    return signatures


def _signature(node: gs.Node) -> Signature:
    return (
        node.op,
        node.domain,
        tuple(_tensor_key(t) for t in node.inputs),
        tuple(t.name for t in node.outputs),
        tuple((key, _attribute_key(value)) for key, value in sorted(node.attrs.items())),
    )


def _tensor_key(tensor: gs.Tensor) -> Signature:
    """A constant is known by its name and its storage object (copies of a graph share it)."""
    if isinstance(tensor, gs.Constant):
        return (tensor.name, id(weights.storage(tensor)))
    return (tensor.name,)


def _attribute_key(value: Any) -> Any:
    if isinstance(value, gs.Graph):
        return (
            tuple(t.name for t in value.inputs),
            tuple(_signature(node) for node in value.nodes),
            tuple(t.name for t in value.outputs),
        )
    if isinstance(value, gs.Tensor):
        return _tensor_key(value)
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, list | tuple):
        return tuple(_attribute_key(item) for item in value)
    return repr(value)


def outer_names(node: gs.Node) -> set[str]:
    """Names the node's bodies read from enclosing graphs (constants excluded: they travel
    with the body)."""
    names: set[str] = set()
    for body in node.subgraphs():
        defined = {t.name for t in body.inputs} | {
            t.name for inner in body.nodes for t in inner.outputs
        }
        read = {
            t.name
            for inner in body.nodes
            for t in inner.inputs
            if t.name and not isinstance(t, gs.Constant)
        }
        read |= {t.name for t in body.outputs if not isinstance(t, gs.Constant)}
        for inner in body.nodes:
            read |= outer_names(inner)
        names |= read - defined
    return names


def changed_region(signatures: Mapping[str, Signature], variant: gs.Graph) -> Region | None:
    """Rule 2 over a topologically sorted variant; None where rule 5 says to run it whole."""
    written: set[str] = set()
    nodes: list[gs.Node] = []
    seen: set[str] = set()
    for node in variant.nodes:
        if not node.name or node.name in seen:
            return None
        seen.add(node.name)
        reads = {t.name for t in node.inputs if t.name} | outer_names(node)
        if reads & written or signatures.get(node.name) != _signature(node):
            nodes.append(node)
            written.update(t.name for t in node.outputs if t.name)
    boundary: dict[str, gs.Tensor] = {}
    outer = {t.name: t for t in variant.tensors().values()}
    for node in nodes:
        for tensor in node.inputs:
            if tensor.name and not isinstance(tensor, gs.Constant) and tensor.name not in written:
                boundary.setdefault(tensor.name, tensor)
        for name in outer_names(node) - written:
            tensor = outer.get(name)
            if tensor is None:
                return None
            boundary.setdefault(name, tensor)
    return Region(
        nodes=nodes,
        boundary=list(boundary.values()),
        outputs=[t.name for t in variant.outputs if t.name in written],
        skipped=len(variant.nodes) - len(nodes),
    )


@dataclass(frozen=True)
class _Entry:
    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]


class ActivationCache:
    """Arrays by (feed index, tensor name) in one file, read back as memory-mapped views;
    arrays of Python objects (strings) stay in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[tuple[int, str], _Entry] = {}
        self._objects: dict[tuple[int, str], np.ndarray] = {}
        self._size = 0
        self._mapped: np.ndarray | None = None

    @property
    def bytes(self) -> int:
        """Bytes written so far (padding included)."""
        return self._size

    def write(self, rows: Iterable[tuple[int, str, np.ndarray]]) -> None:
        """Append arrays (mapped again on the next read)."""
        self._mapped = None
        with open(self.path, "ab") as handle:
            for index, name, value in rows:
                array = np.asarray(value)
                if array.dtype.hasobject:
                    self._objects[(index, name)] = array
                    continue
                padding = -self._size % _ALIGNMENT
                handle.write(b"\0" * padding)
                self._size += padding
                self._entries[(index, name)] = _Entry(self._size, array.dtype, array.shape)
                handle.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                self._size += array.nbytes

    def numeric(self, index: int, name: str) -> bool:
        """Whether the array is held in the file (a number type, not Python objects)."""
        return (index, name) in self._entries

    def get(self, index: int, name: str) -> np.ndarray:
        if (index, name) in self._objects:
            return self._objects[(index, name)]
        entry = self._entries[(index, name)]
        if not self._size:  # only empty arrays: nothing to map
            return np.empty(entry.shape, entry.dtype)
        if self._mapped is None:
            self._mapped = np.memmap(self.path, np.uint8, "r")
        stop = entry.offset + math.prod(entry.shape) * entry.dtype.itemsize
        return np.asarray(self._mapped[entry.offset : stop]).view(entry.dtype).reshape(entry.shape)

    def forget(self, names: Iterable[str]) -> None:
        """Drop tensors from the index (their bytes stay in the file until it is removed)."""
        dropped = set(names)
        self._entries = {k: v for k, v in self._entries.items() if k[1] not in dropped}
        self._objects = {k: v for k, v in self._objects.items() if k[1] not in dropped}

    def close(self) -> None:
        self._mapped = None
        self._entries.clear()
        self._objects.clear()


@dataclass
class ProbeStats:
    """Where a runner's time went (for the pass's log)."""

    whole: int = 0
    """Variants run whole."""
    regions: int = 0
    """Variants run as their changed region."""
    skipped_nodes: int = 0
    seconds_build: float = 0.0
    """Exporting models and creating sessions."""
    seconds_run: float = 0.0
    """Inside ONNX Runtime's runs."""
    seconds_cache: float = 0.0
    """The model's own runs (reference outputs, cached boundaries), all included."""

    def describe(self) -> str:
        return (
            f"{self.whole + self.regions} variants scored ({self.regions} as their changed "
            f"region, {self.skipped_nodes} node runs per feed saved in all); sessions "
            f"{self.seconds_build:.1f} s, inference {self.seconds_run:.1f} s, float model and "
            f"cache {self.seconds_cache:.1f} s"
        )


class ProbeRunner:
    """The model's outputs on ``feeds`` and those of edited copies of it (module rules).

    ``budget_bytes``: rule 4's cap (None: :data:`PROBE_CACHE_BYTES`). Use as a context
    manager: the cache file is removed on exit.
    """

    def __init__(
        self,
        model: Model,
        feeds: Feeds,
        threads: int = 0,
        budget_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.threads = threads
        self.budget_bytes = PROBE_CACHE_BYTES if budget_bytes is None else budget_bytes
        self.stats = ProbeStats()
        self._folder = tempfile.TemporaryDirectory(
            prefix="graphopt-probe-", dir=model.spill.scratch()
        )
        self.cache = ActivationCache(Path(self._folder.name) / "activations.bin")
        self._signatures = node_signatures(model.graph)
        self._feeds = feeds
        self.output_names = [t.name for t in model.graph.outputs]
        self.feed_names: list[list[str]] = []
        """Each feed's input names, in the order the feed gave them."""
        self._cached: set[str] = set()
        """Tensor names the cache holds for every feed."""
        self._used = 0
        """Bytes of feeds and boundary tensors cached (what the budget caps)."""
        self._run_reference()

    @property
    def count(self) -> int:
        """How many feeds there are."""
        return len(self.feed_names)

    def __enter__(self) -> ProbeRunner:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.cache.close()
        self._folder.cleanup()

    # --- the model's own runs -----------------------------------------------------------------

    def _run_reference(self) -> None:
        """Rule 4: reference outputs (always cached) and the feeds (within the budget)."""
        start = time.perf_counter()
        feed_bytes = 0
        with runnable_model(self.model) as runnable:
            session = make_session(runnable, optimize=False, threads=self.threads)
            for index, feed in enumerate(self._feeds):
                outputs = session.run(None, feed)
                self.feed_names.append(list(feed))
                rows = list(zip([index] * len(outputs), self.output_names, outputs, strict=True))
                feed_bytes += sum(np.asarray(value).nbytes for value in feed.values())
                if feed_bytes <= self.budget_bytes:
                    rows += [(index, name, value) for name, value in feed.items()]
                self.cache.write(rows)
        self._cached = set(self.output_names)
        inputs = {name for names in self.feed_names for name in names}
        if feed_bytes <= self.budget_bytes:
            self._cached |= inputs
            self._used = feed_bytes
        else:
            self.cache.forget(inputs - self._cached)
        self.stats.seconds_cache += time.perf_counter() - start

    @property
    def feeds_cached(self) -> bool:
        return all(name in self._cached for names in self.feed_names for name in names)

    def reference(self, index: int) -> list[np.ndarray]:
        """The model's outputs on feed ``index``."""
        return [self.cache.get(index, name) for name in self.output_names]

    def feeds(self) -> Iterator[dict[str, np.ndarray]]:
        """The feeds, from the cache when they fit in it."""
        if not self.feeds_cached:
            for feed in self._feeds:
                yield dict(feed)
            return
        for index, names in enumerate(self.feed_names):
            yield {name: self.cache.get(index, name) for name in names}

    def prepare(self, variants: Iterable[gs.Graph]) -> None:
        """Rule 4: one run of the model caching the boundaries of ``variants`` (edited copies
        of the graph, sorted), as far as the budget allows."""
        if self._signatures is None or not self.feeds_cached or not self.count:
            return
        start = time.perf_counter()
        wanted: list[tuple[int, set[str]]] = []
        for variant in variants:
            region = changed_region(self._signatures, variant)
            if region is not None:
                names = {t.name for t in region.boundary} - self._cached
                if names:
                    wanted.append((region.skipped, names))
        union = sorted(set().union(*(names for _, names in wanted)))
        if union:
            self._cache_activations(union, wanted)
        self.stats.seconds_cache += time.perf_counter() - start

    def _cache_activations(self, union: list[str], wanted: list[tuple[int, set[str]]]) -> None:
        with runnable_model(self.model, extra_outputs=union) as runnable:
            session = make_session(runnable, optimize=False, threads=self.threads)
            feeds = self.feeds()
            first = dict(zip(union, session.run(union, next(feeds)), strict=True))
            admitted = self._admit(first, wanted)
            if not admitted:
                logger.info("probe: no boundary fits the %d-byte cache", self.budget_bytes)
                return
            before = self.cache.bytes
            self.cache.write((0, name, first[name]) for name in admitted)
            for index, feed in enumerate(feeds, start=1):
                values = session.run(admitted, feed)
                self.cache.write(zip([index] * len(admitted), admitted, values, strict=True))
        self._cached |= set(admitted)
        self._used += self.cache.bytes - before
        logger.debug(
            "probe: cached %d boundary tensors (%d bytes)", len(admitted), self.cache.bytes
        )

    def _admit(
        self, first: Mapping[str, np.ndarray], wanted: list[tuple[int, set[str]]]
    ) -> list[str]:
        """The boundary tensors to cache: the variants that skip the most nodes first, while
        the estimate (the first feed's bytes, scaled by all feeds' bytes over its own) fits."""
        sizes = [
            sum(self.cache.get(index, name).nbytes for name in names)
            for index, names in enumerate(self.feed_names)
        ]
        scale = sum(sizes) / sizes[0] if sizes[0] else float(self.count)
        room = self.budget_bytes - self._used
        admitted: set[str] = set()
        for _, names in sorted(wanted, key=lambda item: -item[0]):
            extra = names - admitted
            cost = sum(np.asarray(first[name]).nbytes for name in extra) * scale
            if cost <= room:
                admitted |= extra
                room -= cost
        return sorted(admitted)

    # --- variants -----------------------------------------------------------------------------

    def outputs(self, variant: Model) -> Iterator[list[np.ndarray]]:
        """The variant's outputs on each feed, in feed order (``variant.graph`` sorted; rules 3
        and 5). The variant's graph may be edited further: it is a throwaway copy."""
        region = None
        if self._signatures is not None and self.feeds_cached:
            region = changed_region(self._signatures, variant.graph)
        if region is not None and self._runs_alone(region, variant.graph):
            yield from self._run_region(variant, region)
        else:
            yield from self._run_whole(variant)

    def _runs_alone(self, region: Region, graph: gs.Graph) -> bool:
        return [t.name for t in graph.outputs] == self.output_names and all(
            t.name in self._cached
            and all(self.cache.numeric(index, t.name) for index in range(self.count))
            for t in region.boundary
        )

    def _run_whole(self, variant: Model) -> Iterator[list[np.ndarray]]:
        self.stats.whole += 1
        started = time.perf_counter()
        with runnable_model(variant) as runnable:
            session = make_session(runnable, optimize=False, threads=self.threads)
            self.stats.seconds_build += time.perf_counter() - started
            for feed in self.feeds():
                started = time.perf_counter()
                outputs = session.run(None, feed)
                self.stats.seconds_run += time.perf_counter() - started
                yield outputs

    def _run_region(self, variant: Model, region: Region) -> Iterator[list[np.ndarray]]:
        self.stats.regions += 1
        self.stats.skipped_nodes += region.skipped
        graph = variant.graph
        if not region.outputs:  # no graph output changes: the model's outputs, no session
            for index in range(self.count):
                yield self.reference(index)
            return
        for tensor in region.boundary:  # model inputs now: typed from the cached values
            tensor.dtype, tensor.shape = self.cache.get(0, tensor.name).dtype, None
        by_name = {t.name: t for t in graph.outputs}
        sub = gs.Graph(
            nodes=region.nodes,
            inputs=region.boundary,
            outputs=[by_name[name] for name in region.outputs],
            name=graph.name,
            opset=graph.opset,
            import_domains=graph.import_domains,
            functions=graph.functions,
            ir_version=graph.ir_version,
        )
        names = [t.name for t in region.boundary]
        started = time.perf_counter()
        with runnable_model(replace(variant, graph=sub)) as runnable:
            session = make_session(runnable, optimize=False, threads=self.threads)
            self.stats.seconds_build += time.perf_counter() - started
            for index in range(self.count):
                feed = {name: self.cache.get(index, name) for name in names}
                started = time.perf_counter()
                values = session.run(region.outputs, feed)
                self.stats.seconds_run += time.perf_counter() - started
                computed = dict(zip(region.outputs, values, strict=True))
                yield [
                    computed[name] if name in computed else self.cache.get(index, name)
                    for name in self.output_names
                ]
