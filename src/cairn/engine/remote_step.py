"""A step on a Ray node of another machine: the shared runner, with the workspace reached through
its relay (``engine/ray_relay.py``) instead of its folders and store.

On the node: the snapshot's objects are fetched into this machine's object cache, inputs that live
on the workspace's local datastores into its input cache (once per content), and the step runs in
a scratch folder (``$CAIRN_NODE_CACHE``, default ``~/.cache/cairn/node``). Its logs stream to the
workspace while it runs (every ``LOG_INTERVAL`` seconds and at its end), outputs for local datastores
are sent there and committed by the relay (digested and renamed into place on the workspace's
machine), outputs for object stores are uploaded from here, and its script's ``Run.get_context()``
reaches the workspace through a Unix socket this task serves (``$CAIRN_RELAY``). The step's
process dies with this task's worker (a cancel kills the worker; nobody else on this machine
would stop it).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cairn.runner.job import InputLocation, StepJob
from cairn.runner.markers import FAIL_MARKER

LOG_INTERVAL = 0.5  # seconds between two shipments of a running step's new log lines
CHUNK = 32 << 20  # bytes per relay call
INLINE = 1 << 20  # small files (this many bytes in all) travel with the call that lists or commits them
CALL_TIMEOUT = 300.0  # one relay call (a chunk at most): a relay that answers nothing fails the step


def node_root() -> Path:
    return Path(os.environ.get("CAIRN_NODE_CACHE") or Path.home() / ".cache" / "cairn" / "node")


class _Relay:
    """Calls to the workspace's relay for one attempt, answering with the workspace's own errors."""

    def __init__(self, actor: Any, job: StepJob) -> None:
        self.actor, self.step_run_id, self.attempt = actor, job.step_run_id, job.attempt

    def __call__(self, method: str, *args: Any) -> Any:
        import ray
        from ray.exceptions import RayTaskError

        try:
            return ray.get(getattr(self.actor, method).remote(self.step_run_id, self.attempt, *args),
                           timeout=CALL_TIMEOUT)
        except RayTaskError as exc:  # the relay's own error (not found, refused): as it was raised
            cause = getattr(exc, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None
            raise


def run_remote(job: StepJob, actor: Any, node: str, where: dict[str, str],
               node_dying: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """Run ``job`` on this node through the relay ``actor`` (``where``: properties saying where;
    ``node_dying()``: whether this node's raylet has died, when the step's end is not its own);
    returns what the driver records."""
    from cairn.runner.execute import StepControl, execute_step

    call = _Relay(actor, job)
    log_sizes = call("begin", where)
    steps = node_root() / "steps"
    steps.mkdir(parents=True, exist_ok=True)
    _sweep(steps)
    scratch = steps / f"{job.step_run_id}-a{job.attempt}"
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "logs").mkdir(parents=True)
    claim = os.open(scratch / ".running", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(claim, fcntl.LOCK_EX)  # while held, no other task sweeps this folder away
    holds: list[int] = []
    sock_dir = tempfile.mkdtemp(prefix="cairn-relay-")  # short: Unix socket paths are limited to 108 bytes
    shipper = _LogShipper(call, scratch / "logs", log_sizes)
    stop_serving = None
    ended = False
    try:
        try:
            local = _localize(job, call, scratch, holds)
        except Exception as exc:  # nothing ran: say why, in the step's own log too
            reason = f"could not bring the step's files to Ray node {_host()!r}: {type(exc).__name__}: {exc}"
            (scratch / "logs" / "system.txt").write_text(reason + "\n")
            shipper.flush_quietly()
            call("report", "ended", (_status("Failed"), reason, None), {})
            return {"step_run_id": job.step_run_id, "status": "Failed", "reason": reason, "exit_code": None}
        stop_serving = _serve_run_context(call, local, f"{sock_dir}/relay.sock")
        local = _with_variable(local, "CAIRN_RELAY", f"{sock_dir}/relay.sock")
        shipper.start()
        result = execute_step(local, _RelayReporter(call, node, shipper, node_dying),
                              StepControl(ended_elsewhere=lambda: bool(call("stopped"))),
                              commit_local=_LocalCommitter(call))
        shipper.stop()
        ended = result.status != "Queued"
        if ended and job.log_upload:
            try:
                call("upload_logs", dataclasses.asdict(result))
            except Exception:  # the logs stay in the workspace's local cache; its own upload says why
                pass
        return {"step_run_id": result.step_run_id, "status": result.status, "reason": result.reason,
                "exit_code": result.exit_code}
    finally:
        shipper.stop()
        if stop_serving is not None:
            stop_serving()
        if not ended:  # an ending report removes what output commits left on the workspace's machine
            try:
                call("remove_staging")
            except Exception:
                pass
        shutil.rmtree(sock_dir, ignore_errors=True)
        for fd in holds:
            os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)  # the workspace has the logs
        os.close(claim)


def _sweep(steps: Path) -> None:
    """Remove what tasks killed mid-step left (a canceled task's worker never cleans up)."""
    import time

    for folder in steps.iterdir():
        try:
            if time.time() - folder.stat().st_mtime < 60:  # just made: its task may not hold it yet
                continue
            fd = os.open(folder / ".running", os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a running step's
        finally:
            os.close(fd)
        shutil.rmtree(folder, ignore_errors=True)


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


def _localize(job: StepJob, call: _Relay, scratch: Path, holds: list[int]) -> StepJob:
    """The job as this node runs it: its snapshot's objects and its inputs fetched here, its
    folders in ``scratch``, its process tied to this task."""
    from cairn.storage.objects import ObjectStore

    objects = ObjectStore(node_root() / "objects")
    _fetch_objects(job.manifest, objects, call, scratch)
    inputs = tuple(_localize_input(job, i, call, holds, scratch) for i in job.inputs)
    datasets, locations = dict(job.datasets), dict(job.datastore_locations)
    for before, after in zip(job.inputs, inputs, strict=True):
        if after is not before and after.name in datasets:
            # a Dataset the script reads itself (direct mode) reads the copy on this node: a local
            # datastore of the node's own, named for the input
            store = f"{NODE_STORE_PREFIX}{after.name}"
            root = after.path if Path(after.path).is_dir() else str(Path(after.path).parent)
            locations[store] = {"kind": "local", "config": {"path": root}, "secrets": {}}
            pattern = "" if Path(after.path).is_dir() else Path(after.path).name
            definition = {**datasets[after.name]["definition"], "paths": [{"datastore": store, "path": pattern}]}
            datasets[after.name] = {**datasets[after.name], "definition": definition}
    return dataclasses.replace(
        job, objects_root=str(objects.root), work_dir=str(scratch / "work"), log_dir=str(scratch / "logs"),
        staging_dirs={name: str(scratch / "staging" / f"a{job.attempt}" / name) for name in job.staging_dirs},
        inputs=inputs, datasets=datasets, datastore_locations=locations, env_cache=str(node_root() / "envs"),
        die_with_runner=True)


NODE_STORE_PREFIX = "node-copy-of-input-"


def _fetch_objects(manifest: dict[str, Any], objects: Any, call: _Relay, scratch: Path) -> None:
    from cairn.core.digests import digest_file

    wanted = {digest: int(size) for _rel, digest, size, _x in manifest.get("files", []) if not objects.has(digest)}
    for digest, size in wanted.items():
        part = scratch / ".object"
        _copy_in(lambda offset, d=digest: call("read_object", d, offset, CHUNK), size, part)
        if digest_file(part) != digest:
            raise OSError(f"snapshot object {digest} arrived damaged")
        objects.put_file(part, digest)
        part.unlink()


def _copy_in(read: Any, size: int, target: Path) -> None:
    """Write ``size`` bytes, read chunk by chunk with ``read(offset)``, to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        offset = 0
        while offset < size:
            data = read(offset)
            if not data:
                raise OSError(f"{target.name} became shorter while it was fetched")
            f.write(data)
            offset += len(data)


def _localize_input(job: StepJob, i: InputLocation, call: _Relay, holds: list[int], scratch: Path) -> InputLocation:
    """An input of the workspace's machine, fetched into this node's input cache (by content) as it
    is there (files with their executable bit, links as links, empty folders); inputs from object
    stores are left to the runner (it fetches them itself). A dataset in download mode gets a private
    copy (the cache is shared by the node's steps)."""
    from cairn.core.digests import digest_json
    from cairn.runner.input_cache import cached_input

    if i.path:  # a folder or file on the workspace's machine
        listing = call("input_files", i.name, INLINE)
    elif i.name in job.datasets and _local_datastores(job, i.name):
        listing = call("dataset_files", i.name, INLINE)
    else:
        return i
    files, links, folders = listing["files"], listing["links"], listing["folders"]
    single = len(files) == 1 and files[0][0] == "" and not links
    if single:
        files = [(Path(i.path).name, *files[0][1:])]
    sizes = {rel: size for rel, size, _data, _x in files}
    sizes.update({rel: len(os.fsencode(target)) for rel, target in links})  # as the cache checks links
    key = digest_json({"content": i.digest, "layout": sorted(sizes), "from": "workspace"})

    def fill(folder: Path) -> None:
        for rel in folders:
            (folder / rel).mkdir(parents=True, exist_ok=True)
        for rel, size, data, executable in files:
            target = folder / rel
            source = "" if single else rel
            if data is not None:  # small: it came with the listing
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            else:
                _copy_in(lambda offset, r=source: call("read_input", i.name, r, offset, CHUNK), size, target)
            if executable:
                target.chmod(0o755)
        for rel, link_target in links:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).symlink_to(link_target)

    try:
        folder = cached_input(key, sizes, fill, holds)
    except PermissionError:  # an unusable cache must not fail the step: a copy for this step only
        folder = None
    if folder is None:  # or the cached copy is in use and changed
        folder = scratch / "inputs" / i.name
        fill(folder)
    elif i.name in job.datasets and job.datasets[i.name]["mode"] == "download":
        private = scratch / "inputs" / i.name
        shutil.copytree(folder, private, symlinks=True)
        for dirpath, dirnames, filenames in os.walk(private):  # the cache's copy is read-only; this one is not
            for entry in [*dirnames, *filenames]:
                full = os.path.join(dirpath, entry)
                if not os.path.islink(full):
                    os.chmod(full, os.stat(full).st_mode | 0o200)
        folder = private
    path = folder / files[0][0] if single else folder
    return dataclasses.replace(i, path=str(path), stat_signature=None)  # a copy: the runner need not check it


def _local_datastores(job: StepJob, name: str) -> bool:
    """Whether the dataset reads files of the workspace's local datastores (all of them, or an error)."""
    stores = {p.get("datastore") for p in job.datasets[name]["definition"].get("paths", [])}
    local = {s for s in stores if s in job.datastore_roots}
    if local and local != stores:
        raise OSError(f"dataset input {name!r} mixes local datastores ({', '.join(sorted(local))}) with object "
                      f"stores or URLs; on a Ray node of another machine, register it from one kind of place")
    return bool(local)


# -- reporting, logs and outputs through the relay ---------------------------------------------------


class _RelayReporter:
    """The runner's StepReporter: every report goes to the workspace's relay; an ending first sends
    what the logs still hold (best effort: a late log line never changes how the step ended)."""

    def __init__(self, call: _Relay, node: str, shipper: _LogShipper, node_dying: Callable[[], bool]) -> None:
        self._call, self._node, self._shipper, self._node_dying = call, node, shipper, node_dying

    def started(self, step_run_id: str, status: Any, **fields: Any) -> bool:
        if "pid" in fields:
            fields["node"] = self._node
        return bool(self._call("report", "started", (status,), fields))

    def succeeded(self, job: StepJob, outputs: list[dict[str, Any]], exit_code: int) -> bool:
        self._shipper.flush_quietly()
        return bool(self._call("report", "succeeded", (outputs, exit_code), {}))

    def ended(self, step_run_id: str, status: Any, reason: str, exit_code: int | None) -> None:
        self._shipper.flush_quietly()
        if not self._node_dying():  # its process died with the node: the driver retries the step
            self._call("report", "ended", (status, reason, exit_code), {})

    def register_output(self, job: StepJob, output: dict[str, Any], registration: dict[str, Any]) -> str:
        return str(self._call("report", "register_output", (output, registration), {}))


class _LocalCommitter:
    """Sends an output for a local datastore of the workspace to its staging folder there (files with
    their executable bit, symbolic links as links, empty folders), and has the relay commit it
    (digested on the workspace's machine, renamed into place)."""

    def __init__(self, call: _Relay) -> None:
        self._call = call

    def __call__(self, local_job: StepJob, o: Any, staging: Path) -> dict[str, Any]:
        from cairn.storage.tree import tree_entries

        tree = tree_entries(staging)
        if tree.folders or tree.links:
            self._call("make_entries", o.name, tree.folders, tree.links)
        small, room = [], INLINE
        for rel, full in tree.files:
            executable = os.access(full, os.X_OK)
            size = os.path.getsize(full)
            if size <= room:  # sent with the commit: one call for a small output
                with open(full, "rb") as f:
                    small.append((rel, f.read(), executable))
                room -= size
                continue
            with open(full, "rb") as f:
                offset = 0
                while True:
                    data = f.read(CHUNK)
                    if data or not offset:  # an empty file is written too
                        self._call("write_file", o.name, rel, offset, data, executable)
                    if not data:
                        break
                    offset += len(data)
        return dict(self._call("commit_output", o.name, small))


class _LogShipper:
    """Streams the step's log files (``*.txt`` in its log folder) to the workspace's log folder of
    the step, appending after what earlier attempts left there."""

    def __init__(self, call: _Relay, local: Path, base: dict[str, int]) -> None:
        self._call, self._local = call, local
        self._sent: dict[str, int] = {}
        self._base = base  # what the workspace's log files held before this attempt
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cairn-log-shipper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(LOG_INTERVAL):  # a batch every interval, not a status poll
            self.flush_quietly()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.flush_quietly()

    def flush_quietly(self) -> None:
        """Ship what is new; a relay that does not answer now is caught up with next time."""
        try:
            self.flush()
        except Exception:
            pass

    def flush(self) -> None:
        """One call per batch: every file's new bytes (up to CHUNK in all; more in further calls)."""
        with self._lock:
            while True:
                parts, size = [], 0
                for path in sorted(self._local.glob("*.txt")):
                    if path.name == FAIL_MARKER or size >= CHUNK:  # the marker talks to the runner: no log
                        continue
                    sent = self._sent.get(path.name, 0)
                    with open(path, "rb") as f:
                        f.seek(sent)
                        data = f.read(CHUNK - size)
                    if data:
                        parts.append((path.name, self._base.get(path.name, 0) + sent, data))
                        size += len(data)
                if not parts:
                    return
                self._call("write_logs", parts)
                for name, offset, data in parts:
                    self._sent[name] = offset - self._base.get(name, 0) + len(data)


def _serve_run_context(call: _Relay, job: StepJob, path: str) -> Any:
    """``Run.get_context()`` of the step's script, through the relay; the datastores its job
    carries (object stores, and the node's copies of inputs) are answered here, so that a Dataset
    the script reads itself reads from where this node can."""
    from cairn.core.socket_rpc import serve
    from cairn.storage.datastores import DatastoreLocation

    def handle(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method == "__location__":
            return job.workspace
        loc = job.datastore_locations.get(args[0]) if method == "datastore_location" and args else None
        if loc is not None and (loc["kind"] != "local" or args[0].startswith(NODE_STORE_PREFIX)):
            return DatastoreLocation(args[0], loc["kind"], loc["config"], loc["secrets"])
        if method == "datastore_location" and args and args[0] in job.datastore_roots:
            raise PermissionError(
                f"datastore {args[0]!r} is a folder on the workspace's machine, which this Ray node (another "
                f"machine) cannot read directly: pass the data to the step as an input (e.g. "
                f"dataset.as_named_input('name')), or keep it on an object-store datastore")
        if method == "__put_artifact__":
            return call("put_artifact", *args)
        if method == "__read_artifact__":
            return call("read_artifact", *args)
        return call("backend", method, args, kwargs)

    return serve(path, handle)
