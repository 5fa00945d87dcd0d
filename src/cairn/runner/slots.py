"""Process slots of a compute target: at most ``limit()`` step processes at a time, while more
steps are prepared ahead (``compute/local.py``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cairn.runner.execute import StepControl


class ProcessSlots:
    """At most ``limit()`` step processes at a time. Of the steps prepared and waiting, the one
    given to the compute first (a ticket each, taken at dispatch) goes first — a step still being
    prepared holds nobody up — and a waiting step stops waiting when it is canceled or withdrawn."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._busy = 0
        self._cond = threading.Condition()
        self._waiting: dict[int, str] = {}  # ticket -> run, of the prepared steps waiting for a slot
        self._stopped_runs: set[str] = set()  # runs that stopped after a failure: their steps never start
        self._next_ticket = 0
        self.on_release: list[Callable[[], None]] = []  # told each time a process has ended

    @property
    def busy(self) -> int:
        """Step processes running now."""
        return self._busy

    def ticket(self, run_id: str = "") -> SlotTicket:
        with self._cond:
            number = self._next_ticket
            self._next_ticket += 1
        return SlotTicket(self, number, run_id)

    def stop_run(self, run_id: str) -> None:
        """A step of ``run_id`` failed: its waiting steps are withdrawn before its slot is given on
        (the engine hears of the failure only later)."""
        with self._cond:
            self._stopped_runs.add(run_id)
            self._cond.notify_all()

    def _acquire(self, number: int, run_id: str, control: StepControl,
                 waiting: Callable[[int], None] | None) -> bool:
        control.add_waker(self.wake)
        with self._cond:
            self._waiting[number] = run_id
            told = False
            try:
                while not (control.canceled or control.withdrawn):
                    if run_id and run_id in self._stopped_runs:
                        control.withdrawn = True
                        break
                    if self._busy < self._limit() and number == min(self._waiting):
                        self._busy += 1
                        return True
                    if waiting is not None and not told:
                        told = True
                        waiting(self._busy)
                    self._cond.wait()
                return False
            finally:
                self._waiting.pop(number, None)
                self._cond.notify_all()  # the next in line may go now

    def _release(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify_all()
        for listener in self.on_release:
            listener()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class SlotTicket:
    """One step's place in line for a process slot."""

    def __init__(self, slots: ProcessSlots, number: int, run_id: str) -> None:
        self._slots = slots
        self._number = number
        self.run_id = run_id

    def acquire(self, control: StepControl, waiting: Callable[[int], None] | None = None) -> bool:
        """True with a slot; False when the step was canceled or withdrawn while it waited.
        ``waiting(busy)`` is called once if the step has to wait."""
        return self._slots._acquire(self._number, self.run_id, control, waiting)

    def stop_run(self) -> None:
        self._slots.stop_run(self.run_id)

    def release(self) -> None:
        self._slots._release()
