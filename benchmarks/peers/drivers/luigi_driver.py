"""Luigi: one parameterised Task class per step name, built generically from the shape's graph and run
with ``luigi.build(workers=2, local_scheduler=True)``. Each step runs as its own process; a task is
complete when its output target (a ``_SUCCESS`` marker in its output folder) exists, which is all the
reuse Luigi has: it does not look at code, so an edited step whose outputs exist does not run again."""

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import luigi  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shape", required=True, choices=common.SHAPES)
parser.add_argument("--state", required=True, type=Path)
args = parser.parse_args()
common.prepare_scripts(args.state, args.shape)
STATE = args.state.resolve()
UPSTREAM = dict(common.graph(args.shape))


class Step(luigi.Task):
    name = luigi.Parameter()

    def requires(self):
        return [Step(name=u) for u in UPSTREAM[self.name]]

    def output(self):
        return luigi.LocalTarget(str(Path(common.data_dir(STATE, self.name)) / "_SUCCESS"))

    def run(self):
        inputs = [str(Path(t.path).parent) for t in self.input()]
        subprocess.run(common.step_argv(STATE, self.name, inputs, common.data_dir(STATE, self.name)), check=True)
        with self.output().open("w") as marker:  # atomic: written only once the step has succeeded
            marker.write("")


with common.Timer() as t:
    ok = luigi.build([Step(name=n) for n, _ in common.graph(args.shape)], workers=common.PARALLELISM,
                     local_scheduler=True)
if not ok:
    sys.exit("luigi.build failed")
notes = {"rerun": "Luigi reuse: a task is complete when its output target exists",
         "edit": "Luigi checks only that outputs exist: the edited step did not run; its outputs are stale"}
common.report(t.seconds, notes.get(args.shape, ""))
