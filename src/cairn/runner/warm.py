"""Warm step start, the agent's side: one fork server per (interpreter, preloaded modules,
environment), started on first use and stopped with the compute target. A warm-started step is
still its own process, with its own arguments, working directory, environment variables,
stdout/stderr files and exit code; ``WarmProcess`` looks like ``subprocess.Popen`` to the runner.

When not to use it: modules that start threads at import (only the forking thread survives into
the child), that open GPU contexts or network connections at import (shared with every child),
or that read environment variables at import (they see the server's, not the step's). What every
warm step shares with the server: the preloaded modules as they were when it started (a step that
finds one of the user's own module files a preload imported changed restarts the server first,
``WarmServer.changed``: by its stat, by its content where it was modified too recently when read for
its stat to tell, by its zip archive's stat; an installed package upgraded meanwhile is seen once the
agent restarts), the
hash seed of ``str`` (and so the order of sets of strings), and the process title (``ps`` shows
``forkserver.py``). A step that sets a variable Python or a preloaded library reads only at start
(``STARTUP_VARIABLES``), or whose snapshot has its own copy of a module the server imported,
starts cold, saying why in its system log."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cairn.core.digests import changed_too_recently
from cairn.runner.processes import RUN_ID_PLACEHOLDER

FORKSERVER = str(Path(__file__).with_name("forkserver.py"))
MAX_SERVERS = 4  # servers (environments) a compute target keeps at once: the least recently used goes
START_TIMEOUT = 300.0  # importing the modules may take a while; a hang must not
# A step waits this long for a server still importing, then starts cold (importing what it needs
# itself, as slowly); the server goes on starting for the steps after it.
STEP_WAIT = float(os.environ.get("CAIRN_WARM_START_WAIT", "60"))
# Variables Python reads only when it starts: a step that sets them differently starts cold.
# So do the dynamic loader and libc (a forked child keeps the server's libraries and locale).
# And the thread counts of OpenMP and BLAS libraries, read when a preloaded module loads them.
STARTUP_VARIABLES = ("PYTHONHASHSEED", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONUTF8",
                     "PYTHONIOENCODING", "PYTHONWARNINGS", "PYTHONDEVMODE", "PYTHONOPTIMIZE", "PYTHONMALLOC",
                     "PYTHONFAULTHANDLER", "PYTHONINTMAXSTRDIGITS", "PYTHONPYCACHEPREFIX", "PYTHONTRACEMALLOC",
                     "PYTHONNODEBUGRANGES", "PYTHONPLATLIBDIR", "PYTHONCOERCECLOCALE", "PYTHONVERBOSE",
                     "PYTHONDONTWRITEBYTECODE", "PYTHONPROFILEIMPORTTIME", "PYTHONINSPECT", "PYTHONCASEOK",
                     "PYTHONUSERBASE", "PYTHONEXECUTABLE", "PYTHONWARNDEFAULTENCODING", "PYTHONPERFSUPPORT",
                     "PYTHON_CPU_COUNT", "PYTHON_GIL", "PYTHON_FROZEN_MODULES",
                     "LD_LIBRARY_PATH", "LD_PRELOAD", "GLIBC_TUNABLES", "LANG", "LC_ALL", "LC_CTYPE",
                     "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")


def prune_stale_folders(parent: str = "/tmp", min_age: float = 600.0) -> int:
    """Remove this user's fork-server folders that no server listens in any more (a server killed
    while importing, with an agent that died, leaves its own); returns how many went. Only folders
    older than ``min_age`` seconds: a new one has no socket until its server binds it."""
    removed = 0
    cutoff = time.time() - min_age
    try:
        entries = [e for e in os.scandir(parent) if e.name.startswith("cairn-warm-")]
    except OSError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != os.getuid() or not entry.is_dir(follow_symlinks=False) or st.st_mtime > cutoff:
                continue
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(os.path.join(entry.path, "s"))
                continue  # a server listens there (one that is still importing listens already)
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            finally:
                probe.close()
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
        except OSError:
            continue
    return removed


class WarmStartError(Exception):
    """The fork server could not start a step (the runner then starts it cold)."""


class WarmStartRefused(WarmStartError):
    """Warm start cannot work with this interpreter or kernel (no ``os.pidfd_open``): not tried again."""


class WarmShadowed(WarmStartError):
    """The step has its own copy of a module the server has imported (``files``)."""

    def __init__(self, files: list[str]) -> None:
        super().__init__(f"the step has its own {', '.join(files)}")
        self.files = files


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

    def __init__(self, pid: int, lines: _Lines, log: Path) -> None:
        self.pid = pid
        self._lines = lines
        self._log = log
        self.returncode: int | None = None
        self.lost: str | None = None  # why the exit status is unknown

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        try:
            message = self._lines.read(timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(f"warm step {self.pid}", timeout or 0) from None
        except OSError:
            message = None
        if message is None:  # the server died: the runner kills the step's group; its exit status is lost
            self.lost = (f"the warm-start server of the step's environment died while the step ran (see "
                         f"{self._log}): the step was stopped and its exit status is unknown")
        self.returncode = int(message["exit"]) if message else -9
        self._lines.conn.close()
        return self.returncode


def _content_digest(path: str) -> str | None:
    import hashlib

    try:
        with open(path, "rb") as file:
            return hashlib.file_digest(file, "sha512").hexdigest()
    except OSError:
        return None


class WarmServer:
    def __init__(self, python: str, modules: tuple[str, ...], env: dict[str, str], log_path: Path) -> None:
        # a fresh private folder (mode 0700, unguessable name) in /tmp: short enough for AF_UNIX
        self._folder = tempfile.mkdtemp(prefix="cairn-warm-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.socket_path = os.path.join(self._folder, "s")
        self.modules = modules
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self._proc = subprocess.Popen([python, FORKSERVER, self.socket_path, *modules], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log,
                                          env={**env, "CAIRN_RUN_ID": RUN_ID_PLACEHOLDER}, start_new_session=True)
        try:
            self.ready: dict[str, Any] = self._wait_ready(log_path)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, log_path: Path) -> dict[str, Any]:
        from cairn.core.waiting import wait_readable

        assert self._proc.stdout is not None
        # the modules import now: that is the point, but a hanging import must not hang the agent
        readable = wait_readable(self._proc.stdout, START_TIMEOUT)
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
            raise WarmStartRefused(f"warm start is not possible here: {ready.get('reason')}")
        return ready

    def changed(self) -> str | None:
        """A file of the user's own modules the server preloaded that changed since, or a folder
        searched before one of them that did (``is_folder``; it then restarts: a cold step would
        import the new one), or None."""
        now = time.time_ns()  # (before the stats: an edit after one, in the same tick, is read below)
        for entry in self.ready.get("watched", ()):
            path, mtime_ns, size, inode, device, content_digest = entry[:6]
            try:
                st = os.stat(path)
            except OSError:
                return path
            if (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev) != (mtime_ns, size, inode, device):
                return path
            if content_digest is not None:  # changed too recently when read for its stat to tell
                if _content_digest(path) != content_digest:
                    return path
                if not changed_too_recently(st, now):
                    entry[5] = None  # its clock has moved on since: a later edit changes its stat
        return None

    def is_folder(self, path: str) -> bool:
        """Whether ``path`` (as ``changed`` said it) is a folder searched before a preloaded module's."""
        return any(entry[0] == path and entry[6:7] == ["folder"] for entry in self.ready.get("watched", ()))

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
            # not ASCII-escaped: a variable of 1 MB of emoji would be 3 MB of escapes
            conn.sendall((json.dumps({"argv": argv, "cwd": cwd, "env": env, "stdout": stdout, "stderr": stderr},
                                     ensure_ascii=False) + "\n").encode("utf-8", "surrogateescape"))
            message = lines.read()
        except OSError as exc:
            conn.close()
            raise WarmStartError(f"the fork server did not take the step: {exc}") from None
        if message is None or "pid" not in message:
            conn.close()
            if message and message.get("shadowed"):
                raise WarmShadowed(message["shadowed"])
            why = message.get("error") if message else "it closed the connection"
            raise WarmStartError(f"the fork server did not start the step: {why}")
        return WarmProcess(int(message["pid"]), lines, self.log_path)

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
    """The fork servers of one compute target. A server starts in the background (with the agent,
    or for the first step that needs it); steps wait for it on a condition, so a canceled step
    stops waiting at once. A server that could not start is not tried again for the same run: its
    steps start cold at once, saying why (a failing import fails the same way each time); the next
    run tries it again (``retry_failed``: the user may have fixed the module), unless warm start was
    refused here. One still importing is waited for by no step after the first that gave up on it."""

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules
        self._servers: dict[tuple[Any, ...], WarmServer] = {}
        self._used: dict[tuple[Any, ...], float] = {}  # when each server last gave a step
        self._failed: dict[tuple[Any, ...], str] = {}
        self._retry: set[tuple[Any, ...]] = set()  # of the failed: those the next run tries again
        self._starting: set[tuple[Any, ...]] = set()
        self._closed = False
        self._cond = threading.Condition()

    @staticmethod
    def _key(python: str, env: dict[str, str]) -> tuple[Any, ...]:
        return python, tuple(sorted(env.items()))

    def begin_start(self, python: str, env: dict[str, str], log_dir: Path,
                    on_done: Callable[[WarmServer | None, str | None], None] | None = None) -> bool:
        """Start the server for this interpreter and environment in the background, unless one
        runs, is being started, or could not start; True when this call started it. ``on_done``
        gets the server, or None and why it could not start."""
        key = self._key(python, env)
        with self._cond:
            server = self._servers.get(key)
            if self._closed or key in self._failed or key in self._starting or (server is not None and server.alive()):
                return False
            self._start_in_background(key, python, env, log_dir, on_done)
        return True

    def _start_in_background(self, key: tuple[Any, ...], python: str, env: dict[str, str], log_dir: Path,
                             on_done: Callable[[WarmServer | None, str | None], None] | None) -> None:  # under _cond
        self._servers.pop(key, None)  # one that died, if any
        # each server holds its imports in memory: beyond MAX_SERVERS environments, the one that gave
        # a step longest ago is let go (its running steps end as ever; its next step starts it again)
        while self._servers and len(self._servers) + len(self._starting) >= MAX_SERVERS:
            oldest = min(self._servers, key=lambda k: self._used.get(k, 0.0))
            self._servers.pop(oldest).stop()
            self._used.pop(oldest, None)
        self._starting.add(key)
        threading.Thread(target=self._start, args=(key, python, env, log_dir, on_done),
                         name="warm-start-server", daemon=True).start()

    def _start(self, key: tuple[Any, ...], python: str, env: dict[str, str], log_dir: Path,
               on_done: Callable[[WarmServer | None, str | None], None] | None) -> None:
        server: WarmServer | None = None
        failure: str | None = None
        retry = True
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            server = WarmServer(python, self.modules, env, log_dir / "warm-start.log")
        except (WarmStartError, OSError) as exc:
            failure, retry = str(exc), not isinstance(exc, WarmStartRefused)
        except BaseException as exc:  # never leave waiting steps waiting
            failure = f"{type(exc).__name__}: {exc}"
        with self._cond:
            self._starting.discard(key)
            if server is not None and self._closed:  # the target's warm start was turned off meanwhile
                server.stop()
                server, failure = None, "warm start was turned off for this compute target"
            elif server is not None:
                self._servers[key] = server
                self._failed.pop(key, None)  # it came after all (a step gave up on it meanwhile)
            else:
                self._failed[key] = f"the fork server could not start ({failure})"
                if retry:
                    self._retry.add(key)
            self._cond.notify_all()
        if on_done is not None:
            on_done(server, failure)

    def retry_failed(self) -> None:
        """Servers that could not start (a preload that ended the process, which the user may have
        fixed since; an import slow only the first time) are started again for the next step that
        needs one: one background start per run, and its steps wait at most ``STEP_WAIT`` as ever.
        Not those refused (this interpreter or kernel cannot fork steps), nor one still importing."""
        with self._cond:
            for key in self._retry & set(self._failed):
                del self._failed[key]
            self._retry.clear()

    def server(self, python: str, env: dict[str, str], log_dir: Path, stop_waiting: Any = None,
               on_wait: Callable[[], None] | None = None,
               on_restart: Callable[[str, bool], None] | None = None) -> WarmServer:
        """The running server for this interpreter and environment, started if needed and waited
        for; started again when one of the user's own modules it preloaded changed (said to
        ``on_restart`` with the file). Raises WarmStartError when it cannot start (now or before),
        when warm start was turned off, or when ``stop_waiting`` (a StepControl) is canceled or
        withdrawn meanwhile."""
        key = self._key(python, env)
        if stop_waiting is not None:
            stop_waiting.add_waker(self._wake)
        deadline = time.monotonic() + STEP_WAIT
        restarted = False
        while True:
            server = self._running_server(key, python, env, log_dir, stop_waiting, on_wait, deadline)
            changed = None if restarted else server.changed()  # (stats files: not under the pool's lock)
            if changed is None:  # (a file edited again meanwhile restarts it for the next step, not this one)
                return server
            with self._cond:
                mine = self._servers.get(key) is server  # (else another step restarted it meanwhile)
                if mine:
                    self._servers.pop(key).stop()  # its running steps end as ever
                    self._used.pop(key, None)
            if mine and on_restart is not None:
                on_restart(changed, server.is_folder(changed))
            restarted, on_wait = True, None
            deadline = time.monotonic() + STEP_WAIT  # (the new server imports it all again)

    def _running_server(self, key: tuple[Any, ...], python: str, env: dict[str, str], log_dir: Path,
                        stop_waiting: Any, on_wait: Callable[[], None] | None, deadline: float) -> WarmServer:
        waited = False
        with self._cond:
            while True:
                server = self._servers.get(key)
                if server is not None and server.alive():
                    self._used[key] = time.monotonic()
                    return server
                if key in self._failed:
                    raise WarmStartError(self._failed[key])
                if self._closed:
                    raise WarmStartError("warm start was turned off for this compute target")
                if stop_waiting is not None and (stop_waiting.canceled or stop_waiting.withdrawn):
                    raise WarmStartError("the step was stopped while its fork server started")
                if key not in self._starting:  # none yet, or it died since: started again
                    self._start_in_background(key, python, env, log_dir, None)
                if not waited and on_wait is not None:
                    waited = True
                    on_wait()
                left = deadline - time.monotonic()
                if left <= 0:  # later steps do not wait again (they use the server if it comes after all)
                    self._failed.setdefault(key, f"the fork server was still importing after {STEP_WAIT:g} s")
                    self._cond.notify_all()  # nor do the others waiting now
                    raise WarmStartError(self._failed[key])
                self._cond.wait(left)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            servers, self._servers = list(self._servers.values()), {}
            self._cond.notify_all()
        for s in servers:
            s.stop()
