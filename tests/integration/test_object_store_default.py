"""An object store (moto S3) as the workspace's default datastore: outputs and logs live there,
and the foundation's flow still works: data passed between steps, logs, metrics, reuse."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from cairn import Datastore, Experiment, Pipeline, PipelineData, PythonScriptStep

PRODUCE = """
import os, sys
os.makedirs(sys.argv[1], exist_ok=True)
open(os.path.join(sys.argv[1], "n.txt"), "w").write("41")
print("produced")
"""

CONSUME = """
import sys
from cairn import Run
n = int(open(sys.argv[1] + "/n.txt").read()) + 1
Run.get_context().log("answer", n)
print("answer", n)
"""


def test_s3_default_datastore_runs_the_foundation_flow(workspace, moto_s3, write_script):
    s3 = Datastore.register_s3_bucket(
        workspace, "lake", bucket_name=f"b{uuid.uuid4().hex[:10]}", endpoint_url=moto_s3["endpoint_url"],
        access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
        create_if_not_exists=True)
    s3.set_as_default()
    assert workspace.get_default_datastore().name == "lake"
    src = write_script("produce.py", PRODUCE)
    write_script("consume.py", CONSUME)

    def submit():
        data = PipelineData("n")
        produce = PythonScriptStep("produce.py", name="produce", source_directory=src, arguments=[data], outputs=[data])
        consume = PythonScriptStep("consume.py", name="consume", source_directory=src, arguments=[data.as_input()])
        run = Experiment(workspace, "s3-default").submit(Pipeline(workspace, [produce, consume]))
        assert run.wait_for_completion(show_output=False) == "Completed"
        return run

    run = submit()
    # an uploaded output leaves no staged copy here (os.walk: the agent may still be removing the steps'
    # working folders, which rglob would fail on)
    staged = [os.path.join(top, d) for top, dirs, _ in os.walk(workspace.location) for d in dirs
              if re.fullmatch(r"\.a[0-9]+", d)]
    assert not staged
    produce, consume = run.find_step_run("produce")[0], run.find_step_run("consume")[0]
    output = produce.get_output_data("n")
    assert output.datastore_name == "lake" and output.local_path is None
    assert consume.get_metrics()["answer"] == 42 and "answer 42" in consume.get_stdout_log()

    fs, root = s3._location().filesystem()
    fs.invalidate_cache()
    assert fs.exists(f"{root}/{output.path_on_datastore}/n.txt")
    assert fs.exists(f"{root}/runs/{run.id}/{consume.id}/logs/stdout.txt")  # logs live in S3 too
    from cairn.core.digests import digest_file

    script = digest_file(src / "consume.py").split(":", 1)[1]
    assert fs.exists(f"{root}/snapshots/objects/{script}")  # and the source snapshot
    cache = Path(workspace.location, ".cairn", "cache")
    shutil.rmtree(cache)  # another machine: no local cache; logs come from S3
    assert "answer 42" in consume.get_stdout_log()

    again = submit()
    assert [s.get_status() for s in again.get_steps()] == ["Reused", "Reused"]
    assert again.find_step_run("consume")[0].get_metrics()["answer"] == 42


def test_a_snapshot_whose_upload_failed_is_uploaded_by_the_next_submit(workspace, moto_s3, write_script,
                                                                      monkeypatch):
    import pytest

    import cairn.storage.datastores as datastores
    from cairn.core.digests import digest_file

    s3 = Datastore.register_s3_bucket(
        workspace, "lake", bucket_name=f"b{uuid.uuid4().hex[:10]}", endpoint_url=moto_s3["endpoint_url"],
        access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
        create_if_not_exists=True)
    s3.set_as_default()
    src = write_script("produce.py", PRODUCE)
    real_upload = datastores.upload

    def broken(*args, **kwargs):
        raise OSError("the network went away")

    monkeypatch.setattr(datastores, "upload", broken)
    step = PythonScriptStep("produce.py", name="produce", source_directory=src, arguments=["out"])
    with pytest.raises(OSError, match="the network went away"):
        Experiment(workspace, "retry").submit(Pipeline(workspace, [step]))
    monkeypatch.setattr(datastores, "upload", real_upload)
    run = Experiment(workspace, "retry").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    fs, root = s3._location().filesystem()
    fs.invalidate_cache()
    assert fs.exists(f"{root}/snapshots/objects/{digest_file(src / 'produce.py').split(':', 1)[1]}")


def _large_output_with_s3_default(workspace, moto_s3, tmp_path, monkeypatch):
    """(the S3 datastore, a run queued for an agent in this process: one step writing a large
    output to the local datastore, digested after its commit)"""
    from tests.engine import test_early_handoff as early

    early._no_agent_but_this_process(monkeypatch)
    s3 = Datastore.register_s3_bucket(
        workspace, "lake", bucket_name=f"b{uuid.uuid4().hex[:10]}", endpoint_url=moto_s3["endpoint_url"],
        access_key_id=moto_s3["access_key_id"], secret_access_key=moto_s3["secret_access_key"],
        create_if_not_exists=True)
    local = Datastore.get(workspace, "workspaceblobstore")
    s3.set_as_default()
    src = tmp_path / "writer"
    src.mkdir()
    (src / "writer.py").write_text(early.WRITER)
    big = PipelineData("big", datastore=local)
    writer = PythonScriptStep("writer.py", name="writer", source_directory=str(src), arguments=[big], outputs=[big])
    return s3, early._submit_for_this_process(workspace, Pipeline(workspace, [writer]), monkeypatch)


def test_a_late_digests_line_reaches_the_uploaded_system_log(workspace, moto_s3, tmp_path, monkeypatch):
    """A step whose large output (on a local datastore) is digested after its commit: the line the
    digest adds to its system log reaches the copy uploaded to the object-store default datastore,
    though that upload came first (runner/execute.py, _LateLogLines)."""
    from tests.engine import test_early_handoff as early
    from tests.engine.test_late_digests import _held_digest

    s3, run = _large_output_with_s3_default(workspace, moto_s3, tmp_path, monkeypatch)
    release = _held_digest(monkeypatch)
    with early._AgentHere(workspace, late=True) as here:
        assert here.run_ended(), "the run waited for the digest"
        step = run.find_step_run("writer")[0]
        assert step.get_output_data("big").digest_status == "pending"  # its logs were uploaded by now
        release.set()
        assert here.agent.late.join(timeout=60)
    assert step.get_output_data("big").digest_status == "made"
    fs, root = s3._location().filesystem()
    fs.invalidate_cache()
    uploaded = fs.cat_file(f"{root}/runs/{run.id}/{step.id}/logs/system.txt").decode()
    assert "digested after the step was committed" in uploaded


def test_a_late_digest_no_thread_could_make_leaves_no_log_lines_awaited(workspace, moto_s3, tmp_path, monkeypatch):
    import threading

    from cairn.runner import execute
    from tests.engine import test_early_handoff as early

    _, run = _large_output_with_s3_default(workspace, moto_s3, tmp_path, monkeypatch)
    start = threading.Thread.start

    def no_digest_thread(thread):
        if thread.name.startswith("digest-"):
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_digest_thread)
    with early._AgentHere(workspace, late=True) as here:
        assert here.run_ended()
    step = run.find_step_run("writer")[0]
    assert run.get_status() == "Completed" and step.get_output_data("big").digest_status == "pending"
    assert step.id not in execute._late_log_lines._state  # no lines to wait for: forgotten
