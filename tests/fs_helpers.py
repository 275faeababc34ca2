"""File-system conditions for the file-safety and fault-injection tests.

Root ignores permission bits, so a read-only folder is a read-only bind mount when the tests
run as root (as in containers) and ``chmod 0555`` otherwise; a full disk is a small tmpfs
(root) or, without root, a file-size limit (``RLIMIT_FSIZE``: writes past it fail with EFBIG,
as Python ignores SIGXFSZ). Either way the tool sees the OSError a real machine would give.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
import pytest

from .conftest import DIGITS_MODEL

IS_ROOT = os.geteuid() == 0


def _mount(*args: str) -> bool:
    if not IS_ROOT or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", *args], capture_output=True, timeout=30, check=False)
    return done.returncode == 0


def _umount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=30, check=False)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` cannot be written to (nor anything in it) inside the block."""
    if not IS_ROOT:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(stat.S_IMODE(mode))
        return
    if not _mount("--bind", str(folder), str(folder)):
        pytest.skip("running as root without permission to mount: cannot make a read-only folder")
    try:
        if not _mount("-o", "remount,bind,ro", str(folder)):
            pytest.skip("cannot remount a bind mount read-only here")
        yield
    finally:
        _umount(folder)


@contextlib.contextmanager
def small_disk(folder: Path, size_bytes: int) -> Iterator[Callable[[], None] | None]:
    """``folder`` becomes a file system of ``size_bytes``; yields None, or (without root) a
    ``preexec_fn`` for subprocesses that limits every file they write to ``size_bytes``."""
    folder.mkdir(parents=True, exist_ok=True)
    if _mount("-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)):
        try:
            yield None
        finally:
            _umount(folder)
        return

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, size_bytes))

    yield limit


def external_digits(folder: Path, name: str = "ext.onnx") -> Path:
    """The bundled digits CNN with every tensor in ``NAME.data`` (as a dynamo export writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save_model(
        onnx.load(str(DIGITS_MODEL)),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=name + ".data",
        size_threshold=0,
    )
    return path


def folder_digest(folder: Path) -> dict[str, str]:
    """Every entry of ``folder`` (recursively, hidden ones included) → its content hash."""
    digest: dict[str, str] = {}
    for item in sorted(folder.rglob("*")):
        key = str(item.relative_to(folder))
        digest[key] = (
            hashlib.sha256(item.read_bytes()).hexdigest() if item.is_file() else "<folder>"
        )
    return digest
