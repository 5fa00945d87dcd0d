"""Files a step may leave in its log folder to talk to the runner."""

FAIL_MARKER = "fail_requested.txt"  # written by run.fail(): the step is Failed even if it exits 0


def attempt_marker(attempt: int) -> str:
    """The line put in a step's stdout and stderr logs where a later attempt starts."""
    return f"==== cairn: attempt {attempt} (the previous attempt was interrupted) ===="


def is_attempt_marker(line: str) -> bool:
    return line.startswith("==== cairn: attempt ") and line.endswith(" (the previous attempt was interrupted) ====")
