"""``cairn debug``: a failed or reused step recreated in a local folder — snapshot, environment,
inputs, arguments, environment variables — run in the foreground (pdb works) or by hand."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cairn import Environment, Experiment, Pipeline, PipelineData, PythonScriptStep, RunConfiguration, Workspace
from tests.cli.test_cli import cairn, flat, no_traceback

PREP = """
    import os, sys
    os.makedirs(sys.argv[1], exist_ok=True)
    open(os.path.join(sys.argv[1], "data.txt"), "w").write("41\\n")
"""
TRAIN = """
    import os, sys
    from cairn import Run
    run = Run.get_context()
    value = int(open(os.path.join(sys.argv[2], "data.txt")).read())
    print("lr", sys.argv[4], "mode", os.environ.get("MODE"), "prefix", sys.prefix)
    print("inputs", sorted(run.input_datasets))
    run.log("value", value)
    if os.environ.get("ASK"):
        breakpoint()
    os.makedirs(sys.argv[6], exist_ok=True)
    open(os.path.join(sys.argv[6], "model.txt"), "w").write(str(value + 1))
    if os.environ.get("FAIL", "1") == "1":
        raise SystemExit("training failed on purpose")
"""


@pytest.fixture
def ran(workspace: Workspace, write_script: Callable[..., Path]) -> dict[str, str]:
    """Two runs of prep -> train (train fails): step run ids by '<run>.<step>'."""
    src = write_script("prep.py", PREP)
    write_script("train.py", TRAIN)
    ids = {}
    for n in (1, 2):
        prepped, model = PipelineData("prepped"), PipelineData("model")
        rc = RunConfiguration()
        rc.environment_variables = {"MODE": "debugme"}
        if n == 2:
            rc.environment = Environment("isolated")  # managed, no packages: built without a network
        prep = PythonScriptStep("prep.py", name="prep", source_directory=str(src), arguments=[prepped],
                                outputs=[prepped])
        train = PythonScriptStep("train.py", name="train", source_directory=str(src), runconfig=rc,
                                 arguments=["--data", prepped, "--lr", "0.1", "--out", model], inputs=[prepped],
                                 outputs=[model])
        run = Experiment(workspace, "debug").submit(Pipeline(workspace, [prep, train]))
        assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
        for s in run.get_steps():
            ids[f"{n}.{s.name}"] = s.id
        ids[f"{n}.run"] = run.id
    return ids


def test_a_failed_step_runs_again_in_the_foreground(workspace: Workspace, ran: dict[str, str]) -> None:
    root = Path(workspace.location)
    result = cairn("debug", ran["1.train"], cwd=root)
    assert result.returncode == 1, result.stderr
    no_traceback(result)
    assert "lr 0.1 mode debugme" in result.stdout
    assert "inputs ['prepped']" in result.stdout
    assert "training failed on purpose" in result.stderr
    assert "[offline run] scalar value = 41" in result.stderr  # never logged into the recorded run
    assert workspace.get_run(ran["1.train"]).get_metrics() == {"value": 41}  # only the original run's
    folder = root / ".cairn" / "debug" / ran["1.train"]
    assert (folder / "train.py").is_file() and (folder / "prep.py").is_file()  # the snapshot
    assert (folder / ".cairn_debug" / "outputs" / "model" / "model.txt").read_text() == "42"


def test_print_prepares_a_folder_that_reproduces_the_step_by_hand(workspace: Workspace, ran: dict[str, str],
                                                                  tmp_path: Path) -> None:
    folder = tmp_path / "here"
    result = cairn("debug", ran["2.train"], "--print", "--dir", str(folder), cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    assert f"cd {folder} && ./debug.sh" in flat(result.stdout)
    by_hand = subprocess.run([str(folder / "debug.sh")], capture_output=True, text=True, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "FAIL": "0"})
    assert by_hand.returncode == 0, by_hand.stderr
    assert "mode debugme" in by_hand.stdout
    assert f"prefix {workspace.location}/.cairn/envs/" in by_hand.stdout  # the step's own environment
    again = cairn("debug", ran["2.train"], "--print", "--dir", str(folder), cwd=Path(workspace.location))
    assert again.returncode == 2 and "--force" in flat(again.stderr)
    assert cairn("debug", ran["2.train"], "--print", "--dir", str(folder), "--force",
                 cwd=Path(workspace.location)).returncode == 0


def test_a_reused_step_can_be_debugged(workspace: Workspace, ran: dict[str, str]) -> None:
    assert workspace.get_run(ran["2.prep"]).get_status() == "Reused"
    result = cairn("debug", ran["2.prep"], cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    folder = Path(workspace.location) / ".cairn" / "debug" / ran["2.prep"]
    assert (folder / ".cairn_debug" / "outputs" / "prepped" / "data.txt").read_text() == "41\n"


def test_breakpoint_works_in_the_foreground(workspace: Workspace, ran: dict[str, str]) -> None:
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env.update(ASK="1", FAIL="0", NO_COLOR="1")
    session = subprocess.run([sys.executable, "-m", "cairn", "debug", ran["1.train"]], cwd=workspace.location,
                             input="p value * 2\nc\n", capture_output=True, text=True, env=env, timeout=120)
    assert session.returncode == 0, session.stderr
    assert "(Pdb) 82" in session.stdout


def test_what_cannot_be_debugged_is_a_clear_error(workspace: Workspace, ran: dict[str, str]) -> None:
    root = Path(workspace.location)
    for args, message in (((ran["1.run"],), "is a pipeline run"), (("step_nope",), "no run 'step_nope'")):
        result = cairn("debug", *args, cwd=root)
        assert result.returncode == 2 and message in flat(result.stderr), result.stderr
        no_traceback(result)


def test_a_step_whose_upstream_failed_cannot_be_recreated(workspace: Workspace,
                                                          write_script: Callable[..., Path]) -> None:
    src = write_script("broken.py", "raise SystemExit(3)\n")
    write_script("after.py", "print('never')\n")
    data = PipelineData("data")
    first = PythonScriptStep("broken.py", name="first", source_directory=str(src), arguments=[data], outputs=[data])
    second = PythonScriptStep("after.py", name="second", source_directory=str(src), arguments=[data], inputs=[data])
    run = Experiment(workspace, "debug").submit(Pipeline(workspace, [first, second]))
    run.wait_for_completion(show_output=False, raise_on_error=False)
    after = next(s for s in run.get_steps() if s.name == "second")
    result = cairn("debug", after.id, cwd=Path(workspace.location))
    assert result.returncode == 2, result.stderr
    assert "upstream step 'first' (Failed) has no committed output" in flat(result.stderr)
    no_traceback(result)


def test_force_never_removes_a_folder_debug_did_not_make(workspace: Workspace, ran: dict[str, str]) -> None:
    root = Path(workspace.location)
    (root / "notes.txt").write_text("precious")
    result = cairn("debug", ran["1.train"], "--dir", str(root), "--force", "--print", cwd=root)
    assert result.returncode == 2 and "was not made by `cairn debug`" in flat(result.stderr)
    assert (root / "notes.txt").read_text() == "precious" and (root / ".cairn" / "cairn.db").is_file()
