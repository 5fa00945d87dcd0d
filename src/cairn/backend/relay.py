"""A step's ``Run.get_context()`` through the workspace's agent: on a Ray node of another machine
(``RelayBackend``, both ends of it), and for the steps the agent runs on its own machine
(``StepBackend``).

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

from cairn.core.socket_rpc import receive, send

# what a script's Run.get_context() may do through the relay: read, and record on runs and datasets
SCRIPT_METHODS = frozenset({
    "name", "location", "list_datastores", "list_compute_targets", "list_experiments", "get_run", "list_runs",
    "get_children", "get_events", "cancel_run", "set_tags", "add_properties", "get_tags", "get_properties",
    "log_metric", "log_metrics", "get_metric_rows", "get_outputs", "read_log", "register_dataset",
    "get_dataset", "list_datasets", "dataset_lineage", "get_environment", "list_environments",
    "list_artifacts", "explain"})


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
            send(sock, (method, args, kwargs))
            answer = receive(sock)
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


class StepBackend:
    """``Run.get_context()``'s backend in a step that the workspace's agent runs on this machine.

    Opening the workspace in the step's process costs ~0.4 s (importing SQLAlchemy, opening the
    store), in every step whose script calls ``Run.get_context()``. The agent has the workspace
    open, so the calls scripts make (``SCRIPT_METHODS``: reading, recording on runs and datasets)
    go to it over its scripts socket (``core/socket_rpc.py``), answered as they would be here; any
    other call opens the workspace in this process, on its first use, as before."""

    def __init__(self, workspace: str, address: str) -> None:
        self._workspace = workspace
        self._agent = RelayBackend(address)  # ConnectionError when no agent answers there
        self.location = self._agent.location
        self._direct: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._agent.name

    def _local(self) -> Any:
        with self._lock:
            if self._direct is None:
                self._direct = open_local_backend(self._workspace)
            return self._direct

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        if method in SCRIPT_METHODS:
            return getattr(self._agent, method)
        return getattr(self._local(), method)


def open_local_backend(workspace: str) -> Any:
    """The workspace opened in this process (its store needs SQLAlchemy in this interpreter)."""
    import sys

    from cairn.core.errors import CairnError

    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise CairnError(
            f"Run.get_context() needs Cairn's dependencies (SQLAlchemy) in this interpreter ({sys.executable}) "
            f"for this call; install cairn into it, or run the step in an environment that has them") from None
    try:
        from cairn.backend.local import LocalBackend
        from cairn.storage.layout import WorkspaceLayout

        return LocalBackend(WorkspaceLayout(workspace))
    except (ImportError, TypeError, AttributeError) as exc:
        raise client_conflict(exc) from None


def client_conflict(exc: BaseException) -> BaseException:
    """``exc`` (Cairn's client failing to load in a step's environment), explained when the
    environment pins versions of Cairn's own dependencies (``$CAIRN_CLIENT_CONFLICTS``)."""
    conflicts = os.environ.get("CAIRN_CLIENT_CONFLICTS")
    if not conflicts:
        return exc
    from cairn.core.errors import CairnError

    return CairnError(
        f"Run.get_context() cannot load Cairn's client in this environment: it pins {conflicts}, and its own "
        f"versions come first on sys.path ({type(exc).__name__}: {exc}); unpin them or pin the versions Cairn uses")


def step_backend(workspace: str) -> Any:
    """The backend of ``Run.get_context()`` in a step run on this machine: through the agent when
    it answers, else the workspace opened here (a step started by hand, or by ``cairn debug``)."""
    from cairn.storage.layout import WorkspaceLayout

    try:
        return StepBackend(workspace, str(WorkspaceLayout(workspace).scripts_socket))
    except (ConnectionError, PermissionError):
        return open_local_backend(workspace)


def serve_scripts(workspace: str) -> Callable[[], None]:
    """Answer ``StepBackend`` calls for ``workspace`` (in its agent, which holds the workspace lock:
    a socket file already there is a dead agent's). Returns what stops it."""
    from cairn.core.socket_rpc import serve
    from cairn.storage.layout import WorkspaceLayout

    service = ScriptService(workspace)
    path = WorkspaceLayout(workspace).scripts_socket
    path.unlink(missing_ok=True)

    def answer(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method == "__location__":
            return workspace
        return service.call(method, args, kwargs)

    return serve(str(path), answer)


class ScriptService:
    """The workspace's side of the scripts' calls (made by the relay, on the workspace's machine)."""

    def __init__(self, workspace: str) -> None:
        self._workspace = workspace
        self._lock = threading.Lock()
        self._backend: Any = None

    def _local(self) -> Any:
        with self._lock:
            if self._backend is None:
                self._backend = open_local_backend(self._workspace)
            return self._backend

    def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method not in SCRIPT_METHODS:
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
