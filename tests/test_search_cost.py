"""What a search spends (fold-epochs, seconds, TFLOP), its budgets, and the pruner that
compares trials at equal compute."""

from __future__ import annotations

import sys

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from fashionlab.config import study_from_dict
from fashionlab.errors import ConfigError
from fashionlab.search import EqualComputePruner, make_pruner, spent
from fashionlab.search.cost import best_within, spent_budget
from fashionlab.tables import SPENT_KEYS
from fashionlab.trials import Spent, spent_summary, trial_counts

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BASE = """
name = "x"
[[candidates]]
name = "a"
layers = [{ units = 64 }]
[search]
"""

CURVE = [0.5, 0.6, 0.7, 0.8, 0.85, 0.86]  # best so far, per epoch


def _search(extra: str):
    space = "\n[search.space]\nlearning_rate = { low = 0.001, high = 0.01 }\n"
    spec = study_from_dict(tomllib.loads(BASE + extra + space), source="my.toml")
    assert spec.search is not None
    return spec.search


def _done(curve: list[float], tflop_per_epoch: float) -> optuna.trial.FrozenTrial:
    """A completed trial that reported `curve`, one epoch costing `tflop_per_epoch`."""
    return create_trial(
        state=TrialState.COMPLETE, value=curve[-1],
        intermediate_values={step: v for step, v in enumerate(curve, start=1)},
        user_attrs={"step_tflop": [tflop_per_epoch * e for e in range(1, len(curve) + 1)]})


@pytest.mark.parametrize(("extra", "message"), [
    ("budget_seconds = 0", "my.toml: search.budget_seconds: input should be greater than 0"),
    ("budget_tflop = -1.5", "my.toml: search.budget_tflop: input should be greater than 0"),
    ('budget_tflop = "5"', 'my.toml: search.budget_tflop: input should be a valid number'),
    ("budget_seconds = inf", "my.toml: search.budget_seconds: input should be a finite number"),
    ('pruner = "cost"', 'my.toml: search.pruner: input should be "median", "median-compute"'),
])
def test_a_bad_budget_is_one_line_naming_the_field(extra: str, message: str):
    with pytest.raises(ConfigError) as error:
        _search(extra)
    assert str(error.value).startswith(message), str(error.value)
    assert "\n" not in str(error.value)


def test_spent_sums_the_trials_that_ran_and_names_the_budget_spent():
    def trial(state: TrialState, epochs: int, seconds: float, tflop: float, number: int,
              retry_of: list[int] | None = None):
        made = create_trial(state=state, value=0.5 if state == TrialState.COMPLETE else None,
                            user_attrs={"fold_epochs": epochs, "train_seconds": seconds,
                                        "tflop": tflop},
                            system_attrs={} if retry_of is None else
                            {"failed_trial": retry_of[0], "retry_history": retry_of})
        made.number = number
        return made

    trials = [trial(TrialState.COMPLETE, 10, 20.0, 1.5, 0),
              trial(TrialState.PRUNED, 4, 5.0, 0.5, 1)]
    assert spent(trials) == Spent(fold_epochs=14, seconds=25.0, tflop=2.0)
    # Trial 2 stopped (failed), its retry 3 waiting to run with its counts: counted once, at
    # once (not only once the retry runs), as it is while the retry runs and continues them.
    stopped = [trial(TrialState.FAIL, 7, 9.0, 9.0, 2),
               trial(TrialState.WAITING, 7, 9.0, 9.0, 3, [2])]
    assert spent(trials + stopped) == Spent(21, 34.0, 11.0)
    assert trial_counts(trials + stopped) == {"complete": 1, "pruned": 1, "fail": 0,
                                              "retried": 0, "waiting": 1, "running": 0}
    stopped[1] = trial(TrialState.RUNNING, 8, 10.0, 10.0, 3, [2])
    assert spent(trials + stopped) == Spent(22, 35.0, 12.0)
    assert trial_counts(trials + stopped)["retried"] == 1  # run again: not waiting, not failed
    assert trial_counts(trials + stopped)["running"] == 1
    # Failed for good (no retry: it crashed its process too often): what it trained counts.
    assert spent([*trials, trial(TrialState.FAIL, 3, 1.0, 1.0, 2)]) == Spent(17, 26.0, 3.0)
    assert trial_counts([*trials, trial(TrialState.FAIL, 3, 1.0, 1.0, 2)])["fail"] == 1
    assert spent([*trials, trial(TrialState.WAITING, 0, 0.0, 0.0, 2)]) == spent(trials)  # base
    search = _search("budget = 100\nbudget_seconds = 25\nbudget_tflop = 3")
    assert spent_budget(search, spent(trials)) == "budget_seconds"
    assert spent_budget(search, Spent(14, 24.9, 2.9)) is None
    assert spent_budget(search, Spent(100, 0.0, 0.0)) == "budget"
    assert spent_budget(search, Spent(0, 0.0, 3.0)) == "budget_tflop"
    assert spent_budget(_search("n_trials = 3"), Spent(10**6, 1e9, 1e9)) is None
    # What a summary stores is what `runs show` and the tables read back.
    assert tuple(spent_summary(search, spent(trials))) == SPENT_KEYS


def test_best_within_reads_a_trial_at_a_compute_not_an_epoch():
    cheap = _done(CURVE, 1.0)
    assert best_within(cheap, 3.0, maximize=True) == 0.7  # 3 epochs in 3 TFLOP
    assert best_within(cheap, 3.5, maximize=True) == 0.7  # not 4: that epoch ends at 4
    assert best_within(cheap, 100.0, maximize=True) == 0.86  # done with less: its final best
    assert best_within(cheap, 0.5, maximize=True) is None  # its first epoch cost more


def test_an_expensive_trial_is_pruned_where_a_cheap_one_with_the_same_curve_is_not():
    """The rule: at its epoch e a trial has trained c TFLOP; it is pruned when its best report
    is worse than the median over the completed trials of the best each reached within c."""
    pruner = EqualComputePruner(n_startup_trials=3, n_warmup_steps=2)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(3):
        study.add_trial(_done(CURVE, 1.0))  # 1 TFLOP per epoch

    def at_epoch_3(tflop_per_epoch: float) -> bool:
        trial = study.ask()
        for step in (1, 2, 3):
            trial.report(CURVE[step - 1], step)
        trial.set_user_attr("step_tflop", [tflop_per_epoch * e for e in (1, 2, 3)])
        verdict = trial.should_prune()
        study.tell(trial, state=TrialState.PRUNED)
        return verdict

    # Cheap: 3 TFLOP, the others reached 0.7 with that much: as good, not pruned.
    assert not at_epoch_3(1.0)
    # Twice as expensive per epoch: 6 TFLOP, for which the others reached 0.86.
    assert at_epoch_3(2.0)
    # The median pruner compares epochs, and would let the expensive one go on.
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    assert not at_epoch_3(2.0)


def test_the_equal_compute_pruner_waits_for_startup_trials_and_warmup():
    study = optuna.create_study(direction="maximize",
                                pruner=EqualComputePruner(n_startup_trials=2, n_warmup_steps=3))
    study.add_trial(_done(CURVE, 1.0))
    trial = study.ask()
    trial.report(0.1, 1)
    trial.set_user_attr("step_tflop", [10.0])
    assert not trial.should_prune()  # one completed trial of the two it waits for
    study.add_trial(_done(CURVE, 1.0))
    assert not trial.should_prune()  # still in its warmup (epoch 1 of 3)
    trial.report(0.1, 2)
    trial.report(0.1, 3)
    trial.set_user_attr("step_tflop", [10.0, 20.0, 30.0])
    assert trial.should_prune()


def test_median_compute_is_chosen_by_the_study_file():
    search = _search('pruner = "median-compute"\nstartup_trials = 3\nwarmup = 2')
    pruner = make_pruner(search)
    assert isinstance(pruner, EqualComputePruner)
    assert (pruner.n_startup_trials, pruner.n_warmup_steps) == (3, 3)  # steps are 1-based
