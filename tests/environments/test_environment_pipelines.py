"""Steps in isolated environments built with uv (packages come from PyPI: the machine needs it).

Two steps pin different versions of a small pure-Python package and each sees its own; a second
run builds nothing; a broken requirement fails only its step, with uv's error in the step's log;
conda-only packages and docker get clear errors; the environment is part of the fingerprint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cairn import (
    CondaDependencies,
    Environment,
    Experiment,
    Pipeline,
    PipelineValidationError,
    PythonScriptStep,
    RunConfiguration,
    Workspace,
)

pytestmark = pytest.mark.slow

SHOW_SIX = """
    import os, sys
    import six
    from cairn import Run
    run = Run.get_context()
    run.log("six", six.__version__)
    run.log("mode", os.environ.get("MODE", "-"))
    try:
        import pandas  # installed beside Cairn, not in this environment
        run.log("pandas", "visible")
    except ImportError:
        run.log("pandas", "absent")
    print("prefix", sys.prefix)
"""


def runconfig(name: str, pip: list[str], **variables: str) -> RunConfiguration:
    env = Environment(name)
    env.python.conda_dependencies = CondaDependencies.create(pip_packages=pip)
    env.environment_variables = dict(variables)
    rc = RunConfiguration()
    rc.environment = env
    return rc


def step(src: Path, name: str, rc: RunConfiguration, allow_reuse: bool = False) -> PythonScriptStep:
    return PythonScriptStep("show.py", name=name, source_directory=str(src), runconfig=rc, allow_reuse=allow_reuse)


@pytest.fixture
def src(write_script: Callable[..., Path]) -> Path:
    return write_script("show.py", SHOW_SIX)


def test_two_environments_are_isolated_and_built_once(workspace: Workspace, src: Path) -> None:
    def pipeline() -> Pipeline:
        return Pipeline(workspace, [step(src, "old", runconfig("old-six", ["six==1.15.0"], MODE="old")),
                                    step(src, "new", runconfig("new-six", ["six==1.16.0"]))])

    run = Experiment(workspace, "envs").submit(pipeline())
    assert run.wait_for_completion(show_output=False) == "Completed"
    steps = {s.name: s for s in run.get_steps()}
    assert steps["old"].get_metrics() == {"six": "1.15.0", "mode": "old", "pandas": "absent"}
    assert steps["new"].get_metrics() == {"six": "1.16.0", "mode": "-", "pandas": "absent"}
    for s in steps.values():
        log = s.get_environment_log()
        assert "building environment" in log and "+ six==" in log  # uv's own output, kept with the run
        assert "Preparing" in [e["status"] for e in workspace._backend.get_events(s.id)]
        assert ".cairn/envs/" in s.get_stdout_log()  # the step's sys.prefix is the built environment

    again = Experiment(workspace, "envs").submit(pipeline())
    assert again.wait_for_completion(show_output=False) == "Completed"
    for s in again.get_steps():
        log = s.get_environment_log()
        assert "building environment" not in log and ": ready (" in log
        assert s.get_metrics()["six"] == ("1.15.0" if s.name == "old" else "1.16.0")
    built = [e for e in (Path(workspace.location) / ".cairn" / "envs").iterdir() if e.is_dir()]
    assert len(built) == 2


def test_a_broken_requirement_fails_only_its_step(workspace: Workspace, src: Path) -> None:
    broken = step(src, "broken", runconfig("broken", ["cairn-no-such-package-for-tests==1.0"]))
    fine = step(src, "fine", runconfig("fine", ["six==1.16.0"]))
    run = Experiment(workspace, "envs").submit(Pipeline(workspace, [broken, fine]), continue_on_step_failure=True)
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    steps = {s.name: s for s in run.get_steps()}
    assert steps["fine"].get_status() == "Completed"
    failed = steps["broken"]
    assert failed.get_status() == "Failed"
    reason = failed._row()["status_reason"]
    assert reason.startswith("environment 'broken' could not be built")
    assert "cairn-no-such-package-for-tests" in reason
    assert "cairn-no-such-package-for-tests" in failed.get_environment_log()  # uv's error, whole
    assert failed.get_stdout_log() == ""  # the script never ran
    assert not [e for e in (Path(workspace.location) / ".cairn" / "envs").iterdir()
                if e.is_dir() and not (e / "env.json").exists()]  # nothing half-made


def test_conda_only_packages_are_refused_before_anything_runs(workspace: Workspace, src: Path) -> None:
    env = Environment("gpu")
    env.python.conda_dependencies = CondaDependencies.create(conda_packages=["pytorch", "six"])
    rc = RunConfiguration()
    rc.environment = env
    with pytest.raises(PipelineValidationError, match=r"conda packages \(pytorch, six\).*'torch'"):
        Experiment(workspace, "envs").submit(Pipeline(workspace, [step(src, "gpu", rc)]))
    assert workspace._backend.list_runs() == []


def test_docker_on_local_compute_fails_the_step_saying_why(workspace: Workspace, src: Path) -> None:
    rc = runconfig("in-docker", ["six==1.16.0"])
    rc.environment.docker.enabled = True
    rc.environment.docker.base_image = "python:3.11-slim"
    run = Experiment(workspace, "envs").submit(Pipeline(workspace, [step(src, "boxed", rc)]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    (boxed,) = run.get_steps()
    reason = boxed._row()["status_reason"]
    assert "cannot run containers" in reason and "python:3.11-slim" in reason and "docker.enabled" in reason


def test_the_environment_is_part_of_the_fingerprint(workspace: Workspace, src: Path) -> None:
    def submit(pin: str) -> list[str]:
        run = Experiment(workspace, "envs").submit(
            Pipeline(workspace, [step(src, "s", runconfig("pinned", [pin]), allow_reuse=True)]))
        run.wait_for_completion(show_output=False)
        return [s.get_status() for s in run.get_steps()]

    assert submit("six==1.16.0") == ["Completed"]
    assert submit("six==1.16.0") == ["Reused"]
    assert submit("six==1.15.0") == ["Completed"]


def test_a_registered_environment_runs_by_name(workspace: Workspace, src: Path) -> None:
    runconfig("team-six", ["six==1.16.0"]).environment.register(workspace)
    rc = RunConfiguration()
    rc.environment = Environment.get(workspace, "team-six")
    run = Experiment(workspace, "envs").submit(Pipeline(workspace, [step(src, "s", rc)]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert run.get_steps()[0].get_metrics()["six"] == "1.16.0"


def test_a_pin_that_breaks_cairns_client_only_matters_where_the_step_opens_the_workspace(
        workspace: Workspace, write_script: Callable[..., Path]) -> None:
    """Run.get_context() reaches the workspace through the agent: a script in an environment that
    pins an SQLAlchemy Cairn cannot use still logs. A call it makes that opens the workspace in its
    own process (an upload) fails, naming the pin."""
    src = write_script("upload.py", """
        import six
        from cairn import Run
        run = Run.get_context()
        run.log("six", six.__version__)
        run.upload_file("note.txt", __file__)
    """)
    conflicting = PythonScriptStep("upload.py", name="old-sqlalchemy", source_directory=str(src),
                                   runconfig=runconfig("old-sqlalchemy", ["six==1.16.0", "sqlalchemy==1.4.54"]))
    run = Experiment(workspace, "envs").submit(Pipeline(workspace, [conflicting]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    (s,) = run.get_steps()
    assert "SQLAlchemy 1.4.54 (Cairn's client uses" in s.get_environment_log()  # warned at build time
    assert s.get_metrics()["six"] == "1.16.0"  # logged through the agent before the upload failed
    stderr = s.get_stderr_log()
    assert "cannot load Cairn's client in this environment: it pins" in stderr and "SQLAlchemy 1.4.54" in stderr


def test_a_step_has_pip_of_its_own_environment(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    code = """
        import shutil, subprocess, sys
        pip = shutil.which("pip")
        print(pip.startswith(sys.prefix), subprocess.run([sys.executable, "-m", "pip", "--version"]).returncode)
    """
    src = write_script("pip_check.py", code)
    rc = runconfig("with-pip", [])
    run = Experiment(workspace, "envs").submit(Pipeline(workspace, [
        PythonScriptStep("pip_check.py", name="pip", source_directory=str(src), runconfig=rc)]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert run.get_steps()[0].get_stdout_log().splitlines()[-1] == "True 0"


def test_an_environments_pythonpath_comes_before_cairns(workspace: Workspace,
                                                        write_script: Callable[..., Path]) -> None:
    """A user-managed environment's PYTHONPATH (relative: from the step's folder) is kept, with
    Cairn's own path after it so that the step can still import its client."""
    write_script("lib/mylib.py", "VALUE = 'from lib'\n")
    src = write_script("uses_lib.py", "import mylib\nfrom cairn import Run\nprint(mylib.VALUE, Run.__name__)\n")
    env = Environment("with-path")
    env.python.user_managed_dependencies = True
    env.environment_variables = {"PYTHONPATH": "lib"}
    rc = RunConfiguration()
    rc.environment = env
    run = Experiment(workspace, "paths").submit(Pipeline(workspace, [
        PythonScriptStep("uses_lib.py", name="uses", source_directory=str(src), runconfig=rc)]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Completed", \
        run.get_steps()[0].get_stderr_log()
    assert run.get_steps()[0].get_stdout_log() == "from lib Run\n"
