"""What every driver shares (standard library only: each tool's driver imports it from its own venv).

A driver is ``python drivers/<tool>.py --shape SHAPE --state DIR`` and prints one JSON line
``{"seconds": wall seconds of the pipeline itself (after imports), "note": "..."}`` last on stdout.
The state folder persists across the shapes of one repetition, in this order: chain, rerun, edit
(the harness edits the 10th step, ``steps/chain_09/step.py``, between rerun and edit), fanout, dag, handoff.
Steps append their names to ``<state>/ran.log`` (the harness counts what ran; drivers need not).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work.py"
PARALLELISM = 2
CHAIN_LENGTH = 20
FAN_WIDTH = 50
DAG_SIZE = 500
HANDOFF_BYTES = 1 << 30
SHAPES = ("chain", "rerun", "edit", "fanout", "dag", "handoff")
EDITED_STEP = "chain_09"  # the 10th step: after its edit, steps 10 to 20 (11 of them) must run


def chain() -> list[tuple[str, list[str]]]:
    """[(step name, [upstream names])] in a valid order."""
    return [(f"chain_{i:02d}", [f"chain_{i - 1:02d}"] if i else []) for i in range(CHAIN_LENGTH)]


def fanout() -> list[tuple[str, list[str]]]:
    middle = [(f"fan_{i:02d}", ["fan_source"]) for i in range(FAN_WIDTH)]
    return [("fan_source", []), *middle, ("fan_sink", [name for name, _ in middle])]


def dag() -> list[tuple[str, list[str]]]:
    """A random DAG of DAG_SIZE steps (fixed seed): each step has up to 3 parents among earlier ones."""
    rng = random.Random(7)
    steps = []
    for i in range(DAG_SIZE):
        parents = sorted(rng.sample(range(i), k=min(i, rng.randint(0, 3))))
        steps.append((f"dag_{i:03d}", [f"dag_{p:03d}" for p in parents]))
    return steps


def handoff() -> list[tuple[str, list[str]]]:
    return [("handoff_write", []), ("handoff_read", ["handoff_write"])]


def graph(shape: str) -> list[tuple[str, list[str]]]:
    return {"chain": chain, "rerun": chain, "edit": chain, "fanout": fanout, "dag": dag, "handoff": handoff}[shape]()


def step_script(state: Path, name: str) -> Path:
    """Each step's own copy of work.py in its own folder (tools that snapshot code see one step's
    edit as that step's change only)."""
    folder = state / "steps" / name
    script = folder / "step.py"
    if not script.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(WORK, script)
    return script


def step_python() -> str:
    """The interpreter every tool runs the steps with (``bench_peers.py`` makes it: a venv with no
    packages, so that no tool's steps start faster for its own venv's being smaller)."""
    return os.environ.get("BENCH_STEP_PYTHON") or sys.executable


def step_argv(state: Path, name: str, inputs: list[str], out: str, python: str | None = None) -> list[str]:
    """The command of one step: its own script, its input folders, its output folder."""
    argv = [python or step_python(), str(step_script(state, name)), "--name", name, "--out", out,
            "--ran", str(state / "ran.log")]
    for folder in inputs:
        argv += ["--in", folder]
    if name == "handoff_write":
        argv += ["--size", str(HANDOFF_BYTES)]
    return argv


def run_step(state: Path, name: str, inputs: list[str], out: str) -> None:
    subprocess.run(step_argv(state, name, inputs, out), check=True)


_prepared: tuple[Path, str] | None = None  # (state, shape) of this driver, for Timer


def prepare_scripts(state: Path, shape: str) -> None:
    global _prepared
    _prepared = (state, shape)
    for name, _ in graph(shape):
        step_script(state, name)


def warm_page_cache(folder: Path, size: int) -> None:
    """Write and delete a file of ``size`` bytes. On this kind of VM (Firecracker, free page
    reporting) page-cache pages the guest has not used lately go back to the host, and writing
    1 GiB into fresh ones took ~1.1 s instead of ~0.33 s; which tool got which depended on how
    long ago the last large file was deleted. Every tool's hand-off now starts on reused pages,
    as on a machine without that effect."""
    block = b"\0" * (1 << 20)
    path = folder / "page-cache-warm-up.bin"
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
    path.unlink()


_timed_cpu: dict[str, float] = {}  # the last timed section's, reported with its seconds


class Timer:
    def __enter__(self) -> Timer:
        if _prepared is not None and _prepared[1] == "handoff":
            warm_page_cache(_prepared[0], HANDOFF_BYTES + (64 << 20))
        self.busy = machine_busy_seconds()
        self.own = time.process_time()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = time.perf_counter()
        self.seconds = self.end - self.started
        self.machine_cpu = machine_busy_seconds() - self.busy
        global _timed_cpu
        # the driver's own CPU (not its subprocesses'): with the machine's, what ran elsewhere
        _timed_cpu = {"machine_cpu_s": self.machine_cpu, "driver_cpu_s": time.process_time() - self.own}


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot, all cores (Linux ``/proc/stat``: every
    column but idle and iowait): what a tool's run cost, its servers and subprocesses included."""
    import os

    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def report(seconds: float, note: str = "", extra: dict | None = None) -> None:
    import json

    print(json.dumps({"seconds": seconds, "note": note, **_timed_cpu, **(extra or {})}),
          flush=True)


def process_peak_mb(pid: int) -> float | None:
    """The peak resident memory of a running process (VmHWM, Linux), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux)."""
    return _cpu_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU seconds of one thread of a running process (Linux)."""
    return _cpu_seconds(f"/proc/{pid}/task/{tid}/stat")


def _cpu_seconds(stat_file: str) -> float:
    import os

    fields = Path(stat_file).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_late_digests(workspace: str, run_id: str, ended: float, within: float = 120.0) -> float | None:
    """Seconds from ``ended`` (a ``Timer``'s end) until the outputs of the run's steps that were
    committed before their digests have them (Cairn's engine/late_digests.py): None if none had to
    be waited for. Read from the store every 5 ms (a benchmark's check, outside the timer)."""
    import sqlite3

    db = sqlite3.connect(Path(workspace) / ".cairn" / "cairn.db")
    waited = False
    try:
        deadline = time.perf_counter() + within
        while db.execute("SELECT COUNT(*) FROM step_outputs o JOIN runs r ON r.id = o.step_run_id "
                         "WHERE r.parent_id = ? AND o.digest LIKE 'pending:%'", (run_id,)).fetchone()[0]:
            if time.perf_counter() > deadline:
                raise SystemExit(f"the outputs of run {run_id} were still not digested {within:g} s after its end")
            waited = True
            time.sleep(0.005)
    finally:
        db.close()
    return time.perf_counter() - ended if waited else None


def cairn_overhead(workspace: str, run_id: str, agent_cpu: float, scheduler_cpu: float | None = None) -> dict:
    """Cairn's scheduling cost, read from its store after the run: the dispatch latency of each
    step that ran (from the step ending that let it start — its last upstream step, or the one that
    freed a slot — to its own Running), the agent's CPU time per step that ran (everything the
    agent did for it: queries, folders, starting it, committing it), and of that the scheduler's
    (the agent's main thread: claiming the run, finding ready steps, fingerprints and reuse
    look-ups, dispatching; the rest is each step's own bookkeeping, on its thread)."""
    import json
    import sqlite3
    import statistics

    db = sqlite3.connect(Path(workspace) / ".cairn" / "cairn.db")
    try:
        spec = json.loads(db.execute("SELECT spec FROM runs WHERE id = ?", (run_id,)).fetchone()[0])
        rows = db.execute("SELECT id, name, status, ended_at FROM runs WHERE parent_id = ?", (run_id,)).fetchall()
        running = dict(db.execute("SELECT r.name, MAX(e.at) FROM run_events e JOIN runs r ON r.id = e.run_id "
                                  "WHERE r.parent_id = ? AND e.status = 'Running' GROUP BY r.name", (run_id,)))
    finally:
        db.close()
    ran = [name for _, name, status, _ in rows if status == "Completed"]
    ends = sorted(end for _, _, status, end in rows if end is not None and status == "Completed")
    latencies = []
    for step in spec["steps"]:
        started = running.get(step["name"])
        before = [end for end in ends if end <= started] if started is not None else []
        if before:  # the first steps of a run wait for no ending: their start is the run's start
            latencies.append((started - before[-1]) * 1000)
    return {"dispatch_ms": statistics.median(latencies) if latencies else None,
            "agent_cpu_ms_per_step": agent_cpu * 1000 / len(ran) if ran else None,
            "scheduler_cpu_ms_per_step": scheduler_cpu * 1000 / len(ran) if ran and scheduler_cpu is not None
            else None}


def data_dir(state: Path, name: str) -> str:
    return str(state / "data" / name)


def bare_run(state: Path, shape: str) -> None:
    """The floor: each step as `subprocess.run`, PARALLELISM at a time, in dependency order."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    steps = graph(shape)
    ups = dict(steps)
    done: set[str] = set()
    running: dict[object, str] = {}
    pending = [name for name, _ in steps]
    with ThreadPoolExecutor(PARALLELISM) as pool:
        while pending or running:
            for name in [n for n in pending if all(u in done for u in ups[n])]:
                if len(running) >= PARALLELISM:
                    break
                pending.remove(name)
                running[pool.submit(run_step, state, name, [data_dir(state, u) for u in ups[name]],
                                    data_dir(state, name))] = name
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in finished:
                f.result()
                done.add(running.pop(f))

