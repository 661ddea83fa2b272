"""Export a trained model to ONNX, checked against PyTorch with onnxruntime.

    export_onnx(load_model("runs/<id>/models/cnn"), "cnn.onnx")
    export_model(load_model("runs/<id>/models/cnn"), "cnn.onnx").to_dict()  # what it measured

The ONNX graph has one input, `image` (batch, 1, 28, 28) float32 in [0, 1] (a light item on
black, as `fashionlab.predict` prepares it), and one output, `logits` (batch, n_classes); the
batch dimension is dynamic. Softmax of the logits gives the class probabilities. The class
names, preprocessing and architecture are stored in the file's metadata (`class_names`,
`preprocessing` and `spec`, as JSON strings).

Needs the optional packages onnx, onnxscript and onnxruntime (`pip install 'fashionlab[onnx]'`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fashionlab import stops
from fashionlab.artifacts import PREPROCESSING, SavedModel, as_saved_model
from fashionlab.errors import FashionlabError
from fashionlab.serialize import folder_blocked, fresh_staging_path, why_not_written
from fashionlab.text import first_line

__all__ = ["DEFAULT_OPSET", "TOLERANCE", "ExportError", "OnnxExport", "export_model", "export_onnx",
           "verify_onnx"]

DEFAULT_OPSET = 18  # the oldest ONNX opset torch's exporter writes without converting
TOLERANCE = 1e-5  # largest absolute difference allowed between ONNX and PyTorch logits
VERIFY_BATCHES = (1, 7, 64)  # batch sizes checked: a single image, an odd size, a larger one
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class ExportError(FashionlabError):
    """The model cannot be exported, or the exported file does not compute what PyTorch does."""


@dataclass(frozen=True)
class OnnxExport:
    """An ONNX file written by `export_model`, and what writing it measured."""

    model: str  # the exported model's directory
    path: Path
    opset: int
    bytes: int
    max_abs_diff: float | None  # onnxruntime against PyTorch; None when not verified
    seconds: float  # exporting and saving, verification excluded

    def to_dict(self) -> dict[str, object]:
        """What `fashionlab export --json` prints."""
        return {"model": self.model, "format": "onnx", "path": str(self.path),
                "opset": self.opset, "bytes": self.bytes, "max_abs_diff": self.max_abs_diff,
                "seconds": self.seconds}


def _require_onnx() -> None:
    try:
        with stops.kept():  # a stop while onnxruntime's native module starts is no ImportError
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(f"ONNX export needs the optional packages onnx, onnxscript and "
                          f"onnxruntime ({error}); install them with "
                          "pip install 'fashionlab[onnx]'") from None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress lines and deprecation chatter; errors still raise. (An
    opset it cannot convert to is logged with a traceback by onnxscript, then the file is
    written at its native opset: `export_onnx` checks the opset instead.)"""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL if logger.name == "onnxscript" else logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _newest_opset() -> int:
    import onnx

    return onnx.defs.onnx_opset_version()


def export_onnx(saved_model: SavedModel | str | Path, path: str | Path, *,
                opset: int = DEFAULT_OPSET, verify: bool = True) -> Path:
    """Write `saved_model` (or the model in that directory) as an ONNX file with a dynamic
    batch dimension; returns the path.

    With `verify` (the default), onnxruntime runs the file on random images of several batch
    sizes before it takes its final name; an output further than TOLERANCE from PyTorch's
    raises ExportError and leaves nothing at `path`.
    """
    return export_model(saved_model, path, opset=opset, verify=verify).path


def export_model(saved_model: SavedModel | str | Path, path: str | Path, *,
                 opset: int = DEFAULT_OPSET, verify: bool = True) -> OnnxExport:
    """`export_onnx`, returning what the export measured: the file's size, the time it took
    and onnxruntime's largest difference from PyTorch."""
    _require_onnx()
    start = time.perf_counter()
    if not isinstance(opset, int) or isinstance(opset, bool):  # "18" would fail in the exporter
        raise TypeError(f"opset: expected an int (e.g. {DEFAULT_OPSET}), got "
                        f"{type(opset).__name__} {opset!r}")
    saved_model = as_saved_model(saved_model)
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path}: is a directory; name the .onnx file to write")
    if path.suffix.lower() != ".onnx":  # and no model.safetensors or photo is overwritten
        raise ExportError(f"{path}: an ONNX file's name ends in .onnx")
    if (blocked := folder_blocked(path)) is not None:
        raise ExportError(blocked)
    module = copy.deepcopy(saved_model.module).to("cpu").eval()  # the graph is device-free
    example = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # (B, 1, 28, 28)
    batch = torch.export.Dim("batch", min=1)
    # kept: the exporter turns a Ctrl-C that lands inside it into an export error of its own
    with stops.kept():
        try:
            with _quiet_exporter():
                program = torch.onnx.export(
                    module, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                    verbose=False)
        except Exception as error:  # noqa: BLE001 - the exporter raises many types: "cannot"
            raise ExportError(f"{saved_model.path}: ONNX export failed "
                              f"({first_line(error)})") from None
    written = program.model.opset_imports.get("", opset)
    if written != opset:  # the exporter fell back to its own opset instead of failing
        raise ExportError(f"--opset {opset}: the exporter cannot write this model at opset "
                          f"{opset} (it writes opsets {DEFAULT_OPSET}-{_newest_opset()} directly "
                          f"and converts down to older ones only where the model allows)")
    program.model.metadata_props.update({
        "class_names": json.dumps(list(saved_model.class_names)),
        "preprocessing": json.dumps(PREPROCESSING),
        "spec": json.dumps(asdict(saved_model.spec)),
        "producer": "fashionlab",
    })
    staging = fresh_staging_path(path)  # renamed once verified
    difference = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _quiet_exporter():
            program.save(staging, external_data=False)  # one self-contained file
        seconds = time.perf_counter() - start
        if verify:
            difference = verify_onnx(saved_model, staging, shown_as=path)
        os.replace(staging, path)
    except OSError as error:  # a read-only or full place
        raise ExportError(f"{path}: cannot write ({why_not_written(path, error)})") from None
    finally:
        # Nothing to remove in a read-only place (EROFS, not ENOENT): the error above stands.
        with contextlib.suppress(OSError):
            Path(staging).unlink(missing_ok=True)
    return OnnxExport(model=str(saved_model.path), path=path, opset=opset,
                      bytes=path.stat().st_size, max_abs_diff=difference, seconds=seconds)


def verify_onnx(saved_model: SavedModel, path: str | Path, *, tolerance: float = TOLERANCE,
                seed: int = 0, shown_as: str | Path | None = None) -> float:
    """Run an ONNX file and the PyTorch model on the same random images; returns the largest
    absolute difference of their logits, or raises ExportError above `tolerance`, naming the
    file `shown_as` (an export verifies its staging file under the name it will have)."""
    _require_onnx()
    import onnxruntime

    shown = path if shown_as is None else shown_as
    try:  # the bytes, not the name: onnxruntime takes no name the locale cannot encode
        model = Path(path).read_bytes()
    except OSError as error:
        raise ExportError(f"{shown}: cannot read ({error.strerror or error})") from None
    try:
        session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types (Fail, ...)
        raise ExportError(f"{shown}: onnxruntime cannot load it ({first_line(error)})") \
            from None
    # PyTorch on the CPU in float32 is the reference (a GPU's TF32 would blur the comparison).
    module = copy.deepcopy(saved_model.module).to("cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    largest = 0.0
    for size in VERIFY_BATCHES:
        x = torch.rand(size, 1, 28, 28, generator=generator)  # (B, 1, 28, 28) in [0, 1]
        with torch.inference_mode():
            expected = module(x).numpy()  # (B, n_classes)
        if not np.isfinite(expected).all():  # weights that overflow: every difference is NaN
            raise ExportError(f"{saved_model.path}: the model's outputs are not finite (NaN "
                              "or infinite logits on random images): its weights overflow")
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"{shown}: outputs of shape {got.shape} for a batch of {size}, "
                              f"PyTorch gives {expected.shape}")
        difference = float(np.abs(got - expected).max())  # NaN where onnxruntime's is
        if not difference <= tolerance:
            raise ExportError(f"{shown}: ONNX and PyTorch outputs differ by up to "
                              f"{difference:.3g} (allowed {tolerance:g})")
        largest = max(largest, difference)
    return largest
