"""Spare interpreters, the agent's side: fresh interpreters per (interpreter, environment), ready
before the steps that use them. A step run by a spare is a cold start whose interpreter start
happened earlier: its own new process and interpreter, arguments, working directory, variables,
stdout/stderr files and exit code.

Where it can, each (interpreter, environment) has one spare that forks (``spare_boot.py --fork``,
``spare_job.serve``): an interpreter that has only started, and forks a child for each step, which
becomes the step as a spare does (~1 ms of CPU instead of an interpreter's start, ~15-20 ms).
Between steps it imports the standard-library modules its steps imported (``spare_learn``: only
those whose import changed nothing a step could see). It is started with the first step of its
environment, whatever the cores do, and used once it serves (a step starts cold meanwhile). What a
forked step shares with the other steps of that spare: Python's hash seed (set as an interpreter
starts), the address space layout, what the interpreter's start ran (``.pth`` files, a
``sitecustomize``), and those standard-library modules.

Elsewhere (no ``pidfd_open``, a thread left running by a ``.pth`` file, ``CAIRN_SPARE_INTERPRETERS=
started``) spares are interpreters started ahead that each take exactly one step (``spare_boot.py``),
started by one background thread only while a core is free (``may_start``): when every core runs a
step, a spare's start would only take CPU from them, and the next step starts cold as it would
anyway. They are replaced as they are taken. Both kinds exit on their own when the agent goes (their
standard input closes); one that forks once its children have ended."""

from __future__ import annotations

import itertools
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
SPARE_LEARN = str(Path(__file__).with_name("spare_learn.py"))
TAKE_TIMEOUT = 30.0  # a spare that has not taken its step by then (a start that hangs) is killed
MAX_KEYS = 4  # environments with spares at once: the least recently used one's are let go
MAX_FORK_DEATHS = 3  # a spare that forks and died this often: its environment's spares each take one step
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
    """Have ``spare_job.py``'s (or ``path``'s) bytecode written for this interpreter: a spare imports it at every
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
    """For each (interpreter, base environment) in use, a spare that forks (``fork``), or else up to
    ``per_key`` idle spares, started while ``may_start()`` (call ``poke()`` when it may have changed)."""

    def __init__(self, per_key: int, may_start: Callable[[], bool] = lambda: True, fork: bool = True,
                 say: Callable[[str], None] = lambda _message: None) -> None:
        """``say(message)``: where a spare that forks says it serves, or why it does not."""
        self.per_key = max(1, per_key)
        self._may_start = may_start
        self.fork = fork
        self._say = say
        self._idle: OrderedDict[Key, list[subprocess.Popen[bytes]]] = OrderedDict()
        self._envs: dict[Key, dict[str, str]] = {}
        self._forking: dict[Key, ForkingSpare] = {}
        self._fork_deaths: dict[Key, int] = {}
        self.not_forked: dict[Key, str] = {}  # why an environment's spares do not fork
        self._cond = threading.Condition()
        self._closed = False
        self._maker: threading.Thread | None = None

    def want(self, python: str, base_env: dict[str, str]) -> None:
        """Have spares of this interpreter and environment ready (started in the background)."""
        key = self._key(python, base_env)
        with self._cond:
            forking = self._forking.get(key)
            if forking is None or forking.dead:
                self._want(key, base_env)

    def take(self, python: str, base_env: dict[str, str],
             env: dict[str, str]) -> subprocess.Popen[bytes] | ForkedStep | None:
        """A spare started with ``base_env`` for a step with variables ``env`` (None: start it
        cold): a child its forking spare will fork, or one that takes one step (a new one is started
        to replace it; it may still be starting: it takes the step as soon as it is up)."""
        if not fits(base_env, env):
            return None  # the step would not start as it starts cold
        key = self._key(python, base_env)
        with self._cond:
            forking = self._forking.get(key)
            if forking is not None and not forking.dead:
                if key in self._idle:
                    self._idle.move_to_end(key)  # (recently used: its spares are let go last)
                # still starting: this step starts cold, at once, while it does (a start costs the same)
                return ForkedStep(forking) if forking.ready.is_set() else None
            spares = self._idle.get(key, [])
            spares[:] = [s for s in spares if s.poll() is None]
            spare = None
            if spares:
                up = _up(spares)
                spare = up[0] if up else spares[0]  # one that is up, else the one started first
                spares.remove(spare)
            self._want(key, base_env)
        return spare

    def launch(self, spare: subprocess.Popen[bytes] | ForkedStep, argv: list[str], cwd: str, stdout: str,
               stderr: str, env: dict[str, str], kept: str = "") -> bool:
        """Give ``spare`` its step. True once it said it took it (it is then the step's process);
        False when it did not (gone, or it could not enter the step's folder or open its logs):
        the caller starts the step cold, as it would have anyway."""
        if isinstance(spare, ForkedStep):
            return spare.forking.launch(spare, encode_job(argv, cwd, stdout, stderr, env, kept))
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
            forking = list(self._forking.values())
            self._idle.clear()
            self._forking.clear()
            self._cond.notify_all()
        for spare in spares:
            _let_go(spare)
        for server in forking:
            server.let_go()

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
            forking = self._forking.pop(old, None)
            if forking is not None:
                forking.let_go()
        if self._maker is None or not self._maker.is_alive():
            self._maker = threading.Thread(target=self._make, name="spare-interpreters", daemon=True)
            self._maker.start()
        self._cond.notify_all()

    def _forks(self, key: Key) -> bool:  # under self._cond
        return self.fork and key not in self.not_forked

    def _missing(self) -> tuple[Key, dict[str, str]] | None:  # under self._cond
        for key in reversed(self._idle):  # a forking spare: whatever the cores do (it starts once)
            forking = self._forking.get(key)
            if self._forks(key) and (forking is None or forking.dead):
                return key, self._envs[key]
        if not self._may_start():
            return None
        for key, spares in reversed(self._idle.items()):  # the most recently used environment first
            if self._forks(key):
                continue
            spares[:] = [s for s in spares if s.poll() is None]
            if len(spares) < self.per_key:
                return key, self._envs[key]
        return None

    def _start_forking(self, key: Key, env: dict[str, str]) -> None:
        """Start the forking spare of ``key`` (in the maker thread); where it cannot fork, or died too
        often, the environment's spares are started ones from then on."""
        with self._cond:
            forking = self._forking.get(key)
            if forking is not None and forking.dead:
                del self._forking[key]
                if forking.refusal is not None:  # it could not fork here
                    self.not_forked[key] = forking.refusal
                    return
                self._fork_deaths[key] = self._fork_deaths.get(key, 0) + 1
                if self._fork_deaths[key] >= MAX_FORK_DEATHS:
                    self.not_forked[key] = f"its spare that forks died {MAX_FORK_DEATHS} times"
                    return
                forking = None
            if forking is not None or self._closed or key not in self._idle:
                return  # there already, or let go meanwhile (another environment took its place)
            forking = self._forking[key] = ForkingSpare(key[0], env, self.poke, self._say)
        forking.spawn()  # (outside the lock: a shutdown meanwhile lets it go, and it starts nothing)

    def _make(self) -> None:
        ensure_compiled()
        ensure_compiled(SPARE_LEARN)
        while True:
            with self._cond:
                wanted = self._missing()
                while wanted is None and not self._closed:
                    self._cond.wait()
                    wanted = self._missing()
                if self._closed:
                    return
            key, env = wanted
            with self._cond:
                forks = self._forks(key)
            if forks:
                self._start_forking(key, env)
                continue
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


class ForkedStep:
    """A step's process that a ``ForkingSpare`` forks: ``pid`` (0 until taken), ``poll()``,
    ``wait(timeout)``, ``returncode``, ``kill()``, as ``subprocess.Popen`` has them, and ``lost``: why
    its exit status is unknown (its forking spare died while it ran)."""

    def __init__(self, forking: ForkingSpare) -> None:
        self.forking = forking
        self.pid = 0
        self.returncode: int | None = None
        self.lost: str | None = None
        self.taken = False
        self.abandoned = False  # not taken in time: killed if it says it took the step after all
        self.answered = threading.Event()  # taken, or ended without taking it
        self.ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def never_ran(self) -> bool:
        """No child was forked for it (its forking spare is gone, or stuck starting): ended, as a
        spare killed before it took its step. Returns False (not taken)."""
        self.returncode = -signal.SIGKILL
        self.answered.set()
        self.ended.set()
        return False

    def wait(self, timeout: float | None = None) -> int:
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"step process {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.pid and self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class ForkingSpare:
    """The agent's side of a spare that forks (``spare_job.serve``): jobs go to its standard input;
    a thread reads what its children took and how they ended from its standard output. Steps are
    given to it once it serves (``ready``)."""

    def __init__(self, python: str, env: dict[str, str], on_death: Callable[[], None] = lambda: None,
                 say: Callable[[str], None] = lambda _message: None) -> None:
        self.python = python
        self._say = say
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.dead = False
        self.ready = threading.Event()  # it serves, or it is dead
        self.refusal: str | None = None  # why it did not serve (it could not fork here)
        self.stuck = False  # it did not answer in time as it started (killed: counted as a death)
        self._on_death = on_death
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._jobs: dict[int, ForkedStep] = {}

    def spawn(self) -> None:
        """Start its process; a thread waits for it to serve (killing it after ``TAKE_TIMEOUT``), then
        reads what it says."""
        try:
            with self._lock:
                if self.dead:  # let go before it started
                    return
                self.proc = subprocess.Popen([self.python, SPARE_BOOT, "--fork"], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                             env={**self.env, "CAIRN_RUN_ID": RUN_ID_PLACEHOLDER},
                                             start_new_session=True)
        except OSError as exc:  # e.g. the environment's interpreter is gone: its steps start cold
            self.refusal = f"{self.python} could not be started ({exc})"
            self._died([])
            return
        threading.Thread(target=self._read, name=f"forking-spare-{self.proc.pid}", daemon=True).start()

    def launch(self, step: ForkedStep, job: bytes) -> bool:
        """Have a child forked for ``job``: True once it took it (``step`` is then its process)."""
        if not self.ready.wait(TAKE_TIMEOUT):
            return step.never_ran()
        with self._lock:
            if self.dead or self.proc is None or self.proc.stdin is None:
                return step.never_ran()
            job_id = next(self._ids)
            self._jobs[job_id] = step
            try:
                self.proc.stdin.write(b"%d %d\n%s" % (job_id, len(job), job))
                self.proc.stdin.flush()
            except (OSError, ValueError):  # gone (its reader says so to the others)
                del self._jobs[job_id]
                return step.never_ran()
        if step.answered.wait(TAKE_TIMEOUT) and step.taken:
            return True
        with self._lock:
            if step.taken:  # just now
                return True
            step.abandoned = True
            if job_id in self._jobs and not self.dead:  # stuck entering its folder: never a second copy
                try:
                    self.proc.stdin.write(b"%d kill\n" % job_id)
                    self.proc.stdin.flush()
                except (OSError, ValueError):
                    pass
        # whether it took the step after all decides: then the step ran (and was stopped), else a cold start
        step.ended.wait(TAKE_TIMEOUT)
        return step.taken

    def let_go(self) -> None:
        """No more jobs: it exits once its children have ended (they are still told)."""
        with self._lock:
            if self.proc is None:  # never started
                self.dead = True
                self.ready.set()
                return
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except OSError:
                pass

    def _read(self) -> None:
        """Its answers, until it is gone: its standard output closed, or (children that have not
        taken their step yet still hold that pipe) its process ended, seen through a pidfd."""
        assert self.proc is not None and self.proc.stdout is not None
        fd, pending = self.proc.stdout.fileno(), b""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            server = os.pidfd_open(self.proc.pid)
            poller.register(server, select.POLLIN)
        except OSError:  # (it serves only where pidfds are)
            server = -1
        deadline = time.monotonic() + TAKE_TIMEOUT
        while True:
            timeout = None if self.ready.is_set() or self.stuck else max(0.0, deadline - time.monotonic()) * 1000
            events = dict(poller.poll(timeout))
            if not events:  # stuck starting: killed, and counted as a death (its steps start cold meanwhile)
                self.stuck = True
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                continue
            if fd not in events:  # it ended; what it wrote before is read above first (poll says both)
                break
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if self.ready.is_set():
                    self._heard(line.split())
                elif line.endswith(b"+F"):  # up ("+"), and it forks ("F"); (what a .pth printed comes first)
                    self.ready.set()
                    self._say(f"spare interpreter pid {self.proc.pid} ({self.python}) serves: the steps of its "
                              f"environment are forked from it")
                elif b"+-" in line:
                    self.refusal = line.partition(b"+-")[2].decode(errors="replace")
        if server >= 0:
            os.close(server)
        with self._lock:  # it died (or ended, let go, once its children had): those left lose their ends
            self.dead = True
            left = list(self._jobs.values())
            self._jobs.clear()
        self.proc.stdout.close()
        self.proc.wait()
        self._died(left)

    def _died(self, left: list[ForkedStep]) -> None:
        with self._lock:
            self.dead = True
        if self.refusal is not None:
            self._say(f"spare interpreters of {self.python} do not fork: {self.refusal}; each takes one step")
        self.ready.set()
        for step in left:
            step.lost = (f"the spare interpreter that forked the step (pid {self.proc.pid if self.proc else '?'}) "
                         f"died while the step ran: the step was stopped and its exit status is unknown")
            step.returncode = -signal.SIGKILL
            step.answered.set()
            step.ended.set()
        self._on_death()

    def _heard(self, fields: list[bytes]) -> None:
        try:
            kind, job_id, pid = fields[0], int(fields[1]), int(fields[2])
            code = int(fields[3]) if kind == b"X" else 0
        except (IndexError, ValueError):  # not a line of its (nothing else writes there)
            return
        with self._lock:
            step = self._jobs.get(job_id)
            if step is None:
                return
            if kind == b"T":
                step.pid, step.taken = pid, True
                if step.abandoned:  # it took its step after all, later than it was given up: stopped
                    step.lost = (f"the step's process did not start within {TAKE_TIMEOUT:g} s of being forked "
                                 f"(entering its folder or opening its logs hung) and was stopped")
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
            elif kind == b"X":
                del self._jobs[job_id]
                step.pid = step.pid or pid
                step.returncode = code
                step.ended.set()
        step.answered.set()
