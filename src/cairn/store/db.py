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

SCHEMA_REVISION = "0005"
_MIGRATIONS = Path(__file__).with_name("migrations")


class Store:
    """The metadata database of one workspace."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._writer = _make_engine(url, immediate=True)
        self._reader = _make_engine(url, immediate=False)
        self._migrated = False
        self._one_writer = _writer_lock(url)
        self._own = threading.local()  # each thread's connections for the fast paths (see _own_connection)
        # every one of them alive, for dispose to close (a thread's go with it when it ends)
        self._own_made: weakref.WeakSet[_RawConnection] = weakref.WeakSet()
        self._own_lock = threading.Lock()
        self._own_epoch = 0  # moved on by dispose and by a fork: connections of an earlier epoch are not used
        _OPEN_STORES.add(self)

    def _forget_connections(self) -> None:
        self._writer.dispose(close=False)
        self._reader.dispose(close=False)
        with self._own_lock:
            _ABANDONED.extend(self._own_made)  # the parent's: never closed (nor used) here
            self._own_made = weakref.WeakSet()
            self._own_epoch += 1

    @classmethod
    def for_sqlite_file(cls, path: Path) -> Store:
        return cls(f"sqlite:///{path}")

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
        SQLite this thread's own DBAPI connection in ``BEGIN IMMEDIATE``, without SQLAlchemy's
        pool and execution around it (they cost more than the statements); elsewhere the same as
        ``write``."""
        if not self.url.startswith("sqlite"):
            with self.write() as conn:
                yield conn
            return
        with self._one_writer:
            conn = self._own_connection(self._writer, in_transaction=True)
            db = conn.connection.driver_connection
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    db.rollback()
                    raise
                db.commit()
            except BaseException:
                if db.in_transaction:  # not rolled back (the rollback itself failed): not used again
                    self._drop_own_connection(self._writer)
                raise

    @contextmanager
    def fast_read(self) -> Iterator[Any]:
        """Reads by the prebuilt per-step statements (``queries._fast``) only: on SQLite this
        thread's own DBAPI connection (each statement reads what was committed when it ran),
        without SQLAlchemy's pool and execution around it; elsewhere the same as ``read``. No
        writes (``_fast`` refuses them: not in a transaction)."""
        if not self.url.startswith("sqlite"):
            with self.read() as conn:
                yield conn
            return
        yield self._own_connection(self._reader, in_transaction=False)

    def _own_connection(self, engine: Engine, in_transaction: bool) -> _RawConnection:
        """This thread's connection of ``engine`` for the prebuilt statements: taken from the pool
        once (with the pragmas every connection gets) and kept by the thread. A pool check-out and
        check-in cost ~5x what SQLite needs for one of these statements (~27 us against ~6)."""
        key = id(engine)
        held = getattr(self._own, "connections", None)
        if held is None:
            held = self._own.connections = {}
        found = held.get(key)
        if found is not None and found[0] == self._own_epoch:
            return found[1]
        pooled = engine.raw_connection()
        pooled.detach()  # the pool forgets it: it is this thread's from now on (closed by dispose, or with the thread)
        conn = _RawConnection(engine.dialect, pooled.dbapi_connection, in_transaction)
        with self._own_lock:
            self._own_made.add(conn)
            epoch = self._own_epoch
        held[key] = (epoch, conn)
        return conn

    def _drop_own_connection(self, engine: Engine) -> None:
        found = getattr(self._own, "connections", {}).pop(id(engine), None)
        if found is not None:
            try:
                found[1].driver_connection.close()
            except Exception:  # (what failed before may fail again): it is not used any more either way
                pass

    def dispose(self) -> None:
        with self._own_lock:
            made, self._own_made = list(self._own_made), weakref.WeakSet()
            self._own_epoch += 1
        for conn in made:
            try:
                conn.driver_connection.close()
            except Exception:  # another thread's, in use as it closes: it ends with its thread
                pass
        self._writer.dispose()
        self._reader.dispose()


class _RawConnection:
    """What ``queries._fast`` needs of a connection: its dialect and its DBAPI connection (as
    ``connection.driver_connection``, where a SQLAlchemy connection has it)."""

    def __init__(self, dialect: Any, driver_connection: Any, in_transaction: bool) -> None:
        self.dialect = dialect
        self.driver_connection = driver_connection
        self._in_transaction = in_transaction

    @property
    def connection(self) -> _RawConnection:
        return self

    def in_transaction(self) -> bool:
        return self._in_transaction


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
