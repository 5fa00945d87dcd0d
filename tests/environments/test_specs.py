"""Environment definitions as users write them: CondaDependencies, requirement files, the registry,
RunConfiguration YAML, and the canonical spec digests. No environment is built here."""

from __future__ import annotations

from pathlib import Path

import pytest

from cairn import CondaDependencies, Environment, NotFoundError, RunConfiguration, UserInputError, Workspace
from cairn.environments.build import check_buildable
from cairn.environments.spec import build_digest, cache_key, spec_digest


def managed(name: str, pip: list[str], **kwargs: object) -> Environment:
    env = Environment(name)
    env.python.conda_dependencies = CondaDependencies.create(pip_packages=pip, **kwargs)  # type: ignore[arg-type]
    return env


def test_conda_dependencies_round_trip_through_yaml(tmp_path: Path) -> None:
    deps = CondaDependencies.create(pip_packages=["six==1.16.0", "requests"], conda_packages=["numpy=1.26"],
                                    python_version="3.11", pip_indexurl="https://example.org/simple")
    deps.add_pip_package("idna>=3")
    deps.add_pip_package("six==1.15.0")  # the same package again replaces it
    deps.add_conda_package("scipy")
    deps.remove_conda_package("numpy")
    path = deps.save(tmp_path / "env" / "conda.yml")
    loaded = CondaDependencies(conda_dependencies_file_path=path)
    assert loaded == deps
    assert loaded.get_python_version() == "3.11"
    assert loaded.pip_packages == ["requests", "idna>=3", "six==1.15.0"]
    assert loaded.conda_packages == ["scipy"]
    assert loaded.index_urls() == ("https://example.org/simple", [])


def test_an_azure_ml_conda_file_loads(tmp_path: Path) -> None:
    (tmp_path / "env.yml").write_text(
        "name: project_environment\n"
        "dependencies:\n"
        "  - python=3.11.7\n"
        "  - pip=23.0\n"
        "  - pip:\n"
        "    - --extra-index-url https://example.org/extra\n"
        "    - six==1.16.0\n"
        "channels:\n"
        "  - conda-forge\n")
    env = Environment.from_conda_specification("from-yaml", tmp_path / "env.yml")
    spec = env.to_spec()
    assert spec["kind"] == "managed" and spec["python"] == "3.11.7"
    assert spec["pip"] == ["six==1.16.0"] and spec["conda"] == []  # pip itself is not a conda-only package
    assert spec["extra_index_urls"] == ["https://example.org/extra"]


@pytest.mark.parametrize("content, message", [
    ("dependencies: [", "not valid YAML"),
    ("- just a list", "mapping"),
    ("dependencies:\n  - {npm: [left-pad]}\n", "may only hold 'pip'"),
])
def test_a_broken_conda_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "env.yml").write_text(content)
    with pytest.raises(UserInputError, match=message):
        Environment.from_conda_specification("broken", tmp_path / "env.yml")


def test_bad_package_lists_are_clear_errors() -> None:
    with pytest.raises(UserInputError, match="list of strings"):
        CondaDependencies.create(pip_packages="six")  # type: ignore[arg-type]
    with pytest.raises(UserInputError, match="not a Python version"):
        CondaDependencies.create(python_version="three")
    with pytest.raises(UserInputError, match="non-empty"):
        CondaDependencies.create(pip_packages=["six", ""])


def test_pip_requirements_follow_includes_and_keep_index_options(tmp_path: Path) -> None:
    (tmp_path / "base.txt").write_text("six==1.16.0  # pinned\n")
    (tmp_path / "requirements.txt").write_text(
        "# the step's packages\n-r base.txt\n--index-url https://example.org/simple\n\nidna>=3\n")
    env = Environment.from_pip_requirements("reqs", tmp_path / "requirements.txt")
    spec = env.to_spec()
    assert spec["pip"] == ["idna>=3", "six==1.16.0"]
    assert spec["index_url"] == "https://example.org/simple"


def test_pip_requirements_refuse_what_cannot_be_cached(tmp_path: Path) -> None:
    (tmp_path / "requirements.txt").write_text("-e ./mylib\n")
    with pytest.raises(UserInputError, match="editable"):
        Environment.from_pip_requirements("reqs", tmp_path / "requirements.txt")
    with pytest.raises(UserInputError, match="does not exist"):
        Environment.from_pip_requirements("reqs", tmp_path / "missing.txt")


def test_the_spec_digest_ignores_order_and_name_but_not_packages_or_variables() -> None:
    a = managed("a", ["six==1.16.0", "idna"])
    b = managed("b", ["idna", "six==1.16.0"])
    assert a.digest == b.digest
    assert managed("a", ["six==1.15.0", "idna"]).digest != a.digest
    b.environment_variables = {"MODE": "fast"}
    assert b.digest != a.digest  # the variables change the step's behaviour: part of its fingerprint ...
    assert cache_key(b.to_spec()) == cache_key(a.to_spec())  # ... but not of the built files
    assert build_digest(a.to_spec()) != build_digest(managed("a", ["six==1.15.0", "idna"]).to_spec())
    assert spec_digest({**a.to_spec(), "version": 3}) == a.digest


def test_user_managed_and_default_environments() -> None:
    assert RunConfiguration().environment.to_spec()["kind"] == "current-interpreter"
    assert Environment("bare").to_spec()["kind"] == "managed"  # Azure ML's default: Cairn builds it
    env = managed("confused", ["six"])
    env.python.user_managed_dependencies = True
    with pytest.raises(UserInputError, match="would be ignored"):
        env.to_spec()
    env = Environment("wrong")
    env.python.interpreter_path = "/usr/bin/python3"
    with pytest.raises(UserInputError, match="user_managed_dependencies = True"):
        env.to_spec()


def test_conda_only_packages_get_a_clear_error_with_pip_names() -> None:
    env = Environment("conda")
    env.python.conda_dependencies = CondaDependencies.create(
        conda_packages=["pytorch=2.1", "py-xgboost", "cudatoolkit=11.8"], pip_packages=["six"])
    (problem,) = check_buildable(env.to_spec(), env.name)
    assert "pytorch=2.1" in problem and "py-xgboost" in problem and "no conda solver" in problem
    assert "'torch==2.1.*'" in problem and "'xgboost'" in problem and "'six'" in problem
    assert "cudatoolkit=11.8: no pip package needed" in problem


def test_the_registry_versions_by_spec(workspace: Workspace) -> None:
    first = managed("trainer", ["six==1.15.0"]).register(workspace)
    again = managed("trainer", ["six==1.15.0"]).register(workspace)
    assert first.version == again.version == 1
    second = managed("trainer", ["six==1.16.0"]).register(workspace)
    assert second.version == 2
    assert Environment.get(workspace, "trainer").to_spec()["pip"] == ["six==1.16.0"]
    assert Environment.get(workspace, "trainer", version=1).to_spec()["pip"] == ["six==1.15.0"]
    listed = Environment.list(workspace)
    assert listed["trainer"].version == 2
    assert {"cairn-minimal", "cairn-sklearn"} <= set(listed)
    assert set(workspace.environments) == set(listed)
    with pytest.raises(NotFoundError, match="'nope'.*known: cairn-minimal, cairn-sklearn, trainer"):
        Environment.get(workspace, "nope")
    with pytest.raises(NotFoundError, match="version 7"):
        Environment.get(workspace, "trainer", version=7)


def test_curated_environments_are_pinned_and_reserved(workspace: Workspace) -> None:
    sklearn = Environment.get(workspace, "cairn-sklearn")
    pins = sklearn.to_spec()["pip"]
    assert {p.split("==")[0] for p in pins} >= {"pandas", "scikit-learn", "pyarrow"}
    assert all("==" in p for p in pins)
    with pytest.raises(UserInputError, match="curated"):
        sklearn.register(workspace)
    mine = sklearn.clone("my-sklearn")
    mine.python.conda_dependencies.add_pip_package("six==1.16.0")  # type: ignore[union-attr]
    assert mine.register(workspace).version == 1
    assert "six==1.16.0" not in Environment.get(workspace, "cairn-sklearn").to_spec()["pip"]  # a deep copy


def test_run_configuration_round_trips_through_yaml(tmp_path: Path) -> None:
    rc = RunConfiguration()
    rc.target = "local"
    rc.environment = managed("trainer", ["six==1.16.0"])
    rc.environment.environment_variables = {"MODE": "fast"}
    rc.environment_variables = {"SEED": "7"}
    rc.max_run_duration_seconds = 90
    path = rc.save(tmp_path / "train.runconfig")
    loaded = RunConfiguration.load(path)
    assert loaded.to_dict() == rc.to_dict()
    assert loaded.environment.digest == rc.environment.digest
    assert RunConfiguration.load(rc.save(tmp_path, name="named"), ).target == "local"
    assert Path(tmp_path / "named.runconfig").is_file()


@pytest.mark.parametrize("content, message", [
    ("target: [", "not valid YAML"),
    ("colour: blue\n", "unknown keys: colour"),
    ("node_count: 0\n", "node_count must be a whole number of at least 1"),
    ("max_run_duration_seconds: -1\n", "positive number"),
    ("environment: {python: 5, name: x}\n", "'python' must be a mapping"),
])
def test_a_broken_run_configuration_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.runconfig").write_text(content)
    with pytest.raises(UserInputError, match=message):
        RunConfiguration.load(tmp_path / "bad.runconfig")
    with pytest.raises(UserInputError, match="does not exist"):
        RunConfiguration.load(tmp_path / "missing.runconfig")


@pytest.mark.parametrize("line, version", [
    ("python", None), ("python=3.11.*", "3.11"), ("python=3.11.7=h955ad1f_0", "3.11.7"), ("python>=3.8", None),
    ("python==3.12", "3.12"),
])
def test_conda_python_lines_in_every_common_form(tmp_path: Path, line: str, version: str | None) -> None:
    (tmp_path / "env.yml").write_text(f"dependencies:\n  - {line}\n  - pip:\n    - six\n")
    deps = CondaDependencies(conda_dependencies_file_path=tmp_path / "env.yml")
    assert deps.get_python_version() == version


def test_url_requirements_are_kept_apart_and_hash_lists_stay_whole(tmp_path: Path) -> None:
    deps = CondaDependencies.create(pip_packages=["git+https://example.org/a.git", "git+https://example.org/b.git",
                                                  "https://example.org/x-1.0-py3-none-any.whl", "lib @ ./lib"])
    assert len(deps.pip_packages) == 4
    (tmp_path / "requirements.txt").write_text(
        "six==1.16.0 \\\n    --hash=sha256:aaaa \\\n    --hash=sha256:bbbb\nidna==3.7\n")
    spec = Environment.from_pip_requirements("hashed", tmp_path / "requirements.txt").to_spec()
    assert spec["pip"] == ["idna==3.7", "six==1.16.0      --hash=sha256:aaaa      --hash=sha256:bbbb"]


def test_a_python_version_must_be_a_string() -> None:
    with pytest.raises(UserInputError, match="string such as '3.10'"):
        CondaDependencies.create(python_version=3.10)  # type: ignore[arg-type]


@pytest.mark.parametrize("content, message", [
    ("environment: {name: x, docker: yes}\n", "'docker' must be a mapping"),
    ("environment: {name: x, docker: {enabled: 'false'}}\n", "docker.enabled must be true or false"),
    ("environment: {name: x, python: {userManagedDependencies: true}}\n", "unknown keys: userManagedDependencies"),
    ("environment_variables: {A: null}\n", "'A' needs a text value"),
    ("arguments: 5\n", "'arguments' must be a list"),
])
def test_odd_run_configuration_yaml_is_refused_clearly(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "odd.runconfig").write_text(content)
    with pytest.raises(UserInputError, match=message):
        RunConfiguration.load(tmp_path / "odd.runconfig")
    (tmp_path / "latin1.runconfig").write_bytes("target: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserInputError, match="cannot read"):
        RunConfiguration.load(tmp_path / "latin1.runconfig")


def test_azure_ml_environment_helpers(workspace: Workspace, tmp_path: Path) -> None:
    env = Environment("aml-style")
    env.python.conda_dependencies.add_pip_package("six==1.16.0")  # type: ignore[union-attr]  # a default object
    env.save_to_directory(tmp_path / "saved")
    assert Environment.load_from_directory(tmp_path / "saved") == env
    with pytest.raises(UserInputError, match="overwrite=True"):
        env.save_to_directory(tmp_path / "saved")
    boxed = Environment.from_docker_image("boxed", "python:3.11-slim")
    assert boxed.to_spec()["docker"] == {"enabled": True, "base_image": "python:3.11-slim"}
    with pytest.raises(UserInputError, match="1 or more"):
        Environment.get(workspace, "cairn-minimal", version=10**20)
    with pytest.raises(UserInputError, match="path of a conda YAML file"):
        Environment.from_conda_specification("none", None)  # type: ignore[arg-type]
