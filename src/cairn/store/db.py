"""Opening the metadata database: engines, pragmas, migrations, transactions.

SQLite (WAL) is the default; any SQLAlchemy URL works (PostgreSQL for teams). Writes take the
database lock up front (``BEGIN IMMEDIATE`` on SQLite) so that two processes never deadlock on
a lock upgrade; reads never block writers.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

SCHEMA_REVISION = "0007"
_MIGRATIONS = Path(__file__).with_name("migrations")


class Store:
    """The metadata database of one workspace."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._writer = _make_engine(url, immediate=True)
        self._reader = _make_engine(url, immediate=False)
        self._migrated = False
        self._one_writer = _writer_lock(url)
        self._fast_writers = _FastConnections(self._writer, in_transaction=True)
        self._fast_readers = _FastConnections(self._reader, in_transaction=False)
        _OPEN_STORES.add(self)

    def _forget_connections(self) -> None:
        # the parent's pools are kept: freed here, their connections would close in this process
        _ABANDONED.extend((self._writer.pool, self._reader.pool))
        self._writer.dispose(close=False)
        self._reader.dispose(close=False)
        self._fast_writers.forget()
        self._fast_readers.forget()

    @classmethod
    def for_sqlite_file(cls, path: Path, create: bool = True) -> Store:
        """``create=False``: a database that is not there (a workspace moved or removed while its
        agent runs) is an error, not a new empty one made at its old place."""
        if create:
            return cls(f"sqlite:///{path}")
        quoted = str(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
        return cls(f"sqlite:///file:{quoted}?mode=rw&uri=true")

    def migrate(self) -> None:
        """Bring the schema up to date (Alembic), only importing Alembic when behind."""
        if self._migrated:
            return
        if self.current_revision() != SCHEMA_REVISION:
            from alembic import command
            from alembic.config import Config

            cfg = Config()
            cfg.set_main_option("script_location", str(_MIGRATIONS))
            cfg.attributes["engine"] = self._writer
            command.upgrade(cfg, "head")
        self._migrated = True

    def current_revision(self) -> str | None:
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError, ProgrammingError

        try:
            with self._reader.connect() as conn:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except (OperationalError, ProgrammingError):
            return None

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._reader.connect() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One transaction: everything inside commits together or not at all."""
        with self._one_writer, self._writer.begin() as conn:
            yield conn

    @contextmanager
    def fast_write(self) -> Iterator[Any]:
        """A write transaction for the prebuilt per-step statements (``queries._fast``) only: on
        SQLite a DBAPI connection of the store's own (``_FastConnections``) in ``BEGIN IMMEDIATE``,
        without SQLAlchemy's pool and execution around it (they cost more than the statements);
        elsewhere the same as ``write``."""
        if not self.url.startswith("sqlite"):
            with self.write() as conn:
                yield conn
            return
        with self._one_writer, self._fast_writers.use() as conn:
            db = conn.driver_connection
            db.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.pid == os.getpid():
                    db.rollback()
                raise
            if conn.pid != os.getpid():  # forked inside the transaction: only its parent may end it
                raise RuntimeError("a process forked inside a store write must not commit its parent's transaction")
            db.commit()

    @contextmanager
    def fast_read(self) -> Iterator[Any]:
        """Reads by the prebuilt per-step statements (``queries._fast``) only: on SQLite a DBAPI
        connection of the store's own (each statement reads what was committed when it ran),
        without SQLAlchemy's pool and execution around it; elsewhere the same as ``read``. No
        writes (``_fast`` refuses them: not in a transaction)."""
        if not self.url.startswith("sqlite"):
            with self.read() as conn:
                yield conn
            return
        with self._fast_readers.use() as conn:
            yield conn

    def dispose(self) -> None:
        self._fast_writers.close_idle()
        self._fast_readers.close_idle()
        self._writer.dispose()
        self._reader.dispose()


class _RawConnection:
    """What ``queries._fast`` needs of a connection: its dialect and its DBAPI connection (as
    ``connection.driver_connection``, where a SQLAlchemy connection has it)."""

    def __init__(self, dialect: Any, driver_connection: Any, in_transaction: bool) -> None:
        self.dialect = dialect
        self.driver_connection = driver_connection
        self._in_transaction = in_transaction
        self.pid = os.getpid()  # the process that opened it: no other may use or close it

    @property
    def connection(self) -> _RawConnection:
        return self

    def in_transaction(self) -> bool:
        return self._in_transaction


class _Kept:
    """The connections one ``_FastConnections`` opened: the idle ones, and every one still open."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[_RawConnection] = []
        self.open: set[_RawConnection] = set()
        self.epoch = 0  # moved on by close_idle and forks: connections in use then are not kept


class _FastConnections:
    """DBAPI connections of one engine for the prebuilt per-step statements: taken from
    SQLAlchemy's pool once each (with the pragmas every connection gets) and kept here between
    uses. A pool check-out and check-in cost ~5x what SQLite needs for one of these statements
    (~20 us against ~4). At most ``KEEP`` are kept idle; more are opened while more are in use at
    once, and closed as they come back; all close when the store is garbage. Every one stays
    referenced here until closed: a forked child frees its parent's other threads' objects, and
    must never close a connection of its parent's (SQLite's own locks may have been held by one of
    the parent's threads at the fork)."""

    KEEP = 8

    def __init__(self, engine: Engine, in_transaction: bool) -> None:
        self._engine = engine
        self._in_transaction = in_transaction
        self._kept = _Kept()
        # (not at exit: a daemon thread may be using one then; the process's end closes them)
        weakref.finalize(self, _close_all, self._kept).atexit = False

    @contextmanager
    def use(self) -> Iterator[_RawConnection]:
        kept = self._kept
        with kept.lock:
            conn = kept.idle.pop() if kept.idle else None
            epoch = kept.epoch
        if conn is None:
            pooled = self._engine.raw_connection()
            pooled.detach()  # the pool forgets it: it is this store's from now on
            conn = _RawConnection(self._engine.dialect, pooled.dbapi_connection, self._in_transaction)
            with kept.lock:
                kept.open.add(conn)
        healthy = False
        try:
            yield conn
            healthy = True
        finally:
            self._give_back(conn, epoch, healthy)

    def _give_back(self, conn: _RawConnection, epoch: int, healthy: bool) -> None:
        if conn.pid != os.getpid():  # the parent's, used across a fork: left alone (see forget)
            return
        if not healthy:  # left in a transaction (a rollback that failed): not used again
            try:
                healthy = not conn.driver_connection.in_transaction
            except Exception:  # closed meanwhile: nothing to give back
                healthy = False
        kept = self._kept
        with kept.lock:
            if healthy and epoch == kept.epoch and len(kept.idle) < self.KEEP:
                kept.idle.append(conn)
                return
            kept.open.discard(conn)
        _close(conn)

    def close_idle(self) -> None:
        kept = self._kept
        with kept.lock:
            idle, kept.idle = kept.idle, []
            kept.open.difference_update(idle)
            kept.epoch += 1
        for conn in idle:
            _close(conn)

    def forget(self) -> None:
        """In a forked child: the parent's connections are never used (nor closed) here."""
        kept = self._kept
        _ABANDONED.extend(kept.open)
        kept.lock = threading.Lock()  # a parent thread may have held it at the fork
        kept.idle, kept.open = [], set()
        kept.epoch += 1


def _close(conn: _RawConnection) -> None:
    try:
        conn.driver_connection.close()
    except Exception:  # (what failed before may fail again): it is not used any more either way
        pass


def _close_all(kept: _Kept) -> None:
    """The store is garbage: its idle connections close; one still in use (by a use caught in a
    reference cycle with the store) closes as it comes back. A forked child keeps its parent's."""
    pid = os.getpid()
    _ABANDONED.extend(conn for conn in kept.open if conn.pid != pid)
    # (no lock: nothing else can use a garbage store, and in a forked child it may be a parent's, held)
    idle, kept.idle = kept.idle, []
    kept.open = {conn for conn in kept.open if conn.pid == pid and conn not in idle}
    kept.epoch += 1
    for conn in idle:
        if conn.pid == pid:
            _close(conn)


_WRITER_LOCKS: dict[str, threading.Lock] = {}


def _writer_lock(url: str) -> Any:
    """SQLite has one writer at a time. A writer that finds the database locked sleeps and retries
    (1, 2, 5, 10 ms...), also when the writer it waits for is another connection of its own
    process. The agent's threads write often and briefly, so within one process they queue on this
    lock instead (one per database, whichever ``Store`` opened it): the next starts the moment the
    last commits. Other databases lock rows, not the database: no lock there."""
    if not url.startswith("sqlite"):
        return nullcontext()
    return _WRITER_LOCKS.setdefault(url, threading.Lock())


_OPEN_STORES: weakref.WeakSet[Store] = weakref.WeakSet()
_ABANDONED: list[Any] = []  # connections a forked child inherited: closing them could disturb the parent's


def _after_fork_in_child() -> None:
    """A forked child must open its own connections, never reuse its parent's."""
    for url in _WRITER_LOCKS:  # a thread of the parent may have held one at the fork: it is not here
        _WRITER_LOCKS[url] = threading.Lock()
    for store in list(_OPEN_STORES):
        store._forget_connections()
        store._one_writer = _writer_lock(store.url)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _make_engine(url: str, immediate: bool) -> Engine:
    from sqlalchemy import create_engine, event

    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True)

    # Pooled connections: opening one per transaction made SQLite checkpoint and fsync the WAL
    # each time the last connection closed. Step processes are fork+exec'd, so no connection is
    # ever used across a fork.
    engine = create_engine(url, pool_size=8, max_overflow=32, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
