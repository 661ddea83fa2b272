"""Model directories: round trip, no unpickling, every broken file's one-line error, and
`fashionlab evaluate` on a saved model end to end."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli, tiny_study_toml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fashionlab import artifacts
from fashionlab.artifacts import (
    FORMAT_VERSION,
    PREPROCESSING,
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelFileError,
    expected_shapes,
    load_model,
    save_model,
)
from fashionlab.config import MAX_PARAMETERS, ConvLayer, DenseLayer, ModelSpec, load_study
from fashionlab.data import CLASS_NAMES, load_idx_dataset, read_idx
from fashionlab.errors import ConfigError
from fashionlab.evaluate import evaluate, unlike_the_study
from fashionlab.models import build_module
from fashionlab.stats import proportion_ci
from fashionlab.study import run_study

DENSE = ModelSpec(layers=(DenseLayer(16, dropout=0.2), DenseLayer(8)))
CONV_BN = ModelSpec(conv=(ConvLayer(4, batch_norm=True, pool=2), ConvLayer(6, padding="same")),
                    dropout=0.25, layers=(DenseLayer(12),))
METADATA = {"study": "unit", "epochs": 3, "test_accuracy": 0.5}


def _trained_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Weights with non-trivial batch-norm statistics (a few forward passes in train mode)."""
    module = build_module(spec).train()
    with torch.no_grad():
        for _ in range(3):
            module(torch.rand(16, 1, 28, 28) * 2)
    return module.state_dict()


def _save(directory: Path, spec: ModelSpec = CONV_BN) -> Path:
    return save_model(directory, spec=spec, state=_trained_state(spec), class_names=CLASS_NAMES,
                      metadata=METADATA)


# --- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [DENSE, CONV_BN], ids=["dense", "conv-bn"])
def test_round_trip_gives_the_same_model(tmp_path: Path, spec: ModelSpec):
    state = _trained_state(spec)
    directory = save_model(tmp_path / "m", spec=spec, state=state, class_names=CLASS_NAMES,
                           metadata=METADATA)
    assert sorted(p.name for p in directory.iterdir()) == [SPEC_FILE, WEIGHTS_FILE]
    saved = load_model(directory)
    assert saved.spec == spec and saved.class_names == CLASS_NAMES
    assert saved.metadata == METADATA and saved.path == directory
    assert not saved.module.training
    for key, tensor in saved.module.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    original = build_module(spec).eval()
    original.load_state_dict(state)
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(saved.module(x), original(x))
    description = json.loads((directory / SPEC_FILE).read_text())
    assert description["format_version"] == FORMAT_VERSION
    assert description["preprocessing"] == PREPROCESSING


def test_saving_again_replaces_the_directory(tmp_path: Path):
    directory = _save(tmp_path / "m")
    (directory / "stale.onnx").write_bytes(b"old export")
    _save(directory, DENSE)
    assert sorted(p.name for p in directory.iterdir()) == [SPEC_FILE, WEIGHTS_FILE]
    assert load_model(directory).spec == DENSE
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging directory left behind
    umask = os.umask(0)
    os.umask(umask)
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask  # as any folder made here


@pytest.mark.skipif(os.name != "posix", reason="a file size limit (RLIMIT_FSIZE) is POSIX")
def test_a_save_the_disk_refuses_is_one_line_and_keeps_the_earlier_model(tmp_path: Path):
    # A real write failure, in a process whose files may not grow past 4 KB (as a full disk
    # refuses a write; safetensors then raises its own error, not an OSError).
    directory = _save(tmp_path / "m", DENSE)
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_artifacts import CONV_BN, _save
from fashionlab.errors import OutputError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    _save({str(directory)!r}, CONV_BN)
except OutputError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == (f"{directory}: cannot save the model (File too large); "
                           "free some space or fix the permissions and run the same command "
                           "again: it resumes\n")
    assert load_model(directory).spec == DENSE  # the earlier save, whole
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left behind


def test_a_model_loads_on_the_cpu_named_with_its_index(tmp_path: Path):
    # (predict and evaluate --device cpu:0 blamed the weights file: safetensors knows "cpu")
    directory = _save(tmp_path / "m", DENSE)
    assert next(load_model(directory, device="cpu:0").module.parameters()).device.type == "cpu"


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    directory = _save(tmp_path / "m")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling attempted")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    saved = load_model(directory)
    assert saved.module(torch.rand(2, 1, 28, 28)).shape == (2, 10)


class _Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_posing_as_safetensors_is_refused_unopened(tmp_path: Path, writer: str):
    directory = _save(tmp_path / "m")
    marker = tmp_path / "pwned"
    weights = directory / WEIGHTS_FILE
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"0.weight": _Payload(marker)}, weights)
    with pytest.raises(ModelFileError, match="pickle .*never unpickles") as error:
        load_model(directory)
    assert str(error.value).startswith(f"{weights}: ") and "\n" not in str(error.value)
    assert not marker.exists()


# --- broken model directories ----------------------------------------------------------------


def _edit_json(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        description = json.loads((directory / SPEC_FILE).read_text())
        change(description)
        (directory / SPEC_FILE).write_text(json.dumps(description))
    return edit


def _edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        state = load_file(directory / WEIGHTS_FILE)
        change(state)
        save_file(state, directory / WEIGHTS_FILE)
    return edit


def _set_units(d: dict) -> None:
    d["spec"]["layers"][0]["units"] = 13


def _nan_weight(state: dict) -> None:
    state["0.weight"][0, 0, 0, 0] = float("nan")


BROKEN = {
    "missing model.json": (lambda d: (d / SPEC_FILE).unlink(), SPEC_FILE, "file not found"),
    "missing weights": (lambda d: (d / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, "file not found"),
    "json not utf-8": (lambda d: (d / SPEC_FILE).write_bytes(b"\xff\xfe{"), SPEC_FILE,
                       "not UTF-8"),
    "json syntax": (lambda d: (d / SPEC_FILE).write_text('{"spec": '), SPEC_FILE, "not JSON"),
    "json list": (lambda d: (d / SPEC_FILE).write_text("[]"), SPEC_FILE, "expected an object"),
    "no spec": (_edit_json(lambda d: d.pop("spec")), SPEC_FILE, "missing key 'spec'"),
    "bad spec field": (_edit_json(lambda d: d["spec"].update(dropout=1.5)), SPEC_FILE,
                       "spec.dropout"),
    "class names": (_edit_json(lambda d: d.update(class_names=["a", "b"])), SPEC_FILE,
                    "2 class names for a model with 10 outputs"),
    "a class name twice": (_edit_json(lambda d: d["class_names"].__setitem__(1, "Pullover")),
                           SPEC_FILE, "the class name 'Pullover' is given twice"),
    "a class name of two lines": (
        _edit_json(lambda d: d["class_names"].__setitem__(3, "Dress\nShirt")), SPEC_FILE,
        "class name 3 ('Dress\\nShirt') must be one line of 1 to 100 characters"),
    "an empty class name": (_edit_json(lambda d: d["class_names"].__setitem__(0, " ")),
                            SPEC_FILE, "class name 0 (' ') must be one line"),
    "newer format": (_edit_json(lambda d: d.update(format_version=FORMAT_VERSION + 1)),
                     SPEC_FILE, "newer fashionlab"),
    "format 0": (_edit_json(lambda d: d.update(format_version=0)), SPEC_FILE,
                 "format_version 0: formats are numbered from 1"),
    "json nested deeply": (lambda d: (d / SPEC_FILE).write_text("[" * 100_000 + "]" * 100_000),
                           SPEC_FILE, "nested too deeply"),
    "spec and weights disagree": (_edit_json(_set_units), WEIGHTS_FILE,
                                  "the spec needs (13, "),
    "missing tensor": (_edit_weights(lambda s: s.pop("0.weight")), WEIGHTS_FILE,
                       "missing 0.weight"),
    "extra tensor": (_edit_weights(lambda s: s.update(extra=torch.zeros(2))), WEIGHTS_FILE,
                     "unexpected extra"),
    "nan weights": (_edit_weights(_nan_weight), WEIGHTS_FILE, "NaN or infinite"),
    "bool weights": (_edit_weights(lambda s: s.update({"0.weight": s["0.weight"] > 0})),
                     WEIGHTS_FILE, "0.weight holds BOOL values; weights are floating point"),
    "truncated weights": (lambda d: (d / WEIGHTS_FILE).write_bytes(
        (d / WEIGHTS_FILE).read_bytes()[:200]), WEIGHTS_FILE, "not a valid safetensors file"),
    "empty weights": (lambda d: (d / WEIGHTS_FILE).write_bytes(b""), WEIGHTS_FILE,
                      "not a valid safetensors file"),
    "weights a folder": (lambda d: ((d / WEIGHTS_FILE).unlink(), (d / WEIGHTS_FILE).mkdir()),
                         WEIGHTS_FILE, "a folder, not a file"),
    "conv stack shrinks to nothing": (_edit_json(lambda d: d["spec"]["conv"][0].update(
        kernel=40)), SPEC_FILE, "spec.conv.0: kernel 40 is larger than its 28x28 input"),
}


def test_weights_it_may_not_read_are_said_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """chmod 000 (simulated: the superuser reads anything): safetensors' own error says
    "No such file or directory" of a file that is there."""
    directory = _save(tmp_path / "m")
    locked = directory / WEIGHTS_FILE
    real_open = Path.open

    def opening(path: Path, *args: Any, **kwargs: Any) -> Any:
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def safe_open(name: str, **kwargs: Any) -> Any:
        raise SafetensorError("No such file or directory: " + name)

    monkeypatch.setattr(Path, "open", opening)
    monkeypatch.setattr(artifacts, "safe_open", safe_open)
    with pytest.raises(ModelFileError) as error:
        load_model(directory)
    assert str(error.value) == f"{locked}: cannot read (Permission denied)"


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_model_directory_gives_one_line_naming_the_file(tmp_path: Path, case: str):
    break_it, file_name, fragment = BROKEN[case]
    directory = _save(tmp_path / "m")
    break_it(directory)
    with pytest.raises(ModelFileError) as error:
        load_model(directory)
    message = str(error.value)
    assert message.startswith(f"{directory / file_name}: "), message
    assert fragment in message and "\n" not in message, message


def test_the_device_is_read_as_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    directory = _save(tmp_path / "m")
    for auto in ("auto", None):
        assert next(load_model(directory, auto).module.parameters()).device.type == (
            "cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        load_model(directory, "cuda")


def test_not_a_directory(tmp_path: Path):
    with pytest.raises(ModelFileError, match="not a model directory"):
        load_model(tmp_path / "nowhere")


# --- the spec meets the weights' header before anything is allocated ---------------------------


@pytest.mark.parametrize("spec", [DENSE, CONV_BN], ids=["dense", "conv-bn"])
def test_expected_shapes_are_the_built_modules(spec: ModelSpec):
    assert expected_shapes(spec) == {k: tuple(v.shape)
                                     for k, v in build_module(spec).state_dict().items()}


@pytest.fixture
def nothing_allocated(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail the test if `load_model` builds a module anywhere but on the meta device, or reads
    the tensors; returns the devices it built modules on."""
    built: list[str] = []
    real_build = artifacts.build_module

    def meta_only(spec: ModelSpec) -> torch.nn.Sequential:
        device = torch.empty(0).device.type  # where a module built now would live
        if device != "meta":
            raise AssertionError(f"a real module would be built on {device}, before the "
                                 "spec was checked against the weights")
        built.append(device)
        return real_build(spec)

    def no_tensors(*args: object, **kwargs: object) -> None:
        raise AssertionError("the tensors were read before the spec was checked")

    monkeypatch.setattr(artifacts, "build_module", meta_only)
    monkeypatch.setattr(artifacts, "load_file", no_tensors)
    return built


@pytest.mark.parametrize("units", [2_000_000, 10**9])
def test_a_huge_spec_is_refused_before_anything_is_allocated(
        tmp_path: Path, nothing_allocated: list[str], units: int):
    directory = _save(tmp_path / "m", DENSE)
    _edit_json(lambda d: d["spec"]["layers"][0].update(units=units))(directory)
    with pytest.raises(ModelFileError) as error:
        load_model(directory)
    message = str(error.value)
    assert message.startswith(f"{directory / SPEC_FILE}: not a valid model description "
                              "(spec.layers.0.units: the model would have ")
    assert f"more than the {MAX_PARAMETERS:,} fashionlab trains" in message
    assert "\n" not in message
    assert nothing_allocated == []  # refused while reading the spec, before any module


def test_units_written_as_a_float_are_refused_as_the_wrong_type(tmp_path: Path,
                                                              nothing_allocated: list[str]):
    directory = _save(tmp_path / "m", DENSE)
    _edit_json(lambda d: d["spec"]["layers"][0].update(units=1e9))(directory)
    with pytest.raises(ModelFileError, match=r"spec\.layers\.0\.units: Input should be a valid "
                       "integer"):
        load_model(directory)
    assert nothing_allocated == []


def _edit_header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Change the JSON header of model.safetensors, keeping its data bytes."""
    def edit(directory: Path) -> None:
        raw = (directory / WEIGHTS_FILE).read_bytes()
        size = int.from_bytes(raw[:8], "little")  # u64 little-endian, then the JSON header
        header = json.loads(raw[8:8 + size])
        change(header)
        text = json.dumps(header).encode()
        (directory / WEIGHTS_FILE).write_bytes(len(text).to_bytes(8, "little") + text
                                               + raw[8 + size:])
    return edit


def _shape(name: str, shape: list[int]) -> Callable[[dict], None]:
    return lambda header: header[name].update(shape=shape)


HEADER_CASES = {
    # The header's shape agrees with its data, not with the spec.
    "wrong shape": (_edit_weights(lambda s: s.update({"1.weight": torch.zeros(17, 784)})),
                    "1.weight has shape (17, 784), the spec needs (16, 784)"),
    "renamed tensor": (_edit_header(lambda h: h.update({"9.weight": h.pop("1.weight")})),
                       "missing 1.weight; unexpected 9.weight"),
    # The header claims more than its data: safetensors' own check of the header refuses it.
    "huge shape, small data": (_edit_header(_shape("1.weight", [2_000_000, 784])),
                               "not a valid safetensors file"),
    "data cut short": (lambda d: (d / WEIGHTS_FILE).write_bytes(
        (d / WEIGHTS_FILE).read_bytes()[:-100]), "not a valid safetensors file"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_weights_that_do_not_fit_are_refused_from_the_header(
        tmp_path: Path, nothing_allocated: list[str], case: str):
    break_it, fragment = HEADER_CASES[case]
    directory = _save(tmp_path / "m", DENSE)
    break_it(directory)  # with safetensors' own load_file, not the one load_model would use
    with pytest.raises(ModelFileError) as error:
        load_model(directory)
    message = str(error.value)
    assert message.startswith(f"{directory / WEIGHTS_FILE}: ") and fragment in message, message
    assert "\n" not in message and nothing_allocated == ["meta"]


def test_the_commands_report_a_broken_model_as_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    directory = _save(tmp_path / "m")
    (directory / WEIGHTS_FILE).write_bytes(pickle.dumps({"a": 1}))
    image = tmp_path / "x.npy"
    np.save(image, np.zeros((28, 28), np.uint8))
    for args in (("predict", str(directory), str(image)), ("export", str(directory)),
                 ("evaluate", str(directory))):
        code, out, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, str(directory / WEIGHTS_FILE), "pickle")
        assert out == ""


# --- fashionlab evaluate ---------------------------------------------------------------------


def _fit_tiny(directory: Path, tiny_idx_dir: Path) -> Path:
    """A dense model fitted to the tiny synthetic training split (well under a second)."""
    images = read_idx(tiny_idx_dir / "train-images-idx3-ubyte.gz")
    labels = read_idx(tiny_idx_dir / "train-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)  # (300, 1, 28, 28)
    y = torch.from_numpy(labels).long()  # (300,)
    module = build_module(DENSE)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    return save_model(directory, spec=DENSE, state=module.state_dict(), class_names=CLASS_NAMES,
                      metadata=METADATA)


def test_evaluate_json(tmp_path: Path, tiny_idx_dir: Path, capsys: pytest.CaptureFixture[str]):
    directory = _fit_tiny(tmp_path / "m", tiny_idx_dir)
    code, out, err = run_cli(capsys, "evaluate", str(directory), "--dir", str(tiny_idx_dir),
                             "--no-verify", "--device", "cpu", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model"] == str(directory) and result["split"] == "test"
    assert result["n"] == 100 and result["accuracy"] > 0.9
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 100
    assert confusion.sum(axis=1).tolist() == [10] * 10
    assert np.trace(confusion) == round(result["accuracy"] * 100)
    assert result["class_names"] == list(CLASS_NAMES)
    assert set(result["per_class"]) >= {"precision", "recall", "f1", "support"}
    # How far 100 images leave the accuracy uncertain: Wilson's interval of the proportion.
    assert result["accuracy_ci"] == list(proportion_ci(result["accuracy"], 100))
    code, out, err = run_cli(capsys, "evaluate", str(directory), "--dir", str(tiny_idx_dir),
                             "--no-verify", "--device", "cpu")
    low, high = (f"{100 * v:.1f}" for v in result["accuracy_ci"])
    assert code == 0 and f"[95% interval {low}, {high}]   loss" in out, err


def test_evaluate_needs_only_the_test_files(tmp_path: Path, tiny_idx_dir: Path,
                                            capsys: pytest.CaptureFixture[str]):
    """A folder with the two t10k files is enough to score a model; without one of them,
    one line names the missing file."""
    directory = _fit_tiny(tmp_path / "m", tiny_idx_dir)
    test_only = tmp_path / "test-only"
    test_only.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(tiny_idx_dir / name, test_only / name)
    scores = {}
    for folder in (tiny_idx_dir, test_only):
        code, out, err = run_cli(capsys, "evaluate", str(directory), "--dir", str(folder),
                                 "--no-verify", "--device", "cpu", "--json")
        assert code == 0, err
        scores[folder] = json.loads(out)
        assert scores[folder]["data"] == str(folder)
    assert scores[test_only]["accuracy"] == scores[tiny_idx_dir]["accuracy"]
    assert scores[test_only]["confusion"] == scores[tiny_idx_dir]["confusion"]
    (test_only / "t10k-labels-idx1-ubyte.gz").unlink()
    code, _, err = run_cli(capsys, "evaluate", str(directory), "--dir", str(test_only),
                           "--no-verify", "--device", "cpu")
    assert_one_line_error(code, err, f"{test_only / 't10k-labels-idx1-ubyte'}[.gz]: "
                                     "file not found")
    # Fashion-MNIST's checksums still apply to the test files alone.
    code, _, err = run_cli(capsys, "evaluate", str(directory), "--dir", str(tiny_idx_dir),
                           "--device", "cpu")
    assert code == 2 and "t10k-images-idx3-ubyte" in err and "train-" not in err, err


def test_evaluate_with_other_test_time_views(
        tmp_path: Path, tiny_idx_dir: Path, capsys: pytest.CaptureFixture[str]):
    """`--tta` scores the same weights with other views: the JSON says which, the numbers are
    the library's for a model loaded with that `tta`, and they differ from the model's own."""
    from fashionlab.data import load_fashion_mnist
    from fashionlab.evaluate import evaluate

    directory = _fit_tiny(tmp_path / "m", tiny_idx_dir)  # trained without tta
    results = {}
    for views in ("none", "flip-shift"):
        code, out, err = run_cli(capsys, "evaluate", str(directory), "--dir", str(tiny_idx_dir),
                                 "--no-verify", "--device", "cpu", "--tta", views, "--json")
        assert code == 0, err
        results[views] = json.loads(out)
        assert results[views]["tta"] == views
    saved = load_model(directory, tta="flip-shift")
    assert saved.spec.tta == "flip-shift" and load_model(directory).spec.tta == "none"
    expected = evaluate(saved, load_fashion_mnist(tiny_idx_dir, verify=False).test, CLASS_NAMES)
    assert results["flip-shift"]["loss"] == pytest.approx(expected.loss, rel=1e-6)
    assert results["flip-shift"]["loss"] != pytest.approx(results["none"]["loss"], rel=1e-4)
    with pytest.raises(ValueError) as error:  # one line naming the choices, not pydantic's
        load_model(directory, tta="crops")
    assert str(error.value) == "tta must be one of 'none', 'flip', 'flip-shift', not 'crops'"
    code, _, err = run_cli(capsys, "evaluate", str(directory), "--tta", "crops")
    assert code == 2 and "crops" in err


def test_evaluate_says_why_it_differs_from_its_study_and_limit_scores_the_same_images(
        tmp_path: Path, tiny_idx_dir: Path, capsys: pytest.CaptureFixture[str]):
    # A study tested on its first 40 of 100 test images (as --quick does) with an L2 model.
    path = tmp_path / "l2.toml"
    path.write_text(tiny_study_toml(
        tiny_idx_dir, final=False,
        candidates='[[candidates]]\nname = "l2"\nlayers = [{ units = 16, l2 = 0.01 }]\n',
    ).replace("verify = false", "verify = false\ntest_limit = 40"))
    model = run_study(load_study(path), run_dir=tmp_path / "runs",
                      progress=False).retrain.model_dir
    stored = load_model(model).metadata
    args = ("evaluate", str(model), "--dir", str(tiny_idx_dir), "--no-verify", "--device", "cpu")
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    whole = json.loads(out)
    accuracy, loss = 100 * stored["test_accuracy"], stored["test_loss"]
    assert whole["n"] == 100 and whole["notes"] == [
        (f"its study's test accuracy ({accuracy:.2f}%) is of the first 40 test images, this "
         "of 100: --limit 40 scores the same images"),
        (f"the loss is the cross-entropy alone; its study's test loss ({loss:.4f}) adds the L2 "
         "penalty, as Keras does")]
    code, out, err = run_cli(capsys, *args, "--limit", "40", "--json")
    assert code == 0, err
    same = json.loads(out)
    assert same["n"] == 40 and same["accuracy"] == pytest.approx(stored["test_accuracy"],
                                                                 abs=1e-6)
    assert same["loss"] < stored["test_loss"] and len(same["notes"]) == 1  # the L2 note
    code, out, err = run_cli(capsys, *args, "--limit", "40")
    assert code == 0, err
    assert "(test, the first 40 images)" in out and "note: the loss is the cross-entropy" in out
    code, out, err = run_cli(capsys, *args, "--limit", "5000")  # more than there are: all
    assert code == 0 and "(test, 100 images)" in out, err
    code, _, err = run_cli(capsys, *args, "--limit", "0")
    assert code == 2 and "--limit" in err
    # A model saved from Python with metadata of its own: no notes to give, no failure.
    saved = load_model(model)
    mine = save_model(tmp_path / "mine", spec=saved.spec, state=saved.module.state_dict(),
                      class_names=saved.class_names, metadata={"data": "my-folder"})
    code, out, err = run_cli(capsys, "evaluate", str(mine), *args[2:], "--json")
    assert code == 0 and json.loads(out)["notes"] == [], err


@pytest.mark.parametrize(("train", "machine", "noted"), [
    ({"precision": "bf16"}, {"device": "cpu", "cpu_bf16": False}, True),
    ({"precision": "auto"}, {"device": "cpu", "cpu_bf16": True}, True),
    ({"precision": "auto"}, {"device": "cuda:0", "cpu_bf16": False}, True),
    ({"precision": "auto"}, {"device": "cpu", "cpu_bf16": False}, False),
    ({"precision": "fp32"}, {"device": "cpu", "cpu_bf16": True}, False)])
def test_evaluate_says_when_its_study_scored_in_bfloat16(tmp_path: Path, tiny_idx_dir: Path,
                                                         train: dict, machine: dict, noted: bool):
    model = load_model(_fit_tiny(tmp_path / "m", tiny_idx_dir))
    test = load_idx_dataset(tiny_idx_dir).test
    correct = round(evaluate(model, test).accuracy * len(test))
    for stored, differs in ((correct, False), (correct - 1, True)):  # one image changed sides
        metadata = {"train": train, "machine": machine, "data": {"test": len(test)},
                    "test_accuracy": stored / len(test)}
        saved = load_model(save_model(tmp_path / f"s{stored}", spec=model.spec,
                                      state=model.module.state_dict(),
                                      class_names=CLASS_NAMES, metadata=metadata))
        notes = unlike_the_study(saved, evaluate(saved, test))
        expected = (f"scored here in float32; its study scored the same images in bfloat16 "
                    f"as it trained: {100 * stored / len(test):.2f}%")
        assert notes == ([expected] if noted and differs else [])
        # Scored with other test-time views: those, not the precision, are what is said.
        flipped = load_model(saved.path, tta="flip")
        assert flipped.saved_tta == "none" and load_model(saved.path).saved_tta is None
        assert unlike_the_study(flipped, evaluate(flipped, test)) == [
            (f"scored with test-time views 'flip'; its study scored it with 'none': "
            f"{100 * stored / len(test):.2f}%")]


def test_evaluate_table(tmp_path: Path, tiny_idx_dir: Path, capsys: pytest.CaptureFixture[str]):
    directory = _fit_tiny(tmp_path / "m", tiny_idx_dir)
    code, out, err = run_cli(capsys, "evaluate", str(directory), "--dir", str(tiny_idx_dir),
                             "--no-verify", "--device", "cpu")
    assert code == 0, err
    assert "accuracy" in out and "confusion matrix" in out and "precision" in out
    for name in CLASS_NAMES:
        assert name in out


def test_evaluate_refuses_unverified_data_by_default(
        tmp_path: Path, tiny_idx_dir: Path, capsys: pytest.CaptureFixture[str]):
    directory = _fit_tiny(tmp_path / "m", tiny_idx_dir)
    code, _, err = run_cli(capsys, "evaluate", str(directory), "--dir", str(tiny_idx_dir))
    assert_one_line_error(code, err, "checksum")


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_help_has_an_example(capsys: pytest.CaptureFixture[str], command: str):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and f"Example: fashionlab {command} " in out


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_weights_get_the_permissions_of_every_other_file(tmp_path: Path, umask: int):
    before = os.umask(umask)
    try:
        directory = _save(tmp_path / "m")
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
    assert modes == {SPEC_FILE: 0o666 & ~umask, WEIGHTS_FILE: 0o666 & ~umask}
