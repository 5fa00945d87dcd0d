"""Environment and RunConfiguration as users write them (Azure ML SDK v1 names).

An environment is either *user-managed* (an existing interpreter, as it is; the default
environment is the interpreter Cairn runs in) or *managed*: an isolated environment that Cairn
builds with uv from its ``CondaDependencies`` into the workspace's environment cache, once per
build digest, shared by every step and run that asks for the same packages."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cairn.core.errors import NotFoundError, UserInputError
from cairn.core.names import check_environment_name, check_type, variable_problems
from cairn.environments.conda import CondaDependencies
from cairn.environments.spec import INTERPRETER, current_interpreter_spec, managed_spec, spec_digest

if TYPE_CHECKING:
    from cairn.client.workspace import Workspace

CURATED_PREFIX = "cairn-"


class PythonSection:
    def __init__(self) -> None:
        self.user_managed_dependencies = False  # as in Azure ML: Cairn builds the environment
        self.interpreter_path: str | None = None
        self.conda_dependencies: CondaDependencies | None = CondaDependencies()  # Python only, to add to


class DockerSection:
    """Recorded for targets that run containers; a target that cannot fails the step, saying so."""

    def __init__(self) -> None:
        self.enabled = False
        self.base_image: str | None = None


class Environment:
    """A named, versioned description of where a step's Python runs."""

    def __init__(self, name: str) -> None:
        self.name = check_environment_name(name)
        self.version: int | None = None
        self.python = PythonSection()
        self.docker = DockerSection()
        self.environment_variables: dict[str, str] = {}

    # -- constructors ------------------------------------------------------------------------

    @staticmethod
    def from_pip_requirements(name: str, file_path: str | os.PathLike[str]) -> Environment:
        """An environment with the packages of a pip requirements file (``-r`` includes followed)."""
        if not isinstance(file_path, (str, os.PathLike)):
            raise UserInputError(f"from_pip_requirements needs the path of a requirements file, not {file_path!r}")
        env = Environment(name)
        deps = CondaDependencies()
        for line in _requirement_lines(Path(file_path), set()):
            deps.add_pip_package(line)
        env.python.conda_dependencies = deps
        return env

    @staticmethod
    def from_conda_specification(name: str, file_path: str | os.PathLike[str]) -> Environment:
        """An environment from a conda environment YAML file (its pip section and Python version)."""
        if not isinstance(file_path, (str, os.PathLike)):
            raise UserInputError(f"from_conda_specification needs the path of a conda YAML file, not {file_path!r}")
        env = Environment(name)
        env.python.conda_dependencies = CondaDependencies(conda_dependencies_file_path=file_path)
        return env

    @staticmethod
    def from_docker_image(name: str, image: str, container_registry: Any = None,
                          conda_specification: str | os.PathLike[str] | None = None,
                          pip_requirements: str | os.PathLike[str] | None = None) -> Environment:
        """An environment that runs in a container image (recorded: a target that cannot run
        containers fails the step, saying so)."""
        if not isinstance(image, str) or not image.strip():
            raise UserInputError(f"from_docker_image needs an image name such as 'python:3.11-slim', not {image!r}")
        if conda_specification is not None:
            env = Environment.from_conda_specification(name, conda_specification)
        elif pip_requirements is not None:
            env = Environment.from_pip_requirements(name, pip_requirements)
        else:
            env = Environment(name)
        env.docker.enabled = True
        env.docker.base_image = image
        return env

    def save_to_directory(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Write ``azureml_environment.json`` and ``conda_dependencies.yml`` into ``path``."""
        import json

        folder = Path(path)
        files = [folder / "azureml_environment.json", folder / "conda_dependencies.yml"]
        if not overwrite and any(f.exists() for f in files):
            raise UserInputError(f"{folder} already holds a saved environment; pass overwrite=True to replace it")
        folder.mkdir(parents=True, exist_ok=True)
        definition = self.to_definition()
        deps = definition["python"].pop("conda_dependencies")
        definition["python"]["conda_dependencies_file"] = "conda_dependencies.yml" if deps else None
        files[0].write_text(json.dumps(definition, indent=2))
        if deps:
            self.python.conda_dependencies.save(files[1])  # type: ignore[union-attr]

    @staticmethod
    def load_from_directory(path: str | os.PathLike[str]) -> Environment:
        import json

        folder = Path(path)
        try:
            definition = json.loads((folder / "azureml_environment.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserInputError(f"{folder} holds no saved environment (azureml_environment.json)") from None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UserInputError(f"cannot read {folder / 'azureml_environment.json'}: {exc}") from None
        python = definition.get("python") if isinstance(definition, dict) else None
        conda_file = python.pop("conda_dependencies_file", None) if isinstance(python, dict) else None
        env = Environment._from_definition(definition)
        if conda_file:
            env.python.conda_dependencies = CondaDependencies(conda_dependencies_file_path=folder / conda_file)
        return env

    @staticmethod
    def from_existing_interpreter(name: str, interpreter_path: str | None = None) -> Environment:
        """A user-managed environment: ``interpreter_path`` (default: the current one) as it is."""
        env = Environment(name)
        env.python.user_managed_dependencies = True
        env.python.interpreter_path = interpreter_path
        return env

    def clone(self, new_name: str) -> Environment:
        """A copy under another name, unregistered."""
        other = copy.deepcopy(self)
        Environment.__init__(other, new_name)  # validates the name
        other.python, other.docker = copy.deepcopy(self.python), copy.deepcopy(self.docker)
        other.environment_variables = dict(self.environment_variables)
        return other

    # -- the registry ------------------------------------------------------------------------

    def register(self, workspace: Workspace) -> Environment:
        """Register this definition as the next version of its name; an identical spec to the latest
        version registers nothing new and returns that version."""
        if self.name.lower().startswith(CURATED_PREFIX):
            raise UserInputError(f"environment names starting with {CURATED_PREFIX!r} belong to Cairn's curated "
                                 f"environments; register {self.name!r} under another name (env.clone('my-env'))")
        spec = self.to_spec()
        row = workspace._backend.register_environment(self.name, self.to_definition(), spec_digest(spec))
        self.version = row["version"]
        return Environment._from_definition(row["definition"], row["version"])

    @staticmethod
    def get(workspace: Workspace, name: str, version: int | str | None = None) -> Environment:
        check_type(name, str, "environment name")
        if version is not None:
            try:
                version = int(version)
            except (TypeError, ValueError):
                raise UserInputError(f"environment version must be a whole number, not {version!r}") from None
            if not 1 <= version < 2**31:
                raise UserInputError(f"environment version must be 1 or more, not {version}")
        from cairn.environments.curated import curated_definition

        curated = curated_definition(name)
        if curated is not None:
            if version not in (None, 1):
                raise NotFoundError(f"curated environment {name!r} has only version 1")
            return Environment._from_definition(curated, 1)
        row = workspace._backend.get_environment(name, version)
        if row is None:
            known = sorted(Environment.list(workspace))
            which = f"{name!r} version {version}" if version is not None else repr(name)
            raise NotFoundError(f"environment {which} is not registered in this workspace (known: "
                                f"{', '.join(known)})")
        return Environment._from_definition(row["definition"], row["version"])

    @staticmethod
    def list(workspace: Workspace) -> dict[str, Environment]:
        """The latest version of every registered environment, and Cairn's curated ones."""
        from cairn.environments.curated import CURATED

        result = {name: Environment._from_definition(make(), 1) for name, make in CURATED.items()}
        for row in workspace._backend.list_environments():
            result[row["name"]] = Environment._from_definition(row["definition"], row["version"])
        return result

    def build(self, workspace: Workspace, show_output: bool = True) -> EnvironmentBuild:
        """Build this environment into the workspace's cache now (steps build it when they first
        need it). The build is done when this returns; ``wait_for_completion`` is for Azure ML code."""
        from cairn.environments.build import EnvironmentBuildError, check_buildable
        from cairn.environments.spec import is_managed

        spec = self.to_spec()
        if not is_managed(spec):
            raise UserInputError(f"environment {self.name!r} is user-managed: there is nothing to build")
        problems = check_buildable(spec, self.name)
        if problems:
            raise UserInputError(problems[0])
        log = (lambda line: print(line, flush=True)) if show_output else (lambda line: None)
        try:
            folder, built_now = workspace._backend.build_environment(spec, self.name, log)
        except EnvironmentBuildError as exc:
            raise UserInputError(f"environment {self.name!r} could not be built: {exc}") from None
        return EnvironmentBuild(folder, built_now)

    def build_local(self, workspace: Workspace, platform: str | None = None, **kwargs: Any) -> EnvironmentBuild:
        """Azure ML's local build: the same as ``build`` (Cairn builds environments locally)."""
        return self.build(workspace, show_output=bool(kwargs.get("show_output", True)))

    # -- the spec ----------------------------------------------------------------------------

    def to_spec(self) -> dict[str, Any]:
        """The canonical spec (its digest is part of every step fingerprint)."""
        python, docker = self.python, self.docker
        if not isinstance(python.user_managed_dependencies, bool):
            raise UserInputError(f"environment {self.name!r}: python.user_managed_dependencies must be True or "
                                 f"False, not {python.user_managed_dependencies!r}")
        deps = python.conda_dependencies
        if deps is not None and not isinstance(deps, CondaDependencies):
            raise UserInputError(f"environment {self.name!r}: python.conda_dependencies must be a "
                                 f"CondaDependencies, not {type(deps).__name__}")
        if python.user_managed_dependencies:
            if deps is not None and (deps.pip_packages or deps.conda_packages):
                raise UserInputError(
                    f"environment {self.name!r} has user_managed_dependencies=True and conda_dependencies: "
                    f"the packages would be ignored; set python.user_managed_dependencies = False to have "
                    f"Cairn build them, or drop conda_dependencies")
            spec = current_interpreter_spec()
            if python.interpreter_path is not None:
                spec["interpreter_path"] = _check_interpreter(self.name, python.interpreter_path)
                spec["kind"] = INTERPRETER
        else:
            if python.interpreter_path is not None:
                raise UserInputError(f"environment {self.name!r}: python.interpreter_path is used only with "
                                     f"python.user_managed_dependencies = True")
            deps = deps or CondaDependencies()
            from cairn.environments.spec import split_conda_packages

            index, extra = deps.index_urls()
            spec = managed_spec(python=deps.get_python_version(), pip=deps.pip_packages + deps.other_pip_options(),
                                conda=split_conda_packages(deps.conda_packages)[1], channels=deps.conda_channels,
                                index_url=index, extra_index_urls=extra)
        if not isinstance(self.environment_variables, dict):
            raise UserInputError(f"environment {self.name!r}: environment_variables must be a dict")
        problems = variable_problems(self.environment_variables, f"environment {self.name!r}")
        if problems:
            raise UserInputError("; ".join(problems))
        spec["environment_variables"] = {str(k): str(v) for k, v in self.environment_variables.items()}
        if not isinstance(docker.enabled, bool):
            raise UserInputError(f"environment {self.name!r}: docker.enabled must be True or False")
        if docker.base_image is not None and not isinstance(docker.base_image, str):
            raise UserInputError(f"environment {self.name!r}: docker.base_image must be an image name")
        spec["docker"] = {"enabled": docker.enabled, "base_image": docker.base_image}
        spec["name"] = self.name
        spec["version"] = self.version
        return spec

    @property
    def digest(self) -> str:
        return spec_digest(self.to_spec())

    @property
    def is_user_managed(self) -> bool:
        return bool(self.python.user_managed_dependencies)

    def to_definition(self) -> dict[str, Any]:
        """A JSON/YAML-able definition (what the registry and RunConfiguration.save keep)."""
        deps = self.python.conda_dependencies
        return {"name": self.name,
                "python": {"user_managed_dependencies": self.python.user_managed_dependencies,
                           "interpreter_path": self.python.interpreter_path,
                           "conda_dependencies": deps.as_dict() if isinstance(deps, CondaDependencies) else None},
                "docker": {"enabled": self.docker.enabled, "base_image": self.docker.base_image},
                "environment_variables": dict(self.environment_variables)}

    @staticmethod
    def _from_definition(d: dict[str, Any], version: int | None = None) -> Environment:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise UserInputError(f"an environment definition must be a mapping with a 'name', not {d!r}")
        _only_keys(d, {"name", "python", "docker", "environment_variables", "version"}, "the environment")
        env = Environment(d["name"])
        env.version = version
        where = f"environment {env.name!r}"
        py = _mapping(d.get("python"), f"{where}: 'python'")
        _only_keys(py, {"user_managed_dependencies", "interpreter_path", "conda_dependencies"}, f"{where}: 'python'")
        env.python.user_managed_dependencies = _flag(py.get("user_managed_dependencies", False),
                                                     f"{where}: python.user_managed_dependencies")
        env.python.interpreter_path = py.get("interpreter_path")
        if py.get("conda_dependencies") is not None:
            env.python.conda_dependencies = CondaDependencies(_underlying_structure=py["conda_dependencies"])
        dk = _mapping(d.get("docker"), f"{where}: 'docker'")
        _only_keys(dk, {"enabled", "base_image"}, f"{where}: 'docker'")
        env.docker.enabled = _flag(dk.get("enabled", False), f"{where}: docker.enabled")
        env.docker.base_image = dk.get("base_image")
        env.environment_variables = _variables(d.get("environment_variables"), f"{where}: 'environment_variables'")
        return env

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Environment) and self.to_definition() == other.to_definition()

    def __repr__(self) -> str:
        version = f", version={self.version}" if self.version is not None else ""
        return f"Environment(name={self.name!r}{version})"


class EnvironmentBuild:
    """What ``Environment.build`` returns: the build is already complete."""

    def __init__(self, folder: str, built_now: bool) -> None:
        self.folder = folder
        self.built_now = built_now
        self.status = "Succeeded"

    def wait_for_completion(self, show_output: bool = False) -> EnvironmentBuild:
        return self

    def __str__(self) -> str:
        return self.folder

    def __repr__(self) -> str:
        return f"EnvironmentBuild(folder={self.folder!r}, status={self.status!r})"


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserInputError(f"{what} must be a mapping, not {value!r}")
    return value


def _only_keys(d: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise UserInputError(f"{what} has unknown keys: {', '.join(map(str, unknown))} (known: "
                             f"{', '.join(sorted(allowed))})")


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise UserInputError(f"{what} must be true or false, not {value!r}")
    return value


def _variables(value: Any, what: str) -> dict[str, str]:
    variables = _mapping(value, what)
    bad = [k for k, v in variables.items() if v is None or isinstance(v, (dict, list))]
    if bad:
        raise UserInputError(f"{what}: {bad[0]!r} needs a text value, not {variables[bad[0]]!r}")
    return {str(k): str(v) for k, v in variables.items()}


def _check_interpreter(env_name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise UserInputError(f"environment {env_name!r}: python.interpreter_path must be a path, not "
                             f"{type(value).__name__}")
    path = Path(value)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise UserInputError(f"environment {env_name!r}: interpreter_path {str(path)!r} is not an executable file")
    return str(path)


def _requirement_lines(path: Path, seen: set[Path]) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserInputError(f"requirements file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read requirements file {str(path)!r}: {exc}") from None
    seen.add(path.resolve())
    lines = []
    text = text.replace("\\\n", " ")  # continuation lines (pip-compile's --hash lists) are one requirement
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        flag, _, rest = line.replace("=", " ", 1).partition(" ") if line.startswith("-") else (line, "", "")
        if flag in ("-r", "--requirement", "-c", "--constraint"):
            included = (path.parent / rest.strip()).resolve()
            if flag in ("-c", "--constraint"):
                raise UserInputError(f"{path}:{n}: constraint files (-c) are not supported; pin the versions in "
                                     f"the requirements instead")
            if included not in seen:
                lines += _requirement_lines(included, seen)
        elif flag in ("-e", "--editable"):
            raise UserInputError(f"{path}:{n}: editable requirements ({line!r}) cannot go into a shared, cached "
                                 f"environment; put the code in the step's source_directory instead")
        else:
            lines.append(line)
    return lines


DEFAULT_ENVIRONMENT = "cairn-default"


def default_environment() -> Environment:
    """The interpreter Cairn runs in, as it is."""
    return Environment.from_existing_interpreter(DEFAULT_ENVIRONMENT)


class RunConfiguration:
    """How a step runs: target, environment, extra environment variables, time limit, nodes."""

    def __init__(self, script: str | None = None, arguments: Any = None, framework: str | None = None,
                 communicator: str | None = None, conda_dependencies: CondaDependencies | None = None) -> None:
        self.script = script
        self.arguments = arguments
        self.framework = framework or "Python"
        self.target: Any = None
        self.environment = default_environment()
        if conda_dependencies is not None:  # Azure ML: a run configuration built from packages
            self.environment = Environment("cairn-runconfig")
            self.environment.python.conda_dependencies = conda_dependencies
        self.environment_variables: dict[str, str] = {}
        self.max_run_duration_seconds: float | None = None
        self.node_count = 1
        # resources a scheduling target (Ray) reserves for the step; local compute runs it as is
        self.cpus: float | None = None
        self.gpus: float | None = None
        self.memory_gb: float | None = None

    def validate(self, step_name: str) -> list[str]:
        problems = []
        if not isinstance(self.environment, Environment):
            problems.append(f"step {step_name!r}: runconfig.environment must be an Environment, not "
                            f"{type(self.environment).__name__}")
        if not isinstance(self.environment_variables, dict):
            problems.append(f"step {step_name!r}: runconfig.environment_variables must be a dict")
        else:
            problems += variable_problems(self.environment_variables, f"step {step_name!r}: runconfig")
        m = self.max_run_duration_seconds
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m)
                              or m <= 0):
            problems.append(f"step {step_name!r}: runconfig.max_run_duration_seconds must be a positive "
                            f"number of seconds, not {m!r}")
        t = self.target
        if t is not None and not isinstance(t, str) and not isinstance(getattr(t, "name", None), str):
            problems.append(f"step {step_name!r}: runconfig.target must be a ComputeTarget or a target name, "
                            f"not {type(t).__name__}")
        for field in ("cpus", "gpus", "memory_gb"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v < 0 or (field != "gpus" and v == 0)):
                problems.append(f"step {step_name!r}: runconfig.{field} must be a positive number, not {v!r}")
        if not isinstance(self.node_count, int) or isinstance(self.node_count, bool) or self.node_count < 1:
            problems.append(f"step {step_name!r}: runconfig.node_count must be a whole number of at least 1, not "
                            f"{self.node_count!r}")
        return problems

    # -- YAML --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        target = self.target if isinstance(self.target, str) or self.target is None else self.target.name
        return {"script": self.script, "arguments": list(self.arguments) if self.arguments else [],
                "framework": self.framework, "target": target,
                "environment": self.environment.to_definition() if isinstance(self.environment, Environment) else None,
                "environment_variables": dict(self.environment_variables),
                "max_run_duration_seconds": self.max_run_duration_seconds, "node_count": self.node_count,
                "cpus": self.cpus, "gpus": self.gpus, "memory_gb": self.memory_gb}

    def save(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Write this run configuration as YAML to ``path`` (a file, or a folder to hold
        ``<name>.runconfig``); returns the file's path."""
        import yaml

        problems = self.validate(name or "runconfig")
        if problems:
            raise UserInputError("cannot save the run configuration: " + "; ".join(problems))
        target = _runconfig_file(Path(path), name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        return str(target)

    @staticmethod
    def load(path: str | os.PathLike[str], name: str | None = None) -> RunConfiguration:
        import yaml

        if not isinstance(path, (str, os.PathLike)):
            raise UserInputError(f"RunConfiguration.load needs the path of a run configuration file, not {path!r}")
        source = _runconfig_file(Path(path), name)
        try:
            data = yaml.safe_load(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserInputError(f"run configuration file {str(source)!r} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserInputError(f"cannot read run configuration file {str(source)!r}: {exc}") from None
        except yaml.YAMLError as exc:
            raise UserInputError(f"run configuration file {str(source)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UserInputError(f"run configuration file {str(source)!r} must hold a mapping")
        unknown = set(data) - set(RunConfiguration().to_dict())
        if unknown:
            raise UserInputError(f"run configuration file {str(source)!r} has unknown keys: "
                                 f"{', '.join(sorted(unknown))}")
        arguments = data.get("arguments")
        if arguments is not None and not isinstance(arguments, list):
            raise UserInputError(f"run configuration file {str(source)!r}: 'arguments' must be a list")
        rc = RunConfiguration(script=data.get("script"), arguments=arguments or None, framework=data.get("framework"))
        rc.target = data.get("target")
        if data.get("environment") is not None:
            rc.environment = Environment._from_definition(data["environment"])
        rc.environment_variables = _variables(data.get("environment_variables"),
                                              f"run configuration file {str(source)!r}: 'environment_variables'")
        rc.max_run_duration_seconds = data.get("max_run_duration_seconds")
        rc.node_count = data.get("node_count", 1)
        rc.cpus, rc.gpus, rc.memory_gb = data.get("cpus"), data.get("gpus"), data.get("memory_gb")
        problems = rc.validate(source.name)
        if problems:
            raise UserInputError(f"run configuration file {str(source)!r}: " + "; ".join(problems))
        return rc

    def __repr__(self) -> str:
        return f"RunConfiguration(target={self.target!r}, environment={self.environment!r})"


def _runconfig_file(path: Path, name: str | None) -> Path:
    if path.is_dir() or name is not None:
        return path / f"{name or 'runconfig'}.runconfig"
    return path

