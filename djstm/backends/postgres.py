"""The SQL of distributed stores, on PostgreSQL: fetching, locking and committing DVar rows.

Every function takes a Django database alias and issues its statements
through that alias's connection in the calling thread, so each counts as one
query in Django's query log and joins the caller's ``transaction.atomic()``
when there is one. Statements that must run back to back (a ``BEGIN`` and the
first lock, an ``UPDATE`` and its ``COMMIT``) travel together in one round trip:
Django's default psycopg cursor binds parameters on the client, which lets
several statements share one message.

Rows are always locked in name order under the "C" collation, which is the
order of Python's ``str`` comparison, so locks taken here and locks taken in
the order a program touches names can never wait for each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from django.db import connections
from django.db.utils import DatabaseError, IntegrityError, InterfaceError

from ..errors import STMError, StoreUnavailable

__all__ = [
    "FetchedRow",
    "TransientDatabaseError",
    "check_can_serve",
    "create_row",
    "fetch_rows",
    "commit_checked",
    "begin_locked",
    "lock_rows",
    "commit_locked",
    "rollback",
    "in_callers_transaction",
]


class FetchedRow(NamedTuple):
    """A row as seen in one snapshot; ``value`` is None when the caller already had this ``version``."""

    name: str
    version: int | None  # None: there is no such row (any more)
    type_tag: str | None
    value: str | None


class TransientDatabaseError(Exception):
    """A failure worth re-running the transaction for: a lock wait that timed out, a deadlock, a
    serialization failure, a dropped connection. Nothing was committed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# SQLSTATEs after which the same transaction, run again, can succeed.
_TRANSIENT_STATES = {
    "40001": "a serialization failure",
    "40P01": "a deadlock reported by the database",
    "55P03": "a row lock that could not be had in time",
    "57014": "a statement cancelled by the server",
}


def _transient(error: DatabaseError) -> TransientDatabaseError | None:
    cause = error.__cause__
    state = getattr(cause, "sqlstate", None)
    if state in _TRANSIENT_STATES:
        return TransientDatabaseError(_TRANSIENT_STATES[state])
    # Class 08 is a broken connection, 57P0x a server shutting down or restarting.
    if isinstance(error, InterfaceError) or state is None or state.startswith(("08", "57P0")):
        return TransientDatabaseError(f"a lost connection to the database ({error})")
    return None


@contextmanager
def _statement(alias: str) -> Iterator:
    """A cursor on ``alias``; a failure that re-running can fix becomes ``TransientDatabaseError``."""
    connection = connections[alias]
    try:
        with connection.cursor() as cursor:
            yield cursor
    except DatabaseError as error:
        if not connection.in_atomic_block:
            _discard_transaction(alias)  # a transaction of ours failed: never leave it open and aborted
        transient = None if isinstance(error, IntegrityError) else _transient(error)
        if transient is None:
            raise
        raise transient from error


def _opened_transaction(alias: str) -> None:
    """Our ``BEGIN`` went through: tell Django the connection is not in autocommit mode any more.

    Django code that the transaction function runs (``transaction.atomic()``, ``get_or_create``)
    then nests in our transaction as savepoints, instead of failing to turn autocommit off.
    """
    connections[alias].autocommit = False


def _closed_transaction(alias: str) -> None:
    connections[alias].autocommit = True


def _discard_transaction(alias: str) -> None:
    """Leave the connection outside any transaction; close it if it is broken (Django reconnects later)."""
    connection = connections[alias]
    _closed_transaction(alias)
    try:
        if connection.connection is not None and not connection.connection.closed:
            with connection.connection.cursor() as raw:
                raw.execute("ROLLBACK")
            return
    except Exception:
        pass
    connection.close()


def in_callers_transaction(alias: str) -> bool:
    """True inside the caller's ``transaction.atomic()`` on ``alias``.

    Raises ``STMError`` under manual transaction management (autocommit turned off), where djstm
    could not learn when the caller's transaction commits.
    """
    connection = connections[alias]
    if connection.in_atomic_block:
        return True
    if not connection.get_autocommit():
        raise STMError(
            f"database {alias!r} has autocommit turned off (manual transaction management), so djstm cannot "
            "tell when its writes commit; use transaction.atomic() instead of set_autocommit(False)"
        )
    return False


def check_can_serve(alias: str, where: str) -> None:
    """Refuse a database a distributed store cannot use, saying what to change."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        raise StoreUnavailable(
            f"a distributed store needs PostgreSQL, and {where} is {connection.vendor}; point "
            "database= at an alias whose ENGINE is django.db.backends.postgresql, or use "
            'mode="durable" for a store used by one process'
        )
    if connection.settings_dict.get("OPTIONS", {}).get("server_side_binding") is True:
        raise StoreUnavailable(
            f"a distributed store sends a lock and its statement in one round trip, which needs "
            f"client-side parameter binding; remove OPTIONS['server_side_binding'] from {where}"
        )
    if "djstm_dvar" not in connection.introspection.table_names():
        raise StoreUnavailable(
            f"{where} has no djstm_dvar table; run `python manage.py migrate djstm --database {alias}` first"
        )


_INSERT = (
    "INSERT INTO djstm_dvar (store, name, type_tag, value, version, updated_at) "
    "VALUES (%s, %s, %s, %s, 0, now()) ON CONFLICT (store, name) DO NOTHING RETURNING version"
)
_SELECT_ONE = "SELECT version, type_tag, value FROM djstm_dvar WHERE store = %s AND name = %s"


def _in_transaction(alias: str) -> bool:
    connection = connections[alias]
    if connection.in_atomic_block or not connection.get_autocommit():
        return True
    raw = connection.connection
    return raw is not None and not raw.closed and raw.info.transaction_status != raw.info.transaction_status.IDLE


def _side_alias(alias: str) -> str:
    """An alias on the same database whose connection is never inside anyone's transaction."""
    side = f"{alias}:djstm-autocommit"
    if side not in connections.settings:
        settings = dict(connections.settings[alias])
        settings.update(AUTOCOMMIT=True, ATOMIC_REQUESTS=False)
        connections.settings[side] = settings
    return side


def create_row(alias: str, store: str, name: str, type_tag: str, value: str) -> FetchedRow:
    """Insert the row unless it exists, and return the row as stored (ours or the one that won a race).

    The row is committed at once, even inside a transaction of the caller's (or of djstm's): like a
    ``TVar``, a DVar exists from its creation on, whatever happens to the transaction that created it.
    Only a collision on (store, name) counts as a race; any other integrity error propagates.
    """
    if _in_transaction(alias):
        alias = _side_alias(alias)
    with _statement(alias) as cursor:
        cursor.execute(_SELECT_ONE, [store, name])
        row = cursor.fetchone()
        if row is None:
            cursor.execute(_INSERT, [store, name, type_tag, value])
            if cursor.fetchone() is not None:
                return FetchedRow(name, 0, type_tag, value)
            # Another process inserted it between our two statements: read theirs.
            cursor.execute(_SELECT_ONE, [store, name])
            row = cursor.fetchone()
    version, stored_tag, stored_value = row
    return FetchedRow(name, version, stored_tag, stored_value)


# One snapshot of several rows; a value travels only if its version differs from the one the caller has.
_FETCH = (
    "SELECT w.name, d.version, d.type_tag, CASE WHEN d.version IS DISTINCT FROM w.known THEN d.value END "
    "FROM unnest(%s::text[], %s::bigint[]) AS w(name, known) "
    "LEFT JOIN djstm_dvar d ON d.store = %s AND d.name = w.name"
)


def _rows(cursor) -> list[FetchedRow]:
    return [FetchedRow(*row) for row in cursor.fetchall()]


def fetch_rows(alias: str, store: str, names: Sequence[str], known: Sequence[int]) -> list[FetchedRow]:
    """Rows ``names`` of ``store`` in one snapshot, without locks; ``known[i]`` is the version held (-1: none)."""
    with _statement(alias) as cursor:
        cursor.execute(_FETCH, [list(names), list(known), store])
        return _rows(cursor)


def _lock_timeout(seconds: float) -> str:
    return f"SET LOCAL lock_timeout = '{max(1, int(seconds * 1000))}ms'; "  # 0 would mean no limit


# The optimistic commit, in one statement: lock every row read or written in name order, check the
# versions that were read, and write only if none changed. Rows only read are locked too, so no
# concurrent commit can change them before this one (no write skew). Returns the stale rows ('s')
# or the written rows with their new versions ('w').
_COMMIT_CHECKED = (
    "WITH w AS (SELECT * FROM unnest(%s::text[], %s::bigint[], %s::boolean[], %s::text[]) "
    "AS w(name, known, written, value)), "
    "locked AS (SELECT d.name, d.version FROM djstm_dvar d JOIN w ON d.name = w.name "
    'WHERE d.store = %s ORDER BY d.name COLLATE "C" FOR UPDATE OF d), '
    "stale AS (SELECT w.name, l.version FROM w LEFT JOIN locked l ON l.name = w.name "
    "WHERE l.name IS NULL OR (w.known >= 0 AND l.version <> w.known)), "
    "written AS (UPDATE djstm_dvar d SET value = w.value, version = d.version + 1, updated_at = now() "
    "FROM w WHERE d.store = %s AND d.name = w.name AND w.written AND NOT EXISTS (SELECT 1 FROM stale) "
    "RETURNING d.name, d.version) "
    "SELECT 's', name, version FROM stale UNION ALL SELECT 'w', name, version FROM written"
)


# One row read and written (or written blind): a compare-and-set does the whole check in the row's own
# lock, and PostgreSQL plans it in a fraction of the time of the statement above.
_COMMIT_ONE = (
    "UPDATE djstm_dvar SET value = %s, version = version + 1, updated_at = now() "
    "WHERE store = %s AND name = %s AND (%s < 0 OR version = %s) RETURNING version"
)


class CheckedCommit(NamedTuple):
    stale: dict[str, int | None]  # name -> version now stored (None: no row); empty if committed
    written: dict[str, int]  # name -> new version


def commit_checked(
    alias: str,
    store: str,
    names: Sequence[str],
    known: Sequence[int],
    written: Sequence[bool],
    values: Sequence[str | None],
    lock_timeout: float,
    keep_open: bool,
) -> CheckedCommit:
    """Commit (or, inside the caller's transaction, stage) the writes if every ``known`` version still holds.

    ``known[i]`` is -1 for a row written without being read (no check). With ``keep_open`` the statement
    runs in a database transaction left open, rows locked, for ``commit_locked`` (or ``rollback``) to end.
    """
    if len(names) == 1 and written[0]:
        sql, params = _COMMIT_ONE, [values[0], store, names[0], known[0], known[0]]
    else:
        sql, params = _COMMIT_CHECKED, [list(names), list(known), list(written), list(values), store, store]
    joined = in_callers_transaction(alias)
    with _statement(alias) as cursor:
        if joined:
            cursor.execute(sql, params)
        elif keep_open:
            cursor.execute("BEGIN; " + _lock_timeout(lock_timeout) + sql, params)
            _opened_transaction(alias)
            cursor.nextset()
            cursor.nextset()
        else:
            # Several statements in one message run as one implicit transaction, so SET LOCAL applies.
            cursor.execute(_lock_timeout(lock_timeout) + sql, params)
            cursor.nextset()
        rows = cursor.fetchall()
    if sql is _COMMIT_ONE:
        if not rows:
            return CheckedCommit({names[0]: None}, {})
        return CheckedCommit({}, {names[0]: rows[0][0]})
    stale = {name: version for kind, name, version in rows if kind == "s"}
    return CheckedCommit(stale, {} if stale else {name: version for kind, name, version in rows if kind == "w"})


_LOCK = (
    "SELECT d.name, d.version, d.type_tag, CASE WHEN d.version IS DISTINCT FROM w.known THEN d.value END "
    "FROM djstm_dvar d JOIN unnest(%s::text[], %s::bigint[]) AS w(name, known) ON d.name = w.name "
    'WHERE d.store = %s ORDER BY d.name COLLATE "C" FOR UPDATE OF d'
)


_LOCK_ONE = (
    "SELECT name, version, type_tag, CASE WHEN version IS DISTINCT FROM %s THEN value END "
    "FROM djstm_dvar WHERE store = %s AND name = %s FOR UPDATE"
)


def _lock_statement(store: str, names: Sequence[str], known: Sequence[int]) -> tuple[str, list]:
    if len(names) == 1:  # the common case, in a statement that is much cheaper to plan
        return _LOCK_ONE, [known[0], store, names[0]]
    return _LOCK, [list(names), list(known), store]


def begin_locked(
    alias: str, store: str, names: Sequence[str], known: Sequence[int], lock_timeout: float
) -> list[FetchedRow]:
    """Open a database transaction and lock rows ``names`` in name order, in one round trip."""
    sql, params = _lock_statement(store, names, known)
    with _statement(alias) as cursor:
        cursor.execute("BEGIN; " + _lock_timeout(lock_timeout) + sql, params)
        _opened_transaction(alias)
        cursor.nextset()
        cursor.nextset()
        return _rows(cursor)


def lock_rows(alias: str, store: str, names: Sequence[str], known: Sequence[int]) -> list[FetchedRow]:
    """In the open transaction, lock rows ``names`` in name order and return them."""
    sql, params = _lock_statement(store, names, known)
    with _statement(alias) as cursor:
        cursor.execute(sql, params)
        return _rows(cursor)


_WRITE_LOCKED = (
    "UPDATE djstm_dvar d SET value = w.value, version = d.version + 1, updated_at = now() "
    "FROM unnest(%s::text[], %s::text[]) AS w(name, value) "
    "WHERE d.store = %s AND d.name = w.name RETURNING d.name, d.version"
)


_WRITE_ONE_LOCKED = (
    "UPDATE djstm_dvar SET value = %s, version = version + 1, updated_at = now() "
    "WHERE store = %s AND name = %s RETURNING name, version"
)


def commit_locked(alias: str, store: str, names: Sequence[str], values: Sequence[str]) -> dict[str, int]:
    """Write the locked rows and commit the open transaction, in one round trip; return the new versions."""
    with _statement(alias) as cursor:
        if len(names) == 1:
            cursor.execute(_WRITE_ONE_LOCKED + "; COMMIT", [values[0], store, names[0]])
            written = {name: version for name, version in cursor.fetchall()}
        elif names:
            cursor.execute(_WRITE_LOCKED + "; COMMIT", [list(names), list(values), store])
            written = {name: version for name, version in cursor.fetchall()}
        else:
            cursor.execute("COMMIT")
            written = {}
    _closed_transaction(alias)
    return written


def rollback(alias: str) -> None:
    """End the open database transaction without committing (harmless if none is open)."""
    try:
        with _statement(alias) as cursor:
            cursor.execute("ROLLBACK")
    except TransientDatabaseError:
        pass  # the connection broke: _statement already discarded the transaction with it
    _closed_transaction(alias)
