"""A spare interpreter's entry point: ``python spare_boot.py [--fork]``, started ahead by the agent
(``spares.py``). What it does is in ``spare_job.py``, imported from its compiled bytecode: Python
parses a file it runs as a script at every start, so this one stays short."""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# `python spare_boot.py` put this folder first on sys.path, where `python script.py` puts the
# script's: taken out again below (the script's goes in at dispatch), unless -P / PYTHONSAFEPATH
# left it out.
_PATH0 = bool(sys.path) and sys.path[0] == _HERE
if not _PATH0:
    sys.path.insert(0, _HERE)
import spare_job as _job  # noqa: E402

# `--fork`: this interpreter forks a child for each step (spare_job.serve), which goes on below, and
# imports what its steps imported (spare_learn)
_learn = None
if sys.argv[1:] == ["--fork"]:
    import spare_learn as _learn

del sys.path[0], sys.modules["spare_job"]
sys.modules.pop("spare_learn", None)
sys.path_importer_cache.pop(_HERE, None)  # nothing of this folder stays visible to the step
_globals, _source, _script, _kept = _job.serve(_PATH0, _learn) if _learn is not None else _job.main(_PATH0)
# warnings raised from the script's top level name this file's frame: not as __main__
__name__ = "cairn_spare_boot"
_failure = None
try:
    _code = _job.code(_source, _script, _kept)
except BaseException as _exc:  # a SyntaxError: printed as Python prints it for a script, no frames
    _failure = _exc.with_traceback(None)
if _failure is None:
    try:
        exec(_code, _globals)
    except SystemExit:
        raise
    except BaseException as _exc:  # printed as Python prints it, without this file's frame
        _tb = _exc.__traceback__  # its first frame is always this file's (the exec above)
        _failure = _exc.with_traceback(_tb.tb_next if _tb is not None else None)
    finally:  # a forked step tells its spare what it imported
        if _learn is not None:
            _learn.report()
if _failure is not None:
    # outside any handler, as Python calls the hook (sys.exc_info() is empty there); the hook
    # prints the exception's own. Then Python ends as it does after an uncaught exception (status 1,
    # or death by SIGINT after a KeyboardInterrupt, finalising first): printed once, here
    _stop = _job.print_uncaught(_failure)
    sys.excepthook = lambda *_args: None
    if _stop is not None:  # the script's excepthook ended the process: with its status
        raise _stop
    raise _failure
