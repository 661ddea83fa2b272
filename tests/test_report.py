"""The HTML report: written by every study, self-contained, escaped, complete; tolerant of
unfinished runs, missing model files and searches; opened in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import write_tiny_idx
from helpers import assert_one_line_error, run_cli, tiny_study_toml
from PIL import Image

from fashionlab import schema as schema_module
from fashionlab.config import load_study
from fashionlab.report import ReportError, render_report, write_report
from fashionlab.results import StudyResult
from fashionlab.store import Store
from fashionlab.study import run_study

EVIL = "<script>alert(1)</script>"
STUDY_NAME = "tiny <script>alert('study')</script>"
CANDIDATES = f"""
[[candidates]]
name = "small"
layers = [{{ units = 16 }}]

[[candidates]]
name = "{EVIL}"
layers = [{{ units = 16, l2 = 0.001 }}]
"""
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyResult:
    """One tiny study (two candidates, one named like a script, and a CNN), run once."""
    root = tmp_path_factory.mktemp("report")
    data = write_tiny_idx(root / "tiny-idx")
    path = root / "study.toml"
    toml = tiny_study_toml(data, epochs=3, candidates=CANDIDATES)
    path.write_text(toml.replace('name = "tiny"', f'name = "{STUDY_NAME}"', 1))
    with pytest.MonkeyPatch.context() as env:  # the autouse fixtures are per test
        env.setenv("FASHIONLAB_CACHE", str(root / "cache"))
        env.setenv("FASHIONLAB_MIRRORS", "http://127.0.0.1:9/")
        env.delenv("FASHIONLAB_DATA", raising=False)
        return run_study(load_study(path), run_dir=root / "runs", progress=False)


def _run_dir(study: StudyResult) -> Path:
    return study.output_dir.parent


def _rendered(study: StudyResult, run_dir: Path | None = None) -> str:
    """The study's report rendered afresh from the store in `run_dir` (default: its own)."""
    store = Store.open(run_dir or _run_dir(study))
    try:
        return render_report(store, study.run.id, run_dir=run_dir)
    finally:
        store.close()


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(uri) for uri in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                        html)]


class _Tables(HTMLParser):
    """The cell texts of every table row, by table id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._table = dict(attrs).get("id") or f"table-{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _tables(html: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(html)
    return parser.tables


# --------------------------------------------------------------------------------------------


def test_every_study_leaves_a_self_contained_report(study: StudyResult):
    path = study.output_dir / "report.html"
    html = path.read_text()
    assert path.stat().st_size < 2_000_000
    assert study.run.id in html
    # Nothing to fetch: every src is a data URI, and no link, script, style sheet or frame.
    assert re.findall(r'\b(?:src|href)="(?!data:image/png;base64,)', html) == []
    assert not re.search(r"<(script|link|iframe|object|embed)\b", html, re.IGNORECASE)
    assert "http://" not in html and "https://" not in html
    # Curves of 2 candidates and the CNN; for the retrained best and the CNN a confusion
    # matrix, per-class bars and (where it erred) a grid of mistakes.
    images = _images(html)
    assert len(images) >= 3 + 2 * 2
    for image in images:
        assert image.startswith(PNG)
        with Image.open(io.BytesIO(image)) as png:
            png.verify()


def test_user_strings_render_as_text(study: StudyResult):
    html = (study.output_dir / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "tiny &lt;script&gt;alert(&#39;study&#39;)&lt;/script&gt;" in html
    assert "<script" not in html.lower()


def test_the_report_holds_the_summary_table_tests_and_tested_models(study: StudyResult):
    html = (study.output_dir / "report.html").read_text()
    summary = study.run.summary
    tables = _tables(html)
    rows = tables["results"]
    assert [r[0] for r in rows] == [row["model"] for row in summary["table"]]
    assert rows[0][0] == "random guess"
    assert any("±" in cell for row in rows for cell in row)
    verdicts = {r[0]: r[-1] for r in tables["comparisons"]}
    assert set(verdicts) == {"small", EVIL} and "best" in verdicts.values()
    for fact in ("3-fold cross-validation", "seed", "torch", "wall time", "machine",
                 "overfitting warning: patience 2",
                 f"SHA-256 {study.run.environment['data']['sha256'][:12]}"):
        assert fact in html, fact
    # The retrained best and the CNN, tested on the 100 test images, with their intervals.
    assert html.count("Test accuracy <strong>") == 2
    assert len(re.findall(r"%</strong> \(95% interval \d+\.\d, \d+\.\d; \d+ of 100 test", html)) == 2
    per_class = [t for name, t in tables.items() if name.startswith("table-")]
    assert len(per_class) == 2 and all(len(t) == 10 for t in per_class)
    assert per_class[0][0][0] == "T-shirt/top" and per_class[0][0][1] == "10"
    assert "Learning curves" in html and "Final models" in html


def test_a_finished_runs_curves_are_its_figures_and_drawn_again_when_gone(
        study: StudyResult, tmp_path: Path):
    figures = study.output_dir / "figures"
    saved = [(figures / name).read_bytes()
             for name in ("curves-small.png", "curves-cnn.png")]
    html = (study.output_dir / "report.html").read_text()
    assert all(png in _images(html) for png in saved)  # embedded as written, not drawn again
    moved = tmp_path / "figures"
    shutil.move(figures, moved)
    try:
        again = _rendered(study)
    finally:
        shutil.move(moved, figures)
    images = _images(again)
    assert len(images) == len(_images(html))  # every curve still there, drawn from the store
    assert not any(png in images for png in saved)


@pytest.mark.parametrize("damage", ["empty", "random bytes", "truncated", "a link", "a pipe"])
def test_a_damaged_or_foreign_curves_file_is_drawn_again(study: StudyResult, tmp_path: Path,
                                                         damage: str):
    run_dir = tmp_path / "copy"
    shutil.copytree(_run_dir(study), run_dir)
    figure = run_dir / study.output_dir.name / "figures" / "curves-small.png"
    whole = figure.read_bytes()
    figure.unlink()
    if damage == "a link":  # a report is mailed: it shows no file from elsewhere
        (tmp_path / "secret.png").write_bytes(whole)
        figure.symlink_to(tmp_path / "secret.png")
    elif damage == "a pipe":  # opening it would block forever
        os.mkfifo(figure)
    else:
        figure.write_bytes({"empty": b"", "random bytes": os.urandom(3000),
                            "truncated": whole[: len(whole) // 2]}[damage])
    images = _images(_rendered(study, run_dir))
    assert len(images) == len(_images((study.output_dir / "report.html").read_text()))
    assert whole not in images
    for image in images:  # every one whole: drawn again, not the damaged bytes
        with Image.open(io.BytesIO(image)) as png:
            png.verify()


def test_a_missing_model_is_said_not_failed(study: StudyResult, tmp_path: Path):
    cnn = study.output_dir / "models" / "cnn"
    moved = tmp_path / "cnn"
    shutil.move(cnn, moved)
    try:
        html = _rendered(study)
    finally:
        shutil.move(moved, cnn)
    assert f"Not tested: the model files are not in {cnn}" in html
    assert html.count("Test accuracy <strong>") == 1


def test_the_cli_writes_a_report_anywhere_and_names_an_unknown_run(
        study: StudyResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "sub" / "mine.html"
    code, stdout, _ = run_cli(capsys, "report", study.run.id[:15], "--out", str(out),
                              "--run-dir", str(_run_dir(study)))
    assert code == 0 and str(out) in stdout
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in out.read_text()

    code, _, err = run_cli(capsys, "report", "no-such-run", "--run-dir", str(_run_dir(study)))
    assert_one_line_error(code, err, "no run 'no-such-run'")

    study_file = tmp_path / "study.toml"  # a slip of the command line: nothing written over
    study_file.write_text("name = 'mine'\n")
    code, _, err = run_cli(capsys, "report", study.run.id, "--out", str(study_file),
                           "--run-dir", str(_run_dir(study)))
    assert_one_line_error(code, err, "study.toml: a report is written to an .html file")
    assert study_file.read_text() == "name = 'mine'\n"
    folder = f"{tmp_path / 'reports.html'}/"  # a folder meant: no file of that name written
    code, _, err = run_cli(capsys, "report", study.run.id, "--out", folder,
                           "--run-dir", str(_run_dir(study)))
    assert_one_line_error(code, err, f"{folder}: names a folder; a report is written to an "
                          ".html file")
    assert not (tmp_path / "reports.html").exists()
    code, _, err = run_cli(capsys, "report", study.run.id, "--out",
                           str(study_file / "in" / "r.html"), "--run-dir", str(_run_dir(study)))
    assert_one_line_error(code, err, f"cannot write the report ({study_file} is a file, not a "
                          "folder)")


def test_an_interrupted_run_reports_what_is_stored(tmp_path: Path):
    store = Store.open(tmp_path)
    run = store.create_run(kind="study", name="half done", fingerprint="f" * 32, seed=1,
                           config={"candidates": [{"name": "b"}, {"name": "a"}, {"name": "c"}]},
                           environment={}, output_root=tmp_path)
    store.register_models(run.id, [
        {"key": f"{name}/fold-{fold}", "candidate": name, "role": "cv", "fold": fold,
         "epochs_planned": 5} for name in ("a", "b", "c") for fold in (0, 1)])
    store.record_epochs(run.id, [(f"{name}/fold-{fold}", epoch, (1.0 / epoch, 0.5, 1.1, 0.4, 0.1))
                                 for name in ("a", "b") for fold in (0, 1) for epoch in (1, 2)])
    with store.engine.begin() as conn:  # its process on another machine, silent for an hour
        conn.execute(sa.update(schema_module.runs).values(host="elsewhere",
                                                         heartbeat=time.time() - 3600))
    path = write_report(store, run.id)
    html = path.read_text()
    assert path == tmp_path / run.id / "report.html"
    assert "interrupted" in html and "run the same command again" in html
    assert "no results table yet" in html
    assert len(_images(html)) == 2  # the stored curves of b and a
    assert html.index("learning curves of b") < html.index("learning curves of a")
    assert "2 models, 4 epochs stored" in html
    assert "c: 2 models, 0 epochs stored" in html  # c, not started: said, no empty axes


def test_a_study_of_final_models_only_claims_no_cross_validation(tmp_path: Path):
    data = write_tiny_idx(tmp_path / "tiny-idx")
    path = tmp_path / "final.toml"
    path.write_text(tiny_study_toml(data, epochs=1, candidates=""))
    result = run_study(load_study(path), run_dir=tmp_path / "runs", progress=False)
    markdown = (result.output_dir / "results.md").read_text()
    assert "no cross-validation (final models only)" in markdown and "-fold CV" not in markdown
    html = write_report(Store.open(tmp_path / "runs"), result.run.id).read_text()
    assert "no cross-validation: each model trains on all training images" in html
    assert not re.search("each fold trains|-fold cross|is retrained", html)


def test_a_search_report_shows_history_importances_and_top_trials(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    trials = [{"number": i, "value": None if i == 3 else 0.8 + 0.01 * (i % 5),
               "params": {"lr": 10.0 ** -(i % 4), EVIL: i}, "state": "PRUNED" if i == 3
               else "COMPLETE"} for i in range(14)]
    run = store.create_run(kind="search", name=f"search {EVIL}", fingerprint="s" * 32, seed=0,
                           config={}, environment={})
    store.end_run(run.id, "finished", {"trials": trials, "importances": {"lr": 0.7, EVIL: 0.3}})
    with pytest.raises(ReportError, match="has no output directory"):
        write_report(store, run.id)
    html = write_report(store, run.id, tmp_path / "search.html").read_text()
    tables = _tables(html)
    assert len(tables["trials"]) == 10
    assert float(tables["trials"][0][1]) == pytest.approx(0.84)
    assert [r[0] for r in tables["importances"]] == ["lr", EVIL]
    assert len(_images(html)) == 2
    assert "<script" not in html.lower()


def test_the_report_in_chromium(study: StudyResult, tmp_path: Path):
    """Headless Chromium opens the report from disk: every image loads, no console errors, no
    dialog (the script-like names stay text), the table has its rows; a screenshot is saved."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.fail("Chromium is not installed: run `bash scripts/system-deps.sh all` "
                    "(installs Debian's chromium package)")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    dialogs: list[str] = []
    requests: list[str] = []
    screenshot = tmp_path / "report.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=[
            "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((study.output_dir / "report.html").as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight])")
            names = page.locator("#results tbody tr td:first-child").all_inner_texts()
            title = page.locator("h1").inner_text()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert errors == [] and dialogs == []
    assert all(url.startswith(("file:", "data:")) for url in requests), requests
    assert len(images) >= 7 and all(done and w > 0 and h > 0 for done, w, h in images), images
    assert names == [row["model"] for row in study.run.summary["table"]]
    assert EVIL in names and title == STUDY_NAME
    assert screenshot.read_bytes().startswith(PNG)
    with Image.open(screenshot) as png:
        assert png.width == 1280 and png.height > 900


def test_the_report_figures_draw_from_plain_arrays():
    from fashionlab import plots

    rng = np.random.default_rng(0)
    figures = [
        plots.confusion_matrix(rng.integers(0, 20, size=(10, 10))),
        plots.per_class_bars({"precision": rng.random(10), "recall": np.full(10, np.nan)}),
        plots.misclassified_grid(rng.integers(0, 256, (11, 28, 28), dtype=np.uint8),
                                 np.arange(11) % 10, (np.arange(11) + 1) % 10,
                                 confidence=rng.random(11)),
        plots.misclassified_grid(np.zeros((0, 28, 28), np.uint8), [], []),
        plots.search_history([0.5, None, 0.7, float("nan")], direction="minimize"),
        plots.param_importances({"lr": 0.7, "units": 0.3}),
    ]
    for figure in figures:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=40)
        assert buffer.getvalue().startswith(PNG)
    with pytest.raises(ValueError, match="10x10"):
        plots.confusion_matrix(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="must have 10 values"):
        plots.per_class_bars({"recall": [0.5]})


def test_a_candidate_with_no_epoch_yet_is_drawn_without_a_warning(recwarn):
    from fashionlab.plots import learning_curves

    nothing = np.full((3, 5), np.nan)  # three folds registered, none trained an epoch
    learning_curves({"loss": nothing, "accuracy": nothing, "val_loss": nothing,
                     "val_accuracy": nothing}, title="not started")
    assert [str(w.message) for w in recwarn] == []  # matplotlib: "No artists with labels ..."


def test_the_learning_curves_band_is_the_sample_std_the_tables_give():
    from matplotlib.collections import PolyCollection

    from fashionlab.plots import learning_curves

    folds = np.array([[0.5] * 4, [0.7] * 4])  # two folds: mean 0.6, sample std 0.1414
    figure = learning_curves({name: folds for name in ("loss", "accuracy", "val_loss",
                                                       "val_accuracy")}, title="two folds")
    bands = [c for ax in figure.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 4  # training and validation, loss and accuracy
    for band in bands:
        y = band.get_paths()[0].vertices[:, 1]
        assert y.max() == pytest.approx(0.6 + np.std([0.5, 0.7], ddof=1))
        assert y.min() == pytest.approx(0.6 - np.std([0.5, 0.7], ddof=1))


def test_the_learning_curves_title_counts_folds_and_repeats():
    from fashionlab.plots import learning_curves

    six = {name: np.full((6, 3), 0.5) for name in ("loss", "accuracy", "val_loss",
                                                   "val_accuracy")}
    assert learning_curves(six, title="m").get_suptitle() == "m, mean \u00b1 1 std of 6 folds"
    assert (learning_curves(six, title="m", repeats=2).get_suptitle()
            == "m, mean \u00b1 1 std of 3 folds x 2 repeats")
    one = {name: values[:1] for name, values in six.items()}  # a retrained model: no band
    assert learning_curves(one, title="m", repeats=2).get_suptitle() == "m"


@pytest.mark.filterwarnings("error")
def test_names_in_scripts_the_font_lacks_are_drawn_without_warnings(tmp_path: Path):
    from matplotlib.figure import Figure

    from fashionlab.plots import png_data_uri, save_figure

    figure = Figure()
    figure.subplots().set_title("\u4e2d\u6587 \U0001f642")  # CJK and an emoji: not in DejaVu
    save_figure(figure, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG)
    assert png_data_uri(figure).startswith("data:image/png;base64,")


def test_a_stop_inside_the_renderer_is_the_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """SIGTERM while matplotlib's native renderer draws came out of it as "ValueError: Invalid
    bounding box", a traceback: an error raised once a stop was asked for is that stop."""
    import signal

    from matplotlib.figure import Figure

    from fashionlab import stops
    from fashionlab.plots import png_data_uri, save_figure

    def interrupted(*args: object, **kwargs: object) -> None:
        raise ValueError("Invalid bounding box")  # what the renderer made of the interrupt

    figure = Figure()
    monkeypatch.setattr(figure, "savefig", interrupted)
    with pytest.raises(ValueError, match="Invalid bounding box"):  # no stop: the error
        save_figure(figure, tmp_path / "curves.png")
    monkeypatch.setattr(stops, "received", [signal.SIGTERM])
    for draw in (lambda: save_figure(figure, tmp_path / "curves.png"),
                 lambda: png_data_uri(figure)):
        with pytest.raises(KeyboardInterrupt):
            draw()
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_copied_run_directory_gets_its_report_in_the_copy(
        study: StudyResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    copy = tmp_path / "copy"  # its store still names the original's folder
    shutil.copytree(_run_dir(study), copy)
    (copy / study.run.id / "report.html").unlink()
    original = (study.output_dir / "report.html").read_bytes()
    code, out, err = run_cli(capsys, "report", study.run.id, "--run-dir", str(copy))
    assert code == 0, err
    written = (copy / study.run.id / "report.html").resolve()
    assert f"wrote {written}" in out
    assert (study.output_dir / "report.html").read_bytes() == original  # not written there
    html = written.read_text()
    assert "Not tested" not in html  # the models tested from the copy
    assert str(written.parent) in html and str(study.output_dir) not in html
    code, out, _ = run_cli(capsys, "runs", "show", study.run.id, "--json",
                           "--run-dir", str(copy))
    assert json.loads(out)["output_dir"] == str(written.parent)
    # A copy without the run's folder: its report goes into the copy, its models read where
    # the store says they are.
    shutil.rmtree(copy / study.run.id)
    code, out, err = run_cli(capsys, "report", study.run.id, "--run-dir", str(copy))
    assert code == 0, err
    assert f"wrote {copy / study.run.id / 'report.html'}" in out
    assert (study.output_dir / "report.html").read_bytes() == original  # not written there
    assert "Not tested" not in (copy / study.run.id / "report.html").read_text()
    # The study shown from the copy then finds its results where they are (the folder made
    # for the report holds none of them), not a folder whose models were deleted.
    shown = run_study(study.spec, run_dir=copy, progress=False)
    assert shown.notes == [] and shown.output_dir == study.output_dir


def test_a_shared_stores_report_goes_where_the_run_wrote_its_files(
        tiny_idx_dir: Path, tmp_path: Path, postgres_url: str,
        capsys: pytest.CaptureFixture[str]):
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_study_toml(tiny_idx_dir, epochs=1, folds=2, final=False))
    result = run_study(load_study(path), run_dir=tmp_path / "a", store_url=postgres_url,
                       progress=False)
    code, out, err = run_cli(capsys, "report", result.run.id, "--store", postgres_url,
                             "--run-dir", str(tmp_path / "b"))  # the default, on this machine
    assert code == 0, err
    assert f"wrote {result.output_dir / 'report.html'}" in out
    assert not (tmp_path / "b").exists()
