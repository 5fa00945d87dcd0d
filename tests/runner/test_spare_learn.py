"""A spare that forks imports the standard-library modules its steps imported, so that the steps it
forks next find them imported; nothing else about a step changes: a script that shadows one of them
starts cold, modules that print, warn, start threads or change the process are not kept, and what
keeps per-process state (random numbers) differs from one step to the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
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


def test_logging_counts_a_forked_steps_time_from_the_step_not_from_its_spare(pool: SparePool,
                                                                             tmp_path: Path) -> None:
    (tmp_path / "step.py").write_text("import sys\nprint('logging' in sys.modules)\nimport logging\n"
                                      "print(repr(logging._startTime))\n")
    assert run_until(pool, tmp_path, "step.py", dict(os.environ), "True")[-1].startswith("True")
    launched = time.time()
    code, out, err = run_forked(pool, tmp_path, "step.py", dict(os.environ), "timed")
    assert out.startswith("True") and float(out.split()[1]) >= launched  # relativeCreated starts with the step


def test_a_deprecated_module_warns_in_every_forked_step_as_it_does_cold(pool: SparePool, tmp_path: Path) -> None:
    deprecated = next((name for name in ("imp", "cgi", "crypt", "telnetlib", "nntplib") if _warns(name)), None)
    if deprecated is None:
        pytest.skip("this Python has none of the deprecated modules this test imports")
    (tmp_path / "step.py").write_text(f"import {deprecated}\n")
    cold = subprocess.run([sys.executable, "step.py"], cwd=tmp_path, capture_output=True, text=True)
    assert "DeprecationWarning" in cold.stderr
    for i in range(4):  # the first step reported it; the spare tried it while no job waited
        assert run_forked(pool, tmp_path, "step.py", dict(os.environ), f"run{i}") == (0, "", cold.stderr)


def _warns(name: str) -> bool:
    found = subprocess.run([sys.executable, "-W", "error", "-c", f"import {name}"], capture_output=True, text=True)
    return "DeprecationWarning" in found.stderr


LEARNER = """
import io, json, os, sys
sys.path.insert(0, {src!r})
from cairn.runner import spare_learn
spare_learn._STDLIB = {lib!r} + os.sep  # the test's modules stand for the standard library's
sys.path.insert(0, {lib!r})
learner = spare_learn.Learner()
for name in sys.argv[1:]:
    learner.wanted[name] = None
path, cwd, environ = list(sys.path), os.getcwd(), dict(os.environ)
while learner.wanted:
    learner.import_next()
print(json.dumps({{"modules": sorted(n for n in sys.argv[1:] + ["helper_of_fine"] if n in sys.modules),
                  "tops": sorted(learner.tops), "tainted": learner.tainted,
                  "same": [sys.path == path, os.getcwd() == cwd, dict(os.environ) == environ]}}))
"""


def test_a_module_is_kept_only_if_importing_it_changed_nothing_but_sys_modules(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    modules = {
        "fine": "import helper_of_fine\nVALUE = 1\n",
        "helper_of_fine": "",
        "loud": "print('hello from an import')\n",
        "loud_fd": "import os\nos.write(1, b'straight to the descriptor')\n",
        "warns": "import warnings\nwarnings.warn('old', DeprecationWarning)\n",
        "paths": "import sys\nsys.path.append('/elsewhere')\n",
        "moves": "import os\nos.chdir('/')\n",
        "sets": "import os\nos.environ['SET_BY_AN_IMPORT'] = '1'\n",
        "fails": "raise ImportError('no')\n",
        "threads": "import threading, time\nthreading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n",
    }
    for name, source in modules.items():
        (lib / f"{name}.py").write_text(source)
    (tmp_path / "learner.py").write_text(LEARNER.format(src=str(Path(spare_learn.__file__).parents[2]), lib=str(lib)))
    names = [n for n in modules if n not in ("helper_of_fine", "threads")]
    found = subprocess.run([sys.executable, "learner.py", *names], cwd=tmp_path, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stderr == ""
    result = json.loads(found.stdout)  # nothing the rejected imports printed reached the real stdout
    assert result == {"modules": ["fine", "helper_of_fine"], "tops": ["fine", "helper_of_fine"],
                      "tainted": False, "same": [True, True, True]}
    found = subprocess.run([sys.executable, "learner.py", "threads"], cwd=tmp_path, capture_output=True, text=True)
    assert json.loads(found.stdout)["tainted"] is True  # a thread it cannot take back: no more forks


def test_a_module_outside_the_standard_library_is_not_kept(tmp_path: Path) -> None:
    (tmp_path / "elsewhere.py").write_text("")
    code = (f"import sys; sys.path.insert(0, {str(Path(spare_learn.__file__).parents[2])!r}); sys.path.insert(0, {str(tmp_path)!r})\n"
            "from cairn.runner import spare_learn\n"
            "learner = spare_learn.Learner(); learner.wanted['elsewhere'] = None; learner.import_next()\n"
            "print('elsewhere' in sys.modules, sorted(learner.tops))\n")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (found.stdout, found.stderr) == ("False []\n", "")
