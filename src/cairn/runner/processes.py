"""A step's processes, found and killed by what the kernel says of them (Linux ``/proc``): its
leader's start time guards against a recycled pid, and its session (each step starts one) finds
what the leader left when it died first."""

from __future__ import annotations

import os
import signal
import socket
from typing import NamedTuple


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (index 0 is the state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against a recycled pid when killing orphans)."""
    fields = _stat_fields(pid)
    return fields[19].decode() if fields and len(fields) > 19 else None


def this_process() -> tuple[str, int, str | None]:
    """This process as others can tell it apart: its machine's name, its pid and its start time (a
    pid reused after a crash, or the same pid on another machine sharing a workspace, is another)."""
    pid = os.getpid()
    return socket.gethostname(), pid, process_start_time(pid)


def ask_step_to_end(pid: int | None, started: str | None) -> bool:
    """SIGTERM a step's process group while ``pid`` is still its leader: a cancel asks first (a step
    may save a checkpoint) and kills what is left later. Returns whether it was asked."""
    if not pid or not started or process_start_time(pid) != started:
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def kill_step_processes(pid: int | None, started: str | None, step_run_id: str | None = None) -> bool:
    """Kill a step's processes: its process group if ``pid`` is still the step's leader, and every
    process left in its session that started no earlier than it (the leader may have died first,
    e.g. with its Ray worker, leaving children: the session id cannot go to a new session while they
    live), and with ``step_run_id`` those it started in sessions of their own (``kill_detached``).
    Returns whether anything was killed."""
    killed = kill_detached(step_run_id) if step_run_id else False
    if not pid or not started:
        return killed
    if process_start_time(pid) == started:
        try:
            os.killpg(pid, signal.SIGKILL)
            killed = True
        except (ProcessLookupError, PermissionError):
            pass
    for member in _session_members(pid, int(started)):
        try:
            os.kill(member, signal.SIGKILL)
            killed = True
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def _other_pids() -> list[str]:
    """The ids of every process but this one (``/proc``'s numbered entries)."""
    me = str(os.getpid())
    return [entry for entry in os.listdir("/proc") if entry.isdigit() and entry != me]


def _session_members(session: int, not_before: int) -> list[int]:
    found = []
    for entry in _other_pids():
        fields = _stat_fields(entry)
        if fields and int(fields[3]) == session and int(fields[19]) >= not_before:  # session, start time
            found.append(int(entry))
    return found


Escaped = list[tuple[int, str]]  # (pid, start time) of processes a group kill does not reach


def escaped_descendants(leader: int) -> Escaped:
    """The processes descended from ``leader`` (parent by parent) that left its process group
    (``setsid``/``setpgid``, also without ``exec``). Read while the leader lives: once it dies they
    are init's (a daemon's parent exits at once: ``kill_detached`` finds those by their variables).
    A scan of every process (~10 us each): only when a step is stopped."""
    children: dict[int, list[tuple[int, int, str]]] = {}
    for entry in _other_pids():
        fields = _stat_fields(entry)
        if fields and len(fields) > 19:  # parent, process group, start time
            children.setdefault(int(fields[1]), []).append((int(entry), int(fields[2]), fields[19].decode()))
    found: Escaped = []
    todo = [leader]
    while todo:
        for pid, group, started in children.get(todo.pop(), ()):
            todo.append(pid)
            if group != leader:
                found.append((pid, started))
    return found


def signal_escaped(escaped: Escaped, sig: int = signal.SIGKILL) -> None:
    """Signal each of ``escaped`` that is still the process it was (its pid not reused since)."""
    for pid, started in escaped:
        if process_start_time(pid) == started:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


# What a spare interpreter or warm-start server starts with as its CAIRN_RUN_ID: room for a step's
# id, written over it in the process that takes the step (``spare_job``/``forkserver.mark_environ``)
RUN_ID_PLACEHOLDER = "." * 40


def kill_detached(step_run_id: str) -> bool:
    """Kill the processes a step started in a session of its own (``setsid``, ``start_new_session``),
    which neither its process group nor its session reaches: each still has the step's
    ``CAIRN_RUN_ID`` in the environment it was started with (``/proc/PID/environ``, readable for
    this user's processes). Read only when a step is stopped (canceled, timed out, lost): a scan of
    every process costs ~10 us each. Returns whether any was killed."""
    marker = f"\0CAIRN_RUN_ID={step_run_id}\0".encode()
    killed = False
    for entry in _other_pids():
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                found = marker in b"\0" + f.read()
        except OSError:  # gone, or another user's
            continue
        if found:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed = True
            except (ProcessLookupError, PermissionError):
                pass
    return killed


PROCESSES_IN_LIMIT = 2000  # more processes than this: not looked through (see processes_in)
_FIRST_WRAPPED_PID = 300  # where the kernel's pid numbers start again after pid_max (pids below are boot's)


class PidMark(NamedTuple):
    """Where the kernel's pid numbering stood at a moment (``pid_mark``)."""

    last_pid: int  # the last pid handed out in this pid namespace
    forks: int  # processes and threads made since boot
    tasks: int  # processes and threads alive
    pid_max: int  # the numbering wraps after this


def pid_mark() -> PidMark | None:
    """The kernel's pid numbering now (``/proc/loadavg``, ``/proc/stat``); None where unreadable, or
    where ``/proc`` is another pid namespace's than this process's."""
    try:
        if not _proc_is_this_namespaces():
            return None
        fields = _read_proc("/proc/loadavg", 256).split()  # load x3, running/alive, last pid
        head = _read_proc("/proc/stat", 64 << 10)
        at = head.find(b"\nprocesses ")
        end = head.find(b"\n", at + 1)
        if at < 0 or end < 0:  # (a machine with very many CPUs or interrupts: the line is further on)
            with open("/proc/stat", "rb") as f:
                forks = next(int(line.split()[1]) for line in f if line.startswith(b"processes "))
        else:
            forks = int(head[at + 11:end])
        pid_max = int(_read_proc("/proc/sys/kernel/pid_max", 32))
        return PidMark(int(fields[4]), forks, int(fields[3].partition(b"/")[2]), pid_max)
    except (OSError, ValueError, IndexError, StopIteration):
        return None


_proc_files: dict[str, int] = {}  # kept open: reading one again from its start is one call (~4x cheaper)
_proc_checked_by = 0  # the pid that found /proc to be its own pid namespace's (a fork asks again)


def _read_proc(path: str, size: int) -> bytes:
    fd = _proc_files.get(path)
    if fd is None:
        opened = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fd = _proc_files.setdefault(path, opened)
        if fd != opened:  # another thread opened it first
            os.close(opened)
    return os.pread(fd, size, 0)


def _proc_is_this_namespaces() -> bool:
    global _proc_checked_by
    pid = os.getpid()
    if _proc_checked_by != pid:
        if os.readlink("/proc/self") != str(pid):
            return False
        _proc_checked_by = pid
    return True


def _made_since(mark: PidMark | None) -> tuple[int, int] | None:
    """The pids every process made since ``mark`` lies within, ``(above, up_to]``, or None when
    that cannot be said. Pids are handed out upwards from the last one, skipping those in use, and
    wrap to 300 after pid_max. A wrap is seen when the last pid is now below the mark's; a wrap that
    came round past the mark again moved over every number from 300 to pid_max: each a pid made
    since (counted in forks) or one in use, by a task (alive at the mark, or made since) or as the
    process group or session of up to two more per task. Fewer than that: no such wrap. Not
    counted: forks the kernel refused after taking a pid (a machine at its process limit,
    retrying), which could take the numbering round unseen; a folder kept then may have a process
    left in it."""
    if mark is None:
        return None
    now = pid_mark()
    if now is None or now.last_pid < mark.last_pid:
        return None
    made = now.forks - mark.forks
    in_use = 3 * (mark.tasks + made)
    if made + in_use >= min(now.pid_max, mark.pid_max) - _FIRST_WRAPPED_PID:
        return None
    return mark.last_pid, now.last_pid


PROBED_PIDS = 256  # at most this many pids made since a mark are asked for one by one, not listed


def processes_in(folder: str, since: PidMark | None = None) -> bool:
    """Whether a process other than this one works in ``folder`` or below (its current folder
    is there; ~1.5 us per process). With ``since``, only processes made after that mark are looked
    at (a step's leftovers, when the mark was taken before it started): the few pids handed out
    since are asked for one by one (threads' among them), not every process of the machine listed
    (~0.9 ms with ~470 processes here). Looking through all on a machine running more than
    ``PROCESSES_IN_LIMIT`` processes, it says True without looking: the caller then does what it
    did before it could ask (removes the folder)."""
    folder = os.path.realpath(folder)  # as /proc gives a current folder: links resolved
    inside = folder.rstrip("/") + "/"
    made = _made_since(since)
    if made is not None and made[1] - made[0] <= PROBED_PIDS:
        me = os.getpid()
        pids = [str(pid) for pid in range(made[0] + 1, made[1] + 1) if pid != me]
    else:
        pids = _other_pids()
        if made is not None:
            pids = [entry for entry in pids if int(entry) > made[0]]
        elif len(pids) > PROCESSES_IN_LIMIT:
            return True
    for entry in pids:
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:  # gone (or never a process), or another user's
            continue
        if cwd == folder or cwd.startswith(inside):
            return True
    return False
