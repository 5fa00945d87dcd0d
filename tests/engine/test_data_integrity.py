"""Committed outputs stay what they were: downloads are private copies, changed outputs are not reused."""

from __future__ import annotations

import os

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
