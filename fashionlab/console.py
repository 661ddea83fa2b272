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
    command()
