"""The compute protocol the engine dispatches step jobs to, and the registry of kinds."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol

from cairn.runner.execute import StepControl, StepReporter
from cairn.runner.job import StepJob, StepResult

DoneCallback = Callable[[StepResult], None]

# kind -> "module:Class", imported only when a target of that kind is used (Ray is heavy).
KNOWN_KINDS: dict[str, str] = {
    "local": "cairn.compute.local:LocalCompute",
    "ray": "cairn.compute.ray:RayCompute",
}


class Compute(Protocol):
    name: str

    def free_slots(self) -> int:
        """How many more steps it can take now."""

    def submit(self, job: StepJob, reporter: StepReporter, control: StepControl,
               done: DoneCallback) -> None:
        """Start the job without blocking; call ``done`` (from any thread) when it ends."""

    def shutdown(self) -> None: ...


def make_compute(name: str, kind: str, config: dict[str, Any]) -> Compute:
    if kind not in KNOWN_KINDS:
        raise ValueError(f"compute target {name!r} has unknown kind {kind!r}; known: {sorted(KNOWN_KINDS)}")
    module, cls = KNOWN_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), cls)(name=name, **config)
