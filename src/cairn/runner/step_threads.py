"""The threads local steps run on (each step's bookkeeping and its wait for its process), kept
for the next step a while once idle: starting a thread per step cost ~0.3 ms of the agent's CPU
(its start-up hand-shake passes the interpreter lock back and forth)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

IDLE_SECONDS = 30.0  # an idle thread waits this long for another step, then ends


class StepThreads:
    def __init__(self, idle_seconds: float = IDLE_SECONDS) -> None:
        self._idle_seconds = idle_seconds
        self._work: queue.SimpleQueue[tuple[str, Callable[[], None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for work; a put is promised to one of them

    def run(self, name: str, work: Callable[[], None]) -> None:
        """Run ``work`` on an idle thread, or a new one, named ``name`` while it runs."""
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._work.put((name, work))  # under the lock: an ending thread sees it (see _serve)
                return
        threading.Thread(target=self._serve, args=(name, work), name=name, daemon=True).start()

    @property
    def idle(self) -> int:
        with self._lock:
            return self._idle

    def _serve(self, name: str, work: Callable[[], None]) -> None:
        me = threading.current_thread()
        while True:
            me.name = name
            try:
                work()
            except BaseException:  # a bug (the work reports steps' own failures): in the agent's log
                import traceback

                traceback.print_exc()
            me.name = "step-idle"
            with self._lock:
                self._idle += 1
            try:
                name, work = self._work.get(timeout=self._idle_seconds)
                continue
            except queue.Empty:
                pass
            with self._lock:  # work promised to an idle thread just before the wait ended is ours
                try:
                    name, work = self._work.get_nowait()
                except queue.Empty:
                    self._idle -= 1
                    return
