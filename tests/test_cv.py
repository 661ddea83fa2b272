"""Folds, the overfitting warning and early stopping, on hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fashionlab.config import CVSpec, EarlyStopping
from fashionlab.cv import EarlyStopper, make_folds, overfitting_warning
from fashionlab.train import EpochMetrics

# ---- the warning rule --------------------------------------------------------------------


def test_warning_fires_at_the_first_epoch_not_beaten_by_two_percent():
    # Falls fast, then flattens: epoch 4 (0.50) is never beaten by 2% (< 0.49) afterwards.
    curve = [1.0, 0.7, 0.55, 0.50, 0.495, 0.492, 0.50, 0.51, 0.52, 0.53]
    warning = overfitting_warning(curve, patience=3, min_delta=0.02)
    assert warning.epoch == 4 and warning.fired and warning.chosen_epoch == 4
    assert warning.best_epoch == 6


def test_warning_needs_the_full_patience_window_after_the_epoch():
    curve = [1.0, 0.9, 0.8, 0.7, 0.6, 0.6, 0.6]
    # epoch 5 (0.6) has only 2 epochs after it: with patience 3 it cannot fire.
    assert overfitting_warning(curve, patience=3).epoch is None
    assert overfitting_warning(curve, patience=2).epoch == 5


def test_curve_shorter_than_patience_gives_no_warning_and_uses_the_lowest_loss():
    warning = overfitting_warning([0.9, 0.5, 0.7], patience=10)
    assert not warning.fired and warning.epoch is None
    assert warning.chosen_epoch == 2


def test_flat_curve_warns_at_the_first_epoch():
    assert overfitting_warning([0.5] * 15, patience=10).epoch == 1


def test_threshold_is_relative():
    # 1.0 -> 0.981 is a 1.9% drop: not enough. 1.0 -> 0.979 is: the warning moves on.
    assert overfitting_warning([1.0, 0.981, 0.981], patience=2).epoch == 1
    assert overfitting_warning([1.0, 0.979, 0.979, 0.979], patience=2).epoch == 2


def test_nan_epochs_never_warn_and_never_count_as_improvement():
    curve = [math.nan, 1.0, math.nan, 0.999, 0.999]
    warning = overfitting_warning(curve, patience=2)
    assert warning.epoch == 2  # epoch 1 is NaN: skipped; after epoch 2 nothing beats 0.98
    assert warning.best_epoch == 4
    all_nan = overfitting_warning([math.nan] * 5, patience=2)
    assert all_nan.epoch is None and all_nan.chosen_epoch is None


def test_patience_and_delta_are_parameters():
    curve = [1.0, 0.95, 0.93, 0.92, 0.915, 0.91]
    assert overfitting_warning(curve, patience=2, min_delta=0.02).epoch == 3
    assert overfitting_warning(curve, patience=2, min_delta=0.001).epoch is None


# ---- folds -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["contiguous", "shuffled", "stratified"])
@pytest.mark.parametrize("n", [50, 53])
def test_folds_are_disjoint_and_cover_every_sample(strategy: str, n: int):
    labels = np.arange(n) % 4
    folds = make_folds(n, CVSpec(n_splits=5, strategy=strategy), seed=1, labels=labels)
    assert len(folds) == 5
    validated = np.concatenate([f.val_index for f in folds])
    assert sorted(validated.tolist()) == list(range(n))  # each sample validated exactly once
    for fold in folds:
        assert not set(fold.train_index) & set(fold.val_index)
        assert len(fold.train_index) + len(fold.val_index) == n
    sizes = [len(f.val_index) for f in folds]
    assert max(sizes) - min(sizes) <= 1


def test_contiguous_folds_are_the_seed_protocol():
    folds = make_folds(60000, CVSpec(n_splits=5), seed=0)
    for i, fold in enumerate(folds):
        assert fold.val_index[0] == i * 12000 and fold.val_index[-1] == (i + 1) * 12000 - 1
        assert len(fold.val_index) == 12000 and len(fold.train_index) == 48000


def test_stratified_folds_keep_class_proportions():
    labels = np.repeat(np.arange(10), [100, 50, 30, 30, 30, 30, 30, 30, 30, 40])
    folds = make_folds(len(labels), CVSpec(n_splits=5, strategy="stratified"), seed=0,
                       labels=labels)
    for fold in folds:
        counts = np.bincount(labels[fold.val_index], minlength=10)
        assert counts[0] == 20 and counts[1] == 10


def test_shuffled_folds_are_seeded_and_repeats_differ():
    spec = CVSpec(n_splits=4, strategy="shuffled", repeats=2)
    a, b = make_folds(40, spec, seed=7), make_folds(40, spec, seed=7)
    assert all(np.array_equal(x.val_index, y.val_index) for x, y in zip(a, b))
    assert len(a) == 8 and {f.repeat for f in a} == {0, 1}
    assert not np.array_equal(a[0].val_index, a[4].val_index)
    assert not np.array_equal(a[0].val_index, make_folds(40, spec, seed=8)[0].val_index)


# ---- early stopping ----------------------------------------------------------------------


def _epoch(val_loss: float, val_accuracy: float = 0.5) -> EpochMetrics:
    return EpochMetrics(0.0, 0.0, val_loss, val_accuracy, 0.0)


def test_early_stopper_stops_after_patience_epochs_without_improvement():
    stopper = EarlyStopper(EarlyStopping(patience=3))
    curve = [1.0, 0.8, 0.7, 0.75, 0.71, 0.72, 0.6]
    stops = [stopper.update(i + 1, _epoch(v)) for i, v in enumerate(curve)]
    assert stops == [False, False, False, False, False, True, False]
    assert stopper.best_epoch == 7  # it would have recovered; the caller stops at epoch 6


def test_early_stopper_relative_min_delta_is_the_two_percent_rule():
    stopper = EarlyStopper(EarlyStopping(patience=2, min_delta=0.02, relative=True))
    # 0.985 and 0.981 are within 2% of 1.0: no improvement; two such epochs stop training.
    results = [stopper.update(i + 1, _epoch(v)) for i, v in enumerate([1.0, 0.985, 0.981])]
    assert results == [False, False, True] and stopper.best_epoch == 1
    stopper = EarlyStopper(EarlyStopping(patience=2, min_delta=0.02, relative=True))
    results = [stopper.update(i + 1, _epoch(v)) for i, v in enumerate([1.0, 0.985, 0.979])]
    assert results == [False, False, False] and stopper.best_epoch == 3


def test_early_stopper_on_accuracy_maximises():
    stopper = EarlyStopper(EarlyStopping(monitor="val_accuracy", patience=2))
    for epoch, accuracy in enumerate([0.5, 0.7, 0.69, 0.71], start=1):
        stopper.update(epoch, _epoch(1.0, accuracy))
    assert stopper.best_epoch == 4 and stopper.best_value == 0.71


def test_early_stopper_ignores_nan():
    stopper = EarlyStopper(EarlyStopping(patience=2))
    stopper.update(1, _epoch(0.5))
    assert not stopper.update(2, _epoch(math.nan))
    assert stopper.update(3, _epoch(math.nan))
    assert stopper.best_epoch == 1
