"""Speed of fashionlab against a plain PyTorch loop and Keras, on the seed study's models.

What it proves: for each model of the seed study, seconds per fold-epoch (training + validation,
48k + 12k for the dense candidates, 60k + 10k test for the CNN), samples per second, the
arithmetic rate achieved against the matrix-product peak measured in the same run, peak memory,
and the ratios against the two references timed in the same run; then the whole study's wall
time, extrapolated from those epochs, and measured for real with --full.

    python benchmarks/bench_speed.py                    # 3 epochs per model, all references
    python benchmarks/bench_speed.py --epochs 5 --refs torch --models dense64,cnn
    python benchmarks/bench_speed.py --full             # also the whole study, for real (~40 min)

Each implementation runs in its own process (peak memory is per process), one after another,
with the same number of threads (--threads): nothing else should run on the machine meanwhile.
The first epoch of each is dropped when more than one is timed (warm-up, Keras' tracing).
Results are printed, and written as JSON with the machine, the versions and the date to
benchmarks/results/speed-<date>-<time>.json (never over an earlier run's). Ctrl-C stops every
process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _protocol import positive_int, thread_count, unwritable

ROOT = Path(__file__).resolve().parent.parent
KERAS_PYTHON = ROOT / ".venv-keras" / "bin" / "python"
MODELS = ("dense64", "dense64_l2", "dense64_drop", "dense256_drop", "dense64x2_drop",
          "dense256x2_drop", "cnn")
# The seed study's names for the reference scripts' model names.
RESULTS = ROOT / "benchmarks" / "results"
SEED_NAMES = {"dense64": "dense(64)", "dense64_group": "dense(64)", "dense64_l2": "dense(64) L2",
              "dense64_drop": "dense(64) dropout", "dense256_drop": "dense(256) dropout",
              "dense64x2_drop": "dense(64)x2 dropout", "dense256x2_drop": "dense(256)x2 dropout",
              "cnn": "cnn"}


# ---- measured inside a worker process -------------------------------------------------------


def matmul_peak(dtype_name: str, size: int = 1024, repeats: int = 20) -> float:
    """GFLOP/s of one square matrix product, best of `repeats` (the hardware's practical peak)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def seed_stack(model: str, precision: str | None = None) -> tuple[Any, Any]:
    """(StackTrainer, candidate) for one seed-study model, as the study trains it: the 5 folds
    of a dense candidate as one stack, the CNN alone on all 60k with the test set as
    validation. `precision` overrides the candidate's."""
    import dataclasses

    import numpy as np
    import torch

    from fashionlab.config import load_study
    from fashionlab.cv import make_folds
    from fashionlab.data import load_fashion_mnist, to_tensors
    from fashionlab.train import Member, StackTrainer, Tensors

    spec = load_study("seed")
    candidate = next(c for c in spec.candidates + spec.final if c.name == SEED_NAMES[model])
    if precision is not None:
        candidate = dataclasses.replace(
            candidate, train=dataclasses.replace(candidate.train, precision=precision))
    dataset = load_fashion_mnist()
    x, y = to_tensors(dataset.train, dtype=torch.uint8)  # as the study holds them
    if model == "cnn":
        x_test, y_test = to_tensors(dataset.test, dtype=torch.uint8)
        data = Tensors(x, y, x_test, y_test)
        members = [Member("cnn", candidate.model, np.arange(60000), np.arange(10000), 0)]
    else:
        data = Tensors(x, y, x, y)
        members = [Member(f"fold-{f.index}", candidate.model, f.train_index, f.val_index, f.index)
                   for f in make_folds(60000, spec.cv, seed=0)]
    if model == "dense64_group":  # as the study trains them: 3 candidates x 5 folds, one stack
        members = [dataclasses.replace(m, key=f"{c.name}/{m.key}", model=c.model)
                   for c in spec.candidates[:3] for m in members]
    return StackTrainer(members, candidate.train, data, torch.device("cpu")), candidate


def fashionlab_epochs(model: str, epochs: int, precision: str | None) -> dict:
    """Time `epochs` epochs of fashionlab on one model, as the study trains it (`seed_stack`)."""
    import numpy as np
    import torch

    from fashionlab.models import forward_flops

    trainer, candidate = seed_stack(model, precision)
    members = trainer.members
    seconds, accuracy = [], []
    for _ in range(epochs):
        metrics = trainer.run_epoch()
        seconds.append(next(iter(metrics.values())).seconds / len(members))
        accuracy.append(float(np.mean([m.val_accuracy for m in metrics.values()])))
    n_train, n_val = len(members[0].train_index), len(members[0].val_index)
    flops = forward_flops(candidate.model)
    return {
        "impl": "fashionlab", "model": model, "seconds_per_epoch": seconds,
        "stacked_models": len(members), "train_samples": n_train, "val_samples": n_val,
        "val_accuracy": accuracy, "precision": trainer.precision,
        # Training costs ~3x the forward pass (forward, input and weight gradients).
        "flops_per_epoch": flops * (3 * n_train + n_val),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


# ---- the driver -------------------------------------------------------------------------------


def _run_json(command: list[str], timeout: float = 7200) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        done = subprocess.run([*command, "--json", str(out)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def _steady(seconds: list[float]) -> float:
    rest = seconds[1:] or seconds  # the first epoch warms up (allocations, Keras' tracing)
    return sum(rest) / len(rest)


def _tree_pss_mb(root: int) -> float:
    """Memory of a process and all its descendants: the sum of their proportional set sizes
    (shared pages, such as the libraries every worker maps, counted once in all)."""
    tree, frontier = {root}, [root]
    while frontier:  # /proc/<pid>/task/<tid>/children: cheap, no scan of every process
        parent = frontier.pop()
        for listing in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(pid) for pid in listing.read_text().split()]
            except OSError:
                continue  # the thread or process ended meanwhile
            frontier += [pid for pid in children if pid not in tree]
            tree.update(children)
    total_kb = 0
    for pid in tree:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total_kb += next((int(line.split()[1]) for line in rollup.splitlines()
                          if line.startswith("Pss:")), 0)
    return total_kb / 1024


def _full_study(command: list[str], timeout: float = 4 * 3600) -> dict:
    """Run a whole study in a child process: its wall time, its stdout, and the peak memory
    of the child and its worker processes together (sampled every second)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        # Its own process group: the study and its workers stop together, on a timeout or a
        # Ctrl-C here, before the caller removes the folder they write to.
        child = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, text=True,
                                 start_new_session=True)
        peak = 0.0
        try:
            while child.poll() is None:
                peak = max(peak, _tree_pss_mb(child.pid))
                if time.perf_counter() - start > timeout:
                    break
                time.sleep(1.0)
        finally:
            stop_group(child)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"{command} failed:\n{err.read()[-3000:]}")
        return {"wall_seconds": wall, "peak_tree_pss_mb": peak, "stdout": out.read()}


def stop_group(child: subprocess.Popen[Any], grace: float = 15.0) -> None:
    """Stop a child started in its own session and everything it started, as a Ctrl-C would
    (a study then removes its temporary files), killed if it has not ended within `grace`
    seconds; wait for it."""
    for stop in (signal.SIGINT, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, stop)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=grace)
            return


FULL_FASHIONLAB = """
import resource, sys, json, time
from fashionlab.config import load_study
from fashionlab.study import run_study
start = time.perf_counter()
result = run_study(load_study("seed"), run_dir=sys.argv[1], fresh=True, progress=False,
                   workers="auto")  # as `fashionlab study` runs it
print(json.dumps({"study_seconds": time.perf_counter() - start,
                  "workers": result.workers,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "test_accuracy": result.retrain.test_accuracy,
                  "cnn_val_accuracy": float(result.final[0].val_accuracy[0]),
                  "cv": {c.name: float(c.val_accuracy.mean()) for c in result.candidates}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=positive_int, default=3,
                        help="epochs per model (the first dropped when there are more)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--refs", default="torch,keras",
                        help="torch, keras, both (torch,keras) or none")
    parser.add_argument("--threads", type=thread_count, default=os.cpu_count() or 1,
                        help="CPU threads of every implementation (default: all cores)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="override the study's precision for fashionlab")
    parser.add_argument("--full", action="store_true", help="also run the whole study for real")
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # worker output
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # inside a child process
        import torch

        torch.set_num_threads(args.threads)
        if args.worker == "peak":
            record = {"fp32": matmul_peak("float32"), "bf16": matmul_peak("bfloat16")}
        else:
            record = fashionlab_epochs(args.worker, args.epochs, args.precision)
        args.json.write_text(json.dumps(record))
        return

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: {', '.join(unknown) or 'none given'}; the models are "
                     f"{', '.join(MODELS)}")
    if set(MODELS) <= set(models):
        models.append("dense64_group")
    refs = [r for r in args.refs.split(",") if r and r != "none"]
    if unknown := [r for r in refs if r not in ("torch", "keras")]:
        parser.error(f"--refs: {', '.join(unknown)}; the references are torch and keras "
                     "(or none)")
    if "keras" in refs and not KERAS_PYTHON.exists():  # said now, not after the measuring
        parser.error(f"--refs keras: no {KERAS_PYTHON} (make the Keras virtualenv as "
                     "benchmarks/README.md says, or pass --refs torch)")
    if (problem := unwritable(RESULTS)) is not None:
        parser.error(f"{RESULTS}: cannot write the results there ({problem})")
    from fashionlab.provenance import cpu_model

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {args.threads} thread(s) each")
    me = [sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads)]
    peak = _run_json([*me, "--worker", "peak"])
    print(f"matrix-product peak: {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} bf16")
    rows = {}
    for model in models:
        precision = ["--precision", args.precision] if args.precision else []
        row = {"fashionlab": _run_json([*me, "--worker", model, "--epochs", str(args.epochs),
                                        *precision])}
        epochs = ["--model", model, "--epochs", str(args.epochs), "--threads", str(args.threads)]
        if model == "dense64_group":  # fashionlab only: the references train one model at a time
            rows[model] = row
            _print_row(model, row, peak)
            continue
        if "torch" in refs:
            row["torch-plain"] = _run_json([sys.executable, "benchmarks/reference_torch.py",
                                            *epochs])
        if "keras" in refs:
            row["keras"] = _run_json([str(KERAS_PYTHON), "benchmarks/reference_keras.py", *epochs])
        rows[model] = row
        _print_row(model, row, peak)

    report = _report(rows, peak, refs, args)
    if args.full:
        report["full"] = full = {}
        with tempfile.TemporaryDirectory() as tmp:
            run = _full_study([sys.executable, "-c", FULL_FASHIONLAB, tmp])
            full["fashionlab"] = {**json.loads(run.pop("stdout")), **run}
            if "keras" in refs:
                out = Path(tmp) / "keras-study.json"
                run = _full_study([str(KERAS_PYTHON), "benchmarks/reference_keras.py",
                                   "--study", "--json", str(out)])
                full["keras"] = {**json.loads(out.read_text()), **run}
                full["keras"].pop("stdout")
        for impl, record in full.items():
            print(f"whole study, measured: {impl} {record['wall_seconds'] / 60:.1f} min, peak "
                  f"memory {record['peak_tree_pss_mb'] / 1024:.2f} GB (all its processes)")
        if "keras" in full:
            print(f"  fashionlab is {full['keras']['wall_seconds'] / full['fashionlab']['wall_seconds']:.1f}x "
                  "faster than Keras")
    _write(report)


def _print_row(model: str, row: dict, peak: dict) -> None:
    ours = row["fashionlab"]
    s = _steady(ours["seconds_per_epoch"])
    gflops = ours["flops_per_epoch"] / s / 1e9
    reference_peak = peak["bf16"] if ours["precision"] == "bf16" else peak["fp32"]
    line = (f"{model:16s} fashionlab {s:6.3f} s/epoch  "
            f"{(ours['train_samples'] + ours['val_samples']) / s:8.0f} samples/s  "
            f"{gflops:5.0f} GFLOP/s ({100 * gflops / reference_peak:3.0f}% of {ours['precision']} "
            f"peak)  {ours['peak_rss_mb']:5.0f} MB")
    for name in ("torch-plain", "keras"):
        if name in row:
            other = _steady(row[name]["seconds_per_epoch"])
            line += f" | {name} {other:6.3f} s ({other / s:4.1f}x)"
    print(line, flush=True)


def _report(rows: dict, peak: dict, refs: list[str], args: argparse.Namespace) -> dict:
    """Per-model table plus the whole study extrapolated from the measured epochs."""
    from fashionlab import __version__

    def study_seconds(impl: str) -> float | None:
        if any(impl not in rows[m] for m in MODELS if m in rows) or not set(MODELS) <= set(rows):
            return None
        dense = list(MODELS[:-1])
        if impl == "fashionlab" and "dense64_group" in rows:  # the study stacks these three
            dense = ["dense64_group"] * 3 + dense[3:]
        cv = sum(40 * 5 * _steady(rows[m][impl]["seconds_per_epoch"]) for m in dense)
        # The retrain: 20 epochs of the best candidate on 60k (1.25x a 48k fold-epoch).
        retrain = 20 * 1.25 * _steady(rows["dense256_drop"][impl]["seconds_per_epoch"])
        return cv + retrain + 30 * _steady(rows["cnn"][impl]["seconds_per_epoch"])

    import torch

    from fashionlab.provenance import cpu_model

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {"fashionlab": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "epochs_timed": args.epochs, "peak_gflops": peak, "models": rows,
        "study_extrapolated_seconds": {impl: study_seconds(impl)
                                       for impl in ["fashionlab", *_ref_names(refs)]},
    }


def _ref_names(refs: list[str]) -> list[str]:
    return [{"torch": "torch-plain", "keras": "keras"}[r] for r in refs]


def _write(report: dict) -> None:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for attempt in range(100):  # "x": never over an earlier run's file of the same second
        path = RESULTS / f"speed-{stamp}{f'-{attempt}' if attempt else ''}.json"
        try:
            with path.open("x") as file:
                file.write(json.dumps(report, indent=2) + "\n")
            break
        except FileExistsError:
            continue
    extrapolated = report["study_extrapolated_seconds"]
    if extrapolated.get("fashionlab"):
        parts = [f"{impl} {sec / 60:.1f} min" for impl, sec in extrapolated.items() if sec]
        print("whole study, extrapolated from epochs: " + ", ".join(parts))
        if extrapolated.get("keras"):
            print(f"  fashionlab is {extrapolated['keras'] / extrapolated['fashionlab']:.1f}x "
                  "faster than Keras")
    print(f"written: {path}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every process it started has been stopped
        sys.exit("stopped")
