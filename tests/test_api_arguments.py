"""The Python API given the wrong kind of argument: a TypeError or ValueError that names the
argument and says what it wants, not an AttributeError from deep inside the library."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fashionlab as fl
from fashionlab.artifacts import save_model
from fashionlab.config import DenseLayer, ModelSpec
from fashionlab.data import CLASS_NAMES, Split
from fashionlab.models import build_module
from fashionlab.predict import ImageFileError
from fashionlab.runs import compare_runs, delete_run, describe_run, export_run, list_runs

SPEC = ModelSpec(layers=(DenseLayer(8),))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    state = build_module(SPEC).state_dict()
    return save_model(tmp_path / "m", spec=SPEC, state=state, class_names=CLASS_NAMES,
                      metadata={})


@pytest.mark.parametrize("call", [
    lambda d: fl.write_report(str(d), "x"),
    lambda d: list_runs(d),
    lambda d: describe_run(str(d), "x"),
    lambda d: compare_runs(str(d), "a", "b"),
    lambda d: export_run(str(d), "x"),
    lambda d: delete_run(str(d), "x"),
], ids=["write_report", "list_runs", "describe_run", "compare_runs", "export_run",
        "delete_run"])
def test_a_run_directory_given_for_a_store_says_how_to_open_it(call, tmp_path: Path):
    with pytest.raises(TypeError, match=r"^store: expected a fashionlab Store, got \w+ "
                                        r"\(Store\.open\(.*\) opens a run directory's store\)$"):
        call(tmp_path)


def test_a_store_url_or_run_id_of_another_type_is_named(tmp_path: Path):
    with pytest.raises(TypeError, match=r"^url: expected a database URL string, got Posix"):
        fl.Store(Path(tmp_path / "x.db"))
    store = fl.Store.open(tmp_path)
    with pytest.raises(TypeError, match=r"^run id: expected a string, got int 123$"):
        store.run(123)  # type: ignore[arg-type]
    store.close()


def test_predict_names_its_arguments(model_dir: Path):
    image = np.zeros((28, 28), np.uint8)
    with pytest.raises(TypeError, match=r"^model: expected a saved model .* got NoneType$"):
        fl.predict(None, image)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^images: an array of pixels, not the file "
                                        r"'item\.png' \(predict_files reads"):
        fl.predict(model_dir, "item.png")  # type: ignore[arg-type]
    for top_k in (2.5, "3", True, 0):
        with pytest.raises(ValueError, match=r"^top_k must be a whole number of at least 1"):
            fl.predict(model_dir, image, top_k=top_k)  # type: ignore[arg-type]
    with pytest.raises(ImageFileError, match=r"^images: arrays of different shapes"):
        fl.predict(model_dir, [np.zeros((28, 28)), np.zeros((27, 27))])  # type: ignore[arg-type]
    assert len(fl.predict(model_dir, image, top_k=np.int64(2))[0].labels) == 2  # numpy's ints


def test_evaluate_and_export_name_their_arguments(model_dir: Path, tmp_path: Path):
    split = Split(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(TypeError, match=r"^model: expected a saved model .* or a torch module, "
                                        r"got NoneType$"):
        fl.evaluate(None, split)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^batch_size must be a whole number of at least 1, "
                                         r"got '8'$"):
        fl.evaluate(model_dir, split, batch_size="8")  # type: ignore[arg-type]
    assert fl.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)), split,
                       class_names=CLASS_NAMES).n == 4  # a plain module still scores
    with pytest.raises(TypeError, match=r"^model: expected a saved model"):
        fl.export_onnx(None, tmp_path / "x.onnx")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^opset: expected an int \(e\.g\. 18\), got str '18'$"):
        fl.export_onnx(model_dir, tmp_path / "x.onnx", opset="18")  # type: ignore[arg-type]
    assert not (tmp_path / "x.onnx").exists()


def test_folds_statistics_and_warning_refuse_what_they_cannot_mean():
    with pytest.raises(TypeError, match=r"^cv: expected a CVSpec \(e\.g\. CVSpec\(n_splits=5\)\), "
                                        r"got int$"):
        fl.make_folds(10, 3, seed=0)  # type: ignore[arg-type]
    assert len(fl.make_folds(10, fl.CVSpec(n_splits=5), seed=0)) == 5
    with pytest.raises(ValueError, match=r"^bounds: \(low, high\) with low <= high, got \(1, 0\)$"):
        fl.summarize([0.5, 0.6], bounds=(1, 0))
    for patience in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"^patience: a number of epochs, at least 1"):
            fl.overfitting_warning([1.0, 0.9, 0.95], patience=patience)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^min_delta: a fraction of the val_loss in \[0, 1\)"):
        fl.overfitting_warning([1.0, 0.9], patience=1, min_delta=2.0)
    assert fl.overfitting_warning([1.0, 1.0, 1.0], patience=np.int64(1)).epoch == 1


def test_results_with_arrays_compare_and_print_without_numpy_errors(tmp_path: Path):
    split = Split(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.uint8))
    assert repr(split) == "Split(images=(4, 28, 28) uint8, labels=(4,) uint8)"
    evaluation = fl.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)),
                             split, class_names=CLASS_NAMES)
    assert repr(evaluation).startswith("Evaluation(n=4, accuracy=")
    assert "\n" not in repr(evaluation)
    assert (evaluation == fl.evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(
        784, 10)), split, class_names=CLASS_NAMES)) is False  # identity, not numpy's error


def test_a_bundled_name_with_a_stray_space_is_shown_quoted():
    with pytest.raises(fl.ConfigError, match=r"^'seed ': no such study file, and no bundled"):
        fl.load_study("seed ")


def test_a_model_board_or_figure_given_the_wrong_kind_of_argument_says_so(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from fashionlab.errors import ConfigError
    from fashionlab.integrations.tensorboard import TensorBoard, write_shown_run

    with pytest.raises(TypeError, match=r"^load_model: expected a saved model's folder \(a "
                       r"path\), got int$"):
        fl.load_model(5)
    with pytest.raises(ConfigError, match="^run_dir: expected a folder's path, got int$"):
        TensorBoard(run_dir=5)
    with pytest.raises(TypeError, match="^write_shown_run: expected what run_study or "
                       "run_search returned, got str$"):
        write_shown_run("fashionlab-runs")


def test_a_figure_is_saved_to_a_path_given_as_text_and_a_folder_in_the_way_is_named(
        tmp_path: Path):
    import matplotlib.pyplot as plt

    from fashionlab.plots import save_figure

    figure = plt.figure()
    save_figure(figure, str(tmp_path / "a.png"))  # a str: an AttributeError before
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path / "b.png").mkdir()
    with pytest.raises(IsADirectoryError) as error:
        save_figure(figure, tmp_path / "b.png")
    assert error.value.filename == str(tmp_path / "b.png")  # not the hidden staging file's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    assert list((tmp_path / "b.png").iterdir()) == []
    plt.close(figure)


def test_data_shows_samples_from_python_as_the_command_does(tiny_idx_dir: Path, tmp_path: Path):
    from fashionlab.errors import OutputError
    from fashionlab.plots import write_samples

    split = fl.load_fashion_mnist(tiny_idx_dir, verify=False).test
    out = write_samples(split, str(tmp_path / "new" / "grid.png"), per_class=3)
    assert out == tmp_path / "new" / "grid.png" and out.read_bytes().startswith(b"\x89PNG")
    (tmp_path / "new" / "folder.png").mkdir()
    for bad, says in (("grid.txt", "name an image file ending in .png"),
                      ("new/folder.png", "is a folder; name the image file to write"),
                      ("new/grid.png/x.png", "is a file, not a folder")):
        with pytest.raises(OutputError, match=says):
            write_samples(split, tmp_path / bad)
    with pytest.raises(TypeError, match="^write_samples: expected a fashionlab.data.Split"):
        write_samples(split.images, tmp_path / "x.png")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["folder.png", "grid.png"]
