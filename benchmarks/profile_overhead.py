"""Where Cairn's overhead goes: wall-clock timers inside the agent and a pyinstrument profile of the
client, for one shape of ``bench_pipelines.py``.

    .venv/bin/python benchmarks/profile_overhead.py [--shape chain|fanout] [--runs 3]
        [--what-if pooled] [--what-if lean-wait]
    .venv/bin/python benchmarks/profile_overhead.py --sqlite   # one SQLite transaction, three ways

The agent runs in the foreground of a child process whose functions are wrapped with timers at run
time (pyinstrument samples only one thread, and the agent's steps run in threads). Nothing under
``src/`` is changed. Two what-ifs size one cause each, by patching at run time:

- ``--what-if pooled``: the agent keeps its SQLite connections open in SQLAlchemy's default pool
  instead of opening and closing one per transaction (NullPool);
- ``--what-if lean-wait``: ``wait_for_completion(show_output=False)`` reads only the pipeline run
  (not every step run) and reads once per burst of agent events instead of once per event.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shapes import STEP_SOURCE, chain_pipeline, fanout_pipeline

TIMED_QUERIES = ("update_status", "commit_step", "record_reuses", "record_reuses_in", "set_statuses",
                 "claim_and_start", "renew_leases", "release_lease",
                 "get_run", "get_outputs", "get_snapshot", "lookup_cache", "lease_owners", "list_named",
                 "child_runs")


# -- the agent side ------------------------------------------------------------------------

class Timers:
    """Total wall seconds and calls per name; safe to use from the step threads."""

    def __init__(self) -> None:
        self.total: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.total[name] += seconds
            self.calls[name] += 1

    def wrap(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)

        return timed


def _instrument(timers: Timers, pooled: bool) -> None:
    """Wrap the agent's parts with timers, where they are looked up at call time."""
    import cairn.compute.local as local_compute
    import cairn.engine.agent as agent
    import cairn.engine.scheduler as scheduler
    import cairn.runner.execute as execute
    import cairn.store.db as db
    import cairn.store.queries as q

    for name in TIMED_QUERIES:
        setattr(q, name, timers.wrap(f"sql {name}", getattr(q, name)))
    execute.materialize = timers.wrap("materialize snapshot", execute.materialize)
    execute._commit_outputs = timers.wrap("digest + rename outputs", execute._commit_outputs)
    local_compute.execute_step = timers.wrap("execute_step (whole step)", execute.execute_step)
    scheduler.PipelineScheduler.prepare = timers.wrap("scheduler.prepare", scheduler.PipelineScheduler.prepare)
    agent.Agent._claim_waiting = timers.wrap("agent loop: claim waiting runs", agent.Agent._claim_waiting)
    agent.Agent._advance_all = timers.wrap("agent loop: advance runs", agent.Agent._advance_all)
    agent.Agent._notify = timers.wrap("agent: notify watchers", agent.Agent._notify)

    popen = subprocess.Popen

    class TimedPopen(popen):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            started = time.perf_counter()
            super().__init__(*args, **kwargs)
            timers.add("Popen (fork/exec)", time.perf_counter() - started)

    execute.subprocess.Popen = TimedPopen  # type: ignore[misc]

    original_write = db.Store.write

    @contextlib.contextmanager
    def timed_write(self: db.Store) -> Iterator[Any]:
        # one write transaction: connect (+ PRAGMAs), BEGIN IMMEDIATE, body, COMMIT, close
        started = time.perf_counter()
        with original_write(self) as conn:
            timers.add("sql write: connect + BEGIN", time.perf_counter() - started)
            body = time.perf_counter()
            yield conn
            timers.add("sql write: body", time.perf_counter() - body)
            ending = time.perf_counter()
        timers.add("sql write: COMMIT + close", time.perf_counter() - ending)
        timers.add("sql write: whole transaction", time.perf_counter() - started)

    db.Store.write = timed_write  # type: ignore[method-assign]

    if pooled:
        make_engine = db._make_engine

        def pooled_engine(url: str, immediate: bool) -> Any:
            import sqlalchemy

            create = sqlalchemy.create_engine

            def with_pool(u: str, **kwargs: Any) -> Any:
                # SQLAlchemy's default for a SQLite file: a QueuePool, each connection checked out
                # by one thread at a time and kept open between transactions
                kwargs.pop("poolclass", None)
                return create(u, **kwargs)

            sqlalchemy.create_engine = with_pool
            try:
                return make_engine(url, immediate)
            finally:
                sqlalchemy.create_engine = create

        db._make_engine = pooled_engine


def agent_main(workspace: str, report: Path, pooled: bool) -> int:
    import faulthandler

    faulthandler.enable()  # a crash of the patched agent must say where, in agent.err
    timers = Timers()
    _instrument(timers, pooled)
    started = os.times()

    def dump() -> None:
        ended = os.times()
        cpu = (ended.user - started.user) + (ended.system - started.system)
        report.write_text(json.dumps({"cpu_s": cpu, "total": timers.total, "calls": timers.calls}))

    atexit.register(dump)
    from cairn.engine.__main__ import main

    return main([workspace, "--idle-timeout", "0"])


# -- the client side -----------------------------------------------------------------------

def _lean_wait(ws: Any) -> None:
    """The follower's what-if: no step rows when nothing is shown, one re-read per burst of events."""
    from cairn.engine.client import Watch

    ws._backend.get_children = lambda run_id: []  # follow() needs them only to print them
    wait = Watch.wait

    def drained(self: Watch, timeout: float | None) -> dict[str, Any] | None:
        event = wait(self, timeout)
        while event is not None and wait(self, 0) is not None:
            pass  # what else already arrived says nothing the next re-read will not see
        return event

    Watch.wait = drained  # type: ignore[method-assign]


def client_main(shape: str, runs: int, what_if: list[str], keep: bool) -> int:
    root = Path(tempfile.mkdtemp(prefix="cairn-profile-"))
    try:
        _profile(root, shape, runs, what_if)
    finally:  # also when the output pipe closes early (`| head`)
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _profile(root: Path, shape: str, runs: int, what_if: list[str]) -> None:
    from pyinstrument import Profiler

    from cairn import Experiment, Workspace
    from cairn.engine.client import ping, stop_agent
    from cairn.storage.layout import WorkspaceLayout

    source = root / "step_src"
    shutil.copytree(STEP_SOURCE, source)
    ws = Workspace.create(root / "ws")
    layout = WorkspaceLayout(ws.location)
    report = root / "agent-timers.json"
    argv = [sys.executable, __file__, "--agent", ws.location, "--report", str(report)]
    pooled = "pooled" in what_if
    if pooled:
        argv += ["--what-if", "pooled"]
    if "lean-wait" in what_if:
        _lean_wait(ws)
    with open(root / "agent.err", "w") as err:
        agent = subprocess.Popen(argv, stdout=err, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ping(layout):  # the client finds this agent on the socket: no second one starts
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the timed agent did not start; see {root / 'agent.err'}")
            time.sleep(0.05)
        build = chain_pipeline if shape == "chain" else fanout_pipeline
        walls, cpus = [], []
        profiler = Profiler(interval=0.001)
        for _ in range(runs):
            pipeline = build(ws, source)
            cpu_before, started = os.times(), time.perf_counter()
            profiler.start()
            run = Experiment(ws, f"profile-{shape}").submit(pipeline, regenerate_outputs=True)
            run.wait_for_completion(show_output=False)
            profiler.stop()
            walls.append(time.perf_counter() - started)
            cpu_after = os.times()
            cpus.append((cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system))
    finally:
        stop_agent(layout)
        agent.wait(timeout=30)
    if not report.exists():
        raise RuntimeError(f"the timed agent ended with code {agent.returncode} before its report (a second, "
                           f"untimed agent may have taken over); see {root / 'agent.err'}")
    timers = json.loads(report.read_text())
    print(f"{shape}: {runs} run(s), wall median {statistics.median(walls):.3f} s; client CPU median "
          f"{statistics.median(cpus):.3f} s per run; agent CPU {timers['cpu_s'] / runs:.3f} s per run "
          f"(own threads, not the step processes)" + (f" [what-if: {', '.join(what_if)}]" if what_if else ""))
    print("\nagent, wall time per run (parts overlap: a whole step contains its SQL):")
    print(f"{'part':36} {'calls/run':>9} {'ms/run':>9} {'ms/call':>8}")
    for name in sorted(timers["total"], key=lambda k: -timers["total"][k]):
        total, calls = timers["total"][name], timers["calls"][name]
        print(f"{name:36} {calls / runs:9.1f} {total * 1000 / runs:9.1f} {total * 1000 / calls:8.2f}")
    print("\nclient (pyinstrument, all runs together):")
    print(profiler.output_text(unicode=False, color=False, show_all=False))


def sqlite_costs(n: int = 300) -> int:
    """One small write transaction in WAL mode, three ways: why NullPool is expensive."""
    import sqlite3

    pragmas = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA busy_timeout=60000",
               "PRAGMA foreign_keys=ON")  # what cairn.store.db runs on every new connection

    def connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None)
        for pragma in pragmas:
            conn.execute(pragma)
        return conn

    def write(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.execute("COMMIT")

    def per_call(func: Callable[[], None]) -> float:
        started = time.perf_counter()
        for _ in range(n):
            func()
        return (time.perf_counter() - started) / n * 1000

    with tempfile.TemporaryDirectory(prefix="cairn-sqlite-") as tmp:
        db = Path(tmp) / "t.db"
        setup = connect(db)
        setup.execute("CREATE TABLE t (x)")
        setup.close()

        def fresh() -> None:
            conn = connect(db)
            write(conn)
            conn.close()

        alone = per_call(fresh)  # the last close checkpoints the WAL, fsyncs and deletes it
        holder = connect(db)
        holder.execute("SELECT count(*) FROM t").fetchone()
        beside = per_call(fresh)  # another connection keeps the WAL alive
        kept = per_call(lambda: write(holder))
        holder.close()
    print(f"one write transaction in WAL mode, ms: new connection, no other open {alone:.3f}; new connection "
          f"while another stays open {beside:.3f}; one kept connection {kept:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("chain", "fanout"), default="chain")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--what-if", choices=("pooled", "lean-wait"), action="append", default=[])
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--sqlite", action="store_true", help="only time one SQLite transaction three ways")
    parser.add_argument("--agent", metavar="WORKSPACE", help=argparse.SUPPRESS)  # the timed agent itself
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sqlite:
        return sqlite_costs()
    if args.agent:
        return agent_main(args.agent, args.report, "pooled" in args.what_if)
    return client_main(args.shape, args.runs, args.what_if, args.keep)


if __name__ == "__main__":
    sys.exit(main())
