"""Telling whether a file can be opened as a djstm store, without changing it."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse

from ..errors import StoreCorrupt

__all__ = ["inspect_store_file"]

_SQLITE_MAGIC = b"SQLite format 3\x00"
_COLUMNS = {"id", "store", "name", "type_tag", "value", "version", "updated_at"}


def inspect_store_file(path: str) -> bool:
    """Return True if ``path`` is a djstm store to reuse, False if it is absent or empty (a new store).

    Raise :class:`StoreCorrupt` naming the path if it is anything else; the
    file is only ever read here.
    """
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(path, "rb") as file:
        header = file.read(len(_SQLITE_MAGIC))
    if header != _SQLITE_MAGIC:
        raise StoreCorrupt(
            f"{path} is not a djstm store: it is not an SQLite database. "
            "It was left untouched; open the store at another path."
        )
    uri = f"file:{urllib.parse.quote(path)}?mode=ro"
    # SQLite may create the -wal/-shm companions even for a read-only look: remove any we caused on refusal.
    companions = [path + suffix for suffix in ("-wal", "-shm")]
    absent = [companion for companion in companions if not os.path.exists(companion)]
    try:
        return _inspect_sqlite(path, uri)
    except StoreCorrupt:
        for companion in absent:
            if os.path.exists(companion):
                os.remove(companion)
        raise


def _inspect_sqlite(path: str, uri: str) -> bool:
    try:
        connection = sqlite3.connect(uri, uri=True)
        try:
            (verdict,) = connection.execute("PRAGMA quick_check(1)").fetchone()
            columns = {row[1] for row in connection.execute("PRAGMA table_info(djstm_dvar)")}
        finally:
            connection.close()
    except sqlite3.DatabaseError as error:
        raise StoreCorrupt(
            f"{path} is damaged ({error}); it was left untouched. Restore it from a backup, or open the store at another path."
        ) from None
    if verdict != "ok":
        raise StoreCorrupt(
            f"{path} is damaged (SQLite integrity check: {verdict}); it was left untouched. "
            "Restore it from a backup, or open the store at another path."
        )
    if not columns:
        raise StoreCorrupt(
            f"{path} is an SQLite database but not a djstm store (it has no djstm_dvar table); "
            "it was left untouched. Open the store at another path."
        )
    if not _COLUMNS <= columns:
        raise StoreCorrupt(
            f"{path} has a djstm_dvar table without the columns {sorted(_COLUMNS - columns)}, so it was not "
            "written by this djstm; it was left untouched. Open the store at another path."
        )
    return True
