"""The body of a Ray task (``compute/ray.py`` runs it on a worker): the shared runner, reporting to
the workspace's store and poking the agent's socket so that its watchers hear of each change."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from cairn.runner.job import StepJob


def run_step_task(job: StepJob, relay: Any = None) -> dict[str, Any]:
    """The body of the Ray task, on a Ray worker: run the step with the shared runner. On a node that
    cannot see the workspace (another machine), through the workspace's ``relay``."""
    import ray

    from cairn.engine.client import changed
    from cairn.engine.context import EngineContext
    from cairn.runner.execute import StepControl, execute_step, upload_logs
    from cairn.storage.layout import WorkspaceLayout
    from cairn.store import queries as q

    node_dying = raylet_watch()
    layout = WorkspaceLayout(job.workspace)
    context = ray.get_runtime_context()
    node = context.get_node_id()
    where = {"cairn.ray.node": node, f"cairn.ray.node.a{job.attempt}": node,
             "cairn.ray.resources": json.dumps(context.get_assigned_resources(), sort_keys=True)}
    unreachable = workspace_unreachable(job)
    if unreachable and relay is not None:  # another machine: through the workspace's relay
        from cairn.engine.remote_step import run_remote

        return run_remote(job, relay, node, {**where, "cairn.ray.relayed": "true"}, node_dying)
    if unreachable:  # told to the driver, which records it: this node cannot write to the store
        return {"step_run_id": job.step_run_id, "status": "Failed", "reason": unreachable, "exit_code": None}
    ctx = EngineContext.open(layout)
    reporter = TaskReporter(ctx.store, on_change=lambda _sid: changed(layout, job.pipeline_run_id),
                            locate=ctx.datastore_location, node_dying=node_dying)
    q.add_properties(ctx.store, job.step_run_id, where)
    # a cancel asks the step's process group to end (SIGTERM), then kills this worker (ray.cancel with
    # force) if it has not; the agent kills what the step left
    control = StepControl(ended_elsewhere=lambda: stopped_by_agent(ctx.store, job.step_run_id))
    result = execute_step(job, reporter, control)
    upload_logs(job, result)
    return {"step_run_id": result.step_run_id, "status": result.status, "reason": result.reason,
            "exit_code": result.exit_code}


def raylet_watch() -> Callable[[], bool]:
    """Whether this worker's raylet has died since now. Ray starts its workers from the raylet, so the
    worker's parent changes the moment it dies. A worker whose raylet died kills its children before it
    exits (kill_child_processes_on_worker_exit): the step's process dying then is the node's loss,
    which the driver retries, not the step's failure, and the task must not record it as one."""
    raylet = os.getppid()
    return lambda: os.getppid() != raylet


def workspace_unreachable(job: StepJob) -> str | None:
    """Why this Ray node cannot run the step of an embedded workspace (its SQLite store and local
    folders are on the agent's machine), or None when it can."""
    import socket

    from cairn.storage.layout import WorkspaceLayout

    if WorkspaceLayout(job.workspace).db.is_file():
        return None
    return (f"the step was placed on Ray node {socket.gethostname()!r}, which cannot see the workspace "
            f"{job.workspace!r} (its store and folders are on the agent's machine), and the workspace's relay "
            f"was not started: the agent must run on a node of the Ray cluster (start one there with "
            f"`ray start --address=HEAD:PORT`) for steps to run on nodes of other machines")


def stopped_by_agent(store: Any, step_run_id: str) -> bool:
    """Whether the step's agent has taken its ending on itself: it handed the step back to the queue
    (an agent stop), or the step's pipeline run is being canceled. Either ends the task's process
    (SIGTERM first for a cancel; Ray's force cancel kills a worker's children as it exits), and that
    ending is not the step's failure nor its success: the driver records what happened."""
    from cairn.store import queries as q

    row = q.get_run(store, step_run_id)
    if row is None:
        return False
    if row["status"] == "Queued":
        return True
    parent = q.get_run(store, row["parent_id"]) if row.get("parent_id") else None
    return bool(parent and parent["cancel_requested"])


class TaskReporter:
    """The store reporter of a Ray task, which never writes an ending over a step that its agent
    has handed back to the queue or whose run is being canceled, nor once the task's node is dying
    (``node_dying()``): each kills the task's step, which is not its failure; the driver records the
    step's ending."""

    def __init__(self, store: Any, on_change: Any, locate: Any,
                 node_dying: Callable[[], bool] = lambda: False) -> None:
        from cairn.engine.reporter import StoreReporter

        self._store = store
        self._node_dying = node_dying
        self._inner = StoreReporter(store, on_change=on_change, locate=locate)

    def started(self, step_run_id: str, status: Any, **fields: Any) -> bool:
        return self._inner.started(step_run_id, status, **fields)

    def succeeded(self, job: StepJob, outputs: list[dict[str, Any]], exit_code: int) -> bool:
        # a step asked to end by a cancel may still exit 0 (it saved a checkpoint): canceled, as on
        # local compute
        if stopped_by_agent(self._store, job.step_run_id):
            return False
        return self._inner.succeeded(job, outputs, exit_code)

    def ended(self, step_run_id: str, status: Any, reason: str, exit_code: int | None) -> None:
        if not self._node_dying() and not stopped_by_agent(self._store, step_run_id):
            self._inner.ended(step_run_id, status, reason, exit_code)

    def register_output(self, job: StepJob, output: dict[str, Any], registration: dict[str, Any]) -> str:
        return self._inner.register_output(job, output, registration)
