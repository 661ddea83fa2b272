"""What produced a result: package versions, code revision and machine, stored with every run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from fashionlab import __version__

_PACKAGES = ("fashionlab", "torch", "numpy", "scipy", "optuna", "matplotlib")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@cache
def code_revision() -> str | None:
    """The code this process runs: the git commit of the fashionlab source checkout (with
    '+dirty' for local changes) when the package is one; else the installed version and the
    commit it was installed from, if recorded (`installed_revision`); None when neither."""
    package = Path(__file__).resolve().parent
    return checkout_revision(package) or installed_revision(_distribution())


def checkout_revision(package: Path) -> str | None:
    """The git commit of the fashionlab checkout holding the package directory `package`
    (with '+dirty' for local changes to tracked files), or None when it is not in one.

    A checkout is a git work tree whose top directory holds both `package` and the project's
    own pyproject.toml (name = "fashionlab"). An installed package inside some other git
    repository (a virtualenv in another project) is not one: that repository's commit says
    nothing about this code."""
    root = package.parent
    if not _is_fashionlab_project(root / "pyproject.toml"):
        return None
    try:
        top, commit, dirty = (subprocess.run(
            ["git", "-C", str(root), *command], capture_output=True, text=True, timeout=5,
            check=True).stdout.strip() for command in (
                ["rev-parse", "--show-toplevel"], ["rev-parse", "HEAD"],
                ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):
        return None
    if Path(top).resolve() != root.resolve():
        return None  # the project's files inside another repository (an unpacked sdist)
    return commit + ("+dirty" if dirty else "")


def installed_revision(distribution: metadata.Distribution | None) -> str | None:
    """An installed fashionlab: "fashionlab VERSION", plus " from commit SHA" when pip recorded
    the commit it was installed from (direct_url.json, PEP 610: `pip install git+https://...`);
    None without a distribution."""
    if distribution is None:
        return None
    text = f"fashionlab {distribution.version}"
    try:
        commit = json.loads(distribution.read_text("direct_url.json") or "{}").get(
            "vcs_info", {}).get("commit_id")
    except (ValueError, AttributeError):  # not JSON, or not the JSON PEP 610 describes
        commit = None
    return f"{text} from commit {commit}" if isinstance(commit, str) and commit else text


def _distribution() -> metadata.Distribution | None:
    try:
        return metadata.distribution("fashionlab")
    except metadata.PackageNotFoundError:
        return None


def _is_fashionlab_project(pyproject: Path) -> bool:
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    return isinstance(project, dict) and project.get("name") == "fashionlab"


def version_line() -> str:
    """What `fashionlab --version` prints: the package's version, the installed metadata's
    (they differ in a checkout whose installation is out of date) and the code revision."""
    installed = _version("fashionlab")
    return (f"fashionlab {__version__} (installed metadata: {installed or 'none'}; "
            f"revision: {code_revision() or 'unknown'})")


def cpu_model() -> str:
    """The processor's marketing name (Linux), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_text(machine: Mapping[str, Any]) -> str:
    """A stored machine on one line: "vm, AMD EPYC (AVX512, bf16), cuda"; what a run stored
    before the vector instructions were recorded shows without them."""
    cpu = machine.get("cpu")
    capability = machine.get("cpu_capability")
    features = [None if capability == "DEFAULT" else capability,  # DEFAULT: no vector ISA known
                "bf16" if machine.get("cpu_bf16") else None]
    if cpu and any(features):
        cpu = f"{cpu} ({', '.join(f for f in features if f)})"
    parts = [machine.get("hostname"), cpu, machine.get("accelerator"), machine.get("device")]
    return ", ".join(str(p) for p in parts if p)


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions, revision and machine, as a JSON-ready dict. The machine names its vector
    instructions beside the processor's name: one name ("AMD EPYC") covers CPUs with and
    without AVX-512 and bfloat16, whose kernels differ in speed and in the last digits."""
    import torch

    from fashionlab.hardware import native_bf16  # imports torch: only when a run records it

    accelerator = None
    if torch.cuda.is_available():
        accelerator = torch.cuda.get_device_name(0)
    return {
        "versions": {"python": sys.version.split()[0],
                     **{p: _version(p) for p in _PACKAGES}},
        "revision": code_revision(),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...
            # Whether precision "auto" trains in bf16; read from x86's flags only (None:
            # not known, as on ARM, whose /proc/cpuinfo lists "Features" instead).
            "cpu_bf16": native_bf16(torch.device("cpu"))
            if platform.machine().lower() in ("x86_64", "amd64") else None,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "accelerator": accelerator,
            "device": device,
            "hostname": platform.node(),
        },
    }
