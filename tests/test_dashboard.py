"""optuna-dashboard opens a search as fashionlab stores it (Optuna's RDB storage in the store's
database): its own WSGI app lists the study and serves its trials, params and values."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from helpers import tiny_search_toml
from optuna.trial import TrialState

from fashionlab.config import load_study
from fashionlab.search import run_search
from fashionlab.store import default_url

optuna_dashboard = pytest.importorskip("optuna_dashboard")


def _get(app: Any, path: str) -> dict[str, Any]:
    """GET `path` from a WSGI app: its JSON body (status 200 asserted)."""
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET",
                               "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (path, status, body[:200])
    return json.loads(body)


def test_optuna_dashboard_shows_a_search_as_it_is_stored(tiny_idx_dir: Path, tmp_path: Path):
    path = tmp_path / "search.toml"
    path.write_text(tiny_search_toml(tiny_idx_dir, n_trials=3))
    run_dir = tmp_path / "runs"
    result = run_search(load_study(path), run_dir=run_dir, progress=False)
    assert result.finished

    app = optuna_dashboard.wsgi(default_url(run_dir))  # the URL `optuna-dashboard` is given
    (study,) = _get(app, "/api/studies")["study_summaries"]
    assert study["study_name"] == result.study_name
    assert study["directions"] == ["maximize"]
    # Which fashionlab run it is (`fashionlab runs show RUN`), among the study's attributes.
    assert {"key": "fashionlab.run_id", "value": result.run.id} in study["user_attrs"]
    detail = _get(app, f"/api/studies/{study['study_id']}")
    trials = {t["number"]: t for t in detail["trials"]}
    expected = {t.number: t for t in result.trials}
    assert sorted(trials) == sorted(expected) and len(trials) == 3
    for number, trial in expected.items():
        shown = trials[number]
        assert shown["state"] == trial.state.name.capitalize()
        if trial.state == TrialState.COMPLETE:
            assert shown["values"] == pytest.approx([trial.value])
        params = {p["name"]: float(p["param_external_value"]) for p in shown["params"]}
        assert params == pytest.approx(trial.params)
        reported = {v["step"]: float(v["value"]) for v in shown["intermediate_values"]}
        assert reported == pytest.approx(trial.intermediate_values)
    best = max((t for t in result.trials if t.state == TrialState.COMPLETE),
               key=lambda t: t.value or 0.0)
    assert [t["number"] for t in detail["best_trials"]] == [best.number]
