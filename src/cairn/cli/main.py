"""``cairn`` commands. Exit codes scripts can rely on:

0 success; 1 the run failed or was canceled; 2 a usage or input error; 3 timed out waiting; 130 interrupted.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cairn.core.errors import CairnError, RunFailedError, RunTimeoutError

EXIT_OK, EXIT_RUN_FAILED, EXIT_USER_ERROR, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

app = typer.Typer(help="Cairn: create, run and watch ML pipelines.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
runs_app = typer.Typer(help="List and inspect runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
datasets_app = typer.Typer(help="Registered datasets and their lineage.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
env_app = typer.Typer(help="Environments: registered, curated and built.", no_args_is_help=True)
app.add_typer(env_app, name="env")
# No markup nor emoji codes in what Cairn prints: paths, names and reasons are the user's ("[draft]",
# ":memo:" print as written); styles are given as Text
console = Console(markup=False, emoji=False)
if not console.is_terminal:  # piped output: never cut ids and paths that scripts read
    console = Console(width=200, markup=False, emoji=False)
# messages are never folded by Cairn (a terminal shows a long line whole; a path copied from it or
# read from a pipe stays in one piece)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)

WorkspaceOption = typer.Option(None, "--workspace", "-w", help="workspace folder (default: found from here upwards)")


def _workspace(path: Path | None) -> Any:
    from cairn.client.workspace import Workspace

    return Workspace.from_config(path)


def _fmt_time(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _duration(row: dict[str, Any]) -> str:
    if row.get("started_at") and row.get("ended_at"):
        return f"{row['ended_at'] - row['started_at']:.2f}s"
    if row.get("started_at"):
        return f"{time.time() - row['started_at']:.0f}s…"
    return "-"


_STYLE = {"Completed": "green", "Reused": "cyan", "Failed": "red", "Canceled": "yellow", "Running": "blue"}


def _error(message: str, label: str = "error:", style: str = "red") -> Text:
    return Text.assemble((label, style), " ", message)


def _status(s: str) -> Text:
    return Text(s, style=_STYLE.get(s, "white"))


def _digest_shown(output: Any) -> str:
    """An output's digest, or why there is none (yet) (engine/late_digests.py)."""
    if output.digest_status == "pending":
        return "digest pending: made after the step's commit, by its agent (or when a run needs it)"
    if output.digest_status == "changed":
        return "no digest: it changed after the step's commit, before it was digested"
    return output.digest


def _where(output: Any) -> str:
    return str(output.local_path) if output.local_path else f"{output.datastore_name}:{output.path_on_datastore}"


def _resume_if_orphaned(ws: Any, rows: list[dict[str, Any]]) -> None:
    """A run shown as active needs a live agent: if none serves, start one (it resumes the run)."""
    if any(r["status"] in ("Queued", "Preparing", "Running", "Finalizing") for r in rows):
        ws._backend.ensure_progress()


@app.command()
def init(path: Path = typer.Argument(Path("."), help="folder to make the workspace in")) -> None:
    """Make an embedded workspace (.cairn/) in PATH."""
    from cairn.client.workspace import Workspace

    ws = Workspace.create(path)
    console.print(Text.assemble("Workspace ready in ", (str(ws.location), "bold"),
                                f" (default datastore {ws.get_default_datastore().name!r}, compute target 'local')"))


@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_file(ctx: typer.Context,
             pipeline_file: Path = typer.Argument(..., help="a Python file that builds and submits a pipeline"),
             follow: bool = typer.Option(True, help="follow the submitted runs to their end"),
             timeout: float = typer.Option(None, help="seconds to wait in all before giving up (exit code 3)")) -> None:
    """Run PIPELINE_FILE (extra arguments are passed to it), then follow every pipeline run it submitted."""
    import runpy

    from cairn.client import experiment as exp_module

    if not pipeline_file.is_file():
        raise CairnError(f"pipeline file {str(pipeline_file)!r} does not exist")
    from cairn.client import follow as follow_module

    exp_module.SUBMITTED = []
    deadline = None if timeout is None else time.monotonic() + timeout
    follow_module.WAIT_DEADLINE = deadline  # the file's own wait_for_completion() ends by then too
    sys.argv = [str(pipeline_file), *ctx.args]
    sys.path.insert(0, str(pipeline_file.resolve().parent))
    try:
        runpy.run_path(str(pipeline_file), run_name="__main__")
    except SystemExit as exc:  # `sys.exit(main())` is a normal end; a failure code is passed on
        if exc.code not in (None, 0):
            raise typer.Exit(exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR) from None
    except CairnError:  # (a RunTimeoutError of the file's own wait: exit code 3)
        raise
    except Exception as exc:  # a bug in the user's file: show where (its frames, not Cairn's), exit as an input error
        _print_user_error(exc, pipeline_file)
        raise typer.Exit(EXIT_USER_ERROR) from None
    runs, exp_module.SUBMITTED = list(exp_module.SUBMITTED or []), None
    if not runs:
        err.print("the file submitted no pipeline run", style="yellow")
        return
    if not follow:
        for r in runs:
            console.print(f"submitted pipeline run {r.id} (experiment {r.experiment.name})")
        return
    from cairn.client.follow import SHOWN_TO_THE_END

    failed = False
    for r in runs:
        if r.id in SHOWN_TO_THE_END:  # the file followed it itself (wait_for_completion(show_output=True))
            failed |= r.get_status() in ("Failed", "Canceled")
            continue
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            r.wait_for_completion(show_output=True, timeout_seconds=left, raise_on_error=True)
        except RunFailedError as exc:
            err.print(str(exc), style="red", highlight=False)
            failed = True
    if failed:
        raise typer.Exit(EXIT_RUN_FAILED)


def _print_user_error(exc: BaseException, pipeline_file: Path) -> None:
    """Python's own report of an error in the user's pipeline file, from its first frame there on
    (a syntax error: the file, line and caret)."""
    import os
    import traceback

    if isinstance(exc, SyntaxError):
        text = "".join(traceback.format_exception_only(type(exc), exc))
    else:
        tb, mine = exc.__traceback__, os.path.realpath(pipeline_file)
        while tb is not None and os.path.realpath(tb.tb_frame.f_code.co_filename) != mine:
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))
    sys.stderr.write(text)
    err.print(_error(f"{pipeline_file} stopped with {type(exc).__name__} (see above)"), highlight=False)


@runs_app.command("list")
def runs_list(experiment: str = typer.Option(None, "--experiment", "-e", help="only this experiment's runs"),
              limit: int = typer.Option(20, help="how many of the most recent runs (at least 1)"),
              workspace: Path = WorkspaceOption) -> None:
    """The most recent pipeline runs."""
    if limit < 1:
        raise CairnError(f"--limit must be at least 1, not {limit}")
    ws = _workspace(workspace)
    table = Table("run", "experiment", "status", "created", "duration", "steps")
    listed = ws._backend.list_runs(experiment, limit + 1)
    more, listed = len(listed) > limit, listed[:limit]
    if not listed and experiment:  # an empty answer, with what there is
        known = sorted(ws.experiments)
        err.print(f"no runs in experiment {experiment!r}" + (f" (experiments: {', '.join(known)})" if known
                                                             else " (this workspace has no runs yet)"), highlight=False)
        return
    _resume_if_orphaned(ws, listed)
    for r in listed:
        children = ws._backend.get_children(r["id"])
        done = sum(1 for c in children if c["status"] in ("Completed", "Reused"))
        reused = sum(1 for c in children if c["status"] == "Reused")
        table.add_row(r["id"], r["experiment"], _status(r["status"]), _fmt_time(r["created_at"]), _duration(r),
                      f"{done}/{len(children)}" + (f" ({reused} reused)" if reused else ""))
    console.print(table)
    if more:
        err.print(f"the {limit} most recent runs; --limit N shows more", highlight=False)


@runs_app.command("show")
def runs_show(run_id: str, workspace: Path = WorkspaceOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """A run's status, steps, outputs, tags, properties and metrics."""
    ws = _workspace(workspace)
    run = ws.get_run(run_id)
    _resume_if_orphaned(ws, [run._row()])
    details = run.get_details()
    steps = run.get_steps() if hasattr(run, "get_steps") else []
    if as_json:
        details["steps"] = [s.get_details() | {"outputs": {n: _where(o) for n, o in s.get_outputs().items()},
                                               "metrics": s.get_metrics()} for s in steps]
        if not steps and hasattr(run, "get_outputs"):
            details["outputs"] = {n: _where(o) for n, o in run.get_outputs().items()}
        details["metrics"] = run.get_metrics()
        console.print_json(json.dumps(details, default=str))
        return
    row = run._row()
    console.print(Text.assemble((run_id, "bold"), f"  {row['kind']} run '{row['name']}' in experiment "
                                                 f"'{row['experiment']}'"))
    console.print(Text.assemble("status: ", _status(row["status"]),
                                f" — {row['status_reason']}" if row["status_reason"] else ""))
    console.print(f"created {_fmt_time(row['created_at'])}, duration {_duration(row)}")
    if steps:
        table = Table("step", "status", "duration", "step run", "note")
        for s in steps:
            r = s._row()
            note = f"reused {r['reused_from']}" if r["reused_from"] else (r["status_reason"] or "")
            table.add_row(r["name"], _status(r["status"]), _duration(r), s.id, note)
        console.print(table)
    for s in (steps or [run]):  # a pipeline's: each step's, named by step
        who = f"{s._row()['name']}." if steps else ""
        for name, o in s.get_outputs().items():
            digest = _digest_shown(o)
            console.print(f"output {who}{name}: {_where(o)} ({o.size} bytes, {digest})", highlight=False,
                          soft_wrap=True)  # a path stays whole, to copy
    for title, values in (("tags", details["tags"]), ("properties", details["properties"])):
        if values:
            console.print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    metrics = run.get_metrics(recursive=bool(steps))
    if steps:
        names = {s.id: s._row()["name"] for s in steps}
        for rid, m in metrics.items():
            if m:
                console.print(f"metrics of {names.get(rid, 'pipeline')}: {_metrics_summary(m)}", highlight=False)
    elif metrics:
        console.print(f"metrics: {_metrics_summary(metrics)}", highlight=False)


SHOWN_VALUES = 5  # a metric logged more often than this is summed up (--json has every value)


def _metrics_summary(metrics: dict[str, Any]) -> str:
    """Each metric in a few words: a scalar as it is, a long series as its count, last, min and max."""
    said = []
    for name, value in metrics.items():
        numbers = [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)] \
            if isinstance(value, list) else []
        if isinstance(value, list) and len(value) > SHOWN_VALUES and len(numbers) == len(value):
            said.append(f"{name}: {len(value)} values, last {value[-1]:g}, min {min(numbers):g}, max {max(numbers):g}")
        elif isinstance(value, list) and len(value) > SHOWN_VALUES:
            said.append(f"{name}: {len(value)} values, last {json.dumps(value[-1], default=str)}")
        else:
            said.append(f"{name}: {json.dumps(value, default=str)}")
    return "; ".join(said)


@datasets_app.command("list")
def datasets_list(workspace: Path = WorkspaceOption) -> None:
    """Registered datasets (latest versions)."""
    ws = _workspace(workspace)
    table = Table("dataset", "version", "kind", "files", "size", "digest", "registered")
    for d in ws._backend.list_datasets():
        table.add_row(d["name"], str(d["version"]), d["kind"], str(d["file_count"]), f"{d['size']:,} B",
                      d["content_digest"][:20] + "…", _fmt_time(d["created_at"]))
    console.print(table)


@datasets_app.command("show")
def datasets_show(name: str, workspace: Path = WorkspaceOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """A dataset's versions, digests, and the runs that produced and consumed each."""
    ws = _workspace(workspace)
    versions = ws._backend.dataset_lineage(name)
    if as_json:
        console.print_json(json.dumps(versions, default=str))
        return
    for v in versions:
        console.print(Text.assemble((name, "bold"), f" version {v['version']} ({v['kind']}, {v['file_count']} files, "
                                    f"{v['size']:,} B) id {v['id']}, registered {_fmt_time(v['created_at'])}"),
                      highlight=False)
        console.print(f"  digest {v['content_digest']}", highlight=False)
        for label, runs in (("produced by", v["produced_by"]), ("consumed by", v["consumed_by"])):
            for r in runs:
                changed = " (its files had changed since it was registered)" if r.get("files_changed") else ""
                console.print(f"  {label} step {r['step']!r} ({r['step_run_id']}) of pipeline run "
                              f"{r['pipeline_run_id']} as {r['as']!r}: {r['status']}{changed}", highlight=False)
            if not runs:
                console.print(f"  {label}: none", highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@env_app.command("list")
def env_list(workspace: Path = WorkspaceOption) -> None:
    """Registered and curated environments (latest versions), and what is built in the cache."""
    from cairn.client.environment import Environment
    from cairn.environments.spec import cache_key, is_managed

    ws = _workspace(workspace)
    built = {e["key"]: e for e in ws._backend.built_environments()}
    shown = set()
    table = Table("environment", "version", "kind", "python", "packages", "built", "size", "last used")
    for name, env in sorted(Environment.list(ws).items()):
        try:
            spec = env.to_spec()
        except CairnError as exc:  # e.g. a registered interpreter that is gone: say so, list the rest
            table.add_row(name, str(env.version or "-"), "?", "?", f"cannot be used: {exc}", "-", "-", "-")
            continue
        key = cache_key(spec) if is_managed(spec) else None
        entry = built.get(key) if key else None
        shown.add(key)
        packages = ", ".join(spec.get("pip") or []) if is_managed(spec) else "(as installed)"
        table.add_row(name, str(env.version or "-"), spec["kind"], spec["python"], packages or "-",
                      ("yes " + key) if entry else ("no" if key else "-"),
                      _size(entry["size"]) if entry else "-", _fmt_time(entry["last_used"]) if entry else "-")
    for key, entry in sorted(built.items()):
        if key not in shown:  # built for a run from an unregistered Environment(...)
            table.add_row(f"{entry['name']} (unregistered)", "-", "managed", entry["spec"].get("python", "?"),
                          ", ".join(entry["spec"].get("pip") or []) or "-", "yes " + key, _size(entry["size"]),
                          _fmt_time(entry["last_used"]))
    console.print(table)


@env_app.command("build")
def env_build(name: str, version: int = typer.Option(None, "--version", help="registered version (default: latest)"),
              workspace: Path = WorkspaceOption) -> None:
    """Build an environment into the workspace's cache now, printing the build log."""
    from cairn.client.environment import Environment

    ws = _workspace(workspace)
    env = Environment.get(ws, name, version)
    build = env.build(ws, show_output=True)
    console.print(f"environment {name!r} is built: {build.folder}", highlight=False)


@env_app.command("prune")
def env_prune(dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be removed"),
              workspace: Path = WorkspaceOption) -> None:
    """Remove built environments that no unfinished run needs (they are rebuilt when asked for)."""
    ws = _workspace(workspace)
    sizes = {e["key"]: (e["name"], e["size"]) for e in ws._backend.built_environments()}
    removed, busy = ws._backend.prune_environments(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for key in removed:
        name, size = sizes.get(key, ("(unfinished build)", 0))
        console.print(f"{verb} {key} ({name}, {_size(size)})", highlight=False)
    for key in busy:
        console.print(f"kept {key}: a step is using it now", highlight=False)
    total = sum(sizes.get(k, ("", 0))[1] for k in removed)
    console.print(f"{verb} {len(removed)} environment(s), {_size(total)}; {len(busy)} in use", highlight=False)


@app.command()
def logs(run_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="keep printing until the run ends"),
         system: bool = typer.Option(False, "--system", help="also show the system log (with --follow: at the end)"),
         environment: bool = typer.Option(False, "--environment", help="also show the environment build log"),
         workspace: Path = WorkspaceOption) -> None:
    """Print the logs of a step run (or of every step of a pipeline run)."""
    from cairn.client.follow import follow as follow_run

    ws = _workspace(workspace)
    run = ws.get_run(run_id)
    row = run._row()
    backend = ws._backend
    steps = [run] if row["parent_id"] else None
    if follow:  # (the environment's build log is shown as it is written anyway)
        status = follow_run(backend, row["parent_id"] or run_id, show_output=True, raise_on_error=False,
                            only_step=run_id if row["parent_id"] else None)
        for s in (steps or run.get_steps()) if system else []:  # written through the end: shown after it
            text, _ = backend.read_log(s.id, "system")
            console.print(f"--- {s._row()['name']}: system ---", style="dim")
            sys.stdout.write(text)
        sys.stdout.flush()
        if status in ("Failed", "Canceled"):
            raise typer.Exit(EXIT_RUN_FAILED)
        return
    steps = steps or run.get_steps()
    for s in steps:
        srow = s._row()
        source = srow["reused_from"] or s.id
        env_failed = srow["status"] == "Failed" and (srow["status_reason"] or "").startswith("environment ")
        kinds = (["environment"] if environment or env_failed else []) + ["stdout", "stderr"] + \
            (["system"] if system else [])
        if len(steps) > 1:
            console.rule(f"{srow['name']} ({s.id}) {srow['status']}")
        for which in kinds:
            text, _ = backend.read_log(source if which in ("stdout", "stderr") else s.id, which)
            if not text and which == "environment" and environment:
                err.print(f"{srow['name']}: no environment build log (its environment needed no build)", style="dim")
            if text:
                if len(steps) > 1 or len(kinds) > 1:
                    console.print(f"--- {which} ---", style="dim")
                sys.stdout.write(text)
        sys.stdout.flush()


@app.command()
def debug(step_run_id: str,
          folder: str = typer.Option(None, "--dir", help="where to recreate the step (default: .cairn/debug/<step run id>)"),
          print_only: bool = typer.Option(False, "--print", help="only prepare the folder, and print the script that runs the step"),
          force: bool = typer.Option(False, "--force", help="replace the folder if it exists"),
          workspace: Path = WorkspaceOption) -> None:
    """Recreate a step as it ran (snapshot, environment, inputs, arguments, variables) and run it here,
    in the foreground, so breakpoint() works; --print only prints the command. Exits with the step's
    exit code."""
    import shlex
    import signal
    import subprocess

    from cairn.engine.debug import prepare_debug

    ws = _workspace(workspace)
    plan = prepare_debug(ws.location, step_run_id, folder, force=force, log=lambda line: err.print(line, highlight=False))
    try:
        err.print(f"step {plan.step_name!r} ({plan.status}) recreated in {plan.folder} (its working folder: "
                  f"{plan.work})", highlight=False)
        for name, path in plan.inputs.items():
            err.print(f"  input {name}: {path}", highlight=False)
        for name, path in plan.outputs.items():
            err.print(f"  output {name}: {path}", highlight=False)
        if print_only:
            sys.stdout.write(f"{plan.script}\n")  # the path as it is: "$(cairn debug ID --print)" runs it
            sys.stdout.flush()
            err.print(f"# it empties the outputs, sets the step's variables, then runs from "
                      f"{shlex.quote(str(plan.work))}: "
                      f"{shlex.join(plan.argv)}", highlight=False, soft_wrap=True)
            err.print(f"# to run it: {shlex.quote(str(plan.script))}", highlight=False, soft_wrap=True)
            return
        err.print(f"running: {shlex.join(plan.argv)}", highlight=False, soft_wrap=True)
        # Ctrl-C is the step's (pdb stops where it is): this process waits on. A handler, not SIG_IGN,
        # which the step would inherit.
        previous = signal.signal(signal.SIGINT, lambda _signum, _frame: None)
        try:
            code = subprocess.run(plan.argv, cwd=plan.work, env=plan.env).returncode
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        plan.close()
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal has no name
            name = f"signal {-code}"
        err.print(f"the step was killed by {name} (exit {128 - code})", highlight=False)
    else:
        err.print(f"the step exited with code {code}", highlight=False)
    if code != 0:
        raise typer.Exit(code if code > 0 else 128 - code)  # killed by a signal: the shell's 128 + N


@app.command()
def cancel(run_id: str, workspace: Path = WorkspaceOption) -> None:
    """Cancel a run (a step run's ID cancels its pipeline run)."""
    ws = _workspace(workspace)
    run = ws.get_run(run_id)
    target = run.parent or run
    if target.get_status() in ("Completed", "Failed", "Canceled"):
        console.print(f"run {target.id} already ended ({target.get_status()}): nothing to cancel")
        return
    run.cancel()
    console.print(f"cancel requested for {target.id} (now {target.get_status()})")


@app.command()
def explain(step_run_id: str, workspace: Path = WorkspaceOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Why a step ran or was reused: its fingerprint parts and what changed."""
    ws = _workspace(workspace)
    info = ws._backend.explain(step_run_id)
    if as_json:
        console.print_json(json.dumps(info))
        return
    console.print(Text.assemble((info["step"], "bold"), f" ({step_run_id}): ", _status(info["status"])))
    console.print(info["summary"])
    for change in info["changes"]:
        console.print(f"  • {change}")
    if info["parts"]:
        table = Table("part", "value", title=f"fingerprint {info['fingerprint']}")
        for k, v in info["parts"].items():
            table.add_row(k, v if isinstance(v, str) else json.dumps(v))
        console.print(table)


@app.command()
def agent(workspace: Path = WorkspaceOption,
          idle_timeout: float = typer.Option(0, help="seconds without work before exiting (0: never)"),
          max_concurrency: int = typer.Option(None, help="override the local target's concurrency"),
          stop: bool = typer.Option(False, "--stop", help="stop the agent that serves the workspace instead "
                                                          "(its running steps go back to the queue)"),
          status: bool = typer.Option(False, "--status", help="say whether an agent serves the workspace: its "
                                                              "pid, since when, the runs it runs, its log (exit "
                                                              "1 if none does)")) -> None:
    """Run the workspace's agent in the foreground (normally started on demand), stop it, or say
    whether one serves the workspace."""
    from cairn.engine.agent import Agent
    from cairn.engine.client import _request, stop_agent
    from cairn.storage.layout import WorkspaceLayout

    if stop and status:
        err.print(_error("--stop and --status ask for two things: give one"), highlight=False)
        raise typer.Exit(EXIT_USER_ERROR)
    ws = _workspace(workspace)
    layout = WorkspaceLayout(ws.location)
    other = _request(layout, {"op": "ping"})
    if status:
        _agent_status(ws.location, layout.agent_log, other)
        return
    if stop:
        if not stop_agent(layout):
            console.print(f"no agent serves {ws.location}", highlight=False)
            return
        pid = f" (pid {other.get('pid')})" if other else ""
        console.print(f"stopped the agent{pid} of {ws.location}; runs it had not finished wait in the queue "
                      f"for the next agent (started by the next submit, `cairn runs list` or `cairn agent`)",
                      highlight=False)
        return
    if other is not None:
        err.print(_error(f"another agent (pid {other.get('pid')}) already serves {ws.location}; stop it first "
                         f"(`cairn agent --stop`) or let it serve"), highlight=False)
        raise typer.Exit(EXIT_USER_ERROR)
    console.print(f"agent serving {ws.location} (Ctrl-C to stop)")
    from cairn.backend.relay import ScriptService
    from cairn.backend.through_agent import serve_scripts

    raise typer.Exit(Agent(layout, idle_timeout or None, max_concurrency, script_service=ScriptService,
                           serve_scripts=serve_scripts).serve())


def _agent_status(location: str, log: Path, agent: dict[str, Any] | None) -> None:
    if agent is None:
        console.print(f"no agent serves {location}; one starts with the next submit, `cairn runs list` or "
                      f"`cairn agent` (its log: {log})", highlight=False)
        raise typer.Exit(EXIT_RUN_FAILED)
    since = agent.get("since")
    started = ""
    if isinstance(since, (int, float)):
        up = int(max(0.0, time.time() - since))
        started = f" since {_fmt_time(since)} (up {up // 3600}h {up // 60 % 60:02d}m {up % 60:02d}s)"
    runs = agent.get("runs") or []
    running = f"runs {len(runs)} run(s): {', '.join(runs)}" if runs else "runs nothing now"
    console.print(f"agent pid {agent.get('pid')} (cairn {agent.get('version')}) serves {location}{started}; "
                  f"{running}; its log: {log}", highlight=False)


@app.command()
def demo(path: Path = typer.Argument(Path("cairn-demo"), help="folder for the demo workspace"),
         regenerate: bool = typer.Option(False, help="run every step again (no reuse)")) -> None:
    """Run the demo pipeline: prepare -> train three models in parallel -> compare."""
    from cairn.demo.pipeline import run_demo

    status = run_demo(path, regenerate=regenerate, console=console)
    if status != "Completed":
        raise typer.Exit(EXIT_RUN_FAILED)


def _click_exceptions() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """typer may bundle its own copy of click (and not install click at all): catch the classes it
    really raises, and click's where click is installed."""
    errors: list[type[BaseException]] = []
    aborts: list[type[BaseException]] = [getattr(typer, "Abort", KeyboardInterrupt)]
    try:
        from typer._click.exceptions import ClickException  # type: ignore[import-not-found]

        errors.append(ClickException)
    except ImportError:
        pass
    try:
        import click

        errors.append(click.exceptions.ClickException)
        aborts.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(errors), tuple(aborts)


def main() -> None:
    click_error, click_abort = _click_exceptions()
    try:
        rc = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except RunTimeoutError as exc:
        err.print(_error(str(exc), "timeout:", "yellow"), highlight=False)
        sys.exit(EXIT_TIMEOUT)
    except RunFailedError as exc:
        err.print(str(exc), style="red", highlight=False)
        sys.exit(EXIT_RUN_FAILED)
    except (CairnError, OSError, ValueError) as exc:
        err.print(_error(str(exc)), highlight=False)
        sys.exit(EXIT_USER_ERROR)
    except (KeyboardInterrupt, *click_abort):
        from cairn.client import follow

        if not follow.INTERRUPT_EXPLAINED:
            err.print("interrupted (runs go on in the background; `cairn cancel ID` stops one)")
        sys.exit(EXIT_INTERRUPTED)
    except click_error as exc:
        exc.show()  # type: ignore[attr-defined]
        sys.exit(EXIT_USER_ERROR)
    sys.exit(rc if isinstance(rc, int) else EXIT_OK)


if __name__ == "__main__":
    main()
