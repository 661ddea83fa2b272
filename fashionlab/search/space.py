"""How a trial's sampled values become a candidate (the parameters a space may name, and the
values each may take, are `fashionlab.vocabulary`'s), and the Optuna sampler that draws them.

A space maps parameter names to a range, a list of choices or a fixed value:

    [search.space]
    n_layers = { low = 1, high = 3 }
    units = { low = 64, high = 1024, log = true }     # per hidden layer: units_0, units_1, ...
    dropout = { low = 0.1, high = 0.6, shared = true } # one value for every layer: dropout
    learning_rate = { low = 1e-4, high = 3e-3, log = true }
    batch_size = { choices = [64, 128, 256] }
    optimizer = "adam"                                 # fixed

Parameters a trial does not sample keep the base candidate's values. Per-layer parameters of a
layer the base does not have (n_layers above the base's count) start from its last layer.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from pydantic import ValidationError

from fashionlab.config import Candidate, ConvLayer, DenseLayer, ParamSpec, SearchSpec
from fashionlab.config.specs import first_problem
from fashionlab.errors import ConfigError
from fashionlab.vocabulary import VOCABULARY

# The most combinations a grid may have: Optuna's GridSampler holds them all in memory (a few
# hundred bytes each), and a grid that large is never run to its end anyway.
MAX_GRID_POINTS = 100_000


class Suggester(Protocol):
    """What an Optuna trial offers (a `FixedParams` offers the same for stored params)."""

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int: ...

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class FixedParams:
    """Replays a trial's stored params (to rebuild the candidate it trained)."""

    params: Mapping[str, Any]

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int:
        return int(self.params[name])

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        return float(self.params[name])

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self.params[name]


def _draw(trial: Suggester, name: str, spec: ParamSpec, kind: str, default: Any) -> Any:
    if spec.value is not None:
        return spec.value
    if isinstance(trial, _BaseValues):
        trial.recorded[name] = default
        return default
    if spec.choices is not None:
        return trial.suggest_categorical(name, list(spec.choices))
    assert spec.low is not None and spec.high is not None
    if kind == "int":
        return trial.suggest_int(name, int(spec.low), int(spec.high),
                                 step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(name, float(spec.low), float(spec.high),
                               step=None if spec.step is None else float(spec.step),
                               log=spec.log)


def suggest(trial: Suggester, search: SearchSpec, base: Candidate, name: str) -> Candidate:
    """The base candidate with every parameter of the space drawn by the trial."""
    space = search.space

    def draw(param: str, default: Any, label: str | None = None) -> Any:
        if param not in space:
            return default
        return _draw(trial, label or param, space[param], VOCABULARY[param].kind, default)

    def per_layer(param: str, i: int, default: Any) -> Any:
        spec = space.get(param)
        return draw(param, default, param if spec is None or spec.shared else f"{param}_{i}")

    model, train = base.model, base.train
    layers = []
    template = model.layers[-1] if model.layers else DenseLayer(units=1)
    for i in range(draw("n_layers", len(model.layers))):
        layer = model.layers[i] if i < len(model.layers) else template
        layers.append(DenseLayer(units=per_layer("units", i, layer.units),
                                 l2=per_layer("l2", i, layer.l2),
                                 dropout=per_layer("dropout", i, layer.dropout)))
    conv: list[ConvLayer] = []
    for i, c in enumerate(model.conv):
        # A residual layer adds its input to its output: it keeps the channels it is given.
        filters = (conv[-1].filters if conv else c.filters) if c.residual \
            else per_layer("filters", i, c.filters)
        conv.append(dataclasses.replace(c, filters=filters))
    model = dataclasses.replace(model, layers=tuple(layers), conv=tuple(conv),
                                dropout=draw("conv_dropout", model.dropout),
                                tta=draw("tta", model.tta), init=draw("init", model.init))
    stopping = train.early_stopping
    if stopping is not None:
        stopping = dataclasses.replace(stopping, patience=draw("patience", stopping.patience),
                                       min_delta=draw("min_delta", stopping.min_delta))
    train = dataclasses.replace(
        train, learning_rate=draw("learning_rate", train.learning_rate),
        batch_size=draw("batch_size", train.batch_size), epochs=draw("epochs", train.epochs),
        weight_decay=draw("weight_decay", train.weight_decay),
        label_smoothing=draw("label_smoothing", train.label_smoothing),
        optimizer=draw("optimizer", train.optimizer), schedule=draw("schedule", train.schedule),
        augment=dataclasses.replace(train.augment, crop=draw("crop", train.augment.crop),
                                    flip=draw("flip", train.augment.flip),
                                    erase=draw("erase", train.augment.erase)),
        ema=draw("ema", train.ema), early_stopping=stopping)
    return Candidate(name=name, model=model, train=train)


def base_params(search: SearchSpec, base: Candidate) -> dict[str, Any]:
    """The base candidate's own values of the sampled parameters (those inside the space):
    enqueued as the first trial, so the search starts from what is known."""
    values = _BaseValues()
    suggest(values, search, base, base.name)
    inside = {}
    for label, value in values.recorded.items():
        spec = search.space[label if label in search.space else label.rpartition("_")[0]]
        if spec.choices is not None:
            if value in spec.choices:
                inside[label] = value
        elif spec.low is not None and spec.high is not None and spec.low <= value <= spec.high:
            on_step = spec.step is None or math.isclose(
                (value - spec.low) / spec.step, round((value - spec.low) / spec.step))
            if on_step:
                inside[label] = value
    return inside


class _Largest:
    """Answers every draw with the largest value it allows, and records it: the biggest model
    the space can draw (more units, filters and layers never mean fewer parameters, for layers
    wider than the classes)."""

    def __init__(self) -> None:
        self.recorded: dict[str, Any] = {}

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1,
                    log: bool = False) -> int:
        self.recorded[name] = low + (high - low) // step * step
        return self.recorded[name]

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        self.recorded[name] = high
        return high

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        numbers = [c for c in choices if isinstance(c, int | float) and not isinstance(c, bool)]
        self.recorded[name] = max(numbers) if len(numbers) == len(choices) else choices[0]
        return self.recorded[name]


def _sizes(recorded: dict[str, Any]) -> list[str]:
    """The size parameters of a draw, a per-layer one said once where its layers agree:
    "units = 4096 (each of 64 layers)", not 64 entries."""
    by_param: dict[str, list[Any]] = {}
    for name, value in recorded.items():
        param = name if name == "n_layers" else name.rpartition("_")[0] or name
        if param in ("n_layers", "units", "filters"):
            by_param.setdefault(param, []).append(value)
    return [f"{param} = {values[0]}" if len(values) == 1 else
            f"{param} = {values[0]} (each of {len(values)} layers)" if len(set(values)) == 1
            else f"{param} = {', '.join(map(str, values))}"
            for param, values in by_param.items()]


def check_largest_model(study: str, search: SearchSpec, base: Candidate) -> None:
    """Refuse, before the search starts, a space that can draw a model too large to train
    (`config.MAX_PARAMETERS`): a trial would otherwise fail only once it is drawn. `study`:
    how the message names the study (`config.study_source`)."""
    largest = _Largest()
    try:
        suggest(largest, search, base, base.name)
    except ValidationError as error:
        where, message, _ = first_problem(error)
        sizes = ", ".join(_sizes(largest.recorded))
        raise ConfigError(f"{study}: search.space: its largest draw ({sizes}) is too "
                          f"large: {'.'.join(map(str, where))}: {message}") from None


class _BaseValues(FixedParams):
    """Answers every draw with the base candidate's value, and records it."""

    def __init__(self) -> None:
        super().__init__({})
        object.__setattr__(self, "recorded", {})


def grid(search: SearchSpec, base: Candidate) -> dict[str, list[Any]]:
    """Every point of each sampled parameter, for the grid sampler (per-layer parameters for
    as many layers as the space allows). A grid of more than MAX_GRID_POINTS points is a
    ConfigError: Optuna's grid sampler lists every combination in memory."""
    points: dict[str, list[Any]] = {}

    def values(spec: ParamSpec, kind: str) -> list[Any]:
        if spec.choices is not None:
            return list(spec.choices)
        assert spec.low is not None and spec.high is not None
        step = spec.step or 1
        span = (spec.high - spec.low) / step + 1e-9  # inf for a step of 5e-324
        if span >= MAX_GRID_POINTS:
            raise _too_large(math.inf if math.isinf(span) else math.floor(span) + 1)
        count = math.floor(span) + 1
        out = [spec.low + i * step for i in range(count)]
        return [int(v) for v in out] if kind == "int" else [float(v) for v in out]

    layer_counts = {"dense": len(base.model.layers), "conv": len(base.model.conv)}
    n_layers = search.space.get("n_layers")
    if n_layers is not None and n_layers.value is None:
        layer_counts["dense"] = max(values(n_layers, "int"))
    for name, spec in search.space.items():
        if spec.value is not None:
            continue
        param = VOCABULARY[name]
        if param.layer is None or spec.shared:
            points[name] = values(spec, param.kind)
        else:
            for i in range(layer_counts[param.layer]):
                if name == "filters" and base.model.conv[i].residual:
                    continue  # not drawn: it keeps the channels of the layer before it
                points[f"{name}_{i}"] = values(spec, param.kind)
    if grid_size(points) > MAX_GRID_POINTS:
        raise _too_large(grid_size(points))
    return points


def _too_large(points: float) -> ConfigError:
    many = "countless" if math.isinf(points) else f"{points:,}"
    return ConfigError(f"search.space: the grid has {many} points, more than the "
                       f"{MAX_GRID_POINTS:,} the grid sampler lists: give fewer choices or "
                       "larger steps, or sample it (sampler = \"tpe\" or \"random\")")


def grid_size(points: Mapping[str, list[Any]]) -> int:
    return math.prod(len(v) for v in points.values())


def make_sampler(search: SearchSpec, base: Candidate, seed: int) -> optuna.samplers.BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if search.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if search.sampler == "grid":
            return optuna.samplers.GridSampler(grid(search, base), seed=seed)
        if search.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(
                seed=seed, n_startup_trials=search.startup_trials,
                warn_independent_sampling=False)
        # multivariate + group: per-layer parameters exist only for some n_layers; the
        # constant liar keeps parallel workers from sampling next to each other's trials.
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=search.startup_trials, multivariate=True, group=True,
            constant_liar=True)
