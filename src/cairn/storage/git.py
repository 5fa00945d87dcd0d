"""Git facts about a source directory, recorded as run properties."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_properties(source_directory: str) -> dict[str, str]:
    """``cairn.git.*`` and ``mlflow.source.git.*`` properties; empty outside a git work tree."""
    src = Path(source_directory).resolve()
    if not any((p / ".git").exists() for p in (src, *src.parents)):
        return {}  # not a work tree: spawn no git process at all
    top = _git(src, "rev-parse", "--show-toplevel")
    if top is None:
        return {}
    commit = _git(src, "rev-parse", "HEAD") or ""
    branch = _git(src, "rev-parse", "--abbrev-ref", "HEAD") or ""
    url = _git(src, "config", "--get", "remote.origin.url") or top
    # changes under the source folder only, untracked files included: they are in the snapshot too
    status = _git(src, "status", "--porcelain", "--untracked-files=normal", "--", ".")
    dirty = "true" if status else "false"
    return {
        "cairn.git.repository_uri": url, "cairn.git.branch": branch, "cairn.git.commit": commit,
        "cairn.git.dirty": dirty,
        "mlflow.source.git.repoURL": url, "mlflow.source.git.branch": branch,
        "mlflow.source.git.commit": commit,
    }
