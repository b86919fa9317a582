"""Opening stores: ``with_store`` and the process-wide table of open stores.

Opening the same store twice in one process gives the same object (so DVar
identity holds across both); it closes when the last ``with_store`` block
using it ends, or at interpreter exit, flushing everything committed.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import TYPE_CHECKING

from ..errors import STMError, StoreUnavailable
from ..names import check_store_name

if TYPE_CHECKING:
    from .durable import DurableStore

__all__ = ["with_store", "MODES"]

MODES = ("durable", "large", "distributed")

# Keyed by (real path of the database file, store name): one store object per file and name, whichever
# alias or spelling of the path opened it.
_open_stores: dict[tuple[str, str], DurableStore] = {}
_users: dict[DurableStore, int] = {}  # with_store uses not yet ended, per open store
_registry_lock = threading.RLock()


def _forget(store: DurableStore) -> None:
    with _registry_lock:
        for key, open_store in list(_open_stores.items()):
            if open_store is store:
                del _open_stores[key]
        _users.pop(store, None)


def _release(store: DurableStore) -> None:
    with _registry_lock:  # held while closing: with_store waits rather than reopen a half-closed store
        if store not in _users:  # already closed
            return
        _users[store] -= 1
        if _users[store] <= 0:
            store.close()


def _close_all() -> None:
    with _registry_lock:
        stores = list(_open_stores.values())
    for store in stores:
        store.close()


atexit.register(_close_all)


def _check_store_path(path: str | os.PathLike[str]) -> None:
    text = os.fspath(path)
    if text == ":memory:" or text.startswith("file:"):
        raise StoreUnavailable(
            f"with_store({text!r}): a durable store needs a file on disk; give a file path such as 'project.sqlite3'"
        )
    if os.path.isdir(text):
        raise StoreUnavailable(f"with_store({text!r}): that is a directory; give a file path inside it")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise StoreUnavailable(f"with_store({text!r}): the directory {directory} does not exist; create it first")


def with_store(
    path: str | os.PathLike[str] | None = None,
    *,
    database: str | None = None,
    mode: str = "durable",
    name: str = "default",
) -> DurableStore:
    """Open store ``name`` in the SQLite file ``path`` or the Django database ``database``.

    Use it as a context manager (the store is flushed and closed when the
    block ends) or keep the returned store open until the process exits.
    A file that does not exist is created; one that is not a djstm store
    raises ``StoreCorrupt`` and is left untouched.
    """
    if (path is None) == (database is None):
        raise TypeError("with_store() takes either a file path or database=ALIAS, not both or neither")
    check_store_name(name)
    if mode not in MODES:
        raise ValueError(f"with_store(mode={mode!r}): mode must be one of {', '.join(map(repr, MODES))}")
    if mode != "durable":
        raise STMError(f'with_store(mode={mode!r}) is not available in this version of djstm; use mode="durable"')

    from ..backends.connections import alias_for_sqlite_file, describe_database, ensure_django, ensure_schema
    from ..backends.locking import acquire_store_lease
    from ..backends.sqlite_files import inspect_store_file
    from .durable import DurableStore

    ensure_django()
    from django.db import connections

    if path is not None:
        _check_store_path(path)
        alias = alias_for_sqlite_file(path)
        database_file = connections.settings[alias]["NAME"]
        inspect_store_file(database_file)
        where, create = database_file, True
    else:
        if database not in connections.settings:
            known = ", ".join(map(repr, connections.settings)) or "none"
            raise StoreUnavailable(
                f"with_store(database={database!r}): no such alias in settings.DATABASES (known: {known})"
            )
        alias, where, create = database, describe_database(database), False
        vendor = connections[alias].vendor
        if vendor != "sqlite":
            raise StoreUnavailable(
                f"a durable store needs an SQLite database, and {where} is {vendor}; "
                "give a file path, or a database alias whose ENGINE is SQLite"
            )
        database_file = connections[alias].settings_dict["NAME"]

    with _registry_lock:
        key = (os.path.realpath(database_file), name)
        store = _open_stores.get(key)
        if store is not None and not store.closed:
            _users[store] += 1
            return store
        lease = acquire_store_lease(str(database_file), name, where)
        try:
            ensure_schema(alias, create=create)
        except BaseException:
            lease.release()
            raise

        def closed(store: DurableStore) -> None:
            lease.release()
            _forget(store)

        store = DurableStore(
            alias=alias,
            name=name,
            where=where,
            owns_database=create,
            release=_release,
            on_close=closed,
            closing=_registry_lock,
        )
        _open_stores[key] = store
        _users[store] = 1
        return store
