"""``cairn debug``: recreate a step exactly as it ran — its snapshot, environment, inputs,
arguments and environment variables — in a local folder, to run it in the foreground (so
``breakpoint()`` works) or by hand with the ``debug.sh`` written there.

The recreated step never writes into the recorded run: ``Run.get_context()`` gives an offline run
(it prints what it would log; its workspace is the recorded one, to read), outputs go to
``.cairn_debug/outputs/`` in the folder, and inputs the run used in place (committed outputs, a
local datastore's files) are copies of its own (hard links to the read-only files of an input too
large to copy, see ``_private_view``)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cairn.core.errors import NotFoundError, UserInputError
from cairn.core.status import TERMINAL, Status
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
# What a step always gets from Cairn, whatever the shell that runs debug.sh has
_STEP_OWN = ("PYTHONUNBUFFERED", "PYTHONPATH")
_STEP_OWN_PREFIXES = ("CAIRN_", "AML_PARAMETER_")


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
    if Status(row["status"]) not in TERMINAL:
        log(f"warning: step {step.name!r} is {row['status']}: its run has not ended; it is recreated as it "
            f"was dispatched")
    source = Path(step.source_directory).resolve()
    if target == source or source in target.parents:
        raise UserInputError(f"--dir {target} is inside the step's source folder {source}: the next run would "
                             f"snapshot the recreated files; choose a folder outside it (the default is "
                             f"{layout.dot / 'debug' / step_run_id})")
    if target.exists() and not target.is_dir():
        raise UserInputError(f"{target} is a file; --dir must name a new folder (or one `cairn debug` made, with "
                             f"--force)")
    if target.exists() and any(target.iterdir()):
        if not force:
            raise UserInputError(f"{target} already exists and is not empty; pass --force to replace it, or "
                                 f"--dir to choose another folder")
        if not (target / DEBUG_MARKER).is_dir():
            raise UserInputError(f"{target} was not made by `cairn debug` (it has no {DEBUG_MARKER} folder): "
                                 f"--force replaces only such folders; choose another --dir")
    resolved = None
    if is_managed(step.environment):  # built before an old folder goes: a build that fails leaves it
        try:
            resolved = EnvironmentCache(job.env_cache).resolve(step.environment, step.environment.get("name", "?"),
                                                               log)
        except EnvironmentBuildError as exc:
            raise UserInputError(f"environment {step.environment.get('name')!r} could not be built: {exc}") from None
    try:
        if target.exists():
            shutil.rmtree(target)
        (target / DEBUG_MARKER).mkdir(parents=True)
    except OSError as exc:
        if resolved is not None:
            resolved.close()
        raise UserInputError(f"cannot make {target}: {exc.strerror or exc}; choose another --dir") from None
    materialize(job.manifest, ObjectStore(job.objects_root), target)
    # cached inputs stay held (not evicted) until this process exits: through the foreground run
    inputs = materialize_inputs(job, target, holds=[])
    for name, path in inputs.items():
        inputs[name] = _private_view(name, path, target, log)
    outputs = {}
    for o in step.outputs:
        Path(job.staging_dirs[o.name]).mkdir(parents=True, exist_ok=True)
        outputs[o.name] = job.staging_dirs[o.name]
    env = step_environment(job, outputs, inputs, resolved)
    for name in _RUN_BINDINGS:
        env.pop(name, None)
    env["CAIRN_DEBUG_OF"] = step_run_id
    env["CAIRN_DEBUG_WORKSPACE"] = str(layout.root)  # the offline run's workspace, to read
    interpreter = resolved.python if resolved else (job.interpreter or _current_python())
    argv = [interpreter, step.script_name, *resolve_arguments(job, inputs)]
    own = set(dict(step.environment_variables)) | set(step.environment.get("environment_variables") or {})
    own |= {k for k in env if k.startswith(_STEP_OWN_PREFIXES) or k in _STEP_OWN}
    if resolved is not None:
        own |= {"PATH", *resolved.step_variables()}
    changed = {k: v for k, v in env.items() if os.environ.get(k) != v or k in own}
    removed = sorted(k for k in os.environ if k not in env)
    script = target / DEBUG_MARKER / "debug.sh"  # not in the snapshot's folder: it may have a file so named
    script.write_text(_shell_script(step.name, row["parent_id"], step_run_id, changed, removed, argv))
    script.chmod(0o755)
    return DebugPlan(target, step.name, Status(row["status"]).value, argv, env, changed, removed, script,
                     inputs, outputs, resolved)


def _shell_script(step: str, run_id: str, step_run_id: str, changed: dict[str, str], removed: list[str],
                  argv: list[str]) -> str:
    """debug.sh: the step's variables (``env``: any name, not only those sh can export), then its
    command, from the recreated folder."""
    lines = ["#!/bin/sh", f"# step {step!r} of pipeline run {run_id} (step run {step_run_id}), recreated by "
             f"`cairn debug`; run it from anywhere, with extra arguments if you like",
             'cd "$(dirname "$0")/.." || exit', "exec env \\"]
    lines += [f"  -u {shlex.quote(name)} \\" for name in removed]
    lines += [f"  {shlex.quote(f'{k}={v}')} \\" for k, v in sorted(changed.items()) if _env_name_ok(k)]
    lines.append(f'  {shlex.join(argv)} "$@"')
    return "\n".join(lines) + "\n"


def _env_name_ok(name: str) -> bool:
    """A name ``env NAME=VALUE`` can set (not empty, no '=', not taken for an option)."""
    return bool(name) and "=" not in name and not name.startswith("-") and re.search(r"\s", name) is None


def _private_view(name: str, path: str, folder: Path, log: Any) -> str:
    """Where the recreated step sees input ``name``: its own copy when the run used the recorded
    files in place (hard links to the read-only ones instead, for an input over
    ``CAIRN_DEBUG_COPY_LIMIT`` bytes and a user other than root), else ``path`` (already its own)."""
    real = Path(path).resolve()
    if real == folder or folder in real.parents:
        return path
    if not real.exists():
        raise UserInputError(f"input {name}: {path} does not exist any more (deleted since the run?): the step "
                             f"cannot be recreated as it ran")
    given = Path(path)
    inside = folder in given.parents  # a path_on_compute link to the recorded files: the view replaces it
    # a file keeps the name the step sees (a script may read it by its suffix)
    view = given if inside else folder / DEBUG_MARKER / "inputs" / name / (given.name if real.is_file() else "")
    files = _input_files(real)
    size = sum(st.st_size for _, _, st in files)
    root = os.geteuid() == 0 if hasattr(os, "geteuid") else False  # root writes read-only files
    limit = int(os.environ.get("CAIRN_DEBUG_COPY_LIMIT", str(2 << 30)))
    link = not root and size > limit  # a link shares the file: its owner could still chmod and write it
    how = (f"copies of its {len(files)} files ({size / 1e6:.1f} MB)" if not link else
           f"hard links to its read-only files and copies of the others ({size / 1e6:.1f} MB, over "
           f"CAIRN_DEBUG_COPY_LIMIT: do not make them writable, they are the recorded ones)")
    log(f"input {name}: {real} seen through {how} in {view}")
    if inside:
        given.unlink()
    for src, rel, _ in files:
        dst = view / rel if rel else view
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link and not os.access(src, os.W_OK):
            try:
                os.link(src, dst)
                continue
            except OSError:  # another file system, or links not allowed: a copy
                pass
        shutil.copy2(src, dst)
    if not files:
        view.mkdir(parents=True, exist_ok=True)
    return str(view)


def _input_files(real: Path) -> list[tuple[str, str, os.stat_result]]:
    """(path, path relative to the input, stat) of the files an input holds, links followed (a link
    back up the tree is not: no loop)."""
    if real.is_file():
        return [(str(real), "", real.stat())]
    found: list[tuple[str, str, os.stat_result]] = []
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [(str(real), "", frozenset())]
    while stack:
        folder, rel, above = stack.pop()
        st = os.stat(folder)
        here = (st.st_dev, st.st_ino)
        if here in above:  # a link back up the tree
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.is_dir():  # follows a link: it must not lead back into recorded files
                        stack.append((entry.path, f"{rel}{entry.name}/", above | {here}))
                    elif entry.is_file():
                        found.append((entry.path, f"{rel}{entry.name}", entry.stat()))
                except OSError:  # a dangling link: nothing there
                    continue
    return found


def _current_python() -> str:
    import sys

    return sys.executable
