"""`fashionlab search`: run, resume or join a study's automated search."""

from __future__ import annotations

from typing import Annotated

import typer

from fashionlab.cli import app, output_console, print_json, resumable, text_table
from fashionlab.cli.study import MlflowUri, Quiet, RunDir, StoreUrl, Tensorboard, workers_named
from fashionlab.config import load_study, quick_variant
from fashionlab.store import DEFAULT_RUN_DIR
from fashionlab.tables import (
    nothing_ranked_line,
    reference_lines,
    retrain_line,
    spent_note,
    trial_cells,
)


@app.command()
def search(
    file: Annotated[str, typer.Argument(
        help="A study file with a [search] table, or a bundled study's name.")] = "search",
    n_trials: Annotated[int | None, typer.Option(
        "--n-trials", help="Trials to finish, all workers together (overrides the file)."
    )] = None,
    timeout: Annotated[float | None, typer.Option(
        help="Seconds after which this process starts no more trials.")] = None,
    quick: Annotated[bool, typer.Option(help="Fewer samples, epochs and trials: a try-out."
                                        )] = False,
    finish: Annotated[bool, typer.Option(
        help="Start no trial: retrain the best so far and write the results now.")] = False,
    fresh: Annotated[bool, typer.Option(
        help="Delete this search's earlier trials and results, and start again.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[str, typer.Option(
        parser=workers_named, metavar="auto|N",
        help="Worker processes on this machine, each training its own trials: a number, or "
        "auto (one per CPU core or GPU)."
    )] = "1",
    run_dir: RunDir = DEFAULT_RUN_DIR,
    store: StoreUrl = None,
    tensorboard: Tensorboard = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    quiet: Quiet = False,
    mlflow: MlflowUri = None,
) -> None:
    """Search a candidate's configuration with Optuna, each trial scored by cross-validation;
    then retrain the best on all training images, test it and write the table of the top
    trials, the plots and the report.

    The search lives in the store's database: run the same command again to resume it, or on
    many machines with the same --store postgresql://... to share it.

    Example: fashionlab search                       (the bundled dense search)

    Example: fashionlab search my-study.toml --n-trials 40 --store postgresql://me@db/fl

    Example: fashionlab search --workers auto   (one worker per CPU core)

    Example: fashionlab search --mlflow sqlite:///mlflow.db
    """

    # torch (and the optional MLflow): only once a search runs
    from fashionlab.integrations.mlflow import logging_to_mlflow
    from fashionlab.integrations.tensorboard import tensorboard_progress, write_shown_run
    from fashionlab.search import run_search  # torch and Optuna: when the command runs

    spec = load_study(file)
    if quick:
        spec = quick_variant(spec)
    with resumable("finished trials are kept (a trial stopped midway is retried): run the "
                   "same command again to go on",
                   goes_on="the search goes on in the other workers that train its trials; "
                   "the same command joins it again"), \
            tensorboard_progress(not (json_output or quiet), tensorboard=tensorboard,
                                 run_dir=run_dir, store_url=store) as shown, \
            logging_to_mlflow(mlflow, spec, kind="search", run_dir=run_dir, store_url=store,
                              progress=shown) as progress:
        result = run_search(spec, run_dir=run_dir, store_url=store, n_trials=n_trials,
                            timeout=timeout, device=device, progress=progress,
                            finish=finish, fresh=fresh,
                            workers=workers if workers == "auto" else int(workers))
    if json_output or quiet:  # said with the progress otherwise; a note is no progress
        for note in result.notes:
            typer.echo(note, err=True)
    if tensorboard:  # a finished run shown again reported no epoch live
        write_shown_run(result, run_dir=run_dir, store_url=store)
    if json_output:
        print_json({"run_id": result.run.id, "study_name": result.study_name,
                   "storage": result.storage, "finished": result.finished,
                   "stopped_by": result.stopped_by, "summary": result.summary})
        return
    console = output_console(highlight=True)
    summary = result.summary
    if summary is None and result.stopped_by == "others-running":
        console.print(f"this worker is done; so far {result.trials_line}; other "
                      "workers are still running trials, and the last to finish writes the "
                      f"results (`fashionlab runs show {result.run.id}` with the same store "
                      "shows them then).")
    elif summary is None:
        console.print(f"stopped ({result.stopped_by}); so far {result.trials_line}. "
                      "Run the same command to continue, or add --finish to write the "
                      "results now.")
    else:
        headers, rows = trial_cells(summary)
        if rows:
            console.print(text_table(f"{spec.name}: top trials of run {result.run.id}",
                                     headers, rows))
        else:
            console.print(f"{spec.name}, run {result.run.id}: {nothing_ranked_line(summary)}")
        console.print(spent_note(summary))
        for line in [*reference_lines(summary), retrain_line(summary)]:
            if line:
                console.print(line)
        console.print(f"results in {result.output_dir}")
    console.print(f"storage: {result.storage} (study {result.study_name}; "
                  f"optuna-dashboard {result.storage})")

