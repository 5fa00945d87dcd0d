"""Datastores: named places where data lives. This issue ships local folders; object stores come next."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cairn.core.errors import NotFoundError, UserInputError
from cairn.core.names import check_type
from cairn.storage.paths import confined

if TYPE_CHECKING:
    from cairn.client.workspace import Workspace


class Datastore:
    """A registered datastore. ``Datastore(ws, name)`` looks one up (default: the default one)."""

    def __init__(self, workspace: Workspace, name: str | None = None) -> None:
        from cairn.client.workspace import Workspace

        check_type(workspace, Workspace, "Datastore workspace")
        if name is not None:
            check_type(name, str, "datastore name")
        records = workspace._backend.list_datastores()
        for d in records:
            if (name is None and d["is_default"]) or d["name"] == name:
                self._load(workspace, d)
                return
        known = ", ".join(repr(d["name"]) for d in records) or "none"
        raise NotFoundError(f"datastore {name!r} is not registered in this workspace (registered: {known})")

    @classmethod
    def _from_record(cls, workspace: Workspace, record: dict[str, Any]) -> Datastore:
        self = cls.__new__(cls)
        self._load(workspace, record)
        return self

    def _load(self, workspace: Workspace, record: dict[str, Any]) -> None:
        self.workspace = workspace
        self.name: str = record["name"]
        self.datastore_type: str = record["kind"]
        self.is_default: bool = bool(record["is_default"])

    @classmethod
    def get(cls, workspace: Workspace, datastore_name: str) -> Datastore:
        return cls(workspace, datastore_name)

    @classmethod
    def get_default(cls, workspace: Workspace) -> Datastore:
        return cls(workspace, None)

    @classmethod
    def register_local_folder(cls, workspace: Workspace, datastore_name: str,
                              path: str | os.PathLike[str], overwrite: bool = False) -> Datastore:
        """Register an existing folder of this machine as a datastore."""
        from cairn.client.workspace import Workspace
        from cairn.core.names import check_data_name

        check_type(workspace, Workspace, "register_local_folder workspace")
        if not isinstance(path, (str, os.PathLike)):
            raise UserInputError(f"register_local_folder path must be a folder path, not {type(path).__name__}")

        check_data_name(datastore_name, "datastore name")
        folder = Path(path).resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"folder {str(path)!r} does not exist; create it first")
        if not overwrite and any(d["name"] == datastore_name for d in workspace._backend.list_datastores()):
            raise UserInputError(f"datastore {datastore_name!r} is already registered; pass overwrite=True "
                                 f"to replace it")
        workspace._backend.register_datastore(datastore_name, "local", {"path": str(folder)}, False)
        return cls(workspace, datastore_name)

    def set_as_default(self) -> None:
        rec = next(d for d in self.workspace._backend.list_datastores() if d["name"] == self.name)
        self.workspace._backend.register_datastore(self.name, rec["kind"], rec["config"], True)
        self.is_default = True

    @property
    def root(self) -> str:
        """The local folder behind the datastore."""
        return self.workspace._backend.datastore_root(self.name)

    def local_path(self, relative_path: str = "") -> Path:
        """The local path of ``relative_path`` inside the datastore (refusing ``..`` escapes)."""
        return confined(self.root, relative_path, f"path in datastore {self.name!r}") if relative_path else Path(self.root)

    def __repr__(self) -> str:
        return f"Datastore(name={self.name!r}, type={self.datastore_type!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Datastore) and (other.workspace, other.name) == (self.workspace, self.name)

    def __hash__(self) -> int:
        return hash((self.workspace.location, self.name))
