"""Spare interpreters: a step run by an interpreter started ahead behaves exactly as ``python
script.py`` started when the step does (same output, errors, exit status, __main__, sys.path,
modules); it starts cold where its start would differ; the engine uses them by default and not
when told not to."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cairn import (
    ComputeTarget,
    Experiment,
    LocalCompute,
    Pipeline,
    PythonScriptStep,
    RunConfiguration,
    Workspace,
)
from cairn.runner.spares import ForkedStep, SparePool

PROBE = '''
    """the probe's docstring"""
    import atexit, json, os, sys, threading, warnings

    def annotated(x: "undefined_name") -> None: ...
    warnings.warn("deprecated at the top level", DeprecationWarning, stacklevel=2)
    print(json.dumps({"file": __file__, "name": __name__, "doc": __doc__, "spec": repr(__spec__),
                      "package": __package__, "loader": type(__loader__).__name__, "argv": sys.argv,
                      "orig_argv": sys.orig_argv, "annotations": __annotations__,
                      "path": sys.path, "cwd": os.getcwd(), "var": os.environ.get("PROBE_VAR"),
                      "stdin": sys.stdin.read(), "builtins": type(__builtins__).__name__,
                      "main": sys.modules["__main__"].__dict__ is globals(), "cached": __cached__,
                      "modules": sorted(sys.modules), "flags": str(sys.flags), "encoding": sys.stdout.encoding,
                      "seekable": [sys.stdin.seekable(), sys.stdout.seekable(), sys.stdout.tell() >= 0],
                      "same": [sys.stdout is sys.__stdout__, sys.stderr is sys.__stderr__],
                      "annotation": repr(annotated.__annotations__["x"])}, sort_keys=True))
    atexit.register(lambda: print("atexit ran", flush=True))
    threading.Thread(target=lambda: print("thread ended", flush=True)).start()
    kept = open("kept.txt", "w")
    kept.write("written before the end")  # flushed when the interpreter finalises, whatever the end
    how = sys.argv[1]
    if how == "raise":
        def inner():
            raise ValueError("boom")
        inner()
    if how == "exit3":
        sys.exit(3)
    if how == "exit-message":
        sys.exit("a message for stderr")
    if how == "interrupt":
        raise KeyboardInterrupt
    if how == "no-exit":
        sys.exit = lambda *args: None
        raise RuntimeError("still a failure")
'''


@pytest.fixture(scope="module", params=["forked", "started"])
def pool(request: pytest.FixtureRequest) -> SparePool:
    """Both kinds of spare: one that forks a child per step, and interpreters started ahead."""
    spares = SparePool(1, fork=request.param == "forked")
    yield spares
    spares.shutdown()


def run_both(pool: SparePool, folder: Path, argv: list[str], env: dict[str, str],
             kept: str = "") -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of ``argv`` started cold, then by a spare interpreter
    (``kept``: where the spare keeps the script's compiled code)."""
    results = []
    with open(folder / "cold.out", "wb") as out, open(folder / "cold.err", "wb") as err:
        code = subprocess.run(argv, cwd=folder, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL).returncode
    results.append((code, (folder / "cold.out").read_text(), (folder / "cold.err").read_text()))
    pool.want(argv[0], env)
    spare = None
    while spare is None:  # the pool's thread starts it
        spare = pool.take(argv[0], env, env)
    assert pool.launch(spare, argv, str(folder), str(folder / "spare.out"), str(folder / "spare.err"), env, kept)
    code = spare.wait(timeout=60)
    results.append((code, (folder / "spare.out").read_text(), (folder / "spare.err").read_text()))
    return results


def run_twice(pool: SparePool, tmp_path: Path, script: str, source: str, kept: Path, args: tuple[str, ...] = (),
              envs: tuple[dict, dict] = ({}, {}), before_second: Callable[[], None] = lambda: None,
              ) -> list[tuple[int, str, str]]:
    """``run_both`` for the same script content in two folders (``first``, ``second``), keeping its
    compiled code at ``kept``; ``envs``: variables added to each run's; ``before_second`` runs
    between the two. Returns [(cold, spare) of the first run, (cold, spare) of the second]."""
    results = []
    for run, variables in zip(("first", "second"), envs, strict=True):
        if run == "second":
            before_second()
        (tmp_path / run).mkdir()
        (tmp_path / run / script).write_text(source)
        results.append(run_both(pool, tmp_path / run, [sys.executable, script, *args], {**os.environ, **variables},
                                str(kept)))
    return results


@pytest.mark.parametrize("how", ["ok", "raise", "exit3", "exit-message", "interrupt", "no-exit"])
def test_a_spare_runs_a_script_exactly_as_python_would(pool: SparePool, tmp_path: Path, how: str) -> None:
    (tmp_path / "probe.py").write_text(textwrap.dedent(PROBE))
    env = dict(os.environ, PROBE_VAR="from the step", PYTHONUNBUFFERED="1")
    cold, spare = run_both(pool, tmp_path, [sys.executable, "probe.py", how], env)
    assert spare == cold
    expected = {"ok": 0, "raise": 1, "exit3": 3, "exit-message": 1, "interrupt": -2, "no-exit": 1}[how]
    assert cold[0] == expected
    assert "thread ended" in cold[1] and "atexit ran" in cold[1]  # the interpreter ended as usual
    assert (tmp_path / "kept.txt").read_text() == "written before the end"
    assert '"annotation": "\'undefined_name\'"' in cold[1]  # no __future__ flag leaks from the boot file
    assert "DeprecationWarning" not in cold[2]
    if how == "raise":
        assert cold[2].startswith('Traceback (most recent call last):\n  File "' + str(tmp_path / "probe.py"))
        assert "spare_boot" not in spare[2]


def test_a_zip_application_runs_as_python_runs_it(pool: SparePool, tmp_path: Path) -> None:
    import zipapp

    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__main__.py").write_text("import sys\nprint('zipped', sys.argv[1:])\n")
    zipapp.create_archive(tmp_path / "app", tmp_path / "app.pyz")
    (tmp_path / "app.pyz").rename(tmp_path / "app.py")  # a zip under a script's name
    cold, spare = run_both(pool, tmp_path, [sys.executable, "app.py", "x"], dict(os.environ))
    assert spare == cold == (0, "zipped ['x']\n", "")


def test_a_syntax_error_reads_as_it_does_cold(pool: SparePool, tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("x = (\n")
    cold, spare = run_both(pool, tmp_path, [sys.executable, "broken.py"], dict(os.environ))
    assert spare == cold
    assert cold[0] == 1 and "SyntaxError" in cold[2]


@pytest.mark.parametrize("how", ["ok", "raise"])
def test_code_kept_from_an_earlier_run_runs_as_the_script_would(pool: SparePool, tmp_path: Path, how: str) -> None:
    """The second spare of the same content loads the code the first compiled: it must still be the
    script's own, at its own path (``__file__``, every frame of a traceback, nested functions)."""
    results = run_twice(pool, tmp_path, "probe.py", textwrap.dedent(PROBE), tmp_path / "kept" / "probe-content", (how,))
    (kept_file,) = (tmp_path / "kept").iterdir()  # written by the first spare, read by the second
    assert kept_file.name.startswith("probe-content.")
    for cold, spare in results:
        assert spare == cold
    second_cold = results[1][0]
    assert str(tmp_path / "second" / "probe.py") in second_cold[1]
    if how == "raise":
        assert second_cold[2].count(str(tmp_path / "second" / "probe.py")) == 2  # the top level and inner()
        assert str(tmp_path / "first") not in results[1][1][2]


def test_a_compile_warning_is_printed_at_every_run_and_its_code_not_kept(pool: SparePool, tmp_path: Path) -> None:
    kept = tmp_path / "kept" / "warns-content"
    source = "x = 1\nprint(x is 1)\n"  # SyntaxWarning: "is" with a literal
    for cold, spare in run_twice(pool, tmp_path, "warns.py", source, kept):
        assert spare == cold
        assert "SyntaxWarning" in cold[2] and cold[1] == "True\n"
    assert not kept.parent.exists()


def test_kept_code_is_what_a_spare_runs(pool: SparePool, tmp_path: Path) -> None:
    """Kept code is loaded, not compiled again (the agent keys it by the script's content digest)."""
    import marshal

    kept = tmp_path / "kept" / "hello-content"

    def replace_kept() -> None:  # what the first spare kept, replaced: the second runs what is kept
        (kept_file,) = kept.parent.iterdir()
        kept_file.write_bytes(marshal.dumps(compile("print('from kept code')", "elsewhere.py", "exec")))

    _first, (_cold, spare) = run_twice(pool, tmp_path, "hello.py", "print('hello')\n", kept, before_second=replace_kept)
    assert spare == (0, "from kept code\n", "")


ESCAPE = "x = '\\d'\nprint(len(x))\n"  # an invalid escape sequence: a DeprecationWarning as it compiles
LONG_LITERAL = "print(len(str(" + "9" * 5000 + ")))\n"  # over the default integer digit limit


@pytest.mark.parametrize("source, first, second", [
    (ESCAPE, {}, {"PYTHONWARNINGS": "error"}), (ESCAPE, {"PYTHONWARNINGS": "ignore"}, {}),
    (ESCAPE, {}, {"PYTHONDEVMODE": "1"}), (LONG_LITERAL, {"PYTHONINTMAXSTRDIGITS": "0"}, {})])
def test_kept_code_is_not_used_under_other_compiler_settings(pool: SparePool, tmp_path: Path, source: str,
                                                            first: dict, second: dict) -> None:
    """What compile() prints or raises also depends on the warning filters and the digit limit:
    code kept under one setting is not loaded under another."""
    for cold, spare in run_twice(pool, tmp_path, "script.py", source, tmp_path / "kept" / "content",
                                 envs=(first, second)):
        assert spare == cold


def test_code_with_set_constants_is_not_kept(pool: SparePool, tmp_path: Path) -> None:
    """A set display of constants compiles to a frozenset, which marshal rebuilds in another order:
    its iteration order would differ from a cold start's under the same PYTHONHASHSEED."""
    words = ", ".join(f"'w{i}'" for i in range(40))
    kept = tmp_path / "kept" / "content"
    seed = {"PYTHONHASHSEED": "5"}
    for cold, spare in run_twice(pool, tmp_path, "script.py", f"for w in {{{words}}}:\n    print(w, end=' ')\n",
                                 kept, envs=(seed, seed)):
        assert spare == cold
    assert not kept.parent.exists()


def test_unreadable_kept_code_is_compiled_again(pool: SparePool, tmp_path: Path) -> None:
    kept = tmp_path / "kept" / "hello-content"

    def spoil_kept() -> None:
        (kept_file,) = kept.parent.iterdir()
        kept_file.write_bytes(b"not marshalled code")

    _first, (cold, spare) = run_twice(pool, tmp_path, "hello.py", "print('hello')\n", kept, before_second=spoil_kept)
    assert spare == cold == (0, "hello\n", "")


@pytest.mark.parametrize("fork", [True, False])
def test_a_site_folder_changed_after_the_spare_started_makes_it_start_cold(tmp_path: Path, fork: bool) -> None:
    """``.pth`` files are read as Python starts: a spare that started before one appeared becomes
    a cold start of the step (same process), which reads it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    site_dir = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert site_dir.startswith(str(tmp_path))
    (tmp_path / "show.py").write_text("import os, sys\nprint('extra' if any(p.endswith('added') for p in sys.path) "
                                      "else 'plain', os.getpid())\n")
    pool, env = SparePool(1, fork=fork), dict(os.environ)
    try:
        for pth in ("none", "extra"):
            pool.want(python, env)
            spare = None
            while spare is None:
                spare = pool.take(python, env, env)
            if isinstance(spare, ForkedStep):
                assert spare.forking.ready.wait(30) and not spare.forking.dead  # it serves: its site folders are read
            else:
                assert spare.stdout is not None
                assert spare.stdout.read(1) == b"+"  # it is up: its site folders are read
            if pth == "extra":
                (tmp_path / "added").mkdir()
                Path(site_dir, "extra.pth").write_text(str(tmp_path / "added") + "\n")
            out = tmp_path / f"{pth}.txt"
            assert pool.launch(spare, [python, "show.py"], str(tmp_path), str(out), str(tmp_path / "err.txt"), env)
            assert spare.wait(timeout=60) == 0
            assert out.read_text() == f"{'plain' if pth == 'none' else 'extra'} {spare.pid}\n"
    finally:
        pool.shutdown()


def test_a_step_whose_other_variables_differ_gets_no_spare() -> None:
    """Only what Cairn adds for each run of a step may differ from what its spare started with:
    the dynamic loader, libc, Python and .pth files read the others as a process starts."""
    pool = SparePool(1, fork=False)
    try:
        base = dict(os.environ, PYTHONUNBUFFERED="1")
        for name, value in (("PYTHONHASHSEED", "7"), ("LC_ALL", "C"), ("LD_LIBRARY_PATH", "/opt/lib"),
                            ("COVERAGE_PROCESS_START", "x")):
            assert pool.take(sys.executable, base, {**base, name: value}) is None
        pool.want(sys.executable, base)
        spare = None
        while spare is None:
            spare = pool.take(sys.executable, base, {**base, "CAIRN_RUN_ID": "step_1", "AML_PARAMETER_n": "3"})
        spare.kill()
        spare.wait()
    finally:
        pool.shutdown()


def test_a_spare_that_cannot_enter_the_step_folder_leaves_the_step_to_a_cold_start(
        pool: SparePool, tmp_path: Path) -> None:
    env = dict(os.environ)
    pool.want(sys.executable, env)
    spare = None
    while spare is None:
        spare = pool.take(sys.executable, env, env)
    assert not pool.launch(spare, [sys.executable, "x.py"], str(tmp_path / "missing"), str(tmp_path / "o"),
                           str(tmp_path / "e"), env)
    assert spare.wait(timeout=30) != 0  # it ran nothing


def test_a_spare_stuck_starting_is_killed_and_never_takes_the_step(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import cairn.runner.spares as spares_module

    monkeypatch.setattr(spares_module, "TAKE_TIMEOUT", 0.5)
    stuck = tmp_path / "python"
    stuck.write_text("#!/bin/sh\nexec sleep 600\n")
    stuck.chmod(0o755)
    pool, env = SparePool(1), dict(os.environ)
    try:
        pool.want(str(stuck), env)
        spare = None
        while spare is None:
            spare = pool.take(str(stuck), env, env)
        assert not pool.launch(spare, [str(stuck), "x.py"], str(tmp_path), str(tmp_path / "o"), str(tmp_path / "e"),
                               env)
        assert spare.wait(timeout=30) == -9
    finally:
        pool.shutdown()


def test_a_spare_that_is_gone_is_not_given_a_step(tmp_path: Path) -> None:
    pool = SparePool(1, fork=False)
    try:
        env = dict(os.environ)
        pool.want(sys.executable, env)
        spare = None
        while spare is None:
            spare = pool.take(sys.executable, env, env)
        spare.kill()
        spare.wait()
        assert not pool.launch(spare, [sys.executable, "x.py"], str(tmp_path), str(tmp_path / "o"), str(tmp_path / "e"),
                               env)
    finally:
        pool.shutdown()


def test_idle_spares_exit_when_let_go() -> None:
    pool = SparePool(2, fork=False)
    env = dict(os.environ)
    pool.want(sys.executable, env)
    spares = []
    while len(spares) < 2:
        spare = pool.take(sys.executable, env, env)
        if spare is not None:
            spares.append(spare)
    pool.shutdown()
    for spare in spares:  # taken but never given a step: the caller lets them go
        assert spare.stdin is not None
        spare.stdin.close()
        assert spare.wait(timeout=30) == 0


WAIT_FOR_SPARE = """
    import os, re, sys, time
    with open("/proc/self/environ", "rb") as f:  # what the process started with
        started_with = b"MY_START_VAR=yes" in f.read().split(b"\\0")
    print(os.getpid(), os.environ["CAIRN_STEP_NAME"], started_with)

    def forking_spare_serves():  # one of this step's environment: the agent says so in its log
        try:
            with open(os.path.join(os.environ["CAIRN_WORKSPACE"], ".cairn", "agent.log")) as f:
                said = f.read()
        except OSError:
            return False
        for pid in re.findall(r"spare interpreter pid (\\d+) .* serves", said):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if b"MY_START_VAR=yes" in f.read().split(b"\\0"):
                        return True
            except OSError:
                pass
        return False

    def started_spare_up():  # a spare_boot.py child of the agent
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    spare = b"spare_boot.py" in f.read()
            except OSError:
                continue
            if spare and parent == os.getppid():
                return True
        return False

    if sys.argv[1] != "go":  # until the agent has a spare interpreter up for the next step
        up = forking_spare_serves if sys.argv[1] == "wait-forked" else started_spare_up
        deadline = time.monotonic() + 60
        while not up():
            if time.monotonic() > deadline:
                sys.exit("no spare interpreter was started")
            time.sleep(0.02)
"""


@pytest.mark.parametrize("spares", ["forked", "started", "off"])
def test_the_engine_runs_steps_in_spares_unless_told_not_to(workspace: Workspace, write_script: Callable[..., Path],
                                                            spares: str) -> None:
    from cairn import PipelineData

    src = write_script("step.py", WAIT_FOR_SPARE)
    ComputeTarget.create(workspace, "local", LocalCompute.provisioning_configuration(
        spare_interpreters={"forked": True, "started": "started", "off": False}[spares]))
    first = PipelineData("first")
    rc = RunConfiguration()
    rc.environment_variables = {"MY_START_VAR": "yes"}  # the spare starts with the step's own variables
    steps = [PythonScriptStep("step.py", name="first", source_directory=str(src), outputs=[first], runconfig=rc,
                              arguments=[{"forked": "wait-forked", "started": "wait-started"}.get(spares, "go"), first],
                              allow_reuse=False),
             PythonScriptStep("step.py", name="second", source_directory=str(src), inputs=[first], runconfig=rc,
                              arguments=["go", first], allow_reuse=False)]
    run = Experiment(workspace, "spares").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"
    by_name = {step.name: step for step in run.get_steps()}
    printed = {name: by_name[name].get_stdout_log().split() for name in by_name}
    assert len({p[0] for p in printed.values()}) == 2  # each step its own process
    assert all(p[2] == "True" for p in printed.values())
    second = by_name["second"].get_system_log()
    assert ("(an interpreter started ahead)" in second) == (spares == "started")
    assert ("(forked from a spare interpreter)" in second) == (spares == "forked")
    if spares == "off":
        assert "started ahead" not in by_name["first"].get_system_log()
        assert "forked" not in by_name["first"].get_system_log()
    # a spare keeps the script's compiled code by content, for the next run of it
    kept = list((Path(workspace.location) / ".cairn" / "compiled").glob("*"))
    assert len(kept) == (0 if spares == "off" else 1)


def test_kept_code_older_than_a_week_is_pruned(tmp_path: Path) -> None:
    from cairn.runner.spares import prune_kept_code

    (tmp_path / "old").write_bytes(b"x")
    (tmp_path / "new").write_bytes(b"x")
    os.utime(tmp_path / "old", (0, 0))
    assert prune_kept_code(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["new"]
    assert prune_kept_code(tmp_path / "missing") == 0


@pytest.mark.parametrize("value", ["no", 1, None, "fork"])
def test_spare_interpreters_must_be_a_boolean_or_a_kind(value: object) -> None:
    from cairn import UserInputError

    with pytest.raises(UserInputError, match="spare_interpreters must be True, False, 'forked' or 'started'"):
        LocalCompute.provisioning_configuration(spare_interpreters=value)  # type: ignore[arg-type]
    for good in (True, False, "forked", "started"):
        LocalCompute.provisioning_configuration(spare_interpreters=good)


def test_the_spares_bytecode_is_rewritten_when_it_was_made_from_another_source(tmp_path: Path) -> None:
    """A spare imports spare_job.py at every start: its bytecode must match the source, whatever
    the two files' times (a checkout can give the source an older time than a stale .pyc)."""
    import importlib.util

    from cairn.runner.spares import ensure_compiled

    source = tmp_path / "job.py"
    source.write_text("VALUE = 1\n")
    ensure_compiled(str(source))
    cached = Path(importlib.util.cache_from_source(str(source)))
    first = cached.read_bytes()
    ensure_compiled(str(source))
    assert cached.read_bytes() == first  # fresh: left alone
    source.write_text("VALUE = 22\n")  # another size, and a time older than the .pyc's
    os.utime(source, (1_000_000, 1_000_000))
    ensure_compiled(str(source))
    assert cached.read_bytes() != first
    namespace: dict = {}
    import marshal

    exec(marshal.loads(cached.read_bytes()[16:]), namespace)
    assert namespace["VALUE"] == 22


@pytest.mark.parametrize("case", ["rewrapped", "hook_fails", "hook_exits", "hook_missing", "hook_none", "huge_exit",
                                  "hook_outside_handler"])
def test_a_spare_ends_a_script_as_python_does_at_its_edges(pool: SparePool, tmp_path: Path, case: str) -> None:
    """Re-wrapped standard streams; an excepthook that fails, exits, is missing or is None; an exit
    status beyond a C long: exactly as a cold start prints and exits."""
    from tests.runner.test_warm_start import EDGE_CASES

    (tmp_path / "edge.py").write_text(textwrap.dedent(EDGE_CASES[case]))
    cold, spare = run_both(pool, tmp_path, [sys.executable, "edge.py"], dict(os.environ))
    assert spare == cold
    assert cold[0] == {"rewrapped": 0, "hook_exits": 5, "huge_exit": 255}.get(case, 1)


@pytest.mark.parametrize("kind", ["zip-with-shebang", "compiled-without-suffix"])
def test_what_python_recognises_by_content_runs_as_python_runs_it(pool: SparePool, tmp_path: Path,
                                                                   kind: str) -> None:
    """A zip application with a shebang line first (zipapp's ``-p``), compiled code under any name:
    Python tells them by their content; a spare starts them cold, as the warm start does."""
    import py_compile
    import zipapp

    from cairn.runner.execute import _not_source

    if kind == "zip-with-shebang":
        (tmp_path / "app").mkdir()
        (tmp_path / "app" / "__main__.py").write_text("import sys\nprint('zipped', sys.argv[1:])\n")
        zipapp.create_archive(tmp_path / "app", tmp_path / "run.py", interpreter="/usr/bin/env python3")
        expected = "zipped ['x']\n"
    else:
        (tmp_path / "src.py").write_text("import sys\nprint('compiled', sys.argv[1:])\n")
        py_compile.compile(str(tmp_path / "src.py"), cfile=str(tmp_path / "run.py"), doraise=True)
        expected = "compiled ['x']\n"
    assert _not_source(tmp_path / "run.py")
    cold, spare = run_both(pool, tmp_path, [sys.executable, "run.py", "x"], dict(os.environ))
    assert spare == cold == (0, expected, "")


def test_a_step_with_a_relative_pythonpath_gets_its_own_folders(workspace: Workspace,
                                                                 write_script: Callable[..., Path]) -> None:
    """A spare resolved a relative PYTHONPATH (and ran a sitecustomize there) in the agent's folder
    as it started: such a step starts cold, finding its modules and its sitecustomize."""
    src = write_script("uses_lib.py", "import os, helper\nprint(helper.VALUE, os.environ.get('SITE_RAN'))\n")
    write_script("helper.py", "VALUE = 'from lib'\n", folder="src/lib")
    write_script("sitecustomize.py", "import os\nos.environ['SITE_RAN'] = 'yes'\n", folder="src/lib")
    steps, previous = [], None
    for i in range(3):
        rc = RunConfiguration()
        rc.environment_variables = {"PYTHONPATH": "lib"}
        step = PythonScriptStep("uses_lib.py", name=f"s{i}", source_directory=str(src), runconfig=rc,
                                allow_reuse=False)
        if previous is not None:
            step.run_after(previous)  # one at a time: a core is free to start spares meanwhile
        steps.append(previous := step)
    run = Experiment(workspace, "relative").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Completed"
    for s in run.get_steps():
        assert s.get_stdout_log() == "from lib yes\n"
        assert "started cold, not by an interpreter started ahead: its PYTHONPATH has 'lib'" in s.get_system_log()


def give(pool: SparePool, spare: ForkedStep | subprocess.Popen[bytes], folder: Path, script: str, out: str, env: dict[str, str]) -> bool:
    """``pool.launch`` of ``python script`` in ``folder``, its output in ``folder/out``, errors in ``folder/err``."""
    return pool.launch(spare, [sys.executable, script], str(folder), str(folder / out), str(folder / "err"), env)


def runs_ok(pool: SparePool, step: ForkedStep, folder: Path, env: dict[str, str]) -> bool:
    """Whether ``step`` takes ``folder/ok.py`` (it prints "ok") and ends with status 0, printing it."""
    return (give(pool, step, folder, "ok.py", "ok.out", env) and step.wait(timeout=30) == 0
            and (folder / "ok.out").read_text() == "ok\n")


def forked_step(pool: SparePool, env: dict[str, str]) -> ForkedStep:
    pool.want(sys.executable, env)
    spare = None
    while spare is None:  # the pool's thread starts its spare that forks
        spare = pool.take(sys.executable, env, env)
    assert isinstance(spare, ForkedStep)
    return spare


def test_a_forked_step_is_its_own_session_child_of_the_spare(tmp_path: Path) -> None:
    (tmp_path / "who.py").write_text("import os\nprint(os.getpid(), os.getsid(0), os.getpgid(0), os.getppid())\n")
    pool, env = SparePool(1), dict(os.environ)
    try:
        pids = []
        for i in range(2):
            step = forked_step(pool, env)
            assert give(pool, step, tmp_path, "who.py", f"{i}.out", env)
            assert step.wait(timeout=30) == 0
            pid, sid, pgid, parent = map(int, (tmp_path / f"{i}.out").read_text().split())
            assert pid == sid == pgid == step.pid  # the agent signals its group
            assert parent == step.forking.proc.pid
            pids.append(pid)
        assert pids[0] != pids[1]
    finally:
        pool.shutdown()


def test_a_forked_step_whose_spare_dies_ends_lost_and_the_next_gets_a_new_spare(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "ok.py").write_text("print('ok')\n")
    pool, env = SparePool(1), dict(os.environ)
    try:
        step = forked_step(pool, env)
        assert give(pool, step, tmp_path, "slow.py", "out", env)
        server = step.forking
        os.kill(server.proc.pid, 9)
        assert step.wait(timeout=30) == -9
        assert step.lost and "died while the step ran" in step.lost
        os.killpg(step.pid, 9)  # (the runner kills the group of a step whose end is lost)
        server.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (nxt := pool.take(sys.executable, env, env)) is None or (
                isinstance(nxt, ForkedStep) and nxt.forking is server):
            assert time.monotonic() < deadline, "no new spare that forks"
            time.sleep(0.01)
        assert isinstance(nxt, ForkedStep)
        assert runs_ok(pool, nxt, tmp_path, env)
    finally:
        pool.shutdown()


def test_a_forked_step_stuck_before_taking_its_step_is_killed_and_never_takes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cairn.runner.spares as spares_module

    monkeypatch.setattr(spares_module, "TAKE_TIMEOUT", 0.5)
    os.mkfifo(tmp_path / "fifo")  # opening it for writing blocks: no reader
    (tmp_path / "ran.py").write_text("open('ran', 'w').close()\n")
    pool, env = SparePool(1), dict(os.environ)
    try:
        step = forked_step(pool, env)
        step.forking.ready.wait(30)
        assert not give(pool, step, tmp_path, "ran.py", "fifo", env)
        assert step.wait(timeout=30) == -9
        assert not (tmp_path / "ran").exists()
    finally:
        pool.shutdown()


def test_a_spare_let_go_still_tells_its_running_steps_end(tmp_path: Path) -> None:
    (tmp_path / "gate.py").write_text("import sys\nsys.exit(int(open('gate').read()))\n")
    os.mkfifo(tmp_path / "gate")
    pool, env = SparePool(1), dict(os.environ)
    step = forked_step(pool, env)
    assert give(pool, step, tmp_path, "gate.py", "out", env)
    pool.shutdown()  # let go while its step runs
    (tmp_path / "gate").write_text("4")
    assert step.wait(timeout=30) == 4 and step.lost is None
    assert step.forking.proc.wait(timeout=30) == 0  # and then it exited


def test_where_a_start_leaves_a_thread_running_spares_do_not_fork(tmp_path: Path) -> None:
    """A fork has only the forking thread: an interpreter whose start left one running (a
    sitecustomize, a .pth file's import) gets spares that each take one step, as before."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sitecustomize.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n")
    (tmp_path / "t.py").write_text("import threading\nprint(threading.active_count())\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "lib"))
    pool = SparePool(1)
    try:
        pool.want(sys.executable, env)
        deadline = time.monotonic() + 30
        while (spare := pool.take(sys.executable, env, env)) is None or isinstance(spare, ForkedStep):
            assert time.monotonic() < deadline, "no spare"
            time.sleep(0.01)
        assert [why for why in pool.not_forked.values()] == ["2 threads are running after its start"]
        assert give(pool, spare, tmp_path, "t.py", "out", env)
        assert spare.wait(timeout=30) == 0 and (tmp_path / "out").read_text() == "2\n"
    finally:
        pool.shutdown()


def test_a_fork_that_fails_leaves_that_step_to_a_cold_start_and_the_others_running(tmp_path: Path) -> None:
    """A process limit met as the spare forks: that one step starts cold (launch says not taken);
    the steps it forked before run to their own end."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sitecustomize.py").write_text(textwrap.dedent("""
        import errno, os
        _fork, _calls = os.fork, []
        def fork():  # the second fork of this process meets a process limit
            _calls.append(1)
            if len(_calls) == 2:
                raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
            return _fork()
        os.fork = fork
    """))
    (tmp_path / "gate.py").write_text("import sys\nsys.exit(int(open('gate').read()))\n")
    os.mkfifo(tmp_path / "gate")
    (tmp_path / "ok.py").write_text("print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "lib"))
    pool = SparePool(1)
    try:
        running = forked_step(pool, env)
        assert give(pool, running, tmp_path, "gate.py", "out", env)
        refused = forked_step(pool, env)
        assert not give(pool, refused, tmp_path, "ok.py", "ok.out", env)
        (tmp_path / "gate").write_text("5")
        assert running.wait(timeout=30) == 5 and running.lost is None
        assert not running.forking.dead  # it serves on
        assert runs_ok(pool, forked_step(pool, env), tmp_path, env)
    finally:
        pool.shutdown()


def test_a_spare_that_dies_while_a_child_is_stuck_before_its_step_is_seen_dead(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child still holds the pipe its answer goes to: the agent sees its spare's end anyway
    (its process), and the step it was given is not taken (a cold start runs it)."""
    import threading

    import cairn.runner.spares as spares_module

    monkeypatch.setattr(spares_module, "TAKE_TIMEOUT", 60.0)
    os.mkfifo(tmp_path / "fifo")  # opening it for writing blocks: no reader
    (tmp_path / "ran.py").write_text("open('ran', 'w').close()\n")
    pool, env = SparePool(1), dict(os.environ)
    try:
        step = forked_step(pool, env)
        taken: list[bool] = []
        launching = threading.Thread(target=lambda: taken.append(give(pool, step, tmp_path, "ran.py", "fifo", env)))
        launching.start()
        deadline = time.monotonic() + 30
        while not (children := [pid for pid in filter(str.isdigit, os.listdir("/proc")) if _cwd(pid) == str(tmp_path)]):
            assert time.monotonic() < deadline, "no child was forked"  # (it enters the folder, then blocks)
            time.sleep(0.01)
        assert step.forking.proc is not None
        os.kill(step.forking.proc.pid, 9)
        launching.join(timeout=20)  # well before the 60 s it would wait for an answer
        assert taken == [False] and step.forking.dead
        assert step.wait(timeout=1) == -9
        assert len(children) == 1  # the stuck child, now init's
        with open(tmp_path / "fifo", "rb"):  # unblocks it: its server is gone, so it must not run the step
            pass
        deadline = time.monotonic() + 30
        while _cwd(children[0]) == str(tmp_path):
            assert time.monotonic() < deadline, "the child lives on"
            time.sleep(0.01)
        assert not (tmp_path / "ran").exists()
    finally:
        pool.shutdown()
        for pid in filter(str.isdigit, os.listdir("/proc")):  # the stuck child: not to outlive the test
            try:
                if os.readlink(f"/proc/{pid}/cwd") == str(tmp_path):
                    os.kill(int(pid), 9)
            except OSError:
                pass


def test_what_an_interpreter_prints_as_it_starts_does_not_stop_its_spare_from_forking(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "sitecustomize.py").write_text("print('hello from sitecustomize')\n")
    (tmp_path / "ok.py").write_text("print('ok')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "lib"))
    pool = SparePool(1)
    try:
        step = forked_step(pool, env)
        assert give(pool, step, tmp_path, "ok.py", "out", env)
        assert step.wait(timeout=30) == 0 and (tmp_path / "out").read_text() == "ok\n"
        assert not pool.not_forked
    finally:
        pool.shutdown()


def test_no_spare_is_started_for_an_environment_let_go_before_its_turn() -> None:
    """The maker thread picked it, then more recent environments took its place: it starts none
    (one would be kept by nobody)."""
    pool = SparePool(1)
    pool._closed = True  # (no maker thread: the calls below are the maker's, made by hand)
    env = dict(os.environ)
    key = pool._key(sys.executable, env)
    pool._start_forking(key, env)
    assert key not in pool._forking
    assert pool.take(sys.executable, env, env) is None


def _cwd(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
