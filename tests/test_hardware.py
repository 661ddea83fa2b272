"""Device and precision resolution, and the allocator setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fashionlab.errors import ConfigError
from fashionlab.hardware import CpuShare, resolve_device, resolve_precision


def test_auto_device_is_the_cpu_without_cuda():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu:0") == torch.device("cpu")  # as safetensors names it


@pytest.mark.parametrize("name", ["gpu0", "cuda:x", "mps", "meta", "xpu"])  # torch knows 3
def test_unknown_devices_are_named_in_the_error(name: str):
    with pytest.raises(ConfigError, match=f"^device \\(--device\\): unknown device '{name}'"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")


def test_explicit_precision_is_kept():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")


_TRAINING_STEPS = """
import resource, sys, torch
import torch.nn.functional as F
from torch import nn
if sys.argv[1] == "keep":
    from fashionlab.hardware import keep_freed_memory
    assert keep_freed_memory()
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 32, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(),
                    nn.Linear(32 * 13 * 13, 10))
optimizer = torch.optim.Adam(net.parameters())
x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
def steps(n):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        optimizer.zero_grad()
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
steps(10)
print(min(steps(20) for _ in range(5)))  # once the heap has grown to its working size
"""


def _page_faults_of_training_steps(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _TRAINING_STEPS, mode], capture_output=True,
                          text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_training_steps_reuse_freed_memory_without_page_faults():
    # A fresh process: the setting cannot be undone in this one. With glibc's defaults the same
    # steps usually take 10,000-45,000 faults here, but not always (its thresholds adapt), so
    # only the setting's side is asserted. Measured here: 0-1 alone; once 676 in a loaded full
    # run (faults the kernel causes: NUMA hinting, page migration), hence the margin and the
    # best of five rounds.
    assert _page_faults_of_training_steps("keep") < 2000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_memory_kept_for_reuse_goes_back_to_the_kernel_between_jobs():
    # In a subprocess: the setting and the measure are process-wide.
    script = """
import os, sys
from fashionlab.hardware import keep_freed_memory, release_freed_memory
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
assert keep_freed_memory()
blocks = [bytearray(2**20) for _ in range(256)]  # 256 MB of heap blocks, touched
held = resident()
del blocks
kept = resident()  # freed, but kept in the heap for the next step
assert release_freed_memory()
print(held, kept, resident())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    held, kept, released = map(float, done.stdout.split())
    assert kept > held - 32  # keep_freed_memory: the blocks stay resident once freed
    assert released < kept - 200  # and go back when asked


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="measures through /proc/stat")
def test_cpu_share_leaves_the_cores_another_process_keeps_busy():
    cores = os.cpu_count() or 1
    share, probe = CpuShare(cores), CpuShare(cores)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(cores)]
    try:
        import time

        time.sleep(1.0)
        busy = probe.others()
        threads = share.threads()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert busy is not None and busy >= 0.6 * cores  # every core taken by a spinner
    assert threads == 1  # never fewer than one


def test_cpu_share_never_exceeds_its_share():
    share = CpuShare(1)
    assert share.threads() == 1
    assert CpuShare(0).share == 1
