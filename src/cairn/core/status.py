"""The one state machine of runs and step runs."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    NOT_STARTED = "NotStarted"
    QUEUED = "Queued"
    PREPARING = "Preparing"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"
    REUSED = "Reused"

    def __str__(self) -> str:
        return self.value

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_success(self) -> bool:
        return self in (Status.COMPLETED, Status.REUSED)


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELED, Status.REUSED})
ACTIVE = frozenset({Status.QUEUED, Status.PREPARING, Status.RUNNING, Status.FINALIZING})

# Allowed moves. Any non-terminal state may go to Failed or Canceled; a resumed run goes back
# to Queued from any active state (its lease expired, its unfinished steps run again).
_NEXT: dict[Status, frozenset[Status]] = {
    Status.NOT_STARTED: frozenset({Status.QUEUED, Status.REUSED, Status.PREPARING, Status.RUNNING}),
    # back to NotStarted: prepared, never started, and its run ended (it says why)
    Status.QUEUED: frozenset({Status.PREPARING, Status.RUNNING, Status.REUSED, Status.NOT_STARTED}),
    Status.PREPARING: frozenset({Status.RUNNING, Status.QUEUED, Status.NOT_STARTED}),
    Status.RUNNING: frozenset({Status.FINALIZING, Status.COMPLETED, Status.QUEUED}),
    Status.FINALIZING: frozenset({Status.COMPLETED, Status.QUEUED}),
}


def can_move(old: Status, new: Status) -> bool:
    """Whether the state machine allows ``old -> new``."""
    if old.is_terminal:
        return False
    if new in (Status.FAILED, Status.CANCELED):
        return True
    return new in _NEXT.get(old, frozenset())
