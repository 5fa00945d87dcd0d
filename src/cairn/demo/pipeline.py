"""Build and run the demo pipeline (``cairn demo``)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from cairn.client.experiment import Experiment
from cairn.client.pipeline import Pipeline
from cairn.client.steps import PythonScriptStep
from cairn.client.workspace import Workspace
from cairn.data.pipeline_data import PipelineData

SOURCES = Path(__file__).with_name("src")
MODELS = ("logistic_regression", "random_forest", "gradient_boosting")


def build_pipeline(ws: Workspace, source_directory: str | Path, compute_target: Any = None) -> Pipeline:
    prepped = PipelineData("prepped")
    prep = PythonScriptStep("prepare.py", name="prepare", source_directory=source_directory,
                            arguments=["--output", prepped], outputs=[prepped], compute_target=compute_target)
    trained, train_steps = [], []
    for model in MODELS:
        out = PipelineData(f"model_{model}")
        trained.append(out)
        train_steps.append(PythonScriptStep(
            "train.py", name=f"train_{model}", source_directory=source_directory,
            arguments=["--data", prepped.as_input(), "--model", model, "--output", out], outputs=[out],
            compute_target=compute_target))
    report = PipelineData("report")
    compare = PythonScriptStep("compare.py", name="compare", source_directory=source_directory,
                               arguments=["--models", *[t.as_input() for t in trained], "--output", report],
                               outputs=[report], compute_target=compute_target)
    return Pipeline(ws, [prep, train_steps, compare], description="demo: compare three classifiers")


def run_demo(path: str | Path, regenerate: bool = False, console: Any = None) -> str:
    root = Path(path)
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    for f in SOURCES.glob("*.py"):  # refresh only what changed, so an unchanged snapshot stays unchanged
        dest = src / f.name
        if not dest.exists() or dest.read_bytes() != f.read_bytes():
            shutil.copyfile(f, dest)
    ws = Workspace.create(root)
    started = time.monotonic()
    run = Experiment(ws, "demo").submit(build_pipeline(ws, src), regenerate_outputs=regenerate)
    run.wait_for_completion(show_output=True, raise_on_error=False)
    elapsed = time.monotonic() - started
    status = run.get_status()
    say = console.print if console is not None else print
    if status == "Completed":
        compare = run.find_step_run("compare")[0]
        report = compare.get_output_data("report").local_path / "report.md"
        steps = run.get_steps()
        reused = sum(1 for s in steps if s.is_reused)
        say(report.read_text())
        say(f"{len(steps)} steps, {reused} reused, {elapsed:.1f} s end to end. Report: {report}")
        say(f"Inspect: cairn runs show {run.id} -w {root}   Why reused: cairn explain {compare.id} -w {root}")
    else:
        say(f"the demo run ended {status}; see `cairn runs show {run.id} -w {root}`")
    return status
