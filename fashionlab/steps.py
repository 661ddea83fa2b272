"""The steps a study and a search share, as functions of a `RunContext`: lay out the models of
a cross-validation, train a stack or read it back from the store, summarise a candidate's
folds, retrain the best on all training images, train a final model, test kept weights, and
name the files (checkpoints, model directories) these steps leave.

Every step stores what it trains as it goes (`runner.train_stack`) and reuses what the store
already holds, so calling it again after an interruption continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashionlab.artifacts import save_model
from fashionlab.config import Candidate, StudySpec, WarningRule, study_source
from fashionlab.cv import (
    Fold,
    MemberResult,
    OverfitWarning,
    consensus_epoch,
    consensus_warning,
    mean_curves,
    member_seed,
    runs_to_schedule_end,
)
from fashionlab.data import Dataset, load_fashion_mnist
from fashionlab.errors import ConfigError, DataError
from fashionlab.jobs import Claim
from fashionlab.progress import Reporter
from fashionlab.provenance import environment
from fashionlab.runner import EpochHook, train_stack
from fashionlab.schema import METRICS
from fashionlab.store import ModelRecord, RunRecord, Store
from fashionlab.text import safe_name
from fashionlab.train import EpochMetrics, Member, StackTrainer, Tensors, stack_key

__all__ = [
    "MAX_STACK",
    "CandidateResult",
    "RetrainResult",
    "RunContext",
    "checkpoint_path",
    "cv_members",
    "final_label",
    "finished_models",
    "load_study_data",
    "model_dir",
    "model_metadata",
    "plan_stacks",
    "register_models",
    "retrain",
    "stack_label",
    "stored_result",
    "summarize_models",
    "test_weights",
    "train_final",
    "train_or_reuse",
]

MAX_STACK = {"dense": 32, "conv": 1}  # members per stack; a CNN trains alone (see models)
DONE = ("finished", "stopped", "failed")  # a model in one of these states trains no more


@dataclass(frozen=True)
class RunContext:
    """Where a step stores and writes, and how it trains and reports."""

    store: Store
    run: RunRecord
    spec: StudySpec
    output_dir: Path  # the run's files: checkpoints/, models/, the tables
    device: torch.device
    reporter: Reporter
    claim: Claim | None = None  # a shared run's job being trained: its epochs are stored under it


@dataclass(frozen=True, eq=False)
class CandidateResult:
    """A candidate's cross-validation (role "cv") or a final model's training (role "final").
    Arrays compare by identity (eq=False): element-wise == is not a bool."""

    name: str
    role: str
    candidate: Candidate
    keys: list[str]  # its models: one per fold, or one
    curves: dict[str, np.ndarray]  # metric -> (n_models, epochs), NaN after a model stopped
    warning: OverfitWarning  # on the mean val_loss curve
    result_epochs: np.ndarray  # (n_models,) 1-based epoch each model's result is read at
    val_loss: np.ndarray  # (n_models,) at the result epoch
    val_accuracy: np.ndarray  # (n_models,)
    trained_epochs: int  # epochs trained, summed over models
    planned_epochs: int  # epochs planned, summed over models
    failures: list[str]  # messages of models that diverged
    test_loss: float = float("nan")  # final models: of the weights kept, on the test set
    test_accuracy: float = float("nan")
    model_dir: Path | None = None  # final models: where the trained model is saved

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    @property
    def schedule_end(self) -> int | None:
        """The epoch its folds are read at when that is the end of a learning-rate schedule
        (`cv.runs_to_schedule_end`, without early stopping); None when read otherwise."""
        train = self.candidate.train
        read = self.result_epochs[self.result_epochs > 0]  # 0: a diverged fold, not read
        if train.early_stopping is not None or not runs_to_schedule_end(train) or not len(read):
            return None
        return int(read[0])

    @property
    def mean_curves(self) -> dict[str, np.ndarray]:
        with warnings.catch_warnings():  # epochs no model reached stay NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return {k: np.nanmean(v, axis=0) if v.size else v for k, v in self.curves.items()}


@dataclass(frozen=True)
class RetrainResult:
    candidate: str
    epochs: int
    test_loss: float
    test_accuracy: float
    model_dir: Path
    history: list[EpochMetrics]


# --------------------------------------------------------------------------------------------
# Laying out the models


def note_unresumed_run(store: Store, run: RunRecord, reporter: Reporter) -> str | None:
    """For a run just created: when the study or search of that name has an interrupted run
    of other settings (the file was edited since; only identical settings resume), say so,
    and that the earlier run stays. Returns what it said (kept with the result, for whoever
    showed no progress)."""
    runs = [r for r in store.runs(kind=run.kind, name=run.name) if r.id != run.id]
    same_settings = [r for r in runs if r.fingerprint == run.fingerprint]
    # (With a run of these settings and data, this one is new by --fresh: nothing to say.)
    other_data = [] if any(same_data(r, run.data_sha256) for r in same_settings) else [
        r for r in same_settings if r.state in ("interrupted", "finished")]
    earlier = [r for r in runs if r.fingerprint != run.fingerprint and r.state == "interrupted"]
    # (A study renamed since its run was interrupted: the name is one of its settings.)
    renamed = [] if runs else [
        r for r in store.runs(kind=run.kind) if r.id != run.id and r.state == "interrupted"
        and _but_the_name(r.config) == _but_the_name(run.config)
        and same_data(r, run.data_sha256)]
    if other_data:
        old = other_data[0]
        note = (f"run {run.id} is a new run: its data differ from those of run {old.id} of "
                f"the same settings (SHA-256 {run.data_sha256[:12]} against "
                f"{old.data_sha256[:12]}), which is left as it is (the same data show or "
                "resume it)")
    elif earlier:
        note = (f"run {run.id} is a new run: the settings of {run.kind} '{run.name}' differ "
                f"from those of its interrupted run {earlier[0].id}, which is left as it is "
                f"(the same settings resume it; `fashionlab runs delete {earlier[0].id}` "
                "removes it)")
    elif renamed:
        old = renamed[0]
        note = (f"run {run.id} is a new run: {run.kind} '{run.name}' has the settings of the "
                f"interrupted run {old.id} of {run.kind} '{old.name}', which is left as it is "
                f"(under its old name they resume it; `fashionlab runs delete {old.id}` "
                "removes it)")
    else:
        return None
    reporter.log(note)
    return note


def _but_the_name(config: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if config is None else {**config, "name": None}


def data_record(dataset: Dataset) -> dict[str, Any]:
    """What a run stores of the data it trains on (in its environment): their digest and
    sizes."""
    return {"sha256": dataset.sha256(), "train": len(dataset.train), "test": len(dataset.test)}


def same_data(run: RunRecord, sha256: str | None) -> bool:
    """Whether `run` trained on the data of that digest; a run stored before runs recorded
    their data matches any."""
    mine = run.data_sha256
    return mine is None or sha256 is None or mine == sha256


def load_study_data(spec: StudySpec) -> Dataset:
    """The study's dataset, cut to its `[data]` limits (the first N images of each split)."""
    directory = spec.data.directory
    if directory is not None and not Path(directory).expanduser().is_dir():
        what = "a file, not a folder" if Path(directory).expanduser().exists() else "no such folder"
        raise DataError(f"{study_source(spec)}: data.directory: {directory}: {what}")
    try:
        dataset = load_fashion_mnist(directory, verify=spec.data.verify)
    except DataError as error:  # a missing or bad file in the folder the study names
        if directory is None:
            raise
        raise DataError(f"{study_source(spec)}: data.directory: {error}") from None
    return limit_study_data(spec, dataset)


def limit_study_data(spec: StudySpec, dataset: Dataset) -> Dataset:
    """`dataset` cut to the study's `[data]` limits (the first N images of each split); a
    study file asking for more folds than the images it gets is refused here, by name."""
    limited = dataclasses.replace(dataset, train=dataset.train.head(spec.data.train_limit),
                                  test=dataset.test.head(spec.data.test_limit))
    n_splits, n_train = spec.cv.n_splits, len(limited.train)
    if n_train < n_splits:
        raise ConfigError(f"{study_source(spec)}: cv.n_splits: {n_splits} folds need at least "
                          f"{n_splits} training images (the data has {n_train})")
    return limited


def cv_members(
    spec: StudySpec, folds: Sequence[Fold]
) -> tuple[dict[str, Member], dict[str, Candidate], dict[str, Fold]]:
    """Every (candidate, fold) model of a study's cross-validation, keyed "<candidate>/<fold>",
    with the candidate and the fold of each.

    Seeds depend on the fold only: all candidates of a fold share initial draws and shuffles
    (common random numbers for their paired comparison)."""
    members: dict[str, Member] = {}
    owner: dict[str, Candidate] = {}
    fold_of: dict[str, Fold] = {}
    for candidate in spec.candidates:
        for fold in folds:
            key = f"{candidate.name}/{fold.name}"
            seed = member_seed(spec.seed, "cv", fold.repeat, fold.index)
            members[key] = Member(key, candidate.model, fold.train_index, fold.val_index, seed)
            owner[key], fold_of[key] = candidate, fold
    return members, owner, fold_of


def plan_stacks(members: list[Member], owner: Mapping[str, Candidate]) -> list[list[Member]]:
    """Group members that can train as one stack, in a deterministic order, capped in size."""
    groups: dict[Any, list[Member]] = {}
    for member in members:
        groups.setdefault(stack_key(member, owner[member.key].train), []).append(member)
    stacks = []
    for group in groups.values():
        cap = MAX_STACK[group[0].model.kind]
        stacks += [group[i : i + cap] for i in range(0, len(group), cap)]
    return stacks


def stack_label(stack: Sequence[Member], owner: Mapping[str, Candidate]) -> str:
    """How progress names a cross-validation stack: its candidates and size."""
    names = list(dict.fromkeys(owner[m.key].name for m in stack))
    return f"{' · '.join(names)}  ({len(stack)} models)"


def final_label(candidate: Candidate, n_train: int) -> str:
    """How progress names a final model's training."""
    return f"{candidate.name} on all {n_train}, test set as validation"


def checkpoint_path(output_dir: Path, members: Sequence[Member],
                    params: Mapping[str, Any] | None = None) -> Path:
    """Where a stack checkpoints: named by its member keys (and a search trial's parameters,
    so that a retried trial with other parameters never loads another's state)."""
    keys = [m.key for m in members]
    text = "\n".join(keys) if params is None else \
        json.dumps([keys, dict(params)], sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return output_dir / "checkpoints" / f"{digest}.pt"


def model_dir(output_dir: Path, name: str) -> Path:
    """Where a retrained or final model of a run is saved."""
    return output_dir / "models" / safe_name(name)


# --------------------------------------------------------------------------------------------
# The store's side


def register_models(ctx: RunContext, members: Sequence[Member],
                    candidate: Mapping[str, Candidate], role: str,
                    folds: Mapping[str, Fold] | None = None) -> None:
    """Record the models a step will train (pending), once: registering again writes
    nothing."""
    folds = folds or {}
    known = {m.key for m in ctx.store.models(ctx.run.id)}
    rows = []
    for m in members:
        if m.key in known:
            continue
        fold = folds.get(m.key)
        rows.append({
            "key": m.key, "candidate": candidate[m.key].name, "role": role,
            "repeat": fold.repeat if fold else None, "fold": fold.index if fold else None,
            "epochs_planned": candidate[m.key].train.epochs, "n_train": len(m.train_index),
            "n_val": None if m.val_index is None else len(m.val_index), "seed": m.seed,
        })
    if rows:
        ctx.store.register_models(ctx.run.id, rows)


def finished_models(store: Store, run_id: str) -> dict[str, ModelRecord]:
    """The run's models that train no more (finished, stopped early, or failed)."""
    return {m.key: m for m in store.models(run_id) if m.status in DONE}


def stored_result(store: Store, run_id: str, key: str) -> MemberResult:
    """A model's result as the store holds it: its epochs and, once done, its outcome."""
    record = next((m for m in store.models(run_id) if m.key == key), None)
    history = [EpochMetrics(e.loss, e.accuracy, e.val_loss, e.val_accuracy, e.seconds)
               for e in store.epochs(run_id, key)]
    if record is None:
        return MemberResult(key, history)
    status = record.status if record.status in DONE else None
    return MemberResult(key, history, status, record.best_epoch,  # type: ignore[arg-type]
                        record.message)


# --------------------------------------------------------------------------------------------
# Training


def train_or_reuse(ctx: RunContext, members: list[Member], candidate: Candidate, data: Tensors,
                   label: str, *, keep_weights: bool = False, checkpoint: Path | None = None,
                   on_epoch: EpochHook | None = None) -> dict[str, MemberResult]:
    """Train one stack (continuing from its checkpoint), or read it back from the store when
    every member finished earlier and no weights are wanted."""
    if not keep_weights:
        done = finished_models(ctx.store, ctx.run.id)
        if all(m.key in done for m in members):
            return {m.key: stored_result(ctx.store, ctx.run.id, m.key) for m in members}
    return train_stack(
        ctx.store, ctx.run.id, members, candidate.train, data, ctx.device,
        checkpoint=checkpoint or checkpoint_path(ctx.output_dir, members), label=label,
        reporter=ctx.reporter, keep_weights=keep_weights, on_epoch=on_epoch, claim=ctx.claim)


def summarize_models(candidate: Candidate, results: list[MemberResult], role: str,
                     rule: WarningRule) -> CandidateResult:
    """A candidate's models (its folds, or one final model) as a result: curves, the
    overfitting warning on the mean val_loss curve, and each model's score at its result
    epoch (early stopping's best epoch, else the CV-consensus epoch: the warning epoch, or the
    end of the learning-rate schedule for a schedule planned over the epochs)."""
    epochs = candidate.train.epochs
    curves = {metric: mean_curves(results, metric, epochs) for metric in METRICS}
    warning = consensus_warning(results, rule)
    n = len(results)
    if candidate.train.early_stopping is not None:
        # No best epoch: the monitored metric was never finite (the model diverged at its
        # first epoch): no score, not the accuracy of a model whose loss is NaN.
        result_epochs = np.array([r.best_epoch or 0 for r in results])
    else:
        result_epochs = np.full(n, consensus_epoch(results, candidate.train, warning) or 0)
    # A diverged model has no score (the others are read without it: `cv.healthy`), not its
    # accuracy at an epoch before it diverged.
    result_epochs[[r.failed for r in results]] = 0
    pick = np.clip(result_epochs - 1, 0, max(epochs - 1, 0))
    rows = np.arange(n)
    scores = {metric: curves[metric][rows, pick] for metric in ("val_loss", "val_accuracy")}
    for values in scores.values():
        # Epoch 0: no epoch to read (no fold has a finite val_loss, or none trained one, or
        # the model diverged): no score.
        values[result_epochs <= 0] = np.nan
    failures = [f"{r.key}: {r.message}" for r in results if r.failed]
    return CandidateResult(
        name=candidate.name, role=role, candidate=candidate, keys=[r.key for r in results],
        curves=curves, warning=warning, result_epochs=result_epochs,
        val_loss=scores["val_loss"], val_accuracy=scores["val_accuracy"],
        trained_epochs=sum(len(r.history) for r in results), planned_epochs=n * epochs,
        failures=failures,
    )


def retrain(ctx: RunContext, best: CandidateResult, data: Tensors,
            class_names: tuple[str, ...]) -> RetrainResult:
    """Train the best candidate on all training images for its CV-consensus epoch count (the
    study's `[retrain] epochs` rule on its mean val_loss curve; a learning-rate schedule
    planned over the epochs runs whole, as it was read), test it on `data`'s validation split
    (the test set) and save it under models/<candidate>."""
    candidate = best.candidate
    setting = ctx.spec.retrain.epochs
    if setting in ("warning", "lowest") and runs_to_schedule_end(candidate.train):
        epochs = candidate.train.epochs  # the whole schedule, the length it was read at
    elif setting == "warning":
        epochs = best.warning.chosen_epoch or candidate.train.epochs
    elif setting == "lowest":
        epochs = best.warning.best_epoch or candidate.train.epochs
    else:
        epochs = setting
    train = dataclasses.replace(candidate.train, epochs=epochs, early_stopping=None)
    retrained = dataclasses.replace(candidate, train=train)
    key = f"{candidate.name}/retrain"
    member = Member(key, candidate.model, np.arange(len(data.x_train)), None,
                    member_seed(ctx.spec.seed, "retrain"))
    register_models(ctx, [member], {key: retrained}, "retrain")
    directory = model_dir(ctx.output_dir, candidate.name)
    record = finished_models(ctx.store, ctx.run.id).get(key)
    # Done only once its test scores are stored, the last write of this step: a kill after
    # the model was saved but before the scores were stored trains it again (same numbers).
    if record is not None and record.status == "finished" and _saved(ctx, directory) \
            and record.test_accuracy is not None:
        history = stored_result(ctx.store, ctx.run.id, key).history
        return RetrainResult(candidate.name, epochs, record.test_loss or float("nan"),
                             record.test_accuracy or float("nan"), directory, history)
    result = train_or_reuse(ctx, [member], retrained, data, f"retrain {candidate.name} "
                            f"on all {len(data.x_train)}", keep_weights=True)[key]
    test_loss, test_accuracy = test_weights(retrained, result, data, ctx.device)
    save_model(directory, spec=candidate.model, state=result.weights or {},
               class_names=class_names, metadata=model_metadata(
                   ctx, retrained, epochs, test_loss, test_accuracy, role="retrain"))
    ctx.store.update_model(ctx.run.id, key, test_loss=test_loss, test_accuracy=test_accuracy)
    return RetrainResult(candidate.name, epochs, test_loss, test_accuracy, directory,
                         result.history)


def train_final(ctx: RunContext, candidate: Candidate, data: Tensors,
                class_names: tuple[str, ...]) -> CandidateResult:
    """Train a final model on all training images, validated (and tested after its last
    epoch) on `data`'s validation split, the test set; saved under models/<candidate>."""
    key = f"{candidate.name}/final"
    member = Member(key, candidate.model, np.arange(len(data.x_train)),
                    np.arange(len(data.x_val)), member_seed(ctx.spec.seed, "final"))
    register_models(ctx, [member], {key: candidate}, "final")
    directory = model_dir(ctx.output_dir, candidate.name)
    record = finished_models(ctx.store, ctx.run.id).get(key)
    if record is not None and record.status != "failed" and _saved(ctx, directory) \
            and record.test_accuracy is not None:  # (its last write: see `retrain`)
        result = stored_result(ctx.store, ctx.run.id, key)
        test_loss, test_accuracy = record.test_loss, record.test_accuracy
    else:
        result = train_or_reuse(ctx, [member], candidate, data,
                                final_label(candidate, len(data.x_train)),
                                keep_weights=True)[key]
        test_loss, test_accuracy = test_weights(candidate, result, data, ctx.device)
        if result.weights is not None:
            save_model(directory, spec=candidate.model, state=result.weights,
                       class_names=class_names, metadata=model_metadata(
                           ctx, candidate, len(result.history), test_loss, test_accuracy,
                           role="final", weights_epoch=kept_epoch(candidate, result)))
        ctx.store.update_model(ctx.run.id, key, test_loss=test_loss,
                               test_accuracy=test_accuracy)
    summary = summarize_models(candidate, [result], "final", ctx.spec.warning)
    return dataclasses.replace(summary, test_loss=_nan(test_loss),
                               test_accuracy=_nan(test_accuracy), model_dir=directory)


def _saved(ctx: RunContext, directory: Path) -> bool:
    """Whether a model whose test scores are stored was saved: its folder is here, or the run
    is finished (shown again, maybe from another machine than the one that saved it: read
    back, never trained again)."""
    return directory.exists() or ctx.run.status == "finished"


def test_weights(candidate: Candidate, result: MemberResult, data: Tensors,
                 device: torch.device) -> tuple[float, float]:
    """Loss and accuracy of a trained model's kept weights on `data`'s validation split
    (NaN when it failed or kept none)."""
    if result.weights is None or result.failed:
        return float("nan"), float("nan")
    member = Member(result.key, candidate.model, np.arange(1), None, 0)
    # A scorer only: the kept weights are loaded as they are (no moving average to build),
    # and the training images are not needed (nor converted to the training precision).
    train = dataclasses.replace(candidate.train, ema=0.0)
    scoring = Tensors(data.x_val, data.y_val, data.x_val, data.y_val)
    scorer = StackTrainer([member], train, scoring, device)
    scorer.load_member_state_dict(result.key, result.weights)
    index = torch.arange(len(data.x_val), device=device).unsqueeze(0)
    loss, accuracy = scorer.evaluate(data.x_val, data.y_val, index)
    return loss[0], accuracy[0]


def kept_epoch(candidate: Candidate, result: MemberResult) -> int:
    """The epoch whose weights a trained model keeps: early stopping's best where it restores
    them, else the last."""
    stopping = candidate.train.early_stopping
    if stopping is not None and stopping.restore_best and result.best_epoch is not None:
        return result.best_epoch
    return len(result.history)


def model_metadata(ctx: RunContext, candidate: Candidate, epochs: int, test_loss: float,
                   test_accuracy: float, *, role: str,
                   weights_epoch: int | None = None) -> dict[str, Any]:
    """What a saved model's model.json records of how it was trained: `epochs` trained, the
    weights of epoch `weights_epoch` (default: the last) kept and tested, and the code,
    versions and machine of the process that trained it (which need not be the run's first:
    a run resumed after an update, a worker with its own threads, another machine)."""
    return {
        "study": ctx.spec.name, "run_id": ctx.run.id, "candidate": candidate.name,
        "role": role, "epochs": epochs,
        "weights_epoch": epochs if weights_epoch is None else weights_epoch,
        "seed": ctx.spec.seed,
        "train": dataclasses.asdict(candidate.train),
        "test_loss": test_loss, "test_accuracy": test_accuracy,
        **ctx.run.environment,  # its data
        **environment(str(ctx.device)),
    }


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
