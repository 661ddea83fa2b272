"""`fashionlab evaluate`, `predict` and `export`: use a trained model. Thin over the library."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_args

import typer

from fashionlab.cli import app, output_console, path_named, print_json
from fashionlab.text import one_line, percent
from fashionlab.vocabulary import TestTimeAugmentation

if TYPE_CHECKING:
    from fashionlab.predict import FilePredictions

ModelDir = Annotated[Path, typer.Argument(
    parser=path_named, help="A model directory (model.safetensors + model.json), e.g. "
    "fashionlab-runs/RUN_ID/models/cnn.", show_default=False)]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


# The choices of --tta: the spec's test-time augmentations, named once (vocabulary).
Views = Enum("Views", {view: view for view in get_args(TestTimeAugmentation)}, type=str)


TtaOption = Annotated[Views | None, typer.Option(
    "--tta", help="Test-time views instead of the model's own: none, flip (the image and its "
    "mirror image) or flip-shift (also moved by one pixel each way: 10 views).",
    show_default=False)]


def _views(tta: Views | None) -> str | None:
    return None if tta is None else tta.value


@app.command()
def evaluate(
    model: ModelDir,
    directory: Annotated[Path | None, typer.Option(
        "--dir", parser=path_named,
        help="Read the test set's two IDX files (t10k-*) from this directory "
        "instead of searching for them.", show_default=False)] = None,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify",
        help="Check the Fashion-MNIST checksums; --no-verify for other IDX datasets.")] = True,
    device: DeviceOption = "auto",
    tta: TtaOption = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, show_default=False,
        help="Score only the first N test images (those a study with [data] test_limit, "
             "such as every --quick one, tested its models on).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Score a trained model on the test set: accuracy, per-class scores, confusion matrix.

    Prints the accuracy and loss, precision, recall and F1 of each class, and the confusion
    matrix (rows: true class, columns: predicted). Where the numbers cannot match the ones its
    study stored (a study tested on fewer images, a loss with an L2 term), a note says why.

    Example: fashionlab evaluate fashionlab-runs/RUN_ID/models/fast-cnn --tta flip-shift --json
    """
    # torch: loaded when a command runs, so that `fashionlab --help` stays instant
    from fashionlab.artifacts import load_model
    from fashionlab.data import load_fashion_mnist_test
    from fashionlab.evaluate import evaluate as score
    from fashionlab.evaluate import unlike_the_study
    from fashionlab.hardware import resolve_device

    target = resolve_device(device)
    saved = load_model(model, target, tta=_views(tta))
    test, source = load_fashion_mnist_test(directory, verify=verify)
    result = score(saved, test.head(limit), device=target)
    notes = unlike_the_study(saved, result)
    if as_json:
        print_json({"model": str(model), "data": str(source),
                   "split": "test", "tta": saved.spec.tta, **result.to_dict(),
                   "notes": notes})
        return
    from rich.table import Table
    from rich.text import Text

    console = output_console()
    views = "" if saved.spec.tta == "none" else f", tta {saved.spec.tta}"
    first = "" if limit is None or limit >= len(test) else "the first "
    console.print(f"{model} on {source} (test, {first}{result.n:,} images{views})",
                  soft_wrap=True)
    low, high = result.accuracy_interval()
    interval = f" [95% interval {100 * low:.1f}, {100 * high:.1f}]" if result.n else ""
    console.print(f"accuracy {100 * result.accuracy:.2f}%{interval}   loss {result.loss:.4f}")
    for note in notes:
        console.print(Text(f"note: {note}", style="dim"), soft_wrap=True)
    scores = Table(title="per class (%)")
    for column in ("class", "name", "images", "precision", "recall", "F1"):
        scores.add_column(column, justify="left" if column == "name" else "right")
    for i, name in enumerate(result.class_names):
        scores.add_row(str(i), name, str(result.support[i]), percent(result.precision[i], 1),
                       percent(result.recall[i], 1), percent(result.f1[i], 1))
    console.print(scores)
    confusion = Table(title="confusion matrix (rows: true, columns: predicted)")
    confusion.add_column("true")
    for i in range(result.n_classes):
        confusion.add_column(str(i), justify="right")
    for i, name in enumerate(result.class_names):
        confusion.add_row(f"{i} {name}", *(str(n) for n in result.confusion[i]))
    console.print(confusion)


@app.command()
def predict(
    model: ModelDir,
    images: Annotated[list[Path], typer.Argument(
        parser=path_named,
        help="Photos (PNG, JPEG, ...), IDX files or .npy arrays.", show_default=False,
        readable=False)],  # a file it cannot read is reported with the others predicted
    top: Annotated[int, typer.Option(help="How many classes to show per image.", min=1)] = 3,
    invert: Annotated[bool | None, typer.Option(
        "--invert/--no-invert", help="Force inverting photos (or not); by default a photo is "
        "inverted when its background is light. IDX files and .npy arrays are taken as they "
        "are, light items on black, unless --invert.", show_default=False)] = None,
    preview: Annotated[Path | None, typer.Option(
        parser=path_named,
        help="Write what the model sees (the 28x28 inputs, up to 100) to this PNG file.",
        show_default=False)] = None,
    device: DeviceOption = "auto",
    tta: TtaOption = None,
    as_json: JsonOption = False,
) -> None:
    """Predict the top classes of your own images, with their probabilities.

    Photos are made to look like Fashion-MNIST: grayscale, inverted when the background is
    light, cropped to the item, padded to a square, resized to 28x28, scaled to [0, 1].
    A file that cannot be read is reported on stderr (error: FILE: problem) while the others
    are still predicted; the exit status is then 1 (2 when the model cannot be loaded).

    Example: fashionlab predict fashionlab-runs/RUN_ID/models/cnn shirt.jpg boots.png --json
    """
    # torch: loaded when a command runs, so that `fashionlab --help` stays instant
    import numpy as np

    from fashionlab.artifacts import load_model
    from fashionlab.hardware import resolve_device
    from fashionlab.predict import (
        check_preview_path,
        predict_files,
        predictions_to_dict,
        write_preview,
    )

    if preview is not None:
        check_preview_path(preview, images)
    saved = load_model(model, resolve_device(device), tta=_views(tta))
    results = predict_files(saved, images, top, invert=invert)
    if as_json:
        print_json(predictions_to_dict(saved, results, top))
    else:
        _print_predictions(results, top)
    failed = [r for r in results if r.error]
    for result in failed:  # one line each, whatever the file's name holds (a newline)
        typer.secho(f"error: {one_line(result.error or '')}", fg="red", err=True)
    if preview is not None:  # after the predictions: a full disk here loses none of them
        seen = [r.images for r in results if r.images is not None]
        if seen:
            write_preview(np.concatenate(seen), preview)
    if failed:
        raise typer.Exit(1)


def _print_predictions(results: list[FilePredictions], top: int) -> None:
    from rich.table import Table

    table = Table()
    table.add_column("file", overflow="fold")
    table.add_column("#", justify="right")
    k = max((len(p.labels) for r in results for p in r.predictions), default=min(top, 3))
    for rank in range(1, k + 1):
        table.add_column(f"top {rank}")
    for result in results:
        for i, prediction in enumerate(result.predictions):
            cells = [f"{name} {p:.3f}" for name, p in
                     zip(prediction.classes, prediction.probabilities)]
            index = str(i) if result.kind != "photo" else ""
            blank = " (blank: no item seen)" if prediction.blank else ""
            table.add_row(one_line(str(result.path)) + blank, index, *cells)
    if table.row_count:
        output_console().print(table)


class ExportFormat(str, Enum):
    onnx = "onnx"


@app.command()
def export(
    model: ModelDir,
    file_format: Annotated[ExportFormat, typer.Option(
        "--format", help="The file format.")] = ExportFormat.onnx,
    out: Annotated[Path | None, typer.Option(
        parser=path_named, help="The file to write (default: model.onnx in the model directory).",
        show_default=False)] = None,
    opset: Annotated[int, typer.Option(
        help="The ONNX opset version: 18 and newer are written directly, older ones "
        "converted where the model allows.", min=7)] = 18,
    tta: TtaOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a trained model to ONNX, checked against PyTorch with onnxruntime.

    The batch dimension is dynamic: input `image` (batch, 1, 28, 28) float32 in [0, 1],
    output `logits` (batch, 10); the class names are in the file's metadata. The file is run
    with onnxruntime and must match PyTorch within 1e-5, or nothing is written.

    Example: fashionlab export fashionlab-runs/RUN_ID/models/cnn --format onnx --out cnn.onnx
    """
    # torch and onnx: loaded when the command runs
    from fashionlab.artifacts import load_model
    from fashionlab.export import export_model

    saved = load_model(model, tta=_views(tta))
    exported = export_model(saved, out if out is not None else model / "model.onnx", opset=opset)
    if as_json:
        print_json(exported.to_dict())
    else:
        typer.echo(f"wrote {exported.path} ({exported.bytes / 1e6:.2f} MB, opset {opset}) in "
                   f"{exported.seconds:.1f} s; onnxruntime vs PyTorch: max |diff| "
                   f"{exported.max_abs_diff:.2g}")
