"""PipelineData: an intermediate output of one step, consumed by others."""

from __future__ import annotations

from typing import Any

from cairn.core.errors import UserInputError
from cairn.core.names import check_data_name, check_type
from cairn.storage.paths import check_relative

MODES = ("mount", "download", "direct")


class PipelineData:
    """A folder one step writes and later steps read.

    Args:
        name: letters, digits and underscores; names the data in the pipeline.
        datastore: where it is committed (a Datastore, or its name); default: the workspace default.
        output_name: the name of the output on the producing step run (default: ``name``).
    """

    def __init__(self, name: str, datastore: Any = None, output_name: str | None = None,
                 output_mode: str = "mount", output_path_on_compute: str | None = None,
                 is_directory: bool = True, **ignored: Any) -> None:
        self.name = check_data_name(name, "PipelineData name")
        self.output_name = (check_data_name(output_name, "PipelineData output_name")
                            if output_name is not None else name)
        if datastore is not None and not isinstance(datastore, str) and not hasattr(datastore, "name"):
            raise UserInputError(f"PipelineData {name!r}: datastore must be a Datastore or a datastore "
                                 f"name, not {type(datastore).__name__}")
        self.datastore = datastore
        self._producers: list[Any] = []  # the steps that list it in outputs
        self.output_mode = output_mode
        self.output_path_on_compute = output_path_on_compute
        self.is_directory = is_directory

    @property
    def datastore_name(self) -> str | None:
        if self.datastore is None:
            return None
        return self.datastore if isinstance(self.datastore, str) else self.datastore.name

    def as_input(self, input_name: str | None = None) -> PipelineDataInput:
        return PipelineDataInput(self, input_name, "mount")

    def as_mount(self, input_name: str | None = None) -> PipelineDataInput:
        return PipelineDataInput(self, input_name, "mount")

    def as_download(self, input_name: str | None = None, path_on_compute: str | None = None,
                    overwrite: bool = False) -> PipelineDataInput:
        return PipelineDataInput(self, input_name, "download", path_on_compute)

    def __repr__(self) -> str:
        return f"PipelineData(name={self.name!r}, datastore={self.datastore_name!r})"


class PipelineDataInput:
    """A binding of PipelineData as a step input (``as_input``/``as_mount``/``as_download``).

    On local compute each mode is the committed folder's own path: no copy is made.
    """

    def __init__(self, data: PipelineData, input_name: str | None, mode: str,
                 path_on_compute: str | None = None, read_as: dict[str, Any] | None = None) -> None:
        check_type(data, PipelineData, "data")
        self.data = data
        self.input_name = check_data_name(input_name, "input_name") if input_name is not None else data.name
        if mode not in MODES:
            raise UserInputError(f"input mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.path_on_compute = check_relative(path_on_compute, f"path_on_compute of input {self.input_name!r}")
        self.read_as = read_as

    def as_download(self, path_on_compute: str | None = None) -> PipelineDataInput:
        return PipelineDataInput(self.data, self.input_name, "download", path_on_compute, self.read_as)

    def as_mount(self) -> PipelineDataInput:
        return PipelineDataInput(self.data, self.input_name, "mount", None, self.read_as)

    def __repr__(self) -> str:
        return f"PipelineDataInput({self.data.name!r}, mode={self.mode!r})"
