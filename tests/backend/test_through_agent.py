"""A local step's Run.get_context() reaches the workspace through the agent that runs it (no store
opened in the step's process); calls outside the scripts' set, and steps with no agent to answer,
open the workspace in the step's own process, as before."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


SCRIPT = """
import sys
from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
ws = Workspace(sys.argv[1])
step = PythonScriptStep("log.py", name="log", source_directory=sys.argv[2])
run = Experiment(ws, "context").submit(Pipeline(ws, [step]))
status = run.wait_for_completion(show_output=False)
assert ws._backend.list_runs("context", 5) and ws._backend.get_events(run.id)  # rows the store read itself
print(type(ws._backend).__name__, status, run.get_steps()[0].get_status(), "sqlalchemy" in sys.modules)
"""


def test_a_script_reaches_the_workspace_through_its_agent_while_it_is_up(workspace: Workspace, tmp_path: Path,
                                                                          write_script: Callable[..., Path]) -> None:
    import subprocess
    import sys

    src = write_script("log.py", LOGGING_STEP)
    _run(workspace, src)  # the agent is up, and the step's result is reusable
    script = tmp_path / "again.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), workspace.location, str(src)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["AgentBackend", "Completed", "Reused", "False"]


def test_when_the_agent_goes_the_script_opens_the_workspace_itself(workspace: Workspace,
                                                                   write_script: Callable[..., Path]) -> None:
    from cairn.engine.client import stop_agent

    run, _ = _run(workspace, write_script("log.py", LOGGING_STEP))
    ws = Workspace(workspace.location)
    assert isinstance(ws._backend, AgentBackend)
    assert ws._backend.get_run(run.id)["status"] == "Completed"
    stop_agent(WorkspaceLayout(ws.location))  # e.g. idle: it closes the connection
    assert ws._backend.get_run(run.id)["status"] == "Completed"  # answered by the workspace opened here
    assert ws._backend._agent is None and isinstance(ws._backend._direct, LocalBackend)
    assert [r["id"] for r in ws._backend.list_runs("context")] == [run.id]


def test_an_agent_of_another_cairn_version_is_not_used(workspace: Workspace, write_script: Callable[..., Path],
                                                      monkeypatch) -> None:
    import cairn

    _run(workspace, write_script("log.py", LOGGING_STEP))
    monkeypatch.setattr(cairn, "__version__", "0.0.0-other")
    assert isinstance(workspace_backend(workspace.location), LocalBackend)


def test_snapshot_limits_are_the_submitting_processs(workspace: Workspace, write_script: Callable[..., Path],
                                                     monkeypatch) -> None:
    import pytest

    from cairn.core.errors import SnapshotTooLargeError

    src = write_script("log.py", LOGGING_STEP)
    (src / "more.txt").write_text("x")
    _run(workspace, src)  # the agent is up
    ws = Workspace(workspace.location)
    assert isinstance(ws._backend, AgentBackend)
    monkeypatch.setenv("CAIRN_SNAPSHOT_MAX_FILES", "1")  # in this process only: the agent never had it
    with pytest.raises(SnapshotTooLargeError):
        ws._backend.snapshots([str(src)])


def test_create_completes_a_workspace_that_has_only_its_config(tmp_path: Path) -> None:
    ws = Workspace.create(tmp_path / "ws")
    layout = WorkspaceLayout(ws.location)
    layout.db.unlink()  # a clone that keeps only .cairn/config.json
    again = Workspace.create(tmp_path / "ws")
    assert [d["name"] for d in again._backend.list_datastores()] == ["workspaceblobstore"]
    assert [c["name"] for c in again._backend.list_compute_targets()] == ["local"]


def test_a_call_the_agent_cannot_read_is_made_here(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    src = write_script("enum_tag.py", """
        import enum
        from cairn import Run

        class Stage(enum.IntEnum):  # a class only this script has: the agent cannot unpickle it
            TRAIN = 1

        run = Run.get_context()
        run.set_tags({"stage": Stage.TRAIN})
        run.log("after", 1)
    """)
    step = PythonScriptStep("enum_tag.py", name="enum", source_directory=str(src))
    run = Experiment(workspace, "context").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    (s,) = run.get_steps()
    assert s.get_tags()["stage"] in ("1", "Stage.TRAIN") and s.get_metrics()["after"] == 1
    _, again = _run(workspace, write_script("log.py", LOGGING_STEP))  # the agent still answers
    assert again.get_metrics()["store_opened_here"] is False


def test_a_record_the_agent_may_have_made_before_it_went_is_not_made_twice(tmp_path: Path) -> None:
    import pytest

    from cairn.backend.relay import RelayLost
    from cairn.core.errors import AgentError

    ws = Workspace.create(tmp_path / "ws")
    stop = serve_scripts(ws.location)
    try:
        backend = workspace_backend(ws.location)
        assert isinstance(backend, AgentBackend)

        def gone_while_answering(method, args, kwargs):
            raise RelayLost("the agent went", sent=True)

        backend._agent._call = gone_while_answering
        with pytest.raises(AgentError, match="may or may not have been recorded"):
            backend.log_metrics("run_x", [])
        assert backend.list_experiments() == []  # a read is made again, on the workspace opened here
    finally:
        stop()


def test_an_agent_that_does_not_answer_is_not_waited_for(tmp_path: Path, monkeypatch) -> None:
    from cairn.backend import through_agent

    ws = Workspace.create(tmp_path / "ws")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts (backlog), never answers
    silent.bind(str(WorkspaceLayout(ws.location).scripts_socket))
    silent.listen(1)
    monkeypatch.setattr(through_agent, "HANDSHAKE_SECONDS", 0.2)
    try:
        assert isinstance(workspace_backend(ws.location), LocalBackend)
    finally:
        silent.close()


def test_the_scripts_socket_is_private_and_the_umask_untouched(tmp_path: Path) -> None:
    import os
    import stat

    ws = Workspace.create(tmp_path / "ws")
    before = os.umask(0o022)
    os.umask(before)
    stop = serve_scripts(ws.location)
    try:
        mode = stat.S_IMODE(os.stat(WorkspaceLayout(ws.location).scripts_socket).st_mode)
        assert mode == 0o600
        now = os.umask(before)
        assert now == before
    finally:
        stop()


def test_a_run_recorded_through_the_agent_is_claimed_without_waiting_for_the_clients_poke(
        tmp_path: Path, write_script: Callable[..., Path], monkeypatch) -> None:
    from cairn.engine import client

    ws = Workspace.create(tmp_path / "ws")
    src = write_script("log.py", "print('hi')\n")
    import threading

    from cairn.backend import open_local_backend

    queued: list[list[str]] = []
    told = threading.Event()

    def on_recorded(run_id: str, spec: Any, step_ids: dict[str, str]) -> None:
        assert set(step_ids) == {s.name for s in spec.steps}  # what the agent's claim needs, as recorded
        queued.append([run_id, *(r["id"] for r in open_local_backend(ws.location).list_runs("context", 5))])
        told.set()

    stop = serve_scripts(ws.location, on_recorded)
    try:
        monkeypatch.setattr(client, "ensure_agent", lambda layout: None)  # no agent: only the scripts socket here
        monkeypatch.setattr(client, "prestart_agent", lambda layout: None)
        here = Workspace(ws.location)
        assert isinstance(here._backend, AgentBackend)
        run = Experiment(here, "context").submit(Pipeline(here, [PythonScriptStep("log.py", source_directory=str(src))]))
        assert told.wait(10)  # once the reply went back: the agent's claim does not hold it up
        assert queued == [[run.id, run.id]]  # told once, of the run, already recorded
        here._backend.list_experiments()  # any other call tells nothing
        assert len(queued) == 1
    finally:
        stop()


def test_a_workspace_reached_through_its_agent_does_not_start_one_for_a_pipeline(
        tmp_path: Path, write_script: Callable[..., Path], monkeypatch) -> None:
    from cairn.engine import client

    ws = Workspace.create(tmp_path / "ws")
    src = write_script("log.py", "print('hi')\n")
    asked: list[str] = []
    monkeypatch.setattr(client, "prestart_agent", lambda layout: asked.append(str(layout.root)))
    stop = serve_scripts(ws.location)
    try:
        here = Workspace(ws.location)
        Pipeline(here, [PythonScriptStep("log.py", source_directory=str(src))])
        assert asked == []  # the agent answers this process: it is up
        here._backend._agent.close()  # as if it had gone
        Pipeline(here, [PythonScriptStep("log.py", source_directory=str(src))])
        assert asked == [ws.location]  # (closed here: "gone") started in the background, as before
    finally:
        stop()


def test_a_run_recorded_by_the_agent_is_not_poked_for_and_one_recorded_here_is(
        tmp_path: Path, write_script: Callable[..., Path], monkeypatch) -> None:
    """The agent that recorded a run claims it itself: the submitting process sends no poke (a
    round trip on every submit). A run the agent could not record (an argument it cannot read) is
    recorded here, and then an agent is made sure of, as for a workspace opened here."""
    from cairn.engine import client

    ws = Workspace.create(tmp_path / "ws")
    src = write_script("log.py", "print('hi')\n")
    pokes: list[str] = []
    monkeypatch.setattr(client, "ensure_agent", lambda layout: pokes.append(str(layout.root)))
    monkeypatch.setattr(client, "prestart_agent", lambda layout: None)
    import threading

    queued: list[int] = []
    told = threading.Event()
    stop = serve_scripts(ws.location, lambda run_id, spec, step_ids: (queued.append(1), told.set()))
    try:
        here = Workspace(ws.location)
        assert isinstance(here._backend, AgentBackend)
        Experiment(here, "poke").submit(Pipeline(here, [PythonScriptStep("log.py", source_directory=str(src))]))
        assert told.wait(10)
        assert (queued, pokes) == ([1], [])
        here._backend.ensure_progress()  # e.g. a follower's: the agent answering this process is up
        assert pokes == []

        from cairn.core.socket_rpc import CallNotUnderstood

        agent_call = here._backend._agent._call

        def cannot_read(method, args, kwargs):
            if method == "record_pipeline_run":
                raise CallNotUnderstood("a class the agent does not have")
            return agent_call(method, args, kwargs)

        monkeypatch.setattr(here._backend._agent, "_call", cannot_read)
        Experiment(here, "poke").submit(Pipeline(here, [PythonScriptStep("log.py", source_directory=str(src))]))
        assert (queued, pokes) == ([1], [ws.location])  # recorded here: nobody told the agent but the poke
        here._backend._agent.close()  # as if the agent had gone
        here._backend.ensure_progress()
        assert pokes == [ws.location, ws.location]
    finally:
        stop()


def test_the_agents_answers_use_its_own_open_store(tmp_path: Path, monkeypatch) -> None:
    """What the scripts socket answers is read and written through the store the agent has open (its
    connections, its compiled statements): the first call of a client opens no second one."""
    from cairn.store import db

    ws = Workspace.create(tmp_path / "ws")
    agents_store = db.Store.for_sqlite_file(WorkspaceLayout(ws.location).db)
    opened: list[str] = []
    monkeypatch.setattr(db.Store, "for_sqlite_file", classmethod(lambda cls, path: opened.append(str(path))))
    stop = serve_scripts(ws.location, store=agents_store)
    try:
        here = Workspace(ws.location)
        assert isinstance(here._backend, AgentBackend)
        assert [c["name"] for c in here._backend.list_compute_targets()] == ["local"]
        assert opened == []
    finally:
        stop()


def test_what_an_answer_sets_off_waits_for_the_reply_to_be_sent(tmp_path: Path) -> None:
    """A call's ``AfterReply`` work runs once its reply is sent: the caller has its answer while
    that work (the agent claiming a run just recorded) still runs."""
    import threading

    from cairn.backend.relay import RelayBackend
    from cairn.core.socket_rpc import AfterReply, serve

    answered, finished = threading.Event(), threading.Event()

    def then() -> None:
        if answered.wait(10):  # only the caller, having its reply, sets it
            finished.set()

    path = str(tmp_path / "rpc.sock")
    stop = serve(path, lambda method, args, kwargs: AfterReply(f"{method}:{args[0]}", then) if args else path)
    try:
        caller = RelayBackend(path, timeout=5)
        assert caller._call("record", (7,), {}) == "record:7"
        answered.set()
        assert finished.wait(10)
        caller.close()
    finally:
        stop()


def test_an_agent_that_replaced_the_one_reached_is_checked_again(
        tmp_path: Path, write_script: Callable[..., Path], monkeypatch) -> None:
    """When the agent a process talks to goes and another answers in its place, that one is checked
    as the first was: one of another Cairn version is not used (the run is recorded here, and an
    agent of this version is made sure of)."""
    import cairn
    from cairn.engine import client

    ws = Workspace.create(tmp_path / "ws")
    src = write_script("log.py", "print('hi')\n")
    pokes: list[str] = []
    monkeypatch.setattr(client, "ensure_agent", lambda layout: pokes.append(str(layout.root)))
    monkeypatch.setattr(client, "prestart_agent", lambda layout: None)
    stop = serve_scripts(ws.location)
    here = Workspace(ws.location)
    assert isinstance(here._backend, AgentBackend)
    stop()  # the agent goes; one of another version takes its place
    recorded_there: list[int] = []
    monkeypatch.setattr(cairn, "__version__", "0.0.0-other")
    stop = serve_scripts(ws.location, lambda run_id: recorded_there.append(1))
    monkeypatch.undo()
    monkeypatch.setattr(client, "ensure_agent", lambda layout: pokes.append(str(layout.root)))
    monkeypatch.setattr(client, "prestart_agent", lambda layout: None)
    try:
        run = Experiment(here, "replaced").submit(Pipeline(here, [PythonScriptStep("log.py", source_directory=str(src))]))
        assert recorded_there == [] and pokes == [ws.location]
        assert here._backend.get_run(run.id)["status"] == "Queued"  # recorded, in this process
    finally:
        stop()


def test_work_after_a_reply_that_fails_does_not_end_the_connection(tmp_path: Path, capsys) -> None:
    from cairn.backend.relay import RelayBackend
    from cairn.core.socket_rpc import AfterReply, serve

    def then() -> None:
        raise RuntimeError("what the answer set off failed")

    path = str(tmp_path / "rpc.sock")
    stop = serve(path, lambda method, args, kwargs: AfterReply(args[0], then) if args else path)
    try:
        caller = RelayBackend(path, timeout=5)
        sock = caller._sock
        assert [caller._call("record", (n,), {}) for n in (1, 2)] == [1, 2]
        assert caller._sock is sock  # the same connection answered both
        caller.close()
    finally:
        stop()
    assert "what the answer set off failed" in capsys.readouterr().err


def test_a_call_read_as_the_other_end_stops_is_said_not_made(tmp_path: Path, monkeypatch) -> None:
    """A call that reaches a serving end after it began to stop is answered "not taken": the caller
    knows it was not made (and may make it another way), rather than being left unsure."""
    import threading

    import pytest

    from cairn.backend.relay import RelayBackend, RelayLost
    from cairn.core import socket_rpc
    from cairn.core.socket_rpc import serve

    entered, leave, stop_began = threading.Event(), threading.Event(), threading.Event()
    remove = socket_rpc.remove_socket_file
    monkeypatch.setattr(socket_rpc, "remove_socket_file", lambda *a: (remove(*a), stop_began.set()))
    made: list[str] = []

    def call(method: str, args: tuple, kwargs: dict) -> object:
        if method == "slow":
            entered.set()
            leave.wait(10)
        made.append(method)
        return method

    path = str(tmp_path / "rpc.sock")
    stop = serve(path, call)
    first, second = RelayBackend(path, timeout=5), RelayBackend(path, timeout=5)
    slow = threading.Thread(target=lambda: first._call("slow", (), {}), daemon=True)
    slow.start()
    assert entered.wait(10)
    stopping = threading.Thread(target=stop, daemon=True)  # waits for the slow call to be answered
    stopping.start()
    try:
        assert stop_began.wait(10)
        with pytest.raises(RelayLost) as lost:
            second._call("record", (), {})  # on the connection made before
        assert lost.value.sent is False and "record" not in made
    finally:
        leave.set()
        stopping.join(10)
        slow.join(10)
    assert "slow" in made


def test_calls_made_while_snapshots_are_taken_are_answered_and_the_snapshots_kept(tmp_path: Path) -> None:
    """``start_snapshots`` sends the call and reads its answer later: a call made meanwhile (a
    compile that needs the default datastore, another thread) reads that answer first and keeps
    it, never waits for itself nor takes it for its own."""
    import threading

    ws = Workspace.create(tmp_path / "ws")
    src = _source_folder(tmp_path)
    stop = serve_scripts(ws.location)
    try:
        backend = workspace_backend(ws.location)
        assert isinstance(backend, AgentBackend)
        expected = backend.snapshots([str(src)])
        snapshots_of = backend.start_snapshots([str(src)])
        assert [d["name"] for d in backend.list_datastores()] == ["workspaceblobstore"]
        other: list[Any] = []
        reader = threading.Thread(target=lambda: other.append(backend.list_experiments()))
        reader.start()
        reader.join(30)
        assert other == [[]]
        assert snapshots_of() == expected
        assert backend.list_experiments() == []  # the connection is in step after it
        forgotten = backend.start_snapshots([str(src)])  # never read (a pipeline with problems)
        assert [d["name"] for d in backend.list_datastores()] == ["workspaceblobstore"]
        del forgotten
    finally:
        stop()


def test_a_snapshot_error_is_the_callers_of_start_snapshots(tmp_path: Path) -> None:
    import pytest

    ws = Workspace.create(tmp_path / "ws")
    stop = serve_scripts(ws.location)
    try:
        backend = workspace_backend(ws.location)
        snapshots_of = backend.start_snapshots([str(tmp_path / "missing")])
        assert backend.list_experiments() == []  # reads the error's answer first, keeps it
        with pytest.raises(Exception, match="missing"):
            snapshots_of()
    finally:
        stop()


def test_a_compile_that_asks_the_agent_while_it_snapshots_does_not_wait_for_itself(
        tmp_path: Path, monkeypatch) -> None:
    import threading

    from cairn.client.pipeline import Pipeline as PipelineClass

    ws = Workspace.create(tmp_path / "ws")
    src = _source_folder(tmp_path)
    problems = PipelineClass._problems

    def asking(self: Any, *args: Any) -> list[str]:  # as a compile with no default datastore does
        self.workspace.get_default_datastore()
        return problems(self, *args)

    monkeypatch.setattr(PipelineClass, "_problems", asking)
    stop = serve_scripts(ws.location)
    try:
        here = Workspace(ws.location)
        assert isinstance(here._backend, AgentBackend)
        compiled: list[Any] = []
        pipeline = Pipeline(here, [PythonScriptStep("a.py", name="a", source_directory=str(src))])
        compiling = threading.Thread(target=lambda: compiled.append(pipeline._compile()), daemon=True)
        compiling.start()
        compiling.join(30)
        assert compiled, "the compile waited for its own snapshots"
        spec, props = compiled[0]
        assert spec.steps[0].snapshot == props["a"]["cairn.snapshot"] == here._backend.snapshots([str(src)])[str(src)]
    finally:
        stop()


def test_a_forked_child_never_reads_its_parents_pending_answer(tmp_path: Path) -> None:
    import os

    from cairn.backend.relay import RelayLost

    ws = Workspace.create(tmp_path / "ws")
    stop = serve_scripts(ws.location)
    try:
        backend = workspace_backend(ws.location)
        answer = backend._agent._begin("list_experiments", (), {})
        pid = os.fork()
        if pid == 0:  # the child: told the answer is not its own, the parent's stays unread
            try:
                answer()
            except RelayLost:
                os._exit(0)
            except BaseException:
                os._exit(2)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert answer() == []
    finally:
        stop()


def _source_folder(tmp_path: Path) -> Path:
    """A step's source folder holding a.py."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("print('a')\n")
    return src
