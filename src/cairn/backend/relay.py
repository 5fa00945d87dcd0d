"""The client backend of a step that runs on a Ray node of another machine: its script's
``Run.get_context()`` reaches the workspace through the runner (a Unix socket the Ray task serves,
named by ``$CAIRN_RELAY``), which hands each call to the workspace's relay on the agent's machine.

Calls are the backend protocol's (``backend/base.py``), pickled; a file argument (an artifact) is
sent as its bytes. Errors come back as the workspace raised them.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

_HEADER = struct.Struct("!Q")


def _send(sock: socket.socket, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def _receive(sock: socket.socket) -> Any:
    header = _read(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    data = _read(sock, size)
    if data is None:
        raise ConnectionError("the step's runner closed the relay connection mid-answer")
    return pickle.loads(data)


def _read(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class RelayBackend:
    """Forwards every backend method to the workspace (see the module's doc)."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._pid = os.getpid()
        self.location = str(self._call("__location__", (), {}))

    def _connect(self) -> socket.socket:
        if self._pid != os.getpid():  # a forked child (multiprocessing): never share the parent's connection
            self._pid, self._sock, self._lock = os.getpid(), None, threading.Lock()
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self._address)
            except OSError as exc:
                sock.close()
                raise ConnectionError(f"cannot reach the workspace through the step's runner at {self._address} "
                                      f"({exc}); Run.get_context() works only while the step runs") from None
            self._sock = sock
        return self._sock

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._pid != os.getpid():
            self._connect()  # replaces the lock a fork may have copied while held
        with self._lock:
            sock = self._connect()
            _send(sock, (method, args, kwargs))
            answer = _receive(sock)
        if answer is None:
            raise ConnectionError("the step's runner closed the relay connection")
        ok, value = answer
        if not ok:
            raise value
        return value

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


def serve(path: str, call: Callable[[str, tuple[Any, ...], dict[str, Any]], Any]) -> Callable[[], None]:
    """Serve ``RelayBackend`` connections on the Unix socket ``path`` (only this user may connect)
    with ``call(method, args, kwargs)``; returns a function that stops serving."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(16)
    stopping = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = _receive(conn)
                except (OSError, ConnectionError, EOFError, pickle.UnpicklingError):
                    return
                if request is None:
                    return
                method, args, kwargs = request
                try:
                    answer: tuple[bool, Any] = (True, call(method, args, kwargs))
                except Exception as exc:  # the workspace's error goes back to the script that asked
                    answer = (False, exc)
                try:
                    _send(conn, answer)
                except (pickle.PicklingError, TypeError, AttributeError):
                    _send(conn, (False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
                except OSError:
                    return

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), name="cairn-relay-conn", daemon=True).start()

    threading.Thread(target=accept, name="cairn-relay", daemon=True).start()

    def stop() -> None:
        stopping.set()
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()
        Path(path).unlink(missing_ok=True)

    return stop
