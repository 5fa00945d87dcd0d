"""The floor: every step as `subprocess.run`, two at a time, no tool at all (and no reuse)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shape", required=True, choices=common.SHAPES)
parser.add_argument("--state", required=True, type=Path)
args = parser.parse_args()
common.prepare_scripts(args.state, args.shape)
with common.Timer() as t:
    common.bare_run(args.state, args.shape)
common.report(t.seconds, "no reuse: every step runs" if args.shape in ("rerun", "edit") else "")
