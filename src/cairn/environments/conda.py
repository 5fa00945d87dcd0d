"""``CondaDependencies``: the Azure ML way to list what an environment needs, read from and written to
a conda environment YAML file. Cairn builds it with uv: pip packages and the Python version are
honoured; conda-only packages need a conda solver (see ``environments.build``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cairn.core.errors import UserInputError
from cairn.environments.spec import (
    conda_python_version,
    pip_key,
    python_version_ok,
    requirement_name,
    split_conda_packages,
)


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        raise UserInputError(f"{what} must be a list of strings, not one string; write [{value!r}]")
    try:
        items = list(value)
    except TypeError:
        raise UserInputError(f"{what} must be a list of strings, not {type(value).__name__}") from None
    bad = [x for x in items if not isinstance(x, str) or not x.strip()]
    if bad:
        raise UserInputError(f"{what} must hold non-empty strings; {bad[0]!r} is not one")
    return [x.strip() for x in items]


class CondaDependencies:
    """The packages of an environment: conda packages, pip packages, channels and pip options."""

    def __init__(self, conda_dependencies_file_path: str | os.PathLike[str] | None = None,
                 _underlying_structure: dict[str, Any] | None = None) -> None:
        self.name = "project_environment"
        self._conda: list[str] = []
        self._pip: list[str] = []
        self._pip_options: list[str] = []
        self._channels: list[str] = []
        if conda_dependencies_file_path is not None:
            if not isinstance(conda_dependencies_file_path, (str, os.PathLike)):
                raise UserInputError(f"conda_dependencies_file_path must be a path, not "
                                     f"{type(conda_dependencies_file_path).__name__}")
            self._load(Path(conda_dependencies_file_path))
        elif _underlying_structure is not None:
            self._from_structure(_underlying_structure, "the given structure")

    # -- building ----------------------------------------------------------------------------

    @staticmethod
    def create(pip_packages: Iterable[str] | None = None, conda_packages: Iterable[str] | None = None,
               python_version: str | None = None, pip_indexurl: str | None = None,
               pin_sdk_version: bool = True, channels: Iterable[str] | None = None) -> CondaDependencies:
        """Azure ML's factory. ``pin_sdk_version`` is accepted for compatibility: Cairn's client is
        made available to every environment without installing it."""
        deps = CondaDependencies()
        for p in _strings(conda_packages, "conda_packages"):
            deps.add_conda_package(p)
        for p in _strings(pip_packages, "pip_packages"):
            deps.add_pip_package(p)
        for c in _strings(channels, "channels"):
            deps.add_channel(c)
        if python_version is not None:
            deps.set_python_version(python_version)
        if pip_indexurl is not None:
            if not isinstance(pip_indexurl, str) or not pip_indexurl.strip():
                raise UserInputError(f"pip_indexurl must be a URL string, not {pip_indexurl!r}")
            deps.set_pip_option(f"--index-url {pip_indexurl.strip()}")
        return deps

    def add_pip_package(self, pip_package: str) -> None:
        (p,) = _strings([pip_package], "a pip package")
        if p.startswith("-"):
            self.set_pip_option(p)
            return
        self._pip = [x for x in self._pip if pip_key(x) != pip_key(p)] + [p]

    def remove_pip_package(self, pip_package: str) -> None:
        key = pip_key(pip_package)
        self._pip = [x for x in self._pip if pip_key(x) != key]

    def add_conda_package(self, conda_package: str) -> None:
        (p,) = _strings([conda_package], "a conda package")
        if requirement_name(p).lower() == "python":
            version = conda_python_version(p)
            if version is not None:
                self.set_python_version(version)
            return
        if requirement_name(p).lower() == "pip":  # pip's own version: uv installs the pip packages
            return
        self._conda = [x for x in self._conda if requirement_name(x).lower() != requirement_name(p).lower()] + [p]

    def remove_conda_package(self, conda_package: str) -> None:
        name = requirement_name(conda_package).lower()
        self._conda = [x for x in self._conda if requirement_name(x).lower() != name]

    def add_channel(self, channel: str) -> None:
        (c,) = _strings([channel], "a channel")
        if c not in self._channels:
            self._channels.append(c)

    def remove_channel(self, channel: str) -> None:
        self._channels = [c for c in self._channels if c != channel]

    def set_pip_option(self, pip_option: str) -> None:
        (o,) = _strings([pip_option], "a pip option")
        flag = o.split()[0].split("=")[0]
        if flag in ("--index-url", "-i"):  # one index: a new one replaces the old
            self._pip_options = [x for x in self._pip_options if x.split()[0].split("=")[0] not in ("--index-url", "-i")]
        if o not in self._pip_options:
            self._pip_options.append(o)

    def set_python_version(self, version: str) -> None:
        if not isinstance(version, str):  # 3.10 as a float is 3.1
            raise UserInputError(f"python_version must be a string such as '3.10', not {version!r}")
        version = version.strip()
        if not python_version_ok(version):
            raise UserInputError(f"python_version {version!r} is not a Python version; write it as '3.11' or "
                                 f"'3.11.7'")
        self._conda = [x for x in self._conda if requirement_name(x).lower() != "python"]
        self._conda.insert(0, f"python={version}")

    def get_python_version(self) -> str | None:
        return split_conda_packages(self._conda)[0]

    @property
    def pip_packages(self) -> list[str]:
        return list(self._pip)

    @property
    def conda_packages(self) -> list[str]:
        return [x for x in self._conda if requirement_name(x).lower() != "python"]

    @property
    def conda_channels(self) -> list[str]:
        return list(self._channels)

    @property
    def pip_options(self) -> list[str]:
        return list(self._pip_options)

    def index_urls(self) -> tuple[str | None, list[str]]:
        """(the index URL, extra index URLs) among the pip options."""
        index, extra = None, []
        for o in self._pip_options:
            flag, _, value = o.replace("=", " ", 1).partition(" ")
            if flag in ("--index-url", "-i"):
                index = value.strip()
            elif flag == "--extra-index-url":
                extra.append(value.strip())
        return index, extra

    def other_pip_options(self) -> list[str]:
        return [o for o in self._pip_options if o.replace("=", " ", 1).split()[0]
                not in ("--index-url", "-i", "--extra-index-url")]

    # -- YAML ---------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        deps: list[Any] = list(self._conda)
        if self._pip or self._pip_options:
            deps.append("pip")
            deps.append({"pip": [*self._pip_options, *self._pip]})
        return {"name": self.name, "channels": list(self._channels), "dependencies": deps}

    def serialize_to_string(self) -> str:
        import yaml

        return yaml.safe_dump(self.as_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the conda environment YAML file; returns its path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.serialize_to_string(), encoding="utf-8")
        return str(target)

    def save_to_file(self, base_directory: str | os.PathLike[str], conda_file_path: str | None = None) -> str:
        return self.save(Path(base_directory) / (conda_file_path or "conda_dependencies.yml"))

    def _load(self, path: Path) -> None:
        import yaml

        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserInputError(f"conda file {str(path)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"cannot read conda file {str(path)!r}: {exc}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise UserInputError(f"conda file {str(path)!r} is not valid YAML: {exc}") from None
        self._from_structure(data, f"conda file {str(path)!r}")

    def _from_structure(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise UserInputError(f"{where} must be a mapping with 'dependencies' (a conda environment file)")
        self.name = str(data.get("name") or self.name)
        for c in _strings(data.get("channels"), f"{where}: channels"):
            self.add_channel(c)
        deps = data.get("dependencies") or []
        if not isinstance(deps, list):
            raise UserInputError(f"{where}: 'dependencies' must be a list")
        for d in deps:
            if isinstance(d, dict):
                if set(d) != {"pip"}:
                    raise UserInputError(f"{where}: a mapping in 'dependencies' may only hold 'pip', not "
                                         f"{sorted(d)}")
                for p in _strings(d["pip"], f"{where}: pip"):
                    self.add_pip_package(p)
            elif isinstance(d, (str, int, float)):
                self.add_conda_package(str(d))
            else:
                raise UserInputError(f"{where}: dependency {d!r} is neither a package nor a pip list")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CondaDependencies) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"CondaDependencies(conda={self.conda_packages!r}, pip={self._pip!r})"
