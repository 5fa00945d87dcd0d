"""Datasets as users write them: ``Dataset.File.from_files`` and ``Dataset.Tabular.from_*``,
the registry, and consumption in steps (``as_named_input(...).as_download()/.as_mount()``)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cairn.core.errors import NotFoundError, PathNotFoundError, UserInputError
from cairn.core.names import check_data_name, check_type
from cairn.data import datasets as ds_core
from cairn.storage.paths import check_relative

if TYPE_CHECKING:
    from cairn.client.workspace import Workspace


def _paths_of(path: Any) -> tuple[list[dict[str, str]], Workspace | None]:
    """Normalise every accepted form of ``path`` to definition entries; also return the workspace."""
    from cairn.client.datastore import DataPath, Datastore
    from cairn.storage.datastores import remote_path

    items = path if isinstance(path, list) else [path]
    if not items:
        raise UserInputError("path must name at least one (datastore, 'relative/path') or URL")
    entries: list[dict[str, str]] = []
    workspace = None
    for item in items:
        if isinstance(item, DataPath):
            item = (item.datastore, item.path_on_datastore)
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Datastore):
            store, rel = item
            check_type(rel, str, "the path in (datastore, path)")
            remote_path("", rel.lstrip("/") if rel.startswith("/") else rel)  # refuses '..'
            entries.append({"datastore": store.name, "path": rel.strip("/")})
            workspace = store.workspace
        elif isinstance(item, str) and item.startswith(("http://", "https://")):
            entries.append({"url": item})
        else:
            raise UserInputError(f"path item {item!r} is not valid: use (datastore, 'relative/path'), "
                                 f"datastore.path('relative/path'), a list of them, or an http(s) URL")
    return entries, workspace


class _DatasetBase:
    kind = ""

    def __init__(self, definition: dict[str, Any], workspace: Workspace | None,
                 registration: dict[str, Any] | None = None) -> None:
        self._definition = definition
        self._workspace = workspace
        self._registration = registration
        self._files: list[ds_core.ResolvedFile] | None = None

    # -- identity ----------------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        return self._registration["name"] if self._registration else None

    @property
    def version(self) -> int | None:
        return self._registration["version"] if self._registration else None

    @property
    def id(self) -> str | None:
        return self._registration["id"] if self._registration else None

    @property
    def description(self) -> str | None:
        return self._registration.get("description") if self._registration else None

    @property
    def tags(self) -> dict[str, str]:
        return json.loads(self._registration["tags"]) if self._registration else {}

    @property
    def definition(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._definition))

    def __repr__(self) -> str:
        label = f"name={self.name!r}, version={self.version}" if self.name else f"paths={ds_core.describe_paths(self._definition)!r}"
        return f"{type(self).__name__}({label})"

    # -- resolution ----------------------------------------------------------------------------

    def _locate(self, name: str) -> Any:
        if self._workspace is None:
            raise UserInputError("this dataset names a datastore but has no workspace")
        return self._workspace._backend.datastore_location(name)

    def _resolve(self, refresh: bool = False) -> list[ds_core.ResolvedFile]:
        if self._files is None or refresh:
            self._files = ds_core.resolve_files(self._definition, self._locate)
        return self._files

    def _validate(self) -> None:
        if not self._resolve():
            for entry in self._definition.get("paths", []):  # a local datastore whose folder is gone says so
                store = entry.get("datastore")
                location = self._locate(store) if store else None
                if location is not None and location.kind == "local" and not os.path.isdir(location.config["path"]):
                    raise PathNotFoundError(
                        f"datastore {store!r} is the folder {location.config['path']!r}, which does not exist (moved?): "
                        f"register it again where it is now, with overwrite=True")
            raise PathNotFoundError(f"the dataset's path(s) match no file: {ds_core.describe_paths(self._definition)} "
                                    f"(an empty folder, or a glob that matches nothing); check the path, or pass "
                                    f"validate=False to create it anyway")

    @property
    def content_digest(self) -> str:
        """A digest of the files' listing (path, size, ETag/checksum): new data, new digest."""
        return ds_core.content_digest(self._resolve(refresh=True))

    # -- registry ------------------------------------------------------------------------------

    def register(self, workspace: Workspace, name: str, description: str | None = None,
                 tags: dict[str, Any] | None = None, create_new_version: bool = False) -> _DatasetBase:
        from cairn.client.workspace import Workspace

        check_type(workspace, Workspace, "register workspace")
        check_data_name(name, "dataset name")
        if tags is not None and not isinstance(tags, dict):
            raise UserInputError(f"tags must be a dict, not {type(tags).__name__}")
        self._workspace = self._workspace or workspace
        files = self._resolve(refresh=True)
        try:
            row = workspace._backend.register_dataset(
                **ds_core.version_record(self._definition, files), name=name, description=description,
                tags={str(k): str(v) for k, v in (tags or {}).items()}, create_new_version=create_new_version)
        except ValueError as exc:
            raise UserInputError(str(exc)) from None
        return _from_row(workspace, row)

    # -- consumption in steps ------------------------------------------------------------------

    def as_named_input(self, name: str) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(check_data_name(name, "dataset input name"), self, "direct")


class FileDataset(_DatasetBase):
    kind = "file"

    def to_path(self) -> list[str]:
        """The files' paths relative to the dataset's root (as the store lists them now)."""
        return sorted(f.relative for f in self._resolve(refresh=True))

    def download(self, target_path: str | os.PathLike[str] | None = None, overwrite: bool = False) -> list[str]:
        """Copy the files into ``target_path`` (a new temporary folder if None); returns their paths."""
        dest = Path(target_path) if target_path is not None else Path(tempfile.mkdtemp(prefix="cairn-ds-"))
        files = self._resolve(refresh=True)  # a dataset names files in a store: those it has now
        clashes = [f.relative for f in files if (dest / f.relative).exists()]
        if clashes and not overwrite:
            raise FileExistsError(f"{len(clashes)} file(s) already exist in {dest} (e.g. {clashes[0]!r}); pass "
                                  f"overwrite=True to replace them")
        ds_core.fetch(files, self._locate, dest)
        return [str(dest / f.relative) for f in sorted(files, key=lambda f: f.relative)]

    @contextlib.contextmanager
    def mount(self, mount_point: str | os.PathLike[str] | None = None) -> Iterator[str]:
        """A folder with the dataset's files for the ``with`` block. On a local datastore it is the
        data's own folder (no copy); otherwise a temporary copy that is removed afterwards."""
        own = ds_core.local_folder(self._definition, self._locate) if mount_point is None else None
        if own is not None and Path(own).is_dir():
            yield own
            return
        folder = Path(mount_point) if mount_point is not None else Path(tempfile.mkdtemp(prefix="cairn-mount-"))
        try:
            ds_core.fetch(self._resolve(refresh=True), self._locate, folder)
            yield str(folder)
        finally:
            if mount_point is None:
                shutil.rmtree(folder, ignore_errors=True)


class TabularDataset(_DatasetBase):
    kind = "tabular"

    def to_pandas_dataframe(self) -> Any:
        return ds_core.read_table(self._definition, self._resolve(refresh=True), self._locate)

    def _derived(self, op: str, arg: Any) -> TabularDataset:
        definition = self.definition
        definition["transforms"] = [*definition.get("transforms", []), [op, arg]]
        return TabularDataset(definition, self._workspace)

    def take(self, count: int) -> TabularDataset:
        _count(count, "take")
        return self._derived("take", count)

    def skip(self, count: int) -> TabularDataset:
        _count(count, "skip")
        return self._derived("skip", count)

    def keep_columns(self, columns: str | list[str]) -> TabularDataset:
        return self._derived("keep_columns", _columns(columns))

    def drop_columns(self, columns: str | list[str]) -> TabularDataset:
        return self._derived("drop_columns", _columns(columns))

    def random_split(self, percentage: float, seed: int | None = None) -> tuple[TabularDataset, TabularDataset]:
        """Two datasets: about ``percentage`` of the rows, and the rest (the same seed, the same split)."""
        if isinstance(percentage, bool) or not isinstance(percentage, (int, float)) or not 0 < percentage < 1:
            raise UserInputError(f"percentage must be a number between 0 and 1 (exclusive), not {percentage!r}")
        seed = 0 if seed is None else seed
        return self._derived("split", [float(percentage), seed, True]), self._derived("split", [float(percentage), seed, False])


def _count(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserInputError(f"{what} expects a count of rows (an int >= 0), not {value!r}")


def _columns(columns: Any) -> list[str]:
    cols = [columns] if isinstance(columns, str) else columns
    if not isinstance(cols, list) or not cols or not all(isinstance(c, str) for c in cols):
        raise UserInputError(f"columns must be a column name or a non-empty list of names, not {columns!r}")
    return cols


class DatasetConsumptionConfig:
    """A dataset as a step input: ``direct`` (the Dataset object), ``mount`` or ``download`` (a folder)."""

    def __init__(self, name: str, dataset: _DatasetBase, mode: str, path_on_compute: str | None = None) -> None:
        self.name = name
        self.dataset = dataset
        self.mode = mode
        self.path_on_compute = check_relative(path_on_compute, f"path_on_compute of input {name!r}")

    def as_download(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(self.name, self.dataset, "download", path_on_compute)

    def as_mount(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(self.name, self.dataset, "mount", path_on_compute)

    def __repr__(self) -> str:
        return f"DatasetConsumptionConfig({self.name!r}, mode={self.mode!r})"


class _FileFactory:
    @staticmethod
    def from_files(path: Any, validate: bool = True) -> FileDataset:
        entries, workspace = _paths_of(path)
        ds = FileDataset({"kind": "file", "paths": entries}, workspace)
        if validate:
            ds._validate()
        return ds


class _TabularFactory:
    @staticmethod
    def from_delimited_files(path: Any, validate: bool = True, include_path: bool = False,
                             infer_column_types: bool = True, set_column_types: dict[str, str] | None = None,
                             separator: str = ",", header: bool = True, support_multi_line: bool = False,
                             encoding: str = "utf8", on_error: str = "fail", **ignored: Any) -> TabularDataset:
        """Delimited text files. ``on_error='skip'`` leaves out rows with the wrong number of fields
        (the default, 'fail', names the file and line of the first one)."""
        if on_error not in ("fail", "skip"):
            raise UserInputError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
        if not isinstance(separator, str) or len(separator) != 1:
            raise UserInputError(f"separator must be one character, not {separator!r}")
        header_ok = header if isinstance(header, bool) else str(header).lower() not in ("no_header", "none", "false")
        options = {"include_path": include_path, "infer_column_types": infer_column_types,
                   "set_column_types": set_column_types or {}, "separator": separator, "header": header_ok,
                   "support_multi_line": support_multi_line, "encoding": encoding, "on_error": on_error}
        return _tabular(path, "delimited", options, validate)

    @staticmethod
    def from_parquet_files(path: Any, validate: bool = True, include_path: bool = False,
                           set_column_types: dict[str, str] | None = None, **ignored: Any) -> TabularDataset:
        return _tabular(path, "parquet", {"include_path": include_path, "set_column_types": set_column_types or {}},
                        validate)

    @staticmethod
    def from_json_lines_files(path: Any, validate: bool = True, include_path: bool = False,
                              set_column_types: dict[str, str] | None = None, **ignored: Any) -> TabularDataset:
        return _tabular(path, "json_lines", {"include_path": include_path, "set_column_types": set_column_types or {}},
                        validate)


def _tabular(path: Any, fmt: str, options: dict[str, Any], validate: bool) -> TabularDataset:
    entries, workspace = _paths_of(path)
    ds = TabularDataset({"kind": "tabular", "paths": entries, "format": fmt, "options": options}, workspace)
    if validate:
        ds._validate()
    return ds


def _from_row(workspace: Workspace, row: dict[str, Any]) -> _DatasetBase:
    definition = json.loads(row["definition"])
    cls = FileDataset if row["kind"] == "file" else TabularDataset
    return cls(definition, workspace, row)


class Dataset:
    """Entry point, as in Azure ML: ``Dataset.File``, ``Dataset.Tabular`` and the registry."""

    File = _FileFactory
    Tabular = _TabularFactory

    @staticmethod
    def get_by_name(workspace: Workspace, name: str, version: int | str = "latest") -> _DatasetBase:
        check_type(name, str, "dataset name")
        wanted = None if version == "latest" else version
        if isinstance(wanted, str) and wanted.isdigit():  # Azure ML accepts "2" as well as 2
            wanted = int(wanted)
        if wanted is not None and (isinstance(wanted, bool) or not isinstance(wanted, int)):
            raise UserInputError(f"version must be 'latest' or a version number, not {version!r}")
        row = workspace._backend.get_dataset(name=name, version=wanted)
        if row is None:
            known = ", ".join(sorted(r["name"] for r in workspace._backend.list_datasets())) or "none"
            raise NotFoundError(f"no dataset {name!r}" + (f" version {version}" if wanted else "") +
                                f" in this workspace (registered: {known})")
        return _from_row(workspace, row)

    @staticmethod
    def get_by_id(workspace: Workspace, id: str) -> _DatasetBase:  # noqa: A002 (Azure ML's name)
        row = workspace._backend.get_dataset(dataset_id=id)
        if row is None:
            raise NotFoundError(f"no dataset with id {id!r} in this workspace")
        return _from_row(workspace, row)

    @staticmethod
    def get_lineage(workspace: Workspace, name: str) -> list[dict[str, Any]]:
        """Each version of dataset ``name``: its digest, the step runs that produced it and those
        that consumed it."""
        check_type(name, str, "dataset name")
        return workspace._backend.dataset_lineage(name)

    @staticmethod
    def get_all(workspace: Workspace) -> dict[str, _DatasetBase]:
        return {r["name"]: _from_row(workspace, r) for r in workspace._backend.list_datasets()}
