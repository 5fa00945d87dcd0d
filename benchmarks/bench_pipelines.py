"""Cairn against bare ``subprocess.run``: a 20-step chain, a 1 -> 50 -> 1 fan-out, and a fully reused
re-run of the chain from a fresh process.

    .venv/bin/python benchmarks/bench_pipelines.py [--repeat 3] [--only chain,fanout,reuse]

Prints a table (shape, bare seconds, Cairn seconds, Cairn/bare) of medians over the repetitions and
writes every raw figure as JSON to ``benchmarks/results/``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shapes import (
    CHAIN_LENGTH,
    FAN_WIDTH,
    STEP_SOURCE,
    bare_chain,
    bare_fanout,
    chain_pipeline,
    fanout_pipeline,
)

from cairn import Experiment, Pipeline, PipelineRun, Workspace
from cairn.engine.client import ensure_agent, stop_agent, sync
from cairn.storage.layout import WorkspaceLayout

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RERUN_SCRIPT = HERE / "rerun_chain.py"
POOL_SIZE = os.cpu_count() or 1  # the local target's default concurrency: the bare pool matches it
REUSE_TARGET_S = 1.0
RATIO_TARGET = 1.3
SHAPES = ("chain", "fanout", "reuse")
PHASES = ("dispatch+start", "process+commit")


# -- one measurement at a time -------------------------------------------------------------

@dataclass
class Bench:
    """A scratch folder for the whole run; every workspace made in it has its agent stopped."""

    root: Path
    source: Path = field(init=False)
    layouts: list[WorkspaceLayout] = field(default_factory=list)
    _count: int = 0

    def __post_init__(self) -> None:
        # a copy outside any git work tree: git_properties() would otherwise add ~5 git calls per
        # submit that depend on the state of this repository, not on Cairn
        self.source = self.root / "step_src"
        shutil.copytree(STEP_SOURCE, self.source)

    def fresh_dir(self, kind: str) -> Path:
        self._count += 1
        path = self.root / f"{kind}-{self._count:03d}"
        path.mkdir()
        return path

    def fresh_workspace(self, warm_agent: bool) -> Workspace:
        ws = Workspace.create(self.fresh_dir("ws"))
        layout = WorkspaceLayout(ws.location)
        self.layouts.append(layout)
        if warm_agent:
            ensure_agent(layout)  # what the first submit to this workspace would have left running
            sync(layout)  # ... and fully loaded, as an agent that served a run before is
        return ws

    def stop(self, ws: Workspace) -> None:
        stop_agent(WorkspaceLayout(ws.location))

    def close(self) -> None:
        for layout in self.layouts:
            stop_agent(layout)  # False, at once, when it has already stopped


@contextmanager
def bench_root(keep: bool) -> Iterator[Bench]:
    bench = Bench(Path(tempfile.mkdtemp(prefix="cairn-bench-")))
    try:
        yield bench
    finally:
        bench.close()
        if keep:
            print(f"kept {bench.root}")
        else:
            shutil.rmtree(bench.root, ignore_errors=True)


def time_bare(bench: Bench, shape: str) -> float:
    data = bench.fresh_dir("bare")
    started = time.perf_counter()
    if shape == "chain":
        bare_chain(bench.source, data)
    else:
        bare_fanout(bench.source, data, POOL_SIZE)
    return time.perf_counter() - started


def time_cairn(bench: Bench, shape: str, warm_agent: bool) -> dict[str, Any]:
    """Submit -> wait_for_completion in a fresh workspace; the steps really run."""
    ws = bench.fresh_workspace(warm_agent)
    build: Callable[[Workspace, Path], Pipeline] = chain_pipeline if shape == "chain" else fanout_pipeline
    pipeline = build(ws, bench.source)
    try:
        wall_start = time.time()
        started = time.perf_counter()
        run = Experiment(ws, f"bench-{shape}").submit(pipeline, regenerate_outputs=True)
        submitted = time.perf_counter()
        run.wait_for_completion(show_output=False)
        ended = time.perf_counter()
        wall_end = time.time()
        expected = CHAIN_LENGTH if shape == "chain" else FAN_WIDTH + 2
        _check_steps(run, "Completed", expected)
        return {"seconds": ended - started, "submit": submitted - started,
                "phases": step_phases(ws, run, wall_start, wall_end) if shape == "chain" else None,
                "last_output": _last_output(run, shape)}
    finally:
        bench.stop(ws)


def time_reuse(bench: Bench) -> dict[str, Any]:
    """Populate the cache with one chain run, then time a fresh process re-running it, with the
    agent still warm and again after stopping it (the re-run's submit has to start one)."""
    ws = bench.fresh_workspace(warm_agent=True)
    try:
        first = Experiment(ws, "bench-chain").submit(chain_pipeline(ws, bench.source))
        first.wait_for_completion(show_output=False)
        _check_steps(first, "Completed", CHAIN_LENGTH)
        warm = _rerun_in_fresh_process(ws, bench)
        bench.stop(ws)
        cold = _rerun_in_fresh_process(ws, bench)
        return {"warm": warm, "cold": cold}
    finally:
        bench.stop(ws)


def _rerun_in_fresh_process(ws: Workspace, bench: Bench) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(RERUN_SCRIPT), ws.location, str(bench.source)],
                          capture_output=True, text=True, cwd=bench.root)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the re-run process failed ({proc.returncode}):\n{proc.stderr}")
    inside = json.loads(proc.stdout.strip().splitlines()[-1])
    _check_steps(ws.get_run(inside["run_id"]), "Reused", CHAIN_LENGTH)
    # what the process did outside its measured lines: interpreter start-up and shut-down
    inside["start_and_exit"] = seconds - inside["in_process"]
    return {"seconds": seconds, "inside": inside}


def _check_steps(run: Any, status: str, expected: int) -> None:
    """A benchmark that silently reused (or failed) steps would measure the wrong thing."""
    statuses = [s.status for s in run.get_steps()]
    if run.status != "Completed" or statuses.count(status) != expected:
        raise RuntimeError(f"run {run.id} is {run.status} with steps {sorted(set(statuses))}; expected "
                           f"{expected} steps {status}")


def _last_output(run: PipelineRun, shape: str) -> str:
    """The first line of the last step's file: the bare run must produce the same one."""
    step, output = ("chain_19", "chain_19") if shape == "chain" else ("gather", "gathered")
    path = run.find_step_run(step)[0].get_output_data(output).local_path / "data.txt"
    return path.read_text().splitlines()[0]


def bare_digest(bench: Bench, shape: str) -> str:
    data = bench.fresh_dir("check")
    if shape == "chain":
        bare_chain(bench.source, data)
        return (data / "chain_19" / "data.txt").read_text().splitlines()[0]
    bare_fanout(bench.source, data, POOL_SIZE)
    return (data / "gathered" / "data.txt").read_text().splitlines()[0]


# -- where the time goes: the step runs' status events -------------------------------------

def step_phases(ws: Workspace, run: PipelineRun, wall_start: float, wall_end: float) -> dict[str, float]:
    """Median seconds per step of each phase of a sequential chain, from the recorded events.

    dispatch+start: upstream Completed (or pipeline Running) -> Running  (agent loop, fingerprint,
              reuse check, job built, step thread started, snapshot materialised, Popen; Cairn
              records Preparing only when that takes over 0.2 s)
    process:  Running -> Finalizing     (the script itself)
    commit:   Finalizing -> Completed   (output digested, renamed, committed in one transaction)
    """
    details = run.get_details()
    events = {e["status"]: datetime.fromisoformat(e["time"]).timestamp() for e in details["events"]}
    steps = sorted(run.get_steps(), key=lambda s: s.name)
    per_step: dict[str, list[float]] = {p: [] for p in PHASES}
    previous_done = events["Running"]
    first_queued = last_done = 0.0
    for step in steps:
        at = {e["status"]: datetime.fromisoformat(e["time"]).timestamp() for e in step.get_details()["events"]}
        first_queued = first_queued or at["Running"]
        per_step["dispatch+start"].append(at["Running"] - previous_done)
        per_step["process+commit"].append(at["Completed"] - at["Running"])
        previous_done = last_done = at["Completed"]
    result = {p: statistics.median(v) for p, v in per_step.items()}
    result["claim"] = events["Running"] - events["Queued"]  # submit's insert -> the agent took the run
    result["until_claimed"] = events["Running"] - wall_start  # submit (snapshot, insert, poke) + claim
    result["until_returned"] = wall_end - last_done  # last step Completed -> wait_for_completion returned
    return result


# -- the whole benchmark -------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:  # which Cairn was measured; best effort, the benchmark also runs outside a checkout
        commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    try:
        changed = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and changed:  # what was measured is not quite that commit
            commit += "+dirty"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "commit": commit, "loadavg_at_start": os.getloadavg()}


def run_all(repeat: int, shapes: list[str], cold: bool, keep: bool) -> dict[str, Any]:
    raw: dict[str, list[Any]] = {k: [] for k in (
        "chain_bare", "chain_warm", "chain_cold", "fanout_bare", "fanout_warm", "fanout_cold", "reuse", "loadavg")}
    with bench_root(keep) as bench:
        # Unrecorded warm-up (imports of this process, page cache), which doubles as the check that
        # both sides did the same work: their last output files must be identical.
        for shape in ("chain", "fanout"):
            if shape in shapes or shape == "chain":
                expected = bare_digest(bench, shape)
                got = time_cairn(bench, shape, warm_agent=True)["last_output"]
                if got != expected:
                    raise RuntimeError(f"{shape}: Cairn's last output {got} differs from bare's {expected}")
        for i in range(repeat):
            # interleaved, so that a burst of other load on the machine hits both sides alike
            for shape in ("chain", "fanout"):
                if shape not in shapes:
                    continue
                raw[f"{shape}_bare"].append(time_bare(bench, shape))
                raw[f"{shape}_warm"].append(time_cairn(bench, shape, warm_agent=True))
                if cold:
                    raw[f"{shape}_cold"].append(time_cairn(bench, shape, warm_agent=False))
            if "reuse" in shapes:
                if "chain" not in shapes:
                    raw["chain_bare"].append(time_bare(bench, "chain"))
                raw["reuse"].append(time_reuse(bench))
            raw["loadavg"].append(os.getloadavg()[0])  # other work on the machine shows up here
            print(f"  repetition {i + 1}/{repeat} done (load average {raw['loadavg'][-1]:.2f})", file=sys.stderr)
    return raw


def summarise(raw: dict[str, list[Any]]) -> list[dict[str, Any]]:
    def med(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    rows = []
    bare = {"chain": med(raw["chain_bare"]), "fanout": med(raw["fanout_bare"])}
    labels = {"chain": f"chain ({CHAIN_LENGTH} steps)", "fanout": f"fan-out 1 -> {FAN_WIDTH} -> 1"}
    for shape in ("chain", "fanout"):
        for agent in ("warm", "cold"):
            cairn_s = med([m["seconds"] for m in raw[f"{shape}_{agent}"]])
            if cairn_s is None or bare[shape] is None:
                continue
            ratio = cairn_s / bare[shape]
            rows.append({"shape": labels[shape], "agent": agent, "bare_s": bare[shape], "cairn_s": cairn_s,
                         "ratio": ratio, "target": f"<= {RATIO_TARGET}x",
                         "met": ratio <= RATIO_TARGET if agent == "warm" else None})
    for agent in ("warm", "cold"):
        cairn_s = med([m[agent]["seconds"] for m in raw["reuse"]])
        if cairn_s is None:
            continue
        rows.append({"shape": "reused chain re-run, fresh process", "agent": agent, "bare_s": bare["chain"],
                     "cairn_s": cairn_s, "ratio": cairn_s / bare["chain"] if bare["chain"] else None,
                     "target": f"< {REUSE_TARGET_S:g} s", "met": cairn_s < REUSE_TARGET_S})
    return rows


def breakdowns(raw: dict[str, list[Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for agent in ("warm", "cold"):
        phases = [m["phases"] for m in raw[f"chain_{agent}"] if m["phases"]]
        if phases:
            out[f"chain_{agent}_phases"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
            out[f"chain_{agent}_phases"]["submit"] = statistics.median(m["submit"] for m in raw[f"chain_{agent}"])
        reruns = [m[agent] for m in raw["reuse"]]
        if reruns:
            keys = ("start_and_exit", "import", "open_and_build", "submit", "wait")
            out[f"reuse_{agent}_parts"] = {k: statistics.median(r["inside"][k] for r in reruns) for k in keys}
    return out


def print_report(rows: list[dict[str, Any]], parts: dict[str, dict[str, float]], info: dict[str, Any],
                 repeat: int) -> None:
    print(f"\n{info['nproc']} cores, {info['cpu_model']}, Python {info['python']}; median of {repeat}; "
          f"bare fan-out pool: {POOL_SIZE} threads")
    print(f"{'shape':36} {'agent':5} {'bare s':>7} {'cairn s':>8} {'cairn/bare':>10}  {'target':>8}  met")
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        bare = f"{r['bare_s']:.3f}" if r["bare_s"] is not None else "-"
        print(f"{r['shape']:36} {r['agent']:5} {bare:>7} {r['cairn_s']:8.3f} {ratio:>10}  {r['target']:>8}  {met}")
    print("(reused re-run: 'bare' is the bare chain, which has no cache and runs all 20 steps again)")
    bare_step = next((r["bare_s"] / CHAIN_LENGTH for r in rows if r["shape"].startswith("chain")), None)
    for agent in ("warm", "cold"):
        p = parts.get(f"chain_{agent}_phases")
        if p:
            steps = "  ".join(f"{k} {p[k] * 1000:.1f}" for k in PHASES)
            total = sum(p[k] for k in PHASES) * 1000
            bare = f"; bare: {bare_step * 1000:.1f} ms per step in all" if bare_step else ""
            print(f"\nchain, {agent} agent, median ms per step{bare}:\n  {steps}  = {total:.1f}")
            print(f"  per run: submit {p['submit'] * 1000:.1f}, submit -> run claimed {p['until_claimed'] * 1000:.1f}, "
                  f"last step done -> wait returned {p['until_returned'] * 1000:.1f}")
    for agent in ("warm", "cold"):
        p = parts.get(f"reuse_{agent}_parts")
        if p:
            shown = ", ".join(f"{k.replace('_', ' ')} {v * 1000:.1f}" for k, v in p.items())
            print(f"\nreused re-run process, {agent} agent, ms: {shown}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported (default 3)")
    parser.add_argument("--only", default=",".join(SHAPES), help="comma-separated subset of: " + ", ".join(SHAPES))
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-agent chain and fan-out runs")
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default: "
                        "benchmarks/results/pipelines-<time>.json)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (workspaces, logs)")
    args = parser.parse_args(argv)
    shapes = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.repeat < 1 or not shapes or set(shapes) - set(SHAPES):
        parser.error(f"--repeat must be >= 1 and --only a subset of {', '.join(SHAPES)}")
    info = machine()
    if info["loadavg_at_start"][0] > 0.5:
        print(f"warning: load average {info['loadavg_at_start'][0]:.2f}: something else is running, the "
              f"figures will be noisy", file=sys.stderr)
    started = datetime.now(UTC)
    raw = run_all(args.repeat, shapes, cold=not args.no_cold, keep=args.keep)
    rows = summarise(raw)
    parts = breakdowns(raw)
    print_report(rows, parts, info, args.repeat)
    out = args.json or RESULTS / f"pipelines-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"started": started.isoformat(), "repeat": args.repeat, "pool_size": POOL_SIZE,
                               "machine": info, "summary": rows, "breakdown": parts, "raw": raw}, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
