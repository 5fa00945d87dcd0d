"""Compute targets as users see them: ``ComputeTarget(ws, "local")``, ``ComputeTarget.create``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cairn.core.errors import NotFoundError, UserInputError
from cairn.core.names import check_data_name, check_type

if TYPE_CHECKING:
    from cairn.client.workspace import Workspace


@dataclass(frozen=True)
class LocalComputeConfiguration:
    max_concurrency: int | None = None
    warm_start_modules: tuple[str, ...] = ()
    kind: str = "local"

    def to_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if self.max_concurrency is not None:
            config["max_concurrency"] = self.max_concurrency
        if self.warm_start_modules:
            config["warm_start_modules"] = list(self.warm_start_modules)
        return config


class LocalCompute:
    """The built-in target kind that runs steps as subprocesses of this machine."""

    @staticmethod
    def provisioning_configuration(max_concurrency: int | None = None,
                                   warm_start_modules: list[str] | None = None) -> LocalComputeConfiguration:
        """``warm_start_modules`` (opt-in): steps are forked from a per-environment server that
        imported these modules once (e.g. ``["pandas", "sklearn"]``), instead of each step paying
        for the imports. Do not use it for modules that start threads, open GPU contexts or read
        environment variables at import time."""
        if max_concurrency is not None:
            check_type(max_concurrency, int, "max_concurrency")
            if max_concurrency < 1:
                raise UserInputError(f"max_concurrency must be at least 1, not {max_concurrency}")
        modules: tuple[str, ...] = ()
        if warm_start_modules is not None:
            if isinstance(warm_start_modules, str) or not all(
                    isinstance(m, str) and m.replace(".", "_").isidentifier() for m in warm_start_modules):
                raise UserInputError(f"warm_start_modules must be a list of module names such as "
                                     f"['pandas', 'sklearn.ensemble'], not {warm_start_modules!r}")
            modules = tuple(warm_start_modules)
        return LocalComputeConfiguration(max_concurrency, modules)


class ComputeTarget:
    """A named compute target of a workspace. ``ComputeTarget(ws, name)`` looks one up."""

    def __init__(self, workspace: Workspace, name: str) -> None:
        from cairn.client.workspace import Workspace

        check_type(workspace, Workspace, "ComputeTarget workspace")
        check_type(name, str, "compute target name")
        records = workspace._backend.list_compute_targets()
        for c in records:
            if c["name"] == name:
                self._load(workspace, c)
                return
        known = ", ".join(repr(c["name"]) for c in records) or "none"
        raise NotFoundError(f"compute target {name!r} does not exist in this workspace (known: {known}); "
                            f"create it with ComputeTarget.create(ws, {name!r}, ...)")

    @classmethod
    def _from_record(cls, workspace: Workspace, record: dict[str, Any]) -> ComputeTarget:
        self = cls.__new__(cls)
        self._load(workspace, record)
        return self

    def _load(self, workspace: Workspace, record: dict[str, Any]) -> None:
        self.workspace = workspace
        self.name: str = record["name"]
        self.type: str = record["kind"]
        self.config: dict[str, Any] = dict(record["config"])

    @classmethod
    def create(cls, workspace: Workspace, name: str, provisioning_configuration: Any) -> ComputeTarget:
        from cairn.client.workspace import Workspace

        check_type(workspace, Workspace, "ComputeTarget.create workspace")
        check_data_name(name, "compute target name")
        if not isinstance(provisioning_configuration, LocalComputeConfiguration):
            raise UserInputError(f"provisioning_configuration must come from "
                                 f"LocalCompute.provisioning_configuration(...), not "
                                 f"{type(provisioning_configuration).__name__}")
        workspace._backend.put_compute_target(name, provisioning_configuration.kind,
                                              provisioning_configuration.to_config())
        return cls(workspace, name)

    @classmethod
    def list(cls, workspace: Workspace) -> list[ComputeTarget]:
        return list(workspace.compute_targets.values())

    def wait_for_completion(self, show_output: bool = False) -> None:
        """Local targets are ready at once."""

    def get_status(self) -> dict[str, Any]:
        import os

        return {"name": self.name, "type": self.type, "state": "Ready",
                "max_concurrency": self.config.get("max_concurrency") or os.cpu_count()}

    def __repr__(self) -> str:
        return f"ComputeTarget(name={self.name!r}, type={self.type!r})"
