"""The workspace's relay on a Ray cluster: an actor the agent starts on its own node (the machine
that holds the embedded workspace), through which steps on nodes of *other* machines reach the
workspace — their status, logs, outputs on local datastores, snapshot files, inputs on local
datastores, and their scripts' ``Run.get_context()`` calls.

Everything goes through Ray's own connections between the nodes: Cairn opens no port. The driver
hands the relay each step attempt's job before its task starts (``expect``); a node names the
attempt, never a path of the workspace's machine: the relay serves only that job's snapshot objects
and inputs, and writes only that job's log folder and output staging folders. Script calls are a
fixed set of reading and recording methods (no datastore, compute or pipeline changes, no paths),
answered by the script service the agent's entry point hands down (``backend/relay.py``: the
engine does not reach up to the backend itself).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cairn.runner.job import StepJob

_REPORTS = {"started", "succeeded", "ended", "register_output"}
EXPECT_TIMEOUT = 30.0  # how long a call may wait for the driver's copy of its job
Attempt = tuple[str, int]  # step run id, attempt


def _on_node(where: tuple[int, str, int, str | None], act: Callable[[int, str | None], bool]) -> bool:
    """``act(pid, start time)`` of a step's process, run by a task on the node it runs on
    (``where``: attempt, node, pid, start time); False when that node is gone (so is the process)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    _attempt, node, pid, started = where
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    ref = ray.remote(act).options(num_cpus=0, scheduling_strategy=strategy, max_retries=0).remote(pid, started)
    try:
        return bool(ray.get(ref, timeout=30))
    except Exception:
        return False


class WorkspaceRelay:
    """Runs in a Ray worker process on the agent's node (``start_relay`` pins it there)."""

    def __init__(self, workspace: str, script_service: Callable[[str], Any] | None = None) -> None:
        """``script_service(workspace)`` answers the scripts' ``Run.get_context()`` calls (it has
        ``call``, ``put_artifact`` and ``read_artifact``); without one they are refused."""
        from cairn.engine.context import EngineContext
        from cairn.storage.layout import WorkspaceLayout

        self.layout = WorkspaceLayout(workspace)
        if not self.layout.db.is_file():
            raise RuntimeError(f"the workspace relay was placed on {socket.gethostname()!r}, which cannot see "
                               f"the workspace {workspace!r}: the agent must run on a node of the Ray cluster")
        self.ctx = EngineContext.open(self.layout)
        self._cond = threading.Condition()
        self._jobs: dict[Attempt, StepJob] = {}
        self._processes: dict[str, tuple[int, str, int, str | None]] = {}  # step run -> attempt, node, pid, start
        self._asked: dict[str, tuple[int, str, int, str | None]] = {}  # the same, of steps asked to end
        self._datasets: dict[tuple[str, int, str], list[Any]] = {}  # a dataset input's files, listed once
        self._script = script_service(workspace) if script_service is not None else None

    # -- the driver's side ------------------------------------------------------------------------

    def expect(self, job: StepJob) -> None:
        """The job of an attempt about to be submitted: the only one its node may act for."""
        with self._cond:
            self._jobs[(job.step_run_id, job.attempt)] = job
            self._cond.notify_all()

    def done(self, step_run_id: str, attempt: int) -> None:
        with self._cond:
            self._jobs.pop((step_run_id, attempt), None)
            for key in [k for k in self._datasets if k[:2] == (step_run_id, attempt)]:
                del self._datasets[key]

    def _job(self, step_run_id: str, attempt: int) -> StepJob:
        with self._cond:
            if not self._cond.wait_for(lambda: (step_run_id, attempt) in self._jobs, timeout=EXPECT_TIMEOUT):
                raise PermissionError(f"step run {step_run_id} attempt {attempt} is not running on this workspace's "
                                      f"Ray target (ended, or never submitted by its agent)")
            return self._jobs[(step_run_id, attempt)]

    def kill_step(self, step_run_id: str) -> bool:
        """Kill the process group of a step on another machine (its task is being canceled, or was
        lost while its node lives on): a task on that node does it, if the process is still the
        step's. Returns whether there was one to kill."""
        from cairn.runner.processes import kill_step_processes

        with self._cond:
            where = self._processes.pop(step_run_id, None) or self._asked.pop(step_run_id, None)
        return where is not None and _on_node(where, kill_step_processes)

    def ask_step_to_end(self, step_run_id: str) -> bool:
        """SIGTERM a canceled step's process group (it may save a checkpoint), wherever it runs: on
        another machine through a task on its node, on this one directly (its task recorded the pid
        in the store). Returns whether there was one to ask; what is left is killed after the grace."""
        from cairn.runner.processes import ask_step_to_end
        from cairn.store import queries as q

        with self._cond:
            where = self._processes.get(step_run_id)
            if where is not None:  # kept for kill_step's sweep of what it leaves, once its end was reported
                self._asked[step_run_id] = where
        if where is None:
            row = q.get_run(self.ctx.store, step_run_id) or {}
            return ask_step_to_end(row.get("pid"), row.get("pid_started"))
        return _on_node(where, ask_step_to_end)

    # -- reports (the runner's StepReporter, on the workspace's side) ------------------------------

    def report(self, step_run_id: str, attempt: int, method: str, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
        """A StepReporter call of a step on another machine, for its own attempt. An attempt its agent
        handed back to the queue (stopped) records no ending; the process is remembered by its node,
        not recorded as a pid of this machine (the agent kills leftover pids of its own machine)."""
        from cairn.engine.client import changed
        from cairn.engine.ray_task import TaskReporter

        if method not in _REPORTS:
            raise ValueError(f"not a report: {method}")
        job = self._job(step_run_id, attempt)
        if method == "started":
            node = kwargs.pop("node", None)
            pid, started = kwargs.pop("pid", None), kwargs.pop("pid_started", None)
            if node and pid:
                with self._cond:
                    self._processes[step_run_id] = (attempt, node, int(pid), started)
        reporter = TaskReporter(self.ctx.store, on_change=lambda _sid: changed(self.layout, job.pipeline_run_id),
                                locate=self.ctx.datastore_location)
        if method in ("succeeded", "register_output"):
            answer = getattr(reporter, method)(job, *args, **kwargs)
        else:
            answer = getattr(reporter, method)(step_run_id, *args, **kwargs)
        if method in ("succeeded", "ended"):
            with self._cond:
                if self._processes.get(step_run_id, (None,))[0] == attempt:
                    self._processes.pop(step_run_id, None)
            self.remove_staging(step_run_id, attempt)  # what output commits left here
        return answer

    def begin(self, step_run_id: str, attempt: int, props: dict[str, Any]) -> dict[str, int]:
        """The attempt has started on its node (``props`` say where); returns the sizes of the step's
        log files so far (earlier attempts'), after which this attempt's lines go."""
        from cairn.store import queries as q

        job = self._job(step_run_id, attempt)
        q.add_properties(self.ctx.store, step_run_id, props)
        folder = Path(job.log_dir)
        return {p.name: p.stat().st_size for p in folder.glob("*.txt")} if folder.is_dir() else {}

    # -- files of the attempt's job ------------------------------------------------------------------

    def read_object(self, step_run_id: str, attempt: int, digest: str, offset: int, length: int) -> bytes:
        """Part of one of the job's snapshot objects."""
        job = self._job(step_run_id, attempt)
        if digest not in {f[1] for f in job.manifest.get("files", [])}:
            raise PermissionError(f"{digest} is not a file of step run {step_run_id}'s snapshot")
        with open(self.ctx.objects.path_for(digest), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _input_root(self, job: StepJob, name: str) -> Path:
        path = next((i.path for i in job.inputs if i.name == name), "")
        if not path:
            raise PermissionError(f"input {name!r} of step run {job.step_run_id} is not on the workspace's machine")
        return Path(path)

    def input_files(self, step_run_id: str, attempt: int, name: str, inline: int = 0) -> dict[str, Any]:
        """A job's input as the node rebuilds it: ``files`` (relative path, size, bytes or None,
        executable; '' for the input itself when a file), ``links`` (relative path, target) and empty
        ``folders``; the bytes of files up to ``inline`` bytes in all come along (no second call)."""
        root = self._input_root(self._job(step_run_id, attempt), name)
        if not os.path.lexists(root):
            raise FileNotFoundError(f"input {name!r} ({root}) does not exist on the workspace's machine any more")
        if not root.is_dir():
            return {"files": _with_bytes([("", str(root))], inline), "links": [], "folders": []}
        from cairn.storage.tree import tree_entries

        tree = tree_entries(root)
        return {"files": _with_bytes(tree.files, inline), "links": tree.links, "folders": tree.folders}

    def dataset_files(self, step_run_id: str, attempt: int, name: str, inline: int = 0) -> dict[str, Any]:
        """As ``input_files``, for a job's dataset input's files on the local datastores."""
        job = self._job(step_run_id, attempt)
        return {"files": _with_bytes([(f.relative, f.path) for f in self._dataset(job, name)], inline),
                "links": [], "folders": []}

    def _dataset(self, job: StepJob, name: str) -> list[Any]:
        from cairn.data.datasets import resolve_files

        if name not in job.datasets:
            raise PermissionError(f"{name!r} is not a dataset input of step run {job.step_run_id}")
        key = (job.step_run_id, job.attempt, name)
        with self._cond:
            files = self._datasets.get(key)
        if files is None:
            files = resolve_files(job.datasets[name]["definition"], self.ctx.datastore_location)
            if any(f.datastore not in job.datastore_roots for f in files):
                raise PermissionError(f"dataset input {name!r} is not all on local datastores")
            with self._cond:
                self._datasets[key] = files
        return files

    def read_input(self, step_run_id: str, attempt: int, name: str, relative: str, offset: int,
                   length: int) -> bytes:
        from cairn.storage.paths import confined

        job = self._job(step_run_id, attempt)
        if any(i.name == name and i.path for i in job.inputs):
            root = self._input_root(job, name)
            path = root if not relative else confined(root, relative, "input file")
        else:
            found = {f.relative: f.path for f in self._dataset(job, name)}
            if relative not in found:
                raise PermissionError(f"{relative!r} is not a file of dataset input {name!r}")
            path = Path(found[relative])
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _target(self, job: StepJob, where: str | None, relative: str) -> Path:
        """A path in the attempt's log folder (``where`` None) or an output's staging folder."""
        from cairn.storage.paths import confined

        if where is None:
            if not relative or "/" in relative:
                raise PermissionError(f"{relative!r} is not a log file name")
            return Path(job.log_dir) / relative
        if where not in job.staging_dirs:
            raise PermissionError(f"{where!r} is not an output of step run {job.step_run_id}")
        root = Path(job.staging_dirs[where])
        return root if not relative else confined(root, relative, "output file")

    def write_logs(self, step_run_id: str, attempt: int, parts: list[tuple[str, int, bytes]]) -> None:
        """New bytes of the step's log files: (file name, offset, bytes) each."""
        for name, offset, data in parts:
            self.write_file(step_run_id, attempt, None, name, offset, data)

    def write_file(self, step_run_id: str, attempt: int, where: str | None, relative: str, offset: int, data: bytes,
                   executable: bool = False) -> None:
        """Write ``data`` at ``offset`` (0 starts the file anew) of a log file or a staged output file."""
        path = self._target(self._job(step_run_id, attempt), where, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if offset == 0 else 0), 0o755 if executable else 0o644)
        try:
            if data:
                os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def make_entries(self, step_run_id: str, attempt: int, output: str, folders: list[str],
                     links: list[tuple[str, str]]) -> None:
        """An output's empty folders and symbolic links (kept as links, as local compute keeps them)."""
        job = self._job(step_run_id, attempt)
        self._target(job, output, "").mkdir(parents=True, exist_ok=True)
        for rel in folders:
            self._target(job, output, rel).mkdir(parents=True, exist_ok=True)
        for rel, target in links:
            path = self._target(job, output, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.unlink(missing_ok=True)
            path.symlink_to(target)

    def commit_output(self, step_run_id: str, attempt: int, name: str,
                      files: list[tuple[str, bytes, bool]] | None = None) -> dict[str, Any]:
        """Commit an output the node has written into the attempt's staging folder here (with its
        last small ``files``: relative path, bytes, executable): digest it here (its stat signature
        is this machine's) and rename it into place, as local compute does."""
        from cairn.runner.execute import commit_output

        for rel, data, executable in files or []:
            self.write_file(step_run_id, attempt, name, rel, 0, data, executable)
        job = self._job(step_run_id, attempt)
        output = next(o for o in job.spec.outputs if o.name == name)
        staging = Path(job.staging_dirs[name])
        staging.mkdir(parents=True, exist_ok=True)
        return commit_output(job, output, staging)

    def remove_staging(self, step_run_id: str, attempt: int) -> None:
        from cairn.runner.execute import remove_staging

        job = self._job(step_run_id, attempt)
        remove_staging(job, job.spec)

    def stopped(self, step_run_id: str, attempt: int) -> bool:
        """Whether the step's agent took its ending on itself (a cancel, an agent stop): its node then
        commits nothing, whatever the step's exit."""
        from cairn.engine.ray_task import stopped_by_agent

        self._job(step_run_id, attempt)  # only for an attempt its agent submitted
        return stopped_by_agent(self.ctx.store, step_run_id)

    def upload_logs(self, step_run_id: str, attempt: int, result: dict[str, Any]) -> None:
        """The step's whole logs (every attempt's, as the workspace holds them) to an object-store
        default datastore."""
        from cairn.runner.execute import upload_logs
        from cairn.runner.job import StepResult

        upload_logs(self._job(step_run_id, attempt), StepResult(**result))

    # -- the step's own Run.get_context() --------------------------------------------------------

    def backend(self, step_run_id: str, attempt: int, method: str, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
        """A client backend call of a step's script on another machine (``backend/relay.py``)."""
        return self._scripts(step_run_id, attempt).call(method, args, kwargs)

    def put_artifact(self, step_run_id: str, attempt: int, run_id: str, name: str, data: bytes) -> str:
        return str(self._scripts(step_run_id, attempt).put_artifact(run_id, name, data))

    def read_artifact(self, step_run_id: str, attempt: int, run_id: str, name: str) -> bytes | None:
        return self._scripts(step_run_id, attempt).read_artifact(run_id, name)

    def _scripts(self, step_run_id: str, attempt: int) -> Any:
        self._job(step_run_id, attempt)
        if self._script is None:
            raise PermissionError("this agent answers no Run.get_context() calls from Ray nodes of other machines "
                                  "(it was started without a script service)")
        return self._script


def _with_bytes(files: list[tuple[str, str]], inline: int) -> list[tuple[str, int, bytes | None, bool]]:
    listed: list[tuple[str, int, bytes | None, bool]] = []
    for rel, path in files:
        size = os.path.getsize(path)
        data = None
        if size <= inline:
            with open(path, "rb") as f:
                data = f.read(size + 1)
            if len(data) != size:  # changed while listed: read it by parts, as a big file
                data = None
            else:
                inline -= size
        listed.append((rel, size, data, os.access(path, os.X_OK)))
    return listed


def start_relay(workspace: str, script_service: Callable[[str], Any] | None = None) -> Any:
    """Start the relay for ``workspace`` on the connected cluster: pinned to the driver's node (the
    agent's machine, where the workspace is), no CPU of its own, many calls at a time (steps report
    concurrently); owned by this driver, so it ends with the agent. Returns at once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(WorkspaceRelay).options(
        num_cpus=0, max_concurrency=64, max_restarts=-1, max_task_retries=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)).remote(workspace, script_service)
