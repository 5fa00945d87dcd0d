"""The runner's reports, written to the metadata store (the local side of StepReporter)."""

from __future__ import annotations

from typing import Any

from cairn.core.status import Status
from cairn.runner.job import StepJob
from cairn.store import queries as q
from cairn.store.db import Store


class StoreReporter:
    def __init__(self, store: Store, on_change: Any = None) -> None:
        self._store = store
        self._on_change = on_change or (lambda run_id: None)

    def started(self, step_run_id: str, status: Status, **fields: Any) -> bool:
        ok = q.update_status(self._store, step_run_id, status, None, **fields)
        self._on_change(step_run_id)
        return ok

    def succeeded(self, job: StepJob, outputs: list[dict[str, Any]], exit_code: int) -> bool:
        ok = q.commit_step(self._store, job.step_run_id, outputs, job.fingerprint,
                           job.fingerprint_parts, exit_code, job.cacheable)
        self._on_change(job.step_run_id)
        return ok

    def ended(self, step_run_id: str, status: Status, reason: str, exit_code: int | None) -> None:
        q.update_status(self._store, step_run_id, status, reason, exit_code=exit_code)
        self._on_change(step_run_id)
