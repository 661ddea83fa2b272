"""The experiment store on an in-memory database: runs, models, epochs, migrations."""

from __future__ import annotations

import math
import os

import pytest
import sqlalchemy as sa

from fashionlab.errors import StoreError
from fashionlab.store import MIGRATIONS, Store, migrate


@pytest.fixture
def store() -> Store:
    return Store("sqlite://")


def _run(store: Store, name: str = "seed", fingerprint: str = "abc123"):
    return store.create_run(kind="study", name=name, fingerprint=fingerprint, seed=0,
                            config={"name": name}, environment={"versions": {"torch": "x"}})


def _models(store: Store, run_id: str, *keys: str) -> None:
    store.register_models(run_id, [{"key": k, "candidate": k.split("/")[0], "role": "cv",
                                     "repeat": 0, "fold": i, "epochs_planned": 3}
                                    for i, k in enumerate(keys)])


def test_a_run_records_its_config_and_environment(store: Store):
    run = _run(store)
    again = store.run(run.id)
    assert again.config == {"name": "seed"} and again.environment["versions"]["torch"] == "x"
    assert again.status == "running" and again.state == "running"  # this process is alive
    assert again.pid == os.getpid()


def test_run_ids_are_unique_and_prefixes_resolve(store: Store):
    a, b = _run(store), _run(store)
    assert a.id != b.id
    assert store.run(b.id[:-1] if b.id.endswith("-2") else b.id).id in (a.id, b.id)
    with pytest.raises(StoreError, match="no run 'nope'.*runs list"):
        store.run("nope")


def test_a_run_whose_process_is_gone_is_interrupted(store: Store):
    run = _run(store)
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE fl_runs SET pid = 999999999 WHERE id = :id"), {"id": run.id})
    assert store.run(run.id).state == "interrupted"
    store.claim_run(run.id)
    assert store.run(run.id).state == "running"
    store.end_run(run.id, "finished", {"best": "x", "nan": math.nan})
    finished = store.run(run.id)
    assert finished.state == "finished" and finished.summary == {"best": "x", "nan": None}


def test_epochs_written_twice_are_stored_once(store: Store):
    run = _run(store)
    _models(store, run.id, "a/fold-0", "a/fold-1")
    rows = [("a/fold-0", 1, (1.0, 0.5, 1.1, 0.4, 0.1)), ("a/fold-1", 1, (1.2, 0.5, 1.3, 0.4, 0.1))]
    store.record_epochs(run.id, rows, {"a/fold-0": {"status": "running"}})
    store.record_epochs(run.id, rows[:1] + [("a/fold-0", 2, (0.9, 0.6, 1.0, math.nan, 0.1))])
    history = store.histories(run.id)
    assert [e.epoch for e in history["a/fold-0"]] == [1, 2]
    assert len(history["a/fold-1"]) == 1
    assert math.isnan(history["a/fold-0"][1].val_accuracy)  # NaN survives the round trip
    status = {m.key: m.status for m in store.models(run.id)}
    assert status == {"a/fold-0": "running", "a/fold-1": "pending"}


def test_registering_models_again_keeps_their_state(store: Store):
    run = _run(store)
    _models(store, run.id, "a/fold-0")
    store.update_model(run.id, "a/fold-0", status="finished", best_epoch=3)
    _models(store, run.id, "a/fold-0", "b/fold-0")
    models = {m.key: m for m in store.models(run.id)}
    assert models["a/fold-0"].status == "finished" and models["a/fold-0"].best_epoch == 3
    assert models["b/fold-0"].status == "pending"


def test_listing_filters_and_deleting_removes_everything(store: Store):
    a, b = _run(store, "seed", "f1"), _run(store, "other", "f2")
    _models(store, a.id, "x/fold-0")
    store.record_epochs(a.id, [("x/fold-0", 1, (1, 1, 1, 1, 1))])
    assert [r.id for r in store.runs(name="seed")] == [a.id]
    assert [r.id for r in store.runs(fingerprint="f2")] == [b.id]
    store.delete_run(a.id)
    assert [r.id for r in store.runs()] == [b.id]
    assert store.epochs(a.id) == [] and store.models(a.id) == []


def test_migrations_are_applied_once_and_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    Store(url).close()
    engine = sa.create_engine(url)
    assert migrate(engine) == len(MIGRATIONS)
    with engine.begin() as conn:
        versions = conn.execute(sa.text("SELECT version FROM fl_schema")).scalars().all()
        assert versions == list(range(1, len(MIGRATIONS) + 1))
        conn.execute(sa.text("INSERT INTO fl_schema VALUES (99, 'future')"))
    with pytest.raises(StoreError, match="newer than this fashionlab"):
        Store(url)


def test_an_unusable_store_url_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(f"sqlite:///{blocker / 'sub' / 'x.db'}")


def test_a_bare_postgresql_url_gets_the_installed_driver():
    from fashionlab.store import database_url

    assert database_url("postgresql://me:pw@db:5432/fl") == \
        "postgresql+psycopg2://me:pw@db:5432/fl"
    assert database_url("postgresql+psycopg2://me@db/fl") == "postgresql+psycopg2://me@db/fl"
    assert database_url("sqlite:///x.db") == "sqlite:///x.db"


def test_a_migration_that_loses_a_race_is_retried(tmp_path, monkeypatch):
    import fashionlab.store as store_module

    calls = {"n": 0}
    real = store_module._migrate_once

    def racing(engine):
        calls["n"] += 1
        if calls["n"] == 1:  # another process created the tables between check and create
            raise sa.exc.OperationalError("CREATE TABLE fl_runs", {}, Exception("exists"))
        return real(engine)

    monkeypatch.setattr(store_module, "_migrate_once", racing)
    Store(f"sqlite:///{tmp_path / 'x.db'}").close()
    assert calls["n"] == 2
