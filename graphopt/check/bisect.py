"""Bisection: which pass, and within it which node, breaks the validation budget.

Rules:

1. Passes are replayed from the input file in plan order, validating after each prefix; the first
   prefix that fails names the culprit pass. Every probe starts from a fresh load, so a probe never
   sees another probe's edits.
2. Within the culprit, the pass runs once unrestricted to learn which nodes it rewrites
   (``PassResult.touched``, graph order); then a binary search over prefixes of that list, with
   ``PassContext.scope`` limiting the pass, finds the shortest failing prefix. Its last node is the
   first harmful node. This assumes rewriting more nodes never repairs the error, which holds for
   the independent per-node rewrites passes make; the report says how many probes ran.
3. Passes that report no touched nodes are bisected to the pass only.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from graphopt.check.validate import Criteria, compare_models
from graphopt.data.feeds import Feeds
from graphopt.ir.model import write_model
from graphopt.ir.normalize import load_normalized
from graphopt.passkit.api import Pass, PassContext, plan_opset
from graphopt.passkit.manager import PassManager
from graphopt.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class BisectReport:
    culprit_pass: str | None = None
    ran_before: list[str] = field(default_factory=list)
    culprit_node: str | None = None
    touched_nodes: int = 0
    probes: int = 0

    def describe(self) -> str:
        if self.culprit_pass is None:
            return "no pass breaks the budget on its own prefix"
        text = f"first failing pass '{self.culprit_pass}' (after [{', '.join(self.ran_before)}])"
        if self.culprit_node is not None:
            text += (
                f"; first harmful node '{self.culprit_node}' "
                f"(of {self.touched_nodes} it rewrites, {self.probes} probes)"
            )
        return text


class _Prober:
    def __init__(
        self,
        source: Path,
        passes: Sequence[Pass],
        feeds: Feeds,
        criteria: Criteria,
        providers: Sequence[str],
        seed: int,
        folder: Path,
        tmp_dir: Path | None,
        settings: Settings,
    ) -> None:
        self.source, self.passes, self.feeds = source, list(passes), feeds
        self.criteria, self.providers, self.seed, self.folder = criteria, providers, seed, folder
        self.tmp_dir, self.settings = tmp_dir, settings
        self.probes = 0

    def run(self, count: int, scope: frozenset[str] | None = None) -> tuple[bool, list[str]]:
        """Apply the first ``count`` passes (the last one limited to ``scope``); validate."""
        self.probes += 1
        model, _ = load_normalized(
            self.source,
            materialize_weights=any(p.reads_weights for p in self.passes),
            min_opset=plan_opset(self.passes),
            tmp_dir=self.tmp_dir,
        )
        if count > 1:
            model, _ = PassManager(self.passes[: count - 1], order="given", check=False).run(
                model, PassContext(data=self.feeds, seed=self.seed, settings=self.settings)
            )
        last = self.passes[count - 1]
        context = PassContext(data=self.feeds, seed=self.seed, scope=scope, settings=self.settings)
        result = last(model, context)
        out = self.folder / f"probe{self.probes}.onnx"
        write_model(result.model, out)
        report = compare_models(
            self.source,
            out,
            self.feeds,
            providers=self.providers,
            criteria=self.criteria,
            seed=self.seed,
            tmp_dir=self.tmp_dir,
            settings=self.settings,
        )
        out.unlink()
        out.with_name(out.name + ".data").unlink(missing_ok=True)
        return report.passed, result.touched


def bisect_passes(
    source: Path,
    planned: Sequence[Pass],
    feeds: Feeds,
    criteria: Criteria,
    *,
    providers: Sequence[str] = ("cpu",),
    seed: int = 0,
    tmp_dir: Path | None = None,
    settings: Settings | None = None,
) -> BisectReport:
    """Find the first failing pass, then its first harmful node (module rules). Probe models
    are written in ``tmp_dir`` (None: the system's temporary folder); passes and validation
    run with ``settings`` (None: the defaults), as the run being bisected did."""
    report = BisectReport()
    with tempfile.TemporaryDirectory(prefix="graphopt-bisect-", dir=tmp_dir) as folder:
        prober = _Prober(
            source,
            planned,
            feeds,
            criteria,
            providers,
            seed,
            Path(folder),
            tmp_dir,
            settings or Settings(),
        )
        touched: list[str] = []
        for count in range(1, len(planned) + 1):
            passed, touched = prober.run(count)
            if not passed:
                report.culprit_pass = planned[count - 1].name
                report.ran_before = [p.name for p in planned[: count - 1]]
                break
        else:
            report.probes = prober.probes
            return report
        report.touched_nodes = len(touched)
        if touched:
            low, high = 1, len(touched)  # the full list fails; find the shortest failing prefix
            while low < high:
                middle = (low + high) // 2
                passed, _ = prober.run(count, frozenset(touched[:middle]))
                if passed:
                    low = middle + 1
                else:
                    high = middle
            report.culprit_node = touched[low - 1]
        report.probes = prober.probes
    logger.info("bisect: %s", report.describe())
    return report
