"""Figures as pure functions: arrays in, a matplotlib Figure out.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so no
global figure state is created or leaked and no display is needed. Save with `save_figure`
(whole or not at all) or `fig.savefig(path)`.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fashionlab import stops
from fashionlab.data import CLASS_NAMES, Split
from fashionlab.errors import OutputError
from fashionlab.serialize import folder_blocked, fresh_staging_path, why_not_written
from fashionlab.text import safe_name

__all__ = ["IMAGE_SUFFIXES", "InlineFigure", "check_image_file", "curves_file",
           "learning_curves", "png_data_uri", "sample_grid", "save_figure", "write_samples"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")  # what `write_samples` writes


class InlineFigure(Figure):
    """A Figure that shows itself in Jupyter as the last expression of a cell, with or
    without `%matplotlib inline`: built without pyplot, nothing else registers it with
    IPython, which would print `<Figure size 1000x380 with 2 Axes>` instead."""

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        with _missing_glyphs_drawn_silently():
            self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()


@contextlib.contextmanager
def _missing_glyphs_drawn_silently() -> Iterator[None]:
    # A name in a script the font lacks (CJK, emoji) is drawn as boxes; matplotlib would also
    # warn twice per glyph and figure on stderr.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from", category=UserWarning)
        yield


def save_figure(figure: Figure, path: str | Path, **savefig: Any) -> None:
    """`figure.savefig(path, **savefig)` whole or not at all: under the staging name, then
    renamed (a kill never leaves half a PNG under `path`). OSError naming `path` when it
    cannot."""
    path = Path(path)
    staging = fresh_staging_path(path)
    try:
        with _missing_glyphs_drawn_silently(), stops.kept():
            figure.savefig(staging, **{"format": path.suffix.lstrip(".") or "png", **savefig})
        os.replace(staging, path)
    except OSError as error:
        if error.filename is not None and Path(error.filename) != staging:
            raise
        # matplotlib's PNG writer says a full disk without the file's name; the staging
        # file's is no name the caller gave (renamed onto a folder: IsADirectoryError)
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    finally:
        staging.unlink(missing_ok=True)


def png_data_uri(figure: Figure | bytes, *, dpi: float = 100) -> str:
    """A figure, or a PNG image's bytes, as a PNG data URI ("data:image/png;base64,..."), for an
    HTML page or notebook."""
    if isinstance(figure, bytes):
        png = figure
    else:
        buffer = io.BytesIO()
        with _missing_glyphs_drawn_silently(), stops.kept():
            figure.savefig(buffer, format="png", dpi=dpi)
        png = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def curves_file(name: str) -> str:
    """The file name of a candidate's or final model's learning curves in a study's figures."""
    return f"curves-{safe_name(name)}.png"


def sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    per_class: int = 8,
    class_names: Sequence[str] = CLASS_NAMES,
    title: str | None = None,
) -> Figure:
    """The first `per_class` images of each class: one row per class, labelled with its name.

    images: (N, H, W) uint8 (0 = black background); labels: (N,) class indices. A class with
    fewer images than `per_class` leaves its remaining cells blank.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    n_classes, (height, width), pad = len(class_names), images.shape[1:], 2
    # One mosaic drawn by a single imshow: far faster than an Axes per image. NaN = blank.
    cell_h, cell_w = height + pad, width + pad
    mosaic = np.full((n_classes * cell_h + pad, per_class * cell_w + pad), np.nan, np.float32)
    for c in range(n_classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            top, left = pad + c * cell_h, pad + j * cell_w
            mosaic[top:top + height, left:left + width] = images[i]

    figure = InlineFigure(figsize=(1.8 + 0.55 * per_class, 0.4 + 0.55 * n_classes),
                          layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks(pad + np.arange(n_classes) * cell_h + height / 2 - 0.5, labels=list(class_names))
    ax.set_xticks([])
    ax.tick_params(left=False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return figure


def check_image_file(out: str | Path, *, option: str | None = None) -> Path:
    """`out` as a Path, if it can be an image file `write_samples` writes; else a one-line
    OutputError naming it, after the `option` that gave it if any (a suffix it cannot write,
    a folder, a file where a folder of its path should be)."""
    out = Path(out)
    named = f"{option} {out}" if option else str(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise OutputError(f"{named}: name an image file ending in {', '.join(IMAGE_SUFFIXES)}")
    if out.is_dir():
        raise OutputError(f"{named}: is a folder; name the image file to write")
    if (blocked := folder_blocked(out)) is not None:
        raise OutputError(f"{named}: {blocked}")
    return out


def write_samples(split: Split, out: str | Path, *, per_class: int = 8,
                  class_names: Sequence[str] = CLASS_NAMES, title: str | None = None) -> Path:
    """Write `sample_grid` of a split to the image file `out` (.png, .jpg, .pdf or .svg, by
    its suffix), its folder made if missing, whole or not at all; returns its path. What
    `fashionlab data show` does. A path that names no image file, a folder, or a place that
    cannot be written is a one-line OutputError naming it, checked before anything is drawn."""
    if not isinstance(split, Split):
        raise TypeError(f"write_samples: expected a fashionlab.data.Split (e.g. "
                        f"load_fashion_mnist().train), got {type(split).__name__}")
    out = check_image_file(out)
    figure = sample_grid(split.images, split.labels, per_class=per_class,
                         class_names=class_names, title=title)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_figure(figure, out, format=out.suffix.lower().lstrip("."), dpi=100,
                    bbox_inches="tight")
    except OSError as error:
        raise OutputError(f"{out}: cannot write ({why_not_written(out, error)})") from None
    return out


class _Warning(Protocol):
    epoch: int | None  # the overfitting warning's epoch (1-based), None when it did not fire
    best_epoch: int | None


def learning_curves(
    curves: Mapping[str, np.ndarray], *, title: str, warning: _Warning | None = None,
    schedule_end: int | None = None, repeats: int = 1,
) -> Figure:
    """Loss and accuracy per epoch, as in the seed study: training as dots, validation as a
    line, each the mean across folds with a +/- 1 std band, the warning epoch marked in red.
    A model read at the end of its learning-rate schedule (`schedule_end`, its epoch) has that
    epoch marked instead: the warning, made for constant rates, fires on such a schedule's
    high-rate plateau and is not where it is read.

    curves: "loss", "accuracy", "val_loss", "val_accuracy" -> (n_models, epochs), NaN where a
    model did not train that epoch (early stopping). repeats: of the cross-validation, whose
    n_models are then folds x repeats (the title says so).
    """
    figure = InlineFigure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    n_models = len(curves["loss"])
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for name, style in ((metric, "train"), (f"val_{metric}", "validation")):
            values = np.asarray(curves[name], dtype=np.float64)
            if values.size == 0 or np.isnan(values).all():
                continue
            epochs = np.arange(1, values.shape[1] + 1)
            with warnings.catch_warnings():  # all-NaN epochs (every fold stopped) stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                # the sample std (n - 1), as the tables give it
                mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0, ddof=1)
            color = "tab:blue" if style == "train" else "tab:orange"
            if style == "train":
                ax.plot(epochs, mean, "o", markersize=3, color=color, label="training")
            else:
                ax.plot(epochs, mean, "-", color=color, label="validation")
            if n_models > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2,
                                linewidth=0)
        if schedule_end is not None:
            ax.axvline(schedule_end, color="green", linestyle="--", linewidth=1,
                       label=f"read at the schedule's end (epoch {schedule_end})")
        elif warning is not None and warning.epoch is not None:
            ax.axvline(warning.epoch, color="red", linestyle="--", linewidth=1,
                       label=f"overfitting warning (epoch {warning.epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 2.5 in a short run
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run stopped before its first epoch: none
            ax.legend(fontsize=8)
    band = ""
    if n_models > 1:
        models = (f"{n_models // repeats} folds x {repeats} repeats"
                  if repeats > 1 and n_models % repeats == 0 else f"{n_models} folds")
        band = f", mean \u00b1 1 std of {models}"
    figure.suptitle(f"{title}{band}")
    return figure


# --------------------------------------------------------------------------------------------
# A tested model: confusion matrix, per-class scores, its mistakes. A search: its history.

__all__ += ["confusion_matrix", "misclassified_grid", "param_importances", "per_class_bars",
            "search_history"]


def confusion_matrix(
    matrix: np.ndarray, *, class_names: Sequence[str] = CLASS_NAMES, title: str | None = None
) -> Figure:
    """Counts of (true, predicted) pairs: rows are the true class, columns the predicted one.

    matrix: (n_classes, n_classes) counts. Cells are shaded by the fraction of their row (the
    true class), so a class's errors stand out whatever its size; every cell shows its count.
    """
    counts = np.asarray(matrix)
    n = len(class_names)
    if counts.shape != (n, n):
        raise ValueError(f"matrix must be {n}x{n} for {n} class names, got {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    fraction = counts / np.maximum(totals, 1)  # (n, n) row-normalised
    figure = InlineFigure(figsize=(1.6 + 0.42 * n, 1.2 + 0.42 * n), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if fraction[i, j] > 0.5 else "black")
    ax.set_xticks(np.arange(n), labels=list(class_names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(np.arange(n), labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    return figure


def per_class_bars(
    scores: Mapping[str, Sequence[float]], *, class_names: Sequence[str] = CLASS_NAMES,
    title: str | None = None,
) -> Figure:
    """Grouped horizontal bars, one group per class: e.g. {"precision": p, "recall": r}, each
    (n_classes,) fractions in [0, 1]; a NaN score draws no bar."""
    n, names = len(class_names), list(scores)
    figure = InlineFigure(figsize=(7, 0.8 + 0.28 * n * max(1, len(names)) ** 0.5),
                          layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    height = 0.8 / max(1, len(names))
    rows = np.arange(n)
    for k, name in enumerate(names):
        values = np.asarray(scores[name], dtype=np.float64)
        if values.shape != (n,):
            raise ValueError(f"scores[{name!r}] must have {n} values, got {values.shape}")
        ax.barh(rows - 0.4 + height * (k + 0.5), np.nan_to_num(values * 100), height=height,
                label=name)
    ax.set_yticks(rows, labels=list(class_names), fontsize=8)
    ax.invert_yaxis()  # the first class on top, as in the confusion matrix
    ax.set_xlim(0, 100)
    ax.set_xlabel("%")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title)
    return figure


def misclassified_grid(
    images: np.ndarray,
    true: Sequence[int] | np.ndarray,
    predicted: Sequence[int] | np.ndarray,
    *,
    class_names: Sequence[str] = CLASS_NAMES,
    confidence: Sequence[float] | np.ndarray | None = None,
    columns: int = 8,
    title: str | None = None,
) -> Figure:
    """Images with their true and predicted labels, in the order given (pass the mistakes).

    images: (N, H, W) uint8; true, predicted: (N,) class indices; confidence: (N,) probability
    of the predicted class, shown when given. An empty selection gives a figure that says so.
    """
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, -(-n // columns))
    # One mosaic drawn by a single imshow (an Axes per image is many times slower), with
    # room above each image for its two label lines. NaN = blank.
    (height, width), pad, label = images.shape[1:] or (28, 28), 3, 9
    cell_h, cell_w = height + label + pad, width + pad
    mosaic = np.full((rows * cell_h, columns * cell_w - pad), np.nan, np.float32)
    inches = 1.45 * columns
    figure = InlineFigure(figsize=(inches, inches * mosaic.shape[0] / mosaic.shape[1]
                                   + (0.4 if title else 0.1)), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.set_axis_off()
    if n == 0:
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return figure
    for i in range(n):
        top, left = (i // columns) * cell_h + label, (i % columns) * cell_w
        mosaic[top:top + height, left:left + width] = images[i]
        text = f"true: {class_names[int(true[i])]}\npred: {class_names[int(predicted[i])]}"
        if confidence is not None:
            text += f" ({float(confidence[i]) * 100:.0f}%)"
        ax.text(left + width / 2 - 0.5, top - 1.5, text, ha="center", va="bottom", fontsize=7,
                color="darkred", linespacing=1.1)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=255, interpolation="nearest")
    if title:
        ax.set_title(title)
    return figure


def search_history(
    values: Sequence[float | None] | np.ndarray, *, direction: str = "maximize",
    title: str = "optimisation history",
) -> Figure:
    """Each trial's value as a dot (in trial order) and the best value so far as a line;
    None or NaN (a pruned or failed trial) draws nothing."""
    y = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    trials = np.arange(len(y))
    figure = InlineFigure(figsize=(8, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot(trials, y, "o", markersize=4, color="tab:blue", label="trial")
    if np.isfinite(y).any():
        signed = np.where(np.isnan(y), -np.inf, y if direction == "maximize" else -y)
        best = np.maximum.accumulate(signed)
        best = np.where(np.isinf(best), np.nan, best if direction == "maximize" else -best)
        ax.plot(trials, best, "-", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return figure


def param_importances(importances: Mapping[str, float], *, title: str = "parameter importances"
                      ) -> Figure:
    """Horizontal bars of each parameter's importance, the largest on top."""
    ranked = sorted(importances.items(), key=lambda item: -float(item[1]))
    figure = InlineFigure(figsize=(7, 0.9 + 0.35 * max(1, len(ranked))), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.barh(np.arange(len(ranked)), [float(v) for _, v in ranked], color="tab:blue")
    ax.set_yticks(np.arange(len(ranked)), labels=[str(k) for k, _ in ranked], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("importance")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return figure
