"""Batch norm before or after max-pooling: fast-cnn's training epoch, both ways, side by side.

Builds the bundled fast-cnn as its study trains it (batch 128, bfloat16 where the CPU has it,
crops and flips, flip TTA on the validation pass), once with batch norm on the pooled maps
(`norm_after_pool = true`, as bundled) and once with every batch norm before its pooling, and
times whole epochs on the first `--images` training images (validated on as many test images,
a sixth of them), alternating the two `--rounds` times, so that the machine's drift hits both
alike. Prints seconds per epoch and the ratio. The first epoch of each is a warm-up, dropped.

    .venv/bin/python benchmarks/bench_norm_position.py                # 15k images, 3 rounds
    .venv/bin/python benchmarks/bench_norm_position.py --images 60000 --rounds 2

Run by hand; nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time

import numpy as np
import torch
from _protocol import positive_int

from fashionlab.config import load_study
from fashionlab.data import load_fashion_mnist, to_tensors
from fashionlab.provenance import cpu_model
from fashionlab.train import Member, StackTrainer, Tensors


def trainers(images: int) -> dict[str, StackTrainer]:
    """fast-cnn's trainer with batch norm after the pooling (as bundled) and before it."""
    (final,) = load_study("fast-cnn").final
    before = dataclasses.replace(final.model, conv=tuple(
        dataclasses.replace(layer, norm_after_pool=False) for layer in final.model.conv))
    dataset = load_fashion_mnist()
    x, y = to_tensors(dataset.train, dtype=torch.uint8)
    x_test, y_test = to_tensors(dataset.test, dtype=torch.uint8)
    tests = min(len(x_test), max(1, images // 6))
    data = Tensors(x[:images], y[:images], x_test[:tests], y_test[:tests])
    built = {}
    for label, model in (("after pooling", final.model), ("before pooling", before)):
        member = Member("fast-cnn", model, np.arange(images), np.arange(tests), 0)
        built[label] = StackTrainer([member], final.train, data, torch.device("cpu"))
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=positive_int, default=15000,
                        help="training images per epoch, at most 60000 (default 15000)")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args()
    if args.images > 60000:
        parser.error(f"--images: at most the 60000 training images, got {args.images}")
    torch.set_num_threads(args.threads)

    built = trainers(args.images)
    seconds: dict[str, list[float]] = {label: [] for label in built}
    for label, trainer in built.items():  # warm-up: oneDNN picks and caches its kernels
        trainer.run_epoch()
    for _ in range(args.rounds):
        for label, trainer in built.items():
            start = time.perf_counter()
            trainer.run_epoch()
            seconds[label].append(time.perf_counter() - start)

    print(f"fast-cnn, {args.images} training images per epoch, {args.threads} thread(s), "
          f"CPU {cpu_model()}, torch {torch.__version__}")
    for label, times in seconds.items():
        print(f"batch norm {label:15} {statistics.median(times):6.2f} s per epoch (median of "
              f"{len(times)}: {', '.join(f'{t:.2f}' for t in times)})")
    after, before = (statistics.median(seconds[k]) for k in ("after pooling", "before pooling"))
    print(f"after / before: {after / before:.2f}x the time ({before / after:.2f}x as fast)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "threads": args.threads, "seconds": seconds,
                       "cpu": cpu_model(), "platform": platform.platform(),
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
