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
from fashionlab.errors import ConfigError, StoreError
from fashionlab.hardware import resolve_device
from fashionlab.jobs import (
    Claim,
    ClaimLock,
    ClaimLost,
    claim_grace,
    claim_job,
    command_identity,
    drop_checkpoints,
    job_rows,
    register_jobs,
    release_claims,
    reopen_job,
)
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
    run, joined = _start_run(store, spec, run_dir, str(torch_device), fresh)
    shown = run.status == "finished"  # read back from the store: nothing is written
    # On a database server every process keeps its files (checkpoints, the models it trains,
    # the outputs if it writes them) in its own run directory: another machine's may not
    # exist here. A SQLite store has one machine, and the run's directory.
    output_dir = (run_dir / run.id).resolve() if store.shared and not shown \
        else Path(run.output_dir or run_dir / run.id)
    result = StudyResult(run, spec, output_dir, n_train=len(folds[0].train_index),
                         n_val=len(folds[0].val_index))
    me = command_identity()
    threads_before = torch.get_num_threads()
    outputs: Claim | None = None
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
            if parallel:
                result.workers = workers
            if not shown:
                # Every process of the run, on any machine, trains each job with the threads
                # its first registration planned: the numbers do not depend on who trains it.
                result.threads = register_jobs(store, run.id, _job_plan(spec, planned),
                                               result.threads)
                inputs = _JobInputs(folds, dataset.class_names, cv_data, final_data)
                _train_jobs(ctx, planned, workers if parallel else 1, result.threads, inputs,
                            me)
                outputs = _claim_outputs(ctx, me)
                result.trained_here = [job.label for job in job_rows(store, run.id).values()
                                       if job.claimed_by == me and job.key != OUTPUTS]
                if outputs is None:  # another process writes the outputs
                    result.results_by = job_rows(store, run.id)[OUTPUTS].claimed_by
                    _leave(store, output_dir)
                    return result
                ctx = dataclasses.replace(ctx, claim=outputs)
            torch.set_num_threads(result.threads)
            result.candidates, result.comparisons, result.best = _cross_validated(
                ctx, folds, cv_data, result.n_train, result.n_val)
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
            store.end_run(run.id, "finished", summary(result), output_dir=output_dir)
    except BaseException:
        if not shown:
            # What this process (and its workers) held goes back at once to the others; the
            # run stays resumable, even from this process.
            with contextlib.suppress(StoreError):
                release_claims(store, run.id, by=me)
            if not joined:
                store.end_run(run.id, "interrupted")
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
    drop_checkpoints(store, run.id)
    if outputs is not None:
        outputs.done()
    result.run = store.run(run.id)
    store.close()
    return result


def _leave(store: Store, output_dir: Path) -> None:
    """A process of a shared run that does not write its outputs: its checkpoint files are
    stored in the database (the writer removes them there), the models it saved stay."""
    if store.shared:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    store.close()


def _cross_validated(ctx: RunContext, folds: list[Fold], cv_data: Tensors, n_train: int,
                     n_val: int) -> tuple[list[CandidateResult], list[stats.Comparison],
                                          str | None]:
    """The candidates' cross-validation (read back once trained), their paired comparisons
    with the best, and the best (None when every candidate failed)."""
    candidates = cross_validate(ctx, folds, cv_data)
    scored = {c.name: c.val_accuracy for c in candidates if not c.failed}
    comparisons = stats.compare_to_best(scored, n_train=n_train, n_test=n_val) \
        if len(scored) >= 2 and len(folds) >= 2 else []
    best = max(scored, key=lambda name: float(np.nanmean(scored[name]))) if scored else None
    return candidates, comparisons, best


def _tidy(store: Store, run_id: str, output_dir: Path, device: torch.device) -> None:
    """What a run killed just after it finished may lack: its report, and the removal of its
    checkpoints. Best effort, where the directory can be written; the store is only read."""
    with contextlib.suppress(OSError):
        shutil.rmtree(output_dir / "checkpoints")
    if not (output_dir / REPORT_NAME).exists():
        with contextlib.suppress(ReportError):
            write_report(store, run_id, device=device)


def _start_run(store: Store, spec: StudySpec, run_dir: Path, device: str,
               fresh: bool) -> tuple[RunRecord, bool]:
    """The run to show, continue, join or start, and whether this process joined it (another
    process runs it: its row stays theirs)."""
    fingerprint = spec.fingerprint()
    # One process at a time looks and creates, so that processes started together on several
    # machines join one run instead of each creating its own.
    lock = contextlib.nullcontext() if store.read_only else \
        ClaimLock(store.url, fingerprint, kind="study")
    with lock:
        if not fresh:
            for run in store.runs(kind="study", fingerprint=fingerprint):
                if run.state == "running":
                    if not store.shared:
                        raise ConfigError(
                            f"run {run.id} of this study is being trained by another process "
                            f"(pid {run.pid} on {run.host}); to train it from several "
                            "processes, run the same command on each with a database server "
                            "store (--store postgresql://...; README: Many machines); or wait "
                            "for it, or pass --fresh")
                    return store.join_run(run.id), True
                # A finished run is shown again from the store: every model is read back,
                # nothing retrains and nothing is written (a read-only store will do). An
                # interrupted one continues.
                if run.state == "finished":
                    return run, False
                if run.state == "interrupted":
                    if not store.shared:  # one machine, and its process is gone
                        release_claims(store, run.id)
                    return store.claim_run(run.id), False
        return store.create_run(kind="study", name=spec.name, fingerprint=fingerprint,
                                seed=spec.seed, config=spec.to_dict(),
                                environment=environment(device), output_root=run_dir), False


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
# Jobs claimed from the store: by this process, its workers, and other processes of the run

RETRAIN = "retrain"  # the job that retrains the best candidate, once the CV is complete
OUTPUTS = "outputs"  # the job of writing the results: whoever claims it once all is trained


def job_key(job: Job) -> str:
    """A job's key in the store: its kind and its first model (each model is in one job)."""
    return f"{job.kind}:{job.names[0]}"


def _job_plan(spec: StudySpec, planned: Sequence[Job]) -> list[tuple[str, str]]:
    """(key, label) of every job of the study, in the order to claim them."""
    plan = [(job_key(job), job.label) for job in planned]
    if spec.retrain.enabled:
        plan.append((RETRAIN, "retrain the best candidate on all training images"))
    return [*plan, (OUTPUTS, "write the results")]


def _poll_seconds() -> float:
    """How often a process with nothing to claim looks again: a fraction of the grace period
    (so a lost job waits little more than it), at most 5 s."""
    return min(5.0, claim_grace() / 4)


def _train_jobs(ctx: RunContext, planned: Sequence[Job], workers: int, threads: int,
                inputs: _JobInputs, me: str) -> None:
    """Train the jobs this process can claim (with `workers` processes), the retrain once the
    cross-validation is complete, and wait for the jobs of other processes, taking over any
    whose process is gone; returns when every job but the outputs is done."""
    by_key = {job_key(job): job for job in planned}
    grace = claim_grace()
    told = False
    while True:
        rows = job_rows(ctx.store, ctx.run.id)
        open_jobs = {k: r for k, r in rows.items() if r.status != "done" and k != OUTPUTS}
        if not open_jobs:
            return
        ready = [by_key[k] for k, r in open_jobs.items() if k in by_key and r.claimable(grace)]
        if ready:
            if workers > 1 and len(ready) > 1:
                _train_in_workers(ctx, ready, workers, threads, inputs, me)
            else:
                for job in ready:
                    _claim_and_run(ctx, job, inputs, me)
            continue
        cv_done = all(rows[job_key(j)].status == "done" for j in planned if j.kind == "cv")
        if RETRAIN in open_jobs and cv_done and open_jobs[RETRAIN].claimable(grace):
            claim = claim_job(ctx.store, ctx.run.id, RETRAIN, by=me, grace=grace)
            if claim is not None:
                _holding(claim, lambda c: _retrain_job(dataclasses.replace(ctx, claim=c),
                                                       inputs), ctx.reporter, "the retrain")
            continue
        if not told:
            held = sorted({r.claimed_by for r in open_jobs.values() if r.claimed_by})
            ctx.reporter.log(f"waiting for {len(open_jobs)} job(s) trained by "
                             f"{', '.join(held) or 'other processes'}")
            told = True
        time.sleep(_poll_seconds())


def _claim_outputs(ctx: RunContext, me: str) -> Claim | None:
    """The claim of writing the results, or None when another process has it (or did it)."""
    while True:
        claim = claim_job(ctx.store, ctx.run.id, OUTPUTS, by=me)
        if claim is not None:
            return claim
        row = job_rows(ctx.store, ctx.run.id)[OUTPUTS]
        if row.status == "done" and ctx.store.run(ctx.run.id).status != "finished":
            # Marked done, yet the run did not finish (its row was changed since): again.
            reopen_job(ctx.store, ctx.run.id, OUTPUTS)
            continue
        if row.status == "done" or not row.claimable(claim_grace()):
            return None
        time.sleep(0.1)  # being claimed at this moment by a process that may yet fail


def _holding(claim: Claim, work: Any, reporter: Reporter, what: str) -> None:
    """`work(claim)`, then the job is done; a claim lost on the way leaves the job to the
    process that took it over, anything else gives it back (to be claimed again)."""
    done = False
    try:
        work(claim)
        done = True
    except ClaimLost as lost:
        reporter.log(f"{what}: {lost}; left to it")
    finally:
        if done:
            claim.done()
        else:
            with contextlib.suppress(StoreError):
                claim.release()


def _claim_and_run(ctx: RunContext, job: Job, inputs: _JobInputs, me: str) -> None:
    """Train the job if this process can claim it (else another process has it)."""
    claim = claim_job(ctx.store, ctx.run.id, job_key(job), by=me)
    if claim is None:
        return
    if claim.threads:
        torch.set_num_threads(claim.threads)
    _holding(claim, lambda c: _run_job(dataclasses.replace(ctx, claim=c), job, inputs),
             ctx.reporter, job.label)


def _retrain_job(ctx: RunContext, inputs: _JobInputs) -> None:
    """Retrain the best candidate of the (complete) cross-validation."""
    n_train, n_val = len(inputs.folds[0].train_index), len(inputs.folds[0].val_index)
    candidates, _, best = _cross_validated(ctx, inputs.folds, inputs.cv_data, n_train, n_val)
    if best is not None:
        retrain(ctx, next(c for c in candidates if c.name == best), inputs.final_data,
                inputs.class_names)


# --------------------------------------------------------------------------------------------
# Independent jobs in worker processes


@dataclass(frozen=True)
class _JobInputs:
    folds: list[Fold]
    class_names: tuple[str, ...]
    cv_data: Tensors  # the training images, validated on themselves (folds)
    final_data: Tensors  # the training images, validated on the test set


def _train_in_workers(ctx: RunContext, jobs: Sequence[Job], workers: int, threads: int,
                      inputs: _JobInputs, me: str) -> None:
    """Train `jobs` `workers` at a time: this process takes jobs too (on the CPU), the others
    run in worker processes; each claims its job as it starts it (on behalf of `me`) and
    skips it when another process was first. The results land in the store, where the
    study's steps read them back."""
    devices = worker_devices(workers, ctx.device)
    here = ctx.device.type == "cpu"  # a GPU each: every worker is a process

    def run_here(index: int, reporter: Reporter, check: Any) -> None:
        _claim_and_run(dataclasses.replace(ctx, reporter=_Checked(reporter, check)),
                       jobs[index], inputs, me)

    run_in_workers(
        [(_run_job_in_worker,
          (ctx.store.url, ctx.run.id, ctx.spec, ctx.output_dir, job, devices[i % len(devices)],
           me),
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
                       job: Job, device: str, me: str, reporter: Reporter) -> None:
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
        _claim_and_run(ctx, job, inputs, me)
    finally:
        store.close()
