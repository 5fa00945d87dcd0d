"""Cairn side by side with Prefect, Kedro, Metaflow, Luigi and Dagster, and the bare floor, on the same shapes.

    .venv/bin/python benchmarks/peers/bench_peers.py [--repeat 3] [--tools ...] [--shapes ...]

Installs each peer into its own virtual environment under ``benchmarks/.peers/`` with uv (once; pinned
versions below), then, for each repetition, runs the shapes in order, each in every tool (in an order
rotated from one repetition to the next) before the next, each tool in one fresh state folder:
(a) ``chain`` 20 steps, (c) ``rerun`` the chain with nothing changed (each tool's own reuse),
(d) ``edit`` the chain after editing step 10's script, (b) ``fanout`` 1 -> 50 -> 1, (e) ``dag`` 500
random steps, (f) ``handoff`` of a 1 GiB output between two steps; and (g) ``snapshot`` of a 10,000-file
source folder (Cairn only: no peer snapshots code). Every step is the same script (``work.py``) run as
its own process; every tool runs two at a time. Prints a Markdown table and writes the raw figures
as JSON to ``benchmarks/results/``. See ``benchmarks/README.md``, section "Side by side".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402

PEERS_ROOT = HERE.parent / ".peers"
RESULTS = HERE.parent / "results"
# Pinned so that a later run measures the same peers; Python is the harness's own.
PEERS = {
    "prefect": ["prefect==3.9.1"],
    "kedro": ["kedro==1.7.0"],
    "metaflow": ["metaflow==2.19.39"],
    "luigi": ["luigi==3.8.1"],
    "dagster": ["dagster==1.13.29"],
}
# Runs that take many minutes, made only with --slow: Dagster starts each op in a fresh process
# that imports Dagster and rebuilds the job (~2.5 s per op here): ~10 min per repetition of the DAG.
SLOW = {("dagster", "dag"): "~2.5 s per op (each a fresh process importing Dagster): ~10 min per "
                            "repetition on 2 cores; --slow runs it"}
DRIVERS = {"bare": "bare.py", "cairn": "cairn_driver.py", "cairn-warm": "cairn_driver.py --warm",
           **{p: f"{p}_driver.py" for p in PEERS}}
SHAPE_LABELS = {"chain": "(a) 20-step chain", "fanout": "(b) 1 -> 50 -> 1 fan-out",
                "rerun": "(c) chain, nothing changed", "edit": "(d) chain, step 10 edited",
                "dag": "(e) 500-step random DAG", "handoff": "(f) 1 GiB hand-off",
                "snapshot": "(g) snapshot 10,000 files"}
ORDER = ("chain", "rerun", "edit", "fanout", "dag", "handoff")


def peer_python(tool: str) -> str:
    """The interpreter of the tool's own venv, made (once) with uv ("steps": the steps' own, every
    tool's, with no packages)."""
    if tool in ("bare", "cairn", "cairn-warm"):
        return sys.executable
    venv = PEERS_ROOT / tool
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = " ".join(PEERS.get(tool, ()))
    if not (stamp.exists() and stamp.read_text() == wanted):
        from cairn.environments.build import EnvironmentBuildError, uv_binary

        print(f"installing {wanted} into {venv} ...", file=sys.stderr, flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        try:
            uv = uv_binary()
            subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
            if PEERS.get(tool):
                subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), "--compile-bytecode",
                                *PEERS[tool]], check=True)
        except (subprocess.CalledProcessError, EnvironmentBuildError, OSError) as exc:
            shutil.rmtree(venv, ignore_errors=True)
            why = "uv's error is above" if isinstance(exc, subprocess.CalledProcessError) else str(exc)
            sys.exit(f"could not install {wanted} into {venv} ({why}): check the network and uv's index "
                     f"settings, or leave {tool} out of --tools")
        stamp.write_text(wanted)
    return str(python)


def run_driver(tool: str, shape: str, state: Path) -> dict[str, Any]:
    """One driver process: its own pipeline seconds, its wall time, its peak RSS (the largest single
    process of its tree, from wait4), and how many steps ran (from ran.log)."""
    env = {**os.environ, "BENCH_RAN_LOG": str(state / "ran.log"), "PYTHONUNBUFFERED": "1",
           # every tool's steps start the same interpreter: one venv's being larger (Cairn's, with
           # pandas, Ray, ...: ~1 ms more per start) is no tool's cost
           "BENCH_STEP_PYTHON": peer_python("steps")}
    env.pop("VIRTUAL_ENV", None)
    (state / "ran.log").write_text("")
    # every shape starts with nothing left to write back: the 1 GiB hand-off's dirty pages slowed
    # whichever tool ran next (by ~0.2 s on its chain here)
    os.sync()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        driver, *extra = DRIVERS[tool].split()
        proc = subprocess.Popen([peer_python(tool), str(HERE / "drivers" / driver), *extra, "--shape", shape,
                                 "--state", str(state)], stdout=out, stderr=err, text=True, env=env, cwd=state)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": "\n".join((stderr or stdout).strip().splitlines()[-8:]), "wall": wall}
    result = json.loads(lines[-1])
    ran = [ln for ln in (state / "ran.log").read_text().splitlines() if ln]
    # the largest single process: of the driver's tree, or Cairn's agent (it outlives the driver)
    peak = max(usage.ru_maxrss / 1024, result.get("agent_peak_mb") or 0)
    return {**result, "wall": wall, "peak_rss_mb": peak, "ran": len(ran),
            "ran_names": sorted(ran) if shape == "edit" else None}


def expected_ran(shape: str, earlier: set[str]) -> list[str] | None:
    """The steps Cairn must run in ``shape``, after the ``earlier`` shapes ran in its state folder."""
    names = [name for name, _ in common.chain()]
    if shape not in ("chain", "rerun", "edit"):
        return None
    if shape == "chain" or not earlier & {"chain", "rerun", "edit"}:  # nothing of the chain's cached yet
        return names
    return [] if shape == "rerun" else names[names.index(common.EDITED_STEP):]


def check_cairn(tool: str, shape: str, state: Path, result: dict[str, Any], earlier: set[str]) -> None:
    """Cairn's own rows are checked, not only shown: all of the chain ran, nothing on the rerun,
    exactly steps 10-20 after the edit."""
    wanted = expected_ran(shape, earlier)
    if not tool.startswith("cairn") or wanted is None or "error" in result or result.get("seconds") is None:
        return
    ran = sorted(ln for ln in (state / "ran.log").read_text().splitlines() if ln)
    if ran != sorted(wanted):
        result["wrong"] = (f"ran {len(ran)} step(s) ({', '.join(ran[:3])}{', ...' if len(ran) > 3 else ''}); "
                           f"expected {len(wanted)}")


def stop_agents(states: list[Path]) -> None:
    """Cairn's workspace agents outlive the drivers (idle, between shapes): stopped at the end."""
    for state in states:
        if (state / "cairn-ws").is_dir():
            from cairn.engine.client import stop_agent
            from cairn.storage.layout import WorkspaceLayout

            stop_agent(WorkspaceLayout(state / "cairn-ws"))


def edit_step_10(state: Path) -> None:
    """Edit the 10th step's script so that its output changes."""
    script = common.step_script(state, common.EDITED_STEP)
    text = script.read_text()
    script.write_text(text.replace("SALT = 0", "SALT = 1"))


def snapshot_figures(repeat: int) -> dict[str, list[float]]:
    """(g) Cairn's snapshot of a 10,000-file folder, first time and unchanged; the floor is a walk
    that stats every file (the least an "unchanged?" check must do)."""
    from cairn import Workspace
    from cairn.engine.client import stop_agent
    from cairn.storage.layout import WorkspaceLayout

    figures: dict[str, list[float]] = {"first": [], "unchanged": [], "floor (walk + stat)": []}
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="cairn-bench-snap-") as tmp:
            src = Path(tmp) / "src"
            for i in range(10_000):
                folder = src / f"pkg{i // 500:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"mod{i:05d}.py").write_text(f"VALUE = {i}\n")
            ws = Workspace.create(Path(tmp) / "ws")
            try:
                started = time.perf_counter()
                ws._backend.snapshot(str(src))
                figures["first"].append(time.perf_counter() - started)
                started = time.perf_counter()
                ws._backend.snapshot(str(src))
                figures["unchanged"].append(time.perf_counter() - started)
                started = time.perf_counter()
                for dirpath, _, files in os.walk(src):
                    for f in files:
                        os.stat(os.path.join(dirpath, f))
                figures["floor (walk + stat)"].append(time.perf_counter() - started)
            finally:
                stop_agent(WorkspaceLayout(ws.location))
    return figures


def _repeat(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=_repeat, default=3, help="runs of each shape; the table shows medians "
                        "(default 3)")
    parser.add_argument("--tools", default=",".join(DRIVERS), help="comma-separated, of: " + ", ".join(DRIVERS)
                        + " (default: all; bare and cairn give the ratio columns)")
    parser.add_argument("--shapes", default=",".join((*ORDER, "snapshot")), help="comma-separated, of: "
                        + ", ".join(f"{k} {v[:3]}" for k, v in SHAPE_LABELS.items()) + " (default: all)")
    parser.add_argument("--slow", action="store_true", help="also run what takes many minutes (" +
                        ", ".join(f"{t} {s}" for t, s in SLOW) + ")")
    args = parser.parse_args()
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [t for t in tools if t not in DRIVERS] + [s for s in shapes if s not in SHAPE_LABELS]
    if unknown:
        sys.exit(f"unknown tool or shape: {', '.join(unknown)} (tools: {', '.join(DRIVERS)}; shapes: "
                 f"{', '.join(SHAPE_LABELS)})")
    if not tools or not shapes:
        sys.exit(f"nothing to run: give at least one tool ({', '.join(DRIVERS)}) and one shape "
                 f"({', '.join(SHAPE_LABELS)})")
    if shapes == ["snapshot"] and "cairn" not in tools:
        sys.exit("the snapshot shape is measured for cairn only (no peer snapshots code): add cairn to --tools")
    if {"rerun", "edit"} & set(shapes) and "chain" not in shapes:  # they rerun the chain (a) made
        sys.exit("the shapes rerun (c) and edit (d) run the chain again after (a): add chain to --shapes")
    missing = [t for t in ("bare", "cairn") if t not in tools]
    if missing and shapes != ["snapshot"]:
        print(f"note: without {' and '.join(missing)} in --tools, the ratio columns stay empty", file=sys.stderr)
    for tool in tools:
        peer_python(tool)  # install first: no install is timed
    raw: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        # Each shape runs in every tool before the next shape (in a rotated order from one repetition to
        # the next): the tools compared on a shape run seconds apart, not minutes, on a VM whose speed
        # drifts. Each tool keeps its own state folder through the shapes (they build on each other).
        order = tools[rep % len(tools):] + tools[:rep % len(tools)]
        with contextlib.ExitStack() as folders:
            states = {tool: Path(folders.enter_context(tempfile.TemporaryDirectory(prefix=f"cairn-peers-{tool}-")))
                      for tool in order}
            folders.callback(stop_agents, list(states.values()))  # (before the folders go: callbacks run last first)
            for shape in [s for s in ORDER if s in shapes]:
                for tool in order:
                    state = states[tool]
                    if shape == "edit":
                        edit_step_10(state)
                    if (tool, shape) in SLOW and not args.slow:
                        result = {"seconds": None, "note": f"not run: {SLOW[tool, shape]}", "ran": 0}
                    else:
                        result = run_driver(tool, shape, state)
                        check_cairn(tool, shape, state, result, {r["shape"] for r in raw
                                                                 if r["tool"] == tool and r["rep"] == rep})
                    raw.append({"tool": tool, "shape": shape, "rep": rep, **result})
                    shown = (f"{result['seconds']:.2f} s, ran {result['ran']}" if result.get("seconds") is not None
                             else result.get("note") or "ERROR")
                    print(f"[{rep + 1}/{args.repeat}] {tool:9} {shape:8} {shown}", file=sys.stderr, flush=True)
                    if "error" in result:
                        print(result["error"], file=sys.stderr)
                    if "wrong" in result:
                        print(f"WRONG: {tool} {shape}: {result['wrong']}", file=sys.stderr)
    snapshot = snapshot_figures(args.repeat) if "snapshot" in shapes and "cairn" in tools else {}
    from bench_pipelines import machine

    about, now = machine(), datetime.now(UTC)
    print(f"\n{now:%Y-%m-%d %H:%M} UTC, {about['nproc']} cores ({about['cpu_model'] or 'CPU model unknown'}), "
          f"Python {about['python']}, Cairn commit {about['commit'] or 'unknown'}; median of {args.repeat}")
    print_table(raw, tools, shapes, snapshot)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"peers-{now:%Y%m%dT%H%M%SZ}-{os.getpid()}.json"
    path.write_text(json.dumps({"machine": about, "date": now.isoformat(timespec="seconds"),
                                "peers": PEERS, "raw": raw, "snapshot": snapshot}, indent=1))
    print(f"\nraw figures: {path}")
    failed = [r for r in raw if "error" in r or "wrong" in r]
    if failed:
        sys.exit(f"{len(failed)} run(s) failed or ran the wrong steps: "
                 + "; ".join(sorted({f"{r['tool']} {r['shape']}" for r in failed})))


def _why(error: str) -> str:
    """The line of a failed run's output that says what failed (Cairn's names the step and reason;
    its last line only points at a workspace that is gone with the run's state folder)."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    return next((ln for ln in lines if " failed: " in ln), lines[-1] if lines else "")


def _ratio(cairn: float, seconds: float) -> str:
    """Two decimals, or two significant digits below 0.1 (Dagster's reruns: 0.00070, not 0.00)."""
    value = cairn / seconds
    if value >= 0.1 or value <= 0:
        return f"{value:.2f}"
    return f"{value:.{1 - math.floor(math.log10(value))}f}"


def _median(raw: list[dict[str, Any]], tool: str, shape: str, key: str) -> float | None:
    values = [r[key] for r in raw if r["tool"] == tool and r["shape"] == shape and r.get(key) is not None]
    return statistics.median(values) if values else None


def print_table(raw: list[dict[str, Any]], tools: list[str], shapes: list[str],
                snapshot: dict[str, list[float]]) -> None:
    # "process s": the driver's whole process (interpreter start, imports, the tool's set-up, the timed
    # run), what typing `python pipeline.py` costs; the hand-off's includes the page-cache warm-up.
    # "CPU s": what the whole machine spent busy in the timed section (all its cores; the tool's
    # servers, its steps' processes, and anything else that ran then)
    print("\n| shape | tool | seconds (median) | / bare | cairn / tool | cairn-warm / tool | process s | CPU s "
          "| peak MB | steps run | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in [s for s in ORDER if s in shapes]:
        bare = _median(raw, "bare", shape, "seconds")
        cairn = _median(raw, "cairn", shape, "seconds")
        warm = _median(raw, "cairn-warm", shape, "seconds")
        for tool in tools:
            seconds = _median(raw, tool, shape, "seconds")
            rows = [r for r in raw if r["tool"] == tool and r["shape"] == shape]
            if seconds is None:
                error = next((r.get("error", "") for r in rows), "")
                note = next((r.get("note", "") for r in rows if r.get("note")), "")
                what = "n/a" if note and not error else "failed"
                print(f"| {SHAPE_LABELS[shape]} | {tool} | {what} | | | | | | | | "
                      f"{note or _why(error)} |")
                continue
            ratio = f"{seconds / bare:.2f}x" if bare else ""
            versus = _ratio(cairn, seconds) if cairn and not tool.startswith("cairn") else ""
            versus_warm = _ratio(warm, seconds) if warm and not tool.startswith("cairn") else ""
            ran = sorted({r["ran"] for r in rows if "ran" in r})
            notes = sorted({r.get("note", "") for r in rows if r.get("note")})
            notes += sorted({f"WRONG: {r['wrong']}" for r in rows if r.get("wrong")})
            dispatch = _median(raw, tool, shape, "dispatch_ms")
            agent = _median(raw, tool, shape, "agent_cpu_ms_per_step")
            if agent is not None:  # Cairn's own scheduling cost (drivers/cairn_driver.py)
                scheduler = _median(raw, tool, shape, "scheduler_cpu_ms_per_step")
                # (no dispatch latency where every step started before the one before it ended: a
                # consumer handed its input before it was digested)
                late = _median(raw, tool, shape, "late_digest_s")
                notes.append((f"dispatch {dispatch:.1f} ms/step, " if dispatch is not None else "")
                             + f"agent CPU {agent:.1f} ms/step"
                             + (f" (scheduler {scheduler:.1f})" if scheduler is not None else "")
                             + (f"; outputs digested {late:.2f} s after the run's end" if late else ""))
            print(f"| {SHAPE_LABELS[shape]} | {tool} | {seconds:.2f} | {ratio} | {versus} | {versus_warm} | "
                  f"{_median(raw, tool, shape, 'wall') or 0:.2f} | {_median(raw, tool, shape, 'machine_cpu_s') or 0:.2f} | "
                  f"{_median(raw, tool, shape, 'peak_rss_mb') or 0:.0f} | {'/'.join(map(str, ran))} | "
                  f"{'; '.join(notes)} |")
    if snapshot:
        for label, values in snapshot.items():
            print(f"| {SHAPE_LABELS['snapshot']} | cairn: {label} | {statistics.median(values):.3f} | | | | | | | | "
                  f"{'floor' if 'floor' in label else 'target < 0.2 s unchanged' if label == 'unchanged' else ''} |")


if __name__ == "__main__":
    main()
