"""The benchmark shapes, each built twice: as a Cairn pipeline and as bare ``subprocess.run`` calls.

Both sides run the very same ``step_src/step.py`` with the same arguments; Cairn passes data with
PipelineData, the bare side passes the same folders by path. Nothing here times anything.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cairn import Pipeline, PipelineData, PythonScriptStep, Workspace

STEP_SOURCE = Path(__file__).resolve().with_name("step_src")
STEP_SCRIPT = "step.py"
CHAIN_LENGTH = 20
FAN_WIDTH = 50


# -- Cairn ---------------------------------------------------------------------------------

def _step(name: str, source_directory: Path, out: PipelineData, inputs: list[PipelineData]) -> PythonScriptStep:
    args: list[object] = ["--out", out]
    for data in inputs:
        args += ["--in", data.as_input()]
    return PythonScriptStep(STEP_SCRIPT, name=name, source_directory=str(source_directory),
                            arguments=args, outputs=[out])


def chain_pipeline(ws: Workspace, source_directory: Path, length: int = CHAIN_LENGTH) -> Pipeline:
    """``length`` steps, each reading the output of the one before."""
    steps: list[PythonScriptStep] = []
    previous: list[PipelineData] = []
    for i in range(length):
        out = PipelineData(f"chain_{i:02d}")
        steps.append(_step(f"chain_{i:02d}", source_directory, out, previous))
        previous = [out]
    return Pipeline(ws, steps, description=f"bench: {length}-step chain")


def fanout_pipeline(ws: Workspace, source_directory: Path, width: int = FAN_WIDTH) -> Pipeline:
    """One producer, ``width`` independent steps reading it, one step gathering all of them."""
    seed = PipelineData("seed")
    producer = _step("produce", source_directory, seed, [])
    fanned = [PipelineData(f"fan_{i:02d}") for i in range(width)]
    middle = [_step(f"fan_{i:02d}", source_directory, out, [seed]) for i, out in enumerate(fanned)]
    gathered = PipelineData("gathered")
    gather = _step("gather", source_directory, gathered, fanned)
    return Pipeline(ws, [producer, middle, gather], description=f"bench: 1 -> {width} -> 1 fan-out")


# -- bare baseline -------------------------------------------------------------------------

def _run_step(source_directory: Path, out: Path, inputs: list[Path]) -> None:
    argv = [sys.executable, str(source_directory / STEP_SCRIPT), "--out", str(out)]
    for folder in inputs:
        argv += ["--in", str(folder)]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL)


def bare_chain(source_directory: Path, data_dir: Path, length: int = CHAIN_LENGTH) -> None:
    previous: list[Path] = []
    for i in range(length):
        out = data_dir / f"chain_{i:02d}"
        _run_step(source_directory, out, previous)
        previous = [out]


def bare_fanout(source_directory: Path, data_dir: Path, pool_size: int, width: int = FAN_WIDTH) -> None:
    seed = data_dir / "seed"
    _run_step(source_directory, seed, [])
    fanned = [data_dir / f"fan_{i:02d}" for i in range(width)]
    with ThreadPoolExecutor(max_workers=pool_size) as pool:
        # list() so that a failed step raises here instead of being dropped
        list(pool.map(lambda out: _run_step(source_directory, out, [seed]), fanned))
    _run_step(source_directory, data_dir / "gathered", fanned)
