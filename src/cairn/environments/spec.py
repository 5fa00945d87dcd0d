"""Canonical environment specs. The spec digest is part of every step fingerprint; the build digest
(only what changes the installed files) keys the environment cache, so two environments that differ
only in their variables share one built environment."""

from __future__ import annotations

import re
import shutil
import sys
from typing import Any

from cairn.core.digests import digest_json

BUILDER_VERSION = 1  # bump when the way environments are built changes what is in them
CURRENT = "current-interpreter"  # the interpreter Cairn runs in, as it is
INTERPRETER = "interpreter"  # a given interpreter, as it is (user-managed)
MANAGED = "managed"  # an isolated environment that Cairn builds with uv

# Names conda knows a package by that pip knows by another name (the usual surprises).
CONDA_TO_PIP = {
    "pytorch": "torch", "pytorch-cpu": "torch", "py-xgboost": "xgboost", "py-lightgbm": "lightgbm",
    "tensorflow-gpu": "tensorflow", "msgpack-python": "msgpack", "python-graphviz": "graphviz",
    "py-opencv": "opencv-python", "opencv": "opencv-python", "pyyaml": "PyYAML", "libopencv": "opencv-python",
    "pillow": "pillow", "beautifulsoup4": "beautifulsoup4", "protobuf": "protobuf", "mkl": None,
    "cudatoolkit": None, "cudnn": None, "pytorch-cuda": None, "libgcc-ng": None, "libstdcxx-ng": None,
}
# Conda packages that say what the environment is, not what goes in it.
_CONDA_META = {"python", "pip", "setuptools", "wheel"}


def host_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def current_interpreter_spec() -> dict[str, Any]:
    """The default environment: the interpreter Cairn runs in, as it is."""
    return {"kind": CURRENT, "python": host_python(), "interpreter_path": None, "environment_variables": {},
            "docker": {"enabled": False, "base_image": None}}


def managed_spec(*, python: str | None, pip: list[str], conda: list[str], channels: list[str],
                 index_url: str | None, extra_index_urls: list[str]) -> dict[str, Any]:
    """An isolated environment built with uv. Lists are sorted: their order changes nothing."""
    return {"kind": MANAGED, "python": python or host_python(), "interpreter_path": None,
            "pip": sorted(dict.fromkeys(pip), key=str.lower), "conda": sorted(dict.fromkeys(conda), key=str.lower),
            "channels": list(dict.fromkeys(channels)) if conda else [],  # channels matter only to conda
            "index_url": index_url,
            "extra_index_urls": list(dict.fromkeys(extra_index_urls)), "environment_variables": {},
            "docker": {"enabled": False, "base_image": None}}


def spec_digest(spec: dict[str, Any]) -> str:
    """Digest of what decides the environment's behaviour (its name and version are not part of it)."""
    return digest_json({k: v for k, v in spec.items() if k not in ("name", "version")})


def build_digest(spec: dict[str, Any]) -> str:
    """Digest of what decides the built files: two specs with the same build digest share a build."""
    keys = ("python", "pip", "conda", "channels", "index_url", "extra_index_urls")
    return digest_json({"builder": BUILDER_VERSION, **{k: spec.get(k) for k in keys}})


def cache_key(spec: dict[str, Any]) -> str:
    """The environment's folder name in the cache (short, path-safe)."""
    return build_digest(spec).split(":", 1)[1][:24]


def interpreter_for(spec: dict[str, Any]) -> str:
    return spec.get("interpreter_path") or sys.executable


def is_managed(spec: dict[str, Any]) -> bool:
    return spec.get("kind") == MANAGED


# -- conda and pip requirement strings ---------------------------------------------------------

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirement_name(requirement: str) -> str:
    m = _NAME.match(requirement)
    return m.group(1) if m else requirement.strip()


def conda_python_version(requirement: str) -> str | None:
    """The version in a conda ``python`` spec: ``python=3.11.*`` -> 3.11, ``python=3.11.7=h955ad1f_0``
    -> 3.11.7; None for a bare ``python`` or a range (``python>=3.8``: this machine's Python)."""
    rest = requirement.strip()[len("python"):].strip()
    if not rest or rest[0] in "<>!~":
        return None
    version = rest.lstrip("=").split("=")[0].strip()
    version = version.removesuffix(".*").removesuffix("*").rstrip(".")
    return version or None


def split_conda_packages(packages: list[str]) -> tuple[str | None, list[str]]:
    """(python version asked for, packages that need a conda solver)."""
    python, others = None, []
    for p in packages:
        name = requirement_name(p).lower()
        if name == "python":
            python = conda_python_version(p)
        elif name not in _CONDA_META:
            others.append(p.strip())
    return python, others


def pip_key(requirement: str) -> str:
    """What makes two pip requirements "the same package" (URLs and paths are their own key)."""
    r = requirement.strip()
    if " @ " in r or re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*@", r):
        return requirement_name(r).lower()
    if "://" in r or r.startswith(("git+", ".", "/", "~")) or r.endswith((".whl", ".tar.gz", ".zip")):
        return r
    return requirement_name(r).lower()


def conda_to_pip(requirement: str) -> str | None:
    """The pip requirement for a conda one (``numpy=1.21`` -> ``numpy==1.21.*``), None if pip has none."""
    name = requirement_name(requirement)
    rest = requirement.strip()[len(name):].strip()
    pip_name = CONDA_TO_PIP.get(name.lower(), name)
    if pip_name is None:
        return None
    if rest.startswith("=") and not rest.startswith("=="):
        version = rest[1:].split("=")[0].strip()  # conda's name=version=build
        rest = f"=={version}" if version.count(".") >= 2 or "*" in version else f"=={version}.*"
    return pip_name + rest


def python_version_ok(version: str) -> bool:
    return re.fullmatch(r"3\.\d+(\.\d+)?", version) is not None


def conda_solver() -> str | None:
    for name in ("micromamba", "mamba", "conda"):
        found = shutil.which(name)
        if found:
            return found
    return None


def conda_problem(spec: dict[str, Any], env_name: str) -> str | None:
    """Why ``spec`` cannot be built here because of conda-only packages (None when it can)."""
    conda = spec.get("conda") or []
    if not conda or conda_solver() is not None:
        return None
    suggestions = list(spec.get("pip") or []) + [s for s in (conda_to_pip(p) for p in conda) if s]
    no_pip = [p for p in conda if conda_to_pip(p) is None]
    message = (f"environment {env_name!r} lists conda packages ({', '.join(conda)}) and no conda solver "
               f"(micromamba, mamba or conda) is installed; Cairn builds environments with uv from pip "
               f"packages. Install a conda solver, or ask pip for them instead: "
               f"CondaDependencies.create(pip_packages={suggestions!r})")
    if no_pip:
        message += f" ({', '.join(no_pip)}: no pip package needed, pip wheels bring their own libraries)"
    return message


def check_buildable(spec: dict[str, Any], env_name: str) -> list[str]:
    """Problems that make ``spec`` impossible to build here (found before anything is submitted)."""
    problems = []
    python = spec.get("python") or ""
    if spec.get("kind") == MANAGED and not python_version_ok(python):
        problems.append(f"environment {env_name!r}: python_version {python!r} is not a Python version; write it "
                        f"as a string such as '3.11'")
    conda = conda_problem(spec, env_name)
    if conda:
        problems.append(conda)
    return problems
