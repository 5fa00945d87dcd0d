"""``cairn debug``: recreate a step exactly as it ran — its snapshot, environment, inputs,
arguments and environment variables — in a local folder, to run it in the foreground (so
``breakpoint()`` works) or by hand with the ``debug.sh`` written there.

The recreated step never writes into the recorded run: ``Run.get_context()`` gives an offline run
(it prints what it would log), and outputs go to ``.cairn_debug/outputs/`` in the folder."""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cairn.core.errors import NotFoundError, UserInputError
from cairn.core.status import Status
from cairn.engine.context import EngineContext
from cairn.engine.scheduler import PipelineScheduler
from cairn.environments.build import EnvironmentBuildError, EnvironmentCache, ResolvedEnvironment
from cairn.environments.spec import is_managed
from cairn.runner.execute import materialize_inputs, resolve_arguments, step_environment
from cairn.storage.layout import WorkspaceLayout
from cairn.storage.objects import ObjectStore
from cairn.storage.snapshot import materialize
from cairn.store import queries as q

DEBUG_MARKER = ".cairn_debug"  # what marks a folder as made by `cairn debug` (--force may replace it)
# The recorded run is not this one: without these, Run.get_context() is an offline run.
_RUN_BINDINGS = ("CAIRN_RUN_ID", "CAIRN_WORKSPACE", "CAIRN_PIPELINE_RUN_ID", "CAIRN_LOG_DIR")


@dataclass
class DebugPlan:
    folder: Path
    step_name: str
    status: str
    argv: list[str]
    env: dict[str, str]
    changed: dict[str, str]  # what differs from this process's environment
    removed: list[str]
    script: Path
    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    environment: ResolvedEnvironment | None = None

    def close(self) -> None:
        if self.environment is not None:
            self.environment.close()


def prepare_debug(root: str | os.PathLike[str], step_run_id: str, folder: str | os.PathLike[str] | None = None,
                  *, force: bool = False, log: Any = print) -> DebugPlan:
    layout = WorkspaceLayout(root)
    ctx = EngineContext.open(layout)
    row = q.get_run(ctx.store, step_run_id)
    if row is None:
        raise NotFoundError(f"no run {step_run_id!r} in this workspace")
    if row["kind"] != "step":
        raise UserInputError(f"{step_run_id} is a pipeline run; debug one of its steps (`cairn runs show "
                             f"{step_run_id}` lists their ids)")
    scheduler = PipelineScheduler(ctx, row["parent_id"], resume=False)
    step = scheduler.spec.step(row["name"])
    # by default inside .cairn/: a folder beside the sources could end up in the next snapshot
    target = Path(folder) if folder else layout.dot / "debug" / step_run_id
    target = target.resolve()
    try:
        job = scheduler.debug_job(step, target)  # everything is checked before anything is removed
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        if not force:
            raise UserInputError(f"{target} already exists and is not empty; pass --force to replace it, or "
                                 f"--dir to choose another folder")
        if not (target / DEBUG_MARKER).is_dir():
            raise UserInputError(f"{target} was not made by `cairn debug` (it has no {DEBUG_MARKER} folder): "
                                 f"--force replaces only such folders; choose another --dir")
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / DEBUG_MARKER).mkdir(exist_ok=True)
    materialize(job.manifest, ObjectStore(job.objects_root), target)
    # cached inputs stay held (not evicted) until this process exits: through the foreground run
    inputs = materialize_inputs(job, target, holds=[])
    outputs = {}
    for o in step.outputs:
        Path(job.staging_dirs[o.name]).mkdir(parents=True, exist_ok=True)
        outputs[o.name] = job.staging_dirs[o.name]
    resolved = None
    if is_managed(step.environment):
        try:
            resolved = EnvironmentCache(job.env_cache).resolve(step.environment, step.environment.get("name", "?"),
                                                               log)
        except EnvironmentBuildError as exc:
            raise UserInputError(f"environment {step.environment.get('name')!r} could not be built: {exc}") from None
    env = step_environment(job, outputs, inputs, resolved)
    for name in _RUN_BINDINGS:
        env.pop(name, None)
    env["CAIRN_DEBUG_OF"] = step_run_id
    interpreter = resolved.python if resolved else (job.interpreter or _current_python())
    argv = [interpreter, step.script_name, *resolve_arguments(job, inputs)]
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v}
    removed = sorted(k for k in os.environ if k not in env)
    script = target / "debug.sh"
    lines = ["#!/bin/sh", f"# step {step.name!r} of pipeline run {row['parent_id']} (step run {step_run_id}), "
             f"recreated by `cairn debug`", 'cd "$(dirname "$0")"']
    lines += [f"unset {name}" for name in removed]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(changed.items())]
    lines.append(f'exec {shlex.join(argv)} "$@"')
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return DebugPlan(target, step.name, Status(row["status"]).value, argv, env, changed, removed, script,
                     inputs, outputs, resolved)


def _current_python() -> str:
    import sys

    return sys.executable
