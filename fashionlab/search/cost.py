"""What a search spends, and the pruning rule that weighs what a trial costs.

A trial's cost is counted three ways, each stored with the trial after every epoch and summed
over the trials that ran (so the sums hold across workers and restarts): finished, running, and
failed for good; a failed trial that is retried is counted through its retry, which starts with
its counts (waiting to run, it is counted already) and continues them from its checkpoints
(a retry on another machine, which has not got them, trains and counts from its first epoch:
what the failed trial trained is then not counted):

    fold_epochs  epochs of the trial's fold models (one epoch of one fold's model is one)
    seconds      wall seconds of training: the epochs of each of its stacks (the folds of a
                 stack train together, so a stack's epoch counts once), all workers summed
    tflop        estimated training arithmetic in 1e12 FLOP: per fold-epoch, forward and
                 backward over the fold's training images (`runner.training_flops`, the
                 parallel planner's estimate: 3 x `models.forward_flops` x images); the
                 validation passes (~1/12 more) and the final retrain are left out

`[search] budget` (fold-epochs), `budget_seconds` and `budget_tflop` bound them: no trial starts
once any one is spent (the trials running then finish).

Pruning at equal compute (`pruner = "median-compute"`): the median pruner compares trials at
equal epochs, so a trial that costs ten times more per epoch is judged as if it cost the same.
Here each trial reports, after each epoch, the mean over folds of each fold's best score so
far, with the TFLOP it has trained up to that epoch. A trial that has trained c TFLOP is pruned
when its best report is worse than the median, over the completed trials, of the best each
reached within c TFLOP (a trial that completed with less counts with its final report; one
whose first epoch cost more than c is left out). No trial is pruned before `startup_trials`
trials have completed, or before it has trained `warmup` epochs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from fashionlab.config import SearchSpec
from fashionlab.search.storage import open_storage, retried_numbers, retried_trial, study_name
from fashionlab.store import RunRecord

__all__ = ["COUNTED", "EqualComputePruner", "Spent", "best_within", "fold_epochs",
           "spent", "spent_budget", "spent_summary", "trial_counts", "trials_so_far"]

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)

# The user attributes a trial keeps its cost in (set after every epoch).
FOLD_EPOCHS, SECONDS, TFLOP, STEP_TFLOP = "fold_epochs", "train_seconds", "tflop", "step_tflop"


@dataclass(frozen=True)
class Spent:
    """What trials have spent, summed."""

    fold_epochs: int
    seconds: float  # wall seconds of training
    tflop: float  # estimated training arithmetic, 1e12 FLOP


def spent(trials: Sequence[FrozenTrial]) -> Spent:
    """The cost of the trials that ran (see the module's docstring): each retry chain counted
    once, by its newest trial."""
    retried = retried_numbers(trials)
    counted = [t for t in trials if t.state in COUNTED
               or (t.state == TrialState.WAITING and retried_trial(t) is not None)
               or (t.state == TrialState.FAIL and t.number not in retried)]
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


def trial_counts(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """Trials by how they ended: complete, pruned, failed for good ("fail"), and "retried":
    failed (stopped, or lost with their process) and run again under a new number."""
    retried = retried_numbers(trials)
    return {"complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "fail": sum(t.state == TrialState.FAIL and t.number not in retried for t in trials),
            "retried": len(retried)}


def trials_so_far(url: str, run: RunRecord) -> dict[str, Any] | None:
    """What a search run's trials have done and spent so far, read from its Optuna study in
    the database at `url` (the counts and spent keys of its summary, which it has once it
    finished); None where that study cannot be read (deleted, or another database)."""
    storage = open_storage(url)
    try:
        trials = optuna.load_study(study_name=study_name(run.name, run.fingerprint),
                                   storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study
        return None
    finally:
        storage.engine.dispose()
    return {"counts": trial_counts(trials),
            **spent_summary(run.config.get("search") or {}, spent(trials))}


def spent_budget(search: SearchSpec, used: Spent) -> str | None:
    """The name of the first of the search's budgets that `used` has spent, else None."""
    for name, limit, value in (("budget", search.budget, used.fold_epochs),
                               ("budget_seconds", search.budget_seconds, used.seconds),
                               ("budget_tflop", search.budget_tflop, used.tflop)):
        if limit is not None and value >= limit:
            return name
    return None


def best_within(trial: FrozenTrial, tflop: float, *, maximize: bool) -> float | None:
    """The best value `trial` reported within `tflop` of training (its reports carry their
    cumulative TFLOP in the user attribute `step_tflop`, one per step, steps 1, 2, ...);
    None when even its first report cost more, or it has none."""
    costs = trial.user_attrs.get(STEP_TFLOP) or []
    # Equal costs summed in another order may differ in the last bits: a tolerance of 1e-9.
    values = [v for step, v in trial.intermediate_values.items()
              if 1 <= step <= len(costs) and costs[step - 1] <= tflop * (1 + 1e-9)
              and math.isfinite(v)]
    if not values:
        return None
    return max(values) if maximize else min(values)


class EqualComputePruner(optuna.pruners.BasePruner):
    """The median rule at equal training compute instead of equal epochs (see the module's
    docstring). Steps are epochs (1-based); the trial's user attribute `step_tflop` holds the
    TFLOP trained up to each step."""

    def __init__(self, *, n_startup_trials: int = 5, n_warmup_steps: int = 0) -> None:
        self.n_startup_trials = n_startup_trials
        self.n_warmup_steps = n_warmup_steps

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        step = trial.last_step
        if not completed or len(completed) < self.n_startup_trials or step is None \
                or step < self.n_warmup_steps:
            return False
        costs = trial.user_attrs.get(STEP_TFLOP) or []
        if len(costs) < step:
            return False  # no cost known: no judgement
        maximize = study.direction == StudyDirection.MAXIMIZE
        mine = best_within(trial, costs[step - 1], maximize=maximize)
        if mine is None:
            return False
        theirs = [v for t in completed
                  if (v := best_within(t, costs[step - 1], maximize=maximize)) is not None]
        if not theirs:
            return False
        median = float(np.median(theirs))
        return mine < median if maximize else mine > median
