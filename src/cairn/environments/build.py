"""The environment cache: isolated Python environments built with uv, once per build digest.

Layout under ``<workspace>/.cairn/envs``::

    <key>/venv/            the environment (uv venv + uv pip install)
    <key>/cairn-client-<k>/ Cairn's client for steps in this environment, one per client version
    <key>/build.log        what uv printed while building it
    <key>/env.json         written last, atomically: the environment is complete
    <key>.build.lock       held exclusively while building (one builder across threads and processes)
    <key>.use.lock         held shared by every step using the environment; prune needs it exclusively

A build that fails or is interrupted leaves no ``env.json``; the next builder removes what it left.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cairn.environments import client_overlay
from cairn.environments.spec import (  # noqa: F401 (check_buildable: re-exported)
    MANAGED,
    cache_key,
    check_buildable,
    conda_problem,
    conda_solver,
    host_python,
)

MARKER = "env.json"
LOCK_WAIT_STEP = 0.2  # while another process builds: how often a waiting step checks for cancel


class EnvironmentBuildError(Exception):
    """The environment could not be built; the message says why (uv's error included)."""


def uv_binary() -> str:
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found:
            return found
    raise EnvironmentBuildError("uv is not installed: Cairn builds environments with it; `pip install uv`")


def find_python(version: str) -> str | None:
    """An interpreter of Python ``version`` ('3.11' or '3.11.7') on this machine, or None."""
    if version == host_python() or version == "{}.{}.{}".format(*sys.version_info[:3]):
        return getattr(sys, "_base_executable", None) or sys.executable
    minor = ".".join(version.split(".")[:2])
    candidates = [shutil.which(f"python{minor}")]
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if pyenv.is_dir():
        candidates += [str(p / "bin" / f"python{minor}") for p in sorted(pyenv.glob(f"{version}*"), reverse=True)]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            try:
                out = subprocess.run([c, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                continue
            if out == version or out.startswith(version + "."):
                return c
    return None


@dataclass
class ResolvedEnvironment:
    """A built environment a step is using. ``close()`` lets prune remove it again."""

    key: str
    folder: Path
    python: str  # the environment's interpreter
    bin_dir: str
    client_path: str  # CAIRN_CLIENT_PATH for the step
    built_now: bool
    _use_lock: IO[bytes] | None = None

    client_conflicts: tuple[str, ...] = ()

    def step_variables(self) -> dict[str, str]:
        variables = {"VIRTUAL_ENV": str(self.folder / "venv"), "CAIRN_CLIENT_PATH": self.client_path}
        if self.client_conflicts:
            variables["CAIRN_CLIENT_CONFLICTS"] = "; ".join(self.client_conflicts)
        return variables

    def close(self) -> None:
        if self._use_lock is not None:
            self._use_lock.close()
            self._use_lock = None


class _Tee:
    """Writes build output to the environment's build log and, while a step waits, to its log."""

    def __init__(self, *sinks: Callable[[str], None]) -> None:
        self.sinks = sinks

    def __call__(self, line: str) -> None:
        for s in self.sinks:
            s(line)


class EnvironmentCache:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        return self.root / key

    def is_built(self, key: str) -> bool:
        return (self.root / key / MARKER).is_file()

    def _lock_file(self, key: str, kind: str) -> IO[bytes]:
        self.root.mkdir(parents=True, exist_ok=True)
        return open(self.root / f"{key}.{kind}.lock", "ab")

    # -- resolving ---------------------------------------------------------------------------

    def resolve(self, spec: dict[str, Any], env_name: str, log: Callable[[str], None] = lambda _: None,
                attach: Callable[[subprocess.Popen[bytes]], None] | None = None,
                canceled: Callable[[], bool] = lambda: False) -> ResolvedEnvironment:
        """The built environment for ``spec``, building it first if no one has (the caller holds it
        in use until ``close()``)."""
        if spec.get("kind") != MANAGED:
            raise ValueError("only managed environments are built")
        key = cache_key(spec)
        use = self._lock_file(key, "use")
        try:
            fcntl.flock(use, fcntl.LOCK_SH)
            built_now = False
            if not self._ready(key, spec):
                built_now = self._build_locked(key, spec, env_name, log, attach, canceled)
            folder = self.folder(key)
            os.utime(folder / MARKER)  # last used: prune and `cairn env list` show it
            record = self._record(key)
            venv = folder / "venv"
            return ResolvedEnvironment(key, folder, str(venv / "bin" / "python"), str(venv / "bin"),
                                       str(client_overlay.client_folder(folder, spec["python"])), built_now, use,
                                       tuple(record.get("client_conflicts") or ()))
        except BaseException:
            use.close()
            raise

    def _record(self, key: str) -> dict[str, Any]:
        try:
            return json.loads((self.folder(key) / MARKER).read_text())
        except (OSError, ValueError):
            return {}

    def _ready(self, key: str, spec: dict[str, Any]) -> bool:
        folder = self.folder(key)
        return (folder / MARKER).is_file() and client_overlay.overlay_current(folder, spec["python"])

    def _build_locked(self, key: str, spec: dict[str, Any], env_name: str, log: Callable[[str], None],
                      attach: Callable[[subprocess.Popen[bytes]], None] | None,
                      canceled: Callable[[], bool]) -> bool:
        with self._lock_file(key, "build") as build_lock:
            if not _try_lock(build_lock):
                log(f"waiting: environment {env_name!r} is being built by another step or process")
                while not _try_lock(build_lock):
                    if canceled():
                        raise EnvironmentBuildError("canceled while waiting for the environment")
                    time.sleep(LOCK_WAIT_STEP)
            if self._ready(key, spec):
                log(f"environment {env_name!r} is ready ({self.folder(key)})")
                return False
            folder = self.folder(key)
            if (folder / MARKER).is_file():  # built, but Cairn's client changed: refresh only that
                self._refresh_overlay(folder, spec, log, attach)
                return False
            self._build(folder, spec, env_name, log, attach)
            return True

    def _refresh_overlay(self, folder: Path, spec: dict[str, Any], log: Callable[[str], None],
                         attach: Callable[[subprocess.Popen[bytes]], None] | None) -> None:
        with open(folder / "build.log", "a", encoding="utf-8") as build_log:
            tee = _Tee(log, lambda line: (build_log.write(line + "\n"), build_log.flush()))
            tee("refreshing Cairn's client in the environment")
            client_overlay.build_overlay(folder, spec["python"], str(folder / "venv/bin/python"),
                                         _runner(tee, attach), tee)

    def _build(self, folder: Path, spec: dict[str, Any], env_name: str, log: Callable[[str], None],
               attach: Callable[[subprocess.Popen[bytes]], None] | None) -> None:
        if folder.exists():  # what an interrupted or failed build left
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        started = time.monotonic()
        try:
            with open(folder / "build.log", "w", encoding="utf-8") as build_log:
                tee = _Tee(log, lambda line: (build_log.write(line + "\n"), build_log.flush()))
                run = _runner(tee, attach)
                tee(f"building environment {env_name!r} (Python {spec['python']}, "
                    f"{len(spec.get('pip') or [])} pip requirement(s)) in {folder}")
                self._create_venv(folder, spec, env_name, tee, run)
                site = _site_packages(folder / "venv")
                client_overlay.install_hook(site)
                client_overlay.build_overlay(folder, spec["python"], str(folder / "venv/bin/python"), run, tee)
                conflicts = client_overlay.client_conflicts(str(folder / "venv/bin/python")) \
                    if client_overlay.client_supported(spec["python"]) else []
                if conflicts:
                    tee("warning: this environment pins packages that Cairn's client also uses, at other versions: "
                        + "; ".join(conflicts) + ". Its own versions win, so Run.get_context() may fail in it.")
                elapsed = time.monotonic() - started
                tee(f"environment {env_name!r} built in {elapsed:.1f} s")
            record = {"name": env_name, "spec": spec, "built_at": time.time(), "build_seconds": round(elapsed, 3),
                      "client_conflicts": conflicts}
            tmp = folder / (MARKER + ".tmp")
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
            os.replace(tmp, folder / MARKER)  # the environment exists from here on
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _create_venv(self, folder: Path, spec: dict[str, Any], env_name: str, tee: _Tee,
                     run: Callable[[list[str], str], None]) -> None:
        uv = uv_binary()
        conda = spec.get("conda") or []
        solver = conda_solver() if conda else None
        venv = folder / "venv"
        if conda and solver is None:
            raise EnvironmentBuildError(conda_problem(spec, env_name) or "conda packages need a conda solver")
        if solver:  # conda packages first (with the asked Python), then pip packages with uv
            channels = [a for c in spec.get("channels") or ["conda-forge"] for a in ("-c", c)]
            run([solver, "create", "--yes", "--prefix", str(venv), *channels, f"python={spec['python']}", *conda],
                f"solving conda packages with {Path(solver).name}")
        else:
            python = find_python(spec["python"])
            run([uv, "venv", "--no-config", "--seed", "--color", "never", "--python", python or spec["python"],
                 str(venv)],
                f"creating a Python {spec['python']} environment"
                + ("" if python else " (not installed here: uv will try to download it)"))
        pip = list(spec.get("pip") or [])
        if pip:
            requirements = folder / "requirements.txt"
            requirements.write_text("\n".join(pip) + "\n")
            index = ["--index-url", spec["index_url"]] if spec.get("index_url") else []
            for extra in spec.get("extra_index_urls") or []:
                index += ["--extra-index-url", extra]
            run([uv, "pip", "install", "--no-config", "--color", "never", "--python", str(venv / "bin" / "python"),
                 "--compile-bytecode", *index, "-r", str(requirements)], "installing pip packages with uv")

    # -- listing and pruning -----------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Every built environment: key, name, spec, size, built and last-used times."""
        rows = []
        if not self.root.is_dir():
            return rows
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            marker = folder / MARKER
            try:
                record = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue  # being built, or what a failed build left (the next build clears it)
            rows.append({"key": folder.name, "name": record.get("name"), "spec": record.get("spec", {}),
                         "built_at": record.get("built_at"), "last_used": marker.stat().st_mtime,
                         "size": _folder_size(folder / "venv"), "folder": str(folder)})
        return rows

    def prune(self, needed: set[str], dry_run: bool = False) -> tuple[list[str], list[str]]:
        """Remove built environments whose key is not in ``needed`` and that no step uses now.
        Returns (removed keys, keys kept because a step is using them)."""
        removed, busy = [], []
        if not self.root.is_dir():
            return removed, busy
        # a build that failed left its lock files and no folder: those go too
        keys = {p.name for p in self.root.iterdir() if p.is_dir()} | \
            {p.name.split(".", 1)[0] for p in self.root.glob("*.lock")}
        for key in sorted(keys):
            folder = self.root / key
            if key in needed:
                continue
            with self._lock_file(key, "use") as use, self._lock_file(key, "build") as build:
                if not _try_lock(use, exclusive=True) or not _try_lock(build, exclusive=True):
                    busy.append(key)
                    continue
                if not dry_run:
                    (folder / MARKER).unlink(missing_ok=True)  # first: no one may pick it up any more
                    shutil.rmtree(folder, ignore_errors=True)
                    for kind in ("use", "build"):
                        (self.root / f"{key}.{kind}.lock").unlink(missing_ok=True)
                removed.append(key)
        return removed, busy


def _try_lock(f: IO[bytes], exclusive: bool = True) -> bool:
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _runner(tee: _Tee, attach: Callable[[subprocess.Popen[bytes]], None] | None
            ) -> Callable[[list[str], str], None]:
    """Runs a build's commands. A uv command that failed because the package index could not be
    reached runs once more from uv's cache alone (``--offline``): a machine without network builds
    what it has built before. It fails with the first error when the cache cannot do it either."""
    def run(argv: list[str], what: str) -> None:
        try:
            run_once(argv, what)
        except EnvironmentBuildError as exc:
            if Path(argv[0]).name != "uv" or not _UNREACHABLE.search(str(exc)):
                raise
            tee("the package index could not be reached: trying again from uv's cache alone (--offline)")
            if argv[1:2] == ["venv"]:  # what the first try made of the environment's folder
                shutil.rmtree(argv[-1], ignore_errors=True)
            try:
                run_once([argv[0], "--offline", *argv[1:]], f"{what}, from uv's cache")
            except EnvironmentBuildError:
                raise exc from None
            tee("done from uv's cache: the package index could not be reached")

    def run_once(argv: list[str], what: str) -> None:
        tee(f"{what}: {redact(' '.join(argv))}")
        # the build depends on the spec only: no uv settings of this machine or shell
        env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")
               and k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
        env.update({"NO_COLOR": "1", "UV_NO_PROGRESS": "1"})
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        if attach is not None:
            attach(proc)
        tail: list[str] = []
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = redact(raw.decode("utf-8", "replace").rstrip())
                tee(line)
                tail = (tail + [line])[-12:]
            code = proc.wait()
        except BaseException:  # Ctrl-C, or the step's thread giving up: uv must not go on writing
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
            raise
        if code != 0:
            detail = "\n".join(t for t in tail if t.strip())
            raise EnvironmentBuildError(f"{what} failed (exit code {code}):\n{detail}")
    return run


# what uv says when it cannot reach the package index at all (not an index that answered an error)
_UNREACHABLE = re.compile(r"dns error|error resolving DNS|failed to lookup address|tcp connect error|"
                          r"Connection refused|Network is unreachable|operation timed out|error sending request for url",
                          re.IGNORECASE)


def redact(text: str) -> str:
    """Credentials in index URLs (``https://user:token@host``) never reach a log."""
    return re.sub(r"(://)[^/@\s:]+(:[^/@\s]*)?@", r"\1***@", text)


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise EnvironmentBuildError(f"no site-packages folder in {venv}")
    return found[0]


def _folder_size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


