"""The ``graphopt`` command and ``python -m graphopt``: run the CLI.

Start-up imports onnx and ONNX Runtime, which takes a few tenths of a second. An interrupt in
that time exits like one later on (130 for Ctrl-C, 143 for SIGTERM, one line, no traceback):
the signals are caught here before the CLI module is imported, and
:func:`graphopt.cli.commands.main` takes over from there.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class _StartupInterrupted(BaseException):
    """A signal arrived while the CLI was being imported."""


def main() -> int:
    """Import the CLI with start-up interrupts handled, then run it."""
    arrived: list[int] = []

    def interrupt(signum: int, frame: FrameType | None) -> None:
        arrived.append(signum)
        raise _StartupInterrupted

    previous = {signum: signal.signal(signum, interrupt) for signum in _EXIT_CODES}
    try:
        from graphopt.cli.commands import main as run_cli
    except BaseException:
        # (an extension module's initialisation may turn the interrupt into an ImportError)
        if not arrived:
            raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if arrived:
        name = signal.Signals(arrived[0]).name
        sys.stderr.write(f"graphopt: interrupted during start-up ({name})\n")
        return _EXIT_CODES[arrived[0]]
    return run_cli()


if __name__ == "__main__":
    sys.exit(main())
