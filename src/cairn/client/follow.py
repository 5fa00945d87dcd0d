"""Following a pipeline run until it ends: status lines, live logs, and what to do if the agent dies."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from cairn.core.errors import RunFailedError, RunTimeoutError
from cairn.core.status import Status
from cairn.runner.markers import is_attempt_marker

LOG_TAIL_INTERVAL = 0.2  # how often new log lines are shown while a step runs (the display only)
IDLE_RECHECK = 5.0  # a safety net: events wake the follower long before this
PARTIAL_AFTER = 1.0  # a line without its newline yet ("Downloading...") is shown after this long


def _fmt_duration(row: dict[str, Any]) -> str:
    if row.get("started_at") and row.get("ended_at"):
        return f" in {row['ended_at'] - row['started_at']:.2f} s"
    return ""


def follow(backend: Any, run_id: str, *, show_output: bool = True, timeout_seconds: float | None = None,
           raise_on_error: bool = True, only_step: str | None = None, out: TextIO | None = None) -> str:
    """Wait for pipeline run ``run_id`` to end and return its final status."""
    try:
        status = _follow(backend, run_id, show_output=show_output, timeout_seconds=timeout_seconds,
                         raise_on_error=raise_on_error, only_step=only_step, out=out)
    except KeyboardInterrupt:
        global INTERRUPT_EXPLAINED
        INTERRUPT_EXPLAINED = True
        print(f"\ninterrupted: pipeline run {run_id} goes on in the background (`cairn logs --follow {run_id}` "
              f"follows it again, `cairn cancel {run_id}` stops it)", file=sys.stderr, flush=True)
        raise
    except RunFailedError:
        if show_output and not only_step:
            SHOWN_TO_THE_END.add(run_id)
        raise
    if show_output and not only_step:
        SHOWN_TO_THE_END.add(run_id)
    return status


# Runs this process has shown to their end (`cairn run` does not show them a second time)
SHOWN_TO_THE_END: set[str] = set()
INTERRUPT_EXPLAINED = False  # a Ctrl-C while following was explained (the CLI says nothing more)


# Set by `cairn run --timeout` (a time.monotonic() value): no wait of the process goes past it,
# those of the pipeline file included.
WAIT_DEADLINE: float | None = None


def _follow(backend: Any, run_id: str, *, show_output: bool, timeout_seconds: float | None,
            raise_on_error: bool, only_step: str | None, out: TextIO | None) -> str:
    out = out or sys.stdout
    began = time.monotonic()
    deadline = None if timeout_seconds is None else began + timeout_seconds
    if WAIT_DEADLINE is not None:  # `cairn run --timeout`: the file's own waits end by then too
        deadline = WAIT_DEADLINE if deadline is None else min(deadline, WAIT_DEADLINE)
    watch = backend.watch(run_id, final_only=not show_output and not only_step)
    seen: dict[str, tuple[str, str | None]] = {}
    offsets: dict[tuple[str, str], int] = {}
    shown_at: dict[tuple[str, str], float] = {}  # when each log last showed something

    def left(at_most: float) -> float:
        """How long a wait may last: ``at_most``, and never past the deadline."""
        return at_most if deadline is None else min(at_most, max(0.0, deadline - time.monotonic()))

    # subscribed before the first read: whatever changes after it is told
    connected = watch.connect(left(float("inf")))  # (the subscription's own limit, within the deadline)
    ensured = False
    announced = False
    # waiting only for its end, which the agent that runs it will tell: nothing to read before that
    tells_end = connected and watch.running and not show_output and not only_step
    try:
        while True:
            if tells_end:
                tells_end = False
                try:
                    if _completed(watch.wait(left(IDLE_RECHECK))):
                        return Status.COMPLETED.value
                except ConnectionError:
                    connected = False
            run = backend.get_run(run_id)
            # step rows are read only when something is shown or one step is awaited
            children = backend.get_children(run_id) if show_output or only_step else []
            if show_output:
                if not announced:
                    print(f"Pipeline run {run_id} (experiment {run['experiment']}): {run['status']}", file=out)
                    announced = True
                _print_changes(backend, children, seen, offsets, out, only_step, shown_at)
            status = Status(run["status"])
            target = next((c for c in children if c["id"] == only_step), None) if only_step else None
            if status.is_terminal or (target is not None and Status(target["status"]).is_terminal):
                if show_output:
                    ended = target if target is not None else run
                    kind = "Step run" if target is not None else "Pipeline run"
                    print(f"{kind} {ended['id']}: {ended['status']}{_fmt_duration(ended)}"
                          + (f" ({ended['status_reason']})" if ended["status_reason"] else ""), file=out)
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise RunTimeoutError(f"run {run_id} is still {run['status']} after {now - began:.0f} s of waiting "
                                      f"(it goes on; wait again or `cairn cancel {run_id}`)")
            if not connected or not ensured:
                backend.ensure_progress()  # starts an agent if none serves the workspace (resume)
                ensured = True
                if not connected:
                    connected = watch.connect(left(IDLE_RECHECK))
                    if connected:
                        continue  # what changed before the agent had the subscription is read now
            running = any(c["status"] == Status.RUNNING.value for c in children)
            wait = left(LOG_TAIL_INTERVAL if show_output and running else IDLE_RECHECK)
            try:
                if connected:
                    event = watch.wait(wait)
                    if event is not None:
                        while (more := watch.wait(0)) is not None:  # many changes at once: read the store once
                            event = more
                        if _completed(event) and not show_output and not only_step:
                            return Status.COMPLETED.value
                else:
                    time.sleep(min(wait, 0.5))
            except ConnectionError:
                connected = False
    finally:
        watch.close()
    final = run if status.is_terminal else backend.get_run(run_id)  # a run's end is its last change
    if raise_on_error:
        failed_target = None
        if only_step:
            step = backend.get_run(only_step)
            failed_target = step if step and step["status"] in (Status.FAILED.value, Status.CANCELED.value) else None
        if final["status"] in (Status.FAILED.value, Status.CANCELED.value) or failed_target:
            raise RunFailedError(_failure_message(backend, final))
    return final["status"]


def _completed(event: dict[str, Any] | None) -> bool:
    """Whether the agent told the run's end as Completed, recorded (nothing is left to read or say
    when only its end is awaited)."""
    return event is not None and event.get("event") == "final" and event.get("status") == Status.COMPLETED.value


def _print_changes(backend: Any, children: list[dict[str, Any]], seen: dict[str, tuple[str, str | None]],
                   offsets: dict[tuple[str, str], int], out: TextIO, only_step: str | None,
                   shown_at: dict[tuple[str, str], float]) -> None:
    now = time.monotonic()
    for c in children:
        if only_step and c["id"] != only_step:
            continue
        key = (c["status"], c["status_reason"])
        changed = seen.get(c["id"]) != key
        seen[c["id"]] = key
        terminal = Status(c["status"]).is_terminal
        after = terminal or c["status"] == Status.FINALIZING.value
        if changed and not after:  # "Running" comes before the lines it prints ...
            _print_status(c, out)
        streaming = c["status"] in (Status.PREPARING.value, Status.RUNNING.value, Status.FINALIZING.value)
        if streaming or (terminal and c["status"] != Status.REUSED.value):
            # the environment's build log first (it is written while the step is Preparing)
            for which in ("environment", "stdout", "stderr"):
                key = (c["id"], which)
                # a log quiet for a while may hold a line still without its newline: shown as it is
                quiet = not terminal and now - shown_at.setdefault(key, now) >= PARTIAL_AFTER
                text, offsets[key] = backend.read_log(c["id"], which, offsets.get(key, 0), complete=terminal,
                                                      partial=quiet)
                if text or quiet:
                    shown_at[key] = now
                for line in _display_lines(text):
                    if which == "stderr" and is_attempt_marker(line):
                        continue  # the same line starts the attempt in stdout: shown once
                    print(f"  {c['name']} | {line}", file=out)
        if changed and after:  # ... and "Completed" after them
            _print_status(c, out)
    out.flush()


def _display_lines(text: str) -> list[str]:
    """The lines of ``text`` as a terminal leaves them: of a line redrawn with carriage returns
    (a progress bar), its latest drawing only."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    shown = []
    for line in lines:
        if "\r" in line:
            drawn = [part for part in line.split("\r") if part]
            if not drawn:
                continue
            line = drawn[-1]
        shown.append(line)
    return shown


def _print_status(c: dict[str, Any], out: TextIO) -> None:
    if c["status"] == Status.NOT_STARTED.value and not c["status_reason"]:
        return
    extra = ""
    if c["status"] == Status.REUSED.value:
        extra = f" (reused step run {c['reused_from']})"
    elif c["status_reason"]:
        extra = f" ({c['status_reason']})"
    duration = _fmt_duration(c) if Status(c["status"]).is_terminal else ""
    print(f"  [{c['name']}] {c['status']}{duration}{extra}  step run {c['id']}", file=out)


def _failure_message(backend: Any, run: dict[str, Any]) -> str:
    lines = [f"pipeline run {run['id']} {run['status']}" + (f": {run['status_reason']}" if run["status_reason"] else "")]
    for c in backend.get_children(run["id"]):
        if c["status"] == Status.FAILED.value:
            lines.append(f"  step {c['name']!r} ({c['id']}) failed: {c['status_reason']}")
            lines.append(f"    see its logs: cairn logs {c['id']}")
    return "\n".join(lines)
