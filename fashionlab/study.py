"""Running a study: cross-validate the candidates, warn about overfitting, retrain the best and
test it, train the final models, and store every epoch on the way.

A study is resumable at any moment: every stack of models checkpoints after each epoch and the
store holds every finished epoch, so running the same study again continues where it stopped
and ends with the numbers an uninterrupted run gives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fashionlab import stats
from fashionlab.artifacts import save_model
from fashionlab.config import Candidate, StudySpec, WarningRule
from fashionlab.cv import (
    Fold,
    MemberResult,
    OverfitWarning,
    make_folds,
    mean_curves,
    member_seed,
    overfitting_warning,
)
from fashionlab.data import Dataset, Split, load_fashion_mnist, to_tensors
from fashionlab.errors import ConfigError
from fashionlab.hardware import resolve_device
from fashionlab.progress import Progress
from fashionlab.provenance import environment
from fashionlab.runner import (
    Job,
    auto_workers,
    image_dtype,
    mean_val_accuracy,
    run_in_workers,
    train_stack,
    training_flops,
    worker_devices,
)
from fashionlab.store import DEFAULT_RUN_DIR, ModelRecord, RunRecord, Store
from fashionlab.train import EpochMetrics, Member, Tensors, stack_key
from fashionlab.twins import TwinComparison, find_twins

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
MAX_STACK = {"dense": 32, "conv": 1}  # members per stack; grouped convolutions do not pay on CPU


@dataclass(frozen=True)
class CandidateResult:
    """A candidate's cross-validation (role "cv") or a final model's training (role "final")."""

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
    test_loss: float = float("nan")  # final models: after the last epoch, on the test set
    test_accuracy: float = float("nan")

    @property
    def failed(self) -> bool:
        return bool(self.failures)

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


@dataclass
class StudyResult:
    run: RunRecord
    spec: StudySpec
    output_dir: Path
    n_train: int  # training samples in a CV fold (for the corrected t-test)
    n_val: int  # validation samples in a CV fold
    candidates: list[CandidateResult] = field(default_factory=list)
    comparisons: list[stats.Comparison] = field(default_factory=list)
    best: str | None = None
    retrain: RetrainResult | None = None
    final: list[CandidateResult] = field(default_factory=list)
    twins: dict[str, TwinComparison] = field(default_factory=dict)  # early stopping vs full
    wall_seconds: float = 0.0
    workers: int = 1  # processes that trained it


# --------------------------------------------------------------------------------------------


def load_data(spec: StudySpec) -> Dataset:
    dataset = load_fashion_mnist(spec.data.directory, verify=spec.data.verify)
    limit_train, limit_test = spec.data.train_limit, spec.data.test_limit

    def head(split: Split, n: int | None) -> Split:
        return split if n is None else Split(split.images[:n], split.labels[:n])

    return dataclasses.replace(dataset, train=head(dataset.train, limit_train),
                               test=head(dataset.test, limit_test))


def run_study(
    spec: StudySpec,
    *,
    run_dir: str | Path = DEFAULT_RUN_DIR,
    store_url: str | None = None,
    device: str | None = None,
    fresh: bool = False,
    progress: bool = True,
    dataset: Dataset | None = None,
    after_epoch: Callable[[str, int], None] | None = None,
    workers: int | Literal["auto"] = 1,
) -> StudyResult:
    """Run (or resume) a study and return its results; files go under run_dir/<run id>/.

    The latest run of the identical resolved config is continued unless `fresh`: an
    interrupted one resumes, a finished one is read back from the store without training.
    `after_epoch(key, epoch)` is called after each stored epoch (tests use it to interrupt).
    `workers` > 1 trains the independent jobs (cross-validation stacks, final models) in that
    many processes, each with its share of the CPU threads, or GPUs round-robin when the device
    is CUDA; "auto" (the command line's default) picks a number from the machine and the work
    (see `auto_workers`). Workers start by the spawn method, which re-imports the calling
    script: a script asking for workers needs the usual `if __name__ == "__main__":` guard.
    """
    started = time.perf_counter()
    torch_device = resolve_device(device)
    run_dir = Path(run_dir)
    store = Store.open(run_dir, store_url)
    dataset = dataset if dataset is not None else load_data(spec)
    folds = make_folds(len(dataset.train), spec.cv, seed=spec.seed, labels=dataset.train.labels)
    run = _start_run(store, spec, run_dir, str(torch_device), fresh)
    output_dir = Path(run.output_dir or run_dir / run.id)
    runner = _Runner(store, run, spec, output_dir, torch_device, progress, after_epoch)
    result = StudyResult(run, spec, output_dir, n_train=len(folds[0].train_index),
                         n_val=len(folds[0].val_index))
    try:
        with runner.progress:
            dtype = image_dtype(spec, torch_device)
            x_train, y_train = to_tensors(dataset.train, torch_device, dtype)
            x_test, y_test = to_tensors(dataset.test, torch_device, dtype)
            cv_data = Tensors(x_train, y_train, x_train, y_train)
            final_data = Tensors(x_train, y_train, x_test, y_test)
            jobs = runner.independent_jobs(folds)
            if workers == "auto":
                workers = 1 if after_epoch is not None else auto_workers(jobs, torch_device)
            if workers > 1 and len(jobs) > 1:
                runner.run_in_workers(
                    jobs, workers, _JobInputs(folds, dataset.class_names, cv_data, final_data))
                result.workers = workers
            result.candidates = runner.cross_validate(spec.candidates, folds, cv_data)
            scored = {c.name: c.val_accuracy for c in result.candidates if not c.failed}
            if len(scored) >= 2 and len(folds) >= 2:
                result.comparisons = stats.compare_to_best(
                    scored, n_train=result.n_train, n_test=result.n_val)
            if scored:
                result.best = max(scored, key=lambda name: float(np.nanmean(scored[name])))
            result.twins = find_twins(
                store, spec, run.id,
                [(c.candidate, c.val_accuracy, c.trained_epochs) for c in result.candidates],
                fold_names=[f.name for f in folds], n_train=result.n_train, n_val=result.n_val)
            if result.best is not None and spec.retrain.enabled:
                best = next(c for c in result.candidates if c.name == result.best)
                result.retrain = runner.retrain(best, final_data, dataset.class_names)
            result.final = [runner.train_final(c, final_data, dataset.class_names)
                            for c in spec.final]
    except BaseException:
        store.end_run(run.id, "running")  # keeps it resumable; `runs list` shows it interrupted
        raise
    result.wall_seconds = time.perf_counter() - started
    from fashionlab.results import summary, write_outputs  # results imports this module

    write_outputs(result, dataset)
    store.end_run(run.id, "finished", summary(result))
    from fashionlab.report import write_report  # the report reads the finished run back

    write_report(store, run.id, device=torch_device)
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    result.run = store.run(run.id)
    store.close()
    return result


def _start_run(store: Store, spec: StudySpec, run_dir: Path, device: str, fresh: bool) -> RunRecord:
    fingerprint = spec.fingerprint()
    if not fresh:
        for run in store.runs(kind="study", fingerprint=fingerprint):
            if run.state == "running":
                raise ConfigError(f"run {run.id} of this study is still running "
                                  f"(pid {run.pid} on {run.host}); wait for it or pass --fresh")
            # An interrupted run continues; a finished one is shown again from the store
            # (every model is read back, nothing retrains).
            if run.state in ("interrupted", "finished"):
                return store.claim_run(run.id)
    return store.create_run(kind="study", name=spec.name, fingerprint=fingerprint,
                            seed=spec.seed, config=spec.to_dict(),
                            environment=environment(device), output_root=run_dir)


class _Runner:
    """Trains the stacks of one run, storing each epoch and reusing what is already done."""

    def __init__(self, store: Store, run: RunRecord, spec: StudySpec, output_dir: Path,
                 device: torch.device, show: bool,
                 after_epoch: Callable[[str, int], None] | None, events: Any = None) -> None:
        self.store, self.run, self.spec, self.device = store, run, spec, device
        self.output_dir = output_dir
        self.progress = Progress(enabled=show)
        self.after_epoch = after_epoch
        self.events = events  # in a worker process: a queue to the parent's progress bars
        self.done = self._finished_models()

    def _finished_models(self) -> dict[str, ModelRecord]:
        return {m.key: m for m in self.store.models(self.run.id)
                if m.status in ("finished", "stopped", "failed")}

    def _register(self, members: Sequence[Member], candidate: dict[str, Candidate], role: str,
                  folds: dict[str, Fold | None]) -> None:
        rows = []
        for m in members:
            fold = folds.get(m.key)
            rows.append({
                "key": m.key, "candidate": candidate[m.key].name, "role": role,
                "repeat": fold.repeat if fold else None, "fold": fold.index if fold else None,
                "epochs_planned": candidate[m.key].train.epochs, "n_train": len(m.train_index),
                "n_val": None if m.val_index is None else len(m.val_index), "seed": m.seed,
            })
        self.store.register_models(self.run.id, rows)

    def _train(self, members: list[Member], candidate: Candidate, data: Tensors, label: str,
               keep_weights: bool = False) -> dict[str, MemberResult]:
        """Train one stack, or read it back from the store when it finished earlier."""
        if all(m.key in self.done for m in members) and not keep_weights:
            return {m.key: self._stored_result(m.key) for m in members}
        if self.events is not None:
            events = self.events

            def on_progress(epoch: int, metrics: dict[str, EpochMetrics]) -> None:
                events.put((label, epoch, mean_val_accuracy(metrics)))
        else:
            task = self.progress.add_stack(label, candidate.train.epochs)

            def on_progress(epoch: int, metrics: dict[str, EpochMetrics]) -> None:
                self.progress.update_stack(task, epoch, metrics)
        results = train_stack(
            self.store, self.run.id, members, candidate.train, data, self.device,
            checkpoint=self._checkpoint(members), keep_weights=keep_weights,
            on_progress=on_progress, after_epoch=self.after_epoch)
        if self.events is None:
            self.progress.finish_stack(task)
        return results

    def _checkpoint(self, members: Sequence[Member]) -> Path:
        digest = hashlib.sha256("\n".join(m.key for m in members).encode()).hexdigest()[:16]
        return self.output_dir / "checkpoints" / f"{digest}.pt"

    def _stored_result(self, key: str) -> MemberResult:
        record = self.done[key]
        history = [EpochMetrics(e.loss, e.accuracy, e.val_loss, e.val_accuracy, e.seconds)
                   for e in self.store.epochs(self.run.id, key)]
        return MemberResult(key, history, record.status, record.best_epoch,  # type: ignore[arg-type]
                            record.message)

    # ---- parallel jobs ------------------------------------------------------------------

    def independent_jobs(self, folds: list[Fold]) -> list[Job]:
        """What can train in any order, in any process: the cross-validation stacks and the
        final models not finished yet, largest first (so that the longest job starts first)."""
        members, owner, fold_of = cv_members(self.spec, folds)
        self._register(list(members.values()), owner, "cv", fold_of)
        jobs = []
        for stack in plan_stacks(list(members.values()), owner):
            if not all(m.key in self.done for m in stack):
                train = owner[stack[0].key].train
                flops = training_flops(stack[0].model, len(stack[0].train_index),
                                       train.epochs) * len(stack)
                jobs.append(Job("cv", tuple(m.key for m in stack), _label(stack, owner),
                                train.epochs, flops))
        for candidate in self.spec.final:
            key = f"{candidate.name}/final"
            if key not in self.done:
                n_train = len(folds[0].train_index) + len(folds[0].val_index)
                flops = training_flops(candidate.model, n_train, candidate.train.epochs)
                jobs.append(Job("final", (candidate.name,), _final_label(candidate, n_train),
                                candidate.train.epochs, flops))
        return sorted(jobs, key=lambda job: -job.flops)

    def run_in_workers(self, jobs: Sequence[Job], workers: int, inputs: _JobInputs) -> None:
        """Train `jobs` `workers` at a time: this process takes jobs too (on the CPU), the
        others run in worker processes. The results land in the store, where the steps of the
        study read them back."""
        devices = worker_devices(workers, self.device)
        here = self.device.type == "cpu"  # a GPU each: every worker is a process

        def run_here(index: int, events: Any, check: Callable[[], None]) -> None:
            runner = _Runner(self.store, self.run, self.spec, self.output_dir, self.device,
                             show=False, after_epoch=lambda key, epoch: check(), events=events)
            _run_job(runner, jobs[index], inputs)

        run_in_workers(
            [(_run_job_in_worker,
              (self.store.url, self.run.id, self.spec, self.output_dir, job,
               devices[i % len(devices)]), job.label, job.epochs)
             for i, job in enumerate(jobs)],
            workers=workers, progress=self.progress, run_here=run_here if here else None)
        self.done = self._finished_models()

    # ---- cross-validation ---------------------------------------------------------------

    def cross_validate(self, candidates: Sequence[Candidate], folds: list[Fold],
                       data: Tensors) -> list[CandidateResult]:
        members, owner, fold_of = cv_members(self.spec, folds)
        self._register(list(members.values()), owner, "cv", fold_of)
        stacks = plan_stacks(list(members.values()), owner)
        results: dict[str, MemberResult] = {}
        for stack in stacks:
            results.update(self._train(stack, owner[stack[0].key], data, _label(stack, owner)))
        return [self._summarize(c, [results[f"{c.name}/{f.name}"] for f in folds], "cv")
                for c in candidates]

    def _summarize(self, candidate: Candidate, results: list[MemberResult],
                   role: str) -> CandidateResult:
        return summarize_models(candidate, results, role, self.spec.warning)

    # ---- retrain and final models -------------------------------------------------------

    def retrain(self, best: CandidateResult, data: Tensors,
                class_names: tuple[str, ...]) -> RetrainResult:
        candidate = best.candidate
        setting = self.spec.retrain.epochs
        if setting == "warning":
            epochs = best.warning.chosen_epoch or candidate.train.epochs
        elif setting == "lowest":
            epochs = best.warning.best_epoch or candidate.train.epochs
        else:
            epochs = setting
        train = dataclasses.replace(candidate.train, epochs=epochs, early_stopping=None)
        retrained = dataclasses.replace(candidate, train=train)
        key = f"{candidate.name}/retrain"
        member = Member(key, candidate.model, np.arange(len(data.x_train)), None,
                        member_seed(self.spec.seed, "retrain"))
        self._register([member], {key: retrained}, "retrain", {})
        model_dir = self.output_dir / "models" / _safe_name(candidate.name)
        record = self.done.get(key)
        if record is not None and record.status == "finished" and model_dir.exists():
            history = self._stored_result(key).history
            return RetrainResult(candidate.name, epochs, record.test_loss or float("nan"),
                                 record.test_accuracy or float("nan"), model_dir, history)
        result = self._train([member], retrained, data, f"retrain {candidate.name} "
                             f"on all {len(data.x_train)}", keep_weights=True)[key]
        test_loss, test_accuracy = self._test(retrained, result, data)
        save_model(model_dir, spec=candidate.model, state=result.weights or {},
                   class_names=class_names, metadata=self._model_metadata(
                       retrained, epochs, test_loss, test_accuracy, role="retrain"))
        self.store.update_model(self.run.id, key, test_loss=test_loss, test_accuracy=test_accuracy)
        return RetrainResult(candidate.name, epochs, test_loss, test_accuracy, model_dir,
                             result.history)

    def train_final(self, candidate: Candidate, data: Tensors,
                    class_names: tuple[str, ...]) -> CandidateResult:
        key = f"{candidate.name}/final"
        member = Member(key, candidate.model, np.arange(len(data.x_train)),
                        np.arange(len(data.x_val)), member_seed(self.spec.seed, "final"))
        self._register([member], {key: candidate}, "final", {})
        model_dir = self.output_dir / "models" / _safe_name(candidate.name)
        record = self.done.get(key)
        if record is not None and record.status != "failed" and model_dir.exists():
            result = self._stored_result(key)
            test_loss, test_accuracy = record.test_loss, record.test_accuracy
        else:
            result = self._train([member], candidate, data,
                                 _final_label(candidate, len(data.x_train)),
                                 keep_weights=True)[key]
            test_loss, test_accuracy = self._test(candidate, result, data)
            if result.weights is not None:
                save_model(model_dir, spec=candidate.model, state=result.weights,
                           class_names=class_names, metadata=self._model_metadata(
                               candidate, len(result.history), test_loss, test_accuracy,
                               role="final"))
            self.store.update_model(self.run.id, key, test_loss=test_loss,
                                    test_accuracy=test_accuracy)
        summary = self._summarize(candidate, [result], "final")
        return dataclasses.replace(summary, test_loss=_nan(test_loss),
                                   test_accuracy=_nan(test_accuracy))

    def _test(self, candidate: Candidate, result: MemberResult,
              data: Tensors) -> tuple[float, float]:
        """Test loss and accuracy of a trained model's kept weights."""
        if result.weights is None or result.status == "failed":
            return float("nan"), float("nan")
        from fashionlab.train import StackTrainer

        member = Member(result.key, candidate.model, np.arange(1), None, 0)
        scorer = StackTrainer([member], candidate.train, data, self.device)
        scorer.load_member_state_dict(result.key, result.weights)
        index = torch.arange(len(data.x_val), device=self.device).unsqueeze(0)
        loss, accuracy = scorer.evaluate(data.x_val, data.y_val, index)
        return loss[0], accuracy[0]

    def _model_metadata(self, candidate: Candidate, epochs: int, test_loss: float,
                        test_accuracy: float, *, role: str) -> dict[str, Any]:
        return {
            "study": self.spec.name, "run_id": self.run.id, "candidate": candidate.name,
            "role": role, "epochs": epochs, "seed": self.spec.seed,
            "train": dataclasses.asdict(candidate.train),
            "test_loss": test_loss, "test_accuracy": test_accuracy,
            **self.run.environment,
        }


def summarize_models(candidate: Candidate, results: list[MemberResult], role: str,
                     rule: WarningRule) -> CandidateResult:
    """A candidate's models (its folds, or one final model) as a result: curves, the
    overfitting warning on the mean val_loss curve, and each model's score at its result
    epoch (early stopping's best epoch, else the warning epoch)."""
    epochs = candidate.train.epochs
    curves = {metric: mean_curves(results, metric, epochs) for metric in METRICS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a diverged model's NaN epochs
        # Epochs every model reached: with early stopping, later means would mix fewer folds.
        reached = min(len(r.history) for r in results)
        mean_val_loss = np.nanmean(curves["val_loss"][:, :reached], axis=0) \
            if reached else np.array([])
    warning = overfitting_warning(mean_val_loss, patience=rule.patience,
                                  min_delta=rule.min_delta)
    n = len(results)
    if candidate.train.early_stopping is not None:
        result_epochs = np.array([r.best_epoch or len(r.history) for r in results])
    else:
        result_epochs = np.full(n, warning.chosen_epoch or 0)
    pick = np.clip(result_epochs - 1, 0, max(epochs - 1, 0))
    rows = np.arange(n)
    failures = [f"{r.key}: {r.message}" for r in results if r.status == "failed"]
    return CandidateResult(
        name=candidate.name, role=role, candidate=candidate, keys=[r.key for r in results],
        curves=curves, warning=warning, result_epochs=result_epochs,
        val_loss=curves["val_loss"][rows, pick], val_accuracy=curves["val_accuracy"][rows, pick],
        trained_epochs=sum(len(r.history) for r in results), planned_epochs=n * epochs,
        failures=failures,
    )


def cv_members(
    spec: StudySpec, folds: Sequence[Fold]
) -> tuple[dict[str, Member], dict[str, Candidate], dict[str, Fold | None]]:
    """Every (candidate, fold) model of a study's cross-validation, keyed "<candidate>/<fold>".

    Seeds depend on the fold only: all candidates of a fold share initial draws and shuffles
    (common random numbers for their paired comparison)."""
    members: dict[str, Member] = {}
    owner: dict[str, Candidate] = {}
    fold_of: dict[str, Fold | None] = {}
    for candidate in spec.candidates:
        for fold in folds:
            key = f"{candidate.name}/{fold.name}"
            seed = member_seed(spec.seed, "cv", fold.repeat, fold.index)
            members[key] = Member(key, candidate.model, fold.train_index, fold.val_index, seed)
            owner[key], fold_of[key] = candidate, fold
    return members, owner, fold_of


def plan_stacks(members: list[Member], owner: dict[str, Candidate]) -> list[list[Member]]:
    """Group members that can train as one stack, in a deterministic order, capped in size."""
    groups: dict[Any, list[Member]] = {}
    for member in members:
        groups.setdefault(stack_key(member, owner[member.key].train), []).append(member)
    stacks = []
    for group in groups.values():
        cap = MAX_STACK[group[0].model.kind]
        stacks += [group[i : i + cap] for i in range(0, len(group), cap)]
    return stacks


def _label(stack: Sequence[Member], owner: dict[str, Candidate]) -> str:
    names = list(dict.fromkeys(owner[m.key].name for m in stack))
    return f"{' · '.join(names)}  ({len(stack)} models)"


def _final_label(candidate: Candidate, n_train: int) -> str:
    return f"{candidate.name} on all {n_train}, test set as validation"


@dataclass(frozen=True)
class _JobInputs:
    folds: list[Fold]
    class_names: tuple[str, ...]
    cv_data: Tensors  # the training images, validated on themselves (folds)
    final_data: Tensors  # the training images, validated on the test set


def _run_job(runner: _Runner, job: Job, inputs: _JobInputs) -> None:
    """Train one job into the store (and its model files) as the study's steps would."""
    spec = runner.spec
    if job.kind == "cv":
        members, owner, _ = cv_members(spec, inputs.folds)
        runner._train([members[k] for k in job.names], owner[job.names[0]], inputs.cv_data,
                      job.label)
    else:
        candidate = next(c for c in spec.final if c.name == job.names[0])
        runner.train_final(candidate, inputs.final_data, inputs.class_names)


def _run_job_in_worker(store_url: str, run_id: str, spec: StudySpec, output_dir: Path,
                       job: Job, device: str, events: Any) -> None:
    """A worker process's job: load the data, train the job, report epochs on `events`."""
    torch_device = torch.device(device)
    dataset = load_data(spec)
    dtype = image_dtype(spec, torch_device)
    x_train, y_train = to_tensors(dataset.train, torch_device, dtype)
    x_test, y_test = (to_tensors(dataset.test, torch_device, dtype) if job.kind == "final"
                      else (x_train[:0], y_train[:0]))
    folds = make_folds(len(dataset.train), spec.cv, seed=spec.seed, labels=dataset.train.labels)
    inputs = _JobInputs(folds, dataset.class_names, Tensors(x_train, y_train, x_train, y_train),
                        Tensors(x_train, y_train, x_test, y_test))
    del dataset  # the images live in the tensors now: no second copy while training
    store = Store(store_url)
    try:
        runner = _Runner(store, store.run(run_id), spec, output_dir, torch_device, show=False,
                         after_epoch=None, events=events)
        _run_job(runner, job, inputs)
    finally:
        store.close()


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)
