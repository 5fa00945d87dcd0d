"""The ``cairn`` command line, run as a subprocess: exit codes (0 success, 1 run failed or canceled,
2 usage or input error, 3 timeout), what each command prints, and errors without Python tracebacks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cairn import Workspace
from cairn.engine.client import stop_agent
from cairn.storage.layout import WorkspaceLayout
from tests.conftest import require_no_workspace_above

COMMAND_TIMEOUT = 120  # a safety net only: every command here ends in a few seconds


def _env() -> dict[str, str]:
    drop = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_") and k not in drop}
    env["NO_COLOR"] = "1"
    return env


def _argv(args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "cairn", *args]


def cairn(*args: str, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # stdin is not a terminal either: rich would take its width from it
    return subprocess.run(_argv(args), cwd=cwd, env={**_env(), **(env_extra or {})}, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def flat(text: str) -> str:
    """Text with every run of whitespace made one space (rich wraps long lines)."""
    return " ".join(text.split())


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


PIPELINE = """
import sys
from pathlib import Path
from cairn import Experiment, Pipeline, PythonScriptStep, Workspace

here = Path(__file__).resolve().parent
ws = Workspace.from_config()
step = PythonScriptStep({script!r}, name={name!r}, source_directory=here / "src", arguments={arguments})
run = Experiment(ws, {experiment!r}).submit(Pipeline(ws, [step]))
print("RUN", run.id)
for s in run.get_steps():
    print("STEP", s.name, s.id)
sys.stdout.flush()
"""


@dataclass
class Project:
    root: Path

    def write_step(self, script: str, code: str) -> None:
        (self.root / "src").mkdir(exist_ok=True)
        (self.root / "src" / script).write_text(textwrap.dedent(code))

    def write_pipeline(self, script: str, name: str, experiment: str = "cli", arguments: str = "[]",
                       file: str = "pipeline.py") -> str:
        (self.root / file).write_text(PIPELINE.format(script=script, name=name, experiment=experiment,
                                                      arguments=arguments))
        return file

    def cairn(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cairn(*args, cwd=self.root)


def ids_of(result: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    """(pipeline run id, step run id) printed by a PIPELINE file."""
    run = re.search(r"^RUN (run_\w+)$", result.stdout, re.M)
    step = re.search(r"^STEP \S+ (step_\w+)$", result.stdout, re.M)
    assert run and step, result.stdout + result.stderr
    return run.group(1), step.group(1)


@pytest.fixture
def project(workspace: Workspace) -> Project:
    return Project(Path(workspace.location))


@contextmanager
def _module_project(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Project]:
    ws = Workspace.create(tmp_path_factory.mktemp(name))
    try:
        yield Project(Path(ws.location))
    finally:
        stop_agent(WorkspaceLayout(ws.location))


@dataclass
class Done:
    project: Project
    result: subprocess.CompletedProcess[str]
    run_id: str
    step_id: str


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Done]:
    """One pipeline run of one step that printed 'hello from step' and completed."""
    with _module_project(tmp_path_factory, "completed") as p:
        p.write_step("hello.py", "print('hello from step')\n")
        pipeline = p.write_pipeline("hello.py", "greet")
        result = p.cairn("run", pipeline)
        yield Done(p, result, *ids_of(result))


@pytest.fixture(scope="module")
def failed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Done]:
    """One pipeline run whose only step printed a line, then exited with an error."""
    with _module_project(tmp_path_factory, "failed") as p:
        p.write_step("breaker.py", """\
            print("about to fail", flush=True)
            raise SystemExit("boom: bad input")
            """)
        pipeline = p.write_pipeline("breaker.py", "breaker")
        result = p.cairn("run", pipeline)
        yield Done(p, result, *ids_of(result))


GATE_STEP = """\
import pathlib, sys, time
print("before gate", flush=True)
gate = pathlib.Path(sys.argv[1])
deadline = time.monotonic() + 60  # never hang a test run: give up after a minute
while not gate.exists():
    if time.monotonic() > deadline:
        sys.exit("the gate never opened")
    time.sleep(0.05)
print("after gate", flush=True)
"""


# -- cairn init -------------------------------------------------------------------------------


def test_init_makes_a_workspace(tmp_path: Path) -> None:
    result = cairn("init", "proj", cwd=tmp_path)
    try:
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "proj" / ".cairn" / "config.json").is_file()
        out = flat(result.stdout)
        assert str((tmp_path / "proj").resolve()) in out
        assert "'workspaceblobstore'" in out and "'local'" in out
        ws = Workspace.from_config(tmp_path / "proj")
        assert ws.get_default_datastore().name == "workspaceblobstore"
        assert set(ws.compute_targets) == {"local"}
    finally:
        stop_agent(WorkspaceLayout(tmp_path / "proj"))


def test_init_in_the_current_folder_twice_then_use_it_from_a_subfolder(tmp_path: Path) -> None:
    try:
        assert cairn("init", cwd=tmp_path).returncode == 0
        again = cairn("init", cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        (tmp_path / "sub" / "deeper").mkdir(parents=True)
        listed = cairn("runs", "list", cwd=tmp_path / "sub" / "deeper")
        assert listed.returncode == 0, listed.stderr
        assert "run" in listed.stdout and "status" in listed.stdout
    finally:
        stop_agent(WorkspaceLayout(tmp_path))


def test_init_on_a_file_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    result = cairn("init", "afile", cwd=tmp_path)
    assert result.returncode == 2
    no_traceback(result)


# -- outside a workspace, usage errors ---------------------------------------------------------


OUTSIDE = [["runs", "list"], ["runs", "show", "run_x", "--json"], ["logs", "run_x"], ["logs", "run_x", "--follow"],
           ["cancel", "run_x"], ["explain", "step_x", "--json"]]


@pytest.mark.parametrize("args", OUTSIDE, ids=[" ".join(a) for a in OUTSIDE])
def test_commands_outside_a_workspace(tmp_path: Path, args: list[str]) -> None:
    require_no_workspace_above(tmp_path)
    result = cairn(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "`cairn init`" in flat(result.stderr)
    no_traceback(result)
    assert not (tmp_path / ".cairn").exists()


def test_error_messages_are_not_wrapped(tmp_path: Path) -> None:
    require_no_workspace_above(tmp_path)
    result = cairn("runs", "list", cwd=tmp_path)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_what_the_user_named_is_printed_as_written(tmp_path: Path) -> None:
    """Names and paths are not read as markup or emoji codes (a folder "[draft]" stays whole)."""
    folder = tmp_path / "ws [draft] :memo: [bold]x[/]"
    made = cairn("init", str(folder), cwd=tmp_path)
    assert made.returncode == 0 and str(folder) in made.stdout, made.stdout
    result = cairn("runs", "show", "run_[red]nope[/]:memo:", cwd=folder)
    assert result.returncode == 2 and "'run_[red]nope[/]:memo:'" in result.stderr, result.stderr
    assert result.stderr.startswith("error: ")


def test_the_workspace_option(completed: Done, tmp_path: Path) -> None:
    result = cairn("runs", "list", "--workspace", str(completed.project.root), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert completed.run_id in result.stdout
    outside = cairn("runs", "list", "-w", str(tmp_path), cwd=completed.project.root)
    assert outside.returncode == 2
    assert "cairn init" in flat(outside.stderr)


USAGE = [[], ["bogus"], ["runs", "show"], ["runs", "list", "--limit", "many"], ["logs"]]


@pytest.mark.parametrize("args", USAGE, ids=[" ".join(a) or "no-args" for a in USAGE])
def test_usage_errors_exit_2_without_a_traceback(tmp_path: Path, args: list[str]) -> None:
    result = cairn(*args, cwd=tmp_path)
    assert result.returncode == 2
    no_traceback(result)


def test_help(tmp_path: Path) -> None:
    result = cairn("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("init", "run", "runs", "logs", "cancel", "explain"):
        assert command in result.stdout


UNKNOWN = [["runs", "show", "run_nope", "--json"], ["logs", "run_nope"], ["logs", "run_nope", "--follow"],
           ["cancel", "run_nope"], ["explain", "run_nope"]]


@pytest.mark.parametrize("args", UNKNOWN, ids=[" ".join(a) for a in UNKNOWN])
def test_unknown_run_ids(project: Project, args: list[str]) -> None:
    result = project.cairn(*args)
    assert result.returncode == 2
    assert "'run_nope'" in flat(result.stderr)
    no_traceback(result)


# -- cairn run --------------------------------------------------------------------------------


def test_run_a_missing_file(project: Project) -> None:
    result = project.cairn("run", "no_such_pipeline.py")
    assert result.returncode == 2
    assert "'no_such_pipeline.py'" in flat(result.stderr) and "does not exist" in result.stderr
    no_traceback(result)


def test_run_an_invalid_pipeline_lists_every_problem(project: Project) -> None:
    (project.root / "src").mkdir()
    (project.root / "bad.py").write_text(textwrap.dedent("""\
        from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
        ws = Workspace.from_config()
        steps = [PythonScriptStep("missing.py", name="lost", source_directory="src"),
                 PythonScriptStep("missing.py", name="remote", source_directory="src", compute_target="gpu")]
        Experiment(ws, "cli").submit(Pipeline(ws, steps))
        """))
    result = project.cairn("run", "bad.py")
    assert result.returncode == 2
    err = flat(result.stderr)
    assert "3 problem(s)" in err
    assert "step 'lost': script 'missing.py'" in err and "step 'remote': compute target 'gpu'" in err
    no_traceback(result)
    assert Workspace(project.root).experiments == {}


def test_run_a_pipeline_file_outside_a_workspace(tmp_path: Path) -> None:
    require_no_workspace_above(tmp_path)
    Project(tmp_path).write_pipeline("hello.py", "greet")
    result = cairn("run", "pipeline.py", cwd=tmp_path)
    assert result.returncode == 2
    assert "`cairn init`" in flat(result.stderr)
    no_traceback(result)


def test_run_completes_with_exit_0(completed: Done) -> None:
    result = completed.result
    assert result.returncode == 0, result.stderr
    assert "greet | hello from step" in result.stdout
    assert f"Pipeline run {completed.run_id}: Completed" in result.stdout
    assert "[greet] Completed" in result.stdout


def test_run_of_a_failing_step_reports_it(failed: Done) -> None:
    assert "breaker | about to fail" in failed.result.stdout
    err = flat(failed.result.stderr)
    assert f"pipeline run {failed.run_id} Failed" in err
    assert f"step 'breaker' ({failed.step_id}) failed" in err and "boom: bad input" in err
    assert f"cairn logs {failed.step_id}" in err
    no_traceback(failed.result)


def test_run_of_a_failing_step_exits_1(failed: Done) -> None:
    assert failed.result.returncode == 1


# -- cairn runs list / show -------------------------------------------------------------------


def test_runs_list(completed: Done, failed: Done) -> None:
    result = completed.project.cairn("runs", "list")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if completed.run_id in line)
    assert "cli" in line and "Completed" in line and "1/1" in line
    failed_list = failed.project.cairn("runs", "list", "--experiment", "cli")
    assert failed_list.returncode == 0
    assert failed.run_id in failed_list.stdout and "Failed" in failed_list.stdout
    empty = failed.project.cairn("runs", "list", "-e", "other")
    assert empty.returncode == 0 and failed.run_id not in empty.stdout


def test_runs_show(completed: Done) -> None:
    result = completed.project.cairn("runs", "show", completed.run_id)
    assert result.returncode == 0, result.stderr
    assert completed.run_id in result.stdout and "experiment 'cli'" in result.stdout
    assert "status: Completed" in result.stdout
    step_line = next(line for line in result.stdout.splitlines() if completed.step_id in line)
    assert "greet" in step_line and "Completed" in step_line


def test_runs_show_lists_each_steps_outputs(workspace: Workspace, tmp_path: Path) -> None:
    from cairn import Experiment, Pipeline, PipelineData, PythonScriptStep

    src = tmp_path / "made"
    src.mkdir()
    (src / "make.py").write_text("import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                 "open(os.path.join(sys.argv[1], 'x.txt'), 'w').write('x')\n")
    out = PipelineData("o")
    step = PythonScriptStep("make.py", name="make", source_directory=str(src), arguments=[out], outputs=[out])
    run = Experiment(workspace, "cli").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    result = cairn("runs", "show", run.id, cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    assert f"output make.o: {run.find_step_run('make')[0].get_output_data('o').local_path} (1 bytes," in flat(result.stdout)


def test_an_output_without_its_digest_yet_says_why() -> None:
    from cairn.cli.main import _digest_shown
    from cairn.client.run import OutputData

    def shown(digest: str) -> str:
        return _digest_shown(OutputData({"name": "o", "datastore": "d", "path": "p", "digest": digest, "size": 1}))

    assert shown("pending:run_x").startswith("digest pending: made after the step's commit")
    assert "changed after the step's commit" in shown("changed:run_x")
    assert shown("xxh3-128:ab") == "xxh3-128:ab"


def test_runs_show_json(completed: Done) -> None:
    result = completed.project.cairn("runs", "show", completed.run_id, "--json")
    assert result.returncode == 0, result.stderr
    details = json.loads(result.stdout)
    assert details["runId"] == completed.run_id
    assert details["status"] == "Completed" and details["experiment"] == "cli"
    assert [e["status"] for e in details["events"]][-1] == "Completed"
    (step,) = details["steps"]
    assert (step["runId"], step["name"], step["status"]) == (completed.step_id, "greet", "Completed")
    assert step["parentRunId"] == completed.run_id
    step_json = json.loads(completed.project.cairn("runs", "show", completed.step_id, "--json").stdout)
    assert step_json["runId"] == completed.step_id and step_json["steps"] == []


def test_runs_show_failed(failed: Done) -> None:
    result = failed.project.cairn("runs", "show", failed.run_id)
    assert result.returncode == 0, result.stderr
    assert "status: Failed" in result.stdout
    step_line = next(line for line in result.stdout.splitlines() if failed.step_id in line)
    assert "Failed" in step_line and "boom: bad input" in step_line


# -- cairn logs -------------------------------------------------------------------------------


def test_logs_of_a_step(completed: Done) -> None:
    result = completed.project.cairn("logs", completed.step_id)
    assert result.returncode == 0, result.stderr
    assert "hello from step" in result.stdout


def test_logs_of_a_pipeline_run_show_every_step(completed: Done) -> None:
    result = completed.project.cairn("logs", completed.run_id)
    assert result.returncode == 0, result.stderr
    assert "hello from step" in result.stdout


def test_logs_of_a_failed_step_show_stdout_and_stderr(failed: Done) -> None:
    result = failed.project.cairn("logs", failed.step_id)
    assert result.returncode == 0, result.stderr
    assert "about to fail" in result.stdout and "boom: bad input" in result.stdout
    assert result.stdout.index("about to fail") < result.stdout.index("boom: bad input")


def test_logs_follow_of_a_finished_run(completed: Done) -> None:
    result = completed.project.cairn("logs", completed.step_id, "--follow")
    assert result.returncode == 0, result.stderr
    assert "greet | hello from step" in result.stdout and "Completed" in result.stdout


def test_logs_follow_of_a_failed_run_exits_1(failed: Done) -> None:
    result = failed.project.cairn("logs", failed.run_id, "--follow")
    assert "breaker | about to fail" in result.stdout
    assert result.returncode == 1


def test_timeout_exits_3_then_logs_follow_streams_to_the_end(project: Project, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    project.write_step("gate.py", GATE_STEP)
    pipeline = project.write_pipeline("gate.py", "gated", arguments=repr([str(gate)]))
    result = project.cairn("run", "--timeout", "1", pipeline)
    assert result.returncode == 3, result.stdout + result.stderr
    run_id, step_id = ids_of(result)
    err = flat(result.stderr)
    assert "timeout" in err and run_id in err and f"cairn cancel {run_id}" in err
    no_traceback(result)

    # the step waits for the gate: --follow is attached before the step can end
    follower = subprocess.Popen(_argv(("logs", step_id, "--follow")), cwd=project.root, env=_env(),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        gate.touch()
        out, err_text = follower.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert follower.returncode == 0, err_text
    assert "gated | before gate" in out and "gated | after gate" in out
    assert out.index("before gate") < out.index("after gate")
    assert "[gated] Completed" in out


# -- cairn cancel -----------------------------------------------------------------------------


def test_cancel_a_running_pipeline(project: Project, tmp_path: Path) -> None:
    project.write_step("gate.py", GATE_STEP)
    pipeline = project.write_pipeline("gate.py", "gated", arguments=repr([str(tmp_path / "never-opened")]))
    result = project.cairn("run", "--no-follow", pipeline)
    assert result.returncode == 0, result.stderr
    run_id, step_id = ids_of(result)

    canceled = project.cairn("cancel", run_id)
    assert canceled.returncode == 0, canceled.stderr
    assert f"cancel requested for {run_id}" in canceled.stdout
    Workspace(project.root).get_run(run_id).wait_for_completion(show_output=False, timeout_seconds=60,
                                                                raise_on_error=False)

    details = json.loads(project.cairn("runs", "show", run_id, "--json").stdout)
    assert details["status"] == "Canceled"
    assert [(s["runId"], s["status"]) for s in details["steps"]] == [(step_id, "Canceled")]
    again = project.cairn("cancel", step_id)  # a step run's id names its pipeline run; it has ended
    assert again.returncode == 0 and f"run {run_id} already ended (Canceled): nothing to cancel" in again.stdout


# -- cairn explain ----------------------------------------------------------------------------


def test_explain_a_first_run(completed: Done) -> None:
    result = completed.project.cairn("explain", completed.step_id)
    assert result.returncode == 0, result.stderr
    out = flat(result.stdout)
    assert f"greet ({completed.step_id}): Completed" in out
    assert "ran: no earlier run of step 'greet' in experiment 'cli'" in out
    for part in ("script", "snapshot", "arguments", "params", "environment"):
        assert part in result.stdout

    as_json = json.loads(completed.project.cairn("explain", completed.step_id, "--json").stdout)
    assert as_json["step_run_id"] == completed.step_id and as_json["step"] == "greet"
    assert as_json["pipeline_run_id"] == completed.run_id
    assert as_json["changes"] == [] and as_json["reused_from"] is None
    assert as_json["parts"]["script"] == "hello.py"
    assert as_json["fingerprint"].startswith("blake2b:")


def test_explain_a_pipeline_run_id(completed: Done) -> None:
    result = completed.project.cairn("explain", completed.run_id)
    assert result.returncode == 2
    message = flat(result.stderr)
    assert f"{completed.run_id} is a pipeline run; explain one of its step runs" in message
    assert completed.step_id in message
    no_traceback(result)


def test_explain_a_failed_step(failed: Done) -> None:
    result = failed.project.cairn("explain", failed.step_id, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["status"] == "Failed" and "boom: bad input" in info["summary"]


def test_explain_reuse_then_a_changed_script(completed: Done) -> None:
    p = completed.project
    pipeline = p.write_pipeline("hello.py", "greet", file="again.py")

    reused = p.cairn("run", pipeline)
    assert reused.returncode == 0, reused.stderr
    _, reused_step = ids_of(reused)
    info = json.loads(p.cairn("explain", reused_step, "--json").stdout)
    assert info["status"] == "Reused" and info["reused_from"] == completed.step_id
    assert "reused" in info["summary"]

    p.write_step("hello.py", "print('hello from a changed step')\n")  # another size: no mtime race
    changed = p.cairn("run", pipeline)
    assert changed.returncode == 0, changed.stderr
    assert "hello from a changed step" in changed.stdout
    _, changed_step = ids_of(changed)
    human = p.cairn("explain", changed_step)
    assert human.returncode == 0, human.stderr
    assert "snapshot changed: hello.py modified" in flat(human.stdout)
    info = json.loads(p.cairn("explain", changed_step, "--json").stdout)
    assert info["changes"] == ["snapshot changed: hello.py modified"]
    assert info["compared_with"] in (completed.step_id, reused_step)  # the latest earlier run of the step


# -- review fixes ---------------------------------------------------------------------------------

def test_run_follows_a_file_that_ends_with_sys_exit_main(project: Project) -> None:
    project.write_step("hello.py", "import sys\nprint('args', sys.argv[1:])\n")
    (project.root / "main_style.py").write_text(textwrap.dedent("""
        import sys
        from pathlib import Path
        from cairn import Experiment, Pipeline, PythonScriptStep, Workspace

        def main() -> int:
            ws = Workspace.from_config()
            step = PythonScriptStep("hello.py", name="hello", source_directory=Path(__file__).parent / "src",
                                    arguments=sys.argv[1:])
            Experiment(ws, "main-style").submit(Pipeline(ws, [step]))
            return 0

        if __name__ == "__main__":
            sys.exit(main())
    """))
    result = project.cairn("run", "main_style.py", "--flag", "value")
    assert result.returncode == 0, result.stderr
    assert "args ['--flag', 'value']" in result.stdout and "Completed" in result.stdout


def test_a_second_agent_refuses_to_start(completed: Done) -> None:
    completed.project.cairn("runs", "list")  # any command; then make sure an agent serves
    from cairn.engine.client import ensure_agent

    ensure_agent(WorkspaceLayout(completed.project.root))
    result = completed.project.cairn("agent")
    assert result.returncode == 2
    assert "already serves" in flat(result.stderr)
    no_traceback(result)


# -- the inner loop, after a user's tests ----------------------------------------------------------

def test_run_does_not_show_again_what_the_file_followed_itself(project: Project) -> None:
    project.write_step("hello.py", "print('hello once')\n")
    (project.root / "waits.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
        ws = Workspace.from_config()
        step = PythonScriptStep("hello.py", name="hello", source_directory=Path(__file__).parent / "src",
                                allow_reuse=False)
        Experiment(ws, "waits").submit(Pipeline(ws, [step])).wait_for_completion(show_output=True)
    """))
    result = project.cairn("run", "waits.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("hello once") == 1 and result.stdout.count("[hello] Completed") == 1, result.stdout


def test_an_error_in_the_pipeline_file_shows_the_files_frames_only(project: Project) -> None:
    (project.root / "syntax.py").write_text("print((\n")
    result = project.cairn("run", "syntax.py")
    assert result.returncode == 2
    assert "syntax.py" in result.stderr and "SyntaxError" in result.stderr
    assert "runpy" not in result.stderr and "cairn/cli" not in result.stderr, result.stderr
    (project.root / "name.py").write_text("x = 1\nprint(undefined_name)\n")
    result = project.cairn("run", "name.py")
    assert result.returncode == 2
    assert 'name.py", line 2' in result.stderr and "NameError" in result.stderr
    assert "runpy" not in result.stderr and "cairn/cli" not in result.stderr, result.stderr


def test_runs_list_says_when_it_shows_only_the_latest(project: Project) -> None:
    p = project
    p.write_step("hello.py", "print('hi')\n")
    pipeline = p.write_pipeline("hello.py", "hello")
    for _ in range(2):
        assert p.cairn("run", pipeline).returncode == 0
    assert p.cairn("runs", "list", "--limit", "0").returncode == 2
    one = p.cairn("runs", "list", "--limit", "1")
    assert one.returncode == 0 and "the 1 most recent runs; --limit N shows more" in flat(one.stderr)
    nothing = p.cairn("runs", "list", "-e", "no-such-experiment")
    assert nothing.returncode == 0 and "no runs in experiment 'no-such-experiment' (experiments:" in flat(nothing.stderr)


def test_ctrl_c_while_following_says_the_run_goes_on(project: Project) -> None:
    import signal

    project.write_step("slow.py", "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    pipeline = project.write_pipeline("slow.py", "slow")
    proc = subprocess.Popen(_argv(("run", pipeline)), cwd=project.root, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the step has started
            if "slow | started" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted: pipeline run run_" in flat(err) and "goes on in the background" in flat(err)
    run_id = re.search(r"pipeline run (run_\w+) goes on", flat(err)).group(1)  # type: ignore[union-attr]
    assert project.cairn("cancel", run_id).returncode == 0


def test_a_missing_folder_or_data_in_a_pipeline_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "typo_folder.py").write_text(
        "from cairn import Workspace, Datastore\nDatastore.register_local_folder(Workspace.create('.'), 'raw', 'dta')\n")
    (tmp_path / "typo_file.py").write_text(
        "from cairn import Workspace, Datastore, Dataset\nws = Workspace.create('.')\n"
        "Dataset.Tabular.from_delimited_files((Datastore.register_local_folder(ws, 'raw', 'data'), 'tt.csv'))\n")
    for script, message in (("typo_folder.py", "folder 'dta' does not exist"),
                            ("typo_file.py", "match no file: raw:tt.csv")):
        result = cairn("run", script, cwd=tmp_path)
        assert result.returncode == 2 and message in flat(result.stderr), result.stderr
        no_traceback(result)
    (tmp_path / "data" / "t.csv").write_text("a\n1\n")
    (tmp_path / "read.py").write_text(
        "from cairn import Workspace, Datastore, Dataset\nws = Workspace.from_config('.')\n"
        "Dataset.Tabular.from_delimited_files((Datastore.get(ws, 'raw'), 't.csv'))\n")
    assert cairn("run", "read.py", cwd=tmp_path).returncode == 0
    (tmp_path / "data").rename(tmp_path / "moved")  # the datastore's folder is gone
    result = cairn("run", "read.py", cwd=tmp_path)
    assert result.returncode == 2 and "datastore 'raw' is the folder" in flat(result.stderr), result.stderr
    assert "does not exist (moved?)" in flat(result.stderr)


def test_runs_show_sums_up_a_long_metric_series(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "fit.py").write_text(
        "from cairn import Run\nrun = Run.get_context()\n"
        "for i in range(200):\n    run.log('loss', 1 / (i + 1))\nrun.log('acc', 0.9)\nrun.log_list('few', [1, 2])\n")
    (tmp_path / "pipe.py").write_text(
        "from cairn import Workspace, PythonScriptStep, Pipeline, Experiment\nws = Workspace.create('.')\n"
        "Experiment(ws, 'e').submit(Pipeline(ws, [PythonScriptStep('fit.py', name='fit', source_directory='src')]))\n")
    import re

    ran = cairn("run", "pipe.py", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    run_id = re.search(r"run_[0-9a-z]+", ran.stdout + ran.stderr).group(0)
    shown = flat(cairn("runs", "show", run_id, cwd=tmp_path).stdout)
    assert "loss: 200 values, last 0.005, min 0.005, max 1" in shown and "acc: 0.9" in shown and "few: [1, 2]" in shown
    full = json.loads(cairn("runs", "show", run_id, "--json", cwd=tmp_path).stdout)
    assert len(full["steps"][0]["metrics"]["loss"]) == 200  # --json has every value


WAITS_ITSELF = """\
from cairn import Experiment, Pipeline, PythonScriptStep, Workspace

ws = Workspace.from_config()
run = Experiment(ws, "waits").submit(Pipeline(ws, [PythonScriptStep("long.py", name="long", source_directory="src")]))
print("RUN", run.id, flush=True)
run.wait_for_completion(show_output=False)  # no timeout of its own: the Azure ML habit
"""


def test_timeout_also_ends_a_wait_of_the_file_itself(project: Project) -> None:
    project.write_step("long.py", "import time\ntime.sleep(120)\n")
    (project.root / "waits.py").write_text(WAITS_ITSELF)
    started = time.monotonic()
    result = project.cairn("run", "--timeout", "2", "waits.py")
    assert result.returncode == 3, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    run_id = re.search(r"^RUN (run_\w+)$", result.stdout, re.M).group(1)  # type: ignore[union-attr]
    assert "timeout" in flat(result.stderr) and f"cairn cancel {run_id}" in flat(result.stderr)
    no_traceback(result)
    assert project.cairn("cancel", run_id).returncode == 0


def test_logs_follow_shows_the_system_log_at_the_end_when_asked(completed: Done) -> None:
    result = completed.project.cairn("logs", completed.step_id, "--follow", "--system")
    assert result.returncode == 0, result.stderr
    assert "greet | hello from step" in result.stdout
    assert "system ---" in result.stdout and "attempt 1 of step" in result.stdout
    plain = completed.project.cairn("logs", completed.step_id, "--environment")
    assert "no environment build log" in flat(plain.stderr)


def test_init_on_a_file_is_a_clear_error(project: Project) -> None:
    (project.root / "pipeline.py").write_text("# a file, not a folder\n")
    result = project.cairn("init", "pipeline.py")
    assert result.returncode == 2 and "is a file, not a folder" in flat(result.stderr), result.stderr
    no_traceback(result)


def test_the_agent_is_stopped_from_the_command_line(completed: Done) -> None:
    from cairn.engine.client import ensure_agent, ping

    layout = WorkspaceLayout(completed.project.root)
    ensure_agent(layout)
    result = completed.project.cairn("agent", "--stop")
    assert result.returncode == 0, result.stderr
    assert "stopped the agent (pid" in flat(result.stdout) and not ping(layout)
    again = completed.project.cairn("agent", "--stop")
    assert again.returncode == 0 and "no agent serves" in flat(again.stdout)
    no_traceback(again)


def test_the_agent_status_says_who_serves_the_workspace(completed: Done) -> None:
    from cairn.engine.client import _request, ensure_agent, stop_agent

    layout = WorkspaceLayout(completed.project.root)
    ensure_agent(layout)
    pid = _request(layout, {"op": "ping"})["pid"]
    serving = completed.project.cairn("agent", "--status")
    assert serving.returncode == 0, serving.stderr
    said = flat(serving.stdout)
    assert f"agent pid {pid} " in said and "runs nothing now" in said and str(layout.agent_log) in said
    assert stop_agent(layout)
    none = completed.project.cairn("agent", "--status")
    assert none.returncode == 1 and "no agent serves" in flat(none.stdout)
    both = completed.project.cairn("agent", "--status", "--stop")
    assert both.returncode == 2 and "give one" in flat(both.stderr)
    no_traceback(both)
