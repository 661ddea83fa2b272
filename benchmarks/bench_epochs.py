"""Two models' training epochs, side by side: the final model of each of two study files.

Builds each study's first `[[final]]` model as its study trains it (its batch, precision,
augmentation, optimiser and schedule, its test-time augmentation on the validation pass) and
times whole epochs on the first `--images` training images (validated on as many test images,
a sixth of them), alternating the two `--rounds` times, so that the machine's drift hits both
alike. Prints seconds per epoch and the ratio. The first epoch of each is a warm-up, dropped.
A study is a bundled name or a TOML file.

    .venv/bin/python benchmarks/bench_epochs.py old-fast-cnn.toml fast-cnn --images 60000

Run by hand; nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from _protocol import positive_int, thread_count, unwritable_file

from fashionlab.config import ModelSpec, TrainSpec, load_study
from fashionlab.data import load_fashion_mnist, to_tensors
from fashionlab.errors import FashionlabError
from fashionlab.provenance import cpu_model
from fashionlab.train import Member, StackTrainer, Tensors


def trainers(models: Mapping[str, tuple[ModelSpec, TrainSpec]],
             images: int) -> dict[str, StackTrainer]:
    """A trainer per labelled (model, training) pair, on the first `images` training images."""
    dataset = load_fashion_mnist()
    x, y = to_tensors(dataset.train, dtype=torch.uint8)
    x_test, y_test = to_tensors(dataset.test, dtype=torch.uint8)
    tests = min(len(x_test), max(1, images // 6))
    data = Tensors(x[:images], y[:images], x_test[:tests], y_test[:tests])
    return {label: StackTrainer([Member("m", model, np.arange(images), np.arange(tests), 0)],
                                train, data, torch.device("cpu"))
            for label, (model, train) in models.items()}


def alternate(built: Mapping[str, StackTrainer], rounds: int) -> dict[str, list[float]]:
    """Seconds of each trainer's epochs, one warm-up epoch each (oneDNN picks and caches its
    kernels), then `rounds` epochs each, alternated."""
    for trainer in built.values():
        trainer.run_epoch()
    seconds: dict[str, list[float]] = {label: [] for label in built}
    for _ in range(rounds):
        for label, trainer in built.items():
            start = time.perf_counter()
            trainer.run_epoch()
            seconds[label].append(time.perf_counter() - start)
    return seconds


def report(title: str, seconds: Mapping[str, list[float]], args: argparse.Namespace) -> None:
    """Prints the medians and the first's time over the second's; writes `--json`."""
    print(f"{title}, {args.images} training images per epoch, {args.threads} thread(s), "
          f"CPU {cpu_model()}, torch {torch.__version__}")
    for label, times in seconds.items():
        print(f"{label:30} {statistics.median(times):6.2f} s per epoch (median of "
              f"{len(times)}: {', '.join(f'{t:.2f}' for t in times)})")
    first, second = (statistics.median(times) for times in seconds.values())
    print(f"first / second: {first / second:.2f}x the time ({second / first:.2f}x as fast)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "threads": args.threads, "seconds": seconds,
                       "cpu": cpu_model(), "platform": platform.platform(),
                       "torch": torch.__version__}, f, indent=1)


def parse_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The timing options added to `parser`, parsed and checked; the threads set."""
    parser.add_argument("--images", type=positive_int, default=15000,
                        help="training images per epoch, at most 60000 (default 15000)")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--threads", type=thread_count, default=2)
    parser.add_argument("--json", type=Path, help="also write the timings here")
    args = parser.parse_args()
    if args.images > 60000:
        parser.error(f"--images: at most the 60000 training images, got {args.images}")
    if args.json is not None and (problem := unwritable_file(args.json)) is not None:
        parser.error(f"--json {args.json}: cannot write it ({problem})")
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a bundled study's name or a study file")
    parser.add_argument("second", help="a bundled study's name or a study file")
    args = parse_arguments(parser)
    models = {}
    for study in (args.first, args.second):
        try:
            spec = load_study(study)
        except FashionlabError as error:
            parser.error(str(error))
        if not spec.final:
            parser.error(f"{study}: has no [[final]] model to time")
        label = study if study not in models else f"{study} (2)"
        models[label] = (spec.final[0].model, spec.final[0].train)
    report("final models", alternate(trainers(models, args.images), args.rounds), args)


if __name__ == "__main__":
    main()
