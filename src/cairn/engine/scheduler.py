"""The scheduler of ONE pipeline run: which steps are ready, reuse or dispatch, and the ending.

It keeps no state that the store does not also have: a new agent rebuilds it from the store and
carries on (finished steps stay finished; unfinished ones run again).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from cairn.core.spec import GraphSpec, StepSpec
from cairn.core.status import ACTIVE, Status
from cairn.data.datasets import local_folder
from cairn.engine.context import EngineContext
from cairn.engine.fingerprint import (
    definition_of,
    fingerprint,
    fingerprint_and_text,
    fingerprint_parts,
    input_digests,
)
from cairn.engine.late_digests import LateDigests, OutputChanged, resolved
from cairn.runner.job import CHANGED, PENDING_DIGEST, InputLocation, StepJob, pending_owner
from cairn.runner.processes import kill_step_processes
from cairn.storage.layout import run_dir, staging_dir
from cairn.storage.snapshot import load_manifest
from cairn.storage.tree import stat_signature_matches
from cairn.store import queries as q

Dispatch = Callable[[StepJob, StepSpec], None]


class RecordedRun(NamedTuple):
    """A pipeline run as the agent that recorded it has it: its spec and its step run ids (by step name)."""

    spec: GraphSpec
    step_ids: dict[str, str]


class PipelineScheduler:
    def __init__(self, ctx: EngineContext, run_id: str, resume: bool = True,
                 hands_over_early: Callable[[str], bool] = lambda target: False,
                 late: LateDigests | None = None, recorded: RecordedRun | None = None,
                 started: bool = False) -> None:
        """``resume=False`` reads the run without changing it (``cairn debug`` rebuilds a step's job).
        ``hands_over_early(target)``: whether the steps of that target may start with inputs not
        yet digested (the agent's local targets; see ``outputs_placed``). ``late``: the agent's
        digests of outputs committed before them (see ``digest_may_come_late``). ``recorded``:
        the spec and step run ids as this process recorded the run (not read back from the store),
        used on the run's first claim only. ``started``: its claim made it Running (it was queued)."""
        self.ctx = ctx
        self._late = late
        self._started = started
        self.run_id = run_id
        run = q.get_run(ctx.store, run_id)
        assert run is not None
        self.run = run
        if recorded is not None and run["attempt"] != 1:  # an agent had it before: its steps moved on
            recorded = None
        self.spec = recorded.spec if recorded is not None else GraphSpec.from_json(run["spec"])
        self.targets = {s.compute_target for s in self.spec.steps}  # the compute targets its steps use
        self._step_dicts: dict[str, dict[str, Any]] | None = None  # see step_dict
        self.step_ids: dict[str, str] = {}
        self.attempts: dict[str, int] = {}  # step name -> attempts started so far
        self.status: dict[str, Status] = {}
        self.running: set[str] = set()
        self.failed_step: str | None = None
        self._held: set[str] = set()  # withdrawn by their compute: see finished()
        self.canceling = bool(run["cancel_requested"])  # canceled while no agent was running
        self._roots = ctx.datastore_roots()
        self._manifests: dict[str, dict[str, Any]] = {}  # snapshot digest -> manifest (shared by steps)
        self._outputs: dict[str, dict[str, Any]] = {}  # producer step run -> its committed outputs
        self._reuses: list[q.ReuseRecord] = []  # decided, not yet recorded (see record_reuses)
        self._default_store = ctx.default_datastore()
        self._run_root = ctx.local_run_root()
        layout = ctx.layout  # the folders every job names, built once (pathlib is slow on a per-step path)
        self._folders = {"root": str(layout.root), "objects": str(ctx.objects.root), "work": str(layout.work),
                         "envs": str(layout.envs), "kept_code": str(layout.kept_code)}
        # Readiness is kept up to date as statuses change, not recomputed from the whole graph on
        # every event (a 500-step graph made that the agent's largest cost).
        self._order = {step.name: index for index, step in enumerate(self.spec.steps)}
        self._downstream: dict[str, list[str]] = {step.name: [] for step in self.spec.steps}
        for step in self.spec.steps:
            for u in step.upstream():
                self._downstream[u].append(step.name)
        self._unmet: dict[str, int] = {}  # step name -> upstream steps not (yet) ended successfully
        self._ready: set[str] = set()  # waiting steps whose upstream steps all succeeded
        self._ready_order: list[int] = []  # their places in the spec, sorted (kept as they change)
        # producer -> consumers counted as met while the producer's placed outputs are digested
        self._released: dict[str, set[str]] = {}
        self.hands_over_early = hands_over_early
        self._reuse_needs_digest: dict[str, bool] = {}  # consumer -> a step of its definition was cached
        self.recorded_end: Status | None = None  # the final status ``finish`` recorded (None: another ending stands)
        if recorded is not None and resume:  # its steps are as recorded: not started, no attempt yet
            self.step_ids = dict(recorded.step_ids)
            self.attempts = dict.fromkeys(self.step_ids, 0)
            self.status = dict.fromkeys(self.step_ids, Status.NOT_STARTED)
            self._mark_running(resumed=False)
        elif resume:
            self._resume()
        else:
            for child in q.child_runs(ctx.store, run_id):
                self.step_ids[child["name"]] = child["id"]
                self.attempts[child["name"]] = child["attempt"] or 0
                self.status[child["name"]] = Status(child["status"])
        self._names = {i: n for n, i in self.step_ids.items()}  # step run id -> step name
        self._count_unmet()

    def step_dict(self, name: str) -> dict[str, Any]:
        """Step ``name`` as the submitted JSON has it (what StepSpec parses back): what its job
        carries. Read once, when a first step is dispatched (a rerun that reuses every step never
        needs it)."""
        if self._step_dicts is None:
            self._step_dicts = {d["name"]: d for d in json.loads(self.run["spec"])["steps"]}
        return self._step_dicts[name]

    def name_of(self, step_run_id: str) -> str:
        return self._names[step_run_id]

    def _count_unmet(self) -> None:
        for step in self.spec.steps:
            self._unmet[step.name] = sum(not self.status[u].is_success for u in step.upstream())
            self._check_ready(step.name)

    def _check_ready(self, name: str) -> None:
        if (self._unmet[name] == 0 and self.status[name] in (Status.NOT_STARTED, Status.QUEUED)
                and name not in self.running):
            if name not in self._ready:
                self._ready.add(name)
                bisect.insort(self._ready_order, self._order[name])
        elif name in self._ready:
            self._ready.discard(name)
            order = self._order[name]
            del self._ready_order[bisect.bisect_left(self._ready_order, order)]

    def _set_status(self, name: str, status: Status) -> None:
        was_success = self.status[name].is_success
        self.status[name] = status
        if status.is_success != was_success:
            for d in self._downstream[name]:
                self._unmet[d] += -1 if status.is_success else 1
                self._check_ready(d)
        self._check_ready(name)

    # -- start and resume ------------------------------------------------------------------

    def _resume(self) -> None:
        store = self.ctx.store
        resumed = []
        for child in q.child_runs(store, self.run_id):
            self.step_ids[child["name"]] = child["id"]
            self.attempts[child["name"]] = child["attempt"] or 0
            st = Status(child["status"])
            if st in (Status.PREPARING, Status.RUNNING, Status.FINALIZING):
                kill_step_processes(child.get("pid"), child.get("pid_started"), child["id"])  # left by a dead agent
                q.forget_attempt(store, child["id"])  # the interrupted attempt's records would mix in
                q.update_status(store, child["id"], Status.QUEUED,
                                "resumed: the agent that ran this step stopped; running it again")
                st = Status.QUEUED
                resumed.append(child["name"])
            self.status[child["name"]] = st
            if st == Status.FAILED and self.failed_step is None:
                self.failed_step = child["name"]
        self._mark_running(bool(resumed))

    def _mark_running(self, resumed: bool) -> None:
        """The run is Running (its claim made a queued run Running: nothing to record then)."""
        if self._started and not resumed:
            return
        run_status = Status(self.run["status"])
        if run_status == Status.QUEUED:
            q.update_status(self.ctx.store, self.run_id, Status.RUNNING)
        elif resumed or run_status in ACTIVE:
            q.update_status(self.ctx.store, self.run_id, Status.RUNNING,
                            "resumed by a new agent" if self.run["attempt"] > 1 else None)

    # -- progress --------------------------------------------------------------------------

    def ready_steps(self) -> Iterator[StepSpec]:
        """The steps that may start now, in spec order (made as they are asked for: a dispatch pass
        usually stops after the first few, when the compute is full)."""
        if self._halted():
            return iter(())
        steps = self.spec.steps
        return (steps[i] for i in self._ready_order[:])  # a copy: dispatching changes the list

    def may_start(self, name: str) -> bool:
        """Whether step ``name`` is still ready (a dispatch pass works through the steps ready when it
        began) and the run still starts steps."""
        return name in self._ready and not self._halted()

    def has_ready(self) -> bool:
        return bool(self._ready) and not self._halted()

    def _halted(self) -> bool:
        """Nothing more starts: the run is being canceled, or a step failed and it stops on failure."""
        return self.canceling or bool(self.failed_step and not self.run["continue_on_step_failure"])

    def prepare(self, step: StepSpec) -> StepJob | None:
        """Reuse the step if its fingerprint is cached (returns None), else build its job. Raises
        ``DigestPending`` (nothing changed: prepare it again once the digest is made) and
        ``OutputChanged`` (it cannot run: it fails with that reason)."""
        store = self.ctx.store
        step_run_id = self.step_ids[step.name]
        inputs, datasets, locations = self._locate_inputs(step, step_run_id, record_lineage=True)
        changed = [i.name for i in inputs if i.digest.startswith(CHANGED)]
        if changed:
            raise OutputChanged(f"its input {changed[0]!r} changed after its producer committed it, before it was "
                                f"digested (a process the producer left running?); run the pipeline again: the "
                                f"producer then runs again")
        parts = fingerprint_parts(step, input_digests(step, inputs))
        # inputs still being digested (see outputs_placed): it was released because no step of its
        # definition was ever cached; its fingerprint is made when they are digested
        pending = tuple((i.name, self.step_ids[i.producer], i.output, self.attempts[i.producer])
                        for i, located in zip(step.inputs, inputs[:len(step.inputs)], strict=True)
                        if located.digest.startswith(PENDING_DIGEST))
        fp, parts_text = ("", "") if pending else fingerprint_and_text(parts)
        if step.allow_reuse and not self.run["regenerate_outputs"] and not pending:
            source = q.lookup_cache(store, fp)
            present = self._outputs_present(source, step) if source else None
            if present is not None:
                # recorded by record_reuses with the others of this dispatch pass, in one transaction
                # no log file: a reused step's system log is read from its record (LocalBackend.read_log)
                self._reuses.append((step_run_id, source, fp, parts_text, list(present.values())))
                # what downstream steps read next: this step's outputs are the source's
                self._outputs[step_run_id] = {name: {**row, "step_run_id": step_run_id}
                                              for name, row in present.items()}
                self._set_status(step.name, Status.REUSED)
                return None
        self._set_status(step.name, Status.QUEUED)  # the runner's Preparing is the next recorded status
        log_dir = self._run_root / run_dir(self.run_id, step_run_id) / "logs"
        attempt = self.attempts[step.name] = self.attempts[step.name] + 1
        if attempt > 1:  # an interrupted attempt's records must not mix into this one's
            q.forget_attempt(store, step_run_id)
        # (whether the digest could matter to them is asked only if the outputs are large: placed)
        early = self.hands_over_early(step.compute_target) and any(
            self._reads_in_place_only(self.spec.step(c), step.name) for c in self._downstream[step.name])
        return self._job(step, step_run_id, attempt, inputs, datasets, locations, fp, parts, log_dir,
                         pending_inputs=pending, hand_over_early=early)

    def record_reuses(self) -> list[str]:
        """Record the reuses ``prepare`` decided since the last call, in one transaction. Call it
        before a step is dispatched (its upstream steps' endings come before its start) and at the
        end of each dispatch pass. Returns the names of steps the store refused (they had ended
        meanwhile: another agent took the run); the run's own view keeps them Reused."""
        if not self._reuses:
            return []
        records, self._reuses = self._reuses, []
        try:
            refused = q.record_reuses(self.ctx.store, records)
        except Exception as exc:  # nothing of the batch was recorded: its steps fail, saying why
            self._reuses_not_recorded(records, exc)
            return []
        return [self._names[i] for i in refused]

    def _reuses_not_recorded(self, records: list[q.ReuseRecord], exc: Exception) -> None:
        for step_run_id, *_ in records:
            self.dispatch_failed(self.spec.step(self._names[step_run_id]),
                                 f"could not record its reuse: {type(exc).__name__}: {exc}")

    def debug_job(self, step: StepSpec, work_dir: Path, tools_dir: Path) -> StepJob:
        """The step's job as it would run now, changing nothing in the store (but the digest of an
        input still pending, made and recorded as whoever needs it does): its inputs are the
        committed outputs its upstream steps have in this run (reused ones included); its logs and
        outputs go to ``tools_dir``, outside its working folder as in a run."""
        step_run_id = self.step_ids[step.name]
        missing = [f"{i.producer!r} ({self.status[i.producer].value})" for i in step.inputs
                   if i.output not in self._outputs_of(self.step_ids[i.producer])]
        if missing:
            raise ValueError(f"step {step.name!r} cannot be recreated: upstream step {missing[0]} has no "
                             f"committed output for it in this run")
        inputs, datasets, locations = self._locate_inputs(step, step_run_id, record_lineage=False)
        parts = fingerprint_parts(step, input_digests(step, inputs))
        job = self._job(step, step_run_id, max(1, self.attempts[step.name]), inputs, datasets, locations,
                        fingerprint(parts), parts, tools_dir / "logs")
        staging = {o.name: str(tools_dir / "outputs" / o.name) for o in step.outputs}
        return replace(job, work_dir=str(work_dir), staging_dirs=staging, log_upload=None)

    def outputs_placed(self, step_run_id: str, outputs: list[dict[str, Any]]) -> None:
        """A running step's outputs are in place, being digested (large outputs of local datastores;
        the step's job asked for it, ``hand_over_early``). Its consumers that wait only for it may
        start now, where ``_may_start_before_digest``; the others wait for its end, as usual."""
        name = self._names[step_run_id]
        if self.status[name].is_terminal or name not in self.running:
            return
        self._outputs[step_run_id] = {o["name"]: {**q.output_row(step_run_id, o),
                                                  "digest": f"{PENDING_DIGEST}{step_run_id}/{o['name']}"}
                                      for o in outputs}
        released = self._released.setdefault(name, set())
        for consumer in self._downstream[name]:
            if (consumer in released or consumer in self.running
                    or self.status[consumer] not in (Status.NOT_STARTED, Status.QUEUED)):
                continue
            if self._may_start_before_digest(self.spec.step(consumer), name):
                released.add(consumer)
                self._unmet[consumer] -= 1
                self._check_ready(consumer)

    def released_by(self, producer: str) -> list[str]:
        """The consumers that ``producer``'s placed outputs let start early (until it ends)."""
        return sorted(self._released.get(producer, ()))

    def _may_start_before_digest(self, step: StepSpec, producer: str) -> bool:
        """Whether ``step`` may start while ``producer``'s outputs are being digested: it reads them
        only in place, as files (not copied, nor as a table: through the digest), none of them is
        registered as a dataset (its lineage comes with the producer's end), it does not merely run
        after the producer (nothing would tie its end to the producer's), its target takes inputs
        not yet digested, and its reuse cannot depend on the digest: it is never reused, or no step
        of its definition was ever cached (else an edited producer that writes the same bytes again
        must still let it be reused)."""
        if not self._reads_in_place_only(step, producer):
            return False
        if not step.allow_reuse or self.run["regenerate_outputs"]:
            return True
        cached = self._reuse_needs_digest.get(step.name)
        if cached is None:  # once per run (one found later only costs a reuse that could have been)
            definition = definition_of(fingerprint_parts(step, {}))
            cached = self._reuse_needs_digest[step.name] = q.definition_cached(self.ctx.store, definition)
        return not cached

    def _reads_in_place_only(self, step: StepSpec, producer: str) -> bool:
        """The conditions of ``_may_start_before_digest`` that need no store."""
        reads = [i for i in step.inputs if i.producer == producer]
        if not reads or producer in step.run_after or not self.hands_over_early(step.compute_target):
            return False
        registered = {o.name for o in self.spec.step(producer).outputs if o.register}
        return not any(i.read_as or i.mode == "download" or i.output in registered for i in reads)

    def committed(self, step_run_id: str, outputs: dict[str, dict[str, Any]]) -> None:
        """The outputs a step of this run committed, as the store has them: its consumers read these."""
        self._outputs[step_run_id] = outputs

    def changed_inputs(self, step: StepSpec) -> list[tuple[str, str]]:
        """(input, producing step) for each input of ``step`` whose committed output on a local
        datastore changed since it was committed (its stat signature differs)."""
        changed = []
        for i in step.inputs:
            produced = self._outputs_of(self.step_ids[i.producer]).get(i.output)
            if not produced or not produced.get("stat_signature") or produced["datastore"] not in self._roots:
                continue
            path = Path(self._roots[produced["datastore"]]) / produced["path"]
            if path.exists() and not stat_signature_matches(path, produced["stat_signature"]):
                changed.append((i.name, i.producer))
        return changed

    def _outputs_of(self, step_run_id: str) -> dict[str, Any]:
        """Committed outputs never change: each producer's are read once (a fan-out source has many
        consumers). A digest still pending is made (or waited for) first, unless this agent makes
        it for a step of this run: then its consumers start with it pending (see ``prepare``)."""
        outputs = self._outputs.get(step_run_id)
        if outputs is None:
            outputs = q.get_outputs(self.ctx.store, step_run_id)
            for name, row in outputs.items():
                owner = pending_owner(row["digest"])
                if owner is not None and not (owner in self._names and self._late is not None and self._late.live(owner)):
                    outputs[name] = {**row, "digest": self._resolved(row)}
            if outputs:
                self._outputs[step_run_id] = outputs
        return outputs

    def _resolved(self, row: dict[str, Any]) -> str:
        """A committed output's digest; ``DigestPending`` while the agent makes it."""
        root = self._roots.get(row["datastore"])
        return self._late.request(row, root) if self._late is not None else resolved(self.ctx.store, row, root)

    def digest_may_come_late(self, name: str, hands_over: bool = True) -> bool:
        """Whether step ``name``'s large outputs may be committed before they are digested: it runs
        on a target that hands outputs over early, registers none as a dataset, and each of its
        consumers in the run may start before the digest (``_may_start_before_digest``: none's
        reuse can depend on it), its job handing them over (``hands_over``: its job's
        ``hand_over_early``, decided when it was prepared, when a consumer's target may not have
        been made yet) where it has any. Asked from the step's own thread once its outputs are
        known to be large: it reads only the spec and the store."""
        step = self.spec.step(name)
        if self._late is None or not self.hands_over_early(step.compute_target) or any(o.register for o in step.outputs):
            return False
        consumers = self._downstream[name]
        if consumers and not hands_over:
            return False
        return all(self._may_start_before_digest(self.spec.step(c), name) for c in consumers)

    def _locate_inputs(self, step: StepSpec, step_run_id: str, record_lineage: bool
                       ) -> tuple[list[InputLocation], dict[str, Any], dict[str, Any]]:
        store = self.ctx.store
        inputs = []
        datasets: dict[str, Any] = {}
        locations: dict[str, Any] = {}
        for i in step.inputs:
            produced = self._outputs_of(self.step_ids[i.producer])[i.output]
            producer_spec = self.spec.step(i.producer)
            if any(o.name == i.output and o.register for o in producer_spec.outputs):
                label = q.get_kv(store, self.step_ids[i.producer], "properties").get(f"cairn.output.{i.output}.dataset")
                if label and record_lineage:  # lineage: this step consumes the dataset version its producer registered
                    q.add_properties(store, step_run_id, {f"cairn.input.{i.name}.dataset": label})
            store_name = produced["datastore"]
            local = store_name in self._roots
            # remote: fetched; os.path, not pathlib: this runs for every input of every step
            path = os.path.normpath(os.path.join(self._roots[store_name], produced["path"])) if local else ""
            in_place = local and i.mode != "download"
            inputs.append(InputLocation(i.name, path, produced["digest"], i.mode,
                                        produced.get("stat_signature") if in_place else None))
            if i.read_as or not local:
                definition = {"kind": "tabular" if i.read_as else "file",
                              "paths": [{"datastore": store_name, "path": produced["path"]}], **(i.read_as or {})}
                datasets[i.name] = {"kind": definition["kind"], "definition": definition,
                                    "mode": "direct" if i.read_as else i.mode, "path_on_compute": i.path_on_compute}
            if not local:
                self._add_location(locations, store_name)
        for d in step.dataset_inputs:
            # on a local datastore every mode is the data's own path: no copy (the rule)
            own = local_folder(d.definition, self.ctx.datastore_location)
            inputs.append(InputLocation(d.name, own or "", d.content_digest, d.mode))
            datasets[d.name] = {"kind": d.kind, "definition": d.definition, "mode": d.mode,
                                "path_on_compute": d.path_on_compute}
            if own is None:
                for entry in d.definition["paths"]:
                    if "datastore" in entry:
                        self._add_location(locations, entry["datastore"])
        for o in step.outputs:
            if o.datastore not in self._roots:
                self._add_location(locations, o.datastore)
        return inputs, datasets, locations

    def _job(self, step: StepSpec, step_run_id: str, attempt: int, inputs: list[InputLocation],
             datasets: dict[str, Any], locations: dict[str, Any], fp: str, parts: dict[str, Any],
             log_dir: Path, pending_inputs: tuple[tuple[str, str, str, int], ...] = (),
             hand_over_early: bool = False) -> StepJob:
        if step.snapshot not in self._manifests:
            snapshot = q.get_snapshot(self.ctx.store, step.snapshot)
            if snapshot is None:
                raise RuntimeError(f"snapshot {step.snapshot} of step {step.name!r} is not in the store")
            self._manifests[step.snapshot] = load_manifest(self.ctx.objects, snapshot["manifest"])
        base = run_dir(self.run_id, step_run_id)
        return StepJob(
            workspace=self._folders["root"], experiment=self.run["experiment"],
            pipeline_run_id=self.run_id, step_run_id=step_run_id, attempt=attempt,
            step=self.step_dict(step.name), manifest=self._manifests[step.snapshot],
            objects_root=self._folders["objects"], work_dir=os.path.join(self._folders["work"], step_run_id),
            log_dir=str(log_dir), datastore_roots=self._roots,
            output_dirs={o.name: _destination(o, base, step_run_id) for o in step.outputs},
            staging_dirs={o.name: staging_dir(self._roots.get(o.datastore, self._run_root), base, o.name, attempt)
                          for o in step.outputs},
            log_upload=self._log_upload(locations, step_run_id),
            inputs=tuple(inputs), interpreter=step.environment.get("interpreter_path") or "",
            fingerprint=fp, fingerprint_parts=parts, cacheable=step.allow_reuse,
            datasets=datasets, datastore_locations=locations, env_cache=self._folders["envs"],
            kept_code=self._folders["kept_code"],
            stop_run_on_failure=not self.run["continue_on_step_failure"],
            pending_inputs=pending_inputs, hand_over_early=hand_over_early,
        )

    def _log_upload(self, locations: dict[str, Any], step_run_id: str) -> dict[str, Any] | None:
        """Where the step's logs go when it ends, if the default datastore is an object store."""
        if self._default_store in self._roots:
            return None
        self._add_location(locations, self._default_store)
        return {"datastore": self._default_store, "path": f"{run_dir(self.run_id, step_run_id)}/logs"}

    def _add_location(self, locations: dict[str, Any], name: str) -> None:
        if name not in locations:
            loc = self.ctx.datastore_location(name)
            locations[name] = {"kind": loc.kind, "config": loc.config, "secrets": loc.secrets}

    def _outputs_present(self, source_id: str, step: StepSpec) -> dict[str, dict[str, Any]] | None:
        """The earlier outputs (by name, as the store has them) if they still exist, unchanged
        since they were committed; else None."""
        outs = q.get_outputs(self.ctx.store, source_id)
        if {o.name for o in step.outputs} - outs.keys():
            return None
        for name, o in list(outs.items()):
            if pending_owner(o["digest"]):  # committed before it was digested: its consumers need the digest
                outs[name] = o = {**o, "digest": self._resolved(o)}
            if o["digest"].startswith(CHANGED):  # changed after its commit, before its digest
                return None
            if o["datastore"] not in self._roots:  # an object store: listed as it was committed
                if not _remote_unchanged(self.ctx.datastore_location(o["datastore"]), o["path"], o.get("stat_signature")):
                    return None
                continue
            path = os.path.join(self._roots[o["datastore"]], o["path"])  # (strings: a rerun asks this of every output)
            if not os.path.exists(path):
                return None
            if o.get("stat_signature") and not stat_signature_matches(path, o["stat_signature"]):
                return None
        return outs

    def started(self, step: StepSpec) -> None:
        self.running.add(step.name)
        self._check_ready(step.name)  # running: no longer ready

    def finished(self, step_name: str, status: Status, withdrawn: bool = False) -> None:
        """``withdrawn``: the compute did not start it because another step of the run failed there,
        a failure the engine hears of next: it waits for it, rather than being dispatched again."""
        self.running.discard(step_name)
        for consumer in self._released.pop(step_name, ()):  # counted again below, if it succeeded
            self._unmet[consumer] += 1
            self._check_ready(consumer)
        placed = self._outputs.get(self.step_ids[step_name])
        if placed and (not status.is_success or any(o["digest"].startswith(PENDING_DIGEST) for o in placed.values())):
            # what it placed was never committed, or is read back from the store (as committed)
            del self._outputs[self.step_ids[step_name]]
        if status == Status.QUEUED and withdrawn and not self._halted():
            self._held.add(step_name)
            return
        if status == Status.QUEUED:  # stopped by its agent, not ended: it runs again
            self._check_ready(step_name)
            return
        self._set_status(step_name, status)
        if status == Status.FAILED and self.failed_step is None:
            self.failed_step = step_name

    def dispatch_failed(self, step: StepSpec, reason: str) -> None:
        q.update_status(self.ctx.store, self.step_ids[step.name], Status.FAILED, reason)
        self.finished(step.name, Status.FAILED)

    def begin_cancel(self) -> None:
        self.canceling = True

    def release_held(self) -> bool:
        """Steps held for a failure that never came (nothing of the run runs, and it goes on) are
        ready again; True when there were any (the engine dispatches them, and the run is not done)."""
        if not self._held or self.running or self._halted():
            return False
        for name in sorted(self._held):
            self._check_ready(name)
        self._held.clear()
        return True

    def is_done(self) -> bool:
        return not self.running and not self.has_ready() and (not self._held or self._halted())

    def finish(self, owner: str) -> tuple[Status, list[str]]:
        """Record the end, in one transaction: the reuses decided and not yet recorded (see
        ``record_reuses``), why the steps that never ran did not, and the pipeline's final status,
        which also ends its lease (``owner``'s). Returns the final status and the steps whose reuse
        the store refused (as ``record_reuses``)."""
        records, self._reuses = self._reuses, []
        if records:
            try:
                return self._end(owner, records)
            except Exception:  # nothing was recorded: the reuses alone, then the end (an error of its own is raised)
                self._reuses = records
                refused = self.record_reuses()  # (a failure fails their steps, saying why)
                final, more = self._end(owner, [])
                return final, refused + more
        return self._end(owner, [])

    def _end(self, owner: str, reuses: list[q.ReuseRecord]) -> tuple[Status, list[str]]:
        moves: list[q.StatusMove] = []
        for step in self.spec.steps:
            st = self.status[step.name]
            if st.is_terminal:
                continue
            if self.canceling:
                moves.append((self.step_ids[step.name], Status.CANCELED, "pipeline run canceled", {}))
                continue
            failed_up = [u for u in _all_upstream(self.spec, step.name) if self.status[u] == Status.FAILED]
            if failed_up:
                reason = f"not run: upstream step {failed_up[0]!r} failed"
            elif self.failed_step:
                reason = f"not run: the pipeline stopped after step {self.failed_step!r} failed"
            else:
                reason = "not run"
            moves.append((self.step_ids[step.name], Status.NOT_STARTED, reason, {}))
        failed = [n for n, s in self.status.items() if s == Status.FAILED]
        if self.canceling or any(s == Status.CANCELED for s in self.status.values()):
            final, reason = Status.CANCELED, "canceled"
        elif failed:
            final, reason = Status.FAILED, "failed step(s): " + ", ".join(failed)
        elif all(s.is_success for s in self.status.values()):
            final, reason = Status.COMPLETED, None
        else:
            final, reason = Status.FAILED, "some steps could not run"
        with self.ctx.store.fast_write() as conn:  # prebuilt statements only
            refused = q.record_reuses_in(conn, reuses) if reuses else []
            ended = q.set_statuses(conn, [*moves, (self.run_id, final, reason, {})])[-1]
            if not ended:
                q.release_lease_in(conn, self.run_id, owner)  # it had ended otherwise: the lease still ends
        self.recorded_end = final if ended else None
        if self.canceling:  # (only once recorded: a transaction that failed is made again)
            for step_run_id, status, _, _ in moves:
                self._set_status(self._names[step_run_id], status)
        return final, [self._names[i] for i in refused]


def _destination(o: Any, base: str, step_run_id: str) -> str:
    """Where an output is committed in its datastore: its destination template, or the run's folder."""
    if not o.destination:
        return f"{base}/outputs/{o.name}"
    return o.destination.replace("{run-id}", step_run_id).replace("{output-name}", o.name).strip("/")


def _remote_unchanged(loc: Any, path: str, signature: str | None) -> bool:
    """Whether the output is still in its object store as committed (its files' listing, ETags
    included; one committed by an older Cairn, with no signature: that it exists)."""
    from cairn.data.datasets import listing_signature
    from cairn.storage.datastores import remote_path

    try:
        if signature is None:
            fs, root = loc.filesystem()
            return bool(fs.exists(remote_path(root, path)))
        return listing_signature(loc, path) == signature
    except Exception:  # an unreachable store cannot be reused from: the step runs (and says why)
        return False


def _all_upstream(spec: GraphSpec, name: str) -> list[str]:
    seen: list[str] = []
    frontier = list(spec.step(name).upstream())
    while frontier:
        n = frontier.pop()
        if n not in seen:
            seen.append(n)
            frontier.extend(spec.step(n).upstream())
    return seen

