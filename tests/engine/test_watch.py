"""Watching a run through the agent: a watcher of a run's end is told whether this agent runs it,
so a follower waits for that end without reading the run first."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cairn import Experiment, Pipeline, PythonScriptStep
from cairn.client.follow import follow
from cairn.engine import client
from cairn.storage.layout import WorkspaceLayout
from tests.reads import CountingReads


def _waiting_run(workspace, write_script, tmp_path: Path, then: str = "") -> tuple:
    """A run of one step that reads the FIFO returned to its end (then runs ``then``)."""
    fifo = tmp_path / "go-on"
    os.mkfifo(fifo)
    src = write_script("wait.py", f"open({str(fifo)!r}).read()\n{then}")
    run = Experiment(workspace, "watch").submit(Pipeline(workspace, [
        PythonScriptStep("wait.py", name="wait", source_directory=str(src))]))
    return run, fifo


def _told_when_subscribed(monkeypatch) -> threading.Event:
    """Set once a follower's subscription is in place (``Watch.connect`` returned)."""
    subscribed = threading.Event()
    connect = client.Watch.connect

    def connected(self, *timeout: float) -> bool:
        made = connect(self, *timeout)
        subscribed.set()
        return made

    monkeypatch.setattr(client.Watch, "connect", connected)
    return subscribed


def test_a_watcher_of_a_run_the_agent_runs_is_told_so_and_then_its_end(workspace, write_script, tmp_path) -> None:
    run, fifo = _waiting_run(workspace, write_script, tmp_path)
    layout = WorkspaceLayout(workspace.location)
    with open(fifo, "w"):  # open once the step has it open: the agent has claimed the run
        watch = client.Watch(layout, run.id, final_only=True)
        assert watch.connect() and watch.running
    try:
        # the step read to the end: it ended, as the store has recorded
        assert watch.wait(60) == {"event": "final", "run": run.id, "status": "Completed"}
    finally:
        watch.close()
    assert run.get_status() == "Completed"  # told once the store has it
    after = client.Watch(layout, run.id, final_only=True)
    try:
        assert after.connect() and not after.running  # ended: a follower reads it
    finally:
        after.close()


def test_a_follower_of_a_running_runs_end_reads_nothing_when_told_it_completed(
        workspace, write_script, tmp_path, monkeypatch) -> None:
    run, fifo = _waiting_run(workspace, write_script, tmp_path)
    counting = CountingReads(workspace._backend)
    subscribed = _told_when_subscribed(monkeypatch)
    ended: list[str] = []
    with open(fifo, "w"):  # the step runs until this closes
        follower = threading.Thread(target=lambda: ended.append(follow(counting, run.id, show_output=False)))
        follower.start()
        assert subscribed.wait(30)
    follower.join(60)
    assert ended == ["Completed"]
    assert counting.reads == []  # the agent told its end, Completed: nothing to read


def test_a_follower_of_a_run_that_fails_reads_its_end_once(workspace, write_script, tmp_path, monkeypatch) -> None:
    """A failed run's end is read (what failed is said from the store), once."""
    import pytest

    from cairn.core.errors import RunFailedError

    run, fifo = _waiting_run(workspace, write_script, tmp_path, then="raise SystemExit(3)\n")
    counting = CountingReads(workspace._backend)
    subscribed = _told_when_subscribed(monkeypatch)
    ended: list[BaseException] = []

    def following() -> None:
        with pytest.raises(RunFailedError) as failed:
            follow(counting, run.id, show_output=False)
        ended.append(failed.value)

    with open(fifo, "w"):  # the step runs until this closes
        follower = threading.Thread(target=following)
        follower.start()
        assert subscribed.wait(30)
    follower.join(60)
    assert len(ended) == 1 and "wait" in str(ended[0])
    assert counting.reads == [run.id]
