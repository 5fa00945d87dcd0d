"""The local agent: one per workspace. Claims queued runs with a lease, schedules their steps on
compute targets, resumes runs whose agent died, and tells watchers what changed.

It sleeps only in ``queue.get``: woken by a poke (new run, cancel), a step that ended, or the
lease-renewal / idle deadline. It never polls for work.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

from cairn import __version__
from cairn.compute.base import Compute, make_compute
from cairn.core.spec import StepSpec
from cairn.core.status import Status
from cairn.engine.client import READY_FD_ENV, ping
from cairn.engine.context import EngineContext
from cairn.engine.reporter import StoreReporter
from cairn.engine.scheduler import PipelineScheduler
from cairn.runner.execute import StepControl, process_start_time
from cairn.runner.job import StepResult
from cairn.storage.layout import WorkspaceLayout
from cairn.store import queries as q

LEASE_TTL = 30.0


def agent_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{process_start_time(os.getpid())}"


class Agent:
    def __init__(self, layout: WorkspaceLayout, idle_timeout: float | None = 300.0,
                 max_concurrency: int | None = None) -> None:
        self.layout = layout
        self.idle_timeout = idle_timeout
        self.max_concurrency = max_concurrency
        self.owner = agent_owner_id()
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.schedulers: dict[str, PipelineScheduler] = {}
        self.controls: dict[str, StepControl] = {}  # step run id -> control
        self.step_parent: dict[str, str] = {}  # step run id -> pipeline run id
        self.computes: dict[str, Compute] = {}
        self._watchers: dict[str, list[socket.socket]] = {}
        self._watch_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._lock_file: Any = None
        self._stopping = False

    # -- life cycle ------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Take the workspace's agent lock. False if another live agent already serves it."""
        self.layout.dot.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.layout.agent_lock, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        if ping(self.layout):
            return False
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)  # the other agent is shutting down: wait for it
        return True

    def serve(self) -> int:
        if not self.acquire():
            _signal_ready(b"other\n")
            return 0
        self.ctx = EngineContext.open(self.layout)
        self.reporter = StoreReporter(self.ctx.store, on_change=self._step_changed)
        self._open_listener()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        _signal_ready(b"ready\n")
        self._log(f"agent {self.owner} serving {self.layout.root}")
        try:
            self._loop()
        finally:
            self._close_listener()
            self._log("agent stopped")
        return 0

    def _on_term(self, signum: int, _frame: Any) -> None:
        self.events.put(("stop", f"signal {signal.Signals(signum).name}"))

    def _log(self, msg: str) -> None:
        print(time.strftime("%Y-%m-%dT%H:%M:%S"), msg, file=sys.stderr, flush=True)

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        next_renewal = time.monotonic() + LEASE_TTL / 3
        idle_since = time.monotonic()
        while True:
            self._claim_waiting()
            self._advance_all()
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
            deadline = next_renewal
            if not self.schedulers and self.idle_timeout is not None and not self._has_watchers():
                if now - idle_since >= self.idle_timeout:
                    if self._shutdown_if_idle():
                        return
                    idle_since = time.monotonic()
                    continue
                deadline = min(deadline, idle_since + self.idle_timeout)
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
        if kind == "stop":
            self._log(f"stopping: {event[1] if len(event) > 1 else 'asked to'}")
            self._stop_all()
            return False
        if kind == "done":
            result: StepResult = event[1]
            run_id = self.step_parent.pop(result.step_run_id, None)
            self.controls.pop(result.step_run_id, None)
            sched = self.schedulers.get(run_id or "")
            if sched is not None:
                name = next(n for n, i in sched.step_ids.items() if i == result.step_run_id)
                sched.finished(name, Status(result.status))
        elif kind == "poke":
            self._check_cancels()
        return True

    def _claim_waiting(self) -> None:
        dead = {o for o in q.lease_owners(self.ctx.store)
                if o != self.owner and o.split(":")[0] == socket.gethostname()}
        # We hold the workspace lock, so any other agent of this host on this workspace is gone.
        while True:
            run_id = q.claim_run(self.ctx.store, self.owner, LEASE_TTL, dead)
            if run_id is None:
                return
            try:
                self.schedulers[run_id] = PipelineScheduler(self.ctx, run_id)
                self._log(f"claimed run {run_id}")
            except Exception as exc:  # a spec we cannot read must not stop the agent
                q.update_status(self.ctx.store, run_id, Status.FAILED, f"could not start the run: {exc}")
            self._notify(run_id)

    def _advance_all(self) -> None:
        for run_id, sched in list(self.schedulers.items()):
            progressed = True
            while progressed:  # a reused step makes its downstream ready at once: no event will come
                progressed = False
                for step in sched.ready_steps():
                    compute = self._compute(step.compute_target)
                    if compute is None:
                        sched.dispatch_failed(step, f"compute target {step.compute_target!r} does not exist "
                                                    f"in this workspace")
                        progressed = True
                        continue
                    if compute.free_slots() <= 0:
                        continue
                    progressed |= self._start_step(sched, step, compute)
            if sched.is_done():
                final = sched.finish()
                q.release_lease(self.ctx.store, run_id, self.owner)
                del self.schedulers[run_id]
                self._log(f"run {run_id} {final.value}")
                self._notify(run_id, final=True)

    def _start_step(self, sched: PipelineScheduler, step: StepSpec, compute: Compute) -> bool:
        """Reuse or dispatch ``step``; True when it ended at once (reused, or could not start)."""
        try:
            job = sched.prepare(step)
        except Exception as exc:
            sched.dispatch_failed(step, f"could not prepare the step: {type(exc).__name__}: {exc}")
            self._notify(sched.run_id)
            return True
        if job is None:  # reused
            self._notify(sched.run_id)
            return True
        control = StepControl()
        self.controls[job.step_run_id] = control
        self.step_parent[job.step_run_id] = sched.run_id
        sched.started(step)
        compute.submit(job, self.reporter, control, lambda result: self.events.put(("done", result)))
        return False

    def _compute(self, name: str) -> Compute | None:
        if name not in self.computes:
            targets = {c["name"]: c for c in q.list_named(self.ctx.store, "compute_targets")}
            if name not in targets:
                return None
            config = dict(targets[name]["config"])
            if self.max_concurrency and targets[name]["kind"] == "local":
                config["max_concurrency"] = self.max_concurrency
            self.computes[name] = make_compute(name, targets[name]["kind"], config)
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

    def _stop_all(self) -> None:
        """Stop: kill running steps and hand the runs back to the queue for the next agent."""
        self._stopping = True
        self._close_listener()
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
        self._close_listener()
        if q.has_waiting_runs(self.ctx.store):  # a run was submitted as we were closing
            self._open_listener()
            return False
        self._log(f"idle for {self.idle_timeout:g} s: exiting")
        return True

    # -- the socket: pokes and watchers ----------------------------------------------------

    def _open_listener(self) -> None:
        path = self.layout.agent_socket
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True, name="agent-accept").start()

    def _close_listener(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
            self.layout.agent_socket.unlink(missing_ok=True)

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        reader = conn.makefile("r", encoding="utf-8")
        try:
            for line in reader:
                msg = json.loads(line)
                op = msg.get("op")
                if op == "poke":
                    self.events.put(("poke",))
                    with self._watch_lock:
                        _send(conn, {"ok": True, "version": __version__})
                elif op == "stop":
                    self.events.put(("stop", "asked by a client"))
                    with self._watch_lock:
                        _send(conn, {"ok": True})
                elif op == "ping":
                    with self._watch_lock:
                        _send(conn, {"ok": True, "pid": os.getpid(), "version": __version__})
                elif op == "watch":
                    # a stuck watcher must not stall the agent: bound sends only (reads wait forever)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 10, 0))
                    with self._watch_lock:
                        self._watchers.setdefault(msg["run"], []).append(conn)
                        _send(conn, {"ok": True})
                    self.events.put(("poke",))
        except (OSError, ValueError):
            pass
        finally:
            with self._watch_lock:
                for conns in self._watchers.values():
                    if conn in conns:
                        conns.remove(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _has_watchers(self) -> bool:
        with self._watch_lock:
            return any(self._watchers.values())

    def _step_changed(self, step_run_id: str) -> None:
        run_id = self.step_parent.get(step_run_id)
        if run_id:
            self._notify(run_id)

    def _notify(self, run_id: str, final: bool = False) -> None:
        with self._watch_lock:  # one writer at a time per socket
            for conn in self._watchers.get(run_id, ()):
                try:
                    _send(conn, {"event": "final" if final else "changed", "run": run_id})
                except OSError:
                    pass


def _send(conn: socket.socket, msg: dict[str, Any]) -> None:
    conn.sendall((json.dumps(msg) + "\n").encode())


def _signal_ready(message: bytes) -> None:
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    try:
        os.write(int(fd), message)
        os.close(int(fd))
    except OSError:
        pass
