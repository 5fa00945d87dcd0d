"""What a spare that forks (``spare_job.serve``) learns from its steps: the standard-library modules
they import, which it then imports itself, between jobs, so that the steps it forks next find them
imported (``argparse`` alone is ~5 ms of a step's CPU; ``json``, ``pathlib``, ``hashlib`` and the
standard-library half of ``pandas``' imports add up the same way).

Each forked step, once its script ended, tells its spare which modules it imported whose code is
the standard library's (built in, frozen, or under ``os``'s folder outside site-packages). When no
job waits and no step that reported is still running, the spare tries one of them in a throwaway
child of its own (a trial): it is kept only if importing it there printed nothing, warned nothing,
started no thread, registered no exit handler, read none of Cairn's per-step variables nor the whole
environment, ran no code from outside the standard library, and left ``sys.path``, the import hooks,
the working folder, the umask, signal handlers, warning filters and the recursion limit as they
were. Only then does the spare import it itself: it never runs an import that failed the trial.

A forked step then differs from a cold start in that those modules are in ``sys.modules`` before
its script runs; they were imported with the step's own variables but for Cairn's per-step ones (a
spare only takes such steps), and the same ``sys.path`` but for the script's folder: a step whose
script folder (or a ``PYTHONPATH`` entry) has a module or package named as one of them, which a cold
start would import instead, starts cold (``Learner.shadowed``). Modules that keep per-process state
reset it after a fork themselves (``random`` reseeds; ``threading`` and ``tempfile`` follow the pid).
Not covered: a script that itself puts a folder ahead of the standard library on ``sys.path`` and
imports a module of a learned name from it, and libraries that must run before some standard-library
module is imported (gevent's and eventlet's monkey-patching of ``ssl``): ``spare_interpreters=
"started"`` is exactly a cold start.

Like ``spare_job``, this file is loaded from its bytecode by ``spare_boot.py`` and uses only what
Python loaded at start (``os``, ``sys``, ``io``, ``_frozen_importlib``), the built-in ``_signal``
and ``_warnings``, and in a trial ``atexit``."""

import _signal
import _warnings
import io
import os
import sys

# never imported ahead: what their import does belongs to each process (multiprocessing's authkey),
# or changes how the terminal and input() behave (readline), or is a program rather than a library
NEVER = frozenset({"__main__", "multiprocessing", "readline", "rlcompleter", "this", "antigravity",
                   "__hello__", "__phello__", "tkinter", "_tkinter", "turtle", "turtledemo", "idlelib",
                   "sitecustomize", "usercustomize", "test", "pydoc", "pdb", "ensurepip", "venv"})
PER_STEP_PREFIXES = ("CAIRN_", "AML_PARAMETER_")  # (as spares.PER_STEP_PREFIXES, which this cannot import)
TRIAL_SECONDS = 10.0  # a trial import that has not ended by then is killed, and the module not kept
# a trial that took longer is not imported here: the spare's own import would hold up the jobs as long
IMPORT_MAX_SECONDS = 0.5
_LINE_MAX = 4000  # one write of at most PIPE_BUF bytes is never interleaved with another child's
_POLLIN = 1  # select.POLLIN on Linux (the spare's select module is not this file's to import)
_ERROR_FILTER = ("error", None, Warning, None, 0)

_STDLIB = os.path.dirname(os.__file__) + os.sep
_STDLIB_FOLDERS = (_STDLIB,)  # (tests add their stand-ins)
_MODULE = type(sys)
_child = None  # in a forked step: (server pid, the report pipe's descriptor there, modules at fork)


def is_stdlib(name: str, module: object) -> bool:
    """Whether ``module`` (``sys.modules[name]``) is a standard-library module of that name: a plain
    module (not a lazy one, which reading its spec would load) whose spec is built in, frozen, or a
    file under the folder of ``os`` outside site-packages. Submodules an extension module makes
    without a spec (``pyexpat.errors``) go with their top-level module."""
    if type(module) is not _MODULE or module.__dict__.get("__name__") != name or name.endswith(".__main__"):
        return False  # (an alias: sys.modules["mock"] = unittest.mock names another module)
    spec = module.__dict__.get("__spec__")
    if spec is None:
        top = name.partition(".")[0]
        return top != name and is_stdlib(top, sys.modules.get(top))
    origin = getattr(spec, "origin", None)
    return origin in ("built-in", "frozen") or _in_stdlib(origin)


def _in_stdlib(path: object) -> bool:
    """Whether ``path`` is a file or folder of the standard library's (not of site-packages)."""
    return isinstance(path, str) and any(path.startswith(folder) and "-packages" not in path[len(folder):]
                                         for folder in _STDLIB_FOLDERS)


class Learner:
    """The forking spare's side: the report pipe, what its steps imported, its trials, and what it
    imported itself. ``serve`` polls ``fds``, calls ``ready(fd, running pids)`` for each and ``work()``
    when ``timeout()`` passed with nothing to read; any error of these stops the learning, never the
    spare."""

    def __init__(self, poller: object, had_select: bool) -> None:
        self._poller = poller
        self._had_select = had_select
        self.reports, self._write_end = os.pipe()
        os.set_blocking(self.reports, False)
        poller.register(self.reports, _POLLIN)
        self.wanted: dict = {}  # module name: None, in the order heard
        self.tried: set = set(sys.modules)
        self.tops: frozenset = frozenset()  # top-level names of what it imported that a folder can shadow
        self.keep_select = False  # a module it imported uses `select`: children keep the spare's
        self.ahead = _folders_ahead()
        self.tainted = False  # an import left a thread running here: this process must not fork again
        self.stopped = False
        self._reporting: set = set()  # pids of running steps that reported: their ends come first
        self._trial = None  # (name, pid, verdict pipe, deadline, what it read so far, started)
        self._kept: list = []  # (name, whether it uses select) kept by their trials, to import here
        self._partial = b""

    @property
    def fds(self) -> set:
        return {self.reports} | ({self._trial[2]} if self._trial else set())

    def timeout(self) -> int | None:
        """How long ``serve`` may wait for a job (ms): 0 when a kept module waits to be imported or a
        trial can start, until an unfinished trial's deadline, None when there is nothing to do."""
        if self.stopped or self.tainted:
            return None
        if self._kept:
            return 0
        if self._trial is not None:
            return max(0, int((self._trial[3] - _clock()) * 1000) + 1)
        return 0 if self.wanted and not self._reporting else None

    def ready(self, fd: int, running: set) -> None:
        if fd == self.reports:
            self._heard(running)
        elif self._trial is not None and fd == self._trial[2]:
            self._read_verdict()

    def ended(self, pid: int) -> None:
        self._reporting.discard(pid)

    def work(self) -> None:
        """Import what a trial kept, kill an overdue trial, or start the next one (called while no
        job waits)."""
        if self._kept:
            self._import(*self._kept.pop(0))
        elif self._trial is not None:
            if _clock() >= self._trial[3]:
                os.kill(self._trial[1], 9)
                self._end_trial()
        elif self.wanted and not self._reporting:
            self._start_trial()

    def stop(self) -> None:
        """Learn no more (an unexpected error, the agent let the spare go, or a taint): what was
        imported stays, a trial under way is ended, nothing else is tried."""
        self.stopped = True
        self.wanted.clear()
        if self._trial is not None:
            try:
                os.kill(self._trial[1], 9)
            except OSError:
                pass
            self._end_trial()

    def in_child(self, server: int) -> None:
        """In a forked step, first thing: no descriptor of the spare's stays open; the step reports
        through the spare's own (``report``)."""
        global _child
        _child = (server, self._write_end, frozenset(sys.modules))
        os.close(self.reports)
        os.close(self._write_end)
        if self._trial is not None:
            os.close(self._trial[2])

    def shadowed(self, script_folder: str | None) -> bool:
        """Whether a cold start could import something else under the name of a module this spare
        imported: a module, package or folder of that name in ``script_folder`` (first on a cold
        start's ``sys.path``; None under -P) or a ``PYTHONPATH`` folder (a zip there: assumed to)."""
        if not self.tops:
            return False
        folders = ([script_folder] if script_folder is not None else []) + self.ahead
        for folder in folders:
            try:
                entries = os.listdir(folder)
            except NotADirectoryError:  # a zip: what it holds is not looked into
                return True
            except OSError:
                continue
            for entry in entries:
                stem, dot, suffix = entry.partition(".")
                if stem in self.tops and (not dot or suffix in ("py", "pyc") or suffix.endswith("so")):
                    return True
        return False

    def _heard(self, running: set) -> None:
        """Read what steps reported (``pid name name ...`` lines)."""
        while True:
            try:
                chunk = os.read(self.reports, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                fields = os.fsdecode(line).split()
                if not fields or not fields[0].isdecimal():
                    continue
                pid, names = int(fields[0]), fields[1:]
                if pid in running:  # it reported as it ended: imports wait for its end
                    self._reporting.add(pid)
                for name in names:
                    if name not in self.tried:
                        self.wanted[name] = None

    def _start_trial(self) -> None:
        # the least nested, heard last first: a module enters sys.modules again once it ran, after
        # what it imported, so the first tried of a step's report imports most of the rest
        name = min(reversed(self.wanted), key=lambda n: n.count("."))
        del self.wanted[name]
        self.tried.add(name)
        if name in sys.modules or name.partition(".")[0] in NEVER:
            return
        verdict_r, verdict_w = os.pipe()
        try:
            pid = os.fork()
        except BaseException:
            os.close(verdict_r)
            os.close(verdict_w)
            raise
        if pid == 0:
            code = 1
            try:
                os.close(verdict_r)
                code = _trial(name, verdict_w, self._had_select)
            finally:
                os._exit(code)
        os.close(verdict_w)
        os.set_blocking(verdict_r, False)
        started = _clock()
        self._trial = (name, pid, verdict_r, started + TRIAL_SECONDS, [], started)
        self._poller.register(verdict_r, _POLLIN)

    def _read_verdict(self) -> None:
        while True:
            try:
                chunk = os.read(self._trial[2], 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                break
            self._trial[4].append(chunk)
        name, verdict, took = self._trial[0], b"".join(self._trial[4]), _clock() - self._trial[5]
        self._end_trial()
        if verdict in (b"kept", b"kept select") and took <= IMPORT_MAX_SECONDS:
            self._kept.append((name, verdict == b"kept select"))

    def _end_trial(self) -> None:
        _name, pid, verdict_r, *_rest = self._trial
        self._trial = None
        self._poller.unregister(verdict_r)
        os.close(verdict_r)
        try:
            os.kill(pid, 9)  # (it said all it had to: it is not waited for)
        except OSError:
            pass
        os.waitpid(pid, 0)

    def _import(self, name: str, uses_select: bool) -> None:
        """Import ``name`` here, as it was tried (its output, were there any, away from the agent's
        pipes)."""
        before = set(sys.modules)
        with _Quiet():
            __import__(name)
        if threads() > 1:
            self.tainted = True
            return
        new = set(sys.modules) - before
        self.tried |= new
        self.keep_select = self.keep_select or uses_select
        shadowable = {n.partition(".")[0] for n in new if _from_file(sys.modules[n])}
        self.tops = self.tops | shadowable | ({"select"} if self.keep_select else set())


class _Quiet:
    """Standard streams and descriptors 0-2 away from the agent's pipes: input from /dev/null,
    output to a memfd (``printed`` says whether anything was written)."""

    def __init__(self, restore: bool = True) -> None:
        self.restore = restore  # a trial never gets the agent's pipes back: it only ends

    def __enter__(self) -> "_Quiet":
        self.output = io.StringIO()
        self.streams = sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__
        self.saved: list = []
        self.sink = -1
        try:
            if self.restore:
                for fd in (0, 1, 2):
                    self.saved.append(os.dup(fd))
            self.sink = os.memfd_create("cairn-spare-import", 0)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
            os.dup2(self.sink, 1)
            os.dup2(self.sink, 2)
        except BaseException:  # (out of descriptors): nothing stays changed, nothing leaks
            self._put_back()
            raise
        sys.stdin = sys.__stdin__ = io.StringIO()
        sys.stdout = sys.stderr = sys.__stdout__ = sys.__stderr__ = self.output
        return self

    def __exit__(self, *exc: object) -> None:
        self.printed = bool(self.output.getvalue()) or os.fstat(self.sink).st_size > 0
        self._put_back()

    def _put_back(self) -> None:
        sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__ = self.streams
        for fd, saved in enumerate(self.saved):
            os.dup2(saved, fd)
            os.close(saved)
        if self.sink >= 0 and self.restore:
            os.close(self.sink)


def _trial(name: str, verdict: int, had_select: bool) -> int:
    """In a throwaway child of the spare: import ``name`` and write "kept" (or "kept select": it
    needed ``select``) on ``verdict`` if that changed nothing a step could see but ``sys.modules``."""
    import atexit  # (built in; this process ends by os._exit)

    _signal.alarm(int(TRIAL_SECONDS) + 1)  # it ends on its own, whatever becomes of its spare
    if not had_select:
        sys.modules.pop("select", None)  # as in a step: whether the module needs it is the question
    before = set(sys.modules)
    if not _found_in_stdlib(name.partition(".")[0]):  # its code is never run
        return 0
    state = _state()
    handlers = atexit._ncallbacks()
    environ = os.environ
    seen = []

    class Watched(type(environ)):  # what the import reads of the variables
        def __getitem__(self, key: str) -> str:
            seen.append(key)
            return super().__getitem__(key)

        def __iter__(self):  # noqa: ANN204
            seen.append(None)
            return super().__iter__()

    _warnings.filters[:] = [_ERROR_FILTER]  # any warning fails the import
    _warnings._filters_mutated()
    with _Quiet(restore=False) as quiet:  # (the agent's pipes never come back here)
        environ.__class__ = Watched
        try:
            __import__(name)
            imported = True
        except BaseException:  # a failed import, a warning
            imported = False
        environ.__class__ = Watched.__mro__[1]
        filters = list(_warnings.filters)
    new = set(sys.modules) - before
    kept = (imported and not quiet.printed and threads() == 1 and atexit._ncallbacks() == handlers
            and filters == [_ERROR_FILTER] and _state() == state
            and not any(key is None or key.startswith(PER_STEP_PREFIXES) for key in seen)
            and all(n.partition(".")[0] not in NEVER and is_stdlib(n, sys.modules[n]) for n in new))
    if kept:
        os.write(verdict, b"kept select" if "select" in new else b"kept")
    return 0


def report() -> None:
    """In a forked step whose script ended: tell the spare which standard-library modules it
    imported (best effort: a spare that is gone, or a full pipe, loses nothing but time)."""
    global _child
    if _child is None:
        return
    server, write_end, known = _child
    _child = None
    try:
        names = [name for name, module in list(sys.modules.items())
                 if name not in known and name.partition(".")[0] not in NEVER and is_stdlib(name, module)]
        if not names or os.getppid() != server:  # (a process the step forked: not the spare's child)
            return
        fd = os.open(f"/proc/{server}/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        return
    try:
        head = f"{os.getpid()}"
        line = head
        for name in names:
            if len(line) + len(name) + 1 > _LINE_MAX:
                os.write(fd, line.encode() + b"\n")
                line = head
            line += " " + name
        os.write(fd, line.encode() + b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def _found_in_stdlib(top: str) -> bool:
    """Whether importing the top-level module ``top`` would run the standard library's code (found
    without running any)."""
    if top in sys.builtin_module_names:
        return True
    try:
        spec = sys.modules["_frozen_importlib"]._find_spec(top, None)
    except BaseException:
        return False
    if spec is None:
        return False
    origin = spec.origin
    if origin == "frozen":
        return True
    locations = list(spec.submodule_search_locations or [])
    paths = ([origin] if isinstance(origin, str) else []) + locations
    return bool(paths) and all(_in_stdlib(p) for p in paths)


def _from_file(module: object) -> bool:
    """Whether a folder on ``sys.path`` could shadow ``module`` (built-in and frozen modules are
    found before any folder is looked at)."""
    origin = getattr(module.__dict__.get("__spec__"), "origin", None) if type(module) is _MODULE else None
    return origin not in ("built-in", "frozen")


def _folders_ahead() -> list:
    """The ``sys.path`` entries before the standard library's folder (``PYTHONPATH``'s), but the
    standard library's own zip (``python311.zip``)."""
    ahead = []
    stdlib_zip = "python{}{}.zip".format(*sys.version_info[:2])
    for folder in sys.path:
        if os.path.abspath(folder or ".") + os.sep == _STDLIB:
            return ahead
        if os.path.basename(folder) != stdlib_zip:
            ahead.append(folder or ".")
    return []  # no standard-library folder on sys.path: nothing ahead of it to check


def threads() -> int:
    """How many threads this process runs (a fork has only the forking one)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # no /proc: what the threading module knows of, if it was imported
        threading = sys.modules.get("threading")
        return threading.active_count() if threading is not None else 1


def _clock() -> float:
    return sys.modules["time"].monotonic()


def _state() -> tuple:
    """What an import could change that a step would see, apart from ``sys.modules``."""
    umask = os.umask(0)
    os.umask(umask)
    handlers = []
    for number in range(1, _signal.NSIG):
        try:
            handlers.append(_signal.getsignal(number))
        except (OSError, ValueError):
            handlers.append(None)
    here = os.stat(".")
    return (list(sys.path), list(sys.meta_path), list(sys.path_hooks), sys.excepthook, sys.displayhook,
            sys.breakpointhook, (here.st_dev, here.st_ino), umask, handlers, sys.getrecursionlimit(),
            dict(os.environ))
