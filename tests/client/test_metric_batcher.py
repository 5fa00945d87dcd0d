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
