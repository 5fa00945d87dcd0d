"""A spare interpreter: a fresh ``python`` started ahead of time that waits for one step and then
runs its script as ``python script.py args`` would, in itself (no fork: every step still gets an
interpreter nobody used before). It hides the interpreter's start (~15-20 ms) behind the steps
that run before it.

This file runs as a script under the step environment's own interpreter, uses only what Python
has loaded at start (``os``, ``sys``), and imports nothing a cold step would not. Once up it
writes one byte to its standard output, then reads one job from its standard input until end of file: NUL-separated fields ``argc, argv..., cwd, stdout,
stderr, NAME=VALUE...``. Nothing there (the agent let it go): it exits quietly.

Where its start could differ from a cold start of that step it becomes one: it ``execve``s
``argv`` with the step's environment in its own process (same pid, folders and files), which is
exactly what a cold start does. That is when the script's name is not a file name, and when a
site-packages folder changed since it started (``.pth`` files are read only at start). The agent
gives it only steps whose variables Python reads at start are the ones it started with.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# `python spare_boot.py` put this folder first on sys.path, where `python script.py` puts the
# script's: taken out now (the script's goes in at dispatch), unless -P / PYTHONSAFEPATH left it out.
_PATH0 = bool(sys.path) and sys.path[0] == _HERE
if _PATH0:
    del sys.path[0]


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
        buffer = raw if isinstance(old.buffer, io.FileIO) else (
            io.BufferedReader(raw) if mode == "rb" else io.BufferedWriter(raw))
        new = io.TextIOWrapper(buffer, encoding=old.encoding, errors=old.errors, newline="\n",
                               line_buffering=old.line_buffering, write_through=old.write_through)
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
    try:
        with open(argv[1], "rb") as f:
            head = f.read(4)
    except OSError:
        return True
    return head == b"PK\x03\x04"  # a zip application under any name


def _main() -> tuple:
    data = _read_job()
    if not data:
        os._exit(0)  # let go before it had a step: nothing to finalise, nothing to say
    fields = [os.fsdecode(f) for f in data.split(b"\0")]
    argc = int(fields[0])
    argv = fields[1:1 + argc]
    cwd, stdout, stderr = fields[1 + argc:4 + argc]
    env = dict(item.split("=", 1) for item in fields[4 + argc:])
    # Until the agent hears "taken" on our standard output, the step is not started: if anything
    # below fails (or this process dies), the agent starts the step cold, with a cold start's errors.
    answer = os.dup(1)
    os.chdir(cwd)
    cold = _cold(argv)
    _redirect(stdout, stderr)
    os.write(answer, b"!")  # taken: from here on this process is the step
    os.close(answer)
    if cold:
        try:
            os.execve(argv[0], argv, env)  # a cold start, in this process
        except OSError as exc:
            os.write(2, f"cairn: could not start {argv[0]}: {exc}\n".encode())
            os._exit(127)
    os.environ.clear()
    os.environ.update(env)
    script = os.path.abspath(argv[1])
    sys.argv = argv[1:]
    sys.orig_argv = list(argv)
    if _PATH0:
        sys.path.insert(0, os.path.dirname(script))
    main = type(sys)("__main__")  # what `python script.py` runs the script in
    main.__file__ = script
    main.__cached__ = None
    main.__annotations__ = {}
    main.__builtins__ = sys.modules["builtins"]
    main.__loader__ = sys.modules["_frozen_importlib_external"].SourceFileLoader("__main__", script)
    sys.modules["__main__"] = main
    with open(script, "rb") as f:
        source = f.read()
    return main.__dict__, source, script


_globals, _source, _script = _main()
# warnings raised from the script's top level name this file's frame: not as __main__
__name__ = "cairn_spare_boot"
try:
    # dont_inherit: this file's compiler flags are not the script's
    exec(compile(_source, _script, "exec", dont_inherit=True), _globals)
except SystemExit:
    raise
except BaseException as _exc:  # printed as Python prints it, without this file's frame
    _tb = _exc.__traceback__  # its first frame is always this file's (the exec above)
    _tb = _tb.tb_next if _tb is not None else None
    sys.excepthook(type(_exc), _exc.with_traceback(_tb), _tb)  # the hook prints the exception's own
    # then Python ends as it does after an uncaught exception (status 1, or death by SIGINT after
    # a KeyboardInterrupt, finalising first): printed once, above
    sys.excepthook = lambda *_args: None
    raise
