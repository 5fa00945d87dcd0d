"""Committed outputs stay what they were: downloads are private copies, changed outputs are not reused."""

from __future__ import annotations

import os
from pathlib import Path

from cairn import Datastore, Experiment, Pipeline, PipelineData, PythonScriptStep

PRODUCE = """
import os, sys
os.makedirs(sys.argv[1], exist_ok=True)
open(os.path.join(sys.argv[1], "d.txt"), "w").write("data\\n")
open(os.environ["MARKER"], "a").write("produce\\n")
"""

MUTATE = """
import sys
with open(sys.argv[1] + "/d.txt", "a") as f:
    f.write("MUTATED\\n")
print(open(sys.argv[1] + "/d.txt").read())
"""

READ = """
import sys
print(open(sys.argv[1] + "/d.txt").read(), end="")
"""


def _pipeline(ws, src, consumer: str, mode: str, out: PipelineData | None = None):
    out = out or PipelineData("o")
    produce = PythonScriptStep("produce.py", name="produce", source_directory=src, arguments=[out], outputs=[out])
    binding = out.as_download() if mode == "download" else out.as_mount()
    use = PythonScriptStep(consumer, name=consumer.removesuffix(".py"), source_directory=src, arguments=[binding])
    return Pipeline(ws, [produce, use])


def test_a_download_input_is_a_private_copy(workspace, write_script, tmp_path, monkeypatch):
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    src = write_script("produce.py", PRODUCE)
    write_script("mutate.py", MUTATE)
    write_script("read.py", READ)
    exp = Experiment(workspace, "download")
    first = exp.submit(_pipeline(workspace, src, "mutate.py", "download"))
    first.wait_for_completion(show_output=False)
    assert "MUTATED" in first.find_step_run("mutate")[0].get_stdout_log()
    committed = first.find_step_run("produce")[0].get_output_data("o").local_path / "d.txt"
    assert committed.read_text() == "data\n"
    second = exp.submit(_pipeline(workspace, src, "read.py", "download"))
    second.wait_for_completion(show_output=False)
    assert second.find_step_run("produce")[0].get_status() == "Reused"
    assert second.find_step_run("read")[0].get_stdout_log() == "data\n"
    system = first.find_step_run("mutate")[0].get_system_log()
    assert "copied to" in system


def test_outputs_changed_in_place_are_not_reused(workspace, write_script, tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    src = write_script("produce.py", PRODUCE)
    write_script("read.py", READ)
    exp = Experiment(workspace, "mount")
    first = exp.submit(_pipeline(workspace, src, "read.py", "mount"))
    first.wait_for_completion(show_output=False)
    committed = first.find_step_run("produce")[0].get_output_data("o").local_path / "d.txt"
    assert not os.access(committed, os.W_OK) or os.geteuid() == 0  # read-only (root may still write)
    os.chmod(committed, 0o644)
    with open(committed, "a") as f:  # someone changes committed bytes behind Cairn's back
        f.write("tampered\n")
    second = exp.submit(_pipeline(workspace, src, "read.py", "mount"))
    second.wait_for_completion(show_output=False)
    assert marker.read_text().split() == ["produce", "produce"]  # the producer ran again
    assert second.find_step_run("read")[0].get_stdout_log() == "data\n"


def test_the_output_datastore_is_part_of_the_fingerprint(workspace, write_script, tmp_path, monkeypatch):
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    src = write_script("produce.py", PRODUCE)
    write_script("read.py", READ)
    exp = Experiment(workspace, "stores")
    exp.submit(_pipeline(workspace, src, "read.py", "mount")).wait_for_completion(show_output=False)
    (tmp_path / "other").mkdir()
    other = Datastore.register_local_folder(workspace, "other", tmp_path / "other")
    run = exp.submit(_pipeline(workspace, src, "read.py", "mount", PipelineData("o", datastore=other)))
    run.wait_for_completion(show_output=False)
    produce = run.find_step_run("produce")[0]
    assert produce.get_status() == "Completed"
    output = produce.get_output_data("o")
    assert output.datastore_name == "other" and output.local_path.is_relative_to(tmp_path / "other")
    assert any(c.startswith("outputs changed") for c in produce.explain()["changes"])


def test_an_output_destination_is_part_of_the_fingerprint(workspace, write_script, tmp_path):
    from cairn import OutputFileDatasetConfig

    src = write_script("write.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                   "open(os.path.join(sys.argv[1], 'x.txt'), 'w').write('x')\n")
    store = workspace.get_default_datastore()
    exp = Experiment(workspace, "destinations")
    for folder in ("fixed/a", "fixed/b"):
        out = OutputFileDatasetConfig("x", destination=(store, folder)).as_upload(overwrite=True)
        step = PythonScriptStep("write.py", name="write", source_directory=src, arguments=[out])
        run = exp.submit(Pipeline(workspace, [step]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        assert run.find_step_run("write")[0].get_status() == "Completed"  # the second ran: written elsewhere
        assert (Path(store.root) / folder / "x.txt").read_text() == "x"


def test_an_empty_folder_in_an_output_is_part_of_it(workspace, write_script, tmp_path, monkeypatch):
    """A consumer that lists its input sees the empty folder: the output changed, the consumer runs."""
    flag = tmp_path / "with-folder"
    monkeypatch.setenv("FLAG", str(flag))
    src = write_script("make.py", """
        import os, sys
        os.makedirs(sys.argv[1], exist_ok=True)
        open(os.path.join(sys.argv[1], "v.txt"), "w").write("v")
        if os.path.exists(os.environ["FLAG"]):
            os.makedirs(os.path.join(sys.argv[1], "checkpoints"))
    """)
    write_script("list.py", "import os, sys\nprint(sorted(os.listdir(sys.argv[1])))\n")

    def submit():
        out = PipelineData("o")
        steps = [PythonScriptStep("make.py", name="make", source_directory=src, arguments=[out], outputs=[out],
                                  allow_reuse=False),
                 PythonScriptStep("list.py", name="list", source_directory=src, arguments=[out.as_mount()])]
        run = Experiment(workspace, "empty").submit(Pipeline(workspace, steps))
        assert run.wait_for_completion(show_output=False) == "Completed"
        return run.find_step_run("list")[0]

    assert submit().get_stdout_log().strip() == "['v.txt']"
    flag.write_text("")
    second = submit()
    assert second.get_status() == "Completed", second.explain()
    assert second.get_stdout_log().strip() == "['checkpoints', 'v.txt']"
    assert "input o changed" in " ".join(second.explain()["changes"])


def test_how_a_dataset_is_read_is_part_of_the_fingerprint(workspace, write_script):
    from cairn import Dataset

    store = workspace.get_default_datastore()
    (Path(store.root) / "t.csv").write_text("a,b\n1,x\n2,y\n3,z\n")
    table = Dataset.Tabular.from_delimited_files((store, "t.csv"))
    src = write_script("rows.py", "from cairn import Run\n"
                                  "print('rows', len(Run.get_context().input_datasets['t'].to_pandas_dataframe()))\n")

    def rows(dataset):
        step = PythonScriptStep("rows.py", name="rows", source_directory=src, inputs=[dataset.as_named_input("t")])
        run = Experiment(workspace, "reading").submit(Pipeline(workspace, [step]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        return run.find_step_run("rows")[0]

    assert rows(table.take(2)).get_stdout_log().strip() == "rows 2"
    taken = rows(table.take(1))
    assert taken.get_status() == "Completed" and taken.get_stdout_log().strip() == "rows 1"
    assert "input t changed" in " ".join(taken.explain()["changes"])
    assert rows(table.take(1)).get_status() == "Reused"


def test_explain_says_an_earlier_identical_run_did_not_complete(workspace, write_script, tmp_path, monkeypatch):
    flag = tmp_path / "fail"
    flag.write_text("")
    monkeypatch.setenv("FLAG", str(flag))
    src = write_script("flaky.py", "import os, sys\nsys.exit(1 if os.path.exists(os.environ['FLAG']) else 0)\n")
    step = PythonScriptStep("flaky.py", name="flaky", source_directory=src)
    exp = Experiment(workspace, "flaky")
    exp.submit(Pipeline(workspace, [step])).wait_for_completion(show_output=False, raise_on_error=False)
    flag.unlink()
    run = exp.submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    summary = run.find_step_run("flaky")[0].explain()["summary"]
    assert "which did not complete (Failed): nothing to reuse" in summary, summary


def test_explain_names_what_changed_in_the_environment(workspace, write_script):
    from cairn import Environment, RunConfiguration

    src = write_script("env.py", "import os\nprint(os.environ.get('LEVEL'))\n")
    exp = Experiment(workspace, "environments")
    for level in ("1", "2"):
        rc = RunConfiguration()
        rc.environment = Environment("isolated")  # managed, no packages: built without a network
        rc.environment.environment_variables = {"LEVEL": level}
        step = PythonScriptStep("env.py", name="env", source_directory=src, runconfig=rc)
        run = exp.submit(Pipeline(workspace, [step]))
        assert run.wait_for_completion(show_output=False) == "Completed"
    changes = run.find_step_run("env")[0].explain()["changes"]
    assert "environment changed: environment_variables LEVEL '1' -> '2'" in changes, changes


def test_explain_says_when_another_steps_file_changed_a_shared_snapshot(workspace, write_script):
    src = write_script("a.py", "print('a')\n")
    write_script("b.py", "print('b')\n")
    steps = [PythonScriptStep(f"{n}.py", name=n, source_directory=src) for n in ("a", "b")]
    exp = Experiment(workspace, "shared")
    exp.submit(Pipeline(workspace, steps)).wait_for_completion(show_output=False)
    (src / "b.py").write_text("print('b, edited')\n")
    run = exp.submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"
    (a_change,) = run.find_step_run("a")[0].explain()["changes"]
    assert a_change.startswith("snapshot changed: b.py modified (not this step's script a.py: steps that share")
    assert run.find_step_run("b")[0].explain()["changes"] == ["snapshot changed: b.py modified"]


def test_a_local_datastore_inside_the_source_folder_is_not_snapshotted(workspace, tmp_path):
    """A project with its data folder registered as a datastore: outputs committed there must not
    grow the next snapshot (every run would rerun), and a step with a folder of its own gets no
    shared-folder hint."""
    from cairn import Datastore

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "step.py").write_text("import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                     "open(os.path.join(sys.argv[1], 'o.txt'), 'w').write('o')\n")
    store = Datastore.register_local_folder(workspace, "local_data", str(project / "data"))
    exp = Experiment(workspace, "in-project")

    def submit():
        out = PipelineData("out", datastore=store)
        step = PythonScriptStep("step.py", name="step", source_directory=str(project), arguments=[out], outputs=[out])
        run = exp.submit(Pipeline(workspace, [step]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        return run.find_step_run("step")[0]

    submit()
    assert submit().get_status() == "Reused"
    (project / "step.py").write_text((project / "step.py").read_text() + "# edited\n")
    assert submit().explain()["changes"] == ["snapshot changed: step.py modified"]


def test_a_step_that_changes_an_input_given_in_place_fails_saying_so(workspace, write_script):
    """A committed output is read-only, but its folder is not, and root writes anyway: a consumer
    that adds, rewrites or removes its files fails, naming the input, instead of Completing over
    changed recorded data; a consumer given a private copy (as_download) may change it."""
    src = write_script("make.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                  "open(os.path.join(sys.argv[1], 'v.txt'), 'w').write('v1')\n")
    write_script("change.py", """
        import os, sys
        folder, how = sys.argv[1], sys.argv[2]
        if how == "add":
            open(os.path.join(folder, "new.txt"), "w").write("new")
        elif how == "rewrite":
            path = os.path.join(folder, "v.txt")
            os.chmod(path, 0o644)
            open(path, "a").write(" and more")
    """)
    for how, mode, expected in (("add", "mount", "Failed"), ("rewrite", "mount", "Failed"),
                                ("rewrite", "download", "Completed"), ("read", "mount", "Completed")):
        made = PipelineData("made")
        given = made.as_download() if mode == "download" else made.as_input()
        run = Experiment(workspace, "in-place").submit(Pipeline(workspace, [
            PythonScriptStep("make.py", name="make", source_directory=str(src), arguments=[made], outputs=[made],
                             allow_reuse=False),
            PythonScriptStep("change.py", name="change", source_directory=str(src), arguments=[given, how],
                             inputs=[given], allow_reuse=False)]))
        assert run.wait_for_completion(show_output=False, raise_on_error=False) == expected, (how, mode)
        change = run.find_step_run("change")[0]
        if expected == "Failed":
            assert "the step changed its input 'made'" in change._row()["status_reason"], how
            assert "as_download()" in change._row()["status_reason"]
        else:
            assert change._row()["status_reason"] is None


def test_a_destination_in_another_datastore_leaves_no_step_folder_there(workspace, write_script, tmp_path):
    from cairn import Datastore, OutputFileDatasetConfig

    (tmp_path / "lake").mkdir()
    lake = Datastore.register_local_folder(workspace, "lake", tmp_path / "lake")
    src = write_script("write.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                   "open(os.path.join(sys.argv[1], 'x.txt'), 'w').write('x')\n")
    out = OutputFileDatasetConfig("x", destination=(lake, "results/x")).as_upload(overwrite=True)
    run = Experiment(workspace, "destination").submit(Pipeline(workspace, [
        PythonScriptStep("write.py", name="write", source_directory=src, arguments=[out])]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    step = run.find_step_run("write")[0]
    assert (tmp_path / "lake" / "results" / "x" / "x.txt").read_text() == "x"
    assert not (tmp_path / "lake" / "runs" / run.id / step.id).exists()  # only what the user asked for


def test_an_output_whose_store_cannot_be_reached_fails_its_step_saying_so(workspace, write_script):
    import socket

    from cairn import Datastore, OutputFileDatasetConfig

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = Datastore.register_s3_bucket(workspace, "down", bucket_name="nowhere", endpoint_url=f"http://127.0.0.1:{port}",
                                        access_key_id="k", secret_access_key="s", skip_validation=True)
    src = write_script("write.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                   "open(os.path.join(sys.argv[1], 'x.txt'), 'w').write('x')\n")
    out = OutputFileDatasetConfig("x", destination=(down, "x/{run-id}")).as_upload()
    run = Experiment(workspace, "unreachable").submit(Pipeline(workspace, [
        PythonScriptStep("write.py", name="write", source_directory=src, arguments=[out])]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=120) == "Failed"
    reason = run.find_step_run("write")[0]._row()["status_reason"]
    assert reason.startswith("output 'x' could not be committed") and "cannot reach datastore 'down'" in reason, reason
