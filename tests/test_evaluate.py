"""Model evaluation: batched inference against a plain per-image loop, per-class scores by hand,
a model that classifies the tiny dataset perfectly, saved models, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fashionlab.artifacts import load_model, save_model
from fashionlab.config import DenseLayer, ModelSpec
from fashionlab.data import CLASS_NAMES, Split, load_fashion_mnist
from fashionlab.errors import DataError
from fashionlab.evaluate import Evaluation, evaluate
from fashionlab.models import build_module


def _random_split(n: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
                 rng.integers(0, 10, size=n).astype(np.uint8))


def _dense_module() -> nn.Module:
    torch.manual_seed(1)
    return build_module(ModelSpec(layers=(DenseLayer(units=12, dropout=0.5),)))


def test_batched_evaluation_matches_a_plain_loop():
    module, split = _dense_module(), _random_split(53)
    result = evaluate(module, split, CLASS_NAMES, batch_size=7)

    module.eval()
    losses, predicted, confusion = [], [], np.zeros((10, 10), dtype=np.int64)
    with torch.no_grad():
        for image, label in zip(split.images, split.labels):
            x = torch.tensor(image, dtype=torch.float32).view(1, 1, 28, 28) / 255
            logits = module(x)
            losses.append(F.cross_entropy(logits, torch.tensor([int(label)])).item())
            predicted.append(int(logits.argmax()))
            confusion[int(label), predicted[-1]] += 1
    assert result.n == 53
    assert result.loss == pytest.approx(np.mean(losses), rel=1e-5)
    assert result.accuracy == pytest.approx(np.mean(np.array(predicted) == split.labels))
    assert np.array_equal(result.predictions, predicted)
    assert np.array_equal(result.confusion, confusion)
    assert result.confusion.sum() == 53
    # Dropout is off in inference, so one batch gives the same numbers as many.
    whole = evaluate(module, split, CLASS_NAMES, batch_size=1000)
    assert np.array_equal(whole.predictions, result.predictions)
    assert np.allclose(whole.confidence, result.confidence)


def test_a_model_that_knows_the_squares_is_perfect_on_the_tiny_data(tiny_idx_dir: Path):
    # Class c is a bright 7x7 square in cell c of a 3x4 grid: a linear layer summing each
    # cell classifies every image.
    kernel = torch.zeros(10, 28, 28)
    for c in range(10):
        top, left = 7 * (c // 4), 7 * (c % 4)
        kernel[c, top:top + 7, left:left + 7] = 1.0
    linear = nn.Linear(784, 10)
    with torch.no_grad():
        linear.weight.copy_(kernel.view(10, 784))
        linear.bias.zero_()
    module = nn.Sequential(nn.Flatten(), linear)

    test = load_fashion_mnist(tiny_idx_dir, verify=False).test
    result = evaluate(module, test, CLASS_NAMES)
    assert result.accuracy == 1.0
    assert np.array_equal(result.confusion, np.diag(np.bincount(test.labels, minlength=10)))
    assert np.allclose(result.precision, 1) and np.allclose(result.recall, 1)
    assert np.allclose(result.f1, 1) and len(result.misclassified()) == 0


def test_per_class_scores_from_the_confusion_matrix():
    # true:      0 0 0 1 1 2    (class 3 absent; class 2 never predicted)
    # predicted: 0 0 1 1 0 1
    labels = np.array([0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 1, 1, 0, 1])
    confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    result = Evaluation(("a", "b", "c", "d"), 6, 0.5, 1.0, confusion, labels, predictions,
                        np.array([0.9, 0.8, 0.99, 0.7, 0.6, 0.95], dtype=np.float32))

    assert np.allclose(result.recall[:3], [2 / 3, 1 / 2, 0])
    assert np.allclose(result.precision[:2], [2 / 3, 1 / 3])
    assert math.isnan(result.precision[2]) and math.isnan(result.precision[3])
    assert math.isnan(result.recall[3])
    assert np.array_equal(result.per_class_accuracy[:3], result.recall[:3])
    assert result.f1[0] == pytest.approx(2 / 3)
    assert result.f1[1] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert math.isnan(result.f1[2]) and math.isnan(result.f1[3])
    assert result.support.tolist() == [3, 2, 1, 0]
    # The mistakes, the most confident first: index 2 (0.99), 5 (0.95), 4 (0.6).
    assert result.misclassified().tolist() == [2, 5, 4]
    assert result.misclassified(limit=2).tolist() == [2, 5]
    data = result.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["per_class"]["precision"][2] is None


def test_a_saved_model_brings_its_class_names(tmp_path: Path):
    module = _dense_module()
    spec = ModelSpec(layers=(DenseLayer(units=12, dropout=0.5),))
    names = tuple(f"class {i}" for i in range(10))
    save_model(tmp_path / "model", spec=spec, state=module.state_dict(), class_names=names,
               metadata={})
    saved = load_model(tmp_path / "model")
    split = _random_split(20, seed=3)

    result = evaluate(saved, split)
    assert result.class_names == names
    by_path = evaluate(tmp_path / "model", split)  # its directory will do
    assert np.array_equal(by_path.predictions, result.predictions)
    assert np.array_equal(result.predictions, evaluate(module, split, names).predictions)
    assert ((result.confidence > 0) & (result.confidence <= 1)).all()


def test_the_training_flag_is_restored():
    module = _dense_module().train()
    evaluate(module, _random_split(5), CLASS_NAMES)
    assert module.training


def test_bad_input():
    module = _dense_module()
    bad = Split(np.zeros((2, 28, 28), np.uint8), np.array([0, 12], np.uint8))
    with pytest.raises(DataError, match="labels go up to 12"):
        evaluate(module, bad, CLASS_NAMES)
    with pytest.raises(DataError, match="10 outputs but 3 class names"):
        evaluate(module, Split(bad.images, np.array([0, 1], np.uint8)), ("a", "b", "c"))
    with pytest.raises(ValueError, match="class_names"):
        evaluate(module, _random_split(2))
    with pytest.raises(DataError, match="split: expected a Split .dataset.test, say., got "
                                        "ndarray"):
        evaluate(module, bad.images, CLASS_NAMES)


def test_the_study_and_evaluate_score_a_tta_model_alike(tmp_path: Path):
    """A model with flip test-time augmentation: the test score a study records (the trainer's
    `evaluate`) and `fashionlab evaluate` on the saved model are the same number, and both
    differ from the plain network's."""
    from fashionlab.config import TrainSpec
    from fashionlab.data import to_tensors
    from fashionlab.train import Member, StackTrainer, Tensors

    spec = ModelSpec(layers=(DenseLayer(units=12),), tta="flip")
    split = _random_split(64, seed=3)
    x, y = to_tensors(split)
    member = Member("m", spec, np.arange(1), None, 0)
    trainer = StackTrainer([member], TrainSpec(precision="fp32"), Tensors(x, y, x, y),
                           torch.device("cpu"))
    loss, accuracy = trainer.evaluate(x, y, torch.arange(64).unsqueeze(0))
    saved = load_model(save_model(tmp_path / "m", spec=spec, state=trainer.member_state_dict("m"),
                                  class_names=CLASS_NAMES, metadata={}))
    result = evaluate(saved, split, CLASS_NAMES)
    assert result.loss == pytest.approx(loss[0], rel=1e-5)
    assert result.accuracy == pytest.approx(accuracy[0])
    plain = evaluate(saved.module.net, split, CLASS_NAMES)
    assert plain.loss != pytest.approx(result.loss, rel=1e-5)
