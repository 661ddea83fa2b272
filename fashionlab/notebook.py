"""Results in Jupyter: a study's or a search's table as HTML with its figures inline (small PNGs
as data URIs), one candidate's learning curves as a figure, a study's table as a pandas
DataFrame.

`StudyResult` (`results`) and `SearchResult` (`search.loop`) call these from `_repr_html_`,
`figure` and `to_frame`. They take rows, curves and summaries rather than the result objects,
so this module sits below both. pandas is optional: only `rows_frame` imports it.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from matplotlib.figure import Figure

from fashionlab import plots
from fashionlab.tables import (
    HEADERS,
    LEGEND,
    Row,
    display_rows,
    reference_lines,
    retrain_line,
    search_legend,
    search_overview,
    split_epoch,
    split_trained,
    trial_cells,
)

if TYPE_CHECKING:
    import pandas

    from fashionlab.train import EpochMetrics

__all__ = ["CURVES_DPI", "Curves", "curves_figure", "retrain_curves", "rows_frame",
           "search_html", "study_html"]

# A learning-curves figure is 10 x 3.8 in: at 55 dpi 550 x 209 px, about 30 kB, so a study of
# eight models adds a quarter of a megabyte to the notebook, and two fit side by side.
CURVES_DPI = 55
SEARCH_DPI = 70  # the search's history and importances, one of each


class Curves(Protocol):
    """What a learning-curves figure needs (a `steps.CandidateResult` is one)."""

    name: str
    curves: dict[str, np.ndarray]  # metric -> (n_models, epochs)
    warning: Any  # the overfitting warning: .epoch, .best_epoch
    schedule_end: int | None  # the epoch it is read at, when that ends its schedule


@dataclasses.dataclass(frozen=True)
class _Retrained:
    name: str
    curves: dict[str, np.ndarray]
    warning: None = None
    schedule_end: None = None


def retrain_curves(name: str, history: Sequence[EpochMetrics]) -> Curves:
    """A retraining's history as curves of one model; it has no validation data (NaN)."""
    metrics = ("loss", "accuracy", "val_loss", "val_accuracy")
    return _Retrained(name, {m: np.array([[e.get(m) for e in history]], dtype=np.float64)
                             .reshape(1, len(history)) for m in metrics})


def curves_figure(models: Sequence[Curves], name: str, *, repeats: int = 1) -> Figure:
    """The learning curves of the model called `name`; ValueError listing the names if none.
    repeats: of the cross-validation the models' folds come from."""
    for model in models:
        if model.name == name:
            return plots.learning_curves(model.curves, title=model.name, warning=model.warning,
                                         schedule_end=model.schedule_end, repeats=repeats)
    names = ", ".join(repr(m.name) for m in models) or "none"
    raise ValueError(f"no learning curves for {name!r}; this result has: {names}")


# --------------------------------------------------------------------------------------------
# HTML

_CELL = "padding:2px 8px;text-align:{align};white-space:nowrap"
_CODE = re.compile(r"`([^`]*)`")


def _text(line: str) -> str:
    """Plain text (with Markdown `code` spans) as HTML."""
    return _CODE.sub(r"<code>\1</code>", html.escape(line))


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]],
           bold: Sequence[bool] = ()) -> str:
    """An HTML table, every cell escaped; the first column left-aligned, the others right."""
    def cells(tag: str, values: Sequence[str], strong: bool = False) -> str:
        out = []
        for i, value in enumerate(values):
            style = _CELL.format(align="left" if i == 0 else "right")
            value = html.escape(value)
            out.append(f'<{tag} style="{style}">{f"<b>{value}</b>" if strong else value}</{tag}>')
        return "<tr>" + "".join(out) + "</tr>"

    rows = list(rows)
    bold = list(bold) + [False] * (len(rows) - len(bold))
    body = "".join(cells("td", row, strong) for row, strong in zip(rows, bold))
    return f"<table><thead>{cells('th', headers)}</thead><tbody>{body}</tbody></table>"


def _image(uri: str, alt: str, width: int) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}" style="width:{width}px;max-width:100%">'


def _gallery(images: Iterable[str]) -> str:
    return ('<div style="display:flex;flex-wrap:wrap;gap:6px">' + "".join(images) + "</div>")


def _small(line: str) -> str:
    return f'<p style="font-size:smaller">{_text(line)}</p>'


def study_html(*, title: str, overview: str, rows: Sequence[Row], best: str | None,
               models: Sequence[Curves], repeats: int = 1) -> str:
    """A study as HTML: its table (mean ± std, 95% CI, vs best), the legend, the rows' notes
    and every model's learning curves as small inline PNGs."""
    parts = [f"<h3>{html.escape(title)}</h3>", f"<p>{_text(overview)}</p>",
             _table(HEADERS, display_rows(rows),
                    [r.kind == "cv" and r.model == best for r in rows]),
             _small(LEGEND)]
    notes = [f"{r.model}: {r.note}" for r in rows if r.note and r.kind != "baseline"]
    if notes:
        parts.append("<ul>" + "".join(f"<li>{_text(n)}</li>" for n in notes) + "</ul>")
    if models:
        parts.append(_gallery(
            _image(plots.png_data_uri(plots.learning_curves(
                m.curves, title=m.name, warning=m.warning, schedule_end=m.schedule_end,
                repeats=repeats),
                dpi=CURVES_DPI), f"learning curves of {m.name}", 550)
            for m in models))
    return "<div>" + "".join(parts) + "</div>"


def search_html(summary: Mapping[str, Any] | None, *, name: str, status: str) -> str:
    """A search as HTML: with a finished search's summary its top trials (mean ± std, 95% CI,
    vs best), the references, the retrained best and the history and importance plots; without
    one, `status` (how far it got)."""
    if summary is None:
        return f"<div><h3>{html.escape(name)}: search</h3><p>{_text(status)}</p></div>"
    parts = [f"<h3>{html.escape(str(summary['search']))}: search results</h3>",
             f"<p>{_text(search_overview(summary))}</p>"]
    headers, rows = trial_cells(summary)
    if rows:
        parts += [_table(headers, rows), _small(search_legend(summary))]
    lines = [*reference_lines(summary), retrain_line(summary)]
    if any(lines):
        parts.append("<ul>" + "".join(f"<li>{_text(x)}</li>" for x in lines if x) + "</ul>")
    images = []
    direction = summary.get("direction", "maximize")
    history = summary.get("history")
    if history:
        images.append(_image(plots.png_data_uri(
            plots.search_history(history, direction=direction), dpi=SEARCH_DPI),
            "optimisation history", 560))
    if summary.get("importances"):
        images.append(_image(plots.png_data_uri(
            plots.param_importances(summary["importances"]), dpi=SEARCH_DPI),
            "parameter importances", 490))
    if images:
        parts.append(_gallery(images))
    return "<div>" + "".join(parts) + "</div>"


# --------------------------------------------------------------------------------------------
# pandas


def rows_frame(rows: Sequence[Row]) -> pandas.DataFrame:
    """The table as a DataFrame: one row per `Row`, its fields as columns, numbers as numbers
    (fractions, NaN where absent). The epoch label ("12 (warning)") is split in two: `epoch`,
    a nullable integer (<NA> where there is none: the baseline, a model with no finite
    val_loss; a nullable float where an even count of early-stopped folds has its median
    between two epochs: 5.5), and `epoch_rule`, the rule that chose it
    ("warning", "ES median", ...; "" where the epoch is simply how long the model trained).
    "200/200 (0% saved)" becomes the integers `epochs_trained` and `epochs_planned` (all
    folds together for a cross-validated candidate). ImportError with the install line when
    pandas is missing."""
    try:
        import pandas  # optional: only this function needs it
    except ImportError:
        raise ImportError("to_frame needs pandas: pip install pandas") from None
    fields = dataclasses.fields(Row)
    frame = pandas.DataFrame([dataclasses.astuple(r) for r in rows],
                             columns=[f.name for f in fields])
    numeric = {"float": "float64", "int": "int64"}  # Row's annotations, as strings
    frame = frame.astype({f.name: numeric[str(f.type)] for f in fields
                          if str(f.type) in numeric})
    epochs = [split_epoch(r.epoch) for r in rows]
    whole = all(e is None or float(e).is_integer() for e, _ in epochs)  # else an ES median 5.5
    frame["epoch"] = pandas.array([e for e, _ in epochs], dtype="Int64" if whole else "Float64")
    frame.insert(frame.columns.get_loc("epoch") + 1, "epoch_rule", [rule for _, rule in epochs])
    trained = [split_trained(r.epochs_trained) for r in rows]
    frame["epochs_trained"] = pandas.array([t for t, _ in trained], dtype="Int64")
    frame.insert(frame.columns.get_loc("epochs_trained") + 1, "epochs_planned",
                 pandas.array([p for _, p in trained], dtype="Int64"))
    return frame

