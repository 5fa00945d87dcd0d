"""The ``ray`` target: each step runs as a Ray task on an existing Ray cluster — the very same
``execute_step`` as on local compute, inside the task (no second execution path).

On a node of this machine the task reports to the workspace's store itself and tells the agent
over its socket that something changed. On a node of another machine it goes through the workspace's
relay, an actor the engine starts on the agent's own node (``relay_factory``; see
``engine/ray_relay.py``): status, logs, outputs on local datastores, snapshot and input files, and
the script's ``Run.get_context()``. A task lost with its worker or node is handed back to the
scheduler, which runs the step again as a new attempt (``retries`` times, default once), then fails
it with the reason.

Security: Ray's own job and task APIs have no authentication (CVE-2023-48022, "ShadowRay") and Ray
may listen on every interface. A Ray cluster must sit on a trusted network. Cairn never opens the
Ray dashboard or job API; it only connects as a driver to the address it was given.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from cairn.compute.base import DoneCallback
from cairn.runner.execute import KILL_GRACE_SECONDS, StepControl, StepReporter
from cairn.runner.job import StepJob, StepResult

DEFAULT_RETRIES = 1
RESERVE_TIMEOUT = 120.0  # how long a step with node_count > 1 waits for its nodes
_FIELD = {"CPU": "cpus", "GPU": "gpus", "memory": "memory_gb"}


HEAD_CHECK_SECONDS = 10.0  # how often a step waiting for its task asks whether the head still answers


class RayCompute:
    def __init__(self, name: str, address: str, retries: int = DEFAULT_RETRIES,
                 task_body: Callable[..., dict[str, Any]] | None = None,
                 relay_factory: Callable[[], Any] | None = None, **config: Any) -> None:
        """``task_body(job, relay)`` is what each Ray task runs (the engine gives its own: the runner
        reporting to the workspace); ``relay_factory()`` starts, once per connection, the actor that
        tasks on other machines reach the workspace through (it has ``kill_step(step_run_id)``);
        the cluster record's other keys are kept in ``config``."""
        self.name = name
        self._task_body = task_body
        self._relay_factory = relay_factory
        self._relay: Any = None
        self._relay_job: Any = None
        self.address = address
        self.retries = int(retries)
        self.config = config
        self._lock = threading.Lock()
        self._running: dict[str, float] = {}  # step run -> CPUs it holds
        self._lost: dict[str, int] = {}  # step run -> attempts lost with a worker or node
        self._remote: Any = None
        self._capacity = 0.0
        self._nodes: list[dict[str, float]] = []  # the alive nodes' resources, asked at most every 5 s
        self._nodes_at = -1e9
        self._connect_lock = threading.Lock()

    # -- the cluster -------------------------------------------------------------------------
    # Nothing here runs on the agent's loop thread: a cluster that is gone or slow must never stall
    # the agent (its other runs, local ones included, go on).

    def _connect(self) -> Any:
        import ray

        from cairn.compute.ray_cluster import connect, probe

        with self._connect_lock:  # one connection attempt at a time; the first failure is quick
            probe(self.address)
            connect(self.address, switch=False)
            if self._remote is None:
                if self._task_body is None:
                    raise RuntimeError("RayCompute was made without a task body (the agent gives it one)")
                self._remote = ray.remote(self._task_body)
            self._capacity = float(ray.cluster_resources().get("CPU", 0))
            job_id = ray.get_runtime_context().get_job_id()
            if self._relay_factory is not None and self._relay_job != job_id:  # a new connection: a new relay
                self._relay_job = job_id
                try:
                    self._relay = self._relay_factory()
                except Exception:  # steps on this machine's nodes need none; others fail, saying so
                    self._relay = None
        return ray

    def free_slots(self) -> int:
        """From what is known (no call to the cluster): before the first connection, one step."""
        with self._lock:
            used = sum(self._running.values())
            running = len(self._running)
        if self._capacity <= 0:
            return 0 if running else 1
        return max(0, int(self._capacity - used)) if running else max(1, int(self._capacity - used))

    # -- steps -------------------------------------------------------------------------------

    def submit(self, job: StepJob, reporter: StepReporter, control: StepControl, done: DoneCallback) -> None:
        spec = job.spec
        cpus = float(spec.cpus) if spec.cpus else 1.0
        with self._lock:
            self._running[job.step_run_id] = cpus
        threading.Thread(target=self._dispatch, args=(job, cpus, reporter, control, done),
                         name=f"ray-{job.step_run_id}", daemon=True).start()

    def _fail(self, job: StepJob, reason: str, reporter: StepReporter, done: DoneCallback) -> None:
        with self._lock:
            self._running.pop(job.step_run_id, None)
        reporter.ended(job.step_run_id, _status("Failed"), reason, None)
        done(StepResult(job.step_run_id, "Failed", reason, None))

    def _dispatch(self, job: StepJob, cpus: float, reporter: StepReporter, control: StepControl,
                  done: DoneCallback) -> None:
        told: list[StepResult] = []

        def done_once(result: StepResult) -> None:
            if not told:
                told.append(result)
                done(result)

        try:
            self._submit(job, cpus, reporter, control, done_once)
        except Exception as exc:  # whatever Ray raised on the way, the step ends and the run goes on
            if not told:
                self._fail(job, f"could not run the step on Ray cluster {self.address!r} (target {self.name!r}): "
                                f"{type(exc).__name__}: {exc}", reporter, done_once)

    def _submit(self, job: StepJob, cpus: float, reporter: StepReporter, control: StepControl,
                done: DoneCallback) -> None:
        spec = job.spec
        options: dict[str, Any] = {"num_cpus": cpus, "max_retries": 0, "retry_exceptions": False,
                                   "scheduling_strategy": "SPREAD", "name": f"cairn:{spec.name}"}
        if spec.gpus:
            options["num_gpus"] = float(spec.gpus)
        if spec.memory_gb:
            options["memory"] = int(spec.memory_gb * 1024 ** 3)
        try:
            ray = self._connect()
            too_big = self._infeasible(ray, cpus, float(spec.gpus or 0), float(spec.memory_gb or 0))
        except Exception as exc:  # no cluster there, or another one already driven: the step fails, saying so
            self._fail(job, f"could not submit to Ray cluster {self.address!r} (target {self.name!r}): {exc}",
                       reporter, done)
            return
        if not too_big and spec.node_count > 1:
            too_big = self._too_few_nodes(ray, spec.node_count, cpus, float(spec.gpus or 0))
        if too_big:
            self._fail(job, too_big, reporter, done)
            return
        if control.canceled:
            status = "Queued" if control.requeue else "Canceled"
            with self._lock:
                self._running.pop(job.step_run_id, None)
            if status == "Canceled":
                reporter.ended(job.step_run_id, _status(status), control.cancel_reason, None)
            done(StepResult(job.step_run_id, status, None if control.requeue else control.cancel_reason, None))
            return
        if spec.node_count > 1:
            self._run_on_nodes(job, options, reporter, control, done)
            return
        ref = self._remote.options(**options).remote(job, self._expect(job))
        control.on_cancel(lambda requeue: self._cancel(ref, job, requeue))
        self._wait(job, ref, reporter, control, done)

    def _run_on_nodes(self, job: StepJob, options: dict[str, Any], reporter: StepReporter, control: StepControl,
                      done: DoneCallback) -> None:
        """node_count > 1: reserve that many nodes (one bundle each, on distinct nodes), run the step
        on the first, and tell it the reservation (CAIRN_NODE_COUNT, CAIRN_NODES, CAIRN_RAY_ADDRESS,
        CAIRN_PLACEMENT_GROUP) so that it can start its own Ray work on the others."""
        import dataclasses

        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = job.spec
        bundle = {"CPU": options["num_cpus"], **({"GPU": options["num_gpus"]} if "num_gpus" in options else {})}
        group = placement_group([dict(bundle) for _ in range(spec.node_count)], strategy="STRICT_SPREAD")
        try:
            if not group.wait(timeout_seconds=RESERVE_TIMEOUT):
                reason = (f"could not reserve {spec.node_count} nodes with {bundle} each on Ray cluster "
                          f"{self.address!r} within {RESERVE_TIMEOUT:g} s (it has {len(self._nodes)} alive node(s))")
                reporter.ended(job.step_run_id, _status("Failed"), reason, None)
                with self._lock:
                    self._running.pop(job.step_run_id, None)
                done(StepResult(job.step_run_id, "Failed", reason, None))
                return
            table = placement_group_table(group)
            nodes = [table["bundles_to_node_id"][i] for i in range(spec.node_count)]
            extra = {"CAIRN_NODE_COUNT": str(spec.node_count), "CAIRN_NODES": json.dumps(nodes),
                     "CAIRN_RAY_ADDRESS": self.address, "CAIRN_PLACEMENT_GROUP": group.id.hex()}
            variables = [*[list(p) for p in job.step.get("environment_variables", [])], *map(list, extra.items())]
            job = dataclasses.replace(job, step={**job.step, "environment_variables": variables})
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
            ref = self._remote.options(**{**options, "scheduling_strategy": strategy}).remote(job, self._expect(job))
            control.on_cancel(lambda requeue: self._cancel(ref, job, requeue))
            self._wait(job, ref, reporter, control, done)
        finally:
            remove_placement_group(group)

    def _expect(self, job: StepJob) -> Any:
        """The relay, told of ``job`` (the only attempt its task may act for); None without one."""
        import ray

        if self._relay is None:
            return None
        try:
            ray.get(self._relay.expect.remote(job), timeout=30)
        except Exception:  # no relay: a task on another machine fails, saying so; others run as ever
            return None
        return self._relay

    def _cancel(self, ref: Any, job: StepJob, requeue: bool) -> None:
        """A canceled step is asked to end first (SIGTERM to its process group: it may save a
        checkpoint), as on local compute; its task's worker is stopped if it has not ended after
        KILL_GRACE_SECONDS. An agent that stops (``requeue``) stops it at once: it runs again anyway."""
        if requeue or self._relay is None:
            self._stop_task(ref, job)
            return
        threading.Thread(target=self._cancel_gracefully, args=(ref, job), daemon=True,
                         name=f"ray-cancel-{job.step_run_id}").start()  # never on the agent's loop thread

    def _cancel_gracefully(self, ref: Any, job: StepJob) -> None:
        import ray

        try:
            asked = ray.get(self._relay.ask_step_to_end.remote(job.step_run_id), timeout=30)
        except Exception:  # no relay any more, or the node is gone
            asked = False
        if asked:
            try:
                ready, _ = ray.wait([ref], timeout=KILL_GRACE_SECONDS)
            except Exception:
                ready = []
            if ready:  # it ended within the grace: what it left in its session on another machine goes
                self._kill_remote(job)
                return
        self._stop_task(ref, job)

    def _stop_task(self, ref: Any, job: StepJob) -> None:
        """Stop the task's worker; a step on another machine also has its process group killed there
        (on this machine the agent does it)."""
        import ray

        self._kill_remote(job)
        ray.cancel(ref, force=True)

    def _kill_remote(self, job: StepJob) -> None:
        if self._relay is not None:
            try:
                self._relay.kill_step.remote(job.step_run_id)
            except Exception:  # no relay any more: no step of another machine either
                pass

    def _infeasible(self, ray: Any, cpus: float, gpus: float, memory_gb: float) -> str | None:
        """Why no node of the cluster can ever run a step asking this much (Ray would queue it
        forever), or None."""
        if time.monotonic() - self._nodes_at > 5 or self._first_problem(self._nodes, cpus, gpus, memory_gb):
            self._refresh_nodes(ray)  # asked again before failing
        return self._first_problem(self._nodes, cpus, gpus, memory_gb)

    def _refresh_nodes(self, ray: Any) -> None:
        self._nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self._nodes_at = time.monotonic()

    def _too_few_nodes(self, ray: Any, node_count: int, cpus: float, gpus: float) -> str | None:
        """Why the cluster cannot give a node_count > 1 step that many distinct nodes (their
        reservation would wait RESERVE_TIMEOUT for nothing), or None. Nodes busy with other work are
        waited for."""
        def fitting() -> int:
            return sum(1 for n in self._nodes if n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus)

        if fitting() < node_count:  # asked again before failing: a node may have joined
            self._refresh_nodes(ray)
        if fitting() >= node_count:
            return None
        each = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
        return (f"the step asks for node_count={node_count} distinct nodes with {each} each, and Ray cluster "
                f"{self.address!r} (target {self.name!r}) has {fitting()} such alive node(s); lower "
                f"runconfig.node_count or add nodes (`ray start --address=...`)")

    def _first_problem(self, nodes: list[dict[str, float]], cpus: float, gpus: float, memory_gb: float) -> str | None:
        if not nodes:
            return f"Ray cluster {self.address!r} (target {self.name!r}) has no alive node"
        for want, key, unit, scale in ((cpus, "CPU", "CPUs", 1), (gpus, "GPU", "GPUs", 1),
                                       (memory_gb, "memory", "GB of memory", 1024 ** 3)):
            largest = max(n.get(key, 0) for n in nodes) / scale
            if want > largest:
                return (f"the step asks for {want:g} {unit} and the largest node of Ray cluster {self.address!r} "
                        f"(target {self.name!r}) has {largest:g}; lower runconfig.{_FIELD[key]} or add a bigger node")
        return None

    def _wait(self, job: StepJob, ref: Any, reporter: StepReporter, control: StepControl,
              done: DoneCallback) -> None:
        import ray
        from ray import exceptions as rx

        try:
            out = self._get(ray, ref)
            result = StepResult(out["step_run_id"], out["status"], out["reason"], out["exit_code"])
        except rx.TaskCancelledError:  # the worker is gone; the agent kills what the step left on this machine
            status = "Queued" if control.requeue else "Canceled"
            result = StepResult(job.step_run_id, status, None if control.requeue else control.cancel_reason, None)
        except (rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError, rx.RaySystemError,
                rx.ObjectLostError, rx.OwnerDiedError) as exc:
            result = self._lost_attempt(job, reporter, control, exc)
        except rx.RayTaskError as exc:  # the runner itself raised (it reports a step's own failure)
            reason = f"the Ray task failed: {str(exc).strip().splitlines()[-1][:300]}"
            result = StepResult(job.step_run_id, "Failed", reason, None)
        except Exception as exc:
            result = self._lost_attempt(job, reporter, control, exc)
        finally:
            with self._lock:
                self._running.pop(job.step_run_id, None)
            if self._relay is not None:
                try:
                    self._relay.done.remote(job.step_run_id, job.attempt)
                except Exception:
                    pass
        result = _after_cancel(result, control)
        if result.status in ("Failed", "Canceled"):
            # recorded here, once: the task's own report may still be on its way (or never come), and
            # the step must have ended before its run does
            reporter.ended(job.step_run_id, _status(result.status), result.reason or result.status.lower(),
                           result.exit_code)
        done(result)

    def _get(self, ray: Any, ref: Any) -> Any:
        """The task's result. Its head is asked after every HEAD_CHECK_SECONDS without one: this
        process does not exit when the head dies (``connect``), and Ray would wait for it forever."""
        from ray import exceptions as rx

        from cairn.compute.ray_cluster import probe

        while True:
            try:
                return ray.get(ref, timeout=HEAD_CHECK_SECONDS)
            except rx.GetTimeoutError:
                try:
                    probe(self.address, timeout=3.0)
                except ConnectionError as exc:
                    raise ConnectionError(f"the Ray head stopped answering ({exc})") from None

    def _lost_attempt(self, job: StepJob, reporter: StepReporter, control: StepControl,
                      exc: Exception) -> StepResult:
        what = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        if control.canceled:
            status = "Queued" if control.requeue else "Canceled"
            return StepResult(job.step_run_id, status, None if control.requeue else control.cancel_reason, None)
        self._kill_remote(job)  # its worker died, but the node may live on: so may the step's process
        lost = self._lost[job.step_run_id] = self._lost.get(job.step_run_id, 0) + 1
        if lost <= self.retries:
            return StepResult(job.step_run_id, "Queued",
                              f"retrying (attempt {job.attempt} was lost with its Ray worker or node: {what})", None)
        reason = (f"the Ray worker or node running the step died ({what}); it was retried {self.retries} "
                  f"time(s)")
        return StepResult(job.step_run_id, "Failed", reason, None)

    def shutdown(self) -> None:
        pass  # the cluster is not ours to stop; its tasks end with their steps


def _after_cancel(result: StepResult, control: StepControl) -> StepResult:
    """A step whose task failed after the agent canceled it was canceled (or handed back to the
    queue), not failed: the cancel ended its process (SIGTERM, or Ray's force cancel, which kills a
    worker's children as the worker exits), and the task may have returned that exit first."""
    if not control.canceled or result.status != "Failed":
        return result
    if control.requeue:
        return StepResult(result.step_run_id, "Queued", None, result.exit_code)
    return StepResult(result.step_run_id, "Canceled", control.cancel_reason, result.exit_code)


def _status(value: str) -> Any:
    from cairn.core.status import Status

    return Status(value)
