"""End-to-end pipeline runs with real subprocesses: the seed flow, reuse, failures, limits."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from cairn import Experiment, Pipeline, PipelineData, PythonScriptStep, Run, RunConfiguration, RunFailedError, Status

PRODUCER = """
import argparse, os, sys
p = argparse.ArgumentParser(); p.add_argument("--out"); p.add_argument("--text", default="hello")
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
open(os.path.join(a.out, "data.txt"), "w").write(a.text)
with open(os.environ["MARKER"], "a") as m:
    m.write("producer\\n")
print("produced", a.text)
"""

CONSUMER = """
import argparse, os
from cairn import Run
p = argparse.ArgumentParser(); p.add_argument("--data"); p.add_argument("--out")
a = p.parse_args()
text = open(os.path.join(a.data, "data.txt")).read()
os.makedirs(a.out, exist_ok=True)
open(os.path.join(a.out, "result.txt"), "w").write(text.upper())
run = Run.get_context()
run.log("length", len(text))
run.log("loss", 0.5); run.log("loss", 0.25)
run.log_list("scores", [1, 2, 3])
run.log_row("table", epoch=1, acc=0.5); run.log_row("table", epoch=2, acc=0.7)
run.tag("kind", "consumer")
open("plot.png", "wb").write(b"PNG fake image bytes")
run.log_image("plot", path="plot.png")
run.add_properties({"owner": "tests"})
assert run.input_datasets["data"] == a.data, (run.input_datasets, a.data)
assert run.parent.id == os.environ["CAIRN_PIPELINE_RUN_ID"]
assert run.experiment.workspace is not None
with open(os.environ["MARKER"], "a") as m:
    m.write("consumer\\n")
print("alpha", os.environ["AML_PARAMETER_alpha"])
"""


def _two_steps(ws, src: Path, text: str = "hello", **consumer_kwargs):
    data = PipelineData("data")
    result = PipelineData("result")
    producer = PythonScriptStep("producer.py", name="producer", source_directory=src,
                                arguments=["--out", data, "--text", text], outputs=[data])
    consumer = PythonScriptStep("consumer.py", name="consumer", source_directory=src,
                                arguments=["--data", data.as_input(), "--out", result], outputs=[result],
                                params={"alpha": 0.1}, **consumer_kwargs)
    return producer, consumer


@pytest.fixture
def src(write_script, tmp_path, monkeypatch):
    monkeypatch.setenv("MARKER", str(tmp_path / "marker.txt"))
    write_script("producer.py", PRODUCER)
    return write_script("consumer.py", CONSUMER)


def _marker(tmp_path: Path) -> list[str]:
    path = tmp_path / "marker.txt"
    return path.read_text().split() if path.exists() else []


def test_seed_flow_runs_steps_passes_data_and_records_everything(workspace, src, tmp_path, capsys):
    _, consumer = _two_steps(workspace, src)
    pipeline = Pipeline(workspace, [consumer])  # the producer is pulled in
    run = Experiment(workspace, "seed").submit(pipeline, tags={"team": "a"})
    assert run.get_status() in ("Queued", "Running", "Completed")
    run.wait_for_completion(show_output=True)
    shown = capsys.readouterr().out
    assert "producer | produced hello" in shown and "[consumer] Completed" in shown
    assert run.get_status() == "Completed"
    assert [s.name for s in run.get_steps()] == ["producer", "consumer"]  # upstream first
    step = run.find_step_run("consumer")[0]
    assert step.get_status() == "Completed"
    assert "alpha 0.1" in step.get_stdout_log()
    assert step.get_stderr_log() == ""
    system = step.get_system_log()
    assert "command:" in system and "exit code 0" in system
    out = step.get_output_data("result")
    assert (out.local_path / "result.txt").read_text() == "HELLO"
    target = out.download(tmp_path / "dl")
    assert Path(target, "result.txt").read_text() == "HELLO"
    metrics = step.get_metrics()
    assert metrics["length"] == 5 and metrics["loss"] == [0.5, 0.25] and metrics["scores"] == [1, 2, 3]
    assert metrics["table"] == {"epoch": [1, 2], "acc": [0.5, 0.7]}
    assert Path(metrics["plot"]).read_bytes() == b"PNG fake image bytes"  # kept with the run
    assert Path(metrics["plot"]).is_relative_to(workspace.get_default_datastore().root)
    assert run.get_metrics(recursive=True)[step.id]["length"] == 5
    assert step.get_tags()["kind"] == "consumer" and step.get_properties()["owner"] == "tests"
    assert run.get_tags() == {"team": "a"}
    details = run.get_details()
    assert details["status"] == "Completed" and details["startTimeUtc"] and details["endTimeUtc"]
    assert [e["status"] for e in step.get_details()["events"]][:1] == ["NotStarted"]
    assert workspace.get_run(step.id) == step


def test_second_run_reuses_every_step_without_copying(workspace, src, tmp_path):
    exp = Experiment(workspace, "reuse")
    first = exp.submit(Pipeline(workspace, list(_two_steps(workspace, src))))
    first.wait_for_completion(show_output=False)
    second = exp.submit(Pipeline(workspace, list(_two_steps(workspace, src))))
    second.wait_for_completion(show_output=False)
    assert _marker(tmp_path) == ["producer", "consumer"]  # nothing ran the second time
    for name in ("producer", "consumer"):
        old, new = first.find_step_run(name)[0], second.find_step_run(name)[0]
        assert new.get_status() == "Reused" and new.reused_from == old.id
        assert new.get_output_data(new.get_outputs() and next(iter(new.get_outputs()))).local_path == \
            old.get_output_data(next(iter(old.get_outputs()))).local_path
        explained = new.explain()
        assert explained["reused_from"] == old.id and "reused" in explained["summary"]
        # its system log is its record: no folder is made for a step that never ran
        assert new.get_system_log() == (f"reused the outputs of step run {old.id} "
                                        f"(fingerprint {explained['fingerprint']})\n")
        assert not (workspace._backend.run_folder(new.id) / "logs").exists()
        assert workspace._backend.read_log(new.id, "system", 10)[0] == new.get_system_log()[10:]


def test_changed_argument_reruns_only_affected_steps_and_explains_why(workspace, src, tmp_path):
    exp = Experiment(workspace, "change")
    exp.submit(Pipeline(workspace, list(_two_steps(workspace, src, text="one")))).wait_for_completion(show_output=False)
    run = exp.submit(Pipeline(workspace, list(_two_steps(workspace, src, text="two"))))
    run.wait_for_completion(show_output=False)
    assert _marker(tmp_path) == ["producer", "consumer", "producer", "consumer"]
    producer = run.find_step_run("producer")[0].explain()
    assert any(c.startswith("arguments changed") for c in producer["changes"])
    consumer = run.find_step_run("consumer")[0].explain()
    assert consumer["changes"] == ["input data changed"]


def test_edited_script_is_named_in_the_explanation(workspace, src, tmp_path):
    exp = Experiment(workspace, "edit")
    exp.submit(Pipeline(workspace, list(_two_steps(workspace, src)))).wait_for_completion(show_output=False)
    (src / "consumer.py").write_text((src / "consumer.py").read_text() + "\n# edited\n")
    run = exp.submit(Pipeline(workspace, list(_two_steps(workspace, src))))
    run.wait_for_completion(show_output=False)
    # both steps share the source folder, so both snapshots changed
    info = run.find_step_run("consumer")[0].explain()
    assert info["changes"] == ["snapshot changed: consumer.py modified"]
    assert info["parts"]["script"] == "consumer.py" and info["parts"]["input:data"].startswith("blake2b:")


def test_early_cutoff_reuses_downstream_when_upstream_reran_with_same_bytes(workspace, src, tmp_path):
    exp = Experiment(workspace, "cutoff")
    exp.submit(Pipeline(workspace, list(_two_steps(workspace, src)))).wait_for_completion(show_output=False)
    producer, consumer = _two_steps(workspace, src)
    producer.allow_reuse = False  # the producer runs again and writes identical bytes
    run = exp.submit(Pipeline(workspace, [producer, consumer]))
    run.wait_for_completion(show_output=False)
    assert _marker(tmp_path) == ["producer", "consumer", "producer"]
    assert run.find_step_run("producer")[0].get_status() == "Completed"
    assert run.find_step_run("consumer")[0].get_status() == "Reused"
    assert "allow_reuse=False" in run.find_step_run("producer")[0].explain()["summary"]


def test_regenerate_outputs_runs_everything_again(workspace, src, tmp_path):
    exp = Experiment(workspace, "regen")
    exp.submit(Pipeline(workspace, list(_two_steps(workspace, src)))).wait_for_completion(show_output=False)
    run = exp.submit(Pipeline(workspace, list(_two_steps(workspace, src))), regenerate_outputs=True)
    run.wait_for_completion(show_output=False)
    assert _marker(tmp_path).count("consumer") == 2
    assert "regenerate_outputs=True" in run.find_step_run("consumer")[0].explain()["summary"]


def test_an_output_folder_is_named_as_the_output_and_its_commit_leaves_nothing_staged(workspace, write_script):
    src = write_script("two.py", """
        import os, sys
        for folder in sys.argv[1:]:
            print(os.path.basename(folder))
            os.makedirs(folder, exist_ok=True)
            open(os.path.join(folder, "f.txt"), "w").write(folder[-1])
        open(os.path.join(os.path.dirname(sys.argv[1]), "beside.txt"), "w").write("written next to the outputs")
    """)
    model, metrics = PipelineData("model"), PipelineData("metrics")
    step = PythonScriptStep("two.py", name="two", source_directory=src, arguments=[model, metrics],
                            outputs=[model, metrics])
    run = Experiment(workspace, "names").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    step_run = run.find_step_run("two")[0]
    assert step_run.get_stdout_log().split() == ["model", "metrics"]  # as Azure ML names them
    outputs = Path(workspace.get_default_datastore().root, "runs", run.id, step_run.id, "outputs")
    assert sorted(p.name for p in outputs.iterdir()) == ["metrics", "model"]  # nothing staged is left
    assert (outputs / "model" / "f.txt").read_text() == "l"


def test_failed_step_keeps_logs_commits_nothing_and_stops_downstream(workspace, write_script):
    src = write_script("bad.py", """
        import os, sys
        os.makedirs(sys.argv[2], exist_ok=True)
        open(os.path.join(sys.argv[2], "partial.txt"), "w").write("x")
        print("about to fail")
        raise SystemExit("boom: the data is wrong")
    """)
    write_script("after.py", "print('never')")
    out = PipelineData("out")
    bad = PythonScriptStep("bad.py", name="bad", source_directory=src, arguments=["--out", out], outputs=[out])
    after = PythonScriptStep("after.py", name="after", source_directory=src, arguments=[out.as_input()])
    run = Experiment(workspace, "fail").submit(Pipeline(workspace, [bad, after]))
    with pytest.raises(RunFailedError) as info:
        run.wait_for_completion(show_output=False)
    assert "bad" in str(info.value) and "boom: the data is wrong" in str(info.value)
    assert run.get_status() == "Failed"
    step = run.find_step_run("bad")[0]
    assert step.get_status() == "Failed"
    assert "about to fail" in step.get_stdout_log() and "boom" in step.get_stderr_log()
    assert step.get_outputs() == {}
    assert not Path(workspace.get_default_datastore().root, "runs", run.id, step.id, "outputs").exists()
    downstream = run.find_step_run("after")[0]
    assert downstream.get_status() == "NotStarted"
    assert downstream._row()["status_reason"] == "not run: upstream step 'bad' failed"
    # a failed step is never reused
    again = Experiment(workspace, "fail").submit(Pipeline(workspace, [bad, after]))
    assert again.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    assert again.find_step_run("bad")[0].get_status() == "Failed"


def test_max_run_duration_kills_the_step_and_says_why(workspace, write_script):
    src = write_script("slow.py", "import time\nprint('sleeping', flush=True)\ntime.sleep(120)\n")
    rc = RunConfiguration()
    rc.max_run_duration_seconds = 1
    step = PythonScriptStep("slow.py", name="slow", source_directory=src, runconfig=rc)
    run = Experiment(workspace, "timeout").submit(Pipeline(workspace, [step]))
    details = run.wait_for_completion(show_output=False, raise_on_error=False)
    assert details == "Failed"
    reason = run.find_step_run("slow")[0]._row()["status_reason"]
    assert "max_run_duration_seconds=1" in reason


def test_step_killed_with_sigkill_is_failed_with_the_signal(workspace, write_script):
    src = write_script("suicide.py", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    run = Experiment(workspace, "sigkill").submit(
        Pipeline(workspace, [PythonScriptStep("suicide.py", name="suicide", source_directory=src)]))
    run.wait_for_completion(show_output=False, raise_on_error=False)
    step = run.find_step_run("suicide")[0]
    assert step.get_status() == "Failed"
    assert "SIGKILL" in step._row()["status_reason"]


def test_independent_steps_run_in_parallel(workspace, write_script, tmp_path):
    # Each step waits (bounded) until its sibling has started: only parallel execution finishes.
    src = write_script("meet.py", """
        import os, sys, time
        here, other = sys.argv[1], sys.argv[2]
        open(here, "w").close()
        deadline = time.time() + 30
        while not os.path.exists(other):
            if time.time() > deadline:
                raise SystemExit("sibling never started: steps did not run in parallel")
            time.sleep(0.01)
    """)
    a, b = str(tmp_path / "a.flag"), str(tmp_path / "b.flag")
    steps = [PythonScriptStep("meet.py", name="left", source_directory=src, arguments=[a, b], allow_reuse=False),
             PythonScriptStep("meet.py", name="right", source_directory=src, arguments=[b, a], allow_reuse=False)]
    run = Experiment(workspace, "parallel").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"


def test_run_after_orders_steps(workspace, write_script, tmp_path):
    log = tmp_path / "order.txt"
    src = write_script("note.py", "import sys\nopen(sys.argv[1], 'a').write(sys.argv[2] + '\\n')\n")
    first = PythonScriptStep("note.py", name="first", source_directory=src, arguments=[str(log), "first"])
    second = PythonScriptStep("note.py", name="second", source_directory=src, arguments=[str(log), "second"])
    second.run_after(first)
    Experiment(workspace, "order").submit(Pipeline(workspace, [second])).wait_for_completion(show_output=False)
    assert log.read_text().split() == ["first", "second"]


def test_cancel_kills_running_step_and_cancels_the_rest(workspace, write_script, tmp_path):
    started = tmp_path / "started"
    src = write_script("hang.py", f"open({str(started)!r}, 'w').close()\nimport time\ntime.sleep(120)\n")
    write_script("after.py", "print('never')")
    out = PipelineData("out")
    hang = PythonScriptStep("hang.py", name="hang", source_directory=src, arguments=[out], outputs=[out])
    after = PythonScriptStep("after.py", name="after", source_directory=src, arguments=[out.as_input()])
    run = Experiment(workspace, "cancel").submit(Pipeline(workspace, [hang, after]))
    step = run.find_step_run("hang")[0]
    watch = workspace._backend.watch(run.id)
    assert watch.connect()
    while step.get_status() != "Running":  # woken by the agent's events, not a timer
        watch.wait(10)
    watch.close()
    run.cancel()
    with pytest.raises(RunFailedError):
        run.wait_for_completion(show_output=False, timeout_seconds=60)
    assert run.get_status() == "Canceled"
    assert step.get_status() == "Canceled" and run.find_step_run("after")[0].get_status() == "Canceled"
    pid = step._row()["pid"]
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_offline_run_prints_and_does_not_fail(capsys):
    run = Run.get_context()
    run.log("accuracy", 0.9)
    run.log_list("xs", [1, 2])
    run.tag("k", "v")
    assert run.get_metrics() == {"accuracy": 0.9, "xs": [1, 2]}
    assert "accuracy" in capsys.readouterr().err


def test_git_facts_become_run_properties(workspace, write_script, tmp_path):
    import subprocess

    src = write_script("hello.py", "print('hi')\n", folder="repo")
    for cmd in (["init", "-q", "-b", "main"], ["add", "."],
                ["-c", "user.email=a@b.c", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(["git", "-C", str(src), *cmd], check=True)
    (src / "hello.py").write_text("print('changed')\n")
    run = Experiment(workspace, "git").submit(
        Pipeline(workspace, [PythonScriptStep("hello.py", source_directory=src)]))
    run.wait_for_completion(show_output=False)
    props = run.get_properties()
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert props["cairn.git.commit"] == commit == props["mlflow.source.git.commit"]
    assert props["cairn.git.branch"] == "main" and props["cairn.git.dirty"] == "true"
    assert run.get_steps()[0].get_properties()["cairn.git.commit"] == commit
    subprocess.run(["git", "-C", str(src), "checkout", "-q", "hello.py"], check=True)
    (src / "untracked.py").write_text("print('new')\n")  # in the snapshot, not in the commit
    again = Experiment(workspace, "git").submit(
        Pipeline(workspace, [PythonScriptStep("hello.py", source_directory=src)]))
    again.wait_for_completion(show_output=False)
    assert again.get_properties()["cairn.git.dirty"] == "true"
    (src / "untracked.py").unlink()
    clean = Experiment(workspace, "git").submit(
        Pipeline(workspace, [PythonScriptStep("hello.py", source_directory=src)]))
    clean.wait_for_completion(show_output=False)
    assert clean.get_properties()["cairn.git.dirty"] == "false"


def test_runs_are_listed_and_found_by_id(workspace, src):
    run = Experiment(workspace, "find").submit(Pipeline(workspace, list(_two_steps(workspace, src))))
    run.wait_for_completion(show_output=False)
    assert workspace.get_run(run.id).get_status() == Status.COMPLETED
    assert "find" in workspace.experiments
    assert [r.id for r in workspace.experiments["find"].get_runs()] == [run.id]
    spec = run.get_graph_spec()
    assert {s["name"] for s in spec["steps"]} == {"producer", "consumer"}
    assert json.dumps(spec)  # the graph spec is plain JSON
    assert os.path.isdir(workspace.get_default_datastore().root)


def test_logs_keep_a_last_line_without_newline(workspace, write_script):
    src = write_script("partial.py", "import sys\nsys.stdout.write('line1\\nno newline')\nsys.stderr.write('err end')\n")
    run = Experiment(workspace, "partial").submit(
        Pipeline(workspace, [PythonScriptStep("partial.py", name="partial", source_directory=src)]))
    run.wait_for_completion(show_output=False)
    step = run.find_step_run("partial")[0]
    assert step.get_stdout_log() == "line1\nno newline"
    assert step.get_stderr_log() == "err end"


def test_a_fully_reused_run_reports_the_metrics_of_the_runs_it_reused(workspace, src):
    exp = Experiment(workspace, "metrics")
    first = exp.submit(Pipeline(workspace, list(_two_steps(workspace, src))))
    first.wait_for_completion(show_output=False)
    second = exp.submit(Pipeline(workspace, list(_two_steps(workspace, src))))
    second.wait_for_completion(show_output=False)
    reused = second.find_step_run("consumer")[0]
    assert reused.get_status() == "Reused"
    assert reused.get_metrics()["length"] == 5
    assert second.get_metrics(recursive=True)[reused.id]["loss"] == [0.5, 0.25]


def test_a_target_with_max_concurrency_1_runs_one_step_at_a_time(workspace, write_script, tmp_path):
    from cairn import ComputeTarget, LocalCompute

    log = tmp_path / "spans.txt"
    src = write_script("span.py", """
        import sys, time
        start = time.time()
        time.sleep(0.2)
        with open(sys.argv[1], "a") as f:
            f.write(f"{start} {time.time()}\\n")
    """)
    target = ComputeTarget.create(workspace, "one_at_a_time", LocalCompute.provisioning_configuration(max_concurrency=1))
    steps = [PythonScriptStep("span.py", name=f"s{i}", source_directory=src, arguments=[str(log), i],
                              compute_target=target) for i in range(3)]
    Experiment(workspace, "limit").submit(Pipeline(workspace, steps)).wait_for_completion(show_output=False)
    spans = sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end  # never two at once


AZURE_STYLE = """
import os
from multiprocessing import get_context
from cairn import Run

def work(i):
    Run.get_context().log("worker", i)
    Run.get_context().flush()

run = Run.get_context()
for i in range(10):
    run.log("parent", i)
pid = os.fork()
if pid == 0:
    Run.get_context().log("child", 1)
    Run.get_context().flush()
    os._exit(0)
os.waitpid(pid, 0)
with get_context("fork").Pool(2) as pool:
    pool.map(work, range(4))
run.upload_file("notes/summary.txt", __file__)
assert "notes/summary.txt" in run.get_file_names()
run.add_properties({"token": os.urandom(4).hex()})
run.complete()
"""


def test_azure_ml_run_methods_and_forked_workers(workspace, write_script):
    src = write_script("azure_style.py", AZURE_STYLE)
    run = Experiment(workspace, "azure").submit(
        Pipeline(workspace, [PythonScriptStep("azure_style.py", name="azure", source_directory=src)]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    step = run.find_step_run("azure")[0]
    metrics = step.get_metrics()
    assert metrics["parent"] == list(range(10))  # not written twice by the forked child
    assert metrics["child"] == 1 and sorted(metrics["worker"]) == [0, 1, 2, 3]
    assert step.get_file_names() == ["notes/summary.txt"]
    assert "token" in step.get_properties()


def test_run_fail_marks_the_step_failed(workspace, write_script):
    src = write_script("fails.py", "from cairn import Run\nRun.get_context().fail('bad data')\n")
    run = Experiment(workspace, "fail-call").submit(
        Pipeline(workspace, [PythonScriptStep("fails.py", name="fails", source_directory=src)]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Failed"
    step = run.find_step_run("fails")[0]
    assert "run.fail(): bad data" in step._row()["status_reason"]
    explained = step.explain()  # a failed step still has its fingerprint
    assert explained["parts"]["script"] == "fails.py" and explained["summary"].startswith("failed")


def test_output_download_keeps_existing_files_and_gives_writable_copies(workspace, src, tmp_path):
    run = Experiment(workspace, "dl").submit(Pipeline(workspace, list(_two_steps(workspace, src))))
    run.wait_for_completion(show_output=False)
    out = run.find_step_run("consumer")[0].get_output_data("result")
    path = Path(out.download(tmp_path / "dl"))
    assert os.access(path / "result.txt", os.W_OK)
    (path / "result.txt").write_text("mine")
    out.download(tmp_path / "dl")  # a second download keeps what is there
    assert (path / "result.txt").read_text() == "mine"
    out.download(tmp_path / "dl", overwrite=True)
    assert (path / "result.txt").read_text() == "HELLO"


def test_a_step_prepared_ahead_never_starts_when_canceled_while_it_waits(workspace, write_script):
    """With max_concurrency=1 the second step is prepared while the first runs and waits for the
    process slot; canceling the run then ends it without ever starting its process."""
    from cairn import ComputeTarget, LocalCompute

    src = write_script("hang.py", "import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    target = ComputeTarget.create(workspace, "one", LocalCompute.provisioning_configuration(max_concurrency=1))
    steps = [PythonScriptStep("hang.py", name=f"h{i}", source_directory=src, compute_target=target,
                              allow_reuse=False) for i in range(2)]
    run = Experiment(workspace, "ahead").submit(Pipeline(workspace, steps))
    watch = workspace._backend.watch(run.id)
    assert watch.connect()
    for _ in range(30):  # woken by the agent's events, at most ~5 minutes
        if any(s.get_status() == "Running" for s in run.get_steps()):
            break
        watch.wait(10)
    watch.close()
    running = [s for s in run.get_steps() if s.get_status() == "Running"]
    waiting = [s for s in run.get_steps() if s.get_status() != "Running"]
    assert len(running) == 1 and len(waiting) == 1
    assert waiting[0].get_status() in ("NotStarted", "Queued", "Preparing")  # prepared, not started
    run.cancel()
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Canceled"
    assert {s.get_status() for s in run.get_steps()} == {"Canceled"}
    assert waiting[0]._row()["pid"] is None  # its process never existed


def test_no_step_starts_after_a_failure_stops_the_run(workspace, write_script):
    """Steps prepared ahead of their process slot are withdrawn when a step fails (and the run does
    not continue on failure): with one slot, no step starts after the failing one, whatever order
    they got the slot in, and those that never started say why."""
    from cairn import ComputeTarget, LocalCompute

    src = write_script("job.py", """
        import sys, time
        time.sleep(0.5)
        sys.exit(3 if sys.argv[1] == "fail" else 0)
    """)
    target = ComputeTarget.create(workspace, "one", LocalCompute.provisioning_configuration(max_concurrency=1))
    steps = [PythonScriptStep("job.py", name=name, source_directory=src, compute_target=target, arguments=[name],
                              allow_reuse=False) for name in ("fail", "b", "c", "d")]
    run = Experiment(workspace, "withdraw").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=120) == "Failed"
    by_name = {s.name: s for s in run.get_steps()}
    failed_at = by_name["fail"]._row()["ended_at"]
    rows = [by_name[name]._row() for name in ("b", "c", "d")]
    assert all(row["status"] in ("Completed", "NotStarted") for row in rows), rows
    for row in rows:
        if row["status"] == "NotStarted":
            assert row["pid"] is None and "not run: the pipeline stopped after step 'fail' failed" in row["status_reason"]
            # withdrawn once: not prepared again while the engine had yet to hear of the failure
            assert "attempt 2" not in by_name[row["name"]].get_system_log()
        else:
            assert row["ended_at"] < failed_at  # one slot: it ran (and ended) before the failing step
    assert any(row["status"] == "NotStarted" for row in rows)


SCRIPT_SIDE_CALLS = """
import io, os
from cairn import Run

run = Run.get_context()
os.makedirs("made/deeper", exist_ok=True)
for name in ("made/a.txt", "made/deeper/b.txt"):
    with open(name, "w") as f:
        f.write(name)
run.upload_file("one.txt", "made/a.txt")
run.upload_file("streamed.txt", io.BytesIO(b"from a stream"))
run.upload_files(["two/a.txt", "two/b.txt"], ["made/a.txt", "made/deeper/b.txt"])
run.upload_folder("folder", "made")
names = run.get_file_names()
assert {"one.txt", "streamed.txt", "two/a.txt", "folder/a.txt", "folder/deeper/b.txt"} <= set(names), names
run.download_file("streamed.txt", "back.txt")
assert open("back.txt", "rb").read() == b"from a stream"
try:
    run.upload_files(["x", "y"], ["made/a.txt", "missing.txt"])
except FileNotFoundError as exc:
    assert "missing.txt" in str(exc)
else:
    raise AssertionError("a missing file must be refused")
run.tag("stage", "calls")
run.flush()
details = run.get_details()
assert details["runId"] == run.id and details["tags"]["stage"] == "calls" and "properties" in details
assert run.tags["stage"] == "calls" and isinstance(run.properties, dict)
assert run.name and run.display_name == run.name and run.get_children() == []
print("all calls worked as", run.name)
"""


def test_the_run_methods_scripts_call_work_in_a_step_and_offline(workspace, write_script):
    """What Azure ML scripts call on Run.get_context() works in a pipeline step (recorded), and in the
    offline run a plain `python script.py` or `cairn debug` gets (printed, kept for the script)."""
    import subprocess
    import sys

    src = write_script("calls.py", SCRIPT_SIDE_CALLS)
    run = Experiment(workspace, "calls").submit(
        Pipeline(workspace, [PythonScriptStep("calls.py", name="calls", source_directory=src)]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False) == "Completed", \
        run.get_steps()[0].get_stderr_log()
    step = run.get_steps()[0]
    assert "all calls worked as calls" in step.get_stdout_log()
    assert "folder/deeper/b.txt" in step.get_file_names()

    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    offline = subprocess.run([sys.executable, "calls.py"], cwd=src, env=env, capture_output=True, text=True)
    assert offline.returncode == 0, offline.stderr
    assert "all calls worked as OfflineRun" in offline.stdout
    assert "[offline run] upload one.txt from 'made/a.txt'" in offline.stderr
    where = "from cairn import Run\nprint('workspace', getattr(Run.get_context().experiment.workspace, 'location', None))\n"
    inside = subprocess.run([sys.executable, "-c", where], cwd=workspace.location, env=env, capture_output=True,
                            text=True)
    assert inside.stdout == f"workspace {workspace.location}\n", inside.stderr  # the one its folder is in
    outside = subprocess.run([sys.executable, "-c", where], cwd="/", env=env, capture_output=True, text=True)
    assert outside.stdout == "workspace None\n", outside.stderr


DETACHES = """
import subprocess, sys, time
child = subprocess.Popen(["sleep", "300"], start_new_session=True)  # its own session and group
with open(sys.argv[1], "w") as fifo:
    fifo.write(str(child.pid))
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_stopped_step_takes_what_it_started_in_a_session_of_its_own(workspace, write_script, tmp_path, how):
    from tests.engine.test_resume import _exits_within

    fifo = tmp_path / "pid.fifo"
    os.mkfifo(fifo)
    src = write_script("detaches.py", DETACHES)
    rc = RunConfiguration()
    if how == "timeout":
        rc.max_run_duration_seconds = 2
    step = PythonScriptStep("detaches.py", name="detaches", source_directory=src, arguments=[str(fifo)],
                            runconfig=rc, allow_reuse=False)
    run = Experiment(workspace, "detached").submit(Pipeline(workspace, [step]))
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()  # its open returns once the step has started its child and opened the fifo
    reader.join(60)
    assert got, "the step did not start its child within 60 s: " + run.get_steps()[0].get_stderr_log()
    detached = int(got[0])
    if how == "cancel":
        run.cancel()
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) in ("Canceled", "Failed")
    assert _exits_within(detached, 30)


def test_a_workspace_removed_under_a_run_ends_the_wait_with_a_clear_error(workspace, write_script, tmp_path):
    """Its agent stops; the waiting client says the workspace is gone, and never makes a new, empty
    one in its place by starting another agent there."""
    import shutil

    from cairn import WorkspaceNotFoundError

    src = write_script("long.py", "import time\ntime.sleep(120)\n")
    run = Experiment(workspace, "removed").submit(Pipeline(workspace, [
        PythonScriptStep("long.py", name="long", source_directory=src)]))
    step = run.find_step_run("long")[0]
    watch = workspace._backend.watch(run.id)
    assert watch.connect()
    while step.get_status() != "Running":  # woken by the agent's events, not a timer
        watch.wait(10)
    watch.close()
    dot = Path(workspace.location) / ".cairn"
    away = tmp_path / "moved-away"
    os.rename(dot, away)  # gone from the workspace at once (a removal in place races the agent's writes)
    with pytest.raises(WorkspaceNotFoundError, match="is gone"):
        run.wait_for_completion(show_output=False, timeout_seconds=90)
    assert not dot.exists()
    shutil.rmtree(away, ignore_errors=True)


CHECKPOINTS = """
import signal, sys, time
def save(signum, frame):
    open(sys.argv[1], "w").write("checkpoint saved on " + signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
print("training", flush=True)
time.sleep(120)
"""


def _wait_for_output(workspace, run, step, text):
    """Until ``step`` has printed ``text``: woken by the agent's events (and log polls), not a timer."""
    watch = workspace._backend.watch(run.id)
    assert watch.connect()
    try:
        while text not in step.get_stdout_log():
            watch.wait(1)
    finally:
        watch.close()


def test_a_cancel_lets_a_step_save_a_checkpoint_first(workspace, write_script, tmp_path):
    """SIGTERM first (as a timeout does), SIGKILL only for what is left after the grace period."""
    saved = tmp_path / "checkpoint.txt"
    src = write_script("train.py", CHECKPOINTS)
    run = Experiment(workspace, "graceful").submit(Pipeline(workspace, [
        PythonScriptStep("train.py", name="train", source_directory=src, arguments=[str(saved)])]))
    step = run.find_step_run("train")[0]
    _wait_for_output(workspace, run, step, "training")
    run.cancel()
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Canceled"
    assert saved.read_text() == "checkpoint saved on SIGTERM"
    assert step.get_status() == "Canceled"


FORKS_AWAY = """
import os, sys, time
child = os.fork()
if child == 0:  # no exec: it keeps the interpreter's own variables, and leaves the step's group
    os.setsid()
    time.sleep(120)
    os._exit(0)
reader, writer = os.pipe()
if os.fork() == 0:  # a daemon, as python-daemon makes one: fork, setsid, fork; its parent exits at once
    os.setsid()
    if os.fork() == 0:
        os.write(writer, str(os.getpid()).encode())
        os.close(writer)
        time.sleep(120)
    os._exit(0)
os.close(writer)
daemon = int(os.read(reader, 32))
print("child", child, daemon, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("start", ["cold", "warm"])
@pytest.mark.parametrize("stop", ["cancel", "timeout"])
def test_a_stopped_step_takes_a_child_that_forked_into_its_own_session_along(workspace, write_script, start, stop):
    """A child forked without exec, then setsid: neither the step's group nor its start-up variables
    find it (a spare's or a warm step's started before its step was known); its parentage does. A
    daemon (fork, setsid, fork) has no parentage left: the step's id written over its interpreter's
    placeholder CAIRN_RUN_ID, which it inherited, does."""
    from cairn import ComputeTarget, LocalCompute

    if start == "warm":
        ComputeTarget.create(workspace, "local", LocalCompute.provisioning_configuration(warm_start_modules=["json"]))
    src = write_script("away.py", FORKS_AWAY)
    rc = RunConfiguration()
    if stop == "timeout":
        rc.max_run_duration_seconds = 2
    step_def = PythonScriptStep("away.py", name="away", source_directory=src, runconfig=rc, allow_reuse=False)
    run = Experiment(workspace, "away").submit(Pipeline(workspace, [step_def]))
    step = run.find_step_run("away")[0]
    _wait_for_output(workspace, run, step, "child")
    child, daemon = map(int, step.get_stdout_log().split()[1:3])
    if stop == "cancel":
        run.cancel()
    final = run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60)
    assert final == ("Canceled" if stop == "cancel" else "Failed")
    deadline = time.monotonic() + 10
    for pid in (child, daemon):  # the daemon's parent had exited: it was init's when the stop came
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]:
            assert time.monotonic() < deadline, f"the step's process {pid} in a session of its own is still running"
            time.sleep(0.05)


def test_a_submitted_run_is_not_kept_alive_by_cairn(workspace, write_script):
    """Outside `cairn run`, nothing of Cairn's holds a submitted run (and through it its workspace and
    database connections): a notebook submits run after run."""
    import gc
    import weakref

    from cairn.client import experiment as experiment_module

    src = write_script("hello.py", "print('hello')\n")
    run = Experiment(workspace, "kept").submit(Pipeline(workspace, [
        PythonScriptStep("hello.py", name="hello", source_directory=src)]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert experiment_module.SUBMITTED is None  # only `cairn run` collects them, to follow them
    kept = weakref.ref(run)
    del run
    gc.collect()
    assert kept() is None
