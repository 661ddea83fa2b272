"""Progress of long work: the one protocol by which training reports what it does, and the
reporters that show it.

Training calls a `Reporter`: `start` when a stack of models begins (or is queued), `epoch`
after each stored epoch, `finish` when it ends, `log` for a line of text. A stack is named by
its label. `Bars` draws rich progress bars (a terminal, a notebook); `Lines` writes one plain
line per epoch (a log file, a pipe, CI); `Silent` shows nothing; a worker process reports
through a `QueueReporter`, whose calls `forward` replays on the parent's reporter; tests
record or interrupt through the same protocol.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import queue
import sys
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Protocol

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
from rich.table import Column

from fashionlab.text import duration, number

if TYPE_CHECKING:  # annotations only: reporting needs no torch
    from fashionlab.train import EpochMetrics

__all__ = ["Bars", "Lines", "QueueReporter", "Reporter", "Silent", "forward", "interactive",
           "mean_val_accuracy", "reporting"]


class Reporter(Protocol):
    """What training tells about its progress. Implementations must be cheap: `epoch` runs
    after every epoch of every stack."""

    def start(self, label: str, epochs: int) -> None:
        """A stack of models named `label` will train `epochs` epochs (again: no-op)."""

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        """Epoch `epoch` (1-based) of the stack is stored; `metrics` per model key (empty when
        the stack resumed from a checkpoint at that epoch)."""

    def finish(self, label: str) -> None:
        """The stack is done."""

    def log(self, message: str) -> None:
        """A line of text for the person watching."""


def _mean(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def mean_val_accuracy(metrics: Mapping[str, EpochMetrics]) -> float:
    """The mean validation accuracy over a stack's models (NaN when none validates)."""
    return _mean(m.val_accuracy for m in metrics.values())


class Silent:
    """Shows nothing."""

    def start(self, label: str, epochs: int) -> None:
        pass

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        pass

    def finish(self, label: str) -> None:
        pass

    def log(self, message: str) -> None:
        pass


class Bars:
    """One rich progress bar per stack, on stderr: epochs done, mean val accuracy, times.
    A context manager: the bars are drawn between enter and exit."""

    def __init__(self, *, console: Console | None = None) -> None:
        console = console or Console(stderr=True)
        # On a narrow terminal the stack's name gives way (cut with an ellipsis), then the
        # bar; the counts, the accuracy and the times keep their width (at 80 columns they
        # were squeezed to "0:0…" behind a long name).
        self._bars = RichProgress(
            TextColumn("{task.description}", markup=False,  # a stack's name is text
                       table_column=Column(no_wrap=True, overflow="ellipsis",
                                           max_width=max(16, console.width - 48))),
            BarColumn(bar_width=None, table_column=Column(ratio=1, max_width=40)),
            MofNCompleteColumn(table_column=Column(no_wrap=True)),
            TextColumn("epochs", table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True)),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            TimeRemainingColumn(table_column=Column(no_wrap=True)),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Bars:  # noqa: PYI034 - a final class
        self._bars.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._bars.__exit__(kind, error, trace)

    def start(self, label: str, epochs: int) -> None:
        if label not in self._tasks:
            self._tasks[label] = self._bars.add_task(label, total=epochs, status="")

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        task = self._tasks.get(label)
        if task is None:
            return
        accuracy = mean_val_accuracy(metrics)
        if math.isfinite(accuracy):
            status = f"val_acc {accuracy:.4f}"
        elif metrics:  # no validation data (a retrain): show the training accuracy
            status = f"acc {sum(m.accuracy for m in metrics.values()) / len(metrics):.4f}"
        else:  # resumed from a checkpoint: only the epoch is known
            status = ""
        self._bars.update(task, completed=epoch, status=status)

    def finish(self, label: str) -> None:
        task = self._tasks.get(label)
        if task is not None:
            total: Any = self._bars.tasks[self._bars.task_ids.index(task)].total
            self._bars.update(task, completed=total)

    def log(self, message: str) -> None:
        self._bars.console.print(message, markup=False)


class Lines:
    """One plain line per finished epoch of each stack, the way Keras' `verbose=2` logs, for
    output that is not a terminal (a file, a pipe, CI); each line is flushed as written:

        small · small L2  (6 models)  epoch 3/40  loss 0.4123  val_loss 0.3987  val_acc 0.8612  1.3 s

    The numbers are means over the stack's models (a diverged model's NaN left out); without
    validation data (a retrain) `acc` replaces `val_loss` and `val_acc`; the time is the
    epoch's, for the whole stack. A stack resumed from a checkpoint writes
    `LABEL  resumed at epoch N/M`."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self._epochs: dict[str, int] = {}

    def start(self, label: str, epochs: int) -> None:
        self._epochs.setdefault(label, epochs)

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        total = self._epochs.get(label)
        of = f"{epoch}/{total}" if total else f"{epoch}"
        if not metrics:
            self._write(f"{label}  resumed at epoch {of}")
            return
        values = list(metrics.values())
        parts = [f"{label}  epoch {of}", f"loss {number(_mean(m.loss for m in values), '.4f')}"]
        val_accuracy = mean_val_accuracy(metrics)
        if math.isfinite(val_accuracy):
            parts += [f"val_loss {number(_mean(m.val_loss for m in values), '.4f')}",
                      f"val_acc {val_accuracy:.4f}"]
        else:
            parts.append(f"acc {number(_mean(m.accuracy for m in values), '.4f')}")
        parts.append(duration(max(m.seconds for m in values)))
        self._write("  ".join(parts))

    def finish(self, label: str) -> None:
        self._epochs.pop(label, None)

    def log(self, message: str) -> None:
        self._write(message)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()  # a log read while the run goes on (tail -f, CI) is up to date


class QueueReporter:
    """A reporter in a worker process: every call goes on a queue to the parent process,
    where `forward` replays it on the parent's reporter."""

    def __init__(self, events: Any) -> None:
        self.events = events  # a multiprocessing (manager) queue

    def start(self, label: str, epochs: int) -> None:
        self.events.put(("start", label, epochs))

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        self.events.put(("epoch", label, epoch, dict(metrics)))

    def finish(self, label: str) -> None:
        self.events.put(("finish", label))

    def log(self, message: str) -> None:
        self.events.put(("log", message))

    def delivered(self, job: int) -> None:
        """Job `job` reports nothing more: its calls are all on the queue before this mark.
        (A queue's put is asynchronous: a job can end before its last calls reach the parent,
        which waits for this mark instead.)"""
        self.events.put((_DELIVERED, job))


_DELIVERED = "delivered"  # QueueReporter.delivered's mark on the queue: not replayed


def forward(events: Any, reporter: Reporter, *, wait: float = 0.0) -> set[int]:
    """Replay on `reporter` the calls waiting on a `QueueReporter`'s queue, waiting up to
    `wait` seconds for the first one; returns the jobs `QueueReporter.delivered` marked."""
    delivered: set[int] = set()
    while True:
        try:
            name, *args = events.get(timeout=wait) if wait > 0 else events.get_nowait()
        except queue.Empty:
            return delivered
        wait = 0.0
        if name == _DELIVERED:
            delivered.add(args[0])
        else:
            getattr(reporter, name)(*args)


def interactive(console: Console | None = None) -> bool:
    """Whether progress can be drawn as live bars: stderr is a terminal (not a dumb one), or
    the process is a Jupyter kernel with ipywidgets (without them rich cannot draw there and
    warns in the cell at every bar)."""
    console = console or Console(stderr=True)
    if console.is_jupyter:
        return importlib.util.find_spec("ipywidgets") is not None
    return console.is_interactive


@contextlib.contextmanager
def reporting(progress: bool | Reporter) -> Iterator[Reporter]:
    """The reporter a library call uses: progress on stderr for its duration (True): bars when
    they can be drawn (`interactive`), else `Lines`; none (False); or the caller's own."""
    if progress is True and interactive():
        with Bars() as bars:
            yield bars
    elif progress is True:
        yield Lines(sys.stderr)
    elif progress is False:
        yield Silent()
    else:
        yield progress


class Tee:
    """Every call on each of several reporters, in the order given: bars on the screen and a
    live log elsewhere (`fashionlab.integrations.mlflow`) from one run."""

    def __init__(self, *reporters: Reporter) -> None:
        self.reporters = reporters

    def start(self, label: str, epochs: int) -> None:
        for reporter in self.reporters:
            reporter.start(label, epochs)

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        for reporter in self.reporters:
            reporter.epoch(label, epoch, metrics)

    def finish(self, label: str) -> None:
        for reporter in self.reporters:
            reporter.finish(label)

    def log(self, message: str) -> None:
        for reporter in self.reporters:
            reporter.log(message)
