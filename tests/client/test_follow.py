"""What the follower shows of a live log: lines as a terminal leaves them."""

from __future__ import annotations

from cairn.client.follow import _display_lines
from tests.reads import CountingReads


def test_a_progress_bar_redrawn_with_carriage_returns_shows_its_latest_drawing() -> None:
    assert _display_lines("train:  10%\rtrain:  20%\rtrain:  30%\r") == ["train:  30%"]
    assert _display_lines("loading\rdone\nnext line\n") == ["done", "next line"]


def test_plain_lines_and_blank_lines_are_kept() -> None:
    assert _display_lines("a\n\nb\n") == ["a", "", "b"]
    assert _display_lines("") == []
    assert _display_lines("\r") == []


def test_a_line_without_its_newline_yet_is_shown_while_the_step_runs(workspace, write_script, tmp_path) -> None:
    import io
    import os
    import threading
    import time

    from cairn import Experiment, Pipeline, PythonScriptStep
    from cairn.client.follow import follow

    go_on = tmp_path / "go-on"
    os.mkfifo(go_on)
    src = write_script("partial.py", f"""
        import sys
        print("Downloading...", end="", flush=True)
        open({str(go_on)!r}).read()  # until the test has seen it
        print(" done")
    """)
    run = Experiment(workspace, "partial").submit(Pipeline(workspace, [
        PythonScriptStep("partial.py", name="partial", source_directory=str(src))]))
    out = io.StringIO()
    follower = threading.Thread(target=follow, args=(workspace._backend, run.id),
                                kwargs={"out": out, "raise_on_error": False}, daemon=True)
    follower.start()
    try:
        deadline = time.monotonic() + 60
        while "partial | Downloading..." not in out.getvalue():
            assert time.monotonic() < deadline, out.getvalue()
            time.sleep(0.1)
    finally:
        try:  # the step waits in open(): let it go on (never block here if it is not there)
            os.close(os.open(go_on, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    follower.join(timeout=60)
    assert "partial |  done" in out.getvalue()


def test_a_partial_read_never_ends_inside_a_character() -> None:
    from cairn.backend.local import _whole_characters

    text = "naïve".encode()
    assert _whole_characters(text[:3]) == 2  # "na" and the first byte of "ï"
    assert _whole_characters(text) == len(text)
    assert _whole_characters(b"bad \xff byte") == len(b"bad \xff byte")  # not a cut character: shown, replaced
    assert _whole_characters(b"\xffabc\xe2\x82") == 4  # an earlier bad byte does not hide a cut "\u20ac"


def test_the_line_that_starts_a_later_attempt_is_shown_once() -> None:
    """The runner puts it in both logs (each is whole on its own); the follower shows both logs."""
    import io

    from cairn.client.follow import _print_changes
    from cairn.runner.markers import attempt_marker

    logs = {"stdout": f"{attempt_marker(2)}\nout line\n", "stderr": f"{attempt_marker(2)}\nerr line\n"}

    class Backend:
        def read_log(self, run_id: str, which: str, offset: int, complete: bool, partial: bool) -> tuple[str, int]:
            text = logs.get(which, "")[offset:]
            return text, offset + len(text)

    step = {"id": "s1", "name": "train", "status": "Completed", "status_reason": None, "reused_from": None,
            "started_at": 1.0, "ended_at": 2.0}
    out = io.StringIO()
    _print_changes(Backend(), [step], {}, {}, out, None, {})
    shown = out.getvalue().splitlines()
    assert shown.count(f"  train | {attempt_marker(2)}") == 1
    assert "  train | out line" in shown and "  train | err line" in shown


def test_a_run_seen_ended_is_not_read_again(workspace, write_script) -> None:
    """Once the follower has read the run's end, that is what it returns: a run's end is its last
    change (one read of the store less at the end of every wait)."""
    from cairn import Experiment, Pipeline, PythonScriptStep
    from cairn.client.follow import follow

    src = write_script("hi.py", "print('hi')\n")
    run = Experiment(workspace, "ended").submit(Pipeline(workspace, [
        PythonScriptStep("hi.py", name="hi", source_directory=str(src))]))
    assert run.wait_for_completion(show_output=False) == "Completed"

    counting = CountingReads(workspace._backend)
    assert follow(counting, run.id, show_output=False) == "Completed"
    assert len(counting.reads) == 1


def test_a_subscription_counts_once_the_agent_answers_it(tmp_path, monkeypatch) -> None:
    """The follower subscribes before it reads the run, so the subscription must be in place when
    ``connect`` says so: an agent's socket that takes the connection but never answers is no
    subscription (the follower then reads the store now and then instead of waiting forever)."""
    import socket

    from cairn import Workspace
    from cairn.engine import client
    from cairn.storage.layout import WorkspaceLayout

    layout = WorkspaceLayout(Workspace.create(tmp_path / "ws").location)
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts (backlog), never answers
    silent.bind(str(layout.agent_socket))
    silent.listen(1)
    monkeypatch.setattr(client, "WATCH_ANSWER_SECONDS", 0.2)
    try:
        watch = client.Watch(layout, "run_x")
        assert watch.connect() is False and watch._sock is None
    finally:
        silent.close()
    layout.agent_socket.unlink()
    assert client.Watch(layout, "run_x").connect() is False  # no agent at all


def test_waiting_for_a_submitted_run_reads_it_once_when_it_has_ended(workspace, write_script) -> None:
    """A run just submitted is known to be a pipeline run, and what the follower read at its end is
    its status: waiting reads the run only to see it ended. A step run waited for gives its own
    status, not its pipeline's."""
    from cairn import Experiment, Pipeline, PythonScriptStep

    src = write_script("hi.py", "print('hi')\n")
    fail = write_script("fail.py", "raise SystemExit(3)\n")
    run = Experiment(workspace, "ended").submit(Pipeline(workspace, [
        PythonScriptStep("hi.py", name="hi", source_directory=str(src)),
        PythonScriptStep("fail.py", name="fail", source_directory=str(fail))]), continue_on_step_failure=True)
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    run._backend = counting = CountingReads(workspace._backend)
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    assert counting.reads == [run.id]
    hi = run.find_step_run("hi")[0]
    assert hi.wait_for_completion(show_output=False, raise_on_error=False) == "Completed"


def test_the_subscription_wait_keeps_to_the_callers_timeout(workspace, write_script, monkeypatch) -> None:
    """An agent's socket that takes connections but never answers holds a follower no longer than
    the timeout it was given (the subscription's own limit is longer)."""
    import socket
    import time

    import pytest

    from cairn import Experiment, Pipeline, PythonScriptStep
    from cairn.client.follow import follow
    from cairn.core.errors import RunTimeoutError
    from cairn.engine import client
    from cairn.engine.client import stop_agent
    from cairn.storage.layout import WorkspaceLayout

    src = write_script("hi.py", "print('hi')\n")
    run = Experiment(workspace, "silent").submit(Pipeline(workspace, [
        PythonScriptStep("hi.py", name="hi", source_directory=str(src))]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    layout = WorkspaceLayout(workspace.location)
    stop_agent(layout)
    monkeypatch.setattr(client, "WATCH_ANSWER_SECONDS", 60.0)
    monkeypatch.setattr(client, "ensure_agent", lambda layout: None)  # nobody to start: the silent one "serves"
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(layout.agent_socket))
    silent.listen(4)
    try:
        began = time.monotonic()
        assert follow(workspace._backend, run.id, show_output=False, timeout_seconds=0.5) == "Completed"
        # a run still going times out as asked, not after the subscription's limit
        row = workspace._backend.get_run(run.id)
        monkeypatch.setattr(workspace._backend, "get_run", lambda run_id: {**row, "status": "Running"})
        with pytest.raises(RunTimeoutError):
            follow(workspace._backend, run.id, show_output=False, timeout_seconds=0.5)
        assert time.monotonic() - began < 30
    finally:
        silent.close()
