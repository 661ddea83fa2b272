"""The seed-study protocol shared by the two reference implementations.

`reference_keras.py` and `reference_torch.py` each provide three functions (build + fit one
model, evaluate it, report library versions); everything else the study needs lives here: the
constants of the original Keras study, the IDX reader, the fold split, the overfitting warning,
the command line, the JSON record and the whole-study driver. Standard library + numpy only, and
no fashionlab import: the references must stay independent of the code they are compared with.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILE_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

# Training settings of the original study.
BATCH_SIZE = 128
LEARNING_RATE = 1e-3
BETA_1 = 0.9
BETA_2 = 0.999
ADAM_EPSILON = 1e-7  # the Keras default, not PyTorch's 1e-8
N_FOLDS = 5  # fold i validates on samples [i*12000, (i+1)*12000) of the 60k
CV_EPOCHS = 40  # per fold, for each dense candidate
CNN_EPOCHS = 30  # on all 60k, the 10k test set as validation
WARNING_PATIENCE = 10  # epochs after the warning epoch that must all fail to improve...
WARNING_MIN_RATIO = 0.98  # ...on it by at least 2%
DEFAULT_SEED = 0
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")  # as Keras names them


@dataclass(frozen=True)
class Hidden:
    """One hidden Dense(units, relu) layer with its optional L2 and the Dropout after it."""

    units: int
    l2: float = 0.0  # adds l2 * sum(W**2) of this layer's kernel to the loss
    dropout: float = 0.0  # rate of the Dropout layer after it; 0 means no Dropout layer


# The six dense candidates of the seed study: Flatten -> hidden layers -> Dense(10, softmax).
DENSE_CANDIDATES: dict[str, tuple[Hidden, ...]] = {
    "dense64": (Hidden(64),),
    "dense64_l2": (Hidden(64, l2=0.001),),
    "dense64_drop": (Hidden(64, dropout=0.2),),
    "dense256_drop": (Hidden(256, dropout=0.4),),
    "dense64x2_drop": (Hidden(64, dropout=0.2), Hidden(64, dropout=0.2)),
    "dense256x2_drop": (Hidden(256, dropout=0.2), Hidden(256, dropout=0.2)),
}
# Conv(32,3x3,relu) -> MaxPool 2 -> Conv(64,3x3,relu) -> MaxPool 2 -> Conv(64,3x3,relu)
# -> Flatten -> Dropout 0.3 -> Dense(64, relu) -> Dense(10) (logits), valid padding.
CNN = "cnn"
MODELS = (*DENSE_CANDIDATES, CNN)


# ---------------------------------------------------------------------------------------------
# Data


def read_idx(path: Path, *, magic: int, header: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file (images: magic 2051, 16-byte header;
    labels: magic 2049, 8-byte header), shaped by the dimensions its header declares."""
    raw = gzip.decompress(Path(path).read_bytes())
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data, header declares {dims}")
    return data.reshape(dims)


@dataclass(frozen=True)
class Data:
    x_train: np.ndarray  # (n_train, 28, 28) float32 in [0, 1]
    y_train: np.ndarray  # (n_train,) int64
    x_test: np.ndarray  # (n_test, 28, 28) float32 in [0, 1]
    y_test: np.ndarray  # (n_test,) int64


def load_data(data_dir: Path = DEFAULT_DATA_DIR, *, limit: int | None = None) -> Data:
    """Fashion-MNIST as images/255 float32; `limit` keeps the first `limit` samples of the
    training set and at most that many of the test set."""
    d = Path(data_dir)

    def images(name: str) -> np.ndarray:
        return read_idx(d / name, magic=2051, header=16)[:limit].astype(np.float32) / 255.0

    def labels(name: str) -> np.ndarray:
        return read_idx(d / name, magic=2049, header=8)[:limit].astype(np.int64)

    train_images, train_labels, test_images, test_labels = FILE_NAMES
    return Data(x_train=images(train_images), y_train=labels(train_labels),
                x_test=images(test_images), y_test=labels(test_labels))


def fold_indices(n: int, fold: int, n_splits: int = N_FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) index arrays of one contiguous, unshuffled fold: validation is
    [fold*n/n_splits, (fold+1)*n/n_splits), training is everything else, in order."""
    if not 0 <= fold < n_splits:
        raise ValueError(f"fold must be in [0, {n_splits}), got {fold}")
    lo, hi = fold * n // n_splits, (fold + 1) * n // n_splits
    idx = np.arange(n)
    return np.concatenate([idx[:lo], idx[hi:]]), idx[lo:hi]


# ---------------------------------------------------------------------------------------------
# Study arithmetic


def overfitting_warning_epoch(
    val_loss: list[float], *, patience: int = WARNING_PATIENCE, ratio: float = WARNING_MIN_RATIO
) -> int:
    """The first epoch i (1-based) such that none of the next `patience` epochs has a val_loss
    below ratio * val_loss[i]; only epochs followed by a full `patience` epochs qualify. When
    none does, the epoch of the minimum val_loss."""
    v = np.asarray(val_loss, dtype=np.float64)
    for i in range(len(v) - patience):
        if not np.any(v[i + 1 : i + 1 + patience] < ratio * v[i]):
            return i + 1
    return int(np.argmin(v)) + 1


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def base_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------------------------------------
# The interface each reference provides


@dataclass
class Fit:
    model: object  # the trained model, for `evaluate`
    history: dict[str, list[float]]  # loss, accuracy[, val_loss, val_accuracy] per epoch
    seconds_per_epoch: list[float]  # train + validation, time.perf_counter


class Reference(Protocol):
    IMPL: str

    def setup(self, *, threads: int) -> None: ...

    def fit(
        self,
        model_name: str,
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray | None,
        y_val: np.ndarray | None,
        *,
        epochs: int,
        seed: int,
    ) -> Fit: ...

    def evaluate(self, model: object, x: np.ndarray, y: np.ndarray) -> tuple[float, float]: ...

    def versions(self) -> dict[str, str]: ...


# ---------------------------------------------------------------------------------------------
# Command line


def thread_count(text: str) -> int:
    """An argparse type: CPU threads, 1 to 4 per core (torch crashes without a word, a
    segmentation fault, when asked for thousands)."""
    value = positive_int(text)
    most = 4 * (os.cpu_count() or 1)
    if value > most:
        raise argparse.ArgumentTypeError(f"at most {most} (4 per core), got {value}")
    return value


def unwritable(folder: Path) -> str | None:
    """Why no results file can be written in `folder` (made if missing), or None: checked
    before measuring, not found out once the measurements are done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error.strerror or str(error)


def unwritable_file(path: Path) -> str | None:
    """Why the file `path` cannot be written, its folder left as it is, or None."""
    if path.is_dir():
        return "it is a folder"
    if not path.parent.is_dir():
        return f"there is no folder {path.parent}"
    return unwritable(path.parent)


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (0 epochs, rounds or threads would end
    in a division by zero or an empty schedule, not in a clear error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(impl: str, argv: list[str] | None = None) -> argparse.Namespace:
    script = "reference_keras.py" if impl == "keras" else "reference_torch.py"
    p = argparse.ArgumentParser(
        description=(
            f"The {impl} reference of the seed study. Trains ONE model and times every epoch "
            "(training + validation): a dense candidate on fold 0 of the 5-fold CV "
            "(48k train + 12k validation), or the CNN on all 60k with the 10k test set as "
            "validation. --study runs the whole seed study instead."
        ),
        epilog=(
            f"example: python benchmarks/{script} --model dense64 --epochs 3 --json out.json\n"
            f"         python benchmarks/{script} --study --study-epochs 2 --study-limit 3000"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=MODELS, help="the model to train (not with --study)")
    p.add_argument("--epochs", type=int, help="epochs to train (default 40; cnn: 30)")
    p.add_argument("--fold", type=int, default=0, help="CV fold of a dense model (default 0)")
    p.add_argument("--limit", type=int, help="use only the first N training (and test) samples")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed (default 0)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--json", type=Path, help="also write the JSON record to this file")
    p.add_argument("--study", action="store_true", help="run the whole seed study")
    p.add_argument("--study-epochs", type=int, help="override the CV and CNN epochs (tests)")
    p.add_argument("--study-limit", type=int, help="override the sample count (tests)")
    a = p.parse_args(argv)
    if a.study == (a.model is not None):
        p.error("give exactly one of --model and --study")
    if a.study and (a.epochs is not None or a.limit is not None):
        p.error("--study takes --study-epochs / --study-limit, not --epochs / --limit")
    for name in ("epochs", "limit", "threads", "study_epochs", "study_limit"):
        value = getattr(a, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("limit", "study_limit"):
        value = getattr(a, name)
        if value is not None and value < 2 * N_FOLDS:
            p.error(f"--{name.replace('_', '-')} must be >= {2 * N_FOLDS} (samples in every fold)")
    if not 0 <= a.fold < N_FOLDS:
        p.error(f"--fold must be in [0, {N_FOLDS})")
    missing = [name for name in FILE_NAMES if not (a.data_dir / name).is_file()]
    if missing:
        p.error(f"--data-dir {a.data_dir}: no {', '.join(missing)} (Debian's "
                "dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist)")
    return a


def emit(record: dict, path: Path | None) -> None:
    text = json.dumps(record, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The two modes


def run_one(ref: Reference, a: argparse.Namespace) -> dict:
    """One model: fold `a.fold` of the CV for a dense candidate, train/test for the CNN."""
    epochs = a.epochs or (CNN_EPOCHS if a.model == CNN else CV_EPOCHS)
    data = load_data(a.data_dir, limit=a.limit)
    if a.model == CNN:
        x, y, xv, yv = data.x_train, data.y_train, data.x_test, data.y_test
        seed = a.seed
    else:
        tr, va = fold_indices(len(data.y_train), a.fold)
        x, y = data.x_train[tr], data.y_train[tr]
        xv, yv = data.x_train[va], data.y_train[va]
        seed = a.seed + a.fold
    fit = ref.fit(a.model, x, y, xv, yv, epochs=epochs, seed=seed)
    return {
        "impl": ref.IMPL,
        "model": a.model,
        "epochs": epochs,
        "fold": None if a.model == CNN else a.fold,
        "seconds_per_epoch": fit.seconds_per_epoch,
        "train_samples": len(y),
        "val_samples": len(yv),
        "history": fit.history,
        "peak_rss_mb": peak_rss_mb(),
        "versions": ref.versions(),
        "threads": a.threads,
        "seed": seed,
    }


def run_study(ref: Reference, a: argparse.Namespace) -> dict:
    """The whole seed study: 6 dense candidates x 5 folds of CV; the best (by mean validation
    accuracy at its overfitting-warning epoch) retrained on all training data for that many
    epochs and tested; the CNN trained with the test set as validation."""
    cv_epochs = a.study_epochs or CV_EPOCHS
    cnn_epochs = a.study_epochs or CNN_EPOCHS
    data = load_data(a.data_dir, limit=a.study_limit)
    n = len(data.y_train)
    t_study = time.perf_counter()

    candidates: dict[str, dict] = {}
    for name in DENSE_CANDIDATES:
        t0 = time.perf_counter()
        folds = []
        for fold in range(N_FOLDS):
            tr, va = fold_indices(n, fold)
            fit = ref.fit(
                name,
                data.x_train[tr],
                data.y_train[tr],
                data.x_train[va],
                data.y_train[va],
                epochs=cv_epochs,
                seed=a.seed + fold,
            )
            folds.append(fit)
            log(
                f"{name} fold {fold}: val_accuracy {fit.history['val_accuracy'][-1]:.4f} "
                f"({sum(fit.seconds_per_epoch):.1f} s)"
            )
        wall = time.perf_counter() - t0
        mean_val_loss = np.mean([f.history["val_loss"] for f in folds], axis=0)
        mean_val_acc = np.mean([f.history["val_accuracy"] for f in folds], axis=0)
        warning = overfitting_warning_epoch(mean_val_loss.tolist())
        candidates[name] = {
            "wall_seconds": wall,
            "fold_seconds": [sum(f.seconds_per_epoch) for f in folds],
            "final_val_accuracy": [f.history["val_accuracy"][-1] for f in folds],
            "mean_final_val_accuracy": float(mean_val_acc[-1]),
            "mean_val_loss": mean_val_loss.tolist(),
            "mean_val_accuracy": mean_val_acc.tolist(),
            "warning_epoch": warning,
            "mean_val_accuracy_at_warning": float(mean_val_acc[warning - 1]),
            "folds": [
                {"history": f.history, "seconds_per_epoch": f.seconds_per_epoch} for f in folds
            ],
        }
        log(f"{name}: warning epoch {warning}, mean val_accuracy {mean_val_acc[warning - 1]:.4f}")

    best = max(candidates, key=lambda k: candidates[k]["mean_val_accuracy_at_warning"])
    epochs = candidates[best]["warning_epoch"]
    t0 = time.perf_counter()
    fit = ref.fit(best, data.x_train, data.y_train, None, None, epochs=epochs, seed=a.seed)
    test_loss, test_acc = ref.evaluate(fit.model, data.x_test, data.y_test)
    retrain = {
        "model": best,
        "epochs": epochs,
        "wall_seconds": time.perf_counter() - t0,
        "seconds_per_epoch": fit.seconds_per_epoch,
        "train_accuracy": fit.history["accuracy"][-1],
        "test_loss": test_loss,
        "test_accuracy": test_acc,
    }
    log(f"retrain {best} for {epochs} epochs: test_accuracy {test_acc:.4f}")

    t0 = time.perf_counter()
    fit = ref.fit(
        CNN, data.x_train, data.y_train, data.x_test, data.y_test, epochs=cnn_epochs, seed=a.seed
    )
    cnn = {
        "epochs": cnn_epochs,
        "wall_seconds": time.perf_counter() - t0,
        "seconds_per_epoch": fit.seconds_per_epoch,
        "final_val_accuracy": fit.history["val_accuracy"][-1],
        "final_val_loss": fit.history["val_loss"][-1],
        "history": fit.history,
    }
    log(f"cnn: val_accuracy {cnn['final_val_accuracy']:.4f} ({cnn['wall_seconds']:.1f} s)")

    return {
        "impl": ref.IMPL,
        "mode": "study",
        "settings": {
            "cv_epochs": cv_epochs,
            "cnn_epochs": cnn_epochs,
            "n_folds": N_FOLDS,
            "batch_size": BATCH_SIZE,
            "train_samples": n,
            "test_samples": len(data.y_test),
            "seed": a.seed,
        },
        "wall_seconds": {
            **{name: c["wall_seconds"] for name, c in candidates.items()},
            "retrain": retrain["wall_seconds"],
            CNN: cnn["wall_seconds"],
            "total": time.perf_counter() - t_study,
        },
        "candidates": candidates,
        "best": best,
        "retrain": retrain,
        "cnn": cnn,
        "peak_rss_mb": peak_rss_mb(),
        "versions": ref.versions(),
        "threads": a.threads,
    }


def main(ref: Reference, argv: list[str] | None = None) -> None:
    a = parse_args(ref.IMPL, argv)
    ref.setup(threads=a.threads)
    record = run_study(ref, a) if a.study else run_one(ref, a)
    emit(record, a.json)

