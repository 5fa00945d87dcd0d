"""Git facts about source directories, recorded as run properties. Git is asked once per
repository, not once per folder: a pipeline of 20 step folders in one repository costs five git
processes, not a hundred."""

from __future__ import annotations

import os
import subprocess

from cairn.storage.paths import real_path


def _git(cwd: str, *args: str) -> str | None:
    """Git's one-line answer without its line end (a path may end in spaces), or None."""
    try:
        out = subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.removesuffix("\n") if out.returncode == 0 else None


def git_properties(source_directory: str) -> dict[str, str]:
    """``cairn.git.*`` and ``mlflow.source.git.*`` properties; empty outside a git work tree."""
    return git_properties_of([source_directory])[source_directory]


def git_properties_of(source_directories: list[str]) -> dict[str, dict[str, str]]:
    """``git_properties`` of each folder (a folder outside any work tree gets ``{}``)."""
    found: dict[str, str | None] = {}  # folder -> the nearest folder holding .git, walked once for all
    by_tree: dict[str, list[str]] = {}
    result: dict[str, dict[str, str]] = {}
    real = {folder: real_path(folder) for folder in source_directories}
    for folder in source_directories:
        result[folder] = {}
        tree = _nearest_tree(real[folder], found)
        if tree is not None:  # not a work tree: no git process at all
            by_tree.setdefault(tree, []).append(folder)
    for tree, folders in by_tree.items():
        top = _git(tree, "rev-parse", "--show-toplevel")
        if top is None:
            continue
        commit = _git(tree, "rev-parse", "HEAD") or ""
        branch = _git(tree, "rev-parse", "--abbrev-ref", "HEAD") or ""
        url = _git(tree, "config", "--get", "remote.origin.url") or top
        changed = _changed_paths(top, [real[f] for f in folders])
        for folder in folders:
            # changes under the source folder only, untracked files included: they are in the snapshot too
            relative = os.path.relpath(real[folder], top)
            prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
            # a changed path under it, or an untracked folder around it
            dirty = changed is not None and any(p.startswith(prefix) or (p.endswith("/") and prefix.startswith(p))
                                                for p in changed)
            result[folder] = {
                "cairn.git.repository_uri": url, "cairn.git.branch": branch, "cairn.git.commit": commit,
                "cairn.git.dirty": "true" if dirty else "false",
                "mlflow.source.git.repoURL": url, "mlflow.source.git.branch": branch,
                "mlflow.source.git.commit": commit,
            }
    return result


def _nearest_tree(folder: str, found: dict[str, str | None]) -> str | None:
    walked = []
    path = folder
    while path not in found:
        walked.append(path)
        if os.path.exists(os.path.join(path, ".git")):
            found[path] = path
            break
        parent = os.path.dirname(path)
        if parent == path:
            found[path] = None
            break
        path = parent
    tree = found[path]
    for p in walked:
        found[p] = tree
    return tree


def _changed_paths(top: str, folders: list[str]) -> list[str] | None:
    """Paths (from the repository's top, ``/``-separated) with changes under ``folders`` (resolved)."""
    try:
        out = subprocess.run(["git", "-C", top, "status", "--porcelain", "-z", "--untracked-files=normal", "--",
                              *folders], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    paths, fields = [], out.stdout.split(b"\0")
    i = 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.append(os.fsdecode(entry[3:]))
        if b"R" in entry[:2] or b"C" in entry[:2]:  # a rename or copy: its origin follows
            if i < len(fields):
                paths.append(os.fsdecode(fields[i]))
            i += 1
    return paths
