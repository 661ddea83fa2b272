"""`fashionlab data info|fetch|show` end to end (in-process), and the sample-grid figure."""

from __future__ import annotations

import gzip
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionlab import data
from fashionlab.cli import _matplotlib_home, main
from fashionlab.data import FILE_NAMES, FileChecksum
from fashionlab.data import fetch as fetch_module
from fashionlab.plots import sample_grid

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_real_data = pytest.mark.skipif(
    not all((REAL_DIR / f"{name}.gz").is_file() for name in FILE_NAMES),
    reason=f"the Debian package dataset-fashion-mnist is not installed ({REAL_DIR})")


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `fashionlab ARGS` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code or 0, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["info", "fetch", "show"])
def test_help_has_an_example(capsys: pytest.CaptureFixture[str], command: str):
    code, out, _ = run(capsys, "data", command, "--help")
    assert code == 0 and "Example: fashionlab data " in out


# --- info ---------------------------------------------------------------------------------------


def test_info_json_on_a_named_directory(capsys: pytest.CaptureFixture[str], tiny_idx_dir: Path):
    code, out, _ = run(capsys, "data", "info", "--dir", str(tiny_idx_dir), "--no-verify", "--json")
    assert code == 0
    summary = json.loads(out)
    assert summary["source"] == str(tiny_idx_dir) and summary["verified"] is False
    assert summary["files"] == [str(tiny_idx_dir / f"{name}.gz") for name in FILE_NAMES]
    assert summary["splits"]["train"]["images_shape"] == [300, 28, 28]
    assert summary["splits"]["test"]["labels_shape"] == [100]
    assert summary["splits"]["train"]["class_counts"] == dict.fromkeys(data.CLASS_NAMES, 30)
    dataset = data.load_fashion_mnist(tiny_idx_dir, verify=False)
    assert summary["sha256"] == dataset.sha256()  # as a study run stores it
    assert summary == json.loads(json.dumps(dataset.to_dict()))  # the library's, printed


def test_info_table(capsys: pytest.CaptureFixture[str], tiny_idx_dir: Path):
    code, out, _ = run(capsys, "data", "info", "--dir", str(tiny_idx_dir), "--no-verify")
    assert code == 0
    assert f"source:   {tiny_idx_dir}" in out and "verified: no" in out
    assert "Ankle boot" in out and "total" in out and "300" in out
    assert "train: images (300, 28, 28) uint8" in out


@needs_real_data
def test_info_finds_and_verifies_the_real_data(capsys: pytest.CaptureFixture[str]):
    code, out, _ = run(capsys, "data", "info", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["source"] == str(REAL_DIR) and summary["verified"] is True
    assert set(summary["splits"]["train"]["class_counts"].values()) == {6000}
    assert set(summary["splits"]["test"]["class_counts"].values()) == {1000}


def test_info_errors_are_one_line(capsys: pytest.CaptureFixture[str], tiny_idx_dir: Path,
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    code, _, err = run(capsys, "data", "info", "--dir", str(tiny_idx_dir))
    assert_one_line_error(code, err, "checksum mismatch")
    code, _, err = run(capsys, "data", "info", "--dir", str(tmp_path / "nothing-here"))
    assert_one_line_error(code, err, "file not found")
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tmp_path / "no-debian")
    code, _, err = run(capsys, "data", "info")  # never downloads
    assert_one_line_error(code, err, "run `fashionlab data fetch`")


# --- fetch --------------------------------------------------------------------------------------


@needs_real_data
def test_fetch_copies_the_real_data_then_info_reads_it(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path):
    target = tmp_path / "fm"
    code, out, _ = run(capsys, "data", "fetch", "--dir", str(target), "--json")
    assert code == 0
    assert json.loads(out) == {"directory": str(target),
                               "files": [str(target / name) for name in FILE_NAMES]}
    assert sorted(p.name for p in target.iterdir()) == sorted(FILE_NAMES)

    code, out, _ = run(capsys, "data", "info", "--dir", str(target), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["verified"] is True and summary["source"] == str(target)


def test_fetch_into_the_cache(capsys: pytest.CaptureFixture[str], tiny_idx_dir: Path,
                              isolated_data_env: Path, monkeypatch: pytest.MonkeyPatch):
    sums = {}
    for name in FILE_NAMES:
        raw = gzip.decompress((tiny_idx_dir / f"{name}.gz").read_bytes())
        sums[name] = FileChecksum(data.sha256(raw), len(raw))
    monkeypatch.setattr(fetch_module, "FASHION_MNIST_CHECKSUMS", sums)
    monkeypatch.setattr(fetch_module, "DEBIAN_DIR", tiny_idx_dir)
    code, out, _ = run(capsys, "data", "fetch")
    assert code == 0 and f"verified in {isolated_data_env}" in out
    assert all((isolated_data_env / name).is_file() for name in FILE_NAMES)


def test_fetch_into_a_folder_of_gzipped_files_lists_them_as_they_are(
        capsys: pytest.CaptureFixture[str], tiny_idx_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch):
    sums = {}
    for name in FILE_NAMES:
        raw = gzip.decompress((tiny_idx_dir / f"{name}.gz").read_bytes())
        sums[name] = FileChecksum(data.sha256(raw), len(raw))
    monkeypatch.setattr(fetch_module, "FASHION_MNIST_CHECKSUMS", sums)
    target = tmp_path / "gz"
    target.mkdir()
    for name in FILE_NAMES:
        (target / f"{name}.gz").write_bytes((tiny_idx_dir / f"{name}.gz").read_bytes())
    code, out, _ = run(capsys, "data", "fetch", "--dir", str(target), "--json")
    assert code == 0
    listed = json.loads(out)["files"]
    assert listed == [str(target / f"{name}.gz") for name in FILE_NAMES]  # was: without .gz
    assert all(Path(path).is_file() for path in listed)


def test_fetch_into_an_unwritable_place(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    code, _, err = run(capsys, "data", "fetch", "--dir", str(tmp_path / "a-file" / "fm"))
    assert_one_line_error(code, err, f"{tmp_path / 'a-file'} is a file, not a folder")
    code, _, err = run(capsys, "data", "fetch", "--dir", str(tmp_path / "a-file"))
    assert_one_line_error(code, err, f"{tmp_path / 'a-file'} is a file, not a folder")
    for command in (["info"], ["show", "--out", str(tmp_path / "grid.png")]):  # read the same
        code, _, err = run(capsys, "data", *command, "--dir", str(tmp_path / "a-file"))
        assert_one_line_error(code, err, f"{tmp_path / 'a-file'} is a file, not a folder")


# --- show ---------------------------------------------------------------------------------------


def test_show_writes_a_png(capsys: pytest.CaptureFixture[str], tiny_idx_dir: Path,
                           tmp_path: Path):
    out_file = tmp_path / "figures" / "samples.png"
    code, out, _ = run(capsys, "data", "show", "--out", str(out_file), "--per-class", "5",
                       "--split", "test", "--dir", str(tiny_idx_dir), "--no-verify")
    assert code == 0 and str(out_file) in out
    with Image.open(out_file) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 300


def test_a_home_that_cannot_be_written_gives_no_matplotlib_warnings(tiny_idx_dir: Path,
                                                                     tmp_path: Path):
    # A container's read-only HOME: matplotlib would make a new temporary folder at every start
    # and warn about it on stderr; the command gives it one that lasts, in the temp directory.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME="/proc", TMPDIR=str(tmp_path))  # /proc/.config cannot be made, even by root
    command = [sys.executable, "-c", "from fashionlab.cli import main; main()", "data", "show",
               "--dir", str(tiny_idx_dir), "--no-verify", "--per-class", "1"]
    for attempt in (1, 2):  # the second start finds the folder, and the font cache, it left
        out = tmp_path / f"samples-{attempt}.png"
        done = subprocess.run([*command, "--out", str(out)], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        said = done.stderr
        if attempt == 1:  # a slow machine: matplotlib says so once while it builds the cache
            said = said.replace("Matplotlib is building the font cache; this may take a "
                                "moment.\n", "")
        assert done.returncode == 0 and said == "", done.stderr
        assert out.is_file()
    folder = tmp_path / f"fashionlab-matplotlib-{os.getuid()}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert any(folder.glob("fontlist-*.json"))
    # What the command spares: matplotlib's own warning in the same setting.
    bare = subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert "Matplotlib created a temporary cache directory" in bare.stderr


@pytest.fixture
def unwritable_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME that cannot be written, the temporary directory in tmp_path; returns the folder
    the command would give matplotlib."""
    monkeypatch.setenv("HOME", "/proc")
    for variable in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MPLCONFIGDIR", "")  # unset for matplotlib; restored after the test
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path / f"fashionlab-matplotlib-{os.getuid()}"


def test_matplotlibs_folder_is_ours_alone_or_not_used(unwritable_home: Path):
    _matplotlib_home()
    assert os.environ["MPLCONFIGDIR"] == str(unwritable_home)
    # Writable by others, or a link (to a folder of ours): another user could have made it.
    unwritable_home.chmod(0o777)
    os.environ["MPLCONFIGDIR"] = ""
    _matplotlib_home()
    assert os.environ["MPLCONFIGDIR"] == ""
    unwritable_home.rename(unwritable_home.with_name("elsewhere"))
    unwritable_home.with_name("elsewhere").chmod(0o700)
    unwritable_home.symlink_to(unwritable_home.with_name("elsewhere"))
    _matplotlib_home()
    assert os.environ["MPLCONFIGDIR"] == ""


def test_a_users_matplotlibrc_is_never_hidden(unwritable_home: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    settings = tmp_path / "config"
    (settings / "matplotlib").mkdir(parents=True)
    (settings / "matplotlib" / "matplotlibrc").write_text("font.size: 9\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(settings))  # readable, but the cache is not
    _matplotlib_home()
    assert os.environ["MPLCONFIGDIR"] == "" and not unwritable_home.exists()


@needs_real_data
def test_show_the_real_data(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    code, _, _ = run(capsys, "data", "show", "--out", str(tmp_path / "real.png"))
    assert code == 0 and (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_show_bad_arguments(capsys: pytest.CaptureFixture[str], tiny_idx_dir: Path,
                            tmp_path: Path):
    code, _, err = run(capsys, "data", "show", "--out", str(tmp_path / "x.png"),
                       "--per-class", "0", "--dir", str(tiny_idx_dir), "--no-verify")
    assert code == 2 and "Traceback" not in err and "per-class" in err
    (tmp_path / "a-file").write_text("")
    # Said before the data is read: a folder no file can go in (not there, nor in a missing one).
    code, _, err = run(capsys, "data", "show", "--out", str(tmp_path / "a-file" / "x.png"),
                       "--dir", str(tmp_path / "no-data"))
    assert_one_line_error(code, err, f"--out {tmp_path / 'a-file' / 'x.png'}: "
                          f"{tmp_path / 'a-file'} is a file, not a folder")
    code, _, err = run(capsys, "data", "show", "--out", "/sys/fashionlab/x.png",
                       "--dir", str(tmp_path / "no-data"))
    assert_one_line_error(code, err, "--out /sys/fashionlab/x.png: /sys: cannot write there")
    code, _, err = run(capsys, "data", "show", "--out", str(tmp_path / "grid.txt"),
                       "--dir", str(tiny_idx_dir), "--no-verify")
    assert_one_line_error(code, err, "grid.txt: name an image file ending in .png, .jpg")
    assert not (tmp_path / "grid.txt").exists()
    (tmp_path / "a-folder.png").mkdir()  # refused before the data is read, not after drawing
    code, _, err = run(capsys, "data", "show", "--out", str(tmp_path / "a-folder.png"),
                       "--dir", str(tmp_path / "no-data"))
    assert_one_line_error(code, err, "a-folder.png: is a folder; name the image file to write")


def test_show_never_leaves_half_an_image(capsys: pytest.CaptureFixture[str], tiny_idx_dir: Path,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Writing fails (or is killed) halfway: the image already there stays whole, and nothing
    half-written carries its name."""
    from matplotlib.figure import Figure

    out = tmp_path / "grid.png"
    code, _, err = run(capsys, "data", "show", "--out", str(out), "--dir", str(tiny_idx_dir),
                       "--no-verify", "--per-class", "2")
    assert code == 0, err
    before = out.read_bytes()

    def half_then_full_disk(self: Figure, target: object, **kwargs: object) -> None:
        Path(str(target)).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_then_full_disk)
    code, _, err = run(capsys, "data", "show", "--out", str(out), "--dir", str(tiny_idx_dir),
                       "--no-verify", "--per-class", "3")
    assert_one_line_error(code, err, f"{out}: cannot write")
    assert out.read_bytes() == before and sorted(tmp_path.glob("*grid*")) == [out]


def test_show_writes_the_format_its_name_says(capsys: pytest.CaptureFixture[str],
                                              tiny_idx_dir: Path, tmp_path: Path):
    for name, magic in [("g.jpg", b"\xff\xd8\xff"), ("g.PNG", b"\x89PNG"), ("g.pdf", b"%PDF"),
                        ("g.svg", b"<?xml")]:
        code, _, err = run(capsys, "data", "show", "--out", str(tmp_path / name),
                           "--dir", str(tiny_idx_dir), "--no-verify", "--per-class", "2")
        assert code == 0, err
        assert (tmp_path / name).read_bytes().startswith(magic), name


# --- the figure ---------------------------------------------------------------------------------


def test_sample_grid_rows_are_classes_and_missing_cells_blank():
    import matplotlib.pyplot as plt  # only to check that no pyplot figure is created

    labels = np.array([0, 0, 0, 1, 2], dtype=np.uint8)
    images = np.stack([np.full((28, 28), 10 * i, np.uint8) for i in range(5)])
    figure = sample_grid(images, labels, per_class=2, class_names=("a", "b", "c"))
    assert plt.get_fignums() == []
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    mosaic = np.asarray(ax.images[0].get_array(), dtype=float)
    cells = [[mosaic[2 + r * 30 + 14, 2 + c * 30 + 14] for c in range(2)] for r in range(3)]
    assert cells[0] == [0, 10] and cells[1][0] == 30 and cells[2][0] == 40  # first per class
    assert np.isnan(cells[1][1]) and np.isnan(cells[2][1])  # classes 1, 2 have one image each
    with pytest.raises(ValueError, match="per_class"):
        sample_grid(images, labels, per_class=0)
