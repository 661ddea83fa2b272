"""The machine a run uses: its device, its arithmetic precision, and the allocator setting that
keeps the CPU from re-zeroing memory at every training step."""

from __future__ import annotations

import ctypes
import functools
import sys

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
        raise ConfigError(f"--device: unknown device '{name}' (use auto, cpu, cuda, cuda:N)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: CUDA was asked for, but no CUDA device is available")
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
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
