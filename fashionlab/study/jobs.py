"""A study's jobs: what trains in any order, in any process (the cross-validation stacks, the
final models), the retrain once the cross-validation is complete, and the writing of the
results. Each is claimed from the store (its rows and claims are `fashionlab.jobs`') by this
process, its workers or another process of the run, and trained here or in worker processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fashionlab.config import StudySpec
from fashionlab.cv import Fold
from fashionlab.errors import StoreError
from fashionlab.jobs import Claim, ClaimLost, claim_grace, claim_job, job_rows, reopen_job
from fashionlab.progress import Reporter
from fashionlab.runner import Job, run_in_workers, training_flops, worker_devices
from fashionlab.steps import (
    RunContext,
    cv_members,
    final_label,
    finished_models,
    plan_stacks,
    register_models,
    retrain,
    stack_label,
    train_final,
    train_or_reuse,
)
from fashionlab.store import Store
from fashionlab.study.selection import cross_validated
from fashionlab.train import Tensors

__all__ = ["OUTPUTS", "RETRAIN", "JobInputs", "claim_outputs", "independent_jobs", "job_key",
           "job_plan", "train_jobs"]


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


def job_plan(spec: StudySpec, planned: Sequence[Job]) -> list[tuple[str, str]]:
    """(key, label) of every job of the study, in the order to claim them."""
    plan = [(job_key(job), job.label) for job in planned]
    if spec.retrain.enabled:
        plan.append((RETRAIN, "retrain the best candidate on all training images"))
    return [*plan, (OUTPUTS, "write the results")]


def _poll_seconds() -> float:
    """How often a process with nothing to claim looks again: a fraction of the grace period
    (so a lost job waits little more than it), at most 5 s."""
    return min(5.0, claim_grace() / 4)


def train_jobs(ctx: RunContext, planned: Sequence[Job], workers: int, threads: int,
               inputs: JobInputs, me: str) -> Claim | None:
    """Train the jobs this process can claim (with `workers` processes), the retrain once the
    cross-validation is complete, and wait for the jobs of other processes, taking over any
    whose process is gone; returns when every job but the outputs is done, with the claim of
    the outputs where this process took it while it waited (see below)."""
    by_key = {job_key(job): job for job in planned}
    grace = claim_grace()
    told = False
    waiting: Claim | None = None
    try:
        while True:
            rows = job_rows(ctx.store, ctx.run.id)
            open_jobs = {k: r for k, r in rows.items() if r.status != "done" and k != OUTPUTS}
            if not open_jobs:
                return waiting
            ready = [by_key[k] for k, r in open_jobs.items()
                     if k in by_key and r.claimable(grace)]
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
            if waiting is None:
                # A process that waits for the others' jobs holds the run's last one, the
                # writing of its outputs: so it counts among those that train the run on (a
                # process of the run that is stopped now leaves the run running, to it, and
                # takes up what that one gives back), and it writes the outputs once the
                # others are done. Held by another waiting process: that one will.
                waiting = claim_job(ctx.store, ctx.run.id, OUTPUTS, by=me, grace=grace)
            if not told:
                held = sorted({r.claimed_by for r in open_jobs.values() if r.claimed_by})
                ctx.reporter.log(f"waiting for {len(open_jobs)} job(s) trained by "
                                 f"{', '.join(held) or 'other processes'}")
                told = True
            time.sleep(_poll_seconds())
    except BaseException:
        if waiting is not None:
            with contextlib.suppress(StoreError):
                waiting.release()
        raise


def claim_outputs(ctx: RunContext, me: str, waiting: Claim | None = None) -> Claim | None:
    """The claim of writing the results, or None when another process has it (or did it).
    `waiting`: the claim `train_jobs` took, used while it is still this process's (a process
    paused past the grace period may have lost it)."""
    if waiting is not None:
        if waiting.held():
            return waiting
        waiting.release()  # stops its heartbeat; gives back nothing of another's
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


def _claim_and_run(ctx: RunContext, job: Job, inputs: JobInputs, me: str) -> None:
    """Train the job if this process can claim it (else another process has it)."""
    claim = claim_job(ctx.store, ctx.run.id, job_key(job), by=me)
    if claim is None:
        return
    if claim.threads:
        torch.set_num_threads(claim.threads)
    _holding(claim, lambda c: _run_job(dataclasses.replace(ctx, claim=c), job, inputs),
             ctx.reporter, job.label)


def _retrain_job(ctx: RunContext, inputs: JobInputs) -> None:
    """Retrain the best candidate of the (complete) cross-validation."""
    n_train, n_val = len(inputs.folds[0].train_index), len(inputs.folds[0].val_index)
    candidates, _, best = cross_validated(ctx, inputs.folds, inputs.cv_data, n_train, n_val)
    if best is not None:
        retrain(ctx, next(c for c in candidates if c.name == best), inputs.final_data,
                inputs.class_names)


# --------------------------------------------------------------------------------------------
# Independent jobs in worker processes


@dataclass(frozen=True)
class JobInputs:
    """What a job trains on: the folds, the class names, the images as tensors. Loaded once
    by each process of a run; its workers map their parent's (`_in_shared_memory`)."""

    folds: list[Fold]
    class_names: tuple[str, ...]
    cv_data: Tensors  # the training images, validated on themselves (folds)
    final_data: Tensors  # the training images, validated on the test set


def _train_in_workers(ctx: RunContext, jobs: Sequence[Job], workers: int, threads: int,
                      inputs: JobInputs, me: str) -> None:
    """Train `jobs` `workers` at a time: this process takes jobs too (on the CPU), the others
    run in worker processes; each claims its job as it starts it (on behalf of `me`) and
    skips it when another process was first. The results land in the store, where the
    study's steps read them back."""
    devices = worker_devices(workers, ctx.device)
    here = ctx.device.type == "cpu"  # a GPU each: every worker is a process
    shared = _in_shared_memory(inputs)

    def run_here(index: int, reporter: Reporter, check: Any) -> None:
        _claim_and_run(dataclasses.replace(ctx, reporter=_Checked(reporter, check)),
                       jobs[index], inputs, me)

    run_in_workers(
        [(_run_job_in_worker,
          (ctx.store.url, ctx.run.id, ctx.spec, ctx.output_dir, job, devices[i % len(devices)],
           me, shared),
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


def _run_job(ctx: RunContext, job: Job, inputs: JobInputs) -> None:
    """Train one job into the store (and its model files) as the study's steps would."""
    if job.kind == "cv":
        members, owner, _ = cv_members(ctx.spec, inputs.folds)
        train_or_reuse(ctx, [members[k] for k in job.names], owner[job.names[0]],
                       inputs.cv_data, job.label)
    else:
        candidate = next(c for c in ctx.spec.final if c.name == job.names[0])
        train_final(ctx, candidate, inputs.final_data, inputs.class_names)


def _run_job_in_worker(store_url: str, run_id: str, spec: StudySpec, output_dir: Path,
                       job: Job, device: str, me: str, inputs: JobInputs,
                       reporter: Reporter) -> None:
    """A worker process's job: train it on `inputs` (the parent's, in shared memory; copied
    to this worker's GPU if it has one), report through `reporter`."""
    torch_device = torch.device(device)
    inputs = _on_device(inputs, torch_device)
    store = Store(store_url)
    try:
        ctx = RunContext(store, store.run(run_id), spec, output_dir, torch_device, reporter)
        _claim_and_run(ctx, job, inputs, me)
    finally:
        store.close()


def _in_shared_memory(inputs: JobInputs) -> JobInputs:
    """`inputs` with their tensors in shared memory, for the workers to map instead of loading
    their own copy (55 MB of pixels less per worker, no decompression at each job's start,
    and the very data this process was given). CPU tensors move in place (same values, same
    objects); a GPU's are copied to the host once each. They travel to the workers as file
    descriptors, which die with the processes that hold them."""
    return _map_tensors(inputs, lambda t: t.cpu().share_memory_())  # share_: no-op if shared


def _on_device(inputs: JobInputs, device: torch.device) -> JobInputs:
    """`inputs` on `device` (a GPU worker's own GPU; on the CPU, the same tensors)."""
    return _map_tensors(inputs, lambda t: t.to(device))


def _map_tensors(inputs: JobInputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> JobInputs:
    """`inputs` with `fn` applied once to each distinct tensor: the final models' training
    images are the cross-validation's, and stay one tensor."""
    done: dict[int, torch.Tensor] = {}

    def once(tensors: Tensors) -> Tensors:
        fields = [getattr(tensors, f.name) for f in dataclasses.fields(tensors)]
        for t in fields:
            if id(t) not in done:
                done[id(t)] = fn(t)
        return Tensors(*(done[id(t)] for t in fields))

    return dataclasses.replace(inputs, cv_data=once(inputs.cv_data),
                               final_data=once(inputs.final_data))
