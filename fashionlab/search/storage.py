"""Where a search lives: its Optuna study (named by `search_identity`), Optuna's storage on the
experiment store's database, and the lock by which the workers sharing it take turns to start
trials (`ClaimLock`, at home in `fashionlab.jobs`, which a study's processes share too).

A lost trial (its worker killed, its machine gone) is failed once its heartbeat has been
silent for GRACE_PERIOD seconds and retried with the same parameters (`RetryLostTrial`); a
worker on the same machine notices a dead process at once (fashionlab.search).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import optuna

from fashionlab.config import StudySpec
from fashionlab.jobs import ClaimLock
from fashionlab.store import connect_args, database_url

__all__ = ["GRACE_PERIOD", "HEARTBEAT_INTERVAL", "MAX_RETRIES", "ClaimLock", "RetryLostTrial",
           "delete_study", "open_storage", "retried_numbers", "retried_trial", "search_identity",
           "study_name"]

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


def retried_trial(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the first trial of the retry chain `trial` belongs to (`RetryLostTrial`
    names it), or None for a trial that is no retry."""
    failed = trial.system_attrs.get("failed_trial")
    return None if failed is None else int(failed)


def retried_numbers(trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
    """The numbers of the failed trials that a retry runs again (each retry lists its chain's
    in `retry_history`)."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", [])}


def study_name(search: str, fingerprint: str) -> str:
    """The Optuna study of a search: named after the search and the fingerprint of what it
    searches, the same as its store run's (`RunRecord.name`, `RunRecord.fingerprint`)."""
    return f"{search}-{fingerprint}"


def search_identity(spec: StudySpec) -> tuple[str, str]:
    """(Optuna study name, fingerprint). Stopping rules and reporting settings are left out,
    so that running the same search with a larger --n-trials continues it."""
    assert spec.search is not None
    key = dataclasses.replace(spec, search=dataclasses.replace(
        spec.search, n_trials=None, timeout=None, budget=None, budget_seconds=None,
        budget_tflop=None, top=10, reference=None))
    fingerprint = key.fingerprint()
    return study_name(spec.name, fingerprint), fingerprint


def delete_study(url: str, name: str) -> bool:
    """Delete an Optuna study and its trials from the store's database; False when there was
    none of that name."""
    storage = open_storage(url)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        return False
    finally:
        storage.engine.dispose()
    return True


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage on the store's database, with heartbeats and retries of a lost
    trial (`RetryLostTrial`)."""
    url = database_url(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True, "connect_args": connect_args(url)}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna reads the URL as a template ("{SCHEMA_VERSION}"): a brace of a folder's name
        # is doubled to stay itself.
        return optuna.storages.RDBStorage(
            url.replace("{", "{{").replace("}", "}}"), engine_kwargs=kwargs,
            heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
            heartbeat_stale_trial_callback=RetryLostTrial())
