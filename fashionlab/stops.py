"""Stops asked for by a signal (Ctrl-C, SIGTERM, SIGHUP), made certain.

The command's signal handlers raise KeyboardInterrupt in whatever the main thread runs. When
that is a finaliser (a weakref callback, a `__del__`, the garbage collector), Python prints
"Exception ignored" and carries on: the stop would be lost and training would go on to its
end. So the handlers also record the signal here, and the training loops call
`raise_if_stopped()` between steps, where a stop that was swallowed is raised again.
"""

from __future__ import annotations

__all__ = ["cleaning_up", "handled", "raise_if_stopped", "received"]

received: list[int] = []  # the signals that asked this process to stop, in order
handled: list[bool] = []  # a stop was caught, and what it leaves is being put in order


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
