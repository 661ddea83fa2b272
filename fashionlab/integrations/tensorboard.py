"""TensorBoard event files for fashionlab runs: every model's curves, written as its epochs
are stored, and each candidate's hyperparameters and scores in the HParams view.

Layout, under a run's output directory (run_dir/<run id>/tensorboard/):

    <candidate>/fold-<i>/   one model: scalars loss, accuracy, val_loss, val_accuracy, step =
                            epoch (1-based); likewise <candidate>/retrain, <candidate>/final,
                            trial-<n>/fold-<i>
    <candidate>/            its HParams entry: the candidate's resolved config flattened
                            ("train.learning_rate", "model.layers.0.units") and the study's
                            numbers for it ("hparam/val_accuracy" ...), once the run finished

so `tensorboard --logdir fashionlab-runs` shows every run. What an event file already holds is
read back before anything is written to it: a run killed and resumed, or exported again,
writes no step twice. `TensorBoard` does it live as a progress reporter (`tensorboard_progress`
puts it in front of the bars); `export_run_to_tensorboard` does it after the fact.

Needs the `tensorboard` extra (pip install 'fashionlab[tensorboard]').
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fashionlab.arguments import check_run_dir
from fashionlab.errors import ConfigError, OutputError, StoreError
from fashionlab.progress import Reporter, reporting
from fashionlab.schema import METRICS
from fashionlab.serialize import file_in_the_way, flatten
from fashionlab.store import DEFAULT_RUN_DIR, RunRecord, Store, as_store, safe_url
from fashionlab.text import safe_name
from fashionlab.train import EpochMetrics

if TYPE_CHECKING:
    from fashionlab.results import StudyResult
    from fashionlab.search import SearchResult

try:  # the optional extra: without it, a one-line error when TensorBoard is asked for
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
    INSTALLED = True
except ImportError:
    INSTALLED = False
try:  # the writer's thread (private: another TensorBoard may not have it, and then prints)
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
except ImportError:
    _AsyncWriterThread = None

__all__ = ["HPARAMS_TAG", "INSTALLED", "TensorBoard", "export_run_to_tensorboard", "model_logdir",
           "tensorboard_dir", "tensorboard_progress", "write_shown_run", "written_steps"]

HPARAMS_TAG = "_hparams_/session_start_info"  # the HParams plugin's tag of one entry


def _require() -> None:
    if not INSTALLED:
        raise ConfigError("TensorBoard is not installed: pip install 'fashionlab[tensorboard]'")
    _quiet_writer_threads()


def _quiet_writer_threads() -> None:
    """Keep the event writer's thread from printing a failed write as a traceback.

    TensorBoard writes event files from a thread; a write the disk refuses is raised there,
    where Python prints "Exception in thread ...", and raised again by the writer's next
    call in ours, which says it in one line. Other threads' exceptions print as before.
    """
    shown = threading.excepthook
    if getattr(shown, "quiets_event_writers", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not (_AsyncWriterThread is not None and isinstance(args.thread, _AsyncWriterThread)
                and isinstance(args.exc_value, OSError)):
            shown(args)

    hook.quiets_event_writers = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _remove_empty_event_files(logdir: Path) -> None:
    """The event files this process opened in `logdir` and could not write a byte to (a full
    disk): TensorBoard would list them, empty."""
    for path in logdir.rglob(f"events.out.tfevents.*.{os.getpid()}.*"):
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()


def tensorboard_dir(run: RunRecord, run_dir: str | Path = DEFAULT_RUN_DIR) -> Path:
    """Where a run's event files go: <its output directory>/tensorboard."""
    return Path(run.output_dir or Path(run_dir) / run.id) / "tensorboard"


def model_logdir(logdir: str | Path, key: str) -> Path:
    """A model's event directory: its candidate and its part, each a safe file name
    ("dense(64)/fold-3" -> logdir/dense_64_/fold-3; a "/" inside the candidate's own name
    stays in its folder's name, as in its models' folder)."""
    candidate, _, part = key.rpartition("/")
    return Path(logdir, *(safe_name(p) for p in (candidate, part) if p))


def written_steps(directory: Path) -> set[tuple[str, int]]:
    """(tag, step) of every value the event files directly in `directory` hold (a file cut
    short by a kill reads up to its last whole record)."""
    steps: set[tuple[str, int]] = set()
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in LegacyEventFileLoader(str(path)).Load():
            steps.update((value.tag, event.step) for value in event.summary.value)
    return steps


class _Writer:
    """One event directory: what it holds (read back once), and a writer opened when the
    first new value comes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.written = written_steps(directory) if directory.is_dir() else set()
        self.writer: SummaryWriter | None = None

    def open(self) -> SummaryWriter:
        if self.writer is None:
            self.writer = SummaryWriter(str(self.directory))
        return self.writer

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        for tag, value in values.items():
            if value is None or not math.isfinite(value) or (tag, step) in self.written:
                continue  # a retrain has no validation; a diverged epoch has no number
            self.open().add_scalar(tag, value, step)
            self.written.add((tag, step))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _RunWriter:
    """The event files of one run."""

    def __init__(self, store: Store, run: RunRecord, logdir: Path) -> None:
        self.store, self.run, self.logdir = store, run, logdir
        self.writers: dict[Path, _Writer] = {}
        self.keys: set[str] = set()
        self.refresh()

    def refresh(self) -> None:
        """Read the run's model keys again (a retrain or final model registers later)."""
        self.keys = {m.key for m in self.store.models(self.run.id)}

    def writer(self, directory: Path) -> _Writer:
        if directory not in self.writers:
            self.writers[directory] = _Writer(directory)
        return self.writers[directory]

    def epochs(self, keys: Iterable[str]) -> None:
        """Write the epochs the store holds for these models and their files do not."""
        for key in keys:
            writer = self.writer(model_logdir(self.logdir, key))
            for record in self.store.epochs(self.run.id, key):
                writer.scalars(record.epoch, {m: getattr(record, m) for m in METRICS})
            writer.flush()

    def hparams(self) -> None:
        """One HParams entry per candidate (or trial) of a finished run, from its summary."""
        run = self.store.run(self.run.id)
        for name, params, scores in _entries(run):
            # The candidate's (or trial's) folder, above its models' ("a/b" is one name).
            writer = self.writer(Path(self.logdir, safe_name(name)))
            if any(tag == HPARAMS_TAG for tag, _ in writer.written):
                continue
            metrics = {f"hparam/{k}": v for k, v in scores.items()
                       if v is not None and math.isfinite(v)}
            for summary in hparams(params, metrics):
                writer.open().file_writer.add_summary(summary)
            writer.written.add((HPARAMS_TAG, 0))
            writer.scalars(0, metrics)
            writer.flush()

    def close(self) -> None:
        """Close every file, even after one fails (its error is raised once all are closed:
        an unclosed writer's thread would outlive the export)."""
        failed: OSError | None = None
        for writer in self.writers.values():
            try:
                writer.close()
            except OSError as error:
                writer.writer = None  # its thread has stopped; the error is its last word
                failed = failed or error
        self.writers.clear()
        if failed is not None:
            raise failed


def export_run_to_tensorboard(store: Store, run_id: str,
                              logdir: str | Path | None = None) -> Path:
    """Write a run's curves (every model, every stored epoch) and, once it finished, its
    HParams entries; values already in the event files are not written again. Returns the
    directory (default: the run's tensorboard/ directory). OutputError (one line) when it
    cannot be written."""
    store = as_store(store)
    _require()
    if logdir is not None and not str(logdir).strip():  # Path("") would be the current folder
        raise OutputError("logdir (--to tensorboard DIR): the log directory is empty")
    run = store.seen_run(run_id)  # a run directory moved or copied: its files there
    target = Path(logdir) if logdir is not None else tensorboard_dir(run)
    blocking = file_in_the_way(target)
    if blocking is not None:
        raise OutputError(f"{blocking} is a file, not a folder (TensorBoard's log directory "
                          f"{target})")
    try:
        writer = _RunWriter(store, run, target)
        try:
            writer.epochs(sorted(writer.keys))
            if run.status == "finished":
                writer.hparams()
        finally:
            writer.close()
    except OSError as error:  # no permission, a full disk
        _remove_empty_event_files(target)
        raise OutputError(f"{error.filename or target}: cannot write TensorBoard's event files "
                          f"({error.strerror or error})") from None
    return target


class TensorBoard:
    """A progress reporter that writes each stack's stored epochs to TensorBoard event files
    as they come, then passes every call on to `then` (default: nothing shown).

    It learns the run from the store: the run this process is running that holds the models
    it hears of. A context manager: on exit it writes the HParams entries of the runs it
    wrote for that finished, and closes its files. A run that trained nothing here (finished
    already, shown from the store) reports no epoch: `write_shown_run` writes it.

        with TensorBoard(run_dir="fashionlab-runs") as board:
            result = run_study(spec, run_dir="fashionlab-runs", progress=board)
        write_shown_run(result, run_dir="fashionlab-runs")
    """

    def __init__(self, *, run_dir: str | Path = DEFAULT_RUN_DIR, store_url: str | None = None,
                 then: Reporter | None = None) -> None:
        _require()
        self.run_dir = check_run_dir(run_dir)
        self.store_url = store_url
        self.then = then
        self._store: Store | None = None
        self._runs: dict[str, _RunWriter] = {}  # run id -> its writer
        self._unplaced = False  # epochs heard of no run of this process in its store

    def __enter__(self) -> TensorBoard:  # noqa: PYI034 - a final class
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Write the HParams entries of the finished runs it saw; close every file. Epochs
        heard with no run of this process in its store to write them for (it was given
        another run directory or store than the study's) are a warning."""
        if self._unplaced and not self._runs:
            warnings.warn(f"TensorBoard wrote nothing: the store of {self._where()} holds no "
                          "run this process trains; give it the run_dir (and store_url) that "
                          "run_study or run_search was given", stacklevel=2)
        self._unplaced = False
        for writer in self._runs.values():
            if self._store is not None and self._store.run(writer.run.id).status == "finished":
                writer.refresh()
                writer.epochs(sorted(writer.keys))  # any epoch a stack read back from the store
                writer.hparams()
            writer.close()
        self._runs.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    def _run_of(self, key: str) -> _RunWriter | None:
        for writer in self._runs.values():
            if key not in writer.keys:
                writer.refresh()
            if key in writer.keys:
                return writer
        if self._store is None:
            try:
                self._store = Store.open(self.run_dir, self.store_url, read_only=True,
                                         create=False)
            except StoreError as error:  # not the study's run directory
                raise ConfigError(f"TensorBoard: {error}; give it the run_dir (and store_url) "
                                  "that run_study or run_search was given") from None
        host, pid = socket.gethostname(), os.getpid()
        for run in self._store.runs():
            if run.id in self._runs or run.status != "running" or (run.host, run.pid) != (
                    host, pid):
                continue
            # This process's own folder of the run, whatever the store recorded: a run
            # directory moved or copied goes on in its new place (the row still names the old
            # one until the run ends).
            folder = (self.run_dir / run.id).resolve()
            writer = _RunWriter(self._store, run, folder / "tensorboard")
            if key in writer.keys:
                self._runs[run.id] = writer
                return writer
        self._unplaced = True  # not a stored model of this process: nothing to write
        return None

    def _where(self) -> str:
        return self.run_dir.as_posix() if self.store_url is None else safe_url(self.store_url)

    def start(self, label: str, epochs: int) -> None:
        if self.then is not None:
            self.then.start(label, epochs)

    def epoch(self, label: str, epoch: int, metrics: Mapping[str, EpochMetrics]) -> None:
        for key in metrics:  # empty after a resume from a checkpoint: written with the next
            writer = self._run_of(key)
            if writer is not None:
                writer.epochs(metrics)
                break
        if self.then is not None:
            self.then.epoch(label, epoch, metrics)

    def finish(self, label: str) -> None:
        if self.then is not None:
            self.then.finish(label)

    def log(self, message: str) -> None:
        if self.then is not None:
            self.then.log(message)


@contextlib.contextmanager
def tensorboard_progress(progress: bool | Reporter, *, tensorboard: bool = True,
                         run_dir: str | Path = DEFAULT_RUN_DIR,
                         store_url: str | None = None) -> Iterator[bool | Reporter]:
    """The `progress` argument for a study or search: as given (bars, nothing, your reporter),
    with a `TensorBoard` in front when `tensorboard` is true."""
    if not tensorboard:
        yield progress
        return
    with reporting(progress) as shown, \
            TensorBoard(run_dir=run_dir, store_url=store_url, then=shown) as board:
        yield board


def write_shown_run(result: StudyResult | SearchResult, *,
                    run_dir: str | Path | None = None,
                    store_url: str | None = None) -> Path | None:
    """After a study or search that a `TensorBoard` watched: its run, when it finished without
    this process training any of it (shown again from the store, so no epoch came live), is
    written now as `export_run_to_tensorboard` writes it, each step once however often it is
    shown. Returns its log directory, or None when the board wrote what there was. (A search
    says not which trials this call trained: a finished one is brought up to date, reading
    back what its event files hold.) `run_dir` defaults to the result's own (the folder of its
    output directory), the store to that run directory's (or FASHIONLAB_STORE)."""
    if not isinstance(getattr(result, "run", None), RunRecord) \
            or getattr(result, "output_dir", None) is None:
        raise TypeError(f"write_shown_run: expected what run_study or run_search returned, got "
                        f"{type(result).__name__}")
    if getattr(result, "trained_here", None):  # a study's: the board wrote it as it came
        return None
    run_dir = Path(result.output_dir).parent if run_dir is None else run_dir
    store = Store.open(run_dir, store_url, read_only=True)
    try:
        run = store.seen_run(result.run.id, run_dir)  # a copied run directory: the copy's
        if run.status != "finished":  # a shared run that other processes finish
            return None
        return export_run_to_tensorboard(store, run.id, tensorboard_dir(run, run_dir))
    finally:
        store.close()


def _hparams(value: Any) -> dict[str, Any]:
    """A config as HParams: `serialize.flatten`'s dotted names; numbers and text as they are,
    anything else as its JSON text: true, false, null, [] (torch's `hparams` would write a
    bool as the number 0.0 or 1.0, and str(None) is Python's "None", no word of the file's)."""
    return {name: leaf if isinstance(leaf, (int, float, str)) and not isinstance(leaf, bool)
            else json.dumps(leaf) for name, leaf in flatten(value).items()}


def _mean(values: Any) -> float | None:
    numbers = [float(v) for v in values or () if v is not None and math.isfinite(float(v))]
    return sum(numbers) / len(numbers) if numbers else None


def _entries(run: RunRecord) -> list[tuple[str, dict[str, Any], dict[str, float | None]]]:
    """(name, flattened config, scores) per candidate of a finished study, per trial of a
    finished search; empty before the run finished."""
    summary = run.summary or {}
    if run.kind == "search":
        objective = summary.get("objective", "value")
        # Named as the trial's models are: a retried trial trains into the folders of the
        # trial it retries, and (the later one) stands for it there.
        trials = {t.get("models") or f"trial-{t['number']}": t
                  for t in summary.get("trials", [])}
        return [(name, {"state": t["state"], **_hparams(t["params"])}, {objective: t["value"]})
                for name, t in trials.items()]
    configs = {c["name"]: c for c in (*run.config.get("candidates", []),
                                      *(run.config.get("final") or []))}
    retrain = summary.get("retrain") or {}
    entries = []
    for c in (*summary.get("candidates", []), *summary.get("final", [])):
        config = {k: v for k, v in configs.get(c["name"], {}).items() if k != "name"}
        scores = {"val_accuracy": _mean(c.get("val_accuracy")),
                  "val_loss": _mean(c.get("val_loss")),
                  "warning_epoch": c.get("warning_epoch"),
                  "test_accuracy": retrain.get("test_accuracy")
                  if retrain.get("candidate") == c["name"] else c.get("test_accuracy")}
        entries.append((c["name"], {"role": c["role"], **_hparams(config)},
                        {k: None if v is None else float(v) for k, v in scores.items()}))
    return entries
