"""A search's trials as the store's database holds them (Optuna's tables, next to the store's):
their study's name and storage, retry chains, how they ended, and what they spent.

Below the search itself, so that what reads or deletes a stored search (`fashionlab.runs`) needs
no training code. A trial's cost is counted three ways, each stored with the trial after every
epoch and summed over the trials that ran (so the sums hold across workers and restarts):
finished, running, and failed for good; a failed trial that is retried is counted through its
retry, which starts with its counts (waiting to run, it is counted already) and continues them
from its checkpoints (a retry on another machine, which has not got them, trains and counts
from its first epoch: what the failed trial trained is then not counted):

    fold_epochs  epochs of the trial's fold models (one epoch of one fold's model is one)
    seconds      wall seconds of training: the epochs of each of its stacks (the folds of a
                 stack train together, so a stack's epoch counts once), all workers summed
    tflop        estimated training arithmetic in 1e12 FLOP: per fold-epoch, forward and
                 backward over the fold's training images (`runner.training_flops`, the
                 parallel planner's estimate: 3 x `models.forward_flops` x images); the
                 validation passes (~1/12 more) and the final retrain are left out
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from fashionlab.config import SearchSpec
from fashionlab.store import RunRecord, connect_args, database_url

__all__ = ["COUNTED", "FOLD_EPOCHS", "SECONDS", "STEP_TFLOP", "TFLOP", "Spent", "delete_study",
           "failed_for_good", "fold_epochs", "rdb_storage", "retried_numbers", "retried_trial",
           "spent", "spent_summary", "study_name", "trial_counts", "trial_history", "trial_row",
           "trials_so_far"]

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

# The user attributes a trial keeps its cost in (set after every epoch).
FOLD_EPOCHS, SECONDS, TFLOP, STEP_TFLOP = "fold_epochs", "train_seconds", "tflop", "step_tflop"


def study_name(search: str, fingerprint: str) -> str:
    """The Optuna study of a search: named after the search and the fingerprint of what it
    searches, the same as its store run's (`RunRecord.name`, `RunRecord.fingerprint`)."""
    return f"{search}-{fingerprint}"


def rdb_storage(url: str, **options: Any) -> optuna.storages.RDBStorage:
    """Optuna's storage on the store's database at `url`; `options` go to RDBStorage (a
    search's heartbeat and retries: `search.storage.open_storage`)."""
    url = database_url(url)
    engine: dict[str, Any] = {"pool_pre_ping": True, "connect_args": connect_args(url)}
    if url.startswith("sqlite"):
        engine = {"connect_args": {"timeout": 60}}
    # Optuna reads the URL as a template ("{SCHEMA_VERSION}"): a brace of a folder's name is
    # doubled to stay itself.
    return optuna.storages.RDBStorage(url.replace("{", "{{").replace("}", "}}"),
                                      engine_kwargs=engine, **options)


def delete_study(url: str, name: str) -> bool:
    """Delete an Optuna study and its trials from the store's database; False when there was
    none of that name."""
    storage = rdb_storage(url)
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        return False
    finally:
        storage.engine.dispose()
    return True


def retried_trial(trial: FrozenTrial) -> int | None:
    """The number of the first trial of the retry chain `trial` belongs to (a retry names it),
    or None for a trial that is no retry."""
    failed = trial.system_attrs.get("failed_trial")
    return None if failed is None else int(failed)


def retried_numbers(trials: Sequence[FrozenTrial]) -> set[int]:
    """The numbers of the failed trials that a retry runs again (each retry lists its chain's
    in `retry_history`)."""
    return {number for t in trials for number in t.system_attrs.get("retry_history", [])}


def failed_for_good(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The failed trials that no retry runs again (out of retries, or failed by their own
    error)."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.state == TrialState.FAIL and t.number not in retried]


def trial_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials by how they ended: complete, pruned, failed for good ("fail"), "retried":
    failed (stopped, or lost with their process) and run again under a new number, and
    "waiting": failed, and their retry not started yet; and "running"."""
    retries = [t for t in trials if retried_trial(t) is not None]
    return {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "fail": len(failed_for_good(trials)),
            "retried": sum(t.state != TrialState.WAITING for t in retries),
            "waiting": sum(t.state == TrialState.WAITING for t in retries),
            "running": sum(t.state == TrialState.RUNNING for t in trials)}


def trial_row(trial: FrozenTrial) -> dict[str, Any]:
    """A trial as a search's summary (and a report of one not finished) lists it."""
    retry_of = trial.system_attrs.get("failed_trial")
    return {"number": trial.number, "state": trial.state.name.lower(), "value": trial.value,
            "params": trial.params, "models": trial.user_attrs.get("models"),
            "fold_epochs": trial.user_attrs.get("fold_epochs"),
            "train_seconds": trial.user_attrs.get("train_seconds"),
            "tflop": trial.user_attrs.get("tflop"),
            "stopped": trial.user_attrs.get("stopped"), "retry_of": retry_of,
            "seconds": trial.duration.total_seconds() if trial.duration else None}


def trial_history(trials: Sequence[FrozenTrial]) -> list[float | None]:
    """Each trial's value, None where it did not complete: what the history plot draws."""
    return [t.value if t.state == TrialState.COMPLETE else None for t in trials]


@dataclass(frozen=True)
class Spent:
    """What trials have spent, summed."""

    fold_epochs: int
    seconds: float  # wall seconds of training
    tflop: float  # estimated training arithmetic, 1e12 FLOP


def spent(trials: Sequence[FrozenTrial]) -> Spent:
    """The cost of the trials that ran (see the module's docstring): each retry chain counted
    once, by its newest trial."""
    counted = [t for t in trials if t.state in COUNTED
               or (t.state == TrialState.WAITING and retried_trial(t) is not None)]
    counted += failed_for_good(trials)
    return Spent(sum(int(t.user_attrs.get(FOLD_EPOCHS, 0)) for t in counted),
                 sum(float(t.user_attrs.get(SECONDS, 0.0)) for t in counted),
                 sum(float(t.user_attrs.get(TFLOP, 0.0)) for t in counted))


def fold_epochs(trials: Sequence[FrozenTrial]) -> int:
    """Fold-epochs trained by the trials that ran (`spent`)."""
    return spent(trials).fold_epochs


def spent_summary(search: SearchSpec | Mapping[str, Any], used: Spent) -> dict[str, Any]:
    """What was spent next to each budget (of the search's spec, or its stored config's
    `search` table), as a search's summary stores it (and `tables.spent_line` writes it)."""
    def limit(name: str) -> Any:
        return search.get(name) if isinstance(search, Mapping) else getattr(search, name)

    return {"fold_epochs": used.fold_epochs, "budget": limit("budget"),
            "train_seconds": used.seconds, "budget_seconds": limit("budget_seconds"),
            "tflop": used.tflop, "budget_tflop": limit("budget_tflop")}


def trials_so_far(url: str, run: RunRecord, *, rows: bool = False) -> dict[str, Any] | None:
    """What a search run's trials have done and spent so far, read from its Optuna study in
    the database at `url` (the counts and spent keys of its summary, which it has once it
    finished; with `rows`, its "trials", "history" and "direction" too, which a report
    draws); None where that study is not there (deleted) or cannot be read (a database
    Optuna refuses: its schema of another Optuna version, a read-only copy it would write to),
    so that what shows it stands without it. A trial still "running" in a run that no process
    holds (interrupted) is counted as "lost": it is run again when the search goes on."""
    try:
        storage = rdb_storage(url)
    except (SQLAlchemyError, RuntimeError, OSError):  # RuntimeError: Optuna's schema check
        return None
    try:
        study = optuna.load_study(study_name=study_name(run.name, run.fingerprint),
                                  storage=storage)
        trials = study.get_trials(deepcopy=False)
    except (KeyError, SQLAlchemyError, RuntimeError, OSError):  # KeyError: no such study
        return None
    finally:
        storage.engine.dispose()
    counts = trial_counts(trials)
    if run.state != "running" and counts["running"]:  # no process holds the run: they died
        counts["lost"], counts["running"] = counts["running"], 0
    so_far = {"counts": counts, **spent_summary(run.config.get("search") or {}, spent(trials))}
    if rows:
        so_far.update(
            trials=[trial_row(t) for t in trials],
            history=trial_history(trials),
            direction=study.direction.name.lower())
    return so_far
