"""Environment and RunConfiguration as users write them. Isolated uv-built environments come
with the environments issue; this one runs steps with the current or a given interpreter."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from cairn.core.errors import UserInputError
from cairn.core.names import check_type
from cairn.environments.spec import current_interpreter_spec, spec_digest


class PythonSection:
    def __init__(self) -> None:
        self.user_managed_dependencies = True
        self.interpreter_path: str | None = None
        self.conda_dependencies: Any = None


class DockerSection:
    def __init__(self) -> None:
        self.enabled = False
        self.base_image: str | None = None


class Environment:
    """A named description of where a step's Python runs."""

    def __init__(self, name: str) -> None:
        check_type(name, str, "Environment name")
        if not name.strip():
            raise UserInputError("Environment name must not be empty")
        self.name = name
        self.python = PythonSection()
        self.docker = DockerSection()
        self.environment_variables: dict[str, str] = {}

    def to_spec(self) -> dict[str, Any]:
        spec = current_interpreter_spec()
        spec["name"] = self.name
        if self.python.interpreter_path is not None:
            if not isinstance(self.python.interpreter_path, (str, os.PathLike)):
                raise UserInputError(f"environment {self.name!r}: python.interpreter_path must be a path, not "
                                     f"{type(self.python.interpreter_path).__name__}")
            path = Path(self.python.interpreter_path)
            if not path.is_file() or not os.access(path, os.X_OK):
                raise UserInputError(f"environment {self.name!r}: interpreter_path {str(path)!r} is not an "
                                     f"executable file")
            spec["interpreter_path"] = str(path)
            spec["kind"] = "interpreter"
        if not isinstance(self.environment_variables, dict):
            raise UserInputError(f"environment {self.name!r}: environment_variables must be a dict")
        spec["environment_variables"] = {str(k): str(v) for k, v in self.environment_variables.items()}
        if self.docker.enabled or self.python.conda_dependencies is not None or \
                not self.python.user_managed_dependencies:
            raise UserInputError(
                f"environment {self.name!r} asks for docker or managed dependencies, which this version of "
                f"Cairn cannot build yet; set python.user_managed_dependencies = True and leave docker "
                f"disabled to use an existing interpreter")
        return spec

    @property
    def digest(self) -> str:
        return spec_digest(self.to_spec())

    def __repr__(self) -> str:
        return f"Environment(name={self.name!r})"


class RunConfiguration:
    """How a step runs: target, environment, extra environment variables, time limit."""

    def __init__(self, script: str | None = None, arguments: Any = None, framework: str | None = None,
                 communicator: str | None = None, conda_dependencies: Any = None) -> None:
        self.script = script
        self.arguments = arguments
        self.target: Any = None
        self.environment = Environment("cairn-default")
        self.environment_variables: dict[str, str] = {}
        self.max_run_duration_seconds: float | None = None
        self.node_count = 1

    def validate(self, step_name: str) -> list[str]:
        problems = []
        if not isinstance(self.environment, Environment):
            problems.append(f"step {step_name!r}: runconfig.environment must be an Environment, not "
                            f"{type(self.environment).__name__}")
        if not isinstance(self.environment_variables, dict):
            problems.append(f"step {step_name!r}: runconfig.environment_variables must be a dict")
        m = self.max_run_duration_seconds
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
                              or m <= 0):
            problems.append(f"step {step_name!r}: runconfig.max_run_duration_seconds must be a positive "
                            f"number of seconds, not {m!r}")
        t = self.target
        if t is not None and not isinstance(t, str) and not isinstance(getattr(t, "name", None), str):
            problems.append(f"step {step_name!r}: runconfig.target must be a ComputeTarget or a target name, "
                            f"not {type(t).__name__}")
        if not isinstance(self.node_count, int) or self.node_count != 1:
            problems.append(f"step {step_name!r}: runconfig.node_count={self.node_count!r}: local compute "
                            f"runs a step on one node")
        return problems

    def __repr__(self) -> str:
        return f"RunConfiguration(target={self.target!r}, environment={self.environment!r})"
