"""Running a study: cross-validate the candidates, warn about overfitting, retrain the best and
test it, train the final models, and store every epoch on the way.

A study is resumable at any moment: every stack of models checkpoints after each epoch and the
store holds every finished epoch, so running the same study again continues where it stopped
and ends with the numbers an uninterrupted run gives. The steps themselves live in
`fashionlab.steps` (a search shares them); this module orders them and spreads the
independent ones over worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fashionlab import stats
from fashionlab.config import StudySpec
from fashionlab.cv import Fold, make_folds
from fashionlab.data import Dataset, to_tensors
from fashionlab.errors import ConfigError
from fashionlab.hardware import resolve_device
from fashionlab.progress import Reporter, reporting
from fashionlab.provenance import environment
from fashionlab.report import REPORT_NAME, ReportError, write_report
from fashionlab.results import StudyResult, summary, write_outputs
from fashionlab.runner import (
    Job,
    auto_workers,
    image_dtype,
    run_in_workers,
    threads_per_job,
    training_flops,
    worker_devices,
)
from fashionlab.steps import (
    CandidateResult,
    RunContext,
    cv_members,
    final_label,
    finished_models,
    load_study_data,
    plan_stacks,
    register_models,
    retrain,
    stack_label,
    summarize_models,
    train_final,
    train_or_reuse,
)
from fashionlab.store import DEFAULT_RUN_DIR, RunRecord, Store
from fashionlab.train import Tensors
from fashionlab.twins import find_twins

__all__ = ["StudyResult", "cross_validate", "independent_jobs", "run_study"]


def run_study(
    spec: StudySpec,
    *,
    run_dir: str | Path = DEFAULT_RUN_DIR,
    store_url: str | None = None,
    device: str | None = None,
    fresh: bool = False,
    progress: bool | Reporter = True,
    dataset: Dataset | None = None,
    workers: int | Literal["auto"] = 1,
    threads: int | None = None,
) -> StudyResult:
    """Run (or resume) a study and return its results; files go under run_dir/<run id>/.

    The latest run of the identical resolved config is continued unless `fresh`: an
    interrupted one resumes, a finished one is read back from the store without training.
    `progress`: bars on stderr (True), nothing (False), or your own `progress.Reporter`.
    `workers` > 1 trains the independent jobs (cross-validation stacks, final models) in that
    many processes, each with its share of the CPU threads, or GPUs round-robin when the device
    is CUDA; "auto" (the command line's default) picks a number from the machine and the work
    (see `auto_workers`). Workers start by the spawn method, which re-imports the calling
    script: a script asking for workers needs the usual `if __name__ == "__main__":` guard.
    `threads`: the CPU threads each job trains with (default: its share of the cores). A
    convolution's numbers depend on it on most CPUs (oneDNN picks its kernels by the thread
    count); dense models give the same numbers whatever it is.
    """
    started = time.perf_counter()
    torch_device = resolve_device(device)
    if threads is not None and threads < 1:
        raise ConfigError(f"threads: expected a positive number, got {threads}")
    run_dir = Path(run_dir)
    store = Store.open(run_dir, store_url)
    dataset = dataset if dataset is not None else load_study_data(spec)
    folds = make_folds(len(dataset.train), spec.cv, seed=spec.seed, labels=dataset.train.labels)
    run = _start_run(store, spec, run_dir, str(torch_device), fresh)
    shown = run.status == "finished"  # read back from the store: nothing is written
    output_dir = Path(run.output_dir or run_dir / run.id)
    result = StudyResult(run, spec, output_dir, n_train=len(folds[0].train_index),
                         n_val=len(folds[0].val_index))
    threads_before = torch.get_num_threads()
    try:
        with reporting(progress) as reporter:
            ctx = RunContext(store, run, spec, output_dir, torch_device, reporter)
            dtype = image_dtype(spec, torch_device)
            x_train, y_train = to_tensors(dataset.train, torch_device, dtype)
            x_test, y_test = to_tensors(dataset.test, torch_device, dtype)
            cv_data = Tensors(x_train, y_train, x_train, y_train)
            final_data = Tensors(x_train, y_train, x_test, y_test)
            # Planned from the whole study, not from what is left: a resumed run trains with
            # the threads per job of the first start (a CNN's numbers depend on them).
            planned = independent_jobs(ctx, folds, pending_only=False)
            if workers == "auto":
                workers = auto_workers(planned, torch_device)
            parallel = workers > 1 and len(planned) > 1
            result.threads = threads or (threads_per_job(workers) if parallel
                                         else torch.get_num_threads())
            jobs = independent_jobs(ctx, folds)
            if parallel and len(jobs) > 1:
                _train_in_workers(ctx, jobs, workers, result.threads,
                                  _JobInputs(folds, dataset.class_names, cv_data, final_data))
            if parallel:
                result.workers = workers
            torch.set_num_threads(result.threads)
            result.candidates = cross_validate(ctx, folds, cv_data)
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
                result.retrain = retrain(ctx, best, final_data, dataset.class_names)
            result.final = [train_final(ctx, c, final_data, dataset.class_names)
                            for c in spec.final]
        if not shown:
            result.wall_seconds = time.perf_counter() - started
            write_outputs(result, dataset)
            store.end_run(run.id, "finished", summary(result))
    except BaseException:
        if not shown:
            store.end_run(run.id, "interrupted")  # resumable, even from this process
        raise
    finally:
        torch.set_num_threads(threads_before)
    if shown:
        stored = run.summary or {}
        result.wall_seconds = float(stored.get("wall_seconds") or 0.0)
        result.workers = int(stored.get("workers") or 1)
        result.threads = int(stored.get("threads") or 0)
        _tidy(store, run.id, output_dir, torch_device)
        store.close()
        return result
    write_report(store, run.id, device=torch_device)  # the report reads the finished run back
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    result.run = store.run(run.id)
    store.close()
    return result


def _tidy(store: Store, run_id: str, output_dir: Path, device: torch.device) -> None:
    """What a run killed just after it finished may lack: its report, and the removal of its
    checkpoints. Best effort, where the directory can be written; the store is only read."""
    with contextlib.suppress(OSError):
        shutil.rmtree(output_dir / "checkpoints")
    if not (output_dir / REPORT_NAME).exists():
        with contextlib.suppress(ReportError):
            write_report(store, run_id, device=device)


def _start_run(store: Store, spec: StudySpec, run_dir: Path, device: str, fresh: bool) -> RunRecord:
    fingerprint = spec.fingerprint()
    if not fresh:
        for run in store.runs(kind="study", fingerprint=fingerprint):
            if run.state == "running":
                raise ConfigError(f"run {run.id} of this study is still running "
                                  f"(pid {run.pid} on {run.host}); wait for it or pass --fresh")
            # A finished run is shown again from the store: every model is read back, nothing
            # retrains and nothing is written (a read-only store will do). An interrupted
            # one continues.
            if run.state == "finished":
                return run
            if run.state == "interrupted":
                return store.claim_run(run.id)
    return store.create_run(kind="study", name=spec.name, fingerprint=fingerprint,
                            seed=spec.seed, config=spec.to_dict(),
                            environment=environment(device), output_root=run_dir)


def cross_validate(ctx: RunContext, folds: list[Fold], data: Tensors) -> list[CandidateResult]:
    """Every candidate of the study over the folds (stacks trained here, or read back when
    they finished earlier), summarised in study order."""
    members, owner, fold_of = cv_members(ctx.spec, folds)
    register_models(ctx, list(members.values()), owner, "cv", fold_of)
    results = {}
    for stack in plan_stacks(list(members.values()), owner):
        results.update(train_or_reuse(ctx, stack, owner[stack[0].key], data,
                                      stack_label(stack, owner)))
    return [summarize_models(c, [results[f"{c.name}/{f.name}"] for f in folds], "cv",
                             ctx.spec.warning) for c in ctx.spec.candidates]


def independent_jobs(ctx: RunContext, folds: list[Fold], *,
                     pending_only: bool = True) -> list[Job]:
    """What can train in any order, in any process: the cross-validation stacks and the final
    models (those not finished yet, unless `pending_only` is false), largest first (so that
    the longest job starts first)."""
    members, owner, fold_of = cv_members(ctx.spec, folds)
    register_models(ctx, list(members.values()), owner, "cv", fold_of)
    done = finished_models(ctx.store, ctx.run.id) if pending_only else {}
    jobs = []
    for stack in plan_stacks(list(members.values()), owner):
        if not all(m.key in done for m in stack):
            train = owner[stack[0].key].train
            flops = training_flops(stack[0].model, len(stack[0].train_index),
                                   train.epochs) * len(stack)
            jobs.append(Job("cv", tuple(m.key for m in stack), stack_label(stack, owner),
                            train.epochs, flops))
    n_train = len(folds[0].train_index) + len(folds[0].val_index)
    for candidate in ctx.spec.final:
        if f"{candidate.name}/final" not in done:
            flops = training_flops(candidate.model, n_train, candidate.train.epochs)
            jobs.append(Job("final", (candidate.name,), final_label(candidate, n_train),
                            candidate.train.epochs, flops))
    return sorted(jobs, key=lambda job: -job.flops)


# --------------------------------------------------------------------------------------------
# Independent jobs in worker processes


@dataclass(frozen=True)
class _JobInputs:
    folds: list[Fold]
    class_names: tuple[str, ...]
    cv_data: Tensors  # the training images, validated on themselves (folds)
    final_data: Tensors  # the training images, validated on the test set


def _train_in_workers(ctx: RunContext, jobs: Sequence[Job], workers: int, threads: int,
                      inputs: _JobInputs) -> None:
    """Train `jobs` `workers` at a time: this process takes jobs too (on the CPU), the others
    run in worker processes. The results land in the store, where the study's steps read
    them back."""
    devices = worker_devices(workers, ctx.device)
    here = ctx.device.type == "cpu"  # a GPU each: every worker is a process

    def run_here(index: int, reporter: Reporter, check: Any) -> None:
        _run_job(dataclasses.replace(ctx, reporter=_Checked(reporter, check)), jobs[index],
                 inputs)

    run_in_workers(
        [(_run_job_in_worker,
          (ctx.store.url, ctx.run.id, ctx.spec, ctx.output_dir, job, devices[i % len(devices)]),
          job.label, job.epochs)
         for i, job in enumerate(jobs)],
        workers=workers, reporter=ctx.reporter, threads=threads,
        run_here=run_here if here else None)


class _Checked:
    """The reporter of a job trained in this process beside the workers: after each epoch it
    checks whether the parallel phase was abandoned (and then stops the job)."""

    def __init__(self, reporter: Reporter, check: Any) -> None:
        self.reporter, self.check = reporter, check

    def start(self, label: str, epochs: int) -> None:
        self.reporter.start(label, epochs)

    def epoch(self, label: str, epoch: int, metrics: Any) -> None:
        self.reporter.epoch(label, epoch, metrics)
        self.check()

    def finish(self, label: str) -> None:
        self.reporter.finish(label)

    def log(self, message: str) -> None:
        self.reporter.log(message)


def _run_job(ctx: RunContext, job: Job, inputs: _JobInputs) -> None:
    """Train one job into the store (and its model files) as the study's steps would."""
    if job.kind == "cv":
        members, owner, _ = cv_members(ctx.spec, inputs.folds)
        train_or_reuse(ctx, [members[k] for k in job.names], owner[job.names[0]],
                       inputs.cv_data, job.label)
    else:
        candidate = next(c for c in ctx.spec.final if c.name == job.names[0])
        train_final(ctx, candidate, inputs.final_data, inputs.class_names)


def _run_job_in_worker(store_url: str, run_id: str, spec: StudySpec, output_dir: Path,
                       job: Job, device: str, reporter: Reporter) -> None:
    """A worker process's job: load the data, train the job, report through `reporter`."""
    torch_device = torch.device(device)
    dataset = load_study_data(spec)
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
        ctx = RunContext(store, store.run(run_id), spec, output_dir, torch_device, reporter)
        _run_job(ctx, job, inputs)
    finally:
        store.close()
