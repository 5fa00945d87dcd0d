"""Executing one step job. Local compute calls this in a thread; other computes call the very same
function where the step runs. Reporting goes through a ``StepReporter`` so the runner never needs
to know where the metadata lives."""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from cairn.core.errors import CairnError, UserInputError
from cairn.core.status import Status
from cairn.environments.build import EnvironmentBuildError, EnvironmentCache, ResolvedEnvironment
from cairn.environments.spec import is_managed
from cairn.runner.input_cache import cache_root, cached_input
from cairn.runner.job import PENDING_DIGEST, InputHandoffError, StepJob, StepResult, pending_digest
from cairn.runner.markers import FAIL_MARKER, attempt_marker
from cairn.runner.processes import Escaped, escaped_descendants, kill_detached, process_start_time, signal_escaped
from cairn.runner.slots import SlotTicket
from cairn.runner.spares import ForkedStep, SparePool, kept_code_path
from cairn.runner.warm import STARTUP_VARIABLES, WarmPool, WarmProcess, WarmShadowed, WarmStartError
from cairn.runner.work_folders import WorkFolders
from cairn.storage.layout import earlier_staging_dirs
from cairn.storage.objects import ObjectStore
from cairn.storage.snapshot import materialize
from cairn.storage.tree import TreeWalk, digest_tree, make_read_only, stat_summary, walk_tree

_CAIRN_PARENT = str(Path(__file__).resolve().parents[2])  # the folder that holds the cairn package
KILL_GRACE_SECONDS = 5.0


class StepReporter(Protocol):
    def started(self, step_run_id: str, status: Status, **fields: Any) -> bool: ...

    def succeeded(self, job: StepJob, outputs: list[dict[str, Any]], exit_code: int) -> bool: ...

    def ended(self, step_run_id: str, status: Status, reason: str, exit_code: int | None) -> None: ...

    def register_output(self, job: StepJob, output: dict[str, Any], registration: dict[str, Any]) -> str: ...

    # Only where the runner is told it may hand outputs over early (``execute_step(early_handoff=True)``)
    # and jobs may have ``pending_inputs``: the local compute of the agent.
    def outputs_placed(self, job: StepJob, outputs: list[dict[str, Any]]) -> None:
        """The outputs are in place (renamed, read-only), not yet digested (``digest`` None)."""

    def settled_job(self, job: StepJob, stopped: Callable[[], bool]) -> StepJob:
        """``job`` with the digests of its pending inputs and its fingerprint (waits for them, until
        ``stopped()``, then returns ``job``); raises ``InputHandoffError`` when one will never come."""

    def wake(self) -> None:
        """``settled_job`` looks at ``stopped()`` again."""

    def settle(self, job: StepJob, result: StepResult) -> None:
        """The step ended: steps waiting for the digests of what it placed get them, or why not."""

    def digest_late(self, job: StepJob) -> bool:
        """Whether the step's large outputs may be committed before they are digested (nothing of
        its run would wait for the digest): then ``digest_later`` is told of them."""

    def digest_later(self, job: StepJob, outputs: list[dict[str, Any]], digest: Callable[[], dict[str, str]]) -> bool:
        """The step was committed with ``outputs`` whose digests are pending: ``digest()`` makes
        them (each output's digest by name; it raises when one changed since the commit). False
        when it will not be called (they stay pending, made by whoever needs them)."""


class StepControl:
    """Lets the engine stop a running step: cancel() kills its whole process group."""

    def __init__(self, ended_elsewhere: Callable[[], bool] | None = None) -> None:
        """``ended_elsewhere()``: for a step whose engine is in another process (a Ray task), whether
        that engine took the step's ending on itself (a cancel, an agent stop): asked once its process
        ended, before anything is committed."""
        self.ended_elsewhere = ended_elsewhere
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._cancellers: list[Callable[[bool], None]] = []
        self._wakers: list[Callable[[], None]] = []
        self.canceled = False
        self.cancel_reason = "canceled"
        self.requeue = False  # stopped by its agent: report nothing, the step runs again later
        self.withdrawn = False  # not to start any more (its run stopped after a failure); a started step goes on
        self.escaped: Escaped = []  # what the step's process had started outside its group when canceled

    def add_waker(self, waker: Callable[[], None]) -> None:
        """``waker()`` is called when the step is canceled or withdrawn (a wait for a slot ends)."""
        with self._lock:
            self._wakers.append(waker)

    def withdraw(self) -> None:
        with self._lock:
            self.withdrawn = True
            wakers = list(self._wakers)
        for waker in wakers:
            waker()

    def on_cancel(self, canceller: Callable[[bool], None]) -> None:
        """For a step that runs elsewhere (a Ray task): ``canceller(requeue)`` stops it."""
        with self._lock:
            self._cancellers.append(canceller)
            if not self.canceled:
                return
        canceller(self.requeue)

    def attach(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._proc = proc
            if self.canceled:
                _kill_group(proc)

    def cancel(self, reason: str = "canceled", requeue: bool = False) -> None:
        with self._lock:
            self.canceled = True
            self.cancel_reason = reason
            self.requeue = requeue
            # a process already waited for (an environment build's uv) is not killed: its group id
            # may belong to another process by now. A cancel asks first (SIGTERM: a step may save a
            # checkpoint), then kills what is left after KILL_GRACE_SECONDS, as a timeout does; an
            # agent that stops kills at once (the step runs again anyway).
            if self._proc is not None and getattr(self._proc, "returncode", None) is None:
                # before the leader dies (then they are init's); a second stop adds to the first's
                self.escaped = list({*self.escaped, *escaped_descendants(self._proc.pid)})
                if requeue:
                    _kill_group(self._proc)
                    signal_escaped(self.escaped)
                else:
                    _kill_group(self._proc, signal.SIGTERM)
                    signal_escaped(self.escaped, signal.SIGTERM)
                    _deadlines.call_later(KILL_GRACE_SECONDS,
                                          functools.partial(_kill_if_running, self._proc, self.escaped))
            cancellers = list(self._cancellers)
            wakers = list(self._wakers)
        for canceller in cancellers:
            canceller(requeue)
        for waker in wakers:
            waker()


def _kill_if_running(proc: Any, escaped: Escaped) -> None:
    if getattr(proc, "returncode", None) is None:  # not waited for yet: its group is still its own
        _kill_group(proc)
    signal_escaped(escaped)


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _SystemLog:
    """The step's system log. Lines are written out when the step is about to wait (for a slot, for
    its process, for an environment build) and when it ends, not one write per line."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", encoding="utf-8")

    def __call__(self, message: str, flush: bool = False) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        self._f.write(f"{stamp} {message}\n")
        if flush:
            self._f.flush()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _fresh_folder(path: str) -> None:
    """Make an empty folder at ``path``: one ``mkdir`` in the usual case (its parent exists, it does
    not), whatever a dead attempt left there removed."""
    try:
        os.mkdir(path)
    except FileExistsError:
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        os.mkdir(path)
    except FileNotFoundError:
        os.makedirs(path)


DOWNLOAD_FOLDER = ".cairn_inputs"


def materialize_inputs(job: StepJob, work: Path, holds: list[int] | None = None) -> dict[str, str]:
    """Input name -> the path the step sees. Step outputs: ``mount``/``direct`` get the committed
    folder itself (no copy, read-only); ``download`` gets a private copy in the working directory.
    Datasets on a local datastore are used in place in every mode; others are fetched, through this
    machine's input cache, whose entries stay while the step holds them (``holds``: lock file
    descriptors, closed by the caller when the step has ended)."""
    spec = job.spec
    on_compute = {i.name: i.path_on_compute for i in spec.inputs}
    on_compute.update({d.name: d.path_on_compute for d in spec.dataset_inputs})
    paths = {}
    for i in job.inputs:
        if i.name in job.datasets and not i.path:  # a dataset with no local folder of its own: fetch it
            paths[i.name] = _fetch_dataset(job, i.name, work, on_compute.get(i.name), holds)
            continue
        if i.name in job.datasets:  # a dataset's own local folder: used in place, linked where asked
            wanted = on_compute.get(i.name)
            if wanted:
                link = _own_place(work, wanted, i.name)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(i.path, target_is_directory=Path(i.path).is_dir())
                paths[i.name] = str(link)
            else:
                paths[i.name] = i.path
            continue
        if i.mode != "download":
            paths[i.name] = i.path
            continue
        dest = _own_place(work, on_compute.get(i.name) or f"{DOWNLOAD_FOLDER}/{i.name}", i.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(i.path).is_dir():
            shutil.copytree(i.path, dest, symlinks=True, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(i.path, dest)
        paths[i.name] = str(dest)
    return paths


def _own_place(work: Path, relative: str, name: str) -> Path:
    """Where input ``name`` goes in the working folder: inside it, and not over the snapshot's files."""
    from cairn.storage.paths import confined

    place = confined(work, relative, f"path_on_compute of input {name!r}")
    if os.path.lexists(place):
        raise UserInputError(f"input {name!r} goes to {relative!r} in the step's working folder, but its snapshot "
                             f"already has that path (a file or folder of the source directory): choose a "
                             f"path_on_compute the source folder does not have")
    return place


def _fetch_dataset(job: StepJob, name: str, work: Path, path_on_compute: str | None,
                   holds: list[int] | None) -> str:
    from cairn.data.datasets import fetch, resolve_files
    from cairn.storage.datastores import DatastoreLocation

    def locate(store: str) -> DatastoreLocation:
        loc = job.datastore_locations[store]
        return DatastoreLocation(store, loc["kind"], loc["config"], loc["secrets"])

    from cairn.data.datasets import content_digest

    dest = _own_place(work, path_on_compute or f"{DOWNLOAD_FOLDER}/{name}", name)
    files = resolve_files(job.datasets[name]["definition"], locate)
    local = [f for f in files if f.datastore and job.datastore_locations[f.datastore]["kind"] == "local"]
    digest = next((i.digest for i in job.inputs if i.name == name), "")
    # a dataset's digest is its listing's at submit (an upstream output's is of its bytes, and
    # committed outputs never change): the step's fingerprint and the cache key name those files
    listed = any(d.name == name for d in job.spec.dataset_inputs)
    if listed and digest and content_digest(files) != digest:
        raise UserInputError(
            f"input {name!r}: the dataset's files changed since the run was submitted ("
            + ("they are gone" if not files else f"{len(files)} file(s) now, other than then")
            + "); submit the pipeline again to read them as they are now")
    cached = None
    if not local and digest:  # all remote: fetched once per machine, kept in the input cache
        from cairn.core.digests import digest_json

        # the content digest and the layout the step sees (the same files under other folders differ)
        key = digest_json({"content": digest, "layout": sorted(f.relative for f in files)})
        try:
            cached = cached_input(key, {f.relative: f.size for f in files},
                                  lambda folder: fetch(files, locate, folder), holds)
        except PermissionError as exc:  # an unusable cache must not fail the step: fetch as before
            _warn_cache(job, f"the input cache {cache_root()} cannot be used ({exc}); set "
                             f"$CAIRN_INPUT_CACHE to a writable folder. Fetching {name!r} for this step only")
    if cached is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if job.datasets[name]["mode"] == "download":  # a private, writable copy, from the local cache
            shutil.copytree(cached, dest, symlinks=True, copy_function=shutil.copyfile, dirs_exist_ok=True)
        else:
            if dest.exists() or dest.is_symlink():
                shutil.rmtree(dest) if dest.is_dir() and not dest.is_symlink() else dest.unlink()
            dest.symlink_to(cached, target_is_directory=True)
        return str(dest)
    for f in local:  # files of a local datastore (a glob, several paths) are linked, not copied
        target = dest / f.relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(f.path)
    fetch([f for f in files if f not in local], locate, dest)
    return str(dest)


def _warn_cache(job: StepJob, message: str) -> None:
    with open(Path(job.log_dir) / "system.txt", "a", encoding="utf-8") as f:
        f.write(message + "\n")


def resolve_arguments(job: StepJob, inputs: dict[str, str] | None = None) -> list[str]:
    spec = job.spec
    inputs = inputs if inputs is not None else {i.name: i.path for i in job.inputs}
    args = []
    for a in spec.arguments:
        if a.input is not None:
            args.append(inputs[a.input])
        elif a.output is not None:
            args.append(job.staging_dirs[a.output])
        else:
            args.append(a.literal or "")
    return args


ISOLATED_DROPS = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX")  # what an isolated environment drops


def base_environment(job: StepJob, resolved: ResolvedEnvironment | None = None,
                     inherited: dict[str, str] | None = None) -> dict[str, str]:
    """The variables every step of this environment gets (what a warm-start server starts with).
    ``inherited``: what the step inherited from its agent, when not this process's (``cairn debug``)."""
    return environment_base(job.spec.environment.get("environment_variables") or {}, resolved, inherited)


_environ_copy: tuple[tuple[tuple[bytes, bytes], ...], dict[str, str]] = ((), {})


def _agent_environ() -> dict[str, str]:
    """A copy of the agent's variables, decoded again only when they changed (copying
    ``os.environ`` decodes every variable: ~30 µs, two or three times per step)."""
    return dict(_agent_environ_unchanged())


def inherited_record(workspace: str) -> str:
    """The id of the record (``runner/inherited.py``) of what steps inherit from this process now:
    written once per distinct environment, looked up again only when the variables changed."""
    global _recorded
    current = _agent_environ_unchanged()
    if _recorded[0] is not current or _recorded[1] != workspace:
        from cairn.runner.inherited import record
        from cairn.storage.layout import WorkspaceLayout

        _recorded = (current, workspace, record(WorkspaceLayout(workspace).dot, current))
    return _recorded[2]


_recorded: tuple[dict[str, str] | None, str, str] = (None, "", "")


def _agent_environ_unchanged() -> dict[str, str]:
    """The agent's variables decoded (not to be changed): the same object while none changed."""
    global _environ_copy
    data = getattr(os.environ, "_data", None)  # CPython's encoded variables: read without decoding
    raw = tuple(data.items() if isinstance(data, dict) else os.environb.items())
    if raw != _environ_copy[0]:
        _environ_copy = (raw, dict(os.environ))
    return _environ_copy[1]


def environment_base(variables: dict[str, Any], resolved: ResolvedEnvironment | None = None,
                     inherited: dict[str, str] | None = None) -> dict[str, str]:
    """``base_environment`` from an environment's own variables (``{}`` for the default one)."""
    env = dict(inherited) if inherited is not None else _agent_environ()
    if resolved is not None:  # an isolated environment: nothing of the agent's Python leaks in
        for name in ISOLATED_DROPS:
            env.pop(name, None)
    env.update({k: str(v) for k, v in variables.items()})
    env["PYTHONUNBUFFERED"] = "1"
    if resolved is None:
        # the environment's own entries first (relative ones from the step's folder), then Cairn for its client
        agents = (inherited if inherited is not None else os.environ).get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(variables.get("PYTHONPATH") or ""), _CAIRN_PARENT,
                                                        agents) if p)
    else:
        env.update(resolved.step_variables())
        agent_bin = os.path.join(sys.prefix, "bin") if sys.prefix != sys.base_prefix else None
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != agent_bin]  # not the agent's venv
        env["PATH"] = os.pathsep.join([resolved.bin_dir, *path])
    return env


def start_environment(job: StepJob, resolved: ResolvedEnvironment | None = None,
                      inherited: dict[str, str] | None = None) -> dict[str, str]:
    """The step's variables but those Cairn adds for each run of it (ids, folders, parameters):
    what a spare interpreter for it starts with."""
    env = base_environment(job, resolved, inherited)
    env.update(dict(job.spec.environment_variables))
    return env


def step_environment(job: StepJob, output_paths: dict[str, str], input_paths: dict[str, str],
                     resolved: ResolvedEnvironment | None = None, start: dict[str, str] | None = None
                     ) -> dict[str, str]:
    """``start`` (``start_environment``'s, when the caller has it) and what Cairn adds for this run."""
    spec = job.spec
    env = dict(start) if start is not None else start_environment(job, resolved)
    for key, value in spec.params:
        env[f"AML_PARAMETER_{key}"] = value
        env[f"CAIRN_PARAMETER_{key}"] = value
    env.update({
        "CAIRN_WORKSPACE": job.workspace,
        "CAIRN_RUN_ID": job.step_run_id,
        "CAIRN_PIPELINE_RUN_ID": job.pipeline_run_id,
        "CAIRN_EXPERIMENT": job.experiment,
        "CAIRN_STEP_NAME": spec.name,
        "CAIRN_LOG_DIR": job.log_dir,
        "CAIRN_INPUTS": json.dumps(input_paths),
        "CAIRN_DATASETS": json.dumps({n: {k: d[k] for k in ("kind", "definition", "mode")}
                                      for n, d in job.datasets.items()}),
        "CAIRN_OUTPUTS": json.dumps(output_paths),
    })
    return env


def _warm_start(warm: WarmPool, job: StepJob, resolved: ResolvedEnvironment | None, argv: list[str], work: Path,
                env: dict[str, str], syslog: _SystemLog, control: StepControl) -> WarmProcess | None:
    """The step forked by its environment's warm-start server, or None to start it cold."""
    log_dir = Path(job.log_dir)
    base = base_environment(job, resolved)
    too_big = _unstartable(argv, env)
    if too_big:  # a cold start fails on it: so must this one, the same way
        syslog(f"warm start skipped: {too_big}")
        return None
    not_source = _not_source(work / argv[1])
    if not_source:  # Python runs it through its own loader: only a cold start does the same
        syslog(f"warm start skipped: the script is {not_source}, not Python source")
        return None
    differs = [v for v in STARTUP_VARIABLES if env.get(v) != base.get(v)]
    if differs:
        syslog(f"warm start skipped: the step sets {', '.join(differs)}, which Python or a preloaded library "
               f"reads only at start")
        return None
    try:
        server = warm.server(argv[0], base, Path(job.workspace) / ".cairn", stop_waiting=control, on_wait=lambda: syslog(
            f"waiting for the warm-start server of this environment (importing {', '.join(warm.modules)})", flush=True),
            on_restart=lambda changed, is_folder: syslog(
                f"warm start: {changed}, searched for modules before one the server preloaded, changed since it "
                f"started (a module put there may shadow it): the server starts again" if is_folder else
                f"warm start: {changed}, preloaded by the server, changed since it started: the server starts again"))
        proc = server.launch(argv, str(work), env, str(log_dir / "stdout.txt"), str(log_dir / "stderr.txt"))
    except WarmShadowed as exc:  # the server checks what it has imported by then (Cairn's client, lazily)
        in_snapshot = [os.path.relpath(f, work) for f in exc.files if Path(f).is_relative_to(work)]
        elsewhere = [f for f in exc.files if not Path(f).is_relative_to(work)]
        whose = [f"the snapshot has its own {', '.join(in_snapshot)}"] if in_snapshot else []
        whose += [f"the step's module search path (its PYTHONPATH) has its own {', '.join(elsewhere)}"] if elsewhere else []
        syslog(f"warm start skipped: {' and '.join(whose)}, which a cold start imports and a fork of the server "
               f"would not (it has the server's copy, or, of a sitecustomize, none)")
        return None
    except (WarmStartError, OSError) as exc:
        if not (control.canceled or control.withdrawn):  # else it does not start at all
            syslog(f"warm start unavailable ({exc}); starting the step cold")
        return None
    ready = server.ready
    syslog(f"warm start: forked by server pid {ready['pid']} (preloaded: {', '.join(ready['preloaded']) or 'none'}"
           + (f"; could not preload: {'; '.join(ready['failed'])}" if ready["failed"] else "") + ")")
    if ready.get("threads"):
        syslog(f"warm start: the preloads started threads this step does not have (only the forking thread "
               f"survives a fork): {', '.join(ready['threads'])}; a module whose work needs them belongs in a cold "
               f"start (leave it out of warm_start_modules)")
    return proc


def _spare_refusal(env: dict[str, str]) -> str | None:
    """Why an interpreter started ahead (in the agent's folder, before the step's variables were set)
    could not start this step as ``python`` started now would, or None: what Python reads from its
    PYTHONPATH as it starts."""
    path = env.get("PYTHONPATH")
    if not path:
        return None
    for entry in path.split(os.pathsep):
        if not os.path.isabs(entry):
            return (f"its PYTHONPATH has {entry or '(an empty entry)'!r}, relative to its working folder, which "
                    f"Python resolves as it starts")
        for hook in ("sitecustomize", "usercustomize"):
            if os.path.isfile(os.path.join(entry, f"{hook}.py")) or os.path.isdir(os.path.join(entry, hook)):
                return f"its PYTHONPATH has {os.path.join(entry, hook)}, which Python runs as it starts"
    return None


def _not_source(script: Path) -> str | None:
    """What the script is when Python would not run it as source (``spare_job._cold`` checks the
    same): compiled code (by name, or by its magic number, as Python tells), a zip application (by
    name, or by the end record of a zip file in its last 64 KiB: a shebang line may come first)."""
    from importlib.util import MAGIC_NUMBER

    if script.suffix in (".pyc", ".pyz"):
        return f"a {script.suffix} file"
    try:
        with open(script, "rb") as f:
            head = f.read(2)
            f.seek(max(0, f.seek(0, os.SEEK_END) - ZIP_END_REACH))
            tail = f.read()
    except OSError:
        return None  # a cold start says what is wrong with it
    if head == MAGIC_NUMBER[:2]:
        return "compiled code"
    return "a zip application" if ZIP_END_RECORD in tail else None


ZIP_END_RECORD = b"PK\x05\x06"  # a zip file's end of central directory, within its last 64 KiB
ZIP_END_REACH = 22 + 65535


_MAX_ARG_STRLEN = 32 * 4096  # Linux: the longest single argument or NAME=value a program may be started with


def _unstartable(argv: list[str], env: dict[str, str]) -> str | None:
    """Why no program could be started with these arguments and variables (a warm step would run
    anyway, and then fail only in its subprocesses), or None."""
    strings = {f"argument {i}": a.encode("utf-8", "surrogateescape") for i, a in enumerate(argv)}
    strings.update({f"variable {k}": f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items()})
    what, longest = max(strings.items(), key=lambda kv: len(kv[1]), default=("", b""))
    if len(longest) + 1 > _MAX_ARG_STRLEN:
        return f"{what} is {len(longest) + 1} bytes, over the {_MAX_ARG_STRLEN} a process can be started with"
    try:
        limit = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        return None
    total = sum(len(b) + 1 + 8 for b in strings.values())  # each string, its NUL and its pointer
    return f"arguments and variables are {total} bytes, over this system's {limit}" if total > limit else None


def docker_refusal(spec: Any) -> str | None:
    """Local compute runs steps as processes: an environment that asks for a container fails the
    step, saying so, rather than running somewhere else than asked."""
    docker = spec.environment.get("docker") or {}
    if not docker.get("enabled"):
        return None
    image = f" (base image {docker['base_image']!r})" if docker.get("base_image") else ""
    return (f"compute target {spec.compute_target or 'local'!r} runs steps as local processes and cannot run "
            f"containers, but environment {spec.environment.get('name')!r} has docker.enabled = True{image}; "
            f"set environment.docker.enabled = False to run the step in an environment Cairn builds with uv")


def _build_error(exc: Exception) -> str:
    """The part of a build failure worth a status line: uv's error and its explanation."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lower().startswith("error")), max(0, len(lines) - 3))
    return " ".join(ln.lstrip("╰─▶ ").strip() for ln in lines[start:])[:400]


def _resolve_environment(job: StepJob, control: StepControl, syslog: _SystemLog) -> ResolvedEnvironment:
    """The step's built environment, building it first if needed; the build log goes to the
    step's ``environment.txt`` as it is written (it streams like any step log)."""
    from cairn.storage.layout import WorkspaceLayout

    spec = job.spec
    name = spec.environment.get("name") or "environment"
    cache = EnvironmentCache(job.env_cache or WorkspaceLayout(job.workspace).envs)
    started = time.monotonic()
    with open(Path(job.log_dir) / "environment.txt", "a", encoding="utf-8") as env_log:
        def log(line: str) -> None:
            env_log.write(line + "\n")
            env_log.flush()

        resolved = cache.resolve(spec.environment, name, log, attach=control.attach,
                                 canceled=lambda: control.canceled)
        how = "built" if resolved.built_now else "ready"
        log(f"environment {name!r}: {how} ({resolved.folder}); Python {resolved.python}")
    syslog(f"environment {name!r} {how} in {time.monotonic() - started:.3f} s: {resolved.folder}")
    return resolved


CHANGED_IN_PLACE = "given in place (read-only: committed outputs never change)"  # a failure's reason says it


def execute_step(job: StepJob, reporter: StepReporter, control: StepControl | None = None,
                 on_started: Callable[[int], None] | None = None, warm: WarmPool | None = None,
                 slot: SlotTicket | None = None, commit_local: LocalCommit | None = None,
                 spares: SparePool | None = None, work_folders: WorkFolders | None = None,
                 early_handoff: bool = False, record_inherited: bool = False) -> StepResult:
    """Run one step to its end and report it. Never raises for a step's own failure. With ``slot``,
    everything before the process (folders, inputs, environment) is done ahead, and the process
    waits for its turn. ``commit_local``: see ``_commit_outputs``. ``spares``: interpreters started
    ahead, one of which runs the step when it would start cold. ``work_folders``: completed steps'
    unchanged folders, one of which becomes this step's when it has the same snapshot (the caller
    releases the step's own there once it ended). ``early_handoff``: large outputs of local
    datastores are reported placed (``reporter.outputs_placed``) before they are digested, so that
    their consumers may start meanwhile (the caller settles the hand-off with the result).
    ``record_inherited``: the step records what it inherits from this process's variables
    (``runner/inherited.py``), for ``cairn debug``: where this process is the workspace's agent."""
    control = control or StepControl()
    spec = job.spec
    log_dir = Path(job.log_dir)
    os.makedirs(job.log_dir, exist_ok=True)
    syslog = _SystemLog(log_dir / "system.txt")
    work = Path(job.work_dir)
    preparing: _DeferredStatus | None = None
    resolved: ResolvedEnvironment | None = None
    holds: list[int] = []  # input cache entries this step uses
    try:
        syslog(f"attempt {job.attempt} of step {spec.name!r} (step run {job.step_run_id})")
        # Short phases are not worth a status write: Preparing is recorded only when preparing
        # takes a while, Finalizing only when committing does (the state machine drops a late one).
        preparing = _DeferredStatus(reporter, job.step_run_id, Status.PREPARING)
        files = len(job.manifest.get("files", []))
        if work_folders is not None and work_folders.take(spec.snapshot, job.work_dir):
            syslog(f"snapshot {spec.snapshot} in {work} ({files} files): the unchanged folder of a completed step "
                   f"of the same snapshot")
        else:
            _fresh_folder(job.work_dir)
            materialize(job.manifest, ObjectStore(job.objects_root), work)
            if work_folders is not None:
                work_folders.stamp(job.work_dir, spec.snapshot)
            syslog(f"snapshot {spec.snapshot} materialised in {work} ({files} files)")
        if job.datasets or any(i.mode == "download" for i in job.inputs):
            syslog.flush()  # fetching or copying inputs can take a while: what came before is readable
        input_paths = materialize_inputs(job, work, holds)
        for i in job.inputs:
            fetched = i.name in job.datasets and not i.path
            how = f"copied to {input_paths[i.name]}" if i.mode == "download" or fetched else "used in place"
            if fetched and Path(input_paths[i.name]).is_symlink():
                how = f"linked from this machine's input cache ({os.readlink(input_paths[i.name])})"
            elif fetched:
                how = f"copied to {input_paths[i.name]} (through this machine's input cache when it can)"
            digest = "digest pending: its producer is digesting it" if i.digest.startswith(PENDING_DIGEST) else i.digest
            syslog(f"input {i.name}: {i.path} ({digest}, {i.mode}: {how})")
        output_paths = {}
        for o in spec.outputs:
            staging = job.staging_dirs[o.name]
            for leftover in earlier_staging_dirs(staging, job.attempt):  # an interrupted attempt's
                shutil.rmtree(leftover, ignore_errors=True)
            _fresh_folder(staging)
            output_paths[o.name] = staging
            syslog(f"output {o.name}: staging in {staging}")
        script = work / spec.script_name
        if not script.is_file():
            return _end(job, reporter, syslog, Status.FAILED,
                        f"script {spec.script_name!r} is not in the snapshot of {spec.source_directory!r}",
                        None)
        refused = docker_refusal(spec)
        if refused:
            return _end(job, reporter, syslog, Status.FAILED, refused, None)
        if is_managed(spec.environment):
            try:
                syslog.flush()  # an environment build can take minutes: what came before is readable
                resolved = _resolve_environment(job, control, syslog)
            except EnvironmentBuildError as exc:
                if control.requeue:
                    syslog(f"stopped while preparing the environment: {control.cancel_reason}")
                    return StepResult(job.step_run_id, Status.QUEUED.value, control.cancel_reason, None)
                if control.canceled:
                    return _end(job, reporter, syslog, Status.CANCELED, control.cancel_reason, None)
                return _end(job, reporter, syslog, Status.FAILED,
                            f"environment {spec.environment.get('name')!r} could not be built: {_build_error(exc)} "
                            f"(the whole uv output is in the step's environment log: cairn logs {job.step_run_id} "
                            f"--environment)", None)
        interpreter = resolved.python if resolved else (job.interpreter or sys.executable)
        argv = [interpreter, spec.script_name, *resolve_arguments(job, input_paths)]
        syslog(f"command: {shlex.join(argv)}")
        start_env = start_environment(job, resolved)
        env = step_environment(job, output_paths, input_paths, resolved, start_env)
        no_spare = _spare_refusal(env) if spares is not None and not job.die_with_runner else None
        if spares is not None and warm is None and not job.die_with_runner and no_spare is None:
            spares.want(interpreter, start_env)  # (a first step of its environment: started while it gets ready)
        recorded = {}
        if record_inherited:
            try:
                recorded["inherited_env"] = inherited_record(job.workspace)
            except OSError as exc:  # `cairn debug` will use its shell's variables instead, saying so
                syslog(f"could not record the variables the step inherits: {exc}")
        if job.attempt > 1:  # the logs keep every attempt; say where this one starts
            marker = f"{attempt_marker(job.attempt)}\n".encode()
            for name in ("stdout.txt", "stderr.txt"):
                with open(log_dir / name, "ab+") as f:  # (appended whatever the position)
                    size = f.seek(0, os.SEEK_END)
                    mid_line = size > 0 and f.seek(size - 1) >= 0 and f.read(1) != b"\n"
                    f.write(b"\n" + marker if mid_line else marker)  # a line of its own, after a killed one's last
        preparing.cancel()  # prepared: what is left is starting the process (a slot, if it must wait for one)
        if slot is not None and not slot.acquire(
                control, lambda busy: syslog(f"prepared; waiting for a process slot ({busy} step(s) running)", flush=True)):
            return _stopped_before_start(job, reporter, control, syslog)
        ended: _ProcessEnd | None = None
        started = time.monotonic()
        try:
            ended = _run_process(job, reporter, control, on_started, warm, resolved, argv, work, env, syslog, log_dir,
                                 spares, start_env, recorded, no_spare)
        finally:
            if slot is not None:
                if (ended is None or not ended.succeeded) and job.stop_run_on_failure and not control.canceled:
                    slot.stop_run()  # before the slot is given on: no step of this run starts after it
                slot.release()  # the process has ended: the next step's may start while this one commits
        if ended.stopped_first:
            return _stopped_before_start(job, reporter, control, syslog)
        if ended.start_error is not None:
            return _end(job, reporter, syslog, Status.FAILED, f"could not start the step: {ended.start_error}", None)
        code, timed_out = ended.code, ended.timed_out
        elapsed = time.monotonic() - (ended.started_at or started)
        syslog(f"exit code {code} after {elapsed:.3f} s", flush=True)  # digests and uploads may follow
        # inputs handed over before they were digested: their digests make the fingerprint; a
        # producer that failed meanwhile is the cause of whatever this step then did: named first
        job, handoff_failure = _settle_pending_inputs(job, reporter, control, syslog)
        if not (control.canceled or control.requeue) and control.ended_elsewhere is not None \
                and control.ended_elsewhere():  # asked to end (SIGTERM) by its engine: even an exit 0 commits nothing
            control.canceled = True
        if control.requeue:  # stopped (or given up) meanwhile: that decides, not the hand-off
            syslog(f"stopped: {control.cancel_reason}; the step will run again")
            return StepResult(job.step_run_id, Status.QUEUED.value, control.cancel_reason, code)
        if control.canceled:
            return _end(job, reporter, syslog, Status.CANCELED, control.cancel_reason, code)
        if handoff_failure is not None:
            return _end(job, reporter, syslog, Status.FAILED, handoff_failure, code)
        if timed_out:
            return _end(job, reporter, syslog, Status.FAILED,
                        f"exceeded max_run_duration_seconds={spec.max_run_duration_seconds:g}: "
                        f"the step was stopped", code)
        if ended.lost:
            return _end(job, reporter, syslog, Status.FAILED, ended.lost, code)
        if code != 0:
            return _end(job, reporter, syslog, Status.FAILED, _exit_reason(code, log_dir), code)
        changed = _changed_inputs(job)
        if changed:
            return _end(job, reporter, syslog, Status.FAILED,
                        f"the step changed {', '.join(changed)}, {CHANGED_IN_PLACE}; write into an output instead, "
                        f"or read the input with as_download() for a private copy", code)
        failed_by_script = log_dir / FAIL_MARKER
        if failed_by_script.exists():
            details = failed_by_script.read_text(errors="replace").strip()[:300]
            failed_by_script.unlink()
            return _end(job, reporter, syslog, Status.FAILED, f"the script called run.fail(): {details}", code)
        finalizing = _DeferredStatus(reporter, job.step_run_id, Status.FINALIZING)
        try:
            placed = (lambda records: reporter.outputs_placed(job, records)) if early_handoff and job.hand_over_early \
                else None
            late = (lambda: reporter.digest_late(job)) if early_handoff else None
            outputs, digest_later = _commit_outputs(job, spec, syslog, commit_local, placed, late)
        except OutputCommitError as exc:
            return _end(job, reporter, syslog, Status.FAILED, str(exc), code)
        finally:
            finalizing.cancel()
        syslog.flush()  # the log is whole before the run says it ended
        if not reporter.succeeded(job, outputs, code):
            syslog("the step run had already ended (canceled?): outputs not recorded")
            return StepResult(job.step_run_id, Status.CANCELED.value, "canceled", code)
        if digest_later is not None:  # committed before their digests: made now, the step's end told meanwhile
            _late_log_lines.expect(job)
            made_later = False
            try:
                made_later = reporter.digest_later(job, outputs, digest_later)
            finally:
                if not made_later:
                    _late_log_lines.forget(job)
        for o in spec.outputs:
            if o.register:
                record = next(x for x in outputs if x["name"] == o.name)
                try:
                    registered = reporter.register_output(job, record, o.register)
                    syslog(f"output {o.name}: registered as dataset {registered}")
                except Exception as exc:  # the step's work is committed; say why registration failed
                    syslog(f"output {o.name}: could not register dataset {o.register['name']!r}: {exc}")
        syslog("completed")
        return StepResult(job.step_run_id, Status.COMPLETED.value, None, code, tuple(outputs))
    except UserInputError as exc:  # a mistake in the step's definition found while preparing it
        return _end(job, reporter, syslog, Status.FAILED, str(exc), None)
    except Exception as exc:  # an infrastructure fault: the step fails with the reason, the agent lives
        import traceback

        syslog("runner error:\n" + traceback.format_exc())
        return _end(job, reporter, syslog, Status.FAILED, f"runner error: {type(exc).__name__}: {exc}", None)
    finally:
        syslog.close()
        if preparing is not None:
            preparing.cancel()
        if resolved is not None:
            resolved.close()  # the environment may be pruned again
        for fd in holds:
            os.close(fd)  # its input cache entries may be evicted again


def _settle_pending_inputs(job: StepJob, reporter: StepReporter, control: StepControl,
                           syslog: _SystemLog) -> tuple[StepJob, str | None]:
    """``job`` with the digests of its ``pending_inputs`` and its fingerprint, waiting for them
    (until the step is canceled or stopped: then ``job`` as it was), and why they will never come."""
    if not job.pending_inputs:
        return job, None
    waiting = _DeferredStatus(reporter, job.step_run_id, Status.FINALIZING)  # recorded if it waits a while
    control.add_waker(reporter.wake)  # a cancel or a stop ends the wait
    try:
        settled = reporter.settled_job(job, lambda: control.canceled or control.requeue)
    except InputHandoffError as exc:
        return job, str(exc)
    finally:
        waiting.cancel()
    if not settled.pending_inputs:
        digests = {i.name: i.digest for i in settled.inputs}
        for name, producer, _output, _attempt in job.pending_inputs:
            syslog(f"input {name}: {digests[name]} (digested by step run {producer} after this step started)")
    elif not (control.canceled or control.requeue):
        names = ", ".join(name for name, *_ in job.pending_inputs)
        syslog(f"input {names}: committed by {'its producer' if len(job.pending_inputs) == 1 else 'their producers'} "
               f"before being digested: this step's fingerprint is recorded once they are")
    return settled, None


def _changed_inputs(job: StepJob) -> list[str]:
    """The inputs given in place (committed outputs of upstream steps) that the step changed: added,
    removed or rewritten files (as root, or after a chmod, it can)."""
    from cairn.storage.tree import stat_signature_matches

    changed = []
    for i in job.inputs:
        if not i.stat_signature:
            continue
        if not os.path.lexists(i.path):
            changed.append(f"its input {i.name!r} (removed {i.path})")
        elif not stat_signature_matches(i.path, i.stat_signature):
            changed.append(f"its input {i.name!r} ({i.path})")
    return changed


def _stopped_before_start(job: StepJob, reporter: StepReporter, control: StepControl,
                          syslog: _SystemLog) -> StepResult:
    """The result of a step stopped while it waited to start (for a slot, or a warm-start server)."""
    if control.withdrawn and not control.canceled:  # its run stopped after a failure: never started
        syslog("not started: the pipeline stopped after a step failed, or the step it reads from did")
        return StepResult(job.step_run_id, Status.QUEUED.value, None, None)
    if control.requeue:
        syslog(f"stopped before it started: {control.cancel_reason}; the step will run again")
        return StepResult(job.step_run_id, Status.QUEUED.value, control.cancel_reason, None)
    return _end(job, reporter, syslog, Status.CANCELED, control.cancel_reason, None)


_script_digests: dict[tuple[str, str], str] = {}


def _kept_code(job: StepJob) -> str:
    """Where spares keep the compiled code of the step's script (by its content digest in the
    snapshot), or "" when the job keeps none or the snapshot does not list it under that name."""
    if not job.kept_code:
        return ""
    spec = job.spec
    key = (spec.snapshot, spec.script_name)
    digest = _script_digests.get(key)
    if digest is None:
        digest = next((row[1] for row in job.manifest.get("files", []) if row[0] == spec.script_name), "")
        if len(_script_digests) >= 4096:
            _script_digests.clear()
        _script_digests[key] = digest
    return kept_code_path(job.kept_code, digest) if digest else ""


def _die_with_parent() -> None:
    """In the step's child process: SIGKILL when the thread that started it dies (Linux)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class _ProcessEnd(NamedTuple):
    code: int | None = None
    timed_out: bool = False
    start_error: OSError | None = None  # the process could not be started
    stopped_first: bool = False  # canceled or withdrawn before its process started (waiting for a warm server)
    started_at: float | None = None  # monotonic, once the process existed (not counting a wait for a warm server)
    lost: str | None = None  # why its exit status is unknown (its warm-start server died)

    @property
    def succeeded(self) -> bool:
        return self.code == 0 and not self.timed_out


def _run_process(job: StepJob, reporter: StepReporter, control: StepControl, on_started: Callable[[int], None] | None,
                 warm: WarmPool | None, resolved: ResolvedEnvironment | None, argv: list[str], work: Path,
                 env: dict[str, str], syslog: _SystemLog, log_dir: Path,
                 spares: SparePool | None, start_env: dict[str, str], recorded: dict[str, str],
                 no_spare: str | None = None) -> _ProcessEnd:
    """Start the step's process (forked warm, by a spare interpreter, or cold), record Running
    (with ``recorded``'s fields), wait for its end. ``no_spare``: why no spare may start it
    (``_spare_refusal``)."""
    spec = job.spec
    how = ""
    proc: Any = _warm_start(warm, job, resolved, argv, work, env, syslog, control) if warm is not None else None
    if proc is None and (control.canceled or control.withdrawn):
        return _ProcessEnd(stopped_first=True)
    if proc is None and spares is not None and not job.die_with_runner:
        refusal = no_spare
        spare = spares.take(argv[0], start_env, env) if refusal is None else None
        if refusal is not None:
            syslog(f"started cold, not by an interpreter started ahead: {refusal}")
        elif spare is not None and spares.launch(spare, argv, str(work), str(log_dir / "stdout.txt"),
                                                 str(log_dir / "stderr.txt"), env, _kept_code(job)):
            proc = spare
            how = " (forked from a spare interpreter)" if isinstance(spare, ForkedStep) else \
                " (an interpreter started ahead)"
    if proc is None:
        try:
            with open(log_dir / "stdout.txt", "ab") as out, open(log_dir / "stderr.txt", "ab") as err:
                proc = subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=err,
                                        stdin=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent if job.die_with_runner else None)
        except OSError as exc:
            return _ProcessEnd(start_error=exc)
    control.attach(proc)
    began = time.monotonic()
    try:
        reporter.started(job.step_run_id, Status.RUNNING, pid=proc.pid,
                         pid_started=process_start_time(proc.pid), attempt=job.attempt,
                         # kept even if the step fails: explainable (none while an input's digest is pending)
                         fingerprint=job.fingerprint or None,
                         fingerprint_parts=json.dumps(job.fingerprint_parts), **recorded)
        if on_started:
            on_started(proc.pid)
        syslog(f"started pid {proc.pid}{how}", flush=True)
    except BaseException:  # the step cannot be followed: it must not run on unseen (nor hold a slot)
        _kill_group(proc)
        proc.wait()
        raise
    timed_out, escaped = False, []  # escaped: what the step had started outside its group at its timeout
    try:
        code = proc.wait(timeout=spec.max_run_duration_seconds)
    except subprocess.TimeoutExpired:
        timed_out = True
        syslog(f"over max_run_duration_seconds={spec.max_run_duration_seconds:g}: sending SIGTERM, "
               f"then SIGKILL after {KILL_GRACE_SECONDS:g} s", flush=True)
        escaped = escaped_descendants(proc.pid)
        _kill_group(proc, signal.SIGTERM)
        signal_escaped(escaped, signal.SIGTERM)
        try:
            code = proc.wait(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = proc.wait()
    _kill_group(proc)  # nothing the step started may outlive it
    if timed_out or control.canceled:  # what it started in sessions of its own too
        signal_escaped(escaped + control.escaped)
        kill_detached(job.step_run_id)
    return _ProcessEnd(code, timed_out, started_at=began, lost=getattr(proc, "lost", None))


def upload_logs(job: StepJob, result: StepResult) -> None:
    """When the default datastore is an object store, the step's logs go there once it ended
    (before the engine hears of the end, so a finished run has its logs in place)."""
    if job.log_upload and result.status != Status.QUEUED.value:
        _late_log_lines.upload_at_end(job, lambda: _upload_log_files(job, sorted(Path(job.log_dir).glob("*.txt"))))


def _upload_log_files(job: StepJob, paths: list[Path]) -> None:
    """Never raises: the logs stay in the local cache, their system log saying why."""
    from cairn.storage.datastores import DatastoreLocation, upload

    target = job.log_upload
    try:
        loc_data = job.datastore_locations[target["datastore"]]
        loc = DatastoreLocation(target["datastore"], loc_data["kind"], loc_data["config"], loc_data["secrets"])
        upload(loc, [(str(p), f"{target['path']}/{p.name}") for p in paths], overwrite=True, show_progress=False)
    except Exception as exc:  # the logs stay in the local cache; say so where they are
        try:
            with open(Path(job.log_dir) / "system.txt", "a", encoding="utf-8") as f:
                f.write(f"could not upload the logs to {target['datastore']}: {exc}\n")
        except OSError:  # (its folder gone, the disk full: nowhere to say it)
            pass


class _LateLogLines:
    """Lines a late digest adds to a step's system log after the step's end, where its logs are
    uploaded at that end (``upload_logs``): whichever of the two comes second has the whole system
    log uploaded (again). No lock is held while uploading."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # step run -> "expected" (lines to come), "uploading" (the step's upload, lines to come),
        # "uploaded" (lines to come, after it), "written" (before any upload) or "written, uploading"
        self._state: dict[str, str] = {}

    def expect(self, job: StepJob) -> None:
        if job.log_upload:
            with self._lock:
                self._state[job.step_run_id] = "expected"

    def forget(self, job: StepJob) -> None:
        """The late digest will not be made here after all: no lines come."""
        with self._lock:
            self._state.pop(job.step_run_id, None)

    def upload_at_end(self, job: StepJob, upload: Callable[[], None]) -> None:
        """The step's own upload of its logs at its end."""
        with self._lock:
            state = self._state.get(job.step_run_id)
            if state == "expected":
                self._state[job.step_run_id] = "uploading"
        upload()
        if state is None:  # no lines to come
            return
        with self._lock:
            after = self._state.pop(job.step_run_id, None)
            if after == "uploading":  # the lines are still to come: their writer uploads again
                self._state[job.step_run_id] = "uploaded"
                return
        if after == "written, uploading":  # written while that upload ran: it may lack them
            _upload_log_files(job, [Path(job.log_dir) / "system.txt"])

    def written(self, job: StepJob) -> None:
        """The late digest's lines are in the local system log."""
        if not job.log_upload:
            return
        with self._lock:
            state = self._state.pop(job.step_run_id, None)
            if state in ("expected", "uploading"):  # the step's upload, to come or running, sees to them
                self._state[job.step_run_id] = "written" if state == "expected" else "written, uploading"
                return
        if state == "uploaded":
            _upload_log_files(job, [Path(job.log_dir) / "system.txt"])


_late_log_lines = _LateLogLines()


def cleanup_after(job: StepJob, result: StepResult) -> None:
    """Remove a completed step's working folder, after the engine was told (off the critical path).
    A failed step's folder is kept for inspection."""
    if result.status == Status.COMPLETED.value:
        shutil.rmtree(job.work_dir, ignore_errors=True)


class _Deadlines:
    """One thread for every deferred status of the process (a thread per step phase cost more than
    the phase itself for short steps)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._canceled: set[int] = set()
        self._counter = 0
        self._thread: threading.Thread | None = None

    def call_later(self, delay: float, fn: Callable[[], None]) -> int:
        import heapq

        with self._cond:
            self._counter += 1
            entry = (time.monotonic() + delay, self._counter, fn)
            heapq.heappush(self._heap, entry)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="cairn-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0] is entry:  # the thread sleeps until the first deadline: only an earlier one wakes it
                self._cond.notify()
            return self._counter

    def cancel(self, handle: int) -> None:
        with self._cond:
            self._canceled.add(handle)

    def _run(self) -> None:
        import heapq

        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][1] in self._canceled:  # most phases end in time
                        self._canceled.discard(heapq.heappop(self._heap)[1])
                    if self._heap and self._heap[0][0] <= time.monotonic():
                        break
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _handle, fn = heapq.heappop(self._heap)
            fn()


_deadlines = _Deadlines()


class _DeferredStatus:
    """Records ``status`` only if the phase it names lasts longer than ``delay`` seconds."""

    def __init__(self, reporter: StepReporter, step_run_id: str, status: Status, delay: float = 0.2) -> None:
        self._handle = _deadlines.call_later(delay, lambda: reporter.started(step_run_id, status))

    def cancel(self) -> None:
        _deadlines.cancel(self._handle)


def _exit_reason(code: int, log_dir: Path) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the step was killed by {name}"
    tail = _last_line(log_dir / "stderr.txt")
    return f"the script exited with code {code}" + (f": {tail}" if tail else "")


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1].strip()[:300] if lines else ""
    except OSError:
        return ""


def _end(job: StepJob, reporter: StepReporter, syslog: _SystemLog, status: Status, reason: str,
         code: int | None) -> StepResult:
    remove_staging(job, job.spec)  # a step that did not succeed commits nothing
    syslog(f"{status.value}: {reason}", flush=True)  # in the log before the run says it ended
    reporter.ended(job.step_run_id, status, reason, code)
    return StepResult(job.step_run_id, status.value, reason, code)


class OutputCommitError(Exception):
    """An output cannot be committed where it was asked to go (the step fails with this reason)."""


def _commit_outputs(job: StepJob, spec: Any, syslog: _SystemLog, commit_local: LocalCommit | None = None,
                    placed: Callable[[list[dict[str, Any]]], None] | None = None,
                    late: Callable[[], bool] | None = None
                    ) -> tuple[list[dict[str, Any]], Callable[[], dict[str, str]] | None]:
    """Digest each staged output, then move it into place with one rename (no copy) on a local
    datastore, or upload it to an object store. ``commit_local`` commits outputs of local
    datastores elsewhere (a step on a Ray node of another machine hands them to the workspace).
    ``placed``: told of large outputs of local datastores once they are in place, before they
    are digested (``_place_then_digest``). ``late()``: whether those may be committed before
    they are digested: then their records say pending, and what digests them comes back with
    the records (else None)."""
    committed = []
    for o in spec.outputs:
        staging = Path(job.staging_dirs[o.name])
        if not staging.exists():
            staging.mkdir(parents=True)
    walked: dict[str, TreeWalk] = {}  # each output's tree, when the check below walked it
    if (placed is not None or late is not None) and commit_local is None and spec.outputs:
        early = _place_then_digest(job, spec, syslog, placed, walked, late or (lambda: False))
        if early is not None:
            return early
    whole = _whole_folder_commits(job, spec) if commit_local is None else {}
    moved = {name for names in whole.values() for name in names}
    for o in spec.outputs:
        staging = Path(job.staging_dirs[o.name])
        local = o.datastore in job.datastore_roots
        if o.name in moved:  # renamed below, with the others of its attempt folder
            record = commit_output(job, o, staging, move=False, walked=walked.get(o.name))
        elif commit_local is not None and local:
            record = commit_local(job, o, staging)
        else:
            record = commit_output(job, o, staging, walked=walked.get(o.name))
        _log_output(syslog, record)
        committed.append(record)
    _rename_attempt_folders(whole)
    remove_staging(job, spec)  # what an upload staged, what the step wrote beside its outputs, older attempts'
    return committed, None


def _log_output(syslog: _SystemLog, record: dict[str, Any], how: str = "") -> None:
    syslog(f"output {record['name']}: {record['file_count']} files, {record['size']} bytes, {record['digest']} "
           f"-> {record['datastore']}:{record['path']}{how}"
           + (" (the step wrote nothing into it: committed empty)" if record["file_count"] == 0 else ""))


def _rename_attempt_folders(whole: dict[str, list[str]]) -> None:
    """Each attempt folder of ``_whole_folder_commits`` becomes its step's ``outputs`` folder."""
    for attempt_folder in whole:
        os.rename(attempt_folder, os.path.join(os.path.dirname(attempt_folder), "outputs"))


def _whole_folder_commits(job: StepJob, spec: Any) -> dict[str, list[str]]:
    """Attempt folders that become the step's ``outputs`` folder in one rename (no folder made or
    removed), with their outputs: those holding nothing but outputs committed to that very folder
    of a local datastore, where no ``outputs`` folder is yet (an earlier attempt may have left one)."""
    by_folder: dict[str, list[str]] = {}
    for o in spec.outputs:
        by_folder.setdefault(os.path.dirname(job.staging_dirs[o.name]), []).append(o.name)
    whole = {}
    for folder, names in by_folder.items():
        outputs = os.path.join(os.path.dirname(folder), "outputs")
        fits = all(o.datastore in job.datastore_roots and not o.destination
                   and os.path.join(job.datastore_roots[o.datastore], job.output_dirs[o.name])
                   == os.path.join(outputs, o.name) for o in spec.outputs if o.name in names)
        if fits and not os.path.lexists(outputs) and sorted(os.listdir(folder)) == sorted(names):
            whole[folder] = names
    return whole


LocalCommit = Callable[[StepJob, Any, Path], dict[str, Any]]


def commit_output(job: StepJob, o: Any, staging: Path, move: bool = True,
                  walked: TreeWalk | None = None) -> dict[str, Any]:
    """Digest one staged output and commit it: renamed into place on a local datastore (no copy),
    uploaded to an object store. Returns the output's record. ``move`` False: made read-only
    only (its attempt folder is renamed to the outputs folder, see ``_whole_folder_commits``)."""
    tree = digest_tree(staging, walked)
    local = o.datastore in job.datastore_roots
    if local:
        _place_local(job, o, staging, move)
        signature = tree.stat_signature
    else:  # what the store says of the uploaded files (ETags): checked before the output is reused
        signature = _commit_remote(job, o, staging)
    return {"name": o.name, "datastore": o.datastore, "path": job.output_dirs[o.name],
            "digest": tree.digest, "size": tree.size, "file_count": tree.file_count,
            "stat_signature": signature}


def _place_local(job: StepJob, o: Any, staging: Path, move: bool) -> None:
    """Read-only, and renamed into place (``move``), or left for its attempt folder's rename."""
    if move:
        _commit_local(job, o, staging)
    else:
        make_read_only(staging)


def _commit_local(job: StepJob, o: Any, staging: Path) -> None:
    final = Path(job.datastore_roots[o.datastore]) / job.output_dirs[o.name]
    if final.exists():
        if o.destination and not o.overwrite and (final.is_file() or any(final.iterdir())):
            raise OutputCommitError(f"output {o.name!r}: destination {o.datastore}:{job.output_dirs[o.name]} "
                                    f"already holds files; use as_upload(overwrite=True) or a destination "
                                    f"with {{run-id}} in it")
        shutil.rmtree(final) if final.is_dir() else final.unlink()  # left by an attempt that died
    make_read_only(staging)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, final)


def _commit_remote(job: StepJob, o: Any, staging: Path) -> str | None:
    from cairn.data.datasets import listing_signature
    from cairn.storage.datastores import DatastoreLocation, probe, remote_path, translate_errors, upload

    loc_data = job.datastore_locations[o.datastore]
    loc = DatastoreLocation(o.datastore, loc_data["kind"], loc_data["config"], loc_data["secrets"])
    target = job.output_dirs[o.name]
    try:
        probe(loc, f"committing output {o.name!r}")  # an unreachable store fails in seconds, saying so
        fs, root = loc.filesystem()
        try:
            existing = fs.find(remote_path(root, target)) if fs.exists(remote_path(root, target)) else []
        except Exception as exc:
            raise translate_errors(loc, f"committing output {o.name!r}", exc) from None
        if existing:
            if o.destination and not o.overwrite:
                raise OutputCommitError(f"output {o.name!r}: destination {o.datastore}:{target} already holds "
                                        f"files; use as_upload(overwrite=True) or a destination with {{run-id}} in it")
            fs.rm(existing)  # the output is exactly what this step wrote: no stale files from before
        files = [(str(p), f"{target}/{p.relative_to(staging).as_posix()}") for p in sorted(staging.rglob("*"))
                 if p.is_file()]
        upload(loc, files, overwrite=True, show_progress=False)
        return listing_signature(loc, target)
    except CairnError as exc:  # unreachable, refused: the step fails with it (its files stay staged)
        raise OutputCommitError(f"output {o.name!r} could not be committed: {exc}") from None


# Outputs from this size on are handed to their consumers before they are digested (below it the
# digest costs less than telling the engine: ~1 ms per 10 MiB here)
EARLY_HANDOFF_FROM = 16 << 20


def _place_then_digest(job: StepJob, spec: Any, syslog: _SystemLog,
                       placed: Callable[[list[dict[str, Any]]], None] | None, walked: dict[str, TreeWalk],
                       late: Callable[[], bool]) -> tuple[list[dict[str, Any]], Callable[[], dict[str, str]] | None] | None:
    """Commit large outputs of local datastores in two stages: into place (renamed, read-only) and
    reported ``placed``, then digested where they are, so that consumers whose reuse cannot depend
    on the digest start meanwhile (a 1 GiB output takes ~0.1 s to digest here). When ``late()``
    (nothing of the run would wait for the digest), the records say pending
    (``pending_digest``) and the second stage is returned, to follow the commit: (records, the
    digest). An output that changed between the two stages fails the step (and is removed: it was
    never committed). None when the outputs are small, or not all in the run's folders of local
    datastores (a fixed destination must not hold what was never committed): they are committed
    as usual (``walked`` then has the trees walked to learn their size)."""
    if any(o.datastore not in job.datastore_roots or o.destination for o in spec.outputs):
        return None
    walked.update({o.name: walk_tree(job.staging_dirs[o.name]) for o in spec.outputs})
    summaries = {o.name: stat_summary(walked[o.name]) for o in spec.outputs}
    if sum(size for _signature, size, _files in summaries.values()) < EARLY_HANDOFF_FROM:
        return None
    digest_late = late()
    if placed is None and not digest_late:
        return None
    whole = _whole_folder_commits(job, spec)
    moved = {name for names in whole.values() for name in names}
    for o in spec.outputs:
        _place_local(job, o, Path(job.staging_dirs[o.name]), move=o.name not in moved)
    _rename_attempt_folders(whole)
    remove_staging(job, spec)
    records = [{"name": o.name, "datastore": o.datastore, "path": job.output_dirs[o.name], "digest": None,
                "size": summaries[o.name][1], "file_count": summaries[o.name][2],
                "stat_signature": summaries[o.name][0]} for o in spec.outputs]
    finals = {r["name"]: os.path.join(job.datastore_roots[r["datastore"]], r["path"]) for r in records}

    def digest_placed() -> dict[str, str]:
        digests = {}
        for record in records:
            # what the step wrote, where it is now: a consumer that already runs may add files beside
            # it (its own in-place input check says so), which are not the step's output
            staged, final = os.fspath(Path(job.staging_dirs[record["name"]])), finals[record["name"]]
            files, empty = walked[record["name"]]  # (walked from that spelling of the staging folder)
            written = [(rel, final + full[len(staged):]) for rel, full in files]
            try:
                tree = digest_tree(final, (written, empty))
            except FileNotFoundError:
                tree = None
            if tree is None or tree.stat_signature != record["stat_signature"]:
                raise OutputCommitError(
                    f"output {record['name']!r} changed while it was being digested, after the step's process had "
                    f"ended (by a process the step left running, or by a consumer that rewrote or removed a file "
                    f"of it: steps read their inputs, never write them)")
            digests[record["name"]] = tree.digest
        return digests

    try:
        if placed is not None:
            placed([dict(r) for r in records])
        if digest_late:
            for record in records:
                record["digest"] = pending_digest(job.step_run_id)
            return records, lambda: _digest_after_commit(job, records, digest_placed)
        digests = digest_placed()
        for record in records:
            record["digest"] = digests[record["name"]]
            _log_output(syslog, record, " (handed to its consumers before it was digested)")
    except BaseException:  # never committed: not left where committed outputs are
        for final in finals.values():
            shutil.rmtree(final, ignore_errors=True)
        raise
    return records, None


def _digest_after_commit(job: StepJob, records: list[dict[str, Any]],
                         digest_placed: Callable[[], dict[str, str]]) -> dict[str, str]:
    """The digests of outputs committed before them, said in the step's system log (when it can
    be opened: the digests do not depend on it)."""
    try:
        syslog: _SystemLog | None = _SystemLog(Path(job.log_dir) / "system.txt")
    except OSError:
        syslog = None
    try:
        digests = digest_placed()
        for record in records:
            if syslog is not None:
                _log_output(syslog, {**record, "digest": digests[record["name"]]},
                            " (digested after the step was committed: nothing of the run waited for it)")
        return digests
    except OutputCommitError as exc:  # committed, and maybe read already: kept, but keyed by nothing
        if syslog is not None:
            syslog(f"{exc}; it stays, but this step is not reused and no step's fingerprint names it")
        raise
    finally:
        if syslog is not None:
            syslog.close()
        _late_log_lines.written(job)


def remove_staging(job: StepJob, spec: Any) -> None:
    """Remove what this attempt staged and did not commit, and what an interrupted one left."""
    attempt_folders = {os.path.dirname(job.staging_dirs[o.name]) for o in spec.outputs}
    for folder in {f for o in spec.outputs for f in earlier_staging_dirs(job.staging_dirs[o.name], job.attempt)}:
        if os.path.lexists(folder):
            shutil.rmtree(folder, ignore_errors=True)
            if os.path.basename(os.path.dirname(folder)) == "outputs":  # an earlier layout's: it may be empty now
                try:
                    os.rmdir(os.path.dirname(folder))
                except OSError:
                    pass
    for folder in attempt_folders:
        try:  # after a local commit it is empty, or gone (renamed): one call instead of a tree walk
            os.rmdir(folder)
        except FileNotFoundError:
            continue
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
        # in a datastore that got only a destination, nothing is left in the step's folder above
        # it (the run's stays: another step of the run may be making its own in it now)
        try:
            os.rmdir(os.path.dirname(folder))
        except OSError:
            pass
