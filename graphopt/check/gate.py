"""``graphopt check``: the pre-deployment gate, with reports for humans, JSON and JUnit XML.

Rules:

1. The numerical criteria are those of :mod:`graphopt.check.validate`, one check per output ×
   provider × criterion. By default cosine and SNR are judged on the lower of the whole-tensor
   and the worst-channel figure (``Criteria.per_channel``), so an output whose small-valued
   channels collapsed next to large-valued ones fails, and the message names the channel.
2. ``max_size_ratio`` compares file sizes (model plus external data): candidate / reference.
3. ``max_latency_ratio`` compares median CPU latency measured interleaved in one run
   (:mod:`graphopt.check.latency`) on the first feed. Interleaving holds both sessions at once, so
   this criterion needs memory for both models; the numerical comparison holds one.
4. The gate passes when every check passes. JUnit XML has one test case per check, so CI systems
   show exactly which output, provider and criterion failed; a case's text adds the check's
   detail (whole-tensor and worst-channel figures side by side). The JSON report carries every
   figure of every output, worst channel and its location included, and each comparison's
   ``status`` ("passed", "failed", "error") and ``reason``.
5. A check that could not be made (:mod:`graphopt.check.validate` rule 8: the candidate does not
   load or run, lacks an output, runs on another provider; latency not measured) is a JUnit
   ``<error>``, a check that was made and missed a ``<failure>``; the suite's ``tests``,
   ``failures`` and ``errors`` count them. Neither shows a figure it does not have: an output
   that was not compared has no cosine or SNR (null in JSON).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphopt.check.latency import LatencyComparison, measure_latency
from graphopt.check.validate import Check, Criteria, ValidationReport, compare_models, json_safe
from graphopt.data.feeds import Feeds
from graphopt.ir.model import model_file_bytes
from graphopt.settings import Settings


@dataclass
class GateReport:
    reference: str
    candidate: str
    validation: ValidationReport
    reference_bytes: int
    candidate_bytes: int
    model_checks: list[Check] = field(default_factory=list)
    latency: LatencyComparison | None = None

    @property
    def size_ratio(self) -> float:
        return self.candidate_bytes / self.reference_bytes if self.reference_bytes else 0.0

    @property
    def passed(self) -> bool:
        return self.validation.passed and all(check.passed for check in self.model_checks)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "reference": self.reference,
                "candidate": self.candidate,
                "passed": self.passed,
                "reference_bytes": self.reference_bytes,
                "candidate_bytes": self.candidate_bytes,
                "size_ratio": self.size_ratio,
                "latency": None
                if self.latency is None
                else {**asdict(self.latency), "ratio": self.latency.ratio},
                "model_checks": [asdict(check) for check in self.model_checks],
                "validation": self.validation.to_dict(),
            }
        )

    def to_junit(self) -> str:
        """Rules 4 and 5: one ``<testcase>`` per check; failures and errors carry the message."""
        cases: list[tuple[str, str, Check]] = []
        for comparison in self.validation.comparisons:
            for check in comparison.checks:
                classname = f"graphopt.check.{comparison.provider}.{comparison.output}"
                cases.append((classname, check.criterion, check))
        for check in self.model_checks:
            cases.append(("graphopt.check.model", check.criterion, check))
        errors = sum(1 for _, _, check in cases if check.error)
        failures = sum(1 for _, _, check in cases if not check.passed and not check.error)
        counts = {"tests": str(len(cases)), "failures": str(failures), "errors": str(errors)}
        suites = ElementTree.Element("testsuites", counts)
        suite = ElementTree.SubElement(
            suites, "testsuite", {"name": f"graphopt check {Path(self.candidate).name}", **counts}
        )
        properties = ElementTree.SubElement(suite, "properties")
        for key, value in (
            ("reference", self.reference),
            ("candidate", self.candidate),
            ("data", self.validation.data),
        ):
            ElementTree.SubElement(properties, "property", name=key, value=value)
        for classname, name, check in cases:
            case = ElementTree.SubElement(suite, "testcase", classname=classname, name=name)
            text = "\n".join(part for part in (check.message, check.detail) if part)
            if not check.passed:
                kind = "error" if check.error else "failure"
                finding = ElementTree.SubElement(
                    case, kind, message=check.message, type=check.criterion
                )
                finding.text = text
            else:
                ElementTree.SubElement(case, "system-out").text = text
        ElementTree.indent(suites)
        return ElementTree.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def run_gate(
    reference: Path,
    candidate: Path,
    feeds: Feeds,
    *,
    providers: list[str],
    criteria: Criteria,
    max_size_ratio: float | None = None,
    max_latency_ratio: float | None = None,
    latency_runs: int = 20,
    tmp_dir: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
) -> GateReport:
    """Run every check of the module rules; ``tmp_dir`` holds the reference outputs while the
    candidate runs (:func:`graphopt.check.validate.compare_models`; None: ``settings.tmp_dir``,
    else the system's temporary folder). ``settings`` (None: read from ``GRAPHOPT_*``) sets the
    ONNX Runtime levels and threads of the validation and latency sessions."""
    settings = Settings.from_env() if settings is None else settings
    validation = compare_models(
        reference,
        candidate,
        feeds,
        providers=providers,
        criteria=criteria,
        tmp_dir=tmp_dir,
        settings=settings,
    )
    report = GateReport(
        reference=str(reference),
        candidate=str(candidate),
        validation=validation,
        reference_bytes=model_file_bytes(reference),
        candidate_bytes=model_file_bytes(candidate),
    )
    if max_size_ratio is not None:
        ratio = report.size_ratio
        report.model_checks.append(
            Check(
                "size_ratio",
                ratio <= max_size_ratio,
                f"size ratio {ratio:.3f} {'≤' if ratio <= max_size_ratio else '>'} "
                f"{max_size_ratio:g} ({report.candidate_bytes} / {report.reference_bytes} bytes)",
                ratio,
                max_size_ratio,
            )
        )
    candidate_runs = not any(
        check.criterion in ("loads", "runs", "present") and not check.passed
        for comparison in validation.comparisons
        for check in comparison.checks
    )
    if max_latency_ratio is not None and candidate_runs:
        first_feed = next(iter(feeds))
        report.latency = measure_latency(
            reference, candidate, first_feed, runs=latency_runs, settings=settings
        )
        ratio = report.latency.ratio
        report.model_checks.append(
            Check(
                "latency_ratio",
                ratio <= max_latency_ratio,
                f"CPU latency ratio {ratio:.3f} {'≤' if ratio <= max_latency_ratio else '>'} "
                f"{max_latency_ratio:g} (median {report.latency.candidate_ms:.3f} ms vs "
                f"{report.latency.reference_ms:.3f} ms, {latency_runs} interleaved runs)",
                ratio,
                max_latency_ratio,
            )
        )
    elif max_latency_ratio is not None:
        report.model_checks.append(
            Check(
                "latency_ratio",
                False,
                "latency not measured: the candidate does not run",
                error=True,
            )
        )
    return report
