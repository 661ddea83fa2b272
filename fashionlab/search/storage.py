"""Where a search lives: its Optuna study (named by `search_identity`), Optuna's storage on the
experiment store's database, and the lock by which the workers sharing it take turns to start
trials (`ClaimLock`, at home in `fashionlab.jobs`, which a study's processes share too).

A lost trial (its worker killed, its machine gone) is failed once its heartbeat has been
silent for GRACE_PERIOD seconds and retried with the same parameters (`RetryLostTrial`); a
worker on the same machine notices a dead process at once, and any worker notices a trial's
stale job claim, by the claim grace period (fashionlab.search.loop).
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import optuna

from fashionlab.config import StudySpec
from fashionlab.jobs import ClaimLock
from fashionlab.store import database_trouble
from fashionlab.trials import rdb_storage, study_name

__all__ = ["GRACE_PERIOD", "HEARTBEAT_INTERVAL", "MAX_RETRIES", "ClaimLock", "RetryLostTrial",
           "open_storage", "search_identity"]

HEARTBEAT_INTERVAL = 20  # seconds between a running trial's signs of life in the database
GRACE_PERIOD = 120  # a trial silent this long is failed and retried
# A trial whose process died is retried with its parameters, from its checkpoints, up to this
# many times: a trial that kills its process every time (out of memory) does not hold the
# search forever. A trial the user stopped (Ctrl-C, SIGTERM) is retried every time.
MAX_RETRIES = 3
_CRASHES = "fashionlab:crashes"  # a trial's system attribute: crashes in its retry chain


class RetryLostTrial:
    """Retry a failed trial the way Optuna's `RetryHeartbeatStaleTrialCallback` does (a
    waiting trial with its parameters and user attributes; `failed_trial` names the first of
    its chain, `retry_history` lists them all), with MAX_RETRIES counting crashes only: a
    trial whose process died or went silent is retried MAX_RETRIES times, a trial the user
    stopped (`crashed=False`) every time, since stopping a search must not lose its trials."""

    def __init__(self, *, crashed: bool = True) -> None:
        self.crashed = crashed

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        crashes = int(trial.system_attrs.get(_CRASHES, 0)) + int(self.crashed)
        if crashes > MAX_RETRIES:
            return
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        study.add_trial(optuna.create_trial(
            state=optuna.trial.TrialState.WAITING, params=trial.params,
            distributions=trial.distributions, user_attrs=trial.user_attrs,
            system_attrs={"failed_trial": trial.number, **trial.system_attrs,
                          "retry_history": history, _CRASHES: crashes}))


def search_identity(spec: StudySpec) -> tuple[str, str]:
    """(Optuna study name, fingerprint). Stopping rules and reporting settings are left out,
    so that running the same search with a larger --n-trials continues it."""
    assert spec.search is not None
    key = dataclasses.replace(spec, search=dataclasses.replace(
        spec.search, n_trials=None, timeout=None, budget=None, budget_seconds=None,
        budget_tflop=None, top=10, reference=None))
    fingerprint = key.fingerprint()
    return study_name(spec.name, fingerprint), fingerprint


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage on the store's database, with heartbeats and retries of a lost
    trial (`RetryLostTrial`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return rdb_storage(url, heartbeat_interval=HEARTBEAT_INTERVAL,
                               grace_period=GRACE_PERIOD,
                               heartbeat_stale_trial_callback=RetryLostTrial())
        except Exception as error:
            # Optuna makes its tables here: a full disk or a server gone is said in one line
            trouble = database_trouble(error, url)
            if trouble is None:
                raise
            raise trouble from None


def stop_stray_heartbeats(storage: optuna.storages.RDBStorage) -> None:
    """Stop the Optuna heartbeat threads of `storage` that outlived their trial. A stop that
    lands while Optuna starts one (`HeartbeatThread.__enter__`, once the thread runs) leaves
    it beating for good: a thread the interpreter waits for at exit (not a daemon), so the
    command hung after its stop line, and its trial looked alive."""
    from optuna.storages._heartbeat import HeartbeatThread  # where Optuna keeps it

    for thread in threading.enumerate():
        args = getattr(thread, "_args", ())  # (trial id, storage, stop event) while it runs
        if getattr(thread, "_target", None) is HeartbeatThread._record_heartbeat \
                and len(args) == 3 \
                and (args[1] is storage or getattr(args[1], "_backend", None) is storage):
            args[2].set()  # (a study wraps the storage in its cache: `_backend` is ours)
