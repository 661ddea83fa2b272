"""Training many models at once: one `StackTrainer` trains a stack of members epoch by epoch.

The data lives on the device as tensors; a batch is an index slice of each member's per-epoch
permutation of its own training rows, gathered as (M, B, 28, 28). There is no DataLoader, no
per-sample Python and no host synchronisation inside an epoch: per-member sums of loss and
correct predictions stay on the device and are read once at the end of the epoch.

Reported metrics follow Keras: the training loss and accuracy of an epoch are running means
over its batches (computed before each update), and loss and val_loss include the L2 penalty.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fashionlab.config import Augment, ModelSpec, TrainSpec
from fashionlab.hardware import keep_freed_memory, resolve_precision
from fashionlab.models import StackedNet, normalises_a_single_pixel, select_members
from fashionlab.rng import MemberGenerators
from fashionlab.stops import raise_if_stopped

NO_AUGMENT = Augment()
EVAL_CHUNK = 512  # validation images per member per forward pass: cache-sized, results unchanged


@dataclass(frozen=True)
class Member:
    """One model of a stack: its architecture, its data and its random stream."""

    key: str  # unique within a study, e.g. "dense(64)/fold-3"
    model: ModelSpec
    train_index: np.ndarray  # rows of the training tensors this model learns from
    val_index: np.ndarray | None  # rows of the validation tensors it is scored on; None: none
    seed: int  # seeds its initial weights, shuffles, dropout masks and augmentation


@dataclass(frozen=True)
class Tensors:
    """The data on the device: images (N, 28, 28), float in [0, 1] or uint8 pixels (converted
    batch by batch: `as_images`), labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor  # may be the training tensors themselves (cross-validation)
    y_val: torch.Tensor


@dataclass(frozen=True)
class EpochMetrics:
    loss: float
    accuracy: float
    val_loss: float  # nan when the member has no validation data
    val_accuracy: float
    seconds: float  # wall time of the epoch for the whole stack

    def get(self, name: str) -> float:
        return float(getattr(self, name))


def stack_key(member: Member, train: TrainSpec) -> tuple[Any, ...]:
    """Members with equal keys can be trained as one stack."""
    n_val = None if member.val_index is None else len(member.val_index)
    return (member.model.shape_key(), train, len(member.train_index), n_val)


def gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] for rows (M, b): (M, b, *x.shape[1:]). index_select on a flat view is several
    times faster than advanced indexing on the CPU, with identical results."""
    flat = x.view(len(x), -1).index_select(0, rows.flatten())
    return flat.view(*rows.shape, *x.shape[1:])


def as_images(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Images in [0, 1] of `dtype`: uint8 pixels are divided by 255 in float32 (the values
    `to_tensors` gives, to the bit), then rounded to `dtype`."""
    if x.dtype == torch.uint8:
        return x.float().div_(255).to(dtype)
    if not x.is_floating_point():  # int64 0-255, say: taken as [0, 1] it would be garbage
        raise TypeError(f"images must be uint8 pixels or floats in [0, 1], got {x.dtype}")
    return x.to(dtype)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class StackTrainer:
    """Trains M members of one shape and one training spec together, one epoch per call.

    Members can be dropped between epochs (early stopping, a diverged loss); the others carry
    on exactly as if they had been trained alone.
    """

    def __init__(
        self, members: Sequence[Member], train: TrainSpec, data: Tensors, device: torch.device
    ) -> None:
        if len({stack_key(m, train) for m in members}) != 1:
            raise ValueError("members of a stack need one shape, one train size and one val size")
        self.train_spec = train
        self.device = device
        if device.type == "cpu":
            keep_freed_memory()
        self.precision = resolve_precision(train.precision, device)
        # Autocast would round every gathered batch to bfloat16 anyway: images in bfloat16.
        self.image_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32

        def held(x: torch.Tensor) -> torch.Tensor:  # pixels stay pixels, converted per batch
            return x.to(self.image_dtype) if x.is_floating_point() else x

        x_train = held(data.x_train)
        x_val = x_train if data.x_val is data.x_train else held(data.x_val)
        data = Tensors(x_train, data.y_train, x_val, data.y_val)
        self.data = data
        self.members = list(members)
        self.keys = [m.key for m in members]
        self.epoch = 0  # completed epochs
        self.n_train = len(members[0].train_index)
        self.batches = batch_bounds(self.n_train, train.batch_size,
                                    at_least=2 if normalises_a_single_pixel(members[0].model)
                                    else 1)
        self.steps_per_epoch = len(self.batches)

        self.generators = MemberGenerators([m.seed for m in members], device)
        self.net = StackedNet([m.model for m in members], self.generators)
        self.train_index = self._index([m.train_index for m in members])
        self.val_index = (
            None if members[0].val_index is None else self._index([m.val_index for m in members])
        )
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.ema = self._make_ema(self.net)

    @property
    def scored_net(self) -> StackedNet:
        """The weights that are validated, tested and saved: the moving average when the
        training spec keeps one, else the trained weights themselves."""
        return self.net if self.ema is None else self.ema.module

    def _index(self, rows: Sequence[np.ndarray | None]) -> torch.Tensor:
        return torch.as_tensor(np.stack(rows), dtype=torch.long, device=self.device)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        spec = self.train_spec
        kernels = {id(p) for p in self.net.kernel_parameters()}
        # Decoupled weight decay (nanoGPT's habit) applies to kernels only, never to biases or
        # batch-norm scales; the Keras-style L2 penalty is part of the loss instead.
        groups = [
            {"params": [p for p in self.net.parameters() if id(p) in kernels],
             "weight_decay": spec.weight_decay},
            {"params": [p for p in self.net.parameters() if id(p) not in kernels],
             "weight_decay": 0.0},
        ]
        if spec.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=spec.learning_rate, momentum=spec.momentum,
                                   nesterov=spec.momentum > 0)
        adam = torch.optim.AdamW if spec.optimizer == "adamw" else torch.optim.Adam
        # The fused kernel updates all parameters in one pass: same arithmetic, less overhead.
        return adam(groups, lr=spec.learning_rate, betas=(spec.beta1, spec.beta2), eps=spec.eps,
                    fused=True)

    def _make_ema(self, net: StackedNet) -> AveragedModel | None:
        if not self.train_spec.ema:
            return None
        # use_buffers: the batch-norm statistics are averaged too, so the averaged weights are
        # scored with statistics that belong to them.
        return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(self.train_spec.ema),
                             use_buffers=True)

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        spec = self.train_spec
        if spec.schedule != "onecycle":
            return None
        return torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=spec.learning_rate,
            total_steps=spec.epochs * self.steps_per_epoch,
        )

    # ---- one epoch ----------------------------------------------------------------------

    def run_epoch(self) -> dict[str, EpochMetrics]:
        """Train every active member for one epoch and score it; returns metrics by key."""
        start = time.perf_counter()
        spec, data, net = self.train_spec, self.data, self.net
        M = len(self.keys)
        net.train()
        order = self.train_index.gather(1, self.generators.randperm(self.n_train))  # (M, n)
        augmenting = spec.augment != NO_AUGMENT
        loss_sum = torch.zeros(M, device=self.device)
        correct = torch.zeros(M, device=self.device)
        for first, end in self.batches:
            raise_if_stopped()  # a stop a finaliser swallowed
            rows = order[:, first:end]  # (M, b): the last batch may be partial
            x, y = gather(data.x_train, rows), data.y_train[rows]  # (M, b, 28, 28), (M, b)
            if augmenting:
                x = augment(x, spec.augment, self.generators)
            x = as_images(x, self.image_dtype)
            with autocast(self.device, self.precision):
                logits = net(x, self.generators)  # (M, b, 10)
            data_loss = F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="none",
                label_smoothing=spec.label_smoothing,
            ).view(M, -1).mean(1)  # (M,)
            per_member = data_loss.detach() + net.l2_penalty()  # the loss Keras reports
            self.optimizer.zero_grad(set_to_none=True)
            # Members share no parameters: the gradient of the sum w.r.t. member m's weights
            # is the gradient of member m's own loss.
            data_loss.sum().backward()
            net.add_l2_gradient()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(net)
            with torch.no_grad():
                loss_sum += per_member * rows.shape[1]
                correct += (logits.argmax(-1) == y).sum(1)
        self.epoch += 1

        train_loss = (loss_sum / self.n_train).tolist()  # the epoch's one host sync
        train_acc = (correct / self.n_train).tolist()
        if self.val_index is None:
            val_loss = val_acc = [math.nan] * M
        else:
            val_loss, val_acc = self.evaluate(data.x_val, data.y_val, self.val_index)
        seconds = time.perf_counter() - start
        return {
            key: EpochMetrics(train_loss[m], train_acc[m], val_loss[m], val_acc[m], seconds)
            for m, key in enumerate(self.keys)
        }

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor
    ) -> tuple[list[float], list[float]]:
        """Loss (with the L2 penalty, as Keras reports it) and accuracy per member on the rows
        index (M, n) of x and y; no dropout, batch norm in inference mode, the scored weights
        and the model's test-time augmentation."""
        net = self.scored_net
        net.eval()
        M, n = index.shape
        loss_sum = torch.zeros(M, device=self.device)
        correct = torch.zeros(M, device=self.device)
        for first in range(0, n, EVAL_CHUNK):
            rows = index[:, first : first + EVAL_CHUNK]
            with autocast(self.device, self.precision):
                logits = net.infer(as_images(gather(x, rows), self.image_dtype)).float()
            target = y[rows]
            loss_sum += F.cross_entropy(
                logits.flatten(0, 1), target.flatten(), reduction="none"
            ).view(M, -1).sum(1)
            correct += (logits.argmax(-1) == target).sum(1)
        loss = loss_sum / n + net.l2_penalty()
        return loss.tolist(), (correct / n).tolist()

    # ---- members ------------------------------------------------------------------------

    def drop(self, keys: Sequence[str]) -> None:
        """Stop training the given members; the others continue unchanged."""
        keep = [m for m, key in enumerate(self.keys) if key not in set(keys)]
        if not keep:  # the stack is done; nothing left to train
            self.keys, self.members = [], []
        elif len(keep) < len(self.keys):
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        M = len(self.keys)
        index = torch.as_tensor(keep, dtype=torch.long, device=self.device)
        old_params = list(self.net.parameters())
        old_optimizer, old_scheduler, old_ema = self.optimizer, self.scheduler, self.ema
        self.net = self.net.select(keep)
        if old_ema is not None:
            self.ema = self._make_ema(old_ema.module.select(keep))
            self.ema.n_averaged.copy_(old_ema.n_averaged)
        self.generators = self.generators.select(keep)
        self.train_index = self.train_index[index]
        self.val_index = None if self.val_index is None else self.val_index[index]
        self.keys = [self.keys[m] for m in keep]
        self.members = [self.members[m] for m in keep]
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        for new_group, old_group in zip(self.optimizer.param_groups, old_optimizer.param_groups):
            new_group.update({k: v for k, v in old_group.items() if k != "params"})
        for old, new in zip(old_params, self.net.parameters(), strict=True):
            state = old_optimizer.state.get(old)
            if state:
                self.optimizer.state[new] = {
                    k: select_members(v, index, M) if torch.is_tensor(v) and v.dim() else v
                    for k, v in state.items()
                }
        if old_scheduler is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(old_scheduler.state_dict())

    def member_state_dict(self, key: str) -> dict[str, torch.Tensor]:
        """A member's scored weights, keyed like `build_module(spec).state_dict()`."""
        return self.scored_net.member_state_dict(self.keys.index(key))

    def load_member_state_dict(self, key: str, state: dict[str, torch.Tensor]) -> None:
        """Set a member's scored weights (early stopping's restore of its best epoch)."""
        self.scored_net.load_member_state_dict(self.keys.index(key), state)

    # ---- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically: weights, optimiser, RNG, epoch."""
        return {
            "epoch": self.epoch,
            "keys": list(self.keys),
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generators": self.generators.get_state(),
            "ema": None if self.ema is None else self.ema.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["keys"] != self.keys:
            missing = set(state["keys"]) - set(self.keys)
            if missing:
                raise ValueError(f"checkpoint has members this stack lacks: {sorted(missing)}")
            self._select([self.keys.index(k) for k in state["keys"]])
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generators.set_state(state["generators"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.epoch = state["epoch"]


def batch_bounds(n: int, batch_size: int, *, at_least: int = 1) -> list[tuple[int, int]]:
    """(first, end) of each batch of an epoch of n samples: batch_size each, the last one what
    is left; a last batch smaller than `at_least` joins the one before it."""
    bounds = [(first, min(first + batch_size, n)) for first in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < at_least:
        (first, _), _ = bounds[-2], bounds.pop()
        bounds[-1] = (first, n)
    return bounds


def augment(x: torch.Tensor, spec: Augment, generators: MemberGenerators) -> torch.Tensor:
    """Random crops (pad by `spec.crop`, then a random 28x28 window), horizontal flips and
    erased rectangles, drawn per member and per image: x (M, b, 28, 28) -> (M, b, 28, 28).
    What is off draws nothing, so adding an augmentation never moves the others' draws."""
    M, b, h, w = x.shape
    if spec.crop:
        crop = spec.crop
        padded = F.pad(x, (crop, crop, crop, crop))
        offsets = (generators.rand(b, 2) * (2 * crop + 1)).long()  # (M, b, 2)
        rows = offsets[..., 0, None] + torch.arange(h, device=x.device)  # (M, b, h)
        cols = offsets[..., 1, None] + torch.arange(w, device=x.device)  # (M, b, w)
        m_idx = torch.arange(M, device=x.device).view(M, 1, 1, 1)
        b_idx = torch.arange(b, device=x.device).view(1, b, 1, 1)
        x = padded[m_idx, b_idx, rows[..., :, None], cols[..., None, :]]
    if spec.flip:
        flips = generators.rand(b) < 0.5  # (M, b)
        x = torch.where(flips[..., None, None], x.flip(-1), x)
    if spec.erase:
        x = x.masked_fill(erased_rectangles(generators.rand(b, 5), spec.erase, h, w), 0)
    return x


# Random erasing's rectangles, torchvision's RandomErasing defaults: 2-33% of the image's area,
# aspect ratio (height / width) 0.3-3.3 drawn uniformly on a log scale.
ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 10 / 3)


def erased_rectangles(u: torch.Tensor, probability: float, h: int, w: int) -> torch.Tensor:
    """The pixels random erasing sets to 0, (..., h, w) bool, from uniform draws u (..., 5):
    whether the image is erased, the rectangle's area, aspect ratio and position. A rectangle
    taller or wider than the image is cut to it (torchvision draws again, up to 10 times;
    cutting keeps one draw per image, so batches stay vectorised)."""
    area = (ERASE_AREA[0] + u[..., 1] * (ERASE_AREA[1] - ERASE_AREA[0])) * (h * w)
    log_low, log_high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    ratio = torch.exp(log_low + u[..., 2] * (log_high - log_low))
    height = torch.sqrt(area * ratio).round().clamp(1, h)
    width = torch.sqrt(area / ratio).round().clamp(1, w)
    top = (u[..., 3] * (h - height + 1)).floor()  # uniform over the positions that fit
    left = (u[..., 4] * (w - width + 1)).floor()
    rows = torch.arange(h, device=u.device, dtype=u.dtype)
    cols = torch.arange(w, device=u.device, dtype=u.dtype)
    in_rows = (rows >= top[..., None]) & (rows < (top + height)[..., None])  # (..., h)
    in_cols = (cols >= left[..., None]) & (cols < (left + width)[..., None])  # (..., w)
    erased = (u[..., 0] < probability)[..., None, None]
    return erased & in_rows[..., :, None] & in_cols[..., None, :]
