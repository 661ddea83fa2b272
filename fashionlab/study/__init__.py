"""Running a study: cross-validate the candidates, warn about overfitting, retrain the best and
test it, train the final models, and store every epoch on the way.

A study is resumable at any moment: every stack of models checkpoints after each epoch and the
store holds every finished epoch, so running the same study again continues where it stopped
and ends with the numbers an uninterrupted run gives. The steps themselves live in
`fashionlab.steps` (a search shares them); this subpackage orders them and spreads the
independent ones over worker processes.

    selection  the cross-validation read back: every candidate over the folds, the paired
               comparisons with the best, the best
    jobs       the study's jobs (CV stacks, final models, the retrain, writing the results):
               their keys and plan, claimed from the store, trained here or in worker processes
    run        run_study: start, continue or join the run, train its jobs, then the
               cross-validation, retrain, final models, outputs and report
Each imports only the ones listed before it.

    >>> import fashionlab as fl
    >>> from fashionlab.study import run_study
    >>> result = run_study(fl.load_study("seed"), workers="auto")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fashionlab.lazy import lazy_exports

# Names load on first use (PEP 562): a worker process unpickles its job function from
# `fashionlab.study.jobs`, which imports this package first; importing `run` here would load
# the results' figures (matplotlib, ~30 MB) into every worker.
_EXPORTS = {
    "OUTPUTS": "jobs",
    "RETRAIN": "jobs",
    "StudyResult": "run",
    "cross_validate": "selection",
    "independent_jobs": "jobs",
    "job_key": "jobs",
    "run_study": "run",
}

__all__ = [
    "OUTPUTS",
    "RETRAIN",
    "StudyResult",
    "cross_validate",
    "independent_jobs",
    "job_key",
    "run_study",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # static analysers and IDEs see the names directly
    from fashionlab.results import StudyResult
    from fashionlab.study.jobs import OUTPUTS, RETRAIN, independent_jobs, job_key
    from fashionlab.study.run import run_study
    from fashionlab.study.selection import cross_validate
