"""Where graphopt writes files, and how an output appears.

Rules:

1. Temporary files (spilled weights, copies ONNX Runtime runs, staged outputs, reference
   outputs) live in one temporary folder: ``--tmp-dir`` / ``tmp_dir``, by default the system's
   (``TMPDIR`` honoured). Nothing is written into the input model's folder, so a read-only model
   store works, and a hard kill leaves nothing outside the temporary folder.
2. An output path must be absent or a regular file, and so must its ``OUT.data``. A symbolic
   link, device, FIFO or folder there is refused (a symlink is not written through: replacing
   what it points at would surprise whoever shares the link).
3. An output is written complete into a private staging folder inside the temporary folder
   and checked there; only then is it published. Publishing renames the staged files into place
   (or, across file systems, first copies each into an unnamed file in the output folder, so a
   full disk fails before anything is replaced, then links them in). So ``OUT`` is always
   absent, the previous file, or a complete model: never a partial one.
4. ``OUT.data`` and ``OUT`` cannot change together. When the previous ``OUT`` reads the data
   file about to be replaced, the previous ``OUT`` is removed first, so no moment pairs an old
   model with new data. A previous ``OUT.data`` that the new output no longer needs is removed
   once the new ``OUT`` is in place.
5. Publishing into a folder holds an exclusive lock on that folder (``flock`` on the folder
   itself, no lock file), so two runs writing the same output cannot interleave their files:
   the last one to publish wins, whole.
6. Published files get the mode any file the user creates gets (``0o666`` less the umask).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
from onnx import external_data_helper

from graphopt.errors import InputError, StorageError
from graphopt.settings import temporary_folder_problem

logger = logging.getLogger(__name__)

TmpDir = str | os.PathLike[str] | None
_COPY_CHUNK_BYTES = 16 * 1024 * 1024
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)
"""OSError codes that mean the machine (disk, permissions), not graphopt, is at fault."""


def resolve_tmp_dir(tmp_dir: TmpDir = None) -> Path:
    """Rule 1: the temporary folder to use, checked to exist and be writable."""
    folder = Path(tmp_dir) if tmp_dir is not None else Path(tempfile.gettempdir())
    flag = "--tmp-dir" if tmp_dir is not None else "TMPDIR or --tmp-dir"
    problem = temporary_folder_problem(folder)
    if problem is not None:
        raise InputError(f"temporary folder {folder} {problem} (set {flag})")
    return folder


def storage_error(error: OSError, what: str) -> StorageError:
    """A one-line error for an OSError caused by the environment (full disk, read-only)."""
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return StorageError(f"{what}: {reason}{where}")


def check_output_target(path: Path, label: str = "output") -> None:
    """Rule 2 for one path: absent or a regular file, in an existing writable folder."""
    if path.is_symlink():
        raise InputError(
            f"{label} {path} is a symbolic link (to {os.readlink(path)}); give the real path"
        )
    if path.exists():
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise InputError(f"{label} {path} is a folder; give a file name")
        if not stat.S_ISREG(mode):
            raise InputError(
                f"{label} {path} is not a regular file ({_kind(mode)}); refusing to replace it"
            )
    parent = path.parent
    if not parent.exists():
        raise InputError(f"cannot write {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {path}: folder {parent} is not writable")


def _kind(mode: int) -> str:
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def file_mode() -> int:
    """Rule 6: the mode a newly created file gets under the current umask."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read without changing it where the system allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: the only portable way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staging_folder(tmp_dir: Path) -> Iterator[Path]:
    """Rule 3: a private folder in ``tmp_dir`` for one output; removed on exit, however left."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="graphopt-out-", dir=tmp_dir))
    except OSError as error:
        raise storage_error(error, f"cannot create a staging folder in {tmp_dir}") from error
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def data_file_name(model_path: Path) -> str:
    """The external-data file name graphopt gives an output: ``OUT.data``."""
    return model_path.name + ".data"


def iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers, sparse initializers' values and
    indices, tensor attributes, and the same in every If/Loop/Scan body."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from iter_tensor_protos(attribute.g)
            for body in attribute.graphs:
                yield from iter_tensor_protos(body)


def data_locations(proto: onnx.ModelProto) -> set[str]:
    """The external-data locations (relative file names) the tensors of ``proto`` refer to."""
    return {
        external_data_helper.ExternalDataInfo(tensor).location
        for tensor in iter_tensor_protos(proto.graph)
        if external_data_helper.uses_external_data(tensor)
    }


def referenced_data_files(model_path: Path) -> set[str]:
    """Locations of external data a model file refers to (empty when it cannot be read)."""
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # a previous output that is not a model: it refers to nothing
        return set()
    return data_locations(proto)


def model_files(model_path: Path) -> list[Path]:
    """A model file and every external-data file it refers to (those that exist)."""
    files = [model_path]
    if model_path.is_file():
        for location in sorted(referenced_data_files(model_path)):
            data = model_path.parent / location
            if data.exists():
                files.append(data)
    return files


def model_roles(model_path: Path, role: str) -> dict[str, Path | None]:
    """``{"the input model": IN, "the input's data file IN.data": …}`` for :func:`check_distinct`
    (``role`` = "input"): the model file and the data files it refers to."""
    files = model_files(model_path)
    roles: dict[str, Path | None] = {f"the {role} model": files[0]}
    roles.update({f"the {role}'s data file {path.name}": path for path in files[1:]})
    return roles


def check_distinct(paths: dict[str, Path | None]) -> None:
    """Refuse two roles on one file: ``{"output": OUT, "the input model": IN, …}``. Paths that
    do not exist yet compare by their resolved names, existing ones by identity (hard links)."""
    seen: list[tuple[str, Path]] = []
    for label, path in paths.items():
        if path is None:
            continue
        for other_label, other in seen:
            if _same_file(path, other):
                raise InputError(f"{label} {path} is {other_label}; choose another path")
        seen.append((label, path))


def _same_file(first: Path, second: Path) -> bool:
    if first.resolve() == second.resolve():
        return True
    try:
        return first.exists() and second.exists() and first.samefile(second)
    except OSError:
        return False


def publish(staged: Path, target: Path, *, report: tuple[Path, str] | None = None) -> None:
    """Rules 3-5: move the staged model (and its ``.data`` file, if any) to ``target``, and
    write ``report`` (path, text) with it.

    Two phases: first every file's bytes are made ready on its folder's file system (nothing to
    do when the staging folder is on it; else a complete unnamed copy; the report likewise), so
    a full disk fails here with ``OUT`` and the report untouched; then, with SIGINT and SIGTERM
    held back (:func:`signals_held`), the files are linked or renamed into place, so an
    interrupt never cuts publishing in half: it takes effect once publishing is done.
    """
    data_name = data_file_name(target)
    staged_data = staged.with_name(data_file_name(staged))
    check_output_target(target)
    check_output_target(target.with_name(data_name), "output data file")
    new_data = staged_data.is_file()
    moves = [(staged_data, target.with_name(data_name))] if new_data else []
    moves.append((staged, target))
    with _folder_lock(target.parent), contextlib.ExitStack() as cleanup:
        ready = [_PendingFile.copy_of(source, goal, cleanup) for source, goal in moves]
        if report is not None:
            path, text = report
            check_output_target(path, "report")
            data = text.encode("utf-8")
            ready.append(_PendingFile.written(path, lambda h: _write_all(h, data), cleanup))
        uses_old_data = _refers_to(target, target.with_name(data_name))
        with signals_held():
            if new_data and uses_old_data:
                target.unlink()  # rule 4: never an old model beside new data
            for pending in ready:
                pending.commit()
            if not new_data and uses_old_data:
                target.with_name(data_name).unlink(missing_ok=True)


def _refers_to(model_path: Path, data_path: Path) -> bool:
    """Whether the model file at ``model_path`` (if any) reads ``data_path``."""
    if not model_path.is_file():
        return False
    wanted = data_path.resolve()
    return any(
        (model_path.parent / location).resolve() == wanted
        for location in referenced_data_files(model_path)
    )


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive inside the block take effect when it ends.

    Their handlers are swapped for one that only records the signal, then put back, and a
    recorded signal is raised again (the process may have other threads, so blocking the
    signal in this one would not hold it back). Only the main thread can do this; elsewhere
    the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in held}
    for signum in held:
        signal.signal(signum, lambda number, _frame: arrived.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # closing releases the lock


def _same_file_system(path: Path, folder: Path) -> bool:
    return path.stat().st_dev == folder.stat().st_dev


class _PendingFile:
    """A file's complete bytes on the target's file system, not yet under the target's name.

    Three forms: a source on the same file system (committed by a rename); an unnamed file
    (``O_TMPFILE``: a hard kill leaves nothing); or, where unnamed files are refused (NFS,
    older overlayfs), a hidden temporary beside the target. ``cleanup`` closes or removes
    whatever was not committed.
    """

    def __init__(self, target: Path, *, rename: Path | None = None, handle: int = -1) -> None:
        self.target, self.rename, self.handle = target, rename, handle

    @classmethod
    def copy_of(cls, source: Path, target: Path, cleanup: contextlib.ExitStack) -> _PendingFile:
        if _same_file_system(source, target.parent):
            return cls(target, rename=source)
        return cls.written(target, lambda handle: _copy_into(source, handle), cleanup)

    @classmethod
    def written(
        cls, target: Path, fill: Callable[[int], None], cleanup: contextlib.ExitStack
    ) -> _PendingFile:
        """A new file with what ``fill`` writes to its descriptor, synced."""
        try:
            handle = os.open(target.parent, os.O_TMPFILE | os.O_WRONLY, file_mode())
        except OSError as error:
            if error.errno not in _NO_TMPFILE:
                raise
            return cls._written_named(target, fill, cleanup)
        cleanup.callback(os.close, handle)
        fill(handle)
        os.fsync(handle)
        return cls(target, handle=handle)

    @classmethod
    def _written_named(
        cls, target: Path, fill: Callable[[int], None], cleanup: contextlib.ExitStack
    ) -> _PendingFile:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        temp = Path(name)
        cleanup.callback(temp.unlink, missing_ok=True)  # a no-op once renamed into place
        with os.fdopen(handle, "wb") as file:
            os.fchmod(file.fileno(), file_mode())
            fill(file.fileno())
            os.fsync(file.fileno())
        return cls(target, rename=temp)

    def commit(self) -> None:
        """Give the bytes the target's name, replacing what is there."""
        if self.rename is not None:
            os.replace(self.rename, self.target)
        else:
            _link_replace(self.handle, self.target)


def _copy_into(source: Path, handle: int) -> None:
    with open(source, "rb") as src:
        while chunk := src.read(_COPY_CHUNK_BYTES):
            _write_all(handle, chunk)


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(handle, view)
        view = view[written:]


def _link_replace(handle: int, target: Path) -> None:
    """Give the unnamed file ``handle`` the name ``target``, replacing what is there.

    The file gets a hidden name first and is renamed over ``target`` right after (a link
    cannot replace a file); only a hard kill between those two calls leaves the hidden name.
    """
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        for _ in range(8):
            temp = f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            try:  # a dir_fd makes os.link call linkat(), which follows the /proc link
                os.link(f"/proc/self/fd/{handle}", temp, dst_dir_fd=folder)
            except FileExistsError:
                continue
            try:
                os.replace(temp, target.name, src_dir_fd=folder, dst_dir_fd=folder)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=folder)
                raise
            return
    finally:
        os.close(folder)
    raise OSError(errno.EEXIST, "could not pick a temporary name", str(target.parent))


def write_atomic_text(path: Path, text: str) -> None:
    """Write a small text file (a report) completely or not at all (:class:`_PendingFile`),
    with the umask's mode."""
    check_output_target(path, "report")
    data = text.encode("utf-8")
    try:
        with contextlib.ExitStack() as cleanup:
            _PendingFile.written(path, lambda handle: _write_all(handle, data), cleanup).commit()
    except OSError as error:
        raise storage_error(error, f"cannot write {path}") from error
