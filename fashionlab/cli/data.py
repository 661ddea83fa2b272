"""`fashionlab data ...`: find, fetch, inspect and look at the dataset. Thin over fashionlab.data."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fashionlab import data
from fashionlab.cli import app, output_console, path_named, print_json

data_app = typer.Typer(
    help="Find, fetch, verify and look at the Fashion-MNIST files.\n\n"
    "Example: fashionlab data info", no_args_is_help=True)
app.add_typer(data_app, name="data")


class SplitName(str, Enum):
    train = "train"
    test = "test"


DirOption = Annotated[Path | None, typer.Option(
    "--dir", parser=path_named,
    help="Read the four IDX files from this directory instead of searching for them.",
    show_default=False)]
VerifyOption = Annotated[bool, typer.Option(
    "--verify/--no-verify",
    help="Check the Fashion-MNIST SHA-256 checksums; --no-verify for other IDX datasets (MNIST).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@data_app.command()
def info(directory: DirOption = None, verify: VerifyOption = True,
         as_json: JsonOption = False) -> None:
    """Show where the files are, whether they are verified, their shapes and class counts.

    Never downloads: when nothing is found, run `fashionlab data fetch` first.

    Example: fashionlab data info --json
    """
    from rich.table import Table

    summary = data.load_fashion_mnist(directory, download=False, verify=verify).to_dict()
    if as_json:
        print_json(summary)
        return
    console = output_console()
    console.print(f"source:   {summary['source']}")
    for path in summary["files"]:
        console.print(f"          {path}")
    console.print("verified: " + ("yes (SHA-256)" if summary["verified"] else "no"))
    table = Table(title="images per class")
    for column in ("class", "name", "train", "test"):
        table.add_column(column, justify="left" if column == "name" else "right")
    train, test = (summary["splits"][s]["class_counts"] for s in ("train", "test"))
    for index, name in enumerate(summary["class_names"]):
        table.add_row(str(index), name, str(train[name]), str(test[name]))
    table.add_row("", "total", str(sum(train.values())), str(sum(test.values())))
    console.print(table)
    for split in ("train", "test"):
        shapes = summary["splits"][split]
        console.print(f"{split}: images {tuple(shapes['images_shape'])} uint8, "
                      f"labels {tuple(shapes['labels_shape'])} uint8")


@data_app.command()
def fetch(
    directory: Annotated[Path | None, typer.Option(
        "--dir", parser=path_named,
        help="Put the files here instead of the user cache.", show_default=False)] = None,
    recheck: Annotated[bool, typer.Option(
        "--recheck", help="Hash the files in place again, even those checked before (a "
        "damaged copy in the cache is then replaced).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Obtain and verify the four files, then print where they are.

    Copies them from Debian's dataset package when installed, else downloads them from the
    public mirrors (FASHIONLAB_MIRRORS overrides the list). They are stored decompressed and
    verified by SHA-256, so later loads are fast; files already in place are kept. In a
    folder you name (--dir), a file there that is not Fashion-MNIST's is never replaced.

    Example: fashionlab data fetch --recheck
    """
    target = data.fetch_fashion_mnist(directory, recheck=recheck)
    files = [str(path) for path in data.files_in(target)]  # raw, or .gz in a folder named
    if as_json:
        print_json({"directory": str(target), "files": files})
        return
    typer.echo(f"Fashion-MNIST verified in {target}")
    for path in files:
        typer.echo(f"  {path}")


@data_app.command()
def show(
    out: Annotated[Path, typer.Option(
        "--out", parser=path_named,
        help="Image file to write: .png, .jpg, .pdf or .svg.", show_default=False)],
    per_class: Annotated[int, typer.Option(
        "--per-class", min=1, max=100, help="Images per class (one row per class).")] = 8,
    split: Annotated[SplitName, typer.Option("--split", help="Which split to draw from.")] = (
        SplitName.train),
    directory: DirOption = None,
    verify: VerifyOption = True,
) -> None:
    """Write a labelled grid of the first N images of each class as an image (PNG, ...).

    Reads the data where `fashionlab data info` finds it, and downloads it when nothing is
    found (as a study does). Its folder is made if missing.

    Example: fashionlab data show --out samples.png --per-class 10 --split test
    """
    from fashionlab.plots import check_image_file, write_samples  # matplotlib: for this only

    check_image_file(out, option="--out")  # before loading, not after drawing
    dataset = data.load_fashion_mnist(directory, verify=verify)
    part = dataset.train if split is SplitName.train else dataset.test
    write_samples(part, out, per_class=per_class, class_names=dataset.class_names,
                  title=f"{split.value} split")
    typer.echo(f"wrote {out}")
