"""The fully reused re-run, as a user would type it: a fresh process that imports Cairn, builds the
20-step chain, submits and waits. ``bench_pipelines.py`` times this whole process from outside.

    python benchmarks/rerun_chain.py WORKSPACE SOURCE_DIRECTORY

Prints one JSON line: the run id and where the time went inside the process (seconds).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # as early as possible: what came before is interpreter start-up

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from shapes import chain_pipeline  # noqa: E402

from cairn import Experiment, Workspace  # noqa: E402

EXPERIMENT = "bench-chain"


def main(argv: list[str]) -> int:
    workspace, source = argv
    t_import = time.perf_counter()
    ws = Workspace(workspace)
    pipeline = chain_pipeline(ws, Path(source))
    t_build = time.perf_counter()
    run = Experiment(ws, EXPERIMENT).submit(pipeline)
    t_submit = time.perf_counter()
    run.wait_for_completion(show_output=False)
    t_wait = time.perf_counter()
    print(json.dumps({"run_id": run.id, "import": t_import - _T0, "open_and_build": t_build - t_import,
                      "submit": t_submit - t_build, "wait": t_wait - t_submit, "in_process": t_wait - _T0}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
