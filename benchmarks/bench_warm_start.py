"""Warm step start: a 20-step chain whose steps import pandas and scikit-learn, cold (a fresh
interpreter per step) against warm (steps forked from a server that imported them once).

    .venv/bin/python benchmarks/bench_warm_start.py [--repeat 3] [--length 20]

"warm, first run" includes starting the fork server (its imports) after a fresh agent; "warm" is
a run while the server is up (the steady state of an edit-run loop). Target: warm >= 5x faster
than cold, end to end. Writes the raw figures as JSON to ``benchmarks/results/``.
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

from cairn import ComputeTarget, Experiment, LocalCompute, Pipeline, PipelineData, PythonScriptStep, Workspace
from cairn.engine.client import stop_agent
from cairn.storage.layout import WorkspaceLayout

SOURCE = Path(__file__).resolve().with_name("warm_src")
MODULES = ["pandas", "sklearn.linear_model"]


def chain(ws: Workspace, length: int) -> Pipeline:
    steps, previous = [], None
    for i in range(length):
        out = PipelineData(f"c{i:02d}")
        args: list[object] = ["--out", out] + (["--in", previous] if previous is not None else [])
        steps.append(PythonScriptStep("step.py", name=f"c{i:02d}", source_directory=str(SOURCE), arguments=args,
                                      outputs=[out], inputs=[previous] if previous is not None else [],
                                      allow_reuse=False))
        previous = out
    return Pipeline(ws, steps)


def timed_run(ws: Workspace, length: int) -> float:
    pipeline = chain(ws, length)
    started = time.perf_counter()
    run = Experiment(ws, "warm-bench").submit(pipeline)
    status = run.wait_for_completion(show_output=False)
    assert status == "Completed", status
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--length", type=int, default=20)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {"cold": [], "warm, first run": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="cairn-bench-warm-") as tmp:
        ws = Workspace.create(Path(tmp) / "ws")
        try:
            timed_run(ws, 2)  # the agent is up and the files are cached before anything is timed
            for _ in range(args.repeat):
                figures["cold"].append(timed_run(ws, args.length))
            ComputeTarget.create(ws, "local", LocalCompute.provisioning_configuration(warm_start_modules=MODULES))
            for _ in range(args.repeat):
                stop_agent(WorkspaceLayout(ws.location))  # a fresh agent: the server starts again
                figures["warm, first run"].append(timed_run(ws, args.length))
                figures["warm"].append(timed_run(ws, args.length))
        finally:
            stop_agent(WorkspaceLayout(ws.location))
    cold = statistics.median(figures["cold"])
    print(f"{args.length}-step chain importing pandas + scikit-learn, median of {args.repeat}")
    print(f"{'mode':18} {'seconds':>9} {'per step':>9} {'cold/mode':>10}")
    for mode, values in figures.items():
        m = statistics.median(values)
        print(f"{mode:18} {m:>9.2f} {m / args.length:>9.3f} {cold / m:>9.1f}x")
    out = Path(__file__).parent / "results" / f"warm-start-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "length": args.length, "figures": figures}, indent=1))
    print(f"raw figures: {out}")


if __name__ == "__main__":
    main()
