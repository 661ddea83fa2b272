"""Two studies side by side: how much slower each runs than one alone.

What it proves: on a machine whose cores are shared (a study and a predict, two studies, a
neighbour), each of two `fashionlab study --quick` started together should take about twice
as long as one alone (each gets half the cores), not ten times (threads of every small
operation waiting for a descheduled sibling). Prints the wall times and the ratio pair/alone,
for this checkout and, with --against DIR, for another checkout (e.g. an older revision in a
git worktree) measured in the same run.

    python benchmarks/bench_contention.py
    python benchmarks/bench_contention.py --against /tmp/old-checkout --repeat 2

Nothing else should run on the machine meanwhile. A study that fails stops the others and
shows the end of its error; Ctrl-C stops every study it started.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _protocol import positive_int
from bench_speed import stop_group

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fashionlab.provenance import cpu_model


def _environment(checkout: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(checkout)}


def _imported_from(checkout: Path) -> Path:
    """Where a process given `checkout` imports fashionlab from (an installed copy where the
    checkout holds none)."""
    done = subprocess.run([sys.executable, "-c", "import fashionlab; print(fashionlab.__file__)"],
                          capture_output=True, text=True, env=_environment(checkout), check=True)
    return Path(done.stdout.strip()).resolve().parent.parent


def _study(checkout: Path, run_dir: Path, errors: Path) -> subprocess.Popen[bytes]:
    with errors.open("wb") as stderr:  # its own session: stopped with what it started
        return subprocess.Popen(
            [sys.executable, "-c", "from fashionlab.cli import main; main()", "study",
             "--quick", "--run-dir", str(run_dir)], stdout=subprocess.DEVNULL, stderr=stderr,
            env=_environment(checkout), start_new_session=True)


def _timed(checkout: Path, copies: int) -> list[float]:
    """Wall seconds of each of `copies` quick studies started together."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        errors = [Path(tmp) / f"stderr-{i}" for i in range(copies)]
        processes = [_study(checkout, Path(tmp) / f"runs-{i}", errors[i]) for i in range(copies)]
        ended: dict[int, float] = {}
        try:
            while len(ended) < copies:  # in the order they end, not the order they started
                for i, process in enumerate(processes):
                    if i in ended or process.poll() is None:
                        continue
                    if process.returncode != 0:
                        said = errors[i].read_text(errors="replace").strip().splitlines()
                        raise SystemExit(f"a study of {checkout} failed (exit "
                                         f"{process.returncode}): {said[-1] if said else ''}")
                    ended[i] = time.perf_counter() - started
                time.sleep(0.05)
        finally:
            for process in processes:  # the others, after a failure or a Ctrl-C
                stop_group(process)
    return [ended[i] for i in range(copies)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another checkout to measure alike")
    parser.add_argument("--repeat", type=positive_int, default=1)
    args = parser.parse_args()
    checkouts = {"this checkout": ROOT}
    if args.against:
        against = args.against.resolve()
        if _imported_from(against) != against:  # else it would measure this one twice
            parser.error(f"--against {args.against}: no fashionlab package in it (a checkout's "
                         "root holds the fashionlab folder)")
        checkouts[f"{args.against}"] = against
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores")
    for name, checkout in checkouts.items():
        for _ in range(args.repeat):
            alone = _timed(checkout, 1)[0]
            pair = _timed(checkout, 2)
            print(f"{name}: alone {alone:.1f} s; side by side {pair[0]:.1f} s and "
                  f"{pair[1]:.1f} s = {max(pair) / alone:.2f}x alone")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every study it started has been stopped
        sys.exit("stopped")
