"""One trial of a search: its folds trained, reported to the pruner as they train, counted
(what the trial spends, read by the budgets) and scored. The loop that claims trials and runs
them, one worker's part of a search, is fashionlab.search.loop.

Pruning: with the median pruners the folds of a trial train together as one stack and each
epoch reports the mean over folds of each fold's best objective so far (monotone, and
meaningful with early stopping); "median" compares trials at equal epochs, "median-compute" at
equal training FLOP (fashionlab.search.cost). The Wilcoxon pruner trains the folds one after
another and reports each fold's score read on that fold alone (step = fold index), pruning a
trial that is significantly worse than the best on the folds seen so far. These reports only
steer pruning: a finished trial is scored with every fold read at its CV-consensus epoch
(fashionlab.search.finish.consensus_scores).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from fashionlab.checkpoints import remove_checkpoint
from fashionlab.config import WILCOXON_P_THRESHOLD, Candidate, SearchSpec, StudySpec
from fashionlab.cv import Fold, MemberResult
from fashionlab.runner import train_stack, training_flops
from fashionlab.search.cost import EqualComputePruner
from fashionlab.search.finish import consensus_scores
from fashionlab.search.space import suggest
from fashionlab.steps import (
    RunContext,
    checkpoint_path,
    cv_members,
    plan_stacks,
    register_models,
    summarize_models,
)
from fashionlab.store import RunRecord, Store
from fashionlab.tables import params_text
from fashionlab.train import EpochMetrics, Member, Tensors
from fashionlab.trials import FOLD_EPOCHS, SECONDS, STEP_TFLOP, TFLOP

__all__ = ["TrialContext", "make_pruner", "train_trial"]


def make_pruner(search: SearchSpec) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        # Steps are 1-based epochs: the earliest prune is at step n_warmup_steps.
        return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials,
                                           n_warmup_steps=search.warmup + 1)
    if search.pruner == "median-compute":
        return EqualComputePruner(n_startup_trials=search.startup_trials,
                                  n_warmup_steps=search.warmup + 1)
    if search.pruner == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=WILCOXON_P_THRESHOLD,
                                                 n_startup_steps=search.warmup + 1)
    return optuna.pruners.NopPruner()


@dataclass(frozen=True)
class TrialContext:
    """What training a trial needs from the worker that runs it (the same for every trial)."""

    ctx: RunContext  # the store, the search's run, the study file, its output directory
    base: Candidate  # the candidate whose parameters a trial draws
    folds: list[Fold]  # every trial's folds
    data: Tensors  # the training images, validated on themselves (the folds)
    maximize: bool  # the objective is val_accuracy

    @property
    def spec(self) -> StudySpec:
        return self.ctx.spec

    @property
    def search(self) -> SearchSpec:
        assert self.ctx.spec.search is not None
        return self.ctx.spec.search

    @property
    def store(self) -> Store:
        return self.ctx.store

    @property
    def run(self) -> RunRecord:
        return self.ctx.run

    def checkpoint(self, stack: Sequence[Member], params: dict[str, Any]) -> Path:
        return checkpoint_path(self.ctx.output_dir, stack, params)


def train_trial(context: TrialContext, trial: optuna.Trial, name: str) -> float:
    """The objective of one trial: the candidate its drawn values make (its models named
    `name`), its folds trained and reported to the pruner, then scored (the mean of its fold
    scores). Raises optuna.TrialPruned when the pruner stops it or a fold diverges."""
    candidate = suggest(trial, context.search, context.base, name)
    members, owner, fold_of = cv_members(
        dataclasses.replace(context.spec, candidates=(candidate,), search=None), context.folds)
    ordered = list(members.values())
    register_models(context.ctx, ordered, owner, "trial", fold_of)
    stacks = [[m] for m in ordered] if context.search.pruner == "wilcoxon" \
        else plan_stacks(ordered, {m.key: candidate for m in ordered})
    watcher = _Watcher(context, trial, candidate)
    try:
        results: dict[str, MemberResult] = {}
        for index, stack in enumerate(stacks):
            results.update(watcher.train(stack, index))
    except optuna.TrialPruned as pruned:
        for m in ordered:
            if m.key not in watcher.done:
                context.store.update_model(context.run.id, m.key, status="stopped",
                                           message=f"trial {pruned}")
        _drop_checkpoints(context, stacks, trial.params)
        raise
    # Every fold read at the CV-consensus epoch, as the reference is (see finish).
    read = consensus_scores([results[m.key] for m in ordered], candidate.train,
                            context.spec.warning)
    scores = read.of(context.search.objective)
    trial.set_user_attr("fold_scores", [float(v) for v in scores])
    trial.set_user_attr("val_accuracy", [float(v) for v in read.val_accuracy])
    trial.set_user_attr("val_loss", [float(v) for v in read.val_loss])
    trial.set_user_attr("consensus_epoch", read.epoch)
    trial.set_user_attr(FOLD_EPOCHS, sum(len(results[m.key].history) for m in ordered))
    _drop_checkpoints(context, stacks, trial.params)
    if not np.all(np.isfinite(scores)):
        trial.set_user_attr("stopped", "a fold diverged")
        raise optuna.TrialPruned("a fold diverged")
    return float(np.mean(scores))


def _folds_text(stack: Sequence[Member]) -> str:
    """Which folds a stack trains, by its models' names ("trial-3/fold-2"): "fold 2",
    "folds 0, 1" (repeated CV's "r1f3" as they are)."""
    names = [m.key.rpartition("/")[2] for m in stack]
    if all(n.removeprefix("fold-").isdigit() for n in names):
        names = [n.removeprefix("fold-") for n in names]
    return ("fold " if len(names) == 1 else "folds ") + ", ".join(names)


def _drop_checkpoints(context: TrialContext, stacks: Sequence[Sequence[Member]],
                      params: dict[str, Any]) -> None:
    for stack in stacks:
        remove_checkpoint(context.checkpoint(stack, params))


@dataclass
class _Watcher:
    """Trains a trial's stacks, reports to the pruner, and counts what the trial costs."""

    context: TrialContext
    trial: optuna.Trial
    candidate: Candidate
    values: dict[str, list[float]] = field(default_factory=dict)  # objective per key and epoch
    seconds: dict[str, list[float]] = field(default_factory=dict)  # its stack's epoch seconds
    stacks: list[list[str]] = field(default_factory=list)  # the keys of each stack so far
    tflop: dict[str, float] = field(default_factory=dict)  # per key: TFLOP of one epoch
    reported: int = 0  # epochs reported (median pruners)
    step_tflop: list[float] = field(default_factory=list)  # TFLOP trained up to each report
    done: set[str] = field(default_factory=set)  # keys trained to the end

    @property
    def metric(self) -> str:
        return self.context.search.objective

    def best_so_far(self, values: list[float], epochs: int) -> float:
        seen = [v for v in values[:epochs] if math.isfinite(v)]
        if not seen:
            return math.nan
        return max(seen) if self.context.maximize else min(seen)

    def trained_tflop(self, epochs: int | None = None) -> float:
        """TFLOP of the epochs trained so far (the first `epochs` of each fold)."""
        return sum(self.tflop[key] * len(v[:epochs]) for key, v in self.values.items())

    def count(self) -> None:
        """Store the trial's cost so far (read by the budgets: fashionlab.search.cost)."""
        # A stack's epoch is timed once for all its folds: its longest-trained fold has all.
        seconds = sum(max((sum(self.seconds.get(k, [])) for k in keys), default=0.0)
                      for keys in self.stacks)
        self.trial.set_user_attr(FOLD_EPOCHS, sum(len(v) for v in self.values.values()))
        self.trial.set_user_attr(SECONDS, seconds)
        self.trial.set_user_attr(TFLOP, self.trained_tflop())

    def train(self, stack: list[Member], index: int) -> dict[str, MemberResult]:
        s = self.context
        label = f"trial {self.trial.number} {_folds_text(stack)}"
        watch_epochs = s.search.pruner in ("median", "median-compute") and index == 0
        self.stacks.append([m.key for m in stack])
        for m in stack:  # per fold-epoch: forward and backward over the fold's images
            self.tflop[m.key] = training_flops(m.model, len(m.train_index), 1) / 1e12

        def on_epoch(epoch: int, metrics: dict[str, EpochMetrics]) -> None:
            if not metrics and epoch:  # resumed from a checkpoint: the store has the epochs
                for m in stack:  # (the store may hold more epochs than the checkpoint)
                    rows = s.store.epochs(s.run.id, m.key)[:epoch]
                    self.values[m.key] = [getattr(e, self.metric) for e in rows]
                    self.seconds[m.key] = [e.seconds for e in rows]
            for key, m in metrics.items():
                self.values.setdefault(key, []).append(m.get(self.metric))
                self.seconds.setdefault(key, []).append(m.seconds)
            self.count()
            bad = [m for m in metrics.values() if not math.isfinite(m.loss)]
            if bad:
                self.trial.set_user_attr("stopped", f"diverged at epoch {epoch}")
                raise optuna.TrialPruned(f"diverged at epoch {epoch}")
            if watch_epochs:
                for step in range(self.reported + 1, epoch + 1):
                    value = float(np.nanmean([self.best_so_far(self.values.get(m.key, []), step)
                                              for m in stack]))
                    self.step_tflop.append(self.trained_tflop(step))
                    if math.isfinite(value):
                        self.trial.report(value, step)
                    self.reported = step
                # Steps are epochs; the equal-compute pruner reads each one's cost here.
                self.trial.set_user_attr(STEP_TFLOP, self.step_tflop)
                if self.trial.should_prune():
                    self.trial.set_user_attr("stopped", f"pruned at epoch {epoch}")
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        # Always trained (continued from its checkpoint), never read back: the pruner must
        # see the epochs of a retried trial's folds too.
        results = train_stack(
            s.store, s.run.id, stack, self.candidate.train, s.data, s.ctx.device,
            checkpoint=s.checkpoint(stack, self.trial.params),
            label=f"{label}  {params_text(self.trial.params, width=70)}",
            reporter=s.ctx.reporter, on_epoch=on_epoch)
        self.done.update(m.key for m in stack)
        if s.search.pruner == "wilcoxon":
            for m in stack:
                fold = summarize_models(self.candidate, [results[m.key]], "cv", s.spec.warning)
                score = (fold.val_accuracy if s.maximize else fold.val_loss)[0]
                if math.isfinite(score):
                    self.trial.report(float(score), index)
            if self.trial.should_prune():
                self.trial.set_user_attr("stopped", f"pruned after fold {index}")
                raise optuna.TrialPruned(f"pruned after fold {index}")
        return results
