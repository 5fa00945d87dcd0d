"""A step on a Ray node of another machine: the shared runner, with the workspace reached through
its relay (``engine/ray_relay.py``) instead of its folders and store.

On the node: the snapshot's objects are fetched into this machine's object cache, inputs that live
on the workspace's local datastores into its input cache (once per content), and the step runs in
a scratch folder (``$CAIRN_NODE_CACHE``, default ``~/.cache/cairn/node``). Its logs stream to the
workspace while it runs (every ``LOG_INTERVAL`` seconds and at its end), outputs for local datastores
are sent there and committed by the relay (digested and renamed into place on the workspace's
machine), outputs for object stores are uploaded from here, and its script's ``Run.get_context()``
reaches the workspace through a Unix socket this task serves (``$CAIRN_RELAY``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from cairn.runner.job import InputLocation, StepJob

LOG_INTERVAL = 0.5  # seconds between two shipments of a running step's new log lines
CHUNK = 32 << 20


def node_root() -> Path:
    return Path(os.environ.get("CAIRN_NODE_CACHE") or Path.home() / ".cache" / "cairn" / "node")


def run_remote(job: StepJob, relay: Any, node: str) -> dict[str, Any]:
    """Run ``job`` on this node through ``relay``; returns what the driver records."""
    import ray

    from cairn.runner.execute import StepControl, execute_step

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        return ray.get(getattr(relay, method).remote(*args, **kwargs))

    scratch = node_root() / "steps" / f"{job.step_run_id}-a{job.attempt}"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "logs").mkdir(parents=True)
    holds: list[int] = []
    sock_dir = tempfile.mkdtemp(prefix="cairn-relay-")  # short: Unix socket paths are limited to 108 bytes
    shipper = _LogShipper(call, scratch / "logs", job.log_dir)
    stop_serving = None
    try:
        try:
            local = _localize(job, call, scratch, holds)
        except Exception as exc:  # nothing ran: say why, in the step's own log too
            reason = f"could not bring the step's files to Ray node {_host()!r}: {type(exc).__name__}: {exc}"
            (scratch / "logs" / "system.txt").write_text(reason + "\n")
            shipper.flush()
            call("report", "ended", (job.step_run_id, _status("Failed"), reason, None), {})
            return {"step_run_id": job.step_run_id, "status": "Failed", "reason": reason, "exit_code": None}
        stop_serving = _serve_run_context(job, relay, call, f"{sock_dir}/relay.sock")
        local = _with_variable(local, "CAIRN_RELAY", f"{sock_dir}/relay.sock")
        reporter = _RelayReporter(call, job, node, shipper)
        shipper.start()
        result = execute_step(local, reporter, StepControl(), commit_local=_LocalCommitter(call, job))
        shipper.stop()
        if result.status != "Queued":
            call("upload_logs", job, dataclasses.asdict(result))
        return {"step_run_id": result.step_run_id, "status": result.status, "reason": result.reason,
                "exit_code": result.exit_code}
    finally:
        shipper.stop()
        if stop_serving is not None:
            stop_serving()
        shutil.rmtree(sock_dir, ignore_errors=True)
        for fd in holds:
            os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)  # the workspace has the logs; a failed step's folder too


def _host() -> str:
    import socket

    return socket.gethostname()


def _status(value: str) -> Any:
    from cairn.core.status import Status

    return Status(value)


def _with_variable(job: StepJob, name: str, value: str) -> StepJob:
    variables = [*[list(p) for p in job.step.get("environment_variables", [])], [name, value]]
    return dataclasses.replace(job, step={**job.step, "environment_variables": variables})


# -- bringing the step's files here ------------------------------------------------------------------


def _localize(job: StepJob, call: Any, scratch: Path, holds: list[int]) -> StepJob:
    """The job as this node runs it: its snapshot's objects and its inputs fetched here, its
    folders in ``scratch``."""
    from cairn.storage.objects import ObjectStore

    objects = ObjectStore(node_root() / "objects")
    _fetch_objects(job.manifest, objects, call)
    inputs = tuple(_localize_input(job, i, call, holds) for i in job.inputs)
    return dataclasses.replace(
        job, objects_root=str(objects.root), work_dir=str(scratch / "work"), log_dir=str(scratch / "logs"),
        staging_dirs={name: str(scratch / "staging" / f"a{job.attempt}" / name) for name in job.staging_dirs},
        inputs=inputs, env_cache=str(node_root() / "envs"))


def _fetch_objects(manifest: dict[str, Any], objects: Any, call: Any) -> None:
    missing: dict[str, int] = {}
    for _rel, digest, size, _executable in manifest.get("files", []):
        if digest not in missing and not objects.has(digest):
            missing[digest] = int(size)
    batch: list[str] = []
    total = 0
    for digest, size in [*missing.items(), ("", 0)]:
        if batch and (not digest or total + size > CHUNK):
            for wanted, data in call("read_objects", batch).items():
                if objects.put_bytes(data) != wanted:
                    raise OSError(f"snapshot object {wanted} arrived damaged")
            batch, total = [], 0
        if digest:
            batch.append(digest)
            total += size


def _localize_input(job: StepJob, i: InputLocation, call: Any, holds: list[int]) -> InputLocation:
    """An input of the workspace's machine, fetched into this node's input cache (by content);
    inputs from object stores are left to the runner (it fetches them itself)."""
    from cairn.core.digests import digest_json
    from cairn.runner.input_cache import cached_input

    if i.path:  # a folder or file on the workspace's machine
        files = [(rel, size, i.path if not rel else f"{i.path}/{rel}") for rel, size in call("tree", i.path)]
        single = len(files) == 1 and files[0][0] == ""
        name = Path(i.path).name
        if single:
            files = [(name, files[0][1], i.path)]
    elif i.name in job.datasets and _local_datastores(job, i.name):
        files = [(rel, size, path) for rel, path, size in call("dataset_files", job.datasets[i.name]["definition"])]
        single = False
    else:
        return i
    key = digest_json({"content": i.digest, "layout": sorted(rel for rel, _s, _p in files), "from": "workspace"})

    def fill(folder: Path) -> None:
        for rel, size, source in files:
            target = folder / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as f:
                offset = 0
                while offset < size:
                    data = call("read_file", source, offset, CHUNK)
                    if not data:
                        raise OSError(f"{source} became shorter while it was fetched")
                    f.write(data)
                    offset += len(data)

    folder = cached_input(key, {rel: size for rel, size, _p in files}, fill, holds)
    if folder is None:  # the cached copy is in use and changed: a private copy for this step
        folder = Path(tempfile.mkdtemp(prefix="input-", dir=node_root()))
        fill(folder)
    path = folder / files[0][0] if single else folder
    return dataclasses.replace(i, path=str(path))


def _local_datastores(job: StepJob, name: str) -> bool:
    """Whether the dataset reads files of the workspace's local datastores (all of them, or an error)."""
    stores = {p["datastore"] for p in job.datasets[name]["definition"].get("paths", []) if "datastore" in p}
    local = {s for s in stores if s in job.datastore_roots}
    if local and local != stores:
        raise OSError(f"dataset input {name!r} mixes local datastores ({', '.join(sorted(local))}) with object "
                      f"stores; on a Ray node of another machine, register it from one kind of datastore")
    return bool(local)


# -- reporting, logs and outputs through the relay ---------------------------------------------------


class _RelayReporter:
    """The runner's StepReporter: every report goes to the workspace's relay; an ending waits until
    the step's logs are all there (a finished run has its logs in place)."""

    def __init__(self, call: Any, job: StepJob, node: str, shipper: _LogShipper) -> None:
        self._call, self._job, self._node, self._shipper = call, job, node, shipper

    def started(self, step_run_id: str, status: Any, **fields: Any) -> bool:
        if "pid" in fields:
            fields["node"] = self._node
        return bool(self._call("report", "started", (step_run_id, status), fields))

    def succeeded(self, job: StepJob, outputs: list[dict[str, Any]], exit_code: int) -> bool:
        self._shipper.flush()
        return bool(self._call("report", "succeeded", (self._job, outputs, exit_code), {}))

    def ended(self, step_run_id: str, status: Any, reason: str, exit_code: int | None) -> None:
        self._shipper.flush()
        self._call("report", "ended", (step_run_id, status, reason, exit_code), {})

    def register_output(self, job: StepJob, output: dict[str, Any], registration: dict[str, Any]) -> str:
        return str(self._call("report", "register_output", (self._job, output, registration), {}))


class _LocalCommitter:
    """Sends an output for a local datastore of the workspace to its staging folder there, and has
    the relay commit it (digested on the workspace's machine, renamed into place)."""

    def __init__(self, call: Any, job: StepJob) -> None:
        self._call, self._job = call, job

    def __call__(self, local_job: StepJob, o: Any, staging: Path) -> dict[str, Any]:
        from cairn.storage.tree import _files

        target = self._job.staging_dirs[o.name]
        folders = []
        if staging.is_dir():
            folders = [str(Path(target) / os.path.relpath(d, staging)) for d, _sub, names in os.walk(staging)
                       if not names and not _sub]
        self._call("make_folders", [target, *folders])
        for rel, full in _files(staging):
            dest = f"{target}/{rel}" if rel else target
            with open(full, "rb") as f:
                offset = 0
                while True:
                    data = f.read(CHUNK)
                    if data or not offset:  # an empty file is written too
                        self._call("write_file", dest, offset, data)
                    if not data:
                        break
                    offset += len(data)
        return dict(self._call("commit_output", self._job, o.name))


class _LogShipper:
    """Streams the step's log files (everything in its log folder ending in ``.txt``) to the
    workspace's log folder, appending after what earlier attempts left there."""

    def __init__(self, call: Any, local: Path, remote: str) -> None:
        self._call, self._local, self._remote = call, local, remote
        self._sent: dict[str, int] = {}
        self._base: dict[str, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cairn-log-shipper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(LOG_INTERVAL):  # a batch every interval, not a status poll
            try:
                self.flush()
            except Exception:  # the workspace is out of reach for a moment: the next batch catches up
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._base is None:
                self._base = self._call("file_sizes", self._remote)
            for path in sorted(self._local.glob("*.txt")):
                sent = self._sent.get(path.name, 0)
                with open(path, "rb") as f:
                    f.seek(sent)
                    data = f.read(CHUNK)
                while data:
                    self._call("write_file", f"{self._remote}/{path.name}", self._base.get(path.name, 0) + sent, data)
                    sent += len(data)
                    with open(path, "rb") as f:
                        f.seek(sent)
                        data = f.read(CHUNK)
                self._sent[path.name] = sent


def _serve_run_context(job: StepJob, relay: Any, call: Any, path: str) -> Any:
    from cairn.backend.relay import serve

    def handle(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method == "__location__":
            return job.workspace
        if method == "__put_artifact__":
            return call("put_artifact", *args)
        return call("backend", method, args, kwargs)

    return serve(path, handle)
