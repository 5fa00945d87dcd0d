"""A pipeline reading a blob dataset (Azurite): downloaded for the step, re-run when the blob changes."""

from __future__ import annotations

import uuid

from cairn import Dataset, Datastore, Experiment, Pipeline, PythonScriptStep

COUNT = """
import os, sys
folder = sys.argv[1]
files = sorted(os.listdir(folder))
print("files", files, "bytes", sum(os.path.getsize(os.path.join(folder, f)) for f in files))
"""


def test_blob_dataset_download_and_reuse(workspace, azurite, write_script, tmp_path):
    blobs = Datastore.register_azure_blob_container(
        workspace, "blobs", container_name=f"c{uuid.uuid4().hex[:10]}", account_name=azurite["account_name"],
        account_key=azurite["account_key"], endpoint=azurite["endpoint"], protocol="http", create_if_not_exists=True)
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "a.csv").write_text("x\n1\n")
    blobs.upload(tmp_path / "up", target_path="raw", show_progress=False)
    raw = Dataset.File.from_files((blobs, "raw"))
    src = write_script("count.py", COUNT)

    def submit():
        step = PythonScriptStep("count.py", name="count", source_directory=src,
                                arguments=[raw.as_named_input("raw").as_download()])
        run = Experiment(workspace, "blob").submit(Pipeline(workspace, [step]))
        run.wait_for_completion(show_output=False)
        return run.find_step_run("count")[0]

    first = submit()
    assert "files ['a.csv'] bytes 4" in first.get_stdout_log()
    assert submit().get_status() == "Reused"
    (tmp_path / "up" / "a.csv").write_text("x\n1\n2\n")  # same blob path, new bytes
    blobs.upload(tmp_path / "up", target_path="raw", overwrite=True, show_progress=False)
    third = submit()
    assert third.get_status() == "Completed" and "bytes 6" in third.get_stdout_log()
    assert third.explain()["changes"] == ["input raw changed"]
