"""The local agent: one per workspace. Claims queued runs with a lease, schedules their steps on
compute targets, resumes runs whose agent died, and tells watchers what changed.

It sleeps only in ``queue.get``: woken by a poke (new run, cancel), a step that ended, or the
lease-renewal / idle deadline. It never polls for work.
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cairn.compute.base import Compute, make_compute
from cairn.core.spec import GraphSpec, StepSpec
from cairn.core.status import Status
from cairn.engine.agent_socket import AgentSocket, signal_ready
from cairn.engine.context import EngineContext
from cairn.engine.late_digests import DigestPending, LateDigests, OutputChanged
from cairn.engine.reporter import StoreReporter
from cairn.engine.scheduler import PipelineScheduler, RecordedRun
from cairn.runner.execute import StepControl
from cairn.runner.job import StepJob, StepResult
from cairn.runner.processes import kill_step_processes, this_process
from cairn.runner.spares import prune_kept_code
from cairn.storage.layout import WorkspaceLayout
from cairn.store import queries as q

LEASE_TTL = 30.0
# How long a stopping agent lets its digests in flight end (engine/late_digests.py), within the
# 30 s `cairn agent --stop` waits: the rest stay pending, made by the next agent or run needing them
STOP_DIGEST_WAIT = 20.0


def _prune_leftovers(kept_code: Any, work: Any) -> None:
    """What earlier agents left: compiled scripts not used for a week, fork-server folders in /tmp,
    completed steps' working folders kept for reuse."""
    from cairn.runner.warm import prune_stale_folders
    from cairn.runner.work_folders import remove_leftovers

    prune_kept_code(kept_code)
    prune_stale_folders()
    remove_leftovers(work)


def agent_owner_id() -> str:
    return ":".join(str(part) for part in this_process())


class Agent:
    def __init__(self, layout: WorkspaceLayout, idle_timeout: float | None = 300.0,
                 max_concurrency: int | None = None, front: AgentSocket | None = None,
                 script_service: Callable[[str], Any] | None = None,
                 serve_scripts: Callable[[str, Callable[[str], None], Any], Callable[[], None]] | None = None) -> None:
        """``script_service(workspace)`` answers the ``Run.get_context()`` calls of steps on Ray nodes of
        other machines; ``serve_scripts(workspace, on_recorded, store)`` starts answering those of the steps
        that run on this machine (and its clients' submits), with the agent's store, and returns what
        stops it (the entry points give ``backend.relay.ScriptService`` and
        ``backend.through_agent.serve_scripts``: the engine sits below the backend)."""
        self.layout = layout
        self.script_service = script_service
        self.serve_scripts = serve_scripts
        self.front = front or AgentSocket(layout)
        self._serving = front is not None  # a booted front door already holds the lock and listens
        self.idle_timeout = idle_timeout
        self.max_concurrency = max_concurrency
        self.owner = agent_owner_id()
        self.events = self.front.events
        self.schedulers: dict[str, PipelineScheduler] = {}
        self.controls: dict[str, StepControl] = {}  # step run id -> control
        self.step_parent: dict[str, str] = {}  # step run id -> pipeline run id
        self._reused_in_pass: set[str] = set()  # runs with steps reused in this dispatch pass
        self.computes: dict[str, Compute] = {}
        self._stopping = False
        self._compute_configs: dict[str, dict[str, Any]] = {}  # the record each compute was made from
        self._queue_may_have_work = True  # set by pokes and timers: claiming costs a write transaction
        self._first_claim = True
        self._stop_scripts: Callable[[], None] | None = None
        # runs recorded through its scripts socket, not claimed yet (their spec: not read back at the claim)
        self._recorded: dict[str, RecordedRun] = {}
        self._advance_needed = True  # set by events that may let steps start or runs end
        self.late: LateDigests | None = None  # digests of outputs committed before them (made in serve)

    # -- life cycle ------------------------------------------------------------------------

    def serve(self) -> int:
        if not self._serving:
            if not self.front.acquire():
                signal_ready(b"other\n")
                self._log("another agent already serves this workspace")
                return 1
            self.front.open()
            signal_ready(b"ready\n")
        self.ctx = EngineContext.open(self.layout)
        self.late = LateDigests(self.ctx.store, on_change=self._step_changed,
                                on_made=lambda step_run_id: self.events.put(("made", step_run_id)))
        self.reporter = StoreReporter(self.ctx.store, on_change=self._step_changed,
                                      locate=self.ctx.datastore_location,
                                      on_placed=lambda *placed: self.events.put(("placed", *placed)),
                                      late=self.late, may_digest_late=self._may_digest_late)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        self._log(f"agent {self.owner} serving {self.layout.root}")
        self._prepare_local_targets(None)  # warm-start servers start with the agent, not with a first step
        threading.Thread(target=_prune_leftovers, args=(self.layout.kept_code, self.layout.work), name="cairn-prune",
                         daemon=True).start()
        self._stop_scripts = self._serve_scripts()
        try:
            self._loop()
        except Exception:
            if self._still_here():
                raise
            # moved or removed under it: its store (opened never to make a new one) or folders fail
            self._log(f"the workspace is no longer at {self.layout.root} (moved or removed while it ran): "
                      f"stopping; its running steps are stopped (a moved workspace's runs go on once an agent "
                      f"serves it where it is now)")
            for control in self.controls.values():
                control.cancel("the workspace was moved or removed while the step ran", requeue=True)
        finally:
            self._stop_serving_scripts()
            for compute in self.computes.values():
                try:
                    compute.shutdown()  # e.g. warm-start servers
                except Exception as exc:
                    self._log(f"could not shut down compute target {compute.name!r}: {exc}")
            self._let_digests_end()
            self.front.close()
            self._hand_on_recorded()
            self._log("agent stopped")
        return 0

    def _let_digests_end(self) -> None:
        """The digests of outputs committed before them, in flight, end before the agent does, for
        up to STOP_DIGEST_WAIT s (they would stay pending, made by whoever needs them next)."""
        if self.late.join(timeout=0):
            return
        self._log(f"waiting up to {STOP_DIGEST_WAIT:g} s for the digests of outputs committed before them")
        if not self.late.join(timeout=STOP_DIGEST_WAIT):
            self._log("stopping with digests still being made: those outputs stay 'digest pending' until the next "
                      "agent, or the next run that needs them, makes them (a step that read one and was not keyed "
                      "yet runs again once, instead of being reused)")

    def _serve_scripts(self) -> Callable[[], None] | None:
        """Answer the ``Run.get_context()`` calls of the steps run here: a script then needs no store
        of its own (best effort: without it a script opens the workspace itself)."""
        if self.serve_scripts is None:
            return None
        try:
            return self.serve_scripts(str(self.layout.root), self._on_recorded, self.ctx.store)
        except OSError as exc:
            self._log(f"steps open the workspace themselves for Run.get_context(): cannot serve it ({exc})")
            return None

    def _on_recorded(self, run_id: str, spec: GraphSpec, step_ids: dict[str, str]) -> None:
        """A run recorded through the scripts socket: its client sends no poke, this agent claims it
        (with the spec it recorded: read back, a 20-step spec costs ~0.4 ms)."""
        self._recorded[run_id] = RecordedRun(spec, step_ids)
        self.events.put(("queued",))

    def _forget_recorded(self) -> None:
        """Drop what was kept of runs recorded here that are no longer queued (claimed before they
        were told as recorded, canceled, taken by another agent): nothing will claim them from here."""
        for run_id in list(self._recorded):
            row = q.get_run(self.ctx.store, run_id)
            if row is None or row["status"] != Status.QUEUED.value:
                self._recorded.pop(run_id, None)

    def _hand_on_recorded(self) -> None:
        """As it stops: runs recorded through it that it never claimed (recorded as it was asked to
        stop) go to a new agent, as the client's own poke would have started one."""
        if not self._recorded:
            return
        try:
            waiting = [r for r in list(self._recorded)
                       if (row := q.get_run(self.ctx.store, r)) is not None and row["status"] == Status.QUEUED.value]
        except Exception as exc:  # (a workspace gone from under it)
            self._log(f"could not look at the runs recorded as it stopped: {exc}")
            return
        if not waiting:
            return
        from cairn.engine import client

        try:
            client.prestart_agent(self.layout)  # it waits for this agent's lock
            self._log(f"runs recorded as it stopped ({', '.join(waiting)}): a new agent was started for them")
        except Exception as exc:
            self._log(f"runs recorded as it stopped ({', '.join(waiting)}) wait for an agent: {exc}")

    def _stop_serving_scripts(self) -> None:
        stop, self._stop_scripts = self._stop_scripts, None
        if stop is not None:
            stop()

    def _on_term(self, signum: int, _frame: Any) -> None:
        self.events.put(("stop", f"signal {signal.Signals(signum).name}"))

    def _log(self, msg: str) -> None:
        print(time.strftime("%Y-%m-%dT%H:%M:%S"), msg, file=sys.stderr, flush=True)

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        next_renewal = time.monotonic() + LEASE_TTL / 3
        idle_since = time.monotonic()
        while True:
            if self._queue_may_have_work:
                self._queue_may_have_work = False
                if self._still_here():
                    self._claim_waiting()
                else:  # moved (or removed): the runs queued there are for an agent of the new place
                    self.front.events.put(("stop", f"the workspace is no longer at {self.ctx.layout.root}"))
            now = time.monotonic()
            if self.schedulers:
                idle_since = now
            if now >= next_renewal:
                held = q.renew_leases(self.ctx.store, self.owner, LEASE_TTL)
                for run_id in list(self.schedulers):
                    if run_id not in held:  # another agent took it: stop touching it
                        self._log(f"lease on run {run_id} lost to another agent; leaving it")
                        self._abandon(run_id)
                next_renewal = now + LEASE_TTL / 3
                self._forget_recorded()
                self._queue_may_have_work = True  # leases of other hosts' agents may have expired
                self._advance_needed = True  # and now and then regardless (a cluster that grew)
            if self._advance_needed:  # not after a mere status change: nothing more may start then
                self._advance_needed = False
                self._advance_all()
            deadline = next_renewal
            if not self.schedulers and self.idle_timeout is not None and not self.front.has_watchers():
                if now - idle_since >= self.idle_timeout:
                    if self._shutdown_if_idle():
                        return
                    idle_since = time.monotonic()
                    continue
                deadline = min(deadline, idle_since + self.idle_timeout)
            if self._queue_may_have_work or self._advance_needed:  # a run just claimed, steps just released
                deadline = now
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                continue
            if not self._handle(event):
                return
            while True:  # drain what else arrived, then schedule once
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    break
                if not self._handle(event):
                    return

    def _handle(self, event: tuple[Any, ...]) -> bool:
        kind = event[0]
        if kind not in ("changed", "sync"):  # an ending, a poke (claim, cancel), a stop: steps may start or end
            self._advance_needed = True
        elif kind == "changed" and event[1] in self.schedulers and self.schedulers[event[1]].has_ready():
            self._advance_needed = True  # a Ray target may have learnt its cluster's size meanwhile
        if kind == "stop":
            self._log(f"stopping: {event[1] if len(event) > 1 else 'asked to'}")
            self._stop_all()
            return False
        if kind == "done":
            result: StepResult = event[1]
            if self.controls.get(result.step_run_id) is not event[2]:
                # an attempt abandoned with its run (lease lost), whose step this agent runs again since
                self._log(f"ignored the end of an abandoned attempt of step run {result.step_run_id}")
                return True
            run_id = self.step_parent.pop(result.step_run_id, None)
            self.controls.pop(result.step_run_id, None)
            sched = self.schedulers.get(run_id or "")
            if sched is not None:
                if result.outputs is not None and result.status == Status.COMPLETED.value:
                    sched.committed(result.step_run_id, {o["name"]: q.output_row(result.step_run_id, o)
                                                         for o in result.outputs})
                name = sched.name_of(result.step_run_id)
                lost = result.status == Status.QUEUED.value and result.reason and not self._stopping
                status = Status(result.status)
                if lost or result.status == Status.CANCELED.value:
                    # a step that ran elsewhere (a Ray task) may have left its process group here
                    row = q.get_run(self.ctx.store, result.step_run_id) or {}
                    kill_step_processes(row.get("pid"), row.get("pid_started"), result.step_run_id)
                    if status == Status.CANCELED and row.get("status") in (Status.FAILED.value, Status.COMPLETED.value):
                        status = Status(row["status"])  # it had ended before the cancel reached it: that stands
                if lost:  # the compute lost the attempt (a Ray node died): it runs again, saying why
                    if not q.update_status(self.ctx.store, result.step_run_id, Status.QUEUED, result.reason):
                        # the attempt had ended after all (its task reported before the loss): keep that
                        row = q.get_run(self.ctx.store, result.step_run_id) or {}
                        status = Status(row.get("status") or Status.FAILED.value)
                    self._notify(sched.run_id)
                control: StepControl = event[2]
                released = sched.released_by(name)  # started before its outputs were digested
                sched.finished(name, status, withdrawn=control.withdrawn and not control.canceled)
                if status == Status.FAILED and not sched.run["continue_on_step_failure"]:
                    for other, parent in self.step_parent.items():  # prepared ahead, not started: they never will
                        if parent == sched.run_id:
                            self.controls[other].withdraw()
                elif not status.is_success:  # its outputs never came: those not started yet never will
                    for consumer in released:
                        waiting = self.controls.get(sched.step_ids[consumer])
                        if waiting is not None:
                            waiting.withdraw()
        elif kind == "placed":  # a step's outputs are in place, being digested: consumers may start
            _, step_run_id, attempt, outputs = event
            sched = self.schedulers.get(self.step_parent.get(step_run_id) or "")
            if sched is not None and sched.attempts.get(sched.name_of(step_run_id)) == attempt:
                sched.outputs_placed(step_run_id, outputs)
        elif kind == "changed":
            if event[1] in self.schedulers:
                self._notify(event[1])
        elif kind == "sync":
            self.front.reply(event[1], {"ok": True, "pid": os.getpid()})
        elif kind == "poke":
            self._queue_may_have_work = True
            self._check_cancels()
        elif kind == "queued":  # a run was recorded through this agent's scripts socket
            self._queue_may_have_work = True
        # "made": a digest that steps waited for is made (late_digests): this pass prepares them again
        return True

    def _refresh_computes(self, records: list[dict[str, Any]]) -> None:
        """A target re-created with another limit applies from the next dispatch (``records``: the
        workspace's compute targets as the store has them now)."""
        targets = {c["name"]: c for c in records}
        for name, compute in list(self.computes.items()):
            record = targets.get(name)
            if record is not None and record["kind"] != "local":
                # another cluster under the same name (deleted and attached again): a new compute,
                # once the old one has no step left (its steps end where they run)
                if record["config"] != self._compute_configs.get(name) and not getattr(compute, "_running", None):
                    compute.shutdown()
                    del self.computes[name]
                continue
            if record is None:
                continue
            wanted = self.max_concurrency or record["config"].get("max_concurrency") or os.cpu_count() or 1
            if getattr(compute, "max_concurrency", wanted) != wanted:
                compute.max_concurrency = int(wanted)  # type: ignore[attr-defined]
            if hasattr(compute, "set_warm_start"):
                compute.set_warm_start(record["config"].get("warm_start_modules"))  # started by _prepare_local_targets
                compute.set_spare_interpreters(record["config"].get("spare_interpreters", True))

    def _still_here(self) -> bool:
        """Whether the workspace this agent started for is still at its path (not moved away, nor
        replaced by another); an error other than "not there" says nothing: it is."""
        try:
            known = getattr(self.front, "identity", None)
            return known is None or self.ctx.layout.identity() == known
        except FileNotFoundError:
            return False
        except OSError:
            return True

    def _claim_waiting(self) -> None:
        dead: set[str] = set()
        if self._first_claim:
            # We hold the workspace lock, so any other agent of this host on this workspace is gone,
            # and none can come while we hold it: its leases are looked for once, at the first claim.
            host = socket.gethostname()
            dead = {o for o in q.lease_owners(self.ctx.store) if o != self.owner and o.split(":")[0] == host}
        claimed = q.claim_and_start(self.ctx.store, self.owner, LEASE_TTL, dead)
        self._first_claim = False
        if claimed is None:
            return
        run_id, started = claimed
        recorded = self._recorded.pop(run_id, None)
        self.front.running(run_id)  # its watchers are told its end (also if it cannot start: below)
        # one run per turn of the loop: its first steps start before the next claim, which comes at once
        self._queue_may_have_work = True
        try:
            targets = q.list_named(self.ctx.store, "compute_targets")  # read once for both below
            if self.computes:
                self._refresh_computes(targets)
            self.schedulers[run_id] = PipelineScheduler(self.ctx, run_id, hands_over_early=self._hands_over_early,
                                                        late=self.late, recorded=recorded, started=started)
            self._advance_needed = True
            self._log(f"claimed run {run_id}")
            self._prepare_local_targets(self.schedulers[run_id], targets)
        except Exception as exc:  # a spec we cannot read must not stop the agent
            self.schedulers.pop(run_id, None)
            q.update_status(self.ctx.store, run_id, Status.FAILED, f"could not start the run: {exc}")
            self._notify(run_id, final=True)  # (watchers of its end only are told too)
            return
        self._notify(run_id)

    def _advance_all(self) -> None:
        for run_id, sched in list(self.schedulers.items()):
            progressed = True
            while progressed:  # a reused step makes its downstream ready at once: no event will come
                progressed = False
                full: set[str] = set()  # targets with no free slot: their other ready steps wait too
                for step in sched.ready_steps():
                    if not sched.may_start(step.name):  # this pass changed it (a reuse batch the store refused)
                        continue
                    if step.compute_target in full:
                        if len(full) == len(sched.targets):
                            break  # every target of the run is full: the rest wait for a slot
                        continue
                    compute = self._compute(step.compute_target)
                    if compute is None:
                        sched.dispatch_failed(step, f"compute target {step.compute_target!r} does not exist "
                                                    f"in this workspace")
                        progressed = True
                        continue
                    if compute.free_slots() <= 0:
                        full.add(step.compute_target)
                        continue
                    progressed |= self._start_step(sched, step, compute)
            # done (then nothing held is let go): the pass's reuses are recorded with the end, which
            # also ends the lease; a rerun that reuses every step writes twice, its claim and its end
            if not sched.is_done():
                self._record_reuses(sched)
                if run_id in self._reused_in_pass:  # watchers re-read the run: one word for the whole pass
                    self._reused_in_pass.discard(run_id)
                    self._notify(run_id)
                if sched.release_held():  # steps held for a failure that never came: they start now
                    self._advance_needed = True
                    continue
                if not sched.is_done():  # (a reuse that could not be recorded fails its step: that may end the run)
                    continue
            self._reused_in_pass.discard(run_id)
            self._recorded.pop(run_id, None)  # (recorded as it was claimed: told after the claim)
            final, refused = sched.finish(self.owner)
            self._log_refused(sched, refused)
            if self.reporter is not None:  # (tests' agents may report nothing)
                self.reporter.forget_handoffs(sched.step_ids.values())
            del self.schedulers[run_id]
            self._log(f"run {run_id} {final.value}")
            self._notify(run_id, final=True, status=sched.recorded_end)

    def _start_step(self, sched: PipelineScheduler, step: StepSpec, compute: Compute) -> bool:
        """Reuse or dispatch ``step``; True when it ended at once (reused, or could not start)."""
        try:
            job = sched.prepare(step)
        except DigestPending:  # being made: this step is prepared again once it is (the "made" event)
            return False
        except OutputChanged as exc:
            sched.dispatch_failed(step, str(exc))
            self._notify(sched.run_id)
            return True
        except Exception as exc:
            sched.dispatch_failed(step, f"could not prepare the step: {type(exc).__name__}: {exc}")
            self._notify(sched.run_id)
            return True
        if job is None:  # reused: told to watchers once the pass ends (a rerun reuses many steps in one)
            self._reused_in_pass.add(sched.run_id)
            return True
        self._record_reuses(sched)  # the reuses that let it start are recorded before it starts
        if not sched.may_start(step.name):  # they could not be: its upstream steps failed instead
            return True
        control = StepControl()
        self.controls[job.step_run_id] = control
        self.step_parent[job.step_run_id] = sched.run_id
        sched.started(step)
        compute.submit(job, self.reporter, control,
                       lambda result, attempt=control: self.events.put(("done", result, attempt)))
        return False

    def _may_digest_late(self, job: StepJob) -> bool:
        """Asked from a step's thread (``PipelineScheduler.digest_may_come_late``)."""
        sched = self.schedulers.get(job.pipeline_run_id)
        return sched is not None and sched.digest_may_come_late(sched.name_of(job.step_run_id), job.hand_over_early)

    def _hands_over_early(self, target: str) -> bool:
        """Whether steps of ``target`` may start with inputs not yet digested (a local target; one
        not made yet says no: no compute is made for this)."""
        return bool(getattr(self.computes.get(target), "early_handoff", False))

    def _record_reuses(self, sched: PipelineScheduler) -> None:
        self._log_refused(sched, sched.record_reuses())

    def _log_refused(self, sched: PipelineScheduler, refused: list[str]) -> None:
        for name in refused:
            self._log(f"run {sched.run_id}: step {name!r} had ended before its reuse was recorded; the "
                      f"store keeps its ending")

    def _prepare_local_targets(self, sched: PipelineScheduler | None,
                               targets: list[dict[str, Any]] | None = None) -> None:
        """Start, in the background, what local targets start ahead while steps are still being
        prepared: warm-start servers (of all targets at the agent's start, or those of ``sched``'s
        run) and spare interpreters (those of ``sched``'s run). Best effort: a target that cannot
        be made fails its own steps when they are dispatched."""
        try:
            if targets is None:
                targets = q.list_named(self.ctx.store, "compute_targets")
            local = [c for c in targets if c["kind"] == "local"]
            if sched is None:
                names = {c["name"] for c in local if c["config"].get("warm_start_modules")}
            else:
                used = {step.compute_target for step in sched.spec.steps}
                names = {c["name"] for c in local if c["name"] in used and (
                    c["config"].get("warm_start_modules") or c["config"].get("spare_interpreters", True))}
            for name in names:
                compute = self._compute(name)
                if compute is not None:
                    compute.prestart(self.layout.dot, self._log)  # type: ignore[attr-defined]
        except Exception as exc:
            self._log(f"could not prepare the local compute targets: {type(exc).__name__}: {exc}")

    def _compute(self, name: str) -> Compute | None:
        if name not in self.computes:
            targets = {c["name"]: c for c in q.list_named(self.ctx.store, "compute_targets")}
            if name not in targets:
                return None
            config = dict(targets[name]["config"])
            if self.max_concurrency and targets[name]["kind"] == "local":
                config["max_concurrency"] = self.max_concurrency
            if targets[name]["kind"] == "ray":  # what its tasks run: the engine's runner body
                from cairn.engine.ray_relay import start_relay
                from cairn.engine.ray_task import run_step_task

                config["task_body"] = run_step_task
                config["relay_factory"] = functools.partial(start_relay, str(self.layout.root), self.script_service)
            self.computes[name] = make_compute(name, targets[name]["kind"], config)
            if hasattr(self.computes[name], "early_handoff"):  # the reporter below settles its hand-offs
                self.computes[name].early_handoff = True  # type: ignore[attr-defined]
            self._compute_configs[name] = targets[name]["config"]
        return self.computes[name]

    def _check_cancels(self) -> None:
        for run_id, sched in self.schedulers.items():
            run = q.get_run(self.ctx.store, run_id)
            if run and run["cancel_requested"] and not sched.canceling:
                sched.begin_cancel()
                for step_run_id, parent in self.step_parent.items():
                    if parent == run_id:
                        self.controls[step_run_id].cancel("pipeline run canceled")

    def _abandon(self, run_id: str) -> None:
        for step_run_id, parent in list(self.step_parent.items()):
            if parent == run_id:
                self.controls[step_run_id].cancel("lease lost to another agent", requeue=True)
        self.schedulers.pop(run_id, None)
        self.front.let_go(run_id)

    def _stop_all(self) -> None:
        """Stop: kill running steps and hand the runs back to the queue for the next agent."""
        self._stopping = True
        self.front.close()
        for control in self.controls.values():
            control.cancel("the agent stopped", requeue=True)
        for run_id in list(self.schedulers):
            for step_run_id, parent in self.step_parent.items():
                if parent == run_id:
                    q.update_status(self.ctx.store, step_run_id, Status.QUEUED,
                                    "the agent stopped; the step will run again")
            q.update_status(self.ctx.store, run_id, Status.QUEUED, "the agent stopped; waiting for an agent")
            q.release_lease(self.ctx.store, run_id, self.owner)
            self._notify(run_id)

    def _shutdown_if_idle(self) -> bool:
        self.front.close()
        self._stop_serving_scripts()  # it answers what it has read (a run being recorded) first
        if q.has_waiting_runs(self.ctx.store):  # a run was submitted as we were closing
            self.front.open()
            self._stop_scripts = self._serve_scripts()
            return False
        self._log(f"idle for {self.idle_timeout:g} s: exiting")
        return True

    # -- watchers --------------------------------------------------------------------------

    def _step_changed(self, step_run_id: str) -> None:
        run_id = self.step_parent.get(step_run_id)
        if run_id:
            self._notify(run_id)

    def _notify(self, run_id: str, final: bool = False, status: Status | None = None) -> None:
        """Tell the run's watchers it changed (``final``: it ended, as ``status`` when that is known)."""
        if status is None:
            self.front.notify(run_id, final)
        else:
            self.front.notify(run_id, final, status.value)
