import threading

from cairn.client.metric_batcher import MAX_ROWS, MetricBatcher


class _Recorder:
    location = "memory"

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []
        self.written = threading.Event()

    def log_metrics(self, run_id, rows):
        self.batches.append(rows)
        self.written.set()


def test_rows_are_written_in_batches_in_order():
    backend = _Recorder()
    batcher = MetricBatcher(backend, "step_x")
    for i in range(MAX_ROWS * 2 + 5):
        batcher.add("loss", "scalar", i)
    batcher.flush()
    values = [row[2] for batch in backend.batches for row in batch]
    assert values == list(range(MAX_ROWS * 2 + 5))
    assert len(backend.batches) <= 4  # not one write per value


def test_the_background_writer_flushes_without_being_asked():
    backend = _Recorder()
    MetricBatcher(backend, "step_y").add("acc", "scalar", 0.9)
    assert backend.written.wait(10)
    assert backend.batches[0][0][:3] == ("acc", "scalar", 0.9)


def test_an_idle_batcher_lets_go_of_its_run_and_a_new_one_takes_its_rows(monkeypatch):
    """A process that logs on many runs (of many workspaces) must not keep each run's backend, and
    its database connections, for as long as it lives."""
    import gc
    import weakref

    from cairn.client import metric_batcher

    monkeypatch.setattr(metric_batcher, "IDLE_SECONDS", 0.05)
    backend = _Recorder()
    first = metric_batcher.batcher_for(backend, "step_idle")
    first.add("loss", "scalar", 1.0)
    assert backend.written.wait(10)
    _writers_ended()  # flushed, then idle: it lets go
    assert ("memory", "step_idle") not in metric_batcher._batchers
    backend.written.clear()
    first.add("loss", "scalar", 2.0)  # a late row through the old object reaches the store all the same
    assert backend.written.wait(10)
    assert [row[2] for batch in backend.batches for row in batch] == [1.0, 2.0]
    _writers_ended()
    assert ("memory", "step_idle") not in metric_batcher._batchers
    kept = weakref.ref(first)
    del first
    gc.collect()
    assert kept() is None  # nothing holds it (nor its backend) any more


def _writers_ended() -> None:
    for thread in threading.enumerate():
        if thread.name == "cairn-metrics":
            thread.join(10)
