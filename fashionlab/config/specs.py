"""The study configuration as frozen dataclasses, validated when built: the data, the
cross-validation protocol, the overfitting warning, the models and their training, the retrain
step, the final models and an optional search. Errors point at the field (pydantic's location,
or a `FieldValueError` path below it); `fashionlab.config.files` names the file too.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import math
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from fashionlab.errors import FieldValueError
from fashionlab.text import DIRECTION_CONTROLS, safe_name, shortened
from fashionlab.vocabulary import (
    MAX_EPOCHS,
    MAX_LAYERS,
    MAX_REPEATS,
    KernelInit,
    TestTimeAugmentation,
    check_base,
    check_grid,
    check_space,
    check_varies,
)

_STRICT = ConfigDict(extra="forbid")

# Numbers and booleans are strict, field by field (a strict config would also refuse a TOML
# array for a tuple and a table for a dataclass): TOML has real types, so "64" for a number,
# 1.5 or true for an integer, 1 or "yes" for a boolean are mistakes to report, not values to
# convert. An integer is a valid float (learning_rate = 1): nothing is lost, and TOML users
# write it so. TOML's inf and nan are no valid setting of any number here.
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
PositiveInt = Annotated[Int, Field(gt=0)]
# A name is shown in tables and names files (`text.safe_name`): file systems allow 255 bytes
# a file name, and the longest one made of a name, a figure being written
# (".curves-NAME.png.PID.MACHINE.tmp", `serialize.staging_path`), adds at most 42.
MAX_NAME_CHARACTERS = 100
MAX_NAME_BYTES = 200  # of its file name in UTF-8 ("é" takes 2, most emoji 4)


def _a_name(value: str) -> str:
    """A study or model name: it names files and folders too (`text.safe_name`)."""
    if not value.strip():
        raise ValueError("a name must not be empty")
    if len(value) > MAX_NAME_CHARACTERS:  # first: the checks below quote the name
        raise ValueError(f"a name of {len(value)} characters is too long: at most "
                         f"{MAX_NAME_CHARACTERS}")
    if not value.strip("."):
        raise ValueError(f"{value!r} cannot be a name: it means a folder, not a file")
    # Cc: newline, tab, escape; Zl, Zp: the line and paragraph separators (U+2028, U+2029).
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value):
        raise ValueError(f"{value!r} contains a control character (a newline, a tab, an "
                         "escape): a name is one line of text")
    if direction := next((ch for ch in value if unicodedata.bidirectional(ch) in
                          DIRECTION_CONTROLS), None):
        raise ValueError(f"{value!r} contains a text-direction control (U+{ord(direction):04X})"
                         ": tables and file listings would show the name reordered")
    saved_as = safe_name(value)
    if (size := len(saved_as.encode())) > MAX_NAME_BYTES:
        raise ValueError(f"too long as a file name: {size} bytes in UTF-8, at most "
                         f"{MAX_NAME_BYTES} (shorten it)")
    if not any(_visible(ch) for ch in value):
        points = " ".join(f"U+{ord(ch):04X}" for ch in value[:8])
        raise ValueError(f"a name of {points} shows nothing: a name needs a character that "
                         "can be seen, or its rows would look empty")
    if saved_as.split(".")[0].casefold() in _WINDOWS_DEVICES:
        raise ValueError(f"{value!r} cannot be a name: Windows reserves it for a device "
                         "(CON, PRN, AUX, NUL, COM1-9, LPT1-9), so its files could not be "
                         "written there")
    return value


# Names Windows gives to devices, whatever follows a dot ("nul.png" is the device too).
_WINDOWS_DEVICES = frozenset(["con", "prn", "aux", "nul"] + [
    f"{port}{n}" for port in ("com", "lpt") for n in "123456789\u00b9\u00b2\u00b3"])

# Letters drawn as nothing: the Hangul fillers and the blank Braille pattern.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _visible(ch: str) -> bool:
    """Whether a character is drawn: not a space, a format character (zero-width space,
    joiner), a combining mark on its own or a blank letter."""
    return not (ch.isspace() or ch in _BLANK_LETTERS
                or unicodedata.category(ch) in ("Cf", "Mn", "Me", "Zs"))


Name = Annotated[str, AfterValidator(_a_name)]
# A seed is stored as a 64-bit signed integer (the store's INTEGER column).
SEED_RANGE = (-(2**63), 2**63 - 1)
Seed = Annotated[Int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]
Positive = Annotated[Float, Field(gt=0.0)]
Rate = Annotated[Float, Field(ge=0.0, lt=1.0)]
Probability = Annotated[Float, Field(ge=0.0, le=1.0)]
NonNegative = Annotated[Float, Field(ge=0.0)]

IMAGE_SIZE = 28  # every model takes square one-channel images of this side (Fashion-MNIST's)
N_CLASSES = 10  # classes of a study's data: fashionlab.data.CLASS_NAMES, labels 0..9
# The most parameters a model may have (~400 MB of float32 weights, ~1.6 GB to train with
# Adam): far beyond anything that pays on 28x28 images, and a typo (units = 100000000) is
# refused when the file is read instead of failing to allocate once the run has started.
MAX_PARAMETERS = 100_000_000


_TYPE_WORDS = {"int_type": "a whole number", "float_type": "a number",
               "finite_number": "a finite number", "string_type": "a string",
               "bool_type": "true or false"}


def first_problem(error: ValidationError) -> tuple[tuple[str | int, ...], str, dict[str, Any]]:
    """The first problem of a validation error: where (a `FieldValueError`'s path below the
    field included), what (pydantic's "Value error, " prefix dropped), and pydantic's record."""
    errors = error.errors()
    first = dict(errors[0])
    loc, message = tuple(first["loc"]), str(first["msg"]).removeprefix("Value error, ")
    # A value that fits no member of a union (int | float, a search value's types): say what
    # the union takes, not what its first member does ("a valid integer" for 0.5).
    members = [e for e in errors if len(e["loc"]) == len(loc) and e["loc"][:-1] == loc[:-1]]
    if len(members) > 1 and all(e["type"] in _TYPE_WORDS for e in members):
        words = list(dict.fromkeys(_TYPE_WORDS[e["type"]] for e in members))
        if "a whole number" in words and {"a number", "a finite number"} & set(words):
            words.remove("a whole number")
        message = f"input should be {', '.join(words[:-1])} or {words[-1]}" \
            if len(words) > 1 else f"input should be {words[0]}"
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldValueError):
        loc, message = loc + cause.path, cause.message
    return loc, message, first


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True, config=_STRICT)
class DenseLayer:
    units: PositiveInt  # hidden units, ReLU activation
    l2: NonNegative = 0.0  # adds l2 * sum(W**2) of this layer's kernel to the loss (Keras L2)
    dropout: Rate = 0.0  # dropout rate applied after the activation


@dataclass(frozen=True, config=_STRICT)
class ConvLayer:
    filters: PositiveInt  # output channels
    kernel: PositiveInt = 3  # square kernel size
    padding: Literal["valid", "same"] = "valid"
    batch_norm: Bool = False  # BatchNorm after the convolution, before the activation
    pool: PositiveInt = 1  # max-pool size after the activation (1 = no pooling)
    l2: NonNegative = 0.0  # L2 on the kernel, as for dense layers
    # Batch norm on the pooled map (convolution, max-pool, batch norm, ReLU): pool**2 times less
    # normalising, forward and backward, where maps are largest. Another model, not a faster
    # route to the same one: the statistics are those of the pooled activations.
    norm_after_pool: Bool = False
    # A residual connection: the layer's input is added to its activation, input + ReLU(batch
    # norm(conv(input))), then max-pooled. Keeps the map's size and channels ("same" padding,
    # as many filters as its input has), so a deeper network trains as easily as a shallow one.
    residual: Bool = False


def conv_sides(conv: Sequence[ConvLayer], size: int = IMAGE_SIZE) -> list[tuple[int, int]]:
    """(side after the convolution, side after the pooling) of each conv layer, for a square
    input of `size` pixels; a side below 1 means nothing is left after that layer.

    "valid" loses kernel - 1 pixels, "same" none (the kernel is odd: see ModelSpec); max-pooling
    keeps whole windows only (floor), as torch's max_pool2d does.
    """
    sides = []
    for layer in conv:
        convolved = size - layer.kernel + 1 if layer.padding == "valid" else size
        size = convolved // layer.pool
        sides.append((convolved, size))
    return sides


@dataclass(frozen=True, config=_STRICT)
class ModelSpec:
    """Optional conv stack -> flatten -> dropout -> hidden dense layers -> Dense(10)."""

    # Convolution blocks, applied first; then dropout on the flattened features (the seed CNN
    # uses 0.3); then the hidden dense layers.
    conv: Annotated[tuple[ConvLayer, ...], Field(max_length=MAX_LAYERS)] = ()
    dropout: Rate = 0.0
    layers: Annotated[tuple[DenseLayer, ...], Field(max_length=MAX_LAYERS)] = ()
    n_classes: PositiveInt = N_CLASSES  # output units (softmax)
    # Test-time augmentation, wherever the model is scored or used (validation, test, evaluate,
    # predict, export): "flip" averages the logits of each image and its mirror image;
    # "flip-shift" also those of the image moved by one pixel up, down, left and right, each
    # with its mirror image (10 views: 5x the scoring cost of no TTA).
    tta: TestTimeAugmentation = "none"
    # How kernels start (biases start at 0 either way): "glorot", Keras' default, uniform in
    # +-sqrt(6 / (fan_in + fan_out)); "pytorch", PyTorch's default for its layers, uniform in
    # +-sqrt(1 / fan_in). Kernels followed by batch norm compute the same at any scale, but
    # Adam's steps are a set size: smaller kernels move further per step.
    init: KernelInit = "glorot"

    @model_validator(mode="after")
    def _fits_the_image(self) -> ModelSpec:
        """Shape mistakes surface here, not as a traceback once a run has started."""
        side = IMAGE_SIZE
        for i, (layer, (convolved, pooled)) in enumerate(zip(self.conv, conv_sides(self.conv))):
            if layer.padding == "same" and layer.kernel % 2 == 0:
                # Training's padding="same" pads an even kernel unevenly (one pixel more on the
                # right and bottom); build_module's nn.Conv2d, which predict and export use, pads
                # kernel // 2 on both sides: a saved model would compute something else.
                raise FieldValueError(("conv", i, "kernel"), f'padding "same" needs an odd '
                                      f"kernel (got {layer.kernel})")
            if convolved < 1:
                raise FieldValueError(("conv", i), f"kernel {layer.kernel} is larger than its "
                                      f"{side}x{side} input: nothing is left (use a kernel of "
                                      f'at most {side}, or padding = "same")')
            if layer.norm_after_pool and not (layer.batch_norm and layer.pool > 1):
                raise FieldValueError(("conv", i, "norm_after_pool"), "needs batch_norm = true "
                                      "and a pool above 1: there is no pooling to normalise after")
            if layer.residual:
                channels = self.conv[i - 1].filters if i else 1
                if layer.padding != "same" or layer.filters != channels:
                    raise FieldValueError(("conv", i, "residual"), f'needs padding = "same" and '
                                          f"as many filters as its input has channels "
                                          f"({channels}), to add its input to its output")
                if layer.norm_after_pool:
                    raise FieldValueError(("conv", i, "norm_after_pool"), "a residual layer "
                                          "pools after adding its input: nothing to normalise")
            if pooled < 1:
                raise FieldValueError(("conv", i), f"pool {layer.pool} is larger than the "
                                      f"{convolved}x{convolved} feature map it gets ({side}x{side} "
                                      f"in, kernel {layer.kernel}): nothing is left")
            side = pooled
        counts = layer_parameters(self)
        if sum(counts.values()) > MAX_PARAMETERS:
            largest = max(counts, key=counts.__getitem__)
            raise FieldValueError(largest, f"the model would have {sum(counts.values()):,} "
                                  f"parameters, more than the {MAX_PARAMETERS:,} fashionlab "
                                  f"trains ({counts[largest]:,} in this layer"
                                  f"{self._flattened_input(largest)})")
        return self

    def _flattened_input(self, layer: tuple[str | int, ...]) -> str:
        """Why the first dense layer (or the output layer, when there is none) is large when
        its input, the flattened conv stack (the last conv layer's filters x side x side), is
        what makes it so: more features than the layer has units, which the conv layers'
        filters, pooling or padding shrink, not the layer's units."""
        first_dense = ("layers", 0, "units") if self.layers else ("n_classes",)
        if not self.conv or layer != first_dense:
            return ""
        last, side = len(self.conv) - 1, conv_sides(self.conv)[-1][1]
        filters = self.conv[last].filters
        units = self.layers[0].units if self.layers else self.n_classes
        if filters * side * side <= units:
            return ""
        return (f", fed by conv[{last}]'s {filters} x {side} x {side} = "
                f"{filters * side * side:,} flattened features: fewer filters or more "
                f"pooling shrink them")

    @property
    def kind(self) -> Literal["conv", "dense"]:
        return "conv" if self.conv else "dense"

    def shape_key(self) -> tuple[Any, ...]:
        """What must be equal for two models to be trained as one stacked model.

        Regularisation rates (L2, dropout) may differ between stacked members; layer sizes,
        kernels, padding, pooling and batch norm (and where it is) may not.
        """
        conv = tuple((c.filters, c.kernel, c.padding, c.batch_norm, c.pool, c.norm_after_pool,
                      c.residual) for c in self.conv)
        return (conv, tuple(layer.units for layer in self.layers), self.n_classes, self.tta,
                self.init)


def layer_parameters(spec: ModelSpec) -> dict[tuple[str | int, ...], int]:
    """Trainable parameters of each layer of `spec`, keyed by the field that sizes it
    (("conv", i, "filters"), ("layers", i, "units"), ("n_classes",)); their sum is the count of
    `models.build_module(spec).parameters()`, computed without torch."""
    counts: dict[tuple[str | int, ...], int] = {}
    channels, side = 1, IMAGE_SIZE
    for i, (layer, (_, side)) in enumerate(zip(spec.conv, conv_sides(spec.conv))):
        # A kernel, then a bias, or batch norm's scale and shift instead of it.
        extra = 2 * layer.filters if layer.batch_norm else layer.filters
        counts[("conv", i, "filters")] = layer.filters * channels * layer.kernel**2 + extra
        channels = layer.filters
    width = channels * side * side
    for i, layer in enumerate(spec.layers):
        counts[("layers", i, "units")] = (width + 1) * layer.units
        width = layer.units
    counts[("n_classes",)] = (width + 1) * spec.n_classes
    return counts


# --------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True, config=_STRICT)
class EarlyStopping:
    """Stop a model when the monitored metric stops improving; its result is its best epoch."""

    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: PositiveInt = 10  # epochs without improvement before stopping
    min_delta: NonNegative = 0.0  # the improvement that counts
    relative: Bool = False  # min_delta as a fraction of the best value (0.02 = the 2% rule)
    restore_best: Bool = True  # keep the weights of the best epoch, not the last


@dataclass(frozen=True, config=_STRICT)
class Augment:
    """Data augmentation applied to training batches (never to validation or test data)."""

    crop: Annotated[Int, Field(ge=0, le=8)] = 0  # pad by this many pixels, then random 28x28 crop
    flip: Bool = False  # random horizontal flips
    # Random erasing (Zhong et al., 2020): the probability that an image has one rectangle set
    # to 0 (the background), of 2-33% of its area and aspect ratio 0.3-3.3, torchvision's
    # RandomErasing defaults. 0: off.
    erase: Probability = 0.0


@dataclass(frozen=True, config=_STRICT)
class TrainSpec:
    epochs: Annotated[Int, Field(gt=0, le=MAX_EPOCHS)] = 40
    batch_size: PositiveInt = 128
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: Positive = 1e-3
    beta1: Rate = 0.9  # Adam's first-moment decay
    beta2: Rate = 0.999  # Adam's second-moment decay
    eps: Positive = 1e-7  # Keras' default, not PyTorch's 1e-8
    momentum: Rate = 0.9  # SGD only
    weight_decay: NonNegative = 0.0  # decoupled weight decay on kernels (adamw, sgd)
    schedule: Literal["constant", "onecycle"] = "constant"  # onecycle peaks at learning_rate
    label_smoothing: Rate = 0.0
    augment: Augment = Augment()
    # bf16: autocast matrix products and convolutions to bfloat16 (weights, loss and optimiser
    # stay fp32); auto: bf16 where the device computes it natively, else fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    early_stopping: EarlyStopping | None = None
    # An exponential moving average of the weights (and batch-norm statistics), updated after
    # every step with this decay: w_avg <- decay * w_avg + (1 - decay) * w. The averaged weights
    # are the ones validated, tested and saved. 0: off.
    ema: Rate = 0.0


# --------------------------------------------------------------------------------------------
# Study


def _a_directory(value: str) -> str:
    if not value.strip():  # "" would read as "not given": the default data, silently
        raise ValueError("must not be empty (leave it out for the default data)")
    return value


@dataclass(frozen=True, config=_STRICT)
class DataSpec:
    # IDX files; None: FASHIONLAB_DATA, the cache, Debian, download
    directory: Annotated[str, AfterValidator(_a_directory)] | None = None
    verify: Bool = True  # check the Fashion-MNIST checksums (turn off for other IDX datasets)
    train_limit: PositiveInt | None = None  # use only the first N training samples
    test_limit: PositiveInt | None = None  # use only the first N test samples


@dataclass(frozen=True, config=_STRICT)
class CVSpec:
    n_splits: Annotated[Int, Field(ge=2)] = 5
    strategy: Literal["contiguous", "shuffled", "stratified"] = "contiguous"
    # repeated k-fold: each repeat reshuffles (seeded); not contiguous
    repeats: Annotated[Int, Field(gt=0, le=MAX_REPEATS)] = 1

    @model_validator(mode="after")
    def _repeats_need_shuffling(self) -> CVSpec:
        if self.repeats > 1 and self.strategy == "contiguous":
            raise ValueError("repeats > 1 needs strategy 'shuffled' or 'stratified'")
        return self


@dataclass(frozen=True, config=_STRICT)
class WarningRule:
    """The overfitting warning: the first epoch i such that none of the next `patience` epochs
    has a mean val_loss below (1 - min_delta) * val_loss[i]."""

    patience: PositiveInt = 10
    min_delta: Rate = 0.02


@dataclass(frozen=True, config=_STRICT)
class Candidate:
    name: Name
    model: ModelSpec
    train: TrainSpec

    @model_validator(mode="after")
    def _fits_the_study(self) -> Candidate:
        """What a model may be on its own (a saved one) but not in a study: checked here."""
        model = self.model
        if model.n_classes != N_CLASSES:
            # Fewer outputs than labels fail in the loss; more give a model that cannot be
            # loaded back with the data's class names.
            raise FieldValueError(("model", "n_classes"), f"the data has {N_CLASSES} classes "
                                  f"(got {model.n_classes})")
        if model.dropout and not model.conv:
            raise FieldValueError(("model", "dropout"), "drops flattened conv features, and "
                                  "this model has no conv layers: set dropout on its layers")
        return self


@dataclass(frozen=True, config=_STRICT)
class RetrainSpec:
    """Retrain the best candidate on all training data and evaluate it on the test set."""

    enabled: Bool = True
    # The CV-consensus epoch count, from the best candidate's mean val_loss curve across folds
    # (over the epochs every fold reached, when early stopping ended folds at different times):
    # "warning": the warning rule's epoch (the lowest mean val_loss when it never fires);
    # "lowest": the epoch of the lowest mean val_loss; an integer: exactly that many epochs.
    epochs: Annotated[Int, Field(gt=0, le=MAX_EPOCHS)] | Literal["warning", "lowest"] = "warning"

    @field_validator("epochs", mode="before")
    @classmethod
    def _epochs_kind(cls, value: Any) -> Any:
        # Said once here, instead of pydantic's first failed alternative ("a valid integer").
        if value not in ("warning", "lowest") and (isinstance(value, bool)
                                                   or not isinstance(value, int)):
            raise ValueError(f'must be a number of epochs, "warning" or "lowest" '
                             f"(got {toml_value(value)})")
        return value


Scalar = int | float | str | bool


@dataclass(frozen=True, config=_STRICT)
class ParamSpec:
    """One parameter of a search space: a range (`low`, `high`, `log`, `step`), a list of
    `choices`, or a fixed `value` (a bare value in the file). Names and the values each
    parameter takes are checked against fashionlab.vocabulary."""

    # Strict, as every number of a study file: "0.001", true or inf are no bound or step.
    low: Int | Float | None = None
    high: Int | Float | None = None
    log: Bool = False  # sample on a log scale (needs low > 0)
    step: Int | Float | None = None  # sample a grid low, low + step, ... <= high
    choices: tuple[Scalar, ...] | None = None
    value: Scalar | None = None  # fixed: not searched
    shared: Bool = False  # per-layer parameters: one value for every layer (units, not units_0..)

    @model_validator(mode="before")
    @classmethod
    def _bare_value(cls, data: Any) -> Any:
        if isinstance(data, list):  # no value of any parameter is a list
            raise ValueError(  # noqa: TRY004 - pydantic reports ValueError, not TypeError
                f"a list of values to choose from is written choices = {shortened(repr(data))}")
        # A bare value in the file (a table, or ParamSpec(...) and dataclasses.replace in code,
        # as `--quick` makes one, are the fields themselves).
        scalar = str | int | float | bool | datetime.date | datetime.time  # TOML's values
        return {"value": data} if isinstance(data, scalar) else data


@dataclass(frozen=True, config=_STRICT)
class ReferenceSpec:
    """A score the search's best is tested against: a published number, and/or a candidate of
    a finished study in the same store with identical folds (same [cv], [data] and seed)."""

    score: Float | None = None  # e.g. 0.895: a one-sample test of the best's per-fold scores
    label: Name = "reference"  # how tables name it (one line, as any name)
    study: Name | None = None  # name of a finished study run in the store: a paired test
    candidate: Name | None = None  # that study's candidate (default: its best)

    @model_validator(mode="after")
    def _something_to_compare_with(self) -> ReferenceSpec:
        if self.candidate is not None and self.study is None:
            raise FieldValueError(("candidate",), "names a candidate of the reference study: "
                                  "give study too")
        if self.score is None and self.study is None:
            raise FieldValueError((), "compares with nothing: give a score, a study, or both")
        return self


@dataclass(frozen=True, config=_STRICT)
class SearchSpec:
    """An automated search (Optuna) over variations of one candidate, scored by its CV."""

    base: str | None = None  # the candidate the search varies; None: the first candidate
    space: dict[str, ParamSpec] = dataclasses.field(default_factory=dict)
    n_trials: PositiveInt | None = None  # finished (complete + pruned) trials, all workers
    timeout: Positive | None = None  # seconds; per worker process
    # Budgets: no trial starts once any one is spent (by the finished and running trials).
    budget: PositiveInt | None = None  # fold-epochs (one epoch of one fold's model)
    budget_seconds: Positive | None = None  # wall seconds of training, all workers summed
    budget_tflop: Positive | None = None  # estimated training arithmetic, 1e12 FLOP
    sampler: Literal["tpe", "random", "grid", "cmaes"] = "tpe"
    # median-compute: the median rule with trials compared at equal training FLOP, not epochs
    pruner: Literal["median", "median-compute", "wilcoxon", "none"] = "median"
    objective: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    seed: Seed | None = None  # None: the study's seed
    startup_trials: Annotated[Int, Field(ge=0)] = 5  # random trials first (TPE); no pruning
    warmup: Annotated[Int, Field(ge=0)] = 5  # epochs (median) or folds (wilcoxon) never pruned
    start_with_base: Bool = True  # the first trial is the base candidate itself
    top: PositiveInt = 10  # trials in the final table
    reference: ReferenceSpec | None = None

    @field_validator("space")
    @classmethod
    def _known_parameters(cls, space: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        check_space(space)
        return space

    @model_validator(mode="after")
    def _grid_needs_points(self) -> SearchSpec:
        check_varies(self.space)
        if self.sampler == "grid":
            check_grid(self.space)
        return self

    @model_validator(mode="after")
    def _reference_is_a_score_of_the_objective(self) -> SearchSpec:
        score = None if self.reference is None else self.reference.score
        if score is None:
            return self
        if self.objective == "val_accuracy" and not 0.0 <= score <= 1.0:
            raise FieldValueError(("reference", "score"), "an accuracy is a fraction in [0, 1], "
                                  f"as the objective val_accuracy is (got {score}; for 89.5% "
                                  "write 0.895)")
        if self.objective == "val_loss" and score < 0.0:
            raise FieldValueError(("reference", "score"), f"a loss is not negative (got {score})")
        return self


@dataclass(frozen=True, config=_STRICT)
class StudySpec:
    name: Name
    seed: Seed = 0
    data: DataSpec = DataSpec()
    cv: CVSpec = CVSpec()
    warning: WarningRule = WarningRule()
    candidates: tuple[Candidate, ...] = ()  # compared by cross-validation
    retrain: RetrainSpec = RetrainSpec()
    final: tuple[Candidate, ...] = ()  # trained on all training data, validated on the test set
    search: SearchSpec | None = None  # `fashionlab search`: an automated search over a candidate

    @model_validator(mode="after")
    def _search_fits_its_base(self) -> StudySpec:
        if self.search is None:
            return self
        names = [c.name for c in self.candidates]
        if self.search.base is not None and self.search.base not in names:
            raise FieldValueError(("search", "base"), f"no candidate named {self.search.base!r} "
                                  f"(candidates: {', '.join(names) or 'none'})")
        if not names:
            raise FieldValueError(("search",), "a search varies a candidate: add [[candidates]]")
        check_base(self.search.space, base_candidate(self))
        return self

    @model_validator(mode="after")
    def _names_unique(self) -> StudySpec:
        names = [c.name for c in self.candidates + self.final]
        duplicates = sorted(n for n, count in collections.Counter(names).items() if count > 1)
        if duplicates:
            raise ValueError(f"model names must be unique (repeated: {', '.join(duplicates)})")
        # The retrained best is shown as "NAME (retrained)" in every table, figure and export.
        shown = sorted({f"{c.name} (retrained)" for c in self.candidates} & set(names))
        if shown:
            original = shown[0].removesuffix(" (retrained)")
            raise ValueError(f"model names must differ from a retrained candidate's: "
                             f"{shown[0]!r} is how the retrained {original!r} is shown")
        files: dict[str, list[str]] = {}
        for name in dict.fromkeys(names):
            # casefold: "Wide" and "wide" are one file on macOS's and Windows' file systems;
            # Windows drops a name's trailing dots too ("m." is "m"); NFC: "café" written with
            # a combining accent looks the same and is one file name on macOS
            key = safe_name(unicodedata.normalize("NFC", name)).casefold().rstrip(".")
            files.setdefault(key or name, []).append(name)
        for same in files.values():
            if len(same) > 1:  # their models, figures and logs would overwrite each other
                saved = {safe_name(n) for n in same}
                quoted = [repr(n) for n in same]
                if len({unicodedata.normalize("NFC", n) for n in same}) < len(same):
                    quoted = [ascii(n) for n in same]  # alike to the eye: their code points
                raise ValueError(f"model names must differ as file names too: "
                                 f"{' and '.join(quoted)} are all saved as "
                                 + (repr(saved.pop()) if len(saved) == 1 else
                                    "one file where case (macOS, Windows), how an accent is "
                                    "encoded (macOS) or a name's trailing dots (Windows) "
                                    "are ignored"))
        if not self.candidates and not self.final:
            raise ValueError("a study needs at least one entry in [[candidates]] or [[final]]")
        return self

    @model_validator(mode="after")
    def _folds_fit_the_data(self) -> StudySpec:
        limit = self.data.train_limit
        if limit is not None and self.cv.n_splits > limit:
            raise FieldValueError(("cv", "n_splits"), f"{self.cv.n_splits} folds need at least "
                                  f"{self.cv.n_splits} training samples (data.train_limit is "
                                  f"{limit})")
        return self

    @model_validator(mode="after")
    def _pruning_can_prune(self) -> StudySpec:
        folds = self.cv.n_splits * self.cv.repeats
        if self.search is not None and self.search.pruner == "wilcoxon" and \
                folds < WILCOXON_MIN_FOLDS:
            # The exact one-sided test's smallest p with n folds is 1/2**n: 0.125 with 3,
            # above the pruner's threshold of 0.1. It would prune nothing, silently.
            raise FieldValueError(("search", "pruner"), f"wilcoxon compares a trial's folds "
                                  f"and can prune nothing with {folds} folds (its smallest p is "
                                  f"{0.5 ** folds:g}, above its threshold of "
                                  f"{WILCOXON_P_THRESHOLD}): it needs {WILCOXON_MIN_FOLDS} or "
                                  "more folds; use pruner = \"median\"")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the resolved configuration: equal configs, equal fingerprints.

        Where the data are read from is left out (hashed as the default, None): a study whose
        data folder moved is the same study. Its runs record the data's SHA-256, which is what
        decides whether a run's data are the same (`steps.same_data`)."""
        settings = self.to_dict()
        settings["data"]["directory"] = None
        text = json.dumps(_without_later_defaults(settings), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# The Wilcoxon pruner prunes a trial when the signed-rank test of its folds against the best
# trial's gives p below this; the exact test needs this many folds for a p that small.
WILCOXON_P_THRESHOLD = 0.1
WILCOXON_MIN_FOLDS = 4


# Settings added after studies were first stored, with the value that means "as before". At that
# value they are left out of the fingerprint, so a study written before them keeps its
# fingerprint: its stored runs still resume, and compare as the same study.
LATER_DEFAULTS: dict[str, Any] = {"tta": "none", "ema": 0.0, "norm_after_pool": False,
                                  "erase": 0.0, "residual": False, "init": "glorot"}


def _without_later_defaults(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_later_defaults(item) for key, item in value.items()
                if not (key in LATER_DEFAULTS and item == LATER_DEFAULTS[key])}
    if isinstance(value, (list, tuple)):
        return [_without_later_defaults(item) for item in value]
    return value


def base_candidate(spec: StudySpec) -> Candidate:
    """The candidate a study's search varies: `[search] base`, else the first candidate."""
    search = spec.search
    name = search.base if search is not None and search.base else spec.candidates[0].name
    return next(c for c in spec.candidates if c.name == name)


def toml_value(value: Any) -> str:
    """A value as the file spells it (true, "64", nan), not as Python does (True, '64')."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # a TOML basic string; separators, direction controls escaped
        return "".join(ch if unicodedata.category(ch) not in ("Zl", "Zp", "Cf") else
                       f"\\u{ord(ch):04x}" for ch in json.dumps(value, ensure_ascii=False))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    if isinstance(value, datetime.date | datetime.time):  # TOML's dates: 1979-05-27
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(toml_value(v) for v in value)}]"
    if isinstance(value, Mapping):
        return f"{{ {', '.join(f'{k} = {toml_value(v)}' for k, v in value.items())} }}"
    return repr(value)
