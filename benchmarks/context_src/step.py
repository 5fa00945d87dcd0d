"""A step that records what most Azure ML scripts record: its run context, two metrics and a tag.
``--open-here`` opens the workspace in this process instead (what Run.get_context() did before it
went through the agent). Logs how long that took, from the first Cairn import to the last record."""

import sys
import time

started = time.perf_counter()
if "--open-here" in sys.argv:
    import os

    from cairn.backend import open_local_backend
    from cairn.client.experiment import Experiment
    from cairn.client.run import StepRun
    from cairn.client.workspace import Workspace

    ws = Workspace._over(open_local_backend(os.environ["CAIRN_WORKSPACE"]))  # not through the agent
    run = StepRun(Experiment(ws, os.environ["CAIRN_EXPERIMENT"]), os.environ["CAIRN_RUN_ID"])
else:
    from cairn import Run

    run = Run.get_context()
run.log("loss", 0.25)
run.log("accuracy", 0.9)
run.tag("stage", "train")
run.log("context_seconds", time.perf_counter() - started)
