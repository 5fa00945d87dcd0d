"""``cairn debug``: recreate a step exactly as it ran — its snapshot, environment, inputs,
arguments and environment variables — in a local folder, to run it in the foreground (so
``breakpoint()`` works) or by hand with the ``.cairn_debug/debug.sh`` written there.

The folder has the step's working folder (``work/``: its snapshot, as in a run) and, beside it,
``.cairn_debug/``: the script, the step's outputs and its own copies of inputs. The recreated step
never writes into the recorded run: ``Run.get_context()`` gives an offline run (it prints what it
would log; its workspace is the recorded one, to read), and inputs the run used in place (committed
outputs, a local datastore's files, this machine's input cache) are copies of its own (hard links to
the read-only files of an input too large to copy, see ``_private_view``)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cairn.core.errors import NotFoundError, UserInputError
from cairn.core.status import TERMINAL, Status
from cairn.data import datasets as ds_core
from cairn.engine.context import EngineContext
from cairn.engine.scheduler import PipelineScheduler
from cairn.environments.build import EnvironmentBuildError, EnvironmentCache, ResolvedEnvironment
from cairn.environments.spec import is_managed
from cairn.runner.execute import (
    CHANGED_IN_PLACE,
    ISOLATED_DROPS,
    docker_refusal,
    materialize_inputs,
    resolve_arguments,
    start_environment,
    step_environment,
)
from cairn.runner.inherited import load as load_inherited
from cairn.runner.inherited import value_digest
from cairn.storage.layout import WorkspaceLayout
from cairn.storage.objects import ObjectStore
from cairn.storage.secrets import ENV_KEY
from cairn.storage.snapshot import materialize, never_snapshotted, snapshot_folders
from cairn.store import queries as q

DEBUG_MARKER = ".cairn_debug"  # what marks a folder as made by `cairn debug` (--force may replace it)
WORK = "work"  # the step's working folder in it: its snapshot (and downloaded inputs), as in a run
# The recorded run is not this one: without these, Run.get_context() is an offline run.
_RUN_BINDINGS = ("CAIRN_RUN_ID", "CAIRN_WORKSPACE", "CAIRN_PIPELINE_RUN_ID", "CAIRN_LOG_DIR")
# What a step always gets from Cairn, whatever the shell that runs debug.sh has
_STEP_OWN = ("PYTHONUNBUFFERED", "PYTHONPATH")
_STEP_OWN_PREFIXES = ("CAIRN_", "AML_PARAMETER_")


@dataclass
class DebugPlan:
    folder: Path  # what `cairn debug` made: work/ and .cairn_debug/ (debug.sh, inputs, outputs)
    work: Path  # the step's working folder
    step_name: str
    status: str
    reason: str | None  # why it ended as it did in its run (a failure's reason)
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
    refused = docker_refusal(step)
    if refused:  # as its run did: it would run on this machine, not in the container it asks for
        raise UserInputError(f"step {step.name!r} cannot be recreated here: {refused}")
    # by default inside .cairn/: a folder beside the sources could end up in the next snapshot
    default = layout.dot / "debug" / step_run_id
    if folder is not None and not os.fspath(folder).strip():  # (not the current folder: Path("") is ".")
        raise UserInputError("--dir is empty: name a folder (a new one, or one `cairn debug` made, with --force), "
                             "or leave --dir out for .cairn/debug/<step run id>")
    target = (Path(folder) if folder else default).resolve()
    work, tools = target / WORK, target / DEBUG_MARKER
    try:
        job = scheduler.debug_job(step, work, tools)  # everything is checked before anything is removed
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    copy_limit = _copy_limit()
    local_stores = [Path(root).resolve() for root in job.datastore_roots.values()]
    others = [Path(s.source_directory).resolve() for s in scheduler.spec.steps if s.name != step.name]
    _check_target(target, Path(step.source_directory).resolve(), job.inputs, local_stores, layout.dot / "debug",
                  "--dir " if folder else "", default)
    _check_cairn_folders(target, layout.dot, others, "--dir " if folder else "", default)
    if target.exists() and not target.is_dir():
        raise UserInputError(f"{target} is a file; --dir must name a new folder (or one `cairn debug` made, with "
                             f"--force)")
    if target.exists() and any(target.iterdir()):
        if not tools.is_dir():  # never replaced: --force would not help
            raise UserInputError(f"{target} is not empty and was not made by `cairn debug` (it has no "
                                 f"{DEBUG_MARKER} folder): it is never replaced; choose another --dir (a new or "
                                 f"empty folder)")
        if not force:
            raise UserInputError(f"{target} already exists (an earlier `cairn debug` made it); pass --force to "
                                 f"replace it, or --dir to choose another folder")
    # the arguments are checked: now what the run was, then what differs from it
    reason = row.get("status_reason")
    if reason and row["status"] != Status.COMPLETED.value:
        repeats = "" if CHANGED_IN_PLACE not in reason else \
            " (the recreated step's inputs are its own copies, or hard links to the read-only files of one over " \
            "CAIRN_DEBUG_COPY_LIMIT: this failure is not repeated here)"
        log(f"in its run: {row['status']}: {reason}{repeats}")
    job = _check_datasets(job, step, ctx, log)
    for name, producer in scheduler.changed_inputs(step):
        log(f"warning: input {name}: the output of step {producer!r} it reads changed since it was committed (a "
            f"step wrote into it?); the recreated step reads it as it is now")
    if Status(row["status"]) not in TERMINAL:
        log(f"warning: step {step.name!r} is {row['status']}: its run has not ended; it is recreated as it "
            f"was dispatched")
    resolved = None
    if is_managed(step.environment):  # built before an old folder goes: a build that fails leaves it
        try:
            resolved = EnvironmentCache(job.env_cache).resolve(step.environment, step.environment.get("name", "?"),
                                                               log)
        except EnvironmentBuildError as exc:
            raise UserInputError(f"environment {step.environment.get('name')!r} could not be built: {exc}") from None
    try:
        inputs = _make_folder(job, target, log, copy_limit)
    except BaseException:
        if resolved is not None:
            resolved.close()
        raise
    outputs = {}
    for o in step.outputs:
        Path(job.staging_dirs[o.name]).mkdir(parents=True, exist_ok=True)
        outputs[o.name] = job.staging_dirs[o.name]
    inherited, recorded = _inherited(layout, ctx.store, row, step.name, log)
    env = step_environment(job, outputs, inputs, resolved, start_environment(job, resolved, inherited))
    _direct_datasets_read_copies(env, inputs)
    for name in _RUN_BINDINGS:
        env.pop(name, None)
    env["CAIRN_DEBUG_OF"] = step_run_id
    env["CAIRN_DEBUG_WORKSPACE"] = str(layout.root)  # the offline run's workspace, to read
    interpreter = resolved.python if resolved else (job.interpreter or _current_python())
    argv = [interpreter, step.script_name, *resolve_arguments(job, inputs)]
    changed, removed = _script_variables(step, env, resolved, recorded)
    script = tools / "debug.sh"  # not in the working folder: the snapshot may have a file so named
    # it holds the step's variables: for this user only, from the start
    fd = os.open(script, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with open(fd, "w", encoding="utf-8", errors="surrogateescape") as f:  # variables may be any bytes
        os.fchmod(fd, 0o700)
        f.write(_shell_script(step.name, row["parent_id"], step_run_id, changed, removed, argv,
                              [o.name for o in step.outputs], tools))
    return DebugPlan(target, work, step.name, Status(row["status"]).value, row.get("status_reason"), argv, env,
                     changed, removed, script, inputs, outputs, resolved)


def _check_datasets(job: Any, step: Any, ctx: EngineContext, log: Any) -> Any:
    """A dataset names files in a datastore: refuse one whose files are gone or cannot be listed
    (before an earlier folder is replaced), say which have changed since the run, and return the
    job that reads those as they are now."""
    now: dict[str, str] = {}
    for d in step.dataset_inputs:
        try:
            files = ds_core.resolve_files(d.definition, ctx.datastore_location)
        except Exception as exc:
            raise UserInputError(f"input {d.name}: its files cannot be listed now ({type(exc).__name__}: {exc}); "
                                 f"the step cannot be recreated until they can") from None
        if not files and ds_core.content_digest(files) != d.content_digest:
            raise UserInputError(f"input {d.name}: its files are gone since the run (the dataset names "
                                 f"{_dataset_paths(d.definition)}); restore them to recreate the step")
        now[d.name] = ds_core.content_digest(files)
        if now[d.name] != d.content_digest:
            log(f"warning: input {d.name}: its files changed since the run (the run read {d.content_digest}, they "
                f"are {now[d.name]} now); the recreated step reads them as they are now")
    inputs = [replace(i, digest=now[i.name]) if i.name in now else i for i in job.inputs]
    return replace(job, inputs=inputs)


def _direct_datasets_read_copies(env: dict[str, str], inputs: dict[str, str]) -> None:
    """A dataset given in direct mode is the Dataset, which names its datastore's files: in the
    recreated step it names the copies of them (one ``local_copy`` entry: the folder, each file where
    the dataset had it), as every other input is the step's own copy."""
    datasets = json.loads(env.get("CAIRN_DATASETS") or "{}")
    direct = [name for name, d in datasets.items() if d["mode"] == "direct" and name in inputs]
    for name in direct:
        datasets[name]["definition"] = {**datasets[name]["definition"], "paths": [{"local_copy": inputs[name]}]}
    if direct:
        env["CAIRN_DATASETS"] = json.dumps(datasets)


def _dataset_paths(definition: dict[str, Any]) -> str:
    return ", ".join(e.get("url") or e.get("local_copy") or f"{e.get('datastore')}:{e.get('path') or '.'}"
                     for e in definition["paths"])


def _make_folder(job: Any, target: Path, log: Any, copy_limit: int) -> dict[str, str]:
    """The folder made anew (an earlier one replaced): the snapshot in work/, the inputs; returns
    where the step sees each input."""
    work, tools = Path(job.work_dir), target / DEBUG_MARKER
    try:
        if target.exists():
            shutil.rmtree(target)
        tools.mkdir(parents=True)
        work.mkdir()
    except OSError as exc:
        raise UserInputError(f"cannot make {target}: {exc.strerror or exc}; choose another --dir") from None
    try:
        materialize(job.manifest, ObjectStore(job.objects_root), work)
        # cached inputs stay held (not evicted) until this process exits: through the foreground run
        inputs = materialize_inputs(job, work, holds=[])
        return {name: _private_view(name, path, target, log, copy_limit) for name, path in inputs.items()}
    except OSError as exc:  # an input that went away since the checks, a full disk
        raise UserInputError(f"could not recreate the step's files in {target}: {exc}; the folder is incomplete "
                             f"(run again with --force once fixed)") from None


def _inherited(layout: WorkspaceLayout, store: Any, row: dict[str, Any], step: str, log: Any
               ) -> tuple[dict[str, str] | None, set[str]]:
    """What the step inherited from its agent's variables, as recorded (None: not recorded, this
    process's are used), and the names recorded with their values. A secret-looking variable was
    recorded as a digest: this shell's value is used, said when it is another or missing."""
    ident = row.get("inherited_env")
    if not ident and row.get("reused_from"):  # a reused step ran as the one it reuses
        ident = (q.get_run(store, row["reused_from"]) or {}).get("inherited_env")
    loaded = load_inherited(layout.dot, ident or "")
    if loaded is None:
        log(f"warning: the variables step {step!r} inherited from its agent were not recorded (it ran on Ray, "
            f"or before Cairn recorded them): the recreated step inherits this shell's instead")
        return None, set()
    record, salt = loaded
    env: dict[str, str] = {}
    for name, value in record.items():
        if isinstance(value, str):
            env[name] = value
            continue
        here = os.environ.get(name)
        if here is None:
            log(f"warning: {name} was set in the step's run (it looks secret: only a digest of its value was "
                f"recorded, not the value); set it in this shell to give it to the recreated step")
            continue
        env[name] = here
        if value_digest(name, here, salt) != value.get("digest"):
            log(f"warning: {name} had another value in the step's run (it looks secret: only a digest of its "
                f"value was recorded, not the value); this shell's is used")
    # what this shell has and the run had not is added (`ASK=1 cairn debug ID` adds a variable)
    extra = sorted(k for k in os.environ if k not in record and k not in _RUN_BINDINGS)
    env.update({k: os.environ[k] for k in extra})
    if extra:
        log(f"this shell adds {len(extra)} variable(s) the step's run did not have: {', '.join(extra[:10])}"
            + (", ..." if len(extra) > 10 else ""))
    return env, {k for k, v in record.items() if isinstance(v, str)}


def _script_variables(step: Any, env: dict[str, str], resolved: ResolvedEnvironment | None,
                      recorded: set[str]) -> tuple[dict[str, str], list[str]]:
    """What debug.sh sets (what differs from this shell, and the step's own whatever the shell has,
    those it inherited from its agent included, ``recorded``) and unsets (what the step lacks: never
    the recorded run's bindings, nor, for an isolated environment, what its run does not inherit)."""
    own = set(dict(step.environment_variables)) | set(step.environment.get("environment_variables") or {})
    own |= recorded
    own |= {k for k in env if k.startswith(_STEP_OWN_PREFIXES) or k in _STEP_OWN}
    if resolved is not None:
        own |= {"PATH", *resolved.step_variables()}
    # (never the workspace's secret key: a script file is no place for it; run it from a shell that has it)
    changed = {k: v for k, v in env.items() if (os.environ.get(k) != v or k in own) and k != ENV_KEY}
    isolated = ISOLATED_DROPS if resolved is not None else ()
    removed = sorted({*(k for k in os.environ if k not in env), *_RUN_BINDINGS, *(k for k in isolated if k not in env)})
    return changed, removed


def _check_target(target: Path, source: Path, inputs: list[Any], local_stores: list[Path], debug_root: Path,
                  flag: str, default: Path) -> None:
    """Refuse a folder whose files would change what a run reads: one the step's next snapshot
    would take (inside its source folder, or a folder a link there leads to, unless ignored as .cairn/
    is), inside one of its inputs, or inside a local datastore (recorded outputs and data)."""
    inside = target.is_relative_to  # (the folder itself or below it)

    if inside(source) and not never_snapshotted(source, target):
        raise UserInputError(f"{flag}{target} is inside the step's source folder {source}: the next run would "
                             f"snapshot the recreated files; choose a folder outside it (the default is {default})")
    if not inside(source) and _reached_by_a_link(source, target):
        raise UserInputError(f"{flag}{target} is in a folder that a link in the step's source folder {source} "
                             f"leads to: the next run would snapshot the recreated files; choose another folder")
    for i in inputs:
        if not i.path:
            continue
        real = Path(i.path).resolve()
        if not real.exists():
            raise UserInputError(f"input {i.name}: {i.path} does not exist any more (deleted since the run?): the "
                                 f"step cannot be recreated as it ran")
        if inside(real):
            raise UserInputError(f"{flag}{target} is inside the step's input folder {real} (input {i.name}): the "
                                 f"recreated files would change the recorded data; choose a folder outside it")
    for store in local_stores:
        if inside(store) and not inside(debug_root):
            raise UserInputError(f"{flag}{target} is inside the local datastore folder {store}: the recreated files "
                                 f"would change recorded data; choose a folder outside it (the default is {default})")


def _check_cairn_folders(target: Path, dot: Path, other_sources: list[Path], flag: str, default: Path) -> None:
    """Refuse a folder inside the workspace's own (``.cairn/`` but its ``debug/``), or inside the
    source folder of another step of the run (its next snapshot would take the files)."""
    inside = target.is_relative_to  # (the folder itself or below it)

    if inside(dot.resolve()) and not inside((dot / "debug").resolve()):
        raise UserInputError(f"{flag}{target} is inside the workspace's own folder {dot.resolve()} (its store, "
                             f"objects and working folders); choose a folder outside it (the default is {default})")
    for source in other_sources:
        if inside(source) and not never_snapshotted(source, target):
            raise UserInputError(f"{flag}{target} is inside {source}, the source folder of another step of this "
                                 f"run: its next run would snapshot the recreated files; choose a folder outside it "
                                 f"(the default is {default})")


def _reached_by_a_link(source: Path, target: Path) -> bool:
    """Whether ``target`` is in a folder that a snapshot of the source folder as it is now would
    take files from (through a link); a source gone or unreadable since the run has none."""
    existing = next(p for p in (target, *target.parents) if p.exists())
    try:
        return source.is_dir() and str(existing.resolve()) in snapshot_folders(source)
    except (OSError, UserInputError):
        return False


def _copy_limit() -> int:
    value = os.environ.get("CAIRN_DEBUG_COPY_LIMIT", str(2 << 30))
    try:
        return int(value)
    except ValueError:
        raise UserInputError(f"CAIRN_DEBUG_COPY_LIMIT must be a number of bytes (as 2147483648), not {value!r}") from None


def _shell_script(step: str, run_id: str, step_run_id: str, changed: dict[str, str], removed: list[str],
                  argv: list[str], outputs: list[str], tools: Path) -> str:
    """debug.sh: empty outputs, the step's variables (``env``: any name, not only those sh can
    export), then its command, from the step's working folder. Its folders are written in full (the
    arguments and variables name them anyway): a link to the script, or CDPATH, changes nothing."""
    gone = f"debug.sh: {tools.parent}, the folder it was written for, is gone (moved?): run `cairn debug` again"
    lines = ["#!/bin/sh", f"# step {step!r} of pipeline run {run_id} (step run {step_run_id}), recreated by "
             f"`cairn debug`; run it from anywhere, with extra arguments if you like.",
             "# Each run starts with empty outputs, as the step did; inputs (copies) and the working folder keep "
             "what earlier runs changed: `cairn debug --force` recreates them.",
             f"[ -d {shlex.quote(str(tools.parent / WORK))} ] || {{ echo {shlex.quote(gone)} >&2; exit 1; }}"]
    if os.path.isabs(argv[0]):  # a managed environment's interpreter goes with `cairn env prune`
        missing = (f"debug.sh: the step's interpreter {argv[0]} is gone (its environment was pruned?): run "
                   f"`cairn debug {step_run_id} --force` again, which builds it")
        lines.append(f"[ -x {shlex.quote(argv[0])} ] || {{ echo {shlex.quote(missing)} >&2; exit 1; }}")
    if outputs:
        folders = " ".join(shlex.quote(str(tools / "outputs" / name)) for name in outputs)
        lines.append("# (its folders are written in full: run it from anywhere, but do not move or copy the folder)")
        lines.append(f"rm -rf {shlex.quote(str(tools / 'outputs'))} && mkdir -p {folders} || exit")
    lines += [f"cd -P -- {shlex.quote(str(tools.parent / WORK))} || exit", "exec env \\"]
    lines += [f"  -u {shlex.quote(name)} \\" for name in removed]
    lines.append("  -- \\")  # a name may start with "-"
    lines += [f"  {shlex.quote(f'{k}={v}')} \\" for k, v in sorted(changed.items()) if k and "=" not in k]
    if "=" in argv[0]:  # env would read it as one more variable: a shell starts it instead
        lines.append("  /bin/sh -c 'exec \"$0\" \"$@\"' " + shlex.join(argv) + ' "$@"')
    else:
        lines.append(f'  {shlex.join(argv)} "$@"')
    return "\n".join(lines) + "\n"


def _private_view(name: str, path: str, folder: Path, log: Any, limit: int) -> str:
    """Where the recreated step sees input ``name``: its own copy of whatever the run used in place
    (the recorded files, or this machine's input cache) — hard links to the read-only ones instead
    for an input over ``CAIRN_DEBUG_COPY_LIMIT`` bytes and a user other than root. An input that the
    run's layout puts in the working folder (downloaded, ``path_on_compute``, a glob's files) stays
    there, its links out of ``folder`` replaced by copies."""
    given = Path(path)
    if folder in given.parents:
        for link in _links_out(given, folder):
            _copy_into(name, link, link, log, limit)
        return path
    real = given.resolve()
    # a file keeps the name the step sees (a script may read it by its suffix)
    view = folder / DEBUG_MARKER / "inputs" / name / (given.name if real.is_file() else "")
    _copy_into(name, given, view, log, limit)
    return str(view)


def _links_out(path: Path, folder: Path) -> list[Path]:
    """The symbolic links at or below ``path`` (not followed) that lead out of ``folder``."""
    def out(link: Path) -> bool:
        real = link.resolve()
        return real != folder and folder not in real.parents

    if path.is_symlink():
        return [path] if out(path) else []
    found = []
    for top, folders, files in os.walk(path):
        found += [Path(top, n) for n in (*folders, *files) if os.path.islink(os.path.join(top, n))
                  and out(Path(top, n))]
    return found


def _copy_into(name: str, source: Path, view: Path, log: Any, limit: int) -> None:
    """Copy what ``source`` holds (links followed) to ``view``; ``source`` may be ``view`` itself, a
    link that the copy replaces."""
    real = source.resolve()
    if not real.exists():
        raise UserInputError(f"input {name}: {source} does not exist any more (deleted since the run?): the step "
                             f"cannot be recreated as it ran")
    files, folders = _input_files(real)
    size = sum(st.st_size for _, _, st in files)
    root = os.geteuid() == 0 if hasattr(os, "geteuid") else False  # root writes read-only files
    link = not root and size > limit  # a link shares the file: its owner could still chmod and write it
    how = (f"copies of its {len(files)} files ({size / 1e6:.1f} MB)" if not link else
           f"hard links to its read-only files and copies of the others ({size / 1e6:.1f} MB, over "
           f"CAIRN_DEBUG_COPY_LIMIT: do not make them writable, they are the recorded ones)")
    log(f"input {name}: {real} seen through {how} in {view}")
    if source.is_symlink():
        source.unlink()
    for rel in folders:
        (view / rel).mkdir(parents=True, exist_ok=True)
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


def _input_files(real: Path) -> tuple[list[tuple[str, str, os.stat_result]], list[str]]:
    """(path, path relative to the input, stat) of the files an input holds, and its folders (empty
    ones count: they are content), links followed (a link back up the tree is not: no loop)."""
    if real.is_file():
        return [(str(real), "", real.stat())], []
    found: list[tuple[str, str, os.stat_result]] = []
    folders = [""]
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [(str(real), "", frozenset())]
    while stack:
        folder, rel, above = stack.pop()
        st = os.stat(folder)
        here = (st.st_dev, st.st_ino)
        if here in above:  # a link back up the tree
            continue
        if rel:
            folders.append(rel)
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if entry.is_dir():  # follows a link: it must not lead back into recorded files
                        stack.append((entry.path, f"{rel}{entry.name}/", above | {here}))
                    elif entry.is_file():
                        found.append((entry.path, f"{rel}{entry.name}", entry.stat()))
                except OSError:  # a dangling link: nothing there
                    continue
    return found, folders


def _current_python() -> str:
    import sys

    return sys.executable
