"""Where one training step of a seed-study model goes: per-op CPU time.

Builds the stack the study trains (the 5 folds of a dense candidate as one stacked model, or
the CNN alone), times one epoch without the profiler (which also warms up), profiles the next
with torch.profiler, and prints the ops by self time per step, grouped into families (matrix
products, elementwise, random numbers, gathers, optimiser, casts, reductions), the number of
ops per step, and the memory bandwidth of a large copy measured in the same run (the ceiling
of the memory-bound ops).

    .venv/bin/python benchmarks/profile_step.py --model dense256_drop --threads 1
    .venv/bin/python benchmarks/profile_step.py --model cnn --threads 1 --top 30

Run by hand; nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from _protocol import positive_int, thread_count, unwritable_file
from bench_speed import SEED_NAMES, seed_stack  # the stack the study trains, built one way
from torch.profiler import ProfilerActivity, profile

from fashionlab.provenance import cpu_model

# Op name fragments -> family, first match wins.
FAMILIES = (
    ("matmul", ("bmm", "addmm", "mm", "linear", "matmul", "convolution", "conv")),
    ("optimizer", ("adam", "_fused", "foreach", "lerp", "sgd")),
    ("random", ("random", "bernoulli", "randperm", "uniform")),
    ("gather/scatter", ("index", "gather", "scatter", "embedding", "select_backward", "take")),
    ("cast/copy", ("copy_", "to", "_to_copy", "contiguous", "clone", "cat", "stack")),
    ("pool", ("pool",)),
    ("norm", ("batch_norm", "native_batch_norm")),
    ("loss/softmax", ("softmax", "nll", "cross_entropy")),
    ("reduction", ("sum", "mean", "argmax", "max", "eq")),
    ("elementwise", ("relu", "threshold", "mul", "div", "add", "sub", "ge", "where", "pow",
                     "fill", "zero", "ones", "zeros", "empty", "view", "reshape", "expand")),
)


def family(name: str) -> str:
    name = name.removeprefix("aten::").lower()
    for fam, parts in FAMILIES:
        if any(part in name for part in parts):
            return fam
    return "other"


def memory_bandwidth(size_mb: int = 256, repeats: int = 10) -> float:
    """GB/s of a large copy (read + write), as a ceiling for memory-bound ops."""
    src = torch.ones(size_mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SEED_NAMES), default="dense256_drop")
    parser.add_argument("--threads", type=thread_count, default=1)
    parser.add_argument("--top", type=positive_int, default=18, help="ops listed (default 18)")
    parser.add_argument("--json", type=Path, help="also write the profile here")
    args = parser.parse_args()
    if args.json is not None and (problem := unwritable_file(args.json)) is not None:
        parser.error(f"--json {args.json}: cannot write it ({problem})")
    torch.set_num_threads(args.threads)

    trainer, _ = seed_stack(args.model)
    n_members = len(trainer.members)
    steps = trainer.steps_per_epoch
    # Time a whole epoch without the profiler first (its own overhead inflates small ops).
    start = time.perf_counter()
    trainer.run_epoch()
    epoch_seconds = time.perf_counter() - start

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        trainer.run_epoch()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total_us = sum(e.self_cpu_time_total for e in events)
    by_family: dict[str, float] = defaultdict(float)
    calls = 0
    for e in events:
        by_family[family(e.key)] += e.self_cpu_time_total
        calls += e.count
    bandwidth = memory_bandwidth()

    print(f"{args.model}: {n_members} member(s), {steps} steps per epoch, {args.threads} "
          f"thread(s), CPU {cpu_model()}, torch {torch.__version__}")
    print(f"epoch without profiler: {epoch_seconds:.3f} s ({epoch_seconds / steps * 1e3:.2f} ms"
          f" per step incl. validation); aten ops per step: {calls / steps:.0f}")
    print(f"memory bandwidth (copy): {bandwidth:.1f} GB/s\n")
    print(f"{'family':16} {'share':>6} {'ms/step':>8}")
    for fam, us in sorted(by_family.items(), key=lambda kv: -kv[1]):
        print(f"{fam:16} {us / total_us:6.1%} {us / steps / 1e3:8.3f}")
    print(f"\n{'op':40} {'share':>6} {'calls/step':>10} {'us/call':>8}")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
    for e in top:
        print(f"{e.key:40} {e.self_cpu_time_total / total_us:6.1%} {e.count / steps:10.1f} "
              f"{e.self_cpu_time_total / e.count:8.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "threads": args.threads, "cpu": cpu_model(),
                       "steps": steps,
                       "epoch_seconds": epoch_seconds, "ops_per_step": calls / steps,
                       "bandwidth_gbs": bandwidth,
                       "families_ms_per_step": {k: v / steps / 1e3 for k, v in by_family.items()},
                       "top": [[e.key, e.self_cpu_time_total / steps / 1e3, e.count / steps]
                               for e in top]}, f, indent=1)


if __name__ == "__main__":
    main()
