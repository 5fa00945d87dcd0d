"""``cairn debug``: a failed or reused step recreated in a local folder — snapshot, environment,
inputs, arguments, environment variables — run in the foreground (pdb works) or by hand."""

from __future__ import annotations

import os
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
    assert result.returncode == 1, result.stderr  # the step's own exit code (SystemExit with a message)
    no_traceback(result)
    assert "lr 0.1 mode debugme" in result.stdout
    assert "inputs ['prepped']" in result.stdout
    assert "training failed on purpose" in result.stderr
    assert "in its run: Failed: " in flat(result.stderr)  # why it failed then, said before it runs again
    assert "[offline run] scalar value = 41" in result.stderr  # never logged into the recorded run
    assert workspace.get_run(ran["1.train"]).get_metrics() == {"value": 41}  # only the original run's
    folder = root / ".cairn" / "debug" / ran["1.train"]
    assert sorted(os.listdir(folder / "work")) == ["prep.py", "train.py"]  # the snapshot, as the step's folder was
    assert (folder / ".cairn_debug" / "outputs" / "model" / "model.txt").read_text() == "42"


def test_print_prepares_a_folder_that_reproduces_the_step_by_hand(workspace: Workspace, ran: dict[str, str],
                                                                  tmp_path: Path) -> None:
    folder = tmp_path / "here"
    result = cairn("debug", ran["2.train"], "--print", "--dir", str(folder), cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    script = folder / ".cairn_debug" / "debug.sh"
    assert result.stdout.strip() == str(script)  # only its path: "$(cairn debug ID --print)" runs it
    # through a link elsewhere, with CDPATH, and a shell whose Python variables an isolated environment drops
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "outputs").mkdir(parents=True)
    (elsewhere / "outputs" / "important.txt").write_text("mine")
    (elsewhere / "run-step.sh").symlink_to(script)
    by_hand = subprocess.run([str(elsewhere / "run-step.sh")], capture_output=True, text=True, timeout=60, cwd="/",
                             env={"PATH": "/usr/bin:/bin", "FAIL": "0", "CDPATH": ".:/tmp",
                                  "PYTHONHOME": "/nonexistent", "PYTHONPATH": str(tmp_path)})
    assert by_hand.returncode == 0, by_hand.stderr
    assert "mode debugme" in by_hand.stdout
    assert (elsewhere / "outputs" / "important.txt").read_text() == "mine"
    assert f"prefix {workspace.location}/.cairn/envs/" in by_hand.stdout  # the step's own environment
    again = cairn("debug", ran["2.train"], "--print", "--dir", str(folder), cwd=Path(workspace.location))
    assert again.returncode == 2 and "--force" in flat(again.stderr)
    assert cairn("debug", ran["2.train"], "--print", "--dir", str(folder), "--force",
                 cwd=Path(workspace.location)).returncode == 0
    assert cairn("env", "prune", cwd=Path(workspace.location)).returncode == 0  # its environment goes
    pruned = subprocess.run([str(script)], capture_output=True, text=True, timeout=60)
    assert pruned.returncode == 1 and "interpreter" in pruned.stderr and "--force" in pruned.stderr, pruned.stderr


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
    unforced = cairn("debug", ran["1.train"], "--dir", ".", "--print", cwd=root)  # --force would not help: not offered
    assert unforced.returncode == 2 and "was not made by `cairn debug`" in flat(unforced.stderr)
    assert "--force" not in flat(unforced.stderr)
    empty = cairn("debug", ran["1.train"], "--dir", "", "--print", cwd=root)
    assert empty.returncode == 2 and "--dir is empty" in flat(empty.stderr)
    no_traceback(empty)


def test_the_recreated_step_cannot_change_what_the_run_recorded(workspace: Workspace,
                                                                write_script: Callable[..., Path]) -> None:
    """Inputs used in place (a committed output, a local datastore's dataset) are seen through a
    folder of the recreated step's own; a file of the snapshot named debug.sh stays the user's."""
    from cairn import Dataset

    store = workspace.get_default_datastore()
    (Path(store.root) / "raw").mkdir()
    (Path(store.root) / "raw" / "r.txt").write_text("raw")
    raw = Dataset.File.from_files((store, "raw")).register(workspace, "raw")
    write_script("make.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                            "open(os.path.join(sys.argv[1], 'm.txt'), 'w').write('made')\n")
    src = write_script("use.py", """
        import os, subprocess, sys
        for folder in sys.argv[1:3] if os.environ.get("CAIRN_DEBUG_OF") else ():  # only when recreated
            open(os.path.join(folder, "scribble.txt"), "w").write("x")  # adds to its inputs' folders
            for name in os.listdir(folder):
                if name != "scribble.txt":
                    os.remove(os.path.join(folder, name))
        print(subprocess.run(["sh", "./debug.sh"], capture_output=True, text=True).stdout.strip())
    """)
    (src / "debug.sh").write_text("echo user script intact\n")
    made = PipelineData("made")
    steps = [PythonScriptStep("make.py", name="make", source_directory=str(src), arguments=[made], outputs=[made]),
             PythonScriptStep("use.py", name="use", source_directory=str(src),
                              arguments=[made.as_mount(), raw.as_named_input("raw").as_mount()])]
    run = Experiment(workspace, "debug").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"
    use = run.find_step_run("use")[0]
    committed = run.find_step_run("make")[0].get_output_data("made").local_path
    before = {p: sorted(os.listdir(p)) for p in (committed, Path(store.root) / "raw")}

    result = cairn("debug", use.id, cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    assert "user script intact" in result.stdout
    assert {p: sorted(os.listdir(p)) for p in before} == before
    assert (committed / "m.txt").read_text() == "made" and (Path(store.root) / "raw" / "r.txt").read_text() == "raw"


def test_a_recreated_step_has_its_datasets_and_workspace(workspace: Workspace,
                                                         write_script: Callable[..., Path]) -> None:
    from cairn import Dataset

    store = workspace.get_default_datastore()
    (Path(store.root) / "t.csv").write_text("a,b\n1,x\n2,y\n")
    table = Dataset.Tabular.from_delimited_files((store, "t.csv")).register(workspace, "numbers")
    src = write_script("table.py", """
        from cairn import Run
        run = Run.get_context(allow_offline=False)
        df = run.input_datasets["tbl"].to_pandas_dataframe()
        print("rows", len(df), "workspace", run.experiment.workspace.name, "experiment", run.experiment.name)
        run.parent.log("parent_metric", 1)
        run.log("child_metric", 2)
    """)
    step = PythonScriptStep("table.py", name="table", source_directory=str(src), inputs=[table.as_named_input("tbl")])
    run = Experiment(workspace, "tables").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    done = run.find_step_run("table")[0]
    result = cairn("debug", done.id, cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    assert f"rows 2 workspace {workspace.name} experiment tables" in result.stdout
    assert "[offline run] scalar parent_metric = 1" in result.stderr
    assert run.get_metrics() == {"parent_metric": 1} and done.get_metrics() == {"child_metric": 2}  # the run's own
    # the Dataset a direct input is reads the step's copies, not the datastore's files as they are now
    # (a folder name that is neither markup, nor an emoji code, nor an fsspec chain)
    folder = Path(workspace.location) / "a debug 'folder' [draft] :memo: d::e"
    printed = cairn("debug", done.id, "--print", "--dir", str(folder), cwd=Path(workspace.location))
    assert printed.returncode == 0, printed.stderr
    assert f"# to run it: '{folder}/.cairn_debug/debug.sh'".replace("'folder'", "'\"'\"'folder'\"'\"'") \
        in printed.stderr, printed.stderr
    (Path(store.root) / "t.csv").write_text("a,b\n1,x\n2,y\n3,z\n")
    pasted = next(line for line in printed.stderr.splitlines() if line.startswith("# to run it: "))
    by_hand = subprocess.run(["bash", "-c", pasted.removeprefix("# to run it: ")], capture_output=True, text=True,
                             timeout=120)
    assert by_hand.returncode == 0 and "rows 2 " in by_hand.stdout, by_hand.stderr
    (Path(store.root) / "t.csv").unlink()
    assert subprocess.run(["bash", "-c", pasted.removeprefix("# to run it: ")], capture_output=True, text=True,
                          timeout=120).returncode == 0


def test_a_direct_dataset_of_many_files_reads_its_copies_in_their_layout(workspace: Workspace,
                                                                       write_script: Callable[..., Path]) -> None:
    """Thousands of files: the recreated step's Dataset names the folder of its copies, not each file
    (a variable holds at most 128 KiB)."""
    from cairn import Dataset

    store = workspace.get_default_datastore()
    for i in range(1500):
        part = Path(store.root) / "images" / f"part{i % 3}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"image-with-a-long-name-{i:05d}.txt").write_text(str(i))
    images = Dataset.File.from_files((store, "images/"))
    src = write_script("count.py", """
        import sys
        from cairn import Run
        paths = Run.get_context().input_datasets["images"].to_path()
        print("files", len(paths), sorted(paths)[0])
        sys.exit(3)
    """)
    step = PythonScriptStep("count.py", name="count", source_directory=str(src),
                            inputs=[images.as_named_input("images")])
    run = Experiment(workspace, "many").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    count = run.find_step_run("count")[0]
    assert count.get_stdout_log() == "files 1500 part0/image-with-a-long-name-00000.txt\n"
    result = cairn("debug", count.id, cwd=Path(workspace.location))
    assert result.returncode == 3, result.stderr
    assert result.stdout == count.get_stdout_log()  # the same layout, from the step's copies


def test_debug_sh_sets_the_steps_variables_whatever_the_shell_has(workspace: Workspace,
                                                                  write_script: Callable[..., Path],
                                                                  tmp_path: Path) -> None:
    src = write_script("env.py", """
        import os, sys
        print("vars", os.environ.get("MY-VAR"), os.environ.get("PLAIN"), os.environ.get("CAIRN_STEP_NAME"),
              os.environ.get("-x"), os.environ.get("A B"), os.environ.get("CAIRN_RUN_ID"))
        print("args", sys.argv[1:])
        sys.exit(3)
    """)
    rc = RunConfiguration()
    rc.environment_variables = {"MY-VAR": "dash $HOME", "PLAIN": "it's", "-x": "1", "A B": "2"}
    step = PythonScriptStep("env.py", name="env", source_directory=str(src), runconfig=rc,
                            arguments=["two words", "$(id)", ""])
    run = Experiment(workspace, "debug").submit(Pipeline(workspace, [step]))
    run.wait_for_completion(show_output=False, raise_on_error=False)
    step_run = run.find_step_run("env")[0]
    folder = tmp_path / "with space"
    result = cairn("debug", step_run.id, "--print", "--dir", str(folder), cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()[0]  # the path as it is (spaces and all): "$(cairn debug ID --print)"
    # a bare shell, elsewhere, that has the recorded run's bindings (as a step's own shell would)
    by_hand = subprocess.run(["/bin/sh", "-c", '"$0"', printed], capture_output=True, text=True, timeout=60, cwd="/",
                             env={"PATH": "/usr/bin:/bin", "CAIRN_RUN_ID": step_run.id,
                                  "CAIRN_WORKSPACE": workspace.location})
    assert by_hand.returncode == 3, by_hand.stderr
    assert "vars dash $HOME it's env 1 2 None" in by_hand.stdout  # never bound to the recorded run
    assert "args ['two words', '$(id)', '']" in by_hand.stdout
    foreground = cairn("debug", step_run.id, "--dir", str(folder), "--force", cwd=Path(workspace.location))
    assert foreground.returncode == 3  # the step's exit code
    assert "args ['two words', '$(id)', '']" in foreground.stdout


def test_a_bad_dir_is_a_clear_error(workspace: Workspace, ran: dict[str, str], tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for where, message in ((a_file, "is a file"), (a_file / "below", "cannot make")):
        result = cairn("debug", ran["1.train"], "--print", "--dir", str(where), cwd=Path(workspace.location))
        assert result.returncode == 2 and message in flat(result.stderr), result.stderr
        no_traceback(result)
    assert a_file.read_text() == "x"


def test_ctrl_c_reaches_the_step_not_cairn(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    """As a terminal's Ctrl-C does: SIGINT to the foreground process group. The step handles it
    (pdb would stop where it is) and `cairn debug` goes on waiting for it."""
    import signal
    import sys

    src = write_script("wait.py", """
        import os, signal, sys
        signal.signal(signal.SIGINT, lambda *_: (print("step got SIGINT", flush=True), sys.exit(0)))
        print("ready", flush=True)
        if os.environ.get("CAIRN_DEBUG_OF"):  # the recorded run ended at once
            signal.pause()
    """)
    run = Experiment(workspace, "debug").submit(Pipeline(workspace, [
        PythonScriptStep("wait.py", name="wait", source_directory=str(src))]))
    run.wait_for_completion(show_output=False, raise_on_error=False)
    step_run = run.find_step_run("wait")[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    proc = subprocess.Popen([sys.executable, "-m", "cairn", "debug", step_run.id], cwd=workspace.location, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "step got SIGINT" in out


def test_a_recreated_step_needs_its_inputs_and_a_folder_outside_its_sources(workspace: Workspace,
                                                                           ran: dict[str, str]) -> None:
    import shutil

    root = Path(workspace.location)
    src = root.parent / "src"  # the `ran` fixture's sources (write_script), beside the workspace
    inside = cairn("debug", ran["1.train"], "--dir", str(src / "dbg"), cwd=root)
    assert inside.returncode == 2 and "is inside the step's source folder" in flat(inside.stderr), inside.stderr
    assert not (src / "dbg").exists()
    prepped = workspace.get_run(ran["1.prep"]).get_output_data("prepped").local_path
    moved = prepped.with_name("moved-away")
    assert cairn("debug", ran["1.train"], "--print", cwd=root).returncode == 0
    earlier = root / ".cairn" / "debug" / ran["1.train"] / ".cairn_debug" / "debug.sh"
    shutil.move(prepped, moved)
    try:
        gone = cairn("debug", ran["1.train"], "--force", cwd=root)
        assert gone.returncode == 2 and "does not exist any more" in flat(gone.stderr), gone.stderr
        no_traceback(gone)
        assert earlier.is_file()  # checked before the earlier folder was replaced
    finally:
        shutil.move(moved, prepped)


def test_inputs_used_in_place_are_copies_that_keep_file_names(workspace: Workspace,
                                                             write_script: Callable[..., Path]) -> None:
    """A single-file dataset keeps its name (a script may read it by its suffix); a link inside a
    dataset that leads elsewhere in the datastore is a copy in the recreated step, not a way back."""
    import os

    from cairn import Dataset

    store = Path(workspace.get_default_datastore().root)
    (store / "table.csv").write_text("a\n1\n")
    (store / "elsewhere.txt").write_text("recorded")
    (store / "folder").mkdir()
    (store / "folder" / "link.txt").symlink_to(store / "elsewhere.txt")
    one = Dataset.File.from_files((workspace.get_default_datastore(), "table.csv"))
    many = Dataset.File.from_files((workspace.get_default_datastore(), "folder"))
    src = write_script("touch.py", """
        import os, sys
        print("file", os.path.basename(sys.argv[1]))
        if os.environ.get("CAIRN_DEBUG_OF"):
            with open(os.path.join(sys.argv[2], "link.txt"), "w") as f:
                f.write("changed by the recreated step")
    """)
    step = PythonScriptStep("touch.py", name="touch", source_directory=str(src),
                            arguments=[one.as_named_input("one").as_mount(), many.as_named_input("many").as_mount()])
    run = Experiment(workspace, "views").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    result = cairn("debug", run.find_step_run("touch")[0].id, cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    assert "file table.csv" in result.stdout
    assert (store / "elsewhere.txt").read_text() == "recorded" and os.path.islink(store / "folder" / "link.txt")


def test_a_link_back_up_an_input_is_no_loop(workspace: Workspace, write_script: Callable[..., Path]) -> None:
    from cairn import Dataset

    store = Path(workspace.get_default_datastore().root)
    (store / "looped" / "v3").mkdir(parents=True)
    (store / "looped" / "v3" / "m.txt").write_text("m")
    (store / "looped" / "latest").symlink_to("v3")
    (store / "looped" / "v3" / "up").symlink_to("..")
    data = Dataset.File.from_files((workspace.get_default_datastore(), "looped/v3/m.txt"))
    data_folder = Dataset.File.from_files((workspace.get_default_datastore(), "looped"), validate=False)
    src = write_script("ls.py", "import os, sys\nprint(sorted(os.listdir(sys.argv[1])))\n")
    step = PythonScriptStep("ls.py", name="ls", source_directory=str(src),
                            arguments=[data_folder.as_named_input("looped").as_mount()],
                            inputs=[data.as_named_input("one")])
    run = Experiment(workspace, "loops").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    result = cairn("debug", run.find_step_run("ls")[0].id, cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    assert "['latest', 'v3']" in result.stdout


def test_the_recreated_step_has_its_own_inputs_and_outputs_outside_its_folder(
        workspace: Workspace, write_script: Callable[..., Path], tmp_path: Path) -> None:
    """A glob of a local datastore's files (linked in the run's working folder) is copied, empty
    folders of an input are kept, outputs are outside the working folder (a step may copy its folder
    into one), each run of debug.sh starts with empty outputs, and --dir inside an input is refused."""
    from cairn import Dataset, Datastore

    lake = tmp_path / "lake"
    (lake / "imgs" / "empty").mkdir(parents=True)
    (lake / "imgs" / "a.txt").write_text("a")
    store = Datastore.register_local_folder(workspace, "lake", str(lake))
    src = write_script("keep.py", """
        import os, shutil, sys
        glob_dir, folder, out = sys.argv[1:4]
        print("outputs at start", sorted(os.listdir(out)), "folders", sorted(os.listdir(folder)))
        shutil.copytree(".", os.path.join(out, "code"))  # saves its code beside the model
        if os.environ.get("CAIRN_DEBUG_OF"):
            for top, _, files in os.walk(glob_dir):
                for name in files:
                    open(os.path.join(top, name), "a").write("changed")
    """)
    out = PipelineData("out")
    step = PythonScriptStep("keep.py", name="keep", source_directory=str(src), outputs=[out], arguments=[
        Dataset.File.from_files((store, "imgs/*.txt")).as_named_input("glob").as_download(),
        Dataset.File.from_files((store, "imgs")).as_named_input("folder").as_mount(), out])
    run = Experiment(workspace, "layout").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    step_id = run.find_step_run("keep")[0].id
    root = Path(workspace.location)

    inside = cairn("debug", step_id, "--dir", str(lake / "imgs" / "dbg"), cwd=root)
    assert inside.returncode == 2 and "inside the step's input folder" in flat(inside.stderr), inside.stderr
    assert not (lake / "imgs" / "dbg").exists()

    result = cairn("debug", step_id, "--dir", str(tmp_path / "dbg"), cwd=root)
    assert result.returncode == 0, result.stderr
    assert "outputs at start [] folders ['a.txt', 'empty']" in result.stdout
    assert (lake / "imgs" / "a.txt").read_text() == "a"  # the glob's files were the step's own copies
    script = tmp_path / "dbg" / ".cairn_debug" / "debug.sh"
    again = subprocess.run([str(script)], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert again.returncode == 0, again.stderr
    assert "outputs at start []" in again.stdout  # not what the first run left
    assert (lake / "imgs" / "a.txt").read_text() == "a"


def test_a_workspace_that_is_its_steps_source_folder_debugs_in_its_default_folder(tmp_path: Path) -> None:
    """.cairn/ is never in a snapshot, so .cairn/debug/ inside the source folder is fine."""
    (tmp_path / "hello.py").write_text("print('hello from the step')\n")
    from cairn.engine.client import stop_agent
    from cairn.storage.layout import WorkspaceLayout

    workspace = Workspace.create(str(tmp_path))
    try:
        run = Experiment(workspace, "here").submit(Pipeline(workspace, [
            PythonScriptStep("hello.py", name="hello", source_directory=str(tmp_path))]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        result = cairn("debug", run.find_step_run("hello")[0].id, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "hello from the step" in result.stdout
    finally:
        stop_agent(WorkspaceLayout(workspace.location))


def test_a_dir_that_would_change_recorded_data_or_the_next_snapshot_is_refused(
        workspace: Workspace, ran: dict[str, str], tmp_path: Path) -> None:
    root = Path(workspace.location)
    committed = workspace.get_run(ran["1.prep"]).get_output_data("prepped").local_path
    src = root.parent / "src"
    (tmp_path / "shared").mkdir()
    (src / "shared").symlink_to(tmp_path / "shared", target_is_directory=True)  # snapshots follow it
    try:
        for where, message in ((committed.parent / "dbg", "inside the local datastore folder"),
                               (tmp_path / "shared" / "dbg", "a link in the step's source folder")):
            result = cairn("debug", ran["1.train"], "--print", "--dir", str(where), cwd=root)
            assert result.returncode == 2 and message in flat(result.stderr), result.stderr
            assert not where.exists()
    finally:
        (src / "shared").unlink()


def test_a_bad_copy_limit_is_a_clear_error_before_anything_is_removed(workspace: Workspace,
                                                                       ran: dict[str, str]) -> None:
    root = Path(workspace.location)
    assert cairn("debug", ran["1.train"], "--print", cwd=root).returncode == 0
    script = root / ".cairn" / "debug" / ran["1.train"] / ".cairn_debug" / "debug.sh"
    result = cairn("debug", ran["1.train"], "--print", "--force", cwd=root, env_extra={"CAIRN_DEBUG_COPY_LIMIT": "2G"})
    assert result.returncode == 2 and "CAIRN_DEBUG_COPY_LIMIT must be a number of bytes" in flat(result.stderr)
    no_traceback(result)
    assert script.is_file()


def test_a_step_whose_source_folder_is_gone_is_recreated_from_its_snapshot(
        workspace: Workspace, write_script: Callable[..., Path]) -> None:
    import shutil

    src = write_script("boom.py", "raise SystemExit('boom')\n", folder="gone-src")
    run = Experiment(workspace, "debug").submit(Pipeline(workspace, [
        PythonScriptStep("boom.py", name="boom", source_directory=str(src))]))
    run.wait_for_completion(show_output=False, raise_on_error=False)
    shutil.rmtree(src)
    result = cairn("debug", run.find_step_run("boom")[0].id, cwd=Path(workspace.location))
    assert result.returncode == 1 and "boom" in result.stderr, result.stderr


def test_a_dataset_whose_files_changed_since_the_run_is_said(workspace: Workspace,
                                                            write_script: Callable[..., Path]) -> None:
    from cairn import Dataset

    store = Path(workspace.get_default_datastore().root)
    (store / "rows.csv").write_text("a\n1\n2\n")
    rows = Dataset.File.from_files((workspace.get_default_datastore(), "rows.csv"))
    src = write_script("count.py", "import sys\nprint('rows', len(open(sys.argv[1]).read().split()) - 1)\n")
    step = PythonScriptStep("count.py", name="count", source_directory=str(src),
                            arguments=[rows.as_named_input("rows").as_mount()])
    run = Experiment(workspace, "changed").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    (store / "rows.csv").write_text("a\n1\n2\n3\n4\n")
    result = cairn("debug", run.find_step_run("count")[0].id, cwd=Path(workspace.location))
    assert result.returncode == 0 and "rows 4" in result.stdout
    assert "input rows: its files changed since the run" in flat(result.stderr)


def test_a_dataset_whose_files_are_gone_is_refused_before_an_earlier_folder_goes(
        workspace: Workspace, write_script: Callable[..., Path]) -> None:
    from cairn import Dataset

    store = Path(workspace.get_default_datastore().root)
    (store / "parts").mkdir()
    for n in (1, 2):
        (store / "parts" / f"p{n}.csv").write_text(f"a\n{n}\n")
    parts = Dataset.File.from_files((workspace.get_default_datastore(), "parts/*.csv"))  # files linked one by one
    src = write_script("count.py", "import os, sys\nprint('parts', sorted(os.listdir(sys.argv[1])))\n")
    step = PythonScriptStep("count.py", name="count", source_directory=str(src),
                            arguments=[parts.as_named_input("parts").as_mount()])
    run = Experiment(workspace, "gone").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    step_id, root = run.find_step_run("count")[0].id, Path(workspace.location)
    (store / "parts" / "p3.csv").write_text("a\n3\n")  # changed since the run: said, and read as it is now
    result = cairn("debug", step_id, cwd=root)
    assert result.returncode == 0, result.stderr
    assert "parts ['p1.csv', 'p2.csv', 'p3.csv']" in result.stdout
    assert "input parts: its files changed since the run" in flat(result.stderr)
    notes = root / ".cairn" / "debug" / step_id / "work" / "my-notes.txt"
    notes.write_text("mine")
    for f in (store / "parts").iterdir():
        f.unlink()
    gone = cairn("debug", step_id, "--force", cwd=root)
    assert gone.returncode == 2 and "input parts: its files are gone" in flat(gone.stderr), gone.stderr
    no_traceback(gone)
    assert notes.read_text() == "mine"  # refused before the earlier folder was replaced


def test_a_recreated_step_outside_its_workspace_still_finds_it(workspace: Workspace,
                                                               write_script: Callable[..., Path],
                                                               tmp_path: Path) -> None:
    src = write_script("where.py", "from cairn import Workspace\nprint('workspace', Workspace.from_config().location)\n")
    run = Experiment(workspace, "where").submit(Pipeline(workspace, [
        PythonScriptStep("where.py", name="where", source_directory=str(src))]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert f"workspace {workspace.location}" in run.find_step_run("where")[0].get_stdout_log()
    result = cairn("debug", run.find_step_run("where")[0].id, "--dir", str(tmp_path / "far"),
                   cwd=Path(workspace.location))
    assert result.returncode == 0, result.stderr
    assert f"workspace {workspace.location}" in result.stdout


def test_what_the_step_inherited_from_its_agent_is_recreated(workspace: Workspace, write_script: Callable[..., Path],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's variables reach each step; debug gives them back from a shell that lacks them (a
    secret-looking one was kept as a digest only: the shell's is used, said when missing or other)."""
    import sys

    lib = tmp_path / "extlib"
    lib.mkdir()
    (lib / "extmod.py").write_text("WHERE = 'ext'\n")
    monkeypatch.setenv("PYTHONPATH", str(lib))  # the agent this submit starts inherits these
    monkeypatch.setenv("FOO_AGENT", "from the agent")
    monkeypatch.setenv("MY_API_TOKEN", "s3cr3t")
    monkeypatch.setenv("WAREHOUSE", "postgres://me:hunter2@db/x")  # a password in a URL: by its value
    monkeypatch.setenv("RAW_BYTES", os.fsdecode(b"caf\xe9"))  # not UTF-8: kept and given back as it is
    src = write_script("env.py", "import os, sys, extmod\nprint(extmod.WHERE, os.environ.get('FOO_AGENT'), "
                                 "os.environ.get('MY_API_TOKEN'), os.environ.get('ADDED'))\n"
                                 "print(os.environb.get(b'RAW_BYTES', b'').hex(), file=sys.stderr)\n")
    run = Experiment(workspace, "inherit").submit(Pipeline(workspace, [
        PythonScriptStep("env.py", name="env", source_directory=str(src))]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    step_id = run.find_step_run("env")[0].id
    assert run.find_step_run("env")[0].get_stdout_log() == "ext from the agent s3cr3t None\n"
    kept = "".join(p.read_text(errors="surrogateescape") for p in (Path(workspace.location) / ".cairn" / "inherited").iterdir())
    assert "s3cr3t" not in kept and "hunter2" not in kept and "from the agent" in kept
    shell = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "FOO_AGENT", "MY_API_TOKEN", "WAREHOUSE", "RAW_BYTES")
             and not k.startswith("CAIRN_")}
    root = Path(workspace.location)

    def debug(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cairn", "debug", step_id, "--force"], cwd=root,
                              env={**shell, "NO_COLOR": "1", **extra}, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)

    bare = debug(ADDED="by hand")
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout == "ext from the agent None by hand\n"
    assert "636166e9" in bare.stderr  # the step's variable of bytes that are not UTF-8, as it had it
    assert "MY_API_TOKEN was set in the step's run (it looks secret: only a digest of its value was recorded" \
        in flat(bare.stderr)
    assert "this shell adds" in flat(bare.stderr) and "ADDED" in bare.stderr
    other = debug(MY_API_TOKEN="another")
    assert other.stdout == "ext from the agent another None\n"
    assert "MY_API_TOKEN had another value in the step's run" in flat(other.stderr)
    same = debug(MY_API_TOKEN="s3cr3t")
    assert same.stdout == "ext from the agent s3cr3t None\n" and "MY_API_TOKEN" not in same.stderr
    printed = subprocess.run([sys.executable, "-m", "cairn", "debug", step_id, "--force", "--print"], cwd=root,
                             env={**shell, "MY_API_TOKEN": "s3cr3t"}, capture_output=True, text=True, timeout=120)
    script = Path(printed.stdout.strip())
    assert "s3cr3t" not in script.read_text(errors="surrogateescape")  # never written out: whoever runs it gives it
    by_hand = subprocess.run([str(script)], env=shell, cwd="/", capture_output=True, text=True, timeout=60)
    assert by_hand.stdout == "ext from the agent None None\n", by_hand.stderr
    assert "636166e9" in by_hand.stderr
    rerun = Experiment(workspace, "inherit").submit(Pipeline(workspace, [
        PythonScriptStep("env.py", name="env", source_directory=str(src))]))
    assert rerun.wait_for_completion(show_output=False) == "Completed"
    reused = rerun.find_step_run("env")[0]
    assert reused.get_status() == "Reused"
    step_id = reused.id  # a reused step is recreated as the run it reuses ran
    again = debug(MY_API_TOKEN="s3cr3t")
    assert again.stdout == "ext from the agent s3cr3t None\n" and "were not recorded" not in flat(again.stderr)


def test_debug_refuses_folders_of_the_workspace_and_of_other_steps(workspace: Workspace,
                                                                   write_script: Callable[..., Path]) -> None:
    """``.cairn/`` (its store, objects and working folders; its ``debug/`` is the default) and the
    source folder of another step of the run: the next run would snapshot the files there."""
    a = write_script("a.py", "import sys\nsys.exit(1)\n", folder="a")
    b = write_script("b.py", "print('b')\n", folder="b")
    run = Experiment(workspace, "debug").submit(Pipeline(workspace, [
        PythonScriptStep("a.py", name="a", source_directory=str(a)),
        PythonScriptStep("b.py", name="b", source_directory=str(b))]))
    run.wait_for_completion(show_output=False, raise_on_error=False)
    failed = run.find_step_run("a")[0].id
    root = Path(workspace.location)
    for where, message in ((root / ".cairn" / "objects" / "dbg", "inside the workspace's own folder"),
                           (root / ".cairn" / "work" / "dbg", "inside the workspace's own folder"),
                           (b / "dbg", "the source folder of another step of this run")):
        result = cairn("debug", failed, "--print", "--dir", str(where), cwd=root)
        assert result.returncode == 2 and message in flat(result.stderr), result.stderr
        no_traceback(result)
        assert not where.exists()
    assert cairn("debug", failed, "--print", "--dir", str(root / ".cairn" / "debug" / "mine"), cwd=root).returncode == 0


def test_what_debug_cannot_or_should_not_recreate_is_said(workspace: Workspace, write_script: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    """A step that wrote into its input changed it after the run: said. A step whose environment
    asks for a container is refused, as its run was. The workspace's secret key never goes into
    debug.sh, which only its user may read."""
    src = write_script("make.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\nopen(sys.argv[1] + '/v.txt', 'w').write('v1')\n")
    write_script("spoil.py", """
        import os, sys
        path = os.path.join(sys.argv[1], "v.txt")
        os.chmod(path, 0o644)  # root writes anyway; a user must make it writable first
        open(path, "a").write(" spoiled")  # and exits 0: its run fails for that change alone
    """)
    made = PipelineData("made")
    run = Experiment(workspace, "debug").submit(Pipeline(workspace, [
        PythonScriptStep("make.py", name="make", source_directory=str(src), arguments=[made], outputs=[made]),
        PythonScriptStep("spoil.py", name="spoil", source_directory=str(src), arguments=[made], inputs=[made])]))
    run.wait_for_completion(show_output=False, raise_on_error=False)
    spoil = run.find_step_run("spoil")[0].id
    result = cairn("debug", spoil, "--print", "--dir", str(tmp_path / "dbg"), cwd=Path(workspace.location),
                   env_extra={"CAIRN_SECRET_KEY": "not-for-files"})
    assert result.returncode == 0, result.stderr
    assert "input made: the output of step 'make' it reads changed since it was committed" in flat(result.stderr)
    said = flat(result.stderr)
    assert said.index("in its run: Failed: ") < said.index("input made: the output")  # what the run was, first
    assert "this failure is not repeated here" in said
    refused = cairn("debug", spoil, "--print", "--dir", str(src), cwd=Path(workspace.location))
    assert refused.returncode == 2 and "warning" not in refused.stderr, refused.stderr  # the arguments first
    script = tmp_path / "dbg" / ".cairn_debug" / "debug.sh"
    assert "not-for-files" not in script.read_text() and (script.stat().st_mode & 0o777) == 0o700

    env = Environment("boxed")
    env.docker.enabled = True
    rc = RunConfiguration()
    rc.environment = env
    boxed = Experiment(workspace, "debug").submit(Pipeline(workspace, [
        PythonScriptStep("make.py", name="boxed", source_directory=str(src), arguments=["x"], runconfig=rc)]))
    boxed.wait_for_completion(show_output=False, raise_on_error=False)
    result = cairn("debug", boxed.get_steps()[0].id, "--print", cwd=Path(workspace.location))
    assert result.returncode == 2 and "cannot run containers" in flat(result.stderr), result.stderr
    no_traceback(result)


def test_debug_sh_starts_an_interpreter_whose_path_has_an_equals_sign(tmp_path: Path) -> None:
    from cairn.engine.debug import _shell_script

    tools = tmp_path / "a=b" / ".cairn_debug"
    (tools.parent / "work").mkdir(parents=True)
    tools.mkdir()
    link = tmp_path / "a=b" / "python"
    link.symlink_to(os.path.realpath(__import__("sys").executable))
    script = tools / "debug.sh"
    script.write_text(_shell_script("s", "run", "step", {"GREETING": "hi"}, [], [str(link), "-c",
                      "import os, sys; print(os.environ['GREETING'], sys.argv[1:])"], [], tools))
    result = subprocess.run(["sh", str(script), "extra"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi ['extra']\n"
