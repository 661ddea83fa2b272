"""Training stacks of a run, in this process or in worker processes, storing every epoch.

`train_stack` is the one place where training meets the store: after each epoch (and its
checkpoint) it writes the epoch rows and the models' status in one transaction. With workers,
independent jobs (a cross-validation stack, a final model) train side by side, this process
taking jobs too, the others in worker processes (each with its share of the CPU threads, or its
own GPU) that report progress through a queue (`progress.QueueReporter`); `auto_workers`
decides how many pay.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.context import SpawnProcess
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Self

import torch

from fashionlab.checkpoints import install_checkpoint
from fashionlab.config import ModelSpec, TrainSpec
from fashionlab.cv import MemberResult, train_members
from fashionlab.errors import FashionlabError
from fashionlab.hardware import CpuShare, release_freed_memory
from fashionlab.jobs import Claim, fetch_checkpoint
from fashionlab.models import forward_flops
from fashionlab.process import die_with_parent, start_resource_tracker
from fashionlab.progress import QueueReporter, Reporter, Silent, forward
from fashionlab.stops import deferred, heard, raise_if_stopped
from fashionlab.store import Store
from fashionlab.train import EpochMetrics, Member, Tensors

EpochHook = Callable[[int, dict[str, EpochMetrics]], None]


def train_stack(
    store: Store,
    run_id: str,
    members: Sequence[Member],
    train: TrainSpec,
    data: Tensors,
    device: torch.device,
    *,
    checkpoint: Path,
    label: str,
    reporter: Reporter,
    keep_weights: bool = False,
    on_epoch: EpochHook | None = None,
    claim: Claim | None = None,
) -> dict[str, MemberResult]:
    """Train (or continue) one stack; every finished epoch is committed to the store, then
    `on_epoch(epoch, metrics)` runs (a search's pruner may raise there) and the reporter hears
    of it under `label`, whatever `on_epoch` did.

    With the `claim` of a shared run's job, every epoch is stored only while the claim holds
    (else `ClaimLost`), and where the claim shares checkpoints through the database the
    stack continues from the stored one and stores its own with each epoch."""
    keys = {m.key for m in members}
    stored_upto = {k: len(v) for k, v in store.histories(run_id).items() if k in keys}
    shared = claim is not None and claim.shares_checkpoints
    if shared:
        # The database's checkpoint is the one whose epochs are stored: a file left here by
        # an earlier claim of this machine may be older.
        stored = fetch_checkpoint(store, run_id, checkpoint.name)
        if stored is not None:
            install_checkpoint(checkpoint, stored)
    host = socket.gethostname()

    def after_epoch(epoch: int, metrics: dict[str, EpochMetrics],
                    results: dict[str, MemberResult]) -> None:
        rows, updates = [], {}
        for key, result in results.items():
            # Rows after what the store holds: normally this epoch; after a resume, any epoch
            # the checkpoint has and the store missed. Rewriting one is harmless (replaced).
            new = len(result.history) - stored_upto.get(key, 0)
            for e in range(stored_upto.get(key, 0) + 1, len(result.history) + 1):
                m = result.history[e - 1]
                rows.append((key, e, (m.loss, m.accuracy, m.val_loss, m.val_accuracy,
                                      m.seconds)))
            stored_upto[key] = len(result.history)
            status = result.status or ("running" if result.history else "pending")
            updates[key] = {"status": status, "message": result.message,
                            "best_epoch": result.best_epoch,
                            "seconds": float(sum(h.seconds for h in result.history))}
            if new > 0:  # the machine that trained it: not one that found it trained
                updates[key]["host"] = host
        within = None
        if claim is not None:
            # The checkpoint of this epoch was written just before (train_members saves it
            # first): stored with the epoch's rows, the two never disagree.
            saved = (checkpoint.name, epoch, checkpoint.read_bytes()) if shared and rows \
                else None

            def within(conn: Any) -> None:
                claim.keep(conn, saved)
        store.record_epochs(run_id, rows, updates, within=within)
        try:
            if on_epoch is not None:
                on_epoch(epoch, metrics)
        finally:  # heard of also when the pruner stops the trial at this stored epoch
            reporter.epoch(label, epoch, metrics)

    # Dense stacks give the same numbers on any number of threads (tested), so from their
    # second epoch on they use the cores other processes leave free; a convolution's result
    # depends on its thread count (oneDNN picks kernels by it): a conv stack keeps its count.
    threads = torch.get_num_threads()
    share = CpuShare(os.cpu_count() or 1) if device.type == "cpu" and all(
        m.model.kind == "dense" for m in members) else None

    def adapt(epoch: int, metrics: dict[str, EpochMetrics],
              results: dict[str, MemberResult]) -> None:
        after_epoch(epoch, metrics, results)
        if share is not None:
            torch.set_num_threads(share.threads())

    reporter.start(label, train.epochs)
    try:
        results = train_members(members, train, data, device, checkpoint=checkpoint,
                                keep_weights=keep_weights, on_epoch=adapt,
                                on_damaged=reporter.log)
    finally:
        torch.set_num_threads(threads)
        release_freed_memory()  # the stack's activations, optimiser state and scratch
    reporter.finish(label)
    return results


# --------------------------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class Job:
    """A unit of work that needs nothing from the others: a CV stack or a final model."""

    kind: Literal["cv", "final"]
    names: tuple[str, ...]  # the stack's member keys, or the final candidate's name
    label: str
    epochs: int
    flops: float  # training arithmetic, an estimate of its duration


def training_flops(model: ModelSpec, n_train: int, epochs: int) -> float:
    """Arithmetic of training one model: forward and backward (~3x the forward pass)."""
    return 3.0 * forward_flops(model) * n_train * epochs


# Process start-up (interpreter, torch, the data) costs seconds: below this much arithmetic
# (~20 s at 200 GFLOP/s) the work stays in this process.
MIN_PARALLEL_FLOPS = 4e12


def auto_workers(jobs: Sequence[Job], device: torch.device) -> int:
    """How many workers pay for `jobs`: one per GPU; on the CPU one per core (this process
    being one of them), up to the number of jobs. Small layers use two threads poorly: on 2
    cores the seed study takes 9.4 min in one process, 6.8 min with two one-thread workers."""
    if len(jobs) < 2 or sum(job.flops for job in jobs) < MIN_PARALLEL_FLOPS:
        return 1
    return min(len(jobs), machine_workers(device))


def machine_workers(device: torch.device) -> int:
    """Workers the machine runs side by side: one per GPU when `device` is CUDA without an
    index (one GPU named: one), else one per CPU core."""
    if device.type == "cuda":
        return torch.cuda.device_count() if device.index is None else 1
    return os.cpu_count() or 1


def threads_per_job(workers: int) -> int:
    """The CPU threads each of `workers` parallel jobs trains with: its share of the cores."""
    return max(1, (os.cpu_count() or 1) // workers)


def worker_devices(workers: int, device: torch.device) -> list[str]:
    """The device of each worker: GPUs round-robin when the run uses CUDA, else the CPU."""
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" for i in range(workers)]
    return [str(device)] * workers


_reporter: Reporter | None = None  # in a worker process: its queue to the parent


def _init_worker(threads: int, events: Any, parent: int) -> None:
    """Start of a worker process: its threads, its reporter, and its death with the parent."""
    global _reporter
    hear_interrupts_again()
    die_with_parent(parent)
    torch.set_num_threads(threads)
    _reporter = QueueReporter(events)


def _call(fn: Callable[..., None], args: tuple[Any, ...], job: int) -> None:
    """Job `job` in a worker process: `fn(*args, reporter)`, reporting to the parent."""
    assert _reporter is not None
    fn(*args, _reporter)
    _reporter.delivered(job)


class Stopped(Exception):
    """Raised inside a job trained in this process when the parallel phase is abandoned."""


class WorkerDied(FashionlabError):
    """A worker process ended before its jobs did (SIGKILL, the out-of-memory killer, or an
    error it printed on its way)."""


class _RecordingContext:
    """A multiprocessing context that keeps every process the pool starts with it, whenever it
    starts it: `_died` reads their exit statuses (one that died before a look at the running
    children would be missing from it)."""

    def __init__(self, context: Any) -> None:
        self._context = context
        self.started: list[BaseProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> BaseProcess:  # named as the context names it
        process = _DeafWhileStarting(*args, **kwargs)  # the spawn context's own, started deaf
        self.started.append(process)
        return process

    def __getattr__(self, name: str) -> Any:  # queues, locks, the start method: the context's
        return getattr(self._context, name)


class _DeafWhileStarting(SpawnProcess):
    """A worker process that begins with SIGINT blocked (a signal mask is inherited).

    Ctrl-C reaches the terminal's whole process group: a worker still importing torch would
    print its KeyboardInterrupt traceback under the command's one line. The parent stops the
    workers itself; a worker takes interrupts again once it has started (`_init_worker`).
    Only the starting thread blocks it, for the moment of the start, so a Ctrl-C then still
    reaches the parent, if only once unblocked."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def hear_interrupts_again() -> None:
    """In a worker started deaf (`_DeafWhileStarting`): forget a SIGINT that came while it
    started (the parent heard it too, and stops the workers), then take interrupts again."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one is dropped
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _died(workers: Sequence[BaseProcess]) -> str:
    """Why the pool broke, as far as the workers' exit statuses tell. (The pool stops them
    all once one has died; the dead one's status may take a moment to be collected.)"""
    deadline = time.monotonic() + 2.0
    for process in workers:
        # join() returns at once, the status unknown, when the pool's own thread has just
        # reaped the process (its waitpid won, ours failed): the status shows once that
        # thread has recorded it, a moment later.
        while process.exitcode is None and time.monotonic() < deadline:
            process.join(0.01)
            time.sleep(0.001)
    # (A status of 0 or more is an exit of its own: an error it printed, or an initializer
    # that failed; the pool's own stop of the others, and a kill, are negative: signals.)
    failed = sorted(code for p in workers if (code := p.exitcode) is not None and code >= 0)
    why = (f"it ended with an error, exit status {failed[0]}: see its message on stderr"
           if failed else "killed, or out of memory")
    return (f"a worker process died ({why}); the stored epochs and checkpoints are kept: run "
            "the same command again to resume")


WorkerJob = tuple[Callable[..., None], tuple[Any, ...], str, int]  # (fn, args, label, epochs)

# How long the jobs' last progress calls may take to arrive once every job has ended; they are
# only progress: a queue that lost them (it cannot, short of a bug) does not hang the run.
DELIVERY_TIMEOUT = 10.0


def run_in_workers(
    jobs: Sequence[WorkerJob],
    *,
    workers: int,
    reporter: Reporter,
    threads: int | None = None,
    run_here: Callable[[int, Reporter, Callable[[], None]], None] | None = None,
) -> None:
    """Run `fn(*args, reporter)` for each (fn, args, label, epochs) of `jobs`, `workers` at a
    time, in the order given; the first failing job's exception is raised here.

    Jobs report through a `QueueReporter` whose calls this process replays on `reporter`
    (only the main thread touches it). With `run_here`, this process is one of the workers:
    a thread calls `run_here(i, reporter, check)` for the jobs it takes (sharing the CPU
    threads like a worker), so one process fewer loads torch and the data; `check()` raises
    `Stopped` once the others have failed. Every job trains with `threads` threads (default:
    its share of the cores).
    """
    context = get_context("spawn")  # CUDA and torch's thread pools do not survive fork
    threads = threads or threads_per_job(workers)
    processes = workers - 1 if run_here is not None else workers
    todo = deque(range(len(jobs)))  # taken in order: the caller puts the longest first
    lock = threading.Lock()
    stop = threading.Event()
    failures: list[BaseException] = []

    def take() -> int | None:
        with lock:
            return todo.popleft() if todo else None

    def check() -> None:
        if stop.is_set():
            raise Stopped

    def work_here(queued: QueueReporter) -> None:
        assert run_here is not None
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            while not stop.is_set() and (index := take()) is not None:
                run_here(index, queued, check)
                queued.delivered(index)
        except Stopped:
            pass
        except BaseException as error:  # noqa: BLE001 (the parent's loop raises it)
            failures.append(error)
        finally:
            torch.set_num_threads(previous)

    # A queue inherited by the workers at their start (no manager process to outlive us); its
    # locks are registered with the resource tracker, started first to outlive a SIGHUP.
    start_resource_tracker()
    events = context.Queue()
    queued = QueueReporter(events)
    pool_context = _RecordingContext(context)
    with ProcessPoolExecutor(
        max_workers=max(processes, 1), mp_context=pool_context, initializer=_init_worker,
        initargs=(threads, events, os.getpid()),
    ) as pool:
        for _, _, label, epochs in jobs:  # every job shows from the start, queued or not
            reporter.start(label, epochs)
        running: dict[Future[None], int] = {}

        def refill() -> None:
            while len(running) < processes and not stop.is_set() and (i := take()) is not None:
                fn, args, _, _ = jobs[i]
                running[pool.submit(_call, fn, args, i)] = i

        refill()
        here, delivered = None, set[int]()  # the jobs whose last reports have arrived
        if run_here is not None:
            here = threading.Thread(target=work_here, args=(queued,), name="fashionlab-job")
            here.start()
        try:
            while running or (here is not None and here.is_alive()):
                raise_if_stopped()  # a stop a finaliser swallowed
                # The futures' and the pool's locks are taken in these blocks: a stop raised
                # while one is held would leave it held, and the pool's shutdown would wait
                # forever. Forwarding (the reporter may be slow: MLflow) is left stoppable.
                with deferred():
                    done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                    if not running:
                        here.join(timeout=0.5)  # type: ignore[union-attr]
                delivered |= forward(events, reporter)
                with deferred():
                    for future in done:
                        del running[future]
                        try:
                            future.result()  # re-raise a worker's error
                        except BrokenProcessPool:
                            raise WorkerDied(_died(pool_context.started)) from None
                    if failures:
                        raise failures[0]
                    refill()
            if failures:  # the thread here failed after the loop's last look
                raise failures[0]
            # Every job ran: its last calls may still be on their way (a worker's queue writes
            # from a thread of its own). Each job's mark comes after them.
            deadline = time.monotonic() + DELIVERY_TIMEOUT
            while len(delivered) < len(jobs) and time.monotonic() < deadline:
                raise_if_stopped()
                delivered |= forward(events, reporter, wait=0.1)
        except BaseException:
            # An error, Ctrl-C or SIGTERM: the workers stop now, not after their jobs (a
            # worker's unfinished epoch is lost; its stored epochs and checkpoint remain).
            for child in pool_context.started:
                if child.exitcode is None:
                    child.kill()
            events.cancel_join_thread()  # a killed writer may hold the queue's lock
            raise
        finally:
            stop.set()  # the thread here stops after its epoch
            if here is not None:
                here.join()
        for _, _, label, _ in jobs:
            reporter.finish(label)


# How long helpers stopped with this process (SIGTERM, a stop to them: each leaves its work
# resumable, a few writes to the store) may take before they are killed; the stop waits for
# no more.
HELPER_STOP_TIMEOUT = 10.0
HELPER_STOPPED = 130  # a helper's exit status after a stop (Ctrl-C), as a shell's


def _helper(work: Any, index: int, threads: int, events: Any, parent: int,
            interrupts: bool) -> None:
    """A helper process: `fn(*args, reporter)`, the call on its `work` queue, reporting to the
    parent. A stop (Ctrl-C where the parent takes it too, or the parent's SIGTERM) ends it with
    HELPER_STOPPED, an error the user can fix with status 1 after its one line: no traceback
    either way, and what it reported reaches the parent first."""
    _init_worker(threads, events, parent)
    if not interrupts:  # a command that ignores Ctrl-C (started in the background): so do they
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    assert _reporter is not None
    _reporter.delivered(index)  # the mark that it hears a stop from now on
    status = 0
    try:
        fn, args = work.get()
        fn(*args, _reporter)
    except KeyboardInterrupt:
        status = HELPER_STOPPED  # what it leaves is in order (its stop did that); said once
    except FashionlabError as error:
        sys.stderr.write(f"fashionlab: a worker process: {error}\n")
        sys.stderr.flush()
        status = 1
    # Done: a stop that comes now (the parent's SIGTERM after the terminal's Ctrl-C) would be
    # a traceback here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    events.close()
    events.join_thread()  # all of it on the way: the parent reads it until this process ends
    os._exit(status)


def _stop(signum: int, frame: FrameType | None) -> None:
    """A helper's SIGTERM: its parent stops it, as Ctrl-C would (see `stops.heard`)."""
    if heard(signum):
        raise KeyboardInterrupt


class Helpers:
    """Processes that each call `fn(*args, reporter)` beside this process's own work: a
    search's other workers on this machine. Each starts deaf to the terminal's Ctrl-C until
    it runs, trains with `threads` CPU threads, and dies with this process; what they report
    is replayed on this process's reporter, in this thread, whenever `reporter` (the one to
    give this process's own work) is called, or `poll` or `wait` runs. They take Ctrl-C as
    this process does (not at all when it ignores it: a command started in the background).

    A helper that a stop ended (HELPER_STOPPED) has left, and the others go on; one that
    failed or was killed raises WorkerDied at the next look. Used as a context manager, the
    helpers still running at its end are stopped (SIGTERM, which they take as Ctrl-C), those
    still starting are killed, and so are those that have not ended after
    HELPER_STOP_TIMEOUT."""

    def __init__(self, calls: Sequence[tuple[Callable[..., None], tuple[Any, ...]]], *,
                 threads: int, reporter: Reporter) -> None:
        self._to = reporter
        self.reporter: Reporter = _Polling(reporter, self)
        self.threads = threads  # each helper's CPU threads
        context = get_context("spawn")  # CUDA and torch's thread pools do not survive fork
        start_resource_tracker()  # (before the queue: see the function)
        self._events = context.Queue()
        self._closed = False
        interrupts = signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        # Each call goes on a queue of its own, not with the process's start: a start writes
        # what it passes (a dataset: tens of MB) into a pipe whose reading end this process
        # holds until the write is over, and would wait forever on a helper killed meanwhile.
        self._calls = list(calls)
        self._work = [context.Queue() for _ in self._calls]
        self.processes: list[BaseProcess] = [
            _DeafWhileStarting(target=_helper, args=(work, index, threads, self._events,
                                                     os.getpid(), interrupts), daemon=True)
            for index, work in enumerate(self._work)]
        self._hearing: set[int] = set()  # the helpers that take a stop (their start is over)

    def __enter__(self) -> Self:
        try:
            for process, work, call in zip(self.processes, self._work, self._calls,
                                           strict=True):
                process.start()
                work.put(call)  # written by the queue's own thread: nothing here waits for it
                work.cancel_join_thread()  # nor at exit, should the helper never read it
        except BaseException:  # a stop between two starts: those started are stopped too
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        running = [p for p in self.processes if p.pid is not None and p.exitcode is None]
        with deferred():  # a second Ctrl-C does not cut the helpers' cleanup short
            # (what they reported is not shown now: they stop; their marks say who hears it)
            self._hearing |= forward(self._events, Silent())
            for index, process in enumerate(self.processes):
                if process in running and index in self._hearing:
                    with contextlib.suppress(OSError):
                        os.kill(process.pid, signal.SIGTERM)  # type: ignore[arg-type]
                elif process in running:  # still starting (deaf): nothing done, nothing to keep
                    process.kill()
            deadline = time.monotonic() + HELPER_STOP_TIMEOUT
            while any(p.exitcode is None for p in running) and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):  # read, or a helper's last reports
                    self._events.get(timeout=0.05)  # block its end
            for process in running:
                if process.exitcode is None:
                    process.kill()
                process.join()
            self._closed = True
            self._events.cancel_join_thread()  # a killed helper may hold the queue's lock
            self._events.close()
            for work in self._work:  # (a call no helper read: its writer thread ends)
                work.close()

    def poll(self) -> None:
        """Replay what the helpers reported; raise WorkerDied if one of them failed."""
        if self._closed:  # (the block has ended: this process's last reports)
            return
        self._hearing |= forward(self._events, self._to)
        failed = [p for p in self.processes if p.exitcode not in (None, 0, HELPER_STOPPED)]
        if failed:
            raise WorkerDied(_died(failed))

    def wait(self) -> None:
        """Until every helper has ended, replaying what they report."""
        while any(p.exitcode is None for p in self.processes):
            raise_if_stopped()
            self._hearing |= forward(self._events, self._to, wait=0.2)
            self.poll()
        self.poll()  # their last reports: a helper ends once all of its own are on the queue


class _Polling:
    """A reporter that first replays what the helpers reported (`Helpers.poll`)."""

    def __init__(self, reporter: Reporter, helpers: Helpers) -> None:
        self._reporter, self._helpers = reporter, helpers

    def start(self, label: str, epochs: int) -> None:
        self._helpers.poll()
        self._reporter.start(label, epochs)

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        self._helpers.poll()
        self._reporter.epoch(label, epoch, metrics)

    def finish(self, label: str) -> None:
        self._helpers.poll()
        self._reporter.finish(label)

    def log(self, message: str) -> None:
        self._helpers.poll()
        self._reporter.log(message)
