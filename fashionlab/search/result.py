"""What `run_search` returns: where a search stands, shown as one line of text, or in Jupyter
as its table of top trials and plots."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial

from fashionlab import notebook
from fashionlab.config import StudySpec
from fashionlab.search.finish import ranked_trials
from fashionlab.store import RunRecord
from fashionlab.tables import counts_text
from fashionlab.trials import trial_counts

__all__ = ["SearchResult"]


@dataclass
class SearchResult:
    run: RunRecord
    spec: StudySpec
    study_name: str  # the Optuna study (`optuna-dashboard <storage>` shows it)
    storage: str  # its database URL, password hidden
    output_dir: Path
    trials: list[FrozenTrial]
    finished: bool  # the search is complete: its results written (now, or by an earlier run)
    # n_trials, budget, budget_seconds, budget_tflop, timeout, grid, finish, others-running
    stopped_by: str
    summary: dict[str, Any] | None = None  # what the run stores (search_results.summary)
    wall_seconds: float = 0.0  # this process
    notes: list[str] = dataclasses.field(default_factory=list)  # said while it ran

    @property
    def trials_line(self) -> str:
        """Its trials by how they ended: "2 complete, 0 pruned, 0 failed trials (1 stopped or
        lost and run again)" (a trial and its retries are one trial, not two)."""
        return counts_text(trial_counts(self.trials))

    def __repr__(self) -> str:
        """One line, not the whole dataclass (its trials and config are many KB): the run,
        its trials by how they ended (as its overview says them), why it stopped, the best
        trial (the study's own), where the files are."""
        parts = [f"run={self.run.id!r}", f"study_name={self.study_name!r}",
                 f"trials='{self.trials_line}'",
                 f"stopped_by={self.stopped_by!r}", f"finished={self.finished}"]
        maximize = self.spec.search is None or self.spec.search.objective == "val_accuracy"
        for best in ranked_trials(self.trials, maximize=maximize)[:1]:
            parts.append(f"best='trial {best.number}: {best.value:.4f}'")
        return f"SearchResult({', '.join(parts)}, output_dir='{self.output_dir}')"

    def _repr_html_(self) -> str:
        """Jupyter shows the top trials with their uncertainty, the references, the retrained
        best and the search's plots; an unfinished search says how far it got."""
        status = (f"Run `{self.run.id}`, Optuna study `{self.study_name}`: "
                  f"{self.trials_line}; stopped by {self.stopped_by}, not "
                  "finished: run it again to continue, or with finish=True to write the results "
                  "of the trials so far.")
        return notebook.search_html(self.summary, name=self.spec.name, status=status)
