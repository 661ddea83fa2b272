"""The HTML report of a run: one self-contained file that shows what happened at a glance.

`write_report(store, run_id)` builds it for any stored run, finished or not, from what the store
holds (the run's config, environment and summary, every epoch) and from the model files of the
run: the retrained best and the final models are tested again on the run's test split for their
confusion matrix, per-class scores and misclassified images. Figures are PNGs embedded as data
URIs, styles are inline, and nothing is fetched from anywhere: the file can be mailed. Every
string that comes from a user (study, candidate and file names) is escaped by the template.
"""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from fashionlab import plots
from fashionlab.data import load_fashion_mnist
from fashionlab.errors import FashionlabError
from fashionlab.schema import METRICS
from fashionlab.serialize import why_not_written, write_text_atomic
from fashionlab.store import EpochRecord, RunRecord, Store, as_store
from fashionlab.tables import (
    HEADERS,
    LEGEND,
    display_rows,
    reference_lines,
    retrain_line,
    rows_from_summary,
    search_legend,
    so_far_note,
    spent_note,
    trial_cells,
)
from fashionlab.text import counted, finite, number, safe_name, verdict, wall_time

if TYPE_CHECKING:
    import torch

__all__ = ["REPORT_NAME", "ReportError", "render_report", "write_report"]

REPORT_NAME = "report.html"
DPI = 100  # figures are embedded: small enough to keep the report light
MISCLASSIFIED = 32  # mistakes shown per tested model
TOP_TRIALS = 10


class ReportError(FashionlabError):
    """A report cannot be written (no place to put it, an unwritable path)."""


def write_report(store: Store, run_id: str, path: str | Path | None = None, *,
                 device: str | torch.device = "cpu", run_dir: str | Path | None = None) -> Path:
    """Write the run's report (default: `<run output dir>/report.html`) and return its path.

    `device` runs the tested models' inference: cpu, cuda, cuda:N or auto. `run_dir`: the run
    directory it is seen from (default: the store's own, `Store.run_dir`); where it holds the
    run's folder (a run directory moved or copied), that folder is the run's, not the one the
    store recorded. By default the report goes into that folder, made if missing, unless the
    store is shared (a database server) and the folder it recorded is on this machine.
    """
    store = as_store(store)
    run = store.seen_run(run_id, run_dir)
    into_the_runs_folder = path is None
    if path is None:
        folder = Path(run.output_dir) if run.output_dir else None
        # The run directory's own store (a copy's, whose records name the original's folder)
        # reports into the run directory; a shared one into the folder it recorded, when
        # that is on this machine.
        if run_dir is not None and not (store.shared and folder is not None
                                         and folder.is_dir()):
            folder = Path(run_dir).resolve() / run.id  # made if missing
        if folder is None:
            raise ReportError(f"run {run.id} has no output directory; give the report a path")
        path = folder / REPORT_NAME
    if str(path).endswith(("/", os.sep)):  # Path() would drop the slash: a file, not a folder
        raise ReportError(f"{path}: names a folder; a report is written to an .html file")
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):  # no study file or model written over
        raise ReportError(f"{path}: a report is written to an .html file")
    html = render_report(store, run.id, device=device, run_dir=run_dir)
    if into_the_runs_folder and all(r.id != run.id for r in store.runs(name=run.name)):
        # `runs delete` meanwhile: its folder is not made again to hold a report of models
        # that were deleted while it was drawn
        raise ReportError(f"run {run.id} was deleted while its report was made: nothing "
                          "written")
    try:  # a reader never sees half a report
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, html)
    except OSError as error:
        raise ReportError(f"{path}: cannot write the report ({why_not_written(path, error)})") \
            from None
    return path


def render_report(store: Store, run_id: str, *, device: str | torch.device = "cpu",
                  run_dir: str | Path | None = None) -> str:
    """The report of a run as an HTML string (`run_dir`: as `write_report`'s)."""
    import jinja2

    run = store.seen_run(run_id, run_dir)
    context: dict[str, Any] = {"run": _run_info(run), "facts": _facts(run)}
    if run.kind == "search":
        from fashionlab.trials import trials_so_far  # Optuna: only a search's report

        context["search"] = _search_section(run.summary if run.summary is not None
                                            else trials_so_far(store.url, run, rows=True) or {})
        context.update(tested=_tested_models(run, device),  # the retrained best
                       finished=run.summary is not None)
    else:
        context.update(_study_sections(store, run, device))
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("fashionlab", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.get_template("report.html.j2").render(**context)


# --------------------------------------------------------------------------------------------
# The run and its facts


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _run_info(run: RunRecord) -> dict[str, Any]:
    notices = {
        "running": "This run is still running: the report shows the epochs stored so far.",
        "interrupted": "This run was interrupted: run the same command again to resume it. "
                       "The report shows the epochs stored so far.",
        "failed": "This run failed.",
    }
    return {"id": run.id, "name": run.name, "kind": run.kind, "state": run.state,
            "notice": notices.get(run.state), "generated": _when(time.time())}


def _facts(run: RunRecord) -> list[tuple[str, str]]:
    config, env, summary = run.config, run.environment, run.summary or {}
    data = config.get("data") or {}
    cv, rule = config.get("cv") or {}, config.get("warning") or {}
    machine, versions = env.get("machine") or {}, env.get("versions") or {}
    facts = []
    cross_validated = bool(config.get("candidates", True))
    if data or summary.get("n_train"):
        source = data.get("directory") or "found automatically (see `fashionlab data info`)"
        parts = [str(source), "checksums verified" if data.get("verify", True)
                 else "checksums not checked"]
        if data.get("train_limit") or data.get("test_limit"):
            parts.append(f"first {data.get('train_limit') or 'all'} training and "
                         f"{data.get('test_limit') or 'all'} test images")
        if summary.get("n_train") and cross_validated:
            parts.append(f"each fold trains on {summary['n_train']} and validates on "
                         f"{summary.get('n_val')} images")
        if run.data_sha256:  # what it trained on, after the [data] limits
            parts.append(f"SHA-256 {run.data_sha256[:12]}")
        facts.append(("dataset", "; ".join(parts)))
    if not cross_validated:  # a study of final models only
        facts.append(("protocol", ("no cross-validation: each model trains on all training "
                                  "images, the test set as its validation")))
    elif cv:
        protocol = f"{cv.get('n_splits')}-fold cross-validation ({cv.get('strategy')}"
        protocol += f", {cv['repeats']} repeats)" if (cv.get("repeats") or 1) > 1 else ")"
        if rule:
            protocol += (f"; overfitting warning: patience {rule.get('patience')}, "
                         f"min_delta {rule.get('min_delta')}")
        retrain = config.get("retrain") or {}
        if retrain.get("enabled", False):
            epochs = retrain.get("epochs")
            protocol += "; the best is retrained on all training images for " + (
                "its warning epoch" if epochs == "warning"
                else "its epoch of lowest mean val_loss" if epochs == "lowest"
                else counted(epochs, "epoch"))
        facts.append(("protocol", protocol))
    facts += [
        ("seed", str(run.seed)),
        ("started", _when(run.started)),
        ("finished", _when(run.finished) if run.state == "finished" else run.state),
        ("wall time", wall_time(summary.get("wall_seconds", run.duration),
                                bool(summary.get("resumed")))),
        ("machine", ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None)),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)),
        ("code revision", str(env.get("revision") or "-")),
        ("output directory", str(run.output_dir or "-")),
    ]
    return facts


# --------------------------------------------------------------------------------------------
# A study


def _study_sections(store: Store, run: RunRecord, device: str | torch.device
                    ) -> dict[str, Any]:
    summary = run.summary
    histories = store.histories(run.id)
    planned = {m.key: m.epochs_planned for m in store.models(run.id)}
    entries = _curve_entries(store, run)
    repeats = (run.config.get("cv") or {}).get("repeats") or 1
    # A finished run's figures hold the same curves: embedded as they are, not drawn again.
    figures = Path(run.output_dir) / "figures" if summary is not None and run.output_dir \
        else None
    return {
        "table": None if summary is None else _results_table(summary),
        "comparisons": [] if summary is None else _comparison_rows(summary),
        "curves": [_curve_figure(entry, histories, planned, figures, repeats=repeats)
                   for entry in entries if entry["role"] == "cv"],
        "final_curves": [_curve_figure(entry, histories, planned, figures)
                         for entry in entries if entry["role"] == "final"],
        "tested": _tested_models(run, device),
        "finished": summary is not None,
    }


def _results_table(summary: Mapping[str, Any]) -> dict[str, Any]:
    rows = rows_from_summary(summary)
    return {
        "headers": HEADERS, "legend": LEGEND,
        "rows": [{"cells": cells, "kind": row.kind, "best": row.vs_best == "best"}
                 for row, cells in zip(rows, display_rows(rows))],
        "notes": [(row.model, row.note) for row in rows if row.note and row.kind != "baseline"],
    }


def _comparison_rows(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    rows = []
    for c in summary.get("comparisons") or []:
        rows.append({
            "name": c["name"],
            "mean": number((c.get("summary") or {}).get("mean"), ".2f", 100),
            "difference": "-" if c.get("is_best") else number(
                c.get("mean_difference"), "+.2f", 100),
            "t": number(c.get("t"), ".3f"), "p": number(c.get("p_value"), ".3g"),
            "p_holm": number(c.get("p_holm"), ".3g"),
            "verdict": verdict(is_best=bool(c.get("is_best")), not_worse=c.get("not_worse"),
                               p_holm=c.get("p_holm"), reason=c.get("reason")),
        })
    return rows


def _curve_entries(store: Store, run: RunRecord) -> list[dict[str, Any]]:
    """The candidates and final models with their model keys and warning, in study order."""
    from fashionlab.cv import OverfitWarning  # torch (cv trains): not loaded for a search

    if run.summary is not None:
        return [{"name": c["name"], "role": role, "keys": list(c.get("keys") or []),
                 "warning": OverfitWarning(c.get("warning_epoch"), c.get("best_epoch")),
                 "schedule_end": c.get("schedule_end")}
                for role, group in (("cv", "candidates"), ("final", "final"))
                for c in run.summary.get(group) or []]
    # Not finished: what the store holds, in the order of the study file.
    order = [c.get("name") for c in (run.config.get("candidates") or [])
             + (run.config.get("final") or [])]
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for model in store.models(run.id):
        if model.role in ("cv", "final"):
            entry = entries.setdefault((model.role, model.candidate), {
                "name": model.candidate, "role": model.role, "keys": [], "warning": None,
                "schedule_end": None})
            entry["keys"].append(model.key)
    rank = {name: i for i, name in enumerate(order)}
    return sorted(entries.values(), key=lambda e: rank.get(e["name"], len(rank)))


def _curve_figure(entry: Mapping[str, Any], histories: Mapping[str, list[EpochRecord]],
                  planned: Mapping[str, int], figures: Path | None, *,
                  repeats: int = 1) -> dict[str, Any]:
    keys = entry["keys"]
    stored = sum(len(histories.get(k, [])) for k in keys)
    saved = None if figures is None else _saved_png(figures / plots.curves_file(entry["name"]))
    if saved is not None:
        image = plots.png_data_uri(saved)
    elif stored == 0:  # a stack still waiting or in its first epoch: no empty axes
        image = None
    else:  # not finished, or the file is gone or damaged: drawn from the store
        epochs = max([planned.get(k, 0) for k in keys]
                     + [len(histories.get(k, [])) for k in keys] + [1])
        curves = {metric: np.full((len(keys), epochs), np.nan) for metric in METRICS}
        for i, key in enumerate(keys):
            for record in histories.get(key, []):
                if record.epoch <= epochs:
                    for metric in METRICS:
                        curves[metric][i, record.epoch - 1] = getattr(record, metric)
        image = plots.png_data_uri(plots.learning_curves(
            curves, title=entry["name"], warning=entry["warning"],
            schedule_end=entry["schedule_end"], repeats=repeats), dpi=DPI)
    warning = entry["warning"]
    caption = f"{counted(len(keys), 'model')}, {counted(stored, 'epoch')} stored"
    if entry["schedule_end"] is not None:
        caption += f"; read at the end of its schedule, epoch {entry['schedule_end']}"
    elif warning is not None:
        caption += (f"; overfitting warning at epoch {warning.epoch}" if warning.epoch
                    else "; no overfitting warning")
    return {"name": entry["name"], "image": image, "caption": caption}


def _saved_png(path: Path) -> bytes | None:
    """The bytes of `path` where it is a regular file (not a link to elsewhere, nor a pipe that
    would block) holding a whole PNG image, else None: a report is mailed, and shows only what
    the run drew."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        png = path.read_bytes()
        with Image.open(io.BytesIO(png)) as image:
            if image.format != "PNG":
                return None
            image.verify()  # every chunk's checksum, to the end: a truncated file fails
    except (OSError, SyntaxError, ValueError):  # gone since; PIL's errors for damaged images
        return None
    return png


def _tested_models(run: RunRecord, device: str | torch.device) -> list[dict[str, Any]]:
    if run.summary is None or not run.output_dir:
        return []
    from fashionlab.hardware import resolve_device  # torch: only once models are tested

    device = resolve_device(str(device))
    models = []
    retrain = run.summary.get("retrain")
    if retrain and retrain.get("model_dir"):
        models.append((f"{retrain['candidate']} (retrained on all training images)",
                       Path(retrain["model_dir"])))
    for final in run.summary.get("final") or []:
        # Summaries written before final models recorded their directory: the same rule.
        directory = final.get("model_dir") or Path(run.output_dir) / "models" / safe_name(
            final["name"])
        models.append((f"{final['name']} (final model)", Path(directory)))
    test: Any = None  # the split, loaded once, or the message saying why it could not be
    sections = []
    for title, directory in models:
        section: dict[str, Any] = {"title": title, "path": str(directory), "missing": None}
        sections.append(section)
        if not (directory / "model.safetensors").is_file():
            section["missing"] = f"the model files are not in {directory}"
            continue
        if test is None:
            test = _test_split(run.config)
        if isinstance(test, str):
            section["missing"] = f"the test images cannot be loaded: {test}"
            continue
        try:
            section.update(_tested_model(directory, test, device))
        except FashionlabError as error:
            section["missing"] = str(error)
    return sections


def _test_split(config: Mapping[str, Any]) -> Any:
    """The run's test split, or the reason it cannot be loaded (a string)."""
    data = config.get("data") or {}
    try:
        dataset = load_fashion_mnist(data.get("directory"), download=False,
                                     verify=bool(data.get("verify", True)))
    except FashionlabError as error:
        return str(error)
    return dataset.test.head(data.get("test_limit"))


def _tested_model(directory: Path, test: Any, device: torch.device) -> dict[str, Any]:
    # torch: only a report that tests models loads it
    from fashionlab.artifacts import load_model
    from fashionlab.evaluate import evaluate, unlike_the_study

    model = load_model(directory, device)
    result = evaluate(model, test, model.class_names, device)
    names = result.class_names
    wrong = result.misclassified(MISCLASSIFIED)
    per_class = [
        {"name": name, "support": int(result.support[c]),
         **{metric: number(float(values[c]), ".1f", 100) for metric, values in (
             ("recall", result.recall), ("precision", result.precision), ("f1", result.f1))}}
        for c, name in enumerate(names)
    ]
    low, high = result.accuracy_interval()
    return {
        "n": result.n, "accuracy": number(result.accuracy, ".2f", 100),
        "interval": f"{number(low, '.1f', 100)}, {number(high, '.1f', 100)}",
        "loss": number(result.loss, ".4f"),
        "errors": int((result.predictions != result.labels).sum()),
        "notes": unlike_the_study(model, result),  # why the run's table may differ
        "per_class": per_class,
        "confusion": plots.png_data_uri(
            plots.confusion_matrix(result.confusion, class_names=names), dpi=DPI),
        "bars": plots.png_data_uri(plots.per_class_bars(
            {"precision": result.precision, "recall (= class accuracy)": result.recall},
            class_names=names), dpi=DPI),
        "misclassified": plots.png_data_uri(plots.misclassified_grid(
            test.images[wrong], result.labels[wrong], result.predictions[wrong],
            class_names=names, confidence=result.confidence[wrong]), dpi=DPI)
        if len(wrong) else None,
        "shown": len(wrong),
    }


# --------------------------------------------------------------------------------------------
# A search (its summary: "trials", "importances", "history", "direction" when present)


def _search_section(summary: Mapping[str, Any]) -> dict[str, Any]:
    direction = summary.get("direction", "maximize")
    trials = [t for t in summary.get("trials") or [] if isinstance(t, Mapping)]
    history = summary.get("history")
    if history is None and trials:
        history = [t.get("value") for t in sorted(trials, key=lambda t: t.get("number", 0))]
    importances = summary.get("importances") or {}
    scored = [t for t in trials if finite(t.get("value"))]
    scored.sort(key=lambda t: t["value"], reverse=direction != "minimize")
    params = list(dict.fromkeys(p for t in trials for p in (t.get("params") or {})))
    statistics = None
    if summary.get("top"):  # a finished search: the top trials with their paired tests
        headers, rows = trial_cells(summary)
        statistics = {"headers": headers, "rows": rows, "legend": search_legend(summary),
                      "notes": [spent_note(summary), *reference_lines(summary),
                                retrain_line(summary)]}
    return {
        "statistics": statistics,
        "so_far": so_far_note(summary) if "stopped_by" not in summary else "",
        "direction": direction,
        # A trial run again (stopped, or lost with its process) is one trial, not two of Optuna's.
        "n_trials": sum(t.get("retry_of") is None for t in trials),
        "history": plots.png_data_uri(plots.search_history(history, direction=direction),
                                      dpi=DPI) if history else None,
        "importances": plots.png_data_uri(plots.param_importances(importances), dpi=DPI)
        if importances else None,
        "importance_rows": [(str(k), number(float(v), ".3f")) for k, v in
                            sorted(importances.items(), key=lambda kv: -float(kv[1]))],
        "params": params,
        "top": [{"number": str(t.get("number", "-")), "value": number(t["value"], ".4g"),
                 "state": str(t.get("state", "-")),
                 "params": [_param(t.get("params", {}).get(p)) for p in params]}
                for t in scored[:TOP_TRIALS]],
    }


def _param(value: Any) -> str:
    if value is None:
        return "-"
    return format(value, ".4g") if isinstance(value, float) else str(value)

