"""What every benchmark under ``tools/`` shares: fresh-process workers, memory, machine, tables.

- :func:`run_worker` runs one build (a quantizer, a converter, a ``graphopt`` command) in a fresh
  Python process and returns its wall time, its peak resident set (``VmHWM``, see
  :func:`peak_rss_mib`), what the build returned, or why it failed (exception, exit code, signal,
  timeout), so a failing tool becomes a result rather than a crash.
- :class:`FeedReader` is ONNX Runtime's ``CalibrationDataReader`` over an ``.npz`` (batched along
  axis 0) or a folder of ``.npz`` feeds (graphopt's data convention, GUIDE §4).
- :func:`model_outputs`, :func:`embedding_metrics`, :func:`classifier_metrics` and
  :func:`logit_metrics` evaluate a model against its float32 reference.
- :func:`markdown_table`, :func:`fmt` and :func:`machine_info` write the reports.

Latency ratios come from :func:`graphopt.check.latency.measure_latency` (interleaved runs).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BATCH = 8
RESULT_MARK = "@@bench-result "
"""Prefix of the one stdout line through which a worker reports back."""


# --- memory and machine ----------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB.

    Not ``ru_maxrss``: Linux carries that across fork + exec, so a spawned child would report
    its parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_model() -> tuple[str, list[str]]:
    cpuinfo = Path("/proc/cpuinfo")
    model, flags = "", []
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return model or platform.processor() or platform.machine(), [f for f in wanted if f in flags]


def _ram_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return None


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, or broken: the report says so
        return None


def machine_info() -> dict[str, Any]:
    """The machine and software a benchmark ran on (for reports)."""
    model, flags = _cpu_model()
    cores = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = cores
    return {
        "cpu": model,
        "cpu_flags": flags,
        "cores": cores,
        "usable_cores": usable,
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(module)
            for name, module in (
                ("onnxruntime", "onnxruntime"),
                ("onnx", "onnx"),
                ("numpy", "numpy"),
                ("graphopt", "graphopt"),
                ("onnxconverter-common", "onnxconverter_common"),
                ("torch", "torch"),
                ("olive-ai", "olive"),
            )
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_summary(info: Mapping[str, Any] | None = None) -> str:
    """One line: CPU, cores, RAM and the main library versions."""
    info = info or machine_info()
    flags = ", ".join(info["cpu_flags"]) or "no AVX2"
    ram = f", {info['ram_gib']:.0f} GiB RAM" if info.get("ram_gib") else ""
    versions = info["versions"]
    extra = "".join(
        f", {name} {versions[name]}"
        for name in ("onnxconverter-common", "olive-ai")
        if versions.get(name)
    )
    return (
        f"{info['cpu']} ({flags}), {info['usable_cores']} cores{ram}; "
        f"onnxruntime {versions['onnxruntime']}, onnx {versions['onnx']}, "
        f"numpy {versions['numpy']}{extra}"
    )


# --- fresh-process workers -------------------------------------------------------------------


@dataclass
class WorkerResult:
    """What one build in a fresh process gave: time and memory, or why it failed."""

    seconds: float | None = None
    peak_rss_mib: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    log: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_worker(
    call: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    timeout_s: float = 1800.0,
    log_path: Path | None = None,
    cwd: Path = REPO,
) -> WorkerResult:
    """Run ``module:function(**kwargs)`` in a fresh Python process; never raises for its failures.

    The worker times the call (imports done inside the function count; the interpreter's start
    does not) and reads its own ``VmHWM`` afterwards. ``kwargs`` must be JSON. The worker's
    stdout and stderr go to ``log_path`` when given.
    """
    spec = json.dumps({"call": call, "kwargs": dict(kwargs or {})})
    command = [sys.executable, "-m", "tools.bench_common", "--worker", spec]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        result = WorkerResult(
            seconds=time.perf_counter() - started, error=f"timed out after {timeout_s:.0f} s"
        )
        result.log = _decode(expired.stdout) + _decode(expired.stderr)
        _write_log(log_path, command, result.log)
        return result
    log = done.stdout + ("\n--- stderr ---\n" + done.stderr if done.stderr else "")
    _write_log(log_path, command, log)
    reports = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if reports:
        payload = json.loads(reports[-1][len(RESULT_MARK) :])
        return WorkerResult(
            seconds=payload["seconds"],
            peak_rss_mib=payload["peak_rss_mib"],
            info=payload.get("info") or {},
            error=payload.get("error", ""),
            log=log,
        )
    if done.returncode < 0:
        name = _signal_name(-done.returncode)
        hint = " (out of memory?)" if -done.returncode == signal.SIGKILL else ""
        error = f"killed by {name}{hint}"
    else:
        tail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        error = f"exit code {done.returncode}: {_one_line(tail)}"
    return WorkerResult(seconds=time.perf_counter() - started, error=error, log=log)


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _write_log(path: Path | None, command: Sequence[str], text: str) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("$ " + " ".join(command) + "\n" + text)


def _worker_main(spec_text: str) -> int:
    spec = json.loads(spec_text)
    module_name, _, function_name = spec["call"].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    started = time.perf_counter()
    error = ""
    info: Any = {}
    try:
        info = function(**spec["kwargs"]) or {}
    except Exception as exc:  # any tool's failure is a result, reported as one line
        import traceback

        traceback.print_exc()
        error = _one_line(f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    if not isinstance(info, dict):
        info = {"result": info}
    payload = {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "info": info, "error": error}
    sys.stdout.flush()
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()
    return 1 if error else 0


def run_cli(args: list[str]) -> dict[str, Any]:
    """Worker function: ``graphopt ARGS`` in this process; exit code 2 (usage/input) raises."""
    from graphopt.cli.commands import main

    code = main(args)
    if code == 2:
        raise RuntimeError(f"graphopt {args[0]} exited with code 2 (input or usage error)")
    return {"exit_code": code}


# --- data ------------------------------------------------------------------------------------


def load_feeds(source: Path, batch: int = BATCH) -> list[dict[str, np.ndarray]]:
    """Feeds from an ``.npz`` (batches along axis 0) or a folder of ``.npz`` feeds (sorted)."""
    source = Path(source)
    if source.is_dir():
        return [dict(np.load(path)) for path in sorted(source.glob("*.npz"))]
    arrays = dict(np.load(source))
    count = len(next(iter(arrays.values())))
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, count, batch)]


class FeedReader:
    """ONNX Runtime ``CalibrationDataReader`` over :func:`load_feeds`."""

    def __init__(self, source: str | Path, batch: int = BATCH) -> None:
        self.feeds = load_feeds(Path(source), batch)
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.feeds):
            return None
        self.index += 1
        return self.feeds[self.index - 1]

    def rewind(self) -> None:
        self.index = 0


# --- evaluation ------------------------------------------------------------------------------


def model_outputs(
    model: Path | str, data: Mapping[str, np.ndarray], batch: int = BATCH
) -> np.ndarray:
    """The first output of ``model`` on ``data`` (arrays, axis 0 = samples), in batches."""
    from graphopt.ir.ort import make_session

    return session_outputs(make_session(model, optimize=True, spinning=False), data, batch)


def session_outputs(session: Any, data: Mapping[str, np.ndarray], batch: int = BATCH) -> np.ndarray:
    """The first output of an ONNX Runtime session on ``data``, in batches."""
    count = len(next(iter(data.values())))
    rows = [
        session.run(None, {k: v[i : i + batch] for k, v in data.items()})[0]
        for i in range(0, count, batch)
    ]
    return np.concatenate(rows)


model_embeddings = model_outputs
"""The name the first benchmarks used (sentence embeddings are the model's first output)."""


def embedding_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Cosine to the reference per row (mean, min) and nearest-neighbour agreement."""
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cand = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    cosine = (ref * cand).sum(axis=1)
    ref_sim, cand_sim = ref @ ref.T, cand @ cand.T
    np.fill_diagonal(ref_sim, -np.inf)
    np.fill_diagonal(cand_sim, -np.inf)
    agreement = float((ref_sim.argmax(axis=1) == cand_sim.argmax(axis=1)).mean())
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "nn_agreement": agreement,
    }


def classifier_metrics(
    reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Top-1 accuracy on the labels (candidate and fp32) and top-1 agreement with fp32."""
    return {
        "accuracy": float((candidate.argmax(1) == labels).mean()),
        "fp32_accuracy": float((reference.argmax(1) == labels).mean()),
        "top1_agreement": float((candidate.argmax(1) == reference.argmax(1)).mean()),
    }


def logit_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Per position (last axis = vocabulary): logit cosine mean/min and top-1 agreement."""
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    cand = candidate.reshape(-1, candidate.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    cosine = (ref * cand).sum(axis=1) / np.where(norms > 0, norms, 1.0)
    if not np.all(np.isfinite(cand)):
        cosine = np.full(len(ref), np.nan)
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "top1_agreement": float((ref.argmax(1) == cand.argmax(1)).mean()),
    }


# --- reports ---------------------------------------------------------------------------------


def fmt(value: float | int | None, spec: str = ".2f", missing: str = "–") -> str:
    """``format(value, spec)``, or ``missing`` for None and NaN."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return missing
    return format(value, spec)


def _cell(value: object) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table (no trailing newline); pipes and newlines in cells are escaped."""
    lines = [
        "| " + " | ".join(_cell(h) for h in headers) + " |",
        "|" + "---|" * len(headers),
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells, table has {len(headers)} columns")
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented JSON (NaN written as null), atomically."""
    text = json.dumps(_json_safe(payload), indent=2, default=str) + "\n"
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    temp.replace(path)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark worker (internal)")
    parser.add_argument("--worker", required=True, help="JSON: {call: 'module:fn', kwargs: {}}")
    args = parser.parse_args(argv)
    return _worker_main(args.worker)


if __name__ == "__main__":
    raise SystemExit(main())
