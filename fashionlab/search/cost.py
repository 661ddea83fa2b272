"""A search's budgets, and the pruning rule that weighs what a trial costs. What trials spend
(fold-epochs, seconds of training, TFLOP) is counted in `fashionlab.trials`.

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

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from fashionlab.config import SearchSpec
from fashionlab.trials import STEP_TFLOP, Spent

__all__ = ["EqualComputePruner", "best_within", "spent_budget"]


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
