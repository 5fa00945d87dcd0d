"""Ray against the local target: per-step dispatch overhead of a 20-step chain on a warm local Ray
cluster (target: at most 50 ms per step above local), and the 1 -> 50 -> 1 fan-out wall time.

    .venv/bin/python benchmarks/bench_ray.py [--repeat 3] [--relayed]

With ``--relayed`` (root, Linux: ``unshare``), also a second cluster whose only node with CPUs runs in
its own mount namespace where the benchmark's folder is an empty tmpfs — a node of "another
machine", whose steps reach the workspace through its relay — driven by a second workspace.

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


def start_elsewhere(hidden: Path, logs: Path, cache: Path) -> list[dict[str, object]]:
    """A head with no CPU and a node in its own mount namespace where ``hidden`` is empty."""
    head = start_node(None, cpus=0, log=logs / "relayed-head.log")
    launcher = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hidden))
    other = start_node(head["address"], cpus=2, log=logs / "relayed-node.log", launcher=launcher,
                       env={"CAIRN_NODE_CACHE": str(cache / "node"), "CAIRN_INPUT_CACHE": str(cache / "inputs")})
    wait_ready(str(head["address"]), 2)
    return [other, head]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--relayed", action="store_true", help="also a node of 'another machine' (see above)")
    args = parser.parse_args()
    targets = ("local", "ray", *(("relayed",) if args.relayed else ()))
    figures: dict[str, list[float]] = {f"{s} {t}": [] for s in ("chain", "fanout") for t in targets}
    with tempfile.TemporaryDirectory(prefix="cairn-bench-ray-") as tmp, \
            tempfile.TemporaryDirectory(prefix="cairn-bench-ray-node-") as node_tmp:
        root = Path(tmp)
        head = start_node(None, cpus=2, log=Path(node_tmp) / "head.log")
        nodes = [head]
        ws = Workspace.create(root / "ws")
        spaces = {"local": ws, "ray": ws}
        try:
            wait_ready(head["address"], 1)
            ComputeTarget.create(ws, "local", LocalCompute.provisioning_configuration(max_concurrency=2))
            ComputeTarget.attach(ws, "ray", RayCompute.attach_configuration(address=head["address"]))
            ensure_agent(WorkspaceLayout(ws.location))
            if args.relayed:  # one agent drives one cluster: a second workspace drives this one
                relayed = spaces["relayed"] = Workspace.create(root / "ws-relayed")
                nodes += start_elsewhere(root, Path(node_tmp), Path(node_tmp))
                ComputeTarget.attach(relayed, "relayed", RayCompute.attach_configuration(address=nodes[-1]["address"]))
                ensure_agent(WorkspaceLayout(relayed.location))
            for shape in ("chain", "fanout"):
                for target in targets:
                    timed(spaces[target], root / "state", shape, target)  # warm-up
            for _ in range(args.repeat):
                for shape in ("chain", "fanout"):
                    for target in targets:
                        figures[f"{shape} {target}"].append(timed(spaces[target], root / "state", shape, target))
        finally:
            for space in {id(w): w for w in spaces.values()}.values():
                stop_agent(WorkspaceLayout(space.location))
            for node in nodes:
                stop_node(node)
    m = {k: statistics.median(v) for k, v in figures.items()}
    per_step = (m["chain ray"] - m["chain local"]) / common.CHAIN_LENGTH
    print(f"median of {args.repeat}, seconds")
    print(f"20-step chain:        local {m['chain local']:.2f}  ray {m['chain ray']:.2f}  "
          f"-> Ray overhead {per_step * 1000:.0f} ms per step (target <= 50 ms)")
    print(f"1 -> 50 -> 1 fan-out: local {m['fanout local']:.2f}  ray {m['fanout ray']:.2f}  "
          f"(ray/local {m['fanout ray'] / m['fanout local']:.2f}x)")
    if args.relayed:
        relayed = (m["chain relayed"] - m["chain local"]) / common.CHAIN_LENGTH
        print(f"relayed (a node of another machine): chain {m['chain relayed']:.2f} -> {relayed * 1000:.0f} ms per "
              f"step above local; fan-out {m['fanout relayed']:.2f} ({m['fanout relayed'] / m['fanout local']:.2f}x)")
    out = HERE / "results" / f"ray-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
                               "figures": figures, "ray_overhead_ms_per_step": per_step * 1000}, indent=1))
    print(f"raw figures: {out}")


if __name__ == "__main__":
    main()
