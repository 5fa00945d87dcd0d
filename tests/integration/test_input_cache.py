"""A machine fetches a remote input once: steps that consume the same blob dataset (by content
digest) share one read-only copy in the input cache; download mode still gets a private copy."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cairn import Dataset, Datastore, Experiment, Pipeline, PythonScriptStep

SHOW = """
import os, sys
folder = sys.argv[1]
writable = bool(os.stat(os.path.join(folder, "a.csv")).st_mode & 0o222)  # mode bits: root may write anyway
print(os.path.realpath(folder), sorted(os.listdir(folder)), writable)
"""


def test_steps_share_one_fetched_copy_per_machine(workspace, azurite, write_script, tmp_path, monkeypatch):
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
    cache_root = Path(os.environ.get("CAIRN_INPUT_CACHE") or Path.home() / ".cache" / "cairn" / "inputs")
    assert out["mount0"][0] == out["mount1"][0] and out["mount0"][0].startswith(str(cache_root.resolve()))
    assert out["mount0"][1:] == ["['a.csv']", "False"]  # the shared copy is read-only
    assert not out["download"][0].startswith(str(cache_root.resolve())) and out["download"][2] == "True"
    assert "input cache" in run.find_step_run("mount1")[0].get_system_log()
