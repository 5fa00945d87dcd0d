"""The issue's pipeline: read a blob dataset (Azurite), write an OutputFileDatasetConfig to S3
(moto), register it on completion, and read it downstream as a tabular dataset."""

from __future__ import annotations

import uuid

from cairn import Dataset, Datastore, Experiment, OutputFileDatasetConfig, Pipeline, PythonScriptStep

PREPARE = """
import os, sys
src, out = sys.argv[1], sys.argv[2]
rows = []
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name)) as f:
        rows += f.read().splitlines()[1:]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "clean.csv"), "w") as f:
    f.write("value\\n" + "\\n".join(str(int(r) * 10) for r in rows) + "\\n")
"""

SUMMARISE = """
from cairn import Run
run = Run.get_context()
df = run.input_datasets["clean"].to_pandas_dataframe()
run.log("total", int(df["value"].sum()))
print("total", int(df["value"].sum()))
"""


def test_blob_dataset_to_registered_s3_output(workspace, azurite, moto_s3, write_script, tmp_path):
    blobs = Datastore.register_azure_blob_container(
        workspace, "blobs", container_name=f"c{uuid.uuid4().hex[:10]}", account_name=azurite["account_name"],
        account_key=azurite["account_key"], endpoint=azurite["endpoint"], protocol="http", create_if_not_exists=True)
    s3 = Datastore.register_s3_bucket(
        workspace, "lake", bucket_name=f"b{uuid.uuid4().hex[:10]}", endpoint_url=moto_s3["endpoint_url"],
        access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
        create_if_not_exists=True)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.csv").write_text("v\n1\n2\n")
    (tmp_path / "raw" / "b.csv").write_text("v\n3\n")
    blobs.upload(tmp_path / "raw", target_path="raw", show_progress=False)

    src = write_script("prepare.py", PREPARE)
    write_script("summarise.py", SUMMARISE)
    raw = Dataset.File.from_files((blobs, "raw"))
    clean = OutputFileDatasetConfig("clean", destination=(s3, "clean/{run-id}")).as_upload() \
        .register_on_complete("clean_values", description="cleaned", tags={"stage": "prep"})
    prepare = PythonScriptStep("prepare.py", name="prepare", source_directory=src,
                               arguments=[raw.as_named_input("raw").as_download(), clean])
    summarise = PythonScriptStep("summarise.py", name="summarise", source_directory=src,
                                 inputs=[clean.read_delimited_files().as_input("clean")])
    run = Experiment(workspace, "lake").submit(Pipeline(workspace, [prepare, summarise]))
    assert run.wait_for_completion(show_output=False) == "Completed"

    step = run.find_step_run("prepare")[0]
    output = step.get_output_data("clean")
    assert output.datastore_name == "lake" and output.path_on_datastore == f"clean/{step.id}"
    assert output.local_path is None  # it lives in S3
    fetched = output.download(tmp_path / "out")
    assert open(f"{fetched}/clean.csv").read() == "value\n10\n20\n30\n"
    assert step.get_properties()["cairn.output.clean.dataset"] == "clean_values:1"
    registered = Dataset.get_by_name(workspace, "clean_values")
    assert registered.description == "cleaned" and registered.tags == {"stage": "prep"}
    assert registered.to_path() == ["clean.csv"]
    downloaded = registered.download(tmp_path / "check")
    assert open(downloaded[0]).read() == "value\n10\n20\n30\n"
    assert run.find_step_run("summarise")[0].get_metrics()["total"] == 60

    again = Experiment(workspace, "lake").submit(Pipeline(workspace, [prepare, summarise]))
    assert again.wait_for_completion(show_output=False) == "Completed"
    assert [s.get_status() for s in again.get_steps()] == ["Reused", "Reused"]


def test_lineage_names_producers_and_consumers(workspace, write_script):
    import json
    import subprocess
    import sys

    src = write_script("make.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                  "open(os.path.join(sys.argv[1], 'v.csv'), 'w').write('v\\n1\\n')\n")
    write_script("use.py", "from cairn import Run\nprint(Run.get_context().input_datasets['t'].to_path())\n")
    out = OutputFileDatasetConfig("made").register_on_complete("made_values")
    make = PythonScriptStep("make.py", name="make", source_directory=src, arguments=[out])
    Experiment(workspace, "lineage").submit(Pipeline(workspace, [make])).wait_for_completion(show_output=False)
    registered = Dataset.get_by_name(workspace, "made_values")
    use = PythonScriptStep("use.py", name="use", source_directory=src, inputs=[registered.as_named_input("t")])
    run = Experiment(workspace, "lineage").submit(Pipeline(workspace, [use]))
    run.wait_for_completion(show_output=False)
    assert "['v.csv']" in run.find_step_run("use")[0].get_stdout_log()
    (version,) = Dataset.get_lineage(workspace, "made_values")
    assert [r["step"] for r in version["produced_by"]] == ["make"]
    assert [(r["step"], r["as"]) for r in version["consumed_by"]] == [("use", "t")]
    shown = subprocess.run([sys.executable, "-m", "cairn", "datasets", "show", "made_values", "--json",
                            "-w", workspace.location], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)[0]["consumed_by"][0]["step"] == "use"
    listed = subprocess.run([sys.executable, "-m", "cairn", "datasets", "list", "-w", workspace.location],
                            capture_output=True, text=True)
    assert "made_values" in listed.stdout
    missing = subprocess.run([sys.executable, "-m", "cairn", "datasets", "show", "nope", "-w", workspace.location],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no dataset 'nope'" in missing.stderr


def test_an_object_store_output_changed_since_its_commit_is_not_reused(workspace, moto_s3, write_script):
    """Overwritten by another run's step with other bytes: the producer runs again, and its consumer
    reads what the producer makes now (a local datastore's outputs are checked the same way, by
    their stat signature)."""
    s3 = Datastore.register_s3_bucket(
        workspace, "lake", bucket_name=f"b{uuid.uuid4().hex[:10]}", endpoint_url=moto_s3["endpoint_url"],
        access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
        create_if_not_exists=True)
    src = write_script("make.py", "import os, sys\nos.makedirs(sys.argv[1], exist_ok=True)\n"
                                  "open(os.path.join(sys.argv[1], 'v.txt'), 'w').write(sys.argv[2])\n")
    write_script("read.py", "import os, sys\nprint(open(os.path.join(sys.argv[1], 'v.txt')).read())\n")

    def submit(value: str) -> dict[str, tuple[str, str]]:
        out = OutputFileDatasetConfig("out", destination=(s3, "fixed/place")).as_upload(overwrite=True)
        run = Experiment(workspace, "overwritten").submit(Pipeline(workspace, [
            PythonScriptStep("make.py", name="make", source_directory=src, arguments=[out, value]),
            PythonScriptStep("read.py", name="read", source_directory=src, arguments=[out.as_input("out")])]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        return {s.name: (s.get_status(), s.get_stdout_log().strip()) for s in run.get_steps()}

    assert submit("2") == {"make": ("Completed", ""), "read": ("Completed", "2")}
    assert submit("2")["read"] == ("Reused", "2")
    assert submit("3")["read"] == ("Completed", "3")  # the same place, other bytes
    again = submit("2")  # the first run's output is recorded for this fingerprint: it was overwritten
    assert again["make"][0] == "Completed" and again["read"][1] == "2"
