"""Jobs in worker processes and in this process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import record_job

from fashionlab.progress import Progress
from fashionlab.runner import Stopped, run_in_workers


def _jobs(path: Path, names: list[str]) -> list:
    return [(record_job, (str(path), name), name, 1) for name in names]


def test_every_job_runs_once_here_or_in_a_worker(tmp_path: Path):
    log = tmp_path / "log"
    here: list[str] = []

    def run_here(index: int, events, check) -> None:
        check()
        here.append(f"job{index}")
        record_job(str(log), f"job{index}", events)

    run_in_workers(_jobs(log, [f"job{i}" for i in range(5)]), workers=2,
                   progress=Progress(enabled=False), run_here=run_here)
    ran = dict(line.split() for line in log.read_text().splitlines())
    assert sorted(ran) == [f"job{i}" for i in range(5)]  # each exactly once (dict: no repeats)
    assert here and all(ran[name] == str(os.getpid()) for name in here)
    assert any(pid != str(os.getpid()) for pid in ran.values())  # and some in the worker


def test_a_failing_worker_job_stops_the_work_here(tmp_path: Path):
    log = tmp_path / "log"
    checks: list[bool] = []

    def run_here(index: int, events, check) -> None:
        for _ in range(100):  # a long job, checking between its "epochs"
            try:
                check()
            except Stopped:
                checks.append(True)
                raise
            record_job(str(log), "long", events)  # the label of the job taken here

    with pytest.raises(RuntimeError, match="this job fails"):
        run_in_workers(_jobs(log, ["fails", "long"]), workers=2,
                       progress=Progress(enabled=False), run_here=run_here)
    assert checks == [True]  # the job here noticed and stopped early
    assert len(log.read_text().splitlines()) < 100
