"""Warm step start, the agent's side: one fork server per (interpreter, preloaded modules,
environment), started on first use and stopped with the compute target. A warm-started step is
still its own process, with its own arguments, working directory, environment variables,
stdout/stderr files and exit code; ``WarmProcess`` looks like ``subprocess.Popen`` to the runner.

When not to use it: modules that start threads at import (only the forking thread survives into
the child), that open GPU contexts or network connections at import (shared with every child),
or that read environment variables at import (they see the server's, not the step's)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

FORKSERVER = str(Path(__file__).with_name("forkserver.py"))
START_TIMEOUT = 300.0  # importing the modules may take a while; a hang must not
# Variables Python reads only when it starts: a step that sets them differently starts cold.
# So do the dynamic loader and libc (a forked child keeps the server's libraries and locale).
STARTUP_VARIABLES = ("PYTHONHASHSEED", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONUTF8",
                     "PYTHONIOENCODING", "PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONOPTIMIZE", "PYTHONMALLOC",
                     "LD_LIBRARY_PATH", "LD_PRELOAD", "GLIBC_TUNABLES", "LANG", "LC_ALL", "LC_CTYPE")


class WarmStartError(Exception):
    """The fork server could not start a step (the runner then starts it cold)."""


class _Lines:
    """JSON lines from a socket, with a timeout that leaves the socket usable afterwards."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self._buffer = b""

    def read(self, timeout: float | None = None) -> dict[str, Any] | None:
        self.conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self.conn.recv(65536)  # socket.timeout propagates; the buffer keeps what came
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)


class WarmProcess:
    """A step forked by a fork server: ``pid``, ``wait(timeout)``, ``returncode``."""

    def __init__(self, pid: int, lines: _Lines) -> None:
        self.pid = pid
        self._lines = lines
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        try:
            message = self._lines.read(timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(f"warm step {self.pid}", timeout or 0) from None
        except OSError:
            message = None
        # no message: the server died; its child was killed with the step's group, or is by the runner
        self.returncode = int(message["exit"]) if message else -9
        self._lines.conn.close()
        return self.returncode


class WarmServer:
    def __init__(self, python: str, modules: tuple[str, ...], env: dict[str, str], log_path: Path) -> None:
        # a fresh private folder (mode 0700, unguessable name) in /tmp: short enough for AF_UNIX
        self._folder = tempfile.mkdtemp(prefix="cairn-warm-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.socket_path = os.path.join(self._folder, "s")
        self.modules = modules
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen([python, FORKSERVER, self.socket_path, *modules], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        try:
            self.ready: dict[str, Any] = self._wait_ready(log_path)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, log_path: Path) -> dict[str, Any]:
        import select

        assert self._proc.stdout is not None
        # the modules import now: that is the point, but a hanging import must not hang the agent
        readable, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT)
        if not readable:
            raise WarmStartError(f"the fork server was not ready after {START_TIMEOUT:g} s (see {log_path})")
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise WarmStartError(f"the fork server exited with code {code} before it was ready (see {log_path})")
        try:
            ready = json.loads(line)
        except ValueError:
            raise WarmStartError(f"the fork server said {line[:200]!r} instead of being ready") from None
        if not ready.get("ready"):
            raise WarmStartError(f"warm start is not possible here: {ready.get('reason')}")
        return ready

    def kill(self) -> None:
        try:
            self._proc.kill()
            self._proc.wait()
        except OSError:
            pass
        shutil.rmtree(self._folder, ignore_errors=True)

    def alive(self) -> bool:
        return self._proc.poll() is None

    def launch(self, argv: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> WarmProcess:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lines = _Lines(conn)
        try:
            conn.connect(self.socket_path)
            conn.sendall((json.dumps({"argv": argv, "cwd": cwd, "env": env, "stdout": stdout,
                                      "stderr": stderr}) + "\n").encode())
            message = lines.read()
        except OSError as exc:
            conn.close()
            raise WarmStartError(f"the fork server did not take the step: {exc}") from None
        if message is None:
            conn.close()
            raise WarmStartError("the fork server closed the connection before starting the step")
        return WarmProcess(int(message["pid"]), lines)

    def stop(self) -> None:
        """Let the server go: it takes no new step, and exits once its running steps have ended
        (their exit codes still reach the runners waiting for them)."""
        try:
            if self._proc.stdin:
                self._proc.stdin.close()
        except OSError:
            pass
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self._proc.wait()
        shutil.rmtree(self._folder, ignore_errors=True)


class WarmPool:
    """The fork servers of one compute target."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules
        self._servers: dict[tuple[Any, ...], WarmServer] = {}
        self._failed: dict[tuple[Any, ...], str] = {}  # warm start impossible there: do not try again
        self._locks: dict[tuple[Any, ...], threading.Lock] = {}
        self._starting: set[tuple[Any, ...]] = set()
        self._closed = False
        self._lock = threading.Lock()

    def begin_start(self, python: str, env: dict[str, str]) -> bool:
        """Claim the start of the server for this interpreter and environment: False when one runs,
        is being started, or cannot start here; else the caller must call ``server()`` next."""
        key = (python, tuple(sorted(env.items())))
        with self._lock:
            server = self._servers.get(key)
            if self._closed or key in self._failed or key in self._starting or (server is not None and server.alive()):
                return False
            self._starting.add(key)
            return True

    def server(self, python: str, env: dict[str, str], log_dir: Path) -> WarmServer:
        key = (python, tuple(sorted(env.items())))
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        try:
            with lock:  # one server per key; steps of that key wait while it imports, others do not
                if key in self._failed:
                    raise WarmStartError(self._failed[key])
                server = self._servers.get(key)
                if server is not None and server.alive():
                    return server
                log_dir.mkdir(parents=True, exist_ok=True)
                try:
                    server = WarmServer(python, self.modules, env, log_dir / "warm-start.log")
                except WarmStartError as exc:
                    if "not possible here" in str(exc):
                        self._failed[key] = str(exc)
                    raise
                with self._lock:
                    if self._closed:  # the target's warm start was turned off meanwhile
                        server.stop()
                        raise WarmStartError("warm start was turned off for this compute target")
                    self._servers[key] = server
                    self._starting.discard(key)  # together: a server is always either starting or known
                return server
        finally:
            with self._lock:
                self._starting.discard(key)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            servers, self._servers = list(self._servers.values()), {}
        for s in servers:
            s.stop()
