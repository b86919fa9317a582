"""Reading and writing ``djstm_dvar`` rows: the hot paths, in SQL through Django's connection."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from django.db import connections
from django.utils import timezone

__all__ = ["StoredRow", "load_row", "upsert_rows", "fold_log_into_file", "commits_independently"]


class StoredRow(NamedTuple):
    type_tag: str
    value: str
    version: int


_SELECT_ROW = "SELECT type_tag, value, version FROM djstm_dvar WHERE store = %s AND name = %s"

# One statement for creation and update: a write-behind batch never needs to know which rows exist.
_UPSERT = (
    "INSERT INTO djstm_dvar (store, name, type_tag, value, version, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (store, name) DO UPDATE SET "
    "type_tag = excluded.type_tag, value = excluded.value, "
    "version = excluded.version, updated_at = excluded.updated_at"
)


def load_row(alias: str, store: str, name: str) -> StoredRow | None:
    """Return the stored row of DVar ``name`` in ``store``, or None."""

    with connections[alias].cursor() as cursor:
        cursor.execute(_SELECT_ROW, [store, name])
        row = cursor.fetchone()
    return None if row is None else StoredRow(*row)


def commits_independently(alias: str) -> bool:
    """True if a transaction on ``alias`` opened now, in this thread, commits on its own.

    False inside the caller's ``transaction.atomic()`` (a write there would only be a savepoint)
    or with autocommit turned off.
    """
    connection = connections[alias]
    return not connection.in_atomic_block and connection.get_autocommit()


def upsert_rows(alias: str, store: str, rows: Iterable[tuple[str, str, str, int]]) -> None:
    """Write ``(name, type_tag, value, version)`` rows of ``store`` in one database transaction.

    The caller makes sure the connection commits independently (see
    ``commits_independently``); the transaction is then opened by hand, which
    saves ``transaction.atomic()``'s bookkeeping, about a fifth of a flush of one row.
    """
    connection = connections[alias]
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    params = [(store, name, type_tag, value, version, now) for name, type_tag, value, version in rows]
    # IMMEDIATE takes SQLite's write lock up front, so the transaction never has to upgrade a read lock.
    begin = "BEGIN IMMEDIATE" if connection.vendor == "sqlite" else "BEGIN"
    with connection.cursor() as cursor:
        cursor.execute(begin)
        try:
            cursor.executemany(_UPSERT, params)
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        cursor.execute("COMMIT")


def fold_log_into_file(alias: str) -> None:
    """On SQLite, move the write-ahead log into the database file, so the file alone holds every flush."""
    connection = connections[alias]
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
