"""Record the feeds an application passes to ONNX Runtime, as a folder ``--calib-data`` takes.

:func:`record_feeds` records in this process; ``graphopt capture -- COMMAND`` records in a
program and in the Python processes it starts (:func:`child_environment`). Rules:

1. What is recorded. While recording, each call of ``onnxruntime.InferenceSession.run`` or
   ``run_with_ort_values`` made from Python, by sessions created before or during the recording,
   writes its feed as one ``.npz`` file: one array per session input (names from
   ``session.get_inputs()``; other keys of the feed are left out), copied when the call is made,
   in C order, with the dtype and shape exactly as passed (so dynamic shapes vary per file, as
   :mod:`graphopt.data.feeds` rule 2 allows); an OrtValue is copied to the host. A feed is kept
   only when the call returns normally. ``run_with_iobinding`` (inputs bound to buffers),
   ``run_async`` and ``run_with_ortvaluevector`` calls are counted but not recorded; a warning
   says so once per process.
2. Never in the way. The call's result (or exception) reaches the application unchanged.
   A recording error (an input that cannot be copied, a file that cannot be written) is logged,
   never raised into the application; a write error (a full disk, a removed folder) stops
   recording in that process, with one warning.
3. Which sessions. ``model=PATH`` records only sessions of that model file: created from a path
   that resolves to the same file, or from bytes equal to the file's (SHA-256). Without ``model``
   every session is recorded. A session's model is what ONNX Runtime keeps of it
   (``_model_path``, ``_model_bytes``); a relative path is resolved at the session's first call
   seen; a session that keeps neither is ``model-unknown`` (never a match for ``model``).
4. Layout. With ``model``, the feeds go straight into ``out_dir``: ``--calib-data out_dir``.
   Without it there is always one subfolder per model, even when one model is seen: the model
   file's stem (``encoder.onnx`` → ``encoder/``); ``model-<8 hex of the SHA-256>`` for a session
   created from bytes (so the same model loaded from a file and from bytes gets two folders);
   a stem already taken by another file gets ``-<8 hex of the SHA-256 of its path>``.
   Files are ``000000.npz``, ``000001.npz``, … per folder, numbered when the call is made, so
   sorted names are call order (a failed call leaves a gap); at most :data:`MAX_FILES` a folder.
5. Limits, per model: ``every=K`` keeps the 1st, (K+1)-th, (2K+1)-th … call (calls counted per
   process); ``max_feeds=N`` stops after N written feeds. ``max_bytes`` (default
   :data:`DEFAULT_MAX_BYTES`, None for no limit) bounds the bytes of all ``.npz`` files of the
   capture, every model and process together: when the next feed would exceed it, recording
   stops for good, with one warning.
6. Atomic files. A feed is written to a hidden temporary file in its folder (``.000012.npz.tmp-…``,
   which ``*.npz`` does not match) and renamed to its name, so a killed application leaves only
   whole ``.npz`` files.
7. The output folder must be new, empty, or hold a previous capture and nothing else (its
   :data:`STATE_NAME`, numbered ``.npz`` files and the model subfolders it names, holding only
   those); the previous capture is removed first. Anything else is an
   :class:`~graphopt.errors.InputError` and nothing is deleted. A folder another live process is
   capturing into is refused.
8. One recording per process: :func:`record_feeds` while another is active (in any thread) is an
   :class:`~graphopt.errors.InputError`. Leaving the block, even by an exception, restores
   ONNX Runtime's methods; one that was replaced again meanwhile (by another library) is left as
   it is and the recording wrapper under it passes calls straight through.
9. Several processes share one capture: counters, file numbers and limits live in
   :data:`STATE_NAME` in the output folder, read and replaced under an ``flock`` on
   :data:`LOCK_NAME`. The process that started the capture removes the lock file when it ends
   (a process that finds no lock file stops recording) and leaves the state file, with the
   final counts, as the capture's marker. A process forked while recording (``os.fork``,
   ``multiprocessing``'s fork) records on into the same capture, with counts of its own. Forks
   and the lock: an ``flock`` belongs to the open file, which a child shares, so a child forked
   mid-transaction would hold the lock until it exits and block every other process. So a fork
   (through ``os.register_at_fork``) first waits for a transaction another thread of the process
   is in (the time one takes): no lock file is open when the process forks, and the child
   starts with free thread locks. A fork from C code that skips Python's fork handlers is not
   covered.
10. Summary (:class:`CaptureSummary`): per model, its folder, source, feeds, bytes, calls seen
    and calls skipped by reason (``every``, ``max_feeds``, ``max_bytes``, ``failed``: the call
    raised, ``unreadable``: an input could not be copied, ``write_error``, ``ended``: the capture
    had ended, ``run_with_iobinding``, ``run_async``, ``run_with_ortvaluevector``), calls of
    sessions of other models than ``model``, and the processes that recorded. At the end, feeds
    and bytes are counted from the files on disk. Calls skipped after a process's last written
    feed reach the summary when that process exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import re
import threading
import weakref
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from graphopt.errors import InputError, OptionError, StorageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 30
"""Rule 5: 1 GiB of ``.npz`` files per capture unless told otherwise."""
MAX_FILES = 1_000_000
"""Rule 4: six-digit names sort in call order; a folder holds at most this many feeds."""
STATE_NAME = ".graphopt-capture.json"
LOCK_NAME = ".graphopt-capture.lock"
ENV_DIR = "GRAPHOPT_CAPTURE_DIR"
"""Set by ``graphopt capture`` for the command: the capture folder its processes join."""
ENV_ROOT = "GRAPHOPT_CAPTURE_ROOT"
"""Set by ``graphopt capture``: the folder holding the ``graphopt`` package, for the bootstrap."""
RECORDED_METHODS = ("run", "run_with_ort_values")
UNRECORDED_METHODS = ("run_with_iobinding", "run_async", "run_with_ortvaluevector")
_FORMAT = "graphopt-capture/1"
_FEED_NAME = re.compile(r"\d{6}\.npz")
_TEMP_NAME = re.compile(r"\.\d{6}\.npz\.tmp-.+")
_STATE_TEMP = re.compile(re.escape(STATE_NAME) + r"\.tmp-.+")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MARK = "__graphopt_recorder__"
_PATCH_LOCK = threading.Lock()
"""Rule 8: makes checking for an active recording and patching one step."""


def _free_patch_lock_in_child() -> None:
    """Rule 9: a thread that held :data:`_PATCH_LOCK` when the process forked is not in the
    child (only the forking thread is), so the child frees it. A fork does not take it first:
    starting a recording holds it around a transaction, and a fork takes the transactions' lock
    (:meth:`_Ledger.before_fork`), so the two orders could deadlock."""
    if _PATCH_LOCK.locked():
        _PATCH_LOCK.release()


os.register_at_fork(after_in_child=_free_patch_lock_in_child)


@dataclasses.dataclass(frozen=True)
class ModelCapture:
    """Rule 10: what was recorded for one model."""

    folder: Path
    """Where its ``.npz`` feeds are: the path to give ``--calib-data``."""
    source: str
    """The model file's resolved path, ``bytes sha256:…`` or ``unknown``."""
    feeds: int
    bytes: int
    calls: int
    skipped: dict[str, int]


@dataclasses.dataclass(frozen=True)
class CaptureSummary:
    """Rule 10: a capture's counts, per model."""

    out_dir: Path
    models: tuple[ModelCapture, ...]
    ignored: dict[str, int]
    """Calls of sessions of other models than ``model``, by their source."""
    processes: int
    """Processes that recorded into the capture: for ``graphopt capture``, those that imported
    onnxruntime while it ran."""
    stopped: str | None
    """``max_bytes`` when the byte limit stopped the capture."""

    @property
    def feeds(self) -> int:
        return sum(model.feeds for model in self.models)

    @property
    def bytes(self) -> int:
        return sum(model.bytes for model in self.models)

    @property
    def calls(self) -> int:
        """Every call seen, of recorded and ignored sessions alike."""
        return sum(model.calls for model in self.models) + sum(self.ignored.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "feeds": self.feeds,
            "bytes": self.bytes,
            "calls": self.calls,
            "processes": self.processes,
            "stopped": self.stopped,
            "ignored": dict(self.ignored),
            "models": [
                {**dataclasses.asdict(model), "folder": str(model.folder)} for model in self.models
            ],
        }


@dataclasses.dataclass(frozen=True)
class _Limits:
    every: int
    max_feeds: int | None
    max_bytes: int | None
    model: str | None
    """The ``model`` filter's resolved path (rule 3)."""


@dataclasses.dataclass(frozen=True)
class _SessionInfo:
    """How a session's calls are recorded: ``key`` names its model in the state (rule 4)."""

    key: str
    source: str
    base: str
    """Its folder's name unless taken (rule 4); empty: ``out_dir`` itself (``model`` given)."""
    inputs: tuple[str, ...]
    recorded: bool


@dataclasses.dataclass
class _Pending:
    """Counts this process has not yet added to the shared state."""

    source: str
    base: str
    calls: int = 0
    skipped: Counter[str] = dataclasses.field(default_factory=Counter)


@dataclasses.dataclass(frozen=True)
class _Ticket:
    """A reserved file number (rule 4) and the feed to write there once the call returns."""

    key: str
    path: Path
    data: bytes


def _check_limits(every: int, max_feeds: int | None, max_bytes: int | None) -> None:
    for name, value, optional in (
        ("every", every, False),
        ("max_feeds", max_feeds, True),
        ("max_bytes", max_bytes, True),
    ):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            allowed = "an integer ≥ 1" + (" or None" if optional else "")
            raise OptionError(f"{name} must be {allowed}, got {value!r}")


def _resolved_model(model: str | os.PathLike[str] | None) -> str | None:
    if model is None:
        return None
    path = Path(model)
    if not path.is_file():
        raise InputError(f"model {path}: no such file")
    return os.path.realpath(path)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _folder_base(path: str) -> str:
    """Rule 4: a model file's stem, safe as a folder name."""
    stem = _UNSAFE.sub("_", Path(path).stem).lstrip(".")
    return stem or "model"


def _host_array(value: Any) -> np.ndarray:
    """Rule 1: a C-ordered copy of one input as passed (an OrtValue copied to the host)."""
    if type(value).__name__ == "OrtValue" and hasattr(value, "numpy"):
        value = value.numpy()
    array = np.array(value, order="C", copy=True)
    if array.dtype == object:
        array = array.astype(np.str_)
    return array


def _npz_bytes(feed: Mapping[str, Any], names: tuple[str, ...]) -> bytes:
    """Rule 1: the session inputs of ``feed`` as an uncompressed ``.npz`` archive (no pickles;
    written member by member so that any input name works, even ``file``)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in names:
            if name not in feed:
                continue
            array = _host_array(feed[name])
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


class _Ledger:
    """Rule 9: the shared state, read and replaced under an ``flock`` on the lock file.

    ``thread_lock`` is held for a whole transaction, from opening the lock file to closing it;
    a fork takes it first (:meth:`before_fork`), so no descriptor of the lock file is open, and
    no ``flock`` held, when the process forks; the child gets a new, free ``thread_lock``.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.state_path = out_dir / STATE_NAME
        self.lock_path = out_dir / LOCK_NAME
        self.thread_lock = threading.Lock()
        self._holder: int | None = None
        """The thread in a transaction, if any."""
        self._held_for_fork = False
        _register_fork_handlers(self)

    def before_fork(self) -> None:
        """Wait for the transaction another thread is in, and keep others out until forked. A
        fork made inside a transaction by its own thread (a signal handler) does not wait for
        itself."""
        if self._holder == threading.get_ident():
            return
        self.thread_lock.acquire()
        self._held_for_fork = True

    def after_fork_in_parent(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self.thread_lock.release()

    def after_fork_in_child(self) -> None:
        """Only the forking thread runs in the child; a transaction it is in (forking from a
        signal handler) ends with the lock it started with."""
        self._held_for_fork = False
        self.thread_lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """The state to read and change; written back when the block ends without an error.
        FileNotFoundError when the lock file is gone: the capture has ended (rule 9)."""
        with self.thread_lock:
            self._holder = threading.get_ident()
            try:
                handle = os.open(self.lock_path, os.O_RDWR)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                    text = self.state_path.read_text()
                    state = json.loads(text)
                    yield state
                    new_text = json.dumps(state, indent=1, sort_keys=True)
                    if new_text != text:
                        self.write(new_text)
                finally:
                    os.close(handle)
            finally:
                self._holder = None

    def write(self, text: str) -> None:
        temporary = self.state_path.with_name(
            f"{STATE_NAME}.tmp-{os.getpid()}-{threading.get_ident()}"
        )
        temporary.write_text(text)
        os.replace(temporary, self.state_path)


def _register_fork_handlers(ledger: _Ledger) -> None:
    """Rule 9: run the ledger's fork methods around every ``os.fork`` while it lives (the
    handlers keep a weak reference; Python cannot unregister them)."""
    reference = weakref.ref(ledger)

    def handler(method: Callable[[_Ledger], None]) -> Callable[[], None]:
        def call() -> None:
            alive = reference()
            if alive is not None:
                method(alive)

        return call

    os.register_at_fork(
        before=handler(_Ledger.before_fork),
        after_in_parent=handler(_Ledger.after_fork_in_parent),
        after_in_child=handler(_Ledger.after_fork_in_child),
    )


def _prepare_folder(out_dir: Path) -> None:
    """Rule 7: create ``out_dir``, or empty it of a previous capture; refuse anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"capture folder {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = sorted(out_dir.iterdir())
    except OSError as error:
        raise StorageError(f"cannot create capture folder {out_dir}: {error.strerror}") from error
    if not entries:
        return
    names = {entry.name for entry in entries}
    if STATE_NAME not in names:
        raise _refusal(out_dir, entries[0].name)
    try:
        state = json.loads((out_dir / STATE_NAME).read_text())
        folders = {str(record["folder"]) for record in state["models"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise _refusal(out_dir, STATE_NAME) from error
    owner = state.get("owner_pid")
    if (
        LOCK_NAME in names
        and state.get("active")
        and isinstance(owner, int)
        and owner != os.getpid()
        and _pid_alive(owner)
    ):
        raise InputError(f"capture folder {out_dir} is in use by a capture (process {owner})")
    removals: list[Path] = []
    for entry in entries:
        if entry.is_file() and not entry.is_symlink() and _is_capture_file(entry.name, top=True):
            removals.append(entry)
        elif entry.name in folders and entry.is_dir() and not entry.is_symlink():
            inside = sorted(entry.iterdir())
            foreign = [p for p in inside if not (p.is_file() and _is_capture_file(p.name))]
            if foreign:
                raise _refusal(out_dir, f"{entry.name}/{foreign[0].name}")
            removals.extend([*inside, entry])
        else:
            raise _refusal(out_dir, entry.name)
    for path in removals:
        path.rmdir() if path.is_dir() else path.unlink()
    logger.info("capture folder %s: removed a previous capture", out_dir)


def _is_capture_file(name: str, *, top: bool = False) -> bool:
    if _FEED_NAME.fullmatch(name) or _TEMP_NAME.fullmatch(name):
        return True
    return top and (name in (STATE_NAME, LOCK_NAME) or bool(_STATE_TEMP.fullmatch(name)))


def _refusal(out_dir: Path, name: str) -> InputError:
    return InputError(
        f"capture folder {out_dir} holds {name}, which is not a previous capture's; "
        "give a new or empty folder (nothing of yours is deleted)"
    )


def _summary_from_state(out_dir: Path, state: Mapping[str, Any]) -> CaptureSummary:
    models = tuple(
        ModelCapture(
            folder=out_dir / record["folder"] if record["folder"] else out_dir,
            source=record["source"],
            feeds=int(record["feeds"]),
            bytes=int(record["bytes"]),
            calls=int(record["calls"]),
            skipped={k: int(v) for k, v in sorted(record["skipped"].items()) if v},
        )
        for _, record in sorted(state["models"].items(), key=lambda item: item[1]["folder"])
    )
    return CaptureSummary(
        out_dir=out_dir,
        models=models,
        ignored={k: int(v) for k, v in sorted(state["ignored"].items())},
        processes=int(state["processes"]),
        stopped=state.get("stopped"),
    )


class CaptureFolder:
    """One capture's output folder and shared state (rules 7 and 9).

    :meth:`create` starts a capture (the process that does is its owner and ends it with
    :meth:`finish`); :meth:`join` opens a running one from another process.
    """

    def __init__(self, out_dir: Path, limits: _Limits, *, owner: bool) -> None:
        self.out_dir = out_dir
        self.limits = limits
        self.owner = owner
        self.owner_pid = os.getpid()
        self.ledger = _Ledger(out_dir)

    @classmethod
    def create(
        cls,
        out_dir: str | os.PathLike[str],
        *,
        every: int = 1,
        max_feeds: int | None = None,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        model: str | os.PathLike[str] | None = None,
    ) -> CaptureFolder:
        """Rule 7: check and prepare ``out_dir`` and write the capture's initial state."""
        _check_limits(every, max_feeds, max_bytes)
        limits = _Limits(every, max_feeds, max_bytes, _resolved_model(model))
        folder = Path(os.path.abspath(out_dir))
        _prepare_folder(folder)
        capture = cls(folder, limits, owner=True)
        state = {
            "format": _FORMAT,
            "owner_pid": os.getpid(),
            "active": True,
            "limits": dataclasses.asdict(limits),
            "bytes": 0,
            "stopped": None,
            "processes": 0,
            "models": {},
            "ignored": {},
        }
        try:
            capture.ledger.write(json.dumps(state, indent=1, sort_keys=True))
            capture.ledger.lock_path.touch()
        except OSError as error:
            raise StorageError(f"cannot write into capture folder {folder}: {error}") from error
        return capture

    @classmethod
    def join(cls, out_dir: str | os.PathLike[str]) -> CaptureFolder:
        """Rule 9: the running capture in ``out_dir`` (InputError when none runs there)."""
        folder = Path(os.path.abspath(out_dir))
        try:
            with _Ledger(folder).transaction() as state:
                limits = _Limits(**state["limits"])
                if not state.get("active"):
                    raise FileNotFoundError(folder)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"no capture is running in {folder}") from error
        return cls(folder, limits, owner=False)

    def summary(self) -> CaptureSummary:
        """Rule 10: the counts so far (the final ones once finished)."""
        state = json.loads(self.ledger.state_path.read_text())
        return _summary_from_state(self.out_dir, state)

    def finish(self) -> CaptureSummary:
        """Rule 9: end the capture: count the files on disk, keep the state, remove the lock."""
        with self.ledger.transaction() as state:
            state["active"] = False
            total = 0
            for record in state["models"].values():
                folder = self.out_dir / record["folder"]
                files = [p for p in _listing(folder) if _FEED_NAME.fullmatch(p.name)]
                record["feeds"] = len(files)
                record["bytes"] = sum(p.stat().st_size for p in files)
                total += record["bytes"]
                for stale in _listing(folder):
                    if _TEMP_NAME.fullmatch(stale.name):
                        stale.unlink(missing_ok=True)
            state["bytes"] = total
            for stale in _listing(self.out_dir):  # left by a process killed while writing
                if _STATE_TEMP.fullmatch(stale.name):
                    stale.unlink(missing_ok=True)
        self.ledger.lock_path.unlink(missing_ok=True)
        return self.summary()


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


class FeedRecorder:
    """Records ONNX Runtime feeds while active (module rules); made by :func:`record_feeds`.

    ``with record_feeds(out) as recorder: …`` then ``recorder.summary``.
    """

    def __init__(self, capture: Callable[[], CaptureFolder]) -> None:
        self._open_capture = capture
        self._capture: CaptureFolder | None = None
        self._lock = threading.Lock()
        self._active = False
        self._used = False
        self._originals: dict[str, Any] = {}
        self._wrappers: dict[str, Any] = {}
        self._session_class: Any = None
        self._sessions: weakref.WeakKeyDictionary[Any, _SessionInfo] = weakref.WeakKeyDictionary()
        self._model_sha256: str | None = None
        self._calls: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        self._ignored: Counter[str] = Counter()
        self._full: set[str] = set()
        self._stopped: str | None = None
        self._warned: set[str] = set()
        self._final: CaptureSummary | None = None

    # -- the context ---------------------------------------------------------------------

    def __enter__(self) -> FeedRecorder:
        if self._used:
            raise InputError("a feed recorder records once; call record_feeds again")
        self._used = True
        from onnxruntime import InferenceSession

        with _PATCH_LOCK:
            current = InferenceSession.__dict__.get("run")
            other = getattr(current, _MARK, None)
            if other is not None and other._active:
                raise InputError(
                    "feeds are already being recorded in this process (record_feeds or "
                    "graphopt capture); nested or overlapping recording is not supported"
                )
            self._capture = self._open_capture()
            with self._capture.ledger.transaction() as state:
                state["processes"] += 1
            self._session_class = InferenceSession
            self._patch(InferenceSession)
            self._active = True
        os.register_at_fork(after_in_child=functools.partial(_after_fork, weakref.ref(self)))
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop recording: restore ONNX Runtime's methods (rule 8), add this process's counts to
        the state and, in the process that started the capture, end it (rule 9)."""
        if not self._active:
            return
        with _PATCH_LOCK:
            self._active = False
            self._unpatch()
        capture = self._capture
        assert capture is not None
        try:
            with capture.ledger.transaction() as state:
                self._flush(state)
        except (OSError, ValueError) as error:
            logger.debug("could not add the last counts to the capture: %s", error)
        try:
            if capture.owner and capture.owner_pid == os.getpid():
                self._final = capture.finish()
            else:
                self._final = capture.summary()
        except (OSError, ValueError) as error:
            logger.warning("could not finish the capture in %s: %s", capture.out_dir, error)

    @property
    def summary(self) -> CaptureSummary:
        """Rule 10: the counts so far; the final ones after the block."""
        if self._final is not None:
            return self._final
        capture = self._capture
        if capture is None:
            raise InputError("the recorder has not started: use it in a with block")
        if self._active:
            with contextlib.suppress(OSError, ValueError), capture.ledger.transaction() as state:
                self._flush(state)
        return capture.summary()

    # -- patching ------------------------------------------------------------------------

    def _patch(self, session_class: Any) -> None:
        for name in (*RECORDED_METHODS, *UNRECORDED_METHODS):
            original = getattr(session_class, name, None)
            if original is None:
                continue
            self._originals[name] = session_class.__dict__.get(name)
            recorded = name in RECORDED_METHODS
            wrapper = (
                self._recording(name, original) if recorded else self._counting(name, original)
            )
            setattr(wrapper, _MARK, self)
            self._wrappers[name] = wrapper
            setattr(session_class, name, wrapper)

    def _unpatch(self) -> None:
        session_class = self._session_class
        for name, wrapper in self._wrappers.items():
            if session_class.__dict__.get(name) is not wrapper:
                logger.warning(
                    "InferenceSession.%s was replaced while recording; left as it is", name
                )
                continue
            original = self._originals[name]
            if original is None:
                delattr(session_class, name)
            else:
                setattr(session_class, name, original)

    def _recording(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self
        argument = "input_feed" if name == "run" else "input_dict_ort_values"

        @functools.wraps(original)
        def method(session: Any, *args: Any, **kwargs: Any) -> Any:
            if not recorder._active:
                return original(session, *args, **kwargs)
            feed = args[1] if len(args) > 1 else kwargs.get(argument)
            ticket = recorder._before(session, feed)
            try:
                result = original(session, *args, **kwargs)
            except BaseException:
                recorder._after(ticket, succeeded=False)
                raise
            recorder._after(ticket, succeeded=True)
            return result

        return method

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        recorder = self

        @functools.wraps(original)
        def method(session: Any, *args: Any, **kwargs: Any) -> Any:
            if recorder._active:
                recorder._note_unrecorded(session, name)
            return original(session, *args, **kwargs)

        return method

    # -- per call ------------------------------------------------------------------------

    def _before(self, session: Any, feed: Any) -> _Ticket | None:
        """Count the call; for a kept one, copy the feed and reserve its file (rules 1, 5)."""
        try:
            info = self._info(session)
            if not self._count(info):
                return None
            if not isinstance(feed, Mapping):
                self._skip(info.key, "unreadable", f"the feed is a {type(feed).__name__}")
                return None
            try:
                data = _npz_bytes(feed, info.inputs)
            except Exception as error:
                self._skip(info.key, "unreadable", f"cannot copy the feed: {error}")
                return None
            try:
                return self._reserve(info, data)
            except OSError as error:  # the shared state could not be written: a full disk
                self._stop_writing(self._capture_folder().ledger.state_path, error)
                with self._lock:
                    self._pending[info.key].skipped["write_error"] += 1
                return None
        except Exception as error:  # rule 2: never raised into the application
            self._warn("error", "recording failed for a call: %s", error)
            return None

    def _after(self, ticket: _Ticket | None, *, succeeded: bool) -> None:
        if ticket is None:
            return
        try:
            if not succeeded:
                self._release(ticket, "failed")
                return
            _write_atomic(ticket.path, ticket.data)
        except OSError as error:
            self._stop_writing(ticket.path, error)
            with contextlib.suppress(Exception):
                self._release(ticket, "write_error")
        except Exception as error:  # rule 2
            self._warn("error", "recording failed for a call: %s", error)

    def _stop_writing(self, path: Path, error: OSError) -> None:
        """Rule 2: a write error stops recording in this process, with one warning."""
        with self._lock:
            self._stopped = self._stopped or "write_error"
        self._warn(
            "write",
            "stopped recording feeds in this process: cannot write %s (%s)",
            path,
            error.strerror or error,
        )

    def _note_unrecorded(self, session: Any, name: str) -> None:
        try:
            info = self._info(session)
            with self._lock:
                if not info.recorded:
                    self._ignored[info.source] += 1
                    return
                pending = self._pending_for(info)
                pending.calls += 1
                pending.skipped[name] += 1
            self._warn(
                name,
                "ONNX Runtime %s calls are not recorded (only run and run_with_ort_values are)",
                name,
            )
        except Exception as error:  # rule 2
            self._warn("error", "recording failed for a call: %s", error)

    def _count(self, info: _SessionInfo) -> bool:
        """Rule 5: count a call; True when it is kept (a feed to write)."""
        with self._lock:
            if not info.recorded:
                self._ignored[info.source] += 1
                return False
            pending = self._pending_for(info)
            pending.calls += 1
            self._calls[info.key] += 1
            reason = self._stopped
            if reason is None and (self._calls[info.key] - 1) % self._limits.every:
                reason = "every"
            if reason is None and info.key in self._full:
                reason = "max_feeds"
            if reason is not None:
                pending.skipped[reason] += 1
            return reason is None

    def _skip(self, key: str, reason: str, detail: str) -> None:
        with self._lock:
            self._pending[key].skipped[reason] += 1
        self._warn(reason, "a feed was not recorded: %s", detail)

    def _reserve(self, info: _SessionInfo, data: bytes) -> _Ticket | None:
        """Rules 4, 5, 9: a file number for the feed, unless a limit is reached."""
        capture = self._capture_folder()
        limits = self._limits
        reason: str | None = None
        try:
            with capture.ledger.transaction() as state:
                self._flush(state)
                record = state["models"][info.key]
                ceiling = min(limits.max_feeds or MAX_FILES, MAX_FILES)
                if not state["active"]:
                    reason = "ended"
                elif state["stopped"]:
                    reason = state["stopped"]
                elif record["feeds"] >= ceiling or record["next"] >= MAX_FILES:
                    reason = "max_feeds"
                elif limits.max_bytes is not None and state["bytes"] + len(data) > limits.max_bytes:
                    reason = state["stopped"] = "max_bytes"
                else:
                    index = record["next"]
                    record["next"] += 1
                    record["feeds"] += 1
                    record["bytes"] += len(data)
                    state["bytes"] += len(data)
                    path = capture.out_dir / record["folder"] / f"{index:06d}.npz"
                    return _Ticket(info.key, path, data)
        except FileNotFoundError:
            reason = "ended"
        with self._lock:
            self._pending[info.key].skipped[reason] += 1
            if reason == "max_feeds":
                self._full.add(info.key)
            else:
                self._stopped = self._stopped or reason
        if reason == "max_feeds":
            logger.info("%s: max_feeds reached, no more feeds recorded", info.source)
        elif reason == "max_bytes":
            self._warn(
                reason,
                "stopped recording feeds: the next feed (%d bytes) would exceed max_bytes (%d)",
                len(data),
                limits.max_bytes,
            )
        elif reason == "ended":
            logger.info("the capture in %s has ended; not recording", capture.out_dir)
        return None

    def _release(self, ticket: _Ticket, reason: str) -> None:
        """Give back a reserved number's counts: its call raised, or its file was not written."""
        capture = self._capture_folder()
        with self._lock:
            self._pending[ticket.key].skipped[reason] += 1
        with contextlib.suppress(FileNotFoundError), capture.ledger.transaction() as state:
            record = state["models"][ticket.key]
            record["feeds"] -= 1
            record["bytes"] -= len(ticket.data)
            state["bytes"] -= len(ticket.data)

    # -- bookkeeping ---------------------------------------------------------------------

    def _capture_folder(self) -> CaptureFolder:
        assert self._capture is not None, "used before the recording started"
        return self._capture

    @property
    def _limits(self) -> _Limits:
        return self._capture_folder().limits

    def _pending_for(self, info: _SessionInfo) -> _Pending:
        pending = self._pending.get(info.key)
        if pending is None:
            pending = self._pending[info.key] = _Pending(info.source, info.base)
        return pending

    def _flush(self, state: dict[str, Any]) -> None:
        """Add this process's pending counts to the state; give new models a folder (rule 4)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            ignored, self._ignored = self._ignored, Counter()
            for key, counts in pending.items():  # keep the models known, with zero counts
                self._pending[key] = _Pending(counts.source, counts.base)
        models = state["models"]
        for key, counts in pending.items():
            record = models.get(key)
            if record is None:
                taken = {other["folder"] for other in models.values()}
                folder = counts.base
                if folder in taken:
                    folder = f"{folder}-{_short_hash(key)}"
                record = models[key] = {
                    "folder": folder,
                    "source": counts.source,
                    "feeds": 0,
                    "bytes": 0,
                    "next": 0,
                    "calls": 0,
                    "skipped": {},
                }
            record["calls"] += counts.calls
            for reason, count in counts.skipped.items():
                record["skipped"][reason] = record["skipped"].get(reason, 0) + count
        for source, count in ignored.items():
            state["ignored"][source] = state["ignored"].get(source, 0) + count

    def _info(self, session: Any) -> _SessionInfo:
        """Rule 3: a session's model, whether it is recorded and its input names (cached)."""
        try:
            with self._lock:
                known = self._sessions.get(session)
        except TypeError:  # not weakly referable: described on every call
            known = None
        if known is not None:
            return known
        info = self._describe(session)
        with contextlib.suppress(TypeError), self._lock:
            self._sessions[session] = info
        return info

    def _describe(self, session: Any) -> _SessionInfo:
        path = getattr(session, "_model_path", None)
        data = getattr(session, "_model_bytes", None)
        sha256: str | None = None
        if isinstance(path, (str, os.PathLike)) and os.fspath(path):
            resolved = os.path.realpath(os.fspath(path))
            key, source, base = f"path:{resolved}", resolved, _folder_base(resolved)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            sha256 = hashlib.sha256(data).hexdigest()
            key, source = f"sha256:{sha256}", f"bytes sha256:{sha256[:16]}"
            base = f"model-{sha256[:8]}"
        else:
            key, source, base = "unknown", "unknown", "model-unknown"
        model = self._limits.model
        if model is None:
            recorded = True
        elif key.startswith("path:"):
            recorded = source == model or _same_file(source, model)
        elif sha256 is not None:
            recorded = sha256 == self._model_file_sha256(model)
        else:
            recorded = False
        if recorded and model is not None:
            key, source, base = "model", model, ""
        inputs = tuple(item.name for item in session.get_inputs()) if recorded else ()
        return _SessionInfo(key, source, base, inputs, recorded)

    def _model_file_sha256(self, model: str) -> str:
        if self._model_sha256 is None:
            self._model_sha256 = _sha256_file(model)
        return self._model_sha256

    def _warn(self, topic: str, message: str, *args: Any) -> None:
        """Log a warning once per topic (rule 2)."""
        with self._lock:
            if topic in self._warned:
                return
            self._warned.add(topic)
        logger.warning(message, *args)

    def _after_fork(self) -> None:
        """Rule 9: a forked child records on with its own lock and counts (the ledger frees
        its own lock: :meth:`_Ledger.after_fork_in_child`)."""
        self._lock = threading.Lock()
        self._pending = {}
        self._ignored = Counter()


def _after_fork(reference: weakref.ref[FeedRecorder]) -> None:
    recorder = reference()
    if recorder is not None and recorder._active:
        recorder._after_fork()


def _same_file(first: str, second: str) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    """Rule 6: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def record_feeds(
    out_dir: str | os.PathLike[str],
    *,
    max_feeds: int | None = None,
    every: int = 1,
    model: str | os.PathLike[str] | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> FeedRecorder:
    """Record the feeds this process passes to ONNX Runtime into ``out_dir`` (module rules).

    ``with record_feeds("feeds/") as recorder: app.main()``; then ``recorder.summary`` says
    what was written where. Bad limits are an :class:`~graphopt.errors.OptionError` and a
    missing ``model`` file an :class:`~graphopt.errors.InputError`, raised here; an unusable
    ``out_dir`` (rule 7) is an InputError when the block is entered, before anything is
    written, and so is a recording already active (rule 8).
    """
    _check_limits(every, max_feeds, max_bytes)
    _resolved_model(model)

    def capture() -> CaptureFolder:
        return CaptureFolder.create(
            out_dir, every=every, max_feeds=max_feeds, max_bytes=max_bytes, model=model
        )

    return FeedRecorder(capture)


def start_from_environment() -> FeedRecorder | None:
    """Join the capture :data:`ENV_DIR` names, until this process exits (``graphopt capture``
    calls this from the bootstrap once onnxruntime is imported). Never raises."""
    out_dir = os.environ.get(ENV_DIR)
    if not out_dir:
        return None
    recorder = FeedRecorder(functools.partial(CaptureFolder.join, out_dir))
    try:
        recorder.__enter__()
    except InputError as error:  # the capture has ended: a process that outlived the command
        logger.info("graphopt capture: not recording in this process: %s", error)
        return None
    except Exception as error:
        logger.warning("graphopt capture: not recording in this process: %s", error)
        return None
    atexit.register(recorder.close)
    return recorder


SITECUSTOMIZE = '''\
"""Written by `graphopt capture` (graphopt.data.capture): records this process's ONNX Runtime
feeds. When onnxruntime is imported, graphopt starts recording into the capture that
GRAPHOPT_CAPTURE_DIR names. This folder is taken off sys.path again, and the sitecustomize
module this one stands in front of, if any, runs as usual.
"""

import os
import sys


def _graphopt_capture_setup():
    import importlib.abc
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.environ.get("GRAPHOPT_CAPTURE_ROOT", "")

    def start():
        added = bool(root) and "graphopt" not in sys.modules
        if added:
            sys.path.insert(0, root)
        try:
            from graphopt.data.capture import start_from_environment
        except Exception as error:
            sys.stderr.write("graphopt capture: not recording in this process (%s)\\n" % error)
            return
        finally:
            if added:
                sys.path.remove(root)
        start_from_environment()

    class OnnxRuntimeImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "onnxruntime" or self not in sys.meta_path:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = getattr(spec, "loader", None)
            run_module = getattr(loader, "exec_module", None)
            if run_module is None:
                return spec

            def exec_module(module):
                run_module(module)
                try:
                    start()
                except Exception as error:
                    sys.stderr.write("graphopt capture: not recording (%s)\\n" % error)

            try:
                loader.exec_module = exec_module
            except AttributeError:
                pass
            return spec

    sys.meta_path.insert(0, OnnxRuntimeImport())
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", sys.path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["sitecustomize"] = module
        spec.loader.exec_module(module)


_graphopt_capture_setup()
'''
"""The bootstrap ``graphopt capture`` puts first on the command's ``PYTHONPATH``."""


def child_environment(
    capture: CaptureFolder, bootstrap_dir: Path, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment that makes a command's Python processes join ``capture``: writes the
    bootstrap ``sitecustomize.py`` into ``bootstrap_dir`` and puts that folder first on
    ``PYTHONPATH``. A Python started with ``-I``, ``-E`` or ``-S`` ignores it (not recorded)."""
    (bootstrap_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ if base is None else base)
    paths = [str(bootstrap_dir), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[ENV_DIR] = str(capture.out_dir)
    env[ENV_ROOT] = str(Path(__file__).resolve().parents[2])
    return env
