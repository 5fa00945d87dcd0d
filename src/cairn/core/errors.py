"""The small tree of Cairn's own exceptions.

Builtin exceptions are used where they fit (a missing file is ``FileNotFoundError``);
these cover what has no builtin name. Every message says what was wrong and how to fix it.
"""

from __future__ import annotations


class CairnError(Exception):
    """Base of every error Cairn raises on purpose (a user can act on its message)."""


class UserInputError(CairnError, ValueError):
    """A value given to a public function or constructor is not acceptable."""


class WorkspaceNotFoundError(CairnError, FileNotFoundError):
    """No workspace configuration was found."""


class PathNotFoundError(CairnError, FileNotFoundError):
    """A file or folder the user named does not exist (a FileNotFoundError, said without a traceback)."""


class PipelineValidationError(CairnError):
    """A pipeline has one or more problems; ``problems`` lists all of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"the pipeline has {len(self.problems)} problem(s):\n{lines}")

    def __reduce__(self) -> tuple:  # rebuilt from its problems, not its message (it crosses the agent's socket)
        return (type(self), (self.problems,))


class SnapshotTooLargeError(CairnError):
    """The source directory is over the snapshot limits."""


class RunFailedError(CairnError):
    """A run ended Failed or Canceled while the caller asked to raise on error."""


class RunTimeoutError(CairnError, TimeoutError):
    """Waiting for a run took longer than the caller allowed."""


class NotFoundError(CairnError, LookupError):
    """A named object (run, experiment, datastore, compute target) does not exist."""


class AgentError(CairnError):
    """The local agent could not be started or reached."""
