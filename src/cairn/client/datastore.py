"""Datastores: named places where data lives. This issue ships local folders; object stores come next."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cairn.core.errors import NotFoundError, PathNotFoundError, UserInputError
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
            raise PathNotFoundError(f"folder {str(path)!r} does not exist; create it first")
        existing = next((d for d in workspace._backend.list_datastores() if d["name"] == datastore_name), None)
        if existing is not None and existing["kind"] == "local" and \
                Path(workspace._backend.datastore_root(datastore_name)).resolve() == folder:
            return cls(workspace, datastore_name)  # the same folder again (a pipeline file run twice): as it is
        if not overwrite and existing is not None:
            where = f" (for {existing['config']['path']})" if existing["kind"] == "local" else ""
            raise UserInputError(f"datastore {datastore_name!r} is already registered{where}; pass overwrite=True "
                                 f"to replace it")
        # replacing the default keeps it the default: the workspace always has one
        workspace._backend.register_datastore(datastore_name, "local", {"path": str(folder)},
                                              bool(existing and existing.get("is_default")))
        return cls(workspace, datastore_name)

    @classmethod
    def register_azure_blob_container(
            cls, workspace: Workspace, datastore_name: str, container_name: str, account_name: str,
            sas_token: str | None = None, account_key: str | None = None, protocol: str | None = None,
            endpoint: str | None = None, overwrite: bool = False, create_if_not_exists: bool = False,
            skip_validation: bool = False, **ignored: Any) -> Datastore:
        """Register an Azure Blob container. Credentials are stored encrypted and never shown."""
        config = {"container_name": _text(container_name, "container_name"),
                  "account_name": _text(account_name, "account_name")}
        if endpoint is not None:
            config["endpoint"] = _text(endpoint, "endpoint").rstrip("/")
        if protocol is not None:
            if protocol not in ("http", "https"):
                raise UserInputError(f"protocol must be 'http' or 'https', not {protocol!r}")
            config["protocol"] = protocol
        secrets = {k: _text(v, k) for k, v in (("account_key", account_key), ("sas_token", sas_token)) if v is not None}
        return cls._register(workspace, datastore_name, "azure_blob", config, secrets, overwrite,
                             create_if_not_exists, skip_validation)

    @classmethod
    def register_s3_bucket(
            cls, workspace: Workspace, datastore_name: str, bucket_name: str, endpoint_url: str | None = None,
            access_key_id: str | None = None, secret_access_key: str | None = None, region: str | None = None,
            overwrite: bool = False, create_if_not_exists: bool = False, skip_validation: bool = False,
            **ignored: Any) -> Datastore:
        """Register an S3 (or S3-compatible) bucket. Credentials are stored encrypted and never shown."""
        name = _text(bucket_name, "bucket_name")
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", name) or ".." in name:
            raise UserInputError(f"bucket_name {name!r} is not a valid S3 bucket name: use 3 to 63 lower-case "
                                 f"letters, digits, '-' and '.', starting and ending with a letter or digit")
        config = {"bucket_name": name}
        if endpoint_url is not None:
            config["endpoint_url"] = _text(endpoint_url, "endpoint_url")
        if region is not None:
            config["region"] = _text(region, "region")
        if (access_key_id is None) != (secret_access_key is None):
            raise UserInputError("give both access_key_id and secret_access_key, or neither (anonymous access)")
        secrets = {k: _text(v, k) for k, v in (("access_key_id", access_key_id),
                                                ("secret_access_key", secret_access_key)) if v is not None}
        return cls._register(workspace, datastore_name, "s3", config, secrets, overwrite,
                             create_if_not_exists, skip_validation)

    @classmethod
    def _register(cls, workspace: Workspace, name: str, kind: str, config: dict[str, Any],
                  secrets: dict[str, Any], overwrite: bool, create_if_not_exists: bool,
                  skip_validation: bool) -> Datastore:
        from cairn.client.workspace import Workspace
        from cairn.core.names import check_data_name
        from cairn.storage.datastores import DatastoreLocation, validate

        check_type(workspace, Workspace, "datastore workspace")
        check_data_name(name, "datastore name")
        existing = next((d for d in workspace._backend.list_datastores() if d["name"] == name), None)
        if existing is not None and not overwrite:
            raise UserInputError(f"datastore {name!r} is already registered; pass overwrite=True to replace it")
        if not skip_validation:
            validate(DatastoreLocation(name, kind, config, secrets), create_if_not_exists)
        # replacing the default keeps it the default: the workspace always has one
        default = bool(existing and existing.get("is_default"))
        workspace._backend.register_datastore(name, kind, config, default, secrets)
        return cls(workspace, name)

    def unregister(self) -> None:
        """Forget the datastore (its data stays where it is). The default datastore cannot go."""
        if self.is_default:
            raise UserInputError(f"datastore {self.name!r} is the workspace default; make another one the "
                                 f"default first")
        self.workspace._backend.unregister_datastore(self.name)

    def set_as_default(self) -> None:
        """Make this the workspace's default: step outputs and run logs go here from now on (for an
        object store, logs are also kept in a local cache while steps run)."""
        self.workspace._backend.make_default_datastore(self.name)
        self.is_default = True

    def _location(self) -> Any:
        return self.workspace._backend.datastore_location(self.name)

    def upload(self, src_dir: str | os.PathLike[str], target_path: str | None = None, overwrite: bool = False,
               show_progress: bool = True) -> DataPath:
        """Upload every file under ``src_dir`` to ``target_path`` in the datastore (in parallel).
        Files that exist are skipped unless ``overwrite``."""
        from cairn.storage.datastores import upload

        src = Path(src_dir)
        if not src.is_dir():
            raise PathNotFoundError(f"cannot upload {str(src_dir)!r}: no such folder")
        files = [(str(p), "/".join(filter(None, [target_path or "", p.relative_to(src).as_posix()])))
                 for p in sorted(src.rglob("*")) if p.is_file()]
        upload(self._location(), files, overwrite, show_progress)
        return DataPath(self, target_path or "")

    def upload_files(self, files: list[str | os.PathLike[str]], relative_root: str | None = None,
                     target_path: str | None = None, overwrite: bool = False, show_progress: bool = True) -> DataPath:
        """Upload the given files; their paths relative to ``relative_root`` (default: their own folder)
        are kept under ``target_path``."""
        from cairn.storage.datastores import upload

        if not isinstance(files, (list, tuple)):
            raise UserInputError(f"files must be a list of file paths, not {type(files).__name__}")
        pairs = []
        for f in files:
            p = Path(f)
            try:
                rel = p.relative_to(relative_root).as_posix() if relative_root else p.name
            except ValueError:
                raise UserInputError(f"file {str(p)!r} is not under relative_root {str(relative_root)!r}") from None
            pairs.append((str(p), "/".join(filter(None, [target_path or "", rel]))))
        upload(self._location(), pairs, overwrite, show_progress)
        return DataPath(self, target_path or "")

    def download(self, target_path: str | os.PathLike[str], prefix: str | None = None, overwrite: bool = False,
                 show_progress: bool = True) -> int:
        """Download the files under ``prefix`` into ``target_path``; returns how many were downloaded."""
        from cairn.storage.datastores import download

        return download(self._location(), str(target_path), prefix, overwrite, show_progress).files

    def path(self, path: str = "") -> DataPath:
        """A reference to ``path`` in this datastore (for datasets and arguments)."""
        return DataPath(self, path)

    @property
    def root(self) -> str:
        """The local folder behind a local datastore."""
        return self.workspace._backend.datastore_root(self.name)

    def local_path(self, relative_path: str = "") -> Path:
        """The local path of ``relative_path`` inside the datastore (refusing ``..`` escapes)."""
        return confined(self.root, relative_path, f"path in datastore {self.name!r}") if relative_path else Path(self.root)

    def __repr__(self) -> str:  # never credentials
        return f"Datastore(name={self.name!r}, type={self.datastore_type!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Datastore) and (other.workspace, other.name) == (self.workspace, self.name)

    def __hash__(self) -> int:
        return hash((self.workspace.location, self.name))


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserInputError(f"{what} must be a non-empty string, not {value!r}" if not isinstance(value, str)
                             else f"{what} must not be empty")
    return value


class DataPath:
    """A path inside a datastore: ``datastore.path("train/")``."""

    def __init__(self, datastore: Datastore, path_on_datastore: str) -> None:
        from cairn.storage.datastores import remote_path

        remote_path("", path_on_datastore)  # refuses '..' and absolute paths
        self.datastore = datastore
        self.path_on_datastore = path_on_datastore

    def __repr__(self) -> str:
        return f"DataPath(datastore={self.datastore.name!r}, path={self.path_on_datastore!r})"
