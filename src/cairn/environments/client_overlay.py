"""How a step in an isolated environment can still call ``Run.get_context()`` without Cairn being
installed into every environment.

Each built environment gets a folder ``cairn-client/`` that holds the ``cairn`` package and the
distributions it needs to import (SQLAlchemy, fsspec, ...). For an environment of the agent's own
Python version these are symbolic links to the agent's installed files: no download, no copy, and
the step's client is exactly the agent's version. For another Python version they are installed
with ``uv pip install --target`` at the agent's versions. A ``.pth`` hook in the environment appends
the folder to ``sys.path`` *after* the environment's own site-packages (only when the runner sets
``CAIRN_CLIENT_PATH``), so a package the environment pins always wins over Cairn's copy.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import re
import shutil
import sys
from pathlib import Path

from cairn.core.digests import digest_json

# Cairn's own runtime requirements; optional datastore drivers are added where installed.
_CORE = ("sqlalchemy", "alembic", "typer", "rich", "pathspec", "fsspec", "cryptography", "pyyaml")
_OPTIONAL = ("adlfs", "s3fs")
_SKIP = {"uv", "pip", "setuptools", "wheel"}
PTH_NAME = "_cairn_client.pth"
PTH_LINE = ("import os, sys; p = os.environ.get('CAIRN_CLIENT_PATH'); "
            "p and p not in sys.path and sys.path.append(p)\n")
KEY_FILE = ".cairn-client-key"


def _requirement_names(dist: md.Distribution) -> list[str]:
    names = []
    for req in dist.requires or []:
        requirement, _, marker = req.partition(";")
        if "extra" in marker:
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        if m:
            names.append(m.group(1))
    return names


@functools.cache
def client_distributions() -> tuple[md.Distribution, ...]:
    """The installed distributions Cairn's client imports (the closure of its requirements)."""
    wanted = list(_CORE) + [n for n in _OPTIONAL if _installed(n)]
    seen: dict[str, md.Distribution] = {}
    while wanted:
        name = wanted.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen or key in _SKIP:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        seen[key] = dist
        wanted.extend(_requirement_names(dist))
    return tuple(sorted(seen.values(), key=lambda d: d.metadata["Name"].lower()))


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


def cairn_package_dir() -> Path:
    import cairn

    return Path(cairn.__file__).resolve().parent


@functools.cache
def overlay_key(python: str) -> str:
    """Changes when the client an environment gets would change."""
    pins = [(d.metadata["Name"], d.version) for d in client_distributions()]
    return digest_json({"python": python, "host": sys.version, "cairn": str(cairn_package_dir()),
                        "pins": pins}).split(":", 1)[1][:24]


def overlay_current(folder: Path, python: str) -> bool:
    try:
        return (folder / KEY_FILE).read_text() == overlay_key(python)
    except OSError:
        return False


def build_overlay(folder: Path, python: str, env_python: str, run: object) -> None:
    """Fill ``folder`` with Cairn's client for an environment of Python ``python``.

    ``run(argv, what)`` runs a command with its output in the build log (raising on failure)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    host = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if python == host:
        for dist in client_distributions():
            for top in _top_level_entries(dist):
                link = folder / top.name
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(top, target_is_directory=top.is_dir())
    else:
        from cairn.environments.build import uv_binary

        pins = [f"{d.metadata['Name']}=={d.version}" for d in client_distributions()]
        run([uv_binary(), "pip", "install", "--color", "never", "--target", str(folder), "--python", env_python,
             "--compile-bytecode", *pins], "installing Cairn's client for this Python version")
    (folder / "cairn").symlink_to(cairn_package_dir(), target_is_directory=True)
    (folder / KEY_FILE).write_text(overlay_key(python))


def _top_level_entries(dist: md.Distribution) -> list[Path]:
    """The top-level files and folders a distribution put into site-packages (and its metadata)."""
    base = Path(str(dist.locate_file("")))
    tops: set[str] = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if not parts or parts[0] in ("..", "__pycache__") or os.path.isabs(str(f)):
            continue
        tops.add(parts[0])
    return [base / t for t in sorted(tops) if (base / t).exists() and not t.endswith(".pth")]


def install_hook(site_packages: Path) -> None:
    (site_packages / PTH_NAME).write_text(PTH_LINE)
