"""Kedro, used programmatically (no project scaffolding): one node per step in a Pipeline, each node's
output a MemoryDataset (the step's output folder) in a DataCatalog, run by ThreadRunner(max_workers=2).

ThreadRunner rather than ParallelRunner: each node only waits on its step's subprocess, so threads are
Kedro's recommended runner for such I/O-bound nodes, and need no pickling or shared-memory datasets.
Kedro has no reuse (its ``only_missing_outputs`` skips nodes whose *persisted* outputs exist, which
cannot notice an edited step), so every node runs every time.
"""

import argparse
import logging
import os
import subprocess
import sys
from functools import partial, update_wrapper
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

os.environ.update(KEDRO_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
logging.disable(logging.INFO)  # quiet: Kedro logs each node (and its logging set-up) at INFO

from kedro.io import DataCatalog  # noqa: E402
from kedro.pipeline import Pipeline, node  # noqa: E402
from kedro.runner import ThreadRunner  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shape", required=True, choices=common.SHAPES)
parser.add_argument("--state", required=True, type=Path)
args = parser.parse_args()
state = args.state.resolve()


def run_step(name: str, *inputs: str) -> str:
    """A node's body: the step as its own process; the node's output is its output folder."""
    out = common.data_dir(state, name)
    subprocess.run(common.step_argv(state, name, list(inputs), out), check=True)
    return out


common.prepare_scripts(state, args.shape)
with common.Timer() as t:
    nodes = [node(update_wrapper(partial(run_step, name), run_step), inputs=[f"{u}_out" for u in ups] or None, outputs=f"{name}_out",
                  name=name) for name, ups in common.graph(args.shape)]
    ThreadRunner(max_workers=common.PARALLELISM).run(Pipeline(nodes), DataCatalog())
common.report(t.seconds, "Kedro has no reuse: every node runs" if args.shape in ("rerun", "edit") else "")
