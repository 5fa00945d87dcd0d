"""PythonScriptStep: run a Python script as one step of a pipeline."""

from __future__ import annotations

import os
import warnings
from pathlib import PurePosixPath
from typing import Any

from cairn.client.dataset import DatasetConsumptionConfig
from cairn.client.environment import RunConfiguration
from cairn.core.errors import UserInputError
from cairn.core.names import check_step_name, check_type
from cairn.data.output_dataset import OutputFileDatasetConfig, OutputTabularDatasetConfig
from cairn.data.pipeline_data import PipelineData, PipelineDataInput
from cairn.storage.paths import real_path

_SCALARS = (str, int, float, bool)


class PythonScriptStep:
    """Runs ``script_name`` from ``source_directory`` with ``arguments``.

    PipelineData objects in ``arguments`` become paths at run time: one listed in ``outputs`` is an
    output, any other is an input (inputs referenced only in arguments are inferred).
    """

    def __init__(self, script_name: str, name: str | None = None, arguments: list[Any] | None = None,
                 compute_target: Any = None, runconfig: RunConfiguration | None = None,
                 runconfig_pipeline_params: Any = None, inputs: list[Any] | None = None,
                 outputs: list[PipelineData] | None = None, params: dict[str, Any] | None = None,
                 source_directory: str | os.PathLike[str] | None = None, allow_reuse: bool = True,
                 version: str | None = None, hash_paths: list[str] | None = None) -> None:
        if name is not None:
            check_step_name(name)
        who = f"step {name!r}" if name is not None else "PythonScriptStep"
        check_type(script_name, str, f"{who}: script_name")
        rel = PurePosixPath(script_name.replace("\\", "/"))
        if not script_name.strip() or rel.is_absolute() or ".." in rel.parts:
            raise UserInputError(f"{who}: script_name {script_name!r} must be a path relative to "
                                 f"source_directory, like 'train.py' or 'scripts/train.py'")
        self.script_name = script_name
        self.name = check_step_name(name if name is not None else script_name)
        who = f"step {self.name!r}"
        if arguments is not None and not isinstance(arguments, (list, tuple)):
            raise UserInputError(f"{who}: arguments must be a list, not {type(arguments).__name__}")
        self.arguments = list(arguments or [])
        for i, a in enumerate(self.arguments):
            if isinstance(a, OutputTabularDatasetConfig):
                self.arguments[i] = a = a.as_input()
            if not isinstance(a, (*_SCALARS, os.PathLike, PipelineData, PipelineDataInput, DatasetConsumptionConfig)):
                raise UserInputError(f"{who}: arguments[{i}] is a {type(a).__name__}; allowed are str, int, "
                                     f"float, bool, PipelineData and its as_input()/as_download()/as_mount(), "
                                     f"and dataset.as_named_input(name) (with .as_download()/.as_mount())")
        if compute_target is not None and not isinstance(compute_target, str) and not hasattr(compute_target, "name"):
            raise UserInputError(f"{who}: compute_target must be a ComputeTarget or a target name, not "
                                 f"{type(compute_target).__name__}")
        self.compute_target = compute_target
        if runconfig is not None and not isinstance(runconfig, RunConfiguration):
            raise UserInputError(f"{who}: runconfig must be a RunConfiguration, not {type(runconfig).__name__}")
        self.runconfig = runconfig or RunConfiguration()
        if inputs is not None and not isinstance(inputs, (list, tuple)):
            raise UserInputError(f"{who}: inputs must be a list, not {type(inputs).__name__}")
        self.inputs = [x.as_input() if isinstance(x, OutputTabularDatasetConfig) else x for x in (inputs or [])]
        for i, x in enumerate(self.inputs):
            if not isinstance(x, (PipelineData, PipelineDataInput, DatasetConsumptionConfig)):
                raise UserInputError(f"{who}: inputs[{i}] is a {type(x).__name__}; allowed are PipelineData "
                                     f"and its as_input()/as_download()/as_mount(), and "
                                     f"dataset.as_named_input(name)")
        if outputs is not None and not isinstance(outputs, (list, tuple)):
            raise UserInputError(f"{who}: outputs must be a list, not {type(outputs).__name__}")
        self.outputs = list(outputs or [])
        # An OutputFileDatasetConfig passed only in arguments is an output of this step (Azure ML v1)
        for a in self.arguments:
            if isinstance(a, OutputFileDatasetConfig) and not any(a is o for o in self.outputs) \
                    and not any(a is x or getattr(x, "data", None) is a for x in self.inputs or []):
                self.outputs.append(a)
        for i, o in enumerate(self.outputs):
            if not isinstance(o, PipelineData):
                raise UserInputError(f"{who}: outputs[{i}] is a {type(o).__name__}; outputs must be PipelineData")
        if params is not None and not isinstance(params, dict):
            raise UserInputError(f"{who}: params must be a dict of name -> value, not {type(params).__name__}")
        self.params = dict(params or {})
        for k, v in self.params.items():
            if not isinstance(k, str) or not k.isidentifier():
                raise UserInputError(f"{who}: param name {k!r} must be an identifier (it becomes an "
                                     f"environment variable)")
            if not isinstance(v, _SCALARS):
                raise UserInputError(f"{who}: param {k!r} must be a str, int, float or bool, not {type(v).__name__}")
        if source_directory is not None and not isinstance(source_directory, (str, os.PathLike)):
            raise UserInputError(f"{who}: source_directory must be a folder path, not "
                                 f"{type(source_directory).__name__}")
        try:
            self.source_directory = real_path(source_directory if source_directory is not None else ".")
        except (ValueError, OSError) as exc:
            raise UserInputError(f"{who}: source_directory {source_directory!r} is not a usable path: {exc}") from None
        check_type(allow_reuse, bool, f"{who}: allow_reuse")
        self.allow_reuse = allow_reuse
        if version is not None and not isinstance(version, str):
            raise UserInputError(f"{who}: version must be a str, not {type(version).__name__}")
        self.version = version
        if hash_paths is not None and (not isinstance(hash_paths, (list, tuple)) or
                                       not all(isinstance(h, str) for h in hash_paths)):
            raise UserInputError(f"{who}: hash_paths must be a list of paths (and is no longer needed)")
        if hash_paths:
            warnings.warn("hash_paths is no longer needed: every file of source_directory is part of the "
                          "snapshot digest", DeprecationWarning, stacklevel=2)
        self._run_after: list[PythonScriptStep] = []
        for o in self.outputs:
            o._producers = [*getattr(o, "_producers", []), self]

    def run_after(self, step: PythonScriptStep) -> None:
        """Start this step only after ``step`` has finished."""
        if not isinstance(step, PythonScriptStep):
            raise UserInputError(f"run_after expects a step, not {type(step).__name__}")
        self._run_after.append(step)

    # -- compiled view ---------------------------------------------------------------------

    def input_bindings(self) -> list[PipelineDataInput]:
        """Declared inputs plus inputs inferred from arguments: one binding per distinct data and name.

        A bare PipelineData in ``arguments`` that is also in ``outputs`` is the output, not an input.
        """
        found: list[PipelineDataInput] = []
        from_args = [a for a in self.arguments if isinstance(a, (PipelineData, PipelineDataInput))
                     and not (isinstance(a, PipelineData) and any(a is o for o in self.outputs))]
        given = [*(x for x in self.inputs if not isinstance(x, DatasetConsumptionConfig)), *from_args]
        explicit = [c for c in given if isinstance(c, PipelineDataInput)]
        for c in given:
            if isinstance(c, PipelineData):  # a bare one names the input: as given elsewhere, else as_input()
                if any(b.data is c and b.input_name == c.name for b in explicit):
                    continue
                c = c.as_input()
            # the same data given another way under the same name is kept too: validation then says
            # the name is taken twice (never one of the two picked silently)
            if not any(b.data is c.data and b.input_name == c.input_name and _how(b) == _how(c) for b in found):
                found.append(c)
        return found

    def dataset_bindings(self) -> list[DatasetConsumptionConfig]:
        """Dataset inputs, declared or in arguments (one per name and way of giving it: another
        dataset, or the same one given another way, under a taken name is kept for validation to
        refuse)."""
        given = [c for c in [*self.inputs, *self.arguments] if isinstance(c, DatasetConsumptionConfig)]
        found: list[DatasetConsumptionConfig] = []
        for c in given:
            if c.mode == "direct" and any(d.mode != "direct" and d.name == c.name and _definition(d) == _definition(c)
                                          for d in given):
                continue  # a named input as such refers to the same one given as mount or download
            if not any(d.name == c.name and _how(d) == _how(c) and _definition(d) == _definition(c) for d in found):
                found.append(c)
        return found

    def __repr__(self) -> str:
        return f"PythonScriptStep(name={self.name!r}, script_name={self.script_name!r})"


def _how(binding: Any) -> tuple[Any, ...]:
    """How an input is given: its mode, where it goes, and as what it is read."""
    return binding.mode, getattr(binding, "path_on_compute", None), repr(getattr(binding, "read_as", None))


def _definition(consumption: DatasetConsumptionConfig) -> Any:
    return getattr(consumption.dataset, "_definition", consumption.dataset)
