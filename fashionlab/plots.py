"""Figures as pure functions: arrays in, a matplotlib Figure out.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so no
global figure state is created or leaked and no display is needed. Save with `fig.savefig(path)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Protocol

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fashionlab.data import CLASS_NAMES

__all__ = ["learning_curves", "sample_grid"]


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

    figure = Figure(figsize=(1.8 + 0.55 * per_class, 0.4 + 0.55 * n_classes), layout="constrained")
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


class _Warning(Protocol):
    epoch: int | None  # the overfitting warning's epoch (1-based), None when it did not fire
    best_epoch: int | None


def learning_curves(
    curves: Mapping[str, np.ndarray], *, title: str, warning: _Warning | None = None
) -> Figure:
    """Loss and accuracy per epoch, as in the seed study: training as dots, validation as a
    line, each the mean across folds with a +/- 1 std band, the warning epoch marked in red.

    curves: "loss", "accuracy", "val_loss", "val_accuracy" -> (n_models, epochs), NaN where a
    model did not train that epoch (early stopping).
    """
    figure = Figure(figsize=(10, 3.8), layout="constrained")
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
                mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
            color = "tab:blue" if style == "train" else "tab:orange"
            if style == "train":
                ax.plot(epochs, mean, "o", markersize=3, color=color, label="training")
            else:
                ax.plot(epochs, mean, "-", color=color, label="validation")
            if n_models > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2,
                                linewidth=0)
        if warning is not None and warning.epoch is not None:
            ax.axvline(warning.epoch, color="red", linestyle="--", linewidth=1,
                       label=f"overfitting warning (epoch {warning.epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    band = f", mean \u00b1 1 std of {n_models} folds" if n_models > 1 else ""
    figure.suptitle(f"{title}{band}")
    return figure

