"""Cross-validation: folds, the overfitting warning, early stopping, and training a stack of
members to completion with checkpoints.

The warning is the seed study's rule, computed on the mean val_loss curve across folds: the
first epoch i such that none of the next `patience` epochs has val_loss below
(1 - min_delta) * val_loss[i]. Early stopping is the same idea applied per model while it
trains, with the best epoch as the model's result. The CV-consensus epoch, one epoch for all
of a candidate's folds, is the warning's, or the last epoch of a learning-rate schedule planned
over the epochs (one-cycle), where the warning does not apply.

A checkpoint is written durably (fsync, rename, fsync of the folder) with a SHA-256 of its
contents, and the previous one is kept beside it (`x.pt`, `x.prev.pt`): a damaged or missing
newest file costs the epochs since the one before, or at worst the stack's training so far,
never the run. Training is deterministic, so the epochs trained again give the same numbers.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fashionlab.checkpoints import (
    DamagedCheckpoint,
    previous_checkpoint,
    read_checkpoint,
    temporary_path,
    write_checkpoint,
)
from fashionlab.config import CVSpec, EarlyStopping, TrainSpec, WarningRule
from fashionlab.errors import ConfigError
from fashionlab.rng import derive_seed
from fashionlab.text import first_line
from fashionlab.train import EpochMetrics, Member, StackTrainer, Tensors

# --------------------------------------------------------------------------------------------
# Folds


@dataclass(frozen=True)
class Fold:
    repeat: int  # 0-based repeat of k-fold (repeated k-fold reshuffles each repeat)
    index: int  # 0-based fold within the repeat
    train_index: np.ndarray  # rows used for training, sorted
    val_index: np.ndarray  # rows used for validation, sorted

    @property
    def name(self) -> str:
        return f"r{self.repeat}f{self.index}" if self.repeat else f"fold-{self.index}"


def make_folds(
    n_samples: int, cv: CVSpec, *, seed: int, labels: np.ndarray | None = None
) -> list[Fold]:
    """Split range(n_samples) into folds; every sample is validated exactly once per repeat.

    contiguous: fold i validates on the i-th block of consecutive samples (the seed study's
    protocol). shuffled: blocks of a seeded permutation. stratified: each class is shuffled and
    dealt across folds in turn, so every fold has the class proportions of the whole.
    """
    if not isinstance(cv, CVSpec):  # make_folds(n, 5): the count belongs in a CVSpec
        raise TypeError(f"cv: expected a CVSpec (e.g. CVSpec(n_splits=5)), got "
                        f"{type(cv).__name__}")
    k = cv.n_splits
    if n_samples < k:
        raise ConfigError(f"cv.n_splits: {k} folds need at least {k} samples (got {n_samples})")
    folds = []
    for repeat in range(cv.repeats):
        rng = np.random.default_rng(derive_seed(seed, "folds", repeat))
        if cv.strategy == "contiguous":
            blocks = np.array_split(np.arange(n_samples), k)
        elif cv.strategy == "shuffled":
            blocks = np.array_split(rng.permutation(n_samples), k)
        else:
            if labels is None or len(labels) != n_samples:
                raise ValueError("stratified folds need one label per sample")
            assignment = np.empty(n_samples, dtype=np.int64)
            offset = 0
            for label in np.unique(labels):
                members = rng.permutation(np.flatnonzero(labels == label))
                # Continue the round-robin across classes so fold sizes differ by at most one.
                assignment[members] = (np.arange(len(members)) + offset) % k
                offset += len(members)
            blocks = [np.flatnonzero(assignment == i) for i in range(k)]
        for i, block in enumerate(blocks):
            val = np.sort(block)
            mask = np.ones(n_samples, dtype=bool)
            mask[val] = False
            folds.append(Fold(repeat, i, np.flatnonzero(mask), val))
    return folds


# --------------------------------------------------------------------------------------------
# The overfitting warning


@dataclass(frozen=True)
class OverfitWarning:
    epoch: int | None  # 1-based epoch where the warning fires; None when it never does
    best_epoch: int | None  # 1-based epoch of the lowest val_loss (None: all NaN)

    @property
    def fired(self) -> bool:
        return self.epoch is not None

    @property
    def chosen_epoch(self) -> int | None:
        """The epoch a result is read at: the warning epoch, else the lowest val_loss."""
        return self.epoch if self.epoch is not None else self.best_epoch


def overfitting_warning(
    val_loss: Sequence[float], *, patience: int = 10, min_delta: float = 0.02
) -> OverfitWarning:
    """The first epoch i (1-based) such that none of the next `patience` epochs has val_loss
    below (1 - min_delta) * val_loss[i].

    An epoch qualifies only when `patience` epochs follow it (a curve shorter than that gives
    no warning) and its own value is finite; a NaN among the following epochs counts as no
    improvement.
    """
    if not isinstance(patience, int | np.integer) or isinstance(patience, bool) or patience < 1:
        # 0 would warn at the last epoch, which no epoch after it could contradict
        raise ValueError(f"patience: a number of epochs, at least 1, got {patience!r}")
    if not 0.0 <= min_delta < 1.0:
        raise ValueError(f"min_delta: a fraction of the val_loss in [0, 1), got {min_delta!r}")
    values = np.asarray(val_loss, dtype=np.float64)
    finite = np.isfinite(values)
    best = int(np.argmin(np.where(finite, values, np.inf))) + 1 if finite.any() else None
    with np.errstate(invalid="ignore"):
        for i in range(len(values) - patience):
            if not finite[i]:
                continue
            following = values[i + 1 : i + 1 + patience]
            if not np.any(following < (1.0 - min_delta) * values[i]):
                return OverfitWarning(epoch=i + 1, best_epoch=best)
    return OverfitWarning(epoch=None, best_epoch=best)


# --------------------------------------------------------------------------------------------
# Early stopping


@dataclass
class EarlyStopper:
    """Per-model early stopping: improvement, patience, best epoch. Reset by constructing anew."""

    spec: EarlyStopping
    best_value: float = math.nan
    best_epoch: int = 0  # 1-based; 0 before the first epoch
    wait: int = 0  # epochs since the last improvement

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if not math.isfinite(self.best_value):
            return True
        delta = self.spec.min_delta * (abs(self.best_value) if self.spec.relative else 1.0)
        if self.spec.monitor == "val_accuracy":
            return value > self.best_value + delta
        return value < self.best_value - delta

    def update(self, epoch: int, metrics: EpochMetrics) -> bool:
        """Record an epoch; True when training should stop now."""
        value = metrics.get(self.spec.monitor)
        if self.improved(value):
            self.best_value, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return self.wait >= self.spec.patience

    def state_dict(self) -> dict[str, float | int]:
        return {"best_value": self.best_value, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_epoch = float(state["best_value"]), int(state["best_epoch"])
        self.wait = int(state["wait"])


# --------------------------------------------------------------------------------------------
# Training members to completion


Status = Literal["finished", "stopped", "failed"]


@dataclass
class MemberResult:
    key: str
    history: list[EpochMetrics] = field(default_factory=list)
    status: Status | None = None  # None while training
    best_epoch: int | None = None  # early stopping's best epoch; None without early stopping
    message: str | None = None  # why it failed
    weights: dict[str, torch.Tensor] | None = None  # final (or best) weights, when kept

    @property
    def done(self) -> bool:
        return self.status is not None

    @property
    def failed(self) -> bool:
        """It diverged (a loss NaN or infinite): it has no score."""
        return self.status == "failed"


EpochCallback = Callable[[int, dict[str, EpochMetrics], dict[str, MemberResult]], None]


# A stack's whole training state: trainer, results, early stoppers, best weights by key.
_StackState = tuple[StackTrainer, dict[str, MemberResult], dict[str, EarlyStopper],
                    dict[str, dict[str, torch.Tensor]]]


class CheckpointWarning(UserWarning):
    """A checkpoint was damaged or missing; training went back to an earlier state."""


def train_members(
    members: Sequence[Member],
    train: TrainSpec,
    data: Tensors,
    device: torch.device,
    *,
    checkpoint: Path | None = None,
    keep_weights: bool = False,
    on_epoch: EpochCallback | None = None,
    on_damaged: Callable[[str], None] | None = None,
) -> dict[str, MemberResult]:
    """Train a stack of members for `train.epochs` epochs, with early stopping when the spec
    asks for it, and return each member's history and outcome.

    A member whose loss becomes NaN or infinite is stopped with a message; the others go on.
    With `checkpoint`, the state after every epoch is written there atomically and durably,
    and a run that finds one continues from it, ending with exactly the numbers of an
    uninterrupted run. A damaged or missing checkpoint is not fatal: training continues from
    the previous one (or from the start), and `on_damaged(line)` is told in one line (without
    it, a CheckpointWarning is issued). A checkpoint that cannot be written (a full disk)
    raises CheckpointError. `on_epoch(epoch, metrics, results)` is called after each epoch's
    checkpoint (to store rows, show progress or prune); it may raise to abandon the stack.
    After a fallback it may see an epoch again, with the same numbers as the first time.
    """

    def start() -> _StackState:
        stoppers = {m.key: EarlyStopper(train.early_stopping) for m in members} \
            if train.early_stopping else {}
        return (StackTrainer(members, train, data, device),
                {m.key: MemberResult(m.key) for m in members}, stoppers, {})

    trainer, results, stoppers, best_weights = (
        start() if checkpoint is None else _resume(checkpoint, device, start, on_damaged))
    if on_epoch is not None and trainer.epoch:
        on_epoch(trainer.epoch, {}, results)  # let the caller store what it may have missed

    while trainer.keys:
        if trainer.epoch >= train.epochs:
            for key in trainer.keys:
                _finish(results[key], "finished", trainer, stoppers, best_weights, keep_weights)
            trainer.drop(list(trainer.keys))
            break
        metrics = trainer.run_epoch()
        epoch = trainer.epoch
        stop: list[str] = []
        for key, m in metrics.items():
            result = results[key]
            result.history.append(m)
            if not (math.isfinite(m.loss) and math.isfinite(m.accuracy)):
                result.status, result.message = "failed", (
                    f"loss became {m.loss} at epoch {epoch} (diverged: try a lower learning rate)"
                )
                stop.append(key)
                continue
            stopper = stoppers.get(key)
            if stopper is not None:
                should_stop = stopper.update(epoch, m)
                result.best_epoch = stopper.best_epoch or None
                if stopper.best_epoch == epoch and stopper.spec.restore_best:
                    best_weights[key] = trainer.member_state_dict(key)
                if should_stop and epoch < train.epochs:
                    _finish(result, "stopped", trainer, stoppers, best_weights, keep_weights)
                    stop.append(key)
        if epoch >= train.epochs:
            for key in trainer.keys:
                if key not in stop:
                    _finish(results[key], "finished", trainer, stoppers, best_weights,
                            keep_weights)
                    stop.append(key)
        trainer.drop(stop)
        if checkpoint is not None:
            _save(checkpoint, trainer, results, stoppers, best_weights)
        if on_epoch is not None:
            on_epoch(epoch, metrics, results)
    return results


def _resume(
    checkpoint: Path,
    device: torch.device,
    start: Callable[[], _StackState],
    on_damaged: Callable[[str], None] | None,
) -> _StackState:
    """The state of the newest checkpoint generation that verifies and fits the stack, else a
    fresh start; each damaged or missing generation passed over is reported in one line."""
    with contextlib.suppress(OSError):  # a killed process's half-written file
        temporary_path(checkpoint).unlink(missing_ok=True)
    stack = start()
    problems: list[str] = []
    resumed_from: Path | None = None
    for path in (checkpoint, previous_checkpoint(checkpoint)):
        try:
            _restore(read_checkpoint(path, device), *stack)
        except FileNotFoundError:
            if path == checkpoint and previous_checkpoint(checkpoint).exists():
                problems.append(f"checkpoint {path} is missing")
            continue
        except DamagedCheckpoint as damage:
            problems.append(f"checkpoint {path} is damaged ({damage})")
            with contextlib.suppress(OSError):  # else the next save keeps it as the previous
                path.unlink()
            stack = start()  # undo a partial restore
            continue
        resumed_from = path
        break
    outcome = ("training the stack again from its first epoch" if resumed_from is None
               else f"resuming from {resumed_from.name} (epoch {stack[0].epoch})")
    for problem in problems:
        if on_damaged is None:
            warnings.warn(f"{problem}: {outcome}", CheckpointWarning, stacklevel=3)
        else:
            on_damaged(f"{problem}: {outcome}")
    return stack


def _finish(
    result: MemberResult,
    status: Status,
    trainer: StackTrainer,
    stoppers: dict[str, EarlyStopper],
    best_weights: dict[str, dict[str, torch.Tensor]],
    keep_weights: bool,
) -> None:
    result.status = status
    if not keep_weights:
        return
    stopper = stoppers.get(result.key)
    if stopper is not None and stopper.spec.restore_best and result.key in best_weights:
        result.weights = best_weights[result.key]
    else:
        result.weights = trainer.member_state_dict(result.key)


def _save(
    path: Path,
    trainer: StackTrainer,
    results: dict[str, MemberResult],
    stoppers: dict[str, EarlyStopper],
    best_weights: dict[str, dict[str, torch.Tensor]],
) -> None:
    state = {
        "trainer": trainer.state_dict() if trainer.keys else None,
        "epoch": max(len(r.history) for r in results.values()),
        "results": {
            key: {
                "history": [[m.loss, m.accuracy, m.val_loss, m.val_accuracy, m.seconds]
                            for m in r.history],
                "status": r.status, "best_epoch": r.best_epoch, "message": r.message,
                "weights": r.weights,
            }
            for key, r in results.items()
        },
        "stoppers": {key: s.state_dict() for key, s in stoppers.items()},
        "best_weights": best_weights,
    }
    write_checkpoint(path, state)


def _restore(
    state: dict[str, Any],
    trainer: StackTrainer,
    results: dict[str, MemberResult],
    stoppers: dict[str, EarlyStopper],
    best_weights: dict[str, dict[str, torch.Tensor]],
) -> None:
    try:
        for key, saved in state["results"].items():
            result = results[key]
            result.history = [EpochMetrics(*row) for row in saved["history"]]
            result.status, result.best_epoch = saved["status"], saved["best_epoch"]
            result.message, result.weights = saved["message"], saved["weights"]
        for key, saved in state["stoppers"].items():
            stoppers[key].load_state_dict(saved)
        best_weights.update(state["best_weights"])
        if state["trainer"] is None:
            trainer.drop(list(trainer.keys))
            trainer.epoch = state["epoch"]
        else:
            trainer.load_state_dict(state["trainer"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        # The checksum held, so the file is what some fashionlab wrote, but not for this
        # stack (another stack's file under this name, or an incompatible version).
        raise DamagedCheckpoint(f"does not fit this stack: {first_line(error)[:200]}") \
            from None


def mean_curves(
    results: Sequence[MemberResult], metric: str, epochs: int
) -> np.ndarray:
    """(n_members, epochs) array of one metric; NaN after a member stopped or failed."""
    curves = np.full((len(results), epochs), np.nan)
    for i, result in enumerate(results):
        values = [m.get(metric) for m in result.history[:epochs]]
        curves[i, : len(values)] = values
    return curves


def healthy(results: Sequence[MemberResult]) -> list[MemberResult]:
    """The models of `results` that did not diverge (all of them when every one did): a
    diverged model stops at its divergence, and its short curve would cut the consensus of
    the others short (its own score is none: NaN)."""
    return [r for r in results if not r.failed] or list(results)


def consensus_warning(results: Sequence[MemberResult], rule: WarningRule) -> OverfitWarning:
    """The warning rule on the mean val_loss curve across `results` (a candidate's folds),
    over the epochs every one of them reached: with early stopping, later means would mix
    fewer folds. Its `chosen_epoch` is the CV-consensus epoch, one epoch for all folds, which
    every fold has trained (a fold that stopped earlier shortens the curve). A diverged fold
    takes no part (`healthy`)."""
    results = healthy(results)
    reached = min((len(r.history) for r in results), default=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a diverged model's NaN epochs
        mean_val_loss = np.nanmean(mean_curves(results, "val_loss", reached), axis=0) \
            if reached else np.array([])
    return overfitting_warning(mean_val_loss, patience=rule.patience, min_delta=rule.min_delta)


def runs_to_schedule_end(train: TrainSpec) -> bool:
    """Whether a model trained this way is read at the end of its learning-rate schedule: a
    schedule planned over `train.epochs` (one-cycle warms up, then anneals to ~0 at its last
    epoch). An earlier epoch is a model still at a high learning rate, and retraining it for
    that many epochs would run another, compressed schedule; the overfitting warning, made for
    constant learning rates, fires on such a schedule's high-rate plateau (its val_loss stalls
    there before the annealing brings it down)."""
    return train.schedule == "onecycle"


def consensus_epoch(results: Sequence[MemberResult], train: TrainSpec,
                    warning: OverfitWarning) -> int | None:
    """The CV-consensus epoch, one epoch for all of a candidate's folds (`results`), which
    every fold has trained: the end of its learning-rate schedule when it has one
    (`runs_to_schedule_end`; the last epoch every fold reached), else the epoch of `warning`,
    their `consensus_warning` (the lowest mean val_loss when it never fires). None when no
    fold trained an epoch (or, for the warning, none has a finite val_loss). A diverged fold
    takes no part (`healthy`)."""
    if runs_to_schedule_end(train):
        return min((len(r.history) for r in healthy(results)), default=0) or None
    return warning.chosen_epoch


def member_seed(seed: int, *keys: str | int) -> int:
    """Seeds of trained models: every candidate sees the same seed in the same fold, so paired
    comparisons between candidates share initial draws and shuffles (common random numbers)."""
    return derive_seed(seed, *keys)
