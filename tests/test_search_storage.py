"""The search's storage: its lock beside a SQLite database (one holder at a time, across
processes and threads, on any OS: the `filelock` library) and the retries of lost trials."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from filelock import FileLock
from optuna.trial import TrialState

from fashionlab.errors import StoreError
from fashionlab.search.storage import MAX_RETRIES, ClaimLock, RetryLostTrial
from fashionlab.trials import retried_trial


def test_the_lock_file_admits_one_holder_at_a_time(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    first, second = ClaimLock(url, "s"), ClaimLock(url, "s")
    assert first.path == tmp_path / "store.db.search-lock"
    first.acquire()
    first.acquire()  # held already: nothing more
    waiter = threading.Thread(target=second.acquire)
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive()  # the second waits while the first holds it
    releaser = threading.Thread(target=first.release)  # any thread may release it
    releaser.start()
    releaser.join()
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    second.release()
    second.release()  # free already: nothing happens
    with first:
        pass


def test_another_process_waits_for_the_lock(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    script = ("import sys, time; from fashionlab.search.storage import ClaimLock\n"
              "lock = ClaimLock(sys.argv[1], 's'); print('ready', flush=True)\n"
              "start = time.monotonic()\n"
              "with lock: print(time.monotonic() - start)\n")
    with ClaimLock(url, "s"):
        other = subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE,
                                 text=True)
        assert other.stdout is not None
        assert other.stdout.readline() == "ready\n"  # imports done: it asks for the lock now
        time.sleep(1.0)
    waited = float(other.communicate(timeout=60)[0])
    assert other.returncode == 0
    assert waited > 0.5  # it could not take the lock until it was released here


def test_a_lock_file_that_cannot_be_created_is_a_store_error(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    (tmp_path / "store.db.search-lock").mkdir()  # stands for a read-only run directory
    with pytest.raises(StoreError, match="store.db.search-lock: cannot create the lock file"):
        ClaimLock(url, "s").acquire()


def test_a_read_only_store_folder_says_which_commands_read_it(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    def read_only(self: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(FileLock, "acquire", read_only)  # as on a read-only mount
    with pytest.raises(StoreError, match=r"^\S+store\.db\.search-lock: cannot create the lock "
                       r"file beside the store \(Read-only file system\); `fashionlab runs "
                       r"show` and `fashionlab report --out FILE` read a read-only store$"):
        ClaimLock(f"sqlite:///{tmp_path / 'store.db'}", "s").acquire()


def _retry_chain(study: optuna.Study, crashes: list[bool]) -> list[optuna.trial.FrozenTrial]:
    """Fail the newest trial once per entry (True: its process died, False: the user stopped
    it), retrying it each time as the search does; returns the study's trials."""
    for crashed in crashes:
        trial = study.ask()  # the waiting retry, if there is one
        study.tell(trial, state=TrialState.FAIL)
        RetryLostTrial(crashed=crashed)(study, study.get_trials(deepcopy=False)[trial.number])
    return study.get_trials(deepcopy=False)


def test_crashes_are_retried_max_retries_times_and_stops_always():
    study = optuna.create_study()
    study.enqueue_trial({"x": 1.0})
    study.ask({"x": optuna.distributions.FloatDistribution(0, 2)})  # trial 0 runs ...
    study.tell(0, state=TrialState.FAIL)  # ... and its process dies
    RetryLostTrial()(study, study.get_trials(deepcopy=False)[0])
    trials = _retry_chain(study, [False] * 5 + [True] * (MAX_RETRIES - 1))
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == 1 and waiting[0].params == {"x": 1.0}  # stops cost nothing
    assert waiting[0].system_attrs["failed_trial"] == 0  # the chain's first trial
    assert [retried_trial(t) for t in trials] == [None] + [0] * (len(trials) - 1)
    assert waiting[0].system_attrs["retry_history"] == list(range(len(trials) - 1))
    trials = _retry_chain(study, [True])  # one crash more than MAX_RETRIES
    assert not [t for t in trials if t.state == TrialState.WAITING]
