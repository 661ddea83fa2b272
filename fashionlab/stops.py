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

A library call that trains (`run_study`, `run_search`: a notebook's) is `listening`: Ctrl-C is
recorded there too, before the handler in place raises it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, ParamSpec, TypeVar

__all__ = ["DOUBLE_PRESS", "REPEATED_STOP_GRACE", "BeforeTheRun", "LeftRunning", "NoStopTracebacks",
           "before_the_run", "cleaning_up", "deferred", "deferring", "forget", "handled",
           "heard", "kept", "listened", "listening", "quiet_swallowed_stop", "raise_if_stopped",
           "received", "recording"]

received: list[int] = []  # the signals that asked this process to stop, in order
handled: list[bool] = []  # a stop was caught, and what it leaves is being put in order
deferring: list[bool] = []  # inside `deferred`: the handlers only record a stop
recording: list[bool] = []  # handlers that call `heard` are in place (the command's, `listening`)

# A stop that comes while the first one's cleanup runs (`cleaning_up`: workers stopped, the
# run left resumable), or within a second of it (Ctrl-C pressed twice, a scheduler's SIGTERM
# after a terminal's SIGHUP: the first is still unwinding), is recorded, not raised: the
# cleanup is not cut short, and nothing is raised inside a finaliser, where Python prints a
# traceback. One more than REPEATED_STOP_GRACE after the first raises again, for a cleanup
# that hangs; so does one after a first stop that no cleanup caught (swallowed by a finaliser
# outside the training loops).
DOUBLE_PRESS = 1.0  # seconds
REPEATED_STOP_GRACE = 5.0  # seconds
stopping_since: list[float] = []  # when the stop that was raised came


def heard(signum: int) -> bool:
    """What a stop signal's handler does first: record the signal, and say whether to raise
    the stop now (not for a repeated stop, above, nor inside `deferred`)."""
    received.append(signum)
    now = time.monotonic()
    if stopping_since:
        since = now - stopping_since[0]
        if since < REPEATED_STOP_GRACE and (handled or since < DOUBLE_PRESS):
            return False
    stopping_since[:] = [now]
    return not deferring


def forget() -> None:
    """Forget the stops heard so far: a new command, or library call, starts unstopped."""
    received.clear()
    handled.clear()
    stopping_since.clear()


def quiet_swallowed_stop(shown: Callable[[Any], object], unraisable: Any) -> None:
    """`sys.unraisablehook` while handlers record the stops: a stop raised inside a finaliser
    (a weakref callback, a `__del__`), where Python cannot raise it, is not printed as
    "Exception ignored in ..." and a traceback. It is recorded (`received`), and raised again
    by the next check (the training loops'). Anything else is shown as before (`shown`)."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and received:
        return
    shown(unraisable)


class NoStopTracebacks(logging.Filter):
    """A logging filter that drops a record carrying a stop that was asked for as its
    exception: SQLAlchemy's pool logs "Exception during reset or similar" with the traceback of
    a Ctrl-C that landed while a finaliser gave a connection back. The stop itself goes on
    (recorded, raised again by the next check) and is said once, by the command."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, KeyboardInterrupt) and received)


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """Around a library call that trains (`run_study`, `run_search`) from Python: Ctrl-C
    (SIGINT, a notebook kernel's interrupt) is recorded before the handler in place (Python's,
    the kernel's) raises it, as the command's handlers do. So a stop that a finaliser swallowed
    is raised again by the training loop's next check, not lost with the run trained on to its
    end; a second Ctrl-C while the first one's cleanup runs does not cut it short; and inside
    `deferred` the stop waits for the block's end. Nothing changes under the command line (its
    handlers do this), inside another such call, off the main thread (no handler can be set
    there) or where SIGINT is ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if recording or threading.current_thread() is not threading.main_thread() \
            or not callable(previous):
        yield
        return

    def record(signum: int, frame: FrameType | None) -> None:
        if heard(signum):
            previous(signum, frame)

    forget()
    unraisable = sys.unraisablehook
    sys.unraisablehook = functools.partial(quiet_swallowed_stop, unraisable)
    signal.signal(signal.SIGINT, record)
    recording.append(True)
    try:
        yield
    finally:
        recording.pop()
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = unraisable
        forget()  # the next call is not stopped by this one's stop


class LeftRunning(KeyboardInterrupt):
    """The stop of one process of a shared run that others still train: for them the run goes
    on (it is not interrupted), and the same command joins it again."""


class BeforeTheRun(KeyboardInterrupt):
    """A stop that came before the call had its run (created, resumed or joined: while the
    data loads, the store opens): nothing of this call to keep, and the same call starts."""


@contextlib.contextmanager
def before_the_run() -> Iterator[None]:
    """Around what a training call does before it has its run: a stop there is BeforeTheRun."""
    try:
        yield
    except KeyboardInterrupt as stopped:
        raise BeforeTheRun(*stopped.args).with_traceback(stopped.__traceback__) from None


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


_P = ParamSpec("_P")
_R = TypeVar("_R")


def listened(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """A library call that trains, run `listening`."""
    @functools.wraps(function)
    def wrapped(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with listening():
            return function(*args, **kwargs)
    return wrapped
