"""Trained models on disk: weights as safetensors plus a JSON spec. Loading never unpickles.

A model directory holds:
    model.safetensors   the weights, keyed like `build_module(spec).state_dict()`
    model.json          the architecture, class names, preprocessing and training metadata

Loading checks the spec against the safetensors header (names and shapes) before it allocates
anything, so a damaged or edited model.json is refused in one line instead of exhausting memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fashionlab.config import ModelSpec
from fashionlab.config.specs import first_problem
from fashionlab.errors import FashionlabError, OutputError
from fashionlab.hardware import resolve_device
from fashionlab.models import build_module, inference_module
from fashionlab.serialize import fresh_staging_path
from fashionlab.vocabulary import TestTimeAugmentation

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
MAX_CLASS_NAME = 100  # characters of a class name: a table's cell, not a paragraph

# How raw pixels become model input; stated in the file so that users of the model know.
PREPROCESSING = {
    "input": "grayscale 28x28, light item on a dark background (as in Fashion-MNIST)",
    "scale": "pixel / 255 -> float32 in [0, 1]",
    "layout": "(batch, 1, 28, 28)",
}


class ModelFileError(FashionlabError):
    """A model directory is missing, incomplete or malformed."""


@dataclass(frozen=True)
class SavedModel:
    # In eval mode, with the spec's test-time augmentation: (B, 1, 28, 28) float32 in [0, 1]
    # -> (B, n_classes) logits.
    module: nn.Module
    spec: ModelSpec
    class_names: tuple[str, ...]
    metadata: dict[str, Any]  # study, candidate, epochs, seed, test accuracy, versions, ...
    path: Path
    saved_tta: str | None = None  # the views its model.json names, where `tta=` replaced them


def save_model(
    directory: str | Path,
    *,
    spec: ModelSpec,
    state: dict[str, torch.Tensor],
    class_names: tuple[str, ...] | list[str],
    metadata: dict[str, Any],
) -> Path:
    """Write a model directory atomically (a half-written model never carries the final name)."""
    directory = Path(directory)
    staging = fresh_staging_path(directory)
    description = {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "class_names": list(class_names),
        "preprocessing": PREPROCESSING,
        "metadata": metadata,
    }
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # this process's, from a save that failed
        staging.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(staging / WEIGHTS_FILE))
        (staging / SPEC_FILE).write_text(json.dumps(description, indent=2, default=str) + "\n")
        # safetensors creates its file readable by its owner only (0600): given the
        # permissions of every other file (the umask's), a model shared with a group or a web
        # server loads.
        shutil.copymode(staging / SPEC_FILE, staging / WEIGHTS_FILE)
    except (OSError, SafetensorError) as error:
        # safetensors says a full disk as "Error while serializing: I/O error: No space left
        # on device (os error 28)"; any other of its errors is not the disk's.
        if isinstance(error, SafetensorError) and "I/O error: " not in str(error):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        reason = (error.strerror if isinstance(error, OSError) else None) \
            or str(error).rsplit("I/O error: ", 1)[-1].split(" (os error")[0]
        raise OutputError(f"{directory}: cannot save the model ({reason}); free some space "
                          "or fix the permissions and run the same command again: it "
                          "resumes") from None
    if directory.exists():  # the earlier save, out of the way in one rename, removed after
        previous = fresh_staging_path(directory.with_name(f"{directory.name}.previous"))
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(directory, previous)
        os.replace(staging, directory)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, directory)
    return directory


def load_model(directory: str | Path, device: str | torch.device | None = "cpu",
               tta: str | None = None) -> SavedModel:
    """Read a model directory written by `save_model`.

    `tta` scores the model with other test-time views than the ones it was trained with
    (`ModelSpec.tta`: "none", "flip", "flip-shift"; another value is a one-line ValueError
    naming them); the weights are the same, and the returned spec says which views are used.
    Every problem (a missing or malformed file, weights that do not fit the spec, a pickle in
    place of the safetensors file) raises ModelFileError naming the file.
    Nothing is unpickled: safetensors holds raw tensors only.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"load_model: expected a saved model's folder (a path), got "
                        f"{type(directory).__name__}")
    views = get_args(TestTimeAugmentation)
    if tta is not None and tta not in views:
        raise ValueError(f"tta must be one of {', '.join(map(repr, views))}, not {tta!r}")
    directory = Path(directory)
    # "auto" (or None) as everywhere; no CUDA: one clear error
    device = resolve_device(None if device is None else str(device))
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise ModelFileError(f"{directory}: not a model directory")
    for path in (spec_path, weights_path):
        if path.is_dir():
            raise ModelFileError(f"{path}: a folder, not a file")
        if not path.is_file():
            raise ModelFileError(f"{path}: file not found")
    spec, class_names, description = _read_description(spec_path)
    saved_tta = None
    if tta is not None:
        saved_tta, spec = spec.tta, dataclasses.replace(spec, tta=tta)
    # Names and shapes first, from the spec alone and the file's header: a spec that does not
    # fit the weights (units = 2,000,000) would otherwise allocate gigabytes before failing.
    expected = _expected_shapes(spec, spec_path)
    _check_header(weights_path, expected)
    module = build_module(spec)
    _load_weights(module, weights_path, device)
    module = inference_module(spec, module).to(device).eval()
    metadata = description.get("metadata") or {}
    return SavedModel(module, spec, class_names, metadata, directory, saved_tta)


def as_saved_model(model: SavedModel | str | os.PathLike[str],
                   device: str | torch.device | None = "cpu") -> SavedModel:
    """The model itself, or the one `load_model` reads from that directory."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device)
    if not isinstance(model, SavedModel):
        raise TypeError(f"model: expected a saved model (load_model(directory)) or its "
                        f"directory, got {type(model).__name__}")
    return model


def _read_description(path: Path) -> tuple[ModelSpec, tuple[str, ...], dict[str, Any]]:
    def invalid(problem: str) -> ModelFileError:
        return ModelFileError(f"{path}: not a valid model description ({problem})")

    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise invalid("not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise invalid(f"not JSON: {error}") from None
    except RecursionError:  # arrays nested thousands deep
        raise invalid("nested too deeply") from None
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read ({error.strerror or error})") from None
    if not isinstance(description, dict):
        raise invalid(f"a JSON {type(description).__name__}, expected an object")
    version = description.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise invalid("no integer 'format_version'")
    if version < 1:
        raise invalid(f"format_version {version}: formats are numbered from 1")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: written in model format {version} by a newer fashionlab; "
                             f"this one reads format {FORMAT_VERSION} (upgrade fashionlab)")
    for key in ("spec", "class_names"):
        if key not in description:
            raise invalid(f"missing key '{key}'")
    try:
        spec = TypeAdapter(ModelSpec).validate_python(description["spec"])
    except ValidationError as error:
        loc, message, _ = first_problem(error)
        raise invalid(f"{'.'.join(['spec', *map(str, loc)])}: {message}") from None
    names = description["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise invalid("'class_names' must be a list of strings")
    if len(names) != spec.n_classes:
        raise invalid(f"{len(names)} class names for a model with {spec.n_classes} outputs")
    # Each names a row of a table and a choice of predict's: one line, seen, unlike the others.
    for i, name in enumerate(names):
        if not name.strip() or len(name) > MAX_CLASS_NAME or any(
                unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in name):
            raise invalid(f"class name {i} ({name[:MAX_CLASS_NAME]!r}) must be one line of "
                          f"1 to {MAX_CLASS_NAME} characters")
    repeated = next((n for n in names if names.count(n) > 1), None)
    if repeated is not None:
        raise invalid(f"the class name {repeated!r} is given twice: each class needs its own")
    if not isinstance(description.get("metadata", {}), dict):
        raise invalid("'metadata' must be an object")
    return spec, tuple(names), description


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of `build_module(spec).state_dict()`, built on the meta
    device: nothing is allocated, however large the spec. ValueError for an impossible spec."""
    with torch.device("meta"):
        module = build_module(spec)
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def _expected_shapes(spec: ModelSpec, path: Path) -> dict[str, tuple[int, ...]]:
    try:
        shapes = expected_shapes(spec)
    except ValueError as error:  # e.g. a conv stack that shrinks the image to nothing
        raise ModelFileError(f"{path}: not a valid model description ({error})") from None
    return shapes


_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # safetensors' names


def _check_header(path: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Compare the tensor names and shapes in a safetensors header with `expected`; the
    header is read lazily (and checked against the file's size), the tensors are not."""
    try:
        with safe_open(str(path), framework="pt") as file:
            names = file.keys()  # a safetensors file is not iterable itself
            shapes = {name: tuple(file.get_slice(name).get_shape()) for name in names}
            dtypes = {name: file.get_slice(name).get_dtype() for name in names}
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    for name, dtype in dtypes.items():
        # Weights are floats; batch norm's step count (num_batches_tracked) is an integer.
        if dtype not in _FLOAT_DTYPES and not name.endswith("num_batches_tracked"):
            raise ModelFileError(f"{path}: {name} holds {dtype} values; weights are floating "
                                 "point (F32, BF16, F16 or F64)")
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    if missing or unexpected:
        problems = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        raise ModelFileError(f"{path}: weights do not fit the spec in model.json "
                             f"({'; '.join(problems)})")
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise ModelFileError(f"{path}: weights do not fit the spec in model.json ({key} has "
                                 f"shape {shapes[key]}, the spec needs {shape})")


def _unreadable(path: Path, error: Exception) -> ModelFileError:
    try:
        with path.open("rb") as file:
            head = file.read(4)  # not read_bytes(): the file may be huge
    except OSError as reading:  # safetensors says "No such file" of a file it may not read
        return ModelFileError(f"{path}: cannot read ({reading.strerror or reading})")
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a zip (torch.save) or a raw pickle
        return ModelFileError(f"{path}: a pickle (torch.save) file, not safetensors; "
                              "fashionlab loads only safetensors and never unpickles")
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelFileError(f"{path}: not a valid safetensors file ({message})")


def _load_weights(module: nn.Module, path: Path, device: str | torch.device) -> None:
    """Fill `module` from a safetensors file whose header `_check_header` accepted."""
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: {key} holds NaN or infinite values")
    module.load_state_dict(state)
