"""Dagster: one op per step in a job built generically from the shape's graph, run by Dagster's
default local executor (the multiprocess executor, ``max_concurrent: 2``) on a temporary local
instance, as ``dagster job execute`` runs a job without the webserver or daemon. Each op runs the
step as its own process. Dagster re-executes ops rather than reusing them (its op memoization is
gone; asset staleness needs a code location and the UI): every op runs every time.

The multiprocess executor starts each op in a fresh Python process that loads the job by
importing this file (``reconstructable``): the shape and state folder reach it by environment
variables."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from dagster import DagsterInstance, In, Nothing, Out, execute_job, job, op, reconstructable  # noqa: E402

SHAPE_VAR, STATE_VAR = "BENCH_DAGSTER_SHAPE", "BENCH_DAGSTER_STATE"


def _make_op(name: str, ups: list[str], state: Path):
    @op(name=name, ins={u: In(Nothing) for u in ups}, out=Out(Nothing))
    def step() -> None:
        inputs = [common.data_dir(state, u) for u in ups]
        subprocess.run(common.step_argv(state, name, inputs, common.data_dir(state, name)), check=True)

    return step


def bench_job():
    """The job of the shape in $BENCH_DAGSTER_SHAPE (module level: the executor's processes rebuild it)."""
    shape, state = os.environ[SHAPE_VAR], Path(os.environ[STATE_VAR])
    graph = common.graph(shape)
    ops = {name: _make_op(name, ups, state) for name, ups in graph}

    @job(name=f"bench_{shape}", config={"execution": {"config": {"multiprocess": {"max_concurrent": common.PARALLELISM}}}})
    def bench():
        done = {}
        for name, ups in graph:
            done[name] = ops[name](**{u: done[u] for u in ups})

    return bench


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", required=True, choices=common.SHAPES)
    parser.add_argument("--state", required=True, type=Path)
    args = parser.parse_args()
    state = args.state.resolve()
    common.prepare_scripts(state, args.shape)
    os.environ.update({SHAPE_VAR: args.shape, STATE_VAR: str(state), "DAGSTER_DISABLE_TELEMETRY": "1"})
    (state / "dagster-home").mkdir(exist_ok=True)
    with DagsterInstance.local_temp(tempdir=str(state / "dagster-home")) as instance:
        with common.Timer() as t:
            result = execute_job(reconstructable(bench_job), instance=instance)
        if not result.success:
            sys.exit("the Dagster job failed")
    common.report(t.seconds, "Dagster re-executes ops; no reuse of unchanged ones: every op runs"
                  if args.shape in ("rerun", "edit") else "")
