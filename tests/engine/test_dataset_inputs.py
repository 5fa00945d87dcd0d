"""Datasets as step inputs: modes, direct Dataset objects, and reuse that follows the data."""

from __future__ import annotations

from pathlib import Path

from cairn import Dataset, Experiment, Pipeline, PythonScriptStep

READ_FILES = """
import os, sys
from cairn import Run
folder = sys.argv[1]
print("folder", folder)
print("files", sorted(os.listdir(folder)))
print("same", Run.get_context().input_datasets["raw"] == folder)
open(os.environ["MARKER"], "a").write("ran\\n")
"""

READ_TABLE = """
from cairn import Run
table = Run.get_context().input_datasets["tbl"]
df = table.to_pandas_dataframe()
print("rows", len(df), "sum", int(df["a"].sum()))
"""


def test_local_file_dataset_is_used_in_place_and_reuse_follows_the_data(workspace, write_script, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    store = workspace.get_default_datastore()
    data = Path(store.root) / "raw"
    data.mkdir()
    (data / "one.txt").write_text("1")
    src = write_script("read.py", READ_FILES)
    raw = Dataset.File.from_files((store, "raw"))

    def submit():
        step = PythonScriptStep("read.py", name="read", source_directory=src,
                                arguments=[raw.as_named_input("raw").as_mount()])
        run = Experiment(workspace, "data").submit(Pipeline(workspace, [step]))
        run.wait_for_completion(show_output=False)
        return run.find_step_run("read")[0]

    first = submit()
    out = first.get_stdout_log()
    assert f"folder {data}" in out and "same True" in out  # no copy on a local datastore
    assert first.get_properties()["cairn.input.raw.digest"].startswith("blake2b:")
    assert submit().get_status() == "Reused"
    (data / "two.txt").write_text("2")  # new data in the same path
    third = submit()
    assert third.get_status() == "Completed" and "'two.txt'" in third.get_stdout_log()
    assert third.explain()["changes"] == ["input raw changed"]
    assert (tmp_path / "marker").read_text().split() == ["ran", "ran"]


def test_tabular_dataset_direct_is_a_dataset_in_the_step(workspace, write_script):
    store = workspace.get_default_datastore()
    (Path(store.root) / "t.csv").write_text("a,b\n1,x\n2,y\n")
    table = Dataset.Tabular.from_delimited_files((store, "t.csv")).register(workspace, "numbers")
    src = write_script("table.py", READ_TABLE)
    step = PythonScriptStep("table.py", name="table", source_directory=src, inputs=[table.as_named_input("tbl")])
    run = Experiment(workspace, "tables").submit(Pipeline(workspace, [step]))
    run.wait_for_completion(show_output=False)
    done = run.find_step_run("table")[0]
    assert "rows 2 sum 3" in done.get_stdout_log()
    assert done.get_properties()["cairn.input.tbl.dataset"] == "numbers:1"


LINKED = """
import os, sys
print("real", os.path.realpath(sys.argv[1]))
print("listing", sorted(os.listdir(sys.argv[1])))
"""


def test_local_download_with_path_on_compute_is_a_link_not_a_copy(workspace, write_script):
    store = workspace.get_default_datastore()
    data = Path(store.root) / "pics"
    data.mkdir()
    (data / "p.txt").write_text("x")
    src = write_script("linked.py", LINKED)
    raw = Dataset.File.from_files((store, "pics"))
    step = PythonScriptStep("linked.py", name="linked", source_directory=src,
                            arguments=[raw.as_named_input("pics").as_download(path_on_compute="data/pics")])
    run = Experiment(workspace, "link").submit(Pipeline(workspace, [step]))
    run.wait_for_completion(show_output=False)
    out = run.find_step_run("linked")[0].get_stdout_log()
    assert f"real {data.resolve()}" in out and "listing ['p.txt']" in out


def test_lineage_does_not_claim_a_version_whose_files_changed(workspace, write_script, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    store = workspace.get_default_datastore()
    data = Path(store.root) / "raw"
    data.mkdir()
    (data / "one.txt").write_text("1")
    Dataset.File.from_files((store, "raw")).register(workspace, "raw")
    src = write_script("read.py", READ_FILES)

    def submit():
        version_1 = Dataset.get_by_name(workspace, "raw", version=1)
        step = PythonScriptStep("read.py", name="read", source_directory=src,
                                arguments=[version_1.as_named_input("raw").as_mount()])
        run = Experiment(workspace, "lineage").submit(Pipeline(workspace, [step]))
        run.wait_for_completion(show_output=False)
        return run.find_step_run("read")[0]

    assert submit().get_properties()["cairn.input.raw.dataset"] == "raw:1"
    capsys.readouterr()
    (data / "two.txt").write_text("2")  # changed in place, not registered again
    changed = submit()
    assert changed.get_properties()["cairn.input.raw.dataset"] == "raw:1 (its files changed since it was registered)"
    assert "dataset 'raw' version 1 changed since it was registered" in " ".join(capsys.readouterr().err.split())
    (version,) = Dataset.get_lineage(workspace, "raw")  # both runs are in its lineage, the second one marked
    assert [r["files_changed"] for r in version["consumed_by"]] == [False, True]


def test_where_and_how_an_input_is_given_is_part_of_reuse(workspace, write_script, tmp_path, monkeypatch):
    """The same data given at another path_on_compute, or in another mode, runs the step again (its
    arguments name another path; a download is a private copy); a path_on_compute that would leave
    the working folder is refused where it is written; one the snapshot already has fails the step,
    saying so."""
    import pytest

    from cairn import PipelineData, UserInputError

    monkeypatch.setenv("MARKER", str(tmp_path / "marker"))
    store = workspace.get_default_datastore()
    (Path(store.root) / "raw").mkdir()
    (Path(store.root) / "raw" / "one.txt").write_text("1")
    src = write_script("read.py", READ_FILES)
    (src / "taken").mkdir()
    raw = Dataset.File.from_files((store, "raw"))

    def submit(given):
        step = PythonScriptStep("read.py", name="read", source_directory=src, arguments=[given])
        run = Experiment(workspace, "data").submit(Pipeline(workspace, [step]))
        run.wait_for_completion(show_output=False, raise_on_error=False)
        return run.find_step_run("read")[0]

    assert submit(raw.as_named_input("raw").as_download(path_on_compute="here")).get_status() == "Completed"
    assert submit(raw.as_named_input("raw").as_download(path_on_compute="here")).get_status() == "Reused"
    elsewhere = submit(raw.as_named_input("raw").as_download(path_on_compute="there"))
    assert elsewhere.get_status() == "Completed" and "there" in elsewhere.get_stdout_log()
    assert submit(raw.as_named_input("raw").as_mount(path_on_compute="there")).get_status() == "Completed"
    taken = submit(raw.as_named_input("raw").as_download(path_on_compute="taken"))
    assert taken.get_status() == "Failed"
    assert "its snapshot already has that path" in taken._row()["status_reason"]
    assert (tmp_path / "marker").read_text().split() == ["ran"] * 3
    for bad in ("/abs/path", "../out", "", "."):
        with pytest.raises(UserInputError, match="path_on_compute of input 'raw'"):
            raw.as_named_input("raw").as_download(path_on_compute=bad)
        with pytest.raises(UserInputError, match="path_on_compute of input 'data'"):
            PipelineData("data").as_download(path_on_compute=bad)


def test_a_dataset_whose_files_are_gone_is_refused_at_submit(workspace, write_script):
    """Not an empty input and a Completed step: submit says which path is gone. A dataset over an
    empty folder that exists is still a dataset with no files."""
    import shutil

    import pytest

    from cairn import PathNotFoundError

    store = workspace.get_default_datastore()
    (Path(store.root) / "temp").mkdir()
    (Path(store.root) / "temp" / "a.txt").write_text("a")
    (Path(store.root) / "empty").mkdir()
    registered = Dataset.File.from_files((store, "temp/")).register(workspace, "tempds")
    src = write_script("read.py", "import sys, os\nprint(sorted(os.listdir(sys.argv[1])))\n")
    shutil.rmtree(Path(store.root) / "temp")

    def pipeline(dataset):
        return Pipeline(workspace, [PythonScriptStep("read.py", name="read", source_directory=src,
                                                     arguments=[dataset.as_named_input("t").as_mount()])])

    for dataset, named in ((registered, "dataset 'tempds:1' names workspaceblobstore:temp"),
                           (Dataset.File.from_files((store, "nowhere/*.csv"), validate=False),
                            "its dataset names workspaceblobstore:nowhere/*.csv")):
        with pytest.raises(PathNotFoundError, match="input 't'") as raised:
            Experiment(workspace, "gone").submit(pipeline(dataset))
        assert named in str(raised.value) and "does not exist now" in str(raised.value)
    run = Experiment(workspace, "gone").submit(pipeline(Dataset.File.from_files((store, "empty"), validate=False)))
    assert run.wait_for_completion(show_output=False) == "Completed"


def test_a_dataset_changed_between_submit_and_its_step_fails_the_step(workspace, write_script, tmp_path):
    """The step's fingerprint (and the input cache's key) name the files the submit saw: a step
    that would read others fails, saying to submit again, rather than being recorded over them."""
    import os

    store = workspace.get_default_datastore()
    (Path(store.root) / "raw").mkdir()
    (Path(store.root) / "raw" / "a.txt").write_text("a")
    gate = tmp_path / "gate.fifo"
    os.mkfifo(gate)
    src = write_script("wait.py", "import sys\nopen(sys.argv[1]).read()\n")
    write_script("read.py", "import os, sys\nprint(sorted(os.listdir(sys.argv[1])))\n")
    raw = Dataset.File.from_files((store, "raw/*.txt"))  # a glob: fetched (linked) for the step
    first = PythonScriptStep("wait.py", name="wait", source_directory=src, arguments=[str(gate)], allow_reuse=False)
    read = PythonScriptStep("read.py", name="read", source_directory=src,
                            arguments=[raw.as_named_input("raw").as_mount()], allow_reuse=False)
    read.run_after(first)
    run = Experiment(workspace, "changed").submit(Pipeline(workspace, [first, read]))
    (Path(store.root) / "raw" / "b.txt").write_text("b")  # after the submit, before the step
    with open(gate, "w") as opened:  # lets the first step end
        opened.write("go")
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Failed"
    reason = run.find_step_run("read")[0]._row()["status_reason"]
    assert "input 'raw': the dataset's files changed since the run was submitted" in reason
