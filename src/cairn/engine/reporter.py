"""The runner's reports, written to the metadata store (the local side of StepReporter)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cairn.core.status import Status
from cairn.engine.fingerprint import definition_of, fingerprint, fingerprint_parts, input_digests
from cairn.engine.late_digests import LateDigests
from cairn.runner.job import InputHandoffError, StepJob, StepResult, pending_owner
from cairn.store import queries as q
from cairn.store.db import Store


@dataclass
class _Handoff:
    """A step's outputs, placed before they were digested: their digests once it ended."""

    digests: dict[str, str] | None = None
    failure: str | None = None  # why they will never come
    ended: bool = False
    # it committed them before they were digested (``late_digests``): its consumers need not wait
    committed: bool = False


class StoreReporter:
    def __init__(self, store: Store, on_change: Any = None, locate: Any = None, on_placed: Any = None,
                 late: LateDigests | None = None, may_digest_late: Callable[[StepJob], bool] | None = None) -> None:
        """``on_placed(step_run_id, attempt, outputs)``: a step's outputs are in place, not yet
        digested. ``late``: makes the digests of outputs committed before them, for the steps
        where ``may_digest_late(job)``."""
        self._store = store
        self._on_change = on_change or (lambda run_id: None)
        self._locate = locate
        self._on_placed = on_placed
        self._late = late
        self._may_digest_late = may_digest_late
        self._handoffs: dict[str, dict[int, _Handoff]] = {}  # producer step run -> attempt -> its hand-off
        self._handoffs_changed = threading.Condition()

    def started(self, step_run_id: str, status: Status, **fields: Any) -> bool:
        ok = q.update_status(self._store, step_run_id, status, None, **fields)
        self._on_change(step_run_id)
        return ok

    def succeeded(self, job: StepJob, outputs: list[dict[str, Any]], exit_code: int) -> bool:
        # outputs committed before their digests (``digest_later`` follows): nobody else makes them
        late = self._late if any(pending_owner(o["digest"]) for o in outputs) else None
        if late is not None:
            late.promise(job.step_run_id)
        keyed = not job.pending_inputs  # (else inputs committed before their digests: keyed once they are)
        cached = keyed and job.cacheable
        try:
            ok = q.commit_step(self._store, job.step_run_id, outputs, job.fingerprint if keyed else None,
                               job.fingerprint_parts, exit_code, cached,
                               definition_of(job.fingerprint_parts) if cached else None)
        except BaseException:
            if late is not None:
                late.drop(job.step_run_id)
            raise
        if late is not None and not ok:
            late.drop(job.step_run_id)
        self._on_change(job.step_run_id)
        if ok and job.pending_inputs and self._late is not None:
            self._late.fingerprint_later(job)  # (never raises: a store that fails leaves it unkeyed)
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

    # -- outputs handed over before they are digested (local compute: execute_step(early_handoff=True))

    def outputs_placed(self, job: StepJob, outputs: list[dict[str, Any]]) -> None:
        with self._handoffs_changed:
            self._handoffs.setdefault(job.step_run_id, {})[job.attempt] = _Handoff()
        if self._on_placed is not None:
            self._on_placed(job.step_run_id, job.attempt, outputs)

    def settle(self, job: StepJob, result: StepResult) -> None:
        """The step ended (called for every step its compute ran): consumers waiting for the digests
        of what it placed get them, or the reason they will not (or that it committed them first:
        see ``digest_later``)."""
        with self._handoffs_changed:
            handoff = self._handoffs.get(job.step_run_id, {}).get(job.attempt)
            if handoff is None or handoff.ended:
                return
            if result.status == Status.COMPLETED.value and result.outputs is not None:
                if any(pending_owner(o["digest"]) for o in result.outputs):
                    handoff.committed = True  # their digests come later: nobody waits for them
                    self._handoffs_changed.notify_all()
                    return
                handoff.digests = {o["name"]: o["digest"] for o in result.outputs}
            else:
                handoff.failure = f"it ended {result.status}" + (f" ({result.reason})" if result.reason else "")
            handoff.ended = True
            self._handoffs_changed.notify_all()

    def settled_job(self, job: StepJob, stopped: Callable[[], bool] = lambda: False) -> StepJob:
        """``stopped()``: the step was canceled or stopped meanwhile (``wake`` is then called): it
        waits no longer and gets ``job`` back as it was. So does a step one of whose producers
        committed before digesting (``digest_later``): it is committed, and keyed once they are."""
        digests: dict[str, str] = {}
        late = False
        with self._handoffs_changed:
            for name, producer, output, attempt in job.pending_inputs:
                handoff = self._handoffs.get(producer, {}).get(attempt)
                if handoff is None:
                    raise InputHandoffError(f"input {name!r} was handed over before step run {producer} digested "
                                            f"it, and this agent no longer knows that step run; run the pipeline "
                                            f"again")
                self._handoffs_changed.wait_for(lambda h=handoff: h.ended or h.committed or stopped())
                if stopped():
                    return job
                if not handoff.ended:  # committed, digest to come
                    late = True
                    continue
                if handoff.committed and handoff.digests is None:
                    raise InputHandoffError(f"input {name!r} changed after step run {producer} committed it, before "
                                            f"it was digested: {handoff.failure}")
                if handoff.digests is None or output not in handoff.digests:
                    raise InputHandoffError(f"input {name!r} was handed over before step run {producer} digested "
                                            f"it, and that step did not complete: {handoff.failure or 'no digest'}")
                digests[name] = handoff.digests[output]
        if late:
            return job
        inputs = tuple(replace(i, digest=digests[i.name]) if i.name in digests else i for i in job.inputs)
        parts = fingerprint_parts(job.spec, input_digests(job.spec, list(inputs)))
        settled = replace(job, inputs=inputs, fingerprint=fingerprint(parts), fingerprint_parts=parts, pending_inputs=())
        # what its Running recorded had the inputs pending: the step is explainable whatever its end
        q.update_fields(self._store, job.step_run_id, fingerprint=settled.fingerprint,
                        fingerprint_parts=json.dumps(parts))
        return settled

    # -- outputs committed before they are digested (``late_digests``)

    def digest_late(self, job: StepJob) -> bool:
        if self._late is None or self._may_digest_late is None:
            return False
        try:
            return self._may_digest_late(job)
        except Exception:  # (the store failed) digested before the commit, as always
            return False

    def digest_later(self, job: StepJob, outputs: list[dict[str, Any]], digest: Callable[[], dict[str, str]]) -> bool:
        assert self._late is not None, "digest_late said no"
        try:
            self._late.start(job, outputs, digest, lambda digests, failure: self._digested(job, digests, failure))
        except Exception:  # (no thread to be had) the step is committed: its digests stay pending, made
            return False  # by whoever needs them; its consumers committed meanwhile are not keyed
        return True

    def _digested(self, job: StepJob, digests: dict[str, str] | None, failure: str | None) -> None:
        with self._handoffs_changed:
            handoff = self._handoffs.get(job.step_run_id, {}).get(job.attempt)
            if handoff is not None and not handoff.ended:  # (committed: settle may not have said so yet)
                handoff.digests, handoff.failure, handoff.ended, handoff.committed = digests, failure, True, True
                self._handoffs_changed.notify_all()

    def wake(self) -> None:
        """A step waiting in ``settled_job`` was stopped: it looks again."""
        with self._handoffs_changed:
            self._handoffs_changed.notify_all()

    def forget_handoffs(self, step_run_ids: Any) -> None:
        """The run of these step runs ended (nothing of it waits for their digests any more; a step
        of an attempt this agent gave up, still waiting, is told they will not come)."""
        with self._handoffs_changed:
            for step_run_id in step_run_ids:
                for handoff in self._handoffs.pop(step_run_id, {}).values():
                    if not handoff.ended:
                        handoff.failure, handoff.ended = "its run ended without it", True
            self._handoffs_changed.notify_all()
