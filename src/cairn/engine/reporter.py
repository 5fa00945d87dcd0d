"""The runner's reports, written to the metadata store (the local side of StepReporter)."""

from __future__ import annotations

from typing import Any

from cairn.core.status import Status
from cairn.runner.job import StepJob
from cairn.store import queries as q
from cairn.store.db import Store


class StoreReporter:
    def __init__(self, store: Store, on_change: Any = None, locate: Any = None) -> None:
        self._store = store
        self._on_change = on_change or (lambda run_id: None)
        self._locate = locate

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

    def register_output(self, job: StepJob, output: dict[str, Any], registration: dict[str, Any]) -> str:
        """A committed output becomes a new version of a registered dataset (and the step run says so)."""
        from cairn.data.datasets import resolve_files, version_record

        read_as = registration.get("read_as") or {}
        definition = {"kind": "tabular" if read_as else "file",
                      "paths": [{"datastore": output["datastore"], "path": output["path"]}], **read_as}
        row = q.register_dataset(
            self._store, **version_record(definition, resolve_files(definition, self._locate)),
            name=registration["name"], description=registration.get("description"),
            tags=registration.get("tags") or {}, create_new_version=True)
        label = f"{row['name']}:{row['version']}"
        q.add_properties(self._store, job.step_run_id, {f"cairn.output.{output['name']}.dataset": label})
        return label
