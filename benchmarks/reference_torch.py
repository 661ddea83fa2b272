"""The seed study as a typical PyTorch user writes it: the plain baseline ("torch-plain").

nn.Sequential modules mirroring the Keras models (Glorot-uniform weights, zero biases), a
TensorDataset + DataLoader(batch_size=128, shuffle=True), Adam(lr=1e-3, eps=1e-7), the L2 term
added to the loss explicitly, model.train()/model.eval(). No tricks on purpose: this is the
loop fashionlab's speed is compared with, next to Keras.

History values follow Keras's definitions so the two references compare line by line: the
loss of an epoch is the sample-weighted mean of the batch losses (L2 term included, in
validation too), accuracy is measured on the training batches as they are trained.

    .venv/bin/python benchmarks/reference_torch.py --model dense64 --epochs 3
    .venv/bin/python benchmarks/reference_torch.py --model cnn --epochs 1 --limit 6000
    .venv/bin/python benchmarks/reference_torch.py --study --json torch-study.json
"""

from __future__ import annotations

import time

import _protocol as P
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def glorot(module: nn.Module) -> None:
    """Keras's defaults: glorot_uniform kernels, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def build(model_name: str) -> tuple[nn.Sequential, list[tuple[nn.Linear, float]]]:
    """The model and its L2 terms as (layer, coefficient) pairs. Outputs are logits: the
    softmax of the Keras dense models lives in F.cross_entropy here."""
    l2_terms: list[tuple[nn.Linear, float]] = []
    if model_name == P.CNN:
        model = nn.Sequential(  # input (batch, 1, 28, 28)
            nn.Conv2d(1, 32, 3), nn.ReLU(),  # (batch, 32, 26, 26)
            nn.MaxPool2d(2),  # (batch, 32, 13, 13)
            nn.Conv2d(32, 64, 3), nn.ReLU(),  # (batch, 64, 11, 11)
            nn.MaxPool2d(2),  # (batch, 64, 5, 5)
            nn.Conv2d(64, 64, 3), nn.ReLU(),  # (batch, 64, 3, 3)
            nn.Flatten(),  # (batch, 576)
            nn.Dropout(0.3),
            nn.Linear(576, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )  # fmt: skip
    else:
        stack: list[nn.Module] = [nn.Flatten()]  # (batch, 28, 28) -> (batch, 784)
        width = 28 * 28
        for h in P.DENSE_CANDIDATES[model_name]:
            linear = nn.Linear(width, h.units)
            stack += [linear, nn.ReLU()]
            if h.l2:
                l2_terms.append((linear, h.l2))
            if h.dropout:
                stack.append(nn.Dropout(h.dropout))
            width = h.units
        stack.append(nn.Linear(width, 10))
        model = nn.Sequential(*stack)
    model.apply(glorot)
    return model, l2_terms


def l2_penalty(l2_terms: list[tuple[nn.Linear, float]]) -> torch.Tensor | float:
    return sum(c * layer.weight.pow(2).sum() for layer, c in l2_terms)


def _tensors(model_name: str, x: np.ndarray, y: np.ndarray) -> TensorDataset:
    xt = torch.from_numpy(x)
    if model_name == P.CNN:
        xt = xt.unsqueeze(1)  # (n, 1, 28, 28)
    return TensorDataset(xt, torch.from_numpy(y))


def _run_eval(model: nn.Sequential, l2_terms, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        penalty = float(l2_penalty(l2_terms))
        for xb, yb in loader:
            out = model(xb)
            total_loss += F.cross_entropy(out, yb).item() * len(yb)
            correct += (out.argmax(1) == yb).sum().item()
            n += len(yb)
    return total_loss / n + penalty, correct / n


class TorchReference:
    IMPL = "torch-plain"

    def setup(self, *, threads: int) -> None:
        torch.set_num_threads(threads)

    def fit(self, model_name, x, y, x_val, y_val, *, epochs, seed):
        torch.manual_seed(seed)  # weights, dropout masks and the DataLoader's shuffling
        model, l2_terms = build(model_name)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=P.LEARNING_RATE, betas=(P.BETA_1, P.BETA_2), eps=P.ADAM_EPSILON
        )
        train_loader = DataLoader(_tensors(model_name, x, y), batch_size=P.BATCH_SIZE, shuffle=True)
        val_loader = None
        if x_val is not None:
            val_loader = DataLoader(_tensors(model_name, x_val, y_val), batch_size=P.BATCH_SIZE)

        history: dict[str, list[float]] = {k: [] for k in P.HISTORY_KEYS}
        if val_loader is None:
            del history["val_loss"], history["val_accuracy"]
        seconds: list[float] = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            model.train()
            total_loss, correct, n = 0.0, 0, 0
            for xb, yb in train_loader:
                out = model(xb)
                loss = F.cross_entropy(out, yb) + l2_penalty(l2_terms)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(yb)
                correct += (out.argmax(1) == yb).sum().item()
                n += len(yb)
            history["loss"].append(total_loss / n)
            history["accuracy"].append(correct / n)
            if val_loader is not None:
                val_loss, val_acc = _run_eval(model, l2_terms, val_loader)
                history["val_loss"].append(val_loss)
                history["val_accuracy"].append(val_acc)
            seconds.append(time.perf_counter() - t0)
        return P.Fit(model=(model, l2_terms, model_name), history=history, seconds_per_epoch=seconds)

    def evaluate(self, model, x, y):
        module, l2_terms, model_name = model
        loader = DataLoader(_tensors(model_name, x, y), batch_size=P.BATCH_SIZE)
        return _run_eval(module, l2_terms, loader)

    def versions(self):
        return {**P.base_versions(), "torch": torch.__version__}


if __name__ == "__main__":
    P.main(TorchReference())
