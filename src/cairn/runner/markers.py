"""Files a step may leave in its log folder to talk to the runner."""

FAIL_MARKER = "fail_requested.txt"  # written by run.fail(): the step is Failed even if it exits 0
