"""A local step's Run.get_context() reaches the workspace through the agent that runs it (no store
opened in the step's process); calls outside the scripts' set, and steps with no agent to answer,
open the workspace in the step's own process, as before."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
from cairn.backend.local import LocalBackend
from cairn.backend.through_agent import AgentBackend, serve_scripts, workspace_backend
from cairn.storage.layout import WorkspaceLayout

LOGGING_STEP = """
    import sys
    from cairn import Run
    run = Run.get_context()
    run.log("loss", 0.25)
    run.log("loss", 0.125)
    run.tag("stage", "train")
    run.parent.log("from_step", 1)
    run.log("store_opened_here", "sqlalchemy" in sys.modules)
    if len(sys.argv) > 1:  # a call outside the scripts' set: the workspace is opened here for it
        run.upload_file("note.txt", __file__)
        run.log("store_opened_after_upload", "sqlalchemy" in sys.modules)
"""


def _run(workspace: Workspace, src: Path, *arguments: str) -> tuple:
    step = PythonScriptStep("log.py", name="log", source_directory=str(src), arguments=list(arguments))
    run = Experiment(workspace, "context").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    return run, run.get_steps()[0]


def test_a_local_steps_run_context_goes_through_the_agent(workspace: Workspace,
                                                          write_script: Callable[..., Path]) -> None:
    run, step = _run(workspace, write_script("log.py", LOGGING_STEP))
    metrics = step.get_metrics()
    assert metrics["loss"] == [0.25, 0.125] and metrics["store_opened_here"] is False
    assert step.get_tags()["stage"] == "train"
    assert run.get_metrics()["from_step"] == 1


def test_a_call_outside_the_scripts_set_opens_the_workspace_in_the_step(workspace: Workspace,
                                                                        write_script: Callable[..., Path]) -> None:
    _, step = _run(workspace, write_script("log.py", LOGGING_STEP), "--upload")
    metrics = step.get_metrics()
    assert metrics["store_opened_here"] is False and metrics["store_opened_after_upload"] is True
    assert "note.txt" in step.get_file_names()


def test_with_no_agent_to_answer_the_step_opens_the_workspace_itself(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws")
    assert isinstance(workspace_backend(ws.location), LocalBackend)  # no socket at all
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a dead agent's socket file: nobody listens
    stale.bind(str(WorkspaceLayout(ws.location).scripts_socket))
    stale.close()
    assert isinstance(workspace_backend(ws.location), LocalBackend)


def test_the_scripts_socket_answers_with_the_workspace_and_replaces_a_dead_agents(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws")
    path = WorkspaceLayout(ws.location).scripts_socket
    path.touch()  # left by an agent that died
    stop = serve_scripts(ws.location)
    try:
        backend = workspace_backend(ws.location)
        assert isinstance(backend, AgentBackend)
        assert backend.location == ws.location
        assert backend.list_experiments() == ws._backend.list_experiments()
        assert [d["name"] for d in backend.list_datastores()] == ["workspaceblobstore"]
    finally:
        stop()
    assert not path.exists()
