"""Every query of the metadata store. Callers get plain dicts, never rows or sessions."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Boolean, and_, bindparam, delete, insert, literal_column, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.sql.dml import Update

from cairn.core.status import ACTIVE, Status, can_move
from cairn.store import schema as t
from cairn.store.db import Store


def _now() -> float:
    return time.time()


def _d(row: Any) -> dict[str, Any] | None:
    """A row as a dict with plain ``str`` keys (SQLAlchemy's are its ``str`` subclass: pickled, say
    to a process reaching the workspace through its agent, they would make it import SQLAlchemy)."""
    return {str(k): v for k, v in row._mapping.items()} if row is not None else None


# The per-step statements are built once, with bound parameters: building and keying a statement
# costs SQLAlchemy several times what SQLite needs to run it, and the engine runs a few per step.
# Their SQLite text is written here, not by SQLAlchemy's compiler: a fresh process (each user
# script, each agent) compiled each on its first use (~1-2 ms apiece). Other databases run the
# SQLAlchemy statement.
# the statement itself is kept with its text: an id is only unique while its object lives
_SQLITE_TEXT: dict[tuple[int, tuple[str, ...]], tuple[Any, str, tuple[str, ...]]] = {}
# an INSERT of plain values (no Python-side defaults are applied: pass every NOT NULL column) whose
# SQLite text is written by ``_fast`` itself for each set of columns
_PLAIN_INSERTS: dict[int, tuple[Any, Any]] = {}


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _with_sqlite_text(stmt: Any, text: str, order: tuple[str, ...]) -> Any:
    """``stmt`` for ``_fast``, with its SQLite ``text`` whose ``?`` take the parameters named in
    ``order``, in that order."""
    _SQLITE_TEXT[(id(stmt), tuple(sorted(order)))] = (stmt, text, order)
    return stmt


def _plain_insert(table: Any) -> Any:
    stmt = insert(table)
    _PLAIN_INSERTS[id(stmt)] = (stmt, table)
    return stmt


def _select(table: Any, columns: tuple[str, ...] = (), where: str | None = None, param: str | None = None,
            order: tuple[str, ...] = ()) -> Any:
    """``SELECT columns (all by default) FROM table [WHERE where = :param] [ORDER BY order]``, for
    ``_fast`` (``param`` defaults to ``b_`` + ``where``)."""
    cols = [table.c[c] for c in columns] if columns else list(table.c)
    stmt = select(*cols)
    text = f"SELECT {', '.join(_quoted(c.name) for c in cols)} FROM {_quoted(table.name)}"
    keys: tuple[str, ...] = ()
    if where is not None:
        param = param or f"b_{where}"
        stmt = stmt.where(table.c[where] == bindparam(param))
        text += f" WHERE {_quoted(where)} = ?"
        keys = (param,)
    if order:
        stmt = stmt.order_by(*(table.c[o] for o in order))
        text += " ORDER BY " + ", ".join(_quoted(o) for o in order)
    return _with_sqlite_text(stmt, text, keys)


def _delete(table: Any, where: str, param: str) -> Any:
    """``DELETE FROM table WHERE where = :param``, for ``_fast``."""
    stmt = delete(table).where(table.c[where] == bindparam(param))
    return _with_sqlite_text(stmt, f"DELETE FROM {_quoted(table.name)} WHERE {_quoted(where)} = ?", (param,))


_STATUS_OF = _select(t.runs, ("status", "status_reason"), "id")
_INSERT_EVENT = _plain_insert(t.run_events)
_INSERT_OUTPUT = _plain_insert(t.step_outputs)
_DELETE_OUTPUTS = _delete(t.step_outputs, "step_run_id", "b_id")
_OUTPUTS_OF = _select(t.step_outputs, where="step_run_id", param="b_id")
_DELETE_CACHE_ENTRY = _delete(t.cache_entries, "fingerprint", "b_fingerprint")
_INSERT_CACHE_ENTRY = _plain_insert(t.cache_entries)
_CACHE_LOOKUP = _select(t.cache_entries, ("step_run_id",), "fingerprint")
_DEFINITION_LOOKUP = _with_sqlite_text(
    select(t.cache_entries.c.fingerprint).where(t.cache_entries.c.definition == bindparam("b_definition")).limit(1),
    f"SELECT {_quoted('fingerprint')} FROM {_quoted('cache_entries')} WHERE {_quoted('definition')} = ? LIMIT 1",
    ("b_definition",))
_UPDATE_RUN: dict[tuple[str, ...], Update] = {}


def _fast(conn: Connection, stmt: Any, params: dict[str, Any] | list[dict[str, Any]]) -> Any:
    """Run one of the prebuilt per-step statements above (a write only inside a transaction:
    ``store.write`` or ``store.fast_write``). On SQLite, its text is made once and run on the transaction's own DBAPI
    cursor: SQLAlchemy's execution costs several times what SQLite needs for these. Their columns
    are plain floats, strings and integers with no Python-side defaults (a default added to these
    tables must be passed explicitly here). Returns something with ``fetchone``/``fetchall``."""
    if stmt.is_dml and getattr(conn, "in_transaction", lambda: True)() is False:
        raise RuntimeError("the per-step writes run inside a transaction (store.write or store.fast_write)")
    if conn.dialect.name != "sqlite":
        result = conn.execute(stmt, params)
        return _Rows(result.mappings().all() if result.returns_rows else [])
    rows = params if isinstance(params, list) else [params]
    keys = tuple(sorted(rows[0]))
    cached = _SQLITE_TEXT.get((id(stmt), keys))
    if cached is None or cached[0] is not stmt:
        plain = _PLAIN_INSERTS.get(id(stmt))
        if plain is not None and plain[0] is stmt:
            columns = ", ".join(_quoted(k) for k in keys)
            text = f'INSERT INTO {_quoted(plain[1].name)} ({columns}) VALUES ({", ".join("?" * len(keys))})'
            cached = _SQLITE_TEXT[(id(stmt), keys)] = (stmt, text, keys)
        else:
            compiled = stmt.compile(dialect=conn.dialect, column_keys=list(keys))
            cached = _SQLITE_TEXT[(id(stmt), keys)] = (stmt, str(compiled), tuple(compiled.positiontup or ()))
    _stmt, sql, order = cached
    cursor = conn.connection.driver_connection.cursor()
    try:
        if isinstance(params, list):
            cursor.executemany(sql, [[row[k] for k in order] for row in rows])
        else:
            cursor.execute(sql, [params[k] for k in order])
    except Exception as exc:  # as SQLAlchemy would raise it, so that callers see one kind of error
        from sqlalchemy.exc import DBAPIError

        raise DBAPIError.instance(sql, params, exc, type(exc)) from exc
    return cursor


class _Rows:
    """A buffered result (other databases): ``fetchone``/``fetchall`` of tuples, ``description``."""

    def __init__(self, rows: list[Any]) -> None:
        self._rows = [tuple(r.values()) for r in rows]
        self.description = [(k,) for k in rows[0].keys()] if rows else []

    def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows


def _fast_rows(conn: Connection, stmt: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    """``_fast`` for a prebuilt select: its rows as dicts by column name."""
    cursor = _fast(conn, stmt, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _typed_rows(rows: list[dict[str, Any]], table: Any) -> list[dict[str, Any]]:
    """Booleans as bool: SQLite's driver gives the 0 or 1 it stores (SQLAlchemy converts them)."""
    flags = _BOOLEAN_COLUMNS.get(table.name)
    if flags is None:
        flags = _BOOLEAN_COLUMNS[table.name] = tuple(c.name for c in table.c if isinstance(c.type, Boolean))
    for row in rows:
        for name in flags:
            if row[name] is not None:
                row[name] = bool(row[name])
    return rows


_BOOLEAN_COLUMNS: dict[str, tuple[str, ...]] = {}
_EXPERIMENT_BY_NAME = _select(t.experiments, where="name")
_INSERT_EXPERIMENT = _plain_insert(t.experiments)
_INSERT_RUN = _plain_insert(t.runs)
_INSERT_TAG = _plain_insert(t.run_tags)
_INSERT_PROPERTY = _plain_insert(t.run_properties)
_RUN_BY_ID = _select(t.runs, where="id")
_RUNS_OF_PARENT = _select(t.runs, where="parent_id", order=("created_at", "id"))
_NAMED = {"datastores": _select(t.datastores, order=("name",)),
          "compute_targets": _select(t.compute_targets, order=("name",))}


def _update_run(conn: Connection, run_id: str, values: dict[str, Any]) -> None:
    """``UPDATE runs SET values WHERE id = run_id`` through one prebuilt statement per column set."""
    _fast(conn, _update_statement(tuple(sorted(values))), {"b_id": run_id, **{f"b_{c}": v for c, v in values.items()}})


def _update_statement(columns: tuple[str, ...]) -> Any:
    """The prebuilt ``UPDATE runs SET columns WHERE id`` (parameters ``b_<column>`` and ``b_id``)."""
    stmt = _UPDATE_RUN.get(columns)
    if stmt is None:
        assignments = ", ".join(f"{_quoted(c)} = ?" for c in columns)
        stmt = _UPDATE_RUN[columns] = _with_sqlite_text(
            update(t.runs).where(t.runs.c.id == bindparam("b_id")).values({c: bindparam(f"b_{c}") for c in columns}),
            f'UPDATE "runs" SET {assignments} WHERE "id" = ?', (*(f"b_{c}" for c in columns), "b_id"))
    return stmt


# -- experiments ---------------------------------------------------------------------------

def ensure_experiment(conn: Connection, name: str) -> None:
    """Inside a write transaction (``store.write`` or ``store.fast_write``)."""
    if _fast(conn, _EXPERIMENT_BY_NAME, {"b_name": name}).fetchone() is None:
        _fast(conn, _INSERT_EXPERIMENT, {"name": name, "created_at": _now()})


def list_experiments(store: Store) -> list[str]:
    with store.read() as conn:
        return [r[0] for r in conn.execute(select(t.experiments.c.name).order_by(t.experiments.c.name))]


# -- runs ----------------------------------------------------------------------------------

def insert_pipeline_run(
    store: Store, *, run_id: str, experiment: str, name: str, spec_json: str,
    steps: list[tuple[str, str]], tags: dict[str, str], properties: dict[str, str],
    step_properties: dict[str, dict[str, str]], regenerate_outputs: bool,
    continue_on_step_failure: bool,
) -> None:
    """The pipeline run (Queued) and one NotStarted step run per step, in one transaction."""
    now = _now()
    # prebuilt statements only: a submit is a user's fresh process, where compiling these cost ~8 ms
    with store.fast_write() as conn:
        ensure_experiment(conn, experiment)
        _fast(conn, _INSERT_RUN, {
            "id": run_id, "experiment": experiment, "parent_id": None, "kind": "pipeline", "name": name,
            "status": Status.QUEUED.value, "created_at": now, "spec": spec_json,
            "regenerate_outputs": regenerate_outputs, "continue_on_step_failure": continue_on_step_failure,
            "cancel_requested": False, "attempt": 0})
        _fast(conn, _INSERT_EVENT, {"run_id": run_id, "status": Status.QUEUED.value, "reason": None, "at": now})
        if steps:
            _fast(conn, _INSERT_RUN, [  # created_at keeps the spec's step order
                {"id": step_id, "experiment": experiment, "parent_id": run_id, "kind": "step", "name": step_name,
                 "status": Status.NOT_STARTED.value, "created_at": now + order * 1e-6, "regenerate_outputs": False,
                 "continue_on_step_failure": False, "cancel_requested": False, "attempt": 0}
                for order, (step_id, step_name) in enumerate(steps, 1)])
            _fast(conn, _INSERT_EVENT, [
                {"run_id": step_id, "status": Status.NOT_STARTED.value, "reason": None, "at": now}
                for step_id, _ in steps])
        # new runs have no tags or properties yet: inserted at once (not replaced key by key)
        if tags:
            _fast(conn, _INSERT_TAG, _kv_rows(run_id, tags))
        props = _kv_rows(run_id, properties)
        for step_id, values in step_properties.items():
            props += _kv_rows(step_id, values)
        if props:
            _fast(conn, _INSERT_PROPERTY, props)


def get_run(store: Store, run_id: str) -> dict[str, Any] | None:
    with store.fast_read() as conn:  # asked by every status check, client and agent alike
        rows = _typed_rows(_fast_rows(conn, _RUN_BY_ID, {"b_id": run_id}), t.runs)
    return rows[0] if rows else None


def child_runs(store: Store, parent_id: str) -> list[dict[str, Any]]:
    with store.fast_read() as conn:
        return _typed_rows(_fast_rows(conn, _RUNS_OF_PARENT, {"b_parent_id": parent_id}), t.runs)


def list_runs(store: Store, experiment: str | None = None, limit: int = 50,
              kind: str = "pipeline") -> list[dict[str, Any]]:
    q = select(t.runs).where(t.runs.c.kind == kind)
    if experiment:
        q = q.where(t.runs.c.experiment == experiment)
    with store.read() as conn:
        rows = conn.execute(q.order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc()).limit(limit))
        return [_d(r) for r in rows]


def run_events(store: Store, run_id: str) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(select(t.run_events).where(t.run_events.c.run_id == run_id)
                            .order_by(t.run_events.c.id))
        return [_d(r) for r in rows]


def set_status(conn: Connection, run_id: str, status: Status, reason: str | None = None,
               **fields: Any) -> bool:
    """Move a run along the state machine and record the event. False if the move is not allowed
    (e.g. the run already ended: a late update never overwrites a final status)."""
    return set_statuses(conn, [(run_id, status, reason, fields)])[0]


StatusMove = tuple[str, Status, "str | None", dict[str, Any]]  # run id, new status, reason, other fields


def set_statuses(conn: Connection, moves: list[StatusMove]) -> list[bool]:
    """``set_status`` for each (run id, status, reason, fields) of ``moves``, in the caller's
    transaction: each run's status is read, its writes go in one statement per kind for them all
    (a rerun moves 20 steps at once). A run appears once in ``moves``."""
    now = _now()
    allowed = []
    updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    events = []
    rows = _statuses_of(conn, [m[0] for m in moves])
    for run_id, status, reason, fields in moves:
        row = rows.get(run_id)
        old = None if row is None else Status(row[0])
        if old is None or (old != status and not can_move(old, status)):
            allowed.append(False)
            continue
        allowed.append(True)
        if old == status and status in (Status.FAILED, Status.CANCELED) and reason == row[1]:
            continue  # the same ending told twice (by a Ray task and by its driver): recorded once, as first told
        values: dict[str, Any] = {"status": status.value, "status_reason": reason, **fields}
        if status in (Status.RUNNING, Status.PREPARING) and old in (Status.NOT_STARTED, Status.QUEUED):
            values["started_at"] = now
        if status.is_terminal:
            values["ended_at"] = now
            values.setdefault("lease_owner", None)  # an ended run is nobody's
            values.setdefault("lease_expires_at", None)
        updates.setdefault(tuple(sorted(values)), []).append(
            {"b_id": run_id, **{f"b_{c}": v for c, v in values.items()}})
        if old != status or reason:
            events.append({"run_id": run_id, "status": status.value, "reason": reason, "at": now})
    for columns, params in updates.items():
        _fast(conn, _update_statement(columns), params if len(params) > 1 else params[0])
    if events:
        _fast(conn, _INSERT_EVENT, events if len(events) > 1 else events[0])
    return allowed


def _statuses_of(conn: Connection, run_ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """Run id -> (status, status reason), of those that exist: one read for them all."""
    found: dict[str, tuple[str, str | None]] = {}
    for i in range(0, len(run_ids), 500):  # (SQLite's limit on parameters is 999 on older builds)
        chunk = run_ids[i:i + 500]
        rows = _fast(conn, _statuses_statement(len(chunk)), {f"b_{n}": r for n, r in enumerate(chunk)}).fetchall()
        found.update((r[0], (r[1], r[2])) for r in rows)
    return found


_STATUSES_OF: dict[int, Any] = {}


def _statuses_statement(count: int) -> Any:
    """The prebuilt ``SELECT id, status, status_reason FROM runs WHERE id IN`` ``count`` ids
    (parameters ``b_0``...)."""
    stmt = _STATUSES_OF.get(count)
    if stmt is None:
        names = tuple(f"b_{n}" for n in range(count))
        stmt = _STATUSES_OF[count] = _with_sqlite_text(
            select(t.runs.c.id, t.runs.c.status, t.runs.c.status_reason)
            .where(t.runs.c.id.in_([bindparam(name) for name in names])),
            f'SELECT "id", "status", "status_reason" FROM "runs" WHERE "id" IN ({", ".join("?" * count)})', names)
    return stmt


def update_status(store: Store, run_id: str, status: Status, reason: str | None = None,
                  **fields: Any) -> bool:
    with store.fast_write() as conn:  # set_status runs only prebuilt statements
        return set_status(conn, run_id, status, reason, **fields)


def update_fields(store: Store, run_id: str, **fields: Any) -> None:
    with store.write() as conn:
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(**fields))


def request_cancel(store: Store, run_id: str) -> dict[str, Any] | None:
    """Mark a run for cancelation. A run nobody has claimed yet is canceled at once."""
    with store.write() as conn:
        row = _d(conn.execute(select(t.runs).where(t.runs.c.id == run_id)).first())
        if row is None or Status(row["status"]).is_terminal:
            return row
        conn.execute(update(t.runs).where(t.runs.c.id == run_id).values(cancel_requested=True))
        if row["status"] == Status.QUEUED.value and row["lease_owner"] is None:
            set_status(conn, run_id, Status.CANCELED, "canceled before it started")
            for child in conn.execute(select(t.runs.c.id).where(t.runs.c.parent_id == run_id)).all():
                set_status(conn, child[0], Status.CANCELED, "pipeline run canceled")
    return get_run(store, run_id)


# -- queue and leases ----------------------------------------------------------------------

# the oldest pipeline run an agent may take: queued or handed back (active, no lease), or active
# under another owner's expired lease
_ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in ACTIVE)
_CLAIMABLE = _with_sqlite_text(
    select(t.runs.c.id).where(
        t.runs.c.kind == "pipeline", t.runs.c.status.in_([s.value for s in ACTIVE]),
        or_(t.runs.c.lease_owner.is_(None),
            and_(t.runs.c.lease_owner != bindparam("b_owner"), t.runs.c.lease_expires_at < bindparam("b_now"))))
    .order_by(t.runs.c.created_at).limit(1),
    f'SELECT "id" FROM "runs" WHERE "kind" = \'pipeline\' AND "status" IN ({_ACTIVE_SQL}) AND '
    f'("lease_owner" IS NULL OR ("lease_owner" != ? AND "lease_expires_at" < ?)) ORDER BY "created_at" LIMIT 1',
    ("b_owner", "b_now"))
_TAKE_LEASE = _with_sqlite_text(
    update(t.runs).where(t.runs.c.id == bindparam("b_id"))
    .values(lease_owner=bindparam("b_owner"), lease_expires_at=bindparam("b_expires"),
            attempt=t.runs.c.attempt + literal_column("1")),  # no anonymous parameter
    'UPDATE "runs" SET "lease_owner" = ?, "lease_expires_at" = ?, "attempt" = "attempt" + 1 WHERE "id" = ?',
    ("b_owner", "b_expires", "b_id"))


def claim_run(store: Store, owner: str, ttl: float, reclaimable_owners: Iterable[str] = ()) -> str | None:
    """Atomically take the oldest queued run, or an active one whose lease expired or whose
    owner is known dead. Returns its id, or None when nothing is waiting (found by a read: no
    write transaction is taken for nothing)."""
    claimed = claim_and_start(store, owner, ttl, reclaimable_owners, start=False)
    return None if claimed is None else claimed[0]


def claim_and_start(store: Store, owner: str, ttl: float, reclaimable_owners: Iterable[str] = (),
                    start: bool = True) -> tuple[str, bool] | None:
    """``claim_run``, and (``start``) a queued run it takes is Running in the same transaction.
    Returns (its id, whether it was queued and is now Running)."""
    now = _now()
    dead = list(reclaimable_owners)
    params = {"b_owner": owner, "b_now": now}
    if dead:  # (rare: an agent of this host died) its leases end now: its runs are claimable as any expired one's
        with store.write() as conn:
            conn.execute(update(t.runs).where(t.runs.c.lease_owner.in_(dead)).values(lease_expires_at=0.0))
    else:
        with store.fast_read() as conn:
            if _fast(conn, _CLAIMABLE, params).fetchone() is None:
                return None
    with store.fast_write() as conn:  # asked again inside the transaction: another agent may have been first
        row = _fast(conn, _CLAIMABLE, params).fetchone()
        if row is None:
            return None
        _fast(conn, _TAKE_LEASE, {"b_id": row[0], "b_owner": owner, "b_expires": now + ttl})
        started = start and _fast(conn, _STATUS_OF, {"b_id": row[0]}).fetchone()[0] == Status.QUEUED.value
        if started:
            set_status(conn, row[0], Status.RUNNING)
        return row[0], started


def renew_leases(store: Store, owner: str, ttl: float) -> set[str]:
    """Extend every lease ``owner`` holds; returns the runs it still holds."""
    with store.write() as conn:
        conn.execute(update(t.runs).where(t.runs.c.lease_owner == owner)
                     .values(lease_expires_at=_now() + ttl))
        return {r[0] for r in conn.execute(select(t.runs.c.id).where(t.runs.c.lease_owner == owner))}


_RELEASE_LEASE = _with_sqlite_text(
    update(t.runs).where(t.runs.c.id == bindparam("b_id"), t.runs.c.lease_owner == bindparam("b_owner"))
    .values(lease_owner=None, lease_expires_at=None),
    'UPDATE "runs" SET "lease_owner" = NULL, "lease_expires_at" = NULL WHERE "id" = ? AND "lease_owner" = ?',
    ("b_id", "b_owner"))


def release_lease(store: Store, run_id: str, owner: str) -> None:
    with store.fast_write() as conn:
        release_lease_in(conn, run_id, owner)


def release_lease_in(conn: Connection, run_id: str, owner: str) -> None:
    """``release_lease`` in the caller's write transaction."""
    _fast(conn, _RELEASE_LEASE, {"b_id": run_id, "b_owner": owner})


_LEASE_OWNERS = _with_sqlite_text(
    select(t.runs.c.lease_owner).where(t.runs.c.lease_owner.is_not(None)).distinct(),
    'SELECT DISTINCT "lease_owner" FROM "runs" WHERE "lease_owner" IS NOT NULL', ())


def lease_owners(store: Store) -> set[str]:
    with store.fast_read() as conn:
        return {r[0] for r in _fast(conn, _LEASE_OWNERS, {}).fetchall()}


def has_waiting_runs(store: Store) -> bool:
    with store.read() as conn:
        return conn.execute(select(t.runs.c.id).where(
            t.runs.c.kind == "pipeline", t.runs.c.status.in_([s.value for s in ACTIVE]),
            t.runs.c.lease_owner.is_(None)).limit(1)).first() is not None


# -- tags, properties ----------------------------------------------------------------------

def _kv_rows(run_id: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"run_id": run_id, "key": k, "value": None if v is None else str(v)} for k, v in values.items()]


def _put_kv(conn: Connection, table: Any, run_id: str, values: dict[str, Any]) -> None:
    if not values:
        return
    conn.execute(delete(table).where(table.c.run_id == run_id, table.c.key.in_(list(values))))
    conn.execute(insert(table), _kv_rows(run_id, values))


def set_tags(store: Store, run_id: str, tags: dict[str, Any]) -> None:
    with store.write() as conn:
        _put_kv(conn, t.run_tags, run_id, tags)


def add_properties(store: Store, run_id: str, props: dict[str, Any]) -> list[str]:
    """Properties are immutable once set: returns the keys that already had another value."""
    clashes = []
    with store.write() as conn:
        current = {r[0]: r[1] for r in conn.execute(
            select(t.run_properties.c.key, t.run_properties.c.value)
            .where(t.run_properties.c.run_id == run_id))}
        fresh = {}
        for k, v in props.items():
            if k in current and current[k] != str(v):
                clashes.append(k)
            elif k not in current:
                fresh[k] = v
        _put_kv(conn, t.run_properties, run_id, fresh)
    return clashes


def get_kv(store: Store, run_id: str, which: str) -> dict[str, str | None]:
    table = t.run_tags if which == "tags" else t.run_properties
    with store.read() as conn:
        rows = conn.execute(select(table.c.key, table.c.value).where(table.c.run_id == run_id)
                            .order_by(table.c.key))
        return {r[0]: r[1] for r in rows}


# -- metrics -------------------------------------------------------------------------------

def add_metric(store: Store, run_id: str, name: str, kind: str, value: Any) -> None:
    with store.write() as conn:
        conn.execute(insert(t.metrics).values(run_id=run_id, name=name, kind=kind,
                                              value=json.dumps(value), at=_now()))


def add_metrics(store: Store, run_id: str, rows: list[tuple[str, str, Any, float]]) -> None:
    """Many (name, kind, value, time) rows in one transaction."""
    with store.write() as conn:
        conn.execute(insert(t.metrics), [{"run_id": run_id, "name": n, "kind": k, "value": json.dumps(v), "at": at}
                                         for n, k, v, at in rows])


SYSTEM_PROPERTY_PREFIXES = ("cairn.", "mlflow.", "azureml.")


def forget_attempt(store: Store, step_run_id: str) -> None:
    """What an interrupted attempt's script recorded (metrics, tags, its own properties) goes:
    the next attempt starts clean. Properties Cairn set at submit stay."""
    with store.write() as conn:
        conn.execute(delete(t.metrics).where(t.metrics.c.run_id == step_run_id))
        conn.execute(delete(t.run_tags).where(t.run_tags.c.run_id == step_run_id))
        keep = or_(*(t.run_properties.c.key.startswith(p) for p in SYSTEM_PROPERTY_PREFIXES))
        conn.execute(delete(t.run_properties).where(t.run_properties.c.run_id == step_run_id, ~keep))


def get_metric_rows(store: Store, run_ids: list[str]) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = conn.execute(select(t.metrics).where(t.metrics.c.run_id.in_(run_ids))
                            .order_by(t.metrics.c.id))
        return [{**_d(r), "value": json.loads(r.value)} for r in rows]


# -- outputs and the reuse cache -----------------------------------------------------------

def get_outputs(store: Store, step_run_id: str) -> dict[str, dict[str, Any]]:
    with store.fast_read() as conn:
        return {r["name"]: r for r in _fast_rows(conn, _OUTPUTS_OF, {"b_id": step_run_id})}


def commit_step(store: Store, step_run_id: str, outputs: list[dict[str, Any]], fingerprint: str | None,
                parts: dict[str, Any], exit_code: int, cacheable: bool, definition: str | None = None) -> bool:
    """Outputs, Completed status and cache entry in ONE transaction (the atomic-output rule).
    ``definition``: the fingerprint without its inputs (see ``definition_cached``)."""
    with store.fast_write() as conn:  # prebuilt statements only
        if not set_status(conn, step_run_id, Status.COMPLETED, None, exit_code=exit_code,
                          fingerprint=fingerprint, fingerprint_parts=json.dumps(parts)):
            return False
        _fast(conn, _DELETE_OUTPUTS, {"b_id": step_run_id})
        if outputs:
            _fast(conn, _INSERT_OUTPUT, [output_row(step_run_id, o) for o in outputs])
        if cacheable:
            _fast(conn, _DELETE_CACHE_ENTRY, {"b_fingerprint": fingerprint})
            _fast(conn, _INSERT_CACHE_ENTRY, {"fingerprint": fingerprint, "step_run_id": step_run_id,
                                              "created_at": _now(), "definition": definition})
    return True


def record_late_digests(store: Store, step_run_id: str, pending: str, digests: dict[str, str],
                        forget_cache_entry: bool = False) -> None:
    """The digests of outputs ``step_run_id`` committed before they were made (``engine/late_digests``),
    where its records still say ``pending`` (no other step's do: a step reuses an output only once
    its digest is made). ``forget_cache_entry``: one changed after its commit, so the step is no
    longer reused."""
    with store.write() as conn:
        for name, digest in digests.items():
            conn.execute(update(t.step_outputs).where(
                t.step_outputs.c.step_run_id == step_run_id, t.step_outputs.c.name == name,
                t.step_outputs.c.digest == pending).values(digest=digest))
        if forget_cache_entry:
            conn.execute(delete(t.cache_entries).where(t.cache_entries.c.step_run_id == step_run_id))


def complete_fingerprint(store: Store, step_run_id: str, fingerprint: str, parts: dict[str, Any],
                         cacheable: bool, definition: str | None, unless_output_like: str | None = None) -> bool:
    """A step committed while digests of its inputs were pending gets its fingerprint and cache
    entry, in one transaction (only once, only while it stands Completed, and not while one of its
    outputs' digests is ``unless_output_like``)."""
    with store.write() as conn:
        if unless_output_like is not None and conn.execute(select(t.step_outputs.c.name).where(
                t.step_outputs.c.step_run_id == step_run_id,
                t.step_outputs.c.digest.like(unless_output_like)).limit(1)).first() is not None:
            return False
        done = conn.execute(update(t.runs).where(
            t.runs.c.id == step_run_id, t.runs.c.fingerprint.is_(None), t.runs.c.status == Status.COMPLETED.value,
        ).values(fingerprint=fingerprint, fingerprint_parts=json.dumps(parts))).rowcount
        if done and cacheable:
            conn.execute(delete(t.cache_entries).where(t.cache_entries.c.fingerprint == fingerprint))
            conn.execute(insert(t.cache_entries).values(fingerprint=fingerprint, step_run_id=step_run_id,
                                                        created_at=_now(), definition=definition))
    return bool(done)


def output_row(step_run_id: str, output: dict[str, Any]) -> dict[str, Any]:
    """Every column, so that all rows of one executemany have the same keys (and a row is what
    ``get_outputs`` reads back)."""
    return {"stat_signature": None, **output, "step_run_id": step_run_id}


def lookup_cache(store: Store, fingerprint: str) -> str | None:
    with store.fast_read() as conn:
        rows = _fast(conn, _CACHE_LOOKUP, {"b_fingerprint": fingerprint}).fetchall()  # done: no read left open
        return rows[0][0] if rows else None


def definition_cached(store: Store, definition: str) -> bool:
    """Whether a step of this definition (its fingerprint without its inputs) was ever cached: if
    not, no input can make it reusable."""
    with store.fast_read() as conn:
        return bool(_fast(conn, _DEFINITION_LOOKUP, {"b_definition": definition}).fetchall())


# (step run, source step run, fingerprint, its parts (as JSON text, or as a dict), the source's outputs)
ReuseRecord = tuple[str, str, str, "dict[str, Any] | str", list[dict[str, Any]]]


def record_reuses(store: Store, records: list[ReuseRecord]) -> list[str]:
    """Each (step run, source run, fingerprint, its parts, the source's outputs) Reused, with the
    outputs of the source run (as ``get_outputs`` gave them to the caller's reuse check: committed
    outputs never change), in one transaction: a rerun reuses most of its steps in one dispatch
    pass. Returns the step runs that could not become Reused (they had ended meanwhile)."""
    with store.fast_write() as conn:  # prebuilt statements only
        return record_reuses_in(conn, records)


def record_reuses_in(conn: Connection, records: list[ReuseRecord]) -> list[str]:
    """``record_reuses`` in the caller's write transaction."""
    allowed = set_statuses(conn, [(step_run_id, Status.REUSED, f"reused the outputs of step run {source_id}",
                                   {"reused_from": source_id, "fingerprint": fingerprint,
                                    "fingerprint_parts": parts if isinstance(parts, str) else json.dumps(parts)})
                                  for step_run_id, source_id, fingerprint, parts, _ in records])
    reused = [record for record, ok in zip(records, allowed, strict=True) if ok]
    if reused:
        _fast(conn, _DELETE_OUTPUTS, [{"b_id": record[0]} for record in reused])
        outputs = [{**r, "step_run_id": record[0]} for record in reused for r in record[4]]
        if outputs:
            _fast(conn, _INSERT_OUTPUT, outputs)
    return [record[0] for record, ok in zip(records, allowed, strict=True) if not ok]


def previous_step_run(store: Store, experiment: str, step_name: str, before: float,
                      exclude_id: str, keyed: bool = True) -> dict[str, Any] | None:
    """The most recent earlier run of the same step in the same experiment that has a fingerprint
    (``keyed``), or that has fingerprint parts but no fingerprint (not ``keyed``)."""
    fingerprinted = t.runs.c.fingerprint.is_not(None) if keyed else and_(
        t.runs.c.fingerprint.is_(None), t.runs.c.fingerprint_parts.is_not(None))
    with store.read() as conn:
        row = conn.execute(select(t.runs).where(
            t.runs.c.kind == "step", t.runs.c.experiment == experiment, t.runs.c.name == step_name,
            t.runs.c.id != exclude_id, fingerprinted, t.runs.c.created_at <= before,
        ).order_by(t.runs.c.created_at.desc(), t.runs.c.id.desc()).limit(1)).first()
        return _d(row)


# -- snapshots and the stat cache ----------------------------------------------------------

def record_snapshot(store: Store, digest: str, manifest_digest: str, file_count: int, size: int,
                    stat_updates: dict[str, tuple[tuple[int, int, int], str]]) -> None:
    record_snapshots(store, [(digest, manifest_digest, file_count, size)], stat_updates)


def record_snapshots(store: Store, snapshots: list[tuple[str, str, int, int]],
                     stat_updates: dict[str, tuple[tuple[int, int, int], str]]) -> None:
    """New snapshots (digest, manifest digest, file count, size) and stat-cache rows, in one transaction."""
    with store.write() as conn:
        for digest, manifest_digest, file_count, size in snapshots:
            if conn.execute(select(t.snapshots.c.digest).where(t.snapshots.c.digest == digest)).first() is None:
                conn.execute(insert(t.snapshots).values(digest=digest, manifest=manifest_digest,
                                                        file_count=file_count, size=size, created_at=_now()))
        if stat_updates:
            paths = list(stat_updates)
            for i in range(0, len(paths), 500):
                conn.execute(delete(t.file_stat_cache).where(t.file_stat_cache.c.path.in_(paths[i:i + 500])))
            conn.execute(insert(t.file_stat_cache), [
                {"path": p, "size": k[0], "mtime_ns": k[1], "inode": k[2], "digest": d}
                for p, (k, d) in stat_updates.items()])


_SNAPSHOT_RECORDED = _select(t.snapshots, ("digest",), "digest")


def snapshot_recorded(store: Store, digest: str) -> bool:
    with store.fast_read() as conn:  # a prebuilt statement: a submit asks once per step folder
        return _fast(conn, _SNAPSHOT_RECORDED, {"b_digest": digest}).fetchone() is not None


def get_snapshot(store: Store, digest: str) -> dict[str, Any] | None:
    with store.read() as conn:
        return _d(conn.execute(select(t.snapshots).where(t.snapshots.c.digest == digest)).first())


_STAT_CACHE_OF = _with_sqlite_text(
    select(t.file_stat_cache.c.path, t.file_stat_cache.c.size, t.file_stat_cache.c.mtime_ns,
           t.file_stat_cache.c.inode, t.file_stat_cache.c.digest)
    .where(t.file_stat_cache.c.path >= bindparam("b_low"), t.file_stat_cache.c.path < bindparam("b_high")),
    'SELECT "path", "size", "mtime_ns", "inode", "digest" FROM "file_stat_cache" WHERE "path" >= ? AND "path" < ?',
    ("b_low", "b_high"))
StatCache = dict[str, tuple[tuple[int, int, int], str]]


def load_stat_cache(store: Store, prefix: str) -> StatCache:
    return load_stat_caches(store, [prefix])[prefix]


def load_stat_caches(store: Store, prefixes: list[str]) -> dict[str, StatCache]:
    """The stat-cache rows under each prefix, read through one connection (a pipeline of 500 step
    folders asks for 500 prefixes), as plain tuples from the driver (10,000 rows through
    SQLAlchemy's Row objects cost ~80 ms)."""
    found: dict[str, StatCache] = {}
    with store.fast_read() as conn:
        for prefix in dict.fromkeys(prefixes):
            rows = _fast(conn, _STAT_CACHE_OF, {"b_low": prefix, "b_high": prefix + "\U0010ffff"}).fetchall()
            found[prefix] = {r[0]: ((r[1], r[2], r[3]), r[4]) for r in rows}
    return found


# -- datastores and compute targets --------------------------------------------------------

def put_named(store: Store, which: str, name: str, kind: str, config: dict[str, Any],
              is_default: bool = False) -> None:
    table = t.datastores if which == "datastores" else t.compute_targets
    with store.write() as conn:
        conn.execute(delete(table).where(table.c.name == name))
        values = {"name": name, "kind": kind, "config": json.dumps(config), "created_at": _now()}
        if which == "datastores":
            if is_default:
                conn.execute(update(table).values(is_default=False))
            values["is_default"] = is_default
        conn.execute(insert(table).values(**values))


def set_default_datastore(store: Store, name: str) -> None:
    with store.write() as conn:
        conn.execute(update(t.datastores).values(is_default=False))
        conn.execute(update(t.datastores).where(t.datastores.c.name == name).values(is_default=True))


def delete_named(store: Store, which: str, name: str) -> None:
    table = t.datastores if which == "datastores" else t.compute_targets
    with store.write() as conn:
        conn.execute(delete(table).where(table.c.name == name))


def list_named(store: Store, which: str) -> list[dict[str, Any]]:
    table = t.datastores if which == "datastores" else t.compute_targets
    with store.fast_read() as conn:  # the engine asks at every claim, the client at every submit
        rows = _typed_rows(_fast_rows(conn, _NAMED[table.name], {}), table)
    for row in rows:
        row["config"] = json.loads(row["config"])
    return rows


# -- the dataset registry ------------------------------------------------------------------

def register_dataset(store: Store, *, dataset_id: str, name: str, kind: str, definition: dict[str, Any],
                     definition_digest: str, content_digest: str, file_count: int, size: int,
                     description: str | None, tags: dict[str, str], create_new_version: bool) -> dict[str, Any]:
    """A new version, unless the latest has the same definition and content (then that one)."""
    c = t.datasets.c
    with store.write() as conn:
        latest = _d(conn.execute(select(t.datasets).where(c.name == name).order_by(c.version.desc()).limit(1)).first())
        if latest is not None:
            same = latest["definition_digest"] == definition_digest and latest["content_digest"] == content_digest
            if same or not create_new_version:
                if not same:
                    raise ValueError(f"dataset {name!r} is already registered (version {latest['version']}) with "
                                     f"other data; pass create_new_version=True to add a version")
                return latest
        row = {"id": dataset_id, "name": name, "version": (latest["version"] + 1) if latest else 1, "kind": kind,
               "definition": json.dumps(definition, sort_keys=True), "definition_digest": definition_digest,
               "content_digest": content_digest, "file_count": file_count, "size": size,
               "description": description, "tags": json.dumps(tags), "created_at": _now()}
        conn.execute(insert(t.datasets).values(**row))
        return row


def get_dataset(store: Store, *, dataset_id: str | None = None, name: str | None = None,
                version: int | None = None) -> dict[str, Any] | None:
    c = t.datasets.c
    q = select(t.datasets)
    if dataset_id is not None:
        q = q.where(c.id == dataset_id)
    else:
        q = q.where(c.name == name)
        q = q.where(c.version == version) if version is not None else q.order_by(c.version.desc()).limit(1)
    with store.read() as conn:
        return _d(conn.execute(q).first())


def list_datasets(store: Store) -> list[dict[str, Any]]:
    """The latest version of every registered dataset."""
    with store.read() as conn:
        rows = [_d(r) for r in conn.execute(select(t.datasets).order_by(t.datasets.c.name,
                                                                                   t.datasets.c.version))]
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        latest[r["name"]] = r
    return list(latest.values())


def dataset_versions(store: Store, name: str) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [_d(r) for r in conn.execute(
            select(t.datasets).where(t.datasets.c.name == name).order_by(t.datasets.c.version))]


def runs_with_dataset(store: Store, label: str) -> dict[str, list[dict[str, Any]]]:
    """Step runs whose properties say they produced or consumed dataset ``name:version`` (also
    those that read its files after they changed: ``files_changed``)."""
    p = t.run_properties.c
    with store.read() as conn:
        rows = conn.execute(select(p.run_id, p.key, p.value, t.runs.c.parent_id, t.runs.c.name, t.runs.c.status,
                                   t.runs.c.created_at)
                            .join(t.runs, t.runs.c.id == p.run_id)
                            .where(or_(p.value == label, p.value.startswith(f"{label} (", autoescape=True)),
                                   p.key.like("cairn.%.dataset"))
                            .order_by(t.runs.c.created_at)).all()
    found: dict[str, list[dict[str, Any]]] = {"produced_by": [], "consumed_by": []}
    for r in rows:
        if r.value != label and not r.value.startswith(f"{label} ("):  # SQLite's LIKE ignores case: names do not
            continue
        side = "produced_by" if r.key.startswith("cairn.output.") else "consumed_by"
        found[side].append({"step_run_id": r.run_id, "pipeline_run_id": r.parent_id, "step": r.name,
                            "status": r.status, "as": r.key.split(".")[2], "created_at": r.created_at,
                            "files_changed": r.value != label})
    return found


# -- the environment registry --------------------------------------------------------------

def register_environment(store: Store, name: str, definition: dict[str, Any], spec_digest: str) -> dict[str, Any]:
    """A new version, unless the latest has the same spec (then that one)."""
    c = t.environments.c
    with store.write() as conn:
        latest = _d(conn.execute(select(t.environments).where(c.name == name).order_by(c.version.desc())
                                 .limit(1)).first())
        if latest is not None and latest["spec_digest"] == spec_digest:
            return _environment_row(latest)
        row = {"name": name, "version": (latest["version"] + 1) if latest else 1,
               "definition": json.dumps(definition, sort_keys=True), "spec_digest": spec_digest,
               "created_at": _now()}
        conn.execute(insert(t.environments).values(**row))
        return _environment_row(row)


def get_environment(store: Store, name: str, version: int | None = None) -> dict[str, Any] | None:
    c = t.environments.c
    q = select(t.environments).where(c.name == name)
    q = q.where(c.version == version) if version is not None else q.order_by(c.version.desc()).limit(1)
    with store.read() as conn:
        row = _d(conn.execute(q).first())
    return _environment_row(row) if row else None


def list_environments(store: Store) -> list[dict[str, Any]]:
    """Every version of every registered environment, by name then version."""
    c = t.environments.c
    with store.read() as conn:
        return [_environment_row(_d(r))
                for r in conn.execute(select(t.environments).order_by(c.name, c.version))]


def _environment_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "definition": json.loads(row["definition"]) if isinstance(row["definition"], str)
            else row["definition"]}


def unfinished_run_specs(store: Store) -> list[str]:
    """The graph spec JSON of every pipeline run that has not ended (what its steps still need)."""
    return [run["spec"] for run in unfinished_pipeline_runs(store) if run["spec"]]


def unfinished_pipeline_runs(store: Store) -> list[dict[str, Any]]:
    r = t.runs.c
    terminal = [s.value for s in Status if s.is_terminal]
    with store.read() as conn:
        return [_d(row) for row in conn.execute(
            select(r.id, r.spec).where(r.kind == "pipeline", r.status.not_in(terminal)))]
