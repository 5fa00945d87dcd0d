"""Run.get_context() in local steps: a 20-step chain whose steps take their run context and log two
metrics and a tag, through the agent (what ``Run.get_context()`` does) against opening the
workspace in each step's process (what it did before: SQLAlchemy imported and the store opened
per step).

    .venv/bin/python benchmarks/bench_run_context.py [--repeat 3] [--length 20]

Prints, for each way, the pipeline's wall time and the median time a step spent from its first
Cairn import to its last record (logged by the step itself); writes the raw figures as JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_pipelines import machine

from cairn import Experiment, Pipeline, PythonScriptStep, Workspace
from cairn.engine.client import stop_agent
from cairn.storage.layout import WorkspaceLayout

SOURCE = Path(__file__).resolve().with_name("context_src")
WAYS = {"through the agent": [], "opened in the step": ["--open-here"]}


def timed_chain(ws: Workspace, length: int, arguments: list[str]) -> tuple[float, float]:
    steps = [PythonScriptStep("step.py", name=f"s{i:02d}", source_directory=str(SOURCE), arguments=arguments,
                              allow_reuse=False) for i in range(length)]
    for earlier, later in zip(steps, steps[1:], strict=False):
        later.run_after(earlier)
    pipeline = Pipeline(ws, steps)
    started = time.perf_counter()
    run = Experiment(ws, "context-bench").submit(pipeline)
    status = run.wait_for_completion(show_output=False)
    wall = time.perf_counter() - started
    assert status == "Completed", status
    per_step = [s.get_metrics()["context_seconds"] for s in run.get_steps()]
    return wall, statistics.median(per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--length", type=int, default=20)
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory(prefix="cairn-context-bench-") as tmp:
        ws = Workspace.create(Path(tmp) / "ws")
        try:
            timed_chain(ws, 2, [])  # the agent is up and has loaded before the measured runs
            for _ in range(args.repeat):
                for way, arguments in WAYS.items():  # interleaved
                    figures[way].append(timed_chain(ws, args.length, arguments))
        finally:
            stop_agent(WorkspaceLayout(ws.location))
    print(f"{args.length}-step chain, each step: Run context + 2 metrics + 1 tag (median of {args.repeat})\n")
    print("| way | pipeline s | per step: context and records, s |")
    print("|---|---:|---:|")
    for way, runs in figures.items():
        print(f"| {way} | {statistics.median(w for w, _ in runs):.2f} | {statistics.median(s for _, s in runs):.3f} |")
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    out = results / f"run-context-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({"machine": machine(), "length": args.length, "figures": figures}, indent=1))
    print(f"\nraw figures: {out}")


if __name__ == "__main__":
    main()
