"""A step's processes, found and killed by what the kernel says of them (Linux ``/proc``): its
leader's start time guards against a recycled pid, and its session (each step starts one) finds
what the leader left when it died first."""

from __future__ import annotations

import os
import signal


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


def kill_step_processes(pid: int | None, started: str | None) -> bool:
    """Kill a step's processes: its process group if ``pid`` is still the step's leader, and every
    process left in its session that started no earlier than it (the leader may have died first,
    e.g. with its Ray worker, leaving children: the session id cannot go to a new session while they
    live). Returns whether anything was killed."""
    if not pid or not started:
        return False
    killed = False
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


def _session_members(session: int, not_before: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields and int(fields[3]) == session and int(fields[19]) >= not_before:  # session, start time
                found.append(int(entry))
    return found
