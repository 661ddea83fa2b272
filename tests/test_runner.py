"""Jobs in worker processes and in this process."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    KillsWhoReadsIt,
    Recorder,
    chatty_job,
    helper_job,
    record_job,
    tiny_study_toml,
)

from fashionlab.progress import Silent
from fashionlab.runner import HELPER_STOPPED, Helpers, Stopped, WorkerDied, run_in_workers


def _jobs(path: Path, names: list[str]) -> list:
    return [(record_job, (str(path), name), name, 1) for name in names]


def _sigint_blocked(answer: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    answer.put(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))


def test_a_worker_starts_deaf_to_ctrl_c_and_hears_it_once_started():
    """Ctrl-C reaches the whole process group: a worker still importing torch printed its
    traceback under the command's one line. It starts with SIGINT blocked (the parent's
    mask is as it was), drops what came meanwhile, then takes interrupts as before."""
    from fashionlab.runner import _RecordingContext

    context = _RecordingContext(multiprocessing.get_context("spawn"))
    answer = context.Queue()
    process = context.Process(target=_sigint_blocked, args=(answer,))
    process.start()
    assert answer.get(timeout=60) is True
    process.join(timeout=60)
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the parent's
    script = ("import os, signal\n"
              "from fashionlab.runner import hear_interrupts_again\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})\n"
              "os.kill(os.getpid(), signal.SIGINT)  # came while it started: pending\n"
              "hear_interrupts_again()  # dropped, not raised\n"
              "try:\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    signal.sigtimedwait([], 0.1)\n"
              "except KeyboardInterrupt:\n"
              "    print('heard')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "heard\n", "")


def test_every_job_runs_once_here_or_in_a_worker(tmp_path: Path):
    log = tmp_path / "log"
    here: list[str] = []

    def run_here(index: int, reporter, check) -> None:
        check()
        here.append(f"job{index}")
        record_job(str(log), f"job{index}", reporter)

    run_in_workers(_jobs(log, [f"job{i}" for i in range(5)]), workers=2,
                   reporter=Silent(), run_here=run_here)
    ran = dict(line.split() for line in log.read_text().splitlines())
    assert sorted(ran) == [f"job{i}" for i in range(5)]  # each exactly once (dict: no repeats)
    assert here and all(ran[name] == str(os.getpid()) for name in here)
    assert any(pid != str(os.getpid()) for pid in ran.values())  # and some in the worker


def test_a_failing_worker_job_stops_the_work_here(tmp_path: Path):
    log = tmp_path / "log"
    checks: list[bool] = []

    def run_here(index: int, reporter, check) -> None:
        for _ in range(100):  # a long job, checking between its "epochs"
            try:
                check()
            except Stopped:
                checks.append(True)
                raise
            record_job(str(log), "long", reporter)  # the label of the job taken here

    with pytest.raises(RuntimeError, match="this job fails"):
        run_in_workers(_jobs(log, ["fails", "long"]), workers=2,
                       reporter=Silent(), run_here=run_here)
    assert checks == [True]  # the job here noticed and stopped early
    assert len(log.read_text().splitlines()) < 100


def test_a_worker_killed_outright_is_one_error_not_a_broken_pool(tmp_path: Path):
    with pytest.raises(WorkerDied, match="a worker process died .* run the same command again"):
        run_in_workers(_jobs(tmp_path / "log", ["dies"]), workers=1, reporter=Silent())


def test_a_worker_that_failed_is_said_to_have_failed_even_when_the_pool_reaped_it_first():
    """The pool's own thread reaps a dead worker too: when its waitpid wins, join() here
    returns at once with no status. The failure was then read as a kill ("killed, or out of
    memory") now and then under load; the status that thread records is waited for."""
    from fashionlab.runner import _died

    process = multiprocessing.get_context("spawn").Process(target=os._exit, args=(1,))
    process.start()
    reaped = threading.Event()

    def reap_as_the_pool_does() -> None:  # waitpid, then (a moment later) the record
        _, status = os.waitpid(process.pid, 0)
        reaped.set()
        time.sleep(0.2)
        process._popen.returncode = os.waitstatus_to_exitcode(status)  # type: ignore[attr-defined]

    thread = threading.Thread(target=reap_as_the_pool_does)
    thread.start()
    assert reaped.wait(timeout=60)
    why = _died([process])
    thread.join()
    assert "(it ended with an error, exit status 1: see its message on stderr)" in why


def test_worker_jobs_report_through_the_callers_reporter(tmp_path: Path):
    recorder = Recorder()

    def run_here(index: int, reporter, check) -> None:
        record_job(str(tmp_path / "log"), f"job{index}", reporter)

    names = [f"job{i}" for i in range(4)]
    run_in_workers(_jobs(tmp_path / "log", names), workers=2, reporter=recorder,
                   run_here=run_here)
    # Every job is announced first, reports its epoch (from a worker or from here, through
    # the queue), and is finished at the end: all on the caller's reporter, in this thread.
    assert [c for c in recorder.calls if c[0] == "start"] == [("start", n, 1) for n in names]
    assert sorted(c[1] for c in recorder.calls if c[0] == "epoch") == names
    assert [c for c in recorder.calls if c[0] == "finish"] == [("finish", n) for n in names]


def test_helpers_report_on_this_processs_reporter_as_its_own_work_does(tmp_path: Path):
    recorder = Recorder()
    with Helpers([(helper_job, ("reports", "")), (helper_job, ("stops", ""))], threads=1,
                 reporter=recorder) as helpers:
        helpers.reporter.log("here")  # this process's own work, through `helpers.reporter`
        helpers.wait()
    # A helper stopped (as by Ctrl-C) has left: no error. Both reported, here, in this thread.
    assert [p.exitcode for p in helpers.processes] == [0, HELPER_STOPPED]
    assert ("log", "here") in recorder.calls
    assert sorted(c[1] for c in recorder.calls if c[0] == "epoch") == ["helper reports",
                                                                     "helper stops"]


def test_a_helper_that_fails_is_one_error_here_and_one_line_there(
        capfd: pytest.CaptureFixture[str]):
    with pytest.raises(WorkerDied, match=r"exit status 1: see its message on stderr"), \
            Helpers([(helper_job, ("fails", ""))], threads=1, reporter=Silent()) as helpers:
        helpers.wait()
    err = capfd.readouterr().err
    assert "fashionlab: a worker process: the helper's one line\n" in err
    assert "Traceback" not in err


def test_a_helper_killed_outright_is_one_error_at_the_next_report(tmp_path: Path):
    with Helpers([(helper_job, ("waits", str(tmp_path / "stopped")))], threads=1,
                 reporter=Silent()) as helpers:
        helpers.processes[0].kill()
        helpers.processes[0].join()
        with pytest.raises(WorkerDied, match=r"\(killed, or out of memory\)"):
            helpers.reporter.log("this process's next report")


def test_helpers_still_running_at_the_end_are_stopped_as_ctrl_c_stops_them(tmp_path: Path):
    """What ends the block (an error, a stop) stops the helpers with SIGINT, so that each
    leaves its work resumable, as the terminal's Ctrl-C does; none outlives it."""
    noted = tmp_path / "stopped"
    recorder = Recorder()
    with pytest.raises(RuntimeError, match="this process's error"), \
            Helpers([(helper_job, ("waits", str(noted)))], threads=1,
                    reporter=recorder) as helpers:
        deadline = time.monotonic() + 60
        while not recorder.calls:  # it runs (has reported): it hears interrupts
            assert time.monotonic() < deadline
            helpers.poll()
            time.sleep(0.05)
        raise RuntimeError("this process's error")
    assert helpers.processes[0].exitcode == HELPER_STOPPED
    assert noted.read_text() == "stopped\n"
    assert not multiprocessing.active_children()


def test_a_helper_still_starting_when_the_block_ends_is_killed_not_waited_for():
    """A helper starts deaf to SIGINT (it would print a traceback while importing), so a stop
    sent then is lost and it would run on until killed after HELPER_STOP_TIMEOUT: one that has
    not started its work has done nothing to keep, and is killed at once."""
    with pytest.raises(RuntimeError, match="at once"), \
            Helpers([(helper_job, ("reports", ""))], threads=1, reporter=Silent()) as helpers:
        raise RuntimeError("at once")  # (a spawned process takes seconds to import torch)
    # (its stop lost, it would have done its work: reported, and ended well)
    assert helpers.processes[0].exitcode == -signal.SIGKILL


def test_a_helper_killed_while_it_receives_its_work_leaves_nothing_waiting():
    """What a helper is given (a search's dataset: tens of MB) no longer goes with its start:
    a start writes it into a pipe whose reading end stays open here, and waited forever for a
    helper killed meanwhile."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            big = b"x" * (16 << 20)  # far more than a pipe holds: the write waits for a reader
            with Helpers([(helper_job, (KillsWhoReadsIt(), big))], threads=1,
                         reporter=Silent()) as helpers:
                helpers.wait()
        except BaseException as error:  # noqa: BLE001 (asserted below)
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the start waited for a dead helper"
    assert len(errors) == 1 and isinstance(errors[0], WorkerDied), errors
    assert "(killed, or out of memory)" in str(errors[0])


def test_a_stop_between_two_helpers_starts_ends_the_one_started(monkeypatch):
    from fashionlab import runner

    starts = []
    start = runner._DeafWhileStarting.start

    def second_start_stopped(process) -> None:
        starts.append(process)
        if len(starts) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second one starts
        start(process)

    monkeypatch.setattr(runner._DeafWhileStarting, "start", second_start_stopped)
    helpers = Helpers([(helper_job, ("reports", "")), (helper_job, ("reports", ""))],
                      threads=1, reporter=Silent())
    with pytest.raises(KeyboardInterrupt), helpers:
        pass
    assert helpers.processes[0].exitcode == -signal.SIGKILL  # (still starting: killed)
    assert not multiprocessing.active_children()


def test_helpers_of_a_process_that_ignores_ctrl_c_ignore_it_too(tmp_path: Path):
    """A command started in the background (SIGINT ignored) goes on through a Ctrl-C to its
    group: so do its helpers, which are still stopped with it."""
    noted = tmp_path / "stopped"
    recorder = Recorder()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with Helpers([(helper_job, ("waits", str(noted)))], threads=1,
                     reporter=recorder) as helpers:
            deadline = time.monotonic() + 60
            while not recorder.calls:  # it runs, and would hear Ctrl-C now
                assert time.monotonic() < deadline
                helpers.poll()
                time.sleep(0.05)
            os.kill(helpers.processes[0].pid, signal.SIGINT)
            time.sleep(1)
            assert helpers.processes[0].exitcode is None
    finally:
        signal.signal(signal.SIGINT, previous)
    assert helpers.processes[0].exitcode == HELPER_STOPPED  # stopped with the block
    assert noted.read_text() == "stopped\n"


def test_every_epoch_a_job_reported_is_shown_before_it_is_finished():
    # A queue sends from a thread of its own: a job can be over before its last reports are.
    # More than a pipe holds: a worker whose reports were left unread could not even exit.
    recorder, epochs = Recorder(), 3000
    names = [f"job{i}" for i in range(3)]

    def run_here(index: int, reporter, check) -> None:
        chatty_job(epochs, names[index], reporter)

    def hung(*_) -> None:
        for child in multiprocessing.active_children():  # or the suite could not exit either
            child.kill()
        raise TimeoutError("run_in_workers did not return in 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        run_in_workers([(chatty_job, (epochs, name), name, epochs) for name in names],
                       workers=2, reporter=recorder, run_here=run_here)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    for name in names:
        shown = [c[2] for c in recorder.calls if c[0] == "epoch" and c[1] == name]
        assert shown == list(range(1, epochs + 1)), (name, len(shown))
        last = max(i for i, c in enumerate(recorder.calls) if c[:2] == ("epoch", name))
        assert recorder.calls.index(("finish", name)) > last


def test_a_closed_terminal_stops_a_parallel_study_in_one_line(tiny_idx_dir: Path,
                                                              tmp_path: Path):
    # SIGHUP to the whole process group, as a closed terminal sends it: the parent, its
    # workers and multiprocessing's resource tracker (which, killed, was started again and
    # printed a traceback for every lock it did not know).
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=40))
    command = [sys.executable, "-c", "from fashionlab.cli import main; main()", "study",
               str(study), "--run-dir", str(tmp_path), "--workers", "2", "-q"]  # no progress
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    database = tmp_path / "fashionlab.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        if database.exists():
            with contextlib.suppress(sqlite3.Error), \
                    contextlib.closing(sqlite3.connect(database)) as conn:
                if conn.execute("SELECT count(*) FROM fl_epochs").fetchone()[0] >= 3:
                    break  # the workers train
    os.killpg(process.pid, signal.SIGHUP)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGHUP, err
    assert err.strip().splitlines() == [
        "stopped by SIGHUP: the run is kept; run the same command again to resume it"]
