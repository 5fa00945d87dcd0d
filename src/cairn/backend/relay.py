"""A step's ``Run.get_context()`` on a Ray node of another machine, both ends of it. (On the
agent's own machine scripts reach it through ``backend/through_agent.py``.)

``RelayBackend`` is the script's backend: it reaches the workspace through the step's runner (a
Unix socket the Ray task serves, named by ``$CAIRN_RELAY``; ``core/socket_rpc.py``), which hands
each call to the workspace's relay on the agent's machine (``engine/ray_relay.py``). There
``ScriptService`` answers it with this workspace's local backend, for a fixed set of reading and
recording methods. Calls are the backend protocol's (``backend/base.py``), pickled; a file argument
(an artifact) travels as its bytes. Errors come back as the workspace raised them.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cairn.backend import open_local_backend
from cairn.core.socket_rpc import CallNotTaken, peer_uid, receive, send

# what a script's Run.get_context() may do through the relay: read, and record on runs and datasets
SCRIPT_METHODS = frozenset({
    "name", "location", "list_datastores", "list_compute_targets", "list_experiments", "get_run", "list_runs",
    "get_children", "get_events", "cancel_run", "set_tags", "add_properties", "get_tags", "get_properties",
    "log_metric", "log_metrics", "get_metric_rows", "get_outputs", "read_log", "register_dataset",
    "get_dataset", "list_datasets", "dataset_lineage", "get_environment", "list_environments",
    "list_artifacts", "explain"})


class RelayLost(ConnectionError):
    """The other end of the relay is gone: the call got no answer. ``sent``: whether it had been
    handed over (then the other end may have made it before it went); if not, it was not made."""

    def __init__(self, message: str, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class _Pending:
    """A call ``RelayBackend._begin`` sent on ``sock``: its answer (or error), once read."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.value: Any = None
        self.error: BaseException | None = None


class RelayBackend:
    """Forwards every backend method to the workspace (see the module's doc). ``timeout``: how long
    reaching the other end and its first answer may take (then ``RelayLost``); calls wait."""

    def __init__(self, address: str, timeout: float | None = None,
                 handshake: Callable[[Callable[[str], Any]], str] | None = None) -> None:
        """``handshake(ask)``: checks the other end on every new connection, before its first call
        (``ask(method)`` calls it there), and returns the workspace it serves; it raises ``RelayLost``
        to refuse that end. With ``timeout`` each handshake's answers, like the first answer, must
        come within it."""
        self._address = address
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self._handshake = handshake
        self._handshake_timeout = timeout
        self._served: str | None = None  # what the last handshake was told
        self._pending: _Pending | None = None  # the call ``_begin`` sent, its answer not read yet
        self._timeout = timeout  # for the first answer only (a timeout is an OSError: RelayLost)
        if handshake is not None:
            with self._lock:
                self._connect()
        self.location = self._served if self._served is not None else str(self._call("__location__", (), {}))
        if self._sock is not None:
            self._sock.settimeout(None)
        self._timeout = None

    def _connect(self) -> socket.socket:
        if self._pid != os.getpid():  # a forked child (multiprocessing): never share the parent's connection
            self._pid, self._sock, self._lock, self._pending = os.getpid(), None, threading.Lock(), None
        if self._sock is not None and _closed_by_peer(self._sock):
            self.close()  # the other end went (an agent that stopped): a new one may be there
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self._timeout)
            try:
                sock.connect(self._address)
                if peer_uid(sock) != os.getuid():  # never read what another user's process says
                    raise PermissionError(f"{self._address} is served by another user's process")
            except OSError as exc:
                sock.close()
                raise RelayLost(f"cannot reach the workspace through the step's runner at {self._address} "
                                f"({exc}); Run.get_context() works only while the step runs", sent=False) from None
            self._sock = sock
            if self._handshake is not None:  # (an agent that went may have been replaced by another)
                try:
                    sock.settimeout(self._handshake_timeout)
                    self._served = str(self._handshake(lambda method: self._exchange(sock, method, (), {})))
                    sock.settimeout(self._timeout)
                except BaseException:
                    self.close()
                    raise
        return self._sock

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._pid != os.getpid():
            self._connect()  # replaces the lock a fork may have copied while held
        with self._lock:
            self._settle()
            return self._exchange(self._connect(), method, args, kwargs)

    def _begin(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[], Any]:
        """``_call`` in two halves: the call is sent now and its answer read when the function
        returned is called, so that the caller works while the other end answers. Calls made
        meanwhile (from any thread) read that answer first, where it comes on the connection,
        and keep it for the function."""
        if self._pid != os.getpid():
            self._connect()
        with self._lock:
            self._settle()
            sock = self._connect()
            try:
                self._pending = pending = _Pending(sock)
                self._send(sock, method, args, kwargs)
            except BaseException:  # (an interrupted send: the connection went with it, see _send)
                self.close()
                raise

        def answer() -> Any:
            if pending.pid != os.getpid():  # a forked child: the connection is its parent's
                raise RelayLost("the answer belongs to the process that sent the call", sent=False)
            with self._lock:
                if self._pending is pending:
                    self._settle()
            if pending.error is not None:
                raise pending.error
            return pending.value

        return answer

    def _settle(self) -> None:
        """Read the answer of the call ``_begin`` sent, if it is still unread (with the lock held)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.value = self._answer(pending.sock)
        except Exception as exc:  # the caller of _begin is told, not the call that read it
            pending.error = exc
        except BaseException:  # (Ctrl-C) its answer is lost with the connection
            pending.error = RelayLost("the answer was not read (interrupted)", sent=True)
            self.close()
            raise

    def _exchange(self, sock: socket.socket, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._send(sock, method, args, kwargs)
        return self._answer(sock)

    def _send(self, sock: socket.socket, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        try:
            send(sock, (method, args, kwargs))
        except OSError as exc:  # not delivered whole: the other end reads no call from it
            raise self._lost(exc, sent=False) from None
        except BaseException:  # (Ctrl-C) sent in part or whole: the other end could read what comes next as its rest
            self.close()
            raise

    def _answer(self, sock: socket.socket) -> Any:
        try:
            answer = receive(sock)
        except OSError as exc:
            raise self._lost(exc, sent=True) from None
        except BaseException:  # (Ctrl-C) the rest of the answer would be read as the next call's
            self.close()
            raise
        if answer is None:
            raise self._lost("end of file", sent=True)
        ok, value = answer
        if not ok:
            if isinstance(value, CallNotTaken):  # it is stopping: the call was not made
                raise self._lost(value, sent=False)
            raise value
        return value

    def closed_by_peer(self) -> bool:
        """Whether the other end closed the connection (without waiting: a process that went)."""
        sock = self._sock
        return sock is None or _closed_by_peer(sock)

    def _lost(self, why: object, sent: bool) -> RelayLost:
        self.close()
        return RelayLost(f"the step's runner closed the relay connection ({why})", sent=sent)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        pending, self._pending = self._pending, None
        if pending is not None:  # its answer cannot come any more
            pending.error = RelayLost("the connection closed before the answer came", sent=True)
        if sock is not None:
            sock.close()

    @property
    def name(self) -> str:
        return str(self._call("name", (), {}))

    def put_artifact(self, run_id: str, name: str, local_path: str) -> str:
        return str(self._call("__put_artifact__", (run_id, name, Path(local_path).read_bytes()), {}))

    def artifact_path(self, run_id: str, name: str) -> Path:
        """A copy of the run's file on this machine (a missing file: a path that does not exist)."""
        import tempfile

        data = self._call("__read_artifact__", (run_id, name), {})
        folder = Path(tempfile.mkdtemp(prefix="cairn-artifact-"))
        path = folder / Path(name).name
        if data is not None:
            path.write_bytes(data)
        return path

    def prestart(self) -> None:
        """Nothing to start: the workspace's agent runs on its own machine."""

    def ensure_progress(self) -> None:
        """The agent that runs this step is alive (it is waiting for the step)."""

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(method, args, kwargs)

        call.__name__ = method
        return call


class ScriptService:
    """The workspace's side of the scripts' calls (made by the relay, on the workspace's machine).
    ``allowed``: the backend methods it answers (by default what a script may do)."""

    def __init__(self, workspace: str, allowed: frozenset[str] = SCRIPT_METHODS, store: Any = None) -> None:
        """``store``: the workspace's store, open in this process (the agent's), shared."""
        self._workspace = workspace
        self._allowed = allowed
        self._store = store
        self._lock = threading.Lock()
        self._backend: Any = None

    def _local(self) -> Any:
        with self._lock:
            if self._backend is None:
                self._backend = open_local_backend(self._workspace, self._store)
            return self._backend

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method not in self._allowed:
            raise PermissionError(f"{method} is not available to a step on a Ray node of another machine "
                                  f"(a script there may read, and record on runs and datasets)")
        value = getattr(self._local(), method)
        return value(*args, **kwargs) if callable(value) else value

    def put_artifact(self, run_id: str, name: str, data: bytes) -> str:
        import tempfile

        with tempfile.NamedTemporaryFile(dir=Path(self._workspace) / ".cairn", prefix=".artifact-") as tmp:
            tmp.write(data)
            tmp.flush()
            return str(self._local().put_artifact(run_id, name, tmp.name))

    def read_artifact(self, run_id: str, name: str) -> bytes | None:
        path = self._local().artifact_path(run_id, name)
        return path.read_bytes() if path.is_file() else None


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end has closed ``sock`` (between calls nothing else may be waiting on it)."""
    from cairn.core.waiting import wait_readable

    try:
        return wait_readable(sock, 0) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
