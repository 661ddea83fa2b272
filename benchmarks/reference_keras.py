"""The seed study as the original Keras code ran it: the baseline fashionlab is measured against.

Keras 3 Sequential models on TensorFlow, compiled and fitted exactly as the original study did
(`model.fit(..., validation_data=..., verbose=0)`), with a callback timing each epoch from
`on_epoch_begin` to `on_epoch_end` (training + validation, time.perf_counter). The first epoch
includes tracing the tf.functions, as it did for the original.

Needs TensorFlow (the `bench` extra), best in its own environment:

    python3 -m venv .venv-keras && .venv-keras/bin/pip install tensorflow==2.21.0 numpy
    .venv-keras/bin/python benchmarks/reference_keras.py --model dense64 --epochs 3
    .venv-keras/bin/python benchmarks/reference_keras.py --model cnn --epochs 1 --limit 6000
    .venv-keras/bin/python benchmarks/reference_keras.py --study --json keras-study.json
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # silence the C++ start-up INFO lines

import _protocol as P
import keras
import numpy as np
import tensorflow as tf
from keras import layers, regularizers


def build(model_name: str) -> keras.Sequential:
    if model_name == P.CNN:
        return keras.Sequential(
            [
                keras.Input(shape=(28, 28, 1)),
                layers.Conv2D(32, (3, 3), activation="relu"),
                layers.MaxPooling2D((2, 2)),
                layers.Conv2D(64, (3, 3), activation="relu"),
                layers.MaxPooling2D((2, 2)),
                layers.Conv2D(64, (3, 3), activation="relu"),
                layers.Flatten(),
                layers.Dropout(0.3),
                layers.Dense(64, activation="relu"),
                layers.Dense(10),
            ]
        )
    stack: list[layers.Layer] = [keras.Input(shape=(28, 28)), layers.Flatten()]
    for h in P.DENSE_CANDIDATES[model_name]:
        reg = regularizers.l2(h.l2) if h.l2 else None
        stack.append(layers.Dense(h.units, activation="relu", kernel_regularizer=reg))
        if h.dropout:
            stack.append(layers.Dropout(h.dropout))
    stack.append(layers.Dense(10, activation="softmax"))
    return keras.Sequential(stack)


def compile_model(model: keras.Sequential, model_name: str) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(
            learning_rate=P.LEARNING_RATE,
            beta_1=P.BETA_1,
            beta_2=P.BETA_2,
            epsilon=P.ADAM_EPSILON,
        ),
        # The CNN ends in a plain Dense(10): its outputs are logits.
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=model_name == P.CNN),
        metrics=["accuracy"],
    )


class EpochTimer(keras.callbacks.Callback):
    """Seconds per epoch, training + validation (on_epoch_end runs after validation)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._t0)


def _inputs(model_name: str, x: np.ndarray) -> np.ndarray:
    return x[..., None] if model_name == P.CNN else x  # (n, 28, 28, 1) | (n, 28, 28)


class KerasReference:
    IMPL = "keras"

    def setup(self, *, threads: int) -> None:
        # Must run before TensorFlow executes its first op.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)

    def fit(self, model_name, x, y, x_val, y_val, *, epochs, seed):
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)  # python, numpy and TensorFlow seeds
        model = build(model_name)
        compile_model(model, model_name)
        timer = EpochTimer()
        validation = None if x_val is None else (_inputs(model_name, x_val), y_val)
        h = model.fit(
            _inputs(model_name, x),
            y,
            batch_size=P.BATCH_SIZE,
            epochs=epochs,
            validation_data=validation,
            shuffle=True,
            verbose=0,
            callbacks=[timer],
        )
        history = {k: [float(v) for v in h.history[k]] for k in P.HISTORY_KEYS if k in h.history}
        return P.Fit(model=model, history=history, seconds_per_epoch=timer.seconds)

    def evaluate(self, model, x, y):
        kind = P.CNN if len(model.input_shape) == 4 else "dense"
        loss, acc = model.evaluate(_inputs(kind, x), y, batch_size=P.BATCH_SIZE, verbose=0)
        return float(loss), float(acc)

    def versions(self):
        return {**P.base_versions(), "tensorflow": tf.__version__, "keras": keras.__version__}


if __name__ == "__main__":
    P.main(KerasReference())
