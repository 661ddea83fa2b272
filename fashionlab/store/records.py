"""What the store's rows read as (a run, a model, an epoch), and whether the process that holds a
row (a run's, a job claim's) still runs."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fashionlab.errors import ConfigError
from fashionlab.process import ProcessIdentity

# A process that runs a run refreshes its heartbeat every HEARTBEAT_EVERY seconds (a thread of
# the Store that created or claimed it) and at every epoch end. Where liveness rests on the
# heartbeat (another machine, no /proc), a run is interrupted after STALE_AFTER seconds without
# one: 15 missed beats, room for a database busy for a while or clocks a few minutes apart.
HEARTBEAT_EVERY = 60.0
STALE_AFTER = 15 * 60
# A job claim (a study trained by several processes) is lost after this long without a beat,
# when its process's liveness cannot be told (another machine): a few missed beats.
CLAIM_STALE_AFTER = 120.0
# A run its process left to the others (a search's workers, `Store.hand_over_run`) names no
# process. Each of them beats it, takes the row at its next beat and holds a job claim while
# it trains a trial; so when none is held and the run has missed five beats, none is left.
LEFT_STALE_AFTER = 5 * HEARTBEAT_EVERY


@dataclass(frozen=True)
class RunRecord:
    id: str
    kind: str
    name: str
    fingerprint: str
    status: str  # as stored: running | finished | failed | interrupted
    seed: int
    config: dict[str, Any]
    environment: dict[str, Any]
    started: float
    heartbeat: float
    finished: float | None
    host: str | None
    pid: int | None
    summary: dict[str, Any] | None
    output_dir: str | None
    pid_start: int | None = None  # see ProcessIdentity.start_time
    boot_id: str | None = None
    # Whether a live process holds one of its jobs (a study trained by several processes, a
    # search's trial in training): it still runs, though the process its row names is gone.
    # Read by `Store.run(s)`.
    jobs_held: bool = False

    @property
    def state(self) -> str:
        """running, finished, failed, or interrupted (stored as running, its process gone).

        On its own machine a run is running while its process is: the same pid, started at
        the same moment of the same boot (`ProcessIdentity`), so neither a later process that
        reuses the pid nor a reboot keeps it running. Where that cannot be told (a machine
        without /proc, a row from an older fashionlab), a process with the pid must exist
        and the heartbeat be under STALE_AFTER old; for a run of another machine, only the
        heartbeat counts. A run whose jobs other live processes hold still runs (its first
        process killed while other machines train it). A run that names no process (left to
        the others) is interrupted once no job of it is held and its heartbeat is
        LEFT_STALE_AFTER old."""
        if self.status != "running":
            return self.status
        after = LEFT_STALE_AFTER if self.pid is None else STALE_AFTER
        silent = gone(self.host, self.pid, self.pid_start, self.boot_id, self.heartbeat, after)
        return "interrupted" if silent and not self.jobs_held else "running"

    @property
    def data(self) -> dict[str, Any]:
        """What it recorded of the data it trained on (`steps.data_record`: their SHA-256 and
        sizes); empty for a run stored before runs recorded their data."""
        return (self.environment or {}).get("data") or {}

    @property
    def data_sha256(self) -> str | None:
        """The SHA-256 of the data it trained on (`Dataset.sha256`); None for a run stored
        before runs recorded their data."""
        return self.data.get("sha256")

    def seen_from(self, run_dir: str | Path | None) -> RunRecord:
        """The run with its files where they are: in `<run_dir>/<run id>` when that folder is
        there (a run directory moved or copied, whose store still names the original's
        folder), the paths it recorded (its models' folders) moved along."""
        folder = None if run_dir is None else (Path(run_dir) / self.id).resolve()
        if folder is None or not folder.is_dir() or (
                self.output_dir and Path(self.output_dir) == folder):
            return self
        recorded = Path(self.output_dir) if self.output_dir else None

        def moved(path: Any) -> Any:
            try:
                return str(folder / Path(path).relative_to(recorded))
            except (TypeError, ValueError):  # None, or a path outside the run's folder
                return path

        summary = dict(self.summary or {})
        if isinstance(summary.get("retrain"), Mapping):
            summary["retrain"] = {**summary["retrain"],
                                  "model_dir": moved(summary["retrain"].get("model_dir"))}
        if summary.get("final"):
            summary["final"] = [{**f, "model_dir": moved(f.get("model_dir"))}
                                if f.get("model_dir") else f for f in summary["final"]]
        return dataclasses.replace(self, output_dir=str(folder),
                                   summary=summary if self.summary is not None else None)

    @property
    def holder(self) -> str:
        """Which process runs it, for messages: "pid 4242 on vm", or, for a run its process
        left to others (a search's workers) or one that others hold while the process its
        row names is gone (`jobs_held`), "processes that share it"."""
        if self.pid is None or self.jobs_held:
            return "processes that share it"
        return f"pid {self.pid} on {self.host}"

    @property
    def duration(self) -> float:
        return (self.finished or self.heartbeat) - self.started


@dataclass(frozen=True)
class ModelRecord:
    run_id: str
    key: str
    candidate: str
    role: str
    repeat: int | None
    fold: int | None
    status: str
    message: str | None
    epochs_planned: int
    best_epoch: int | None
    n_train: int | None
    n_val: int | None
    seed: int | None
    test_loss: float | None
    test_accuracy: float | None
    seconds: float | None
    host: str | None = None  # the machine that trained it last (None: not recorded)


@dataclass(frozen=True)
class EpochRecord:
    key: str
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    seconds: float


def gone(host: str | None, pid: int | None, pid_start: int | None, boot_id: str | None,
         heartbeat: float, after: float) -> bool:
    """Whether the process that wrote a row (a run's, a job claim's) is gone: on this machine,
    when that very process no longer runs (`ProcessIdentity`); elsewhere, or where that cannot
    be told, when its heartbeat is `after` seconds old."""
    if host == socket.gethostname() and pid is not None:
        alive = ProcessIdentity(pid, pid_start, boot_id).liveness()
        if alive is not None:
            return not alive
    return time.time() - heartbeat >= after


# FASHIONLAB_CLAIM_GRACE's bounds: a claim beats every sixth of it, so not a busy loop on
# the database (`inf` overflowed the beat's wait, a tiny value wrote without pause).
_GRACE_BOUNDS = (1.0, 86400.0)


def claim_grace() -> float:
    """A job claim's grace period in seconds: FASHIONLAB_CLAIM_GRACE (1 s to a day; another
    value is a ConfigError), else CLAIM_STALE_AFTER. Whoever reads a claim's liveness reads it
    with this, as the claim's holder beats by it."""
    text = os.environ.get("FASHIONLAB_CLAIM_GRACE")
    if not text:
        return CLAIM_STALE_AFTER
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    low, high = _GRACE_BOUNDS
    if not low <= value <= high:  # NaN too
        raise ConfigError(f"FASHIONLAB_CLAIM_GRACE: expected a number of seconds from "
                          f"{low:g} to {high:g}, got '{text}'")
    return value


def claim_alive(host: str | None, pid: int | None, pid_start: int | None,
                boot_id: str | None, heartbeat: float | None,
                grace: float | None = None) -> bool:
    """Whether the process that holds a job claim still holds it (`gone`, with the claim's
    grace period: `claim_grace()` unless given)."""
    grace = claim_grace() if grace is None else grace
    return not gone(host, pid, pid_start, boot_id, heartbeat or 0.0, grace)


def this_process() -> dict[str, Any]:
    """The columns (of fl_runs, fl_jobs) that say which process holds a row: this one."""
    me = ProcessIdentity.current()
    return {"host": socket.gethostname(), "pid": me.pid, "pid_start": me.start_time,
            "boot_id": me.boot_id}
