"""ONNX export: onnxruntime's outputs against PyTorch's (dense, and conv with batch norm),
the dynamic batch dimension, the metadata, failures, and `fashionlab export` end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli
from pydantic import TypeAdapter

from fashionlab.artifacts import SavedModel, load_model, save_model
from fashionlab.config import ConvLayer, DenseLayer, ModelSpec
from fashionlab.data import CLASS_NAMES
from fashionlab.export import ExportError, export_model, export_onnx, verify_onnx
from fashionlab.models import build_module

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

DENSE = ModelSpec(layers=(DenseLayer(32, dropout=0.2), DenseLayer(16)))
CONV_BN = ModelSpec(conv=(ConvLayer(8, batch_norm=True, pool=2),
                          ConvLayer(8, padding="same", batch_norm=True, pool=2), ConvLayer(12)),
                    dropout=0.3, layers=(DenseLayer(16),))


def _saved(directory: Path, spec: ModelSpec) -> SavedModel:
    """A model with random weights and batch-norm statistics far from their defaults."""
    module = build_module(spec).train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.rand(32, 1, 28, 28) * 3 + 0.5)  # running mean/var move off 0/1
    return load_model(save_model(directory, spec=spec, state=module.state_dict(),
                                 class_names=CLASS_NAMES, metadata={"study": "export test"}))


NORM_AFTER_POOL = ModelSpec(conv=(ConvLayer(8, batch_norm=True, pool=2, norm_after_pool=True),
                                  ConvLayer(8, padding="same", batch_norm=True, pool=2)),
                            layers=(DenseLayer(16),))


RESIDUAL = ModelSpec(conv=(ConvLayer(8, padding="same", batch_norm=True, pool=2),
                           ConvLayer(8, padding="same", batch_norm=True, residual=True, pool=14)))


@pytest.mark.parametrize("spec", [DENSE, CONV_BN, dataclasses.replace(CONV_BN, tta="flip"),
                                  dataclasses.replace(CONV_BN, tta="flip-shift"),
                                  NORM_AFTER_POOL, RESIDUAL],
                         ids=["dense", "conv-bn", "conv-bn-flip", "conv-bn-flip-shift",
                              "norm-after-pool", "residual"])
def test_onnx_matches_pytorch_within_1e_5(tmp_path: Path, spec: ModelSpec):
    saved = _saved(tmp_path / "model", spec)
    path = export_onnx(saved, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.onnx"]  # one file
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (image,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (image.name, logits.name) == ("image", "logits")
    assert isinstance(image.shape[0], str) and image.shape[1:] == [1, 28, 28]  # dynamic batch
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 5, 33):
        x = torch.rand(batch, 1, 28, 28, generator=generator)
        with torch.inference_mode():
            expected = saved.module(x).numpy()  # (batch, 10)
        (got,) = session.run(None, {"image": x.numpy()})
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= 1e-5
    assert verify_onnx(saved, path) <= 1e-5


def test_the_file_carries_class_names_and_spec(tmp_path: Path):
    _saved(tmp_path / "model", CONV_BN)
    proto = onnx.load(export_onnx(tmp_path / "model", tmp_path / "m.onnx"))  # its directory
    onnx.checker.check_model(proto)
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["class_names"]) == list(CLASS_NAMES)
    assert TypeAdapter(ModelSpec).validate_json(metadata["spec"]) == CONV_BN
    assert "preprocessing" in metadata


def test_a_file_that_differs_from_pytorch_is_caught(tmp_path: Path):
    first = _saved(tmp_path / "a", DENSE)
    other = _saved(tmp_path / "b", DENSE)  # same shape, other weights
    path = export_onnx(first, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="differ by up to"):
        verify_onnx(other, path)


def test_a_failed_check_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import fashionlab.export

    def fails(saved: SavedModel, path: Path, **options: object) -> float:
        raise ExportError(f"{path}: outputs differ")

    monkeypatch.setattr(fashionlab.export, "verify_onnx", fails)
    saved = _saved(tmp_path / "model", DENSE)
    with pytest.raises(ExportError):
        export_onnx(saved, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_missing_onnx_packages_are_one_clear_error(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]):
    saved = _saved(tmp_path / "model", DENSE)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    with pytest.raises(ExportError, match=r"pip install 'fashionlab\[onnx\]'"):
        export_onnx(saved, tmp_path / "m.onnx")
    code, _, err = run_cli(capsys, "export", str(saved.path))
    assert_one_line_error(code, err, "onnxruntime", "fashionlab[onnx]")


def test_a_stop_during_the_onnx_imports_is_the_stop_not_a_missing_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """SIGTERM while onnxruntime's native module initialises surfaces from the import as
    ImportError("initialization failed"): it is raised as the stop it is."""
    from fashionlab import stops

    saved = _saved(tmp_path / "model", DENSE)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the import fails...
    monkeypatch.setattr(stops, "received", [signal.SIGTERM])  # ...because a stop came
    with pytest.raises(KeyboardInterrupt):
        export_onnx(saved, tmp_path / "m.onnx")


def test_a_stop_inside_the_exporter_is_the_stop_not_an_export_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """torch.onnx catches the KeyboardInterrupt of a Ctrl-C that lands inside it and raises
    its own error ("Failed to export the model with torch.export", in terminal colours)."""
    from fashionlab import stops

    signals = [signal.SIGINT]

    def interrupted(*args: object, **kwargs: object) -> None:
        stops.received.extend(signals)  # what the command's handler records
        raise RuntimeError("Failed to export the model with torch.export. "
                           "\x1b[96mThis is step 1/3\x1b[0m of exporting the model to ONNX.")

    saved = _saved(tmp_path / "model", DENSE)
    monkeypatch.setattr(stops, "received", [])
    monkeypatch.setattr(torch.onnx, "export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(saved, tmp_path / "m.onnx")
    stops.received.clear()
    signals.clear()
    with pytest.raises(ExportError) as failure:  # the same error with no stop: a failure
        export_onnx(saved, tmp_path / "m.onnx")
    assert "step 1/3 of exporting" in str(failure.value) and "\x1b" not in str(failure.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_model_whose_outputs_overflow_is_not_exported(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    """Finite weights whose logits are infinite: every difference from onnxruntime's is NaN,
    which the check once read as 0 ("max |diff| 0")."""
    module = build_module(DENSE)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1e30)
    saved = load_model(save_model(tmp_path / "model", spec=DENSE, state=module.state_dict(),
                                  class_names=CLASS_NAMES, metadata={}))
    with pytest.raises(ExportError, match="outputs are not finite"):
        export_onnx(saved, tmp_path / "m.onnx")
    code, out, err = run_cli(capsys, "export", str(saved.path), "--out",
                             str(tmp_path / "m.onnx"))
    assert_one_line_error(code, err, "outputs are not finite")
    assert out == "" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_export_model_reports_what_it_measured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import fashionlab.export  # to count its verifications

    saved = _saved(tmp_path / "model", DENSE)
    calls: list[Path] = []
    verify = fashionlab.export.verify_onnx
    monkeypatch.setattr(fashionlab.export, "verify_onnx",
                        lambda model, path, **options: calls.append(Path(path))
                        or verify(model, path, **options))
    exported = export_model(saved, tmp_path / "m.onnx", opset=19)
    assert len(calls) == 1 and calls[0] != exported.path  # verified once, before its rename
    assert exported.path == tmp_path / "m.onnx" and exported.opset == 19
    assert exported.bytes == exported.path.stat().st_size and exported.seconds > 0
    assert 0 <= exported.max_abs_diff <= 1e-5
    assert exported.to_dict()["max_abs_diff"] == exported.max_abs_diff
    unchecked = export_model(saved, tmp_path / "n.onnx", verify=False)
    assert len(calls) == 1 and unchecked.max_abs_diff is None


def test_a_check_that_fails_names_the_file_asked_for_not_its_staging_file(tmp_path: Path):
    saved = _saved(tmp_path / "model", DENSE)
    other = _saved(tmp_path / "other", DENSE)  # the same shape, other weights
    path = export_onnx(saved, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match=r"^\S+b\.onnx: ONNX and PyTorch outputs differ"):
        verify_onnx(other, path, shown_as=tmp_path / "b.onnx")


@pytest.mark.skipif(sys.platform != "linux", reason="the C locale's ASCII is Linux's")
def test_an_export_to_a_name_the_c_locale_cannot_encode_is_written(tmp_path: Path):
    # LC_ALL=C with UTF-8 mode off: onnxruntime took no such name ("incompatible constructor
    # arguments", naming the staging file); it now gets the file's bytes.
    saved = _saved(tmp_path / "model", CONV_BN)
    environment = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    environment.pop("PYTHONIOENCODING", None)
    done = subprocess.run([sys.executable, "-c", "from fashionlab.console import main; main()",
                           "export", str(saved.path), "--out", str(tmp_path / "modèle.onnx")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=300, check=False, env=environment)
    assert done.returncode == 0, done.stderr
    assert verify_onnx(saved, tmp_path / "modèle.onnx") <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "modèle.onnx"]


def test_export_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    saved = _saved(tmp_path / "model", CONV_BN)
    code, out, err = run_cli(capsys, "export", str(saved.path), "--format", "onnx", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary) == {"model", "format", "path", "opset", "bytes", "max_abs_diff",
                            "seconds"}
    assert summary["path"] == str(saved.path / "model.onnx") and summary["format"] == "onnx"
    assert summary["max_abs_diff"] <= 1e-5 and summary["bytes"] == (
        saved.path / "model.onnx").stat().st_size
    assert load_model(saved.path).spec == CONV_BN  # the directory still loads
    code, out, _ = run_cli(capsys, "export", str(saved.path), "--out", str(tmp_path / "x.onnx"))
    assert code == 0 and f"wrote {tmp_path / 'x.onnx'}" in out and "max |diff|" in out
    deeper = tmp_path / "not" / "yet" / "x.onnx"  # its folders made, as `report --out` does
    code, out, _ = run_cli(capsys, "export", str(saved.path), "--out", str(deeper))
    assert code == 0 and deeper.read_bytes() == (tmp_path / "x.onnx").read_bytes()


def test_export_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    saved = _saved(tmp_path / "model", DENSE)
    (tmp_path / "a-file").write_text("not a folder")
    code, _, err = run_cli(capsys, "export", str(saved.path), "--out",
                           str(tmp_path / "a-file" / "sub" / "m.onnx"))
    assert_one_line_error(code, err, f"{tmp_path / 'a-file'} is a file, not a folder")
    assert (tmp_path / "a-file").read_text() == "not a folder"
    code, _, err = run_cli(capsys, "export", str(saved.path), "--out", "/sys/m.onnx")
    assert_one_line_error(code, err, "/sys: cannot write there (Permission denied)")
    code, _, err = run_cli(capsys, "export", str(saved.path), "--out", str(tmp_path))
    assert_one_line_error(code, err, "is a directory")
    for target in (saved.path / "model.safetensors", saved.path / "model.json",
                   tmp_path / "photo.png"):  # never written over with ONNX bytes
        before = target.read_bytes() if target.exists() else None
        code, _, err = run_cli(capsys, "export", str(saved.path), "--out", str(target))
        assert_one_line_error(code, err, str(target), "an ONNX file's name ends in .onnx")
        assert (target.read_bytes() if target.exists() else None) == before
    code, _, err = run_cli(capsys, "export", str(saved.path), "--format", "tflite")
    assert code == 2 and "tflite" in err
    # An opset the exporter cannot convert to: it would fall back to its own, silently.
    code, _, err = run_cli(capsys, "export", str(saved.path), "--out",
                           str(tmp_path / "old.onnx"), "--opset", "7")
    assert_one_line_error(code, err, "--opset 7", "cannot write this model at opset 7",
                          "writes opsets 18-")
    assert not (tmp_path / "old.onnx").exists()


def test_a_place_that_cannot_be_written_is_one_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    import errno
    import os

    def read_only(source: Path, target: Path) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))

    saved = _saved(tmp_path / "model", DENSE)
    monkeypatch.setattr("fashionlab.export.os.replace", read_only)
    with pytest.raises(ExportError, match="m.onnx: cannot write .Read-only file system"):
        export_onnx(saved, tmp_path / "m.onnx", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # A read-only file system refuses the clean-up too (EROFS, not "no such file").
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: read_only(self, self))
    with pytest.raises(ExportError, match="m.onnx: cannot write .Read-only file system"):
        export_onnx(saved, tmp_path / "m.onnx", verify=False)


def test_the_export_carries_the_test_time_augmentation(tmp_path: Path):
    """A model scored with flip TTA is exported with it: the file's logits are the mean over
    the image and its mirror image, not the plain network's."""
    spec = dataclasses.replace(CONV_BN, tta="flip")
    saved = _saved(tmp_path / "model", spec)
    path = export_onnx(saved, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    (got,) = session.run(None, {"image": x.numpy()})
    plain = build_module(spec).eval()
    plain.load_state_dict(saved.module.net.state_dict())
    with torch.inference_mode():
        averaged = ((plain(x) + plain(x.flip(-1))) / 2).numpy()
        unaugmented = plain(x).numpy()
    assert np.abs(got - averaged).max() <= 1e-5
    assert np.abs(got - unaugmented).max() > 1e-3
