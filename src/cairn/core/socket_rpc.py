"""Calls over a Unix socket: pickled ``(method, args, kwargs)`` requests, pickled ``(ok, value)``
answers, each framed by its length. A step's ``Run.get_context()`` talks to its runner this way
on a Ray node of another machine (``backend/relay.py``, ``engine/remote_step.py``)."""

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


def send(sock: socket.socket, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


def receive(sock: socket.socket) -> Any:
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


def serve(path: str, call: Callable[[str, tuple[Any, ...], dict[str, Any]], Any]) -> Callable[[], None]:
    """Serve ``RelayBackend`` connections on the Unix socket ``path`` (only this user may connect)
    with ``call(method, args, kwargs)``; returns a function that stops serving. Stopping lets the
    calls being answered finish, then closes every connection: a call that gets no answer was not
    made (unless the serving process died while making it)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(16)
    stopping = threading.Event()
    state = threading.Condition()
    connections: set[socket.socket] = set()
    answering = [0]

    def handle(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    request = receive(conn)
                except (OSError, ConnectionError, EOFError, pickle.UnpicklingError):
                    return
                if request is None:
                    return
                with state:
                    if stopping.is_set():
                        return  # not made: the connection closes unanswered
                    answering[0] += 1
                try:
                    method, args, kwargs = request
                    try:
                        answer: tuple[bool, Any] = (True, call(method, args, kwargs))
                    except Exception as exc:  # the workspace's error goes back to the script that asked
                        answer = (False, exc)
                    try:
                        send(conn, answer)
                    except (pickle.PicklingError, TypeError, AttributeError):
                        send(conn, (False, RuntimeError(f"{type(answer[1]).__name__}: {answer[1]}")))
                    except OSError:
                        return
                finally:
                    with state:
                        answering[0] -= 1
                        state.notify_all()

    def serve_one(conn: socket.socket) -> None:
        try:
            handle(conn)
        finally:
            with state:
                connections.discard(conn)

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with state:
                if stopping.is_set():
                    conn.close()
                    return
                connections.add(conn)
            threading.Thread(target=serve_one, args=(conn,), name="cairn-relay-conn", daemon=True).start()

    threading.Thread(target=accept, name="cairn-relay", daemon=True).start()

    def stop(grace: float = 10.0) -> None:
        with state:
            stopping.set()
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()
        Path(path).unlink(missing_ok=True)
        with state:
            state.wait_for(lambda: answering[0] == 0, timeout=grace)
            for conn in connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # its reader sees the end: the client's next call goes elsewhere
                except OSError:
                    pass

    return stop
