"""What early stopping saved and what it cost: early-stopped candidates against full training.

Every model of a fold draws the same seed whatever its training settings, so an early-stopped
fold trains exactly the first epochs of the same fold trained for all its epochs. Its "twin" is
that full-length model: the same candidate (model and training settings but early stopping),
folds, data and seed, found in this study or in a finished run of the store. Comparing the
early-stopped result with the twin's last epoch, fold by fold, is a paired comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import TypeAdapter, ValidationError

from fashionlab.config import Candidate, StudySpec
from fashionlab.stats import PairedTest, corrected_resampled_ttest
from fashionlab.store import Store


@dataclass(frozen=True, eq=False)  # an array: == compares identity
class TwinComparison:
    candidate: str
    twin_run: str  # the run holding the full-length twin (may be this run)
    twin_epochs: int  # epochs the twin trained per fold
    accuracy_difference: np.ndarray  # (n_folds,) early-stopped minus full-length val accuracy
    test: PairedTest | None  # corrected resampled t-test of the differences (None: < 2 folds)
    epochs_saved: float  # fraction of the twin's fold-epochs early stopping did not train


def _without_early_stopping(candidate: Candidate) -> tuple[object, object]:
    return candidate.model, dataclasses.replace(candidate.train, early_stopping=None)


def _same_protocol(a: StudySpec, b: StudySpec) -> bool:
    return (a.cv, a.data, a.seed) == (b.cv, b.data, b.seed)


def find_twins(
    store: Store,
    spec: StudySpec,
    run_id: str,
    early: Sequence[tuple[Candidate, np.ndarray, int]],
    *,
    fold_names: Sequence[str],
    n_train: int,
    n_val: int,
) -> dict[str, TwinComparison]:
    """For each (early-stopped candidate, its per-fold val accuracies, fold-epochs trained),
    the comparison with its full-length twin, when one exists in this run or the store."""
    wanted = {c.name: (_without_early_stopping(c), accuracy, trained)
              for c, accuracy, trained in early if c.train.early_stopping is not None}
    if not wanted:
        return {}
    adapter = TypeAdapter(StudySpec)
    found: dict[str, TwinComparison] = {}
    # This run first, then finished runs newest first.
    runs = [store.run(run_id)] + [r for r in store.runs(kind="study") if r.id != run_id
                                   and r.status == "finished"]
    for run in runs:
        try:
            other = adapter.validate_python(run.config)
        except ValidationError:
            continue  # a run written by another version of the config
        if not _same_protocol(spec, other):
            continue
        histories = None
        for candidate in other.candidates:
            if candidate.train.early_stopping is not None:
                continue
            for name, (signature, accuracy, trained) in wanted.items():
                if name in found or _without_early_stopping(candidate) != signature:
                    continue
                histories = histories or store.histories(run.id)
                full = [histories.get(f"{candidate.name}/{fold}", []) for fold in fold_names]
                if len(full) != len(accuracy) or any(
                        len(h) < candidate.train.epochs for h in full):
                    continue  # an unfinished twin
                last = np.array([h[candidate.train.epochs - 1].val_accuracy for h in full])
                difference = np.asarray(accuracy) - last
                paired = int(np.sum(np.isfinite(difference)))  # a diverged fold: no pair
                test = corrected_resampled_ttest(accuracy, last, n_train=n_train,
                                                 n_test=n_val) if paired >= 2 else None
                planned = candidate.train.epochs * len(full)
                found[name] = TwinComparison(name, run.id, candidate.train.epochs, difference,
                                             test, 1.0 - trained / planned)
    return found
