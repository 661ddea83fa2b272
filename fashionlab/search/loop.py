"""Automated search (Optuna): each trial varies one candidate of a study, is scored by its
cross-validation, and is pruned while it trains when it is clearly worse than the others.

The Optuna study lives in the same database as the experiment store (the SQLite file of the
run directory, or any database URL), next to a store run of kind "search" that holds every
trial's fold models and epochs. Running the same command again resumes the search; any number
of worker processes, on any number of machines, that run it against one database share it:

- Trials start one at a time across all workers (a PostgreSQL advisory lock, a MySQL named
  lock, or a lock file beside a SQLite database), so exactly `n_trials` trials finish
  (complete or pruned) and no trial starts once a budget is spent: `budget` fold-epochs,
  `budget_seconds` of training or `budget_tflop` of estimated training arithmetic
  (fashionlab.search.cost).
- A trial whose worker died is failed and retried with the same parameters (up to
  MAX_RETRIES times; one the user stopped, every time): at once when the worker ran on this
  machine (its process is gone), else when its claim of the trial is older than the
  claim grace period (`claim_grace`) or Optuna's heartbeat has been silent for
  GRACE_PERIOD seconds. The retry keeps the trial's models (`trial-N/fold-i`) and
  continues from their checkpoint when it runs where they were trained.
- A trial in training is a job claim of the search's run (`fashionlab.jobs`): the run reads
  as running while any worker trains one, whichever worker its row names.
- The worker that sees the search complete writes its results (`search_results`).

Training one trial (its folds, the reports that steer pruning, its cost and score) is
fashionlab.search.trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from optuna.exceptions import OptunaError
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError

from fashionlab import stops
from fashionlab.arguments import (
    check_count,
    check_dataset,
    check_flag,
    check_not_starting_a_worker,
    check_progress,
    check_run_dir,
)
from fashionlab.config import (
    Candidate,
    SearchSpec,
    StudySpec,
    base_candidate,
    check_spec,
    study_source,
)
from fashionlab.cv import Fold, make_folds
from fashionlab.data import Dataset, to_tensors
from fashionlab.errors import CheckpointError, ConfigError, OutputError, StoreError
from fashionlab.hardware import resolve_device
from fashionlab.jobs import (
    JobRow,
    be_present,
    claim_grace,
    claim_job,
    close_claims,
    command_identity,
    held_elsewhere,
    job_rows,
    register_jobs,
)
from fashionlab.process import ProcessIdentity
from fashionlab.progress import Reporter, reporting
from fashionlab.provenance import environment
from fashionlab.rng import derive_seed
from fashionlab.runner import Helpers, machine_workers, threads_per_job, worker_devices
from fashionlab.runs import delete_run
from fashionlab.search.cost import spent_budget
from fashionlab.search.finish import FINISHED, SearchContext, finish_search
from fashionlab.search.result import SearchResult
from fashionlab.search.space import (
    base_params,
    check_largest_model,
    grid,
    grid_size,
    make_sampler,
)
from fashionlab.search.storage import (
    ClaimLock,
    RetryLostTrial,
    open_storage,
    search_identity,
    stop_stray_heartbeats,
)
from fashionlab.search.trial import TrialContext, make_pruner, train_trial
from fashionlab.serialize import remove_stale_staging
from fashionlab.steps import (
    RunContext,
    data_record,
    limit_study_data,
    load_study_data,
    note_unresumed_run,
    same_data,
)
from fashionlab.store import (
    DEFAULT_RUN_DIR,
    Store,
    database_trouble,
    database_url,
    resolved_url,
    safe_url,
)
from fashionlab.tables import spent_line
from fashionlab.train import Tensors
from fashionlab.trials import (
    delete_study,
    failed_for_good,
    retried_trial,
    spent,
    spent_summary,
)

__all__ = ["RUN_ATTR", "run_search"]

RUN_ATTR = "fashionlab.run_id"  # the Optuna study's user attribute naming its store run
STOP_CLEANUP_TRIES = 3  # a stopped trial marked for its retry: tries, 0.1 s, 0.2 s apart


def drawn_before(trials: Sequence[FrozenTrial]) -> int:
    """How many trials were drawn before the next one: a failed trial and its retries (the same
    parameters under new numbers) count once, so a search interrupted and resumed draws the
    same trials as one never interrupted; a waiting trial (the base, enqueued) is the next
    one, not one before it (else the base, when part of it lies outside the space and is
    drawn, and the trial after it would draw with one seed: the same values)."""
    # A retry of a retry names the first trial of its chain: count the trials no retry. One
    # stopped before it drew (while it was being claimed) counts once a retry of it has drawn.
    drew = {retried_trial(t) for t in trials if t.params and retried_trial(t) is not None}
    return sum(retried_trial(t) is None and t.state != TrialState.WAITING
               and (bool(t.params) or t.state != TrialState.FAIL or t.number in drew)
               for t in trials)


@dataclass(frozen=True)
class Limits:
    n_trials: int | None
    timeout: float | None  # seconds, this process


# --------------------------------------------------------------------------------------------


def _silent_optuna(run: Callable[..., SearchResult]) -> Callable[..., SearchResult]:
    """Optuna's own log lines (a study created, each trial finished, a stopped trial's
    warning with the traceback of its KeyboardInterrupt) are held back, at ERROR for the
    call, then set back as they were: the search shows each trial itself (`progress`), and a
    stop ends in one line. Asked for (Optuna's verbosity set to DEBUG), they show."""
    @functools.wraps(run)
    def silent(*args: Any, **kwargs: Any) -> SearchResult:
        before = optuna.logging.get_verbosity()
        if before < optuna.logging.INFO:
            return run(*args, **kwargs)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            return run(*args, **kwargs)
        finally:
            optuna.logging.set_verbosity(before)
    return silent


@_silent_optuna
@stops.listened
def run_search(
    spec: StudySpec,
    *,
    run_dir: str | Path = DEFAULT_RUN_DIR,
    store_url: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str | None = None,
    progress: bool | Reporter = True,
    finish: bool = False,
    fresh: bool = False,
    dataset: Dataset | None = None,
    workers: int | Literal["auto"] = 1,
) -> SearchResult:
    """Run (or resume, or join) the study's search and return where it stands.

    `n_trials` and `timeout` override the study file's. Trials start until `n_trials` have
    finished across all workers, a budget is spent (`budget` fold-epochs, `budget_seconds` of
    training, `budget_tflop` of training arithmetic) or this process has run for `timeout`
    seconds. The worker that sees the search complete retrains the best trial on all
    training images, tests it, and writes the table of the top trials, the plots and the
    report; `finish=True` does that now with the trials finished so far, starting none.
    `progress`: bars on stderr (True), nothing (False), or your own `progress.Reporter`.
    `fresh=True` deletes this search's earlier runs and trials first and starts again.
    `workers` > 1 runs that many workers of the search on this machine: this process and
    others it starts (by the spawn method: a script needs the `if __name__ == "__main__":`
    guard), each training its trials with its share of the CPU threads, or on its own GPU
    when the device is CUDA; "auto" starts one per CPU core or GPU. The call returns once
    they have all ended. Trials run side by side are drawn without each other's results, so
    the trials' order (not their scoring) then depends on timing.
    """
    started = time.perf_counter()
    check_not_starting_a_worker("run_search")
    check_spec(spec)
    run_dir = check_run_dir(run_dir)
    check_flag("finish", finish)
    check_flag("fresh", fresh)
    if finish and fresh:  # --fresh would delete the very trials --finish writes the results of
        raise ConfigError("finish and fresh (--finish, --fresh) contradict each other: "
                          "finish writes the results of the trials so far, fresh deletes them "
                          "first")
    check_progress(progress)
    check_dataset(dataset)
    check_count("workers", workers, auto=True)
    search = spec.search
    if search is None:
        raise ConfigError(f"{study_source(spec)}: no [search] table: add one to search it "
                          "(see the README's Automated search)")
    base = base_candidate(spec)
    check_largest_model(study_source(spec), search, base)
    limits = _limits(study_source(spec), search, base, n_trials, timeout)
    claim_grace()  # a bad FASHIONLAB_CLAIM_GRACE is said now, not in the first trial
    torch_device = resolve_device(device)
    url = database_url(resolved_url(store_url, run_dir))
    if url in ("sqlite://", "sqlite:///:memory:"):
        raise ConfigError("--store: a search needs a database file or server, not memory")
    study_name, fingerprint = search_identity(spec)
    if finish:  # nothing to finish in a store that is not there, or holds no trial at all:
        # said before Optuna's tables (and the search's lock) are made in it
        with contextlib.closing(Store(url, create=False)) as existing:
            if not existing.has_table("studies"):  # Optuna's
                raise ConfigError(_nothing_to_finish(spec.name, url))
    # The data before anything is created: a search whose data cannot be read leaves nothing.
    # A given dataset stands for the study's files: its `[data]` limits apply to it too.
    with stops.before_the_run():
        dataset = load_study_data(spec) if dataset is None else limit_study_data(spec, dataset)
        folds = make_folds(len(dataset.train), spec.cv, seed=spec.seed,
                           labels=dataset.train.labels)
        data = data_record(dataset)
    lock = ClaimLock(url, study_name)
    # (workers starting together: one creates the tables, the run and the study)
    with stops.before_the_run(), lock:
        store = Store(url)
        if fresh:
            _forget(store, study_name, fingerprint, run_dir)
        storage = open_storage(url)
        if finish and not _ended_trials(storage, study_name):
            raise ConfigError(_nothing_to_finish(spec.name, url))
        run = next(iter(store.runs(kind="search", fingerprint=fingerprint)), None)
        if run is not None and not same_data(run, data["sha256"]):
            # Its trials (one Optuna study) were scored on other data: not to be mixed.
            raise ConfigError(f"search '{spec.name}': run {run.id} searched other data (SHA-256 "
                              f"{str(run.data_sha256)[:12]}, these {data['sha256'][:12]}); "
                              "--fresh (fresh=True) starts it again on these, or give the study "
                              "another name")
        if finish and run is not None and run.state == "running":
            # Its workers finish the search themselves, and would overwrite these results.
            raise ConfigError(f"search '{spec.name}' is running ({run.holder}): "
                              "it writes its results when it ends; stop it first to finish "
                              "with the trials so far")
        created = run is None
        if run is None:
            _refuse_orphan_trials(storage, study_name, safe_url(url))
            run = store.create_run(kind="search", name=spec.name, fingerprint=fingerprint,
                                   seed=spec.seed, config=spec.to_dict(),
                                   environment={**environment(str(torch_device)),
                                                "data": data},
                                   output_root=run_dir)
        pruner = make_pruner(search)
        try:
            study = optuna.create_study(
                study_name=study_name, storage=storage, load_if_exists=True,
                direction="maximize" if search.objective == "val_accuracy" else "minimize",
                pruner=pruner)
        except KeyError:  # Optuna's "Record does not exist.": its tables were tampered with
            raise StoreError(f"the search's Optuna tables in {safe_url(url)} are damaged "
                             f"(study '{study_name}' is half there): repair them, or search in "
                             "another run directory or store") from None
        if study.user_attrs.get(RUN_ATTR) != run.id:  # optuna-dashboard shows which run
            study.set_user_attr(RUN_ATTR, run.id)
        if search.start_with_base and search.sampler != "grid" and not study.get_trials():
            study.enqueue_trial(base_params(search, base), user_attrs={"base": base.name})
    # <run dir>/<run id>, whatever the store recorded: a run directory moved or copied goes
    # on in its new place (as a study does).
    output_dir = (run_dir / run.id).resolve()
    remove_stale_staging(output_dir, recursive=True)  # what a killed process left half-written
    notes: list[str] = []
    presence = None
    threads_before = torch.get_num_threads()
    try:
        # Said from here to the end, between trials too: a worker stopped meanwhile sees the
        # search go on in this one (trials' claims alone leave gaps of tens of milliseconds).
        presence = be_present(store, run.id, by=command_identity())
        with reporting(progress) as reporter, \
                _helpers(spec, 1 if finish else workers, run_dir, url, limits, torch_device,
                         dataset, reporter) as helpers:
            if helpers is not None:  # this process is one of the workers, with their share
                torch.set_num_threads(helpers.threads)
                reporter = helpers.reporter
            if created:
                notes += filter(None, [note_unresumed_run(store, run, reporter)])
            ctx = RunContext(store, run, spec, output_dir, torch_device, reporter)
            searcher = _Searcher(ctx, study, lock, dataset, folds)
            stopped_by = "finish" if finish else searcher.loop(limits, started)
            if helpers is not None:
                helpers.wait()
                if stopped_by == "others-running":  # they trained the last trials: ended now
                    stopped_by = searcher.loop(limits, started)
            summary = None
            if stopped_by in ("n_trials", "budget", "budget_seconds", "budget_tflop", "grid",
                              "finish"):
                with lock:
                    # A trial whose process died (kill -9) is counted as lost and waits for
                    # its retry, as the search's loop counts it, not as running.
                    searcher.fail_lost_trials()
                    summary = searcher.finish(stopped_by, time.perf_counter() - started)
            else:  # its time limit, or others train the last trials: this process stops
                # (trials still running were judged alive by the loop, under the lock)
                _let_go(store, run.id, stopped_by == "others-running" or bool(
                    study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))))
    except BaseException as stopped:
        stop = isinstance(stopped, KeyboardInterrupt)
        if stop:
            stops.cleaning_up()
        # What stopped it may be the database itself (a server gone silent): one try, and what
        # stopped the search is what is said; the run reads as interrupted once this process
        # is gone anyway. Whether other workers train trials is their claims' word (this
        # one's ended with its trial): a trial Optuna still has running may be a dead
        # worker's, not retried yet.
        others = None
        with contextlib.suppress(StoreError):
            others = held_elsewhere(store, run.id)
        if others is not None:  # the store answered
            with contextlib.suppress(StoreError):
                _let_go(store, run.id, others)
        if stop:
            said = stops.LeftRunning() if others else stopped
            if hasattr(said, "add_note"):  # Python 3.11+: said under it
                said.add_note(
                    f"fashionlab: search run {run.id} goes on in the other workers that train "
                    "its trials; run_search with the same study and run directory joins it "
                    "again" if others else
                    f"fashionlab: search run {run.id} keeps its finished trials (a trial "
                    "stopped midway is retried); run_search with the same study and run "
                    "directory goes on")
            if said is not stopped:
                raise said from stopped
        trouble = database_trouble(stopped, url)
        if trouble is not None and trouble is not stopped:  # said in one line, as a study does
            raise trouble from None
        raise
    finally:
        if presence is not None:  # (a store that fails now: gone with this process)
            with contextlib.suppress(StoreError):
                presence.done()
        torch.set_num_threads(threads_before)
        stop_stray_heartbeats(storage)
        storage.engine.dispose()
        lock.engine.dispose()
    record = store.run(run.id)
    if summary is not None and not (output_dir / "results.json").exists() \
            and record.output_dir is not None:
        # Written by another worker of a shared search (another run directory, maybe another
        # machine), or by an earlier run shown again from elsewhere: where they are.
        output_dir = Path(record.output_dir)
    result = SearchResult(
        run=record, spec=spec, study_name=study_name, storage=safe_url(store.url),
        output_dir=output_dir, trials=study.get_trials(), finished=summary is not None,
        stopped_by=stopped_by, summary=summary, wall_seconds=time.perf_counter() - started,
        notes=notes)
    store.close()
    return result


@contextlib.contextmanager
def _helpers(spec: StudySpec, workers: int | Literal["auto"], run_dir: Path, url: str,
             limits: Limits, device: torch.device, dataset: Dataset,
             reporter: Reporter) -> Iterator[Helpers | None]:
    """The other workers of `workers` on this machine (None: this process alone), each a
    `run_search` of its own that joins this one's run, on its own GPU on CUDA."""
    count = machine_workers(device) if workers == "auto" else workers
    if count < 2:
        yield None
        return
    devices = worker_devices(count, device)[1:]  # this process trains on the first
    calls = [(_search_helper, (spec, run_dir, url, limits, helper_device, dataset))
             for helper_device in devices]
    with Helpers(calls, threads=threads_per_job(count), reporter=reporter) as helpers:
        yield helpers


def _search_helper(spec: StudySpec, run_dir: Path, url: str, limits: Limits, device: str,
                   dataset: Dataset, reporter: Reporter) -> None:
    """A worker process of `run_search(workers=...)`: the same search, joined."""
    run_search(spec, run_dir=run_dir, store_url=url, n_trials=limits.n_trials,
               timeout=limits.timeout, device=device, progress=reporter, dataset=dataset)


def _let_go(store: Store, run_id: str, others: bool) -> None:
    """This process stops running a search that is not complete (stopped, or its time limit
    reached): left to the workers still training trials where there are `others`, else
    interrupted, which the same call, from this process too, resumes (not where another
    process took the row meanwhile)."""
    if others:  # running, as their trials are, whatever an earlier stop left in its row
        store.claim_run(run_id)
        _leave_to_others(store, run_id)
    else:
        store.end_run(run_id, "interrupted", if_held_here=True)


def _leave_to_others(store: Store, run_id: str) -> None:
    """This worker ends while others run trials, whichever machines they are on: the run's
    row names no process, so it reads as running while their heartbeats (every worker beats
    the run's) are fresh, not as interrupted once this one exits; the next of them to beat
    (at its next epoch) takes the row, so that its death is seen at once on its machine."""
    store.leave_run(run_id)


def _forget(store: Store, name: str, fingerprint: str, run_dir: Path) -> None:
    """`--fresh`: delete the earlier runs of this search (store rows, Optuna study, and their
    files in this run directory: `<run_dir>/<run id>`, not the folder the store recorded,
    which is the original's in a copied run directory)."""
    for run in store.runs(kind="search", fingerprint=fingerprint):
        if run.state == "running":  # (delete_run would say "stop it before deleting it")
            raise ConfigError(f"search '{run.name}' is running ({run.holder}): stop it "
                              "before starting it afresh (--fresh)")
        delete_run(store, run.id, run_dir=run_dir)
    delete_study(store.url, name)


def _nothing_to_finish(name: str, url: str) -> str:
    return (f"search '{name}' has no trial that ran to its end in {safe_url(url)}: nothing to "
            "finish (run the search first)")


def _ended_trials(storage: optuna.storages.RDBStorage, name: str) -> list[FrozenTrial]:
    """The trials of the Optuna study `name` that ran to their end: completed, pruned, or
    failed for good. A failed trial that was retried (stopped by the user, or lost with its
    process) did not: its retry runs it again."""
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # no such study
        return []
    return [t for t in trials if t.state in FINISHED] + failed_for_good(trials)


def _refuse_orphan_trials(storage: optuna.storages.RDBStorage, name: str, where: str) -> None:
    """Trials whose fashionlab run is gone (deleted by hand, or by an older `runs delete`)
    cannot be resumed: their models and epochs are not in the store any more. (Trials only
    enqueued, not started, need nothing from the store.)"""
    try:
        trials = [t for t in optuna.load_study(study_name=name, storage=storage).get_trials(
            deepcopy=False) if t.state != TrialState.WAITING]
    except KeyError:
        return
    if trials:
        raise ConfigError(f"the Optuna study {name} in {where} has {len(trials)} trial(s) but "
                          "no fashionlab run any more: run the search with --fresh (fresh=True) "
                          "to start "
                          "it again")


def _limits(study: str, search: SearchSpec, base: Candidate, n_trials: int | None,
            timeout: float | None) -> Limits:
    if n_trials is not None and (not isinstance(n_trials, int) or isinstance(n_trials, bool)
                                 or n_trials < 1):
        raise ConfigError(f"n_trials (--n-trials): expected a positive whole number (got "
                          f"{n_trials!r})")
    if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool)
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ConfigError(f"timeout (--timeout): expected a positive number of seconds (got "
                          f"{timeout!r})")
    n = search.n_trials if n_trials is None else n_trials
    if search.sampler == "grid":
        try:
            size = grid_size(grid(search, base))
        except ConfigError as error:  # too many points: named as the largest-draw check does
            raise ConfigError(f"{study}: {error}") from None
        n = size if n is None else min(n, size)
    limits = Limits(n, search.timeout if timeout is None else timeout)
    budgets = (search.budget, search.budget_seconds, search.budget_tflop)
    if limits.n_trials is None and limits.timeout is None and all(b is None for b in budgets):
        raise ConfigError(f"{study}: search: no stopping rule: set n_trials, budget, "
                          "budget_seconds, budget_tflop or timeout in [search], or pass "
                          "--n-trials or --timeout")
    return limits


class _Searcher:
    """One worker's part of a search: claims trials, trains them, reports and prunes."""

    def __init__(self, ctx: RunContext, study: optuna.Study, lock: ClaimLock,
                 dataset: Dataset, folds: list[Fold]) -> None:
        spec = ctx.spec
        assert spec.search is not None
        self.ctx, self.spec, self.search, self.base = ctx, spec, spec.search, base_candidate(spec)
        self.store, self.run, self.study, self.lock = ctx.store, ctx.run, study, lock
        x, y = to_tensors(dataset.train, ctx.device, torch.uint8)  # converted batch by batch
        self.finishing = SearchContext(ctx, study, folds, Tensors(x, y, x, y), dataset)
        self.trials = TrialContext(ctx, self.base, folds, self.finishing.train,
                                   self.finishing.maximize)
        self.retry = RetryLostTrial()
        self.identity = ProcessIdentity.current()
        self.worker = f"{socket.gethostname()}:{self.identity.pid}"
        self.seed = self.search.seed if self.search.seed is not None else spec.seed

    # ---- claiming trials ----------------------------------------------------------------

    def loop(self, limits: Limits, started: float) -> str:
        """Start trials until a stopping rule holds; returns which one."""
        while True:
            current: list[int] = []
            try:
                self.lock.acquire()
                self.fail_lost_trials()
                trials = self.study.get_trials(deepcopy=False)
                if not any(t.state == TrialState.WAITING for t in trials):
                    reason = self._stop_reason(trials, limits, started)
                    if reason is not None:
                        return reason
                self.store.claim_run(self.run.id)
                # Seeded per trial: draws depend on how many trials were drawn before and the
                # history only, not on which worker runs it. The grid keeps one seed: it fixes
                # the grid's order.
                seed = self.seed if self.search.sampler == "grid" \
                    else derive_seed(self.seed, "trial", drawn_before(trials))
                self.study.sampler = make_sampler(self.search, self.base, seed % 2**32)
                # (kept: a stop while Optuna records the trial raised its UnboundLocalError,
                # `updated_state` read in a `finally` that the KeyboardInterrupt left unset)
                with warnings.catch_warnings(), stops.kept():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    self.study.optimize(functools.partial(self._objective, current=current),
                                        n_trials=1, callbacks=[self._log_trial])
            except KeyboardInterrupt:
                self._retry_stopped(current)
                raise
            except Exception as error:
                # The store failed the trial (a server stopped, a dropped connection), not the
                # trial itself: it is retried as a crashed one is (at most MAX_RETRIES times,
                # if the store fails it each time), if the database answers now; else it is
                # found lost, and retried, when the search goes on. A checkpoint or model the
                # disk refused (full, read-only) stops the search as a Ctrl-C does, and its
                # trial is retried as that one's is: the same command goes on once it is fixed.
                with contextlib.suppress(StoreError, SQLAlchemyError, OptunaError):
                    if isinstance(error, CheckpointError | OutputError):
                        self._retry_interrupted(current)
                    elif database_trouble(error, self.store.url) is not None:
                        self._retry_interrupted(current, crashed=True)
                raise
            finally:
                self.lock.release()

    def _stop_reason(self, trials: Sequence[FrozenTrial], limits: Limits,
                     started: float) -> str | None:
        running = sum(t.state == TrialState.RUNNING for t in trials)
        finished = sum(t.state in FINISHED for t in trials)
        budget = spent_budget(self.search, spent(trials))
        if limits.n_trials is not None and finished + running >= limits.n_trials:
            reason = "grid" if self.search.sampler == "grid" else "n_trials"
        elif budget is not None:
            reason = budget
        elif limits.timeout is not None and time.perf_counter() - started >= limits.timeout:
            return "timeout"
        else:
            return None
        return "others-running" if running else reason

    def fail_lost_trials(self) -> None:
        """Fail (and retry) the running trials whose worker is gone: on this machine
        when its process no longer exists, elsewhere when its claim of the trial or Optuna's
        heartbeat is stale (the claim by FASHIONLAB_CLAIM_GRACE, as a study's jobs are); and,
        wherever it ran, a trial never claimed. Called under the lock."""
        host = socket.gethostname()
        claims = job_rows(self.store, self.run.id)
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not (self._never_claimed(claims, trial) or self._lost_here(trial, host)
                    or self._claim_lost(claims, trial)):
                continue
            self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            self.retry(self.study, self.study.get_trials(deepcopy=False)[trial.number])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        # The claims of the trials that ended so end too (under the lock: a trial claimed
        # after this read exists, running, already).
        running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        close_claims(self.store, self.run.id, keep=[f"trial-{t.number}" for t in running])

    @staticmethod
    def _lost_here(trial: FrozenTrial, host: str) -> bool:
        """Whether the trial's worker ran on this machine, and its process is gone."""
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or int(pid) == os.getpid():
            return False
        # Its pid with when it started: a later process given the same pid is not it.
        return not ProcessIdentity(*trial.user_attrs.get("worker_process") or [int(pid)]).alive()

    @staticmethod
    def _never_claimed(claims: Mapping[str, JobRow], trial: FrozenTrial) -> bool:
        """Whether the trial's worker was stopped or killed between Optuna's making of it and
        its claim. Both happen under the lock, which the worker that asks holds now: a running
        trial with no claim yet (none, or registered and not taken) is no other worker's. No
        heartbeat would ever judge it (it may have none), and the search could not end."""
        claim = claims.get(f"trial-{trial.number}")
        return claim is None or claim.status == "pending"

    @staticmethod
    def _claim_lost(claims: Mapping[str, JobRow], trial: FrozenTrial) -> bool:
        """Whether the trial's claim is held by no live process. A claim that ended already
        (its trial is being told) is not lost: Optuna's heartbeat judges those."""
        claim = claims.get(f"trial-{trial.number}")
        return claim is not None and claim.status == "claimed" and claim.claimable(claim_grace())

    def _retry_stopped(self, current: list[int]) -> None:
        """`_retry_interrupted` for a trial the user stopped. The stop is what is said, not a
        store that fails meanwhile: SQLite may refuse a write at once ("database is locked":
        a read turned into a write while another worker wrote), which a new try passes; a
        store that fails on leaves the trial running, found lost (and retried) once this
        process is gone."""
        for attempt in range(STOP_CLEANUP_TRIES):
            try:
                self._retry_interrupted(current)
                return
            except (StoreError, SQLAlchemyError, OptunaError):
                if attempt + 1 < STOP_CLEANUP_TRIES:
                    time.sleep(0.1 * (attempt + 1))

    def _retry_interrupted(self, current: list[int], *, crashed: bool = False) -> None:
        """A trial the user stopped (Ctrl-C, SIGTERM) is retried, however often that happens;
        one the store failed (`crashed`), at most MAX_RETRIES times."""
        if not current:
            return
        trial = self.study.get_trials(deepcopy=False)[current[0]]
        if trial.state == TrialState.RUNNING:
            self.study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            trial = self.study.get_trials(deepcopy=False)[current[0]]
        if trial.state == TrialState.FAIL:
            RetryLostTrial(crashed=crashed)(self.study, trial)

    def _log_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        pruned = sum(t.state == TrialState.PRUNED for t in trials)
        line = f"trial {trial.number} {trial.state.name.lower()}"
        if trial.state == TrialState.COMPLETE and trial.value is not None:
            line += f": {trial.value:.4f}"
        elif trial.user_attrs.get("stopped"):
            line += f" ({trial.user_attrs['stopped']})"
        try:
            best = study.best_trial
            line += f" · best {best.value:.4f} (trial {best.number})"
        except ValueError:
            pass
        self.ctx.reporter.log(f"{line} · {pruned} pruned · "
                              f"{spent_line(spent_summary(self.search, spent(trials)))}")

    # ---- one trial ----------------------------------------------------------------------

    def _objective(self, trial: optuna.Trial, current: list[int]) -> float:
        # This worker's from now on: a stop while it is being claimed (the store's writes)
        # retries it too, rather than leaving it failed for good.
        current.append(trial.number)
        # Claimed, and named this worker's, before other workers may start theirs (the lock):
        # one that looks for lost trials meanwhile sees this one held by a live process, not
        # by the dead one a retry copies its attributes from.
        with self._holding(trial):
            # A retried trial keeps the models (and checkpoints) of the trial it retries.
            name = str(trial.user_attrs.get("models") or f"trial-{trial.number}")
            trial.set_user_attr("models", name)
            trial.set_user_attr("worker", self.worker)
            trial.set_user_attr("worker_process", list(dataclasses.astuple(self.identity)))
            self.lock.release()
            return train_trial(self.trials, trial, name)

    @contextlib.contextmanager
    def _holding(self, trial: optuna.Trial) -> Iterator[None]:
        """While this worker trains the trial, a job claim of the search's run says so
        (`fashionlab.jobs`): the run reads as running while any worker, on any machine, trains a
        trial, whichever process its row names (the last to start a trial, maybe gone since),
        as a study's run does while any process holds one of its jobs. The claim ends with the
        trial, however it ends (a retry is another trial, with its own claim)."""
        key = f"trial-{trial.number}"
        register_jobs(self.store, self.run.id, [(key, f"trial {trial.number}")],
                      torch.get_num_threads())
        claim = claim_job(self.store, self.run.id, key, by=command_identity())
        try:
            yield
        finally:
            if claim is not None:
                # Not held beyond the trial, nor by a process that goes on (a notebook's
                # kernel after Ctrl-C); a store that fails now leaves a claim of this
                # process, read as gone once it is.
                with contextlib.suppress(StoreError):
                    claim.done()

    def finish(self, stopped_by: str, seconds: float) -> dict[str, Any]:
        summary = finish_search(self.finishing, stopped_by, seconds)
        # A trial waiting for its retry (stopped, or lost with its process) goes on from its
        # checkpoint when the search does (after --finish): those stay until none waits.
        if not self.study.get_trials(deepcopy=False,
                                     states=(TrialState.WAITING, TrialState.RUNNING)):
            shutil.rmtree(self.ctx.output_dir / "checkpoints", ignore_errors=True)
        return summary
