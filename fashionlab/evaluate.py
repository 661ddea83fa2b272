"""A trained model on a labelled split: accuracy, loss, confusion matrix, per-class scores.

    ev = evaluate(load_model("runs/<id>/models/cnn"), dataset.test)
    ev.accuracy, ev.confusion            # (n_classes, n_classes) counts, rows = true class
    ev.precision, ev.recall, ev.f1       # (n_classes,) each
    ev.misclassified()                   # indices of the errors, most confident first

Inference runs in batches under torch.inference_mode, with no dropout and batch norm in
inference mode. The images go in as the model expects them: uint8 pixels / 255, (B, 1, 28, 28).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fashionlab.artifacts import SavedModel, as_saved_model
from fashionlab.data import Split
from fashionlab.errors import DataError
from fashionlab.stats import proportion_ci

__all__ = ["Evaluation", "evaluate", "unlike_the_study"]


@dataclass(frozen=True, eq=False)
class Evaluation:
    """How a model did on one split. Per-class arrays are indexed by class.

    precision  correct / predicted as the class; NaN for a class never predicted
    recall     correct / truly of the class (the per-class accuracy); NaN for an absent class
    f1         2 * precision * recall / (precision + recall); 0 when both are 0, NaN when
               either is NaN
    """

    class_names: tuple[str, ...]
    n: int  # images scored
    accuracy: float  # fraction correct
    loss: float  # mean cross-entropy (no regularisation term)
    confusion: np.ndarray  # (n_classes, n_classes) int64 counts, rows = true, columns = predicted
    labels: np.ndarray  # (n,) int64 true classes
    predictions: np.ndarray  # (n,) int64 predicted classes
    confidence: np.ndarray  # (n,) float32 probability of the predicted class

    def __repr__(self) -> str:  # the scores, not the per-image arrays
        return (f"Evaluation(n={self.n}, accuracy={self.accuracy:.4f}, loss={self.loss:.4f}, "
                f"classes={self.n_classes})")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def support(self) -> np.ndarray:
        """(n_classes,) images of each true class."""
        return self.confusion.sum(axis=1)

    @property
    def recall(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=1))

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Fraction of each class's images classified correctly (the recall)."""
        return self.recall

    @property
    def precision(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=0))

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        return np.where(np.isnan(p) | np.isnan(r), np.nan, f1)

    def accuracy_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Where the accuracy of the population these images were drawn from lies, from their
        number alone (`stats.proportion_ci`, Wilson's): ±0.6 points on 10,000 images."""
        return proportion_ci(self.accuracy, self.n, confidence)

    def misclassified(self, limit: int | None = None) -> np.ndarray:
        """Indices of the wrongly classified images, the most confident mistakes first."""
        wrong = np.flatnonzero(self.predictions != self.labels)
        order = np.argsort(-self.confidence[wrong], kind="stable")
        return wrong[order][:limit]

    def to_dict(self) -> dict[str, Any]:
        """The scores as plain JSON-ready values (NaN as None); no per-image arrays."""
        def clean(values: np.ndarray) -> list[float | None]:
            return [None if math.isnan(v) else float(v) for v in values]

        return {
            "n": self.n, "accuracy": self.accuracy,
            "accuracy_ci": [None if math.isnan(v) else v for v in self.accuracy_interval()],
            "loss": self.loss,
            "class_names": list(self.class_names),
            "confusion": self.confusion.tolist(),
            "per_class": {
                "support": self.support.tolist(), "accuracy": clean(self.per_class_accuracy),
                "precision": clean(self.precision), "recall": clean(self.recall),
                "f1": clean(self.f1),
            },
        }


def unlike_the_study(model: SavedModel, result: Evaluation) -> list[str]:
    """Why `result` may differ from the test scores `model`'s study stored with it (its
    model.json), in words; empty where it measures the same. A study cut to `[data]
    test_limit` (every `--quick` run) tested on the first N test images, not all; a model
    trained in bfloat16 was scored in it too, `evaluate` scores in float32 (a few images can
    change sides); a model loaded with other test-time views (`load_model(tta=...)`) is
    scored with those; and its test loss, as Keras', adds the L2 penalty to the cross-entropy
    `evaluate` gives."""
    # (a model saved from Python may carry metadata of any shape: no notes then)
    stored = model.metadata if isinstance(model.metadata, dict) else {}
    data = stored.get("data")
    tested = data.get("test") if isinstance(data, dict) else None
    notes = []
    accuracy = stored.get("test_accuracy")
    other_views = model.saved_tta is not None and model.saved_tta != model.spec.tta
    if other_views and isinstance(accuracy, float):  # what moves the numbers, not the precision
        notes.append(f"scored with test-time views {model.spec.tta!r}; its study scored it with "
                     f"{model.saved_tta!r}: {100 * accuracy:.2f}%")
    if isinstance(tested, int) and tested != result.n and isinstance(accuracy, float):
        notes.append(f"its study's test accuracy ({100 * accuracy:.2f}%) is of the first "
                     f"{tested:,} test images, this of {result.n:,}: --limit {tested} scores "
                     "the same images")
    elif tested == result.n and isinstance(accuracy, float) and _scored_in_bf16(stored) and \
            not other_views and round(accuracy * result.n) != round(result.accuracy * result.n):
        notes.append(f"scored here in float32; its study scored the same images in bfloat16 "
                     f"as it trained: {100 * accuracy:.2f}%")
    loss = stored.get("test_loss")
    l2 = any(layer.l2 for layer in model.spec.layers) or any(c.l2 for c in model.spec.conv)
    if l2 and isinstance(loss, float):
        notes.append(f"the loss is the cross-entropy alone; its study's test loss ({loss:.4f}) "
                     "adds the L2 penalty, as Keras does")
    return notes


def _scored_in_bf16(stored: dict[str, Any]) -> bool:
    """Whether a model's study trained, and scored, it in bfloat16 (its stored `precision`,
    "auto" resolved as its machine did)."""
    train, machine = stored.get("train"), stored.get("machine")
    precision = train.get("precision") if isinstance(train, dict) else None
    if precision != "auto" or not isinstance(machine, dict):
        return precision == "bf16"
    if str(machine.get("device") or "cpu").startswith("cuda"):
        return True  # every GPU with bf16 (Ampere on): a note only where the numbers differ
    return machine.get("cpu_bf16") is True


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def evaluate(
    model: SavedModel | nn.Module | str | Path,
    split: Split,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    *,
    batch_size: int = 256,
) -> Evaluation:
    """Score `model` on every image of `split`.

    model: a SavedModel (from `load_model`), its directory, or a module mapping (B, 1, 28, 28)
    float32 in [0, 1] to (B, n_classes) logits; it is moved to `device`. class_names: defaults
    to the saved model's. Labels outside the model's classes raise DataError. `batch_size`
    changes nothing but speed and memory (the loss in its last digits): 256 images keep a
    CNN's activations small (scoring the seed study's CNN on 10k images: 1.3-1.7 s and a
    350 MB process, against 2.1-2.5 s and 514 MB at 1000; AMD EPYC Zen 4).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if isinstance(model, (str, os.PathLike)):  # a plain module is no SavedModel
        model = as_saved_model(model, device)
    if not isinstance(model, SavedModel | nn.Module):
        raise TypeError(f"model: expected a saved model (load_model(directory)), its directory "
                        f"or a torch module, got {type(model).__name__}")
    if not isinstance(split, Split):  # a whole Dataset, say: which of its splits is unsaid
        raise DataError(f"split: expected a Split (dataset.test, say), got "
                        f"{type(split).__name__}")
    module = model.module if isinstance(model, SavedModel) else model
    if class_names is None:
        if not isinstance(model, SavedModel):
            raise ValueError("class_names are needed for a plain module")
        class_names = model.class_names
    class_names = tuple(class_names)
    n_classes = len(class_names)
    labels = np.array(split.labels, dtype=np.int64)  # (n,) a writable copy, for torch
    if labels.size and int(labels.max()) >= n_classes:
        raise DataError(f"labels go up to {int(labels.max())} but the model knows "
                        f"{n_classes} classes")
    device = torch.device(device)
    module = module.to(device)
    was_training = module.training
    module.eval()
    loss_sum = 0.0
    predictions, confidence = [], []
    try:
        with torch.inference_mode():
            for first in range(0, len(labels), batch_size):
                images = np.array(split.images[first:first + batch_size])  # (B, 28, 28) copy
                # (B, 1, 28, 28) float32 in [0, 1]
                x = torch.from_numpy(images).to(device).float().div_(255).unsqueeze(1)
                y = torch.from_numpy(labels[first:first + batch_size]).to(device)  # (B,)
                logits = module(x).float()  # (B, n_outputs)
                if logits.shape[-1] != n_classes:
                    raise DataError(f"the model has {logits.shape[-1]} outputs but "
                                    f"{n_classes} class names")
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                top, predicted = logits.softmax(-1).max(-1)  # (B,), (B,)
                predictions.append(predicted.cpu().numpy())
                confidence.append(top.cpu().numpy())
    finally:
        module.train(was_training)
    n = len(labels)
    predicted = np.concatenate(predictions).astype(np.int64) if n else np.zeros(0, np.int64)
    top = np.concatenate(confidence).astype(np.float32) if n else np.zeros(0, np.float32)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    return Evaluation(
        class_names=class_names, n=n,
        accuracy=float((predicted == labels).mean()) if n else math.nan,
        loss=loss_sum / n if n else math.nan, confusion=confusion, labels=labels,
        predictions=predicted, confidence=top,
    )
