"""The vocabulary of search spaces: which parameters a search may vary and the values each
may take, checked when a study file is read (by `fashionlab.config`'s validators), before
anything runs. How a trial's drawn values become a candidate is `fashionlab.search.space`.

A space maps parameter names to a range, a list of choices or a fixed value (a
`config.ParamSpec`); errors name the parameter (`FieldValueError`), and the config's error
formatting turns them into `error: FILE: search.space.units: ...`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, get_args

from fashionlab.errors import FieldValueError
from fashionlab.text import finite, shortened

__all__ = ["MAX_EPOCHS", "MAX_LAYERS", "MAX_REPEATS", "VOCABULARY", "KernelInit", "Param",
           "TestTimeAugmentation", "check_base", "check_grid", "check_space", "check_varies"]

# The most hidden dense layers, and the most conv layers, a model may have: deeper plain stacks
# do not train (without `residual` layers), and a search space reaching 100,000 layers of a few
# units stays under the parameter cap while it builds a model for minutes.
MAX_LAYERS = 100
# The most epochs a model trains, and the most repeats of a cross-validation: far beyond any
# useful study, and epochs fit the store's 32-bit integers (a number past them was taken, and
# failed only once its run was created).
MAX_EPOCHS = 100_000
MAX_REPEATS = 100

# A model's test-time augmentation (`ModelSpec.tta`), named once for the spec and the search.
TestTimeAugmentation = Literal["none", "flip", "flip-shift"]
# How a model's kernels start (`ModelSpec.init`): Keras' Glorot limits or PyTorch's.
KernelInit = Literal["glorot", "pytorch"]


@dataclass(frozen=True)
class Param:
    kind: Literal["int", "float", "choice"]
    minimum: float | None = None  # smallest value allowed
    below: float | None = None  # values must be below this (rates: 1)
    layer: Literal["dense", "conv"] | None = None  # sampled per layer of that kind
    options: tuple[str | bool, ...] = ()  # the values a "choice" parameter takes
    early_stopping: bool = False  # needs the base to stop early
    positive: bool = False  # values must be above 0
    maximum: float | None = None  # largest value allowed


VOCABULARY: dict[str, Param] = {
    "n_layers": Param("int", 0, maximum=MAX_LAYERS),  # hidden dense layers
    "units": Param("int", 1, layer="dense"),
    "dropout": Param("float", 0.0, 1.0, layer="dense"),
    "l2": Param("float", 0.0, layer="dense"),
    "learning_rate": Param("float", 0.0, positive=True),
    "batch_size": Param("int", 1),
    "epochs": Param("int", 1, maximum=MAX_EPOCHS),
    "patience": Param("int", 1, early_stopping=True),
    "min_delta": Param("float", 0.0, early_stopping=True),
    "weight_decay": Param("float", 0.0),
    "label_smoothing": Param("float", 0.0, 1.0),
    "optimizer": Param("choice", options=("adam", "adamw", "sgd")),
    "schedule": Param("choice", options=("constant", "onecycle")),
    "filters": Param("int", 1, layer="conv"),  # channels of each conv layer of the base
    "conv_dropout": Param("float", 0.0, 1.0),  # dropout on the flattened conv features
    "crop": Param("int", 0, 9),  # augmentation: random crops of the image padded by this
    "flip": Param("choice", options=(False, True)),  # augmentation: random horizontal flips
    "erase": Param("float", 0.0, maximum=1.0),  # augmentation: share of images erased in part
    "ema": Param("float", 0.0, 1.0),  # decay of the moving average of the weights; 0: off
    "tta": Param("choice", options=get_args(TestTimeAugmentation)),  # test-time augmentation
    "init": Param("choice", options=get_args(KernelInit)),  # how the kernels start
}


# --------------------------------------------------------------------------------------------
# Checks (called by the config's validators; a space's entries are `config.ParamSpec`s)


def check_space(space: Mapping[str, Any]) -> None:
    for name, spec in space.items():
        param = VOCABULARY.get(name)
        if param is None:
            raise FieldValueError((name,), "unknown parameter (expected one of: "
                                  f"{', '.join(sorted(VOCABULARY))})")
        try:
            _check_param(param, spec)
        except ValueError as error:
            raise FieldValueError((name,), str(error)) from None


def check_varies(space: Mapping[str, Any]) -> None:
    """The space draws more than one candidate: otherwise every trial would train the same
    one with the same seed, n_trials identical copies."""
    if not any(spec.low is not None or len(set(spec.choices or ())) > 1
               for spec in space.values()):
        raise FieldValueError(("space",), "varies nothing: give at least one parameter a range "
                              "or two choices (fixed values alone make every trial the same)")


def _check_param(param: Param, spec: Any) -> None:
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
                         f"{_options(param)})")
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
        if spec.step > spec.high - spec.low:  # one point: every trial the same
            raise ValueError(f"step ({spec.step}) must not exceed the range "
                             f"({spec.low} to {spec.high}): it would draw {spec.low} alone")
        # As Optuna checks it (decimal, not binary, arithmetic: 0.1 to 0.5 by 0.1 divides);
        # Optuna would warn and quietly cut high down to the last step.
        span, step = Decimal(str(spec.high)) - Decimal(str(spec.low)), Decimal(str(spec.step))
        try:
            divides = span % step == 0
        except InvalidOperation:  # past decimal's precision: a grid too large (`check_grid`)
            divides = True
        if not divides:
            last = Decimal(str(spec.low)) + step * (span // step)
            shown = int(last) if param.kind == "int" else float(last)
            raise ValueError(f"step ({spec.step}) does not divide the range ({spec.low} to "
                             f"{spec.high}): make high {shown} (the last step) or change the "
                             "step")


def _spelled(value: Any) -> str:
    """A value as a study file spells it (true, not True)."""
    return ("true" if value else "false") if isinstance(value, bool) else shortened(repr(value))


def _options(param: Param) -> str:
    return ", ".join(o if isinstance(o, str) else _spelled(o) for o in param.options)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(param: Param, value: Any) -> None:
    if param.kind == "choice":
        # `in` would take 1 for true: a choice must match in type as well as value.
        if not any(value == o and type(value) is type(o) for o in param.options):
            raise ValueError(f"{_spelled(value)} is not one of: {_options(param)}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"values must be numbers (got {value!r})")  # noqa: TRY004 - a config error
    if param.kind == "int" and not _whole(value):
        raise ValueError(f"values must be whole numbers (got {value!r})")
    if not finite(value):  # an int too: Optuna's samplers draw through floats
        raise ValueError(f"values must be finite numbers within a float's range (got "
                         f"{_spelled(value)})")
    if param.positive and value <= 0:
        raise ValueError(f"values must be positive (got {value!r})")
    if param.minimum is not None and value < param.minimum:
        raise ValueError(f"values must be at least {param.minimum:g} (got {value!r})")
    if param.maximum is not None and value > param.maximum:
        raise ValueError(f"values must be at most {param.maximum:g} (got {value!r})")
    if param.below is not None and value >= param.below:
        raise ValueError(f"values must lie in [{param.minimum:g}, {param.below:g}) "
                         f"(got {value!r})")


def check_grid(space: Mapping[str, Any]) -> None:
    for name, spec in space.items():
        if spec.low is not None and VOCABULARY[name].kind == "float" and spec.step is None:
            raise FieldValueError(("space", name), "the grid sampler needs choices or a step")


def check_base(space: Mapping[str, Any], base: Any) -> None:
    """The base candidate (a `config.Candidate`) has what the space varies."""
    for name in space:
        param = VOCABULARY[name]
        where = ("search", "space", name)
        if (param.layer == "conv" or name == "conv_dropout") and not base.model.conv:
            raise FieldValueError(where, f"the base candidate {base.name!r} has no conv layers")
        if param.layer == "dense" and not base.model.layers and "n_layers" not in space:
            raise FieldValueError(where, f"the base candidate {base.name!r} has no hidden "
                                  "layers: give n_layers (and units) in the space to add some")
        if param.layer == "dense" and not base.model.layers and "units" not in space:
            raise FieldValueError(where, f"the base candidate {base.name!r} has no hidden "
                                  "layers: give units in the space too")
        if param.early_stopping and base.train.early_stopping is None:
            raise FieldValueError(where, f"the base candidate {base.name!r} does not stop "
                                  "early: set its train.early_stopping")
    if "n_layers" in space and not base.model.layers and "units" not in space:
        raise FieldValueError(("search", "space", "n_layers"), "the base candidate has no "
                              "hidden layer to copy: give units in the space too")
