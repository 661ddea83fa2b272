"""The machine a run uses: its device, its arithmetic precision, the allocator setting that
keeps the CPU from re-zeroing memory at every training step, and the CPU threads it can use
beside other processes."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
from typing import Any

import torch

from fashionlab.errors import ConfigError

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit systems: blocks below it stay in the heap.
_KEEP_BELOW = 32 * 1024 * 1024


def resolve_device(name: str | None = None) -> torch.device:
    """"auto"/None: CUDA when present, else the CPU; otherwise the named device."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # torch knows mps, xpu, meta...
        raise ConfigError(f"device (--device): unknown device '{name}' (use auto, cpu, cuda, "
                          "cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device (--device): CUDA was asked for, but no CUDA device is available")
    if device.type == "cpu":  # "cpu:0": the one CPU device, as safetensors needs it named
        return torch.device("cpu")
    return device


@functools.cache  # reads /proc/cpuinfo; asked for every stack trained
def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 matrix products natively (fast, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where native, else "fp32"; other values unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


@functools.cache  # a process-wide setting: once is enough
def keep_freed_memory() -> bool:
    """Let freed CPU tensors' memory be reused by the next step instead of returning it to the
    kernel; returns whether the setting took effect (glibc only).

    A training step frees and reallocates the same few megabyte-sized activations every time.
    By default glibc serves such blocks with fresh mmap pages and gives them back on free, so
    each step pays hundreds of page faults and the kernel zeroes every page again: measured on
    the seed CNN, ~370k page faults per epoch, and 18-22 ms per training step instead of 15.9.
    Raising the mmap and trim thresholds keeps those blocks in the heap instead.
    """
    mallopt = _libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> bool:
    """Give the memory this process has freed back to the kernel (glibc's `malloc_trim`);
    returns whether it could. Between jobs, not steps: `keep_freed_memory` keeps a finished
    stack's blocks in the heap, where the next job (another model, other sizes) may never
    reuse them."""
    malloc_trim = _libc_function("malloc_trim", [ctypes.c_size_t])
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True


def _libc_function(name: str, argtypes: list[Any]) -> Any | None:
    """glibc's function `name` (returning an int) from the C library this process already
    runs on; None off Linux or in a C library without it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, ctypes.c_int
    return function


class CpuShare:
    """The CPU threads a stack trains with, following the cores other processes leave free.

    Threads of one operation wait for each other at its end; when another busy process takes
    a core, every small operation waits for a thread the kernel descheduled: two `study
    --quick` side by side on 2 cores took 156 s each instead of 14 s alone, and 17 s each with
    one thread apiece (Intel Xeon; OMP_WAIT_POLICY=PASSIVE did not help). So after each epoch
    the cores used by other processes during it are measured (the machine's busy time in
    /proc/stat less this process's own), and the next epoch runs on at most the cores left,
    never fewer than one nor more than `share`. Without /proc/stat the count stays `share`.
    """

    def __init__(self, share: int) -> None:
        self.share = max(1, share)
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        """(machine busy seconds, this process's CPU seconds, wall seconds), or None."""
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        times = os.times()
        return (sum(fields) - idle) / ticks, times.user + times.system, time.monotonic()

    def others(self) -> float | None:
        """Cores busy with other processes since the last call (None: cannot tell)."""
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now[2] - last[2] < 0.05:
            return None
        machine, own, wall = (a - b for a, b in zip(now, last))
        return max(0.0, (machine - own) / wall)

    def threads(self) -> int:
        """The threads for the next epoch: the share, less the cores others kept busy."""
        busy = self.others()
        if busy is None:
            return self.share
        free = (os.cpu_count() or 1) - busy
        return max(1, min(self.share, int(free + 0.5)))
