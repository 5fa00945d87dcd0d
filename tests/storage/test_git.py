"""Git facts of many source folders: right per folder (dirty only where that folder changed), and
git asked once per repository, not once per folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cairn.storage.git import git_properties, git_properties_of


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.email=a@b.c", "-c", "user.name=t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for folder in ("clean", "edited", "renamed", "nested/deep"):
        (root / folder).mkdir(parents=True)
        (root / folder / "step.py").write_text(f"print({folder!r})\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", ".")
    git(root, "commit", "-qm", "init")
    git(root, "remote", "add", "origin", "https://example.com/team/ml.git")
    (root / "edited" / "step.py").write_text("print('changed')\n")
    git(root, "mv", "renamed/step.py", "renamed/moved.py")
    (root / "fresh" / "inner").mkdir(parents=True)  # a folder git does not know at all
    (root / "fresh" / "inner" / "new.py").write_text("print('new')\n")
    return root


def test_each_folder_gets_its_own_dirty_flag_and_the_repository_facts(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    folders = [str(repo / f) for f in ("clean", "edited", "renamed", "nested/deep", "nested", "fresh/inner")]
    props = git_properties_of([*folders, str(outside)])
    commit = git(repo, "rev-parse", "HEAD")
    dirty = {Path(f).relative_to(repo).as_posix(): props[f]["cairn.git.dirty"] for f in folders}
    assert dirty == {"clean": "false", "edited": "true", "renamed": "true", "nested/deep": "false",
                     "nested": "false", "fresh/inner": "true"}
    for f in folders:
        assert props[f]["cairn.git.commit"] == commit == props[f]["mlflow.source.git.commit"]
        assert props[f]["cairn.git.branch"] == "main" == props[f]["mlflow.source.git.branch"]
        assert props[f]["cairn.git.repository_uri"] == "https://example.com/team/ml.git"
    assert props[str(outside)] == {}
    assert git_properties(str(repo / "edited")) == props[str(repo / "edited")]
    assert git_properties(str(repo))["cairn.git.dirty"] == "true"  # the whole tree has changes


def test_git_is_asked_once_per_repository(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = tmp_path / "calls.log"
    shim = tmp_path / "bin"
    shim.mkdir()
    real = subprocess.run(["which", "git"], capture_output=True, text=True, check=True).stdout.strip()
    (shim / "git").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    (shim / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    git(other, "init", "-q")
    folders = [str(repo / f) for f in ("clean", "edited", "renamed", "nested/deep")] + [str(other / "a")]
    calls.write_text("")
    props = git_properties_of(folders)
    assert props[str(other / "a")]["cairn.git.dirty"] == "false"  # an empty new repository: nothing committed
    assert len(calls.read_text().splitlines()) == 2 * 5  # two repositories, five questions each


def test_a_repository_whose_folder_name_ends_in_a_space(tmp_path: Path) -> None:
    root = tmp_path / "repo "
    (root / "src").mkdir(parents=True)
    (root / "src" / "step.py").write_text("print(1)\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", ".")
    git(root, "commit", "-qm", "init")
    (root / "src" / "step.py").write_text("print(2)\n")
    assert git_properties(str(root / "src"))["cairn.git.dirty"] == "true"
    assert git_properties(str(root / "src"))["cairn.git.repository_uri"] == str(root)
