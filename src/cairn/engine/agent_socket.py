"""The agent's front door, kept light so that an agent answers within milliseconds of starting:
the workspace lock, the Unix socket (poke, ping, stop, watch) and the watchers' notifications.
Heavy modules (the store, the scheduler) are imported only after the agent already serves."""

from __future__ import annotations

import fcntl
import json
import os
import queue
import socket
import struct
import threading
import time
from typing import Any

from cairn import __version__
from cairn.core.socket_rpc import remove_socket_file, socket_file
from cairn.engine.client import READY_FD_ENV, ping
from cairn.storage.layout import WorkspaceLayout


class AgentSocket:
    def __init__(self, layout: WorkspaceLayout) -> None:
        self.layout = layout
        try:
            self.identity: list[int] | None = layout.identity()  # the workspace it serves, wherever it moves
        except OSError:
            self.identity = None
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._watchers: dict[str, list[socket.socket]] = {}
        self._final_only: set[socket.socket] = set()  # watchers that only want the end
        self._running: set[str] = set()  # runs this agent runs: their end will be told
        self.since = time.time()  # when it started serving (`cairn agent --status`)
        self._lock = threading.Lock()  # guards watchers, and one writer at a time per socket
        self._listener: socket.socket | None = None
        self._bound: tuple[int, int, int] | None = None
        self._lock_file: Any = None

    def acquire(self, timeout: float = 60.0) -> bool:
        """Take the workspace's agent lock. False if another live agent already serves it.

        The holder of the lock is either starting (its socket opens within milliseconds) or
        shutting down (the lock is released soon): try both for a while, at start-up only."""
        self.layout.dot.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.layout.agent_lock, "a+")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            if ping(self.layout):
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"another agent holds {self.layout.agent_lock} but does not answer")
            time.sleep(0.01)

    def open(self) -> None:
        path = self.layout.agent_socket
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        self._bound = socket_file(path)
        sock.listen(64)
        self._listener = sock
        self.layout.agent_starting.unlink(missing_ok=True)  # it answers now
        threading.Thread(target=self._accept, args=(sock,), daemon=True, name="agent-accept").start()

    def close(self) -> None:
        with self._lock:
            self._running.clear()  # (a closing agent tells no more ends: a late watcher reads)
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
            remove_socket_file(self.layout.agent_socket, self._bound)  # not a new workspace's, at the same path

    def has_watchers(self) -> bool:
        with self._lock:
            return any(self._watchers.values())

    def running(self, run_id: str) -> None:
        """This agent runs ``run_id`` now: a watcher is told so, and its end (``notify(final=True)``)."""
        with self._lock:
            self._running.add(run_id)

    def let_go(self, run_id: str) -> None:
        """This agent no longer runs ``run_id`` (another took it): its watchers read it again."""
        with self._lock:
            self._running.discard(run_id)
            for conn in self._watchers.get(run_id, ()):
                try:
                    _send(conn, {"event": "changed", "run": run_id})
                except OSError:
                    pass

    def notify(self, run_id: str, final: bool = False, status: str | None = None) -> None:
        """``status``: the final status recorded, told with a final event (a watcher that waits
        only for it then reads nothing more)."""
        event = {"event": "final" if final else "changed", "run": run_id}
        if final and status is not None:
            event["status"] = status
        with self._lock:
            if final:
                self._running.discard(run_id)
            for conn in self._watchers.get(run_id, ()):
                if not final and conn in self._final_only:
                    continue
                try:
                    _send(conn, event)
                except OSError:
                    pass

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def reply(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        try:
            self._reply(conn, msg)
        except OSError:
            pass

    def _reply(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        with self._lock:
            _send(conn, msg)

    def _serve_conn(self, conn: socket.socket) -> None:
        reader = conn.makefile("r", encoding="utf-8")
        try:
            for line in reader:
                msg = json.loads(line)
                op = msg.get("op")
                if op == "poke":
                    place = msg.get("place")
                    if place is None or place == self.identity:  # not another workspace now at our old path
                        self.events.put(("poke",))
                    self._reply(conn, {"ok": True, "version": __version__, "place": self.identity})
                elif op == "stop":
                    self.events.put(("stop", "asked by a client"))
                    self._reply(conn, {"ok": True})
                elif op == "sync":  # answered by the agent's loop: it has loaded and serves
                    self.events.put(("sync", conn))
                elif op == "changed":  # a step that runs elsewhere (Ray) wrote its status to the store
                    self.events.put(("changed", str(msg.get("run", ""))))
                    self._reply(conn, {"ok": True})
                elif op == "ping":
                    with self._lock:
                        runs = sorted(self._running)
                    self._reply(conn, {"ok": True, "pid": os.getpid(), "version": __version__,
                                       "since": self.since, "runs": runs})
                elif op == "watch":
                    # a stuck watcher must not stall the agent: bound sends only (reads wait forever)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
                    with self._lock:
                        self._watchers.setdefault(msg["run"], []).append(conn)
                        if msg.get("final_only"):
                            self._final_only.add(conn)
                        # "running": this agent runs it, so its end will be told (no need to read it now)
                        _send(conn, {"ok": True, "running": msg["run"] in self._running})
                    self.events.put(("poke",))
        except (OSError, ValueError):
            pass
        finally:
            with self._lock:
                for conns in self._watchers.values():
                    if conn in conns:
                        conns.remove(conn)
                self._final_only.discard(conn)
            try:
                conn.close()
            except OSError:
                pass


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall((json.dumps(msg) + "\n").encode())


def signal_ready(message: bytes) -> None:
    """Tell the process that started this agent (if any) that it serves now."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), message)
        os.close(int(fd))
    except OSError:
        pass
