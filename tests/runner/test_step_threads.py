"""Step threads are kept for the next step, and no step given to one is ever lost."""

from __future__ import annotations

import threading

from cairn.runner.step_threads import StepThreads


def test_an_idle_thread_runs_the_next_step_under_its_name() -> None:
    threads = StepThreads(idle_seconds=30)
    seen: list[tuple[str, int]] = []
    done = threading.Semaphore(0)

    def work() -> None:
        me = threading.current_thread()
        seen.append((me.name, me.ident or 0))
        done.release()

    threads.run("step-a", work)
    done.acquire()
    while threads.idle == 0:  # the thread is back, waiting (a few microseconds)
        threading.Event().wait(0.001)
    threads.run("step-b", work)
    done.acquire()
    assert [name for name, _ in seen] == ["step-a", "step-b"]
    assert seen[0][1] == seen[1][1]  # the same thread


def test_steps_given_as_idle_threads_end_are_never_lost(capsys) -> None:
    threads = StepThreads(idle_seconds=0.0005)  # threads end about as often as steps come
    count = 2000
    done = threading.Semaphore(0)

    def work() -> None:
        done.release()

    def crash() -> None:
        done.release()
        raise RuntimeError("a step's bookkeeping crashed")  # the thread serves on

    for i in range(count):
        threads.run(f"step-{i}", crash if i % 7 == 0 else work)
        if i % 3 == 0:
            threading.Event().wait(0.0005)
    for _ in range(count):
        assert done.acquire(timeout=10), "a step given to a thread never ran"
    assert "a step's bookkeeping crashed" in capsys.readouterr().err  # said, not swallowed
