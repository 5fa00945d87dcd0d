"""OutputFileDatasetConfig: a step output written to a chosen datastore path, optionally
registered as a dataset when the step completes, and readable downstream as a tabular dataset."""

from __future__ import annotations

import uuid
from typing import Any

from cairn.core.errors import UserInputError
from cairn.core.names import check_type
from cairn.data.pipeline_data import PipelineData, PipelineDataInput


class OutputFileDatasetConfig(PipelineData):
    """An output folder of a step. ``destination=(datastore, "path/{run-id}/{output-name}")``
    chooses where it is committed (any datastore: local, Azure Blob, S3)."""

    def __init__(self, name: str | None = None, destination: tuple[Any, str] | None = None,
                 source: str | None = None, partition_format: str | None = None) -> None:
        datastore, path = None, None
        if destination is not None:
            if not isinstance(destination, tuple) or len(destination) != 2 or not isinstance(destination[1], str):
                raise UserInputError("destination must be (datastore, 'path/in/datastore'), e.g. "
                                     "(ws.get_default_datastore(), 'outputs/{run-id}/{output-name}')")
            datastore, path = destination
            from cairn.storage.datastores import remote_path

            remote_path("", path.strip("/") or ".")  # refuses '..' and absolute paths
        super().__init__(name if name is not None else f"output_{uuid.uuid4().hex[:8]}", datastore=datastore)
        self.destination_path: str | None = path.strip("/") if path else None
        self.upload_overwrite = False
        self.registration: dict[str, Any] | None = None
        self.read_as: dict[str, Any] | None = None  # set on the tabular view

    def as_upload(self, overwrite: bool = False, source_globs: Any = None) -> OutputFileDatasetConfig:
        """Commit by uploading when the step ends; ``overwrite=False`` fails the step if the
        destination already holds files."""
        check_type(overwrite, bool, "overwrite")
        self.upload_overwrite = overwrite
        return self

    def as_mount(self, input_name: str | None = None) -> Any:  # type: ignore[override]
        """As an output, mount mode is how every local output is written: nothing to change."""
        return self

    def register_on_complete(self, name: str, description: str | None = None,
                             tags: dict[str, Any] | None = None) -> OutputFileDatasetConfig:
        from cairn.core.names import check_data_name

        check_data_name(name, "dataset name")
        if tags is not None and not isinstance(tags, dict):
            raise UserInputError(f"tags must be a dict, not {type(tags).__name__}")
        self.registration = {"name": name, "description": description,
                             "tags": {str(k): str(v) for k, v in (tags or {}).items()}}
        return self

    def read_delimited_files(self, include_path: bool = False, infer_column_types: bool = True,
                             set_column_types: dict[str, str] | None = None, separator: str = ",",
                             header: bool = True, **ignored: Any) -> OutputTabularDatasetConfig:
        return OutputTabularDatasetConfig(self, {"format": "delimited", "options": {
            "include_path": include_path, "infer_column_types": infer_column_types,
            "set_column_types": set_column_types or {}, "separator": separator, "header": header,
            "support_multi_line": False, "encoding": "utf8"}})

    def read_parquet_files(self, include_path: bool = False, set_column_types: dict[str, str] | None = None,
                           **ignored: Any) -> OutputTabularDatasetConfig:
        return OutputTabularDatasetConfig(self, {"format": "parquet", "options": {
            "include_path": include_path, "set_column_types": set_column_types or {}}})

    def __repr__(self) -> str:
        return f"OutputFileDatasetConfig(name={self.name!r}, datastore={self.datastore_name!r})"


class OutputTabularDatasetConfig:
    """The same output, read downstream as a TabularDataset (``input_datasets[name]``)."""

    def __init__(self, output: OutputFileDatasetConfig, read_as: dict[str, Any]) -> None:
        self.output = output
        self.read_as = read_as

    @property
    def name(self) -> str:
        return self.output.name

    def register_on_complete(self, name: str, description: str | None = None,
                             tags: dict[str, Any] | None = None) -> OutputTabularDatasetConfig:
        self.output.register_on_complete(name, description, tags)
        assert self.output.registration is not None
        self.output.registration["read_as"] = self.read_as
        return self

    def as_input(self, name: str | None = None) -> PipelineDataInput:
        return PipelineDataInput(self.output, name, "direct", read_as=self.read_as)

    def __repr__(self) -> str:
        return f"OutputTabularDatasetConfig(name={self.name!r})"
