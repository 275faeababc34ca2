"""What ``graphopt tune`` remembers: content hashes, per-candidate results and the trial journal.

Rules:

1. A candidate's cache key is the sha256 of the canonical JSON (sorted keys, no whitespace) of:
   the input model's content hash (model file plus every external data file it references),
   the calibration and validation data content hashes, the candidate (sorted passes and their
   options), the batch size, the seed, the graphopt version and the calibration mask setting
   (``auto``, an input name or False; results from before masking carry none). Paths,
   timestamps and the output folder never enter a key, so a rerun anywhere with the same inputs
   finds its results.
2. Data content hash: an ``.npz`` file by its arrays (sorted names, dtypes, shapes and bytes:
   re-saving the same arrays gives the same hash); a folder by the sorted names and contents of
   its ``.npz`` files (exactly what :func:`graphopt.data.feeds.open_data` reads).
3. Results live in ``OUT_DIR/cache/<key>.json``, one file per key, written atomically (temp file
   + rename). A file that cannot be parsed is treated as missing (and logged), never as a crash.
4. ``OUT_DIR/trials.jsonl`` is an append-only journal with one line per evaluation performed,
   flushed and fsynced line by line. On open, journal lines whose cache file is missing are
   restored into the cache, so a killed run (or a lost ``cache/`` folder) resumes from the
   journal; a torn last line is skipped with a warning.
5. Latency results are cached under ``cache/latency-<key>.json``; their key covers the candidate
   model's bytes, the reference model's bytes, the feed, the number of runs, the CPU (model name,
   logical cores, architecture) and the onnxruntime version: the same model measured on another
   machine is measured again.
6. Only deterministic outcomes are cached: an evaluation that failed for a transient reason (a
   worker killed for memory, an unexpected exception) is retried on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphopt.ir.files import data_locations

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
CACHE_FOLDER = "cache"
JOURNAL_NAME = "trials.jsonl"


@dataclass
class Evaluation:
    """The measured outcome of one candidate (everything except latency, see rule 5).

    ``min_cosine`` is the smallest, over the model's outputs, of the validation engine's cosine
    of each output (one cosine over all elements of all validation batches); ``min_snr_db``
    likewise. ``problems`` lists failed checks other than cosine and SNR (missing output, shape
    mismatch, new NaN/Inf, candidate does not load or run): a candidate with problems never
    meets the bar. ``status`` is ``ok`` or ``error`` (the pipeline refused the candidate);
    ``transient`` errors are not cached (rule 6).
    """

    key: str
    passes: list[str]
    options: dict[str, dict[str, Any]]
    status: str = "ok"
    error: str = ""
    transient: bool = False
    min_cosine: float = 0.0
    min_snr_db: float = -math.inf
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    size_bytes: int = 0
    model_sha256: str = ""
    plan: list[str] = field(default_factory=list)
    modified: dict[str, bool] = field(default_factory=dict)
    build_seconds: float = 0.0
    validate_seconds: float = 0.0
    model_kept: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok" and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        values = dict(data)
        values["min_cosine"] = float(values.get("min_cosine", 0.0))
        values["min_snr_db"] = float(values.get("min_snr_db", -math.inf))
        values["outputs"] = {
            name: {metric: float(number) for metric, number in metrics.items()}
            for name, metrics in values.get("outputs", {}).items()
        }
        known = set(cls.__dataclass_fields__)
        return cls(**{name: value for name, value in values.items() if name in known})


@dataclass(frozen=True)
class LatencyRecord:
    """A cached latency measurement of a candidate against the original (rule 5)."""

    ratio: float
    reference_ms: float
    candidate_ms: float
    runs: int


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: equal content gives equal text (and equal hashes)."""
    return json.dumps(_json_safe(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _hash_file_into(digest: Any, path: Path) -> None:
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)


def external_data_files(model_path: Path) -> list[Path]:
    """The external data files a model file references, sorted (missing ones included)."""
    locations = data_locations(onnx.load(str(model_path), load_external_data=False))
    return [model_path.parent / location for location in sorted(locations)]


def model_content_hash(model_path: Path) -> str:
    """sha256 over the model file and its external data files, in a fixed order (rule 1)."""
    digest = hashlib.sha256()
    _hash_file_into(digest, model_path)
    for data_path in external_data_files(model_path):
        digest.update(b"\0external\0" + data_path.name.encode("utf-8") + b"\0")
        if data_path.is_file():
            _hash_file_into(digest, data_path)
    return digest.hexdigest()


def _hash_npz_into(digest: Any, path: Path) -> None:
    """The arrays of an ``.npz`` (names, dtypes, shapes, bytes), not its zip container, whose
    timestamps change every time the same arrays are saved."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            for name in sorted(archive.files):
                array = np.ascontiguousarray(archive[name])
                header = f"\0array\0{name}\0{array.dtype.str}\0{array.shape}\0"
                digest.update(header.encode("utf-8"))
                digest.update(array.tobytes())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        _hash_file_into(digest, path)


def data_content_hash(path: Path) -> str:
    """sha256 of a data source as :func:`graphopt.data.feeds.open_data` reads it (rule 2)."""
    digest = hashlib.sha256()
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    for file in files:
        digest.update(b"\0file\0" + (file.name if path.is_dir() else "").encode("utf-8") + b"\0")
        _hash_npz_into(digest, file)
    return digest.hexdigest()


def machine_fingerprint() -> dict[str, Any]:
    """What latency depends on besides the model (rule 5)."""
    import onnxruntime

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "logical_cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "onnxruntime": onnxruntime.__version__,
    }


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


class TuneCache:
    """The cache folder and journal of one output folder (rules 3, 4 and 5)."""

    def __init__(self, out_dir: Path) -> None:
        self.folder = out_dir / CACHE_FOLDER
        self.journal_path = out_dir / JOURNAL_NAME
        self.folder.mkdir(parents=True, exist_ok=True)
        self.restored = self._restore_from_journal()

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> Evaluation | None:
        data = self._read(self._path(key))
        if data is None:
            return None
        try:
            return Evaluation.from_dict(data)
        except (TypeError, ValueError) as error:
            logger.warning("ignoring unreadable cache entry %s: %s", key, error)
            return None

    def put(self, evaluation: Evaluation, *, stage: str) -> None:
        """Store a deterministic outcome (rule 6), then journal it (rule 4)."""
        if evaluation.transient:
            return
        record = evaluation.to_dict()
        write_text_atomic(self._path(evaluation.key), canonical_json(record) + "\n")
        line = canonical_json({"key": evaluation.key, "stage": stage, "evaluation": record})
        with open(self.journal_path, "a", encoding="utf-8") as stream:
            stream.write(line + "\n")
            stream.flush()
            os.fsync(stream.fileno())

    def get_latency(self, key: str) -> LatencyRecord | None:
        data = self._read(self.folder / f"latency-{key}.json")
        if data is None:
            return None
        try:
            return LatencyRecord(
                ratio=float(data["ratio"]),
                reference_ms=float(data["reference_ms"]),
                candidate_ms=float(data["candidate_ms"]),
                runs=int(data["runs"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            logger.warning("ignoring unreadable latency cache entry %s: %s", key, error)
            return None

    def put_latency(self, key: str, record: LatencyRecord) -> None:
        path = self.folder / f"latency-{key}.json"
        write_text_atomic(path, canonical_json(asdict(record)) + "\n")

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as error:
            logger.warning("cannot read cache entry %s: %s", path, error)
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            logger.warning("ignoring corrupt cache entry %s", path)
            return None
        return data if isinstance(data, dict) else None

    def _restore_from_journal(self) -> int:
        if not self.journal_path.is_file():
            return 0
        restored = 0
        lines = self.journal_path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = str(entry["key"])
                record = entry["evaluation"]
                Evaluation.from_dict(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                logger.warning(
                    "journal %s line %d is incomplete (a killed run?); skipped",
                    self.journal_path,
                    number,
                )
                continue
            if not self._path(key).exists():
                write_text_atomic(self._path(key), canonical_json(record) + "\n")
                restored += 1
        if restored:
            logger.info("restored %d cached results from %s", restored, self.journal_path)
        return restored
