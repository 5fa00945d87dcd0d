"""Spare interpreters, the agent's side: a few fresh interpreters per (interpreter, environment),
started ahead while other steps run, each taking exactly one step (``spare_boot.py``). A step run
by a spare is a cold start whose interpreter start happened earlier: its own new process and
interpreter, arguments, working directory, variables, stdout/stderr files and exit code.

Spares are started by one background thread (never on a step's path), only while a core is free
(``may_start``): when every core runs a step, a spare's start would only take CPU from them, and
the next step starts cold as it would anyway. They are replaced as they are taken, and exit on
their own when the agent goes (their standard input closes)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from cairn.runner.processes import RUN_ID_PLACEHOLDER

SPARE_BOOT = str(Path(__file__).with_name("spare_boot.py"))
SPARE_JOB = str(Path(__file__).with_name("spare_job.py"))
TAKE_TIMEOUT = 30.0  # a spare that has not taken its step by then (a start that hangs) is killed
MAX_KEYS = 4  # environments with spares at once: the least recently used one's are let go
# What Cairn adds for each step (ids, folders, parameters): nothing reads them as a process starts.
# Every other variable a step has is in the environment its spare started with (the dynamic
# loader, libc, Python and .pth files read theirs at start).
PER_STEP_PREFIXES = ("CAIRN_", "AML_PARAMETER_")

Key = tuple[str, tuple[tuple[str, str], ...]]


def fits(start_env: dict[str, str], env: dict[str, str]) -> bool:
    """Whether a spare started with ``start_env`` may run a step whose variables are ``env``."""
    for name in start_env.keys() | env.keys():
        if start_env.get(name) != env.get(name) and not name.startswith(PER_STEP_PREFIXES):
            return False
    return True


def encode_job(argv: list[str], cwd: str, stdout: str, stderr: str, env: dict[str, str], kept: str = "") -> bytes:
    """The job a spare reads (``spare_job.py``); ``kept``: where the script's compiled code is kept."""
    fields = [str(len(argv)), *argv, cwd, stdout, stderr, kept, *(f"{k}={v}" for k, v in env.items())]
    return b"\0".join(os.fsencode(f) for f in fields)


KEPT_CODE_DAYS = 7  # compiled scripts not written for this long are removed as the agent starts


def kept_code_path(folder: str, content_digest: str) -> str:
    """Where spares keep the compiled code of a script with this content (``<algorithm>:<hex>``)."""
    return os.path.join(folder, content_digest.partition(":")[2] or content_digest)


def prune_kept_code(folder: str | os.PathLike[str], max_age_days: float = KEPT_CODE_DAYS) -> int:
    """Remove compiled scripts older than ``max_age_days`` (a re-run compiles and keeps them again);
    returns how many went."""
    cutoff = time.time() - max_age_days * 86400
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass
    return removed


def ensure_compiled(path: str = "") -> None:
    """Have ``spare_job.py``'s bytecode written for this interpreter: a spare imports it at every
    start, and without it would compile it each time (``PYTHONDONTWRITEBYTECODE`` stops Python
    from writing it on its own)."""
    import importlib.util
    import py_compile

    path = path or SPARE_JOB
    try:
        cached = importlib.util.cache_from_source(path)
        source = os.stat(path)
        try:  # fresh as the import system judges it: magic, then the source's mtime and size it was made from
            with open(cached, "rb") as f:
                head = f.read(16)
        except OSError:
            head = b""
        made_from = (int(source.st_mtime) & 0xFFFFFFFF, source.st_size & 0xFFFFFFFF)
        if (len(head) < 16 or head[:4] != importlib.util.MAGIC_NUMBER or head[4:8] != b"\0\0\0\0"
                or (int.from_bytes(head[8:12], "little"), int.from_bytes(head[12:16], "little")) != made_from):
            py_compile.compile(path, cfile=cached, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    except Exception:  # e.g. an installation this user cannot write to: spares compile it themselves
        pass


class SparePool:
    """Up to ``per_key`` idle spares for each (interpreter, base environment) in use, started
    while ``may_start()`` (call ``poke()`` when it may have changed)."""

    def __init__(self, per_key: int, may_start: Callable[[], bool] = lambda: True) -> None:
        self.per_key = max(1, per_key)
        self._may_start = may_start
        self._idle: OrderedDict[Key, list[subprocess.Popen[bytes]]] = OrderedDict()
        self._envs: dict[Key, dict[str, str]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._maker: threading.Thread | None = None

    def want(self, python: str, base_env: dict[str, str]) -> None:
        """Have spares of this interpreter and environment ready (started in the background)."""
        with self._cond:
            self._want(self._key(python, base_env), base_env)

    def take(self, python: str, base_env: dict[str, str], env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        """A spare started with ``base_env`` for a step with variables ``env`` (None: start it
        cold); a new one is started to replace it. A spare may still be starting: it takes the
        step as soon as it is up."""
        if not fits(base_env, env):
            return None  # the step would not start as it starts cold
        key = self._key(python, base_env)
        with self._cond:
            spares = self._idle.get(key, [])
            spares[:] = [s for s in spares if s.poll() is None]
            spare = None
            if spares:
                up = _up(spares)
                spare = up[0] if up else spares[0]  # one that is up, else the one started first
                spares.remove(spare)
            self._want(key, base_env)
        return spare

    def launch(self, spare: subprocess.Popen[bytes], argv: list[str], cwd: str, stdout: str, stderr: str,
               env: dict[str, str], kept: str = "") -> bool:
        """Give ``spare`` its step. True once it said it took it (it is then the step's process);
        False when it did not (gone, or it could not enter the step's folder or open its logs):
        the caller starts the step cold, as it would have anyway."""
        assert spare.stdin is not None and spare.stdout is not None
        taken = False
        try:
            spare.stdin.write(encode_job(argv, cwd, stdout, stderr, env, kept))
            spare.stdin.close()  # end of file: the job is whole
            poller = select.poll()
            poller.register(spare.stdout, select.POLLIN)
            deadline = time.monotonic() + TAKE_TIMEOUT
            while not taken:  # "+" (it is up) may come first; then "!" (taken), or end of file
                if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    break  # stuck starting: it must not take the step later, cold starts it now
                answer = os.read(spare.stdout.fileno(), 8)
                if not answer:
                    break
                taken = b"!" in answer
        except OSError:
            pass
        if not taken:
            try:
                os.killpg(spare.pid, signal.SIGKILL)  # never a second copy of the step
            except OSError:
                pass
            _let_go(spare)
            return False
        spare.stdout.close()
        return True

    def poke(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            spares = [s for group in self._idle.values() for s in group]
            self._idle.clear()
            self._cond.notify_all()
        for spare in spares:
            _let_go(spare)

    # -- the maker thread --------------------------------------------------------------------

    @staticmethod
    def _key(python: str, base_env: dict[str, str]) -> Key:
        return python, tuple(sorted(base_env.items()))

    def _want(self, key: Key, base_env: dict[str, str]) -> None:  # under self._cond
        if self._closed:
            return
        self._envs[key] = base_env
        self._idle.setdefault(key, [])
        self._idle.move_to_end(key)
        while len(self._idle) > MAX_KEYS:  # an environment not used for a while: its spares go
            old, spares = self._idle.popitem(last=False)
            self._envs.pop(old, None)
            for spare in spares:
                _let_go(spare)
        if self._maker is None or not self._maker.is_alive():
            self._maker = threading.Thread(target=self._make, name="spare-interpreters", daemon=True)
            self._maker.start()
        self._cond.notify_all()

    def _missing(self) -> tuple[Key, dict[str, str]] | None:  # under self._cond
        if not self._may_start():
            return None
        for key, spares in reversed(self._idle.items()):  # the most recently used environment first
            spares[:] = [s for s in spares if s.poll() is None]
            if len(spares) < self.per_key:
                return key, self._envs[key]
        return None

    def _make(self) -> None:
        ensure_compiled()
        while True:
            with self._cond:
                wanted = self._missing()
                while wanted is None and not self._closed:
                    self._cond.wait()
                    wanted = self._missing()
                if self._closed:
                    return
            key, env = wanted
            try:
                spare = subprocess.Popen([key[0], SPARE_BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, env={**env, "CAIRN_RUN_ID": RUN_ID_PLACEHOLDER},
                                         start_new_session=True)
            except OSError:  # e.g. the environment's interpreter is gone: its steps start cold (and say why)
                with self._cond:
                    self._idle.pop(key, None)
                    self._envs.pop(key, None)
                continue
            with self._cond:
                if self._closed or key not in self._idle:
                    _let_go(spare)
                    continue
                self._idle[key].append(spare)


def _up(spares: list[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    """Those of ``spares`` that said they are up (one byte on their standard output)."""
    poller = select.poll()  # not select(): the agent may hold more than 1024 descriptors
    for s in spares:
        assert s.stdout is not None
        poller.register(s.stdout, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(0)}
    return [s for s in spares if s.stdout is not None and s.stdout.fileno() in ready]


def _let_go(spare: subprocess.Popen[bytes]) -> None:
    """An idle spare exits quietly once its standard input closes; reaped in the background."""
    for pipe in (spare.stdin, spare.stdout):
        try:
            if pipe is not None:
                pipe.close()
        except OSError:
            pass
    threading.Thread(target=spare.wait, daemon=True).start()
