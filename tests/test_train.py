"""The stack trainer: it learns, it is reproducible, stacking changes nothing, checkpoints
continue bit-identically, and a diverging member stops alone."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fashionlab.config import Augment, ConvLayer, DenseLayer, EarlyStopping, ModelSpec, TrainSpec
from fashionlab.cv import train_members
from fashionlab.data import load_fashion_mnist, to_tensors
from fashionlab.models import normalises_a_single_pixel
from fashionlab.train import Member, StackTrainer, Tensors, as_images, batch_bounds

CPU = torch.device("cpu")
DENSE = ModelSpec(layers=(DenseLayer(24, l2=0.001, dropout=0.2),))
CONV = ModelSpec(conv=(ConvLayer(4, pool=2, batch_norm=True),), dropout=0.2,
                 layers=(DenseLayer(16),))
TRAIN = TrainSpec(epochs=4, batch_size=32, precision="fp32")  # exact comparisons


@pytest.fixture
def tiny(tiny_idx_dir: Path) -> Tensors:
    dataset = load_fashion_mnist(tiny_idx_dir, verify=False)
    x, y = to_tensors(dataset.train)
    x_test, y_test = to_tensors(dataset.test)
    return Tensors(x, y, x_test, y_test)


def _members(spec: ModelSpec, seeds: list[int], n: int = 300) -> list[Member]:
    # Three "folds": each member validates on its own third of the training set.
    out = []
    for i, seed in enumerate(seeds):
        val = np.arange(i % 3 * 100, i % 3 * 100 + 100)
        out.append(Member(f"m{seed}", spec, np.setdiff1d(np.arange(n), val), val, seed))
    return out


def _cv_data(t: Tensors) -> Tensors:
    return Tensors(t.x_train, t.y_train, t.x_train, t.y_train)


def test_an_epochs_batches_cover_every_sample_once():
    assert batch_bounds(100, 32) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert batch_bounds(97, 32) == [(0, 32), (32, 64), (64, 96), (96, 97)]
    assert batch_bounds(97, 32, at_least=2) == [(0, 32), (32, 64), (64, 97)]  # 33 in the last
    assert batch_bounds(98, 32, at_least=2) == [(0, 32), (32, 64), (64, 96), (96, 98)]
    assert batch_bounds(1, 32, at_least=2) == [(0, 1)]  # nothing to join


def test_batch_norm_of_a_single_pixel_never_gets_a_batch_of_one_image(tiny: Tensors):
    """A batch norm over a 1x1 map has only the batch's images to take statistics from: a last
    batch of one image (201 = 2 x 100 + 1) joins the batch before it instead of failing."""
    spec = ModelSpec(conv=(ConvLayer(4, pool=2), ConvLayer(4, pool=2),
                           ConvLayer(4, batch_norm=True, pool=2, norm_after_pool=True)),
                     layers=(DenseLayer(8),))  # 28 -> 26 -> 13 -> 11 -> 5 -> 3 -> 1
    assert normalises_a_single_pixel(spec)
    assert not normalises_a_single_pixel(CONV)
    member = Member("m", spec, np.arange(201), np.arange(201, 251), 0)
    trainer = StackTrainer([member], dataclasses.replace(TRAIN, batch_size=100),
                           _cv_data(tiny), CPU)
    assert trainer.batches == [(0, 100), (100, 201)]
    metrics = trainer.run_epoch()["m"]
    assert math.isfinite(metrics.loss)
    plain = StackTrainer([Member("m", CONV, np.arange(201), np.arange(201, 251), 0)],
                         dataclasses.replace(TRAIN, batch_size=100), _cv_data(tiny), CPU)
    assert plain.batches == [(0, 100), (100, 200), (200, 201)]  # as before elsewhere


def test_pixels_convert_to_the_images_to_tensors_gives(tiny_idx_dir: Path):
    split = load_fashion_mnist(tiny_idx_dir, verify=False).train
    pixels, _ = to_tensors(split, dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        images = as_images(pixels, dtype)
        assert images.dtype == dtype and torch.equal(images, to_tensors(split, dtype=dtype)[0])
    # Column-major arrays (scipy.io.loadmat's) give row-major pixels: batches are flat views.
    fortran = dataclasses.replace(split, images=np.asfortranarray(split.images))
    assert torch.equal(to_tensors(fortran, dtype=torch.uint8)[0], pixels)
    assert to_tensors(fortran, dtype=torch.uint8)[0].is_contiguous()
    with pytest.raises(TypeError, match="uint8 pixels or floats"):
        as_images(pixels.long(), torch.float32)


def test_float_training_images_and_validation_pixels_are_each_converted(tiny: Tensors,
                                                                         tiny_idx_dir: Path):
    pixels, _ = to_tensors(load_fashion_mnist(tiny_idx_dir, verify=False).test,
                           dtype=torch.uint8)
    mixed = Tensors(tiny.x_train, tiny.y_train, pixels, tiny.y_val)
    histories = [_histories(StackTrainer(_members(DENSE, [1]), TRAIN, data, CPU), 2)
                 for data in (tiny, mixed)]
    assert histories[0] == histories[1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("spec", [DENSE, CONV], ids=["dense", "conv"])
def test_a_stack_trains_on_pixels_as_on_float_images(tiny_idx_dir: Path, precision: str,
                                                     spec: ModelSpec):
    # The study holds uint8 pixels (a quarter of the bytes) and converts each batch: the
    # numbers must be those of float images, augmentation included, to the bit.
    dataset = load_fashion_mnist(tiny_idx_dir, verify=False)
    train = dataclasses.replace(TRAIN, epochs=2, precision=precision,
                                augment=Augment(crop=1, flip=True))
    histories = []
    for dtype in (None, torch.uint8):
        (x, y), (x_test, y_test) = (to_tensors(s, dtype=dtype)
                                    for s in (dataset.train, dataset.test))
        seeds = [1] if spec.conv else [1, 2]  # a CNN trains alone
        trainer = StackTrainer(_members(spec, seeds), train, Tensors(x, y, x, y), CPU)
        histories.append(_histories(trainer, 2))
        test = trainer.evaluate(x_test, y_test, torch.arange(len(x_test)).expand(len(seeds), -1))
        histories.append(test)
    assert histories[0] == histories[2] and histories[1] == histories[3]


def _histories(trainer: StackTrainer, epochs: int) -> dict[str, list[tuple[float, ...]]]:
    out: dict[str, list[tuple[float, ...]]] = {k: [] for k in trainer.keys}
    for _ in range(epochs):
        for key, m in trainer.run_epoch().items():
            out[key].append((m.loss, m.accuracy, m.val_loss, m.val_accuracy))
    return out


@pytest.mark.parametrize("spec", [DENSE, CONV], ids=["dense", "conv"])
def test_a_model_learns_an_easy_problem(tiny: Tensors, spec: ModelSpec):
    member = Member("m", spec, np.arange(300), np.arange(100), seed=0)
    trainer = StackTrainer([member], dataclasses.replace(TRAIN, learning_rate=3e-3), tiny, CPU)
    history = [trainer.run_epoch()["m"] for _ in range(8)]
    assert history[-1].val_accuracy >= 0.9
    assert history[-1].loss < history[0].loss


def test_same_seed_gives_identical_histories(tiny: Tensors):
    runs = [_histories(StackTrainer(_members(DENSE, [1, 2]), TRAIN, _cv_data(tiny), CPU), 3)
            for _ in range(2)]
    assert runs[0] == runs[1]
    other = _histories(StackTrainer(_members(DENSE, [1, 3]), TRAIN, _cv_data(tiny), CPU), 3)
    assert other["m1"] == runs[0]["m1"] and other["m3"] != runs[0]["m2"]


@pytest.mark.parametrize(("precision", "atol"), [("fp32", 2e-5), ("bf16", 3e-2)])
def test_stacked_training_equals_training_one_at_a_time(tiny: Tensors, precision: str,
                                                        atol: float):
    # fp32: equal up to float rounding. bf16 rounds each product to 8 bits, so kernels that
    # block the stacked and the single product differently drift apart by more.
    train = dataclasses.replace(TRAIN, precision=precision)
    seeds, spec = [4, 5, 6], DENSE
    stacked = _histories(StackTrainer(_members(spec, seeds), train, _cv_data(tiny), CPU), 4)
    for member in _members(spec, seeds):
        alone = _histories(StackTrainer([member], train, _cv_data(tiny), CPU), 4)[member.key]
        np.testing.assert_allclose(stacked[member.key], alone, rtol=10 * atol, atol=atol)


def test_erasing_trains_each_member_as_it_would_alone(tiny: Tensors):
    """Each member erases its own images, from its own generator: a stack trained with
    random erasing equals its members trained alone, and erasing changes what they learn."""
    train = dataclasses.replace(TRAIN, augment=Augment(crop=1, flip=True, erase=0.5))
    stacked = _histories(StackTrainer(_members(DENSE, [4, 5]), train, _cv_data(tiny), CPU), 2)
    for member in _members(DENSE, [4, 5]):
        alone = _histories(StackTrainer([member], train, _cv_data(tiny), CPU), 2)[member.key]
        np.testing.assert_allclose(stacked[member.key], alone, rtol=2e-4, atol=2e-5)
    plain = dataclasses.replace(train, augment=Augment(crop=1, flip=True))
    unerased = _histories(StackTrainer(_members(DENSE, [4, 5]), plain, _cv_data(tiny), CPU), 2)
    assert unerased["m4"] != stacked["m4"]


def test_stacks_of_different_regularisation_match_their_members_alone(tiny: Tensors):
    variants = [ModelSpec(layers=(DenseLayer(24, l2=l2, dropout=p),))
                for l2, p in ((0.0, 0.0), (0.01, 0.0), (0.0, 0.4))]
    members = [Member(f"v{i}", spec, np.arange(200), np.arange(200, 300), seed=9)
               for i, spec in enumerate(variants)]
    stacked = _histories(StackTrainer(members, TRAIN, _cv_data(tiny), CPU), 3)
    for member in members:
        alone = _histories(StackTrainer([member], TRAIN, _cv_data(tiny), CPU), 3)[member.key]
        np.testing.assert_allclose(stacked[member.key], alone, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("ema", [0.0, 0.9], ids=["plain", "ema"])
def test_dropping_a_member_leaves_the_others_unchanged(tiny: Tensors, ema: float):
    spec = dataclasses.replace(TRAIN, optimizer="adamw", weight_decay=0.01, schedule="onecycle",
                               ema=ema)
    full = _histories(StackTrainer(_members(DENSE, [1, 2, 3]), spec, _cv_data(tiny), CPU), 4)
    trainer = StackTrainer(_members(DENSE, [1, 2, 3]), spec, _cv_data(tiny), CPU)
    first = _histories(trainer, 2)
    trainer.drop(["m2"])
    rest = _histories(trainer, 2)
    for key in ("m1", "m3"):
        assert first[key] + rest[key] == full[key]


@pytest.mark.parametrize(("optimizer", "model", "seeds", "ema"),
                         [("adam", CONV, [1], 0.0), ("sgd", CONV, [2], 0.0),
                          ("adam", DENSE, [1, 2], 0.0), ("adam", CONV, [1], 0.9)],
                         ids=["conv-adam", "conv-sgd", "dense-adam", "conv-ema"])
def test_checkpoint_continues_bit_identically(tiny: Tensors, optimizer: str, model: ModelSpec,
                                              seeds: list[int], ema: float):
    spec = dataclasses.replace(TRAIN, optimizer=optimizer, schedule="onecycle", ema=ema,
                               augment=Augment(crop=2, flip=True), learning_rate=0.01)
    reference = _histories(StackTrainer(_members(model, seeds), spec, _cv_data(tiny), CPU), 4)
    trainer = StackTrainer(_members(model, seeds), spec, _cv_data(tiny), CPU)
    first = _histories(trainer, 2)
    saved = io.BytesIO()
    torch.save(trainer.state_dict(), saved)  # as a checkpoint file would hold it
    trainer.run_epoch()  # moves on; the restored copy must not see this
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = StackTrainer(_members(model, seeds), spec, _cv_data(tiny), CPU)
    resumed.load_state_dict(state)
    rest = _histories(resumed, 2)
    for key in reference:
        assert first[key] + rest[key] == reference[key]


def test_a_diverging_member_stops_with_a_message_and_the_others_finish(tiny: Tensors):
    good = Member("good", DENSE, np.arange(200), np.arange(200, 300), seed=1)
    bad = Member("bad", ModelSpec(layers=(DenseLayer(24, l2=1e38),)), np.arange(200),
                 np.arange(200, 300), seed=2)
    results = train_members([good, bad], TRAIN, _cv_data(tiny), CPU)
    assert results["bad"].status == "failed"
    assert "diverged" in results["bad"].message and "epoch 1" in results["bad"].message
    assert results["good"].status == "finished" and len(results["good"].history) == 4
    assert math.isfinite(results["good"].history[-1].val_loss)


def test_early_stopping_restores_the_best_weights(tiny: Tensors):
    # Improvements under 0.05 do not count, so training stops once the curve flattens.
    spec = dataclasses.replace(TRAIN, epochs=40, learning_rate=0.01,
                               early_stopping=EarlyStopping(patience=2, min_delta=0.05))
    member = Member("m", DENSE, np.arange(200), np.arange(200, 300), seed=1)
    result = train_members([member], spec, _cv_data(tiny), CPU, keep_weights=True)["m"]
    assert result.status == "stopped" and len(result.history) < 40
    assert len(result.history) == result.best_epoch + 2  # patience 2 after the best
    best = result.history[result.best_epoch - 1].val_loss
    assert all(m.val_loss > best - 0.05 for m in result.history[result.best_epoch:])
    scorer = StackTrainer([member], spec, _cv_data(tiny), CPU)
    scorer.load_member_state_dict("m", result.weights)
    loss, _ = scorer.evaluate(tiny.x_train, tiny.y_train, torch.arange(200, 300).unsqueeze(0))
    assert loss[0] == pytest.approx(best, rel=1e-5)  # the best epoch's weights, not the last
    assert loss[0] != pytest.approx(result.history[-1].val_loss, rel=1e-5)


def test_train_members_resumes_from_its_checkpoint(tiny: Tensors, tmp_path: Path):
    spec = dataclasses.replace(TRAIN, epochs=5,
                               early_stopping=EarlyStopping(patience=2, restore_best=True))
    reference = train_members(_members(DENSE, [1, 2]), spec, _cv_data(tiny), CPU)

    class Interrupt(Exception):
        pass

    def stop_at_3(epoch: int, metrics: dict, results: dict) -> None:
        if epoch == 3:
            raise Interrupt

    checkpoint = tmp_path / "stack.pt"
    with pytest.raises(Interrupt):
        train_members(_members(DENSE, [1, 2]), spec, _cv_data(tiny), CPU,
                      checkpoint=checkpoint, on_epoch=stop_at_3)
    resumed = train_members(_members(DENSE, [1, 2]), spec, _cv_data(tiny), CPU,
                            checkpoint=checkpoint)
    for key, result in reference.items():
        assert resumed[key].history == [dataclasses.replace(m, seconds=r.seconds)
                                        for m, r in zip(result.history, resumed[key].history)]
        assert (resumed[key].status, resumed[key].best_epoch) == (result.status,
                                                                  result.best_epoch)


def test_augmentation_keeps_shapes_and_moves_pixels():
    from fashionlab.rng import MemberGenerators
    from fashionlab.train import augment

    x = torch.zeros(2, 5, 28, 28)
    x[:, :, 10:18, 4:8] = 1.0
    out = augment(x, Augment(crop=3, flip=True), MemberGenerators([0, 1], CPU))
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # A crop shifts the item by at most 3 pixels and never invents brightness.
    assert out.sum() <= x.sum() and out.max() == 1.0


def test_erasing_off_draws_nothing_so_crops_and_flips_stay_as_they_were():
    from fashionlab.rng import MemberGenerators
    from fashionlab.train import augment

    x = torch.rand(2, 6, 28, 28)
    before = augment(x, Augment(crop=2, flip=True), MemberGenerators([3, 4], CPU))
    off = augment(x, Augment(crop=2, flip=True, erase=0.0), MemberGenerators([3, 4], CPU))
    assert torch.equal(before, off)
    # Erasing comes last: with it, the crops and flips are the same and only rectangles differ.
    on = augment(x, Augment(crop=2, flip=True, erase=1.0), MemberGenerators([3, 4], CPU))
    changed = on != before
    assert changed.any() and (on[changed] == 0).all()


def test_erased_rectangles_have_the_drawn_area_ratio_and_position():
    from fashionlab.train import ERASE_AREA, ERASE_RATIO, erased_rectangles

    u = torch.rand(4000, 5, generator=torch.Generator().manual_seed(0))
    u[:, 0] = 0.0  # every image erased
    mask = erased_rectangles(u, 1.0, 28, 28)
    rows, cols = mask.any(2), mask.any(1)  # (n, 28) each
    heights, widths = rows.sum(1), cols.sum(1)
    # One solid rectangle per image: its pixels are exactly its rows times its columns.
    assert torch.equal(mask.sum((1, 2)), heights * widths)
    assert all(r.nonzero().diff(dim=0).eq(1).all() for r in rows[:50])
    area = (heights * widths).float() / 784
    assert area.min() >= ERASE_AREA[0] * 0.5 and area.max() <= ERASE_AREA[1] * 1.25
    # Each draw maps to its rectangle: the area and ratio follow u, rounded to whole pixels.
    expected_area = (ERASE_AREA[0] + u[:, 1] * (ERASE_AREA[1] - ERASE_AREA[0])) * 784
    uncut = (heights < 28) & (widths < 28)
    assert torch.allclose((heights * widths).float()[uncut], expected_area[uncut], rtol=0.35)
    tall = heights.float() / widths
    assert tall.min() >= ERASE_RATIO[0] / 2.5 and tall.max() <= ERASE_RATIO[1] * 2.5
    # Every position is used: rectangles touch each edge somewhere.
    assert rows[:, 0].any() and rows[:, -1].any() and cols[:, 0].any() and cols[:, -1].any()


def test_erasing_probability_is_the_share_of_images_erased():
    from fashionlab.rng import MemberGenerators
    from fashionlab.train import augment

    x = torch.ones(2, 5000, 28, 28)
    out = augment(x, Augment(erase=0.3), MemberGenerators([0, 1], CPU))
    share = (out == 0).any(-1).any(-1).float().mean(1)  # per member
    assert torch.allclose(share, torch.tensor([0.3, 0.3]), atol=0.03)
    # The members draw their own rectangles.
    assert not torch.equal(out[0], out[1])


def _parameters(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("model", [DENSE, CONV], ids=["dense", "conv"])
def test_ema_weights_follow_the_formula(tiny: Tensors, model: ModelSpec):
    """After every step w_avg <- d * w_avg + (1 - d) * w, starting from the first step's w;
    the averaged weights are the ones scored and saved."""
    decay = 0.8
    seeds = [1, 2] if model is DENSE else [1]
    trainer = StackTrainer(_members(model, seeds), dataclasses.replace(TRAIN, ema=decay),
                           _cv_data(tiny), CPU)
    expected: list[torch.Tensor] = []

    def average(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        weights = _parameters(trainer.net)
        if not expected:
            expected.extend(weights)
        else:
            for avg, w in zip(expected, weights):
                avg.mul_(decay).add_(w, alpha=1 - decay)

    trainer.optimizer.register_step_post_hook(average)
    trainer.run_epoch()
    assert trainer.ema is not None and trainer.scored_net is trainer.ema.module
    for got, want in zip(_parameters(trainer.ema.module), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(expected, _parameters(trainer.net)))
    key = trainer.keys[0]
    saved = trainer.member_state_dict(key)
    assert torch.equal(next(iter(saved.values())),
                       next(iter(trainer.ema.module.member_state_dict(0).values())))
