"""Stacked networks against plain PyTorch layers, the L2 penalty, dropout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from fashionlab.config import ConvLayer, DenseLayer, ModelSpec
from fashionlab.models import (
    StackedNet,
    build_module,
    conv_output_size,
    flat_features,
    forward_flops,
    inference_module,
)
from fashionlab.rng import MemberGenerators

DENSE = ModelSpec(layers=(DenseLayer(32, l2=0.01, dropout=0.3), DenseLayer(16)))
CONV = ModelSpec(conv=(ConvLayer(4, pool=2, batch_norm=True), ConvLayer(6, kernel=3, l2=0.02),
                       ConvLayer(5, padding="same", pool=2)),
                 dropout=0.25, layers=(DenseLayer(12, l2=0.001),))


def _stack(spec: ModelSpec, n: int, seeds: list[int] | None = None) -> StackedNet:
    generators = MemberGenerators(seeds or list(range(n)), torch.device("cpu"))
    return StackedNet([spec] * n, generators)


# Batch norm on the pooled maps: another layer order, in training and in the plain module.
NORM_AFTER_POOL = ModelSpec(conv=(ConvLayer(4, pool=2, batch_norm=True, norm_after_pool=True),
                                  ConvLayer(6, batch_norm=True),
                                  ConvLayer(5, padding="same", pool=2, batch_norm=True,
                                            norm_after_pool=True)),
                            dropout=0.25, layers=(DenseLayer(12),))


# Residual layers: one with batch norm and a global max-pool, one without either.
RESIDUAL = ModelSpec(conv=(ConvLayer(4, padding="same", pool=2, batch_norm=True,
                                     norm_after_pool=True),
                           ConvLayer(4, padding="same", batch_norm=True, residual=True),
                           ConvLayer(6, padding="same", pool=2),
                           ConvLayer(6, padding="same", residual=True, pool=7)),
                     layers=(DenseLayer(12),))


@pytest.mark.parametrize(("spec", "n"), [(DENSE, 3), (CONV, 1), (NORM_AFTER_POOL, 1),
                                         (RESIDUAL, 1)],
                         ids=["dense", "conv", "norm-after-pool", "residual"])
def test_each_member_computes_what_the_plain_module_computes(spec: ModelSpec, n: int):
    stack = _stack(spec, n).eval()
    x = torch.rand(n, 7, 28, 28)  # (M, B, 28, 28): each member its own batch
    out = stack(x)
    assert out.shape == (n, 7, 10)
    for m in range(n):
        plain = build_module(spec).eval()
        plain.load_state_dict(stack.member_state_dict(m))
        torch.testing.assert_close(out[m], plain(x[m].unsqueeze(1)), rtol=1e-5, atol=1e-5)


def test_batch_norm_after_pooling_is_applied_after_it_in_training_and_in_the_plain_module():
    """With a negative scale batch norm does not commute with max-pooling: where it is shows."""
    stack = _stack(NORM_AFTER_POOL, 1)
    with torch.no_grad():
        for norm in stack.norms:
            norm.weight.uniform_(-2, 2)
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    stack.eval()
    x = torch.rand(1, 7, 28, 28)
    plain = build_module(NORM_AFTER_POOL).eval()
    plain.load_state_dict(stack.member_state_dict(0))
    torch.testing.assert_close(stack(x)[0], plain(x[0].unsqueeze(1)), rtol=1e-5, atol=1e-5)
    assert isinstance(plain[1], nn.MaxPool2d) and isinstance(plain[2], nn.BatchNorm2d)
    before = dataclasses.replace(NORM_AFTER_POOL, conv=tuple(
        dataclasses.replace(layer, norm_after_pool=False) for layer in NORM_AFTER_POOL.conv))
    other = _stack(before, 1)
    other.load_state_dict(stack.state_dict())  # the same weights, the usual order
    assert not torch.allclose(other.eval()(x), stack(x), atol=1e-3)


def test_a_residual_layer_adds_its_input_to_its_activation_then_pools():
    stack = _stack(RESIDUAL, 1)
    with torch.no_grad():
        for norm in stack.norms[:2]:
            norm.weight.uniform_(-2, 2)
            norm.bias.uniform_(-1, 1)
    stack.eval()
    x = torch.rand(1, 5, 28, 28)
    plain = build_module(RESIDUAL).eval()
    plain.load_state_dict(stack.member_state_dict(0))
    h = plain[3](plain[2](plain[1](plain[0](x[0].unsqueeze(1)))))  # 4 x 14 x 14 into conv[1]
    conv, norm = stack.conv_weights[1], stack.norms[1]
    expected = h + F.relu(norm(F.conv2d(h, conv, padding=1)))
    torch.testing.assert_close(plain[4](h), expected, rtol=1e-5, atol=1e-5)
    assert conv_output_size(RESIDUAL) == (6, 1)  # the last layer's pool: a global max
    assert flat_features(RESIDUAL) == 6
    # Without its input added, the network computes something else.
    other = _stack(dataclasses.replace(RESIDUAL, conv=tuple(
        dataclasses.replace(layer, residual=False) for layer in RESIDUAL.conv)), 1)
    other.load_state_dict(stack.state_dict())
    assert not torch.allclose(other.eval()(x), stack(x), atol=1e-3)


def test_pytorch_init_scales_the_same_draws_to_pytorchs_limits():
    """Kernels uniform in +-sqrt(1 / fan_in), as torch's own layers start, from the draws that
    Keras' Glorot limits scale otherwise; biases start at 0 either way."""
    glorot = _stack(RESIDUAL, 1)
    torch_like = _stack(dataclasses.replace(RESIDUAL, init="pytorch"), 1)
    fans = [(1 * 9, 4 * 9), (4 * 9, 4 * 9), (4 * 9, 6 * 9), (6 * 9, 6 * 9), (6, 12), (12, 10)]
    kernels = list(zip([*glorot.conv_weights, *glorot.dense_weights],
                       [*torch_like.conv_weights, *torch_like.dense_weights]))
    assert len(kernels) == len(fans)
    for (keras_kernel, kernel), (fan_in, fan_out) in zip(kernels, fans):
        limit = (1 / fan_in) ** 0.5
        assert kernel.abs().max() <= limit and kernel.abs().max() > 0.8 * limit
        torch.testing.assert_close(kernel, keras_kernel * limit / (6 / (fan_in + fan_out)) ** 0.5)
    assert all(not b.any() for b in [*torch_like.conv_biases, *torch_like.dense_biases])


def test_members_do_not_depend_on_their_stack_mates():
    # Member with seed 5 gets the same initial weights alone and in a stack.
    alone = _stack(DENSE, 1, [5]).member_state_dict(0)
    stacked = _stack(DENSE, 3, [1, 5, 9]).member_state_dict(1)
    for key in alone:
        assert torch.equal(alone[key], stacked[key]), key


def test_glorot_uniform_limits_and_zero_biases():
    state = _stack(DENSE, 1).member_state_dict(0)
    first = next(k for k in state if k.endswith("weight"))
    limit = (6 / (784 + 32)) ** 0.5
    assert state[first].abs().max() <= limit
    assert state[first].abs().max() > 0.9 * limit
    assert all(not state[k].any() for k in state if k.endswith("bias"))


@pytest.mark.parametrize(("spec", "n"), [(DENSE, 2), (CONV, 1)], ids=["dense", "conv"])
def test_l2_penalty_equals_the_explicit_sum(spec: ModelSpec, n: int):
    stack = _stack(spec, n)
    for m in range(n):
        state = stack.member_state_dict(m)
        plain = build_module(spec)
        plain.load_state_dict(state)
        coefficients = [c.l2 for c in spec.conv] + [d.l2 for d in spec.layers]
        kernels = [layer.weight for layer in plain
                   if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))][:-1]
        explicit = sum(c * (w**2).sum() for c, w in zip(coefficients, kernels))
        torch.testing.assert_close(stack.l2_penalty()[m], explicit)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_l2_gradient_by_hand_equals_autograd_of_the_penalty_bit_for_bit(kind: str):
    # A stack whose members differ in L2 (one without), as the seed study stacks candidates.
    if kind == "dense":
        specs = [dataclasses.replace(DENSE, layers=(DenseLayer(32, l2=l2), DenseLayer(16)))
                 for l2 in (0.01, 0.0, 0.001)]
    else:
        specs = [CONV]
    x, y = torch.rand(len(specs), 9, 28, 28), torch.randint(0, 10, (len(specs), 9))

    def gradients(by_hand: bool) -> list[torch.Tensor]:
        stack = StackedNet(specs, MemberGenerators(list(range(len(specs))), torch.device("cpu")))
        data_loss = F.cross_entropy(stack(x).flatten(0, 1), y.flatten())
        if by_hand:
            data_loss.backward()
            stack.add_l2_gradient()
        else:  # the penalty as part of the loss, as Keras (and autograd) take it
            penalty = sum(
                spec.layers[i].l2 * stack.dense_weights[i][m].pow(2).sum()
                for m, spec in enumerate(specs) for i in range(len(spec.layers))
            ) + sum(layer.l2 * w.pow(2).sum() for layer, w in zip(specs[0].conv,
                                                                   stack.conv_weights))
            (data_loss + penalty).backward()
        return [p.grad for p in stack.kernel_parameters()]

    by_hand, autograd = gradients(True), gradients(False)
    assert any(not torch.equal(g, 0 * g) for g in by_hand)
    for a, b in zip(by_hand, autograd, strict=True):
        assert torch.equal(a, b)


def test_dropout_is_active_in_training_and_off_in_evaluation():
    spec = ModelSpec(layers=(DenseLayer(64, dropout=0.5),))
    stack = _stack(spec, 1)
    x = torch.rand(1, 16, 28, 28)
    generators = MemberGenerators([0], torch.device("cpu"))
    train_a, train_b = stack(x, generators), stack(x, generators)
    assert not torch.allclose(train_a, train_b)  # new masks each call
    torch.testing.assert_close(stack.eval()(x), stack(x))  # no generators: deterministic


def test_dropout_masks_are_inverted_and_have_the_right_rate():
    from fashionlab.models import dropout

    h = torch.ones(2, 2000, 50)
    out = dropout(h, [0.0, 0.4], MemberGenerators([0, 1], torch.device("cpu")))
    assert torch.equal(out[0], h[0])  # rate 0: untouched
    kept = out[1] != 0
    assert abs(kept.float().mean().item() - 0.6) < 0.01
    torch.testing.assert_close(out[1][kept], torch.full_like(out[1][kept], 1 / 0.6))


def test_select_keeps_members_and_their_weights():
    stack = _stack(DENSE, 3)
    subset = stack.select([2, 0])
    for new, old in ((0, 2), (1, 0)):
        a, b = subset.member_state_dict(new), stack.member_state_dict(old)
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_a_convolutional_network_trains_alone():
    with pytest.raises(ValueError, match="trains alone"):
        _stack(CONV, 2)
    stack = _stack(CONV, 1)
    copy = stack.select([0])
    a, b = copy.member_state_dict(0), stack.member_state_dict(0)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert copy.conv_weights[0] is not stack.conv_weights[0]  # its own parameters
    with pytest.raises(ValueError, match="one member"):
        stack.select([1])


def test_shapes_and_flops():
    assert flat_features(DENSE) == 784
    seed_cnn = ModelSpec(conv=(ConvLayer(32, pool=2), ConvLayer(64, pool=2), ConvLayer(64)),
                         dropout=0.3, layers=(DenseLayer(64),))
    assert flat_features(seed_cnn) == 3 * 3 * 64
    assert forward_flops(ModelSpec(layers=(DenseLayer(64),))) == 2 * (784 * 64 + 64 * 10)
    params = sum(p.numel() for p in build_module(seed_cnn).parameters())
    assert params == 93322  # the seed CNN's parameter count as Keras reports it
    # 28 -> 26 (pool 13) -> 11 (pool 5) -> 3: multiply-adds of each convolution, then dense.
    assert forward_flops(seed_cnn) == 2 * (26 * 26 * 32 * 9 + 11 * 11 * 64 * 32 * 9
                                           + 3 * 3 * 64 * 64 * 9 + 576 * 64 + 64 * 10)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_a_spec_is_accepted_exactly_when_torch_can_run_it(padding: str):
    """The config's torch-free shape arithmetic against torch's own convolution and pooling:
    a layer the spec refuses leaves nothing in torch, one it accepts has torch's output size."""
    x = torch.rand(1, 1, 28, 28)
    for kernel in (1, 3, 5, 27, 29):  # odd: padding "same" refuses even kernels
        for pool in (1, 2, 3, 14, 28, 29):
            try:
                h = F.max_pool2d(F.conv2d(x, torch.rand(2, 1, kernel, kernel),
                                          padding=0 if padding == "valid" else "same"), pool)
                side = h.shape[-1]
            except RuntimeError:  # torch: the kernel or the pool is larger than its input
                side = 0
            layer = ConvLayer(2, kernel=kernel, padding=padding, pool=pool)
            if side < 1:
                with pytest.raises(ValidationError, match="nothing is left"):
                    ModelSpec(conv=(layer,))
                continue
            spec = ModelSpec(conv=(layer,))
            assert conv_output_size(spec) == (2, side), (kernel, pool)
            assert build_module(spec)(x).shape == (1, 10)


def test_same_padding_refuses_even_kernels():
    # torch pads an even kernel one pixel more on one side; the exported module could not.
    with pytest.raises(ValidationError, match='padding "same" needs an odd kernel'):
        ModelSpec(conv=(ConvLayer(4, kernel=4, padding="same"),))


def test_members_of_different_shapes_cannot_stack():
    generators = MemberGenerators([0, 1], torch.device("cpu"))
    with pytest.raises(ValueError, match="one architecture shape"):
        StackedNet([DENSE, ModelSpec(layers=(DenseLayer(8),))], generators)


def test_convolutions_run_channels_last_from_the_first_layer():
    """A one-channel input must reach oneDNN with channels-last strides; otherwise the first
    convolution answers in NCHW and every activation and gradient is converted back and forth."""
    members = 1
    stack = _stack(CONV, members)
    outputs = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: outputs.append(output))
    try:
        stack(torch.rand(members, 5, 28, 28))
    finally:
        hook.remove()
    first = stack.norms[0]  # the batch norm right after the first convolution
    assert isinstance(first, torch.nn.BatchNorm2d)
    convolved = next(o for o in outputs if o.shape[1] == members * 4)
    assert convolved.is_contiguous(memory_format=torch.channels_last)
    assert convolved.stride(1) == 1


def test_flip_tta_logits_are_the_mean_over_the_two_views():
    spec = dataclasses.replace(CONV, tta="flip")
    stack = _stack(spec, 1).eval()
    x = torch.rand(1, 6, 28, 28)
    plain = build_module(spec).eval()
    plain.load_state_dict(stack.member_state_dict(0))
    views = plain(x[0].unsqueeze(1)), plain(x[0].flip(-1).unsqueeze(1))
    torch.testing.assert_close(stack.infer(x)[0], (views[0] + views[1]) / 2, rtol=1e-5,
                               atol=1e-5)
    tta = inference_module(spec, plain)
    torch.testing.assert_close(tta(x[0].unsqueeze(1)), (views[0] + views[1]) / 2)
    assert not torch.allclose(stack.infer(x), stack(x))  # the views do differ
    # Without tta, scoring is the plain forward pass and the plain module is used as it is.
    torch.testing.assert_close(_stack(CONV, 1).eval().infer(x), _stack(CONV, 1).eval()(x))
    assert inference_module(CONV, plain) is plain


def _moved(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x (..., H, W) moved by one pixel, built another way than `tta_views`: rolled, and the
    row or column that wrapped around set to background."""
    moved = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if dy:
        moved[..., 0 if dy > 0 else -1, :] = 0
    if dx:
        moved[..., :, 0 if dx > 0 else -1] = 0
    return moved


def test_flip_shift_tta_logits_are_the_mean_over_ten_views():
    spec = dataclasses.replace(CONV, tta="flip-shift")
    stack = _stack(spec, 1).eval()
    plain = build_module(spec).eval()
    plain.load_state_dict(stack.member_state_dict(0))
    x = torch.rand(1, 6, 28, 28)
    images = x[0].unsqueeze(1)  # (6, 1, 28, 28)
    moves = [images] + [_moved(images, dy, dx) for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    views = [plain(v) for v in moves] + [plain(v.flip(-1)) for v in moves]
    expected = torch.stack(views).mean(0)
    torch.testing.assert_close(stack.infer(x)[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference_module(spec, plain)(images), expected, rtol=1e-5,
                               atol=1e-5)
    # More views than flip alone: a different score.
    flip_only = (views[0] + views[5]) / 2
    assert not torch.allclose(stack.infer(x)[0], flip_only, atol=1e-4)


def test_tta_is_part_of_the_stacking_shape():
    assert dataclasses.replace(DENSE, tta="flip").shape_key() != DENSE.shape_key()
    assert (dataclasses.replace(DENSE, tta="flip").shape_key()
            != dataclasses.replace(DENSE, tta="flip-shift").shape_key())
