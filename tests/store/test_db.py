from __future__ import annotations

import threading
import time

import pytest

from cairn.core.status import Status
from cairn.store import queries as q
from cairn.store.db import SCHEMA_REVISION, Store


def _store(tmp_path) -> Store:
    store = Store.for_sqlite_file(tmp_path / "cairn.db")
    store.migrate()
    return store


def _queue_runs(store: Store, n: int) -> list[str]:
    ids = []
    for i in range(n):
        run_id = f"run_{i:018d}"
        q.insert_pipeline_run(store, run_id=run_id, experiment="e", name="p", spec_json="{}", steps=[],
                              tags={}, properties={}, step_properties={}, regenerate_outputs=False,
                              continue_on_step_failure=False)
        ids.append(run_id)
    return ids


def test_sqlite_is_in_wal_mode_and_migrated(tmp_path):
    store = _store(tmp_path)
    assert store.current_revision() == SCHEMA_REVISION
    with store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.migrate()  # idempotent
    again = Store.for_sqlite_file(tmp_path / "cairn.db")
    again.migrate()
    assert again.current_revision() == SCHEMA_REVISION


@pytest.mark.parametrize("start", [False, True])
def test_concurrent_claims_never_hand_one_run_to_two_agents(tmp_path, start):
    """``start``: the agent's claim, which also makes the run Running (once: one Running event)."""
    store = _store(tmp_path)
    ids = _queue_runs(store, 20)
    claimed: dict[str, list[str]] = {}
    started: list[bool] = []

    def agent(owner: str) -> None:
        mine = claimed.setdefault(owner, [])
        other = Store.for_sqlite_file(tmp_path / "cairn.db")
        while (taken := q.claim_and_start(other, owner, ttl=30, start=start)) is not None:
            mine.append(taken[0])
            started.append(taken[1])

    threads = [threading.Thread(target=agent, args=(f"agent{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [r for runs in claimed.values() for r in runs]
    assert sorted(everything) == sorted(ids)  # each run exactly once
    assert started == [start] * len(ids)  # each was queued when it was taken
    for run_id in ids:
        events = [e["status"] for e in q.run_events(store, run_id)]
        assert events == (["Queued", "Running"] if start else ["Queued"])
        assert (q.get_run(store, run_id)["started_at"] is not None) is start


def test_expired_or_dead_leases_are_reclaimed(tmp_path):
    store = _store(tmp_path)
    run_id = _queue_runs(store, 1)[0]
    assert q.claim_run(store, "host:1:a", ttl=30) == run_id
    q.update_status(store, run_id, Status.RUNNING)
    assert q.claim_run(store, "host:2:b", ttl=30) is None  # the lease is alive
    assert q.claim_run(store, "host:2:b", ttl=30, reclaimable_owners=["host:1:a"]) == run_id
    assert q.claim_run(store, "host:3:c", ttl=30) is None
    q.update_fields(store, run_id, lease_expires_at=time.time() - 1)
    assert q.claim_run(store, "host:3:c", ttl=30) == run_id
    assert q.get_run(store, run_id)["attempt"] == 3


def test_a_finished_run_never_changes_status_again(tmp_path):
    store = _store(tmp_path)
    run_id = _queue_runs(store, 1)[0]
    assert q.update_status(store, run_id, Status.RUNNING)
    assert q.update_status(store, run_id, Status.CANCELED, "canceled")
    assert not q.update_status(store, run_id, Status.COMPLETED)
    assert q.get_run(store, run_id)["status"] == "Canceled"
    assert [e["status"] for e in q.run_events(store, run_id)] == ["Queued", "Running", "Canceled"]


def _one_step(store: Store) -> str:
    q.insert_pipeline_run(store, run_id="run_x", experiment="e", name="p", spec_json="{}",
                          steps=[("step_x", "only")], tags={}, properties={}, step_properties={},
                          regenerate_outputs=False, continue_on_step_failure=False)
    return "step_x"


def test_a_step_commit_is_all_or_nothing_and_leaves_the_store_writable(tmp_path):
    """The per-step writes bypass SQLAlchemy's execution on SQLite: a failure inside one still undoes
    all of it, raises SQLAlchemy's error, and releases the write lock."""
    from sqlalchemy.exc import DBAPIError

    store = _store(tmp_path)
    step = _one_step(store)
    assert q.update_status(store, step, Status.RUNNING, None, pid=12, pid_started="34", attempt=1)
    good = {"name": "o", "datastore": "d", "path": "p", "digest": "x", "size": 1, "file_count": 1,
            "stat_signature": None}
    broken = {**good, "name": "o2", "digest": None}  # digest is NOT NULL
    try:
        q.commit_step(store, step, [good, broken], "fp", {}, 0, True)
    except DBAPIError:
        pass
    else:
        raise AssertionError("a NOT NULL violation must fail the commit")
    row = q.get_run(store, step)
    assert row["status"] == "Running" and row["pid"] == 12 and row["attempt"] == 1
    assert q.get_outputs(store, step) == {} and q.lookup_cache(store, "fp") is None
    assert q.commit_step(store, step, [good], "fp", {"a": 1}, 0, True)  # the lock was released
    assert q.get_run(store, step)["status"] == "Completed"
    assert q.get_outputs(store, step)["o"]["digest"] == "x" and q.lookup_cache(store, "fp") == step
    assert [e["status"] for e in q.run_events(store, step)][-2:] == ["Running", "Completed"]


def test_writers_of_one_process_take_turns_without_sqlite_busy_waits(tmp_path):
    """Two threads writing at once, through two stores on one database: the second waits for the
    first in the process, never in SQLite (whose busy handler sleeps 1, 2, 5 ms... between tries).
    SQLite's own wait is turned off here, so a second writer that reached it would fail at once."""
    from sqlalchemy import event

    store, other = _store(tmp_path), Store.for_sqlite_file(tmp_path / "cairn.db")
    for s in (store, other):
        for engine in (s._writer, s._reader):
            event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout=0"))
    ids = _queue_runs(store, 2)
    second_tried, second_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def second_writer() -> None:
        second_tried.set()
        try:
            assert q.update_status(other, ids[1], Status.RUNNING)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        second_done.set()

    with store.fast_write() as conn:
        conn.connection.driver_connection.execute("UPDATE runs SET status_reason = 'first' WHERE id = ?", (ids[0],))
        threading.Thread(target=second_writer).start()
        second_tried.wait()
        assert not second_done.wait(0.3), f"the second writer did not wait for the first: {errors}"
    assert second_done.wait(10)
    assert errors == []
    assert q.get_run(store, ids[0])["status_reason"] == "first"
    assert q.get_run(store, ids[1])["status"] == "Running"


def test_opening_a_sqlite_store_does_not_load_other_databases_dialects(tmp_path):
    """Each user script opens the store: SQLAlchemy's PostgreSQL dialect (~50 ms to import) must
    not come with the schema (a partial index named its PostgreSQL form there)."""
    import subprocess
    import sys

    _store(tmp_path)  # created and migrated here: what a later script opens
    probe = ("import sys\nfrom cairn.store.db import Store\nfrom cairn.store import queries\n"
             f"store = Store.for_sqlite_file({str(tmp_path / 'cairn.db')!r})\nstore.migrate()\n"
             "queries.list_experiments(store)\n"
             "print(sorted(m for m in sys.modules if m.startswith('sqlalchemy.dialects.postgresql')))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_lease_owner_index_is_partial_in_the_migrated_store(tmp_path):
    store = _store(tmp_path)
    with store.read() as conn:
        sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'ix_runs_lease_owner'").scalar()
    assert sql.endswith("WHERE lease_owner IS NOT NULL")


PER_STEP_LIFECYCLE = """
import sys
from sqlalchemy.sql import compiler
from cairn.core.status import Status
from cairn.store import queries as q
from cairn.store.db import Store

compiled = []
real_init = compiler.SQLCompiler.__init__
def counting(self, dialect, statement, *args, **kwargs):
    compiled.append(type(statement).__name__)
    real_init(self, dialect, statement, *args, **kwargs)
compiler.SQLCompiler.__init__ = counting

store = Store.for_sqlite_file(sys.argv[1])
store.migrate()
compiled.clear()  # from here: what a submit, an agent and a step's runner do for each run and step
q.insert_pipeline_run(store, run_id="run_a", experiment="e", name="p", spec_json="{}",
                      steps=[("step_a", "a"), ("step_b", "b")], tags={"t": "1"}, properties={"p": "1"},
                      step_properties={"step_a": {"cairn.snapshot": "x"}}, regenerate_outputs=False,
                      continue_on_step_failure=False)
assert q.claim_run(store, "host:1:x", ttl=30) == "run_a"
assert q.claim_run(store, "host:1:x", ttl=30) is None
q.get_run(store, "run_a"); q.child_runs(store, "run_a"); q.list_named(store, "datastores")
q.update_status(store, "run_a", Status.RUNNING)
assert q.lookup_cache(store, "fp") is None
q.update_status(store, "step_a", Status.RUNNING, pid=1, pid_started="1", attempt=1, fingerprint="fp",
                fingerprint_parts="{}")
output = {"name": "o", "datastore": "d", "path": "runs/x", "digest": "xxh3:0", "size": 1, "file_count": 1}
assert q.commit_step(store, "step_a", [output], "fp", {}, 0, True)
assert q.lookup_cache(store, "fp") == "step_a" and q.get_outputs(store, "step_a")["o"]["size"] == 1
assert q.record_reuses(store, [("step_b", "step_a", "fp", {}, [output])]) == []
q.load_stat_caches(store, ["/a/", "/b/"]); q.snapshot_recorded(store, "blake2b:0")
print(compiled)
"""


def test_a_fresh_process_runs_the_per_step_statements_without_compiling_any(tmp_path):
    """Each user script and each agent is a fresh process: the statements a submit, a claim and a
    step's runner use have their SQLite text written by Cairn, never compiled on first use."""
    import subprocess
    import sys

    _store(tmp_path)
    out = subprocess.run([sys.executable, "-c", PER_STEP_LIFECYCLE, str(tmp_path / "cairn.db")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"



def test_committed_output_records_become_exactly_the_rows_the_store_reads_back(tmp_path):
    """The agent locates a consumer's inputs from the outputs a step's result carries (each through
    ``output_row``), not from a read of the store: both must be the same rows."""
    store = _store(tmp_path)
    step = _one_step(store)
    q.update_status(store, step, Status.RUNNING, None, pid=12, pid_started="34", attempt=1)
    outputs = [{"name": "model", "datastore": "d", "path": "runs/x/model", "digest": "xxh3:1", "size": 10,
                "file_count": 2, "stat_signature": "sig"},
               {"name": "report", "datastore": "d", "path": "runs/x/report", "digest": "xxh3:2", "size": 0,
                "file_count": 0, "stat_signature": None}]
    assert q.commit_step(store, step, outputs, "fp", {}, 0, True)
    assert {o["name"]: q.output_row(step, o) for o in outputs} == q.get_outputs(store, step)


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_the_per_step_statements_reuse_connections_and_keep_only_a_few(tmp_path):
    """The fast paths keep their connections between uses (no pool check-out per statement), and
    at most ``KEEP`` of each kind idle: threads coming and going leave nothing open behind."""
    import gc

    from cairn.store import db

    store = _store(tmp_path)
    ids = _queue_runs(store, 1)
    with store.fast_read() as first:
        pass
    with store.fast_read() as again:
        assert again is first
    errors: list[BaseException] = []
    both = threading.Barrier(16)

    def work() -> None:
        try:
            with store.fast_read():
                both.wait(10)  # all 16 hold a reading connection at once
            assert q.update_status(store, ids[0], Status.RUNNING)
            assert q.get_run(store, ids[0])["status"] == "Running"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    open_after = []
    for _ in range(3):
        threads = [threading.Thread(target=work) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        gc.collect()
        open_after.append(_open_fds())
    assert errors == []
    assert len(store._fast_readers._kept.idle) == db._FastConnections.KEEP  # 16 were open at once; 8 kept
    assert len(store._fast_writers._kept.idle) == 1  # writers take turns: one was ever needed
    assert max(open_after[1:]) <= open_after[0], open_after  # 48 threads came and went: nothing piled up
    store.dispose()
    assert store._fast_readers._kept.idle == [] and first not in store._fast_readers._kept.open  # closed
    assert _open_fds() < open_after[0]


def test_a_store_that_is_garbage_closes_its_connections(tmp_path):
    import gc

    store = _store(tmp_path)
    ids = _queue_runs(store, 1)
    gc.collect()
    before = _open_fds()
    for _ in range(20):  # e.g. a workspace opened again and again in one process
        other = Store.for_sqlite_file(tmp_path / "cairn.db")
        assert q.update_status(other, ids[0], Status.RUNNING) and q.get_run(other, ids[0])["status"] == "Running"
        del other
    gc.collect()
    assert _open_fds() <= before + 2  # (+2: SQLite may keep a closed connection's files for the next)


def test_forks_while_threads_use_the_store_never_hang_the_child(tmp_path):
    """A forked child never closes (nor uses) its parent's connections, whichever thread had them
    and whichever kind (the fast paths' or SQLAlchemy's pools), even when its garbage collector
    runs: SQLite's own locks may have been held by one of the parent's threads at the fork, and a
    close in the child then waits for them forever."""
    import gc
    import os

    from sqlalchemy import text

    gc.collect()  # (connections earlier tests dropped unclosed would close in a child's collection)
    store = _store(tmp_path)
    ids = _queue_runs(store, 1)
    stop = threading.Event()

    def churn() -> None:  # threads coming and going, each reading both ways (as step threads do)
        while not stop.is_set():
            t = threading.Thread(target=q.get_run, args=(store, ids[0]))
            t.start()
            with store.read() as conn:
                conn.execute(text("SELECT count(*) FROM runs")).scalar()
            t.join()

    churners = [threading.Thread(target=churn, daemon=True) for _ in range(3)]
    for t in churners:
        t.start()
    stuck = 0
    try:
        for _ in range(120):
            pid = os.fork()
            if pid == 0:
                gc.collect()  # what a child running Python for a while does sooner or later
                os._exit(0)
            reaper = threading.Thread(target=os.waitpid, args=(pid, 0))
            reaper.start()
            reaper.join(5)
            if reaper.is_alive():  # the child hangs: counted, then killed
                stuck += 1
                os.kill(pid, 9)
                reaper.join()
    finally:
        stop.set()
        for t in churners:
            t.join()
    assert stuck == 0


def test_a_forked_child_opens_its_own_connections_and_leaves_the_parents_working(tmp_path):
    import os

    store = _store(tmp_path)
    ids = _queue_runs(store, 2)
    assert q.update_status(store, ids[0], Status.RUNNING)  # the parent's connections exist now
    pid = os.fork()
    if pid == 0:  # the child: writes and reads through connections of its own
        code = 1
        try:
            code = 0 if q.update_status(store, ids[1], Status.RUNNING) and \
                q.get_run(store, ids[1])["status"] == "Running" else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert q.get_run(store, ids[1])["status"] == "Running"  # the parent reads what the child wrote
    assert q.update_status(store, ids[0], Status.COMPLETED)  # and its own connections still write
    assert q.get_run(store, ids[0])["status"] == "Completed"
