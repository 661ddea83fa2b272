"""Results in Jupyter: the HTML a study and a search show, a candidate's figure, the table as a
DataFrame; and the example notebook, stored without outputs, run headless on tiny data."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_idx
from helpers import tiny_study_toml
from matplotlib.figure import Figure

from fashionlab.config import load_study
from fashionlab.notebook import rows_frame, search_html
from fashionlab.results import StudyResult, table_rows
from fashionlab.search import SearchResult, run_search
from fashionlab.study import run_study
from fashionlab.tables import Row

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "study.ipynb"
PNG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyResult:
    """A tiny study with a candidate whose name needs escaping, a retrain and a final CNN."""
    root = tmp_path_factory.mktemp("study")
    data = write_tiny_idx(root / "tiny-idx")
    path = root / "tiny.toml"
    path.write_text(tiny_study_toml(data, epochs=3, candidates="""
[[candidates]]
name = "small <b>&"
layers = [{ units = 16 }]

[[candidates]]
name = "wide"
layers = [{ units = 32 }]
"""))
    with pytest.MonkeyPatch.context() as env:  # the autouse fixtures are per test
        env.setenv("FASHIONLAB_CACHE", str(root / "cache"))
        env.setenv("FASHIONLAB_MIRRORS", "http://127.0.0.1:9/")
        return run_study(load_study(path), run_dir=root / "runs", progress=False)


def test_a_study_shows_its_table_and_curves_as_html(study: StudyResult):
    page = study._repr_html_()
    assert "<table>" in page and "tiny: results" in page
    assert "small &lt;b&gt;&amp;" in page and "small <b>&" not in page  # names are escaped
    for header in ("val acc %", "95% CI", "vs best", "test acc %"):
        assert f">{header}</th>" in page
    assert "mean ± std across folds" in page  # the legend
    assert f"<code>{study.run.id}</code>" in page
    best = next(r for r in table_rows(study) if r.model == study.best)
    assert "<b>best</b>" in page and f"<b>{best.model}</b>" in page
    # every candidate, the retrained best and the CNN: small PNGs, inline
    images = PNG.findall(page)
    assert len(images) == len(study.candidates) + 1 + len(study.final) == 4
    for image in images:
        data = base64.b64decode(image)
        assert data.startswith(b"\x89PNG") and len(data) < 80_000


def test_a_study_as_text_is_one_short_line(study: StudyResult):
    """What a terminal or IPython shows: not the whole dataclass (~20 KB of config)."""
    shown = repr(study)
    best = next(r for r in table_rows(study) if r.model == study.best)
    retrained = next(r for r in table_rows(study) if r.kind == "retrain")
    assert shown.startswith(f"StudyResult(run='{study.run.id}', study='tiny', "
                            "status='finished', candidates=2, ")
    assert f"best={study.best!r} val_accuracy={100 * best.val_accuracy_mean:.2f} ± " in shown
    assert f"retrained_test_accuracy={100 * retrained.test_accuracy:.2f}%" in shown
    assert shown.endswith(f"output_dir='{study.output_dir}')")
    assert "\n" not in shown and len(shown) < 400
    # Its candidates hold arrays: == is identity, not numpy's "truth value is ambiguous".
    assert (study == dataclasses.replace(study)) is False


def test_a_figure_by_name_and_a_clear_error_for_an_unknown_one(study: StudyResult):
    for name in ("wide", "cnn", f"{study.best} (retrained)"):
        figure = study.figure(name)
        assert isinstance(figure, Figure)
        assert figure.get_suptitle().startswith(name)
        for ax in figure.axes:  # 3 epochs: ticks at whole epochs, not at 1.5 or 2.25
            ticks = ax.get_xticks()
            assert len(ticks) and (ticks == ticks.round()).all()
    # Shown by IPython as a picture, without `%matplotlib inline` (no pyplot, no backend).
    from IPython.core.formatters import DisplayFormatter  # only this test needs IPython

    shown, _ = DisplayFormatter().format(study.figure("cnn"))
    assert shown["image/png"].startswith(b"\x89PNG")
    with pytest.raises(ValueError) as error:
        study.figure("nope")
    message = str(error.value)
    assert message.startswith("no learning curves for 'nope'; this result has: ")
    for name in ("'small <b>&'", "'wide'", "'cnn'", "(retrained)'"):
        assert name in message


def test_to_frame_has_one_row_per_table_row_with_numbers(study: StudyResult):
    pandas = pytest.importorskip("pandas")
    frame = study.to_frame()
    rows = table_rows(study)
    assert isinstance(frame, pandas.DataFrame) and len(frame) == len(rows)
    assert list(frame["model"]) == [r.model for r in rows]
    for column in ("val_accuracy_mean", "val_accuracy_std", "ci_low", "ci_high",
                   "test_accuracy", "val_loss_mean"):
        assert frame[column].dtype == "float64", column
    assert frame["n"].dtype == "int64"
    wide = frame.set_index("model").loc["wide"]
    row = next(r for r in rows if r.model == "wide")
    assert wide["val_accuracy_mean"] == row.val_accuracy_mean and wide["n"] == 3
    assert math.isnan(frame.set_index("model").loc["cnn", "ci_low"])
    # The epoch as a number people can filter and plot, the rule that chose it beside it.
    assert str(frame["epoch"].dtype) == "Int64"
    for (epoch, rule), row in zip(frame[["epoch", "epoch_rule"]].itertuples(index=False), rows):
        if row.kind == "baseline":
            assert epoch is pandas.NA and rule == ""
        else:
            assert row.epoch == (f"{epoch} ({rule})" if rule else str(epoch))
    assert set(frame.loc[frame["kind"] == "cv", "epoch_rule"]) <= {"warning", "no warning"}
    assert list(frame.columns).index("epoch_rule") == list(frame.columns).index("epoch") + 1
    # "12/12" as two integers; the baseline trained nothing.
    assert str(frame["epochs_trained"].dtype) == str(frame["epochs_planned"].dtype) == "Int64"
    for (trained, planned), row in zip(
            frame[["epochs_trained", "epochs_planned"]].itertuples(index=False), rows):
        if row.kind == "baseline":
            assert trained is pandas.NA and planned is pandas.NA
        else:
            assert row.epochs_trained.startswith(f"{trained}/{planned}")


def test_a_rows_interval_never_leaves_0_to_100_percent(study: StudyResult):
    # Few folds far apart: Student's t would put the interval's top above 100%.
    wide = next(c for c in study.candidates if c.name == "wide")
    spread = dataclasses.replace(wide, val_accuracy=np.array([0.80, 0.95, 0.99]))
    result = dataclasses.replace(study, candidates=[spread])
    (row,) = [r for r in table_rows(result) if r.model == "wide"]
    assert row.ci_high == 1.0 and 0.5 < row.ci_low < 0.80
    assert row.val_accuracy_mean == pytest.approx((0.80 + 0.95 + 0.99) / 3)


def test_an_early_stopped_median_between_two_epochs_keeps_its_number():
    pytest.importorskip("pandas")
    rows = [Row("es", "cv", label, 0.3, 0.01, 0.9, 0.01, 0.88, 0.92, 2, "best", math.nan,
                "11/24", "") for label in ("5.5 (ES median)", "6 (ES median)")]
    frame = rows_frame(rows)  # the 5.5 was <NA>
    assert str(frame["epoch"].dtype) == "Float64"
    assert frame["epoch"].tolist() == [5.5, 6.0]
    assert frame["epoch_rule"].tolist() == ["ES median"] * 2
    assert str(rows_frame(rows[1:])["epoch"].dtype) == "Int64"  # whole epochs stay integers


def test_to_frame_without_pandas_says_how_to_install_it(study: StudyResult,
                                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
    with pytest.raises(ImportError) as error:
        study.to_frame()
    assert str(error.value) == "to_frame needs pandas: pip install pandas"


def test_pandas_is_not_imported_by_the_library():
    code = ("import fashionlab.results, fashionlab.notebook, fashionlab.search, sys; "
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_a_search_shows_its_top_trials_as_html(tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "search.toml"
    path.write_text(tiny_study_toml(
        tiny_idx_dir, name="tiny-search", epochs=2, final=False, patience=1,
        candidates='[[candidates]]\nname = "small"\nlayers = [{ units = 16 }]\n',
        extra="[search]\nn_trials = 2\nwarmup = 1\n\n[search.space]\n"
              "learning_rate = { low = 1e-4, high = 0.05, log = true }\n"))
    result = run_search(load_study(path), run_dir=tmp_path / "runs", progress=False)
    assert isinstance(result, SearchResult) and result.summary is not None
    page = result._repr_html_()
    assert "tiny-search: search results" in page and "<table>" in page
    assert ">95% CI</th>" in page and ">vs best</th>" in page and ">best</td>" in page
    assert "learning_rate=" in page  # the trials' parameters
    assert "retrained for" in page  # the best, retrained and tested
    assert len(PNG.findall(page)) >= 1  # the optimisation history
    best = max(result.trials, key=lambda t: t.value)
    assert repr(result) == (
        f"SearchResult(run='{result.run.id}', study_name='{result.study_name}', "
        f"trials='2 complete, 0 pruned, 0 failed trials', stopped_by='n_trials', finished=True, "
        f"best='trial {best.number}: {best.value:.4f}', output_dir='{result.output_dir}')")


def test_an_unfinished_search_says_how_far_it_got():
    page = search_html(None, name="a <search>", status="Run `x`: 2 complete; stopped by "
                       "timeout, not finished")
    assert "a &lt;search&gt;: search" in page and "<code>x</code>" in page
    assert "<table>" not in page


# --------------------------------------------------------------------------------------------
# The example notebook


def test_the_example_notebook_is_stored_without_outputs():
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(NOTEBOOK)], cwd=ROOT,
                             capture_output=True, text=True, check=False)
    if tracked.returncode == 0:  # what git holds, not the working copy
        text = subprocess.run(["git", "show", f"HEAD:{NOTEBOOK.relative_to(ROOT)}"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    else:
        text = NOTEBOOK.read_text()
    notebook = json.loads(text)
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has code cells"
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, cell["source"]
    assert len([c for c in notebook["cells"] if c["cell_type"] == "markdown"]) >= len(code) - 2


def test_the_example_notebook_runs_on_tiny_data(tiny_idx_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("FASHIONLAB_NOTEBOOK_QUICK", "1")  # the kernel inherits the environment
    monkeypatch.setenv("FASHIONLAB_DATA", str(tiny_idx_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    started = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - started
    assert seconds < 180, seconds

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # Optuna's tqdm.auto in a kernel without ipywidgets: "IProgress not found. Please update
    # jupyter and ipywidgets", advice about widgets fashionlab never draws.
    said = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "IProgress" not in said and "ipywidgets" not in said, said
    pages = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("seed-quick: results" in p and "95% CI" in p for p in pages)  # run_study
    assert any("search-quick: search results" in p for p in pages)  # run_search
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 1 + 6 + 2  # samples, six candidates' curves, confusion, the CNN
    assert (tmp_path / "runs").is_dir()  # the runs went to the notebook's folder
