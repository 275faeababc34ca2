"""Who evaluates ``graphopt tune`` candidates: this process, a local pool, later a cluster.

Rules:

1. One evaluation is a plain, picklable :class:`EvaluationTask` (paths, pass names, options,
   seed) and its outcome an :class:`~graphopt.tuning.cache.Evaluation`; :func:`evaluate_task` turns
   one into the other anywhere graphopt is installed. That is the whole contract a distributed
   engine must implement: ship tasks, run :func:`evaluate_task`, return evaluations.
2. :func:`evaluate_task` runs the ordinary pipeline (:func:`graphopt.optimize`) on the
   calibration data, validates the result against the input model on the validation data with
   the validation engine, and records min cosine and min SNR over outputs, size on disk, build
   time and the output's content hash. An output's cosine (SNR) is the figure the gate judges:
   the lower of its whole-tensor and its worst-channel cosine (SNR),
   :attr:`graphopt.check.validate.Agreement.score`; the per-output record keeps both parts. It never
   measures latency (parallel workers disturb each other's timings; the caller measures
   serially). It never raises: a refused candidate (any :class:`~graphopt.errors.GraphoptError`)
   becomes ``status="error"``; anything else becomes a *transient* error that is not cached.
   The candidate model file is deleted afterwards unless its min cosine reached ``keep_above``.
3. :class:`Executor` is the interface: ``submit`` a task, ``next_result`` blocks until one
   submitted task finishes and returns its evaluation, ``capacity`` says how many tasks are
   worth keeping in flight, ``pending`` how many are. Results may come back in any order; the
   caller must not depend on it.
4. :class:`SerialExecutor` evaluates in the calling process, one task at a time (tests, tiny
   models, debugging). :class:`LocalProcessExecutor` uses a ``ProcessPoolExecutor`` with the
   ``spawn`` start method (no forked ONNX Runtime thread pools); a worker that dies (killed for
   memory) turns its task into a transient error and the pool is rebuilt.
5. :func:`default_workers`: min(usable cores, what free memory allows), where one candidate is
   estimated at ``WORKER_BASE_BYTES`` + ``MODEL_MEMORY_FACTOR`` × the model's size on disk and
   only ``MEMORY_HEADROOM`` of the available memory is planned for; at least one.
"""

from __future__ import annotations

import abc
import concurrent.futures
import logging
import multiprocessing
import os
import sys
import time
import traceback
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.errors import GraphoptError
from graphopt.settings import Settings
from graphopt.tuning.cache import Evaluation, external_data_files, model_content_hash

if TYPE_CHECKING:
    from graphopt.check.validate import Agreement

logger = logging.getLogger(__name__)

WORKER_BASE_BYTES = 400 << 20
"""Python, NumPy, onnx, onnxruntime and two validation sessions' overhead."""
MODEL_MEMORY_FACTOR = 4.0
"""Copies of the weights one evaluation holds at its peak: the loaded graph, the edited weights,
and the reference and candidate inference sessions."""
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class EvaluationTask:
    """Everything one evaluation needs, as plain values (rule 1)."""

    key: str
    model_path: str
    calib_data: str
    validation_data: str
    passes: tuple[str, ...]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_path: str = ""
    seed: int = 0
    batch_size: int | None = None
    keep_above: float | None = None
    """Keep the candidate model file when its min cosine is at least this (None: always)."""
    validate: bool = True
    settings: Settings | None = None
    """How the build and validation use the machine (None: ``GRAPHOPT_*`` in the worker)."""
    mask_input: str | bool | None = None
    """The calibration data's padding mask input (:func:`graphopt.optimize`'s ``mask_input``)."""


def evaluate_task(task: EvaluationTask) -> Evaluation:
    """Build and validate one candidate (rule 2)."""
    from graphopt.check.validate import Criteria
    from graphopt.pipeline import optimize

    evaluation = Evaluation(
        key=task.key, passes=list(task.passes), options=_plain_options(task.options)
    )
    output = Path(task.output_path)
    started = time.perf_counter()
    try:
        report = optimize(
            task.model_path,
            output,
            list(task.passes),
            options=task.options,
            data=task.calib_data,
            validation_data=task.validation_data,
            validate=task.validate,
            criteria=Criteria(min_cosine=0.0, min_snr_db=-float("inf")),
            batch_size=task.batch_size,
            seed=task.seed,
            settings=task.settings,
            mask_input=task.mask_input,
        )
    except GraphoptError as error:
        evaluation.status, evaluation.error = "error", _first_line(error)
        remove_model(output)
        return evaluation
    except Exception as error:  # a bug or resource problem: report it, retry on the next run
        logger.debug("candidate %s failed:\n%s", task.key, traceback.format_exc())
        evaluation.status, evaluation.transient = "error", True
        evaluation.error = f"{type(error).__name__}: {_first_line(error)}"
        remove_model(output)
        return evaluation
    evaluation.plan = list(report.plan)
    evaluation.modified = {record.name: record.modified for record in report.run.records}
    evaluation.build_seconds = sum(
        seconds for name, seconds in report.seconds.items() if name != "validate"
    )
    evaluation.validate_seconds = report.seconds.get("validate", 0.0)
    evaluation.size_bytes = report.output_bytes
    evaluation.model_sha256 = model_content_hash(output)
    if report.validation is not None:
        comparisons = report.validation.comparisons
        evaluation.outputs = {
            f"{c.output} [{c.provider}]": _output_figures(c.agreement) for c in comparisons
        }
        evaluation.min_cosine = min((c.agreement.score for c in comparisons), default=0.0)
        evaluation.min_snr_db = min(
            (c.agreement.score_snr_db for c in comparisons), default=-float("inf")
        )
        evaluation.problems = [
            f"{c.output} [{c.provider}]: {check.message}"
            for c in comparisons
            for check in c.checks
            if not check.passed and check.criterion not in ("cosine", "snr")
        ]
    else:
        evaluation.min_cosine, evaluation.min_snr_db = 1.0, float("inf")
    keep = task.keep_above is None or (evaluation.ok and evaluation.min_cosine >= task.keep_above)
    if keep:
        evaluation.model_kept = True
    else:
        remove_model(output)
    logger.debug("candidate %s evaluated in %.1fs", task.key, time.perf_counter() - started)
    return evaluation


def _output_figures(agreement: Agreement) -> dict[str, float]:
    """One output's record (rule 2): the gated figures first, then their parts."""
    return {
        "cosine": agreement.score,
        "snr_db": agreement.score_snr_db,
        "whole_cosine": agreement.cosine,
        "whole_snr_db": agreement.snr_db,
        "worst_channel_cosine": agreement.worst_channel_cosine,
        "worst_channel_snr_db": agreement.worst_channel_snr_db,
    }


def _plain_options(options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: dict(values) for name, values in options.items()}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def remove_model(path: Path) -> None:
    """Delete a candidate model file and the external data files it references."""
    if not path.exists():
        return
    try:
        extra = external_data_files(path)
    except Exception:  # an unreadable half-written file: remove what we can name
        extra = []
    for data_path in extra:
        if data_path.parent == path.parent and data_path.name.startswith(path.name):
            data_path.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


class Executor(abc.ABC):
    """Runs evaluation tasks (rule 3). Use as a context manager so workers are shut down."""

    @property
    @abc.abstractmethod
    def capacity(self) -> int:
        """How many tasks are worth keeping in flight at once."""

    @property
    @abc.abstractmethod
    def pending(self) -> int:
        """Tasks submitted whose result has not been returned by :meth:`next_result` yet."""

    @abc.abstractmethod
    def submit(self, task: EvaluationTask) -> None:
        """Start (or queue) one evaluation."""

    @abc.abstractmethod
    def next_result(self) -> Evaluation:
        """Block until one submitted task is done and return its evaluation."""

    def close(self, *, wait: bool = True) -> None:  # noqa: B027 - optional hook
        """Release workers; ``wait=False`` (after an error or Ctrl-C) abandons running tasks."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SerialExecutor(Executor):
    """Evaluates in the calling process, in submission order (rule 4)."""

    def __init__(self) -> None:
        self._queue: deque[EvaluationTask] = deque()

    @property
    def capacity(self) -> int:
        return 1

    @property
    def pending(self) -> int:
        return len(self._queue)

    def submit(self, task: EvaluationTask) -> None:
        self._queue.append(task)

    def next_result(self) -> Evaluation:
        if not self._queue:
            raise RuntimeError("next_result() called with no task pending")
        return evaluate_task(self._queue.popleft())


def _worker_init(log_level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s [worker]: %(message)s"))
    for name in ("graphopt", "passes"):
        named = logging.getLogger(name)
        named.handlers[:] = [handler]
        named.setLevel(log_level)
        named.propagate = False


class LocalProcessExecutor(Executor):
    """A pool of ``workers`` spawned processes on this machine (rule 4)."""

    def __init__(self, workers: int, *, log_level: int | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self._log_level = (
            log_level
            if log_level is not None
            else logging.getLogger("graphopt").getEffectiveLevel()
        )
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._futures: dict[concurrent.futures.Future[Evaluation], tuple[int, EvaluationTask]] = {}
        self._submitted = 0

    @property
    def capacity(self) -> int:
        return self.workers

    @property
    def pending(self) -> int:
        return len(self._futures)

    def _ensure_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(self._log_level,),
            )
        return self._pool

    def submit(self, task: EvaluationTask) -> None:
        try:
            future = self._ensure_pool().submit(evaluate_task, task)
        except BrokenProcessPool:
            self._rebuild()
            future = self._ensure_pool().submit(evaluate_task, task)
        self._futures[future] = (self._submitted, task)
        self._submitted += 1

    def next_result(self) -> Evaluation:
        if not self._futures:
            raise RuntimeError("next_result() called with no task pending")
        done, _ = concurrent.futures.wait(
            list(self._futures), return_when=concurrent.futures.FIRST_COMPLETED
        )
        future = min(done, key=lambda item: self._futures[item][0])
        _, task = self._futures.pop(future)
        try:
            return future.result()
        except BrokenProcessPool:
            logger.warning("a worker process died while evaluating %s (out of memory?)", task.key)
            self._rebuild()
            return _transient(task, "worker process died (out of memory?)")
        except Exception as error:  # e.g. the task could not be pickled back
            return _transient(task, f"{type(error).__name__}: {_first_line(error)}")

    def _rebuild(self) -> None:
        """Resubmit the tasks that were in flight on a broken pool to a fresh one."""
        old = self._pool
        self._pool = None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)
        survivors = {
            future: entry
            for future, entry in self._futures.items()
            if future.done() and not isinstance(future.exception(), BrokenProcessPool)
        }
        lost = [entry for future, entry in self._futures.items() if future not in survivors]
        self._futures = survivors
        for order, task in sorted(lost, key=lambda entry: entry[0]):
            future = self._ensure_pool().submit(evaluate_task, task)
            self._futures[future] = (order, task)

    def close(self, *, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
        self._futures.clear()


def _transient(task: EvaluationTask, message: str) -> Evaluation:
    remove_model(Path(task.output_path))
    return Evaluation(
        key=task.key,
        passes=list(task.passes),
        options=_plain_options(task.options),
        status="error",
        error=message,
        transient=True,
    )


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages; None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(model_bytes: int, *, available: int | None = None) -> int:
    """Rule 5."""
    cores = usable_cores()
    memory = available if available is not None else available_memory_bytes()
    if memory is None:
        return cores
    per_candidate = WORKER_BASE_BYTES + MODEL_MEMORY_FACTOR * model_bytes
    return max(1, min(cores, int(memory * MEMORY_HEADROOM // per_candidate)))
