"""run_study: start, continue or join the run, train its jobs, read the cross-validation
back, retrain the best and test it, train the final models, write the outputs and the report.

The jobs themselves (what each process claims and trains, here or in worker processes) are
`fashionlab.study.jobs`'; the cross-validation read back is `fashionlab.study.selection`'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch

from fashionlab import stops
from fashionlab.arguments import (
    check_count,
    check_dataset,
    check_flag,
    check_not_starting_a_worker,
    check_progress,
    check_run_dir,
)
from fashionlab.artifacts import WEIGHTS_FILE
from fashionlab.config import StudySpec, check_spec
from fashionlab.cv import make_folds
from fashionlab.data import Dataset, to_tensors
from fashionlab.errors import ConfigError, OutputError, StoreError
from fashionlab.hardware import release_freed_memory, resolve_device
from fashionlab.jobs import (
    Claim,
    ClaimLock,
    claim_grace,
    command_identity,
    drop_checkpoints,
    held_elsewhere,
    job_rows,
    register_jobs,
    release_claims,
)
from fashionlab.progress import Reporter, reporting
from fashionlab.provenance import environment
from fashionlab.report import REPORT_NAME, ReportError, write_report
from fashionlab.results import (
    RESULT_FILES,
    RESULTS_FILE,
    SAMPLES_PER_CLASS,
    StudyResult,
    summary,
    write_outputs,
)
from fashionlab.runner import auto_workers, threads_per_job
from fashionlab.serialize import remove_stale_staging
from fashionlab.steps import (
    RunContext,
    data_record,
    limit_study_data,
    load_study_data,
    note_unresumed_run,
    retrain,
    same_data,
    train_final,
)
from fashionlab.store import DEFAULT_RUN_DIR, RunRecord, Store, this_process
from fashionlab.study.jobs import (
    OUTPUTS,
    JobInputs,
    claim_outputs,
    independent_jobs,
    job_plan,
    train_jobs,
)
from fashionlab.study.selection import cross_validated
from fashionlab.train import Tensors
from fashionlab.twins import find_twins

__all__ = ["run_study"]


@stops.listened
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
    check_not_starting_a_worker("run_study")
    check_spec(spec)
    run_dir = check_run_dir(run_dir)
    check_flag("fresh", fresh)
    check_progress(progress)
    check_dataset(dataset)
    check_count("workers", workers, auto=True)
    if threads is not None:
        check_count("threads", threads)
        _check_threads(threads)
    claim_grace()  # a bad FASHIONLAB_CLAIM_GRACE is said now, not once a run exists
    torch_device = resolve_device(device)
    # The data and its folds first: a study whose data cannot be read, or that has more folds
    # than images, leaves no store behind.
    # A given dataset stands for the study's files: its `[data]` limits apply to it too.
    with stops.before_the_run():
        dataset = load_study_data(spec) if dataset is None else limit_study_data(spec, dataset)
        folds = make_folds(len(dataset.train), spec.cv, seed=spec.seed,
                           labels=dataset.train.labels)
        data = data_record(dataset)
        store = Store.open(run_dir, store_url)
        run, joined, resumed = _start_run(store, spec, run_dir, str(torch_device), fresh, data)
    shown = run.status == "finished"  # read back from the store: nothing is written
    # A run's files live in <run dir>/<run id>, whatever folder the store recorded: on a
    # database server every process keeps its files (checkpoints, the models it trains, the
    # outputs if it writes them) in its own run directory, another machine's may not exist
    # here; a run directory moved or copied resumes in its new place, not in the old one. A
    # finished run is shown where its results are: here (a run directory moved or copied),
    # else where they were written (the writer's run directory, maybe on another machine: a
    # process that only trained jobs of a shared run has a folder here without them).
    # (A folder here that holds any of the results is theirs, a copy's say, whose results
    # deleted since are written again there, not looked for in the folder it was copied from;
    # a report alone is not: `fashionlab report` writes one into a folder made for it.)
    output_dir = (run_dir / run.id).resolve()
    if shown and run.output_dir and not any(
            (output_dir / name).exists() for name in RESULT_FILES):
        output_dir = Path(run.output_dir)
    if not store.read_only:  # what a killed process of this run left half-written
        remove_stale_staging(output_dir, recursive=True)
    result = StudyResult(run, spec, output_dir, n_train=len(folds[0].train_index),
                         n_val=len(folds[0].val_index), resumed=resumed, already_finished=shown)
    me = command_identity()
    threads_before = torch.get_num_threads()
    outputs: Claim | None = None
    try:
        with reporting(progress) as reporter:
            if not (shown or joined or resumed):
                result.notes += filter(None, [note_unresumed_run(store, run, reporter)])
                result.notes += _note_unseen_views(spec, reporter)
            ctx = RunContext(store, run, spec, output_dir, torch_device, reporter)
            # The pixels as the files hold them (a quarter of float32's bytes, shared by
            # every model and worker); each batch is converted as it is gathered.
            x_train, y_train = to_tensors(dataset.train, torch_device, torch.uint8)
            x_test, y_test = to_tensors(dataset.test, torch_device, torch.uint8)
            cv_data = Tensors(x_train, y_train, x_train, y_train)
            final_data = Tensors(x_train, y_train, x_test, y_test)
            # The images live in the tensors now: of the arrays, keep only what the figure of
            # samples shows (the whole splits are 55 MB, held for the run's length otherwise).
            dataset = dataclasses.replace(
                dataset, train=dataset.train.first_per_class(SAMPLES_PER_CLASS),
                test=dataset.test.first_per_class(0))  # copies: a view would keep it all
            release_freed_memory()  # the decompressed files and conversion buffers
            # Planned from the whole study, not from what is left: a resumed run trains with
            # the threads per job of the first start (a CNN's numbers depend on them).
            planned = independent_jobs(ctx, folds, pending_only=False)
            if workers == "auto":
                workers = auto_workers(planned, torch_device)
            # No more processes than jobs to give them (as "auto" plans): more would start
            # none, and the threads are the cores' share of those that run.
            workers = min(workers, max(len(planned), 1))
            parallel = workers > 1 and len(planned) > 1
            result.threads = threads or (threads_per_job(workers) if parallel
                                         else torch.get_num_threads())
            if parallel:
                result.workers = workers
            if not shown:
                # Every process of the run, on any machine, trains each job with the threads
                # its first registration planned: the numbers do not depend on who trains it.
                result.threads = register_jobs(store, run.id, job_plan(spec, planned),
                                               result.threads)
                result.notes += filter(None, [_note_oversubscribed(
                    workers if parallel else 1, result.threads, reporter)])
                inputs = JobInputs(folds, dataset.class_names, cv_data, final_data)
                waiting = train_jobs(ctx, planned, workers if parallel else 1,
                                     result.threads, inputs, me)
                outputs = claim_outputs(ctx, me, waiting)
                result.trained_here = [job.label for job in job_rows(store, run.id).values()
                                       if job.claimed_by == me and job.key != OUTPUTS]
                if outputs is None:  # another process writes the outputs
                    writer = job_rows(store, run.id)[OUTPUTS]
                    result.results_by = writer.claimed_by
                    if not joined and writer.status == "claimed":
                        # The run's row named this process: from now on it names the writer,
                        # so that the run reads as running (`runs list`) until it finishes.
                        store.hand_over_run(run.id, writer.holder)
                    _leave(store, output_dir)
                    return result
                ctx = dataclasses.replace(ctx, claim=outputs)
            torch.set_num_threads(result.threads)
            result.candidates, result.comparisons, result.best = cross_validated(
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
            if shown:
                _show_stored(result, run, dataset, output_dir, reporter)
        if not shown:
            result.wall_seconds = time.perf_counter() - started
            # One summary for results.json and the store: measured once (the peak memory).
            stored = summary(result)
            write_outputs(result, dataset, stored)
            store.end_run(run.id, "finished", stored, output_dir=output_dir)
    except BaseException as stopped:
        if isinstance(stopped, KeyboardInterrupt):
            stops.cleaning_up()
        stop = isinstance(stopped, KeyboardInterrupt) and not shown
        goes_on = False  # other processes train the run on: it is not interrupted
        if not shown:
            # What this process (and its workers) held goes back at once to the others; the
            # run stays resumable, even from this process. The store may be what failed (a
            # server gone silent): one try, and what stopped the run is what is said; the run
            # reads as interrupted once this process is gone anyway.
            try:
                release_claims(store, run.id, by=me)
            except StoreError:
                pass
            else:
                with contextlib.suppress(StoreError):
                    if joined:  # the run is its own process's to end, never this one's
                        if stop:  # said: others hold jobs, or the run's own process lives on
                            record, here = store.run(run.id), this_process()
                            goes_on = held_elsewhere(store, run.id) or (
                                record.state == "running"
                                and (record.host, record.pid) != (here["host"], here["pid"]))
                    elif held_elsewhere(store, run.id):  # others train it on: running
                        store.leave_run(run.id)
                        goes_on = True
                    else:
                        store.end_run(run.id, "interrupted")
        if stop:
            said = stopped
            if goes_on:
                said = stops.LeftRunning()
                note = (f"fashionlab: run {run.id} goes on in the other processes that train "
                        "it; run_study with the same study and run directory joins it again")
            else:
                note = (f"fashionlab: run {run.id} is kept; run_study with the same study and "
                        "run directory resumes it")
            if hasattr(said, "add_note"):  # Python 3.11+: said under it
                said.add_note(note)
            if said is not stopped:
                raise said from stopped
        raise
    finally:
        torch.set_num_threads(threads_before)
    if shown:
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
    stored in the database (the writer removes them there), the models it saved stay; a
    folder of the run left empty goes."""
    if store.shared:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        with contextlib.suppress(OSError):  # left empty: nothing of the run is here
            output_dir.rmdir()
    store.close()


def _show_stored(result: StudyResult, run: RunRecord, dataset: Dataset, output_dir: Path,
                 reporter: Reporter) -> None:
    """A finished run shown again: its measures as stored, and its tables written again from
    the store where they were deleted or damaged (a truncated results.json) and the folder
    can be written."""
    stored = run.summary or {}
    result.wall_seconds = float(stored.get("wall_seconds") or 0.0)
    result.resumed = bool(stored.get("resumed"))
    result.workers = int(stored.get("workers") or 1)
    result.threads = int(stored.get("threads") or 0)
    if output_dir.is_dir() and not _results_intact(output_dir):
        with contextlib.suppress(OutputError):
            write_outputs(result, dataset, run.summary)
            result.notes.append(f"{output_dir}: the results were missing or damaged and are "
                                "written again from the store")
            reporter.log(result.notes[-1])
    # The weights live only in the models' folders: what is gone cannot be written again.
    saved = [result.retrain.model_dir if result.retrain else None,
             *(c.model_dir for c in result.final)]
    missing = [str(d) for d in saved if d is not None and not (d / WEIGHTS_FILE).is_file()]
    if missing and output_dir.is_dir():
        result.notes.append(f"{', '.join(missing)}: not found (deleted, or saved on another "
                            "machine); the store keeps no weights: --fresh (fresh=True) trains "
                            "the study again, as a new run")
        reporter.log(result.notes[-1])


def _results_intact(output_dir: Path) -> bool:
    """Whether a finished run's folder holds its tables whole (results.json a JSON object)."""
    if not all((output_dir / name).is_file() for name in RESULT_FILES):
        return False
    try:
        return isinstance(json.loads((output_dir / RESULTS_FILE).read_text()), dict)
    except (OSError, ValueError):
        return False


def _tidy(store: Store, run_id: str, output_dir: Path, device: torch.device) -> None:
    """What a run killed just after it finished may lack: its report, and the removal of its
    checkpoints. Best effort, where the directory can be written and holds the results; the
    store is only read."""
    with contextlib.suppress(OSError):
        shutil.rmtree(output_dir / "checkpoints")
    if (output_dir / RESULTS_FILE).is_file() and not (output_dir / REPORT_NAME).exists():
        with contextlib.suppress(ReportError):
            write_report(store, run_id, output_dir / REPORT_NAME, device=device)


def _note_unseen_views(spec: StudySpec, reporter: Reporter) -> list[str]:
    """Say so when a model's test-time views include mirror images it never trained on
    (`tta` with a flip, `augment.flip` off): Fashion-MNIST's shoes and bags face one way, and
    such a model scores lower with the views than without. Returns what it said."""
    unseen = [c.name for c in spec.candidates + spec.final
              if c.model.tta != "none" and not c.train.augment.flip]
    if not unseen:
        return []
    note = (f"{', '.join(map(repr, unseen))}: tta averages mirrored images, which "
            f"{'this model' if len(unseen) == 1 else 'these models'} never trained on "
            "(augment.flip is off): expect a lower score than without tta")
    reporter.log(note)
    return [note]


# More threads than CPUs are allowed (the numbers of a run planned on a larger machine), but
# not without bound: thousands of OpenMP threads on a few CPUs take hours to do an epoch.
THREADS_PER_CPU_AT_MOST = 8


def _check_threads(threads: int) -> None:
    """A new run's threads per job: at most THREADS_PER_CPU_AT_MOST per CPU of this machine."""
    cpus = os.cpu_count() or 1
    if threads > THREADS_PER_CPU_AT_MOST * cpus:
        raise ConfigError(f"threads: {threads} is more than {THREADS_PER_CPU_AT_MOST} per CPU "
                          f"of this machine's {cpus} (at most {THREADS_PER_CPU_AT_MOST * cpus})")


def _note_oversubscribed(processes: int, threads: int, reporter: Reporter) -> str | None:
    """Say so when the processes' threads outnumber this machine's CPUs (`--threads` asked
    for more, or the run's first process planned them on a larger machine: a CNN's numbers
    depend on its threads, so they are kept): they take turns on the CPUs. Returns what it
    said."""
    cpus = os.cpu_count() or 1
    if processes * threads <= cpus:
        return None
    who = f"{processes} processes x {threads} threads" if processes > 1 else f"{threads} threads"
    note = (f"{who} on this machine's {cpus} CPUs: they take turns, which is slower (the "
            "numbers are the same); --threads sets fewer for a new run")
    reporter.log(note)
    return note


def _start_run(store: Store, spec: StudySpec, run_dir: Path, device: str, fresh: bool,
               data: dict[str, Any]) -> tuple[RunRecord, bool, bool]:
    """The run to show, continue, join or start; whether this process joined it (another
    process runs it: its row stays theirs), and whether it continues an interrupted one.
    Only a run of the same settings and the same data (`data_record`) is taken up."""
    fingerprint = spec.fingerprint()
    # One process at a time looks and creates, so that processes started together on several
    # machines join one run instead of each creating its own.
    lock = contextlib.nullcontext() if store.read_only else \
        ClaimLock(store.url, fingerprint, kind="study")
    with lock:
        if not fresh:
            for run in store.runs(kind="study", fingerprint=fingerprint):
                if not same_data(run, data["sha256"]):
                    continue
                if run.state == "running":
                    me = this_process()
                    if (run.host, run.pid) == (me["host"], me["pid"]):  # another thread's
                        raise ConfigError(
                            f"run {run.id} of this study is being trained by this process "
                            "(another thread, or a call still running): one run_study per "
                            "run at a time; wait for it, or pass fresh=True for a new run")
                    if not store.shared:
                        raise ConfigError(
                            f"run {run.id} of this study is being trained by another process "
                            f"({run.holder}); to train it from several "
                            "processes, run the same command on each with a database server "
                            "store (--store postgresql://...; README: Many machines); or wait "
                            "for it, or pass --fresh (fresh=True)")
                    return store.join_run(run.id), True, False
                # A finished run is shown again from the store: every model is read back,
                # nothing retrains and nothing is written (a read-only store will do). An
                # interrupted one continues.
                if run.state == "finished":
                    return run, False, False
                if run.state == "interrupted":
                    if not store.shared:  # one machine, and its process is gone
                        release_claims(store, run.id)
                    return store.claim_run(run.id), False, True
        return store.create_run(kind="study", name=spec.name, fingerprint=fingerprint,
                                seed=spec.seed, config=spec.to_dict(),
                                environment={**environment(device), "data": data},
                                output_root=run_dir), False, False
