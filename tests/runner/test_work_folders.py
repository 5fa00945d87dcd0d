"""Completed steps' working folders are renamed for the next step of the same snapshot only when
they are still exactly that snapshot."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cairn.runner.processes import process_start_time
from cairn.runner.work_folders import KEPT_PREFIX, WorkFolders, remove_folders, remove_leftovers


def _materialised(root: Path, name: str) -> str:
    folder = root / name
    (folder / "pkg").mkdir(parents=True)
    (folder / "step.py").write_text("print('hi')\n")
    (folder / "pkg" / "util.py").write_text("X = 1\n")
    (folder / "pkg" / "other.py").write_text("Y = 2\n")
    return str(folder)


def _ran(root: Path, change: Callable[[Path], None] | None = None) -> tuple[WorkFolders, str]:
    """A folder stamped as snapshot "s1", changed by its step as ``change`` says, then given back."""
    folders = WorkFolders(root)
    first = _materialised(root, "step_1")
    folders.stamp(first, "s1")
    if change is not None:
        change(Path(first))
    assert folders.release(first, completed=True) == (change is None, [])
    if change is not None:
        assert os.path.isdir(first)  # left to the caller to remove
    return folders, first


def test_an_unchanged_folder_becomes_the_next_steps_folder(tmp_path: Path) -> None:
    folders, first = _ran(tmp_path)
    assert not os.path.exists(first)
    assert not folders.take("another-snapshot", str(tmp_path / "step_2"))
    assert folders.take("s1", str(tmp_path / "step_2"))
    assert (tmp_path / "step_2" / "step.py").read_text() == "print('hi')\n"
    assert sorted(p.name for p in (tmp_path / "step_2").rglob("*")) == ["other.py", "pkg", "step.py", "util.py"]
    assert not folders.take("s1", str(tmp_path / "step_3"))  # one folder, one step


@pytest.mark.parametrize("change", [
    pytest.param(lambda f: (f / "step.py").write_text("print('ho')\n"), id="same-size rewrite"),
    pytest.param(lambda f: (f / "out.csv").write_text("a,b\n"), id="file added"),
    pytest.param(lambda f: (f / "pkg" / "__pycache__").mkdir(), id="folder added below"),
    pytest.param(lambda f: (f / "pkg" / "util.py").unlink(), id="file removed"),
    pytest.param(lambda f: os.chmod(f / "step.py", 0o600), id="mode changed"),
    pytest.param(lambda f: os.chmod(f, 0o555), id="the folder itself made read-only"),
    pytest.param(lambda f: os.replace(f / "pkg" / "util.py", f / "pkg" / "other.py"), id="file renamed"),
    pytest.param(lambda f: (f / "step.py").unlink() or (f / "step.py").write_text("print('hi')\n"),
                 id="file replaced by the same content"),
    pytest.param(lambda f: shutil.copy2(f / "pkg" / "other.py", f / "pkg" / "util.py"),
                 id="another file of the same size copied over it, times kept"),
    *([pytest.param(lambda f: os.chown(f / "step.py", 4242, 4242), id="owner changed")] if os.geteuid() == 0 else []),
])
def test_a_folder_its_step_changed_is_removed_not_kept(tmp_path: Path, change: Callable[[Path], None]) -> None:
    folders, first = _ran(tmp_path, change)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(KEPT_PREFIX)]
    assert not folders.take("s1", str(tmp_path / "step_2"))


def test_a_kept_folder_changed_while_kept_is_not_given(tmp_path: Path) -> None:
    folders, _ = _ran(tmp_path)
    kept = next(tmp_path / n for n in os.listdir(tmp_path) if n.startswith(KEPT_PREFIX))
    (kept / "late.txt").write_text("a detached process of the step wrote this")
    assert not folders.take("s1", str(tmp_path / "step_2"))
    assert not kept.exists() and not (tmp_path / "step_2").exists()


def test_a_failed_steps_folder_stays_where_it_is(tmp_path: Path) -> None:
    folders = WorkFolders(tmp_path)
    first = _materialised(tmp_path, "step_1")
    folders.stamp(first, "s1")
    assert folders.release(first, completed=False) == (False, [])
    assert os.path.isdir(first)
    assert not folders.take("s1", str(tmp_path / "step_2"))


def test_kept_folders_are_bounded_and_cleared(tmp_path: Path) -> None:
    limit = [2]
    folders = WorkFolders(tmp_path, limit=lambda: limit[0])
    pushed_out = []
    for i in range(4):
        folder = _materialised(tmp_path, f"step_{i}")
        folders.stamp(folder, "s1")
        kept, evicted = folders.release(folder, completed=True)
        assert kept
        pushed_out += evicted
    assert len(pushed_out) == 2 and all(os.path.isdir(p) for p in pushed_out)  # removed by the caller, later
    remove_folders(pushed_out)
    assert len([n for n in os.listdir(tmp_path) if n.startswith(KEPT_PREFIX)]) == 2
    limit[0] = 1  # the target's concurrency was lowered
    folder = _materialised(tmp_path, "step_4")
    folders.stamp(folder, "s1")
    kept, evicted = folders.release(folder, completed=True)
    assert kept and len(evicted) == 2
    remove_folders(evicted)
    assert len([n for n in os.listdir(tmp_path) if n.startswith(KEPT_PREFIX)]) == 1
    folders.clear()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(KEPT_PREFIX)]
    folder = _materialised(tmp_path, "step_5")
    folders.stamp(folder, "s1")
    kept, evicted = folders.release(folder, completed=True)  # after clear(): nothing stays kept
    remove_folders(evicted)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(KEPT_PREFIX)]


def test_an_existing_destination_is_left_to_the_caller(tmp_path: Path) -> None:
    folders, _ = _ran(tmp_path)
    (tmp_path / "step_2").mkdir()  # an earlier attempt's folder
    assert not folders.take("s1", str(tmp_path / "step_2"))
    assert folders.take("s1", str(tmp_path / "step_3"))  # still kept for another


def test_an_agent_that_starts_removes_what_a_killed_one_kept(tmp_path: Path) -> None:
    host = socket.gethostname()
    me = f"{KEPT_PREFIX}{host}-{os.getpid()}-{process_start_time(os.getpid())}-0"
    killed = f"{KEPT_PREFIX}{host}-{os.getpid()}-1-0"  # this pid, reused: its agent was another process
    elsewhere = f"{KEPT_PREFIX}another-machine-4242-77-0"  # an agent of another machine sharing the workspace
    for name in (me, killed, elsewhere, "step_failed"):  # (a failed step's folder: kept to be looked at)
        (tmp_path / name / "pkg").mkdir(parents=True)
    remove_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([me, elsewhere, "step_failed"])


def test_a_folder_a_process_of_the_step_still_works_in_is_not_kept(tmp_path: Path) -> None:
    folders = WorkFolders(tmp_path)
    first = _materialised(tmp_path, "step_1")
    folders.stamp(first, "s1")
    left_behind = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], cwd=Path(first) / "pkg",
                                   stdin=subprocess.PIPE, start_new_session=True)  # e.g. detached by the step
    try:
        assert folders.release(first, completed=True) == (False, [])  # it would write into the next step's folder
    finally:
        left_behind.communicate(b"")
    folders.stamp(first, "s1")
    assert folders.release(first, completed=True) == (True, [])


def test_targets_of_one_workspace_keep_folders_under_names_of_their_own(tmp_path: Path) -> None:
    one, other = WorkFolders(tmp_path), WorkFolders(tmp_path)
    for i, folders in enumerate((one, other)):
        folder = _materialised(tmp_path, f"step_{i}")
        folders.stamp(folder, "s1")
        assert folders.release(folder, completed=True) == (True, [])
    assert one.take("s1", str(tmp_path / "step_a")) and other.take("s1", str(tmp_path / "step_b"))


def test_kept_folders_hold_at_most_their_byte_budget(tmp_path: Path) -> None:
    folders = WorkFolders(tmp_path, max_bytes=50)  # each folder holds 24 bytes
    for i in range(3):
        folder = _materialised(tmp_path, f"step_{i}")
        folders.stamp(folder, "s1")
        kept, evicted = folders.release(folder, completed=True)
        assert kept
        remove_folders(evicted)
    assert len([n for n in os.listdir(tmp_path) if n.startswith(KEPT_PREFIX)]) == 2
    big = _materialised(tmp_path, "step_big")
    (Path(big) / "data.bin").write_bytes(b"x" * 51)
    folders.stamp(big, "s2")
    assert folders.release(big, completed=True) == (False, [])  # over the budget alone: removed by the caller


def test_on_a_machine_with_very_many_processes_folders_are_removed_not_looked_through(tmp_path: Path,
                                                                                      monkeypatch) -> None:
    from cairn.runner import processes, work_folders

    monkeypatch.setattr(processes, "PROCESSES_IN_LIMIT", 1)
    monkeypatch.setattr(work_folders, "pid_mark", lambda: None)  # no mark: every process would be looked at
    folders = WorkFolders(tmp_path)
    first = _materialised(tmp_path, "step_1")
    folders.stamp(first, "s1")
    assert folders.release(first, completed=True) == (False, [])


@pytest.mark.parametrize("one_by_one", [True, False])
def test_only_processes_made_since_the_step_began_are_looked_through(tmp_path: Path, monkeypatch,
                                                                     one_by_one: bool) -> None:
    from cairn.runner import processes

    monkeypatch.setattr(processes, "PROCESSES_IN_LIMIT", 1)  # (a look through every process would give up)
    if not one_by_one:  # more pids made since the mark than are asked for one by one: /proc is listed
        monkeypatch.setattr(processes, "PROBED_PIDS", 0)
    folders = WorkFolders(tmp_path)
    first = _materialised(tmp_path, "step_1")
    older = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], cwd=Path(first) / "pkg",
                             stdin=subprocess.PIPE)  # there before the step began: not its leftover
    try:
        folders.stamp(first, "s1")
        assert folders.release(first, completed=True) == (True, [])
        assert folders.take("s1", str(tmp_path / "step_2"))
        left_behind = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                                       cwd=tmp_path / "step_2", stdin=subprocess.PIPE, start_new_session=True)
        try:
            assert folders.release(str(tmp_path / "step_2"), completed=True) == (False, [])
        finally:
            left_behind.communicate(b"")
    finally:
        older.communicate(b"")


@pytest.mark.parametrize(("now", "looked_within"), [
    ((5000, 10_050, 200, 32768), (4000, 5000)),  # no wrap: processes made since have pids in (4000, 5000]
    ((3000, 10_050, 200, 32768), None),  # the numbering wrapped (the last pid is below the mark's)
    ((4500, 27_000, 200, 32768), None),  # enough made since that it may have wrapped and come round again
])
def test_a_wrap_of_the_pid_numbering_makes_every_process_looked_at(monkeypatch, now, looked_within) -> None:
    from cairn.runner import processes

    mark = processes.PidMark(4000, 10_000, 200, 32768)
    monkeypatch.setattr(processes, "pid_mark", lambda: processes.PidMark(*now))
    assert processes._made_since(mark) == looked_within


def test_the_pid_mark_reads_this_machines_numbering() -> None:
    from cairn.runner.processes import pid_mark

    before = pid_mark()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    after = pid_mark()
    assert before is not None and after is not None
    assert after.forks > before.forks and before.tasks > 0 and before.pid_max > 300
    if after.last_pid >= before.last_pid:  # (no wrap meanwhile)
        assert before.last_pid < int(child.stdout) <= after.last_pid


def test_a_machine_whose_name_begins_as_this_ones_keeps_its_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "node")
    theirs = f"{KEPT_PREFIX}node-2-4242-99887-0"  # machine "node-2", agent 4242 (its pid 2 here may be dead)
    (tmp_path / theirs).mkdir()
    remove_leftovers(tmp_path)
    assert os.listdir(tmp_path) == [theirs]
