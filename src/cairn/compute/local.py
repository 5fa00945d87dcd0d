"""The built-in ``local`` target: each step runs as a subprocess of this machine, at most
``max_concurrency`` at a time (default: the number of cores), as many more prepared ahead. A step
runs in a fresh interpreter forked from one of its environment that has only started (and imported
the standard-library modules earlier steps imported: runner/spare_learn.py), or started
ahead while earlier steps ran (runner/spares.py; ``spare_interpreters="started"`` or
``CAIRN_SPARE_INTERPRETERS=started``: always the latter; off with ``spare_interpreters=False`` or
``CAIRN_SPARE_INTERPRETERS=0``); with ``warm_start_modules``, steps are forked from a
per-environment server that imported those modules once (runner/warm.py)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cairn.compute.base import DoneCallback
from cairn.runner.execute import (
    StepControl,
    StepReporter,
    cleanup_after,
    environment_base,
    execute_step,
    upload_logs,
)
from cairn.runner.job import StepJob, StepResult
from cairn.runner.slots import ProcessSlots
from cairn.runner.spares import SparePool
from cairn.runner.step_threads import StepThreads
from cairn.runner.warm import WarmPool
from cairn.runner.work_folders import WorkFolders, remove_folders

SHUTDOWN_WAIT = 10.0


class LocalCompute:
    def __init__(self, name: str = "local", max_concurrency: int | None = None,
                 warm_start_modules: list[str] | None = None, spare_interpreters: bool | str = True) -> None:
        self.name = name
        self._max_concurrency = int(max_concurrency or os.cpu_count() or 1)
        self._running = 0
        self._lock = threading.Lock()
        self._step_ended = threading.Condition(self._lock)
        # Up to max_concurrency more steps are prepared ahead (folders, inputs, environment) while
        # the running ones run; processes are still at most max_concurrency at a time.
        self._slots = ProcessSlots(lambda: self._max_concurrency)
        self.warm: WarmPool | None = None
        self.set_warm_start(warm_start_modules)
        self.spares: SparePool | None = None
        self._say: Callable[[str], None] = lambda _message: None  # the agent's log, once it gave it (prestart)
        self.set_spare_interpreters(spare_interpreters)
        self._work_folders: dict[str, WorkFolders] = {}  # by work root: completed steps' folders, kept
        self._threads = StepThreads()
        # the engine's choice (its reporter settles the hand-offs): large outputs go to their
        # consumers before they are digested, and jobs may come with pending inputs
        self.early_handoff = False

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @max_concurrency.setter
    def max_concurrency(self, value: int) -> None:
        self._max_concurrency = int(value)
        self._slots.wake()  # a higher limit lets waiting steps start now

    def set_warm_start(self, modules: list[str] | None) -> None:
        """Opt-in warm start: steps are forked from a server that imported ``modules`` once."""
        wanted = tuple(modules) if modules else None
        current = self.warm.modules if self.warm else None
        if wanted == current:
            return
        if self.warm is not None:
            self.warm.shutdown()
        self.warm = WarmPool(wanted) if wanted else None

    def set_spare_interpreters(self, how: bool | str) -> None:
        """Steps start in spare interpreters (``True``/``"forked"``: forked where it can be, else
        started ahead; ``"started"``: started ahead), or each in a new one when it starts (``False``).
        ``CAIRN_SPARE_INTERPRETERS`` (``0``, ``started``) overrides it for this process."""
        override = os.environ.get("CAIRN_SPARE_INTERPRETERS", "1")
        enabled = how is not False and override != "0"
        fork = how != "started" and override != "started"
        if self.spares is not None and (not enabled or self.spares.fork != fork):
            self._slots.on_release.remove(self.spares.poke)
            self.spares.shutdown()
            self.spares = None
        if enabled and self.spares is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            # only with a core to spare: on busy cores a spare's start would slow the running steps
            # (one that forks starts once per environment, whatever the cores do)
            self.spares = SparePool(min(self._max_concurrency, 4), lambda: self._slots.busy < cores, fork=fork,
                                    say=lambda message: self._say(message))
            self._slots.on_release.append(self.spares.poke)

    def prestart(self, log_dir: Path, log: Callable[[str], None] | None = None) -> None:
        """Start the default environment's spare interpreters, and its warm-start server (in the
        background, so that the first step is warm too: a step that needs it meanwhile waits for
        it, as it would anyway). Called for each run: servers that could not start for an
        earlier one are tried again."""
        warm, env = self.warm, environment_base({})
        if log is not None:
            self._say = log
        if self.spares is not None and warm is None:
            self.spares.want(sys.executable, env)
        if warm is None:
            return
        warm.retry_failed()
        say = log or (lambda _message: None)

        def started(server: Any, failure: str | None) -> None:
            if server is not None:
                say(f"warm start: server pid {server.ready['pid']} of target {self.name!r} is ready"
                    + (f" (could not preload: {'; '.join(server.ready['failed'])})" if server.ready["failed"] else ""))
            else:  # its steps start cold, each saying why in its system log
                say(f"warm start: the server of target {self.name!r} could not start: {failure}")

        if warm.begin_start(sys.executable, env, log_dir, started):
            say(f"warm start: starting the server of target {self.name!r} (modules: {', '.join(warm.modules)})")

    def free_slots(self) -> int:
        with self._lock:
            return 2 * self.max_concurrency - self._running

    def submit(self, job: StepJob, reporter: StepReporter, control: StepControl,
               done: DoneCallback) -> None:
        with self._lock:
            self._running += 1

        slot = self._slots.ticket(job.pipeline_run_id)  # taken here, in dispatch order
        work_folders = self._work_folders_in(os.path.dirname(job.work_dir))

        def work() -> None:
            try:
                result = execute_step(job, reporter, control, warm=self.warm, slot=slot, spares=self.spares,
                                      work_folders=work_folders, early_handoff=self.early_handoff,
                                      record_inherited=True)  # on this machine: for `cairn debug`
                self._settle(job, reporter, result)
                upload_logs(job, result)
            except BaseException as exc:  # never lose a slot or a step's ending
                result = StepResult(job.step_run_id, "Failed", f"runner crashed: {exc}", None)
                self._settle(job, reporter, result)
            finally:
                with self._lock:
                    self._running -= 1
                    self._step_ended.notify_all()
            # an unchanged folder is kept before the engine hears of the end: the next step of the
            # snapshot, started then, can have it (and what that pushed out goes once it heard)
            try:
                kept, evicted = work_folders.release(job.work_dir, result.status == "Completed")
            except Exception:  # (e.g. no /proc) the folder goes as it did before: the ending is told
                kept, evicted = False, []
            done(result)
            if not kept:
                cleanup_after(job, result)
            remove_folders(evicted)

        self._threads.run(f"step-{job.step_run_id}", work)

    def _settle(self, job: StepJob, reporter: StepReporter, result: StepResult) -> None:
        """Consumers waiting for the digests of what the step placed early get them, or why not."""
        if self.early_handoff:
            try:
                reporter.settle(job, result)
            except Exception:  # (it does not raise) the step's ending must reach the engine regardless
                pass

    def _work_folders_in(self, root: str) -> WorkFolders:
        with self._lock:
            folders = self._work_folders.get(root)
            if folders is None:
                folders = self._work_folders[root] = WorkFolders(root, limit=lambda: 2 * self._max_concurrency + 2)
            return folders

    def shutdown(self) -> None:
        """Let the target go. Steps still running were stopped (their processes killed) by whoever
        shuts it down: their threads get up to ``SHUTDOWN_WAIT`` s to record how they ended (a warm
        step hears of its end through its server) before the agent's process exits under them."""
        with self._lock:
            self._step_ended.wait_for(lambda: self._running == 0, timeout=SHUTDOWN_WAIT)
            kept, self._work_folders = list(self._work_folders.values()), {}
        for folders in kept:
            folders.clear()
        if self.warm is not None:
            self.warm.shutdown()
        if self.spares is not None:
            self.spares.shutdown()
