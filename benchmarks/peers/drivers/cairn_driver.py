"""Cairn: a pipeline of PythonScriptSteps on the embedded workspace in the state folder, local
compute with max_concurrency=2; reuse is Cairn's own (content-keyed fingerprints). ``--warm`` turns
on the opt-in warm start (the "cairn-warm" row)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from cairn import (  # noqa: E402
    ComputeTarget,
    Environment,
    Experiment,
    LocalCompute,
    Pipeline,
    PipelineData,
    PythonScriptStep,
    RunConfiguration,
    Workspace,
)
from cairn.engine.client import _request, ensure_agent  # noqa: E402
from cairn.storage.layout import WorkspaceLayout  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shape", required=True, choices=common.SHAPES)
parser.add_argument("--state", required=True, type=Path)
parser.add_argument("--warm", action="store_true", help="opt-in warm start: steps forked from a server")
args = parser.parse_args()
common.prepare_scripts(args.state, args.shape)
ws = Workspace.create(args.state / "cairn-ws")
# --warm: what the step imports is imported once by a fork server; it starts with the first step and
# stays up between shapes (the agent outlives each driver process)
warm = ["argparse", "hashlib"] if args.warm else None
ComputeTarget.create(ws, "local", LocalCompute.provisioning_configuration(max_concurrency=common.PARALLELISM,
                                                                          warm_start_modules=warm))
# The agent is a long-lived server, like Prefect's: it is up before the timer, as in an edit-run loop
# (`Pipeline(...)` starts it in the background anyway; it stays up 300 s after the last run): started
# and loaded (`sync` answers from its loop) before the timer.
layout = WorkspaceLayout(ws.location)
ensure_agent(layout)
agent_pid = (_request(layout, {"op": "sync"}) or {})["pid"]
cpu_before = common.process_cpu_seconds(agent_pid)
scheduler_before = common.thread_cpu_seconds(agent_pid, agent_pid)  # its main thread runs the scheduler
# the steps' interpreter, every tool's (a venv with no packages): a user-managed environment
steps_run = RunConfiguration()
steps_run.environment = Environment.from_existing_interpreter("bench-steps", common.step_python())
with common.Timer() as t:
    data: dict[str, PipelineData] = {}
    steps = []
    for name, ups in common.graph(args.shape):
        out = data[name] = PipelineData(name)
        arguments: list[object] = ["--name", name, "--out", out, "--ran", str(args.state / "ran.log")]
        for u in ups:
            arguments += ["--in", data[u].as_input()]
        if name == "handoff_write":
            arguments += ["--size", str(common.HANDOFF_BYTES)]
        steps.append(PythonScriptStep("step.py", name=name, source_directory=str(args.state / "steps" / name),
                                      arguments=arguments, outputs=[out], runconfig=steps_run))
    run = Experiment(ws, args.shape).submit(Pipeline(ws, steps))
    status = run.wait_for_completion(show_output=False)
assert status == "Completed", status
# Outputs committed before their digests (engine/late_digests.py): the run ended without waiting for
# them; the agent's CPU counts them, and the next measurement starts once they are made
late_digest_s = common.wait_for_late_digests(ws.location, run.id, t.end)
agent_cpu = common.process_cpu_seconds(agent_pid) - cpu_before
scheduler_cpu = common.thread_cpu_seconds(agent_pid, agent_pid) - scheduler_before
common.report(t.seconds, extra={**common.cairn_overhead(ws.location, run.id, agent_cpu, scheduler_cpu),
                                "agent_peak_mb": common.process_peak_mb(agent_pid), "late_digest_s": late_digest_s})
