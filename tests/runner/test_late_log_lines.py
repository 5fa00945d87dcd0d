"""A late digest's lines reach the uploaded copy of its step's system log (where the default
datastore is an object store, a step's logs are uploaded at its end), whether they are written
before or after that upload (runner/execute.py, ``_LateLogLines``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cairn.runner import execute
from cairn.runner.job import StepJob, StepResult


def _job(tmp_path: Path) -> StepJob:
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "system.txt").write_text("completed\n")
    (logs / "stdout.txt").write_text("hello\n")
    (tmp_path / "store").mkdir()
    return StepJob(workspace="", experiment="", pipeline_run_id="run", step_run_id="step", attempt=1, step={},
                   manifest={}, objects_root="", work_dir="", log_dir=str(logs), datastore_roots={},
                   output_dirs={}, staging_dirs={},
                   datastore_locations={"lake": {"kind": "local", "config": {"path": str(tmp_path / "store")},
                                                 "secrets": {}}},
                   log_upload={"datastore": "lake", "path": "runs/run/step/logs"})


def _late_lines(job: StepJob) -> None:
    """What a late digest does once the step ended: its lines, then ``written``."""
    with open(Path(job.log_dir) / "system.txt", "a") as f:
        f.write("output big: digested after the step was committed\n")
    execute._late_log_lines.written(job)


@pytest.mark.parametrize("lines_first", [False, True], ids=["upload-first", "lines-first"])
def test_the_uploaded_system_log_has_the_late_digests_lines(tmp_path: Path, lines_first: bool) -> None:
    job = _job(tmp_path)
    execute._late_log_lines.expect(job)
    if lines_first:
        _late_lines(job)
    execute.upload_logs(job, StepResult("step", "Completed", None, 0))
    if not lines_first:
        _late_lines(job)
    uploaded = tmp_path / "store" / "runs" / "run" / "step" / "logs"
    assert "digested after the step was committed" in (uploaded / "system.txt").read_text()
    assert (uploaded / "stdout.txt").read_text() == "hello\n"
    assert "step" not in execute._late_log_lines._state  # nothing kept once both came


def test_lines_written_while_the_step_uploads_its_logs_are_uploaded_after(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    job = _job(tmp_path)
    execute._late_log_lines.expect(job)
    real, calls = execute._upload_log_files, []

    def upload(job: StepJob, paths: list[Path]) -> None:
        calls.append([p.name for p in paths])
        real(job, paths)  # what it read had no lines: they come now, during the upload
        if len(calls) == 1:
            _late_lines(job)

    monkeypatch.setattr(execute, "_upload_log_files", upload)
    execute.upload_logs(job, StepResult("step", "Completed", None, 0))
    assert calls == [["stdout.txt", "system.txt"], ["system.txt"]]
    uploaded = tmp_path / "store" / "runs" / "run" / "step" / "logs" / "system.txt"
    assert "digested after the step was committed" in uploaded.read_text()
    assert "step" not in execute._late_log_lines._state


def test_a_digest_that_will_not_be_made_here_leaves_nothing_behind(tmp_path: Path) -> None:
    job = _job(tmp_path)
    execute._late_log_lines.expect(job)
    execute._late_log_lines.forget(job)  # (no thread for it: it stays pending, its lines never come)
    execute.upload_logs(job, StepResult("step", "Completed", None, 0))
    assert "step" not in execute._late_log_lines._state


def test_a_step_without_late_lines_uploads_once_and_keeps_nothing(tmp_path: Path) -> None:
    job = _job(tmp_path)
    execute.upload_logs(job, StepResult("step", "Completed", None, 0))
    assert (tmp_path / "store" / "runs" / "run" / "step" / "logs" / "system.txt").read_text() == "completed\n"
    assert not execute._late_log_lines._state


def test_an_upload_that_fails_where_its_logs_went_does_not_raise(tmp_path: Path) -> None:
    job = _job(tmp_path)
    broken = StepJob(**{**job.to_dict(), "datastore_locations": {"lake": {"kind": "local", "config": {
        "path": str(tmp_path / "no_such_store")}, "secrets": {}}}, "log_dir": str(tmp_path / "gone")})
    execute._late_log_lines.expect(broken)
    execute.upload_logs(broken, StepResult("step", "Completed", None, 0))  # no logs, nowhere to say so
    execute._late_log_lines.written(broken)  # (and again, for the lines)
    assert "step" not in execute._late_log_lines._state
