"""Figures as pure functions: arrays in, a matplotlib Figure out.

Figures are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so no
global figure state is created or leaked and no display is needed. Save with `fig.savefig(path)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fashionlab.data import CLASS_NAMES

__all__ = ["sample_grid"]


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
