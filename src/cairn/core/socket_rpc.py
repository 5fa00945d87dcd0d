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
from typing import Any, NamedTuple

_HEADER = struct.Struct("!Q")


def send(sock: socket.socket, value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(data)) + data)


class CallNotUnderstood(Exception):
    """The serving end could not read a call (an argument of a type it cannot import): nothing was
    done. The caller may make the call another way."""


class CallNotTaken(Exception):
    """The serving end is stopping and did not make the call (it says so rather than closing the
    connection on it, which would leave the caller unsure whether it was made)."""


def receive(sock: socket.socket) -> Any:
    data = _frame(sock)
    return None if data is None else pickle.loads(data)


def _frame(sock: socket.socket) -> bytes | None:
    header = _read(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    data = _read(sock, size)
    if data is None:
        raise ConnectionError("the other end closed the connection mid-message")
    return data


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _read(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def socket_file(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """Which file is at ``path`` now (device, inode, change time: an inode number may be reused),
    or None: to remove later only the socket we bound."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def remove_socket_file(path: str | os.PathLike[str], bound: tuple[int, int, int] | None) -> None:
    """Remove the socket file at ``path`` if it is still the one we bound (``bound``): the folder may
    have been replaced since (a workspace re-created at the same path), and its new socket is not ours."""
    if bound is not None and socket_file(path) == bound:
        try:
            os.unlink(path)
        except OSError:
            pass


class AfterReply(NamedTuple):
    """What ``call`` returns to have ``then()`` called once ``value`` was sent back (or could not be):
    work the answer sets off (an agent claiming the run just recorded) then does not hold the reply
    up in the interpreter lock."""

    value: Any
    then: Callable[[], None]


def serve(path: str, call: Callable[[str, tuple[Any, ...], dict[str, Any]], Any],
          grace: float = 30.0) -> Callable[[], None]:
    """Serve ``RelayBackend`` connections on the Unix socket ``path`` (mode 0600, and only processes
    of this user are answered) with ``call(method, args, kwargs)`` (its value, or an ``AfterReply``);
    returns a function that stops serving. Stopping lets the calls being answered finish (``grace``
    seconds at most), then closes every connection; a call read meanwhile is answered
    ``CallNotTaken`` (not made), and a caller whose call was not yet read sees the connection end
    first."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)  # no umask change: that would apply to every thread's files meanwhile
    os.chmod(path, 0o600)
    bound = socket_file(path)  # after the chmod: it changes the file's change time
    listener.listen(16)
    stopping = threading.Event()
    state = threading.Condition()
    connections: set[socket.socket] = set()
    answering = 0

    def answer(conn: socket.socket, data: bytes) -> None:
        try:
            method, args, kwargs = pickle.loads(data)
        except Exception as exc:  # e.g. a value of a class defined in the caller's script
            send(conn, (False, CallNotUnderstood(f"{type(exc).__name__}: {exc}")))
            return
        then = None
        try:
            value = call(method, args, kwargs)
            if isinstance(value, AfterReply):
                value, then = value
            reply: tuple[bool, Any] = (True, value)
        except Exception as exc:  # the workspace's error goes back to the script that asked
            reply = (False, exc)
        try:
            send(conn, reply)
        except (pickle.PicklingError, TypeError, AttributeError):
            send(conn, (False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")))
        finally:
            if then is not None:
                try:
                    then()
                except Exception:  # (the reply went back: the connection serves on)
                    import traceback

                    traceback.print_exc()

    def handle(conn: socket.socket) -> None:
        nonlocal answering
        with conn:
            if peer_uid(conn) != os.getuid():
                return
            while True:
                try:
                    data = _frame(conn)
                except (OSError, ConnectionError):
                    return
                if data is None:
                    return
                with state:
                    stopped = stopping.is_set()
                    if not stopped:
                        answering += 1
                if stopped:  # read, but not made: said so, then the connection closes
                    try:
                        send(conn, (False, CallNotTaken("the other end is stopping")))
                    except OSError:
                        pass
                    return
                try:
                    answer(conn, data)
                except OSError:
                    return
                finally:
                    with state:
                        answering -= 1
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

    def stop() -> None:
        with state:
            stopping.set()
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()
        remove_socket_file(path, bound)
        with state:
            state.wait_for(lambda: answering == 0, timeout=grace)
            for conn in connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # its reader sees the end: the caller's next call goes elsewhere
                except OSError:
                    pass

    return stop
