"""`fashionlab study`: run (or resume) a study."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from fashionlab.cli import app, output_console, path_named, print_json, resumable, text_table
from fashionlab.config import SEED_RANGE, derived, load_study, quick_variant
from fashionlab.store import DEFAULT_RUN_DIR
from fashionlab.tables import HEADERS, LEGEND, display_rows
from fashionlab.text import wall_time

RunDir = Annotated[Path, typer.Option(
    "--run-dir", parser=path_named,
    help="Where runs, the store and outputs live.")]
StoreUrl = Annotated[str | None, typer.Option(
    "--store", help="Database URL of the store (default: SQLite file in the run directory; "
    "env FASHIONLAB_STORE).")]
Tensorboard = Annotated[bool, typer.Option(
    help="Write TensorBoard event files under the run's directory as epochs finish "
    "(the tensorboard extra); view with: tensorboard --logdir RUN_DIR.")]
Quiet = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress: only the results and errors. (Progress goes to "
    "stderr: bars on a terminal, one line per epoch of each stack otherwise.)")]
MlflowUri = Annotated[str | None, typer.Option(
    "--mlflow", envvar="FASHIONLAB_MLFLOW", show_default=False,
    help="Log every epoch live to this MLflow tracking URI, then the results and files "
    "(needs `pip install 'fashionlab[mlflow]'`).")]


def workers_named(text: str) -> str:
    """--workers: "auto" or a positive whole number in ASCII digits (not "²" or "٣", which
    Python's int() would read)."""
    if text != "auto" and not (text.isascii() and text.isdigit() and int(text) >= 1):
        raise typer.BadParameter(f"expected a positive number or auto, got '{text}'")
    return text


@app.command()
def study(
    file: Annotated[str, typer.Argument(help="A study file, or a bundled study's name.")] = "seed",
    quick: Annotated[bool, typer.Option(help="Fewer samples and epochs: a try-out in a minute."
                                        )] = False,
    seed: Annotated[int | None, typer.Option(
        help="Override the study's seed.", min=SEED_RANGE[0], max=SEED_RANGE[1])] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    fresh: Annotated[bool, typer.Option(help="Start a new run instead of resuming.")] = False,
    workers: Annotated[str, typer.Option(
        parser=workers_named, metavar="auto|N",
        help="Processes training independent jobs in parallel: a number, or auto (one per "
        "CPU core or GPU, when the study is big enough to pay for starting them)."
    )] = "auto",
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads per job (default: its share of the cores). A CNN's numbers "
        "depend on it; dense models' do not.", show_default=False)] = None,
    run_dir: RunDir = DEFAULT_RUN_DIR,
    store: StoreUrl = None,
    tensorboard: Tensorboard = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    quiet: Quiet = False,
    mlflow: MlflowUri = None,
) -> None:
    """Run a study: cross-validate its candidates, retrain and test the best, train its final
    models; store every epoch and write the table, figures and report.

    A study stopped at any moment (Ctrl-C, kill) resumes where it stopped when run again.
    The same command on several machines with one --store postgresql://... trains one run
    together: each claims jobs from the database; the last writes the results.

    Example: fashionlab study                 (the bundled seed study)

    Example: fashionlab study my-study.toml --quick

    Example: fashionlab study seed --workers 1   (everything in this one process)

    Example: fashionlab study seed --mlflow sqlite:///mlflow.db
    """

    # torch (and the optional MLflow): only once a study runs
    from fashionlab.integrations.mlflow import logging_to_mlflow
    from fashionlab.integrations.tensorboard import tensorboard_progress, write_shown_run
    from fashionlab.results import summary, table_rows
    from fashionlab.study import run_study  # (torch too)

    spec = load_study(file)
    if quick:
        spec = quick_variant(spec)
    if seed is not None:
        spec = derived(spec, seed=seed)
    with resumable("the run is kept; run the same command again to resume it",
                   goes_on="the run goes on in the other processes that train it; the same "
                   "command joins it again"), \
            tensorboard_progress(not (json_output or quiet), tensorboard=tensorboard,
                                 run_dir=run_dir, store_url=store) as shown, \
            logging_to_mlflow(mlflow, spec, run_dir=run_dir, store_url=store,
                              progress=shown) as progress:
        result = run_study(spec, run_dir=run_dir, store_url=store, device=device, fresh=fresh,
                           progress=progress,
                           workers=workers if workers == "auto" else int(workers),
                           threads=threads)
    if json_output or quiet:  # said with the progress otherwise; a note is no progress
        for note in result.notes:
            typer.echo(note, err=True)
    if tensorboard:  # a finished run shown again reported no epoch live
        write_shown_run(result, run_dir=run_dir, store_url=store)
    if result.results_by is not None:  # a run shared with other processes, which finish it
        if json_output:
            print_json({"run": result.run.id, "trained": result.trained_here,
                       "results_by": result.results_by})
            return
        trained = "; ".join(result.trained_here) or "nothing (the others had every job)"
        typer.echo(f"run {result.run.id}: this process trained {trained}. The results are "
                   f"written by {result.results_by}: `fashionlab runs show {result.run.id}` "
                   "with the same --store shows them and where they are.")
        return
    if json_output:
        # As stored (and in results.json): measures such as the peak memory are of that moment.
        print_json(result.run.summary or summary(result))
        return
    rows = table_rows(result)
    console = output_console(highlight=True)
    console.print(text_table(f"{spec.name}: run {result.run.id}", HEADERS, display_rows(rows)))
    console.print(Text(LEGEND, style="dim"))
    for row in rows:
        if row.note and row.kind != "baseline":
            console.print(Text(f"- {row.model}: {row.note}"))
    workers = f" ({result.workers} worker processes)" if result.workers > 1 else ""
    # A shared run's results written on another machine: say which.
    elsewhere = not result.output_dir.is_dir() and result.run.host not in (
        None, socket.gethostname())
    console.print(f"wall time {wall_time(result.wall_seconds, result.resumed)}{workers}; "
                  f"results in {result.output_dir}"
                  + (f" on {result.run.host}" if elsewhere else ""))
    if result.already_finished:
        console.print(f"(run {result.run.id} had finished: shown from the store, nothing "
                      "trained; --fresh runs the study again)")
