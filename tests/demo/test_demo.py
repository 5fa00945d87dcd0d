"""The README's main job: the demo pipeline, twice (the second run reuses every step)."""

from __future__ import annotations

from cairn import Workspace
from cairn.demo.pipeline import MODELS, run_demo
from cairn.engine.client import stop_agent
from cairn.storage.layout import WorkspaceLayout


def test_demo_runs_then_reuses_everything(tmp_path, capsys):
    root = tmp_path / "demo"
    try:
        assert run_demo(root) == "Completed"
        first = capsys.readouterr().out
        assert "Best model:" in first and "5 steps, 0 reused" in first
        assert run_demo(root) == "Completed"
        second = capsys.readouterr().out
        assert "5 steps, 5 reused" in second
        ws = Workspace.from_config(root)
        runs = ws.experiments["demo"].get_runs()
        latest = runs[0]
        metrics = latest.get_metrics(recursive=True)
        accuracies = [m["accuracy"] for m in metrics.values() if "accuracy" in m]
        assert len(accuracies) == len(MODELS) and all(0.8 < a <= 1.0 for a in accuracies)
        compare = latest.find_step_run("compare")[0]
        report = (compare.get_output_data("report").local_path / "report.md").read_text()
        assert all(model in report for model in MODELS)
    finally:
        stop_agent(WorkspaceLayout(root))
