"""A spare that forks imports the standard-library modules its steps imported, so that the steps it
forks next find them imported; nothing else about a step changes: a script that shadows one of them
starts cold, modules that print, warn, start threads or change the process are not kept, and what
keeps per-process state (random numbers) differs from one step to the next."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cairn.runner import spare_learn
from cairn.runner.spares import ForkedStep, SparePool


@pytest.fixture
def pool() -> SparePool:
    spares = SparePool(1)
    yield spares
    spares.shutdown()


def run_forked(pool: SparePool, folder: Path, script: str, env: dict[str, str], name: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python script`` in ``folder``, forked by the pool's spare."""
    pool.want(sys.executable, env)
    step = None
    while step is None:  # the pool's thread starts the spare; a step before it serves would start cold
        step = pool.take(sys.executable, env, env)
    assert isinstance(step, ForkedStep)
    out, err = folder / f"{name}.out", folder / f"{name}.err"
    assert pool.launch(step, [sys.executable, script], str(folder), str(out), str(err), env)
    code = step.wait(timeout=60)
    return code, out.read_text(), err.read_text()


def run_until(pool: SparePool, folder: Path, script: str, env: dict[str, str], done: str, tries: int = 40) -> list[str]:
    """Outputs of the script run again and again until one has ``done`` in it (a spare imports what it
    learned while no job waits, so which run first sees it is not fixed); at most ``tries`` runs."""
    outputs = []
    for i in range(tries):
        code, out, err = run_forked(pool, folder, script, env, f"run{i}")
        assert code == 0, err
        outputs.append(out)
        if done in out:
            break
    return outputs


def test_a_forked_step_finds_the_standard_library_modules_earlier_steps_imported(pool: SparePool,
                                                                                  tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("VALUE = 1\n")
    (tmp_path / "step.py").write_text(textwrap.dedent("""
        import sys
        print("argparse" in sys.modules, "helper" in sys.modules, "json" in sys.modules)
        import argparse, json, helper
        parser = argparse.ArgumentParser()
        print(parser.parse_args([]), json.dumps(helper.VALUE))
    """))
    outputs = run_until(pool, tmp_path, "step.py", dict(os.environ), "True False True")
    assert outputs[0].splitlines() == ["False False False", "Namespace() 1"]  # the first is as a cold start
    # a later one finds the standard library's imported, never a module of the step's own folder
    assert outputs[-1].splitlines() == ["True False True", "Namespace() 1"]


def test_a_script_whose_folder_shadows_a_learned_module_imports_its_own(pool: SparePool, tmp_path: Path) -> None:
    (tmp_path / "learn").mkdir()
    (tmp_path / "learn" / "step.py").write_text("import sys\nprint('argparse' in sys.modules)\nimport argparse\n")
    run_until(pool, tmp_path / "learn", "step.py", dict(os.environ), "True")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "argparse.py").write_text("print('the step folder\\'s argparse')\n")
    (mine / "step.py").write_text("import sys\nprint('argparse' in sys.modules)\nimport argparse\n")
    cold = subprocess.run([sys.executable, "step.py"], cwd=mine, capture_output=True, text=True)
    assert (0, cold.stdout, cold.stderr) == (0, "False\nthe step folder's argparse\n", "")
    assert run_forked(pool, mine, "step.py", dict(os.environ), "shadowed") == (0, cold.stdout, cold.stderr)


def test_forked_steps_draw_different_random_numbers_after_random_was_learned(pool: SparePool,
                                                                            tmp_path: Path) -> None:
    (tmp_path / "step.py").write_text("import sys\nprint('random' in sys.modules)\nimport random\n"
                                      "print(random.random())\n")
    outputs = run_until(pool, tmp_path, "step.py", dict(os.environ), "True")
    assert outputs[-1].startswith("True")
    more = [run_forked(pool, tmp_path, "step.py", dict(os.environ), f"more{i}")[1] for i in range(3)]
    numbers = [out.split()[1] for out in [outputs[-1], *more]]
    assert len(set(numbers)) == 4, numbers  # the spare's random state is reseeded in each child


def test_a_module_that_registers_an_exit_handler_is_not_learned(pool: SparePool, tmp_path: Path) -> None:
    # logging registers logging.shutdown at import: imported ahead, it would run after the script's
    # own exit handlers instead of before those registered ahead of the import
    (tmp_path / "step.py").write_text("import sys\nprint('logging' in sys.modules, 'argparse' in sys.modules)\n"
                                      "import logging, argparse\n")
    outputs = run_until(pool, tmp_path, "step.py", dict(os.environ), "False True")  # logging was tried first
    assert outputs[-1] == "False True\n"
    assert run_forked(pool, tmp_path, "step.py", dict(os.environ), "again")[1] == "False True\n"


def test_a_script_shadowing_a_learned_module_from_pythonpath_imports_its_own(pool: SparePool,
                                                                               tmp_path: Path) -> None:
    ahead = tmp_path / "ahead"
    ahead.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ahead))
    (tmp_path / "step.py").write_text("import sys\nprint('argparse' in sys.modules)\nimport argparse\n")
    run_until(pool, tmp_path, "step.py", env, "True")
    (ahead / "argparse.py").write_text("print('the argparse of PYTHONPATH')\n")
    assert run_forked(pool, tmp_path, "step.py", env, "shadowed") == (0, "False\nthe argparse of PYTHONPATH\n", "")


def test_steps_run_on_when_the_spares_own_folder_is_removed(tmp_path: Path) -> None:
    home, here = tmp_path / "home", os.getcwd()
    home.mkdir()
    os.chdir(home)
    try:
        pool = SparePool(1)  # its spare starts in `home`
        env = dict(os.environ)
        (tmp_path / "step.py").write_text("import argparse, json\nprint(json.dumps(1))\n")
        assert run_forked(pool, tmp_path, "step.py", env, "first") == (0, "1\n", "")
    finally:
        os.chdir(here)
    home.rmdir()
    try:
        for i in range(5):  # learning in a spare whose folder is gone loses no step
            assert run_forked(pool, tmp_path, "step.py", env, f"run{i}") == (0, "1\n", "")
    finally:
        pool.shutdown()


def test_a_script_run_through_a_link_imports_from_its_real_folder(pool: SparePool, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "helper.py").write_text("WHERE = 'next to the real file'\n")
    (tmp_path / "real" / "step.py").write_text("import helper\nprint(helper.WHERE)\n")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "step.py").symlink_to(tmp_path / "real" / "step.py")
    cold = subprocess.run([sys.executable, "step.py"], cwd=tmp_path / "linked", capture_output=True, text=True)
    assert (cold.returncode, cold.stdout) == (0, "next to the real file\n")
    assert run_forked(pool, tmp_path / "linked", "step.py", dict(os.environ), "linked") == (0, cold.stdout, "")


def test_a_deprecated_module_warns_in_every_forked_step_as_it_does_cold(pool: SparePool, tmp_path: Path) -> None:
    # sre_compile warns at import on every Python Cairn supports (3.11 on): its trial rejects it
    (tmp_path / "step.py").write_text("import sre_compile\n")
    cold = subprocess.run([sys.executable, "step.py"], cwd=tmp_path, capture_output=True, text=True)
    assert "DeprecationWarning" in cold.stderr
    for i in range(4):  # the first step reported it; the spare tried it while no job waited
        assert run_forked(pool, tmp_path, "step.py", dict(os.environ), f"run{i}") == (0, "", cold.stderr)


TRIAL = """
import os, sys
sys.path.insert(0, {src!r})
from cairn.runner import spare_learn
spare_learn._STDLIB_FOLDERS += ({lib!r} + os.sep,)  # the test's modules are the standard library's too
sys.path.insert(0, {lib!r})
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # as the spare runs a trial: in a child of its own, which ends by os._exit
    try:
        spare_learn._trial(sys.argv[1], write, True)
    finally:
        os._exit(0)
os.close(write)
verdict = b"".join(iter(lambda: os.read(read, 100), b""))
os.waitpid(pid, 0)
print(verdict.decode() or "not kept")
"""

LIBRARY = {
    "fine": "import helper_of_fine\nVALUE = 1\n",
    "helper_of_fine": "",
    "loud": "print('hello from an import')\n",
    "loud_fd": "import os\nos.write(1, b'straight to the descriptor')\n",
    "warns": "import warnings\nwarnings.warn('old', DeprecationWarning)\n",
    "filters": "import warnings\nwarnings.filterwarnings('ignore', 'x')\n",
    "paths": "import sys\nsys.path.append('/elsewhere')\n",
    "moves": "import os\nos.chdir('/')\n",
    "umask": "import os\nos.umask(0o077)\n",
    "signals": "import signal\nsignal.signal(signal.SIGUSR1, lambda *a: None)\n",
    "sets": "import os\nos.environ['SET_BY_AN_IMPORT'] = '1'\n",
    "reads_step": "import os\nos.environ.get('CAIRN_RUN_ID')\n",
    "copies": "import os\nCOPY = dict(os.environ)\n",
    "reads_home": "import os\nHOME = os.environ.get('HOME')\n",
    "exits": "import atexit\natexit.register(print)\n",
    "fails": "raise ImportError('no')\n",
    "threads": "import threading, time\nthreading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n",
    "outside": "import os\nopen(os.environ['MARK'], 'w').close()\n",
}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of modules that stand for the standard library's, and the trial script."""
    root = tmp_path_factory.mktemp("trial")
    (root / "lib").mkdir()
    for name, source in LIBRARY.items():
        if name != "outside":
            (root / "lib" / f"{name}.py").write_text(source)
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "outside.py").write_text(LIBRARY["outside"])
    (root / "trial.py").write_text(TRIAL.format(src=str(Path(spare_learn.__file__).parents[2]), lib=str(root / "lib")))
    return root


@pytest.mark.parametrize("name, verdict", [
    ("fine", "kept"), ("reads_home", "kept"), ("loud", "not kept"), ("loud_fd", "not kept"), ("warns", "not kept"),
    ("filters", "not kept"), ("paths", "not kept"), ("moves", "not kept"), ("umask", "not kept"),
    ("signals", "not kept"), ("sets", "not kept"), ("reads_step", "not kept"), ("copies", "not kept"),
    ("exits", "not kept"), ("fails", "not kept"), ("threads", "not kept"), ("multiprocessing", "not kept"),
])
def test_a_trial_keeps_a_module_only_if_importing_it_changed_nothing_but_sys_modules(library: Path, name: str,
                                                                                     verdict: str) -> None:
    found = subprocess.run([sys.executable, "trial.py", name], cwd=library, capture_output=True, text=True,
                           env=dict(os.environ, CAIRN_RUN_ID="run_x"))
    assert (found.returncode, found.stdout, found.stderr) == (0, verdict + "\n", "")  # nothing else printed


def test_a_trial_never_runs_a_module_from_outside_the_standard_library(library: Path) -> None:
    mark = library / "ran"
    env = dict(os.environ, PYTHONPATH=str(library / "elsewhere"), MARK=str(mark))
    found = subprocess.run([sys.executable, "trial.py", "outside"], cwd=library, capture_output=True, text=True,
                           env=env)
    assert (found.stdout, found.stderr) == ("not kept\n", "")
    assert not mark.exists()


LEARNER = """
import os, select, sys
sys.path.insert(0, {src!r})
from cairn.runner import spare_learn
spare_learn._STDLIB_FOLDERS += ({lib!r} + os.sep,)
sys.path.insert(0, {lib!r})
poller = select.poll()
learner = spare_learn.Learner(poller, True)
for name in sys.argv[1:]:
    learner.wanted[name] = None
while learner.timeout() is not None:
    events = poller.poll(learner.timeout())
    if not events:
        learner.work()
    for fd, _ in events:
        learner.ready(fd, set())
print(sorted(n for n in {names!r} if n in sys.modules), sorted(learner.tops), learner.tainted)
"""


def test_the_spare_imports_what_its_trials_kept_and_stops_forking_if_that_left_a_thread(library: Path) -> None:
    (library / "lib" / "late_thread.py").write_text(
        "import os, threading, time\n"
        "if os.getpid() == int(os.environ['SPARE_PID']):  # only in the spare, not in its trial\n"
        "    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n")
    names = ["fine", "helper_of_fine", "loud", "exits", "late_thread"]
    (library / "learner.py").write_text(LEARNER.format(src=str(Path(spare_learn.__file__).parents[2]),
                                                       lib=str(library / "lib"), names=names))
    script = ("import os, runpy, sys; os.environ['SPARE_PID'] = str(os.getpid()); "
              "sys.argv = ['learner.py', *sys.argv[1:]]; runpy.run_path('learner.py', run_name='__main__')")
    found = subprocess.run([sys.executable, "-c", script, "fine", "loud", "exits"], cwd=library,
                           capture_output=True, text=True)
    assert (found.stdout, found.stderr) == ("['fine', 'helper_of_fine'] ['fine', 'helper_of_fine'] False\n", "")
    found = subprocess.run([sys.executable, "-c", script, "late_thread"], cwd=library, capture_output=True, text=True)
    assert (found.stdout, found.stderr) == ("['late_thread'] [] True\n", "")


IN_CHILD = """
import os, select, sys
sys.path.insert(0, {src!r})
from cairn.runner import spare_learn
spare_learn._STDLIB_FOLDERS += ({lib!r} + os.sep,)
sys.path.insert(0, {lib!r})
poller = select.poll()
before = set(os.listdir("/proc/self/fd"))
learner = spare_learn.Learner(poller, True)
learner.wanted["slow"] = None
learner.work()  # the trial of `slow` runs now
pid = os.fork()
if pid == 0:  # a step forked meanwhile
    learner.in_child(os.getppid())
    print(sorted(set(os.listdir("/proc/self/fd")) - before), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
learner.stop()
print(len(set(os.listdir("/proc/self/fd")) - before))
"""


def test_a_step_forked_during_a_trial_holds_no_descriptor_of_its_spare(library: Path) -> None:
    (library / "lib" / "slow.py").write_text("import time\ntime.sleep(1)\n")
    (library / "in_child.py").write_text(IN_CHILD.format(src=str(Path(spare_learn.__file__).parents[2]),
                                                         lib=str(library / "lib")))
    found = subprocess.run([sys.executable, "in_child.py"], cwd=library, capture_output=True, text=True)
    # the step: nothing beyond what the process had; the spare, its trial ended: its report pipe's two ends
    assert (found.stdout, found.stderr) == ("[]\n2\n", ""), found
