"""The code revision stored with a run is this project's own: a git commit only for the
fashionlab checkout, else the installed version (and the commit pip recorded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import fashionlab
from fashionlab.provenance import checkout_revision, code_revision, installed_revision

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")

PACKAGE = Path(fashionlab.__file__).resolve().parent


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        capture_output=True, text=True, check=True).stdout.strip()


def _repo(path: Path, project: str, package: bool = True) -> Path:
    """A git repository at `path` whose pyproject.toml names `project`, holding a copy of the
    fashionlab package (or only its __init__), committed."""
    path.mkdir(parents=True)
    (path / "pyproject.toml").write_text(f'[project]\nname = "{project}"\nversion = "9"\n')
    if package:
        shutil.copytree(PACKAGE, path / "fashionlab",
                        ignore=shutil.ignore_patterns("__pycache__"))
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "first")
    return path


def test_the_fashionlab_checkout_gives_its_commit_and_says_dirty(tmp_path: Path):
    repo = _repo(tmp_path / "fashionlab-src", "fashionlab")
    head = _git(repo, "rev-parse", "HEAD")
    assert checkout_revision(repo / "fashionlab") == head
    with open(repo / "fashionlab" / "__init__.py", "a") as init:
        init.write("# a local change\n")
    assert checkout_revision(repo / "fashionlab") == f"{head}+dirty"


def test_a_package_inside_another_project_gives_no_commit(tmp_path: Path):
    repo = _repo(tmp_path / "other", "other-project")  # a virtualenv in another project, say
    assert checkout_revision(repo / "fashionlab") is None
    # The project's files inside another repository (an unpacked sdist): not its checkout.
    sdist = tmp_path / "other" / "vendor" / "fashionlab-0.1.0"
    shutil.copytree(repo / "fashionlab", sdist / "fashionlab")
    (sdist / "pyproject.toml").write_text('[project]\nname = "fashionlab"\n')
    assert checkout_revision(sdist / "fashionlab") is None
    # No git at all: a plain directory with the project's files.
    plain = tmp_path / "plain"
    shutil.copytree(sdist, plain)
    assert checkout_revision(plain / "fashionlab") is None


def test_the_stored_revision_of_a_package_inside_another_repository(tmp_path: Path):
    """The whole package imported from inside an unrelated git repository (the case of an
    installed wheel in a virtualenv inside another project): the stored revision is the
    installed version, never that repository's commit."""
    repo = _repo(tmp_path / "other", "other-project")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    script = "import fashionlab.provenance as p; print(p.__file__); print(p.code_revision())"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env=env, cwd=tmp_path)
    where, revision = done.stdout.splitlines()
    assert Path(where).resolve().is_relative_to(repo.resolve())
    assert _git(repo, "rev-parse", "HEAD") not in revision
    assert revision == installed_revision(metadata.distribution("fashionlab"))


def _dist_info(path: Path, direct_url: dict | str | None) -> metadata.Distribution:
    path.mkdir(parents=True)
    (path / "METADATA").write_text("Metadata-Version: 2.1\nName: fashionlab\nVersion: 0.3.1\n")
    if direct_url is not None:
        (path / "direct_url.json").write_text(
            direct_url if isinstance(direct_url, str) else json.dumps(direct_url))
    return metadata.PathDistribution(path)


def test_an_installed_package_gives_its_version_and_the_commit_it_was_installed_from(
        tmp_path: Path):
    from_git = _dist_info(tmp_path / "a" / "fashionlab-0.3.1.dist-info", {
        "url": "https://github.com/me/fashionlab.git",
        "vcs_info": {"vcs": "git", "commit_id": "0123abcd" * 5, "requested_revision": "main"}})
    assert installed_revision(from_git) == f"fashionlab 0.3.1 from commit {'0123abcd' * 5}"
    wheel = _dist_info(tmp_path / "b" / "fashionlab-0.3.1.dist-info", None)
    assert installed_revision(wheel) == "fashionlab 0.3.1"
    editable = _dist_info(tmp_path / "c" / "fashionlab-0.3.1.dist-info",
                          {"url": "file:///src", "dir_info": {"editable": True}})
    assert installed_revision(editable) == "fashionlab 0.3.1"
    garbled = _dist_info(tmp_path / "d" / "fashionlab-0.3.1.dist-info", "[not pep 610")
    assert installed_revision(garbled) == "fashionlab 0.3.1"
    assert installed_revision(None) is None


def test_this_checkout_stores_its_own_commit():
    root = PACKAGE.parent
    if checkout_revision(PACKAGE) is None:
        pytest.skip("the tests run on an installed package, not the checkout")
    assert code_revision().split("+")[0] == _git(root, "rev-parse", "HEAD")

