"""Steps on a real Ray cluster started by the tests on this machine: a head and a second node
(``ray start --address=...`` with its own temporary folder). The demo pipeline, a fan-out spread
over both nodes, cancel reaching the task and its process, and (last: it kills a node) a node
that dies mid-step, whose step is retried and the run completes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cairn import (
    ComputeTarget,
    Experiment,
    Pipeline,
    PipelineValidationError,
    PythonScriptStep,
    RayCompute,
    RunConfiguration,
    UserInputError,
    Workspace,
)
from cairn.compute.ray_cluster import start_node, stop_node, wait_ready
from cairn.demo.pipeline import SOURCES, build_pipeline
from tests.compute.ray_nodes import gone, head_and_node

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with head_and_node(tmp_path_factory.mktemp("ray-logs"), 2, cpus=2) as (head, second):
        yield {"address": head["address"], "head": head, "second": second}


@pytest.fixture
def ray_target(workspace: Workspace, cluster: dict[str, Any]) -> ComputeTarget:
    return ComputeTarget.attach(workspace, "ray", RayCompute.attach_configuration(address=cluster["address"]))


def node_of(step: Any) -> str:
    return step.get_properties()["cairn.ray.node"]


def wait_until(workspace: Workspace, run: Any, ready: Callable[[], bool]) -> None:
    watch = workspace._backend.watch(run.id)
    assert watch.connect()
    try:
        while not ready():  # woken by the agent's events, not a timer
            watch.wait(10)
    finally:
        watch.close()


def test_the_demo_pipeline_runs_on_ray(workspace: Workspace, ray_target: ComputeTarget, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "demo-src"
    shutil.copytree(SOURCES, src)
    run = Experiment(workspace, "ray").submit(build_pipeline(workspace, src, compute_target=ray_target))
    assert run.wait_for_completion(show_output=False) == "Completed"
    report = run.find_step_run("compare")[0].get_output_data("report").local_path / "report.md"
    assert "Best model" in report.read_text()
    assert all(s.get_properties().get("cairn.ray.node") for s in run.get_steps())  # every step ran on Ray
    status = ray_target.get_status()
    assert status["state"] == "Succeeded" and status["node_count"] == 2 and status["cpus"] == 4
    assert status["running_steps"] == []
    assert {c.name for c in ComputeTarget.list(workspace)} == {"local", "ray"} == set(workspace.compute_targets)


def test_a_fan_out_spreads_over_both_nodes(workspace: Workspace, ray_target: ComputeTarget,
                                           write_script: Callable[..., Path]) -> None:
    src = write_script("nap.py", "import time\ntime.sleep(1.5)\nprint('done')\n")
    steps = [PythonScriptStep("nap.py", name=f"nap{i}", source_directory=str(src), compute_target="ray",
                              allow_reuse=False) for i in range(6)]
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, steps))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert len({node_of(s) for s in run.get_steps()}) == 2
    assert all(s.get_stdout_log() == "done\n" for s in run.get_steps())  # logs come back from the nodes


def test_cancel_reaches_the_task_and_its_process(workspace: Workspace, ray_target: ComputeTarget,
                                                 write_script: Callable[..., Path], tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    src = write_script("hang.py", f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                                  f"print('started', flush=True)\ntime.sleep(300)\n")
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, [
        PythonScriptStep("hang.py", name="hang", source_directory=str(src), compute_target="ray")]))
    step = run.get_steps()[0]
    wait_until(workspace, run, lambda: step.get_status() == "Running" and pid_file.exists())
    pid = int(pid_file.read_text())
    run.cancel()
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Canceled"
    assert step.get_status() == "Canceled", workspace._backend.get_events(step.id)
    # the agent kills the process when it hears the task's end, which may come just after the run ended
    deadline = time.monotonic() + 30
    while not gone(pid):
        assert time.monotonic() < deadline, "the canceled step's process is still alive"
        time.sleep(0.05)
    events = [e["status"] for e in workspace._backend.get_events(step.id)]
    assert events.count("Canceled") == 1, events  # told by the driver once, not once per code path


CHECKPOINTS = """
import os, signal, sys, time
def save(signum, frame):
    open(sys.argv[1], "w").write("checkpoint saved on " + signal.Signals(signum).name)
    os.makedirs(sys.argv[3], exist_ok=True)
    open(os.path.join(sys.argv[3], "model.txt"), "w").write("half-trained")
    if sys.argv[2] == "exit":
        sys.exit(0)
signal.signal(signal.SIGTERM, save)
print("training", os.getpid(), flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("after_saving", ["exit", "linger"])
def test_a_cancel_lets_a_step_on_ray_save_a_checkpoint_first(workspace: Workspace, ray_target: ComputeTarget,
                                                            write_script: Callable[..., Path], tmp_path: Path,
                                                            after_saving: str) -> None:
    """As on local compute: SIGTERM to the step's process group first, the task's worker stopped only
    if it has not ended after the grace period (a step that exits 0 once saved is still canceled)."""
    from cairn import OutputFileDatasetConfig

    saved = tmp_path / "checkpoint.txt"
    store = workspace.get_default_datastore()
    latest = Path(store.root) / "models" / "latest"
    latest.mkdir(parents=True)
    (latest / "model.txt").write_text("good")  # the last good model: a canceled step must not replace it
    model = OutputFileDatasetConfig("model", destination=(store, "models/latest")).as_upload(overwrite=True)
    src = write_script("train.py", CHECKPOINTS)
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, [
        PythonScriptStep("train.py", name="train", source_directory=str(src), compute_target="ray",
                         arguments=[str(saved), after_saving, model], allow_reuse=False)]))
    step = run.get_steps()[0]
    wait_until(workspace, run, lambda: "training" in step.get_stdout_log())
    pid = int(step.get_stdout_log().split()[1])
    run.cancel()
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Canceled"
    assert saved.read_text() == "checkpoint saved on SIGTERM"
    assert step.get_status() == "Canceled", workspace._backend.get_events(step.id)
    events = [e["status"] for e in workspace._backend.get_events(step.id)]
    assert events.count("Canceled") == 1 and "Completed" not in events, events
    assert (latest / "model.txt").read_text() == "good"  # nothing of a canceled step is committed
    deadline = time.monotonic() + 30  # one that lingers is killed after the grace period
    while not gone(pid):
        assert time.monotonic() < deadline, "the canceled step's process is still alive"
        time.sleep(0.05)


def test_step_resources_come_from_the_run_configuration(workspace: Workspace, ray_target: ComputeTarget,
                                                        write_script: Callable[..., Path]) -> None:
    import json

    src = write_script("resources.py", "print('ok')\n")
    rc = RunConfiguration()
    rc.cpus = 2
    big = PythonScriptStep("resources.py", name="big", source_directory=str(src), compute_target="ray", runconfig=rc)
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, [big]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert json.loads(run.get_steps()[0].get_properties()["cairn.ray.resources"]) == {"CPU": 2.0}
    rc_huge = RunConfiguration()
    rc_huge.cpus = 64
    huge = PythonScriptStep("resources.py", name="huge", source_directory=str(src), compute_target="ray",
                            runconfig=rc_huge, allow_reuse=False)  # resources are not part of the fingerprint
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, [huge]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Failed"
    assert "asks for 64 CPUs and the largest node" in run.get_steps()[0]._row()["status_reason"]
    rc_bad = RunConfiguration()
    rc_bad.cpus = -1
    with pytest.raises(PipelineValidationError, match="runconfig.cpus must be a positive number"):
        Experiment(workspace, "ray").submit(Pipeline(workspace, [
            PythonScriptStep("resources.py", name="bad", source_directory=str(src), runconfig=rc_bad)]))


def test_node_count_reserves_distinct_nodes_for_one_step(workspace: Workspace, ray_target: ComputeTarget,
                                                         write_script: Callable[..., Path]) -> None:
    src = write_script("multi.py", "import json, os\n"
                                   "print(os.environ['CAIRN_NODE_COUNT'], len(set(json.loads(os.environ['CAIRN_NODES']))))\n")
    rc = RunConfiguration()
    rc.node_count = 2
    step = PythonScriptStep("multi.py", name="multi", source_directory=str(src), compute_target="ray", runconfig=rc)
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, [step]))
    assert run.wait_for_completion(show_output=False) == "Completed"
    assert run.get_steps()[0].get_stdout_log() == "2 2\n"
    rc.node_count = 3  # the cluster has 2 nodes: fails at once, saying so (no wait for a reservation)
    three = PythonScriptStep("multi.py", name="three", source_directory=str(src), compute_target="ray", runconfig=rc,
                             allow_reuse=False)
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, [three]))
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Failed"
    reasons = [e["reason"] or "" for e in workspace._backend.get_events(run.get_steps()[0].id)]
    assert any("node_count=3 distinct nodes" in r and "has 2 such alive node(s)" in r for r in reasons), reasons
    rc.node_count = 2
    local = PythonScriptStep("multi.py", name="here", source_directory=str(src), runconfig=rc)
    with pytest.raises(PipelineValidationError, match="node_count=2 needs a Ray target"):
        Experiment(workspace, "ray").submit(Pipeline(workspace, [local]))


def test_attach_and_provisioning_errors_are_clear(workspace: Workspace) -> None:
    with pytest.raises(UserInputError, match="HOST:PORT"):
        RayCompute.attach_configuration(address="localhost")
    with pytest.raises(UserInputError, match="no Ray head answers at 127.0.0.1:9"):
        ComputeTarget.attach(workspace, "nowhere", RayCompute.attach_configuration(address="127.0.0.1:9"))
    import http.server
    import threading

    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # e.g. the dashboard
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserInputError, match="is not a Ray head"):
            ComputeTarget.attach(workspace, "web", RayCompute.attach_configuration(
                address=f"127.0.0.1:{web.server_address[1]}"))
    finally:
        web.shutdown()
        web.server_close()
    assert "web" not in workspace.compute_targets
    with pytest.raises(UserInputError, match="cannot exceed max_nodes"):
        RayCompute.provisioning_configuration(min_nodes=5, max_nodes=2)
    with pytest.raises(UserInputError, match="local' target cannot be deleted"):
        ComputeTarget(workspace, "local").delete()


def test_a_cluster_that_is_gone_fails_its_steps_and_nothing_else(workspace: Workspace, tmp_path: Path,
                                                                  write_script: Callable[..., Path]) -> None:
    node = start_node(None, cpus=1, log=tmp_path / "gone.log")
    try:
        wait_ready(node["address"], 1)
        ComputeTarget.attach(workspace, "gone", RayCompute.attach_configuration(address=node["address"]))
    finally:
        stop_node(node)
    src = write_script("hello.py", "print('hello')\n")
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, [
        PythonScriptStep("hello.py", name="there", source_directory=str(src), compute_target="gone"),
        PythonScriptStep("hello.py", name="here", source_directory=str(src), allow_reuse=False)]),
        continue_on_step_failure=True)
    assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=60) == "Failed"
    steps = {s.name: s for s in run.get_steps()}
    assert steps["here"].get_status() == "Completed"  # the agent was never stuck on the dead cluster
    assert "no Ray head answers at" in steps["there"]._row()["status_reason"]
    assert ComputeTarget(workspace, "gone").get_status()["state"] == "Unreachable"


def test_a_head_that_dies_mid_step_ends_its_steps_and_not_the_agent(workspace: Workspace, tmp_path: Path,
                                                                    write_script: Callable[..., Path]) -> None:
    """The agent is the cluster's driver: it outlives the head (Ray would end it 60 s later), and
    its Ray step, whose task Ray would wait for forever, ends saying the head is gone."""
    from cairn.engine.client import _request
    from cairn.storage.layout import WorkspaceLayout

    node = start_node(None, cpus=1, log=tmp_path / "dying.log")
    try:
        wait_ready(node["address"], 1)
        ComputeTarget.attach(workspace, "dying", RayCompute.attach_configuration(address=node["address"]))
        src = write_script("long.py", "import time\nprint('working', flush=True)\ntime.sleep(120)\n")
        run = Experiment(workspace, "ray").submit(Pipeline(workspace, [
            PythonScriptStep("long.py", name="there", source_directory=str(src), compute_target="dying")]))
        there = run.find_step_run("there")[0]
        wait_until(workspace, run, lambda: there.get_status() == "Running")
        agent = (_request(WorkspaceLayout(workspace.location), {"op": "sync"}) or {})["pid"]
        os.killpg(node["pid"], signal.SIGKILL)  # the head and its workers, as a crash would
        assert run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=120) == "Failed"
        reason = there._row()["status_reason"]
        assert "Ray head" in reason and ("stopped answering" in reason or "no Ray head answers" in reason), reason
        assert (_request(WorkspaceLayout(workspace.location), {"op": "sync"}) or {})["pid"] == agent
    finally:
        stop_node(node)


def test_a_target_attached_again_to_a_new_cluster_uses_it(workspace: Workspace, tmp_path: Path,
                                                          write_script: Callable[..., Path]) -> None:
    src = write_script("hello.py", "print('hello')\n")

    def run_once() -> str:
        run = Experiment(workspace, "ray").submit(Pipeline(workspace, [
            PythonScriptStep("hello.py", name="hello", source_directory=str(src), compute_target="again",
                             allow_reuse=False)]))
        return run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=90)

    for n in range(2):
        node = start_node(None, cpus=1, log=tmp_path / f"again{n}.log")
        try:
            wait_ready(node["address"], 1)
            if n:
                ComputeTarget(workspace, "again").detach()
            ComputeTarget.attach(workspace, "again", RayCompute.attach_configuration(address=node["address"]))
            assert run_once() == "Completed"  # the agent (still up) follows the target to the new cluster
        finally:
            stop_node(node)


def test_a_provisioned_cluster_starts_reports_and_is_deleted(workspace: Workspace) -> None:
    target = ComputeTarget.create(workspace, "mini", RayCompute.provisioning_configuration(min_nodes=1, cpus_per_node=1))
    try:
        target.wait_for_completion(show_output=False)
        status = target.get_status()
        assert status["state"] == "Succeeded" and status["node_count"] == 1 and status["managed"]
        with pytest.raises(UserInputError, match="use delete"):
            target.detach()
        with pytest.raises(UserInputError, match="is a Ray cluster Cairn started"):  # it would run on, unnamed
            ComputeTarget.create(workspace, "mini", RayCompute.provisioning_configuration(min_nodes=1, cpus_per_node=1))
    finally:
        nodes = target.config["nodes"]
        target.delete()
    assert "mini" not in workspace.compute_targets
    for node in nodes:
        assert not Path(f"/proc/{node['pid']}").exists() or \
            "Z" in Path(f"/proc/{node['pid']}/stat").read_text().split()[2]


def test_a_node_that_dies_mid_step_is_retried_elsewhere(workspace: Workspace, ray_target: ComputeTarget,
                                                        cluster: dict[str, Any],
                                                        write_script: Callable[..., Path]) -> None:
    """Last: it kills the second node's raylet."""
    from cairn.compute.ray_cluster import cluster_nodes

    src = write_script("slow.py", "import time\nprint('working', flush=True)\ntime.sleep(6)\nprint('done')\n")
    steps = [PythonScriptStep("slow.py", name=f"slow{i}", source_directory=str(src), compute_target="ray",
                              allow_reuse=False) for i in range(4)]
    run = Experiment(workspace, "ray").submit(Pipeline(workspace, steps))
    second_id = next(n["NodeID"] for n in cluster_nodes(cluster["address"])
                     if n.get("NodeManagerPort") == cluster["second"]["node_manager_port"])

    def on_second_node_and_running() -> bool:
        return any(s.get_status() == "Running" and s.get_properties().get("cairn.ray.node") == second_id
                   for s in run.get_steps())

    wait_until(workspace, run, on_second_node_and_running)
    raylet = _raylet_pid(cluster["second"]["temp_dir"])
    os.kill(raylet, signal.SIGKILL)
    status = run.wait_for_completion(show_output=False, raise_on_error=False, timeout_seconds=120)
    assert status == "Completed", [(s.name, s.get_details()["events"]) for s in run.get_steps()]
    retried = [s for s in run.get_steps() if s._row()["attempt"] > 1]
    assert retried, "a step that was on the dead node must have run again"
    for s in retried:
        reasons = [e["reason"] or "" for e in workspace._backend.get_events(s.id)]
        assert any(r.startswith("retrying (attempt 1 was lost with its Ray worker or node") for r in reasons)
        last = s._row()["attempt"]
        assert s.get_properties()[f"cairn.ray.node.a{last}"] != second_id  # the retry ran on the node left
        assert s.get_stdout_log().endswith("done\n")


def _raylet_pid(temp_dir: str) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "raylet" in cmdline.split(" ")[0] and temp_dir in cmdline:
                return int(entry.name)
    raise AssertionError(f"no raylet found for {temp_dir}")


def test_a_node_that_cannot_reach_the_embedded_workspace_fails_the_step_saying_why(workspace: Workspace,
                                                                                   tmp_path: Path) -> None:
    """A Ray node on another machine has no such folder; without the workspace's relay (see
    test_ray_elsewhere.py for steps through it) the task returns the reason instead of failing
    somewhere inside the store (the driver records it)."""
    from types import SimpleNamespace

    from cairn.engine.ray_task import workspace_unreachable

    assert workspace_unreachable(SimpleNamespace(workspace=workspace.location)) is None  # type: ignore[arg-type]
    reason = workspace_unreachable(SimpleNamespace(workspace=str(tmp_path / "elsewhere")))  # type: ignore[arg-type]
    assert reason and "cannot see the workspace" in reason and "relay was not started" in reason
