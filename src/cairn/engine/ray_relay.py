"""The workspace's relay on a Ray cluster: an actor the agent starts on its own node (the machine
that holds the embedded workspace), through which steps on nodes of *other* machines reach the
workspace — their status, logs, outputs on local datastores, snapshot files, inputs on local
datastores, and their scripts' ``Run.get_context()`` calls.

Everything goes through Ray's own connections between the nodes: Cairn opens no port. The relay
serves only paths inside the workspace (its ``.cairn/`` folder and its local datastores' roots),
and only to tasks of the cluster, which must sit on a trusted network (see ``compute/ray.py``).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

from cairn.runner.job import StepJob

CHUNK = 32 << 20  # bytes per call: big enough to stream fast, small enough for Ray's object store
_REPORTS = {"started", "succeeded", "ended", "register_output"}


class WorkspaceRelay:
    """Runs in a Ray worker process on the agent's node (``relay_options`` pins it there)."""

    def __init__(self, workspace: str) -> None:
        from cairn.engine.context import EngineContext
        from cairn.storage.layout import WorkspaceLayout

        self.layout = WorkspaceLayout(workspace)
        if not self.layout.db.is_file():
            raise RuntimeError(f"the workspace relay was placed on {socket.gethostname()!r}, which cannot see "
                               f"the workspace {workspace!r}: the agent must run on a node of the Ray cluster")
        self.ctx = EngineContext.open(self.layout)
        self._lock = threading.Lock()
        self._processes: dict[str, tuple[str, int, str | None]] = {}  # step run -> node, pid, start time
        self._backend: Any = None
        self._roots: list[Path] | None = None

    # -- reports (the runner's StepReporter, on the workspace's side) ------------------------------

    def report(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A StepReporter call of a step on another machine. An attempt its agent handed back to the
        queue (stopped) records no ending; the process is remembered by its node, not recorded as a
        pid of this machine (the agent kills leftover pids of its own machine)."""
        from cairn.engine.client import changed
        from cairn.engine.ray_task import TaskReporter

        if method not in _REPORTS:
            raise ValueError(f"not a report: {method}")
        run_id = args[0].pipeline_run_id if method in ("succeeded", "register_output") else None
        if method == "started":
            node = kwargs.pop("node", None)
            pid, started = kwargs.pop("pid", None), kwargs.pop("pid_started", None)
            if node and pid:
                with self._lock:
                    self._processes[args[0]] = (node, int(pid), started)
        reporter = TaskReporter(self.ctx.store, on_change=lambda sid: self._changed(changed, sid, run_id),
                                locate=self.ctx.datastore_location)
        answer = getattr(reporter, method)(*args, **kwargs)
        if method in ("succeeded", "ended"):
            self.forget(args[0].step_run_id if method == "succeeded" else args[0])
        return answer

    def _changed(self, changed: Any, step_run_id: str, run_id: str | None) -> None:
        from cairn.store import queries as q

        if run_id is None:
            row = q.get_run(self.ctx.store, step_run_id)
            run_id = row["parent_id"] if row else None
        if run_id:
            changed(self.layout, run_id)

    def add_properties(self, step_run_id: str, props: dict[str, Any]) -> None:
        from cairn.store import queries as q

        q.add_properties(self.ctx.store, step_run_id, props)

    def process_of(self, step_run_id: str) -> tuple[str, int, str | None] | None:
        """Where the step's process runs (node id, pid, start time), for a cancel to reach it."""
        with self._lock:
            return self._processes.get(step_run_id)

    def forget(self, step_run_id: str) -> tuple[str, int, str | None] | None:
        with self._lock:
            return self._processes.pop(step_run_id, None)

    def kill_step(self, step_run_id: str) -> bool:
        """Kill the process group of a step on another machine (its task is being canceled, or was
        lost while its node lives on): a task on that node does it, if the process is still the
        step's. Returns whether there was one to kill."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        where = self.forget(step_run_id)
        if where is None:
            return False
        node, pid, started = where
        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        ref = ray.remote(kill_process_group).options(num_cpus=0, scheduling_strategy=strategy,
                                                     max_retries=0).remote(pid, started)
        try:
            ray.get(ref, timeout=30)
        except Exception:  # the node is gone too: so is the process
            return False
        return True

    def upload_logs(self, job: StepJob, result: dict[str, Any]) -> None:
        """The step's whole logs (every attempt's, as the workspace holds them) to an object-store
        default datastore."""
        from cairn.runner.execute import upload_logs
        from cairn.runner.job import StepResult

        upload_logs(job, StepResult(**result))

    def file_sizes(self, folder: str) -> dict[str, int]:
        full = self._inside(folder)
        return {p.name: p.stat().st_size for p in full.glob("*")} if full.is_dir() else {}

    # -- files ------------------------------------------------------------------------------------

    def _inside(self, path: str) -> Path:
        """``path``, if it lies in the workspace's data: its local datastores, or the local cache of an
        object-store default datastore (run logs and staging). Never its store, keys or objects."""
        from cairn.engine.context import local_datastore_roots

        if self._roots is None:
            self._roots = [(self.layout.dot / "cache").resolve(),
                           *(Path(r).resolve() for r in local_datastore_roots(self.ctx.store, self.layout).values())]
        full = Path(os.path.abspath(path))
        resolved = full.resolve()
        if not any(resolved == r or r in resolved.parents for r in self._roots):
            self._roots = None  # a datastore registered since: asked again next time
            raise PermissionError(f"{path} is not inside a local datastore of workspace {self.layout.root}")
        return full

    def read_objects(self, digests: list[str]) -> dict[str, bytes]:
        """Snapshot objects by digest."""
        return {d: self.ctx.objects.read_bytes(d) for d in digests}

    def tree(self, path: str) -> list[tuple[str, int]]:
        """(relative path, size) of every file under ``path`` ('' for ``path`` itself when a file)."""
        from cairn.storage.tree import _files

        full = self._inside(path)
        if not full.exists():
            raise FileNotFoundError(f"{path} does not exist on the workspace's machine any more")
        return [(rel, os.path.getsize(f)) for rel, f in _files(full) if os.path.isfile(f)]

    def read_file(self, path: str, offset: int, length: int) -> bytes:
        with open(self._inside(path), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def dataset_files(self, definition: dict[str, Any]) -> list[tuple[str, str, int]]:
        """(relative, absolute path, size) of a file dataset's files on the local datastores."""
        from cairn.data.datasets import resolve_files

        files = resolve_files(definition, self.ctx.datastore_location)
        return [(f.relative, str(self._inside(f.path)), int(f.size)) for f in files]

    def write_file(self, path: str, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (0 starts the file anew): step logs as they grow, staged outputs."""
        full = self._inside(path)
        full.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(full, flags, 0o644)
        try:
            os.pwrite(fd, data, offset) if data else None
            if offset:
                os.ftruncate(fd, offset + len(data))
        finally:
            os.close(fd)

    def make_folders(self, paths: list[str]) -> None:
        for path in paths:
            self._inside(path).mkdir(parents=True, exist_ok=True)

    def commit_output(self, job: StepJob, name: str) -> dict[str, Any]:
        """Commit an output the step's node has written into the workspace's staging folder: digest it
        here (its stat signature is this machine's) and rename it into place, as local compute does."""
        from cairn.runner.execute import commit_output

        output = next(o for o in job.spec.outputs if o.name == name)
        staging = self._inside(job.staging_dirs[name])
        staging.mkdir(parents=True, exist_ok=True)
        return commit_output(job, output, staging)

    def remove_staging(self, job: StepJob) -> None:
        from cairn.runner.execute import remove_staging

        for name in job.staging_dirs.values():
            self._inside(name)
        remove_staging(job, job.spec)

    # -- the step's own Run.get_context() --------------------------------------------------------

    def backend(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A client backend call of a step's script on another machine (``backend/relay.py``)."""
        if method.startswith("_"):
            raise AttributeError(method)
        with self._lock:
            if self._backend is None:
                from cairn.backend.local import LocalBackend

                self._backend = LocalBackend(self.layout)
        value = getattr(self._backend, method)
        return value(*args, **kwargs) if callable(value) else value

    def put_artifact(self, run_id: str, name: str, data: bytes) -> str:
        import tempfile

        with tempfile.NamedTemporaryFile(dir=self.layout.dot, prefix=".artifact-") as tmp:
            tmp.write(data)
            tmp.flush()
            return str(self.backend("put_artifact", (run_id, name, tmp.name), {}))


def kill_process_group(pid: int, started: str | None) -> bool:
    """On the step's node: kill its process group if ``pid`` is still the step's process."""
    import signal

    from cairn.runner.execute import process_start_time

    if started is None or process_start_time(pid) != started:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def start_relay(workspace: str) -> Any:
    """Start the relay for ``workspace`` on the connected cluster: pinned to the driver's node (the
    agent's machine, where the workspace is), no CPU of its own, many calls at a time (steps report
    concurrently); owned by this driver, so it ends with the agent. Returns at once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(WorkspaceRelay).options(
        num_cpus=0, max_concurrency=64, max_restarts=-1, max_task_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote(workspace)
