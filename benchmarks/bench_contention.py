"""Two studies side by side: how much slower each runs than one alone.

What it proves: on a machine whose cores are shared (a study and a predict, two studies, a
neighbour), each of two `fashionlab study --quick` started together should take about twice
as long as one alone (each gets half the cores), not ten times (threads of every small
operation waiting for a descheduled sibling). Prints the wall times and the ratio pair/alone,
for this checkout and, with --against DIR, for another checkout (e.g. an older revision in a
git worktree) measured in the same run.

    python benchmarks/bench_contention.py
    python benchmarks/bench_contention.py --against /tmp/old-checkout --repeat 2

Nothing else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fashionlab.provenance import cpu_model


def _study(checkout: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    return subprocess.Popen([sys.executable, "-c", "from fashionlab.cli import main; main()",
                             "study", "--quick", "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _timed(checkout: Path, copies: int) -> list[float]:
    """Wall seconds of each of `copies` quick studies started together."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        processes = [_study(checkout, Path(tmp) / f"runs-{i}") for i in range(copies)]
        ended = []
        for process in processes:
            if process.wait() != 0:
                raise SystemExit(f"a study of {checkout} failed (exit {process.returncode})")
            ended.append(time.perf_counter() - started)
    return ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout to measure alike")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    checkouts = {"this checkout": ROOT}
    if args.against:
        checkouts[f"{args.against}"] = args.against.resolve()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    for name, checkout in checkouts.items():
        for _ in range(args.repeat):
            alone = _timed(checkout, 1)[0]
            pair = _timed(checkout, 2)
            print(f"{name}: alone {alone:.1f} s; side by side {pair[0]:.1f} s and "
                  f"{pair[1]:.1f} s = {max(pair) / alone:.2f}x alone")


if __name__ == "__main__":
    main()
