"""Steps on a Ray node of "another machine": a node started by the tests in its own mount
namespace, where the tests' whole temporary folder — the workspace, its datastores, the source
folders — is an empty tmpfs. The head (where the agent's driver and the workspace's relay run)
has no CPU for steps, so every step lands on that node and reaches the workspace only through the
relay: snapshot, inputs, logs, outputs, status and the script's ``Run.get_context()``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cairn import (
    ComputeTarget,
    Dataset,
    Experiment,
    OutputFileDatasetConfig,
    Pipeline,
    PipelineData,
    PythonScriptStep,
    RayCompute,
    Workspace,
)
from cairn.compute.ray_cluster import cluster_nodes
from cairn.demo.pipeline import SOURCES, build_pipeline
from tests.compute.ray_nodes import gone, head_and_node

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    hidden = tmp_path_factory.getbasetemp()
    logs = Path(tempfile.mkdtemp(prefix="cairn-ray-elsewhere-logs-"))
    node_cache = Path(tempfile.mkdtemp(prefix="cairn-node-cache-"))  # outside the hidden folder
    launcher = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hidden))
    try:
        with head_and_node(logs, 0, cpus=2, launcher=launcher,
                           env={"CAIRN_NODE_CACHE": str(node_cache / "node"),
                                "CAIRN_INPUT_CACHE": str(node_cache / "inputs")}) as (head, other):
            other_id = next(n["NodeID"] for n in cluster_nodes(head["address"])
                            if n.get("NodeManagerPort") == other["node_manager_port"])
            yield {"address": head["address"], "node": other_id, "cache": node_cache}
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        shutil.rmtree(node_cache, ignore_errors=True)


@pytest.fixture
def target(workspace: Workspace, elsewhere: dict[str, Any]) -> ComputeTarget:
    return ComputeTarget.attach(workspace, "far", RayCompute.attach_configuration(address=elsewhere["address"]))


def relayed_on(step: Any, node: str) -> bool:
    props = step.get_properties()
    return props.get("cairn.ray.relayed") == "true" and props.get("cairn.ray.node") == node


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Logs arrive in batches (no event to wait on): look again until ``condition`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_demo_pipeline_runs_on_a_node_that_cannot_see_the_workspace(
        workspace: Workspace, target: ComputeTarget, elsewhere: dict[str, Any], tmp_path: Path) -> None:
    src = tmp_path / "demo-src"
    shutil.copytree(SOURCES, src)
    run = Experiment(workspace, "far").submit(build_pipeline(workspace, src, compute_target=target))
    assert run.wait_for_completion(show_output=False) == "Completed"
    report = run.find_step_run("compare")[0].get_output_data("report").local_path / "report.md"
    assert "Best model" in report.read_text()  # outputs committed on the workspace's machine
    assert all(relayed_on(s, elsewhere["node"]) for s in run.get_steps())
    again = Experiment(workspace, "far").submit(build_pipeline(workspace, src, compute_target=target))
    assert again.wait_for_completion(show_output=False) == "Completed"
    assert all(s.is_reused for s in again.get_steps())  # the relayed outputs are reusable like any


def test_inputs_logs_metrics_artifacts_and_registered_outputs_go_through_the_relay(
        workspace: Workspace, target: ComputeTarget, elsewhere: dict[str, Any],
        write_script: Callable[..., Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("alpha\n")
    (data / "sub" / "b.txt").write_text("beta\n")
    (data / "empty.txt").write_text("")
    store = workspace.get_default_datastore()
    store.upload(str(data), target_path="raw", show_progress=False)
    raw = Dataset.File.from_files((store, "raw/**"))
    (Path(store.root) / "t.csv").write_text("a,b\n1,x\n2,y\n")
    table = Dataset.Tabular.from_delimited_files((store, "t.csv")).register(workspace, "numbers")
    src = write_script("make.py", """
        import os, sys
        from pathlib import Path
        from cairn import Run
        run = Run.get_context()
        print("workspace visible:", os.path.exists(os.environ["CAIRN_WORKSPACE"]), flush=True)
        files = sorted(str(p.relative_to(sys.argv[1])) for p in Path(sys.argv[1]).rglob("*") if p.is_file())
        print("input files:", files)
        out = Path(sys.argv[2])
        (out / "nested").mkdir(parents=True)
        (out / "nested" / "joined.txt").write_text("".join(Path(sys.argv[1], f).read_text() for f in files))
        (out / "blank").mkdir()
        (out / "big.bin").write_bytes(bytes(range(256)) * (12 << 10))  # 3 MiB: sent by parts, not inline
        (out / "run.sh").write_text("echo hi")
        os.chmod(out / "run.sh", 0o755)
        os.symlink("nested/joined.txt", out / "link")
        run.log("rows", len(files))
        run.log("rows", len(files) + 1)
        run.tag("where", "elsewhere")
        Path("note.txt").write_text("an artifact")
        run.upload_file("notes/note.txt", "note.txt")
        print("artifact back:", open(run.download_file("notes/note.txt", "copy.txt")).read())
        try:
            run.experiment.workspace._backend.register_datastore("root", "local", {"path": "/"}, False)
        except PermissionError as exc:
            print("refused:", exc)
        df = run.input_datasets["tbl"].to_pandas_dataframe()
        print("table rows", len(df), "sum", int(df["a"].sum()))
        from cairn import Dataset
        try:
            Dataset.get_by_name(run.experiment.workspace, "numbers").to_pandas_dataframe()
        except PermissionError as exc:
            print("by name:", exc)
        import multiprocessing
        def child(i):
            run.log("child", i)
            run.flush()
        with multiprocessing.get_context("fork").Pool(2) as pool:  # children share nothing of the parent's link
            pool.map(child, range(4))
        copy = Path(run.input_datasets["rawdl"])
        (copy / "a.txt").write_text("changed in my copy")  # download mode: a writable copy of its own
        print("download copy written:", (copy / "a.txt").read_text())
        print("to stderr", file=sys.stderr)
        """)
    write_script("use.py", """
        import sys
        from pathlib import Path
        import os
        made = Path(sys.argv[1])
        text = (made / "nested" / "joined.txt").read_text()
        assert (made / "big.bin").read_bytes() == bytes(range(256)) * (12 << 10)
        print("shape:", os.access(made / "run.sh", os.X_OK), os.readlink(made / "link"), (made / "blank").is_dir())
        Path(sys.argv[2], "upper.txt").write_text(text.upper())
        print("read", len(text), "characters")
        """)
    made = PipelineData("made")
    upper = OutputFileDatasetConfig("upper").register_on_complete("uppercased")
    make = PythonScriptStep("make.py", name="make", source_directory=str(src), compute_target=target,
                            arguments=[raw.as_named_input("raw").as_mount(), made], outputs=[made],
                            inputs=[table.as_named_input("tbl"), raw.as_named_input("rawdl").as_download()])
    use = PythonScriptStep("use.py", name="use", source_directory=str(src), compute_target=target,
                           arguments=[made.as_mount(), upper], inputs=[made.as_mount()], outputs=[upper])
    run = Experiment(workspace, "far").submit(Pipeline(workspace, [make, use]))
    assert run.wait_for_completion(show_output=False) == "Completed", [s.get_system_log() for s in run.get_steps()]
    first, second = run.find_step_run("make")[0], run.find_step_run("use")[0]
    assert relayed_on(first, elsewhere["node"]) and relayed_on(second, elsewhere["node"])
    out = first.get_stdout_log()
    assert "workspace visible: False" in out  # it really ran where the workspace is not
    assert "input files: ['a.txt', 'empty.txt', 'sub/b.txt']" in out
    assert "artifact back: an artifact" in out
    assert "table rows 2 sum 3" in out  # a tabular dataset read by the script itself (direct mode)
    assert "refused: register_datastore is not available to a step on a Ray node of another machine" in out
    assert first.get_stderr_log() == "to stderr\n"
    assert first.get_metrics()["rows"] == [3, 4]
    assert first.get_tags()["where"] == "elsewhere"
    assert "notes/note.txt" in first.get_file_names()
    committed = first.get_output_data("made").local_path
    assert (committed / "nested" / "joined.txt").read_text() == "alpha\nbeta\n"
    assert (committed / "blank").is_dir()
    assert (committed / "big.bin").stat().st_size == 3 << 20 and os.access(committed / "run.sh", os.X_OK)
    assert os.readlink(committed / "link") == "nested/joined.txt"  # a link stays a link, as on local compute
    from cairn.storage.tree import digest_tree

    assert first.get_output_data("made")._record["digest"] == digest_tree(committed).digest
    assert not os.access(committed / "nested" / "joined.txt", os.W_OK) or os.geteuid() == 0
    assert "by name: datastore 'workspaceblobstore' is a folder on the workspace's machine" in out
    assert sorted(first.get_metrics()["child"]) == [0, 1, 2, 3]  # logged by forked children
    assert "download copy written: changed in my copy" in out
    assert (Path(store.root) / "raw" / "a.txt").read_text() == "alpha\n"  # the data itself is untouched
    assert second.get_stdout_log() == "shape: True nested/joined.txt True\nread 11 characters\n"
    assert "completed" in second.get_system_log()
    registered = Dataset.get_by_name(workspace, "uppercased")
    assert registered.version == 1
    assert (second.get_output_data("upper").local_path / "upper.txt").read_text() == "ALPHA\nBETA\n"
    assert list((elsewhere["cache"] / "node" / "steps").iterdir()) == []  # the node keeps no step folder
    assert not list(Path(workspace.location, ".cairn", "datastores").rglob(".a[0-9]*"))


def test_a_failing_step_on_another_machine_fails_with_its_reason_and_logs(
        workspace: Workspace, target: ComputeTarget, write_script: Callable[..., Path]) -> None:
    src = write_script("boom.py", "import sys\nprint('before')\nsys.exit('the data was bad')\n")
    run = Experiment(workspace, "far").submit(Pipeline(workspace, [
        PythonScriptStep("boom.py", name="boom", source_directory=str(src), compute_target=target)]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    step = run.get_steps()[0]
    assert step.get_stdout_log() == "before\n" and step.get_stderr_log() == "the data was bad\n"
    reasons = [e["reason"] or "" for e in workspace._backend.get_events(step.id)]
    assert any("the script exited with code 1: the data was bad" in r for r in reasons), reasons


def test_logs_stream_while_the_step_runs_and_cancel_kills_its_process_there(
        workspace: Workspace, target: ComputeTarget, write_script: Callable[..., Path]) -> None:
    src = write_script("hang.py", "import os, subprocess, sys, time\n"
                                  "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                                  "print('pid', os.getpid(), child.pid, flush=True)\ntime.sleep(300)\n")
    run = Experiment(workspace, "far").submit(Pipeline(workspace, [
        PythonScriptStep("hang.py", name="hang", source_directory=str(src), compute_target=target)]))
    step = run.get_steps()[0]
    wait_for(lambda: step.get_stdout_log().startswith("pid "), "the step's first line in the workspace")
    assert step.get_status() == "Running"
    pid, child = map(int, step.get_stdout_log().split()[1:3])
    assert Path(f"/proc/{pid}").exists() and Path(f"/proc/{child}").exists()
    run.cancel()
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Canceled"
    assert step.get_status() == "Canceled"
    wait_for(lambda: gone(pid), "the step's process on the other node to be killed", timeout=30)
    wait_for(lambda: gone(child), "the process the step started to be killed too", timeout=30)



def test_with_an_object_store_default_the_node_uploads_outputs_and_the_workspace_keeps_the_logs(
        workspace: Workspace, target: ComputeTarget, elsewhere: dict[str, Any], moto_s3: dict[str, Any],
        write_script: Callable[..., Path]) -> None:
    import uuid

    from cairn import Datastore

    s3 = Datastore.register_s3_bucket(
        workspace, "lake", bucket_name=f"b{uuid.uuid4().hex[:10]}", endpoint_url=moto_s3["endpoint_url"],
        access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
        create_if_not_exists=True)
    s3.set_as_default()
    src = write_script("produce.py", "import sys, os\nopen(os.path.join(sys.argv[1], 'n.txt'), 'w').write('41')\n")
    write_script("consume.py", "import sys\nfrom cairn import Run\nn = int(open(sys.argv[1] + '/n.txt').read()) + 1\n"
                               "Run.get_context().log('answer', n)\nprint('answer', n)\n")
    data = PipelineData("n")
    produce = PythonScriptStep("produce.py", name="produce", source_directory=str(src), arguments=[data],
                               outputs=[data], compute_target=target)
    consume = PythonScriptStep("consume.py", name="consume", source_directory=str(src),
                               arguments=[data.as_input()], compute_target=target)
    run = Experiment(workspace, "far").submit(Pipeline(workspace, [produce, consume]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    first, second = run.find_step_run("produce")[0], run.find_step_run("consume")[0]
    assert relayed_on(first, elsewhere["node"]) and relayed_on(second, elsewhere["node"])
    output = first.get_output_data("n")
    assert output.datastore_name == "lake" and output.local_path is None
    assert second.get_metrics()["answer"] == 42 and second.get_stdout_log() == "answer 42\n"
    fs, root = s3._location().filesystem()
    fs.invalidate_cache()
    assert fs.exists(f"{root}/{output.path_on_datastore}/n.txt")
    assert fs.cat(f"{root}/runs/{run.id}/{second.id}/logs/stdout.txt") == b"answer 42\n"
