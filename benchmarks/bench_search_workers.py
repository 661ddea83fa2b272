"""A search's wall time with one worker process and with several (`run_search(workers=N)`).

Runs the same search from scratch once per `--workers` value, alternating them `--rounds`
times in fresh run directories, and prints each one's wall time (process start to results:
the helpers' start, every trial, the retrain of the best) and the ratio to the first. So that
every run trains the same trials, the search draws at random (each trial's draw is seeded by
its number, whoever trains it) and prunes nothing; the trials' parameters are compared. A
study is a bundled name or a TOML file with a [search] table; `--quick` takes its quick
variant (6,000 images, 8 epochs).

    .venv/bin/python benchmarks/bench_search_workers.py search --quick --n-trials 12

Run by hand; nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from _protocol import positive_int, unwritable_file

from fashionlab.config import derived, load_study, quick_variant
from fashionlab.data import load_fashion_mnist
from fashionlab.errors import FashionlabError
from fashionlab.provenance import cpu_model
from fashionlab.search import run_search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", nargs="?", default="search",
                        help="a bundled study's name or a study file (default: search)")
    parser.add_argument("--quick", action="store_true", help="its quick variant")
    parser.add_argument("--n-trials", type=positive_int, default=12)
    parser.add_argument("--workers", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=positive_int, default=1)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args()
    if args.json is not None and (problem := unwritable_file(args.json)) is not None:
        parser.error(f"--json {args.json}: cannot write it ({problem})")
    try:
        spec = load_study(args.study)
        spec = quick_variant(spec) if args.quick else spec
        if spec.search is None:
            parser.error(f"{args.study}: no [search] table")
        spec = derived(spec, search=dataclasses.replace(
            spec.search, sampler="random", pruner="none", n_trials=args.n_trials,
            timeout=None, budget=None, budget_seconds=None, budget_tflop=None))
    except FashionlabError as error:
        parser.error(str(error))
    dataset = load_fashion_mnist()  # read once: each run's start is then the same
    seconds: dict[int, list[float]] = {workers: [] for workers in args.workers}
    drawn: list[dict[str, object]] | None = None  # the first run's trials' parameters
    for _ in range(args.rounds):
        for workers in args.workers:
            with tempfile.TemporaryDirectory(prefix="bench-search-") as run_dir:
                start = time.perf_counter()
                result = run_search(spec, run_dir=run_dir, progress=False, dataset=dataset,
                                    workers=workers)
                seconds[workers].append(time.perf_counter() - start)
            assert result.finished, result
            params = [t.params for t in sorted(result.trials, key=lambda t: t.number)]
            drawn = params if drawn is None else drawn
            if params != drawn:
                raise SystemExit(f"{workers} workers drew other trials: nothing to compare")
    print(f"search '{spec.name}', {args.n_trials} trials (random draws, no pruning), "
          f"CPU {cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    first = min(seconds[args.workers[0]])
    for workers, times in seconds.items():
        print(f"{workers} worker process(es): {min(times):7.1f} s (best of {len(times)}: "
              f"{', '.join(f'{t:.1f}' for t in times)}); {first / min(times):.2f}x as fast "
              f"as {args.workers[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"study": spec.name, "n_trials": args.n_trials, "seconds": seconds,
                       "cpu": cpu_model(), "platform": platform.platform(),
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
