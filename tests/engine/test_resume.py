"""Kill -9 the agent mid-run: the next agent resumes, finished steps are kept, nothing stays stuck."""

from __future__ import annotations

import os
import select
import signal
from pathlib import Path

from cairn import Experiment, Pipeline, PipelineData, PythonScriptStep
from cairn.core.status import ACTIVE
from cairn.engine.client import _request
from cairn.storage.layout import WorkspaceLayout

FIRST = """
import os, sys
os.makedirs(sys.argv[1], exist_ok=True)
open(os.path.join(sys.argv[1], "x.txt"), "w").write("x")
open(os.environ["MARKER"], "a").write("first\\n")
"""

SECOND = """
import os, sys, time
from cairn import Run
Run.get_context().log("attempt_metric", 1)
Run.get_context().add_properties({"attempt_token": str(os.getpid())})  # differs per attempt
open(os.environ["MARKER"], "a").write(f"second-start {os.getpid()}\\n")
deadline = time.time() + 60
while not os.path.exists(os.environ["GO"]):  # blocks until the test lets it finish
    if time.time() > deadline:
        raise SystemExit("never released")
    time.sleep(0.02)
open(os.environ["MARKER"], "a").write("second-done\\n")
"""


def _exits_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` has exited, or does within ``seconds`` (a kill takes effect when the
    process next runs, which on a loaded machine can come after the run has ended)."""
    try:
        fd = os.pidfd_open(pid)  # readable once the process has exited: no polling
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    finally:
        os.close(fd)


def _wait_until(workspace, run_id: str, predicate) -> None:
    watch = workspace._backend.watch(run_id)
    assert watch.connect()
    try:
        while not predicate():
            watch.wait(10)
    finally:
        watch.close()


def test_agent_killed_mid_run_is_resumed_without_rerunning_finished_steps(workspace, write_script, tmp_path,
                                                                         monkeypatch):
    marker, go = tmp_path / "marker.txt", tmp_path / "go"
    monkeypatch.setenv("MARKER", str(marker))
    monkeypatch.setenv("GO", str(go))
    src = write_script("first.py", FIRST)
    write_script("second.py", SECOND)
    data = PipelineData("data")
    first = PythonScriptStep("first.py", name="first", source_directory=src, arguments=[data], outputs=[data])
    second = PythonScriptStep("second.py", name="second", source_directory=src, arguments=[data.as_input()])
    run = Experiment(workspace, "crash").submit(Pipeline(workspace, [first, second]))
    step2 = run.find_step_run("second")[0]
    _wait_until(workspace, run.id, lambda: step2.get_status() == "Running")
    orphan_pid = step2._row()["pid"]
    assert Path(f"/proc/{orphan_pid}").exists()

    agent_pid = _request(WorkspaceLayout(workspace.location), {"op": "ping"})["pid"]
    os.kill(agent_pid, signal.SIGKILL)
    workspace._backend.ensure_progress()  # what wait_for_completion does: start a new agent

    def resumed() -> bool:
        return any("resumed" in (e["reason"] or "") for e in step2.get_details()["events"])

    _wait_until(workspace, run.id, resumed)
    go.touch()  # only the re-run can see this: the orphan was killed when the run was resumed
    details = run.wait_for_completion(show_output=False, timeout_seconds=120)

    assert details == "Completed"
    lines = marker.read_text().split("\n")
    assert lines.count("first") == 1  # the finished step was not run again
    assert lines.count("second-done") == 1
    assert _exits_within(orphan_pid, 30)  # the orphan was killed
    assert step2.get_status() == "Completed"
    assert step2.get_metrics() == {"attempt_metric": 1}  # the killed attempt's metric is gone
    assert "attempt_token" in step2.get_properties()  # set again, without a clash with attempt 1
    assert "==== cairn: attempt 2" in step2.get_stdout_log() + step2.get_stderr_log()
    reasons = [e["reason"] or "" for e in step2.get_details()["events"]]
    assert any("resumed" in r for r in reasons)
    assert run.find_step_run("first")[0].get_status() == "Completed"
    for child in workspace._backend.get_children(run.id):
        assert child["status"] not in {s.value for s in ACTIVE}
    new_agent = _request(WorkspaceLayout(workspace.location), {"op": "ping"})["pid"]
    assert new_agent != agent_pid


def test_queued_run_survives_an_agent_that_dies_before_claiming(workspace, write_script):
    src = write_script("ok.py", "print('ok')\n")
    layout = WorkspaceLayout(workspace.location)
    # Submit, then kill the agent at once: the run must still complete when someone waits.
    run = Experiment(workspace, "early").submit(Pipeline(workspace, [PythonScriptStep("ok.py", source_directory=src)]))
    reply = _request(layout, {"op": "ping"})
    if reply:
        os.kill(reply["pid"], signal.SIGKILL)
    assert run.wait_for_completion(show_output=False, timeout_seconds=120) == "Completed"


def test_a_stopped_agent_hands_its_running_steps_back_to_the_queue(workspace, write_script, tmp_path, monkeypatch):
    from cairn.engine.client import stop_agent

    marker, go = tmp_path / "marker.txt", tmp_path / "go"
    monkeypatch.setenv("MARKER", str(marker))
    monkeypatch.setenv("GO", str(go))
    src = write_script("second.py", SECOND)
    run = Experiment(workspace, "stop").submit(
        Pipeline(workspace, [PythonScriptStep("second.py", name="second", source_directory=src)]))
    step = run.find_step_run("second")[0]
    _wait_until(workspace, run.id, lambda: step.get_status() == "Running")
    assert stop_agent(WorkspaceLayout(workspace.location))
    assert step.get_status() == "Queued" and run.get_status() == "Queued"
    go.touch()
    assert run.wait_for_completion(show_output=False, timeout_seconds=120) == "Completed"
    assert marker.read_text().split("\n").count("second-done") == 1


def test_cancel_while_no_agent_runs_stops_the_run(workspace, write_script, tmp_path, monkeypatch):
    monkeypatch.setenv("MARKER", str(tmp_path / "marker.txt"))
    monkeypatch.setenv("GO", str(tmp_path / "go"))  # never created: the step would wait
    src = write_script("second.py", SECOND)
    run = Experiment(workspace, "cancel-dead").submit(
        Pipeline(workspace, [PythonScriptStep("second.py", name="second", source_directory=src)]))
    step = run.find_step_run("second")[0]
    _wait_until(workspace, run.id, lambda: step.get_status() == "Running")
    orphan = step._row()["pid"]
    os.kill(_request(WorkspaceLayout(workspace.location), {"op": "ping"})["pid"], signal.SIGKILL)
    run.cancel()
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Canceled"
    assert step.get_status() == "Canceled"
    assert _exits_within(orphan, 30), "the canceled step's process is still alive"
    assert [e["status"] for e in step.get_details()["events"]].count("Running") == 1  # never started again


def test_the_end_of_an_abandoned_attempt_does_not_touch_the_step_run_again(tmp_path):
    """A run whose lease this agent lost is abandoned (its steps stopped, requeued); if the agent
    claims it again and reruns a step, the late end of the abandoned attempt must not end or
    forget the new one."""
    from cairn.engine.agent import Agent
    from cairn.runner.execute import StepControl
    from cairn.runner.job import StepResult

    agent = Agent(WorkspaceLayout(tmp_path / "ws"))
    abandoned, current = StepControl(), StepControl()
    agent.controls["step_1"] = current  # the rerun's attempt
    agent.step_parent["step_1"] = "run_1"
    assert agent._handle(("done", StepResult("step_1", "Queued", None, None), abandoned))
    assert agent.controls["step_1"] is current and agent.step_parent["step_1"] == "run_1"
    assert agent._handle(("done", StepResult("step_1", "Completed", None, 0), current))
    assert "step_1" not in agent.controls and "step_1" not in agent.step_parent
