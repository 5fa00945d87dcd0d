"""The Ray task's own reporter and its driver agree on a canceled step's ending: Ray's force cancel
kills the worker's children as the worker exits, so the task may see its step's process die and
return (or report) a failure that is the cancel's doing. No Ray cluster is needed for these."""

from __future__ import annotations

from pathlib import Path

from cairn.compute.ray import _after_cancel
from cairn.core.status import Status
from cairn.engine.ray_task import TaskReporter
from cairn.runner.execute import StepControl
from cairn.runner.job import StepResult
from cairn.store import queries as q
from cairn.store.db import Store


def _running_step(tmp_path: Path) -> Store:
    store = Store.for_sqlite_file(tmp_path / "cairn.db")
    store.migrate()
    q.insert_pipeline_run(store, run_id="run_x", experiment="e", name="p", spec_json="{}",
                          steps=[("step_x", "only")], tags={}, properties={}, step_properties={},
                          regenerate_outputs=False, continue_on_step_failure=False)
    assert q.update_status(store, "run_x", Status.RUNNING)
    assert q.update_status(store, "step_x", Status.RUNNING)
    return store


def _reporter(store: Store) -> TaskReporter:
    return TaskReporter(store, on_change=lambda _sid: None, locate=lambda _name: None)


def test_a_task_does_not_record_a_failure_once_its_run_is_being_canceled(tmp_path: Path) -> None:
    store = _running_step(tmp_path)
    q.request_cancel(store, "run_x")
    _reporter(store).ended("step_x", Status.FAILED, "exit code -9", -9)
    assert q.get_run(store, "step_x")["status"] == "Running"  # left to the driver, which says Canceled


def test_a_task_records_its_failure_when_nobody_canceled_it(tmp_path: Path) -> None:
    store = _running_step(tmp_path)
    _reporter(store).ended("step_x", Status.FAILED, "exit code 1", 1)
    row = q.get_run(store, "step_x")
    assert (row["status"], row["status_reason"]) == ("Failed", "exit code 1")


def test_a_task_does_not_record_a_failure_over_a_step_handed_back_to_the_queue(tmp_path: Path) -> None:
    store = _running_step(tmp_path)
    assert q.update_status(store, "step_x", Status.QUEUED, "the agent stopped")
    _reporter(store).ended("step_x", Status.FAILED, "exit code -9", -9)
    assert q.get_run(store, "step_x")["status"] == "Queued"


def test_the_driver_says_canceled_for_a_task_that_failed_after_the_cancel() -> None:
    control = StepControl()
    killed = StepResult("step_x", "Failed", "exit code -9", -9)
    assert _after_cancel(killed, control) == killed  # not canceled: a failure is a failure
    control.cancel("pipeline run canceled")
    assert _after_cancel(killed, control) == StepResult("step_x", "Canceled", "pipeline run canceled", -9)
    succeeded = StepResult("step_x", "Succeeded", None, 0)
    assert _after_cancel(succeeded, control) == succeeded  # it had finished: its outputs count


def test_the_driver_hands_back_a_task_killed_by_an_agent_stop() -> None:
    control = StepControl()
    control.cancel("the agent stopped", requeue=True)
    assert _after_cancel(StepResult("step_x", "Failed", "exit code -9", -9), control).status == "Queued"


def test_a_task_does_not_record_a_failure_once_its_node_is_dying(tmp_path: Path) -> None:
    """A worker whose raylet died kills its step's process before it exits: that is the node's loss,
    which the driver retries, and must not be recorded first as the step's failure."""
    store = _running_step(tmp_path)
    reporter = TaskReporter(store, on_change=lambda _sid: None, locate=lambda _name: None, node_dying=lambda: True)
    reporter.ended("step_x", Status.FAILED, "killed by signal 9", -9)
    assert q.get_run(store, "step_x")["status"] == "Running"
    # and the driver's retry is taken: the step goes back to the queue, not kept as failed
    assert q.update_status(store, "step_x", Status.QUEUED, "retrying (attempt 1 was lost with its Ray worker or node)")


def test_the_raylet_watch_sees_the_worker_s_parent_die() -> None:
    """Ray starts its workers from the raylet: the watch says the node is dying once that parent is
    gone (here a parent process that exits while its child watches)."""
    import os

    from cairn.engine.ray_task import raylet_watch

    result_read, result_write = os.pipe()
    reaped_read, reaped_write = os.pipe()
    raylet = os.fork()
    if raylet == 0:
        ready_read, ready_write = os.pipe()
        if os.fork() == 0:  # the "worker"
            watch = raylet_watch()
            before = watch()
            os.write(ready_write, b"!")
            os.read(reaped_read, 1)  # once the "raylet" has exited and been reaped
            os.write(result_write, f"{before} {watch()}".encode())
            os._exit(0)
        os.read(ready_read, 1)
        os._exit(0)
    os.close(result_write)
    os.waitpid(raylet, 0)
    os.write(reaped_write, b"!")
    said = b""
    while chunk := os.read(result_read, 100):
        said += chunk
    for fd in (result_read, reaped_read, reaped_write):
        os.close(fd)
    assert said.decode().split() == ["False", "True"]
