"""Large outputs handed to their consumers before they are digested (local compute): a consumer
whose reuse cannot depend on the digest starts while its producer digests; its fingerprint is made
from the digest once it comes; a producer that fails meanwhile fails the consumer, saying why."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import cairn.engine.client as agent_client
from cairn import Experiment, OutputFileDatasetConfig, Pipeline, PipelineData, PythonScriptStep, Workspace
from cairn.core.status import Status
from cairn.engine import agent as agent_module
from cairn.engine.context import EngineContext
from cairn.engine.fingerprint import definition_of, fingerprint
from cairn.engine.late_digests import LateDigests
from cairn.engine.reporter import StoreReporter
from cairn.engine.scheduler import PipelineScheduler
from cairn.runner import execute
from cairn.storage.layout import WorkspaceLayout
from cairn.store import queries as q
from tests.engine.test_dispatch import EndingFront

BIG = execute.EARLY_HANDOFF_FROM + (1 << 20)

WRITER = f"""
import pathlib, sys
out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
with open(out / "big.bin", "wb") as f:
    f.write(b"x" * {BIG})
"""

READER = """
import pathlib, sys
data = (pathlib.Path(sys.argv[1]) / "big.bin").read_bytes()
out = pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
(out / "size").write_text(str(len(data)))
"""


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    folders = {}
    for name, code in (("writer", WRITER), ("reader", READER)):  # one folder each: editing one leaves the other
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / f"{name}.py").write_text(code)
    return folders


def _pipeline(ws: Workspace, sources: dict[str, Path], writer_reuse: bool = True,
              readers: tuple[tuple[str, dict[str, Any]], ...] = (("reader", {}),)) -> Pipeline:
    big = PipelineData("big")
    steps = [PythonScriptStep("writer.py", name="writer", source_directory=str(sources["writer"]),
                              arguments=[big], outputs=[big], allow_reuse=writer_reuse)]
    for name, how in readers:
        size = PipelineData(f"{name}_size")
        given = big.as_download() if how.get("download") else big.as_input()
        steps.append(PythonScriptStep("reader.py", name=name, source_directory=str(sources["reader"]),
                                      arguments=[given, size], outputs=[size],
                                      allow_reuse=how.get("allow_reuse", True)))
    return Pipeline(ws, steps)


class _Watching(StoreReporter):
    """The agent's reporter, telling the test when a second step started running."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.running: list[str] = []
        self.second_running = threading.Event()

    def started(self, step_run_id: str, status: Status, **fields: Any) -> bool:
        ok = super().started(step_run_id, status, **fields)
        if status == Status.RUNNING and step_run_id not in self.running:
            self.running.append(step_run_id)
            if len(self.running) == 2:
                self.second_running.set()
        return ok


class _AgentHere:
    """An agent in this process for the workspace's queued run (so that a test can hold its
    digests), reporting through ``reporter_class``; it serves inside ``with``."""

    def __init__(self, ws: Workspace, reporter_class: type[StoreReporter] = StoreReporter, runs: int = 1,
                 late: bool = False) -> None:
        """``late``: outputs may be committed before they are digested, as a served agent's are
        where no consumer waits for the digest (test_late_digests.py). Without it, these tests pin
        the hand-off a producer makes when one of its consumers needs the digest."""
        self.front = EndingFront(runs)
        agent = self.agent = agent_module.Agent(WorkspaceLayout(ws.location), idle_timeout=None, front=self.front)
        agent.ctx = EngineContext.open(agent.layout)
        if late:
            agent.late = LateDigests(agent.ctx.store, on_change=agent._step_changed,
                                     on_made=lambda step_run_id: agent.events.put(("made", step_run_id)))
        self.reporter: Any = reporter_class(
            agent.ctx.store, on_change=agent._step_changed, locate=agent.ctx.datastore_location,
            on_placed=lambda *placed: agent.events.put(("placed", *placed)),
            late=agent.late, may_digest_late=agent._may_digest_late)
        agent.reporter = self.reporter
        self.loop = threading.Thread(target=agent._loop, daemon=True)

    def __enter__(self) -> _AgentHere:
        self.loop.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.agent.events.put(("stop", "test over"))
        self.loop.join(timeout=30)
        for compute in self.agent.computes.values():
            compute.shutdown()

    def run_ended(self, within: float = 60) -> bool:
        return self.front.ended.wait(timeout=within)


def _serve_in_process(ws: Workspace) -> _Watching:
    """Run the queued run with an agent in this process."""
    with _AgentHere(ws, _Watching) as here:
        assert here.run_ended(), "the run did not end"
    return here.reporter


def _before_digesting_placed(monkeypatch: pytest.MonkeyPatch, first: Any) -> None:
    """``first(big)``, in the writer's thread, before its placed (read-only) output is digested
    (not before a staged one is)."""
    real = execute.digest_tree

    def hooked(path: Any, *walked: Any) -> Any:
        big = Path(path) / "big.bin"
        if big.exists() and not big.stat().st_mode & 0o222:
            first(big)
        return real(path, *walked)

    monkeypatch.setattr(execute, "digest_tree", hooked)


def _change_as_left_behind(big: Path) -> None:
    """Rewrite a committed (read-only) output file, as a process its step left running would."""
    os.chmod(big, 0o644)
    with open(big, "ab") as f:
        f.write(b"late")


def _no_agent_but_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before any Pipeline is built (it starts an agent in the background): an agent started by
    the client would take the run from the one in this process."""
    monkeypatch.setattr(agent_client, "ensure_agent", lambda layout: None)
    monkeypatch.setattr(agent_client, "prestart_agent", lambda layout: None)


def _submit_for_this_process(ws: Workspace, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> Any:
    assert agent_client.prestart_agent.__module__ != agent_client.__name__, "call _no_agent_but_this_process first"
    return Experiment(ws, "handoff").submit(pipeline)


@pytest.fixture
def no_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_agent_but_this_process(monkeypatch)


def _serve_holding(ws: Workspace, monkeypatch: pytest.MonkeyPatch, then: Any = None) -> tuple[_Watching, list[bool]]:
    """Run the queued run in this process, the digest of the writer's placed output waiting until a
    second step runs (then ``then(big)``); returns the reporter and whether it did wait so."""
    here = _AgentHere(ws, _Watching)
    waited: list[bool] = []

    def hold(big: Path) -> None:
        waited.append(here.reporter.second_running.wait(timeout=30))
        if then is not None:
            then(big)

    _before_digesting_placed(monkeypatch, hold)
    with here:
        assert here.run_ended(), "the run did not end"
    return here.reporter, waited


def test_a_consumer_starts_while_its_large_input_is_digested_and_is_keyed_by_the_digest(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    _reporter, waited = _serve_holding(ws, monkeypatch)
    assert waited == [True]  # the reader ran while the writer's output was not yet digested
    assert run.get_status() == "Completed"
    writer, reader = run.find_step_run("writer")[0], run.find_step_run("reader")[0]
    assert (reader.get_output_data("reader_size").local_path / "size").read_text() == str(BIG)
    ctx = EngineContext.open(WorkspaceLayout(ws.location))
    produced = q.get_outputs(ctx.store, writer.id)["big"]
    assert produced["digest"].startswith("blake2b:") and produced["size"] == BIG
    keyed = reader.get_fingerprint()
    # the reader's fingerprint names the digest that came after it started, as if it had waited
    assert keyed["parts"]["input:big"] == produced["digest"]
    assert keyed["fingerprint"] == fingerprint(keyed["parts"])
    log = (Path(ws.location) / ".cairn").glob(f"datastores/*/runs/{run.id}/{reader.id}/logs/system.txt")
    text = next(log).read_text()
    assert "digest pending: its producer is digesting it" in text
    assert f"digested by step run {writer.id} after this step started" in text

    # the same pipeline again: both reused, the reader by the fingerprint it was given at its end
    again = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    _serve_in_process(ws)
    assert {s.name: s.get_status() for s in again.get_steps()} == {"writer": "Reused", "reader": "Reused"}


def test_a_producer_whose_placed_output_changes_fails_and_so_does_its_early_consumer(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    _reporter, waited = _serve_holding(ws, monkeypatch, then=_change_as_left_behind)
    assert waited == [True]
    assert run.get_status() == "Failed"
    writer, reader = run.find_step_run("writer")[0], run.find_step_run("reader")[0]
    assert writer.get_status() == "Failed"
    assert "output 'big' changed while it was being digested" in writer.get_details()["statusReason"]
    assert not list(Path(ws.location).glob(".cairn/agent.log"))  # (no agent but the test's took part)
    assert reader.get_status() == "Failed"
    reason = reader.get_details()["statusReason"]
    assert f"input 'big' was handed over before step run {writer.id} digested it" in reason
    assert "did not complete" in reason and "changed while it was being digested" in reason
    ctx = EngineContext.open(WorkspaceLayout(ws.location))
    assert q.lookup_cache(ctx.store, reader.get_fingerprint()["fingerprint"] or "none") is None
    placed = Path(ws.location) / ".cairn" / "datastores" / "workspaceblobstore" / "runs" / run.id / writer.id
    assert not (placed / "outputs" / "big").exists()  # never committed: not left where it was placed


def test_an_edited_producer_that_writes_the_same_bytes_still_lets_its_consumer_be_reused(
        workspace: Workspace, sources: dict[str, Path]) -> None:
    """The consumer's definition was cached: it waits for the digest, which matches."""
    exp = Experiment(workspace, "handoff")
    assert exp.submit(_pipeline(workspace, sources)).wait_for_completion(show_output=False) == "Completed"
    with open(sources["writer"] / "writer.py", "a") as f:
        f.write("# edited: the same bytes\n")
    run = exp.submit(_pipeline(workspace, sources))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert {s.name: s.get_status() for s in run.get_steps()} == {"writer": "Completed", "reader": "Reused"}


def test_only_consumers_whose_reuse_cannot_depend_on_the_digest_start_early(
        tmp_path: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    # once, so that the reader's definition is cached
    first = Experiment(ws, "handoff").submit(_pipeline(ws, sources))
    assert first.wait_for_completion(show_output=False) == "Completed"
    agent_client.stop_agent(WorkspaceLayout(ws.location))
    with open(sources["writer"] / "writer.py", "a") as f:
        f.write("# edited\n")
    _no_agent_but_this_process(monkeypatch)
    pipeline = _pipeline(ws, sources, readers=(("reader", {}), ("copier", {"download": True}),
                                               ("always", {"allow_reuse": False}), ("fresh", {})))
    writer = pipeline.steps[0]
    registered = OutputFileDatasetConfig("registered").register_on_complete("big_data")
    writer.outputs.append(registered)
    writer.arguments += [registered]
    after = PythonScriptStep("reader.py", name="after", source_directory=str(sources["reader"]), allow_reuse=False)
    after.run_after(writer)
    reads_registered = PythonScriptStep("reader.py", name="reads_registered", source_directory=str(sources["reader"]),
                                        arguments=[registered.as_input()], allow_reuse=False)
    run = _submit_for_this_process(ws, Pipeline(ws, [*pipeline.steps, after, reads_registered]), monkeypatch)
    ctx = EngineContext.open(WorkspaceLayout(ws.location))
    consumers = ("reader", "fresh", "copier", "always", "after", "reads_registered")

    def placed(hands_over_early: bool = True) -> PipelineScheduler:
        sched = PipelineScheduler(ctx, run.id, hands_over_early=lambda target: hands_over_early)
        sched.started(sched.spec.step("writer"))
        records = [{"name": name, "datastore": "workspaceblobstore", "path": f"somewhere/{name}", "digest": None,
                    "size": BIG, "file_count": 1, "stat_signature": "sig"} for name in ("big", "registered")]
        sched.outputs_placed(sched.step_ids["writer"], records)
        return sched

    sched = placed()
    # "always" is never reused and "fresh" never ran (another output name: another definition):
    # they start. "reader" ran before (an equal digest would reuse it), "copier" reads a copy
    # (made through the digest), "after" only runs after it (nothing would tie its end to the
    # writer's), "reads_registered" reads an output registered as a dataset (its lineage comes
    # with the writer's end): they wait.
    assert {n for n in consumers if sched.may_start(n)} == {"always", "fresh"}
    assert sched.released_by("writer") == ["always", "fresh"]  # withdrawn by the agent if the writer fails
    assert sched.prepare(sched.spec.step("writer")).hand_over_early  # the writer's job is told to place early
    assert not sched.prepare(sched.spec.step("after")).hand_over_early  # no consumer: nothing to hand over
    sched.finished("writer", Status.FAILED)  # the producer failed after all: they wait for it again
    assert {n: sched._unmet[n] for n in consumers} == dict.fromkeys(consumers, 1)
    assert sched.released_by("writer") == []
    assert sched.step_ids["writer"] not in sched._outputs  # what it placed was never committed
    sched = placed()
    sched.finished("writer", Status.COMPLETED)  # counted once, whether released early or not
    assert sched.step_ids["writer"] not in sched._outputs  # not told its committed outputs: read from the store
    assert {n for n in consumers if sched.may_start(n)} == set(consumers)
    assert {n: sched._unmet[n] for n in consumers} == dict.fromkeys(consumers, 0)
    nowhere = placed(hands_over_early=False)  # a target that cannot take them
    assert not nowhere.may_start("always") and not nowhere.prepare(nowhere.spec.step("writer")).hand_over_early


def test_outputs_with_a_fixed_destination_are_digested_before_they_are_placed(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixed destination must never hold what was not committed (a later run would find it taken)."""
    ws = Workspace.create(tmp_path / "ws")
    big = OutputFileDatasetConfig("big", destination=(ws.get_default_datastore(), "fixed/{run-id}"))
    writer = PythonScriptStep("writer.py", name="writer", source_directory=str(sources["writer"]),
                              arguments=[big], outputs=[big])
    size = PipelineData("size")
    reader = PythonScriptStep("reader.py", name="reader", source_directory=str(sources["reader"]),
                              arguments=[big.as_input(), size], outputs=[size], allow_reuse=False)
    run = _submit_for_this_process(ws, Pipeline(ws, [writer, reader]), monkeypatch)
    _reporter, waited = _serve_holding(ws, monkeypatch)
    assert run.get_status() == "Completed"
    assert waited == []  # digested in staging, as always: never placed undigested


def test_a_consumer_waiting_for_a_digest_when_its_agent_stops_runs_again_rather_than_failing(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources, readers=(("reader", {"allow_reuse": False}),)),
                                   monkeypatch)
    waiting, settled = threading.Event(), []
    both_settled = threading.Event()

    class Reporter(StoreReporter):
        def settled_job(self, job: Any, *stopped: Any) -> Any:
            waiting.set()
            return super().settled_job(job, *stopped)

        def settle(self, job: Any, result: Any) -> None:
            super().settle(job, result)
            settled.append((job.step_run_id, result.status))
            if len(settled) == 2:
                both_settled.set()

    here = _AgentHere(ws, Reporter)

    def stop_the_agent_first(big: Path) -> None:
        assert waiting.wait(timeout=30)  # the reader waits for this digest
        here.agent.events.put(("stop", "test: the agent stops"))
        here.loop.join(timeout=30)

    _before_digesting_placed(monkeypatch, stop_the_agent_first)
    with here:
        assert both_settled.wait(timeout=60), settled
    reader = run.find_step_run("reader")[0]
    assert dict(settled)[reader.id] == "Queued"  # it runs again with the run, not Failed
    assert reader.get_status() == "Queued" and run.get_status() == "Queued"


def test_the_migration_fills_in_definitions_as_the_engine_makes_them() -> None:
    path = Path(q.__file__).parent / "migrations" / "versions" / "0006_cache_entry_definition.py"
    spec = importlib.util.spec_from_file_location("migration_0006", path)
    assert spec and spec.loader
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    parts = {"kind": "python", "script": "s.py", "arguments": ["--x", {"input": "a"}], "params": {"é": 1},
             "input:a": "blake2b:00", "input:b": "xxh3:11"}
    assert migration._definition(json.dumps(parts)) == definition_of(parts)
    assert definition_of(parts) == definition_of({**parts, "input:a": "blake2b:ff"})
    assert migration._definition(None) is None and migration._definition("not json") is None


def test_a_consumer_that_adds_a_file_to_its_input_is_blamed_and_its_producer_completes(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a step that imports code kept in its input would (a __pycache__ folder next to it)."""
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources, readers=(("reader", {"allow_reuse": False}),)),
                                   monkeypatch)

    def add_beside(big: Path) -> None:  # while the writer digests, the reader writes into its input
        (big.parent / "__pycache__").mkdir()
        (big.parent / "__pycache__" / "mod.pyc").write_bytes(b"compiled")

    _reporter, waited = _serve_holding(ws, monkeypatch, then=add_beside)
    assert waited == [True]
    writer, reader = run.find_step_run("writer")[0], run.find_step_run("reader")[0]
    assert writer.get_status() == "Completed"  # what it wrote is whole and committed
    assert (writer.get_output_data("big").local_path / "big.bin").stat().st_size == BIG
    assert reader.get_status() == "Failed"
    assert "the step changed its input 'big'" in reader.get_details()["statusReason"]


def test_a_consumer_canceled_while_it_waits_for_a_digest_ends_at_once(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources, readers=(("reader", {"allow_reuse": False}),)),
                                   monkeypatch)
    waiting, reader_ended = threading.Event(), threading.Event()

    class Reporter(StoreReporter):
        def settled_job(self, job: Any, stopped: Any = lambda: False) -> Any:
            waiting.set()
            return super().settled_job(job, stopped)

        def settle(self, job: Any, result: Any) -> None:
            super().settle(job, result)
            if job.step.get("name") == "reader":
                reader_ended.set()

    here = _AgentHere(ws, Reporter)
    timely: list[bool] = []

    def cancel_first(big: Path) -> None:
        assert waiting.wait(timeout=30)  # the reader waits for this digest
        q.request_cancel(here.agent.ctx.store, run.id)
        here.agent.events.put(("poke",))
        timely.append(reader_ended.wait(timeout=10))  # before the digest ends

    _before_digesting_placed(monkeypatch, cancel_first)
    with here:
        assert here.run_ended()
    assert timely == [True]  # the reader ended without waiting for the digest any longer
    assert run.get_status() == "Canceled"
    assert run.find_step_run("reader")[0].get_status() == "Canceled"


def test_a_step_waiting_on_an_attempt_its_agent_gave_up_is_told_so() -> None:
    from cairn.runner.job import InputHandoffError, StepJob

    reporter = StoreReporter(store=None)  # type: ignore[arg-type]  (no store is touched here: it fails)
    producer = StepJob(workspace="", experiment="", pipeline_run_id="run", step_run_id="producer", attempt=1,
                       step={}, manifest={}, objects_root="", work_dir="", log_dir="", datastore_roots={},
                       output_dirs={}, staging_dirs={})
    reporter.outputs_placed(producer, [])
    consumer = StepJob(workspace="", experiment="", pipeline_run_id="run", step_run_id="consumer", attempt=1,
                       step={}, manifest={}, objects_root="", work_dir="", log_dir="", datastore_roots={},
                       output_dirs={}, staging_dirs={}, pending_inputs=(("big", "producer", "big", 1),))
    failures: list[str] = []

    def wait() -> None:
        try:
            reporter.settled_job(consumer)
        except InputHandoffError as exc:
            failures.append(str(exc))

    waiter = threading.Thread(target=wait)
    waiter.start()
    reporter.forget_handoffs(["producer"])  # the run ended (another agent's attempt finished it)
    waiter.join(timeout=10)
    assert not waiter.is_alive() and len(failures) == 1 and "its run ended without it" in failures[0]


def test_an_early_consumer_that_fails_keeps_the_fingerprint_its_digested_input_gives(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(sources["reader"] / "reader.py", "a") as f:
        f.write("sys.exit('the reader fails after reading')\n")
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    _reporter, waited = _serve_holding(ws, monkeypatch)
    assert waited == [True]
    writer, reader = run.find_step_run("writer")[0], run.find_step_run("reader")[0]
    assert writer.get_status() == "Completed" and reader.get_status() == "Failed"
    keyed = reader.get_fingerprint()  # explainable against the next run: no "pending:" input left
    ctx = EngineContext.open(WorkspaceLayout(ws.location))
    assert keyed["parts"]["input:big"] == q.get_outputs(ctx.store, writer.id)["big"]["digest"]
    assert keyed["fingerprint"] == fingerprint(keyed["parts"])


def test_early_consumers_not_started_when_their_producer_fails_are_withdrawn(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three early consumers, each blocked reading a FIFO of its own the test opens last: two hold
    both process slots, the third waits for one when the producer fails: it never starts."""
    from cairn import ComputeTarget, LocalCompute, RunConfiguration

    fifos = {name: tmp_path / f"fifo-{name}" for name in ("a", "b", "c")}
    for fifo in fifos.values():
        os.mkfifo(fifo)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "reader.py").write_text("import os\nopen(os.environ['FIFO'], 'rb').read()\n" + READER)
    ws = Workspace.create(tmp_path / "ws")
    ComputeTarget.create(ws, "local", LocalCompute.provisioning_configuration(max_concurrency=2))
    big = PipelineData("big")
    steps = [PythonScriptStep("writer.py", name="writer", source_directory=str(sources["writer"]),
                              arguments=[big], outputs=[big])]
    for name in ("a", "b", "c"):
        out = PipelineData(f"{name}_size")
        rc = RunConfiguration()
        rc.environment_variables = {"FIFO": str(fifos[name])}
        steps.append(PythonScriptStep("reader.py", name=name, source_directory=str(blocked), runconfig=rc,
                                      arguments=[big.as_input(), out], outputs=[out], allow_reuse=False))
    run = Experiment(ws, "handoff").submit(Pipeline(ws, steps), continue_on_step_failure=True)

    three_running, one_ended = threading.Event(), threading.Event()
    running: set[str] = set()
    ended: list[str] = []

    class Reporter(StoreReporter):
        def started(self, step_run_id: str, status: Status, **fields: Any) -> bool:
            ok = super().started(step_run_id, status, **fields)
            if status == Status.RUNNING:
                running.add(step_run_id)
                if len(running) == 3:  # the writer and two consumers: the third waits for a process slot
                    three_running.set()
            return ok

        def settle(self, job: Any, result: Any) -> None:
            super().settle(job, result)
            if job.step.get("name") != "writer":
                ended.append(job.step["name"])
                one_ended.set()

    def fail_the_writer(big: Path) -> None:
        assert three_running.wait(timeout=30)
        _change_as_left_behind(big)

    _before_digesting_placed(monkeypatch, fail_the_writer)
    with _AgentHere(ws, Reporter) as here:
        withdrawn = one_ended.wait(timeout=30)  # the third's wait for a slot ended, the others still blocked
        waiting = list(ended)
        for name in ("a", "b", "c"):
            if withdrawn and name not in waiting:  # each running reader reads to the end now (the open waits for it)
                with open(fifos[name], "wb"):
                    pass
        assert here.run_ended()
    assert withdrawn and len(waiting) == 1
    third = waiting[0]
    steps_now = {s.name: s for s in run.get_steps()}
    assert {n: s.get_status() for n, s in steps_now.items()} == {
        "writer": "Failed", **{n: "NotStarted" if n == third else "Failed" for n in ("a", "b", "c")}}
    assert "upstream step 'writer' failed" in steps_now[third].get_details()["statusReason"]
    assert all("did not complete" in steps_now[n].get_details()["statusReason"] for n in ("a", "b", "c") if n != third)
