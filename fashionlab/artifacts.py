"""Trained models on disk: weights as safetensors plus a JSON spec. Loading never unpickles.

A model directory holds:
    model.safetensors   the weights, keyed like `build_module(spec).state_dict()`
    model.json          the architecture, class names, preprocessing and training metadata
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fashionlab.config import ModelSpec
from fashionlab.errors import FashionlabError
from fashionlab.models import build_module

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"

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
    module: nn.Module  # in eval mode: (B, 1, 28, 28) float32 in [0, 1] -> (B, n_classes) logits
    spec: ModelSpec
    class_names: tuple[str, ...]
    metadata: dict[str, Any]  # study, candidate, epochs, seed, test accuracy, versions, ...
    path: Path


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
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              str(staging / WEIGHTS_FILE))
    description = {
        "format_version": FORMAT_VERSION,
        "spec": asdict(spec),
        "class_names": list(class_names),
        "preprocessing": PREPROCESSING,
        "metadata": metadata,
    }
    (staging / SPEC_FILE).write_text(json.dumps(description, indent=2, default=str) + "\n")
    if directory.exists():
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()
    os.replace(staging, directory)
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> SavedModel:
    """Read a model directory written by `save_model`."""
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    if not directory.is_dir():
        raise ModelFileError(f"{directory}: not a model directory")
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise ModelFileError(f"{path}: file not found")
    try:
        description = json.loads(spec_path.read_text())
        spec = TypeAdapter(ModelSpec).validate_python(description["spec"])
        class_names = tuple(description["class_names"])
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as error:
        raise ModelFileError(f"{spec_path}: not a valid model description ({error})") from None
    module = build_module(spec)
    try:
        state = load_file(str(weights_path), device=str(device))
        module.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as error:
        message = str(error).strip().splitlines()[0]
        raise ModelFileError(f"{weights_path}: weights do not fit the spec ({message})") from None
    module.to(device).eval()
    return SavedModel(module, spec, class_names, description.get("metadata", {}), directory)
