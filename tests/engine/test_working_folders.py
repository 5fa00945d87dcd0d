"""Every step runs in exactly its snapshot, whether its folder is a fresh copy or the unchanged
folder of a completed step of the same snapshot; outputs are committed whole, and nothing staged
stays behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cairn import Experiment, Pipeline, PipelineData, PythonScriptStep

LOOK = """
import json, os, sys
seen = sorted(os.path.join(d, f)[2:] for d, folders, files in os.walk(".") for f in files + folders)
print(json.dumps({"seen": seen, "step": open("step.py").read(), "helper": open("lib/helper.txt").read()}))
if len(sys.argv) > 1 and sys.argv[1] == "litter":  # change the folder: no later step may see it
    open("step.py", "r+").write("#")  # same size, another content
    open("scratch.csv", "w").write("a,b\\n")
    os.remove("lib/helper.txt")
"""


def _system_log(run, name: str) -> str:
    return run.find_step_run(name)[0].get_system_log()


def test_each_step_sees_exactly_its_snapshot_however_its_folder_was_made(workspace, tmp_path):
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    (src / "step.py").write_text(LOOK)
    (src / "lib" / "helper.txt").write_text("help\n")
    steps = [PythonScriptStep("step.py", name=f"s{i}", source_directory=str(src), allow_reuse=False,
                              arguments=["litter"] if i == 1 else []) for i in range(4)]
    for before, after in zip(steps, steps[1:], strict=False):
        after.run_after(before)
    run = Experiment(workspace, "folders").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"
    for i in range(4):
        seen = json.loads(run.find_step_run(f"s{i}")[0].get_stdout_log())
        assert seen == {"seen": ["lib", "lib/helper.txt", "step.py"], "step": LOOK, "helper": "help\n"}, i
    # s1 changed its folder: s2 got a fresh copy; s2 left its own unchanged: s3 had it, renamed
    assert "materialised in" in _system_log(run, "s2")
    assert "the unchanged folder of a completed step" in _system_log(run, "s3")
    work = Path(workspace.location) / ".cairn" / "work"
    assert not [p for p in work.iterdir() if not p.name.startswith(".kept-")]  # completed: none left by name


OUTPUTS = """
import os, sys
for folder in sys.argv[1:3]:
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "part.txt"), "w").write(os.path.basename(folder))
open(os.path.join(sys.argv[1], os.pardir, "beside.txt"), "w").write("not an output")
"""


def test_outputs_are_committed_whole_and_nothing_staged_stays(workspace, write_script):
    src = write_script("outputs.py", OUTPUTS)
    first, second = PipelineData("first"), PipelineData("second")
    write = PythonScriptStep("outputs.py", name="write", source_directory=src, arguments=[first, second],
                             outputs=[first, second])
    read = PythonScriptStep("read.py", name="read", source_directory=write_script(
        "read.py", "import sys\nprint(open(sys.argv[1] + '/part.txt').read(), open(sys.argv[2] + '/part.txt').read())\n"),
        arguments=[first.as_input(), second.as_input()])
    run = Experiment(workspace, "outputs").submit(Pipeline(workspace, [write, read]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    step = run.find_step_run("write")[0]
    step_folder = Path(workspace.location, ".cairn", "datastores", "workspaceblobstore", "runs", run.id, step.id)
    assert sorted(os.listdir(step_folder)) == ["logs", "outputs"]  # what it wrote beside its outputs: gone
    assert sorted(os.listdir(step_folder / "outputs")) == ["first", "second"]
    assert (step_folder / "outputs" / "second" / "part.txt").read_text() == "second"
    assert not os.access(step_folder / "outputs" / "first" / "part.txt", os.W_OK) or os.geteuid() == 0
    assert run.find_step_run("read")[0].get_stdout_log() == "first second\n"


LEAVE_BEHIND = """
import os, subprocess, sys, time
go, done = sys.argv[2], sys.argv[3]
if sys.argv[1] == "leave":  # a process of its own session, still in this folder when the step ends
    subprocess.Popen([sys.executable, "-c", '''
import os, sys, time
go, done = sys.argv[1], sys.argv[2]
for _ in range(1000):
    if os.path.exists(go):
        break
    time.sleep(0.01)
try:
    open("late.txt", "w").write("written after its step completed")
except OSError:
    pass
open(done, "w").close()
''', go, done], start_new_session=True)
else:  # the next step of the snapshot: let the left process write, then look
    open(go, "w").close()
    for _ in range(1000):
        if os.path.exists(done):
            break
        time.sleep(0.01)
    print(sorted(os.listdir(".")))
"""


def test_a_folder_a_left_process_works_in_is_not_given_to_the_next_step(workspace, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "step.py").write_text(LEAVE_BEHIND)
    go, done = str(tmp_path / "go"), str(tmp_path / "done")
    leave = PythonScriptStep("step.py", name="leave", source_directory=str(src), allow_reuse=False,
                             arguments=["leave", go, done])
    look = PythonScriptStep("step.py", name="look", source_directory=str(src), allow_reuse=False,
                            arguments=["look", go, done])
    look.run_after(leave)
    run = Experiment(workspace, "left").submit(Pipeline(workspace, [leave, look]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert os.path.exists(done)
    assert run.find_step_run("look")[0].get_stdout_log() == "['step.py']\n"
    assert "materialised in" in _system_log(run, "look")
