"""Shared fixtures: a fresh embedded workspace whose agent is stopped after the test."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cairn import Workspace
from cairn.engine.client import stop_agent
from cairn.storage.layout import WorkspaceLayout


def require_no_workspace_above(path: Path) -> None:
    """Discovery tests need a folder with no workspace above it; a stray one is a broken machine
    set-up, reported as a failure (never a silent skip)."""
    stray = [p for p in (path, *path.parents) if (p / ".cairn" / "config.json").is_file()]
    assert not stray, f"a Cairn workspace exists at {stray[0]}, above {path}: remove it to run this test"


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    ws = Workspace.create(tmp_path / "ws")
    yield ws
    stop_agent(WorkspaceLayout(ws.location))


@pytest.fixture
def write_script(tmp_path: Path) -> Callable[..., Path]:
    """write_script("prep.py", "code", folder="src") -> the source folder."""

    def write(name: str, code: str, folder: str = "src") -> Path:
        src = tmp_path / folder
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
        return src

    return write


# Agents that a test leaves behind (e.g. a workspace it never stops) exit soon on their own.
AGENT_IDLE_TIMEOUT = "20"
os.environ["CAIRN_AGENT_IDLE_TIMEOUT"] = AGENT_IDLE_TIMEOUT


@pytest.fixture(autouse=True)
def _no_inherited_step_context(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("CAIRN_") and v != "CAIRN_AGENT_IDLE_TIMEOUT"]:
        monkeypatch.delenv(var)
