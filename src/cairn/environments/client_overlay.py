"""How a step in an isolated environment can still call ``Run.get_context()`` without Cairn being
installed into every environment.

Each built environment gets a folder ``cairn-client-<key>/`` that holds the ``cairn`` package and the
distributions it needs to import (SQLAlchemy, fsspec, ...). For an environment of the agent's own
Python version these are symbolic links to the agent's installed files: no download, no copy, and
the step's client is exactly the agent's version. For another Python version they are installed
with ``uv pip install --target`` at the agent's versions. A ``.pth`` hook in the environment appends
the folder to ``sys.path`` *after* the environment's own site-packages (only when the runner sets
``CAIRN_CLIENT_PATH``), so a package the environment pins always wins over Cairn's copy.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import importlib.metadata as md

from cairn.core.digests import digest_json

# Cairn's own runtime requirements; optional datastore drivers are added where installed.
_CORE = ("sqlalchemy", "alembic", "typer", "rich", "pathspec", "fsspec", "cryptography", "pyyaml")
_OPTIONAL = ("adlfs", "s3fs")
_SKIP = {"uv", "pip", "setuptools", "wheel"}
PTH_NAME = "_cairn_client.pth"
PTH_LINE = ("import os, sys; p = os.environ.get('CAIRN_CLIENT_PATH'); "
            "p and p not in sys.path and sys.path.append(p)\n")
KEY_FILE = ".cairn-client-key"


def _metadata() -> Any:
    """``importlib.metadata``, imported when first needed (~30 ms here: validating a pipeline does
    not need it)."""
    import importlib.metadata

    return importlib.metadata


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
            dist = _metadata().distribution(name)
        except _metadata().PackageNotFoundError:
            continue  # an optional or platform-specific requirement that is not installed
        seen[key] = dist
        wanted.extend(_requirement_names(dist))
    return tuple(sorted(seen.values(), key=lambda d: d.metadata["Name"].lower()))


def _installed(name: str) -> bool:
    try:
        _metadata().distribution(name)
        return True
    except _metadata().PackageNotFoundError:
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


def client_folder(env_folder: Path, python: str) -> Path:
    """This Cairn's client folder in an environment: one per client version, never rewritten in
    place (a running step keeps the one it started with; prune removes the environment whole)."""
    return env_folder / f"cairn-client-{overlay_key(python)}"


def overlay_current(env_folder: Path, python: str) -> bool:
    return (client_folder(env_folder, python) / KEY_FILE).is_file()


def client_supported(python: str) -> bool:
    """Cairn's client needs Python 3.11 or newer; an older environment runs steps without it."""
    try:
        major, minor = (int(x) for x in python.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 11)


def build_overlay(env_folder: Path, python: str, env_python: str, run: Any, log: Any) -> None:
    """Make this Cairn's client folder in ``env_folder`` for an environment of Python ``python``
    (in a temporary folder, renamed into place when complete).

    ``run(argv, what)`` runs a command with its output in the build log (raising on failure)."""
    target = client_folder(env_folder, python)
    staging = env_folder / f".{target.name}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    host = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not client_supported(python):
        log(f"note: Cairn's client needs Python 3.11 or newer; steps in this Python {python} environment "
            f"run, but cannot call Run.get_context()")
    elif python == host:
        for dist in client_distributions():
            for top in _top_level_entries(dist):
                link = staging / top.name
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(top, target_is_directory=top.is_dir())
    else:
        from cairn.environments.build import uv_binary

        pins = [f"{d.metadata['Name']}=={d.version}" for d in client_distributions()]
        run([uv_binary(), "pip", "install", "--no-config", "--color", "never", "--target", str(staging),
             "--python", env_python, "--compile-bytecode", *pins], "installing Cairn's client for this Python version")
    if client_supported(python):
        (staging / "cairn").symlink_to(cairn_package_dir(), target_is_directory=True)
    (staging / KEY_FILE).write_text(overlay_key(python))
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)


def client_conflicts(env_python: str) -> list[str]:
    """Distributions Cairn's client needs that the environment pins at another version (its own
    copy wins on sys.path, so Run.get_context() may not work there)."""
    import json
    import subprocess

    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower(): d.version "
            "for d in m.distributions()}))")
    try:
        out = subprocess.run([env_python, "-I", "-c", code], capture_output=True, text=True, timeout=60).stdout
        installed = json.loads(out)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    conflicts = []
    for d in client_distributions():
        name = d.metadata["Name"].lower()
        if name in installed and installed[name] != d.version:
            conflicts.append(f"{d.metadata['Name']} {installed[name]} (Cairn's client uses {d.version})")
    return conflicts


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
