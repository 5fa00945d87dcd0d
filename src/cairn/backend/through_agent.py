"""A workspace reached through its agent, on the agent's own machine: what ``Workspace(path)`` and a
local step's ``Run.get_context()`` use while the agent is up.

Opening the workspace in a process costs ~0.35 s here, nearly all of it importing SQLAlchemy for
the store: in every ``python pipeline.py`` of an edit-run loop, and in every step whose script takes
its run context. The agent has the workspace open. ``AgentBackend`` sends the calls that submitting,
following and recording need (``LOCAL_METHODS``) to it over its scripts socket
(``layout.scripts_socket``; ``core/socket_rpc.py``, this user only), where the workspace answers
them as it would here; the agent's own socket serves ``watch``, ``ensure_progress`` and
``prestart`` as before; any other call opens the workspace in this process, on its first use. With
no agent (of this Cairn version) to answer, the workspace is opened here at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from cairn.backend import open_local_backend
from cairn.backend.base import AgentSocketCalls
from cairn.backend.relay import SCRIPT_METHODS, RelayBackend, RelayLost, ScriptService
from cairn.core.socket_rpc import CallNotUnderstood
from cairn.storage.snapshot import snapshot_limits

# the scripts' calls (reads, records on runs and datasets), what submitting a pipeline needs, and
# recording the workspace's compute targets (what a pipeline script sets up each time). Nothing
# that seals or opens datastore credentials: the key may come from the process's own environment.
LOCAL_METHODS = SCRIPT_METHODS | {"snapshots", "record_pipeline_run", "put_compute_target"}
# made again on the workspace opened here when the agent went while answering: the same call twice
# would record twice (a metric, a dataset version, a run)
NOT_REPEATED = frozenset({"log_metric", "log_metrics", "register_dataset", "record_pipeline_run",
                          "add_properties"})
HANDSHAKE_SECONDS = 5.0  # an agent that is up answers in milliseconds; a stopped (SIGSTOP) one never


class AgentBackend(AgentSocketCalls):
    """The backend protocol, through the workspace's agent on this machine (see the module's doc)."""

    def __init__(self, workspace: str, address: str) -> None:
        from cairn import __version__
        from cairn.storage.layout import WorkspaceLayout

        self._workspace = workspace

        def same_agent(ask: Callable[[str], Any]) -> str:
            """Every connection's first words (the first, and one to an agent that replaced the one
            that went): an agent of another version or serving another workspace is not used."""
            version = ask("__version__")
            if version != __version__:  # what travels is pickled: both ends must be the same code
                raise RelayLost(f"the agent runs Cairn {version}, this process {__version__}", sent=False)
            served = ask("__location__")
            if not _same_folder(served, workspace):  # the workspace was moved since the agent started
                raise RelayLost(f"the agent answering in {workspace} serves {served}", sent=False)
            return str(served)

        self._agent: RelayBackend | None = RelayBackend(address, timeout=HANDSHAKE_SECONDS,
                                                        handshake=same_agent)  # RelayLost
        self.location = self._agent.location
        self.layout = WorkspaceLayout(workspace)
        self._direct: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.layout.workspace_name(self.layout.read_config())

    def snapshots(self, source_directories: list[str]) -> dict[str, str]:
        return self.start_snapshots(source_directories)()

    def start_snapshots(self, source_directories: list[str]) -> Callable[[], dict[str, str]]:
        """The agent takes the snapshots while this process goes on (a submit checks its pipeline
        meanwhile); the function returned waits for them (a call made through the agent meanwhile
        waits for them too, and keeps them for it: ``RelayBackend._begin``)."""
        # the agent's working folder and environment are not this process's
        absolute = {os.path.abspath(d): d for d in source_directories}
        call = (list(absolute), snapshot_limits(self.layout.read_config()))
        agent, begun = self._agent, None
        if agent is not None:
            try:
                begun = agent._begin("snapshots", call, {})
            except RelayLost:  # the agent went: they are taken here, when asked for
                self._agent = None

        def digests() -> dict[str, str]:
            taken = self._answer("snapshots", call, {}, begun)[1]
            return {absolute.get(k, k): v for k, v in taken.items()}

        return digests

    def prestart(self) -> None:
        """The agent answers this process: nothing to start (unless it went since)."""
        agent = self._agent
        if agent is None or agent.closed_by_peer():
            super().prestart()

    def submit_pipeline(self, *args: Any, **kwargs: Any) -> tuple[str, dict[str, str]]:
        by_agent, recorded = self._answer("record_pipeline_run", args, kwargs)
        if not by_agent:  # recorded here: make sure an agent serves it
            super().ensure_progress()
        # else the agent that recorded it claims it at once (``serve_scripts``' on_recorded): no poke
        return recorded

    def ensure_progress(self) -> None:
        """Nothing to do while the agent answering this process is up: it is of this Cairn version,
        serves this workspace (both checked when it was reached) and holds its lock, so it has
        claimed what was queued before it started and claims what is recorded through it at once.
        Otherwise an agent is started (or poked) as for a workspace opened here."""
        agent = self._agent
        if agent is None or agent.closed_by_peer():
            super().ensure_progress()

    def _local(self) -> Any:
        if self._pid != os.getpid():  # a forked child: a lock a parent's thread held stays held here
            self._pid, self._lock = os.getpid(), threading.Lock()
        with self._lock:
            if self._direct is None:
                self._direct = open_local_backend(self._workspace)
            return self._direct

    def _relayed(self, method: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            return self._answer(method, args, kwargs)[1]

        call.__name__ = method
        return call

    def _answer(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                begun: Callable[[], Any] | None = None) -> tuple[bool, Any]:
        """(whether the agent answered, its answer); made here when it could not. ``begun``: the
        answer of that call, already sent to the agent (``RelayBackend._begin``)."""
        agent = self._agent
        if agent is not None:
            try:
                return True, begun() if begun is not None else agent._call(method, args, kwargs)
            except CallNotUnderstood:
                pass  # an argument the agent cannot read (a class of the caller's script): made here
            except RelayLost as lost:  # the agent went (idle, stopped): the workspace is opened here
                self._agent = None
                if lost.sent and method in NOT_REPEATED:
                    from cairn.core.errors import AgentError

                    raise AgentError(
                        f"the workspace's agent stopped while recording {method}; it may or may not have "
                        f"been recorded: look at the run (e.g. `cairn runs list`) before trying again") from None
        value = getattr(self._local(), method)
        return False, value(*args, **kwargs) if callable(value) else value  # ``name`` is a property

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        if method in LOCAL_METHODS:
            return self._relayed(method)
        return getattr(self._local(), method)


def _same_folder(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is not there (any more)
        return False


def workspace_backend(workspace: str) -> Any:
    """``workspace``'s backend in this process: through its agent when one of this Cairn version
    answers, else the workspace opened here."""
    from cairn.storage.layout import WorkspaceLayout

    try:
        return AgentBackend(workspace, str(WorkspaceLayout(workspace).scripts_socket))
    except (RelayLost, PermissionError):
        return open_local_backend(workspace)


def serve_scripts(workspace: str, on_recorded: Callable[[str, Any, dict[str, str]], None] | None = None,
                  store: Any = None) -> Callable[[], None]:
    """Answer ``AgentBackend`` calls for ``workspace`` (in its agent, which holds the workspace lock:
    a socket file already there is a dead agent's). Returns what stops it. ``on_recorded(run_id,
    spec, step_ids)``: a pipeline run was just queued here, with that GraphSpec and those step run
    ids (the agent claims it: the client sends no poke).
    ``store``: the agent's own (the answers share its connections and compiled statements)."""
    from cairn import __version__
    from cairn.core.socket_rpc import AfterReply, serve
    from cairn.storage.layout import WorkspaceLayout

    service = ScriptService(workspace, LOCAL_METHODS, store)
    path = WorkspaceLayout(workspace).scripts_socket
    path.unlink(missing_ok=True)

    def answer(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method == "__location__":
            return workspace
        if method == "__version__":
            return __version__
        value = service.call(method, args, kwargs)
        if method == "record_pipeline_run" and on_recorded is not None:
            spec = kwargs["spec"] if "spec" in kwargs else args[2]
            # the client goes on while the agent claims it
            return AfterReply(value, lambda: on_recorded(value[0], spec, value[1]))
        return value

    return serve(str(path), answer)

