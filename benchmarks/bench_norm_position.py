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

from bench_epochs import alternate, parse_arguments, report, trainers

from fashionlab.config import load_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    args = parse_arguments(parser)
    (final,) = load_study("fast-cnn").final
    before = dataclasses.replace(final.model, conv=tuple(
        dataclasses.replace(layer, norm_after_pool=False) for layer in final.model.conv))
    built = trainers({"batch norm after pooling": (final.model, final.train),
                      "batch norm before pooling": (before, final.train)}, args.images)
    report("fast-cnn", alternate(built, args.rounds), args)


if __name__ == "__main__":
    main()
