"""Checkpoints: written durably, verified on load, and never a dead end. A damaged, missing or
foreign checkpoint costs epochs, not the run: resuming ends with exactly the numbers of an
uninterrupted run, and the damage is reported in one line. A failed write leaves nothing."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import OnEpoch, Recorder, assert_one_line_error, run_cli, tiny_study_toml

from fashionlab.checkpoints import (
    DamagedCheckpoint,
    previous_checkpoint,
    read_checkpoint,
    remove_checkpoint,
    write_checkpoint,
)
from fashionlab.config import DenseLayer, EarlyStopping, ModelSpec, TrainSpec
from fashionlab.cv import CheckpointWarning, MemberResult, train_members
from fashionlab.data import load_fashion_mnist, to_tensors
from fashionlab.errors import CheckpointError
from fashionlab.progress import Silent
from fashionlab.runner import train_stack
from fashionlab.schema import models
from fashionlab.store import Store
from fashionlab.train import Member, Tensors

CPU = torch.device("cpu")
DENSE = ModelSpec(layers=(DenseLayer(24, l2=0.001, dropout=0.2),))  # dropout: RNG state matters
# Early stopping with best weights: the stoppers and best weights are in the checkpoint too.
TRAIN = TrainSpec(epochs=5, batch_size=32, precision="fp32",
                  early_stopping=EarlyStopping(patience=2, restore_best=True))


@pytest.fixture
def tiny(tiny_idx_dir: Path) -> Tensors:
    dataset = load_fashion_mnist(tiny_idx_dir, verify=False)
    x, y = to_tensors(dataset.train)
    return Tensors(x, y, x, y)  # cross-validation: validation rows come from the training set


def _members(seeds: tuple[int, ...] = (1, 2)) -> list[Member]:
    out = []
    for i, seed in enumerate(seeds):
        val = np.arange(i % 3 * 100, i % 3 * 100 + 100)  # each member's own third
        out.append(Member(f"m{seed}", DENSE, np.setdiff1d(np.arange(300), val), val, seed))
    return out


def _numbers(results: dict[str, MemberResult]) -> dict[str, object]:
    """Every epoch metric and the outcome of each member; `seconds` is wall time, left out."""
    return {key: ([(m.loss, m.accuracy, m.val_loss, m.val_accuracy) for m in r.history],
                  r.status, r.best_epoch, r.message)
            for key, r in results.items()}


class Interrupt(Exception):
    pass


def _interrupt_at(epoch: int) -> Callable[..., None]:
    def on_epoch(at: int, metrics: object, results: object) -> None:
        if at == epoch:
            raise Interrupt
    return on_epoch


@pytest.fixture
def reference(tiny: Tensors) -> dict[str, object]:
    return _numbers(train_members(_members(), TRAIN, tiny, CPU))


def _interrupted(tiny: Tensors, checkpoint: Path, epoch: int = 3) -> None:
    with pytest.raises(Interrupt):
        train_members(_members(), TRAIN, tiny, CPU, checkpoint=checkpoint,
                      on_epoch=_interrupt_at(epoch))


# ---- the file format -----------------------------------------------------------------------


def test_two_generations_are_kept_and_verify(tiny: Tensors, tmp_path: Path):
    checkpoint = tmp_path / "ck" / "stack.pt"
    _interrupted(tiny, checkpoint, epoch=3)
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["stack.prev.pt", "stack.pt"]
    assert read_checkpoint(checkpoint)["epoch"] == 3
    assert read_checkpoint(previous_checkpoint(checkpoint))["epoch"] == 2
    remove_checkpoint(checkpoint)
    assert list(checkpoint.parent.iterdir()) == []


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "header only": lambda data: data[:20],
    "random bytes": lambda data: np.random.default_rng(0).bytes(len(data)),
    "one byte changed": lambda data: data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
    "bytes appended": lambda data: data + b"\0" * 10,
    "random bytes like a zip": lambda data: b"PK" + np.random.default_rng(0).bytes(500),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_file_is_refused_in_a_few_words(tmp_path: Path, case: str):
    path = tmp_path / "c.pt"
    write_checkpoint(path, {"weights": torch.arange(1000.0), "epoch": 3})
    path.write_bytes(DAMAGE[case](path.read_bytes()))
    with pytest.raises(DamagedCheckpoint) as error:
        read_checkpoint(path)
    assert "\n" not in str(error.value) and len(str(error.value)) < 250


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path: Path):
    path = tmp_path / "old.pt"
    torch.save({"epoch": 2}, path)  # how fashionlab wrote checkpoints before
    assert read_checkpoint(path) == {"epoch": 2}


# ---- damage costs epochs, not the run ------------------------------------------------------


def _damage_newest(case: str) -> Callable[[Path], None]:
    def damage(checkpoint: Path) -> None:
        checkpoint.write_bytes(DAMAGE[case](checkpoint.read_bytes()))
    return damage


def _delete_newest(checkpoint: Path) -> None:
    checkpoint.unlink()


def _damage_both(checkpoint: Path) -> None:
    for path in (checkpoint, previous_checkpoint(checkpoint)):
        path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))


def _truncate_newest_delete_previous(checkpoint: Path) -> None:
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    previous_checkpoint(checkpoint).unlink()


SCENARIOS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (damage, what the report says, where training continues)
    "truncated": (_damage_newest("truncated"), "damaged (truncated", "stack.prev.pt (epoch 2)"),
    "emptied": (_damage_newest("empty"), "damaged (empty file)", "stack.prev.pt (epoch 2)"),
    "random bytes": (_damage_newest("random bytes"), "damaged (not a fashionlab checkpoint)",
                     "stack.prev.pt (epoch 2)"),
    "one byte changed": (_damage_newest("one byte changed"), "damaged (checksum mismatch",
                         "stack.prev.pt (epoch 2)"),
    "newest deleted": (_delete_newest, "missing", "stack.prev.pt (epoch 2)"),
    "both damaged": (_damage_both, "damaged", "first epoch"),
    "only a truncated one": (_truncate_newest_delete_previous, "damaged (truncated",
                             "first epoch"),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_resuming_from_a_damaged_checkpoint_gives_the_uninterrupted_numbers(
        tiny: Tensors, tmp_path: Path, reference: dict[str, object], scenario: str):
    damage, report, outcome = SCENARIOS[scenario]
    checkpoint = tmp_path / "ck" / "stack.pt"
    _interrupted(tiny, checkpoint, epoch=3)
    damage(checkpoint)
    with pytest.warns(CheckpointWarning) as caught:
        resumed = train_members(_members(), TRAIN, tiny, CPU, checkpoint=checkpoint)
    assert _numbers(resumed) == reference
    lines = [str(w.message) for w in caught if w.category is CheckpointWarning]
    assert lines and all("\n" not in line and str(tmp_path) in line for line in lines), lines
    assert report in lines[0] and outcome in lines[0], lines
    # The damaged files are gone: both generations left verify.
    for path in (checkpoint, previous_checkpoint(checkpoint)):
        read_checkpoint(path)


def test_the_caller_can_show_the_report_itself(tiny: Tensors, tmp_path: Path,
                                               reference: dict[str, object]):
    checkpoint = tmp_path / "ck" / "stack.pt"
    _interrupted(tiny, checkpoint, epoch=3)
    checkpoint.write_bytes(b"")
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning besides the hook
        resumed = train_members(_members(), TRAIN, tiny, CPU, checkpoint=checkpoint,
                                on_damaged=shown.append)
    assert _numbers(resumed) == reference
    assert shown == [(f"checkpoint {checkpoint} is damaged (empty file): resuming from "
                      "stack.prev.pt (epoch 2)")]


def test_another_stacks_checkpoint_is_not_used(tiny: Tensors, tmp_path: Path,
                                               reference: dict[str, object]):
    other = tmp_path / "ck" / "other.pt"
    with pytest.raises(Interrupt):
        train_members(_members((7, 8)), TRAIN, tiny, CPU, checkpoint=other,
                      on_epoch=_interrupt_at(2))
    checkpoint = tmp_path / "ck" / "stack.pt"
    shutil.copy(other, checkpoint)  # valid, but written for other members
    with pytest.warns(CheckpointWarning, match="does not fit this stack.*first epoch"):
        resumed = train_members(_members(), TRAIN, tiny, CPU, checkpoint=checkpoint)
    assert _numbers(resumed) == reference


def test_a_stale_temporary_file_is_removed_and_ignored(tiny: Tensors, tmp_path: Path,
                                                       reference: dict[str, object]):
    checkpoint = tmp_path / "ck" / "stack.pt"
    _interrupted(tiny, checkpoint, epoch=3)
    stale = checkpoint.with_name("stack.pt.tmp")
    stale.write_bytes(b"half of a checkpoint from a killed process")
    epochs: list[int] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is damaged: nothing to report
        resumed = train_members(_members(), TRAIN, tiny, CPU, checkpoint=checkpoint,
                                on_epoch=lambda epoch, metrics, results: epochs.append(epoch))
    assert epochs[0] == 3  # resumed from the newest generation
    assert _numbers(resumed) == reference
    assert not stale.exists()


def test_the_store_gets_one_row_per_epoch_with_the_uninterrupted_numbers(
        tiny: Tensors, tmp_path: Path):
    """Falling back to an earlier generation trains epochs the store already holds: they are
    rewritten with the same numbers, never duplicated."""

    def fresh_store() -> tuple[Store, str]:
        store = Store("sqlite://")
        run = store.create_run(kind="study", name="t", fingerprint="abc123", seed=0,
                               config={}, environment={})
        store.register_models(run.id, [{"key": m.key, "candidate": "c", "role": "cv",
                                        "repeat": 0, "fold": i, "epochs_planned": 5}
                                       for i, m in enumerate(_members())])
        return store, run.id

    def rows(store: Store, run_id: str) -> list[tuple[object, ...]]:
        return [(e.key, e.epoch, e.loss, e.accuracy, e.val_loss, e.val_accuracy)
                for e in store.epochs(run_id)]

    store, run_id = fresh_store()
    train_stack(store, run_id, _members(), TRAIN, tiny, CPU, checkpoint=tmp_path / "ref.pt",
                label="stack", reporter=Silent())
    expected = rows(store, run_id)
    expected_models = [(m.key, m.status, m.best_epoch) for m in store.models(run_id)]

    for damage in (_damage_newest("truncated"), _damage_both):
        store, run_id = fresh_store()
        checkpoint = tmp_path / "ck" / "stack.pt"
        remove_checkpoint(checkpoint)

        def after_epoch(key: str, epoch: int) -> None:
            if epoch == 4:  # stored, then stopped: the store is ahead of the previous generation
                raise Interrupt

        with pytest.raises(Interrupt):
            train_stack(store, run_id, _members(), TRAIN, tiny, CPU, checkpoint=checkpoint,
                        label="stack", reporter=OnEpoch(after_epoch))
        assert len(rows(store, run_id)) == 2 * 4
        damage(checkpoint)
        recorder = Recorder()  # the damage is told on the run's reporter, in one line
        train_stack(store, run_id, _members(), TRAIN, tiny, CPU, checkpoint=checkpoint,
                    label="stack", reporter=recorder)
        lines = [c[1] for c in recorder.calls if c[0] == "log"]
        assert lines and all("\n" not in line for line in lines)
        assert "damaged" in lines[0]
        assert rows(store, run_id) == expected
        assert [(m.key, m.status, m.best_epoch) for m in store.models(run_id)] == \
            expected_models


def test_a_stack_found_trained_keeps_the_machine_that_trained_it(tiny: Tensors, tmp_path: Path):
    """A process that continues a stack from a checkpoint whose every epoch is stored (the
    writer of a shared run, reusing a model another machine trained) trains nothing: the
    models still name the machine that trained them."""
    store = Store("sqlite://")
    run = store.create_run(kind="study", name="t", fingerprint="abc123", seed=0, config={},
                           environment={})
    store.register_models(run.id, [{"key": m.key, "candidate": "c", "role": "cv", "repeat": 0,
                                    "fold": i, "epochs_planned": 5}
                                   for i, m in enumerate(_members())])
    checkpoint = tmp_path / "stack.pt"

    def stop_at_the_end(key: str, epoch: int) -> None:
        if epoch == TRAIN.epochs:  # stored, checkpoint written: a process stopped right then
            raise Interrupt

    with pytest.raises(Interrupt):
        train_stack(store, run.id, _members(), TRAIN, tiny, CPU, checkpoint=checkpoint,
                    label="stack", reporter=OnEpoch(stop_at_the_end))
    with store.engine.begin() as conn:
        conn.execute(models.update().values(host="machine-b"))
    train_stack(store, run.id, _members(), TRAIN, tiny, CPU, checkpoint=checkpoint,
                label="stack", reporter=Silent())
    assert {m.host for m in store.models(run.id)} == {"machine-b"}
    assert {m.status for m in store.models(run.id)} == {"finished"}


# ---- writing -------------------------------------------------------------------------------


def test_the_data_and_the_rename_are_synced(tiny: Tensors, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    checkpoint = tmp_path / "stacks" / "stack.pt"
    tmp = checkpoint.with_name("stack.pt.tmp")
    real_fsync = os.fsync
    calls: list[tuple[str, int]] = []

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            calls.append(("folder", info.st_ino))
        else:  # the data must be synced while it still has the temporary name
            assert tmp.exists() and tmp.stat().st_ino == info.st_ino
            calls.append(("file", info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    train_members(_members(), dataclasses.replace(TRAIN, epochs=2), tiny, CPU,
                  checkpoint=checkpoint)
    folder = checkpoint.parent.stat().st_ino
    newest, previous = checkpoint.stat().st_ino, previous_checkpoint(checkpoint).stat().st_ino
    assert calls == [("file", previous), ("folder", folder), ("file", newest), ("folder", folder)]


@pytest.mark.parametrize("failing_save", [1, 2])
def test_a_full_disk_leaves_no_temporary_file_and_says_what_to_do(
        tiny: Tensors, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        reference: dict[str, object], failing_save: int):
    checkpoint = tmp_path / "ck" / "stack.pt"
    real_fsync = os.fsync
    saves = {"n": 0}

    def fsync(fd: int) -> None:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            saves["n"] += 1
            if saves["n"] == failing_save:  # where a delayed-allocation file system says so
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError) as error:
        train_members(_members(), TRAIN, tiny, CPU, checkpoint=checkpoint)
    message = str(error.value)
    assert message.startswith(f"{checkpoint}: cannot write the checkpoint (No space left")
    assert "free some space and run the same command again: it resumes" in message
    assert "\n" not in message
    assert not checkpoint.with_name("stack.pt.tmp").exists()
    if failing_save == 1:
        assert list(checkpoint.parent.iterdir()) == []
    else:  # the checkpoint before is intact
        assert read_checkpoint(checkpoint)["epoch"] == 1
    monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the same call resumes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed = train_members(_members(), TRAIN, tiny, CPU, checkpoint=checkpoint)
    assert _numbers(resumed) == reference


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_real_enospc_from_the_kernel(tiny: Tensors, tmp_path: Path):
    checkpoint = tmp_path / "ck" / "stack.pt"
    tmp = checkpoint.with_name("stack.pt.tmp")

    def fill_the_disk(epoch: int, metrics: object, results: object) -> None:
        tmp.symlink_to("/dev/full")  # the next save writes there: every write fails ENOSPC

    with pytest.raises(CheckpointError, match="No space left on device.*free some space"):
        train_members(_members(), TRAIN, tiny, CPU, checkpoint=checkpoint,
                      on_epoch=fill_the_disk)
    assert not os.path.lexists(tmp)
    assert read_checkpoint(checkpoint)["epoch"] == 1


def test_the_command_line_reports_a_full_disk_in_one_line(
        tiny_idx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]):
    study = tmp_path / "tiny.toml"
    study.write_text(tiny_study_toml(tiny_idx_dir, epochs=2, folds=2, final=False))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = run_cli(capsys, "study", str(study), "--run-dir", str(tmp_path / "runs"),
                           "--json")  # --json: no progress bars on stderr
    assert_one_line_error(code, err, "cannot write the checkpoint", "free some space",
                          "it resumes")
    assert not list((tmp_path / "runs").rglob("*.tmp"))
