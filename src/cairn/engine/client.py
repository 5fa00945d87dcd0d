"""Talking to the local agent from any process: start it on demand (detached), poke it, watch a run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from cairn.core.errors import AgentError, WorkspaceNotFoundError
from cairn.core.waiting import wait_readable
from cairn.storage.layout import WorkspaceLayout

AGENT_START_TIMEOUT = 60.0
WATCH_ANSWER_SECONDS = 10.0  # an agent that is up answers a subscription in milliseconds
READY_FD_ENV = "CAIRN_AGENT_READY_FD"


def _connect(layout: WorkspaceLayout) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(layout.agent_socket))
        return sock
    except OSError:
        sock.close()
        return None


def _request(layout: WorkspaceLayout, msg: dict[str, Any]) -> dict[str, Any] | None:
    sock = _connect(layout)
    if sock is None:
        return None
    try:
        sock.settimeout(10)
        sock.sendall((json.dumps(msg) + "\n").encode())
        line = sock.makefile("r").readline()
        return json.loads(line) if line else None
    except (OSError, ValueError):
        return None
    finally:
        sock.close()


def ping(layout: WorkspaceLayout) -> bool:
    return _request(layout, {"op": "ping"}) is not None


def sync(layout: WorkspaceLayout) -> bool:
    """Wait until the agent's loop itself answers (its modules are loaded). False if no agent."""
    return _request(layout, {"op": "sync"}) is not None


def changed(layout: WorkspaceLayout, run_id: str) -> bool:
    """Tell the agent that a step of ``run_id`` changed in the store (its watchers are told)."""
    return _request(layout, {"op": "changed", "run": run_id}) is not None


def poke(layout: WorkspaceLayout) -> bool:
    """Tell the agent to look at the queue now. False when no agent answers."""
    return _request(layout, {"op": "poke", "place": _identity(layout)}) is not None


def _identity(layout: WorkspaceLayout) -> list[int] | None:
    try:
        return layout.identity()
    except OSError:
        return None


def stop_agent(layout: WorkspaceLayout, timeout: float = 30.0) -> bool:
    """Ask the agent to stop and wait until it has released the workspace. False if none ran."""
    import fcntl
    import signal
    import time

    deadline = time.monotonic() + timeout
    while _request(layout, {"op": "stop"}) is None:
        if not _agent_starting(layout):
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"the agent of {layout.root} holds its lock but does not answer")
        time.sleep(0.01)
    with open(layout.agent_lock, "a+") as lock:
        def give_up(_signum: int, _frame: object) -> None:
            raise TimeoutError(f"the agent did not stop within {timeout:.0f} s")

        previous = signal.signal(signal.SIGALRM, give_up)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # granted when the agent process has exited
            fcntl.flock(lock, fcntl.LOCK_UN)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return True


def _agent_starting(layout: WorkspaceLayout) -> bool:
    """Whether an agent process was started for this workspace and has not answered yet."""
    import fcntl

    if layout.agent_lock.exists():
        with open(layout.agent_lock, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(lock, fcntl.LOCK_UN)
            except BlockingIOError:
                return True  # held by an agent that does not answer yet
    try:
        pid = int(layout.agent_starting.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"cairn.engine" in cmdline and str(layout.root).encode() in cmdline


def prestart_agent(layout: WorkspaceLayout) -> None:
    """Start an agent in the background without waiting, so that it has loaded by the time a
    pipeline is submitted. Does nothing when one answers."""
    if ping(layout):
        return
    _check_still_there(layout)
    env = dict(os.environ)
    env.pop(READY_FD_ENV, None)
    with open(layout.agent_log, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cairn.engine", str(layout.root)], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                cwd=str(layout.root))
    layout.agent_starting.write_text(str(proc.pid))  # lets stop_agent wait for it (the agent removes it)


def _check_still_there(layout: WorkspaceLayout) -> None:
    """An agent serves a workspace that exists: never one whose folder was removed (it would make a
    new, empty one there, and the runs of the old one cannot go on anyway)."""
    if not layout.config.is_file():
        raise WorkspaceNotFoundError(
            f"the Cairn workspace in {layout.root} is gone ({layout.config} does not exist: was its .cairn folder "
            f"removed or moved?); its runs cannot go on. Open the workspace where it is now, or make a new one "
            f"with `cairn init`")


def start_agent(layout: WorkspaceLayout, idle_timeout: float | None = None) -> None:
    """Start a detached agent and wait until it serves (or another agent does)."""
    read_fd, write_fd = os.pipe()
    env = dict(os.environ)
    env[READY_FD_ENV] = str(write_fd)
    argv = [sys.executable, "-m", "cairn.engine", str(layout.root)]
    if idle_timeout is not None:
        argv += ["--idle-timeout", str(idle_timeout)]
    try:
        _check_still_there(layout)
    except WorkspaceNotFoundError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    with open(layout.agent_log, "ab") as log:
        try:
            subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             pass_fds=(write_fd,), start_new_session=True, cwd=str(layout.root))
        finally:
            os.close(write_fd)
    try:
        ready = wait_readable(read_fd, AGENT_START_TIMEOUT)
        message = os.read(read_fd, 64) if ready else b""
    finally:
        os.close(read_fd)
    if not message:
        raise AgentError(f"the local agent did not start within {AGENT_START_TIMEOUT:.0f} s; "
                         f"see its log: {layout.agent_log}")


def ensure_agent(layout: WorkspaceLayout) -> None:
    """Make sure an agent of this Cairn version serves the workspace and has looked at the queue."""
    from cairn import __version__

    place = _identity(layout)
    reply = _request(layout, {"op": "poke", "place": place})  # an agent of another workspace takes nothing
    # the agent of this workspace from before it was moved, or of one that was at this path before
    moved = reply is not None and None not in (place, reply.get("place")) and reply.get("place") != place
    if reply is not None and reply.get("version") == __version__ and not moved:
        return
    if reply is not None:  # an agent of another Cairn version, or of this workspace before it was moved: it exits
        stop_agent(layout)
    start_agent(layout)
    poke(layout)


class Watch:
    """A subscription to one run's changes. ``wait`` returns an event, None on timeout,
    and raises ConnectionError when the agent went away."""

    def __init__(self, layout: WorkspaceLayout, run_id: str, final_only: bool = False) -> None:
        self.layout = layout
        self.run_id = run_id
        self.final_only = final_only
        self._sock: socket.socket | None = None
        self._buf = b""
        self.running = False  # the agent said it runs the run: it will tell its end

    def connect(self, timeout: float = WATCH_ANSWER_SECONDS) -> bool:
        """Subscribe: True once the agent has it (it answers once every later change will be told),
        False when no agent answers (within ``timeout``, at most ``WATCH_ANSWER_SECONDS``)."""
        self.close()
        sock = _connect(self.layout)
        if sock is None:
            return False
        self._sock = sock
        try:
            sock.sendall((json.dumps({"op": "watch", "run": self.run_id, "final_only": self.final_only})
                          + "\n").encode())
            answer = self.wait(min(timeout, WATCH_ANSWER_SECONDS))  # its first line answers the subscription
            if answer is not None:
                self.running = bool(answer.get("running"))
                return True
        except (OSError, ValueError):  # ConnectionError included: it went
            pass
        self.close()
        return False

    def wait(self, timeout: float | None) -> dict[str, Any] | None:
        if self._sock is None:
            raise ConnectionError("not connected")
        while b"\n" not in self._buf:
            if not wait_readable(self._sock, timeout):
                return None
            chunk = self._sock.recv(65536)
            if not chunk:
                self.close()
                raise ConnectionError("the agent went away")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
