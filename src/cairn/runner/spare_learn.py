"""What a spare that forks (``spare_job.serve``) learns from its steps: the standard-library modules
they import, which it then imports itself, between jobs, so that the steps it forks next find them
imported (``argparse`` alone is ~5 ms of a step's CPU; ``logging``, ``json``, ``pathlib`` and the
standard-library half of ``pandas``' imports add up the same way).

Each forked step, once its script ended, tells its spare which modules it imported whose code is
the standard library's (not site-packages); the spare imports them one at a time while no job
waits. A forked step then differs from a cold start in that those modules are in ``sys.modules``
before its script runs, imported with the same variables (a spare only takes steps whose variables
are the ones it started with, but for Cairn's per-step ids) and the same ``sys.path`` but for the
script's folder. What keeps that from changing what a step does:

- a module is kept only if importing it printed nothing, warned nothing (``DeprecationWarning``s
  included), started no thread, and left ``sys.path``, the import hooks, the variables, the working
  folder, the umask, signal handlers and warning filters as they were; otherwise it is taken out of
  ``sys.modules`` again and never tried again. ``multiprocessing`` is never imported (it makes the
  process tree's secret ``authkey`` at import). Modules that keep per-process state reset it after
  a fork themselves (``random`` reseeds, ``threading``, ``logging`` and ``tempfile`` follow the pid),
  and ``logging``'s start time (``relativeCreated``) is set again in each step;
- a step whose script's folder (or a ``PYTHONPATH`` folder) has a file or folder named as one of
  those modules, which a cold start would import instead, is started cold (``spare_job._cold``).

Like ``spare_job``, this file is loaded from its bytecode by ``spare_boot.py`` and uses only what
Python loaded at start (``os``, ``sys``, ``io``) and the built-in ``_signal`` and ``_warnings``."""

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
_LINE_MAX = 4000  # one write of at most PIPE_BUF bytes is never interleaved with another child's

_STDLIB = os.path.dirname(os.__file__) + os.sep
_child = None  # in a forked step: (server pid, the report pipe's descriptor there, modules at fork)


def is_stdlib(module: object) -> bool:
    """Whether ``module`` is the standard library's: built in, frozen, or a file under the folder of
    ``os`` outside any site-packages folder."""
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if origin in ("built-in", "frozen"):
        return True
    return (isinstance(origin, str) and origin.startswith(_STDLIB)
            and "-packages" not in origin[len(_STDLIB):])  # site-packages, dist-packages


class Learner:
    """The forking spare's side: the report pipe, the modules it was told of, what it imported."""

    def __init__(self) -> None:
        self.reports, self._write_end = os.pipe()
        os.set_blocking(self.reports, False)
        self.wanted: dict = {}  # module name: None, in the order heard
        self.tried: set = set(sys.modules)
        self.tops: frozenset = frozenset()  # top-level names of what it imported
        self.ahead = _folders_ahead()
        self.tainted = False  # an import left a thread running: this process must not fork again
        self._partial = b""

    def heard(self) -> None:
        """Read what finished steps reported (``name name ...\\n`` lines)."""
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
                for name in os.fsdecode(line).split():
                    if name not in self.tried:
                        self.wanted[name] = None

    def import_next(self) -> None:
        """Import the next wanted module (the least nested first), and keep it only if importing it
        changed nothing a step could see but ``sys.modules``."""
        name = min(self.wanted, key=lambda n: n.count("."))
        del self.wanted[name]
        self.tried.add(name)
        if name in sys.modules or name.partition(".")[0] in NEVER:
            return
        before = set(sys.modules)
        state = _state()
        output = io.StringIO()
        streams = sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__
        saved_fds = [os.dup(fd) for fd in (0, 1, 2)]  # 0 and 1 are the agent's pipes
        sink = os.memfd_create("cairn-spare-import", 0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        filters = list(_warnings.filters)
        imported = False
        try:
            os.dup2(devnull, 0)
            os.dup2(sink, 1)
            os.dup2(sink, 2)
            sys.stdin = sys.__stdin__ = io.StringIO()
            sys.stdout = sys.stderr = sys.__stdout__ = sys.__stderr__ = output
            _warnings.filters[:] = [("error", None, Warning, None, 0)]  # any warning fails the import
            _warnings._filters_mutated()
            __import__(name)
            imported = True
        except BaseException:  # (a failed import, a warning): not kept
            pass
        finally:
            _warnings.filters[:] = filters
            _warnings._filters_mutated()
            sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__ = streams
            for fd, saved in enumerate(saved_fds):
                os.dup2(saved, fd)
                os.close(saved)
            os.close(devnull)
        printed = bool(output.getvalue()) or os.fstat(sink).st_size > 0
        os.close(sink)
        new = set(sys.modules) - before
        if _threads() > 1:
            self.tainted = True
        if (imported and not printed and not self.tainted and _state() == state
                and all(is_stdlib(sys.modules[n]) and n.partition(".")[0] not in NEVER for n in new)):
            self.tops |= {n.partition(".")[0] for n in new}
            self.tried |= new
            return
        _forget(new)
        _restore(state)

    def in_child(self, server: int) -> None:
        """In a forked step, first thing: no descriptor of the spare's stays open; the step reports
        through the spare's own (``report``)."""
        global _child
        _child = (server, self._write_end, frozenset(sys.modules))
        os.close(self.reports)
        os.close(self._write_end)
        logging = sys.modules.get("logging")
        if logging is not None:  # the one import-time clock of the standard library (relativeCreated)
            logging._startTime = sys.modules["time"].time()

    def shadowed(self, script: str, path0: bool) -> bool:
        """Whether a cold start of ``script`` could import something else under the name of a module
        this spare imported: a file or folder of that name in the script's folder (first on a cold
        start's ``sys.path``) or a ``PYTHONPATH`` folder."""
        if not self.tops:
            return False
        folders = ([os.path.dirname(os.path.abspath(script))] if path0 else []) + self.ahead
        for folder in folders:
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            if not self.tops.isdisjoint(entry.partition(".")[0] for entry in names):
                return True
        return False


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
                 if name not in known and name.partition(".")[0] not in NEVER and is_stdlib(module)]
        if not names or os.getppid() != server:  # (a process the step forked: not the spare's child)
            return
        fd = os.open(f"/proc/{server}/fd/{write_end}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except Exception:
        return
    try:
        line = ""
        for name in names:
            if len(line) + len(name) + 1 > _LINE_MAX:
                os.write(fd, line.encode() + b"\n")
                line = ""
            line += name + " "
        os.write(fd, line.encode() + b"\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def _folders_ahead() -> list:
    """The ``sys.path`` folders before the standard library's (``PYTHONPATH``'s)."""
    ahead = []
    for folder in sys.path:
        if os.path.abspath(folder or ".") + os.sep == _STDLIB:
            return ahead
        ahead.append(folder or ".")
    return []  # no standard-library folder on sys.path: nothing ahead of it to check


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


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
    return (list(sys.path), list(sys.meta_path), list(sys.path_hooks), sys.excepthook, sys.displayhook,
            sys.breakpointhook, dict(os.environ), os.getcwd(), umask, handlers, list(_warnings.filters),
            sys.getrecursionlimit())


def _restore(state: tuple) -> None:
    """Put back what a rejected import changed."""
    path, meta_path, path_hooks, excepthook, displayhook, breakpointhook, environ, cwd, umask, handlers, \
        filters, limit = state
    sys.path[:], sys.meta_path[:], sys.path_hooks[:] = path, meta_path, path_hooks
    sys.excepthook, sys.displayhook, sys.breakpointhook = excepthook, displayhook, breakpointhook
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    os.chdir(cwd)
    os.umask(umask)
    for number, handler in enumerate(handlers, start=1):
        if handler is not None and _signal.getsignal(number) is not handler:
            try:
                _signal.signal(number, handler)
            except (OSError, ValueError):
                pass
    _warnings.filters[:] = filters
    _warnings._filters_mutated()
    sys.setrecursionlimit(limit)


def _forget(names: set) -> None:
    """Take modules out of ``sys.modules`` again, and off the packages that had them as attributes."""
    for name in names:
        module = sys.modules.pop(name, None)
        parent, _, child = name.rpartition(".")
        if parent and parent not in names and getattr(sys.modules.get(parent), child, None) is module:
            try:
                delattr(sys.modules[parent], child)
            except AttributeError:
                pass
