"""``cairn env list / build / prune`` and ``cairn logs --environment``, run as subprocesses."""

from __future__ import annotations

from pathlib import Path

import pytest

from cairn import Workspace
from tests.cli.test_cli import Project, flat, no_traceback


@pytest.fixture
def project(workspace: Workspace) -> Project:
    return Project(Path(workspace.location))


def test_build_list_and_prune(project: Project, workspace: Workspace) -> None:
    listed = project.cairn("env", "list")
    assert listed.returncode == 0, listed.stderr
    text = flat(listed.stdout)
    assert "cairn-minimal" in text and "cairn-sklearn" in text and "scikit-learn==" in text

    built = project.cairn("env", "build", "cairn-minimal")
    assert built.returncode == 0, built.stderr
    assert "building environment 'cairn-minimal'" in built.stdout  # the build log, as it happens
    assert "environment 'cairn-minimal' is built" in flat(built.stdout)
    again = project.cairn("env", "build", "cairn-minimal")
    assert "building environment" not in again.stdout and "is built" in flat(again.stdout)

    rows = {line.split("│")[1].strip(): line for line in project.cairn("env", "list").stdout.splitlines()
            if line.count("│") > 3}
    assert " yes " in rows["cairn-minimal"] and " managed " in rows["cairn-minimal"]
    assert " no " in rows["cairn-sklearn"]

    dry = project.cairn("env", "prune", "--dry-run")
    assert dry.returncode == 0 and "would remove 1 environment(s)" in flat(dry.stdout)
    envs = Path(workspace.location) / ".cairn" / "envs"
    assert [p for p in envs.iterdir() if p.is_dir()]
    pruned = project.cairn("env", "prune")
    assert pruned.returncode == 0 and "removed 1 environment(s)" in flat(pruned.stdout)
    assert not [p for p in envs.iterdir() if p.is_dir()]


def test_unknown_environment_is_a_clear_error(project: Project) -> None:
    result = project.cairn("env", "build", "no-such-env")
    assert result.returncode == 2
    no_traceback(result)
    assert "'no-such-env' is not registered" in flat(result.stderr)
