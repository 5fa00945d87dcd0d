"""Large outputs committed before they are digested (engine/late_digests.py): the run ends without
waiting for the digest; a consumer committed meanwhile gets its fingerprint when the digest comes; a
rerun meanwhile waits for it and reuses; an output changed before it was digested keys nothing; a
digest left pending by an agent that died is made by whoever needs it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from cairn import Experiment, OutputFileDatasetConfig, Workspace
from cairn.engine.context import EngineContext
from cairn.engine.fingerprint import definition_of, fingerprint, fingerprint_parts
from cairn.engine.late_digests import DigestPending, LateDigests, OutputChanged, resolved
from cairn.engine.reporter import StoreReporter
from cairn.engine.scheduler import PipelineScheduler
from cairn.runner import execute
from cairn.runner.job import CHANGED, pending_digest
from cairn.storage.layout import WorkspaceLayout
from cairn.storage.tree import digest_tree
from cairn.store import queries as q
from cairn.store import schema as t
from tests.engine import test_early_handoff as early
from tests.engine.test_early_handoff import (
    BIG,
    _AgentHere,
    _before_digesting_placed,
    _change_as_left_behind,
    _no_agent_but_this_process,
    _pipeline,
    _submit_for_this_process,
)

sources, no_agent = early.sources, early.no_agent  # its fixtures


def _system_log(ws: Workspace, run: Any, step: Any) -> str:
    return next((Path(ws.location) / ".cairn").glob(f"datastores/*/runs/{run.id}/{step.id}/logs/system.txt")).read_text()


def _store(ws: Workspace) -> Any:
    return EngineContext.open(WorkspaceLayout(ws.location)).store


def _held_digest(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """The writer's placed output is digested only once the returned event is set (then() first)."""
    release = threading.Event()
    _before_digesting_placed(monkeypatch, lambda big: release.wait(timeout=60))
    return release


def _again(ws: Workspace, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch, late: bool = False) -> Any:
    """The same pipeline submitted again and run by an agent in this process (with late digests)."""
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    with _AgentHere(ws, late=late) as here:
        assert here.run_ended(), "the run did not end"
    return run


def _statuses(run: Any) -> dict[str, str]:
    return {s.name: s.get_status() for s in run.get_steps()}


def _root(ws: Workspace, row: dict[str, Any]) -> Path:
    """The local datastore folder of an output's record."""
    return Path(ws.location) / ".cairn" / "datastores" / row["datastore"]


def _made(ws: Workspace, store: Any, step: Any) -> str:
    """The digest of ``step``'s output ``big``, made now."""
    row = q.get_outputs(store, step.id)["big"]
    return digest_tree(_root(ws, row) / row["path"]).digest


def _left_pending_by_a_dead_agent(ws: Workspace, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                  readers: tuple[tuple[str, dict[str, Any]], ...] = (("reader", {}),)
                                  ) -> tuple[Any, Any, Any, str]:
    """The pipeline run to its end (its digests made), then the writer's output record put back
    as an agent that died between the commit and the digest leaves it: (run, store, writer, the
    digest)."""
    run = _submit_for_this_process(ws, _pipeline(ws, sources, readers=readers), monkeypatch)
    with _AgentHere(ws, late=True) as here:
        assert here.run_ended()
        assert here.agent.late.join(timeout=60)
    store = _store(ws)
    writer = run.find_step_run("writer")[0]
    made = q.get_outputs(store, writer.id)["big"]["digest"]
    q.record_late_digests(store, writer.id, made, {"big": pending_digest(writer.id)})
    return run, store, writer, made


def test_the_run_ends_before_the_digest_and_its_consumer_is_keyed_once_it_comes(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    release = _held_digest(monkeypatch)
    store = _store(ws)
    with _AgentHere(ws, late=True) as here:
        assert here.run_ended(), "the run waited for the digest"
        assert run.get_status() == "Completed"
        writer, reader = run.find_step_run("writer")[0], run.find_step_run("reader")[0]
        assert q.get_outputs(store, writer.id)["big"]["digest"] == pending_digest(writer.id)
        pending = writer.get_output_data("big")  # what the API says meanwhile: no placeholder for a digest
        assert (pending.digest, pending.digest_status) == (None, "pending")
        assert reader.get_status() == "Completed" and reader.get_fingerprint()["fingerprint"] is None
        assert (reader.get_output_data("reader_size").local_path / "size").read_text() == str(BIG)
        release.set()
        assert here.agent.late.join(timeout=60)
    produced = q.get_outputs(store, writer.id)["big"]
    assert produced["digest"] == _made(ws, store, writer)
    made = writer.get_output_data("big")
    assert (made.digest, made.digest_status) == (produced["digest"], "made")
    keyed = reader.get_fingerprint()
    assert keyed["parts"]["input:big"] == produced["digest"]
    assert keyed["fingerprint"] == fingerprint(keyed["parts"])
    assert q.lookup_cache(store, keyed["fingerprint"]) == reader.id
    assert "digested after the step was committed" in _system_log(ws, run, writer)
    assert "committed by its producer before being digested" in _system_log(ws, run, reader)

    assert _statuses(_again(ws, sources, monkeypatch)) == {"writer": "Reused", "reader": "Reused"}


def test_a_rerun_while_the_digest_is_made_reuses_every_step_and_the_agent_serves_meanwhile(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    first = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    release = _held_digest(monkeypatch)
    here = _AgentHere(ws, runs=2, late=True)
    first_ended, asked, answered = threading.Event(), threading.Event(), threading.Event()
    notify, request = here.front.notify, here.agent.late.request

    def notifying(run_id: str, final: bool = False, status: str | None = None) -> None:
        notify(run_id, final, status)
        if final and run_id == first.id:
            first_ended.set()

    def requesting(row: dict[str, Any], root: str | None) -> str:
        asked.set()
        return request(row, root)

    here.front.notify = notifying  # type: ignore[method-assign]
    here.front.reply = lambda *args: answered.set()  # type: ignore[method-assign]
    here.agent.late.request = requesting  # type: ignore[method-assign]
    with here:
        assert first_ended.wait(timeout=60)  # with the writer's digest held
        again = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
        here.agent.events.put(("poke",))
        assert asked.wait(timeout=60)  # the rerun needs the writer's digest, still held
        here.agent.events.put(("sync", "probe"))
        assert answered.wait(timeout=60)  # the agent's loop does not wait for a digest
        assert again.get_status() in ("Queued", "Running") and not release.is_set()
        release.set()
        assert here.run_ended()
    assert {s.name: s.get_status() for s in again.get_steps()} == {"writer": "Reused", "reader": "Reused"}
    writer = again.find_step_run("writer")[0]
    assert not q.get_outputs(_store(ws), writer.id)["big"]["digest"].startswith("pending:")  # the reuser's record


def test_an_output_changed_before_it_was_digested_keys_nothing_and_its_step_runs_again(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    release = _held_digest(monkeypatch)
    store = _store(ws)
    with _AgentHere(ws, late=True) as here:
        assert here.run_ended()
        writer, reader = run.find_step_run("writer")[0], run.find_step_run("reader")[0]
        row = q.get_outputs(store, writer.id)["big"]
        _change_as_left_behind(_root(ws, row) / row["path"] / "big.bin")
        release.set()
        assert here.agent.late.join(timeout=60)
    assert run.get_status() == "Completed"  # what ran stands
    assert q.get_outputs(store, writer.id)["big"]["digest"] == CHANGED + writer.id
    changed = writer.get_output_data("big")
    assert (changed.digest, changed.digest_status) == (None, "changed")
    assert reader.get_fingerprint()["fingerprint"] is None
    with store.read() as conn:
        assert conn.execute(t.cache_entries.select().where(t.cache_entries.c.step_run_id == writer.id)).first() is None
    assert "changed while it was being digested" in _system_log(ws, run, writer)

    assert _statuses(_again(ws, sources, monkeypatch)) == {"writer": "Completed", "reader": "Completed"}


def test_a_digest_left_pending_by_an_agent_that_died_is_made_by_whoever_needs_it(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    _, store, writer, made = _left_pending_by_a_dead_agent(ws, sources, monkeypatch)
    again = _again(ws, sources, monkeypatch, late=True)  # an agent without digests in flight: it makes the writer's
    assert _statuses(again) == {"writer": "Reused", "reader": "Reused"}
    assert q.get_outputs(store, writer.id)["big"]["digest"] == made
    assert q.get_outputs(store, again.find_step_run("writer")[0].id)["big"]["digest"] == made

    q.record_late_digests(store, writer.id, made, {"big": pending_digest(writer.id)})
    row = q.get_outputs(store, writer.id)["big"]
    root = str(_root(ws, row))
    assert resolved(store, row, root) == made  # read where it is (as `cairn debug` does)
    assert q.get_outputs(store, writer.id)["big"]["digest"] == made  # and recorded
    assert resolved(store, row, None) == made  # made meanwhile: read from the store
    q.record_late_digests(store, writer.id, made, {"big": pending_digest(writer.id)})
    assert resolved(store, row, None) == CHANGED + writer.id  # no longer a local datastore: nothing to read
    assert q.get_outputs(store, writer.id)["big"]["digest"] == pending_digest(writer.id)  # (for that caller only)
    assert resolved(store, row, root) == made


def test_only_a_step_whose_consumers_never_wait_for_its_digest_commits_before_it(
        tmp_path: Path, sources: dict[str, Path], no_agent: None) -> None:
    ws = Workspace.create(tmp_path / "ws")
    store = _store(ws)
    late = LateDigests(store)

    def scheduler(pipeline: Any) -> PipelineScheduler:
        run = Experiment(ws, "late").submit(pipeline)  # (no agent: it stays queued, and is only read here)
        return PipelineScheduler(EngineContext.open(WorkspaceLayout(ws.location)), run.id, resume=False,
                                 hands_over_early=lambda target: True, late=late)

    sched = scheduler(_pipeline(ws, sources))
    assert sched.digest_may_come_late("writer")  # its reader cannot be reused: it never ran
    assert sched.digest_may_come_late("reader")  # no consumer in the run
    copied = scheduler(_pipeline(ws, sources, readers=(("copier", {"download": True}),)))
    assert not copied.digest_may_come_late("writer")  # a copy is made through the digest
    registered = _pipeline(ws, sources)
    dataset = OutputFileDatasetConfig("registered").register_on_complete("big_data")
    registered.steps[0].outputs.append(dataset)
    assert not scheduler(registered).digest_may_come_late("writer")  # a dataset version records it
    nowhere = PipelineScheduler(sched.ctx, sched.run_id, resume=False, late=late)  # a target that cannot
    assert not nowhere.digest_may_come_late("writer")
    unserved = PipelineScheduler(sched.ctx, sched.run_id, resume=False, hands_over_early=lambda target: True)
    assert not unserved.digest_may_come_late("writer")  # no agent to make the digest
    # once the reader's definition is cached, its reuse needs the writer's digest: the writer digests first
    with store.write() as conn:
        reader = sched.spec.step("reader")
        conn.execute(t.cache_entries.insert().values(fingerprint="f", step_run_id=sched.step_ids["reader"],
                                                     created_at=0.0,
                                                     definition=definition_of(fingerprint_parts(reader, {}))))
    assert not scheduler(_pipeline(ws, sources)).digest_may_come_late("writer")


def test_a_store_that_fails_keying_a_consumer_later_leaves_it_completed_and_unkeyed(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    release = _held_digest(monkeypatch)

    def locked(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(q, "complete_fingerprint", locked)
    with _AgentHere(ws, late=True) as here:
        assert here.run_ended()
        release.set()
        assert here.agent.late.join(timeout=60)
    reader = run.find_step_run("reader")[0]
    assert (reader.get_status(), run.get_status()) == ("Completed", "Completed")
    assert reader.get_fingerprint()["fingerprint"] is None  # never reused, never wrongly
    assert "it completed before its fingerprint" in reader.explain()["summary"]
    monkeypatch.undo()
    _no_agent_but_this_process(monkeypatch)
    rerun = _again(ws, sources, monkeypatch).find_step_run("reader")[0]
    assert rerun.get_status() == "Completed"  # nothing to reuse: it ran again, and says why
    explained = rerun.explain()
    assert explained["compared_with"] == reader.id and "has no fingerprint to be reused by" in explained["summary"]


def test_a_digest_that_cannot_get_a_thread_is_left_pending_and_made_when_needed(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    start = threading.Thread.start

    def no_digest_thread(thread: threading.Thread) -> None:
        if thread.name.startswith("digest-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_digest_thread)
    with _AgentHere(ws, late=True) as here:
        assert here.run_ended()
        assert here.agent.late.join(timeout=10)  # nothing in flight: the agent may exit
    assert run.get_status() == "Completed"
    writer = run.find_step_run("writer")[0]
    store = _store(ws)
    # pending, or made at once for the reader if it was prepared after the writer's end (no thread either)
    assert q.get_outputs(store, writer.id)["big"]["digest"] in (pending_digest(writer.id), _made(ws, store, writer))
    monkeypatch.setattr(threading.Thread, "start", start)
    assert _again(ws, sources, monkeypatch, late=True).find_step_run("writer")[0].get_status() == "Reused"
    assert q.get_outputs(store, writer.id)["big"]["digest"] == _made(ws, store, writer)



def test_a_step_whose_input_changed_before_it_was_digested_fails_saying_so(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    with _AgentHere(ws, late=True) as here:
        assert here.run_ended()
        assert here.agent.late.join(timeout=60)
    store = _store(ws)
    writer = run.find_step_run("writer")[0]
    q.record_late_digests(store, writer.id, q.get_outputs(store, writer.id)["big"]["digest"],
                          {"big": CHANGED + writer.id})  # as its digest thread records a changed output
    # the reader prepared again (a resumed run): it cannot run on what changed, and says why
    sched = PipelineScheduler(EngineContext.open(WorkspaceLayout(ws.location)), run.id, resume=False,
                              hands_over_early=lambda target: True, late=LateDigests(store))
    with pytest.raises(OutputChanged, match="its input 'big' changed after its producer committed it"):
        sched.prepare(sched.spec.step("reader"))


BIG_READER = f"""
import pathlib, sys
data = (pathlib.Path(sys.argv[1]) / "big.bin").read_bytes()
out = pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
(out / "size").write_text(str(len(data)))
(out / "pad.bin").write_bytes(b"y" * {BIG})
"""


def test_a_consumer_whose_own_output_changed_before_its_digest_is_never_keyed(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its fingerprint waits for its input's digest; its own output's digest failed meanwhile."""
    (sources["reader"] / "reader.py").write_text(BIG_READER)  # the reader's output is large too: late
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)
    release, reader_recorded = threading.Event(), threading.Event()
    real_digest = execute.digest_tree

    def hooked(path: Any, *walked: Any) -> Any:
        if (Path(path) / "big.bin").exists() and not (Path(path) / "big.bin").stat().st_mode & 0o222:
            release.wait(timeout=60)  # the writer's digest is held
        if (Path(path) / "pad.bin").exists():
            raise OSError(5, "Input/output error")  # the reader's own digest fails
        return real_digest(path, *walked)

    monkeypatch.setattr(execute, "digest_tree", hooked)
    store = _store(ws)
    with _AgentHere(ws, late=True) as here:
        late = here.agent.late
        record = late._record

        def recording(owner: str, made: dict[str, str]) -> None:
            record(owner, made)
            if "reader_size" in made:
                reader_recorded.set()

        late._record = recording  # type: ignore[method-assign]
        assert here.run_ended()
        assert reader_recorded.wait(timeout=60)  # before the writer's digest comes
        release.set()
        assert late.join(timeout=60)
    reader = run.find_step_run("reader")[0]
    assert q.get_outputs(store, reader.id)["reader_size"]["digest"] == CHANGED + reader.id
    assert reader.get_fingerprint()["fingerprint"] is None
    assert _again(ws, sources, monkeypatch, late=True).find_step_run("reader")[0].get_status() == "Completed"


def test_a_store_that_refuses_a_late_digest_fails_no_consumer(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace.create(tmp_path / "ws")
    run = _submit_for_this_process(ws, _pipeline(ws, sources), monkeypatch)

    class AfterTheDigest(StoreReporter):
        """The reader reaches its hand-off once the writer's digest thread has ended."""

        def settled_job(self, job: Any, *args: Any) -> Any:
            assert self._late is not None and self._late.join(timeout=30)
            return super().settled_job(job, *args)

    def locked(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(q, "record_late_digests", locked)
    with _AgentHere(ws, AfterTheDigest, late=True) as here:
        assert here.run_ended()
    writer, reader = run.find_step_run("writer")[0], run.find_step_run("reader")[0]
    assert (writer.get_status(), reader.get_status(), run.get_status()) == ("Completed",) * 3
    assert q.get_outputs(_store(ws), writer.id)["big"]["digest"] == pending_digest(writer.id)  # made when needed


def test_a_digest_made_here_that_the_store_refused_ends_and_is_given_from_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from cairn.engine import late_digests

    reads = {"n": 0}
    row = {"name": "big", "digest": pending_digest("P"), "path": "x", "stat_signature": "s"}

    def get_outputs(store: Any, step_run_id: str) -> dict[str, Any]:
        reads["n"] += 1
        return {"big": dict(row)}

    def locked(*args: Any, **kwargs: Any) -> None:  # (SQLite's WAL: reads go on, writes are refused)
        raise RuntimeError("database is locked")

    gate = threading.Event()
    monkeypatch.setattr(q, "get_outputs", get_outputs)
    monkeypatch.setattr(q, "record_late_digests", locked)
    monkeypatch.setattr(late_digests, "digest_in_place", lambda r, root: "blake2b:made" if gate.wait(10) else "")
    late = LateDigests(store=None)
    with pytest.raises(DigestPending):
        late.request(row, "/root")  # a digest a dead agent left pending: made here, in a thread
    consumer = SimpleNamespace(pending_inputs=(("big", "P", "big", 1),), step_run_id="C")  # committed meanwhile
    late.fingerprint_later(consumer)  # type: ignore[arg-type]
    gate.set()
    assert late.join(timeout=30)
    assert reads["n"] < 10  # (it spun, re-queuing the consumer on the producer it was finishing)
    assert late.request(row, "/root") == "blake2b:made"  # the store refused it: given from here


def test_consumers_of_a_digest_a_dead_agent_left_wait_for_it_in_a_resumed_run(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from cairn.engine import late_digests

    ws = Workspace.create(tmp_path / "ws")
    readers = (("reader", {"allow_reuse": False}), ("reader2", {"allow_reuse": False}))
    run, store, writer, made = _left_pending_by_a_dead_agent(ws, sources, monkeypatch, readers)
    gate = threading.Event()
    real = late_digests.digest_in_place
    monkeypatch.setattr(late_digests, "digest_in_place", lambda row, root: real(row, root) if gate.wait(30) else "")
    late = LateDigests(store)
    sched = PipelineScheduler(EngineContext.open(WorkspaceLayout(ws.location)), run.id, resume=False,
                              hands_over_early=lambda target: True, late=late)
    with pytest.raises(DigestPending):
        sched.prepare(sched.spec.step("reader"))  # the new agent makes the writer's digest, in a thread
    with pytest.raises(DigestPending):
        sched.prepare(sched.spec.step("reader2"))  # (not started with it pending: no hand-off here)
    gate.set()
    assert late.join(timeout=30)
    for name in ("reader", "reader2"):
        job = sched.prepare(sched.spec.step(name))
        assert job is not None and not job.pending_inputs and job.inputs[0].digest == made


def test_no_thread_for_a_digest_while_a_consumer_waits_for_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from cairn.engine import late_digests

    reads = {"n": 0}
    row = {"name": "big", "digest": pending_digest("P"), "path": "x", "stat_signature": "s", "datastore": "d"}

    def get_outputs(store: Any, step_run_id: str) -> dict[str, Any]:
        reads["n"] += 1
        assert reads["n"] < 1000, "spinning"
        return {"big": dict(row)}

    monkeypatch.setattr(q, "get_outputs", get_outputs)
    monkeypatch.setattr(q, "record_late_digests", lambda *args, **kwargs: None)
    monkeypatch.setattr(late_digests, "digest_in_place", lambda r, root: "blake2b:made")
    late = LateDigests(store=None)
    consumer = SimpleNamespace(pending_inputs=(("big", "P", "big", 1),), step_run_id="C")
    start = threading.Thread.start

    def no_thread(thread: threading.Thread) -> None:
        if thread.name.startswith("digest-"):
            late.fingerprint_later(consumer)  # type: ignore[arg-type]  # (a consumer commits at this moment)
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    assert late.request(row, "/root").startswith(("blake2b:", CHANGED))  # made at once, no thread to be had
    assert late.join(timeout=5)


def test_a_consumer_on_a_target_made_after_its_producer_was_prepared_completes(
        tmp_path: Path, sources: dict[str, Path], no_agent: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from cairn import ComputeTarget, LocalCompute, Pipeline, PipelineData, PythonScriptStep

    ws = Workspace.create(tmp_path / "ws")
    # no spare interpreters: the target is made only when its first step is dispatched, after the writer's
    ComputeTarget.create(ws, "b", LocalCompute.provisioning_configuration(spare_interpreters=False))
    (sources["reader"] / "other.py").write_text("import time; time.sleep(0.5)\n")
    big, size = PipelineData("big"), PipelineData("reader_size")
    steps = [PythonScriptStep("writer.py", name="writer", source_directory=str(sources["writer"]), arguments=[big],
                              outputs=[big]),
             PythonScriptStep("other.py", name="other", source_directory=str(sources["reader"]), compute_target="b"),
             PythonScriptStep("reader.py", name="reader", source_directory=str(sources["reader"]),
                              arguments=[big.as_input(), size], outputs=[size], compute_target="b")]
    run = _submit_for_this_process(ws, Pipeline(ws, steps), monkeypatch)
    release = _held_digest(monkeypatch)
    with _AgentHere(ws, late=True) as here:
        ended = here.run_ended()
        release.set()
        assert here.agent.late.join(timeout=60)
    assert ended and run.get_status() == "Completed"
    assert run.find_step_run("reader")[0].get_status() == "Completed"


def test_a_served_agent_commits_first_and_has_made_the_digests_once_it_stopped(
        workspace: Workspace, sources: dict[str, Path]) -> None:
    from cairn.engine.client import stop_agent

    run = Experiment(workspace, "late").submit(_pipeline(workspace, sources))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert stop_agent(WorkspaceLayout(workspace.location))  # (an agent that stops makes its digests first)
    store = _store(workspace)
    writer, reader = run.find_step_run("writer")[0], run.find_step_run("reader")[0]
    assert "digested after the step was committed" in _system_log(workspace, run, writer)
    made = q.get_outputs(store, writer.id)["big"]["digest"]
    assert made == _made(workspace, store, writer)
    keyed = reader.get_fingerprint()
    assert keyed["parts"]["input:big"] == made and q.lookup_cache(store, keyed["fingerprint"]) == reader.id


def test_a_stopping_agent_waits_for_its_digests_only_so_long(
        workspace: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from cairn.engine import agent as agent_module

    monkeypatch.setattr(agent_module, "STOP_DIGEST_WAIT", 0.05)
    agent = agent_module.Agent(WorkspaceLayout(workspace.location), idle_timeout=None)
    agent.late = LateDigests(_store(workspace))
    agent._let_digests_end()  # none in flight: nothing said
    assert capsys.readouterr().err == ""
    agent.late.promise("step_held")  # a digest in flight that does not end
    agent._let_digests_end()  # (returns: `cairn agent --stop` and the next agent do not wait for it)
    said = capsys.readouterr().err
    assert "waiting up to 0.05 s for the digests" in said and "stay 'digest pending'" in said
    agent.late.drop("step_held")
    assert agent.late.join(timeout=0)
