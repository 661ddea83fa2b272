"""`fashionlab runs ...` and `fashionlab report`: browse the stored runs, write a run's report.
Thin over fashionlab.runs and fashionlab.report."""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from fashionlab.cli import (
    app,
    output_console,
    path_named,
    path_text_named,
    print_json,
    resumable,
    text_table,
)
from fashionlab.cli.study import StoreUrl
from fashionlab.errors import FashionlabError, StoreError
from fashionlab.provenance import machine_text
from fashionlab.store import DEFAULT_RUN_DIR, Store, safe_url
from fashionlab.tables import (
    HEADERS,
    display_rows,
    nothing_ranked_line,
    reference_lines,
    retrain_line,
    rows_from_summary,
    so_far_note,
    spent_note,
    trial_cells,
)
from fashionlab.text import counted, duration, finite, percent, percent_in

runs_app = typer.Typer(
    help="List, show, compare, export and delete the runs in the store.\n\n"
    "Example: fashionlab runs list", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

RunId = Annotated[str, typer.Argument(help="A run id, or a unique prefix of one.",
                                      show_default=False)]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
STATE_STYLE = {"finished": "green", "running": "cyan", "interrupted": "yellow", "failed": "red"}


class ExportFormat(str, Enum):
    csv = "csv"
    json = "json"


class Destination(str, Enum):
    mlflow = "mlflow"
    tensorboard = "tensorboard"


# Not study.RunDir's default: a store named by --store or FASHIONLAB_STORE that is some run
# directory's fashionlab.db (a copy's, say) has its runs' folders beside it, not in the default
# ./fashionlab-runs, which would show the original's folders, or leave the copy's behind when a
# run is deleted.
SeenRunDir = Annotated[Path | None, typer.Option(
    "--run-dir", parser=path_named, show_default=False,
    help="Where runs, the store and outputs live.  [default: the folder of the fashionlab.db "
    "that --store or FASHIONLAB_STORE names, else fashionlab-runs]")]


@contextmanager
def _store(run_dir: Path | None, url: str | None) -> Iterator[tuple[Store, Path]]:
    """The store opened, and the run directory its runs' folders are seen from."""
    # create=False: a mistyped --run-dir creates nothing
    store = Store.open(run_dir or DEFAULT_RUN_DIR, url, create=False)
    try:
        yield store, run_dir or store.run_dir or DEFAULT_RUN_DIR
    finally:
        store.close()


def _state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def _local(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


@runs_app.command("list")
def list_(
    kind: Annotated[str | None, typer.Option(help="Only runs of this kind: study or search.",
                                             show_default=False)] = None,
    run_dir: SeenRunDir = None,
    store: StoreUrl = None,
    as_json: JsonOption = False,
) -> None:
    """List the runs, newest first: id, study, start, status, best score and duration.

    A run whose process is gone before it finished shows as interrupted (run the same study
    again to resume it).

    Example: fashionlab runs list --run-dir /data/runs
    """
    from fashionlab.runs import list_runs  # numpy and scipy: when the command runs

    with _store(run_dir, store) as (opened, _):
        runs = list_runs(opened, kind=kind)
    if as_json:
        print_json([r.to_dict() for r in runs])
        return
    if not runs:
        typer.echo("no runs yet (`fashionlab study` starts one)")
        return
    table = Table()
    for column in ("id", "study", "started", "status", "best score", "duration"):
        table.add_column(column, overflow="fold")
    for r in runs:
        best = "-" if r.best_score is None else (
            f"{r.best_score * 100:.2f}% {r.best}" if r.best_metric == "val_accuracy"
            else f"{r.best_score:.4f} {r.best_metric} {r.best}")
        table.add_row(Text(r.id), Text(r.study), _local(r.started), _state(r.status),
                      Text(best), duration(r.duration))
    output_console().print(table)
    typer.echo("best score: the best candidate's mean validation accuracy across folds (a "
               "search's objective: its val_loss where it minimises that)")


@runs_app.command()
def show(run: RunId, run_dir: SeenRunDir = None, store: StoreUrl = None,
         as_json: JsonOption = False) -> None:
    """Show one run: its status, seed, machine, models, results table and files.

    Example: fashionlab runs show 20250101-120000-seed
    """
    from fashionlab.runs import describe_run  # numpy and scipy: when the command runs

    with _store(run_dir, store) as (opened, seen_from):
        info = describe_run(opened, run, run_dir=seen_from)
    if as_json:
        print_json(info)
        return
    console = output_console()
    lines = [
        ("run", Text(info["id"])), ("study", Text(info["study"])),
        ("status", _state(info["status"])), ("seed", Text(str(info["seed"]))),
        ("started", Text(_local(info["started"]))), ("duration", Text(duration(info["duration"]))),
        ("machine", Text(machine_text(info["environment"].get("machine") or {}))),
        ("models", Text(f"{info['models']['total']} ("
                        + ", ".join(f"{n} {s}" for s, n in info["models"]["by_status"].items())
                        + f"), {counted(info['models']['epochs_stored'], 'epoch')} stored")),
        ("output", Text(str(info["output_dir"] or "-"))),
    ]
    if len(info["hosts"]) > 1:  # a run trained by several machines: which trained what
        lines += [("trained", Text(f"on {host}: {', '.join(keys)}"))
                  for host, keys in info["hosts"].items()]
    elif info["hosts"]:
        lines.append(("trained", Text(f"on {next(iter(info['hosts']))}")))
    for label, value in lines:
        console.print(Text(f"{label:>9}: ", style="bold") + value)
    if info["table"]:
        console.print(text_table("results", HEADERS,
                                 display_rows(rows_from_summary({"table": info["table"]}))))
    trials = info["trials"] or {}
    if trials.get("top"):  # a finished search: its top trials
        console.print(text_table("top trials", *trial_cells(trials)))
        for line in [*reference_lines(trials), retrain_line(trials)]:
            if line:
                console.print(Text(line))
    elif trials.get("stopped_by"):  # finished with no trial completed
        console.print(Text(nothing_ranked_line(trials)))
    if trials.get("stopped_by"):
        console.print(Text(spent_note(trials)))
    elif so_far_note(trials):  # not finished: how far it got
        console.print(Text(so_far_note(trials)))
    for name, accuracy in info["tests"].items():
        low, high = info["test_intervals"][name]  # None where the test set's size is unknown
        interval = f" [95% interval {100 * low:.1f}, {100 * high:.1f}]" \
            if finite(low) and finite(high) else ""
        console.print(Text(f"test accuracy {percent(accuracy)}%{interval}: {name}"))
    if info["files"]:
        console.print(Text("files: " + ", ".join(info["files"])))


@runs_app.command()
def compare(a: RunId, b: RunId, run_dir: SeenRunDir = None, store: StoreUrl = None,
            as_json: JsonOption = False) -> None:
    """Compare two finished studies side by side, candidate by candidate.

    Where both runs used the same folds (same [cv], [data] and seed), each candidate found in
    both gets the corrected resampled t-test of run b against run a (Holm-adjusted);
    otherwise the table says 'folds differ'.

    Example: fashionlab runs compare 20250101-120000-seed 20250102-090000-seed
    """
    from fashionlab.runs import compare_runs  # numpy and scipy: when the command runs

    with _store(run_dir, store) as (opened, _):
        result = compare_runs(opened, a, b)
    if as_json:
        print_json(result.to_dict())
        return
    console = output_console()
    console.print(Text(f"a: {result.a.id} ({result.a.study}, {result.a.status})"))
    console.print(Text(f"b: {result.b.id} ({result.b.study}, {result.b.status})"))
    console.print(Text("folds match: paired tests" if result.folds_match else
                       f"{result.reason}: no paired tests"))
    table = Table(title="validation accuracy %: mean ± std across folds")
    for column in ("candidate", "a", "b", "b - a (points)", "t", "p (Holm)", "verdict"):
        table.add_column(column, overflow="fold")
    for c in result.candidates:
        table.add_row(
            Text(c.name), "-" if c.a is None else c.a.format(digits=2),
            "-" if c.b is None else c.b.format(digits=2),
            "-" if math.isnan(c.difference) else f"{c.difference * 100:+.2f}",
            "-" if math.isnan(c.t) else f"{c.t:.3f}",
            "-" if math.isnan(c.p_holm) else f"{c.p_holm:.3g}", Text(c.verdict))
    console.print(table)
    if result.tests:
        tests = Table(title="test accuracy % [95% interval from the test set's size]")
        for column in ("model", "a", "b"):
            tests.add_column(column, overflow="fold")
        for name, accuracies in result.tests.items():
            cells = [percent_in(accuracy, *interval) for accuracy, interval
                     in zip(accuracies, result.test_intervals(name))]
            tests.add_row(Text(name), *cells)
        console.print(tests)


@runs_app.command()
def export(
    run: RunId,
    format: Annotated[ExportFormat | None, typer.Option(
        "--format", help="csv or json.  [default: --out's suffix, else csv]",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", parser=path_named,
        help="Write to this .csv or .json file instead of standard output.",
        show_default=False)] = None,
    to: Annotated[tuple[Destination, str] | None, typer.Option(
        "--to", metavar="mlflow URI | tensorboard DIR", show_default=False,
        help="Send the run to an MLflow tracking URI instead: a parent run, nested runs per "
        "candidate (or trial) and model, metrics, files; or write its TensorBoard event "
        "files (every model's curves, the HParams view) in DIR. Again later: brings it up "
        "to date.")
    ] = None,
    run_dir: SeenRunDir = None,
    store: StoreUrl = None,
) -> None:
    """Export every stored epoch of a run as CSV or JSON, or send the run to MLflow or
    TensorBoard.

    One row per epoch: run, key, candidate, role, repeat, fold, epoch, loss, accuracy,
    val_loss, val_accuracy, seconds.

    Example: fashionlab runs export 20250101-120000-seed --format csv --out epochs.csv

    Example: fashionlab runs export 20250101-120000-seed --to mlflow sqlite:///mlflow.db

    Example: fashionlab runs export 20250101-120000-seed --to tensorboard tb/seed
    """
    from fashionlab.runs import export_run, write_export  # numpy and scipy: when it runs

    if to is not None:
        if format is not None or out is not None:
            raise FashionlabError(f"--format and --out write the epochs to a file; --to "
                                  f"{to[0].value} sends the whole run instead: give one or the "
                                  "other")
        if to[0] is Destination.tensorboard:
            # the optional TensorBoard, and torch: when it runs
            from fashionlab.integrations.tensorboard import export_run_to_tensorboard

            with _store(run_dir, store) as (opened, _):
                record = opened.run(run)
                written = export_run_to_tensorboard(opened, record.id, to[1])
            typer.echo(f"wrote run {record.id} to {written} (view: tensorboard --logdir "
                       f"{shlex.quote(str(written))})")  # a command to paste, spaces and all
            return
        from fashionlab.integrations.mlflow import export_run_to_mlflow  # optional MLflow

        with _store(run_dir, store) as (opened, _):
            record = opened.run(run)
            parent = export_run_to_mlflow(opened, record.id, to[1])
        typer.echo(f"sent run {record.id} to mlflow {safe_url(to[1])} (parent run {parent})")
        return
    with _store(run_dir, store) as (opened, _):
        if out is not None:
            written = write_export(opened, run, out, format.value if format else None)
            typer.echo(f"wrote {written}", err=True)
            return
        text = export_run(opened, run, (format or ExportFormat.csv).value)
    typer.echo(text, nl=False)


@runs_app.command()
def delete(
    run: RunId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    run_dir: SeenRunDir = None,
    store: StoreUrl = None,
) -> None:
    """Delete a run: its rows in the store and its output directory.

    The output directory holds the run's models, figures and report. Asks first unless
    --yes; a running run is refused. A deletion stopped half-way is finished by the same
    command (the folder of a run whose rows are gone too).

    Example: fashionlab runs delete 20250101-120000-seed --yes
    """
    # numpy and scipy: when it runs
    from fashionlab.runs import (
        deletable_run,
        delete_run,
        leftover_folder,
        run_output_dir,
    )

    finish = "run the same command again to finish the deletion"
    with _store(run_dir, store) as (opened, seen_from), resumable(finish):
        try:
            record = opened.run(run, damaged_ok=True)
        except StoreError:
            left = leftover_folder(opened, run, seen_from)
            if left is None:
                raise
            if not yes:
                typer.confirm(f"Delete {left}, the folder of run {run}, which the store no "
                              "longer holds?", abort=True)
            delete_run(opened, run, run_dir=seen_from)
            typer.echo(f"deleted {left} (run {run} had left the store already)")
            return
        deletable_run(opened, record.id)  # refused before anyone is asked
        if not yes:
            folder = run_output_dir(record, seen_from)
            where = f" and {folder}" if folder is not None and folder.is_dir() else ""
            typer.confirm(f"Delete run {record.id} ({record.name}, {record.state}){where}?",
                          abort=True)
        delete_run(opened, record.id, run_dir=seen_from)
    typer.echo(f"deleted run {record.id}")


@app.command()
def report(
    run: RunId,
    out: Annotated[str | None, typer.Option(  # str: Path would drop a trailing "/"
        "--out", parser=path_text_named,
        help="Where to write the HTML file (default: report.html in the run's folder of "
        "--run-dir, made if missing; with a shared --store, the folder the run recorded when "
        "it is on this machine).", show_default=False)] = None,
    device: Annotated[str, typer.Option(help="Where the tested models run: cpu, cuda, ...")] = (
        "cpu"),
    run_dir: SeenRunDir = None,
    store: StoreUrl = None,
) -> None:
    """Write a run's report: one self-contained HTML file, to open or send.

    It holds the summary, the results table with the paired tests, the learning curves, and
    for the tested models their confusion matrix, per-class scores and misclassified images.
    Every study writes it at the end; this writes it again for any run, finished or not.

    Example: fashionlab report 20250101-120000-seed --out seed-report.html
    """
    from fashionlab.report import write_report  # matplotlib and torch: when it runs

    with _store(run_dir, store) as (opened, seen_from):
        path = write_report(opened, run, out, device=device, run_dir=seen_from)
    typer.echo(f"wrote {path}")
