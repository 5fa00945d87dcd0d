"""The runner's one deadline thread (deferred statuses): what is due runs, in deadline order, once;
what was cancelled in time never runs."""

from __future__ import annotations

import threading

from cairn.runner.execute import _Deadlines


def test_deadlines_run_in_their_order_and_cancelled_ones_never() -> None:
    deadlines = _Deadlines()
    ran: list[str] = []
    done = threading.Event()

    def record(name: str) -> None:
        ran.append(name)
        if name == "last":
            done.set()

    cancelled = deadlines.call_later(0.05, lambda: record("cancelled"))
    deadlines.call_later(0.6, lambda: record("last"))
    deadlines.call_later(0.3, lambda: record("later"))
    deadlines.call_later(0.1, lambda: record("earlier"))  # due before the head the thread sleeps on
    deadlines.cancel(cancelled)
    assert done.wait(10)
    assert ran == ["earlier", "later", "last"]


def test_a_deadline_added_while_the_thread_sleeps_on_a_later_one_is_not_late() -> None:
    deadlines = _Deadlines()
    fired = threading.Event()
    deadlines.call_later(30, lambda: None)  # the thread now sleeps ~30 s
    import time

    started = time.monotonic()
    deadlines.call_later(0.05, fired.set)
    assert fired.wait(10)
    assert time.monotonic() - started < 5  # woken for it, not after the 30 s one
