"""Ray against the local target: per-step dispatch overhead of a 20-step chain on a warm local Ray
cluster (target: at most 50 ms per step above local), and the 1 -> 50 -> 1 fan-out wall time.

    .venv/bin/python benchmarks/bench_ray.py [--repeat 3]

Starts a one-node Ray cluster on 127.0.0.1 (2 CPUs, as the local target's two slots), runs each
shape once untimed on each target to warm them (Ray's worker processes, the agent), then times the
shapes alternately. The step is the peer benchmark's ``work.py``. Writes the raw figures as JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
import common  # noqa: E402
from bench_pipelines import machine  # noqa: E402

from cairn import (  # noqa: E402
    ComputeTarget,
    Experiment,
    LocalCompute,
    Pipeline,
    PipelineData,
    PythonScriptStep,
    RayCompute,
    Workspace,
)
from cairn.compute.ray_cluster import start_node, stop_node, wait_ready  # noqa: E402
from cairn.engine.client import ensure_agent, stop_agent  # noqa: E402
from cairn.storage.layout import WorkspaceLayout  # noqa: E402


def pipeline(ws: Workspace, state: Path, shape: str, target: str) -> Pipeline:
    common.prepare_scripts(state, shape)
    data: dict[str, PipelineData] = {}
    steps = []
    for name, ups in common.graph(shape):
        out = data[name] = PipelineData(name)
        args: list[object] = ["--name", name, "--out", out]
        for u in ups:
            args += ["--in", data[u].as_input()]
        steps.append(PythonScriptStep("step.py", name=name, source_directory=str(state / "steps" / name),
                                      arguments=args, outputs=[out], compute_target=target, allow_reuse=False))
    return Pipeline(ws, steps)


def timed(ws: Workspace, state: Path, shape: str, target: str) -> float:
    p = pipeline(ws, state, shape, target)
    started = time.perf_counter()
    status = Experiment(ws, f"{shape}-{target}").submit(p).wait_for_completion(show_output=False)
    assert status == "Completed", status
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[float]] = {f"{s} {t}": [] for s in ("chain", "fanout") for t in ("local", "ray")}
    with tempfile.TemporaryDirectory(prefix="cairn-bench-ray-") as tmp:
        root = Path(tmp)
        head = start_node(None, cpus=2, log=root / "head.log")
        ws = Workspace.create(root / "ws")
        try:
            wait_ready(head["address"], 1)
            ComputeTarget.create(ws, "local", LocalCompute.provisioning_configuration(max_concurrency=2))
            ComputeTarget.attach(ws, "ray", RayCompute.attach_configuration(address=head["address"]))
            ensure_agent(WorkspaceLayout(ws.location))
            for shape in ("chain", "fanout"):
                for target in ("local", "ray"):
                    timed(ws, root / "state", shape, target)  # warm-up
            for _ in range(args.repeat):
                for shape in ("chain", "fanout"):
                    for target in ("local", "ray"):
                        figures[f"{shape} {target}"].append(timed(ws, root / "state", shape, target))
        finally:
            stop_agent(WorkspaceLayout(ws.location))
            stop_node(head)
    m = {k: statistics.median(v) for k, v in figures.items()}
    per_step = (m["chain ray"] - m["chain local"]) / common.CHAIN_LENGTH
    print(f"median of {args.repeat}, seconds")
    print(f"20-step chain:        local {m['chain local']:.2f}  ray {m['chain ray']:.2f}  "
          f"-> Ray overhead {per_step * 1000:.0f} ms per step (target <= 50 ms)")
    print(f"1 -> 50 -> 1 fan-out: local {m['fanout local']:.2f}  ray {m['fanout ray']:.2f}  "
          f"(ray/local {m['fanout ray'] / m['fanout local']:.2f}x)")
    out = HERE / "results" / f"ray-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "figures": figures, "ray_overhead_ms_per_step": per_step * 1000}, indent=1))
    print(f"raw figures: {out}")


if __name__ == "__main__":
    main()
