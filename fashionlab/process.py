"""Which process is which: a pid with its start time and boot, so that a later process given
the same pid (after the first exits, or after a reboot) is never mistaken for it."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcessIdentity", "die_with_parent", "pid_exists", "start_resource_tracker"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, *, poll: float = 0.5) -> None:
    """Make this (worker) process end as soon as `parent` does, whatever ends the parent: a
    kill -9 gives it no chance to stop its workers, and a worker left running would go on
    training and writing to the store of a run that others may resume.

    On Linux the kernel sends SIGKILL at the parent's death (prctl PR_SET_PDEATHSIG); on
    every system a daemon thread also checks every `poll` seconds that the parent is still
    this process's parent, and exits at once when it is not (or already was not).
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # a C library without prctl: the thread remains
            pass
    if os.getppid() != parent:  # the parent died before the setting took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)  # no cleanup: nothing more may be written for a run nobody owns

    threading.Thread(target=watch, name="fashionlab-parent-watch", daemon=True).start()


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the process that the workers' queues and
    locks are registered with) deaf to SIGHUP, before anything starts it otherwise.

    Python starts it with SIGINT and SIGTERM blocked, so that a Ctrl-C to the whole process
    group leaves it to clean up after the others; not SIGHUP, which a closed terminal sends
    to the group: it died, was started again, and printed a traceback for every lock it then
    did not know. Blocked in this thread while it starts, the signal stays blocked in it.
    """
    if not hasattr(signal, "pthread_sigmask") or not hasattr(signal, "SIGHUP"):
        return  # Windows: no such signal, and no tracker process
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass(frozen=True)
class ProcessIdentity:
    """A process of this machine, told apart from a later one that gets the same pid.

    Linux numbers processes again after a reboot and reuses a pid once its process is gone:
    the pid names a process only with when it started (`start_time`) and in which boot
    (`boot_id`), both read from /proc. Without /proc (macOS, Windows) they are None and only
    the pid is known.

    >>> me = ProcessIdentity.current()
    >>> me.alive()
    True
    """

    pid: int
    start_time: int | None = None  # clock ticks from boot to its start: /proc/<pid>/stat field 22
    boot_id: str | None = None  # /proc/sys/kernel/random/boot_id when it started

    @classmethod
    def current(cls) -> ProcessIdentity:
        """This process."""
        return cls.of(os.getpid())

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        """The process that has this pid now (its start time None when there is none)."""
        return cls(pid, _start_time(pid), _boot_id())

    def alive(self) -> bool:
        """Whether this process still runs.

        With a start time and boot id on a machine with /proc, only the very process counts:
        another boot, or another process with the pid, is not it. Otherwise (no /proc, or an
        identity recorded without them) any process with the pid counts, so pair the answer
        with a sign of life such as a heartbeat."""
        return self.liveness() is not False

    def liveness(self) -> bool | None:
        """True: this very process runs; False: it is gone; None: a process with the pid runs,
        and whether it is this one cannot be told."""
        if self.pid <= 0 or not pid_exists(self.pid):
            return False
        boot_id = _boot_id()
        if boot_id is None or self.start_time is None or self.boot_id is None:
            return None
        if self.boot_id != boot_id:
            return False
        start_time = _start_time(self.pid)
        if start_time is None:  # /proc hides other users' processes (mount option hidepid)
            return None
        return start_time == self.start_time


def pid_exists(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (any user's). A zombie does not:
    it has ended, and only waits for its parent (or, orphaned, for the init process, which in
    a container may reap it a second later or never) to collect its status."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except OSError:
        return False
    fields = _stat_fields(pid)
    return not fields or fields[0] not in ("Z", "X")  # its state letter (R, S, D, Z...)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat from the state on (field 3; none without /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so count the fields
    # after its last ')'.
    return stat[stat.rfind(")") + 1:].split()


def _start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    try:
        return int(fields[22 - 3])  # the start time is field 22
    except (ValueError, IndexError):
        return None
