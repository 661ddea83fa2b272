"""The vocabulary of search spaces: which parameters a search may vary, the values each takes,
and how a trial's sampled values become a candidate.

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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from fashionlab.config import (
    Candidate,
    DenseLayer,
    FieldValueError,
    ParamSpec,
    SearchSpec,
    StudySpec,
)


@dataclass(frozen=True)
class Param:
    kind: Literal["int", "float", "choice"]
    minimum: float | None = None  # smallest value allowed
    below: float | None = None  # values must be below this (rates: 1)
    layer: Literal["dense", "conv"] | None = None  # sampled per layer of that kind
    options: tuple[str, ...] = ()  # the values a "choice" parameter takes
    early_stopping: bool = False  # needs the base to stop early
    positive: bool = False  # values must be above 0


VOCABULARY: dict[str, Param] = {
    "n_layers": Param("int", 0),  # hidden dense layers
    "units": Param("int", 1, layer="dense"),
    "dropout": Param("float", 0.0, 1.0, layer="dense"),
    "l2": Param("float", 0.0, layer="dense"),
    "learning_rate": Param("float", 0.0, positive=True),
    "batch_size": Param("int", 1),
    "epochs": Param("int", 1),
    "patience": Param("int", 1, early_stopping=True),
    "min_delta": Param("float", 0.0, early_stopping=True),
    "weight_decay": Param("float", 0.0),
    "label_smoothing": Param("float", 0.0, 1.0),
    "optimizer": Param("choice", options=("adam", "adamw", "sgd")),
    "schedule": Param("choice", options=("constant", "onecycle")),
    "filters": Param("int", 1, layer="conv"),  # channels of each conv layer of the base
    "conv_dropout": Param("float", 0.0, 1.0),  # dropout on the flattened conv features
}


# --------------------------------------------------------------------------------------------
# Checks (called by the config's validators; errors name the parameter)


def check_space(space: Mapping[str, ParamSpec]) -> None:
    for name, spec in space.items():
        param = VOCABULARY.get(name)
        if param is None:
            raise FieldValueError((name,), "unknown parameter (expected one of: "
                                  f"{', '.join(sorted(VOCABULARY))})")
        try:
            _check_param(param, spec)
        except ValueError as error:
            raise FieldValueError((name,), str(error)) from None


def _check_param(param: Param, spec: ParamSpec) -> None:
    ranged = spec.low is not None or spec.high is not None
    given = sum([ranged, spec.choices is not None, spec.value is not None])
    if given != 1:
        raise ValueError("give one of: low and high (a range), choices, or a fixed value")
    if spec.shared and param.layer is None:
        raise ValueError("shared applies to per-layer parameters only "
                         f"({', '.join(n for n, p in VOCABULARY.items() if p.layer)})")
    if not ranged and (spec.log or spec.step is not None):
        raise ValueError("log and step apply to ranges (low and high) only")
    if spec.choices is not None:
        if not spec.choices:
            raise ValueError("choices must not be empty")
        for value in spec.choices:
            _check_value(param, value)
        return
    if spec.value is not None:
        _check_value(param, spec.value)
        return
    if param.kind == "choice":
        raise ValueError(f"takes choices or a value, not a range (one of: "
                         f"{', '.join(param.options)})")
    if spec.low is None or spec.high is None:
        raise ValueError("a range needs both low and high")
    for value in (spec.low, spec.high):
        _check_value(param, value)
    if not spec.low < spec.high:
        raise ValueError(f"low ({spec.low}) must be below high ({spec.high})")
    if spec.log and spec.low <= 0:
        raise ValueError(f"a log scale needs low > 0 (got {spec.low})")
    if spec.step is not None:
        if spec.log:
            raise ValueError("log and step cannot be combined")
        if param.kind == "int" and not _whole(spec.step):
            raise ValueError(f"step must be a whole number (got {spec.step})")
        if not spec.step > 0:
            raise ValueError(f"step must be positive (got {spec.step})")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(param: Param, value: Any) -> None:
    if param.kind == "choice":
        if value not in param.options:
            raise ValueError(f"{value!r} is not one of: {', '.join(param.options)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"values must be numbers (got {value!r})")  # noqa: TRY004 - a config error
    if param.kind == "int" and not _whole(value):
        raise ValueError(f"values must be whole numbers (got {value!r})")
    if not math.isfinite(value):
        raise ValueError(f"values must be finite (got {value!r})")
    if param.positive and value <= 0:
        raise ValueError(f"values must be positive (got {value!r})")
    if param.minimum is not None and value < param.minimum:
        raise ValueError(f"values must be at least {param.minimum} (got {value!r})")
    if param.below is not None and value >= param.below:
        raise ValueError(f"values must lie in [{param.minimum:g}, {param.below:g}) "
                         f"(got {value!r})")


def check_grid(space: Mapping[str, ParamSpec]) -> None:
    for name, spec in space.items():
        if spec.low is not None and VOCABULARY[name].kind == "float" and spec.step is None:
            raise FieldValueError(("space", name), "the grid sampler needs choices or a step")


def check_base(spec: StudySpec) -> None:
    """The search's base candidate exists and has what the space varies."""
    search = spec.search
    assert search is not None
    names = [c.name for c in spec.candidates]
    if search.base is not None and search.base not in names:
        raise FieldValueError(("search", "base"), f"no candidate named {search.base!r} "
                              f"(candidates: {', '.join(names) or 'none'})")
    if not names:
        raise FieldValueError(("search",), "a search varies a candidate: add [[candidates]]")
    base = base_candidate(spec)
    for name in search.space:
        param = VOCABULARY[name]
        where = ("search", "space", name)
        if (param.layer == "conv" or name == "conv_dropout") and not base.model.conv:
            raise FieldValueError(where, f"the base candidate {base.name!r} has no conv layers")
        if param.layer == "dense" and not base.model.layers and "units" not in search.space:
            raise FieldValueError(where, f"the base candidate {base.name!r} has no hidden "
                                  "layers: give units in the space too")
        if param.early_stopping and base.train.early_stopping is None:
            raise FieldValueError(where, f"the base candidate {base.name!r} does not stop "
                                  "early: set its train.early_stopping")
    if "n_layers" in search.space and not base.model.layers and "units" not in search.space:
        raise FieldValueError(("search", "space", "n_layers"), "the base candidate has no "
                              "hidden layer to copy: give units in the space too")


def base_candidate(spec: StudySpec) -> Candidate:
    search = spec.search
    name = search.base if search is not None and search.base else spec.candidates[0].name
    return next(c for c in spec.candidates if c.name == name)


# --------------------------------------------------------------------------------------------
# Sampling


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
    conv = tuple(dataclasses.replace(c, filters=per_layer("filters", i, c.filters))
                 for i, c in enumerate(model.conv))
    model = dataclasses.replace(model, layers=tuple(layers), conv=conv,
                                dropout=draw("conv_dropout", model.dropout))
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
        early_stopping=stopping)
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


class _BaseValues(FixedParams):
    """Answers every draw with the base candidate's value, and records it."""

    def __init__(self) -> None:
        super().__init__({})
        object.__setattr__(self, "recorded", {})


def grid(search: SearchSpec, base: Candidate) -> dict[str, list[Any]]:
    """Every point of each sampled parameter, for the grid sampler (per-layer parameters for
    as many layers as the space allows)."""
    points: dict[str, list[Any]] = {}

    def values(spec: ParamSpec, kind: str) -> list[Any]:
        if spec.choices is not None:
            return list(spec.choices)
        assert spec.low is not None and spec.high is not None
        step = spec.step or 1
        count = math.floor((spec.high - spec.low) / step + 1e-9) + 1
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
                points[f"{name}_{i}"] = values(spec, param.kind)
    return points


def grid_size(points: Mapping[str, list[Any]]) -> int:
    return math.prod(len(v) for v in points.values())


def quick_search(search: SearchSpec, *, epochs: int) -> SearchSpec:
    """A small version of a search (for `--quick`): at most 6 trials, `epochs` epochs."""
    space = dict(search.space)
    spec = space.get("epochs")
    if spec is not None:
        if spec.choices is not None:
            short = tuple(c for c in spec.choices if isinstance(c, int) and c <= epochs)
            space["epochs"] = dataclasses.replace(spec, choices=short or (epochs,))
        elif spec.value is not None:
            space["epochs"] = ParamSpec(value=min(int(spec.value), epochs))
        elif spec.low is not None and spec.high is not None:
            high = min(int(spec.high), epochs)
            space["epochs"] = ParamSpec(value=high) if spec.low >= high else \
                dataclasses.replace(spec, high=high)
    trials = min(search.n_trials or 6, 6)
    return dataclasses.replace(
        search, space=space, n_trials=trials, startup_trials=min(search.startup_trials, 2),
        warmup=min(search.warmup, 2),
        budget=None if search.budget is None else min(search.budget, trials * 5 * epochs))


__all__ = ["VOCABULARY", "FixedParams", "base_candidate", "base_params", "check_base",
           "check_grid", "check_space", "grid", "grid_size", "quick_search", "suggest"]
