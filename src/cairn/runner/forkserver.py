"""Warm step start: a server that imports a list of modules once, then forks a fresh child for each
step, which runs the step's script as ``python script.py args`` would.

This file runs as a script under the step environment's own interpreter and uses only the
standard library. Usage: ``python forkserver.py SOCKET MODULE...``; it prints one JSON line when
ready and exits when its standard input closes (the agent that started it is gone).

Protocol, one Unix-socket connection per step: the client sends one JSON line
``{"argv", "cwd", "env", "stdout", "stderr"}``; the server answers ``{"pid": N}`` once the child
exists (in its own session and process group, so the client can kill the group), then ``{"exit": CODE}`` when
it ends (a negative code is the signal that killed it).
"""

from __future__ import annotations

import sys

_AT_START = frozenset(sys.modules)  # what `python script.py` has imported before the script runs
_AT_START_TOP = frozenset(n.partition(".")[0] for n in _AT_START)

import gc  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from importlib.machinery import all_suffixes  # noqa: E402

_MODULE_SUFFIXES = sorted(all_suffixes(), key=len, reverse=True)  # the longest first: .cpython-311-...so before .so

_THIS_FILE = os.path.abspath(__file__)
MAX_REQUEST = 1 << 25
# Cairn's step-side client (Run.get_context()): imported once too, where the environment has it.
# One module at a time, between steps. Not the store (SQLAlchemy): a step's run context goes
# through the agent, and every module here makes each fork copy more page tables.
STEP_CLIENT = ["cairn.client.run", "cairn.client.workspace", "cairn.client.experiment", "cairn.backend.through_agent"]
QUIET_SECONDS = 0.05
INTERRUPTED = -1  # the script ended on an uncaught KeyboardInterrupt
# What every child uses on its way in and out: imported once here, not once per step.
CHILD_NEEDS = ["atexit", "random", "threading", "traceback", "types", "importlib.machinery"]


def main() -> None:
    sock_path = sys.argv[1]
    _leave_with_the_agent_while_importing()
    try:
        _serve_forever(sock_path, sys.argv[2:])
    finally:  # the agent made the folder for this server alone; it may be gone before it can remove it
        for remove in (os.unlink, os.rmdir):
            try:
                remove(sock_path if remove is os.unlink else os.path.dirname(sock_path))
            except OSError:
                pass


def _serve_forever(sock_path: str, modules: list[str]) -> None:
    del sys.path[0]  # this file's folder: the steps' scripts must not import Cairn's runner modules by chance
    ready_fd = os.dup(1)
    os.dup2(2, 1)  # what the imports print goes to the server's log, never into the ready line
    if not hasattr(os, "pidfd_open") or not hasattr(os, "waitstatus_to_exitcode"):
        _ready(ready_fd, {"ready": False, "reason": f"Python {sys.version.split()[0]} has no os.pidfd_open"})
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        _ready(ready_fd, {"ready": False, "reason": f"this kernel has no pidfd_open ({exc})"})
        return
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)  # first: a path that cannot be bound costs no imports
    os.chmod(sock_path, 0o600)
    server.listen(64)
    started = time.monotonic()
    preloaded, failed = [], []
    environment = dict(os.environ)
    with _StatsAsRead(_installed_folders()) as read:  # the user's own module files, as a preload read them
        for name in modules:
            state = _process_state()
            before = set(sys.modules)
            try:
                importlib.import_module(name)
                preloaded.append(name)
            except BaseException as exc:  # the step imports it itself (and fails there, with its own error);
                # a module that calls sys.exit() or raises KeyboardInterrupt as it is imported too
                failed.append(f"{name}: {type(exc).__name__}: {exc}")
                _restore_process_state(state)  # what it changed before failing is not every step's
                try:
                    read.failed(name, exc)  # fixed later, it is preloaded then: a restart
                except Exception:  # (what it failed on cannot be told: not watched)
                    pass
            for module in _modules_of(set(sys.modules) - before):
                read.imported(_file_of(module))  # (an extension module: stated now)
    # variables the preloads set (a library's import may set some): a cold step's imports set them too
    _SET_BY_PRELOADS.update({k: v for k, v in os.environ.items() if environment.get(k) != v})
    for name in CHILD_NEEDS:
        importlib.import_module(name)
    watched = [[path, st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev, read.digest(path), "file"]
               for path, st in read.files.items()]
    watched += [[path, st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev, None, "folder"]
                for path, st in _searched_before(read.files, read.installed).items()]
    read.contents.clear()  # (digested)
    _BASE_PATH[:] = _base_path()
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ, ("accept", None, None))
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, ("parent", None, None))
    _ready(ready_fd, {"ready": True, "pid": os.getpid(), "preloaded": preloaded, "failed": failed,
                      "import_seconds": round(time.monotonic() - started, 3),
                      "watched": watched, "threads": _threads_started()})
    accepting = True
    # Cairn's step-side client is imported once the server has been quiet for a moment (no request,
    # no step ending): a burst of short steps never waits for it (~0.3 s), and a step that calls
    # Run.get_context() later finds it imported.
    idle_imports = list(STEP_CLIENT)
    while accepting or sel.get_map():  # after the agent leaves: until the running steps have ended
        events = sel.select(timeout=QUIET_SECONDS if idle_imports else None)
        if not events and idle_imports:
            try:
                importlib.import_module(idle_imports.pop(0))
            except Exception:
                pass  # a step that calls Run.get_context() imports it itself
            continue
        for key, _ in events:
            kind, pid, conn = key.data
            if kind == "parent":
                if not os.read(sys.stdin.fileno(), 4096):  # the agent is gone or done with us
                    sel.unregister(key.fileobj)
                    sel.unregister(server)
                    server.close()
                    accepting = False
            elif kind == "accept":
                client, _ = server.accept()
                if _peer_uid(client) != os.getuid():
                    client.close()  # only the user who started the server may run code in it
                    continue
                _serve(client, server, sel)
            else:  # a child ended: tell its client
                _, status = os.waitpid(pid, 0)
                sel.unregister(key.fileobj)
                os.close(key.fd)
                _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                conn.close()


_SET_BY_PRELOADS: dict[str, str] = {}  # variables the preloaded modules set as they were imported


def _installed_folders() -> tuple[str, ...]:
    """Where installed code lives (the standard library, site-packages, the user's site-packages),
    which a user edits rarely and which holds thousands of files: not watched. As spelled and with
    links resolved. (Not through ``sysconfig``: a module the server imports, every warm step has.)"""
    import site

    paths = {os.path.dirname(os.__file__)}  # the standard library (its lib-dynload inside)
    try:
        paths.update(site.getsitepackages())
        paths.add(site.getusersitepackages())
    except AttributeError:  # (a site module without them)
        pass
    return tuple({f(p) + os.sep for p in paths if p for f in (os.path.abspath, os.path.realpath)})


def _modules_of(names: set[str]) -> list[object]:
    return [m for m in (sys.modules.get(n) for n in names) if m is not None]


def _file_of(module: object) -> object:
    """A module's ``__file__``, read from its namespace: not through the module's own attribute
    look-up, which imports a lazily loaded module (``importlib.util.LazyLoader``)."""
    try:
        return object.__getattribute__(module, "__dict__").get("__file__")
    except Exception:  # (not a module: anything may sit in sys.modules)
        return None


class _StatsAsRead:
    """While the preloads import: the stat of each of the user's own module source files (not
    ``installed`` code) as the import system reads it (``SourceFileLoader.path_stats`` comes right
    before the source, or its cached bytecode, is read): an edit made later, even while the same
    preload still imports, is then seen; a file a preload writes before importing it is stated as
    written. The path as imported: a symlink re-pointed changes what it stats as."""

    def __init__(self, installed: tuple[str, ...]) -> None:
        self.installed = installed
        self.files: dict[str, os.stat_result] = {}
        self.contents: dict[str, bytes] = {}  # of the files changed too recently for their stat to tell

    def __enter__(self) -> _StatsAsRead:
        from importlib.machinery import SourceFileLoader

        self._real = real = SourceFileLoader.path_stats

        def path_stats(loader: object, path: str) -> dict:
            self._state(path, again=True)  # (the last read counts: a file written again, imported again)
            return real(loader, path)

        SourceFileLoader.path_stats = path_stats  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from importlib.machinery import SourceFileLoader

        SourceFileLoader.path_stats = self._real  # type: ignore[method-assign]

    def _state(self, path: object, again: bool = False) -> None:
        if not isinstance(path, str) or not path:
            return
        where = os.path.abspath(path)
        if where == _THIS_FILE:  # (a failed preload's traceback has this file's frames)
            return
        if (where in self.files and not again) or self._installed(where):
            return
        now = time.time_ns()  # (before the stat: see changed_too_recently)
        try:
            st = os.stat(where)
        except ValueError:  # (a NUL byte)
            return
        except OSError:  # not a file's name ("<string>"), or a member of a zip archive: the archive
            where = _archive_of(where)
            if where is None or self._installed(where):
                return
            try:
                st = os.stat(where)
            except OSError:
                return
        if not stat.S_ISREG(st.st_mode):
            return
        self.files[where] = st
        self.contents.pop(where, None)
        if changed_too_recently(st, now):
            try:
                with open(where, "rb") as file:
                    self.contents[where] = file.read()
            except OSError:
                pass

    def _installed(self, path: str) -> bool:
        """Installed code, as spelled or with links resolved: not watched."""
        return path.startswith(self.installed) or os.path.realpath(path).startswith(self.installed)

    def digest(self, path: str) -> str | None:
        """The SHA-512 of a file's content as it was read while its stat could not tell an edit
        (``changed_too_recently``), or None. (``random``, which every child needs, has loaded
        ``_sha512``, ``_sha2`` from Python 3.12.)"""
        content = self.contents.get(path)
        if content is None:
            return None
        sha512 = getattr(sys.modules.get("_sha512") or sys.modules.get("_sha2"), "sha512", None)
        if sha512 is None:  # (a build without it: random took hashlib's)
            from hashlib import sha512
        return sha512(content).hexdigest()

    def imported(self, path: object) -> None:
        """A module file the import system did not state (an extension module): stated now."""
        self._state(path)

    def failed(self, name: str, exc: BaseException) -> None:
        """A preload that failed: the files its failure came from (a syntax error's, the frames')
        and the file it would be read from, stated now (its import read them, or not at all)."""
        paths = [getattr(exc, "filename", None) if isinstance(exc, SyntaxError) else None, _origin(name)]
        tb = exc.__traceback__
        while tb is not None:
            paths.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        for path in paths:
            self._state(path)


def _searched_before(files: dict[str, os.stat_result], installed: tuple[str, ...]) -> dict[str, os.stat_result]:
    """The folders of ``sys.path`` searched before the one each of ``files`` (the user's own module
    files) was found in: a module of the same name put there later would shadow it in a cold
    start, and adding one changes the folder's stat. Installed code's folders are left out."""
    entries = [os.path.abspath(e) for e in sys.path if isinstance(e, str)]

    def found_in(path: str) -> int:
        """The entry it was found in: the longest that holds it (``/proj/src`` rather than ``/proj``),
        or that is it (a zip archive); 0 for one found in none (loaded from its path by a preload)."""
        holding = [i for i, e in enumerate(entries) if path == e or path.startswith(e + os.sep)]
        return max(holding, key=lambda i: len(entries[i]), default=0)

    last = max(map(found_in, files), default=0)
    searched: dict[str, os.stat_result] = {}
    for folder in entries[:last]:
        if folder in searched or (folder + os.sep).startswith(installed):
            continue
        try:
            st = os.stat(folder)
        except OSError:  # (a folder that is not there yet: not watched)
            continue
        if stat.S_ISDIR(st.st_mode):
            searched[folder] = st
    return searched


def _threads_started() -> list[str]:
    """The Python threads the preloads started and left running: a forked child has none of them
    (only the thread that forks survives a fork)."""
    threading = sys.modules.get("threading")
    if threading is None:
        return []
    main = threading.main_thread()
    return sorted(t.name for t in threading.enumerate() if t is not main and t.is_alive())


def _fs_tick_ns() -> int | None:  # (Cairn's own, in the agent, warns about a value that is not a number)
    try:
        seconds = float(os.environ.get("CAIRN_FS_TICK_SECONDS") or "nan")
    except ValueError:
        return None
    return int(seconds * 1e9) if 0 <= seconds < 1e9 else None


_FS_TICK_NS = _fs_tick_ns()


def changed_too_recently(st: os.stat_result, now_ns: int) -> bool:
    """As ``cairn.core.digests.changed_too_recently`` (this file imports nothing of Cairn's): a
    file an edit at the same size may change without changing its stat. Its content is compared."""
    if _FS_TICK_NS is not None:
        window = _FS_TICK_NS
    else:
        window = 2_000_000_000 if st.st_mtime_ns % 1_000_000_000 == 0 else 20_000_000
    return now_ns - st.st_ctime_ns < window


def _archive_of(path: str) -> str | None:
    """The zip archive a module was imported from (``/x/lib.zip/pkg/mod.py`` -> ``/x/lib.zip``):
    the longest leading part of the path that is a file. Editing any module in it changes it."""
    head = path
    while True:
        head, tail = os.path.split(head)
        if not tail or not head:
            return None
        if os.path.isfile(head):
            return head


def _origin(name: str) -> str | None:
    """The file a module that failed to import would be read from (None when none is found),
    looked up without importing anything (a dotted name's parent only where it is imported)."""
    from importlib.machinery import PathFinder

    parent, _, _ = name.rpartition(".")
    try:
        if parent:
            search = getattr(sys.modules.get(parent), "__path__", None)
            spec = PathFinder.find_spec(name, list(search)) if search is not None else None
        else:
            spec = PathFinder.find_spec(name)
    except Exception:
        return None
    return spec.origin if spec is not None and spec.has_location else None


def _process_state() -> tuple:
    """What a module's import may change for the whole process and a failed preload must not leave
    behind: the variables, the warning filters, the root logger's handlers and level."""
    import warnings

    logging = sys.modules.get("logging")
    root = (list(logging.root.handlers), logging.root.level) if logging else None
    return dict(os.environ), list(warnings.filters), root


def _restore_process_state(state: tuple) -> None:
    import warnings

    environment, filters, root = state
    for name in [k for k in os.environ if k not in environment]:
        del os.environ[name]
    os.environ.update(environment)
    warnings.filters[:] = filters
    warnings._filters_mutated()  # type: ignore[attr-defined]
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.root.handlers[:], level = root if root else ([], logging.WARNING)
        logging.root.setLevel(level)


def _leave_with_the_agent_while_importing(leave: bool = True) -> None:
    """An import that hangs must not keep this server once the agent that waits for it is gone:
    until it is ready, the server is killed when the agent's thread that started it ends (after,
    it leaves when its standard input closes, once its running steps have ended)."""
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL if leave else 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _ready(fd: int, message: dict) -> None:
    _leave_with_the_agent_while_importing(False)  # first: the thread that started it ends on this line
    os.write(fd, (json.dumps(message) + "\n").encode())
    os.close(fd)


def _peer_uid(conn: socket.socket) -> int:
    import struct

    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:
        pass  # the client gave up (its step was canceled): nothing to tell


def _serve(conn: socket.socket, server: socket.socket, sel: selectors.BaseSelector) -> None:
    data = bytearray()  # not bytes: += would copy what came so far at every chunk
    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
        chunk = conn.recv(1 << 20)
        if not chunk:
            conn.close()
            return
        data += chunk
    try:  # a bad request is refused (its step starts cold); the server goes on for the others
        if not data.endswith(b"\n") or len(data) > MAX_REQUEST:
            raise ValueError(f"the request is over {MAX_REQUEST} bytes")
        request = json.loads(data.decode("utf-8", "surrogateescape"))  # variables need not be UTF-8
        shadowed = _own_copies(request)
    except Exception as exc:  # whatever it was (even nested too deep to parse): refused, the server goes on
        _send(conn, {"error": f"{type(exc).__name__}: {exc}"[:500]})
        conn.close()
        return
    if shadowed:
        _send(conn, {"shadowed": shadowed})
        conn.close()
        return
    # Everything the server holds goes to the permanent generation: a child's collections (and its
    # final one) then scan only what the step made, and never touch, so never copy, the server's pages.
    gc.freeze()
    session_made, made = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(session_made)
        _child(request, conn, server, sel, made)  # never returns
    os.close(made)
    try:  # its session (and group) exists before the pid is answered: a kill of the group must reach it
        os.read(session_made, 1)  # "" once the child closed its end (or died)
    finally:
        os.close(session_made)
    _send(conn, {"pid": pid})
    pidfd = os.pidfd_open(pid)
    sel.register(pidfd, selectors.EVENT_READ, ("child", pid, conn))


def _own_path(step_path: str, server_path: list[str]) -> list[str]:
    """The entries of a step's PYTHONPATH the server's sys.path lacks: those it has not, and every
    relative one (the server read it from its own folder, the step reads it from its working folder;
    an empty entry is that folder, as Python reads it)."""
    entries = step_path.split(os.pathsep) if step_path else []
    return [p or "." for p in entries if not os.path.isabs(p) or p not in server_path]


def _own_copies(request: dict) -> list[str]:
    """The step's own modules (beside its script, or in a folder of its own PYTHONPATH) that this
    server has imported by now (at start, or since: Cairn's client, lazily): the step would get the
    server's copy, where a cold start imports its own."""
    imported = {n.partition(".")[0] for n in sys.modules} - _AT_START_TOP
    cwd = request["cwd"]
    server_path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    script_folder = os.path.dirname(os.path.join(cwd, request["argv"][1]))
    folders = [script_folder,
               *(os.path.join(cwd, p) for p in _own_path(request["env"].get("PYTHONPATH", ""), server_path))]
    found = set()
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        # Python imports a sitecustomize or usercustomize of the PYTHONPATH as it starts (the
        # script's folder is not on sys.path yet then): a fork of this server never would
        at_start = _START_HOOKS if folder != script_folder else frozenset()
        for entry in names:
            name = module_name(entry, lambda e=entry, f=folder: _has_init(os.path.join(f, e)))
            if name in imported or name in at_start:
                found.add(os.path.normpath(os.path.join(folder, entry)))
    return sorted(found)


_START_HOOKS = frozenset({"sitecustomize", "usercustomize"})


def module_name(entry: str, is_package: Callable[[], bool]) -> str:
    """The module an import finds in the folder entry ``entry`` (``mod.py``, ``mod.pyc``, an
    extension ``mod.cpython-311-x86_64-linux-gnu.so``, or a package ``mod/`` when ``is_package()``),
    or ""."""
    for suffix in _MODULE_SUFFIXES:
        if entry.endswith(suffix) and len(entry) > len(suffix):
            return entry[:-len(suffix)]
    return entry if "." not in entry and is_package() else ""


def _has_init(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f"__init__{suffix}")) for suffix in _MODULE_SUFFIXES)


def _child(request: dict, conn: socket.socket, server: socket.socket, sel: selectors.BaseSelector,
           session_made: int) -> None:
    code = 1
    try:
        try:
            os.setsid()  # its own session and process group, as a cold step's (start_new_session)
        finally:
            os.close(session_made)  # the server answers the pid now
        mark_environ(request["env"].get("CAIRN_RUN_ID"))
        for fileobj in [k.fileobj for k in sel.get_map().values()]:
            if isinstance(fileobj, int) and fileobj > 2:
                os.close(fileobj)  # other children's pidfds
        sel.close()
        server.close()
        conn.close()
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        fds = [os.open(os.devnull, os.O_RDONLY),
               os.open(request["stdout"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644),
               os.open(request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # PYTHONUNBUFFERED, as for cold steps: a killed step's last partial line is in its log. The
        # encodings and error handlers a cold start would choose: the server's, chosen at its start.
        # Also sys.__stdout__ & co., as Python's: a script that re-wraps sys.stdout's buffer leaves
        # the first wrapper alive there (freed, it would close the buffer under the new one).
        sys.stdin = sys.__stdin__ = _stream(0, sys.__stdin__, "<stdin>")
        sys.stdout = sys.__stdout__ = _stream(1, sys.__stdout__, "<stdout>")
        sys.stderr = sys.__stderr__ = _stream(2, sys.__stderr__, "<stderr>")
        os.environ.clear()
        os.environ.update(request["env"])
        for name, value in _SET_BY_PRELOADS.items():
            os.environ.setdefault(name, value)
        script = os.path.abspath(request["argv"][1])
        sys.argv = request["argv"][1:]
        sys.orig_argv = list(request["argv"])  # `python script.py args`, not this server's command
        # a warning raised at the script's top level names _run's frame: not as __main__ (whose
        # DeprecationWarnings Python shows), as spare_boot.py does
        globals()["__name__"] = "cairn_forkserver"
        sys.path[:] = _step_path(script, os.environ.get("PYTHONPATH", ""))
        if hasattr(time, "tzset"):
            time.tzset()  # TZ of the step, not of the server
        _reseed()
        code = _run(script, frozenset(sys.modules))
    finally:
        if code == INTERRUPTED:  # as Python ends on an uncaught KeyboardInterrupt: killed by SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            code = 128 + signal.SIGINT
        os._exit(code)


_BASE_PATH: list[str] = []  # the interpreter's own sys.path, without PYTHONPATH (asked at the server's start)


def _base_path() -> list[str]:
    """What this interpreter puts on sys.path after the script's folder when no PYTHONPATH is set
    (the standard library, site-packages and what their .pth files add): asked of a fresh one, as
    the server's own path mixes in its PYTHONPATH, resolved from the agent's folder."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        out = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
                             env=env, capture_output=True, text=True, timeout=60, check=True).stdout
        return [p for p in json.loads(out) if isinstance(p, str)]
    except (OSError, ValueError, subprocess.SubprocessError):  # as before: the server's own, less its PYTHONPATH
        mine = {os.path.abspath(p or os.curdir) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)}
        return [p for p in sys.path if p not in mine]


def _step_path(script: str, pythonpath: str) -> list[str]:
    """sys.path as ``python script.py`` has it with this PYTHONPATH (from the step's folder): the
    script's folder, the PYTHONPATH entries in their order, then the interpreter's own."""
    own = [os.path.abspath(p or os.curdir) for p in pythonpath.split(os.pathsep)] if pythonpath else []
    path: list[str] = []
    for entry in (os.path.dirname(script), *own, *_BASE_PATH):
        if entry not in path:
            path.append(entry)
    return path


def _stream(fd: int, like: io.TextIOWrapper | None, name: str) -> io.TextIOWrapper:
    """A standard stream as a cold step's under PYTHONUNBUFFERED, into a file: written through, not
    line-buffered, unbuffered below (standard input is still read through a buffer)."""
    raw = io.FileIO(fd, "r" if fd == 0 else "w", closefd=False)
    raw.name = name  # type: ignore[misc]  # as Python names its standard streams
    below = io.BufferedReader(raw) if fd == 0 else raw
    stream = io.TextIOWrapper(below, encoding=like.encoding if like else None,  # type: ignore[arg-type]
                              errors=like.errors if like else None, line_buffering=False, write_through=True)
    stream.mode = "r" if fd == 0 else "w"  # type: ignore[misc]
    return stream


def _reseed() -> None:
    """Children of one server would otherwise share the random state the server had."""
    import random

    random.seed()
    process = sys.modules.get("multiprocessing.process")
    if process is not None:  # the key its connections authenticate with: each process makes its own
        process.current_process().authkey = os.urandom(32)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        try:
            numpy.random.seed()
        except Exception:
            pass


def _run(script: str, server_modules: frozenset[str] = frozenset()) -> int:
    import threading
    import traceback
    import types
    from importlib.machinery import SourceFileLoader

    code = 0
    failure: BaseException | None = None
    try:  # what `python script.py` does: a fresh __main__ module, the script's code run in it
        main = types.ModuleType("__main__")
        main.__file__ = script
        main.__cached__ = None
        main.__loader__ = SourceFileLoader("__main__", script)
        main.__annotations__ = {}
        main.__builtins__ = __builtins__
        sys.modules["__main__"] = main
        with open(script, "rb") as f:
            source = f.read()
        code_object = compile(source, script, "exec", dont_inherit=True)  # not this file's __future__ flags
        exec(code_object, main.__dict__)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:  # printed as Python prints it: from the script's frames, not this file's
        tb = exc.__traceback__
        failure = exc.with_traceback(tb.tb_next if tb is not None else None)
    if failure is not None:  # outside any handler, as Python calls the hook (sys.exc_info() empty there)
        hook_exit = print_uncaught(failure)
        code = hook_exit if hook_exit is not None else INTERRUPTED if isinstance(failure, KeyboardInterrupt) else 1
        del failure
    try:  # what the interpreter does when a script ends: wait for threads, then atexit
        threading._shutdown()  # type: ignore[attr-defined]
    except Exception:
        pass
    try:
        import atexit

        atexit._run_exitfuncs()
    except Exception:
        traceback.print_exc()
    # and then it finalises the script's objects (a zip file left open writes its directory, files
    # are flushed and closed). CPython first stops its daemon threads; here they cannot be stopped:
    # one that trips over what is gone ends silently, as a stopped one would have
    import threading

    if threading.active_count() > 1:
        threading.excepthook = lambda _args: None
    try:
        sys.modules["__main__"].__dict__.clear()
    except Exception:
        pass
    _clear_step_modules(server_modules)
    try:
        gc.collect()
    except Exception:
        pass
    _flush_files_left_open()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    return code


def _clear_step_modules(server_modules: frozenset[str]) -> None:
    """As an interpreter's exit finalises modules: those the step imported (never the server's,
    shared by every step) lose their globals, the last imported first, so what only they held is
    finalised (a zip file writes its directory, a __del__ runs)."""
    import types

    for name, module in reversed(list(sys.modules.items())):
        if name in server_modules or name == "__main__" or type(module) is not types.ModuleType:
            continue  # (a lazily loaded module would run its code when its dict is read)
        try:  # as CPython clears a module's dict: names with one leading underscore first, then the others
            namespace = module.__dict__
            keys = list(namespace)
            for key in [k for k in keys if k.startswith("_") and not k.startswith("__")] + \
                       [k for k in keys if not k.startswith("_") or k.startswith("__")]:
                if key != "__builtins__":
                    namespace[key] = None
        except Exception:
            pass


def _flush_files_left_open() -> None:
    """What an interpreter's exit does for the files a step left open elsewhere than in its script
    (a module's global, a builtin): what they buffer reaches the file. Only the step's own objects
    are looked at (the server's were frozen before the fork); outer layers first, as they write into
    the inner ones."""
    import _io  # the C base types: an isinstance of io's ABCs costs ~1 µs per object of the step

    mine = [o for generation in range(3) for o in gc.get_objects(generation) if isinstance(o, _io._IOBase)]
    # a gzip file wraps a buffer: the buffered layer twice
    for layer in (_io._TextIOBase, _io._BufferedIOBase, _io._BufferedIOBase, _io._RawIOBase):
        for stream in mine:
            if isinstance(stream, layer) and stream is not sys.stdout and stream is not sys.stderr:
                try:
                    if not stream.closed and stream.writable():
                        stream.flush()
                except Exception:
                    pass


def print_uncaught(exc: BaseException) -> int | None:
    """What Python does with an exception no code caught: ``sys.last_*`` set, then ``sys.excepthook``
    called, and if the hook is missing or fails, both errors shown by the default display. Returns
    the exit status when the hook raised ``SystemExit`` (Python exits with it), else None.
    (``spare_job.print_uncaught`` is the same for spare interpreters, which cannot import this.)"""
    tb = exc.__traceback__
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    hook = getattr(sys, "excepthook", print_uncaught)  # itself: deleted (None is called, and fails)
    if hook is print_uncaught:
        print("sys.excepthook is missing", file=sys.stderr)
        sys.__excepthook__(type(exc), exc, tb)
        return None
    try:
        hook(type(exc), exc, tb)
    except SystemExit as stop:
        return _exit_code(stop.code)
    except BaseException as failure:
        print("Error in sys.excepthook:", file=sys.stderr)
        if failure.__context__ is exc:  # our caller handles it; Python calls the hook outside any handler
            failure.__context__ = None
        shown = failure.__traceback__.tb_next if failure.__traceback__ else None  # from the hook's frames
        sys.__excepthook__(type(failure), failure.with_traceback(shown), shown)  # it shows the exception's own
        print("\nOriginal exception was:", file=sys.stderr)
        sys.__excepthook__(type(exc), exc, tb)
    return None


def _exit_code(value: object) -> int:
    """The exit status ``sys.exit(value)`` gives: an int as the C ``int`` Python passes to ``exit``
    (one beyond a C long is -1), anything else printed and 1."""
    if value is None:
        return 0
    if isinstance(value, int):
        return (value if -(1 << 63) <= value < (1 << 63) else -1) & 0xFF
    print(value, file=sys.stderr)
    return 1


def mark_environ(step_run_id: str | None) -> None:
    """(``spare_job.mark_environ`` is the same for spare interpreters.) Write the step's id over the ``CAIRN_RUN_ID`` this process started with (a placeholder: it
    started before its step was known), in its start-up environment itself: what
    ``/proc/PID/environ`` shows, and what a child forked without exec inherits. A canceled step's
    daemons forked that way (fork, setsid, fork) are then found by it (``processes.kill_detached``)."""
    if not step_run_id:
        return
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50 and 51)
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            block = mem.read(end - start)
            at = (b"\0" + block).find(b"\0CAIRN_RUN_ID=")
            if at < 0:
                return
            value_at = at + len(b"CAIRN_RUN_ID=")
            stop = block.find(b"\0", value_at)
            stop = len(block) if stop < 0 else stop
            new = step_run_id.encode()
            if len(new) <= stop - value_at:
                mem.seek(start + value_at)
                mem.write(new + b"\0" * (stop - value_at - len(new)))
    except (OSError, ValueError, IndexError):  # no /proc: such daemons are not found, as before
        pass


if __name__ == "__main__":
    main()
