"""Stops asked for by a signal (Ctrl-C, SIGTERM, SIGHUP), made certain.

The command's signal handlers raise KeyboardInterrupt in whatever the main thread runs. When
that is a finaliser (a weakref callback, a `__del__`, the garbage collector), Python prints
"Exception ignored" and carries on: the stop would be lost and training would go on to its
end. So the handlers also record the signal here, and the training loops call
`raise_if_stopped()` between steps, where a stop that was swallowed is raised again.

Where the main thread holds locks that another thread needs, a KeyboardInterrupt must not land:
raised inside `concurrent.futures.wait`, it can leave a future's lock held, and the pool's
shutdown then waits forever for its manager thread, which needs that lock. There the stop is
`deferred`: recorded by the handlers, raised when the block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["LeftRunning", "cleaning_up", "deferred", "deferring", "handled", "kept",
           "raise_if_stopped", "received"]

received: list[int] = []  # the signals that asked this process to stop, in order
handled: list[bool] = []  # a stop was caught, and what it leaves is being put in order
deferring: list[bool] = []  # inside `deferred`: the handlers only record a stop


class LeftRunning(KeyboardInterrupt):
    """The stop of one process of a shared run that others still train: for them the run goes
    on (it is not interrupted), and the same command joins it again."""


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block in which the command's handlers record a stop without raising it; it is
    raised when the block ends (keep the block short: a stop waits for it)."""
    deferring.append(True)
    try:
        yield
    finally:
        deferring.pop()
    raise_if_stopped()


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """A block whose error, raised once a stop was asked for, is that stop: native code that
    checks for signals while it works (matplotlib's renderer: "Invalid bounding box";
    onnxruntime's start: "initialization failed") turns the KeyboardInterrupt into an error
    of its own, which would be reported as a failure, with a traceback."""
    try:
        yield
    except Exception as error:
        if received:
            raise KeyboardInterrupt from error
        raise


def cleaning_up() -> None:
    """Say that a stop took effect: it was caught where the run is left resumable (workers
    stopped, claims released, the run marked interrupted). A signal that comes now is only
    recorded, so that this cleanup is not cut short (see the command's handler)."""
    handled[:] = [True]


def raise_if_stopped() -> None:
    """Raise KeyboardInterrupt if a stop was asked for (the one raised by the signal handler
    may have been swallowed by a finaliser)."""
    if received:
        raise KeyboardInterrupt
