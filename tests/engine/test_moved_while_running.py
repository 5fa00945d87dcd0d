"""A workspace moved while one of its steps runs: its agent stops without making a new, empty
workspace store at the old place (nor dying on one), and says why in its log."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
from cairn.engine.client import _request
from cairn.storage.layout import WorkspaceLayout


def _gone(pid: int, seconds: float) -> bool:
    """Whether the process ended (exited: a zombie of this test process counts) within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)  # (waiting for another process to exit: nothing to block on)
    return False


def test_an_agent_whose_workspace_moved_while_a_step_ran_makes_nothing_at_the_old_place(tmp_path: Path) -> None:
    old, new = tmp_path / "ws", tmp_path / "moved"
    ws = Workspace.create(old)
    fifo = tmp_path / "go-on"
    os.mkfifo(fifo)
    src = tmp_path / "src"
    src.mkdir()
    (src / "wait.py").write_text(f"open({str(fifo)!r}).read()\nprint('done')\n")
    (src / "after.py").write_text("print('after')\n")
    # a second step after it: the agent has more to do in the store once the first ends
    run = Experiment(ws, "moved").submit(Pipeline(ws, [
        PythonScriptStep("wait.py", name="wait", source_directory=str(src)),
        PythonScriptStep("after.py", name="after", source_directory=str(src))]))
    agent_pid = (_request(WorkspaceLayout(ws.location), {"op": "sync"}) or {})["pid"]
    with open(fifo, "w"):  # opened once the step has it open: it runs
        shutil.move(str(old), str(new))
    try:
        assert _gone(agent_pid, 60), "the agent of the moved workspace is still running"
    finally:
        try:
            os.kill(agent_pid, 9)
        except ProcessLookupError:
            pass
    assert not (old / ".cairn" / "cairn.db").exists()
    log = (new / ".cairn" / "agent.log").read_text()
    assert "Traceback" not in log, log[-2000:]
    assert run.id  # (the run itself goes on once an agent serves the workspace where it is now)
