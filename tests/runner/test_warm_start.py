"""Warm step start: steps forked from a server that imported modules once behave like cold steps
(argv, cwd, variables, logs, exit codes, __main__, sys.path, fresh random state, no state shared
between steps), and can be canceled and timed out like them."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cairn import (
    ComputeTarget,
    Experiment,
    LocalCompute,
    Pipeline,
    PipelineData,
    PythonScriptStep,
    RunConfiguration,
    UserInputError,
    Workspace,
)

PRELOADED = "email.mime.text"  # a stdlib module no fresh interpreter has imported

STEP = f"""
    import json, os, random, sys, warnings
    warnings.warn("deprecated here", DeprecationWarning, stacklevel=2)  # hidden, as Python hides it
    preloaded = {PRELOADED!r} in sys.modules
    import helper  # a module beside the script: sys.path[0] is the script's folder
    import email
    leaked = getattr(email, "cairn_leak", None)
    email.cairn_leak = sys.argv[1]  # a later step must not see this
    print(json.dumps({{"argv": sys.argv, "cwd": os.getcwd(), "name": __name__, "file": __file__,
                      "preloaded": preloaded, "leaked": leaked, "group": os.getpgid(0) == os.getpid(),
                      "session": os.getsid(0) == os.getpid(), "orig_argv": sys.orig_argv[1:],
                      "streams": [(s.encoding, s.errors, s.line_buffering, s.write_through)
                                  for s in (sys.stdin, sys.stdout, sys.stderr)],
                      "var": os.environ.get("STEP_VAR"), "random": random.random(), "helper": helper.VALUE}}))
    print("to stderr", file=sys.stderr)
    if len(sys.argv) > 2:
        os.makedirs(sys.argv[2], exist_ok=True)
    code = int(os.environ.get("EXIT_CODE", "0"))
    if code:
        sys.exit(code)
"""


def warm_target(workspace: Workspace, modules: list[str] | None = None) -> None:
    ComputeTarget.create(workspace, "local",
                         LocalCompute.provisioning_configuration(warm_start_modules=modules or [PRELOADED]))


@pytest.fixture
def src(write_script: Callable[..., Path]) -> Path:
    write_script("helper.py", "VALUE = 7\n")
    return write_script("step.py", STEP)


def chain(src: Path, n: int, **variables: str) -> list[PythonScriptStep]:
    steps, previous = [], None
    for i in range(n):
        out = PipelineData(f"out{i}")
        rc = RunConfiguration()
        rc.environment_variables = {"STEP_VAR": f"v{i}", **variables}
        steps.append(PythonScriptStep("step.py", name=f"s{i}", source_directory=str(src), runconfig=rc,
                                      arguments=[f"step{i}", out], outputs=[out],
                                      inputs=[previous] if previous is not None else [], allow_reuse=False))
        previous = out
    return steps


def outputs(run: object) -> list[dict]:
    import json

    return [json.loads(s.get_stdout_log()) for s in sorted(run.get_steps(), key=lambda s: s.name)]  # type: ignore[attr-defined]


def test_warm_steps_behave_like_cold_ones(workspace: Workspace, src: Path) -> None:
    cold = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 3)))
    assert cold.wait_for_completion(show_output=False) == "Completed"
    warm_target(workspace)
    warm = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 3)))
    assert warm.wait_for_completion(show_output=False) == "Completed"
    cold_out, warm_out = outputs(cold), outputs(warm)
    assert [o["preloaded"] for o in cold_out] == [False] * 3
    assert [o["preloaded"] for o in warm_out] == [True] * 3
    for c, w in zip(cold_out, warm_out, strict=True):
        assert w["argv"][0] == c["argv"][0] == "step.py" and w["argv"][1] == c["argv"][1]
        assert Path(w["cwd"]).name == Path(w["argv"][2]).parts[-3]  # the step's own working folder
        assert w["name"] == "__main__" and w["file"].endswith("/step.py") and w["helper"] == 7
        assert w["leaked"] is None and w["group"] and w["var"] == c["var"]
        assert w["session"] and c["session"]
        assert w["orig_argv"][0] == c["orig_argv"][0] == "step.py" and w["orig_argv"][1:] == w["argv"][1:]
        assert w["streams"] == c["streams"]
    assert len({o["random"] for o in warm_out}) == 3  # each child reseeded
    for s in warm.get_steps():
        assert s.get_stderr_log() == "to stderr\n"
        assert "warm start: forked by server" in s.get_system_log()


def test_a_failing_warm_step_fails_with_its_exit_code(workspace: Workspace, src: Path) -> None:
    warm_target(workspace)
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 1, EXIT_CODE="3")))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    (step,) = run.get_steps()
    assert step._row()["exit_code"] == 3
    assert "exited with code 3" in step._row()["status_reason"]


def test_a_warm_step_can_be_canceled_and_timed_out(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    src = write_script("sleep.py", "import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n")
    warm_target(workspace)
    rc = RunConfiguration()
    rc.max_run_duration_seconds = 1
    timed = PythonScriptStep("sleep.py", name="timed", source_directory=str(src), runconfig=rc, allow_reuse=False)
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, [timed]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Failed"
    assert "exceeded max_run_duration_seconds=1" in run.get_steps()[0]._row()["status_reason"]

    slow = PythonScriptStep("sleep.py", name="slow", source_directory=str(src), allow_reuse=False)
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, [slow]))
    step = run.get_steps()[0]
    watch = workspace._backend.watch(run.id)
    assert watch.connect()
    while step.get_status() != "Running":  # woken by the agent's events, not a timer
        watch.wait(10)
    watch.close()
    pid = step._row()["pid"]
    run.cancel()
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=30) == "Canceled"
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_warm_steps_an_agent_stops_record_how_they_ended(workspace: Workspace, write_script: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    """A warm step hears of its end through its server: the agent that stops waits for its steps'
    threads to record it (as a cold step's do) before it exits; the next agent runs them again."""
    import os
    import select

    from cairn.engine.client import stop_agent
    from cairn.storage.layout import WorkspaceLayout

    src = write_script("once.py", f"""
        import os, sys, time
        marker = os.path.join({str(tmp_path)!r}, sys.argv[1])
        if not os.path.exists(marker):  # the first attempt says it is there, then waits to be stopped
            open(marker, "w").close()
            with open(marker + ".fifo", "w") as fifo:
                fifo.write("here")
            time.sleep(120)
    """)
    readers = []
    for name in ("a", "b"):  # (opened first, without waiting for a writer: each step's write then returns)
        os.mkfifo(tmp_path / f"{name}.fifo")
        readers.append(os.open(tmp_path / f"{name}.fifo", os.O_RDONLY | os.O_NONBLOCK))
    warm_target(workspace)
    steps = [PythonScriptStep("once.py", name=name, source_directory=str(src), arguments=[name], allow_reuse=False)
             for name in ("a", "b")]
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, steps))
    try:
        for fd in readers:  # both first attempts are in their scripts
            assert select.select([fd], [], [], 60)[0] and os.read(fd, 16) == b"here"
    finally:
        for fd in readers:
            os.close(fd)
    assert stop_agent(WorkspaceLayout(workspace.location))
    assert run.wait_for_completion(show_output=False, timeout_seconds=120) == "Completed"  # a new agent
    for step in run.get_steps():
        first = step.get_system_log().split("attempt 2 of step")[0]
        assert "forked by server pid" in first
        assert "stopped: the agent stopped; the step will run again" in first, first


def test_a_module_that_cannot_be_preloaded_is_reported_not_fatal(workspace: Workspace, src: Path) -> None:
    with pytest.warns(UserWarning, match="no module named 'no_such_module_for_cairn' can be imported here"):
        warm_target(workspace, ["no_such_module_for_cairn", PRELOADED])
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 1)))
    assert run.wait_for_completion(show_output=False) == "Completed"
    system = run.get_steps()[0].get_system_log()
    assert "could not preload: no_such_module_for_cairn" in system
    assert outputs(run)[0]["preloaded"] is True


@pytest.mark.parametrize("modules", ["pandas", [5], ["not a module"], [".relative"], ["pandas."], ["a..b"], [""],
                                     ["__main__"]])
def test_bad_warm_start_modules_are_clear_errors(modules: object) -> None:
    with pytest.raises(UserInputError, match="warm_start_modules"):
        LocalCompute.provisioning_configuration(warm_start_modules=modules)  # type: ignore[arg-type]


def test_a_module_only_beside_the_submitting_script_is_warned_about(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from cairn.client.compute import _findable

    beside, elsewhere = tmp_path / "script_folder", tmp_path / "on_the_path"
    for folder, name in ((beside, "cairn_beside_script"), (elsewhere, "cairn_on_the_path")):
        folder.mkdir()
        (folder / f"{name}.py").write_text("X = 1\n")
    monkeypatch.setattr(sys, "path", [str(beside), *sys.path, str(elsewhere)])  # [0]: the script's folder
    assert not sys.flags.safe_path  # (with -P, sys.path[0] is not the script's folder)
    assert _findable("cairn_on_the_path") and _findable("json") and _findable("sys")  # (a builtin)
    assert not _findable("cairn_beside_script")  # a fork server has no script folder: it would not find it
    from cairn.client.compute import _warn_unimportable

    with pytest.warns(UserWarning, match="no module named 'cairn_beside_script' ") as said:
        _warn_unimportable(("cairn_beside_script.sub", "cairn_beside_script.other", "cairn_on_the_path", "json"))
    assert len(said) == 1  # once for the package that is not there
    # a submodule is looked for in its package's folders, nothing imported; below a plain module
    # (os.path) nothing can be told without importing it
    assert _findable("email.mime.text") and _findable("json.decoder") and _findable("os.path")
    assert not _findable("email.mime.textt") and not _findable("json.nope.deeper")
    package = elsewhere / "cairn_pkg_probe"
    package.mkdir()
    (package / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    (package / "sub.py").write_text("")
    assert _findable("cairn_pkg_probe.sub") and not _findable("cairn_pkg_probe.subb")
    assert not (tmp_path / "imported").exists()  # found without importing the package
    extending = elsewhere / "cairn_pkg_extends"  # adds to its folders as it is imported (Keras does)
    extending.mkdir()
    (extending / "__init__.py").write_text("__path__.append(__path__[0] + '/api')\n")
    assert _findable("cairn_pkg_extends.layers")  # cannot be told without importing it: no warning
    with pytest.warns(UserWarning, match="no module named 'json.decodr'"):
        _warn_unimportable(("json.decodr",))


def test_what_python_reads_at_start_is_honoured_or_the_step_starts_cold(
        workspace: Workspace, write_script: Callable[..., Path], tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extra_module.py").write_text("NAME = 'from PYTHONPATH'\n")
    src = write_script("quirks.py", """
        import sys, time
        import extra_module
        print(extra_module.NAME, time.strftime("%Z"), hash("cairn"), flush=True)
        sys.stdout.write("partial line without newline")
    """)
    warm_target(workspace, ["json"])

    def run_with(**variables: str) -> object:
        rc = RunConfiguration()
        rc.environment_variables = {"PYTHONPATH": str(extra), "TZ": "Asia/Tokyo", **variables}
        step = PythonScriptStep("quirks.py", name="quirks", source_directory=str(src), runconfig=rc,
                                allow_reuse=False)
        run = Experiment(workspace, "warm").submit(Pipeline(workspace, [step]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        return run.get_steps()[0]

    step = run_with()
    assert "warm start: forked by server" in step.get_system_log()  # type: ignore[attr-defined]
    out = step.get_stdout_log()  # type: ignore[attr-defined]
    assert out.startswith("from PYTHONPATH JST ") and out.endswith("partial line without newline")
    seeded = run_with(PYTHONHASHSEED="0")
    assert "warm start skipped: the step sets PYTHONHASHSEED" in seeded.get_system_log()  # type: ignore[attr-defined]
    threads = run_with(OMP_NUM_THREADS="1")  # read by BLAS libraries as a preloaded module loads them
    assert "warm start skipped: the step sets OMP_NUM_THREADS" in threads.get_system_log()  # type: ignore[attr-defined]


def test_unclosed_files_are_flushed_in_warm_steps(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    src = write_script("unclosed.py", """
        import os, sys
        os.makedirs(sys.argv[1], exist_ok=True)
        f = open(os.path.join(sys.argv[1], "data.txt"), "w")
        f.write("kept")
    """)
    warm_target(workspace)
    out = PipelineData("out")
    step = PythonScriptStep("unclosed.py", name="unclosed", source_directory=str(src), arguments=[out],
                            outputs=[out], allow_reuse=False)
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    folder = Path(run.get_steps()[0].get_output_data("out").local_path)
    assert (folder / "data.txt").read_text() == "kept"


def test_files_left_open_by_a_module_or_a_builtin_are_flushed(tmp_path: Path) -> None:
    import builtins  # noqa: F401  (the step's own)
    import os
    import sys

    from cairn.runner.warm import WarmServer

    (tmp_path / "keeper.py").write_text("import sys\nLOG = open(sys.argv[1], 'w')\n")
    script = tmp_path / "main.py"
    script.write_text("import builtins, sys, keeper\nkeeper.LOG.write('important results\\n')\n"
                      "builtins.KEPT = open(sys.argv[2], 'w', buffering=1 << 16)\nbuiltins.KEPT.write('also')\n")
    server = WarmServer(sys.executable, ("json",), dict(os.environ), tmp_path / "warm.log")
    try:
        step = server.launch([sys.executable, str(script), str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                             str(tmp_path), dict(os.environ), str(tmp_path / "out.txt"), str(tmp_path / "err.txt"))
        assert step.wait(timeout=30) == 0, (tmp_path / "err.txt").read_text()
    finally:
        server.kill()
    assert (tmp_path / "a.txt").read_text() == "important results\n" and (tmp_path / "b.txt").read_text() == "also"


def test_the_server_refuses_a_bad_request_and_a_step_with_its_own_copy_of_a_module_it_imported(
        tmp_path: Path) -> None:
    """The agent checks the modules imported before the server was ready; the server checks again
    at each request (it imports Cairn's client later). A request it cannot read is refused, and the
    server goes on serving."""
    import os
    import socket
    import sys

    from cairn.runner.warm import WarmServer, WarmShadowed, WarmStartError

    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "json.py").write_text("MINE = True\n")
    (tmp_path / "own" / "main.py").write_text("print('never')\n")
    (tmp_path / "ok.py").write_text("print('served')\n")
    server = WarmServer(sys.executable, ("json",), dict(os.environ), tmp_path / "warm.log")

    def launch(script: Path, env: dict[str, str]) -> object:
        return server.launch([sys.executable, str(script)], str(tmp_path), env, str(tmp_path / "out.txt"),
                             str(tmp_path / "err.txt"))

    try:
        with pytest.raises(WarmShadowed) as shadowed:
            launch(tmp_path / "own" / "main.py", dict(os.environ))
        assert shadowed.value.files == [str(tmp_path / "own" / "json.py")]
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(server.socket_path)
        raw.sendall(b"{not json\n")
        assert b"error" in raw.recv(4096)
        raw.close()
        with pytest.raises(WarmStartError, match="the fork server did not"):
            launch(tmp_path / "ok.py", {**os.environ, "BIG": "x" * ((1 << 25) + 1000)})  # over its 32 MiB
        assert server.alive()
        step = launch(tmp_path / "ok.py", {**os.environ, "EMOJI": "\U0001F600" * 100_000})
        assert step.wait(timeout=30) == 0  # type: ignore[attr-defined]
        assert (tmp_path / "out.txt").read_text() == "served\n"
    finally:
        server.kill()


def test_a_step_whose_server_dies_fails_saying_so(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    src = write_script("kill_server.py", """
        import os, signal, sys, time
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            if b"forkserver.py" not in f.read():  # started cold: never kill the agent
                sys.exit("not forked by the warm-start server")
        os.kill(os.getppid(), signal.SIGKILL)  # the fork server, as an out-of-memory kill would
        time.sleep(30)
    """)
    warm_target(workspace)
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, [
        PythonScriptStep("kill_server.py", name="victim", source_directory=str(src), allow_reuse=False)]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Failed"
    reason = run.get_steps()[0].get_details()["statusReason"]
    assert "warm-start server of the step's environment died" in reason, reason


def test_a_shared_socket_folder_prepared_by_someone_else_is_refused(tmp_path: Path) -> None:
    from cairn.storage.layout import private_folder

    folder = tmp_path / "cairn-shared"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    with pytest.raises(PermissionError, match="not a private folder"):
        private_folder(folder)
    folder.chmod(0o700)
    private_folder(folder)


def test_the_warm_start_server_starts_with_the_agent(workspace: Workspace, src: Path) -> None:
    import re

    from cairn.engine.client import ensure_agent, stop_agent, sync
    from cairn.storage.layout import WorkspaceLayout

    layout = WorkspaceLayout(workspace.location)
    warm_target(workspace)
    stop_agent(layout)  # a fresh agent, which finds the warm target when it starts
    ensure_agent(layout)
    assert sync(layout)
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 2)))
    assert run.wait_for_completion(show_output=False) == "Completed"
    log = layout.agent_log.read_text()
    last_start = log.rindex("serving ")
    starting = log.index("warm start: starting the server of target 'local'", last_start)
    assert starting < log.index("claimed run", last_start)  # before any run asked for it
    (ready,) = re.findall(r"warm start: server pid (\d+) of target 'local' is ready", log[last_start:])
    for step in run.get_steps():  # every step, the first included, came from that server
        assert f"forked by server pid {ready} " in step.get_system_log()


def test_a_warm_step_reports_to_its_run(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    """Cairn's client is imported by the server once it is idle; a step that comes first imports it
    itself. Either way Run.get_context() is the step's run."""
    src = write_script("metric.py", """
        import sys
        from cairn import Run
        run = Run.get_context()
        run.log("answer", int(sys.argv[1]))
    """)
    warm_target(workspace)
    steps = [PythonScriptStep("metric.py", name=f"m{i}", source_directory=str(src), arguments=[str(40 + i)],
                              allow_reuse=False) for i in range(3)]
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"
    for step in run.get_steps():
        assert step.get_metrics()["answer"] == 40 + int(step.name[1:])
        assert "warm start: forked by server" in step.get_system_log()


def test_a_server_let_go_finishes_its_running_step(tmp_path: Path) -> None:
    """Stopping a server (the target's modules changed, the agent left) takes no new step but
    lets the running one end with its own exit code."""
    import os
    import sys

    from cairn.runner.warm import WarmServer

    script = tmp_path / "slow.py"
    script.write_text("import time\ntime.sleep(0.5)\nprint('done')\n")
    server = WarmServer(sys.executable, ("json",), dict(os.environ), tmp_path / "warm.log")
    try:
        step = server.launch([sys.executable, str(script)], str(tmp_path), dict(os.environ),
                             str(tmp_path / "out.txt"), str(tmp_path / "err.txt"))
        server.stop()
        assert step.wait(timeout=30) == 0
        assert (tmp_path / "out.txt").read_text() == "done\n"
        server._proc.wait(timeout=30)
        assert not Path(server.socket_path).parent.exists()  # the server removed its folder as it left
    finally:
        server.kill()


def test_a_warm_step_compiles_and_fails_as_a_cold_one(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    """No compiler flag of the server's own file reaches the script (its annotations are evaluated),
    and an uncaught exception is printed from the script's frames, as Python prints it."""
    src = write_script("step.py", """
        def f(x: int) -> None: ...
        print(f.__annotations__["x"])
        raise ValueError("boom")
    """)
    warm_target(workspace)
    step = PythonScriptStep("step.py", name="fails", source_directory=str(src), allow_reuse=False)
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    (failed,) = run.get_steps()
    assert "warm start: forked by server" in failed.get_system_log()
    assert failed.get_stdout_log() == "<class 'int'>\n"
    stderr = failed.get_stderr_log()
    assert stderr.startswith('Traceback (most recent call last):\n  File "')
    assert "forkserver" not in stderr and stderr.endswith("ValueError: boom\n")


def _module_on_the_agents_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, code: str) -> None:
    """A module the agent's fork servers can import (the agent starts later, from this process)."""
    import os
    import textwrap

    folder = tmp_path / "agent-modules"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(code))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setattr(sys, "path", [*sys.path, str(folder)])  # (found here too, as a user's are: no warning)


def test_a_server_that_could_not_start_is_not_waited_for_again_in_its_run(
        workspace: Workspace, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A preload that ends the server's process (os._exit) fails its start: the run's steps start cold
    at once, saying why; the next run tries again (the module may have been fixed meanwhile)."""
    starts = tmp_path / "starts.txt"
    _module_on_the_agents_path(monkeypatch, tmp_path, "cairn_exits_at_import", f"""
        import os
        open({str(starts)!r}, "a").write("start\\n")
        os._exit(3)
    """)
    warm_target(workspace, ["cairn_exits_at_import"])
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 3)))
    assert run.wait_for_completion(show_output=False) == "Completed"
    for step in run.get_steps():  # each started cold at once, saying why
        assert "the fork server could not start" in step.get_system_log()
        assert "exited with code 3" in step.get_system_log()
    assert starts.read_text() == "start\n"  # one try, not one per step
    _module_on_the_agents_path(monkeypatch, tmp_path, "cairn_exits_at_import", f"""
        open({str(starts)!r}, "a").write("fixed\\n")
    """)
    again = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 3)))
    assert again.wait_for_completion(show_output=False) == "Completed"
    assert all("forked by server pid" in step.get_system_log() for step in again.get_steps())
    assert starts.read_text() == "start\nfixed\n"


def test_threads_a_preload_started_are_said_missing_in_each_step(
        workspace: Workspace, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module_on_the_agents_path(monkeypatch, tmp_path, "cairn_starts_a_thread", """
        import threading
        threading.Thread(target=threading.Event().wait, name="cairn-background-poller", daemon=True).start()
    """)
    warm_target(workspace, ["cairn_starts_a_thread", PRELOADED])
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 1)))
    assert run.wait_for_completion(show_output=False) == "Completed"
    system = run.get_steps()[0].get_system_log()
    assert "forked by server pid" in system
    assert "the preloads started threads this step does not have" in system and "cairn-background-poller" in system
    warm_target(workspace, [PRELOADED])
    quiet = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 1)))
    assert quiet.wait_for_completion(show_output=False) == "Completed"
    assert "the preloads started threads" not in quiet.get_steps()[0].get_system_log()


def test_a_preload_that_exits_or_is_interrupted_as_it_imports_is_reported_not_fatal(
        workspace: Workspace, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module_on_the_agents_path(monkeypatch, tmp_path, "cairn_sys_exit_at_import", "import sys\nsys.exit(4)\n")
    _module_on_the_agents_path(monkeypatch, tmp_path, "cairn_interrupt_at_import", "raise KeyboardInterrupt\n")
    warm_target(workspace, ["cairn_sys_exit_at_import", "cairn_interrupt_at_import", PRELOADED])
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 2)))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert all(o["preloaded"] for o in outputs(run))  # the server runs, with what it could preload
    system = run.get_steps()[0].get_system_log()
    assert "cairn_sys_exit_at_import: SystemExit: 4" in system
    assert "cairn_interrupt_at_import: KeyboardInterrupt" in system


@contextmanager
def _a_module_that_hangs_at_import(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """The name of a module on the agent's path whose import blocks until the block ends."""
    import os

    fifo = tmp_path / "import-blocks-here"
    os.mkfifo(fifo)
    _module_on_the_agents_path(monkeypatch, tmp_path, "cairn_blocks_at_import", f"""
        open({str(fifo)!r}).read()  # until the test writes to it
    """)
    try:
        yield "cairn_blocks_at_import"
    finally:
        try:  # let the server's import end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def _processes_running(marker: str) -> list[int]:
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_step_waiting_for_its_server_can_be_canceled(
        workspace: Workspace, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from cairn.engine.client import stop_agent
    from cairn.storage.layout import WorkspaceLayout

    with _a_module_that_hangs_at_import(monkeypatch, tmp_path) as hanging:
        warm_target(workspace, [hanging])
        run = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 1)))
        step = run.get_steps()[0]
        deadline = time.monotonic() + 50  # within the 60 s a step waits for its server
        while "waiting for the warm-start server" not in step.get_system_log():
            assert time.monotonic() < deadline, "the step never waited for its server"
            time.sleep(0.1)
        run.cancel()
        assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=30) == "Canceled"
        assert step.get_status() == "Canceled" and "started pid" not in step.get_system_log()
        stop_agent(WorkspaceLayout(workspace.location))  # a server stuck importing leaves with its agent
        deadline = time.monotonic() + 30
        while _processes_running(hanging):
            assert time.monotonic() < deadline, "the fork server outlived its agent"
            time.sleep(0.1)


def test_warm_steps_end_and_write_as_cold_ones(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    src = write_script("ends.py", """
        import sys
        print("name:\\udcff")  # a file name that is not UTF-8, as os.listdir gives it
        if sys.argv[1] == "interrupt":
            raise KeyboardInterrupt
    """)
    write_script("json.py", "VALUE = 'the snapshot has its own'\n", folder="shadowing")
    shadowing = write_script("shadow.py", "import json\nprint(getattr(json, 'VALUE', 'the standard library'))\n",
                             folder="shadowing")
    write_script("sub/json.py", "VALUE = 'beside the script'\n", folder="nested")  # sys.path[0] is sub/
    nested = write_script("sub/shadow.py", "import json\nprint(getattr(json, 'VALUE', 'the standard library'))\n",
                          folder="nested")
    elsewhere = write_script("json.py", "VALUE = 'on its PYTHONPATH'\n", folder="elsewhere")
    on_its_path = RunConfiguration()
    on_its_path.environment_variables = {"PYTHONPATH": str(elsewhere)}
    warm_target(workspace, ["json"])
    steps = [PythonScriptStep("ends.py", name=how, source_directory=str(src), arguments=[how], allow_reuse=False)
             for how in ("print", "interrupt")]
    steps.append(PythonScriptStep("shadow.py", name="shadow", source_directory=str(shadowing), allow_reuse=False))
    steps.append(PythonScriptStep("sub/shadow.py", name="nested", source_directory=str(nested), allow_reuse=False))
    steps.append(PythonScriptStep("ends.py", name="path", source_directory=str(src), arguments=["print"],
                                  runconfig=on_its_path, allow_reuse=False))
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, steps), continue_on_step_failure=True)
    run.wait_for_completion(show_output=False, raise_on_error=False)
    by_name = {s.name: s for s in run.get_steps()}
    assert by_name["print"].get_status() == "Completed", by_name["print"].get_stderr_log()
    assert "warm start: forked by server" in by_name["print"].get_system_log()
    assert by_name["interrupt"].get_status() == "Failed"
    assert "SIGINT" in by_name["interrupt"]._row()["status_reason"]  # as Python ends on Ctrl-C
    assert by_name["shadow"].get_stdout_log().strip() == "the snapshot has its own"
    assert "warm start skipped: the snapshot has its own json.py" in by_name["shadow"].get_system_log()
    assert by_name["nested"].get_stdout_log().strip() == "beside the script"
    assert "warm start skipped: the snapshot has its own sub/json.py" in by_name["nested"].get_system_log()
    assert (f"warm start skipped: the step's module search path (its PYTHONPATH) has its own {elsewhere / 'json.py'}"
            in by_name["path"].get_system_log())


def test_after_one_step_gave_up_on_a_server_still_importing_the_next_do_not_wait(
        workspace: Workspace, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAIRN_WARM_START_WAIT", "1")  # the agent starts later, from this process
    with _a_module_that_hangs_at_import(monkeypatch, tmp_path) as hanging:
        warm_target(workspace, [hanging])
        run = Experiment(workspace, "warm").submit(Pipeline(workspace, chain(src, 2)))
        assert run.wait_for_completion(show_output=False, timeout_seconds=120) == "Completed"
        logs = {s.name: s.get_system_log() for s in run.get_steps()}
    assert "waiting for the warm-start server" in logs["s0"]
    assert "still importing after 1 s" in logs["s0"]
    assert "waiting for the warm-start server" not in logs["s1"]  # it started cold at once
    assert "still importing after 1 s" in logs["s1"]


def test_folders_of_servers_gone_are_pruned_and_a_listening_one_is_kept(tmp_path: Path) -> None:
    import socket

    from cairn.runner.warm import prune_stale_folders

    stale, live = tmp_path / "cairn-warm-stale", tmp_path / "cairn-warm-live"
    for folder in (stale, live):
        folder.mkdir()
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(stale / "s"))
    left.close()  # a socket file nobody listens on
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(live / "s"))
    listening.listen(1)
    try:
        assert prune_stale_folders(str(tmp_path)) == 0  # new: its server may not have bound its socket yet
        assert prune_stale_folders(str(tmp_path), min_age=0) == 1
        assert not stale.exists() and live.exists()
    finally:
        listening.close()


def test_a_relative_pythonpath_of_the_environment_is_the_steps_in_a_warm_step(
        workspace: Workspace, write_script: Callable[..., Path]) -> None:
    """The server reads a relative entry from its own folder; the step must read it from its own."""
    from cairn import Environment

    write_script("lib/mylib.py", "VALUE = 'from lib'\n")
    src = write_script("uses_lib.py", "import mylib\nprint(mylib.VALUE)\n")
    warm_target(workspace)
    env = Environment("with-path")
    env.python.user_managed_dependencies = True
    env.environment_variables = {"PYTHONPATH": "lib"}
    rc = RunConfiguration()
    rc.environment = env
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, [
        PythonScriptStep("uses_lib.py", name="uses", source_directory=str(src), runconfig=rc, allow_reuse=False)]))
    step = run.get_steps()[0] if run.wait_for_completion(show_output=False, raise_on_error=False) else None
    assert step is not None and step.get_status() == "Completed", step and step.get_stderr_log()
    assert step.get_stdout_log() == "from lib\n"
    assert "warm start: forked by server" in step.get_system_log()


def test_a_warm_steps_sys_path_is_a_cold_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's PYTHONPATH entries were resolved from its own folder: a step has its own, in
    their order, and finds nothing through the server's folder. Modules the step imported are
    finalised at its end (a zip file writes its directory, a __del__ runs); a variable that is not
    UTF-8 reaches it as it is; a request nested too deep is refused and the server goes on."""
    import os
    import socket
    import sys
    import zipfile

    from cairn.runner.warm import WarmServer

    server_folder, step_folder, absolute = tmp_path / "server", tmp_path / "step", tmp_path / "abs"
    for folder in (server_folder, step_folder / "lib", absolute):
        folder.mkdir(parents=True)
    (server_folder / "onlyserver.py").write_text("")
    (absolute / "dup.py").write_text("WHERE = 'abs'\n")
    (step_folder / "lib" / "dup.py").write_text("WHERE = 'lib'\n")
    (step_folder / "lib" / "keeper.py").write_text(
        "import zipfile\nZ = zipfile.ZipFile('model.zip', 'w')\nZ.writestr('w.txt', 'w')\n"
        "class D:\n    def __del__(self):\n        open('del.txt', 'w').write('ran')\nd = D()\n")
    (step_folder / "main.py").write_text(
        "import importlib.util, os, dup, keeper\n"
        "print(dup.WHERE, importlib.util.find_spec('onlyserver') is None, os.environb[b'WEIRD'].hex())\n")
    path = os.pathsep.join([str(absolute), "lib", ".", ""])
    monkeypatch.chdir(server_folder)
    server = WarmServer(sys.executable, ("json",), {**os.environ, "PYTHONPATH": path}, tmp_path / "warm.log")
    try:
        raw = socket.socket(socket.AF_UNIX)
        raw.connect(server.socket_path)
        raw.sendall(b"[" * 100_000 + b"\n")
        assert b"error" in raw.recv(4096)
        raw.close()
        env = {**os.environ, "PYTHONPATH": path, "WEIRD": os.fsdecode(b"caf\xe9")}
        step = server.launch([sys.executable, "main.py"], str(step_folder), env, str(tmp_path / "out.txt"),
                             str(tmp_path / "err.txt"))
        assert step.wait(timeout=60) == 0, (tmp_path / "err.txt").read_text()
    finally:
        server.kill()
    assert (tmp_path / "out.txt").read_text() == "abs True 636166e9\n"
    assert zipfile.ZipFile(step_folder / "model.zip").namelist() == ["w.txt"]
    assert (step_folder / "del.txt").read_text() == "ran" and (tmp_path / "err.txt").read_text() == ""


def test_a_variable_no_process_could_start_with_fails_warm_as_cold(workspace: Workspace,
                                                                   write_script: Callable[..., Path]) -> None:
    src = write_script("ok.py", "print('ran')\n")
    warm_target(workspace)
    rc = RunConfiguration()
    rc.environment_variables = {"BIG": "x" * 200_000}  # over Linux's 128 KiB for one variable
    run = Experiment(workspace, "warm").submit(Pipeline(workspace, [
        PythonScriptStep("ok.py", name="big", source_directory=str(src), runconfig=rc, allow_reuse=False)]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    step = run.get_steps()[0]
    assert "could not start the step" in step.get_details()["statusReason"]
    assert "warm start skipped: variable BIG is" in step.get_system_log()


def test_compiled_and_extension_modules_are_the_steps_own_too() -> None:
    from cairn.runner.forkserver import module_name

    assert [module_name(e, lambda: False) for e in ("json.py", "json.pyc", "json.cpython-311-x86_64-linux-gnu.so",
                                                    "json.abi3.so", "json.txt", ".py")] == \
        ["json", "json", "json", "json", "", ""]
    assert module_name("json", lambda: True) == "json" and module_name("json", lambda: False) == ""


@pytest.mark.parametrize("step_path", [None, "lib", "SERVER"])
def test_a_warm_steps_sys_path_equals_a_cold_ones(tmp_path: Path, step_path: str | None) -> None:
    """Whatever the server's PYTHONPATH (Cairn's folder, as the agent gives it) and the step's: the
    same sys.path as `python script.py`, so the step imports Cairn's client, and site-packages."""
    import json
    import os
    import subprocess
    import sys

    import cairn
    from cairn.runner.warm import WarmServer

    cairn_parent = str(Path(cairn.__file__).resolve().parents[1])
    (tmp_path / "lib").mkdir()
    (tmp_path / "show.py").write_text("import json, sys\nfrom cairn import Run\nprint(json.dumps(sys.path))\n")
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env = dict(base) if step_path is None else {**base, "PYTHONPATH": cairn_parent if step_path == "SERVER" else step_path}
    cold = subprocess.run([sys.executable, "show.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    server = WarmServer(sys.executable, ("json",), {**base, "PYTHONPATH": cairn_parent}, tmp_path / "warm.log")
    try:
        step = server.launch([sys.executable, "show.py"], str(tmp_path), env, str(tmp_path / "out.txt"),
                             str(tmp_path / "err.txt"))
        assert step.wait(timeout=60) == 0, (tmp_path / "err.txt").read_text()
    finally:
        server.kill()
    assert cold.returncode == 0, cold.stderr
    assert json.loads((tmp_path / "out.txt").read_text()) == json.loads(cold.stdout)


def test_a_daemon_thread_still_running_at_a_warm_steps_end_neither_stops_nor_sees_its_finalisation(
        tmp_path: Path) -> None:
    import os
    import sys
    import zipfile

    from cairn.runner.warm import WarmServer

    (tmp_path / "worker.py").write_text("import time\ndef tick():\n    time.sleep(0.001)\n")
    (tmp_path / "main.py").write_text(
        "import threading, worker, zipfile\n"
        "def beat():\n    while True:\n        worker.tick()\n"
        "threading.Thread(target=beat, daemon=True, name='heartbeat').start()\n"
        "import json, decimal, email.mime.text, xml.dom.minidom\n"  # some work at the end
        "Z = zipfile.ZipFile('model.zip', 'w')\nZ.writestr('w.txt', 'w')\n")  # left open, as cold Python allows
    server = WarmServer(sys.executable, ("json",), dict(os.environ), tmp_path / "warm.log")
    try:
        for _ in range(3):
            step = server.launch([sys.executable, "main.py"], str(tmp_path), dict(os.environ),
                                 str(tmp_path / "out.txt"), str(tmp_path / "err.txt"))
            assert step.wait(timeout=60) == 0
            # finalised as a cold step is, daemon thread or not: the zip file wrote its directory
            assert zipfile.ZipFile(tmp_path / "model.zip").namelist() == ["w.txt"]
            assert (tmp_path / "err.txt").read_text() == ""
        # a busy daemon thread and a finaliser that waits: the end is not held up by the thread
        (tmp_path / "busy.py").write_text(
            "import threading, time\n"
            "def spin():\n    n = 0\n    while True:\n        n += 1\n"
            "threading.Thread(target=spin, daemon=True).start()\n"
            "class Slow:\n    def __del__(self, sleep=time.sleep):\n        sleep(0.05)\n"
            "slow = Slow()\n")
        step = server.launch([sys.executable, "busy.py"], str(tmp_path), dict(os.environ),
                             str(tmp_path / "out.txt"), str(tmp_path / "err.txt"))
        assert step.wait(timeout=30) == 0
    finally:
        server.kill()


# Each a step's whole script: what Python does at a script's edges, which a fork must do the same.
EDGE_CASES = {
    "rewrapped": """
        import io, sys
        sys.stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", line_buffering=True)
        print("after re-wrapping", sys.__stdout__.name, sys.stdin.name, sys.__stdout__.mode)
        print(__annotations__)
    """,
    "hook_fails": """
        import atexit, sys
        atexit.register(lambda: print("atexit ran"))
        def hook(kind, value, tb):
            raise RuntimeError("hook broke")
        sys.excepthook = hook
        raise ValueError("boom")
    """,
    "hook_exits": """
        import atexit, sys
        atexit.register(lambda: print("atexit ran", repr(sys.last_value)))
        sys.excepthook = lambda *args: sys.exit(5)
        raise ValueError("boom")
    """,
    "hook_missing": """
        import sys
        del sys.excepthook
        raise ValueError("boom")
    """,
    "hook_none": """
        import sys
        sys.excepthook = None
        raise ValueError("boom")
    """,
    "huge_exit": "import sys\nsys.exit(2 ** 70)\n",
    "hook_outside_handler": """
        import sys
        sys.excepthook = lambda kind, value, tb: print("handling", sys.exc_info()[0], kind.__name__)
        raise ValueError("boom")
    """,
    "site_hook": """
        import os
        print("sitecustomize ran:", os.environ.get("SITE_RAN"))
    """,
    "authkey": """
        import multiprocessing
        print(multiprocessing.current_process().authkey.hex())
    """,
}


def test_a_warm_step_ends_as_a_cold_one_at_the_edges(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    """Re-wrapped standard streams, an excepthook that fails, exits or is missing, an exit status
    beyond a C long, a sitecustomize on the step's PYTHONPATH, compiled code as the script; and
    each step's own multiprocessing key."""
    import py_compile

    for name, code in EDGE_CASES.items():
        src = write_script(f"{name}.py", code, folder="edges")
    write_script("sitecustomize.py", "import os\nos.environ['SITE_RAN'] = 'yes'\n", folder="edges/lib")
    write_script("compiled_src.py", "print('compiled code ran')\n", folder="edges")
    py_compile.compile(str(src / "compiled_src.py"), cfile=str(src / "compiled.pyc"), doraise=True)

    def steps(tag: str) -> list[PythonScriptStep]:
        made = []
        for name in [*EDGE_CASES, "authkey_again"]:
            rc = RunConfiguration()
            if name == "site_hook":
                rc.environment_variables = {"PYTHONPATH": "lib"}
            script = "authkey.py" if name == "authkey_again" else f"{name}.py"
            made.append(PythonScriptStep(script, name=name, source_directory=str(src), runconfig=rc,
                                         arguments=[tag], allow_reuse=False))
        return [*made, PythonScriptStep("compiled.pyc", name="compiled", source_directory=str(src),
                                        arguments=[tag], allow_reuse=False)]

    def ended(run: object) -> dict[str, tuple[str, int | None, str, str]]:
        return {s.name: (s.get_status(), s._row()["exit_code"], s.get_stdout_log(), s.get_stderr_log())
                for s in run.get_steps()}  # type: ignore[attr-defined]

    ComputeTarget.create(workspace, "local", LocalCompute.provisioning_configuration(spare_interpreters=False))
    cold = Experiment(workspace, "edges").submit(Pipeline(workspace, steps("cold")), continue_on_step_failure=True)
    cold.wait_for_completion(show_output=False, raise_on_error=False)
    warm_target(workspace, [PRELOADED, "multiprocessing"])
    warm = Experiment(workspace, "edges").submit(Pipeline(workspace, steps("warm")), continue_on_step_failure=True)
    warm.wait_for_completion(show_output=False, raise_on_error=False)
    cold_ends, warm_ends = ended(cold), ended(warm)

    for how, ends in (("cold", cold_ends), ("warm", warm_ends)):
        status, code, out, err = ends["rewrapped"]
        assert (status, out) == ("Completed", "after re-wrapping <stdout> <stdin> w\n{}\n"), (how, err)
        status, code, out, err = ends["hook_fails"]
        assert (status, code, out) == ("Failed", 1, "atexit ran\n"), how
        assert "Error in sys.excepthook:" in err and "RuntimeError: hook broke" in err, how
        assert "Original exception was:" in err and err.rstrip().endswith("ValueError: boom"), how
        assert "During handling" not in err, how
        status, code, out, _ = ends["hook_exits"]
        assert (status, code, out) == ("Failed", 5, "atexit ran ValueError('boom')\n"), how
        status, code, _, err = ends["hook_missing"]
        assert (status, code) == ("Failed", 1) and err.startswith("sys.excepthook is missing\n"), how
        assert err.rstrip().endswith("ValueError: boom"), how
        status, code, _, err = ends["hook_none"]
        assert (status, code) == ("Failed", 1), how
        assert err.startswith("Error in sys.excepthook:\nTypeError: 'NoneType' object is not callable\n\n"
                              "Original exception was:\nTraceback"), (how, err)
        assert ends["huge_exit"][:2] == ("Failed", 255), how
        assert ends["hook_outside_handler"][:3] == ("Failed", 1, "handling None ValueError\n"), how
        assert ends["site_hook"][2] == "sitecustomize ran: yes\n", how
        assert ends["compiled"][:3] == ("Completed", 0, "compiled code ran\n"), how
        assert ends["authkey"][2] != ends["authkey_again"][2], how
    steps_by_name = {s.name: s for s in warm.get_steps()}
    assert "warm start: forked by server" in steps_by_name["hook_fails"].get_system_log()
    assert "warm start skipped: the script is a .pyc file" in steps_by_name["compiled"].get_system_log()
    assert "warm start skipped: the snapshot has its own lib/sitecustomize.py" in steps_by_name["site_hook"].get_system_log()


def test_what_preloads_set_and_what_a_failed_one_left(workspace: Workspace, write_script: Callable[..., Path],
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable a preloaded module sets as it is imported is set in the steps that use it, as a
    cold import would set it; a preload that fails leaves neither variables, warning filters nor
    logging handlers behind for every step."""
    modules = tmp_path / "preloads"
    modules.mkdir()
    (modules / "sets_variables.py").write_text("import os\nos.environ.setdefault('SET_AT_IMPORT', 'by the import')\n")
    (modules / "fails_halfway.py").write_text(
        "import logging, os, warnings\nos.environ['LEFT_BY_FAILURE'] = 'x'\nwarnings.simplefilter('error')\n"
        "logging.basicConfig(level=logging.DEBUG)\nraise ImportError('halfway')\n")
    monkeypatch.setenv("PYTHONPATH", str(modules))  # the agent and its fork server find them
    monkeypatch.setattr(sys, "path", [*sys.path, str(modules)])  # (and this process: no warning that it does not)
    src = write_script("uses.py", """
        import logging, os, warnings
        import sets_variables
        warnings.warn("only a warning")
        print(os.environ.get("SET_AT_IMPORT"), os.environ.get("LEFT_BY_FAILURE"), logging.root.handlers,
              logging.root.level)
    """, folder="uses")
    warm_target(workspace, ["sets_variables", "fails_halfway"])
    rc = RunConfiguration()
    rc.environment_variables = {"SET_AT_IMPORT": "by the step"}  # a cold import keeps it: setdefault
    run = Experiment(workspace, "preloads").submit(Pipeline(workspace, [
        PythonScriptStep("uses.py", name="uses", source_directory=str(src), allow_reuse=False),
        PythonScriptStep("uses.py", name="overrides", source_directory=str(src), allow_reuse=False, runconfig=rc)]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    for step in run.get_steps():
        log = step.get_system_log()
        assert "warm start: forked by server" in log and "could not preload: fails_halfway" in log
        expected = "by the step" if step.name == "overrides" else "by the import"
        assert step.get_stdout_log() == f"{expected} None [] 30\n"
        assert "UserWarning: only a warning" in step.get_stderr_log()


def test_a_target_keeps_at_most_so_many_servers_the_least_recently_used_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each server holds its imports in memory: one per environment, at most MAX_SERVERS of them."""
    import os
    import sys

    from cairn.runner import warm

    monkeypatch.setattr(warm, "MAX_SERVERS", 2)
    pool = warm.WarmPool(("json",))
    envs = [{**os.environ, "WHICH_ENV": str(n)} for n in range(3)]
    try:
        first = pool.server(sys.executable, envs[0], tmp_path)
        second = pool.server(sys.executable, envs[1], tmp_path)
        assert pool.server(sys.executable, envs[0], tmp_path) is first  # used again: the second is older now
        third = pool.server(sys.executable, envs[2], tmp_path)
        second._proc.wait(timeout=30)  # let go: nothing was running on it
        assert first.alive() and third.alive() and not second.alive()
        again = pool.server(sys.executable, envs[1], tmp_path)  # started again when asked for
        assert again is not second and again.alive()
        first._proc.wait(timeout=30)  # now the least recently used
    finally:
        pool.shutdown()


def test_an_edited_module_of_the_users_own_restarts_the_server_before_the_next_step(
        workspace: Workspace, write_script: Callable[..., Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    mods = tmp_path / "mods"
    mods.mkdir()
    module = mods / "cairn_own_preload.py"
    module.write_text("VALUE = 1\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(mods), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setattr(sys, "path", [*sys.path, str(mods)])  # (found here too: no warning that it is not)
    src = write_script("own.py", """
        import sys
        preloaded = "cairn_own_preload" in sys.modules
        import cairn_own_preload
        print(preloaded, cairn_own_preload.VALUE)
    """)
    warm_target(workspace, ["cairn_own_preload"])

    def run_once() -> tuple[str, str]:
        step = PythonScriptStep("own.py", name="own", source_directory=str(src), allow_reuse=False)
        run = Experiment(workspace, "warm").submit(Pipeline(workspace, [step]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        only = run.get_steps()[0]
        return only.get_stdout_log().strip(), only.get_system_log()

    said, system = run_once()
    assert said == "True 1" and "forked by server pid" in system
    first_server = system.split("forked by server pid ")[1].split()[0]
    module.write_text("VALUE = 22\n")  # (another size: seen even where mtimes are coarse)
    said, system = run_once()
    assert said == "True 22"  # preloaded again, by a new server
    assert f"{module}, preloaded by the server, changed since it started: the server starts again" in system
    assert system.split("forked by server pid ")[1].split()[0] != first_server


def test_what_a_server_watches_of_the_users_own_modules(tmp_path: Path) -> None:
    """Each preload's files are stated right after its import (a later preload may take minutes);
    a preload that failed is watched too (fixed, it restarts the server); a symlinked module is
    watched where it was imported from; a lazily loaded module is not imported by the watching."""
    import os
    import sys

    from cairn.runner.warm import WarmServer

    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "mine_a.py").write_text("A = 1\n")
    (mods / "slow_a.py").write_text(f"open({str(mods / 'mine_a.py')!r}, 'a').write('# edited meanwhile\\n')\n")
    (mods / "broken_b.py").write_text("def (\n")
    (mods / "r1.py").write_text("R = 1\n")
    (mods / "r2.py").write_text("R = 2\n")
    (mods / "link_d.py").symlink_to(mods / "r1.py")
    (mods / "heavy_c.py").write_text("raise ImportError('only when used')\n")
    (mods / "lazy_c.py").write_text(
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('heavy_c')\n"
        "spec.loader = importlib.util.LazyLoader(spec.loader)\n"
        "heavy = sys.modules['heavy_c'] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(heavy)\n")
    env = {**os.environ, "PYTHONPATH": str(mods)}

    def serve(*modules: str) -> WarmServer:
        return WarmServer(sys.executable, modules, env, tmp_path / "warm.log")

    edited_later = serve("mine_a", "slow_a")
    try:
        assert edited_later.changed() == str(mods / "mine_a.py")
    finally:
        edited_later.kill()
    others = serve("lazy_c", "broken_b", "link_d")
    try:
        assert others.alive() and others.ready["preloaded"] == ["lazy_c", "link_d"]
        assert others.changed() is None
        (mods / "link_d.py").unlink()
        (mods / "link_d.py").symlink_to(mods / "r2.py")  # re-pointed: another file, of the same size
        assert others.changed() == str(mods / "link_d.py")
        (mods / "link_d.py").unlink()
        (mods / "link_d.py").symlink_to(mods / "r1.py")
        assert others.changed() is None
        (mods / "broken_b.py").write_text("B = 2\n")  # fixed
        assert others.changed() == str(mods / "broken_b.py")
    finally:
        others.kill()


def test_edits_a_stat_cannot_tell_and_modules_in_zip_archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a filesystem's clock is coarse (2 s on FAT), an edit in the same tick as the read, at the
    same size, leaves the stat as it was: a module changed that recently when it was read has its
    content compared, until its clock has moved on. A module imported from a zip archive is watched
    through the archive."""
    import os
    import zipfile

    from cairn.runner import warm
    from cairn.runner.warm import WarmServer

    mods = tmp_path / "mods"
    mods.mkdir()
    recent = mods / "recent_j.py"
    recent.write_text("V = 1\n")
    archive = tmp_path / "lib.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("zipped_k.py", "K = 1\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(mods), str(archive)])}
    # a clock of an hour: every file was changed within its tick when the server read it, and still is
    monkeypatch.setattr(warm, "changed_too_recently", lambda st, now: True)
    server = WarmServer(sys.executable, ("recent_j", "zipped_k"), {**env, "CAIRN_FS_TICK_SECONDS": "3600"},
                        tmp_path / "warm.log")
    try:
        assert server.ready["preloaded"] == ["recent_j", "zipped_k"]
        watched = {entry[0]: entry for entry in server.ready["watched"]}
        assert watched[str(recent)][5] is not None and str(archive) in watched
        assert server.changed() is None
        as_read = os.stat(recent)
        recent.write_text("V = 2\n")  # same size; the coarse clock gives it the same time
        os.utime(recent, ns=(as_read.st_atime_ns, as_read.st_mtime_ns))
        assert server.changed() == str(recent)
        recent.write_text("V = 1\n")  # back as it was read
        os.utime(recent, ns=(as_read.st_atime_ns, as_read.st_mtime_ns))
        assert server.changed() is None
        monkeypatch.setattr(warm, "changed_too_recently", lambda st, now: False)  # its clock has moved on
        assert server.changed() is None and watched[str(recent)][5] is None  # settled: its stat tells now
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("zipped_k.py", "K = 22\n")
        assert server.changed() == str(archive)
    finally:
        server.kill()
    fine = WarmServer(sys.executable, ("recent_j",), {**env, "CAIRN_FS_TICK_SECONDS": "0"}, tmp_path / "warm.log")
    try:  # a clock whose tick has passed: stat alone, no content kept
        assert [entry[5] for entry in fine.ready["watched"] if entry[0] == str(recent)] == [None]
    finally:
        fine.kill()


def test_a_module_put_earlier_on_the_search_path_restarts_the_server(tmp_path: Path) -> None:
    """A cold start would import a copy put in a folder searched before the preloaded one's: the
    folders before it are watched (not installed code's, nor folders after it)."""
    import os

    from cairn.runner.warm import WarmServer

    early, late, after = tmp_path / "early", tmp_path / "late", tmp_path / "after"
    for folder in (early, late, after):
        folder.mkdir()
    (late / "mylib_m.py").write_text("VERSION = 'late'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (early, late, after)))}
    server = WarmServer(sys.executable, ("mylib_m", "json"), env, tmp_path / "warm.log")
    try:
        watched = {entry[0] for entry in server.ready["watched"]}
        assert str(early) in watched and str(after) not in watched
        assert not any(path.startswith(os.path.dirname(os.__file__)) for path in watched)
        (after / "mylib_m.py").write_text("VERSION = 'after'\n")  # found after: a cold start has the same
        assert server.changed() is None
        (early / "mylib_m.py").write_text("VERSION = 'early'\n")
        assert server.changed() == str(early) and server.is_folder(str(early))
    finally:
        server.kill()
    (early / "mylib_m.py").unlink()
    nested = late / "src"  # an entry inside another: the module is found in the longer one
    nested.mkdir()
    (late / "mylib_m.py").rename(nested / "mylib_m.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (early, late, nested)))}
    server = WarmServer(sys.executable, ("mylib_m",), env, tmp_path / "warm.log")
    try:
        kinds = {entry[0]: entry[6] for entry in server.ready["watched"]}
        assert kinds[str(early)] == kinds[str(late)] == "folder" and kinds[str(nested / "mylib_m.py")] == "file"
        assert server.is_folder(str(late)) and not server.is_folder(str(nested / "mylib_m.py"))
        (late / "mylib_m.py").write_text("VERSION = 'shadows the nested one'\n")
        assert server.changed() == str(late)
    finally:
        server.kill()


def test_files_stated_as_read_failed_preloads_and_generated_modules(tmp_path: Path) -> None:
    """A preload's own file edited while that same preload still imports is seen; a module a preload
    writes and then imports is not taken for an edit (no restart at every step); a dotted preload
    whose package fails is imported once, and the file it failed on is watched."""
    import os

    from cairn.runner.warm import WarmServer

    mods = tmp_path / "mods"
    (mods / "badpkg").mkdir(parents=True)
    (mods / "pkg2").mkdir()
    ran = tmp_path / "ran.txt"
    (mods / "self_f.py").write_text("import edits_f\n")
    (mods / "edits_f.py").write_text(f"open({str(mods / 'self_f.py')!r}, 'a').write('# edited during its import\\n')\n")
    (mods / "gen_e.py").write_text(
        f"open({str(mods / 'generated_e.py')!r}, 'w').write('TABLE = 1\\n')\nimport generated_e\n")
    (mods / "badpkg" / "__init__.py").write_text(f"open({str(ran)!r}, 'a').write('ran\\n')\nraise ImportError('no')\n")
    (mods / "badpkg" / "sub.py").write_text("")
    (mods / "pkg2" / "__init__.py").write_text("from . import broken\n")
    (mods / "pkg2" / "broken.py").write_text("def (\n")
    twice = mods / "twice_gen.py"
    (mods / "twice_h.py").write_text(  # writes a module, imports it, writes it again and imports it again
        "import importlib.util\n"
        "for value in ('1', '22222'):\n"
        f"    open({str(twice)!r}, 'w').write('X = ' + value + '\\n')\n"
        f"    spec = importlib.util.spec_from_file_location('twice_gen', {str(twice)!r})\n"
        "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
    (mods / "odd_i.py").write_text("raise SyntaxError('odd', ('a\\x00b', 1, 1, 'x'))\n")  # a name no file has
    server = WarmServer(sys.executable, ("self_f", "gen_e", "badpkg.sub", "pkg2", "twice_h", "odd_i"),
                        {**os.environ, "PYTHONPATH": str(mods)}, tmp_path / "warm.log")
    try:
        assert server.ready["preloaded"] == ["self_f", "gen_e", "twice_h"]
        assert ran.read_text() == "ran\n"  # not imported again to find what failed
        assert server.changed() == str(mods / "self_f.py")
        watched = {path for path, *_ in server.ready["watched"]}
        assert {str(mods / "generated_e.py"), str(mods / "badpkg" / "__init__.py"),
                str(mods / "pkg2" / "broken.py")} <= watched
    finally:
        server.kill()
    (mods / "edits_f.py").write_text("")  # (self_f is no longer edited as it is imported)
    again = WarmServer(sys.executable, ("self_f", "gen_e", "pkg2", "twice_h"), {**os.environ, "PYTHONPATH": str(mods)},
                       tmp_path / "warm.log")
    try:
        assert again.changed() is None  # generated_e.py and twice_gen.py, written then imported: as last read
        (mods / "pkg2" / "broken.py").write_text("FIXED = 1\n")
        assert again.changed() == str(mods / "pkg2" / "broken.py")
    finally:
        again.kill()


def test_a_pool_restarts_a_changed_server_once_per_step_and_once_for_all(tmp_path: Path) -> None:
    """Steps asking at once for a server found changed get one new server between them; a server
    that is changed again at once (a preload that edits another) is restarted once per step, never
    in a loop."""
    import os
    import threading

    from cairn.runner.warm import WarmPool

    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "mine_g.py").write_text("G = 1\n")
    (mods / "touch_g.py").write_text(f"open({str(mods / 'mine_g.py')!r}, 'a').write('# touched\\n')\n")
    env = {**os.environ, "PYTHONPATH": str(mods)}

    pool, restarts = WarmPool(("mine_g",)), []
    try:
        first = pool.server(sys.executable, env, tmp_path)
        (mods / "mine_g.py").write_text("G = 22\n")
        got: list[object] = []

        def ask() -> None:
            got.append(pool.server(sys.executable, env, tmp_path,
                                   on_restart=lambda path, is_folder: restarts.append((path, is_folder))))

        askers = [threading.Thread(target=ask) for _ in range(2)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(timeout=120)
        assert len(got) == 2 and got[0] is got[1] is not first
        assert restarts == [(str(mods / "mine_g.py"), False)]
    finally:
        pool.shutdown()

    storming, restarts = WarmPool(("mine_g", "touch_g")), []
    try:
        done: list[object] = []
        asker = threading.Thread(target=lambda: done.append(
            storming.server(sys.executable, env, tmp_path, on_restart=lambda path, _: restarts.append(path))))
        asker.start()
        asker.join(timeout=120)
        assert done and restarts == [str(mods / "mine_g.py")]  # once, then the new server, changed as it is
    finally:
        storming.shutdown()


@pytest.mark.parametrize(("failure", "tried_again"), [("exited", True), ("timed out", True), ("refused", False)])
def test_which_servers_that_could_not_start_the_next_run_tries_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str, tried_again: bool) -> None:
    from cairn.runner import warm

    starts: list[str] = []

    class Failing:
        def __init__(self, *args: object) -> None:
            starts.append(failure)
            if failure == "refused":
                raise warm.WarmStartRefused("warm start is not possible here: no os.pidfd_open")
            raise warm.WarmStartError(f"the fork server {failure}")

    monkeypatch.setattr(warm, "WarmServer", Failing)
    pool = warm.WarmPool(("anything",))
    for _run in range(2):
        with pytest.raises(warm.WarmStartError, match="could not start"):
            pool.server(sys.executable, {}, tmp_path)
        with pytest.raises(warm.WarmStartError, match="could not start"):  # once a run: not again for its next step
            pool.server(sys.executable, {}, tmp_path)
        pool.retry_failed()  # (a run begins)
    assert len(starts) == (2 if tried_again else 1)
