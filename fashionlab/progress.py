"""Progress display for long work: one bar per stack of models being trained."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress

from fashionlab.train import EpochMetrics


class Progress:
    """Bars on stderr while training; does nothing when disabled (library use, tests)."""

    def __init__(self, *, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self._bars = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epochs"),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console or Console(stderr=True),
            disable=not enabled,
        )

    def __enter__(self) -> Progress:  # noqa: PYI034 - a final class
        self._bars.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._bars.__exit__(kind, error, trace)

    def add_stack(self, label: str, epochs: int) -> TaskID:
        return self._bars.add_task(label, total=epochs, status="")

    def update_stack(self, task: TaskID, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        accuracies = [m.val_accuracy for m in metrics.values() if math.isfinite(m.val_accuracy)]
        if accuracies:
            self.set_stack(task, epoch, sum(accuracies) / len(accuracies))
        elif metrics:  # no validation data (a retrain): show the training accuracy
            accuracy = sum(m.accuracy for m in metrics.values()) / len(metrics)
            self._bars.update(task, completed=epoch, status=f"acc {accuracy:.4f}")

    def set_stack(self, task: TaskID, epoch: int, val_accuracy: float) -> None:
        status = f"val_acc {val_accuracy:.4f}" if math.isfinite(val_accuracy) else ""
        self._bars.update(task, completed=epoch, status=status)

    def finish_stack(self, task: TaskID) -> None:
        total: Any = self._bars.tasks[self._bars.task_ids.index(task)].total
        self._bars.update(task, completed=total)

    def log(self, message: str) -> None:
        if self.enabled:
            self._bars.console.print(message)
