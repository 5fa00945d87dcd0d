"""Metaflow: the shape as a static FlowSpec, generated into the state folder and run the way users run
it, ``python flow.py run --max-workers 2``, on the local datastore and metadata inside the state folder.
Every step passes its output folder on as an artifact (``self.path``). Start and end, which Metaflow
requires, carry the first and last steps. Reuse is Metaflow's own ``resume``: ``rerun`` resumes the
successful chain run (every task is cloned), ``edit`` is ``resume chain_09`` (the edited 10th step) (that step and all after
it run again, those before are cloned). A random DAG is not expressible: Metaflow graphs are nested
split/join."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

HEADER = '''import subprocess
import sys
from pathlib import Path

from metaflow import FlowSpec, step

sys.path.insert(0, {here!r})
import common

STATE = Path({state!r})


def run(name, inputs):
    out = common.data_dir(STATE, name)
    subprocess.run(common.step_argv(STATE, name, inputs, out), check=True)
    return out


class {cls}(FlowSpec):
'''


def step(method: str, body: str, then: str = "", inputs: str = "") -> str:
    next_line = f"\n        self.next({then})" if then else ""
    return f"\n    @step\n    def {method}(self{inputs}):\n        {body}{next_line}\n"


def linear(steps: list[tuple[str, list[str]]]) -> str:
    """start -> ... -> end, one Metaflow step per graph step (chain, handoff)."""
    methods = ["start", *[name for name, _ in steps[1:-1]], "end"]
    return "".join(step(m, f"self.path = run({name!r}, {'[self.path]' if ups else '[]'})",
                        f"self.{methods[i + 1]}" if m != "end" else "")
                   for i, (m, (name, ups)) in enumerate(zip(methods, steps, strict=True)))


def fanout() -> str:
    """start (fan_source) -> foreach fan (50 tasks) -> join (fan_sink) -> end (empty: Metaflow refuses
    a join as its terminal step)."""
    return "".join([
        step("start", f"self.path = run('fan_source', [])\n        self.items = list(range({common.FAN_WIDTH}))",
             "self.fan, foreach='items'"),
        step("fan", "self.path = run(f'fan_{self.input:02d}', [self.path])", "self.join"),
        step("join", "run('fan_sink', [i.path for i in inputs])", "self.end", inputs=", inputs"),
        step("end", "pass"),
    ])


parser = argparse.ArgumentParser()
parser.add_argument("--shape", required=True, choices=common.SHAPES)
parser.add_argument("--state", required=True, type=Path)
args = parser.parse_args()
common.prepare_scripts(args.state, args.shape)
state = args.state.resolve()
if args.shape == "dag":
    common.report(None, "not expressible in Metaflow (graphs must be nested split/join)")  # type: ignore[arg-type]
    sys.exit(0)

name = {"rerun": "chain", "edit": "chain"}.get(args.shape, args.shape)
cls = f"{name.capitalize()}Flow"
body = fanout() if name == "fanout" else linear(common.graph(name))
flow = state / "flows" / f"{name}_flow.py"
flow.parent.mkdir(parents=True, exist_ok=True)
flow.write_text(HEADER.format(here=str(common.HERE), state=str(state), cls=cls) + body
                + f"\n\nif __name__ == '__main__':\n    {cls}()\n")

env = {**os.environ, "METAFLOW_DEFAULT_DATASTORE": "local", "METAFLOW_DEFAULT_METADATA": "local",
       "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(state), "METAFLOW_HOME": str(state / "metaflow-home"),
       "USERNAME": "bench"}
command = {"rerun": ["resume"], "edit": ["resume", common.EDITED_STEP]}.get(args.shape, ["run"])
with common.Timer() as t:
    done = subprocess.run([sys.executable, str(flow), *command, "--max-workers", str(common.PARALLELISM)],
                          env=env, cwd=state, stdout=sys.stderr)
if done.returncode:
    sys.exit(f"metaflow {' '.join(command)} failed ({done.returncode})")
notes = {"rerun": "resume of the successful run: Metaflow clones every task",
         "edit": f"resume {common.EDITED_STEP}: Metaflow does not detect the edit; the user names the step, "
                 "which re-runs with everything after it, earlier steps cloned"}
common.report(t.seconds, notes.get(args.shape, ""))
