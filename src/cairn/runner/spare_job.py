"""What a spare interpreter does (``spare_boot.py`` is its entry point): a fresh ``python`` started
ahead of time that waits for one step and then runs its script as ``python script.py args`` would,
in itself. It hides the interpreter's start (~15-20 ms) behind the steps that run before it. A spare
that forks (``serve``) takes no step itself: it forks a child for each, which does the same.

Imported from its compiled bytecode by ``spare_boot.py`` (a file run as a script is parsed at every
start; a module is not), then dropped from ``sys.modules``; uses only what Python has loaded at
start (``os``, ``sys``, ``io``, ``marshal``) and imports nothing a cold step would not (a spare that
forks imports what its steps imported of the standard library: ``spare_learn``). Once up the
spare writes one byte to its standard output, then reads one job from its standard input until end
of file: NUL-separated fields ``argc, argv..., cwd, stdout, stderr, code, NAME=VALUE...``. Nothing
there (the agent let it go): it exits quietly.

Where its start could differ from a cold start of that step it becomes one: it ``execve``s
``argv`` with the step's environment in its own process (same pid, folders and files), which is
exactly what a cold start does. That is when the script's name is not a file name, and when a
site-packages folder changed since it started (``.pth`` files are read only at start). The agent
gives it only steps whose variables Python reads at start are the ones it started with.

``code`` names where the script's compiled code is kept between runs (by the agent, from the
script's content digest; empty: not kept), to which the spare adds what else decides what
``compile()`` does (bytecode format, optimisation, warning filters, the integer digit limit).
Python's ``compile()`` sets up its syntax-tree types the first time it is called in a process
(~2.5 ms, which ``python script.py`` never pays), so a spare loads the code it compiled for that
content before when it can. Not kept: code whose compile printed anything (a ``SyntaxWarning``:
every run prints it, as a cold start does), and code with set constants (``marshal`` rebuilds them
in another insertion order).
"""

import os
import sys


def _site_folders() -> list:
    site = sys.modules.get("site")  # not there under -S: nothing was read at start, nothing to check
    if site is None:
        return []
    folders = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if getattr(site, "ENABLE_USER_SITE", False):
        folders.append(site.getusersitepackages())
    return folders


def _signature(folders: list) -> list:
    marks = []
    for folder in folders:
        try:
            marks.append(os.stat(folder).st_mtime_ns)
        except OSError:
            marks.append(None)
    return marks


_SITE = _site_folders()
_SITE_MARKS = _signature(_SITE)
try:
    os.write(1, b"+")  # up: the agent gives steps to spares that are up first
except OSError:
    pass  # the agent no longer listens (it took this spare while it was starting)


def _read_job() -> bytes:
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _redirect(stdout: str, stderr: str) -> None:
    fds = [os.open(os.devnull, os.O_RDONLY),  # as the agent opens them for a cold step ("ab")
           os.open(stdout, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666),
           os.open(stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)]
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    io = sys.modules["io"]
    # new stream objects over the new files: the start-up ones decided what their pipes could do
    # (seek, tell), with the encoding, errors and buffering Python chose as it started
    for name, fd, mode in (("stdin", 0, "rb"), ("stdout", 1, "wb"), ("stderr", 2, "wb")):
        old = getattr(sys, name)
        if old is None:
            continue
        raw = io.FileIO(fd, mode, closefd=False)
        raw.name = f"<{name}>"  # as Python names its standard streams
        buffer = raw if isinstance(old.buffer, io.FileIO) else (
            io.BufferedReader(raw) if mode == "rb" else io.BufferedWriter(raw))
        new = io.TextIOWrapper(buffer, encoding=old.encoding, errors=old.errors, newline="\n",
                               line_buffering=old.line_buffering, write_through=old.write_through)
        new.mode = "r" if name == "stdin" else "w"
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)


def _cold(argv: list) -> bool:
    """Whether Python itself must start this step: its script is not a source file this spare can
    run as Python would (options, a folder, a zip application, compiled code), or a site-packages
    folder changed since this spare started."""
    if len(argv) < 2 or argv[1].startswith("-") or not os.path.isfile(argv[1]):
        return True
    if argv[1].endswith((".pyc", ".pyz")) or _signature(_SITE) != _SITE_MARKS:
        return True
    try:  # (as execute._not_source): compiled code by its magic number, a zip by its end record
        with open(argv[1], "rb") as f:
            head = f.read(2)
            f.seek(max(0, f.seek(0, 2) - (22 + 65535)))
            tail = f.read()
    except OSError:
        return True
    return head == sys.modules["_frozen_importlib_external"].MAGIC_NUMBER[:2] or b"PK\x05\x06" in tail


def main(path0: bool) -> tuple:
    """Wait for the job, become the step's process; returns what the entry point runs: the new
    ``__main__``'s namespace, the script's source, its path, and where its code is kept (or "")."""
    data = _read_job()
    if not data:
        os._exit(0)  # let go before it had a step: nothing to finalise, nothing to say
    answer = os.dup(1)

    def taken() -> None:
        os.write(answer, b"!")
        os.close(answer)

    return _become(data, path0, taken)


def _become(data: bytes, path0: bool, taken: object, learner: object = None) -> tuple:
    """Become the step of ``data`` (a job as ``main`` reads it), calling ``taken()`` once this process
    is the step; returns what ``main`` returns. ``learner``: a forking spare's (``spare_learn``), whose
    imports the script's folder must not shadow."""
    fields = [os.fsdecode(f) for f in data.split(b"\0")]
    argc = int(fields[0])
    argv = fields[1:1 + argc]
    cwd, stdout, stderr, kept = fields[1 + argc:5 + argc]
    env = dict(item.split("=", 1) for item in fields[5 + argc:])
    # Until the agent hears "taken", the step is not started: if anything below fails (or this
    # process dies), the agent starts the step cold, with a cold start's errors.
    os.chdir(cwd)
    cold = _cold(argv)
    # a cold start puts the folder of the script's real path first on sys.path (links resolved)
    folder0 = os.path.dirname(os.path.realpath(argv[1])) if path0 and not cold else None
    cold = cold or (learner is not None and learner.shadowed(folder0))
    _redirect(stdout, stderr)
    taken()  # from here on this process is the step
    if cold:
        try:
            os.execve(argv[0], argv, env)  # a cold start, in this process
        except OSError as exc:
            os.write(2, f"cairn: could not start {argv[0]}: {exc}\n".encode())
            os._exit(127)
    mark_environ(env.get("CAIRN_RUN_ID"))
    os.environ.clear()
    os.environ.update(env)
    script = os.path.abspath(argv[1])
    sys.argv = argv[1:]
    sys.orig_argv = list(argv)
    if folder0 is not None:
        sys.path.insert(0, folder0)
    main = type(sys)("__main__")  # what `python script.py` runs the script in
    main.__file__ = script
    main.__cached__ = None
    main.__annotations__ = {}
    main.__builtins__ = sys.modules["builtins"]
    main.__loader__ = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", script)
    sys.modules["__main__"] = main
    try:
        with open(script, "rb") as f:
            source = f.read()
    except OSError as exc:  # gone since it was checked: as a cold start says it
        os.write(2, f"{argv[0]}: can't open file {script!r}: [Errno {exc.errno}] {exc.strerror}\n".encode())
        os._exit(2)
    return main.__dict__, source, script, kept


def serve(path0: bool, learn: object) -> tuple:
    """A spare that forks (``spare_boot.py --fork``): this interpreter takes no step itself; for each
    job it reads it forks a child, which becomes the step exactly as ``main`` would (its own session,
    then ``_become``), and tells the agent each child's end. Returns only in a child, what ``main``
    returns.

    Protocol: "F\\n" once it serves (after the spare's "+"), or "-" and a reason and it exits. Jobs
    come on standard input as ``<id> <size>\\n`` and ``size`` bytes of a job; the child writes
    ``T <id> <pid>\\n`` (taken) on standard output, this process ``X <id> <pid> <exit status>\\n``
    once the child ended (negative: the signal that killed it, as ``subprocess`` says it).
    ``<id> kill\\n`` kills that job's child (not taken in time). At end of file it takes no more jobs
    and exits once its children have ended.

    While no job waits it tries, then imports, the standard-library modules its steps imported
    (``learn``, the ``spare_learn`` module, says how and why; a failure there stops the learning, not
    the spare). Should an import leave a thread running here, it forks no more: each later job is
    answered ``X <id> 0 -1`` (that step starts cold) and it exits once its children have ended, to
    be replaced."""
    refusal = _fork_refusal(learn)
    if refusal:
        _tell(b"-" + refusal.encode() + b"\n")
        os._exit(0)
    had_select = "select" in sys.modules
    import select  # (an extension module: dropped again in each child, which a cold start never imports)

    poller = select.poll()
    poller.register(0, select.POLLIN)
    learner = learn.Learner(poller, had_select)
    children: dict = {}  # pidfd: (job id, pid)
    pending = b""
    accepting = True
    _tell(b"F\n")
    while accepting or children:
        events = poller.poll(learner.timeout() if accepting else None)
        if not events:  # no job waits: what the steps imported is tried, then imported
            _learning(learner.work)
            if learner.tainted and not children:
                _learning(learner.stop)
                break
            continue
        for fd, _events in events:
            if fd in learner.fds:
                _learning(learner.ready, fd, {pid for _job_id, pid in children.values()})
                continue
            if fd in children:
                job_id, pid = children.pop(fd)
                poller.unregister(fd)
                os.close(fd)
                status = os.waitpid(pid, 0)[1]
                _tell(b"X %s %d %d\n" % (job_id, pid, os.waitstatus_to_exitcode(status)))
                learner.ended(pid)
                if learner.tainted and not children:
                    os._exit(0)
                continue
            chunk = os.read(0, 1 << 16)
            if not chunk:  # the agent let it go (or is gone): the running children are still told
                accepting = False
                poller.unregister(0)
                _learning(learner.stop)  # (a trial under way is ended)
                continue
            pending += chunk
            while True:
                head, newline, rest = pending.partition(b"\n")
                if not newline:
                    break
                job_id, size = head.split()
                if size == b"kill":  # not taken in time (stuck entering its folder): it never will
                    pending = rest
                    for pid in [pid for held, pid in children.values() if held == job_id]:
                        os.kill(pid, 9)
                    continue
                if len(rest) < int(size):
                    break
                job, pending = rest[:int(size)], rest[int(size):]
                if learner.tainted:  # a thread runs here now: a fork would not have it
                    _tell(b"X %s 0 -1\n" % job_id)
                    continue
                try:
                    pid = os.fork()
                except OSError as exc:  # (a process limit): this step starts cold; the others run on
                    _tell(b"X %s 0 %d\n" % (job_id, -exc.errno))
                    continue
                if pid == 0:
                    return _forked(job, path0, job_id, list(children), had_select, learner)
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError as exc:  # (out of descriptors): it cannot be followed, so it must not run
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    _tell(b"X %s 0 %d\n" % (job_id, -exc.errno))
                    continue
                children[pidfd] = (job_id, pid)
                poller.register(pidfd, select.POLLIN)
    os._exit(0)


def _learning(call: object, *args: object) -> None:
    """A call of the spare's ``Learner``: should it fail (e.g. its folder was removed), the spare
    learns no more, and serves on."""
    try:
        call(*args)
    except BaseException:
        try:
            call.__self__.stop()
        except BaseException:
            pass


def _fork_refusal(learn: object) -> str:
    """Why this interpreter may not fork spares ("" when it may): no ``pidfd_open``, or a thread that
    its start left running (a ``.pth`` file's import), which a fork would not have. (The pidfd check
    is the warm-start server's, in ``forkserver._serve_forever``, which this file cannot import.)"""
    if not hasattr(os, "pidfd_open") or not hasattr(os, "waitstatus_to_exitcode"):
        return "this Python has no os.pidfd_open"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        return f"this kernel has no pidfd_open ({exc})"
    threads = learn.threads()
    return f"{threads} threads are running after its start" if threads > 1 else ""


def _tell(message: bytes) -> None:
    try:
        os.write(1, message)  # (short: one write, never interleaved with another process's)
    except OSError:  # the agent no longer listens
        pass


def _forked(job: bytes, path0: bool, job_id: bytes, pidfds: list, had_select: bool, learner: object) -> tuple:
    """In a child of ``serve``: become the step of ``job``, in a session of its own (the agent
    signals its group); nothing of the forking server stays visible."""
    try:
        server = os.getppid()
        answer = os.dup(1)
        # the server's pipes are the agent's: none stays open here (a child stuck before it takes
        # its step must not hide its server's end from the agent)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.close(devnull)
        os.setsid()
        for fd in pidfds:
            os.close(fd)
        if not had_select and not learner.keep_select:  # (kept once an imported module uses it)
            del sys.modules["select"]
        learner.in_child(server)

        def taken() -> None:
            if os.getppid() != server:  # its server died meanwhile: the agent has started the step cold
                os._exit(1)
            os.write(answer, b"T %s %d\n" % (job_id, os.getpid()))
            os.close(answer)

        return _become(job, path0, taken, learner)
    except BaseException:  # before "taken": the agent starts the step cold, with a cold start's errors
        os._exit(1)


def code(source: bytes, script: str, kept: str) -> object:
    """The script's code object: the one compiled before for this content and these compiler
    settings (``kept``), or compiled now, as Python compiles a script (``dont_inherit``: this file's
    compiler flags are not the script's), and kept when compiling printed nothing and the code
    comes back from ``marshal`` exactly as compiled."""
    marshal = sys.modules["marshal"]
    path = f"{kept}.{_settings()}" if kept else ""
    if path:
        try:
            with open(path, "rb") as f:
                return _located(marshal.loads(f.read()), script)
        except Exception:  # not kept yet, or unreadable: compiled as if it never was
            pass
    printed = os.fstat(2).st_size
    compiled = compile(source, script, "exec", dont_inherit=True)
    if path and os.fstat(2).st_size == printed and not _has_frozenset(compiled):
        _keep(path, marshal.dumps(compiled))
    return compiled


def _settings() -> str:
    """What else decides what ``compile()`` makes of a source or prints or raises for it: the
    bytecode format, the optimisation level, the warning filters (``-W``, ``PYTHONWARNINGS``, dev
    mode, or a ``sitecustomize`` that set some), and the integer-literal digit limit."""
    magic = sys.modules["_frozen_importlib_external"].MAGIC_NUMBER.hex()
    state = repr((sys.warnoptions, sys.flags.dev_mode, sys.flags.int_max_str_digits,
                  sys.modules["_warnings"].filters)).encode()
    checksum = 0xCBF29CE484222325  # FNV-1a, 64 bits: hashlib is not loaded in a fresh interpreter
    for byte in state:
        checksum = ((checksum ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{magic}-{sys.flags.optimize}-{checksum:016x}"


def _has_frozenset(code: object) -> bool:
    """Whether ``code`` has a set constant (``x in {...}``, ``for x in {...}``): ``marshal`` rebuilds
    one by inserting its items in another order, so its iteration order could differ from a fresh
    compile's, even under a fixed ``PYTHONHASHSEED``."""
    kind = type(code)
    stack = list(code.co_consts)  # type: ignore[attr-defined]
    while stack:
        value = stack.pop()
        if isinstance(value, frozenset):
            return True
        if type(value) is kind:
            stack.extend(value.co_consts)
        elif isinstance(value, tuple):
            stack.extend(value)
    return False


def _located(code: object, script: str) -> object:
    """``code`` (compiled for the same content elsewhere) with this script's path, as tracebacks
    and ``__file__``-relative code expect: in every nested function's and class's code too."""
    kind = type(code)
    consts = tuple(_located(c, script) if type(c) is kind else c for c in code.co_consts)  # type: ignore[attr-defined]
    return code.replace(co_filename=script, co_consts=consts)  # type: ignore[attr-defined]


def _keep(path: str, data: bytes) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    for _ in range(2):
        try:
            with open(temporary, "wb") as f:
                f.write(data)
            os.replace(temporary, path)  # whole or not at all: another spare may read it now
            return
        except FileNotFoundError:  # the first kept code of the workspace: its folder
            try:
                os.mkdir(os.path.dirname(path))
            except OSError:
                return
        except OSError:  # e.g. a full disk: nothing half-written stays
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return


def print_uncaught(exc: BaseException) -> object:
    """What Python does with an exception no code caught: ``sys.last_*`` set, then ``sys.excepthook``
    called, and if the hook is missing or fails, both errors shown by the default display. Returns
    the ``SystemExit`` code when the hook raised one (Python exits with it), else None (the same as
    ``forkserver.print_uncaught``, which this file cannot import)."""
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
        return stop
    except BaseException as failure:
        print("Error in sys.excepthook:", file=sys.stderr)
        if failure.__context__ is exc:  # our caller handles it; Python calls the hook outside any handler
            failure.__context__ = None
        shown = failure.__traceback__.tb_next if failure.__traceback__ else None  # from the hook's frames
        sys.__excepthook__(type(failure), failure.with_traceback(shown), shown)  # it shows the exception's own
        print("\nOriginal exception was:", file=sys.stderr)
        sys.__excepthook__(type(exc), exc, tb)
    return None


def mark_environ(step_run_id: str | None) -> None:
    """(``forkserver.mark_environ`` is the same for warm steps, which cannot import this.) Write the step's id over the ``CAIRN_RUN_ID`` this process started with (a placeholder: it
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
