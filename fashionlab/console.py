"""The console script's first lines, light enough to run before the command line loads.

Loading `fashionlab.cli` (typer, rich) takes ~50-150 ms; a Ctrl-C in that time would print
Python's traceback, since the command's own signal handling is not in place yet.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Entry point of the `fashionlab` script and of `python -m fashionlab`."""
    try:
        # Here, inside the try: the import is the slow part a Ctrl-C lands in.
        from fashionlab.cli import main as command
    except KeyboardInterrupt:
        sys.stderr.write("stopped by SIGINT\n")  # as the command says it once loaded
        sys.exit(128 + signal.SIGINT)
    try:
        command()
    finally:
        _deaf_while_exiting()


def _deaf_while_exiting() -> None:
    """The command is over, its status known: a stop signal that comes while the interpreter
    exits (Ctrl-C pressed twice lands there) is ignored, and the process ends with that
    status. Python resets its own handlers before its slowest part, torch's teardown, where
    the signal's default action killed the process: a death by the signal, which a caller
    reads as a crash. (An exit that hangs still ends with SIGKILL.)"""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
