"""A backend that counts the runs read through it (what waiting costs in round trips)."""

from __future__ import annotations

from typing import Any


class CountingReads:
    """``backend`` as it is, with every ``get_run`` noted in ``reads`` (the run ids, in order)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.reads: list[str] = []

    def get_run(self, run_id: str) -> Any:
        self.reads.append(run_id)
        return self._backend.get_run(run_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)
