"""Networks built from a `ModelSpec`.

`StackedNet` holds M independent dense networks of one shape (the folds of a candidate, or
several candidates that differ only in L2 and dropout) and evaluates them as one model: dense
layers are batched matrix products over weights (M, in, out). Member m computes exactly what it
would compute alone. A convolutional network is always a stack of one: as grouped convolutions
(one group per member) five CNN folds trained no faster than one after the other on the CPU
(seed CNN 0.92-0.97x the time, fast-cnn with batch norm 1.16x slower; AMD EPYC Zen 4, 1 thread),
and a stack of five runs in one worker where five jobs spread over all of them.

`build_module` gives the same architecture as a plain `nn.Sequential` of standard layers, for
inference and export; `StackedNet.member_state_dict` fills it with one member's weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fashionlab.config import IMAGE_SIZE, ModelSpec, conv_sides
from fashionlab.rng import MemberGenerators


def conv_output_size(spec: ModelSpec, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """(channels, side) of the conv stack's output for a square input of `size` pixels."""
    sides = conv_sides(spec.conv, size)
    if any(pooled < 1 for _, pooled in sides):  # a spec validates this for 28x28 images
        raise ValueError(f"the conv stack shrinks a {size}x{size} image to nothing")
    return (spec.conv[-1].filters, sides[-1][1]) if spec.conv else (1, size)


def flat_features(spec: ModelSpec) -> int:
    """Number of features entering the dense layers."""
    if not spec.conv:
        return IMAGE_SIZE * IMAGE_SIZE
    channels, side = conv_output_size(spec)
    return channels * side * side


def forward_flops(spec: ModelSpec) -> int:
    """Multiply-add FLOPs (2 per MAC) of one image's forward pass; training is ~3x this."""
    flops, channels = 0, 1
    for layer, (out, _) in zip(spec.conv, conv_sides(spec.conv)):
        flops += 2 * out * out * layer.filters * channels * layer.kernel**2
        channels = layer.filters
    width = flat_features(spec)
    for units in [layer.units for layer in spec.layers] + [spec.n_classes]:
        flops += 2 * width * units
        width = units
    return flops


def normalises_a_single_pixel(spec: ModelSpec) -> bool:
    """Whether a batch norm of the model normalises a 1x1 map (after a pooling that leaves one
    pixel, or a convolution as large as its input): its statistics then come from the images
    of the batch alone, and a batch of one image has none."""
    return any(layer.batch_norm and (pooled if layer.norm_after_pool else convolved) == 1
               for layer, (convolved, pooled) in zip(spec.conv, conv_sides(spec.conv)))


def _initial_kernel(
    init: str, generators: MemberGenerators, shape: tuple[int, ...], fan_in: int, fan_out: int
) -> torch.Tensor:
    """A kernel drawn per member, (M, *shape), uniform in +-limit: "glorot" is Keras' default
    initialiser, "pytorch" PyTorch's for its layers (kaiming_uniform with a = sqrt(5)). The
    same draws either way, scaled."""
    limit = math.sqrt(6.0 / (fan_in + fan_out)) if init == "glorot" else math.sqrt(1.0 / fan_in)
    return (generators.rand(*shape) * 2.0 - 1.0) * limit


def dropout(
    h: torch.Tensor, rates: Sequence[float], generators: MemberGenerators | None
) -> torch.Tensor:
    """Inverted dropout on h (M, B, ...) with a rate and a random stream per member.

    Only members with a non-zero rate draw masks, so a member's stream does not depend on the
    rates of the members it is stacked with. `generators` None means evaluation: no dropout.
    A unit is dropped when a uniform 16-bit draw falls below rate * 65536: the dropped share
    is the rate to within 2**-17, and survivors are scaled by exactly 1 / (1 - rate).
    """
    active = [m for m, rate in enumerate(rates) if rate > 0]
    if generators is None or not active:
        return h
    shape = (-1, *([1] * (h.dim() - 1)))
    # int16 draws run from -32768; a threshold t keeps a draw d when d >= t.
    thresholds = [min(round(rates[m] * 65536), 65535) - 32768 for m in active]
    threshold = torch.tensor(thresholds, dtype=torch.int16, device=h.device).view(shape)
    keep = generators.bits16(*h.shape[1:], members=active) >= threshold  # (A, B, ...)
    rate = h.new_tensor([rates[m] for m in active]).view(shape)
    scale = keep.to(h.dtype) / (1.0 - rate)
    if len(active) < len(rates):
        full = h.new_ones(h.shape)
        full[active] = scale
        scale = full
    return h * scale


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """t (N, C, H, W) with channels-last strides, even for C = 1.

    `contiguous(memory_format=torch.channels_last)` leaves a one-channel tensor as it is (its
    strides fit both layouts) and the convolution then picks NCHW, so copy into fresh NHWC
    storage (a small copy: this is the network's input).
    """
    n, c, h, w = t.shape
    nhwc = torch.empty((n, h, w, c), dtype=t.dtype, device=t.device)
    return nhwc.copy_(t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class StackedNet(nn.Module):
    """M networks of one shape, trained and evaluated as one (M = 1 for a convolutional one).

    Input (M, B, 28, 28): member m's batch of B images. Output (M, B, n_classes) logits.
    """

    def __init__(self, specs: Sequence[ModelSpec], generators: MemberGenerators) -> None:
        super().__init__()
        if not specs or len({s.shape_key() for s in specs}) != 1:
            raise ValueError("stacked members must share one architecture shape")
        if len(specs) != len(generators):
            raise ValueError("one generator per member is needed")
        if specs[0].conv and len(specs) > 1:
            raise ValueError("a convolutional network trains alone: stacks of CNNs do not pay")
        self.specs = list(specs)
        self.n_members = M = len(specs)
        shape = specs[0]
        device = generators.device

        self.conv_weights, self.conv_biases = nn.ParameterList(), nn.ParameterList()
        self.norms = nn.ModuleList()
        channels = 1
        for layer in shape.conv:
            k, out = layer.kernel, layer.filters
            w = _initial_kernel(shape.init, generators, (out, channels, k, k), channels * k * k,
                                out * k * k)
            w = w[0].contiguous(memory_format=torch.channels_last)  # (out, in, k, k)
            self.conv_weights.append(nn.Parameter(w))
            # No bias before batch norm: it would be cancelled, and Adam would turn its zero
            # gradient's rounding noise into random drifts of the running mean.
            n_bias = 0 if layer.batch_norm else out
            self.conv_biases.append(nn.Parameter(torch.zeros(n_bias, device=device)))
            self.norms.append(
                nn.BatchNorm2d(out, device=device) if layer.batch_norm else nn.Identity()
            )
            channels = out

        self.dense_weights, self.dense_biases = nn.ParameterList(), nn.ParameterList()
        width = flat_features(shape)
        for units in [layer.units for layer in shape.layers] + [shape.n_classes]:
            w = _initial_kernel(shape.init, generators, (width, units), width, units)  # (M, in, out)
            self.dense_weights.append(nn.Parameter(w))
            self.dense_biases.append(nn.Parameter(torch.zeros(M, units, device=device)))
            width = units

    # ---- forward ------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor, generators: MemberGenerators | None = None
    ) -> torch.Tensor:
        """x (M, B, 28, 28) -> logits (M, B, n_classes). Dropout only when generators are given."""
        M, B = x.shape[:2]
        shape = self.specs[0]
        if shape.conv:
            # (B, 1, 28, 28), channels-last from the start so that oneDNN answers in
            # channels-last too, forward and backward, instead of converting each activation
            # and its gradient.
            h = _channels_last(x.transpose(0, 1))
            for i, layer in enumerate(shape.conv):
                bias = self.conv_biases[i]
                z = F.conv2d(
                    h, self.conv_weights[i], bias if bias.numel() else None,
                    padding=0 if layer.padding == "valid" else "same",
                )
                # Channels-last activations: oneDNN's fast layout on the CPU, and max-pooling
                # is ~15x faster on it (a no-op when the convolution already answered so).
                z = z.contiguous(memory_format=torch.channels_last)
                if layer.residual:  # input + ReLU(norm(conv(input))), then pooled
                    h = h + F.relu(self.norms[i](z))
                    h = F.max_pool2d(h, layer.pool) if layer.pool > 1 else h
                    continue
                if not layer.norm_after_pool:
                    z = self.norms[i](z)
                if layer.pool > 1:
                    # max-pool before ReLU: identical result (both are monotone), 4x less ReLU work
                    z = F.max_pool2d(z, layer.pool)
                if layer.norm_after_pool:
                    z = self.norms[i](z)
                h = F.relu(z)
            h = h.reshape(1, B, -1)  # (1, B, C*H*W), C-major like nn.Flatten
            h = dropout(h, [s.dropout for s in self.specs], generators)
        else:
            h = x.reshape(M, B, -1)  # (M, B, 784)
        for i, _ in enumerate(shape.layers):
            h = F.relu(torch.baddbmm(self.dense_biases[i].unsqueeze(1), h, self.dense_weights[i]))
            h = dropout(h, [s.layers[i].dropout for s in self.specs], generators)
        return torch.baddbmm(self.dense_biases[-1].unsqueeze(1), h, self.dense_weights[-1])

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for scoring, x (M, B, 28, 28) -> (M, B, n_classes): the mean over the
        model's test-time views (its spec's `tta`), never with dropout."""
        return mean_over_views(self, x, self.specs[0].tta)  # tta is part of the shape key

    def _l2_terms(self) -> Iterator[tuple[nn.Parameter, slice, torch.Tensor]]:
        """(kernel, member m's part of it, l2) for every member kernel with an L2 coefficient,
        layer by layer. l2 is a float32 scalar, so products round as they would in the loss."""
        for i, w in enumerate(self.conv_weights):  # a convolutional net trains alone: all of w
            if l2 := self.specs[0].conv[i].l2:
                yield w, slice(None), w.new_tensor(l2)
        for i, w in enumerate(self.dense_weights[:-1]):
            for m, spec in enumerate(self.specs):
                if l2 := spec.layers[i].l2:
                    yield w, slice(m, m + 1), w.new_tensor(l2)

    @torch.no_grad()
    def l2_penalty(self) -> torch.Tensor:
        """(M,): sum over layers of l2 * sum(W**2) of the kernel, per member (Keras' L2).

        A value only: training adds its gradient with `add_l2_gradient`."""
        penalty = self.dense_weights[0].new_zeros(self.n_members)
        for weight, part, l2 in self._l2_terms():
            # `part` indexes the member's entry too (a conv net's all: it is alone, M = 1).
            penalty[part] += l2 * weight[part].reshape(1, -1).pow(2).sum(1)
        return penalty

    @torch.no_grad()
    def add_l2_gradient(self) -> None:
        """Add the L2 penalty's gradient, 2 * l2 * W, to the kernels' gradients.

        By hand rather than through autograd: autograd's penalty makes ~5 passes over every
        member's kernel (square, sum, and back), which cost a stack of the seed study's three
        dense(64) candidates ~8% of its epoch for the one candidate with L2; this is one
        product and one sum over the kernels that have an L2 coefficient. Same numbers:
        l2 * (2 * W) rounds once, like autograd's, and is added to the data's gradient.
        """
        for weight, part, l2 in self._l2_terms():
            assert weight.grad is not None, "add_l2_gradient runs after backward()"
            weight.grad[part] += weight[part] * (2 * l2)

    def kernel_parameters(self) -> list[nn.Parameter]:
        """Convolution and dense kernels: the parameters weight decay applies to."""
        return [*self.conv_weights, *self.dense_weights]

    # ---- members ------------------------------------------------------------------------

    def member_state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Member m's weights, keyed like `build_module(spec).state_dict()`."""
        state: dict[str, torch.Tensor] = {}
        names = _plain_layer_names(self.specs[m])
        for i, (w, b) in enumerate(zip(self.conv_weights, self.conv_biases)):
            prefix = names["conv"][i]
            state[f"{prefix}.weight"] = w.detach().clone()  # conv stacks hold one member
            if b.numel():
                state[f"{prefix}.bias"] = b.detach().clone()
            norm = self.norms[i]
            if isinstance(norm, nn.BatchNorm2d):
                bn = names["norm"][i]
                for key in ("weight", "bias", "running_mean", "running_var",
                            "num_batches_tracked"):
                    state[f"{bn}.{key}"] = getattr(norm, key).detach().clone()
        for i, (w, b) in enumerate(zip(self.dense_weights, self.dense_biases)):
            prefix = names["dense"][i]
            state[f"{prefix}.weight"] = w.detach()[m].t().contiguous()  # nn.Linear is (out, in)
            state[f"{prefix}.bias"] = b.detach()[m].clone()
        return state

    def load_member_state_dict(self, m: int, state: dict[str, torch.Tensor]) -> None:
        """Set member m's weights from a `member_state_dict` (used to restore best weights)."""
        names = _plain_layer_names(self.specs[m])
        with torch.no_grad():
            for i, (w, b) in enumerate(zip(self.conv_weights, self.conv_biases)):
                prefix = names["conv"][i]
                w.copy_(state[f"{prefix}.weight"])  # conv stacks hold one member
                if b.numel():
                    b.copy_(state[f"{prefix}.bias"])
                norm = self.norms[i]
                if isinstance(norm, nn.BatchNorm2d):
                    bn = names["norm"][i]
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        getattr(norm, key).copy_(state[f"{bn}.{key}"])
            for i, (w, b) in enumerate(zip(self.dense_weights, self.dense_biases)):
                prefix = names["dense"][i]
                w[m].copy_(state[f"{prefix}.weight"].t())
                b[m].copy_(state[f"{prefix}.bias"])

    def select(self, keep: Sequence[int]) -> StackedNet:
        """A new stack of the members in `keep`, in that order, with their current weights."""
        if self.specs[0].conv:  # a stack of one: nothing to choose from
            if list(keep) != [0]:
                raise ValueError(f"a convolutional stack has one member, not {list(keep)}")
            return copy.deepcopy(self)
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.dense_weights[0].device)
        subset = StackedNet.__new__(StackedNet)
        nn.Module.__init__(subset)
        subset.specs = [self.specs[i] for i in keep]
        subset.n_members = len(keep)
        subset.conv_weights, subset.conv_biases = nn.ParameterList(), nn.ParameterList()
        subset.norms = nn.ModuleList()
        subset.dense_weights = nn.ParameterList(
            [nn.Parameter(w.detach()[index].clone()) for w in self.dense_weights])
        subset.dense_biases = nn.ParameterList(
            [nn.Parameter(b.detach()[index].clone()) for b in self.dense_biases])
        subset.train(self.training)
        return subset


def select_members(t: torch.Tensor, index: torch.Tensor, n_members: int) -> torch.Tensor:
    """Rows of a member-major tensor (M, ...) belonging to the members in index."""
    return t.detach().unflatten(0, (n_members, -1))[index].flatten(0, 1).clone()


def _plain_layer_names(spec: ModelSpec) -> dict[str, list[str]]:
    """Names of the parametrised layers of `build_module(spec)` in its state_dict."""
    names: dict[str, list[str]] = {"conv": [], "norm": [], "dense": []}
    index = 0
    for layer in spec.conv:
        if layer.residual:  # one Residual module, then its pooling
            names["conv"].append(f"{index}.body.0")
            names["norm"].append(f"{index}.body.1" if layer.batch_norm else "")
            index += 1 + (1 if layer.pool > 1 else 0)
            continue
        names["conv"].append(str(index))
        index += 1
        pool = 1 if layer.pool > 1 else 0
        if layer.batch_norm:
            # after the convolution, or after its pooling
            names["norm"].append(str(index + pool if layer.norm_after_pool else index))
            index += 1
        else:
            names["norm"].append("")
        index += pool + 1  # pool, relu
    if spec.conv:
        index += 1  # flatten
        index += 1 if spec.dropout > 0 else 0
    else:
        index += 1  # flatten
    for layer in spec.layers:
        names["dense"].append(str(index))
        index += 2 + (1 if layer.dropout > 0 else 0)  # linear, relu, dropout
    names["dense"].append(str(index))
    return names


# One-pixel moves of "flip-shift" TTA, (rows, columns): up, down, left, right.
TTA_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def tta_views(x: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The test-time views of images x (..., H, W), the image itself first: its mirror image
    for "flip"; for "flip-shift" also the image moved by one pixel in each direction (the
    pixel moved in is background, 0), each with its mirror image."""
    views = [x]
    if tta == "flip-shift":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1))
        views += [padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in TTA_SHIFTS]
    if tta in ("flip", "flip-shift"):
        views += [view.flip(-1) for view in views]
    return views


def mean_over_views(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    tta: str) -> torch.Tensor:
    """The mean of net's logits over the test-time views of x (net(x) itself without TTA).
    One forward pass per view: the same batch shapes, so the same numbers, as without TTA."""
    first, *others = tta_views(x, tta)
    logits = net(first)
    for view in others:
        logits = logits + net(view)
    return logits / (1 + len(others)) if others else logits


class ViewAveraged(nn.Module):
    """A network scored with test-time augmentation: the mean of its logits over the views of
    `tta_views`, (B, 1, 28, 28) -> (B, n_classes)."""

    def __init__(self, net: nn.Module, tta: str) -> None:
        super().__init__()
        self.net, self.tta = net, tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mean_over_views(self.net, x, self.tta)


class Residual(nn.Module):
    """x + body(x): a conv layer with `residual = true` (its body: convolution, batch norm,
    ReLU)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def inference_module(spec: ModelSpec, module: nn.Module) -> nn.Module:
    """`module` (a `build_module(spec)` holding its weights) as the model is used and scored:
    wrapped in its test-time augmentation, if the spec has one."""
    return module if spec.tta == "none" else ViewAveraged(module, spec.tta)


def build_module(spec: ModelSpec) -> nn.Sequential:
    """The architecture as plain PyTorch layers: (B, 1, 28, 28) -> (B, n_classes) logits,
    without test-time augmentation (see `inference_module`)."""
    layers: list[nn.Module] = []
    channels = 1
    for layer in spec.conv:
        padding = 0 if layer.padding == "valid" else layer.kernel // 2
        conv = nn.Conv2d(channels, layer.filters, layer.kernel, padding=padding,
                         bias=not layer.batch_norm)
        norm = [nn.BatchNorm2d(layer.filters)] if layer.batch_norm else []
        pool = [nn.MaxPool2d(layer.pool)] if layer.pool > 1 else []
        if layer.residual:
            layers += [Residual(nn.Sequential(conv, *norm, nn.ReLU())), *pool]
        else:
            layers += [conv, *(pool + norm if layer.norm_after_pool else norm + pool), nn.ReLU()]
        channels = layer.filters
    layers.append(nn.Flatten())
    if spec.conv and spec.dropout > 0:
        layers.append(nn.Dropout(spec.dropout))
    width = flat_features(spec)
    for layer in spec.layers:
        layers += [nn.Linear(width, layer.units), nn.ReLU()]
        if layer.dropout > 0:
            layers.append(nn.Dropout(layer.dropout))
        width = layer.units
    layers.append(nn.Linear(width, spec.n_classes))
    return nn.Sequential(*layers)
