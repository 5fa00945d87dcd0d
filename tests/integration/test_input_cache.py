"""A machine fetches a remote input once: steps that consume the same blob dataset (by content
digest) share one read-only copy in the input cache; download mode still gets a private copy."""

from __future__ import annotations

import uuid

from cairn import Dataset, Datastore, Experiment, Pipeline, PythonScriptStep

SHOW = """
import os, sys
folder = sys.argv[1]
writable = bool(os.stat(os.path.join(folder, "a.csv")).st_mode & 0o222)  # mode bits: root may write anyway
print(os.path.realpath(folder), sorted(os.listdir(folder)), writable)
"""


def test_steps_share_one_fetched_copy_per_machine(workspace, azurite, write_script, tmp_path, monkeypatch):
    monkeypatch.setenv("CAIRN_INPUT_CACHE", str(tmp_path / "input-cache"))  # the agent starts after this
    blobs = Datastore.register_azure_blob_container(
        workspace, "blobs", container_name=f"c{uuid.uuid4().hex[:10]}", account_name=azurite["account_name"],
        account_key=azurite["account_key"], endpoint=azurite["endpoint"], protocol="http", create_if_not_exists=True)
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "a.csv").write_text(f"x\n{uuid.uuid4().hex}\n")  # content no earlier test cached
    blobs.upload(tmp_path / "up", target_path="raw", show_progress=False)
    raw = Dataset.File.from_files((blobs, "raw"))
    src = write_script("show.py", SHOW)
    steps = [PythonScriptStep("show.py", name=f"mount{i}", source_directory=src,
                              arguments=[raw.as_named_input("raw").as_mount()], allow_reuse=False) for i in range(2)]
    steps.append(PythonScriptStep("show.py", name="download", source_directory=src,
                                  arguments=[raw.as_named_input("raw").as_download()], allow_reuse=False))
    run = Experiment(workspace, "cache").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"
    out = {s.name: s.get_stdout_log().split() for s in run.get_steps()}
    cache_root = tmp_path / "input-cache"
    assert out["mount0"][0] == out["mount1"][0] and out["mount0"][0].startswith(str(cache_root.resolve()))
    assert out["mount0"][1:] == ["['a.csv']", "False"]  # the shared copy is read-only
    assert not out["download"][0].startswith(str(cache_root.resolve())) and out["download"][2] == "True"
    assert "input cache" in run.find_step_run("mount1")[0].get_system_log()
    assert len([p for p in cache_root.iterdir() if not p.name.startswith(".")]) == 1  # fetched once


def test_the_same_files_under_another_folder_layout_are_cached_apart(workspace, azurite, write_script, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("CAIRN_INPUT_CACHE", str(tmp_path / "input-cache"))
    blobs = Datastore.register_azure_blob_container(
        workspace, "blobs", container_name=f"c{uuid.uuid4().hex[:10]}", account_name=azurite["account_name"],
        account_key=azurite["account_key"], endpoint=azurite["endpoint"], protocol="http", create_if_not_exists=True)
    (tmp_path / "up" / "sub").mkdir(parents=True)
    (tmp_path / "up" / "sub" / "a.csv").write_text("x\n1\n")
    blobs.upload(tmp_path / "up", target_path="raw", show_progress=False)
    src = write_script("walk.py", "import os, sys\nprint(sorted(os.path.relpath(os.path.join(d, f), sys.argv[1]) "
                                  "for d, _, fs in os.walk(sys.argv[1], followlinks=True) for f in fs))\n")
    outer = Dataset.File.from_files((blobs, "raw"))
    inner = Dataset.File.from_files((blobs, "raw/sub"))
    steps = [PythonScriptStep("walk.py", name=name, source_directory=src, allow_reuse=False,
                              arguments=[ds.as_named_input("data").as_mount()])
             for name, ds in (("outer", outer), ("inner", inner))]
    run = Experiment(workspace, "cache").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"
    out = {s.name: s.get_stdout_log().strip() for s in run.get_steps()}
    assert out == {"outer": "['sub/a.csv']", "inner": "['a.csv']"}
