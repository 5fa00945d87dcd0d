"""Metrics logged inside a step are written in batches: a training loop that logs every batch
must not pay one database transaction per value. Rows reach the store within FLUSH_INTERVAL
seconds, at once when a reader asks, and at interpreter exit."""

from __future__ import annotations

import atexit
import os
import threading
import time
from typing import Any

FLUSH_INTERVAL = 0.25
MAX_ROWS = 1000
IDLE_SECONDS = 5.0  # a batcher with nothing logged for this long lets go of its run (and its backend)


class MetricBatcher:
    def __init__(self, backend: Any, run_id: str) -> None:
        self._backend = backend
        self._run_id = run_id
        self._rows: list[tuple[str, str, Any, float]] = []
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()  # batches reach the store in the order they were logged
        self._thread: threading.Thread | None = None
        self._retired = False  # let go after being idle: the run's next batcher takes new rows

    def add(self, name: str, kind: str, value: Any) -> None:
        with self._cond:
            retired = self._retired
            if not retired:
                self._rows.append((name, kind, value, time.time()))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="cairn-metrics", daemon=True)
                    self._thread.start()
                self._cond.notify()
        if retired:
            batcher_for(self._backend, self._run_id).add(name, kind, value)
        elif len(self._rows) >= MAX_ROWS:
            self.flush()

    def _loop(self) -> None:
        while True:
            with self._cond:
                logged = self._cond.wait_for(lambda: bool(self._rows), timeout=IDLE_SECONDS)
            if not logged and self._retire():
                return
            time.sleep(FLUSH_INTERVAL)  # gather a batch: this is the batching window, not a poll
            self.flush()

    def _retire(self) -> bool:
        """Leave the registry when nothing is pending (a process that logs on many runs must not
        keep every run's backend, and its database connections, open); False if rows came meanwhile."""
        with _lock, self._cond:
            if self._rows:
                return False
            self._retired = True
            self._thread = None
            key = (self._backend.location, self._run_id)
            if _batchers.get(key) is self:
                del _batchers[key]
            return True

    def flush(self) -> None:
        with self._write_lock:
            with self._cond:
                rows, self._rows = self._rows, []
            if rows:
                self._backend.log_metrics(self._run_id, rows)


_batchers: dict[tuple[str, str], MetricBatcher] = {}
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child (multiprocessing workers, os.fork) logs its own metrics: it must neither
    write again what its parent had buffered nor wait on the parent's writer thread."""
    global _lock
    _lock = threading.Lock()
    for b in _batchers.values():
        b._rows = []
        b._cond = threading.Condition()
        b._write_lock = threading.Lock()
        b._thread = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def batcher_for(backend: Any, run_id: str) -> MetricBatcher:
    key = (backend.location, run_id)
    with _lock:
        if key not in _batchers:
            _batchers[key] = MetricBatcher(backend, run_id)
        return _batchers[key]


def flush_all() -> None:
    for b in list(_batchers.values()):
        b.flush()


atexit.register(flush_all)  # what is still batched at interpreter exit
