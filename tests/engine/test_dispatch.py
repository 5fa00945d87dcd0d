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

    def notify(self, run_id: str, final: bool = False, status: str | None = None) -> None: ...

    def running(self, run_id: str) -> None: ...

    def let_go(self, run_id: str) -> None: ...

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


class NoDispatch:
    """A target for runs whose steps are all reused: it has room, and is never given a step."""

    def free_slots(self) -> int:
        return 2

    def submit(self, job: Any, reporter: Any, control: Any, done: Any) -> None:
        raise AssertionError(f"step {job.step_run_id} was dispatched; every step should have been reused")

    def prestart(self, *args: Any, **kwargs: Any) -> None: ...

    def shutdown(self) -> None: ...


class EndingFront(QuietFront):
    def __init__(self, runs: int) -> None:
        super().__init__()
        self.waiting_for = runs
        self.ended = threading.Event()

    def notify(self, run_id: str, final: bool = False, status: str | None = None) -> None:
        if final:
            self.waiting_for -= 1
            if self.waiting_for == 0:
                self.ended.set()


def _rerun_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     allow_reuse: tuple[bool, ...] = (True, True, True)) -> tuple[Workspace, Any, Any]:
    """A three-step chain run once by a real agent, then submitted again, to be run by an agent in
    this process (whose store functions a test may replace). Returns the workspace, the second run
    and what makes the chain's pipeline."""
    ws = Workspace.create(tmp_path / "ws")
    src = tmp_path / "src"
    src.mkdir()
    (src / "s.py").write_text("import sys, pathlib\npathlib.Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)\n"
                              "(pathlib.Path(sys.argv[2]) / 'x').write_text(sys.argv[1])\n")

    def chain() -> Pipeline:
        from cairn import PipelineData

        data = [PipelineData(f"d{i}") for i in range(3)]
        return Pipeline(ws, [PythonScriptStep("s.py", name=f"s{i}", source_directory=str(src),
                                              arguments=[str(i), data[i]] + ([data[i - 1]] if i else []),
                                              outputs=[data[i]], allow_reuse=allow_reuse[i]) for i in range(3)])

    assert Experiment(ws, "reuse").submit(chain()).wait_for_completion(show_output=False) == "Completed"
    agent_client.stop_agent(WorkspaceLayout(ws.location))
    monkeypatch.setattr(agent_client, "ensure_agent", lambda layout: None)  # the rerun's agent runs here
    monkeypatch.setattr(agent_client, "prestart_agent", lambda layout: None)
    return ws, Experiment(ws, "reuse").submit(chain()), chain


class FailingTarget(NoDispatch):
    """Records the steps it is given and ends each at once, failed."""

    def __init__(self) -> None:
        self.given: list[str] = []

    def submit(self, job: Any, reporter: Any, control: Any, done: Any) -> None:
        from cairn.runner.job import StepResult

        self.given.append(job.step_run_id)
        done(StepResult(job.step_run_id, "Failed", "failed by the test's target", 1))


def _serve_until_the_run_ends(ws: Workspace, runs: int = 1, within: float = 30, target: Any = None) -> None:
    front = EndingFront(runs)
    agent = agent_module.Agent(WorkspaceLayout(ws.location), idle_timeout=None, front=front)
    agent.ctx = EngineContext.open(agent.layout)
    agent.reporter = None  # the test targets report nothing themselves
    agent.computes["local"] = target or NoDispatch()
    agent._compute_configs["local"] = {}
    loop = threading.Thread(target=agent._loop, daemon=True)
    loop.start()
    try:
        assert front.ended.wait(timeout=within), f"{front.waiting_for} of {runs} run(s) did not end"
    finally:
        agent.events.put(("stop", "test over"))
        loop.join(timeout=30)


def test_a_rerun_records_the_reuses_of_one_dispatch_pass_in_one_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cairn.store import queries
    from cairn.store.db import Store

    ws, run, _ = _rerun_in_process(tmp_path, monkeypatch)
    batches: list[list[str]] = []
    record = queries.record_reuses_in
    writes: list[str] = []

    def counted(conn: Any, records: list[Any]) -> list[str]:
        batches.append([r[0] for r in records])
        return record(conn, records)

    for kind in ("write", "fast_write"):
        def counting(self: Store, kind: str = kind, original: Any = getattr(Store, kind)) -> Any:
            writes.append(kind)
            return original(self)

        monkeypatch.setattr(Store, kind, counting)
    monkeypatch.setattr(queries, "record_reuses_in", counted)
    _serve_until_the_run_ends(ws)
    steps = {s.name: s for s in run.get_steps()}
    assert run.get_status() == "Completed"
    assert {n: s.get_status() for n, s in steps.items()} == {"s0": "Reused", "s1": "Reused", "s2": "Reused"}
    assert batches == [[steps[n].id for n in ("s0", "s1", "s2")]]  # the whole chain in one pass
    # its claim (which makes it Running), then its reuses with its end (which ends the lease)
    assert len(writes) == 2, writes
    assert run._row()["lease_owner"] is None and run._row()["lease_expires_at"] is None
    for i in range(3):  # each reused step has its source's output, as downstream steps read it
        output = steps[f"s{i}"].get_output_data(f"d{i}")
        assert output.local_path is not None and (output.local_path / "x").read_text() == str(i)


def test_reuses_the_store_could_not_record_fail_their_steps_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    from cairn.store import queries

    ws, run, _ = _rerun_in_process(tmp_path, monkeypatch)

    def locked(conn: Any, records: list[Any]) -> list[str]:
        raise OperationalError("INSERT ...", {}, Exception("database is locked"))

    monkeypatch.setattr(queries, "record_reuses_in", locked)
    _serve_until_the_run_ends(ws)
    assert run.get_status() == "Failed"
    for step in run.get_steps():
        assert step.get_status() == "Failed"
        assert "could not record its reuse: OperationalError" in step.get_details()["statusReason"]


def test_an_end_the_store_refused_once_does_not_fail_the_reuses_it_carried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last reuses go with the run's end, in one transaction: when that transaction fails for
    the end's own sake (the store busy once), the reuses are recorded alone and the end again:
    the run completes, its steps reused, nothing blamed on them."""
    from sqlalchemy.exc import OperationalError

    from cairn.core.status import Status
    from cairn.store import queries

    ws, run, _ = _rerun_in_process(tmp_path, monkeypatch)
    moves = queries.set_statuses
    refused: list[str] = []

    def busy_once(conn: Any, batch: list[Any]) -> list[bool]:
        if not refused and any(m[0] == run.id and m[1] == Status.COMPLETED for m in batch):
            refused.append(run.id)
            raise OperationalError("UPDATE ...", {}, Exception("database is locked"))
        return moves(conn, batch)

    monkeypatch.setattr(queries, "set_statuses", busy_once)
    _serve_until_the_run_ends(ws)
    assert refused == [run.id]
    assert run.get_status() == "Completed"
    assert {s.name: s.get_status() for s in run.get_steps()} == {"s0": "Reused", "s1": "Reused", "s2": "Reused"}


def test_runs_queued_together_are_each_claimed_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent claims one run per turn of its loop, and turns again at once while runs may be
    waiting: runs that end without a single event (all reused) do not leave the next one to the
    periodic look at the queue (every 10 s)."""
    ws, first, chain = _rerun_in_process(tmp_path, monkeypatch)
    others = [Experiment(ws, "reuse").submit(chain()) for _ in range(2)]
    _serve_until_the_run_ends(ws, runs=3, within=5)
    assert [r.get_status() for r in (first, *others)] == ["Completed"] * 3


def test_a_step_whose_upstream_reuse_could_not_be_recorded_is_not_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """s0 is reused, s1 (allow_reuse=False) would start in the same dispatch pass: the store refuses
    s0's reuse, s0 fails, and s1 must not start on an upstream step that failed."""
    from sqlalchemy.exc import OperationalError

    from cairn.store import queries

    ws, run, _ = _rerun_in_process(tmp_path, monkeypatch, allow_reuse=(True, False, True))

    def locked(conn: Any, records: list[Any]) -> list[str]:
        raise OperationalError("INSERT ...", {}, Exception("database is locked"))

    monkeypatch.setattr(queries, "record_reuses_in", locked)
    target = FailingTarget()
    _serve_until_the_run_ends(ws, target=target)
    steps = {s.name: s for s in run.get_steps()}
    assert target.given == []
    assert [steps[n].get_status() for n in ("s0", "s1", "s2")] == ["Failed", "NotStarted", "NotStarted"]
    assert "upstream step 's0' failed" in steps["s1"].get_details()["statusReason"]
    assert "reused the outputs" not in steps["s0"].get_system_log()  # never a reuse the store did not record


class EndedBeforeTheCancel(NoDispatch):
    """Like a Ray task that recorded its failure just before a cancel reached its driver, which then
    reports the step Canceled."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def submit(self, job: Any, reporter: Any, control: Any, done: Any) -> None:
        from cairn.core.status import Status
        from cairn.runner.job import StepResult
        from cairn.store import queries

        queries.update_status(self.store, job.step_run_id, Status.RUNNING)
        queries.update_status(self.store, job.step_run_id, Status.FAILED, "exit code 1", exit_code=1)
        done(StepResult(job.step_run_id, "Canceled", "pipeline run canceled", None))


def test_an_ending_the_store_recorded_before_a_cancel_stands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws, run, _ = _rerun_in_process(tmp_path, monkeypatch, allow_reuse=(False, False, False))
    _serve_until_the_run_ends(ws, target=EndedBeforeTheCancel(EngineContext.open(WorkspaceLayout(ws.location)).store))
    s0 = run.find_step_run("s0")[0]
    assert s0.get_status() == "Failed"
    assert run.get_status() == "Failed"  # as its step is, not Canceled


def test_a_run_recorded_as_the_agent_stops_is_handed_to_a_new_agent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_script) -> None:
    """A client whose run the agent recorded sends no poke (the agent claims it). If the agent is
    asked to stop just then, it never claims it: as it stops it starts a new agent for it, as the
    poke would have. Runs it merely handed back as it stopped wait, as before."""
    import signal

    from cairn.backend.relay import ScriptService
    from cairn.backend.through_agent import serve_scripts

    started: list[str] = []
    monkeypatch.setattr(agent_client, "prestart_agent", lambda layout: started.append(str(layout.root)))
    monkeypatch.setattr(agent_client, "ensure_agent", lambda layout: None)
    ws = Workspace.create(tmp_path / "ws")
    src = write_script("s.py", "print('hi')\n")
    serving = threading.Event()
    agent: Any = None

    def serve_and_stop_on_record(workspace: str, on_recorded: Any, store: Any) -> Any:
        def stop_first(run_id: str, *recorded: Any) -> None:  # the stop comes just before the run's own event
            agent.events.put(("stop", "asked as a run was recorded"))
            on_recorded(run_id, *recorded)

        stop = serve_scripts(workspace, stop_first, store)
        serving.set()
        return stop

    agent = agent_module.Agent(WorkspaceLayout(ws.location), idle_timeout=None, front=QuietFront(),
                               script_service=ScriptService, serve_scripts=serve_and_stop_on_record)
    submitted: list[str] = []

    def submit() -> None:
        assert serving.wait(30)
        here = Workspace(ws.location)  # through the agent's scripts socket
        submitted.append(Experiment(here, "stop").submit(Pipeline(here, [
            PythonScriptStep("s.py", name="s", source_directory=str(src))])).id)

    client_thread = threading.Thread(target=submit, daemon=True)
    client_thread.start()
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert agent.serve() == 0  # (returns once it stopped)
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
    client_thread.join(30)
    (run_id,) = submitted
    assert ws._backend.get_run(run_id)["status"] == "Queued"
    assert started == [ws.location]
