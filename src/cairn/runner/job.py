"""A step job: everything the runner needs to execute one step, as plain JSON-able data."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from cairn.core.spec import StepSpec, step_from_dict

# An input's digest while its producer is still digesting it (see ``StepJob.pending_inputs``)
PENDING_DIGEST = "pending:"


# An output that changed after its commit, before it was digested (``engine/late_digests.py``)
CHANGED = "changed:"


def pending_digest(step_run_id: str) -> str:
    """What the record of an output committed before it was digested says until it is
    (``engine/late_digests.py``; the output's name tells one step's outputs apart: a digest
    column holds no more than a step run's id)."""
    return f"{PENDING_DIGEST}{step_run_id}"


def pending_owner(digest: str) -> str | None:
    """The step run that committed an output of this pending digest; None for a digest."""
    if not digest.startswith(PENDING_DIGEST):
        return None
    return digest[len(PENDING_DIGEST):].partition("/")[0]  # (a running step's placed form adds "/output")


def digest_status(digest: str) -> str:
    """What an output's recorded digest is: ``"made"`` (a content digest), ``"pending"`` (committed
    before it was digested; its agent, or the next run that needs it, makes it) or ``"changed"``
    (it changed after its commit, before it was digested: it keys nothing)."""
    if digest.startswith(PENDING_DIGEST):
        return "pending"
    return "changed" if digest.startswith(CHANGED) else "made"


class InputHandoffError(Exception):
    """An input handed over before it was digested never got its digest (its producer failed)."""


@dataclass(frozen=True)
class InputLocation:
    name: str
    path: str  # absolute, local to the machine that runs the step
    # PENDING_DIGEST + producer step run (+ "/" + output, while the producer runs) until it is digested
    digest: str
    mode: str = "mount"
    # a committed output given in place (not copied): its stat signature at commit, checked again
    # when the step ends (it must not have changed it)
    stat_signature: str | None = None


@dataclass(frozen=True)
class StepJob:
    workspace: str  # workspace root folder
    experiment: str
    pipeline_run_id: str
    step_run_id: str
    attempt: int
    step: dict[str, Any]  # a StepSpec as a dict
    manifest: dict[str, Any]  # the snapshot manifest to materialise
    objects_root: str
    work_dir: str  # where the snapshot is materialised (the step's working directory)
    log_dir: str  # absolute: stdout.txt, stderr.txt, system.txt
    datastore_roots: dict[str, str]  # datastore name -> absolute local root
    output_dirs: dict[str, str]  # output name -> datastore-relative committed folder
    staging_dirs: dict[str, str]  # output name -> datastore-relative staging folder
    inputs: tuple[InputLocation, ...] = ()
    interpreter: str = ""
    fingerprint: str = ""
    fingerprint_parts: dict[str, Any] = field(default_factory=dict)
    cacheable: bool = True
    # dataset inputs: name -> {"kind", "definition", "mode", "path_on_compute"}; and the datastores
    # they read, with credentials (the job lives in the agent's memory only)
    datasets: dict[str, Any] = field(default_factory=dict)
    datastore_locations: dict[str, Any] = field(default_factory=dict)
    log_upload: dict[str, Any] | None = None  # {"datastore", "path"}: copy the logs there at the end
    env_cache: str = ""  # where built environments live on the machine that runs the step
    kept_code: str = ""  # where spare interpreters keep compiled step scripts ("": not kept)
    stop_run_on_failure: bool = True  # the run stops when a step fails (not continue_on_step_failure)
    die_with_runner: bool = False  # the step's process is killed if its runner dies (a Ray node of another machine)
    # (input, producer step run, output, the producer's attempt) of inputs handed over while their
    # producer was still digesting them (no step of this one's definition was cached, so no digest
    # could make it reusable): its fingerprint is made when they are digested, before its outputs
    # are committed
    pending_inputs: tuple[tuple[str, str, str, int], ...] = ()
    # large outputs are placed, reported and then digested (a consumer may start meanwhile)
    hand_over_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @cached_property
    def spec(self) -> StepSpec:
        """The step's spec, parsed once per job."""
        return step_from_dict(self.step)


@dataclass(frozen=True)
class StepResult:
    step_run_id: str
    status: str  # Completed | Failed | Canceled
    reason: str | None = None
    exit_code: int | None = None
    # Completed: the outputs recorded with it (``commit_output``'s records), so that the engine
    # locates its consumers' inputs without reading back what it was told
    outputs: tuple[dict[str, Any], ...] | None = None
