"""What storing checkpoints in the database costs a study trained by several machines.

What it proves: a run whose store is a database server keeps each stack's newest checkpoint in
`fl_checkpoints`, replaced with every epoch in the epoch's own transaction, so that another
machine can continue the stack. This measures, for every job of the seed study (full data, one
real epoch each), the checkpoint's size, the epoch's time, and the time of the epoch's
transaction with and without the checkpoint (the median of --repeat), on the PostgreSQL
server given. Prints one line per job and the overhead as a share of the epoch.

    python benchmarks/bench_shared_checkpoints.py postgresql://postgres@127.0.0.1:5432/bench

The database is written to (one run, deleted at the end). Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from _protocol import positive_int

from fashionlab.config import load_study
from fashionlab.cv import make_folds, train_members
from fashionlab.data import to_tensors
from fashionlab.errors import StoreError
from fashionlab.hardware import resolve_device
from fashionlab.jobs import claim_job, register_jobs
from fashionlab.provenance import cpu_model
from fashionlab.steps import cv_members, load_study_data, plan_stacks
from fashionlab.store import Store
from fashionlab.train import Member, Tensors


class _Stop(Exception):
    pass


def _stop(*_: object) -> None:
    raise _Stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="a PostgreSQL database URL to write to")
    parser.add_argument("--repeat", type=positive_int, default=5)
    args = parser.parse_args()
    try:  # a URL it cannot use is one line, before anything trains
        store = Store(args.url)
    except StoreError as error:
        parser.error(str(error))

    spec = load_study("seed")
    device = resolve_device("cpu")
    dataset = load_study_data(spec)
    x, y = to_tensors(dataset.train, device, torch.uint8)  # as the study holds them
    x_test, y_test = to_tensors(dataset.test, device, torch.uint8)
    folds = make_folds(len(dataset.train), spec.cv, seed=spec.seed, labels=dataset.train.labels)
    members, owner, _ = cv_members(spec, folds)
    jobs = [(f"{len(stack)} x {owner[stack[0].key].name}", stack, owner[stack[0].key].train,
             Tensors(x, y, x, y)) for stack in plan_stacks(list(members.values()), owner)]
    cnn = spec.final[0]
    jobs.append((f"final {cnn.name}", [Member("cnn/final", cnn.model, np.arange(len(x)),
                                              np.arange(len(x_test)), 0)],
                 cnn.train, Tensors(x, y, x_test, y_test)))

    run = store.create_run(kind="study", name="bench-checkpoints", fingerprint="0" * 32,
                           seed=0, config={}, environment={})
    register_jobs(store, run.id, [("job", "job")], threads=torch.get_num_threads())
    claim = claim_job(store, run.id, "job", by="bench")
    assert claim is not None
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"store {store.engine.dialect.name} {store.engine.dialect.server_version_info}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, stack, train, data in jobs:
                path = Path(tmp) / f"{abs(hash(name))}.pt"
                # Stopped after its first epoch of two: the checkpoint then holds what one in
                # the middle of a job does (weights, optimiser state, generators).
                two_epochs = dataclasses.replace(train, epochs=2, early_stopping=None)
                started = time.perf_counter()
                with contextlib.suppress(_Stop):
                    train_members(stack, two_epochs, data, device, checkpoint=path,
                                  on_epoch=_stop)
                epoch = time.perf_counter() - started
                payload = path.read_bytes()

                def transaction(with_checkpoint: bool, path: Path = path) -> float:
                    started = time.perf_counter()
                    blob = path.read_bytes() if with_checkpoint else None
                    store.record_epochs(run.id, [], {}, within=lambda conn: claim.keep(
                        conn, (path.name, 1, blob) if blob is not None else None))
                    return time.perf_counter() - started

                plain = statistics.median(transaction(False) for _ in range(args.repeat))
                shared = statistics.median(transaction(True) for _ in range(args.repeat))
                print(f"{name:32s} checkpoint {len(payload) / 1e6:6.1f} MB  epoch {epoch:6.2f} s"
                      f"  transaction {plain * 1000:6.1f} ms -> {shared * 1000:6.1f} ms"
                      f"  (+{(shared - plain) / epoch:6.1%} of the epoch)")
    finally:
        claim.done()
        store.delete_run(run.id)
        store.close()


if __name__ == "__main__":
    main()
