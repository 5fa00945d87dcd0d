"""The agent's dispatch passes: they run after events that can start a step, not after every status
change — but a target whose free slots grew without an ending (a Ray cluster whose size became
known) gets its waiting steps started at the next status change of the run."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import pytest

import cairn.engine.client as agent_client
from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
from cairn.engine import agent as agent_module
from cairn.engine.context import EngineContext
from cairn.storage.layout import WorkspaceLayout


class GrowingTarget:
    """Like a Ray target before it knows its cluster: one slot. Once a dispatch pass has found it
    full, it learns it has four, and its running step reports a status change (no step ends)."""

    def __init__(self, events: queue.Queue) -> None:
        self.events = events
        self.capacity = 0
        self.started: list[str] = []
        self.seen_full = threading.Event()
        self.all_started = threading.Event()

    def free_slots(self) -> int:
        if self.capacity == 0:
            if self.started:
                self.seen_full.set()
                return 0
            return 1
        return self.capacity - len(self.started)

    def submit(self, job: Any, reporter: Any, control: Any, done: Any) -> None:
        self.started.append(job.step_run_id)
        if len(self.started) == 1:
            threading.Thread(target=self._learn, args=(job.pipeline_run_id,), daemon=True).start()
        if len(self.started) == 4:
            self.all_started.set()

    def _learn(self, run_id: str) -> None:
        self.seen_full.wait()
        self.capacity = 4
        self.events.put(("changed", run_id))

    def prestart(self, *args: Any, **kwargs: Any) -> None: ...

    def shutdown(self) -> None: ...


class QuietFront:
    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def has_watchers(self) -> bool:
        return True

    def notify(self, run_id: str, final: bool = False) -> None: ...

    def reply(self, *args: Any) -> None: ...

    def close(self) -> None: ...


def test_steps_waiting_for_a_target_that_grew_start_at_the_next_status_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_client, "ensure_agent", lambda layout: None)  # this test's agent runs in-process
    monkeypatch.setattr(agent_client, "prestart_agent", lambda layout: None)
    ws = Workspace.create(tmp_path / "ws")
    src = tmp_path / "src"
    src.mkdir()
    (src / "s.py").write_text("print('hi')\n")
    steps = [PythonScriptStep("s.py", name=f"s{i}", source_directory=str(src), arguments=[str(i)],
                              allow_reuse=False) for i in range(4)]
    Experiment(ws, "grow").submit(Pipeline(ws, steps))
    agent = agent_module.Agent(WorkspaceLayout(ws.location), idle_timeout=None, front=QuietFront())
    agent.ctx = EngineContext.open(agent.layout)
    agent.reporter = None  # the target below reports nothing: it only counts the steps it was given
    target = GrowingTarget(agent.events)
    agent.computes["local"] = target
    agent._compute_configs["local"] = {}
    loop = threading.Thread(target=agent._loop, daemon=True)
    loop.start()
    try:
        # well before the periodic pass (every LEASE_TTL / 3 = 10 s)
        assert target.all_started.wait(timeout=5), f"only {len(target.started)} of 4 steps started"
    finally:
        agent.events.put(("stop", "test over"))
        loop.join(timeout=30)
